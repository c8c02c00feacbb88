//! The `[config]` table of a PCI backend file: one `[[config.resource]]`
//! per resource, each a set of selectors that are ANDed (a list within one
//! selector is ORed), plus what a container gets and how health is judged.
//! It owns parsing, validation and selection.

use std::path::PathBuf;
use std::time::Duration;

use devhost_abi::sdk::Error;
use serde::Deserialize;

use crate::sysfs::Function;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    sysfs: String,
    dev: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    #[serde(default)]
    vendors: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    class_mask: Option<String>,
    #[serde(default)]
    drivers: Vec<String>,
    #[serde(default)]
    pf_names: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    device_nodes: Vec<RawNode>,
    #[serde(default)]
    check_link: bool,
    #[serde(default)]
    reset_on_prestart: bool,
    #[serde(default)]
    reset_on_release: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    sysfs_root: Option<PathBuf>,
    #[serde(default)]
    rescan_interval_ms: Option<u64>,
    #[serde(default)]
    removal_grace_ms: Option<u64>,
    #[serde(default)]
    resource: Vec<RawResource>,
}

/// `ens1f0` or `ens1f0#0-7`: VFs of the PF with that netdev, optionally
/// only those with an index in the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfName {
    /// The PF's netdev name.
    pub name: String,
    /// Inclusive VF index range.
    pub range: Option<(u32, u32)>,
}

/// A device node derived from sysfs: every match of `sysfs` (relative to
/// the function's directory) becomes `dev` with `{name}` replaced by the
/// match's last component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMap {
    /// `drm/renderD*`.
    pub sysfs: String,
    /// `/dev/dri/{name}`.
    pub dev: String,
}

/// One resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Extended resource name.
    pub name: String,
    /// Vendor IDs (lower-case hex, no `0x`).
    pub vendors: Vec<String>,
    /// Device IDs.
    pub devices: Vec<String>,
    /// Class code and mask.
    pub class: Option<(u32, u32)>,
    /// Bound drivers; also the health check's expected driver.
    pub drivers: Vec<String>,
    /// PF netdev names with optional VF ranges.
    pub pf_names: Vec<PfName>,
    /// PCI addresses.
    pub addresses: Vec<String>,
    /// Device nodes for functions not bound to `vfio-pci`.
    pub device_nodes: Vec<NodeMap>,
    /// A NIC whose link is not `up` is Unhealthy.
    pub check_link: bool,
    /// Ask for PreStartContainer and reset the functions then.
    pub reset_on_prestart: bool,
    /// Ask devhost for `release` (ABI 1.1) and reset the functions once no
    /// container holds them any more.
    pub reset_on_release: bool,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The sysfs mount (`/sys`).
    pub sysfs_root: PathBuf,
    /// How often sysfs is read again (native; a component is polled).
    pub rescan_interval: Duration,
    /// How long a vanished function stays listed Unhealthy.
    pub removal_grace: Duration,
    /// The resources.
    pub resources: Vec<ResourceConfig>,
}

fn hex_id(value: &str, what: &str, resource: &str) -> Result<String, Error> {
    let id = value.trim_start_matches("0x").to_ascii_lowercase();
    if id.len() == 4 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(Error::new(format!("resource {resource:?}: {what} {value:?} must be four hex digits, e.g. \"8086\"")))
    }
}

fn class_code(value: &str, what: &str, resource: &str) -> Result<u32, Error> {
    u32::from_str_radix(value.trim_start_matches("0x"), 16).ok().filter(|c| *c <= 0xff_ffff).ok_or_else(|| {
        Error::new(format!(
            "resource {resource:?}: {what} {value:?} must be a 24-bit hex class code, e.g. \"0x020000\""
        ))
    })
}

fn pf_name(value: &str, resource: &str) -> Result<PfName, Error> {
    let bad = || {
        Error::new(format!(
            "resource {resource:?}: pf_names entry {value:?} must be a netdev name, optionally with a VF range: \"ens1f0\", \"ens1f0#3\", \"ens1f0#0-7\""
        ))
    };
    let (name, range) = match value.split_once('#') {
        None => (value, None),
        Some((name, range)) => {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            let (low, high) = (low.parse::<u32>().map_err(|_| bad())?, high.parse::<u32>().map_err(|_| bad())?);
            if low > high {
                return Err(bad());
            }
            (name, Some((low, high)))
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    Ok(PfName { name: name.to_owned(), range })
}

fn address(value: &str, resource: &str) -> Result<String, Error> {
    let b = value.as_bytes();
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && value.chars().enumerate().all(|(i, c)| [4, 7, 10].contains(&i) || c.is_ascii_hexdigit());
    if ok {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(Error::new(format!(
            "resource {resource:?}: address {value:?} must be a full PCI address, e.g. \"0000:3b:00.0\""
        )))
    }
}

impl Config {
    /// Parses and validates the `[config]` JSON.
    pub fn parse(json: &str) -> Result<Config, Error> {
        let raw: RawConfig = devhost_abi::sdk::parse_config(json)?;
        if raw.resource.is_empty() {
            return Err(Error::new("no [[config.resource]]: declare at least one resource and its selectors"));
        }
        let mut resources: Vec<ResourceConfig> = Vec::new();
        for r in raw.resource {
            let name = r.name;
            if resources.iter().any(|other| other.name == name) {
                return Err(Error::new(format!("resource {name:?} is declared twice")));
            }
            if r.vendors.is_empty()
                && r.devices.is_empty()
                && r.class.is_none()
                && r.drivers.is_empty()
                && r.pf_names.is_empty()
                && r.addresses.is_empty()
            {
                return Err(Error::new(format!(
                    "resource {name:?}: no selector: give at least one of vendors, devices, class, drivers, pf_names, addresses"
                )));
            }
            if r.class_mask.is_some() && r.class.is_none() {
                return Err(Error::new(format!("resource {name:?}: class_mask without class")));
            }
            let class = match r.class {
                Some(class) => {
                    let mask = r.class_mask.as_deref().map_or(Ok(0xff_ffff), |m| class_code(m, "class_mask", &name))?;
                    Some((class_code(&class, "class", &name)? & mask, mask))
                }
                None => None,
            };
            let mut device_nodes = Vec::new();
            for node in r.device_nodes {
                if node.sysfs.starts_with('/') || node.sysfs.split('/').any(|c| c == "..") || !node.dev.starts_with('/')
                {
                    return Err(Error::new(format!(
                        "resource {name:?}: device_nodes {{ sysfs = {:?}, dev = {:?} }}: sysfs must be relative to the function (e.g. \"drm/renderD*\"), dev absolute (e.g. \"/dev/dri/{{name}}\")",
                        node.sysfs, node.dev
                    )));
                }
                device_nodes.push(NodeMap { sysfs: node.sysfs, dev: node.dev });
            }
            resources.push(ResourceConfig {
                vendors: r.vendors.iter().map(|v| hex_id(v, "vendor", &name)).collect::<Result<_, _>>()?,
                devices: r.devices.iter().map(|v| hex_id(v, "device", &name)).collect::<Result<_, _>>()?,
                class,
                drivers: r.drivers,
                pf_names: r.pf_names.iter().map(|p| pf_name(p, &name)).collect::<Result<_, _>>()?,
                addresses: r.addresses.iter().map(|a| address(a, &name)).collect::<Result<_, _>>()?,
                device_nodes,
                check_link: r.check_link,
                reset_on_prestart: r.reset_on_prestart,
                reset_on_release: r.reset_on_release,
                name,
            });
        }
        Ok(Config {
            sysfs_root: raw.sysfs_root.unwrap_or_else(|| PathBuf::from("/sys")),
            rescan_interval: Duration::from_millis(raw.rescan_interval_ms.unwrap_or(1000)),
            removal_grace: Duration::from_millis(raw.removal_grace_ms.unwrap_or(300_000)),
            resources,
        })
    }
}

impl ResourceConfig {
    /// Whether `f` is selected; `all` gives every function (to find PFs).
    pub fn selects(&self, f: &Function, all: &[Function]) -> bool {
        let any = |list: &[String], value: &str| list.is_empty() || list.iter().any(|v| v == value);
        let by_pf = || {
            self.pf_names.is_empty()
                || self.pf_names.iter().any(|pf| match &f.vf_of {
                    Some((pf_address, index)) => {
                        all.iter().any(|p| p.address == *pf_address && p.netdevs.contains(&pf.name))
                            && pf.range.is_none_or(|(low, high)| (low..=high).contains(index))
                    }
                    // A PF without VFs stands for itself.
                    None => pf.range.is_none() && f.vf_count == 0 && f.netdevs.contains(&pf.name),
                })
        };
        any(&self.vendors, &f.vendor)
            && any(&self.devices, &f.device)
            && self.class.is_none_or(|(class, mask)| f.class & mask == class)
            && (self.drivers.is_empty() || f.driver.as_ref().is_some_and(|d| self.drivers.contains(d)))
            && any(&self.addresses, &f.address)
            && by_pf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(json: &str) -> String {
        Config::parse(json).expect_err("refused").to_string()
    }

    #[test]
    fn selectors_are_validated_with_what_was_expected() {
        let ok = Config::parse(
            r#"{"resource": [{"name": "a.io/vf", "vendors": ["0x8086"], "class": "0x020000", "class_mask": "0xff0000",
                "pf_names": ["ens1f0#0-3", "ens1f1"], "addresses": ["0000:3B:02.0"]}]}"#,
        )
        .expect("valid");
        let r = &ok.resources[0];
        assert_eq!(r.vendors, ["8086"]);
        assert_eq!(r.class, Some((0x020000, 0xff0000)));
        assert_eq!(r.pf_names[0], PfName { name: "ens1f0".into(), range: Some((0, 3)) });
        assert_eq!(r.pf_names[1].range, None);
        assert_eq!(r.addresses, ["0000:3b:02.0"]);
        assert_eq!(ok.sysfs_root, PathBuf::from("/sys"));
        assert!(error(r#"{"resource": [{"name": "a.io/x"}]}"#).contains("no selector"));
        assert!(error(r#"{"resource": [{"name": "a.io/x", "pf_names": ["ens1f0#7-2"]}]}"#).contains("VF range"));
        assert!(error(r#"{"resource": [{"name": "a.io/x", "addresses": ["3b:00.0"]}]}"#).contains("full PCI address"));
        assert!(error(r#"{"resource": [{"name": "a.io/x", "vendors": ["intel"]}]}"#).contains("four hex digits"));
        assert!(error(r#"{"resource": [{"name": "a.io/x", "class": "0x1000000"}]}"#).contains("24-bit"));
        assert!(error(r#"{"resource": [{"name": "a.io/x", "vendors": ["8086"], "colour": 1}]}"#).contains("colour"));
    }
}
