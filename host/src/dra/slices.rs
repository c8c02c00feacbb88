//! The ResourceSlices of one DRA driver on one node (`docs/dra-api.md` §4),
//! built from the resource's device state: one pool named after the node,
//! `spec.nodeName` set, at most 128 devices a slice (64 when devices carry
//! taints), every slice with the pool's generation and slice count, each
//! device under its DRA name with the backend's attributes and capacities.
//! A resource with partitionable devices (`docs/dra-api.md` §4.3) gets its
//! counter sets in slices of their own first (at most 8 a slice, no
//! devices in them), and its devices carry `consumesCounters` (then at
//! most 64 devices a slice).
//!
//! Also what the API server makes of them (`docs/dra-api.md` §4.1): it
//! stamps a taint without `timeAdded` with the time of the write, writes
//! quantities in their canonical form and drops empty lists, maps and
//! strings. [`stores_as`] compares a slice the server holds with one
//! devhost would write as the server would store it, so those differences
//! never count as a change, and [`keep_taint_times`] gives a taint that
//! stays the time it was first added.
//!
//! Only the objects: publishing them (create, update, delete, adopt, with
//! back-off and at most one write a second) is the publisher's job.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, CapacityRequestPolicyRange, Counter, CounterSet, Device, DeviceAttribute, DeviceCapacity,
    DeviceCounterConsumption, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

use super::names;
use crate::device_state::Snapshot;
use crate::model::{AttributeValue, CounterConsumption, Health, MAX_COUNTER_SETS_PER_SLICE, ValidRequests};

/// Devices in one slice without taints (the API's limit).
pub const MAX_DEVICES: usize = 128;
/// Devices in one slice when any carries a taint or consumes counters
/// (the API's limit).
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
    partitioned_slices(source, &[], snapshot)
}

/// [`slices`] with the resource's counter sets, which its devices consume
/// from (partitionable devices; empty: none).
pub fn partitioned_slices(
    source: &SliceSource<'_>,
    counter_sets: &[crate::model::CounterSet],
    snapshot: &Snapshot,
) -> Vec<ResourceSlice> {
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
            let mut dra = dra_device(name.clone(), device, taints);
            dra.consumes_counters =
                (!device.consumes.is_empty()).then(|| device.consumes.iter().map(consumption).collect());
            if let Some(shared) = &device.shared {
                share(&mut dra, shared);
            }
            Some((name, dra))
        })
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    let consuming = devices.iter().any(|(_, device)| device.consumes_counters.is_some());
    let per_slice = if source.taints || consuming { MAX_DEVICES_WITH_TAINTS } else { MAX_DEVICES };
    // Counter sets go in slices of their own: a slice has either
    // `sharedCounters` or `devices`, never both (1.35+).
    let mut contents: Vec<Content> =
        counter_sets.chunks(MAX_COUNTER_SETS_PER_SLICE).map(|chunk| Content::Counters(chunk.to_vec())).collect();
    if devices.is_empty() {
        if contents.is_empty() {
            // An empty pool is still published: it says "no devices here".
            contents.push(Content::Devices(Vec::new()));
        }
    } else {
        contents.extend(
            devices.chunks(per_slice).map(|chunk| Content::Devices(chunk.iter().map(|(_, d)| d.clone()).collect())),
        );
    }
    let count = i64::try_from(contents.len()).unwrap_or(i64::MAX);
    contents
        .into_iter()
        .enumerate()
        .map(|(index, content)| ResourceSlice {
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
                shared_counters: match &content {
                    Content::Counters(sets) => Some(sets.iter().map(counter_set).collect()),
                    Content::Devices(_) => None,
                },
                devices: match content {
                    Content::Devices(devices) => Some(devices),
                    Content::Counters(_) => None,
                },
                ..ResourceSliceSpec::default()
            },
        })
        .collect()
}

/// Marks `device` as allocatable to several claims at once, each of its
/// capacities with its request policy (`docs/dra-api.md` §4.4).
fn share(device: &mut Device, shared: &crate::model::SharedDevice) {
    device.allow_multiple_allocations = Some(true);
    for (name, capacity) in device.capacity.iter_mut().flatten() {
        capacity.request_policy = shared.request_policies.get(name).map(request_policy);
    }
}

fn request_policy(policy: &crate::model::RequestPolicy) -> CapacityRequestPolicy {
    let quantity = |text: &String| Quantity(text.clone());
    let (valid_range, valid_values) = match &policy.valid {
        None => (None, None),
        Some(ValidRequests::Range { min, max, step }) => (
            Some(CapacityRequestPolicyRange {
                min: quantity(min),
                max: max.as_ref().map(quantity),
                step: step.as_ref().map(quantity),
            }),
            None,
        ),
        Some(ValidRequests::Values(values)) => (None, Some(values.iter().map(quantity).collect())),
    };
    CapacityRequestPolicy { default: policy.default.as_ref().map(quantity), valid_range, valid_values }
}

/// What one slice of a pool carries.
enum Content {
    /// Counter sets (at most [`MAX_COUNTER_SETS_PER_SLICE`]).
    Counters(Vec<crate::model::CounterSet>),
    /// Devices.
    Devices(Vec<Device>),
}

fn counters(counters: &BTreeMap<String, String>) -> BTreeMap<String, Counter> {
    counters.iter().map(|(name, quantity)| (name.clone(), Counter { value: Quantity(quantity.clone()) })).collect()
}

fn counter_set(set: &crate::model::CounterSet) -> CounterSet {
    CounterSet { name: set.name.clone(), counters: counters(&set.counters) }
}

fn consumption(consumption: &CounterConsumption) -> DeviceCounterConsumption {
    DeviceCounterConsumption { counter_set: consumption.counter_set.clone(), counters: counters(&consumption.counters) }
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

/// Whether the server, holding `have`, would store the same spec, labels
/// and owners if `want` were written now: fields only the server sets
/// (a taint's `timeAdded` that `want` leaves unset) and the server's way
/// of writing a value (a quantity's canonical form, an empty list left
/// out) do not count as a difference.
pub fn stores_as(have: &ResourceSlice, want: &ResourceSlice) -> bool {
    let mut want = want.clone();
    keep_taint_times(std::slice::from_mut(&mut want), [have]);
    as_stored(&have.spec) == as_stored(&want.spec)
        && have.metadata.labels.as_ref().filter(|labels| !labels.is_empty())
            == want.metadata.labels.as_ref().filter(|labels| !labels.is_empty())
        && have.metadata.owner_references.as_ref().filter(|owners| !owners.is_empty())
            == want.metadata.owner_references.as_ref().filter(|owners| !owners.is_empty())
}

/// Gives every taint in `desired` that has no `timeAdded` the time of the
/// same taint (key and effect) on the same device in `held`, so that a
/// rewrite keeps when the device was first tainted (the server would
/// otherwise stamp the time of the rewrite, and a `NoExecute` toleration's
/// seconds count from it). A device may move between the slices of a pool,
/// so every held slice is searched.
pub fn keep_taint_times<'a>(desired: &mut [ResourceSlice], held: impl IntoIterator<Item = &'a ResourceSlice>) {
    let mut times: HashMap<(&str, &str, &str), &Time> = HashMap::new();
    for slice in held {
        for device in slice.spec.devices.iter().flatten() {
            for taint in device.taints.iter().flatten() {
                if let Some(time) = &taint.time_added {
                    times.insert((device.name.as_str(), taint.key.as_str(), taint.effect.as_str()), time);
                }
            }
        }
    }
    if times.is_empty() {
        return;
    }
    for device in desired.iter_mut().flat_map(|slice| slice.spec.devices.iter_mut().flatten()) {
        for taint in device.taints.iter_mut().flatten() {
            if taint.time_added.is_none() {
                let key = (device.name.as_str(), taint.key.as_str(), taint.effect.as_str());
                taint.time_added = times.get(&key).map(|time| (*time).clone());
            }
        }
    }
}

/// `spec` as the server writes it back: empty lists, maps and optional
/// strings and `false` optional flags left out (the API's `omitempty`),
/// quantities by their value instead of their spelling.
fn as_stored(spec: &ResourceSliceSpec) -> ResourceSliceSpec {
    let mut spec = spec.clone();
    spec.all_nodes = spec.all_nodes.filter(|set| *set);
    spec.per_device_node_selection = spec.per_device_node_selection.filter(|set| *set);
    spec.shared_counters = spec.shared_counters.filter(|counters| !counters.is_empty());
    spec.devices = spec.devices.filter(|devices| !devices.is_empty());
    for device in spec.devices.iter_mut().flatten() {
        device.attributes = device.attributes.take().filter(|attributes| !attributes.is_empty());
        device.capacity = device.capacity.take().filter(|capacity| !capacity.is_empty());
        device.consumes_counters = device.consumes_counters.take().filter(|counters| !counters.is_empty());
        device.taints = device.taints.take().filter(|taints| !taints.is_empty());
        for capacity in device.capacity.iter_mut().flat_map(BTreeMap::values_mut) {
            // Any spelling of one value compares equal: "1Gi", "1024Mi".
            by_value_quantity(&mut capacity.value);
            if let Some(policy) = &mut capacity.request_policy {
                policy.default.iter_mut().for_each(by_value_quantity);
                policy.valid_values = policy.valid_values.take().filter(|values| !values.is_empty());
                policy.valid_values.iter_mut().flatten().for_each(by_value_quantity);
                if let Some(range) = &mut policy.valid_range {
                    by_value_quantity(&mut range.min);
                    range.max.iter_mut().for_each(by_value_quantity);
                    range.step.iter_mut().for_each(by_value_quantity);
                }
            }
        }
        for taint in device.taints.iter_mut().flatten() {
            taint.value = taint.value.take().filter(|value| !value.is_empty());
        }
        for consumption in device.consumes_counters.iter_mut().flatten() {
            by_value(&mut consumption.counters);
        }
    }
    for set in spec.shared_counters.iter_mut().flatten() {
        by_value(&mut set.counters);
    }
    spec
}

/// A quantity by its value, in billionths (kept as written when it does
/// not parse).
fn by_value_quantity(quantity: &mut Quantity) {
    if let Some(nanos) = quantity_nanos(&quantity.0) {
        *quantity = Quantity(format!("{nanos}n"));
    }
}

/// Counters compared by their value, as capacities are.
fn by_value(counters: &mut BTreeMap<String, Counter>) {
    for counter in counters.values_mut() {
        if let Some(nanos) = quantity_nanos(&counter.value.0) {
            counter.value = Quantity(format!("{nanos}n"));
        }
    }
}

pub(crate) use devhost_abi::partitions::quantity_nanos;

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

    /// What a server that defaults `timeAdded` and writes quantities its
    /// own way hands back for `slice`.
    fn as_the_server_stores(slice: &ResourceSlice, time: &str) -> ResourceSlice {
        let mut stored = slice.clone();
        stored.metadata.resource_version = Some("42".into());
        stored.metadata.uid = Some("uid-1".into());
        for device in stored.spec.devices.iter_mut().flatten() {
            for taint in device.taints.iter_mut().flatten() {
                taint.time_added.get_or_insert_with(|| Time(time.parse().expect("a time")));
            }
            if let Some(memory) = device.capacity.as_mut().and_then(|capacity| capacity.get_mut("memory")) {
                memory.value = Quantity("80Gi".into());
            }
        }
        stored
    }

    #[test]
    fn what_only_the_server_sets_or_spells_is_no_change() {
        let mut want = slices(&source(true), &snapshot(3, &[1])).remove(0);
        for device in want.spec.devices.iter_mut().flatten() {
            device
                .capacity
                .get_or_insert_default()
                .insert("memory".into(), DeviceCapacity { value: Quantity("81920Mi".into()), request_policy: None });
        }
        let have = as_the_server_stores(&want, "2026-03-01T10:00:00Z");
        assert_ne!(have.spec, want.spec, "the server's copy differs byte for byte");
        assert!(stores_as(&have, &want), "but not in anything devhost said");

        // Empty lists the server leaves out.
        let empty = slices(&source(true), &snapshot(0, &[])).remove(0);
        let mut stored = empty.clone();
        stored.spec.devices = None;
        assert!(stores_as(&stored, &empty));

        // Real changes still count: a quantity's value, a taint's value, a
        // new taint, a device more.
        let mut bigger = want.clone();
        bigger.spec.devices.as_mut().expect("devices")[0]
            .capacity
            .as_mut()
            .expect("capacity")
            .get_mut("memory")
            .expect("memory")
            .value = Quantity("81Gi".into());
        assert!(!stores_as(&have, &bigger));
        let mut reason = want.clone();
        reason.spec.devices.as_mut().expect("devices")[1].taints.as_mut().expect("taints")[0].value =
            Some("other".into());
        assert!(!stores_as(&have, &reason));
        let worse = slices(&source(true), &snapshot(3, &[0, 1])).remove(0);
        assert!(!stores_as(&as_the_server_stores(&want, "2026-03-01T10:00:00Z"), &worse));
        assert!(!stores_as(&have, &slices(&source(true), &snapshot(4, &[1])).remove(0)));
    }

    #[test]
    fn a_taint_that_stays_keeps_its_time_wherever_its_device_goes() {
        // Held: gpu-1's taint in the pool's second slice.
        let mut second =
            as_the_server_stores(&slices(&source(true), &snapshot(3, &[1])).remove(0), "2026-03-01T10:00:00Z");
        second.metadata.name = Some("node-a-gpu.example.com-1".into());
        let held = [slices(&source(true), &snapshot(0, &[])).remove(0), second];
        // Desired: gpu-1 in the first slice, and gpu-2 newly tainted.
        let mut desired = slices(&source(true), &snapshot(66, &[1, 2]));
        keep_taint_times(&mut desired, &held);
        let time = |name: &str| {
            desired
                .iter()
                .flat_map(devices)
                .find(|d| d.name == names::device_name(name))
                .and_then(|d| d.taints.as_ref())
                .and_then(|t| t[0].time_added.clone())
                .map(|t| t.0.to_string())
        };
        assert_eq!(time("GPU-001").as_deref(), Some("2026-03-01T10:00:00Z"));
        assert_eq!(time("GPU-002"), None, "a new taint gets the server's time");
        // Another effect is another taint.
        let mut no_execute = slices(&source(true), &snapshot(3, &[1]));
        for taint in no_execute
            .iter_mut()
            .flat_map(|s| s.spec.devices.iter_mut().flatten())
            .flat_map(|d| d.taints.iter_mut().flatten())
        {
            taint.effect = "NoExecute".into();
        }
        keep_taint_times(&mut no_execute, &held);
        assert!(
            no_execute
                .iter()
                .flat_map(devices)
                .filter_map(|d| d.taints.as_ref())
                .flatten()
                .all(|t| t.time_added.is_none())
        );
    }

    #[test]
    fn quantities_compare_by_value() {
        for (a, b) in [
            ("1Gi", "1024Mi"),
            ("1.5Gi", "1536Mi"),
            ("0.5", "500m"),
            ("1e3", "1k"),
            ("1000", "1k"),
            ("+2", "2"),
            ("0", "0m"),
            ("0.0000000001", "1n"),
        ] {
            assert_eq!(quantity_nanos(a), quantity_nanos(b), "{a} = {b}");
            assert!(quantity_nanos(a).is_some(), "{a}");
        }
        assert_eq!(quantity_nanos("-1.5"), Some(-1_500_000_000));
        assert_ne!(quantity_nanos("1Gi"), quantity_nanos("1G"));
        for bad in ["", "Gi", "1.2.3", "1x", "1e", "99999999999999999999999999999999999999999Ei"] {
            assert_eq!(quantity_nanos(bad), None, "{bad}");
        }
    }

    /// One GPU's counter set and its whole and half partitions, as
    /// devices `gpu-0`, `gpu-0-half-0` and `gpu-0-half-1`.
    fn partitioned() -> (std::sync::Arc<Snapshot>, Vec<crate::model::CounterSet>) {
        use crate::model::CounterSet;
        let counter_sets = vec![CounterSet::new("gpu-0", [("memory", "40Gi"), ("slices", "8")])];
        let state = ResourceState::new("example.com/gpu");
        state.declare_counter_sets(counter_sets.clone()).expect("valid counter sets");
        let partition = |id: &str, memory: &str, slices: &str| {
            ModelDevice::new(id, Health::Healthy).consuming("gpu-0", [("memory", memory), ("slices", slices)])
        };
        state
            .publish(vec![
                partition("gpu-0", "40Gi", "8"),
                partition("gpu-0-half-0", "20Gi", "4"),
                partition("gpu-0-half-1", "20480Mi", "4"),
            ])
            .expect("valid partitions");
        (state.snapshot(), counter_sets)
    }

    #[test]
    fn counter_sets_go_in_a_slice_of_their_own_and_devices_consume_them() {
        let (snapshot, counter_sets) = partitioned();
        let slices = partitioned_slices(&source(false), &counter_sets, &snapshot);
        assert_eq!(slices.len(), 2, "one counter-set slice, one device slice");
        for slice in &slices {
            assert_eq!((slice.spec.pool.generation, slice.spec.pool.resource_slice_count), (7, 2));
        }
        let counters = &slices[0].spec;
        assert_eq!(counters.devices, None, "a counter-set slice carries no devices (not even an empty list)");
        let sets = counters.shared_counters.as_ref().expect("sharedCounters");
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].name, "gpu-0");
        assert_eq!(sets[0].counters["memory"].value, Quantity("40Gi".into()));
        assert_eq!(slices[1].spec.shared_counters, None);
        let half = devices(&slices[1]).iter().find(|d| d.name == names::device_name("gpu-0-half-1")).expect("half");
        let consumed = half.consumes_counters.as_ref().expect("consumesCounters");
        assert_eq!(consumed[0].counter_set, "gpu-0");
        assert_eq!(consumed[0].counters["memory"].value, Quantity("20480Mi".into()));

        // Devices that consume nothing: one slice, nothing about counters.
        let plain = super::slices(&source(false), &self::snapshot(3, &[]));
        assert_eq!(plain.len(), 1);
        assert!(devices(&plain[0]).iter().all(|d| d.consumes_counters.is_none()));
    }

    #[test]
    fn devices_that_consume_counters_go_64_a_slice_and_sets_8_a_slice() {
        use crate::model::CounterSet;
        let counter_sets: Vec<CounterSet> =
            (0..10).map(|i| CounterSet::new(format!("set-{i}"), [("c", "1")])).collect();
        let state = ResourceState::new("example.com/gpu");
        state.declare_counter_sets(counter_sets.clone()).expect("valid counter sets");
        let mut published: Vec<ModelDevice> = snapshot(100, &[]).devices.clone();
        published[0] = published[0].clone().consuming("set-0", [("c", "1")]);
        state.publish(published).expect("valid");
        let snapshot = state.snapshot();
        let slices = partitioned_slices(&source(false), &counter_sets, &snapshot);
        let shape: Vec<(usize, usize)> =
            slices.iter().map(|s| (s.spec.shared_counters.as_ref().map_or(0, Vec::len), devices(s).len())).collect();
        assert_eq!(shape, [(8, 0), (2, 0), (0, 64), (0, 36)]);
        assert!(slices.iter().all(|s| s.spec.pool.resource_slice_count == 4));
        let names: Vec<&str> = slices.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
        assert_eq!(names[3], "node-a-gpu.example.com-3");
    }

    #[test]
    fn the_server_s_spelling_of_counters_is_no_change() {
        let (snapshot, counter_sets) = partitioned();
        let want = partitioned_slices(&source(false), &counter_sets, &snapshot);
        let mut have = want.clone();
        // The server writes 20480Mi back as 20Gi.
        for device in have[1].spec.devices.iter_mut().flatten() {
            for consumption in device.consumes_counters.iter_mut().flatten() {
                let memory = consumption.counters.get_mut("memory").expect("memory");
                if memory.value.0 == "20480Mi" {
                    memory.value = Quantity("20Gi".into());
                }
            }
        }
        assert_ne!(have, want);
        assert!(have.iter().zip(&want).all(|(have, want)| stores_as(have, want)));
        have[0].spec.shared_counters.as_mut().expect("sets")[0].counters.get_mut("memory").expect("memory").value =
            Quantity("80Gi".into());
        assert!(!stores_as(&have[0], &want[0]), "a counter's value is a change");
    }

    /// Every field name devhost writes is upstream's: the JSON of the
    /// slices, read back as `k8s_openapi`'s type, is the same object, and
    /// carries the names the API documents.
    #[test]
    fn partitioned_slices_survive_a_json_round_trip_with_upstream_field_names() {
        let (snapshot, counter_sets) = partitioned();
        for slice in partitioned_slices(&source(true), &counter_sets, &snapshot) {
            let json = serde_json::to_value(&slice).expect("serialises");
            let back: ResourceSlice = serde_json::from_value(json.clone()).expect("upstream's type reads it");
            assert_eq!(back, slice);
            let text = json.to_string();
            if slice.spec.shared_counters.is_some() {
                assert!(json["spec"]["sharedCounters"][0]["counters"]["memory"]["value"].is_string(), "{text}");
                assert!(json["spec"].get("devices").is_none(), "{text}");
            } else {
                let device = &json["spec"]["devices"][0];
                assert!(device["consumesCounters"][0]["counterSet"].is_string(), "{text}");
                assert!(device["consumesCounters"][0]["counters"]["slices"]["value"].is_string(), "{text}");
            }
        }
    }

    /// A NIC several claims share: 10G of bandwidth in 1G steps, and
    /// queues in fixed amounts; device `nic-1` is not shared.
    fn shared_nic() -> std::sync::Arc<Snapshot> {
        use crate::model::RequestPolicy;
        let state = ResourceState::new("example.com/nic");
        let nic = |id: &str| {
            ModelDevice::new(id, Health::Healthy).with_capacity("bandwidth", "10G").with_capacity("queues", "8")
        };
        let bandwidth = RequestPolicy {
            default: Some("1G".into()),
            valid: Some(ValidRequests::Range { min: "1G".into(), max: None, step: Some("1000M".into()) }),
        };
        let queues = RequestPolicy {
            default: Some("1".into()),
            valid: Some(ValidRequests::Values(vec!["1".into(), "2".into(), "4".into()])),
        };
        let shared = nic("nic-0").with_request_policy("bandwidth", bandwidth).with_request_policy("queues", queues);
        state.publish(vec![shared, nic("nic-1")]).expect("valid");
        state.snapshot()
    }

    #[test]
    fn shared_devices_allow_multiple_allocations_with_their_request_policies() {
        let snapshot = shared_nic();
        let slices = partitioned_slices(&source(true), &[], &snapshot);
        assert_eq!(slices.len(), 1, "no counter sets: one slice of devices");
        let devices = devices(&slices[0]);
        let shared = devices.iter().find(|d| d.name == "nic-0").expect("nic-0");
        assert_eq!(shared.allow_multiple_allocations, Some(true));
        let capacity = shared.capacity.as_ref().expect("capacity");
        assert_eq!(capacity["bandwidth"].value, Quantity("10G".into()));
        let bandwidth = capacity["bandwidth"].request_policy.as_ref().expect("bandwidth policy");
        assert_eq!(bandwidth.default, Some(Quantity("1G".into())));
        let range = bandwidth.valid_range.as_ref().expect("range");
        assert_eq!(
            (range.min.0.as_str(), range.max.as_ref(), range.step.as_ref().map(|q| q.0.as_str())),
            ("1G", None, Some("1000M"))
        );
        assert_eq!(bandwidth.valid_values, None);
        let queues = capacity["queues"].request_policy.as_ref().expect("queues policy");
        let values: Vec<&str> = queues.valid_values.iter().flatten().map(|q| q.0.as_str()).collect();
        assert_eq!(values, ["1", "2", "4"]);
        assert_eq!(queues.valid_range, None);
        let whole = devices.iter().find(|d| d.name == "nic-1").expect("nic-1");
        assert_eq!(whole.allow_multiple_allocations, None, "a device not declared shared is allocated whole");
        assert!(whole.capacity.as_ref().expect("capacity").values().all(|c| c.request_policy.is_none()));
    }

    /// The field names are upstream's (`allowMultipleAllocations`,
    /// `requestPolicy`, `validRange`, `validValues`), and the server's
    /// spelling of a policy's quantities is no change.
    #[test]
    fn shared_devices_survive_a_json_round_trip_and_compare_by_value() {
        let snapshot = shared_nic();
        let want = partitioned_slices(&source(true), &[], &snapshot);
        let json = serde_json::to_value(&want[0]).expect("serialises");
        let back: ResourceSlice = serde_json::from_value(json.clone()).expect("upstream's type reads it");
        assert_eq!(back, want[0]);
        let nic = json["spec"]["devices"].as_array().expect("devices").iter().find(|d| d["name"] == "nic-0").cloned();
        let nic = nic.expect("nic-0");
        assert_eq!(nic["allowMultipleAllocations"], true, "{nic}");
        let policy = &nic["capacity"]["bandwidth"]["requestPolicy"];
        assert_eq!(policy["default"], "1G", "{nic}");
        assert_eq!(policy["validRange"]["min"], "1G", "{nic}");
        assert_eq!(policy["validRange"]["step"], "1000M", "{nic}");
        assert_eq!(nic["capacity"]["queues"]["requestPolicy"]["validValues"][2], "4", "{nic}");

        // As the server writes it back: 1000M is 1G.
        let with_range = |min: &str, step: &str| {
            let mut have = back.clone();
            let devices = have.spec.devices.as_mut().expect("devices");
            let device = devices.iter_mut().find(|d| d.name == "nic-0").expect("nic");
            let bandwidth = device.capacity.as_mut().expect("capacity").get_mut("bandwidth").expect("bandwidth");
            let range = bandwidth.request_policy.as_mut().and_then(|p| p.valid_range.as_mut()).expect("range");
            range.min = Quantity(min.into());
            range.step = Some(Quantity(step.into()));
            have
        };
        assert!(stores_as(&with_range("1000M", "1G"), &want[0]), "a policy's spelling is no change");
        assert!(!stores_as(&with_range("2G", "1G"), &want[0]), "a policy's value is a change");
    }

    #[test]
    fn taint_values_are_label_values() {
        assert_eq!(taint_value("backend \"gpu\": worker killed by SIGSEGV"), "backend__gpu___worker_killed_by_SIGSEGV");
        assert!(taint_value(&"x".repeat(100)).len() <= 63);
        assert!(slice_name(&"n".repeat(250), "gpu.example.com", 12).len() <= 253);
    }
}
