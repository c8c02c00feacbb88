//! XID policy: which XID errors make a GPU Unhealthy. NVIDIA's driver
//! reports an XID for every error it sees, including errors caused by the
//! application running on the GPU (a bad pointer, a killed context). Those
//! say nothing about the GPU and must not take it away from the next pod;
//! they are ignored by default. Everything else, including XIDs this table
//! does not know and the "unknown XID" NVML reports, counts as critical.

use std::collections::BTreeSet;

/// The XIDs ignored by default, each with why: all are faults of the
/// application on the GPU, which the driver recovers from by tearing down
/// that application's context.
pub const DEFAULT_IGNORED_XIDS: &[(u64, &str)] = &[
    (13, "graphics engine exception: usually an application's out-of-range access or illegal instruction"),
    (31, "GPU memory page fault: an application touched an address it does not own"),
    (43, "GPU stopped processing: the driver stopped an application's faulting channel"),
    (45, "preemptive cleanup: the driver cleans up after a killed or faulted application"),
    (68, "video processor (NVDEC) exception: usually malformed input from an application"),
    (109, "context switch timeout: an application's context would not yield"),
];

/// Short names of XIDs, for log lines.
const NAMES: &[(u64, &str)] = &[
    (13, "graphics engine exception"),
    (31, "GPU memory page fault"),
    (32, "invalid or corrupted push buffer stream"),
    (38, "driver firmware error"),
    (43, "GPU stopped processing"),
    (45, "preemptive cleanup"),
    (48, "double-bit ECC error"),
    (61, "internal micro-controller breakpoint"),
    (62, "internal micro-controller halt"),
    (63, "ECC page retirement or row remapping recorded"),
    (64, "ECC page retirement or row remapping failure"),
    (68, "video processor exception"),
    (69, "graphics engine class error"),
    (74, "NVLink error"),
    (79, "GPU has fallen off the bus"),
    (92, "high single-bit ECC error rate"),
    (94, "contained ECC error"),
    (95, "uncontained ECC error"),
    (109, "context switch timeout"),
    (119, "GSP RPC timeout"),
    (120, "GSP error"),
];

/// Describes an XID for a log line: `XID 79 (GPU has fallen off the bus)`.
pub fn describe(xid: Option<u64>) -> String {
    match xid {
        None => "an XID NVML could not identify".to_owned(),
        Some(xid) => match NAMES.iter().find(|(n, _)| *n == xid) {
            Some((_, name)) => format!("XID {xid} ({name})"),
            None => format!("XID {xid}"),
        },
    }
}

/// Which XIDs are critical: all but the ignored ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidPolicy {
    ignored: BTreeSet<u64>,
}

impl Default for XidPolicy {
    fn default() -> Self {
        XidPolicy::new(DEFAULT_IGNORED_XIDS.iter().map(|(xid, _)| *xid).collect())
    }
}

impl XidPolicy {
    /// A policy that ignores exactly these XIDs.
    pub fn new(ignored: BTreeSet<u64>) -> Self {
        XidPolicy { ignored }
    }

    /// Whether this XID makes a GPU Unhealthy. An XID NVML could not
    /// identify (`None`) is critical: not knowing is no reason to trust.
    pub fn is_critical(&self, xid: Option<u64>) -> bool {
        xid.is_none_or(|xid| !self.ignored.contains(&xid))
    }

    /// The ignored XIDs, in order.
    pub fn ignored(&self) -> impl Iterator<Item = u64> + '_ {
        self.ignored.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_errors_are_ignored_by_default_and_hardware_errors_are_critical() {
        let policy = XidPolicy::default();
        assert_eq!(policy.ignored().collect::<Vec<_>>(), [13, 31, 43, 45, 68, 109]);
        for xid in [13, 31, 43, 45, 68, 109] {
            assert!(!policy.is_critical(Some(xid)), "XID {xid} is an application error");
        }
        for xid in [48, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 12345] {
            assert!(policy.is_critical(Some(xid)), "XID {xid} is critical");
        }
        assert!(policy.is_critical(None), "an unidentified XID is critical");
    }

    #[test]
    fn a_configured_list_replaces_the_default() {
        let policy = XidPolicy::new([48].into());
        assert!(!policy.is_critical(Some(48)));
        assert!(policy.is_critical(Some(13)));
    }

    #[test]
    fn descriptions_name_known_xids() {
        assert_eq!(describe(Some(79)), "XID 79 (GPU has fallen off the bus)");
        assert_eq!(describe(Some(4242)), "XID 4242");
        assert_eq!(describe(None), "an XID NVML could not identify");
    }
}
