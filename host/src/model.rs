//! The device model every part of devhost shares: devices and their health,
//! resources and their options, and what an allocation gives a container.
//! Plain data, no behaviour beyond small helpers, and no gRPC: the servers
//! translate it to the kubelet's messages at the edge.

use std::collections::BTreeMap;

use thiserror::Error;

pub use devhost_abi::model::{Allocation, AttributeValue, Device, DeviceSpec, Health, Mount, PreferredRequest};

/// A resource a backend serves, with the options the kubelet is told (the
/// SDK calls it `Resource`).
pub type ResourceSpec = devhost_abi::model::Resource;

/// An error a backend reports from one of its calls.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct BackendError {
    /// What went wrong, in the backend's words.
    pub message: String,
    /// The backend broke the contract (invalid data, unknown status): its
    /// devices go Unhealthy and it is re-initialised. Otherwise the error
    /// only declines this one request.
    pub fault: bool,
}

impl BackendError {
    /// A request the backend declines; the backend stays healthy.
    pub fn new(message: impl Into<String>) -> Self {
        BackendError { message: message.into(), fault: false }
    }

    /// A contract violation: the backend is treated as broken.
    pub fn fault(message: impl Into<String>) -> Self {
        BackendError { message: message.into(), fault: true }
    }
}

/// How a resource's devices are shared between containers: each real device
/// is advertised `replicas` times (`<id>::<n>`), and preferred allocation
/// spreads replicas across real devices or packs them onto few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharing {
    /// How many containers may hold one device at once (1 = not shared).
    pub replicas: usize,
    /// How the default preferred allocation chooses among replicas.
    pub policy: ReplicaPolicy,
}

impl Default for Sharing {
    fn default() -> Self {
        Sharing { replicas: 1, policy: ReplicaPolicy::Spread }
    }
}

/// Which replicas the default preferred allocation picks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPolicy {
    /// Replicas of the least used real devices (spread the load).
    #[default]
    Spread,
    /// Replicas of the most used real devices (keep others whole).
    Pack,
}

/// Separates a replica's number from its real device's ID.
pub const REPLICA_SEPARATOR: &str = "::";

/// Host-side settings of one resource, from its backend's file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceSettings {
    /// Sharing of its devices between containers.
    pub sharing: Sharing,
    /// Write a CDI spec for it and answer Allocate with CDI names.
    pub cdi: bool,
    /// `api = "dra"`: the DRA driver name it is served as, instead of
    /// through the device plugin API (never both: the DRA scheduler does
    /// not see device-plugin allocations).
    pub dra_driver: Option<String>,
}

/// Counter sets in one ResourceSlice at most (the API's
/// `ResourceSliceMaxCounterSets`; `docs/dra-api.md` §4.3).
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;
/// Counters in one counter set at most (`ResourceSliceMaxCountersPerCounterSet`).
pub const MAX_COUNTERS_PER_SET: usize = 32;
/// Counter sets one device consumes from at most
/// (`ResourceSliceMaxDeviceCounterConsumptionsPerDevice`).
pub const MAX_CONSUMPTIONS_PER_DEVICE: usize = 2;
/// Counters one device consumes from one set at most
/// (`ResourceSliceMaxCountersPerDeviceCounterConsumption`).
pub const MAX_COUNTERS_PER_CONSUMPTION: usize = 32;

/// A named set of counters a resource's devices draw from (DRA's
/// partitionable devices): a GPU's memory and compute slices, say. The set
/// is not allocatable itself; a device that consumes from it can only be
/// allocated while enough of each counter is left, so overlapping
/// partitions (the whole GPU, its halves) are never handed out together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSet {
    /// A DNS label, unique among the resource's counter sets.
    pub name: String,
    /// Counter name (a DNS label) → how much there is (a Kubernetes quantity).
    pub counters: BTreeMap<String, String>,
}

/// What one device takes from one counter set while it is allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterConsumption {
    /// The counter set's name (one of the resource's sets).
    pub counter_set: String,
    /// Counter name (one of the set's) → how much the device takes.
    pub counters: BTreeMap<String, String>,
}

/// A resource's partitionable-device description: its counter sets and
/// what each device consumes from them. Host-side for now (the static
/// backend declares it); the C ABI and WIT carry it in a later version.
/// Empty (the default) for a resource without partitions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Partitions {
    /// The counter sets, in declaration order.
    pub counter_sets: Vec<CounterSet>,
    /// Device ID → what it consumes (at most
    /// [`MAX_CONSUMPTIONS_PER_DEVICE`] entries, one per set). Devices not
    /// listed consume nothing.
    pub consumes: BTreeMap<String, Vec<CounterConsumption>>,
}

impl Partitions {
    /// Whether there are neither counter sets nor consumptions.
    pub fn is_empty(&self) -> bool {
        self.counter_sets.is_empty() && self.consumes.values().all(Vec::is_empty)
    }

    /// What device `id` consumes (nothing when it is not listed).
    pub fn consumed_by(&self, id: &str) -> &[CounterConsumption] {
        self.consumes.get(id).map_or(&[], Vec::as_slice)
    }

    /// Checks the rules a ResourceSlice's API validation and the
    /// scheduler apply (`docs/dra-api.md` §4.3): names are DNS labels and
    /// unique, quantities parse, limits hold, and every consumption names
    /// a set and counters the resource has. The error names the set,
    /// counter or device and the broken rule.
    pub fn check(&self) -> Result<(), String> {
        let mut sets: BTreeMap<&str, &CounterSet> = BTreeMap::new();
        for set in &self.counter_sets {
            check_counter_name("counter set", &set.name)?;
            if sets.insert(set.name.as_str(), set).is_some() {
                return Err(format!("counter set {:?} is declared twice", set.name));
            }
            if set.counters.is_empty() {
                return Err(format!("counter set {:?} has no counters", set.name));
            }
            if set.counters.len() > MAX_COUNTERS_PER_SET {
                return Err(format!(
                    "counter set {:?} has {} counters, more than the {MAX_COUNTERS_PER_SET} a set may have",
                    set.name,
                    set.counters.len()
                ));
            }
            for (counter, quantity) in &set.counters {
                check_counter_name("counter", counter).map_err(|why| format!("counter set {:?}: {why}", set.name))?;
                crate::device_info::check_quantity(quantity)
                    .map_err(|why| format!("counter set {:?}, counter {counter:?}: {why}", set.name))?;
            }
        }
        for (device, consumptions) in &self.consumes {
            if consumptions.len() > MAX_CONSUMPTIONS_PER_DEVICE {
                return Err(format!(
                    "device {device:?} consumes from {} counter sets, more than the {MAX_CONSUMPTIONS_PER_DEVICE} a device may",
                    consumptions.len()
                ));
            }
            for (index, consumption) in consumptions.iter().enumerate() {
                check_consumption(device, consumption, &sets)?;
                if consumptions[..index].iter().any(|earlier| earlier.counter_set == consumption.counter_set) {
                    return Err(format!(
                        "device {device:?} consumes from counter set {:?} twice (one entry per set)",
                        consumption.counter_set
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_consumption(
    device: &str,
    consumption: &CounterConsumption,
    sets: &BTreeMap<&str, &CounterSet>,
) -> Result<(), String> {
    let name = &consumption.counter_set;
    let Some(set) = sets.get(name.as_str()) else {
        let known: Vec<&str> = sets.keys().copied().collect();
        return Err(format!("device {device:?} consumes from unknown counter set {name:?} (declared: {known:?})"));
    };
    if consumption.counters.is_empty() {
        return Err(format!("device {device:?} consumes nothing from counter set {name:?}: name at least one counter"));
    }
    if consumption.counters.len() > MAX_COUNTERS_PER_CONSUMPTION {
        return Err(format!(
            "device {device:?} consumes {} counters of set {name:?}, more than the {MAX_COUNTERS_PER_CONSUMPTION} allowed",
            consumption.counters.len()
        ));
    }
    for (counter, quantity) in &consumption.counters {
        if !set.counters.contains_key(counter) {
            let known: Vec<&String> = set.counters.keys().collect();
            return Err(format!(
                "device {device:?} consumes unknown counter {counter:?} of set {name:?} (it has: {known:?})"
            ));
        }
        crate::device_info::check_quantity(quantity)
            .map_err(|why| format!("device {device:?}, counter {counter:?} of set {name:?}: {why}"))?;
    }
    Ok(())
}

/// Counter set and counter names are DNS labels: 1 to 63 of `a-z0-9-`,
/// starting and ending with a letter or digit.
pub(crate) fn check_counter_name(what: &str, name: &str) -> Result<(), String> {
    if crate::dra::names::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} must be a DNS label (1-63 of a-z, 0-9 and -, alphanumeric at both ends)"))
    }
}
