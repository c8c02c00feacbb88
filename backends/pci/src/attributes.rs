//! What a PCI function says about itself (ABI 1.1): the DRA attributes
//! published with every device, from what [`crate::sysfs`] read.
//!
//! The host refuses a whole device list when one attribute breaks DRA's
//! rules (qualified names, string values of at most 64 bytes, at most 32
//! per device), so a value that would break one is left out here and
//! comes back as a warning, which the backend logs once. A cut value would
//! name another driver or interface, so nothing is cut.
//!
//! The names live under this backend's own domain, `pci.devhost.io`, except
//! the upstream convention `resource.kubernetes.io/pcieRoot`, shared by
//! every driver so that a claim can keep a NIC and a GPU (the NVIDIA
//! backend publishes the same attribute) under one PCIe root.

use std::collections::BTreeMap;

use devhost_abi::sdk::AttributeValue;

use crate::sysfs::Function;

/// `string`: the PCI address (`0000:3b:02.0`), also the device ID.
pub const ADDRESS: &str = "pci.devhost.io/address";
/// `string`: the vendor ID, four lower-case hex digits (`8086`).
pub const VENDOR: &str = "pci.devhost.io/vendor";
/// `string`: the device ID, four lower-case hex digits (`1889`).
pub const DEVICE: &str = "pci.devhost.io/device";
/// `string`: the class code, six lower-case hex digits (`020000`).
pub const CLASS: &str = "pci.devhost.io/class";
/// `string`: the bound driver (`vfio-pci`); absent when unbound.
pub const DRIVER: &str = "pci.devhost.io/driver";
/// `bool`: whether the function is an SR-IOV virtual function.
pub const VIRTUAL_FUNCTION: &str = "pci.devhost.io/virtualFunction";
/// `string`: a VF's physical function's address (`0000:3b:00.0`).
pub const PF_ADDRESS: &str = "pci.devhost.io/pfAddress";
/// `int`: a VF's index on its PF (`virtfn<N>`).
pub const VF_INDEX: &str = "pci.devhost.io/vfIndex";
/// `int`: the IOMMU group.
pub const IOMMU_GROUP: &str = "pci.devhost.io/iommuGroup";
/// `int`: the NUMA node; absent where the kernel says -1.
pub const NUMA_NODE: &str = "pci.devhost.io/numaNode";
/// `string`: the PCIe root complex (`pci0000:3a`).
pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
/// `string`: the function's (first) network interface (`ens1f0v2`).
pub const NETDEV: &str = "pci.devhost.io/netdev";
/// `int`: that interface's link speed in Mb/s; absent while the link is
/// down or the kernel does not know it.
pub const LINK_SPEED: &str = "pci.devhost.io/linkSpeedMbps";

/// DRA's limit on a string value, in bytes.
pub const MAX_VALUE: usize = 64;

/// The attributes of `f`, and one warning per value left out.
pub fn describe(f: &Function) -> (BTreeMap<String, AttributeValue>, Vec<String>) {
    let mut attributes = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut string = |name: &str, value: &str| {
        if value.len() > MAX_VALUE {
            warnings.push(format!(
                "PCI function {}: attribute {name} left out: {value:?} is {} bytes, DRA allows {MAX_VALUE}",
                f.address,
                value.len()
            ));
        } else {
            attributes.insert(name.to_owned(), AttributeValue::String(value.to_owned()));
        }
    };
    string(ADDRESS, &f.address);
    string(VENDOR, &f.vendor);
    string(DEVICE, &f.device);
    string(CLASS, &format!("{:06x}", f.class));
    if let Some(driver) = &f.driver {
        string(DRIVER, driver);
    }
    if let Some((pf, _)) = &f.vf_of {
        string(PF_ADDRESS, pf);
    }
    if let Some(root) = &f.pcie_root {
        string(PCIE_ROOT, root);
    }
    if let Some(netdev) = f.netdevs.first() {
        string(NETDEV, netdev);
    }
    attributes.insert(VIRTUAL_FUNCTION.to_owned(), AttributeValue::Bool(f.vf_of.is_some()));
    if let Some((_, index)) = &f.vf_of {
        attributes.insert(VF_INDEX.to_owned(), AttributeValue::Int(i64::from(*index)));
    }
    if let Some(group) = f.iommu_group.as_deref().and_then(|g| g.parse::<i64>().ok()) {
        attributes.insert(IOMMU_GROUP.to_owned(), AttributeValue::Int(group));
    }
    if let Some(node) = f.numa {
        attributes.insert(NUMA_NODE.to_owned(), AttributeValue::Int(node));
    }
    if let Some(speed) = f.link_speed {
        attributes.insert(LINK_SPEED.to_owned(), AttributeValue::Int(speed));
    }
    (attributes, warnings)
}
