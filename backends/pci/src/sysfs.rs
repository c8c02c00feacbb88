//! Reads PCI functions from sysfs (`<root>/bus/pci/devices/*`): IDs,
//! class, bound driver, IOMMU group, NUMA node, netdevs and their link
//! speed, the SR-IOV relations (`physfn`, `virtfn<N>`), and the PCIe root
//! complex the function hangs off. Only relative links inside the sysfs
//! root are followed, which is what the kernel writes, so this also works
//! inside a WASM sandbox granted just the root. It owns reading, not
//! selecting.

use std::path::{Path, PathBuf};

/// One PCI function as sysfs shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// The PCI address, `0000:3b:02.0`: the device ID.
    pub address: String,
    /// Its directory (under the sysfs root).
    pub dir: PathBuf,
    /// Vendor ID (`8086`, lower-case, no `0x`).
    pub vendor: String,
    /// Device ID.
    pub device: String,
    /// 24-bit class code.
    pub class: u32,
    /// The bound driver's name.
    pub driver: Option<String>,
    /// The IOMMU group number.
    pub iommu_group: Option<String>,
    /// The NUMA node; `None` where the kernel says -1.
    pub numa: Option<i64>,
    /// Network interfaces (`net/*`, and `virtio*/net/*` for virtio-net).
    pub netdevs: Vec<String>,
    /// For a VF: its PF's address and its VF index.
    pub vf_of: Option<(String, u32)>,
    /// For a PF: how many `virtfn<N>` links it has.
    pub vf_count: usize,
    /// The PCIe root complex (`pci0000:3a`): the first `pci<domain>:<bus>`
    /// component of the target of the function's `bus/pci/devices` link.
    pub pcie_root: Option<String>,
    /// The first netdev's link speed in Mb/s, where the kernel knows it
    /// (`net/<name>/speed`; a link that is down reads -1 or fails).
    pub link_speed: Option<i64>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn hex(text: &str) -> String {
    text.trim_start_matches("0x").to_ascii_lowercase()
}

/// The last component of a symlink's target (`driver` → `vfio-pci`).
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
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

/// The PCIe root complex of the function at `dir`, from the text of its
/// link (`../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`): read,
/// not followed, so it works inside a sandbox that sees only the bus.
fn pcie_root(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir).ok()?;
    target.components().find_map(|c| c.as_os_str().to_str().filter(|c| is_pcie_root(c)).map(str::to_owned))
}

/// Reads one function at `dir` (a `bus/pci/devices/<address>` path).
pub fn read_function(dir: &Path) -> Option<Function> {
    let address = dir.file_name()?.to_string_lossy().into_owned();
    let vendor = hex(&read(&dir.join("vendor"))?);
    let device = hex(&read(&dir.join("device"))?);
    let class = u32::from_str_radix(&hex(&read(&dir.join("class"))?), 16).ok()?;
    let numa = read(&dir.join("numa_node")).and_then(|n| n.parse::<i64>().ok()).filter(|n| *n >= 0);
    let mut netdevs = names(&dir.join("net"));
    for child in names(dir).into_iter().filter(|n| n.starts_with("virtio")) {
        netdevs.extend(names(&dir.join(child).join("net")));
    }
    let vf_of = link_name(&dir.join("physfn")).and_then(|pf| {
        let pf_dir = dir.parent()?.join(&pf);
        let index = names(&pf_dir).into_iter().find_map(|name| {
            let index = name.strip_prefix("virtfn")?.parse::<u32>().ok()?;
            (link_name(&pf_dir.join(&name)).as_deref() == Some(address.as_str())).then_some(index)
        })?;
        Some((pf, index))
    });
    let vf_count =
        names(dir).iter().filter(|n| n.strip_prefix("virtfn").is_some_and(|i| i.parse::<u32>().is_ok())).count();
    let link_speed = netdevs.first().and_then(|netdev| {
        netdev_file(dir, netdev, "speed").and_then(|s| s.parse::<i64>().ok()).filter(|speed| *speed > 0)
    });
    Some(Function {
        dir: dir.to_owned(),
        vendor,
        device,
        class,
        driver: link_name(&dir.join("driver")),
        iommu_group: link_name(&dir.join("iommu_group")),
        numa,
        netdevs,
        vf_of,
        vf_count,
        pcie_root: pcie_root(dir),
        link_speed,
        address,
    })
}

/// Every PCI function under `root` (`/sys`), by address.
pub fn functions(root: &Path) -> Vec<Function> {
    let bus = root.join("bus/pci/devices");
    names(&bus).into_iter().filter_map(|address| read_function(&bus.join(address))).collect()
}

/// The file `name` of `netdev` of the function at `dir` (`net/<netdev>/`,
/// or under a `virtio*` child for virtio-net), trimmed, if readable.
fn netdev_file(dir: &Path, netdev: &str, name: &str) -> Option<String> {
    read(&dir.join("net").join(netdev).join(name)).or_else(|| {
        names(dir)
            .into_iter()
            .filter(|n| n.starts_with("virtio"))
            .find_map(|child| read(&dir.join(child).join("net").join(netdev).join(name)))
    })
}

/// The hardware (MAC) address of `netdev` of the function, if readable
/// (`net/<netdev>/address`, `3c:fd:fe:a1:00:03`).
pub fn hardware_address(function: &Function, netdev: &str) -> Option<String> {
    netdev_file(&function.dir, netdev, "address").filter(|address| !address.is_empty())
}

/// The `operstate` of `netdev` of the function, if readable.
pub fn operstate(function: &Function, netdev: &str) -> Option<String> {
    netdev_file(&function.dir, netdev, "operstate")
}

/// A simple one-component glob (`renderD*`, `card?`).
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => (0..=n.len()).any(|skip| go(&p[1..], &n[skip..])),
            Some(b'?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The paths under the function's directory matching `pattern` (a relative
/// path whose components may hold `*`/`?`, e.g. `drm/renderD*`), as the
/// names of the last component.
pub fn nodes(function: &Function, pattern: &str) -> Vec<String> {
    let mut dirs = vec![function.dir.clone()];
    let components: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut last = Vec::new();
    for (i, component) in components.iter().enumerate() {
        let mut next = Vec::new();
        for dir in &dirs {
            for name in names(dir).into_iter().filter(|n| matches(component, n)) {
                if i + 1 == components.len() {
                    last.push(name.clone());
                }
                next.push(dir.join(name));
            }
        }
        dirs = next;
    }
    last.sort();
    last.dedup();
    last
}
