//! The `[backend]` keys of a native module's worker sandbox: its cgroup's
//! limits, the capabilities it keeps, an optional uid/gid, the seccomp
//! filter, and whether it may run where the kernel refuses part of the
//! sandbox. (The sandbox itself is set up by [`crate::worker`].)

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

/// The worker's memory limit (its cgroup's) unless `memory_mb` says
/// otherwise: a device backend's worker needs a few MiB; 256 MiB leaves a
/// vendor library room and still stops a leak long before the node notices.
pub const DEFAULT_MEMORY_MB: u64 = 256;
/// The worker's process and thread limit unless `pids_max` says otherwise:
/// the worker's call threads (one per call in flight) and a vendor
/// library's own threads fit many times over.
pub const DEFAULT_PIDS_MAX: u64 = 256;
/// The fewest MiB a worker can start in.
const MIN_MEMORY_MB: u64 = 16;
/// The fewest processes and threads a worker can serve with.
const MIN_PIDS: u64 = 8;

/// The sandbox a native module's worker runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSandbox {
    /// Memory limit of the worker's cgroup, in MiB (`memory_mb`).
    pub memory_mb: u64,
    /// Process and thread limit of the worker's cgroup (`pids_max`).
    pub pids_max: u64,
    /// Capabilities the worker keeps, canonical names (`CAP_SYS_ADMIN`);
    /// empty: none.
    pub capabilities: Vec<String>,
    /// The user the worker runs as (`uid`); devhost's own if `None`.
    pub uid: Option<u32>,
    /// The group the worker runs as (`gid`); devhost's own if `None`.
    pub gid: Option<u32>,
    /// Whether the seccomp filter is installed (`seccomp`, default true).
    pub seccomp: bool,
    /// `unsandboxed = "allow"`: where the kernel refuses part of the
    /// sandbox, run the worker without that part (said in the log and
    /// `/readyz`) instead of refusing to start it.
    pub allow_unsandboxed: bool,
    /// `unsandboxed = "always"`: no sandbox at all (a worker process as
    /// before sandboxes existed; for measuring its cost, or a kernel
    /// without namespaces); said in the log and `/readyz`.
    pub disabled: bool,
}

impl Default for WorkerSandbox {
    fn default() -> Self {
        WorkerSandbox {
            memory_mb: DEFAULT_MEMORY_MB,
            pids_max: DEFAULT_PIDS_MAX,
            capabilities: Vec::new(),
            uid: None,
            gid: None,
            seccomp: true,
            allow_unsandboxed: false,
            disabled: false,
        }
    }
}

/// The sandbox keys as written in `[backend]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawWorkerKeys {
    pub(super) memory_mb: Option<Spanned<u64>>,
    pub(super) pids_max: Option<Spanned<u64>>,
    pub(super) capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) uid: Option<Spanned<u32>>,
    pub(super) gid: Option<Spanned<u32>>,
    pub(super) seccomp: Option<Spanned<bool>>,
    pub(super) unsandboxed: Option<Spanned<String>>,
}

type At<'a> = &'a dyn Fn(std::ops::Range<usize>, String) -> ConfigError;

impl RawWorkerKeys {
    /// The first key that is set, with its name: for files whose backend
    /// has no worker (a built-in kind, a WASM component, `isolation =
    /// "none"`), where each of them is an error.
    pub(super) fn first_set(&self) -> Option<(&'static str, std::ops::Range<usize>)> {
        [
            ("memory_mb", self.memory_mb.as_ref().map(Spanned::span)),
            ("pids_max", self.pids_max.as_ref().map(Spanned::span)),
            ("capabilities", self.capabilities.as_ref().map(Spanned::span)),
            ("uid", self.uid.as_ref().map(Spanned::span)),
            ("gid", self.gid.as_ref().map(Spanned::span)),
            ("seccomp", self.seccomp.as_ref().map(Spanned::span)),
            ("unsandboxed", self.unsandboxed.as_ref().map(Spanned::span)),
        ]
        .into_iter()
        .find_map(|(key, span)| Some((key, span?)))
    }

    /// The sandbox these keys describe.
    pub(super) fn parse(self, at: At<'_>) -> Result<WorkerSandbox, ConfigError> {
        let mut sandbox = WorkerSandbox::default();
        if let Some(mb) = self.memory_mb {
            if *mb.get_ref() < MIN_MEMORY_MB {
                return Err(at(
                    mb.span(),
                    format!("memory_mb must be at least {MIN_MEMORY_MB} (the worker itself needs some)"),
                ));
            }
            sandbox.memory_mb = mb.into_inner();
        }
        if let Some(pids) = self.pids_max {
            if *pids.get_ref() < MIN_PIDS {
                return Err(at(
                    pids.span(),
                    format!("pids_max must be at least {MIN_PIDS} (the worker's own threads count)"),
                ));
            }
            sandbox.pids_max = pids.into_inner();
        }
        for name in self.capabilities.map(Spanned::into_inner).unwrap_or_default() {
            let canonical = crate::worker::lockdown::parse_capability(name.get_ref())
                .map_err(|why| at(name.span(), format!("capabilities: {why}")))?;
            let canonical = crate::worker::lockdown::capability_name(canonical);
            if !sandbox.capabilities.contains(&canonical) {
                sandbox.capabilities.push(canonical);
            }
        }
        sandbox.uid = self.uid.map(Spanned::into_inner);
        sandbox.gid = self.gid.map(Spanned::into_inner);
        sandbox.seccomp = self.seccomp.is_none_or(Spanned::into_inner);
        if let Some(value) = self.unsandboxed {
            (sandbox.allow_unsandboxed, sandbox.disabled) = match value.get_ref().as_str() {
                "refuse" => (false, false),
                "allow" => (true, false),
                "always" => (true, true),
                other => {
                    return Err(at(
                        value.span(),
                        format!("unsandboxed must be \"refuse\", \"allow\" or \"always\", not {other:?}"),
                    ));
                }
            };
        }
        Ok(sandbox)
    }
}
