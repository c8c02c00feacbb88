//! The `[config]` table of a generic backend file, parsed (serde, unknown
//! keys refused) and then validated into [`Config`]. It owns the rules on
//! values; discovery and allocation live elsewhere.

use std::path::PathBuf;
use std::time::Duration;

use devhost_abi::sdk::{Error, Mount};
use serde::Deserialize;

/// How the paths a group matches become devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grouping {
    /// Every matching path is one device (the default).
    Each,
    /// All matching paths together are one device; it exists while every
    /// pattern matches at least one path.
    All,
    /// The paths that belong to the same USB device are one device.
    Usb,
}

/// A USB vendor/product ID pair, as four hex digits each (`0403`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbId {
    /// `idVendor` in sysfs.
    pub vendor: String,
    /// `idProduct` in sysfs; absent: any product of the vendor.
    #[serde(default)]
    pub product: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    host_path: String,
    container_path: Option<String>,
    #[serde(default = "yes")]
    read_only: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    resource: String,
    paths: Vec<String>,
    #[serde(default)]
    grouping: Option<Grouping>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usb: Vec<UsbId>,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    mounts: Vec<RawMount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dev_root: Option<PathBuf>,
    #[serde(default)]
    sysfs_root: Option<PathBuf>,
    #[serde(default)]
    rescan_interval_ms: Option<u64>,
    #[serde(default)]
    removal_grace_ms: Option<u64>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

/// One resource: which paths, how they become devices, what a container
/// gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The extended resource name.
    pub resource: String,
    /// Absolute glob patterns (`/dev/ttyUSB*`).
    pub paths: Vec<String>,
    /// How matches become devices.
    pub grouping: Grouping,
    /// The device ID with [`Grouping::All`].
    pub id: String,
    /// USB IDs a path's USB device must have (any of them); empty: no USB
    /// filter.
    pub usb: Vec<UsbId>,
    /// cgroup permissions of every device node: `r`, `w`, `m`.
    pub permissions: String,
    /// Extra bind mounts for every container that gets a device.
    pub mounts: Vec<Mount>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where `/dev/...` patterns are looked up on disk (`/`; a temp dir in
    /// tests). Device specs name the on-disk path as the host path.
    pub dev_root: PathBuf,
    /// The sysfs mount (`/sys`), for USB IDs.
    pub sysfs_root: PathBuf,
    /// How often the paths are matched again (hot-plug).
    pub rescan_interval: Duration,
    /// How long a vanished device stays listed (Unhealthy) before it is
    /// dropped.
    pub removal_grace: Duration,
    /// The resources.
    pub groups: Vec<Group>,
}

/// The default rescan interval.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(1);
/// The default grace before a vanished device is dropped.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

fn hex4(value: &str, what: &str, resource: &str) -> Result<String, Error> {
    let value = value.trim_start_matches("0x").to_ascii_lowercase();
    if value.len() == 4 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(value)
    } else {
        Err(Error::new(format!("group {resource:?}: USB {what} {value:?} must be four hex digits, e.g. \"0403\"")))
    }
}

impl Config {
    /// Parses and validates the `[config]` JSON.
    pub fn parse(json: &str) -> Result<Config, Error> {
        let raw: RawConfig = devhost_abi::sdk::parse_config(json)?;
        if raw.group.is_empty() {
            return Err(Error::new("no [[config.group]]: declare at least one group (resource and paths)"));
        }
        let mut groups: Vec<Group> = Vec::new();
        for g in raw.group {
            let resource = g.resource;
            if groups.iter().any(|other| other.resource == resource) {
                return Err(Error::new(format!("group {resource:?} is declared twice")));
            }
            if g.paths.is_empty() {
                return Err(Error::new(format!("group {resource:?}: `paths` is empty")));
            }
            for path in &g.paths {
                if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    return Err(Error::new(format!(
                        "group {resource:?}: path {path:?} must be absolute and without `..`, e.g. \"/dev/ttyUSB*\""
                    )));
                }
            }
            if let Some(count) = g.count.filter(|c| *c != 1) {
                return Err(Error::new(format!(
                    "group {resource:?}: count = {count}: sharing is done by devhost for every backend; \
                     write `[resources.\"{resource}\"]` with `replicas = {count}` in this backend file instead"
                )));
            }
            let permissions = g.permissions.unwrap_or_else(|| "rw".to_owned());
            let valid = !permissions.is_empty()
                && permissions.chars().all(|c| "rwm".contains(c))
                && permissions.chars().collect::<std::collections::BTreeSet<_>>().len() == permissions.len();
            if !valid {
                return Err(Error::new(format!(
                    "group {resource:?}: permissions {permissions:?} must be letters of \"rwm\", each once (e.g. \"rw\", \"rwm\")"
                )));
            }
            let mut usb = Vec::new();
            for id in g.usb {
                let vendor = hex4(&id.vendor, "vendor", &resource)?;
                let product = id.product.map(|p| hex4(&p, "product", &resource)).transpose()?;
                usb.push(UsbId { vendor, product });
            }
            let grouping = g.grouping.unwrap_or(Grouping::Each);
            let mut mounts = Vec::new();
            for m in g.mounts {
                let container_path = m.container_path.unwrap_or_else(|| m.host_path.clone());
                if !m.host_path.starts_with('/') || !container_path.starts_with('/') {
                    return Err(Error::new(format!(
                        "group {resource:?}: mount {:?} -> {container_path:?}: both paths must be absolute",
                        m.host_path
                    )));
                }
                mounts.push(Mount { container_path, host_path: m.host_path, read_only: m.read_only });
            }
            let default_id = resource.rsplit('/').next().unwrap_or(&resource).to_owned();
            let id = g.id.unwrap_or(default_id);
            if id.is_empty() || id.contains("::") {
                return Err(Error::new(format!("group {resource:?}: id {id:?} must be non-empty, without \"::\"")));
            }
            groups.push(Group { resource, paths: g.paths, grouping, id, usb, permissions, mounts });
        }
        Ok(Config {
            dev_root: raw.dev_root.unwrap_or_else(|| PathBuf::from("/")),
            sysfs_root: raw.sysfs_root.unwrap_or_else(|| PathBuf::from("/sys")),
            rescan_interval: raw.rescan_interval_ms.map_or(DEFAULT_RESCAN, Duration::from_millis),
            removal_grace: raw.removal_grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis),
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(json: &str) -> String {
        Config::parse(json).expect_err("must be refused").to_string()
    }

    #[test]
    fn a_full_config_parses_with_defaults() {
        let config = Config::parse(
            r#"{"group": [{"resource": "example.com/serial", "paths": ["/dev/ttyUSB*"],
                "usb": [{"vendor": "0x0403", "product": "6001"}], "permissions": "rwm",
                "mounts": [{"host_path": "/run/udev"}]}]}"#,
        )
        .expect("valid");
        assert_eq!(config.dev_root, PathBuf::from("/"));
        assert_eq!(config.rescan_interval, DEFAULT_RESCAN);
        let group = &config.groups[0];
        assert_eq!(group.grouping, Grouping::Each);
        assert_eq!(group.id, "serial");
        assert_eq!(group.usb, [UsbId { vendor: "0403".into(), product: Some("6001".into()) }]);
        assert_eq!(group.mounts[0].container_path, "/run/udev");
        assert!(group.mounts[0].read_only);
    }

    #[test]
    fn bad_values_are_refused_with_what_was_expected() {
        assert_eq!(error("{}"), "no [[config.group]]: declare at least one group (resource and paths)");
        assert_eq!(
            error(r#"{"group": [{"resource": "a.io/x", "paths": ["/dev/x"], "count": 4}]}"#),
            "group \"a.io/x\": count = 4: sharing is done by devhost for every backend; \
             write `[resources.\"a.io/x\"]` with `replicas = 4` in this backend file instead"
        );
        assert!(
            error(r#"{"group": [{"resource": "a.io/x", "paths": ["/dev/x"], "permissions": "rx"}]}"#)
                .contains("must be letters of \"rwm\"")
        );
        assert!(error(r#"{"group": [{"resource": "a.io/x", "paths": ["dev/x"]}]}"#).contains("must be absolute"));
        assert!(
            error(r#"{"group": [{"resource": "a.io/x", "paths": ["/dev/x"], "usb": [{"vendor": "43"}]}]}"#)
                .contains("four hex digits")
        );
        assert!(
            error(r#"{"group": [{"resource": "a.io/x", "paths": ["/dev/x"], "colour": 1}]}"#)
                .contains("unknown field `colour`")
        );
        assert!(
            error(r#"{"group": [{"resource": "a.io/x", "paths": ["/x"]}, {"resource": "a.io/x", "paths": ["/y"]}]}"#)
                .contains("declared twice")
        );
        assert!(Config::parse(r#"{"group": [{"resource": "a.io/x", "paths": ["/dev/x"], "count": 1}]}"#).is_ok());
    }
}
