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
    /// Device ID → how claims share it (consumable capacity,
    /// `docs/dra-api.md` §4.4). Devices not listed are allocated whole,
    /// to one claim at a time. Kept here so that it reaches the slices by
    /// the partitions' path.
    pub shared: BTreeMap<String, SharedDevice>,
}

impl Partitions {
    /// Whether there are neither counter sets nor consumptions.
    pub fn is_empty(&self) -> bool {
        self.counter_sets.is_empty() && self.consumes.values().all(Vec::is_empty) && self.shared.is_empty()
    }

    /// How device `id` is shared, if it is.
    pub fn shared(&self, id: &str) -> Option<&SharedDevice> {
        self.shared.get(id)
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

/// Values one `valid_values` request policy may list at most (the API's
/// `CapacityRequestPolicyDiscreteMaxOptions`; `docs/dra-api.md` §4.4).
pub const MAX_REQUEST_POLICY_VALUES: usize = 10;

/// Which amounts of a shared device's capacity a claim may consume (DRA's
/// consumable capacity, the API's `CapacityRequestPolicy`). Quantities are
/// Kubernetes quantities, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestPolicy {
    /// What a request that names no amount of this capacity consumes.
    /// Required with [`valid`](Self::valid).
    pub default: Option<String>,
    /// The amounts allowed; `None`: any amount up to what is left.
    pub valid: Option<ValidRequests>,
}

/// The amounts a [`RequestPolicy`] allows (the scheduler rounds a request
/// up to the next one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidRequests {
    /// `min`, then `min + n * step` (any amount without a step), up to
    /// `max` (the capacity without one).
    Range {
        /// The least a claim consumes.
        min: String,
        /// The most a claim may consume.
        max: Option<String>,
        /// The granularity above `min`.
        step: Option<String>,
    },
    /// These amounts only, ascending, at most [`MAX_REQUEST_POLICY_VALUES`].
    Values(Vec<String>),
}

/// A device several claims may be allocated at once (the API's
/// `allowMultipleAllocations`), the scheduler accounting for what each
/// consumes of its capacities.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedDevice {
    /// Capacity name (one of the device's capacities) → its request policy.
    /// A capacity without one may be consumed in any amount.
    pub request_policies: BTreeMap<String, RequestPolicy>,
}

impl RequestPolicy {
    /// Checks the policy against the capacity's value `capacity` as the
    /// API server's validation does (`docs/dra-api.md` §4.4), plus
    /// devhost's own rule that the default fits the capacity. The error
    /// names the broken rule and the amounts.
    pub fn check(&self, capacity: &str) -> Result<(), String> {
        let value = |what: &str, quantity: &str| {
            crate::dra::slices::quantity_nanos(quantity)
                .ok_or_else(|| format!("{what} {quantity:?} is not a Kubernetes quantity"))
        };
        let total = value("capacity", capacity)?;
        let default = self.default.as_deref().map(|text| value("default", text).map(|n| (text, n))).transpose()?;
        if let Some((text, n)) = default {
            if n < 0 {
                return Err(format!("default {text:?} is negative"));
            }
            if n > total {
                return Err(format!("default {text:?} is more than the capacity {capacity:?}"));
            }
        }
        let Some(valid) = &self.valid else { return Ok(()) };
        let Some((default_text, default)) = default else {
            let which = match valid {
                ValidRequests::Range { .. } => "valid_range",
                ValidRequests::Values(_) => "valid_values",
            };
            return Err(format!("a default is required with {which}"));
        };
        match valid {
            ValidRequests::Values(values) => {
                if values.is_empty() {
                    return Err("valid_values is empty: list at least one amount or leave it out".into());
                }
                if values.len() > MAX_REQUEST_POLICY_VALUES {
                    return Err(format!(
                        "valid_values has {} amounts, more than the {MAX_REQUEST_POLICY_VALUES} allowed",
                        values.len()
                    ));
                }
                let mut previous: Option<(&str, i128)> = None;
                for text in values {
                    let n = value("valid value", text)?;
                    if n > total {
                        return Err(format!("valid value {text:?} is more than the capacity {capacity:?}"));
                    }
                    if let Some((before, m)) = previous {
                        if n < m {
                            return Err(format!("valid_values must ascend: {text:?} comes after {before:?}"));
                        }
                        if n == m {
                            return Err(format!("valid_values lists {text:?} twice (as {before:?})"));
                        }
                    }
                    previous = Some((text.as_str(), n));
                }
                if !values.iter().any(|text| value("valid value", text).ok() == Some(default)) {
                    return Err(format!("default {default_text:?} is not one of valid_values {values:?}"));
                }
            }
            ValidRequests::Range { min, max, step } => {
                let least = value("min", min)?;
                if least < 0 {
                    return Err(format!("min {min:?} is negative"));
                }
                if least > total {
                    return Err(format!("min {min:?} is more than the capacity {capacity:?}"));
                }
                if default < least {
                    return Err(format!("default {default_text:?} is less than min {min:?}"));
                }
                let most = max.as_deref().map(|text| value("max", text).map(|n| (text, n))).transpose()?;
                if let Some((text, n)) = most {
                    if least > n {
                        return Err(format!("min {min:?} is more than max {text:?}"));
                    }
                    if n > total {
                        return Err(format!("max {text:?} is more than the capacity {capacity:?}"));
                    }
                    if default > n {
                        return Err(format!("default {default_text:?} is more than max {text:?}"));
                    }
                }
                if let Some(step_text) = step {
                    let step = value("step", step_text)?;
                    if step <= 0 {
                        return Err(format!("step {step_text:?} must be more than zero"));
                    }
                    if least + step > total {
                        return Err(format!(
                            "min {min:?} plus one step {step_text:?} is more than the capacity {capacity:?}"
                        ));
                    }
                    let aligned = |what: &str, text: &str, n: i128| {
                        if (n - least) % step == 0 {
                            Ok(())
                        } else {
                            Err(format!(
                                "{what} {text:?} is not min {min:?} plus a whole number of steps {step_text:?}"
                            ))
                        }
                    };
                    aligned("default", default_text, default)?;
                    if let Some((text, n)) = most {
                        aligned("max", text, n)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What one claim consumes of one shared device (the allocation result's
/// `consumedCapacity` and `shareID`), handed to the backend's `allocate`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Share {
    /// The allocation's share of the device (a UID), when it has one.
    pub share_id: Option<String>,
    /// Capacity name → the amount this claim consumes (a quantity).
    pub consumed: BTreeMap<String, String>,
}

#[cfg(test)]
mod request_policy_tests {
    use super::*;

    fn range(default: &str, min: &str, max: Option<&str>, step: Option<&str>) -> RequestPolicy {
        RequestPolicy {
            default: Some(default.into()),
            valid: Some(ValidRequests::Range { min: min.into(), max: max.map(Into::into), step: step.map(Into::into) }),
        }
    }

    #[test]
    fn policies_are_checked_against_the_capacity_by_value() {
        assert_eq!(range("1Gi", "1024Mi", Some("8Gi"), Some("1Gi")).check("10Gi"), Ok(()));
        assert_eq!(RequestPolicy::default().check("10G"), Ok(()), "no policy at all");
        let values = |default: &str, values: &[&str]| RequestPolicy {
            default: Some(default.into()),
            valid: Some(ValidRequests::Values(values.iter().map(|v| (*v).to_owned()).collect())),
        };
        assert_eq!(values("1000m", &["1", "2"]).check("2"), Ok(()), "1000m is one of them");
        for (policy, capacity, error) in [
            (range("1G", "1G", Some("20G"), None), "10G", "max \"20G\" is more than the capacity"),
            (range("3G", "1G", Some("2G"), None), "10G", "default \"3G\" is more than max"),
            (range("1G", "1G", Some("2500M"), Some("1G")), "10G", "max \"2500M\" is not min"),
            (range("1G", "1G", None, Some("0")), "10G", "step \"0\" must be more than zero"),
            (range("1G", "3G", Some("2G"), None), "10G", "default \"1G\" is less than min"),
            (range("20G", "1G", None, None), "10G", "default \"20G\" is more than the capacity"),
            (range("1G", "1G", None, None), "ten", "capacity \"ten\" is not a Kubernetes quantity"),
            (values("1", &["1", "1000m"]), "8", "valid_values lists \"1000m\" twice"),
            (values("1", &[]), "8", "valid_values is empty"),
            (values("1", &["1"; 11]), "8", "11 amounts, more than the 10 allowed"),
            (
                RequestPolicy { default: None, valid: Some(ValidRequests::Values(vec!["1".into()])) },
                "8",
                "a default is required with valid_values",
            ),
        ] {
            let why = policy.check(capacity).expect_err(error);
            assert!(why.contains(error), "expected {error:?}, got {why:?}");
        }
    }
}
