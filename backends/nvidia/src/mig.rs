//! MIG partitions (`mig = "partitions"`; DRA's partitionable devices,
//! KEP-4815): a GPU in MIG mode is published as one counter set and one
//! device per possible GPU-instance placement of every MIG profile, next
//! to the whole GPU, so that the scheduler never hands out two partitions
//! that overlap, nor a partition and the whole GPU.
//!
//! The counters follow NVIDIA's own DRA driver:
//!
//! * one counter per memory slice, `memory-slice-0` … `memory-slice-7`,
//!   each `1`: a partition consumes exactly the slices of its placement
//!   (`start .. start + size`), so two placements that overlap share a
//!   counter and can never be allocated together;
//! * one counter per engine kind, `multiprocessors`, `copy-engines`,
//!   `decoders`, `encoders`, `jpeg-engines`, `ofa-engines`, and `memory`,
//!   each as much as the largest profile has (the whole GPU in MIG mode),
//!   of which a partition consumes its profile's amount. These also refuse
//!   combinations the hardware cannot make although their memory slices
//!   are disjoint (two `1g.10gb+me` instances: one OFA between them).
//!
//! The whole GPU consumes every counter in full. Counters a GPU has none
//! of are left out, as is a partition's zero of a counter.
//!
//! A partition's device ID is `gpu-<index>-mig-<profile>-<start>`, the
//! profile's name without dots and with `+` as `-`
//! (`gpu-0-mig-1g10gb-3`, `gpu-0-mig-1g10gb-me-0`): a DNS label, so DRA
//! uses it as the device name unchanged. Everything here is a pure
//! function of what NVML reported ([`Gpu`], [`MigProfile`]).

use std::collections::{BTreeMap, BTreeSet};

use devhost_abi::partitions::{MAX_COUNTERS_PER_SET, is_dns_label};
use devhost_abi::sdk::{AttributeValue, CounterConsumption, CounterSet, Device, Health};

use crate::attributes::{self, MAX_VALUE, quantity};
use crate::model::{Gpu, MigProfile, Placement};

/// `string`: `gpu` for a whole GPU, `mig` for a MIG partition. Published
/// on every device of the resource once any GPU has partitions, so that a
/// selector can tell them apart without testing for the attribute; a node
/// without partitions publishes exactly what it did before.
pub const TYPE: &str = "nvidia.com/type";
/// `string`: the MIG profile (`1g.10gb`).
pub const PROFILE: &str = "nvidia.com/profile";
/// `int`: the first memory slice of the placement.
pub const PLACEMENT_START: &str = "nvidia.com/placementStart";
/// `int`: how many memory slices the placement takes.
pub const PLACEMENT_SIZE: &str = "nvidia.com/placementSize";
/// `string`: the UUID of the GPU the partition is part of.
pub const PARENT_UUID: &str = "nvidia.com/parentUUID";
/// `int`: NVML's index of that GPU.
pub const PARENT_INDEX: &str = "nvidia.com/parentIndex";
/// `int`: its minor number (`/dev/nvidia<minor>`).
pub const PARENT_MINOR: &str = "nvidia.com/parentMinor";
/// Capacity: streaming multiprocessors.
pub const MULTIPROCESSORS: &str = "nvidia.com/multiprocessors";
/// Capacity: copy engines.
pub const COPY_ENGINES: &str = "nvidia.com/copyEngines";
/// Capacity: video decoders.
pub const DECODERS: &str = "nvidia.com/decoders";
/// Capacity: video encoders.
pub const ENCODERS: &str = "nvidia.com/encoders";
/// Capacity: JPEG engines.
pub const JPEG_ENGINES: &str = "nvidia.com/jpegEngines";
/// Capacity: optical flow accelerators.
pub const OFA_ENGINES: &str = "nvidia.com/ofaEngines";

/// The counter of memory slice `n`.
pub fn memory_slice(n: u32) -> String {
    format!("memory-slice-{n}")
}

/// The counter set of the GPU with NVML index `index`.
pub fn counter_set_name(index: u32) -> String {
    format!("gpu-{index}")
}

/// The device ID of a partition, if the profile's name makes a DNS label
/// of it: `gpu-0-mig-1g10gb-3` for `1g.10gb` at slice 3.
pub fn partition_id(index: u32, profile: &str, start: u32) -> Option<String> {
    let mut compact = String::new();
    for c in profile.chars().filter(|c| *c != '.') {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if !(c == '-' && compact.ends_with('-')) {
            compact.push(c);
        }
    }
    let compact = compact.trim_matches('-');
    let id = format!("gpu-{index}-mig-{compact}-{start}");
    (!compact.is_empty() && is_dns_label(&id)).then_some(id)
}

/// One MIG GPU-instance placement, published as a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its device ID (`gpu-0-mig-1g10gb-3`).
    pub id: String,
    /// The UUID of its GPU.
    pub parent: String,
    /// The profile (placements included, as NVML listed them).
    pub profile: MigProfile,
    /// Where it sits.
    pub placement: Placement,
}

/// One GPU's partitions: its counter set, what the whole GPU consumes of
/// it, and one partition per possible placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// The GPU's counter set (`gpu-<index>`).
    pub counter_set: CounterSet,
    /// The partitions, by profile (NVML's order) then placement.
    pub partitions: Vec<Partition>,
}

/// The amounts a profile takes, by counter (zeros left out).
fn engine_counters(profile: &MigProfile) -> Vec<(&'static str, u64)> {
    [
        ("multiprocessors", u64::from(profile.multiprocessors)),
        ("copy-engines", u64::from(profile.copy_engines)),
        ("decoders", u64::from(profile.decoders)),
        ("encoders", u64::from(profile.encoders)),
        ("jpeg-engines", u64::from(profile.jpeg_engines)),
        ("ofa-engines", u64::from(profile.ofa_engines)),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect()
}

/// What one instance of `profile` at `placement` consumes: its memory
/// slices, engines and memory.
fn consumption(profile: &MigProfile, placement: Placement) -> BTreeMap<String, String> {
    let mut counters: BTreeMap<String, String> =
        (placement.start..placement.start + placement.size).map(|n| (memory_slice(n), "1".to_owned())).collect();
    for (name, n) in engine_counters(profile) {
        counters.insert(name.to_owned(), n.to_string());
    }
    if profile.memory_mib > 0 {
        counters.insert("memory".to_owned(), quantity(profile.memory_mib << 20));
    }
    counters
}

/// Plans `gpu`'s partitions from its MIG profiles. Returns `None` (the GPU
/// is served whole, without a counter set) when no placement can be
/// published, and one warning, naming the GPU, per profile or placement
/// left out and why.
pub fn plan(gpu: &Gpu, profiles: &[MigProfile]) -> (Option<Partitions>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut partitions = Vec::new();
    let mut ids = BTreeSet::new();
    for profile in profiles {
        for &placement in &profile.placements {
            if placement.size == 0 {
                warnings.push(format!(
                    "GPU {}: MIG profile {} placement at slice {} left out: NVML gives it no memory slices",
                    gpu.uuid, profile.name, placement.start
                ));
                continue;
            }
            let Some(id) = partition_id(gpu.index, &profile.name, placement.start) else {
                warnings.push(format!(
                    "GPU {}: MIG profile {:?} left out: its name makes no valid device ID (a DNS label)",
                    gpu.uuid, profile.name
                ));
                break;
            };
            if !ids.insert(id.clone()) {
                warnings.push(format!(
                    "GPU {}: MIG profile {} at slice {} left out: device ID {id} is taken by another profile",
                    gpu.uuid, profile.name, placement.start
                ));
                continue;
            }
            partitions.push(Partition { id, parent: gpu.uuid.clone(), profile: profile.clone(), placement });
        }
    }
    if partitions.is_empty() {
        warnings.push(format!(
            "GPU {}: MIG mode is on but NVML lists no MIG placement to publish; it is served whole",
            gpu.uuid
        ));
        return (None, warnings);
    }
    // The set: every memory slice any placement takes, and the most of each
    // engine and of memory that any profile has.
    let slices = partitions.iter().map(|p| p.placement.start + p.placement.size).max().unwrap_or(0);
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for partition in &partitions {
        let profile = &partition.profile;
        let amounts = engine_counters(profile).into_iter().chain([("memory", profile.memory_mib << 20)]);
        for (name, n) in amounts.filter(|(_, n)| *n > 0) {
            let total = totals.entry(name.to_owned()).or_default();
            *total = (*total).max(n);
        }
    }
    let counter_count = slices as usize + totals.len();
    if counter_count > MAX_COUNTERS_PER_SET {
        warnings.push(format!(
            "GPU {}: MIG partitions not published: its placements span {slices} memory slices, which with {} \
             more counters is more than the {MAX_COUNTERS_PER_SET} counters a counter set may have; it is served whole",
            gpu.uuid,
            totals.len()
        ));
        return (None, warnings);
    }
    let mut counters: BTreeMap<String, String> = (0..slices).map(|n| (memory_slice(n), "1".to_owned())).collect();
    for (name, total) in totals {
        let value = if name == "memory" { quantity(total) } else { total.to_string() };
        counters.insert(name, value);
    }
    let counter_set = CounterSet { name: counter_set_name(gpu.index), counters };
    (Some(Partitions { counter_set, partitions }), warnings)
}

/// What the backend publishes for each GPU, in the GPUs' order: with
/// `mig = "partitions"`, its partitions where it has any. The default (no
/// partitions, untyped) publishes exactly the whole GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Per GPU, in the order of the GPU list: its partitions, if published.
    pub gpus: Vec<Option<Partitions>>,
    /// Add [`TYPE`] to every device (some GPU has partitions).
    pub typed: bool,
}

impl Layout {
    /// The counter sets to declare with the resource.
    pub fn counter_sets(&self) -> Vec<CounterSet> {
        self.gpus.iter().flatten().map(|p| p.counter_set.clone()).collect()
    }

    /// The partition with this device ID, and its GPU.
    pub fn partition<'a>(&'a self, gpus: &'a [Gpu], id: &str) -> Option<(&'a Gpu, &'a Partition)> {
        gpus.iter()
            .zip(&self.gpus)
            .filter_map(|(gpu, partitions)| Some((gpu, partitions.as_ref()?)))
            .find_map(|(gpu, p)| p.partitions.iter().find(|p| p.id == id).map(|p| (gpu, p)))
    }

    /// The device list: each GPU (with what it consumes, when it has
    /// partitions) followed by its partitions, each in its GPU's health.
    pub fn devices(&self, gpus: &[Gpu], health: impl Fn(&str) -> Health) -> Vec<Device> {
        let mut devices = Vec::new();
        for (i, gpu) in gpus.iter().enumerate() {
            let health = health(&gpu.uuid);
            let mut whole = crate::attributes::device(gpu, health);
            if self.typed {
                whole.attributes.insert(TYPE.to_owned(), AttributeValue::String("gpu".into()));
            }
            let Some(Some(partitions)) = self.gpus.get(i) else {
                devices.push(whole);
                continue;
            };
            let set = &partitions.counter_set;
            whole.consumes.push(CounterConsumption { counter_set: set.name.clone(), counters: set.counters.clone() });
            devices.push(whole);
            for partition in &partitions.partitions {
                devices.push(partition_device(gpu, &set.name, partition, health));
            }
        }
        devices
    }
}

/// A partition as a device: its GPU's attributes that hold for a part of
/// it (product, versions, PCI address and root), what it is (type,
/// profile, placement, parent), its engines and memory as capacities, and
/// what it consumes of its GPU's counter set.
pub fn partition_device(gpu: &Gpu, counter_set: &str, partition: &Partition, health: Health) -> Device {
    let parent = attributes::describe(gpu);
    let mut device = Device::new(partition.id.clone(), health);
    device.numa_nodes = gpu.numa_node.into_iter().collect();
    let own = [attributes::UUID, attributes::INDEX, attributes::MINOR, attributes::MIG_ENABLED];
    device.attributes = parent.attributes.into_iter().filter(|(name, _)| !own.contains(&name.as_str())).collect();
    let profile = &partition.profile;
    let string = |s: &str| AttributeValue::String(s.to_owned());
    let int = |n: u32| AttributeValue::Int(i64::from(n));
    device.attributes.insert(TYPE.to_owned(), string("mig"));
    if profile.name.len() <= MAX_VALUE {
        device.attributes.insert(PROFILE.to_owned(), string(&profile.name));
    }
    if gpu.uuid.len() <= MAX_VALUE {
        device.attributes.insert(PARENT_UUID.to_owned(), string(&gpu.uuid));
    }
    device.attributes.insert(PARENT_INDEX.to_owned(), int(gpu.index));
    device.attributes.insert(PARENT_MINOR.to_owned(), int(gpu.minor));
    device.attributes.insert(PLACEMENT_START.to_owned(), int(partition.placement.start));
    device.attributes.insert(PLACEMENT_SIZE.to_owned(), int(partition.placement.size));
    let engines = [
        (MULTIPROCESSORS, profile.multiprocessors),
        (COPY_ENGINES, profile.copy_engines),
        (DECODERS, profile.decoders),
        (ENCODERS, profile.encoders),
        (JPEG_ENGINES, profile.jpeg_engines),
        (OFA_ENGINES, profile.ofa_engines),
    ];
    for (name, n) in engines {
        device.capacities.insert(name.to_owned(), n.to_string());
    }
    if profile.memory_mib > 0 {
        device.capacities.insert(attributes::MEMORY.to_owned(), quantity(profile.memory_mib << 20));
    }
    device.consumes.push(CounterConsumption {
        counter_set: counter_set.to_owned(),
        counters: consumption(profile, partition.placement),
    });
    device
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ids_are_dns_labels() {
        assert_eq!(partition_id(0, "1g.10gb", 3).as_deref(), Some("gpu-0-mig-1g10gb-3"));
        assert_eq!(partition_id(7, "1g.10gb+me", 0).as_deref(), Some("gpu-7-mig-1g10gb-me-0"));
        assert_eq!(partition_id(1, "7g.80gb", 0).as_deref(), Some("gpu-1-mig-7g80gb-0"));
        assert_eq!(partition_id(1, "1g.24gb-gfx", 6).as_deref(), Some("gpu-1-mig-1g24gb-gfx-6"));
        assert_eq!(partition_id(0, "+.", 0), None, "nothing left of the name");
        assert_eq!(partition_id(0, &"x".repeat(60), 0), None, "longer than a label");
    }
}
