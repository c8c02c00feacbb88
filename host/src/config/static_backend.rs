//! The `[config]` schema of the built-in `static` backend, validated with
//! file:line:column like every other config error. The backend itself
//! (`crate::backend::static_backend`) only serves what this produces.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use crate::model::{
    Allocation, AttributeValue, CounterConsumption, CounterSet, Device, DeviceSpec, DeviceStatus, Health,
    MAX_CONSUMPTIONS_PER_DEVICE, MAX_COUNTERS_PER_CONSUMPTION, MAX_COUNTERS_PER_SET, Mount, RequestPolicy,
    ResourceSpec, SharedDevice, ValidRequests,
};
use crate::resource_name;

/// The placeholder in `env` values replaced by the allocated IDs, comma-separated.
pub const IDS_PLACEHOLDER: &str = "{ids}";

/// `{capacity.<name>}` in `env` values is replaced by the amount of
/// capacity `<name>` each allocated device gives, comma-separated in the
/// order of the IDs: what the claim consumes of a shared device (its DRA
/// allocation's `consumedCapacity`), else the device's whole capacity.
pub const CAPACITY_PLACEHOLDER_PREFIX: &str = "{capacity.";

/// The validated `[config]` of a static backend.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticConfig {
    /// How often `health_path`s are checked.
    pub health_interval: Duration,
    /// The resources, in file order.
    pub resources: Vec<StaticResource>,
}

/// One resource of a static backend.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticResource {
    /// Its options as the kubelet sees them.
    pub spec: ResourceSpec,
    /// Byte span of the name in the file, for errors about it.
    pub name_span: Range<usize>,
    /// Added to every allocation; `{ids}` expands to the allocated IDs.
    pub env: BTreeMap<String, String>,
    /// Added to every allocation.
    pub annotations: BTreeMap<String, String>,
    /// CDI kind (`vendor/class`): allocations carry `<kind>=<id>` names.
    pub cdi_kind: Option<String>,
    /// Line and column of `cdi_kind` in the file, for errors about it.
    pub cdi_kind_location: Option<(usize, usize)>,
    /// The devices (each with what it `consumes` of the spec's counter
    /// sets, and whether it is `shared`).
    pub devices: Vec<StaticDevice>,
}

/// One device of a static resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticDevice {
    /// ID, health (unless `health_path` says otherwise) and NUMA nodes.
    pub device: Device,
    /// When set, the device is Healthy only while this path exists.
    pub health_path: Option<PathBuf>,
    /// Allocation contributions of this device; its `network = { ... }`
    /// is the `device_status` a DRA claim prepared with it shows
    /// (`docs/dra-api.md` §6).
    pub allocation: Allocation,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    // Host-level tables: the host's own schema (`config::backends`) checks them.
    #[serde(rename = "backend")]
    _backend: toml::Value,
    #[serde(rename = "resources", default)]
    _resources: Option<toml::Value>,
    #[serde(rename = "sandbox", default)]
    _sandbox: Option<toml::Value>,
    config: Option<Spanned<RawConfig>>,
}

/// The `[config]` table of a static backend, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    health_interval_ms: Option<Spanned<u64>>,
    #[serde(default)]
    resource: Vec<RawResource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Spanned<String>,
    #[serde(default)]
    pre_start: bool,
    #[serde(default)]
    preferred_allocation: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    cdi_kind: Option<Spanned<String>>,
    #[serde(default)]
    device: Vec<RawDevice>,
    /// `[[config.resource.counter_set]]`: counters the devices share.
    #[serde(default)]
    counter_set: Vec<RawCounterSet>,
}

/// One `[[config.resource.counter_set]]`: `name` and `counters`
/// (counter name → quantity).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCounterSet {
    name: Spanned<String>,
    counters: Spanned<BTreeMap<String, Spanned<String>>>,
}

/// One entry of a device's `consumes`: `{ counter_set, counters }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumption {
    counter_set: Spanned<String>,
    counters: Spanned<BTreeMap<String, Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: Spanned<String>,
    health: Option<Spanned<String>>,
    #[serde(default)]
    numa: Vec<Spanned<i64>>,
    health_path: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    device_spec: Vec<RawDeviceSpec>,
    #[serde(default)]
    mount: Vec<RawMount>,
    /// Typed attributes: an integer, a boolean, a string, or
    /// `{ version = "1.2.3" }`.
    attributes: Option<Spanned<BTreeMap<String, RawAttribute>>>,
    /// Capacities: name → Kubernetes quantity, or `{ value, request_policy }`
    /// for a capacity of a `shared` device.
    capacities: Option<Spanned<BTreeMap<String, RawCapacity>>>,
    /// DRA consumable capacity: several claims may be allocated the device
    /// at once (`allowMultipleAllocations`).
    shared: Option<Spanned<bool>>,
    /// DRA partitionable devices: what the device takes from the
    /// resource's counter sets while allocated.
    consumes: Option<Spanned<Vec<RawConsumption>>>,
    /// DRA device status (KEP-4817): what a claim prepared with the
    /// device shows in its `status.devices[].networkData`.
    network: Option<Spanned<RawNetwork>>,
}

/// A device's `network = { interface_name, hardware_address, ips }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    interface_name: Option<String>,
    hardware_address: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
}

/// A capacity: a quantity, or a table with its request policy.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawCapacity {
    Plain(String),
    Consumable(RawConsumableCapacity),
}

/// `{ value = "10G", request_policy = { ... } }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumableCapacity {
    value: String,
    request_policy: Option<RawRequestPolicy>,
}

/// `{ default, valid_range = { min, max, step } }` or
/// `{ default, valid_values = [...] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestPolicy {
    default: Option<String>,
    valid_range: Option<RawValidRange>,
    valid_values: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValidRange {
    min: String,
    max: Option<String>,
    step: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAttribute {
    Int(i64),
    Bool(bool),
    String(String),
    Version { version: String },
}

impl From<RawAttribute> for AttributeValue {
    fn from(raw: RawAttribute) -> Self {
        match raw {
            RawAttribute::Int(n) => AttributeValue::Int(n),
            RawAttribute::Bool(b) => AttributeValue::Bool(b),
            RawAttribute::String(text) => AttributeValue::String(text),
            RawAttribute::Version { version } => AttributeValue::Version(version),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceSpec {
    host_path: String,
    container_path: Option<Spanned<String>>,
    permissions: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    host_path: String,
    container_path: Spanned<String>,
    #[serde(default)]
    read_only: bool,
}

impl StaticConfig {
    /// Validates the `[config]` table of the backend file `source`.
    pub fn parse(file: &Path, source: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(source).map_err(|error| ConfigError::from_toml(file, source, &error))?;
        Self::from_raw(file, source, raw.config)
    }

    /// Validates `config`, the `[config]` table of `source` as parsed
    /// already (spans point into `source`).
    pub(super) fn from_raw(file: &Path, source: &str, config: Option<Spanned<RawConfig>>) -> Result<Self, ConfigError> {
        let at = |span: Range<usize>, message: String| ConfigError::at(file, source, span, message);
        let Some(config) = config else {
            return Err(ConfigError::file(
                file,
                "a static backend needs a [config] table with at least one [[config.resource]]",
            ));
        };
        let config_span = config.span();
        let config = config.into_inner();
        if config.resource.is_empty() {
            return Err(at(config_span, "a static backend needs at least one [[config.resource]]".into()));
        }
        let health_interval = match config.health_interval_ms {
            Some(ms) if *ms.get_ref() == 0 => {
                return Err(at(ms.span(), "health_interval_ms must be at least 1".into()));
            }
            Some(ms) => Duration::from_millis(*ms.get_ref()),
            None => Duration::from_secs(1),
        };
        let mut resources: Vec<StaticResource> = Vec::new();
        for raw in config.resource {
            let name = raw.name.get_ref();
            resource_name::validate(name).map_err(|error| at(raw.name.span(), error.to_string()))?;
            if resources.iter().any(|r| &r.spec.name == name) {
                return Err(at(raw.name.span(), format!("resource {name:?} is declared twice in this file")));
            }
            if let Some(kind) = &raw.cdi_kind {
                check_cdi_kind(kind.get_ref()).map_err(|message| at(kind.span(), message))?;
            }
            let counter_sets = parse_counter_sets(raw.counter_set, &at)?;
            let mut devices: Vec<StaticDevice> = Vec::with_capacity(raw.device.len());
            let mut ids = std::collections::HashSet::with_capacity(raw.device.len());
            for mut device in raw.device {
                let id_span = device.id.span();
                let consumes = device.consumes.take();
                let mut parsed = parse_device(device, &at)?;
                if !ids.insert(parsed.device.id.clone()) {
                    let message = format!("device ID {:?} appears twice in resource {name:?}", parsed.device.id);
                    return Err(at(id_span, message));
                }
                if let Some(consumes) = consumes {
                    parsed.device.consumes = parse_consumes(&parsed.device.id, consumes, &counter_sets, &at)?;
                }
                devices.push(parsed);
            }
            // Every rule was checked where it is written; these are the
            // model's own checks, the same every backend's declarations get.
            let whole = |why: String| at(raw.name.span(), format!("resource {name:?}: {why}"));
            devhost_abi::partitions::check_counter_sets(&counter_sets).map_err(whole)?;
            for static_device in &devices {
                devhost_abi::partitions::check_consumes(&static_device.device, &counter_sets).map_err(whole)?;
            }
            resources.push(StaticResource {
                spec: ResourceSpec {
                    name: name.clone(),
                    pre_start_required: raw.pre_start,
                    preferred_allocation: raw.preferred_allocation,
                    // Devices described in a file have no code to scrub them.
                    release_required: false,
                    counter_sets,
                },
                name_span: raw.name.span(),
                env: raw.env,
                annotations: raw.annotations,
                cdi_kind_location: raw.cdi_kind.as_ref().map(|kind| super::line_column(source, kind.span().start)),
                cdi_kind: raw.cdi_kind.map(Spanned::into_inner),
                devices,
            });
        }
        Ok(StaticConfig { health_interval, resources })
    }

    /// Every resource name with its span in the file.
    pub fn resource_names(&self) -> impl Iterator<Item = (&str, Range<usize>)> {
        self.resources.iter().map(|r| (r.spec.name.as_str(), r.name_span.clone()))
    }
}

fn parse_device(
    raw: RawDevice,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<StaticDevice, ConfigError> {
    let id = raw.id.get_ref().clone();
    if id.is_empty() {
        return Err(at(raw.id.span(), "device ID must not be empty".into()));
    }
    let health = match raw.health {
        None => Health::Healthy,
        Some(h) if h.get_ref() == "Healthy" => Health::Healthy,
        Some(h) if h.get_ref() == "Unhealthy" => Health::Unhealthy,
        Some(h) => {
            return Err(at(h.span(), format!("health must be \"Healthy\" or \"Unhealthy\", not {:?}", h.get_ref())));
        }
    };
    let mut numa_nodes = Vec::with_capacity(raw.numa.len());
    for node in raw.numa {
        if *node.get_ref() < 0 {
            return Err(at(node.span(), "NUMA node IDs are 0 or more; leave `numa` out for no affinity".into()));
        }
        numa_nodes.push(node.into_inner());
    }
    let mut device_specs = Vec::with_capacity(raw.device_spec.len());
    for spec in raw.device_spec {
        let container_path = match spec.container_path {
            Some(path) => absolute(path, at)?,
            None => spec.host_path.clone(),
        };
        let permissions = match spec.permissions {
            Some(p) if p.get_ref().is_empty() || !p.get_ref().chars().all(|c| matches!(c, 'r' | 'w' | 'm')) => {
                return Err(at(
                    p.span(),
                    format!("permissions must be a combination of r, w and m, not {:?}", p.get_ref()),
                ));
            }
            Some(p) => p.into_inner(),
            None => "rw".to_owned(),
        };
        device_specs.push(DeviceSpec { container_path, host_path: spec.host_path, permissions });
    }
    let mut mounts = Vec::with_capacity(raw.mount.len());
    for mount in raw.mount {
        let container_path = absolute(mount.container_path, at)?;
        mounts.push(Mount { container_path, host_path: mount.host_path, read_only: mount.read_only });
    }
    // A broken attribute is reported at its table (or the device's ID).
    let span = [raw.attributes.as_ref().map(Spanned::span), raw.capacities.as_ref().map(Spanned::span)]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or_else(|| raw.id.span());
    let mut device = Device::new(id, health).with_numa_nodes(numa_nodes);
    if let Some(attributes) = raw.attributes {
        device.attributes = attributes.into_inner().into_iter().map(|(name, value)| (name, value.into())).collect();
    }
    let shared_span = raw.shared.as_ref().map(Spanned::span);
    let shared = raw.shared.is_some_and(Spanned::into_inner);
    let mut policies: BTreeMap<String, RequestPolicy> = BTreeMap::new();
    if let Some(capacities) = raw.capacities {
        let capacities_span = capacities.span();
        for (name, capacity) in capacities.into_inner() {
            let (value, policy) = match capacity {
                RawCapacity::Plain(value) => (value, None),
                RawCapacity::Consumable(table) => (table.value, table.request_policy),
            };
            if let Some(policy) = policy {
                if !shared {
                    let message = format!(
                        "device {:?}: capacity {name:?} has a request_policy, which only a device with \
                         `shared = true` may have (the API server refuses it otherwise)",
                        device.id
                    );
                    return Err(at(capacities_span, message));
                }
                let policy = request_policy(policy)
                    .and_then(|policy| devhost_abi::partitions::check_request_policy(&policy, &value).map(|()| policy));
                let policy = policy.map_err(|why| {
                    at(
                        capacities_span.clone(),
                        format!("device {:?}, capacity {name:?}: request_policy: {why}", device.id),
                    )
                })?;
                policies.insert(name.clone(), policy);
            }
            device.capacities.insert(name, value);
        }
    }
    device.shared = shared.then_some(SharedDevice { request_policies: policies });
    if let Err(why) = crate::device_info::check(&device) {
        return Err(at(span, format!("device {:?}: {why}", device.id)));
    }
    if shared && device.capacities.is_empty() {
        // Nothing for the scheduler to account: every claim could have it.
        let message = format!(
            "device {:?} is shared but declares no capacities: name what claims consume (`capacities`)",
            device.id
        );
        return Err(at(shared_span.unwrap_or(span), message));
    }
    let mut allocation = Allocation { envs: raw.env, mounts, device_specs, ..Allocation::default() };
    if let Some(network) = raw.network {
        let network_span = network.span();
        let network = network.into_inner();
        let status = DeviceStatus {
            interface_name: network.interface_name,
            hardware_address: network.hardware_address,
            ips: network.ips,
            data: None,
        };
        if let Err(why) = devhost_abi::partitions::check_device_status(&status) {
            return Err(at(network_span, format!("device {:?}: network: {why}", device.id)));
        }
        if !status.is_empty() {
            allocation.device_status.insert(device.id.clone(), status);
        }
    }
    Ok(StaticDevice { device, health_path: raw.health_path, allocation })
}

/// The model's policy; the API allows one kind of valid amounts at most.
fn request_policy(raw: RawRequestPolicy) -> Result<RequestPolicy, String> {
    let valid = match (raw.valid_range, raw.valid_values) {
        (Some(range), None) => Some(ValidRequests::Range { min: range.min, max: range.max, step: range.step }),
        (None, Some(values)) => Some(ValidRequests::Values(values)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err("give valid_range or valid_values, not both".into()),
    };
    Ok(RequestPolicy { default: raw.default, valid })
}

/// The `[[config.resource.counter_set]]`s, each checked where it is written.
fn parse_counter_sets(
    raw: Vec<RawCounterSet>,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Vec<CounterSet>, ConfigError> {
    let mut sets: Vec<CounterSet> = Vec::with_capacity(raw.len());
    for set in raw {
        let name = set.name.get_ref();
        devhost_abi::partitions::check_counter_name("counter set", name).map_err(|why| at(set.name.span(), why))?;
        if sets.iter().any(|earlier| &earlier.name == name) {
            return Err(at(set.name.span(), format!("counter set {name:?} is declared twice in this resource")));
        }
        let counters_span = set.counters.span();
        let counters = set.counters.into_inner();
        if counters.is_empty() {
            return Err(at(counters_span, format!("counter set {name:?} needs at least one counter")));
        }
        if counters.len() > MAX_COUNTERS_PER_SET {
            let message = format!(
                "counter set {name:?} has {} counters; a counter set may have at most {MAX_COUNTERS_PER_SET}",
                counters.len()
            );
            return Err(at(counters_span, message));
        }
        let counters = quantities(counters, at, |counter| format!("counter set {name:?}, counter {counter:?}"))?;
        sets.push(CounterSet { name: set.name.into_inner(), counters });
    }
    Ok(sets)
}

/// A device's `consumes`, checked against the resource's counter sets.
fn parse_consumes(
    device: &str,
    raw: Spanned<Vec<RawConsumption>>,
    sets: &[CounterSet],
    at: &impl Fn(Range<usize>, String) -> ConfigError,
) -> Result<Vec<CounterConsumption>, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    if raw.len() > MAX_CONSUMPTIONS_PER_DEVICE {
        let message = format!(
            "device {device:?} consumes from {} counter sets; a device may consume from at most {MAX_CONSUMPTIONS_PER_DEVICE}",
            raw.len()
        );
        return Err(at(span, message));
    }
    let mut consumed: Vec<CounterConsumption> = Vec::with_capacity(raw.len());
    for entry in raw {
        let name = entry.counter_set.get_ref();
        let Some(set) = sets.iter().find(|set| &set.name == name) else {
            let declared: Vec<&str> = sets.iter().map(|set| set.name.as_str()).collect();
            let message = format!(
                "device {device:?} consumes from unknown counter set {name:?} (this resource declares: {declared:?})"
            );
            return Err(at(entry.counter_set.span(), message));
        };
        if consumed.iter().any(|earlier| &earlier.counter_set == name) {
            let message = format!("device {device:?} names counter set {name:?} twice (one entry per set)");
            return Err(at(entry.counter_set.span(), message));
        }
        let counters_span = entry.counters.span();
        let counters = entry.counters.into_inner();
        if counters.is_empty() {
            return Err(at(counters_span, format!("device {device:?} consumes nothing from counter set {name:?}")));
        }
        if counters.len() > MAX_COUNTERS_PER_CONSUMPTION {
            let message = format!(
                "device {device:?} consumes {} counters of set {name:?}; at most {MAX_COUNTERS_PER_CONSUMPTION}",
                counters.len()
            );
            return Err(at(counters_span, message));
        }
        for (counter, quantity) in &counters {
            if !set.counters.contains_key(counter) {
                let known: Vec<&String> = set.counters.keys().collect();
                let message = format!(
                    "device {device:?} consumes unknown counter {counter:?} of set {name:?} (it has: {known:?})"
                );
                return Err(at(quantity.span(), message));
            }
        }
        let counters = quantities(counters, at, |counter| format!("device {device:?}, counter {counter:?}"))?;
        consumed.push(CounterConsumption { counter_set: entry.counter_set.into_inner(), counters });
    }
    Ok(consumed)
}

/// Counter name → quantity, each name a DNS label and each quantity a
/// Kubernetes quantity, an error at the value; `what` names a counter.
fn quantities(
    counters: BTreeMap<String, Spanned<String>>,
    at: &impl Fn(Range<usize>, String) -> ConfigError,
    what: impl Fn(&str) -> String,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut checked = BTreeMap::new();
    for (counter, quantity) in counters {
        devhost_abi::partitions::check_counter_name("counter", &counter)
            .map_err(|why| at(quantity.span(), format!("{}: {why}", what(&counter))))?;
        crate::device_info::check_quantity(quantity.get_ref())
            .map_err(|why| at(quantity.span(), format!("{}: {why}", what(&counter))))?;
        checked.insert(counter, quantity.into_inner());
    }
    Ok(checked)
}

fn absolute(path: Spanned<String>, at: &impl Fn(Range<usize>, String) -> ConfigError) -> Result<String, ConfigError> {
    if path.get_ref().starts_with('/') {
        Ok(path.into_inner())
    } else {
        Err(at(path.span(), format!("container_path must be absolute, not {:?}", path.get_ref())))
    }
}

/// A CDI kind is `vendor/class`: each part starts with a letter, ends with
/// a letter or digit, and has only `A-Za-z0-9_-.` in between.
fn check_cdi_kind(kind: &str) -> Result<(), String> {
    let part_ok = |part: &str| {
        let bytes = part.as_bytes();
        matches!(bytes.first(), Some(b) if b.is_ascii_alphabetic())
            && matches!(bytes.last(), Some(b) if b.is_ascii_alphanumeric())
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    match kind.split_once('/') {
        Some((vendor, class)) if part_ok(vendor) && part_ok(class) => Ok(()),
        _ => Err(format!("cdi_kind must be a CDI kind vendor/class such as \"example.com/gpu\", not {kind:?}")),
    }
}

#[cfg(test)]
pub(crate) use tests::TWO_GPUS;

#[cfg(test)]
mod tests;
