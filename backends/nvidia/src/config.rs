//! The backend's `[config]` table: raw `serde` shape with defaults, then
//! validation into [`Config`]. Every path the backend touches (the NVML
//! library, `/dev`, `/sys`) is here, with its production default, so tests
//! point them at fixtures.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use devhost_abi::sdk::{Error, parse_config};

use crate::xid::{DEFAULT_IGNORED_XIDS, XidPolicy};

/// The resource served unless `resource` says otherwise.
pub const DEFAULT_RESOURCE: &str = "nvidia.com/gpu";
/// The NVML library loaded unless `library` says otherwise.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Raw {
    resource: String,
    library: String,
    cdi: bool,
    dev_root: PathBuf,
    sysfs_root: PathBuf,
    health: bool,
    ignored_xids: Vec<u64>,
    probe_interval_ms: u64,
    reset_on_release: bool,
    mig: Mig,
}

/// What the backend does with GPUs in MIG mode (`[config] mig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mig {
    /// Serve them whole, as every other GPU (the default).
    #[default]
    Off,
    /// Also publish every possible MIG GPU-instance placement as a
    /// partition of the GPU (DRA's partitionable devices): a counter set
    /// per GPU, and devices consuming from it. See [`crate::mig`].
    Partitions,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            resource: DEFAULT_RESOURCE.into(),
            library: DEFAULT_LIBRARY.into(),
            cdi: false,
            dev_root: "/dev".into(),
            sysfs_root: "/sys".into(),
            health: true,
            ignored_xids: DEFAULT_IGNORED_XIDS.iter().map(|(xid, _)| *xid).collect(),
            probe_interval_ms: 5000,
            reset_on_release: false,
            mig: Mig::Off,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Extended resource name the GPUs are served as.
    pub resource: String,
    /// File name or path handed to `dlopen` for NVML.
    pub library: String,
    /// Add CDI device names `nvidia.com/gpu=<UUID>` to every allocation.
    pub cdi: bool,
    /// Where device nodes are looked up (`/dev`, or the host's `/dev` as
    /// mounted into devhost's container).
    pub dev_root: PathBuf,
    /// Where sysfs is read (`/sys`).
    pub sysfs_root: PathBuf,
    /// Watch XID events and probe GPUs; `false` advertises every GPU Healthy.
    pub health: bool,
    /// Which XIDs count as critical.
    pub xids: XidPolicy,
    /// How often every GPU is probed, and how long an Unhealthy GPU stays
    /// Unhealthy after its last critical XID before a probe may clear it.
    pub probe_interval: Duration,
    /// Ask devhost for `release` and reset each GPU once no container
    /// holds it and no process has it open. Off by default: with it off the
    /// resource does not ask for `release` at all.
    pub reset_on_release: bool,
    /// What to publish for GPUs in MIG mode: off (whole GPUs only, the
    /// default) or `partitions`.
    pub mig: Mig,
}

impl Config {
    /// Parses and validates the `[config]` JSON.
    pub fn parse(json: &str) -> Result<Config, Error> {
        let raw: Raw = parse_config(json)?;
        let resource = raw.resource.trim().to_owned();
        let valid_name = resource
            .split_once('/')
            .is_some_and(|(domain, name)| !domain.is_empty() && !name.is_empty() && !name.contains('/'));
        if !valid_name {
            return Err(Error::new(format!(
                "invalid [config] table: resource {:?} is not an extended resource name (expected `<domain>/<name>`, e.g. \"nvidia.com/gpu\")",
                raw.resource
            )));
        }
        if raw.library.trim().is_empty() {
            return Err(Error::new("invalid [config] table: library is empty (expected e.g. \"libnvidia-ml.so.1\")"));
        }
        if raw.probe_interval_ms == 0 {
            return Err(Error::new("invalid [config] table: probe_interval_ms is 0 (expected at least 1)"));
        }
        Ok(Config {
            resource,
            library: raw.library,
            cdi: raw.cdi,
            dev_root: raw.dev_root,
            sysfs_root: raw.sysfs_root,
            health: raw.health,
            xids: XidPolicy::new(raw.ignored_xids.into_iter().collect::<BTreeSet<_>>()),
            probe_interval: Duration::from_millis(raw.probe_interval_ms),
            reset_on_release: raw.reset_on_release,
            mig: raw.mig,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_nvidia_com_gpu_from_the_real_paths() {
        for empty in ["", "{}"] {
            let config = Config::parse(empty).expect("defaults are valid");
            assert_eq!(config.resource, "nvidia.com/gpu");
            assert_eq!(config.library, "libnvidia-ml.so.1");
            assert!(!config.cdi);
            assert!(config.health);
            assert_eq!(config.dev_root, PathBuf::from("/dev"));
            assert_eq!(config.sysfs_root, PathBuf::from("/sys"));
            assert_eq!(config.probe_interval, Duration::from_secs(5));
            assert_eq!(config.xids, XidPolicy::default());
            assert!(!config.reset_on_release, "no release is asked for unless configured");
            assert_eq!(config.mig, Mig::Off, "MIG partitions only when asked for");
        }
    }

    #[test]
    fn every_key_can_be_set() {
        let config = Config::parse(
            r#"{"resource": "acme.com/gpu", "library": "/opt/nvml.so", "cdi": true, "dev_root": "/host/dev",
                "sysfs_root": "/host/sys", "health": false, "ignored_xids": [13], "probe_interval_ms": 250,
                "reset_on_release": true, "mig": "partitions"}"#,
        )
        .expect("valid");
        assert_eq!(config.resource, "acme.com/gpu");
        assert_eq!(config.library, "/opt/nvml.so");
        assert!(config.cdi && !config.health);
        assert_eq!(config.dev_root, PathBuf::from("/host/dev"));
        assert_eq!(config.sysfs_root, PathBuf::from("/host/sys"));
        assert_eq!(config.probe_interval, Duration::from_millis(250));
        assert!(!config.xids.is_critical(Some(13)));
        assert!(config.xids.is_critical(Some(31)), "the list replaces the default");
        assert!(config.reset_on_release);
        assert_eq!(config.mig, Mig::Partitions);
        assert_eq!(Config::parse(r#"{"mig": "off"}"#).expect("valid").mig, Mig::Off);
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../gpu.toml");
        let file: toml::Table = toml::from_str(text).expect("the example is TOML");
        let json = serde_json::to_string(&file["config"]).expect("JSON");
        let config = Config::parse(&json).expect("the example's [config] is valid");
        assert!(config.cdi);
        assert_eq!(Config { cdi: false, ..config }, Config::parse("{}").expect("defaults"), "otherwise the defaults");
    }

    #[test]
    fn an_empty_ignore_list_makes_every_xid_critical() {
        let config = Config::parse(r#"{"ignored_xids": []}"#).expect("valid");
        assert!(config.xids.is_critical(Some(13)));
    }

    #[test]
    fn errors_name_the_key_and_what_was_expected() {
        let error = |json: &str| Config::parse(json).expect_err("invalid").to_string();
        assert_eq!(
            error(r#"{"resource": "gpu"}"#),
            "invalid [config] table: resource \"gpu\" is not an extended resource name (expected `<domain>/<name>`, e.g. \"nvidia.com/gpu\")"
        );
        assert_eq!(
            error(r#"{"probe_interval_ms": 0}"#),
            "invalid [config] table: probe_interval_ms is 0 (expected at least 1)"
        );
        assert_eq!(
            error(r#"{"library": " "}"#),
            "invalid [config] table: library is empty (expected e.g. \"libnvidia-ml.so.1\")"
        );
        assert!(
            error(r#"{"cdi": "yes"}"#)
                .starts_with("invalid [config] table: invalid type: string \"yes\", expected a boolean")
        );
        assert!(error(r#"{"colour": 1}"#).starts_with("invalid [config] table: unknown field `colour`"));
        assert!(
            error(r#"{"mig": "devices"}"#)
                .starts_with("invalid [config] table: unknown variant `devices`, expected `off` or `partitions`"),
            "{}",
            error(r#"{"mig": "devices"}"#)
        );
        assert!(error(r#"{"ignored_xids": [-1]}"#).starts_with("invalid [config] table: invalid value: integer `-1`"));
    }
}
