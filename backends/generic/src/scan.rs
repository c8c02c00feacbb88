//! Discovery: which devices each group sees right now, as stable IDs and
//! the pattern-side paths (`/dev/ttyUSB0`) that make each one up. IDs come
//! from the path or from the USB device's identity (vendor, product,
//! serial, interface), never from enumeration order, so they survive
//! restarts, rescans and re-plugging. Each device keeps the USB identity
//! it was found with, for its attributes. It does not track time or
//! health.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{Config, Group, Grouping};
use crate::glob;

/// One device as a scan sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Its paths (pattern-side, sorted).
    pub paths: Vec<PathBuf>,
    /// The USB device it hangs off, if any (for a device of several paths,
    /// only when they all hang off the same one).
    pub usb: Option<UsbInfo>,
}

/// Devices of one group by ID.
pub type Found = BTreeMap<String, Seen>;

/// The USB identity of a device node, read from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbInfo {
    /// `idVendor`.
    pub vendor: String,
    /// `idProduct`.
    pub product: String,
    /// `serial`, or the USB port (`1-1.2`) where the device has none.
    pub serial: String,
    /// Whether `serial` is the device's own serial number (`false`: the
    /// port stands in for one).
    pub has_serial: bool,
    /// `bInterfaceNumber` of the interface the node hangs off, if any.
    pub interface: Option<String>,
}

impl UsbInfo {
    /// The device ID of the whole USB device.
    pub fn device_id(&self) -> String {
        format!("usb-{}-{}-{}", self.vendor, self.product, sanitize(&self.serial))
    }

    /// The device ID of one interface (or of the device without one).
    pub fn interface_id(&self) -> String {
        match &self.interface {
            Some(interface) => format!("{}-if{interface}", self.device_id()),
            None => self.device_id(),
        }
    }
}

fn sanitize(value: &str) -> String {
    value.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// The ID of a single path: the path without `/dev/`, `/` as `-`
/// (`/dev/net/tun` → `net-tun`).
pub fn path_id(path: &Path) -> String {
    let text = path.to_string_lossy();
    let text = text.strip_prefix("/dev/").unwrap_or_else(|| text.trim_start_matches('/'));
    sanitize(&text.replace('/', "-"))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Linux's `major()`/`minor()` of a `dev_t`.
fn major_minor(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// The sysfs directory of the device behind `node` (on disk): through
/// `<sysfs>/dev/{char,block}/MAJ:MIN` for real device nodes, else through
/// `<sysfs>/class/*/<name>` (how fixture trees name their nodes).
fn sysfs_device(sysfs: &Path, node: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(node) {
        let kind = if meta.file_type().is_char_device() {
            Some("char")
        } else if meta.file_type().is_block_device() {
            Some("block")
        } else {
            None
        };
        if let Some(kind) = kind {
            let (major, minor) = major_minor(meta.rdev());
            if let Ok(dir) = std::fs::canonicalize(sysfs.join("dev").join(kind).join(format!("{major}:{minor}"))) {
                return Some(dir);
            }
        }
    }
    let name = node.file_name()?;
    let classes = std::fs::read_dir(sysfs.join("class")).ok()?;
    classes.flatten().find_map(|class| std::fs::canonicalize(class.path().join(name)).ok())
}

/// The USB identity of the device node at `node` (on disk), if it hangs
/// off a USB device.
pub fn usb_info(sysfs: &Path, node: &Path) -> Option<UsbInfo> {
    let start = sysfs_device(sysfs, node)?;
    let mut interface = None;
    for dir in start.ancestors() {
        if interface.is_none() {
            interface = read_trimmed(&dir.join("bInterfaceNumber"));
        }
        if let Some(vendor) = read_trimmed(&dir.join("idVendor")) {
            let product = read_trimmed(&dir.join("idProduct")).unwrap_or_default();
            let own = read_trimmed(&dir.join("serial")).filter(|s| !s.is_empty());
            let has_serial = own.is_some();
            let serial = own.or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
            return Some(UsbInfo { vendor, product, serial, has_serial, interface });
        }
    }
    None
}

/// What `group` sees now.
pub fn scan_group(config: &Config, group: &Group) -> Found {
    let mut per_pattern: Vec<Vec<PathBuf>> =
        group.paths.iter().map(|pattern| glob::expand(&config.dev_root, pattern)).collect();
    let usb_of = |path: &Path| usb_info(&config.sysfs_root, &glob::on_disk(&config.dev_root, path));
    let wanted = |info: &Option<UsbInfo>| {
        group.usb.is_empty()
            || info.as_ref().is_some_and(|info| {
                group.usb.iter().any(|id| {
                    id.vendor == info.vendor && id.product.as_ref().is_none_or(|product| *product == info.product)
                })
            })
    };
    let mut found = Found::new();
    match group.grouping {
        Grouping::All => {
            let infos: Vec<Option<UsbInfo>> = per_pattern.iter().flatten().map(|p| usb_of(p)).collect();
            let usb_ok = infos.iter().all(wanted);
            if per_pattern.iter().all(|matches| !matches.is_empty()) && usb_ok {
                let mut paths: Vec<PathBuf> = per_pattern.drain(..).flatten().collect();
                paths.sort();
                paths.dedup();
                found.insert(group.id.clone(), Seen { paths, usb: common_device(infos) });
            }
        }
        Grouping::Each | Grouping::Usb => {
            let mut paths: Vec<PathBuf> = per_pattern.drain(..).flatten().collect();
            paths.sort();
            paths.dedup();
            let mut named: Vec<(String, PathBuf, Option<UsbInfo>)> = Vec::new();
            for path in paths {
                let info = usb_of(&path);
                if !wanted(&info) {
                    continue;
                }
                let id = match (&info, group.grouping) {
                    (Some(info), Grouping::Usb) => info.device_id(),
                    (None, Grouping::Usb) => continue,
                    (Some(info), _) if !group.usb.is_empty() => info.interface_id(),
                    _ => path_id(&path),
                };
                named.push((id, path, info));
            }
            // Each: two nodes on one USB interface would share an ID; they
            // fall back to their path IDs (still stable).
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (id, _, _) in &named {
                *counts.entry(id.as_str()).or_default() += 1;
            }
            let clashing: Vec<String> =
                counts.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id.to_owned()).collect();
            let mut infos: BTreeMap<String, Vec<Option<UsbInfo>>> = BTreeMap::new();
            for (id, path, info) in named {
                let id = if group.grouping == Grouping::Each && clashing.contains(&id) { path_id(&path) } else { id };
                found.entry(id.clone()).or_default().paths.push(path);
                infos.entry(id).or_default().push(info);
            }
            for (id, infos) in infos {
                if let Some(seen) = found.get_mut(&id) {
                    seen.usb = common_device(infos);
                }
            }
        }
    }
    found
}

/// The USB device every path hangs off, when they all hang off the same
/// one (its interfaces may differ: the first path's is kept).
fn common_device(infos: Vec<Option<UsbInfo>>) -> Option<UsbInfo> {
    let mut infos = infos.into_iter();
    let first = infos.next()??;
    infos.all(|info| info.is_some_and(|info| info.device_id() == first.device_id())).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_ids_are_readable_and_stable() {
        assert_eq!(path_id(Path::new("/dev/net/tun")), "net-tun");
        assert_eq!(path_id(Path::new("/dev/ttyUSB0")), "ttyUSB0");
        assert_eq!(path_id(Path::new("/dev/bus/usb/001/002")), "bus-usb-001-002");
        assert_eq!(path_id(Path::new("/run/x y")), "run-x_y");
    }

    #[test]
    fn major_minor_follow_the_kernel_encoding() {
        // makedev(10, 229) (/dev/fuse) and makedev(259, 70000).
        assert_eq!(major_minor((10 << 8) | 229), (10, 229));
        let (major, minor) = (259u64, 70000u64);
        let rdev = ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(major_minor(rdev), (259, 70000));
    }
}
