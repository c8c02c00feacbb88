//! What a GPU says about itself (ABI 1.1): the DRA attributes and the
//! capacity published with every device, built from what NVML and sysfs
//! reported ([`Gpu`], [`crate::model::Details`]).
//!
//! The host refuses a whole device list when one attribute breaks DRA's
//! rules (at most 32 per device, qualified names, string and version
//! values of at most 64 bytes, versions in semver 2.0, capacities as
//! Kubernetes quantities), so every value is made valid here or left out:
//! NVML's driver version `535.104.05` is not semver (leading zero) and is
//! published as `535.104.5`; its CUDA version 12040 as `12.4.0`; a product
//! name longer than 64 bytes is cut. Each such change comes back as a
//! warning, which the backend logs once, at `init`.
//!
//! The names follow NVIDIA's own DRA driver (`productName`,
//! `driverVersion`, …) under the `nvidia.com` domain, and the upstream
//! convention `resource.kubernetes.io/pcieRoot` for PCIe alignment with
//! other drivers (a NIC from the PCI backend carries the same attribute).

use std::collections::BTreeMap;

use devhost_abi::sdk::{AttributeValue, Device, Health};

use crate::model::Gpu;
use crate::sysfs::sysfs_names;

/// `string`: the GPU's UUID (`GPU-8c3f…`), also its device ID.
pub const UUID: &str = "nvidia.com/uuid";
/// `int`: NVML's index (enumeration order).
pub const INDEX: &str = "nvidia.com/index";
/// `int`: the minor number (`/dev/nvidia<minor>`).
pub const MINOR: &str = "nvidia.com/minor";
/// `string`: the product name (`NVIDIA H100 80GB HBM3`).
pub const PRODUCT_NAME: &str = "nvidia.com/productName";
/// `version`: the kernel driver's version (`550.54.15`).
pub const DRIVER_VERSION: &str = "nvidia.com/driverVersion";
/// `version`: the newest CUDA version the driver supports (`12.4.0`).
pub const CUDA_DRIVER_VERSION: &str = "nvidia.com/cudaDriverVersion";
/// `version`: the CUDA compute capability (`9.0.0`).
pub const COMPUTE_CAPABILITY: &str = "nvidia.com/cudaComputeCapability";
/// `string`: the PCI address in the kernel's spelling (`0000:3b:00.0`).
pub const PCIE_BUS_ID: &str = "nvidia.com/pcieBusID";
/// `string`: the PCIe root complex (`pci0000:3a`), the upstream name
/// shared by every driver.
pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
/// `bool`: whether MIG mode is on.
pub const MIG_ENABLED: &str = "nvidia.com/migEnabled";
/// Capacity: the framebuffer memory (`80Gi`, `143771Mi`).
pub const MEMORY: &str = "nvidia.com/memory";

/// DRA's limit on a string or version value, in bytes.
pub const MAX_VALUE: usize = 64;

/// A GPU's attributes and capacities, and what had to be changed or left
/// out to make them valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    /// Qualified name to typed value.
    pub attributes: BTreeMap<String, AttributeValue>,
    /// Qualified name to Kubernetes quantity.
    pub capacities: BTreeMap<String, String>,
    /// One line per value that was cut or left out, naming the GPU.
    pub warnings: Vec<String>,
}

/// A driver version as semver 2.0: numeric components without leading
/// zeros (`535.104.05` → `535.104.5`), padded to three (`418.87` →
/// `418.87.0`). `None` when it has more than three components or one that
/// is not a number.
pub fn driver_semver(text: &str) -> Option<String> {
    let parts: Vec<u64> = text.trim().split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<_>>()?;
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut parts: Vec<String> = parts.iter().map(u64::to_string).collect();
    parts.resize(3, "0".to_owned());
    Some(parts.join("."))
}

/// NVML's CUDA driver version (`major * 1000 + minor * 10`) as semver:
/// 12040 → `12.4.0`. `None` for a value that is not positive.
pub fn cuda_semver(version: i32) -> Option<String> {
    (version > 0).then(|| format!("{}.{}.0", version / 1000, (version % 1000) / 10))
}

/// Bytes as a Kubernetes quantity, in the largest binary unit that divides
/// them exactly (`80Gi`, `143771Mi`, else plain bytes).
pub fn quantity(bytes: u64) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// `text` cut to at most [`MAX_VALUE`] bytes, on a character boundary.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_VALUE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The attributes and capacity of `gpu`. Deterministic, so every publish
/// (health changes republish the whole list) carries the same values.
pub fn describe(gpu: &Gpu) -> Described {
    let mut d = Described::default();
    let uuid = &gpu.uuid;
    let string = |d: &mut Described, name: &str, value: &str| {
        if value.is_empty() {
            return;
        }
        let cut = truncated(value);
        if cut.len() < value.len() {
            d.warnings.push(format!(
                "GPU {uuid}: attribute {name} cut to {MAX_VALUE} bytes (DRA's limit): {value:?} is {} bytes",
                value.len()
            ));
        }
        d.attributes.insert(name.to_owned(), AttributeValue::String(cut.to_owned()));
    };
    if uuid.len() <= MAX_VALUE {
        string(&mut d, UUID, uuid);
    } else {
        // A cut UUID names no GPU: leave it out rather than mislead.
        d.warnings.push(format!("GPU {uuid}: attribute {UUID} left out: longer than {MAX_VALUE} bytes"));
    }
    d.attributes.insert(INDEX.to_owned(), AttributeValue::Int(i64::from(gpu.index)));
    d.attributes.insert(MINOR.to_owned(), AttributeValue::Int(i64::from(gpu.minor)));
    string(&mut d, PRODUCT_NAME, &gpu.name);
    let bus_id = sysfs_names(&gpu.bus_id).and_then(|names| names.into_iter().next());
    match bus_id {
        Some(bus_id) => string(&mut d, PCIE_BUS_ID, &bus_id),
        None => d.warnings.push(format!(
            "GPU {uuid}: attribute {PCIE_BUS_ID} left out: NVML's bus ID {:?} is not domain:bus:device.function",
            gpu.bus_id
        )),
    }
    if let Some(root) = &gpu.details.pcie_root {
        string(&mut d, PCIE_ROOT, root);
    }
    if let Some(text) = &gpu.details.driver_version {
        match driver_semver(text) {
            Some(version) => {
                d.attributes.insert(DRIVER_VERSION.to_owned(), AttributeValue::Version(version));
            }
            None => d.warnings.push(format!(
                "GPU {uuid}: attribute {DRIVER_VERSION} left out: NVML's driver version {text:?} is not numbers \
                 a.b[.c], so it cannot be made a semantic version"
            )),
        }
    }
    if let Some(version) = gpu.details.cuda_driver_version.and_then(cuda_semver) {
        d.attributes.insert(CUDA_DRIVER_VERSION.to_owned(), AttributeValue::Version(version));
    }
    if let Some((major, minor)) = gpu.details.compute_capability.filter(|(major, minor)| *major >= 0 && *minor >= 0) {
        d.attributes.insert(COMPUTE_CAPABILITY.to_owned(), AttributeValue::Version(format!("{major}.{minor}.0")));
    }
    if let Some(enabled) = gpu.mig_enabled {
        d.attributes.insert(MIG_ENABLED.to_owned(), AttributeValue::Bool(enabled));
    }
    if gpu.memory_bytes > 0 {
        d.capacities.insert(MEMORY.to_owned(), quantity(gpu.memory_bytes));
    }
    d
}

/// One GPU as a device of the resource, with its attributes and capacity
/// (the same in every publish: [`describe`] is
/// deterministic, and its warnings were logged at `init`).
pub fn device(gpu: &Gpu, health: Health) -> Device {
    let described = describe(gpu);
    let mut device = Device::new(gpu.uuid.clone(), health);
    device.numa_nodes = gpu.numa_node.into_iter().collect();
    device.attributes = described.attributes;
    device.capacities = described.capacities;
    device
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::gpu;

    #[test]
    fn driver_versions_become_semver() {
        assert_eq!(driver_semver("550.54.15").as_deref(), Some("550.54.15"));
        assert_eq!(driver_semver("535.104.05").as_deref(), Some("535.104.5"), "no leading zeros in semver");
        assert_eq!(driver_semver("418.87").as_deref(), Some("418.87.0"));
        assert_eq!(driver_semver("560").as_deref(), Some("560.0.0"));
        assert_eq!(driver_semver(" 470.57.02\n").as_deref(), Some("470.57.2"));
        for bad in ["", "550.54.15.1", "550.54.x", "r550", "550..15", "-1.0.0"] {
            assert_eq!(driver_semver(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cuda_versions_and_quantities() {
        assert_eq!(cuda_semver(12040).as_deref(), Some("12.4.0"));
        assert_eq!(cuda_semver(11080).as_deref(), Some("11.8.0"));
        assert_eq!(cuda_semver(12000).as_deref(), Some("12.0.0"));
        assert_eq!(cuda_semver(0), None);
        assert_eq!(cuda_semver(-1), None);
        assert_eq!(quantity(80 << 30), "80Gi");
        assert_eq!(quantity(143_771 << 20), "143771Mi", "an H200 reports MiB that are not whole GiB");
        assert_eq!(quantity(1 << 40), "1Ti");
        assert_eq!(quantity(3072), "3Ki");
        assert_eq!(quantity(1536), "1536", "not a whole number of KiB");
        assert_eq!(quantity(1000), "1000");
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary_and_reported() {
        let mut g = gpu("GPU-0", 0, None);
        g.name = format!("NVIDIA {}", "é".repeat(40));
        let d = describe(&g);
        let Some(AttributeValue::String(name)) = d.attributes.get(PRODUCT_NAME) else { panic!("{d:?}") };
        assert!(name.len() <= MAX_VALUE && name.len() >= MAX_VALUE - 1, "{name}");
        assert!(g.name.starts_with(name.as_str()));
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].starts_with("GPU GPU-0: attribute nvidia.com/productName cut to 64 bytes"), "{d:?}");
    }

    #[test]
    fn what_nvml_could_not_say_is_left_out() {
        let mut g = gpu("GPU-0", 0, None);
        g.name = String::new();
        g.memory_bytes = 0;
        g.mig_enabled = None;
        g.details = Default::default();
        let d = describe(&g);
        let names: Vec<&str> = d.attributes.keys().map(String::as_str).collect();
        assert_eq!(names, [INDEX, MINOR, PCIE_BUS_ID, UUID]);
        assert!(d.capacities.is_empty());
        assert!(d.warnings.is_empty(), "nothing missing is worth a warning: {:?}", d.warnings);

        g.details.driver_version = Some("550.54.15.1".into());
        g.bus_id = "nonsense".into();
        let d = describe(&g);
        assert!(!d.attributes.contains_key(DRIVER_VERSION) && !d.attributes.contains_key(PCIE_BUS_ID));
        assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
    }
}
