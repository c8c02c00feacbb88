//! The ResourceSlices of one DRA driver on one node (`docs/dra-api.md` §4),
//! built from the resource's device state: one pool named after the node,
//! `spec.nodeName` set, at most 128 devices a slice (64 when devices carry
//! taints), every slice with the pool's generation and slice count, each
//! device under its DRA name with the backend's attributes and capacities.
//!
//! Only the objects: publishing them (create, update, delete, adopt, with
//! back-off and at most one write a second) is the publisher's job.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::names;
use crate::device_state::Snapshot;
use crate::model::{AttributeValue, Health};

/// Devices in one slice without taints (the API's limit).
pub const MAX_DEVICES: usize = 128;
/// Devices in one slice when any carries a taint (the API's limit).
pub const MAX_DEVICES_WITH_TAINTS: usize = 64;
/// The taint an Unhealthy device carries where the cluster has device
/// taints (DeviceTaints: beta and on by default from 1.36).
pub const UNHEALTHY_TAINT: &str = "devhost.io/unhealthy";
/// The label every slice devhost publishes carries, with the driver name:
/// how a restarted devhost finds the slices it should adopt or delete.
pub const DRIVER_LABEL: &str = "devhost.io/driver";

/// What a driver's slices on one node are built from.
#[derive(Debug, Clone)]
pub struct SliceSource<'a> {
    /// The driver name.
    pub driver: &'a str,
    /// The node name (also the pool's name).
    pub node: &'a str,
    /// The pool's generation: bumped whenever its content changes.
    pub generation: i64,
    /// The Node object as owner, so the slices go with the node.
    pub owner: Option<OwnerReference>,
    /// Whether Unhealthy devices are tainted `NoSchedule` (the cluster has
    /// device taints) or left out (it has not: the scheduler must not
    /// allocate them, and without taints it cannot tell).
    pub taints: bool,
}

/// The slices for `snapshot`'s devices, in order; the same input gives the
/// same objects (names included), so a publisher can compare and update.
pub fn slices(source: &SliceSource<'_>, snapshot: &Snapshot) -> Vec<ResourceSlice> {
    let mut devices: Vec<(String, Device)> = snapshot
        .devices
        .iter()
        .filter_map(|device| {
            let why = snapshot.fault.clone().or_else(|| snapshot.withheld.get(&device.id).cloned());
            let healthy = device.health == Health::Healthy && why.is_none();
            if !healthy && !source.taints {
                return None;
            }
            let name = names::device_name(&device.id);
            let taints = (!healthy).then(|| {
                vec![DeviceTaint {
                    key: UNHEALTHY_TAINT.to_owned(),
                    value: why.map(|why| taint_value(&why)),
                    effect: "NoSchedule".to_owned(),
                    time_added: None,
                }]
            });
            Some((name.clone(), dra_device(name, device, taints)))
        })
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    let per_slice = if source.taints { MAX_DEVICES_WITH_TAINTS } else { MAX_DEVICES };
    let chunks: Vec<Vec<Device>> = if devices.is_empty() {
        // An empty pool is still published: it says "no devices here".
        vec![Vec::new()]
    } else {
        devices.chunks(per_slice).map(|chunk| chunk.iter().map(|(_, d)| d.clone()).collect()).collect()
    };
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, devices)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(source.node, source.driver, index)),
                labels: Some(BTreeMap::from([(DRIVER_LABEL.to_owned(), source.driver.to_owned())])),
                owner_references: source.owner.clone().map(|owner| vec![owner]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: source.driver.to_owned(),
                node_name: Some(source.node.to_owned()),
                pool: ResourcePool {
                    name: source.node.to_owned(),
                    generation: source.generation,
                    resource_slice_count: count,
                },
                devices: Some(devices),
                ..ResourceSliceSpec::default()
            },
        })
        .collect()
}

/// `<node>-<driver>-<index>`, cut to the 253 characters a name may have.
fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let suffix = format!("-{index}");
    let mut base = format!("{node}-{driver}");
    base.truncate(253 - suffix.len());
    let base = base.trim_end_matches(['-', '.']);
    format!("{base}{suffix}")
}

/// A taint value is a label value: at most 63 characters of `[A-Za-z0-9_.-]`.
fn taint_value(why: &str) -> String {
    let value: String = why
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' })
        .take(63)
        .collect();
    value.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}

fn dra_device(name: String, device: &crate::model::Device, taints: Option<Vec<DeviceTaint>>) -> Device {
    let attributes: BTreeMap<String, DeviceAttribute> = device
        .attributes
        .iter()
        .map(|(key, value)| {
            let mut attribute = DeviceAttribute::default();
            match value {
                AttributeValue::Int(n) => attribute.int = Some(*n),
                AttributeValue::Bool(b) => attribute.bool = Some(*b),
                AttributeValue::String(s) => attribute.string = Some(s.clone()),
                AttributeValue::Version(v) => attribute.version = Some(v.clone()),
            }
            (key.clone(), attribute)
        })
        .collect();
    let capacity: BTreeMap<String, DeviceCapacity> = device
        .capacities
        .iter()
        .map(|(key, quantity)| {
            (key.clone(), DeviceCapacity { value: Quantity(quantity.clone()), request_policy: None })
        })
        .collect();
    Device {
        name,
        attributes: (!attributes.is_empty()).then_some(attributes),
        capacity: (!capacity.is_empty()).then_some(capacity),
        taints,
        ..Device::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_state::ResourceState;
    use crate::model::Device as ModelDevice;

    fn snapshot(count: usize, unhealthy: &[usize]) -> std::sync::Arc<Snapshot> {
        let state = ResourceState::new("example.com/gpu");
        let devices = (0..count)
            .map(|i| {
                let health = if unhealthy.contains(&i) { Health::Unhealthy } else { Health::Healthy };
                ModelDevice::new(format!("GPU-{i:03}"), health)
                    .with_attribute("resource.kubernetes.io/pcieRoot", AttributeValue::String("pci0000:00".into()))
                    .with_attribute("driverVersion", AttributeValue::Version("550.54.15".into()))
                    .with_attribute("index", AttributeValue::Int(i64::try_from(i).expect("small")))
                    .with_attribute("mig", AttributeValue::Bool(false))
                    .with_capacity("memory", "80Gi")
            })
            .collect();
        state.publish(devices).expect("valid");
        state.snapshot()
    }

    fn source(taints: bool) -> SliceSource<'static> {
        SliceSource { driver: "gpu.example.com", node: "node-a", generation: 7, owner: None, taints }
    }

    fn devices(slice: &ResourceSlice) -> &[Device] {
        slice.spec.devices.as_deref().unwrap_or_default()
    }

    #[test]
    fn a_pool_is_split_at_128_devices_with_one_generation_and_count() {
        let slices = slices(&source(false), &snapshot(300, &[]));
        let sizes: Vec<usize> = slices.iter().map(|s| devices(s).len()).collect();
        assert_eq!(sizes, [128, 128, 44]);
        for (index, slice) in slices.iter().enumerate() {
            assert_eq!(slice.metadata.name.as_deref(), Some(format!("node-a-gpu.example.com-{index}").as_str()));
            assert_eq!(slice.spec.driver, "gpu.example.com");
            assert_eq!(slice.spec.node_name.as_deref(), Some("node-a"));
            assert_eq!(
                (slice.spec.pool.name.as_str(), slice.spec.pool.generation, slice.spec.pool.resource_slice_count),
                ("node-a", 7, 3)
            );
            assert_eq!(
                slice.metadata.labels.as_ref().and_then(|l| l.get(DRIVER_LABEL)).map(String::as_str),
                Some("gpu.example.com")
            );
        }
        let names: Vec<&str> = slices.iter().flat_map(|s| devices(s).iter().map(|d| d.name.as_str())).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 300, "every device once");
        assert_eq!(slices, super::slices(&source(false), &snapshot(300, &[])), "the same input, the same objects");
    }

    #[test]
    fn devices_carry_their_dra_names_attributes_and_capacity() {
        let slices = slices(&source(false), &snapshot(1, &[]));
        let device = &devices(&slices[0])[0];
        assert_eq!(device.name, names::device_name("GPU-000"));
        let attributes = device.attributes.as_ref().expect("attributes");
        assert_eq!(attributes["resource.kubernetes.io/pcieRoot"].string.as_deref(), Some("pci0000:00"));
        assert_eq!(attributes["driverVersion"].version.as_deref(), Some("550.54.15"));
        assert_eq!(attributes["index"].int, Some(0));
        assert_eq!(attributes["mig"].bool, Some(false));
        assert_eq!(device.capacity.as_ref().expect("capacity")["memory"].value, Quantity("80Gi".into()));
        assert_eq!(device.taints, None);
    }

    #[test]
    fn unhealthy_devices_are_tainted_or_left_out() {
        let tainted = slices(&source(true), &snapshot(100, &[3]));
        assert_eq!(tainted.iter().map(|s| devices(s).len()).collect::<Vec<_>>(), [64, 36], "64 a slice with taints");
        let taints: Vec<&DeviceTaint> =
            tainted.iter().flat_map(devices).filter_map(|d| d.taints.as_ref()).flatten().collect();
        assert_eq!(taints.len(), 1);
        assert_eq!((taints[0].key.as_str(), taints[0].effect.as_str()), (UNHEALTHY_TAINT, "NoSchedule"));
        let untainted = slices(&source(false), &snapshot(100, &[3]));
        assert_eq!(untainted.iter().map(|s| devices(s).len()).sum::<usize>(), 99, "left out without taints");
        assert_eq!(slices(&source(false), &snapshot(0, &[])).len(), 1, "an empty pool is one empty slice");
    }

    #[test]
    fn taint_values_are_label_values() {
        assert_eq!(taint_value("backend \"gpu\": worker killed by SIGSEGV"), "backend__gpu___worker_killed_by_SIGSEGV");
        assert!(taint_value(&"x".repeat(100)).len() <= 63);
        assert!(slice_name(&"n".repeat(250), "gpu.example.com", 12).len() <= 253);
    }
}
