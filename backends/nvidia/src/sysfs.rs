//! NUMA affinity from sysfs: NVML names a GPU's PCI address as
//! `00000000:3B:00.0` (8-digit upper-case domain); the kernel's directory
//! is `/sys/bus/pci/devices/0000:3b:00.0` (lower case, at least 4 domain
//! digits). Its `numa_node` file holds the node, or -1 when the platform
//! has no NUMA topology for the device. The entry itself is a link into
//! `/sys/devices/pci<domain>:<bus>/…`, whose first component names the
//! device's PCIe root complex.

use std::path::{Path, PathBuf};

/// The kernel's spellings of an NVML bus ID, most likely first: the
/// kernel's own `%04x:%02x:%02x.%x`, then the lower-cased 8-digit form.
/// `None` when the ID is not `domain:bus:device.function` in hex.
pub fn sysfs_names(bus_id: &str) -> Option<Vec<String>> {
    let bus_id = bus_id.trim();
    let (domain, rest) = bus_id.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str| (!s.is_empty()).then(|| u32::from_str_radix(s, 16).ok()).flatten();
    let (domain, bus, device, function) = (hex(domain)?, hex(bus)?, hex(device)?, hex(function)?);
    let kernel = format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}");
    let long = format!("{domain:08x}:{bus:02x}:{device:02x}.{function:x}");
    Some(if kernel == long { vec![kernel] } else { vec![kernel, long] })
}

/// The directory of a PCI device under `sysfs_root`, if it exists.
pub fn device_dir(sysfs_root: &Path, bus_id: &str) -> Option<PathBuf> {
    let devices = sysfs_root.join("bus/pci/devices");
    sysfs_names(bus_id)?.into_iter().map(|name| devices.join(name)).find(|dir| dir.is_dir())
}

/// Parses a `numa_node` file: a node number, or `None` for -1 (no
/// topology). Anything else is an error naming the text.
pub fn parse_numa_node(text: &str) -> Result<Option<i64>, String> {
    match text.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(node) if node >= 0 => Ok(Some(node)),
        _ => Err(format!("expected a NUMA node number or -1, found {:?}", text.trim())),
    }
}

/// The NUMA node of the PCI device `bus_id`: `Ok(None)` when the platform
/// has none; `Err` when sysfs has no such device or an unreadable file.
pub fn numa_node(sysfs_root: &Path, bus_id: &str) -> Result<Option<i64>, String> {
    let dir = device_dir(sysfs_root, bus_id).ok_or_else(|| {
        format!("no directory for PCI device {bus_id} under {}", sysfs_root.join("bus/pci/devices").display())
    })?;
    let file = dir.join("numa_node");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    parse_numa_node(&text).map_err(|e| format!("{}: {e}", file.display()))
}

/// Whether `name` names a PCIe root complex as the kernel does under
/// `/sys/devices`: `pci<domain>:<bus>` in lower-case hex, at least four
/// domain digits (`pci0000:00`, `pci10000:e0` for a VMD domain).
pub fn is_pcie_root(name: &str) -> bool {
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    name.strip_prefix("pci")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(domain, bus)| domain.len() >= 4 && bus.len() == 2 && hex(domain) && hex(bus))
}

/// The PCIe root complex of the PCI device `bus_id` (`pci0000:3a`), the
/// value of DRA's `resource.kubernetes.io/pcieRoot`: the first
/// `pci<domain>:<bus>` component of the target of its
/// `bus/pci/devices/<address>` link (`../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`).
/// `None` when there is no such link or no such component.
pub fn pcie_root(sysfs_root: &Path, bus_id: &str) -> Option<String> {
    let devices = sysfs_root.join("bus/pci/devices");
    sysfs_names(bus_id)?.into_iter().find_map(|name| {
        let target = std::fs::read_link(devices.join(name)).ok()?;
        target.components().find_map(|c| c.as_os_str().to_str().filter(|c| is_pcie_root(c)).map(str::to_owned))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temp dir");
        for (name, numa) in entries {
            let dir = root.path().join("bus/pci/devices").join(name);
            std::fs::create_dir_all(&dir).expect("device dir");
            std::fs::write(dir.join("numa_node"), numa).expect("numa_node");
        }
        root
    }

    #[test]
    fn nvml_bus_ids_map_to_kernel_names() {
        assert_eq!(sysfs_names("00000000:3B:00.0"), Some(vec!["0000:3b:00.0".into(), "00000000:3b:00.0".into()]));
        assert_eq!(sysfs_names("0000:AF:00.0"), Some(vec!["0000:af:00.0".into(), "00000000:af:00.0".into()]));
        assert_eq!(sysfs_names("00010000:01:00.0"), Some(vec!["10000:01:00.0".into(), "00010000:01:00.0".into()]));
        assert_eq!(sysfs_names("3B:00.0"), None);
        assert_eq!(sysfs_names("0000:xx:00.0"), None);
    }

    #[test]
    fn numa_nodes_are_read_from_the_fixture_tree() {
        let root = fixture(&[("0000:3b:00.0", "1\n"), ("0000:5e:00.0", "-1\n"), ("00000000:af:00.0", "0\n")]);
        assert_eq!(numa_node(root.path(), "00000000:3B:00.0"), Ok(Some(1)));
        assert_eq!(numa_node(root.path(), "00000000:5E:00.0"), Ok(None), "-1: no topology");
        assert_eq!(numa_node(root.path(), "00000000:AF:00.0"), Ok(Some(0)), "the 8-digit spelling is found too");
        let missing = numa_node(root.path(), "00000000:D8:00.0").expect_err("no such device");
        assert!(missing.starts_with("no directory for PCI device 00000000:D8:00.0 under "), "{missing}");
    }

    #[test]
    fn pcie_roots_come_from_the_device_link() {
        let root = tempfile::tempdir().expect("temp dir");
        let devices = root.path().join("bus/pci/devices");
        std::fs::create_dir_all(&devices).expect("bus dir");
        let real = root.path().join("devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0");
        std::fs::create_dir_all(&real).expect("device dir");
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0",
            devices.join("0000:3b:00.0"),
        )
        .expect("link");
        std::fs::create_dir_all(devices.join("0000:5e:00.0")).expect("a directory, not a link");
        assert_eq!(pcie_root(root.path(), "00000000:3B:00.0").as_deref(), Some("pci0000:3a"));
        assert_eq!(pcie_root(root.path(), "00000000:5E:00.0"), None, "no link: no root");
        assert_eq!(pcie_root(root.path(), "00000000:D8:00.0"), None, "no device");
        for good in ["pci0000:00", "pci0000:3a", "pci10000:e0"] {
            assert!(is_pcie_root(good), "{good}");
        }
        for bad in ["pci", "pci0000", "pci000:00", "pci0000:3A", "pci0000:000", "pcie:00", "0000:3a:00.0"] {
            assert!(!is_pcie_root(bad), "{bad}");
        }
    }

    #[test]
    fn garbage_in_numa_node_is_an_error_naming_the_file() {
        let root = fixture(&[("0000:3b:00.0", "banana")]);
        let error = numa_node(root.path(), "00000000:3B:00.0").expect_err("garbage");
        assert!(
            error.ends_with("0000:3b:00.0/numa_node: expected a NUMA node number or -1, found \"banana\""),
            "{error}"
        );
        assert_eq!(parse_numa_node("-2"), Err("expected a NUMA node number or -1, found \"-2\"".into()));
    }
}
