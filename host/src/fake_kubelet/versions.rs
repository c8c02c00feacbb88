//! What each kubelet minor does on the DRA side, for the fake to copy:
//! which `DRAPlugin` package it talks, and which `DRAResourceHealth`
//! version it opens and when (`docs/dra-api.md` §2–3, checked against the
//! kubelets' code; `../shared/DRA_FACTS.md`).
//!
//! | kubelet | `DRAPlugin` (preferred first) | health stream |
//! |---|---|---|
//! | 1.32, 1.33 | `v1beta1` | none (DRA health did not exist) |
//! | 1.34, 1.35 | `v1`, `v1beta1` | none: ResourceHealthStatus is alpha, off by default |
//! | 1.36 | `v1`, `v1beta1` | `v1alpha1`, on **every** registered plugin, whatever it lists (the gate is beta, on); retried every 5 s on error |
//! | 1.37 | `v1`, `v1beta1` | `v1`, only when the plugin lists `v1.DRAResourceHealth` |

use std::time::Duration;

/// The health API a kubelet opens on a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthApi {
    /// `/v1alpha1.DRAResourceHealth/NodeWatchResources`.
    V1alpha1,
    /// `/v1.DRAResourceHealth/NodeWatchResources`.
    V1,
}

/// How long the kubelet waits before opening a failed health stream again.
pub const HEALTH_RETRY: Duration = Duration::from_secs(5);

/// A kubelet minor version, 1.32 to 1.37.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeletVersion {
    minor: u32,
}

impl KubeletVersion {
    /// The oldest minor modelled.
    pub const OLDEST: u32 = 32;
    /// The newest minor modelled.
    pub const NEWEST: u32 = 37;

    /// Kubelet `1.<minor>`, if it is one of those modelled.
    pub const fn new(minor: u32) -> Option<Self> {
        if minor >= Self::OLDEST && minor <= Self::NEWEST { Some(KubeletVersion { minor }) } else { None }
    }

    /// Every modelled minor, oldest first.
    pub fn all() -> impl Iterator<Item = KubeletVersion> {
        (Self::OLDEST..=Self::NEWEST).map(|minor| KubeletVersion { minor })
    }

    /// The minor number.
    pub fn minor(self) -> u32 {
        self.minor
    }

    /// The `DRAPlugin` services this kubelet knows, preferred first.
    pub fn dra_services(self) -> &'static [&'static str] {
        if self.minor >= 34 { &["v1.DRAPlugin", "v1beta1.DRAPlugin"] } else { &["v1beta1.DRAPlugin"] }
    }

    /// The health stream this kubelet opens on a plugin that listed
    /// `supported_versions`, if any.
    pub fn health_api(self, supported_versions: &[String]) -> Option<HealthApi> {
        match self.minor {
            36 => Some(HealthApi::V1alpha1),
            37.. => supported_versions.iter().any(|v| v == "v1.DRAResourceHealth").then_some(HealthApi::V1),
            _ => None,
        }
    }
}

impl std::fmt::Display for KubeletVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "1.{}", self.minor)
    }
}

impl std::str::FromStr for KubeletVersion {
    type Err = String;

    /// `1.36`, `v1.36`, or `1.36.2` (the patch is ignored).
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("kubelet version {text:?}: expected 1.{}..1.{} (e.g. 1.36 or v1.36.2)", Self::OLDEST, Self::NEWEST)
        };
        let mut parts = text.strip_prefix('v').unwrap_or(text).split('.');
        let (Some("1"), Some(minor)) = (parts.next(), parts.next()) else { return Err(bad()) };
        minor.parse().ok().and_then(KubeletVersion::new).ok_or_else(bad)
    }
}

/// A 1.32 kubelet: `v1beta1.DRAPlugin` only.
pub const KUBELET_1_32: KubeletVersion = KubeletVersion { minor: 32 };
/// A 1.34 kubelet: both `DRAPlugin` packages, no health stream by default.
pub const KUBELET_1_34: KubeletVersion = KubeletVersion { minor: 34 };
/// A 1.36 kubelet: health `v1alpha1` on every plugin.
pub const KUBELET_1_36: KubeletVersion = KubeletVersion { minor: 36 };
/// A 1.37 kubelet: health `v1` when the plugin lists it.
pub const KUBELET_1_37: KubeletVersion = KubeletVersion { minor: 37 };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_minor_chooses_its_services_and_health() {
        let listed = vec!["v1.DRAPlugin".to_owned(), "v1.DRAResourceHealth".to_owned()];
        let unlisted = vec!["v1.DRAPlugin".to_owned()];
        type Row = (u32, &'static [&'static str], Option<HealthApi>, Option<HealthApi>);
        let table: Vec<Row> = KubeletVersion::all()
            .map(|v| (v.minor(), v.dra_services(), v.health_api(&listed), v.health_api(&unlisted)))
            .collect();
        let both: &[&str] = &["v1.DRAPlugin", "v1beta1.DRAPlugin"];
        let beta: &[&str] = &["v1beta1.DRAPlugin"];
        assert_eq!(
            table,
            [
                (32, beta, None, None),
                (33, beta, None, None),
                (34, both, None, None),
                (35, both, None, None),
                (36, both, Some(HealthApi::V1alpha1), Some(HealthApi::V1alpha1)),
                (37, both, Some(HealthApi::V1), None),
            ]
        );
    }

    #[test]
    fn versions_parse_as_operators_write_them() {
        for (text, minor) in [("1.36", 36), ("v1.37.1", 37), ("1.32.0", 32)] {
            assert_eq!(text.parse::<KubeletVersion>().map(KubeletVersion::minor), Ok(minor), "{text}");
        }
        for text in ["1.31", "1.38", "2.36", "36", "", "1.x"] {
            assert!(text.parse::<KubeletVersion>().is_err(), "{text}");
        }
    }
}
