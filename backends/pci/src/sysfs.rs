//! Reads PCI functions from sysfs (`<root>/bus/pci/devices/*`): IDs,
//! class, bound driver, IOMMU group, NUMA node, netdevs, and the SR-IOV
//! relations (`physfn`, `virtfn<N>`). Only relative links inside the sysfs
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
        address,
    })
}

/// Every PCI function under `root` (`/sys`), by address.
pub fn functions(root: &Path) -> Vec<Function> {
    let bus = root.join("bus/pci/devices");
    names(&bus).into_iter().filter_map(|address| read_function(&bus.join(address))).collect()
}

/// The `operstate` of `netdev` of the function, if readable.
pub fn operstate(function: &Function, netdev: &str) -> Option<String> {
    read(&function.dir.join("net").join(netdev).join("operstate")).or_else(|| {
        names(&function.dir)
            .into_iter()
            .filter(|n| n.starts_with("virtio"))
            .find_map(|child| read(&function.dir.join(child).join("net").join(netdev).join("operstate")))
    })
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
