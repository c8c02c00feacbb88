//! The data every backend speaks, in plain Rust: devices and their health,
//! resources and their options, what an allocation gives a container, and
//! the preferred-allocation question. No FFI type appears here: the SDK
//! hands these to vendors, the host uses the very same types inside, and
//! both transports (the C ABI, the WIT world) carry exactly this model.

use std::collections::BTreeMap;

/// The health of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Usable: counts towards allocatable.
    Healthy,
    /// Not usable: counts towards capacity only.
    Unhealthy,
}

impl Health {
    /// The exact string the kubelet compares against (`Healthy`/`Unhealthy`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }
}

/// The value of one typed device attribute (ABI 1.1), one of the four
/// kinds a DRA `ResourceSlice` publishes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AttributeValue {
    /// A signed 64-bit integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A string of at most 64 bytes.
    String(String),
    /// A semantic version (semver 2.0, e.g. `12.4.0`), at most 64 bytes.
    Version(String),
}

impl AttributeValue {
    /// The kind's name as DRA spells it: `int`, `bool`, `string`, `version`.
    pub fn kind(&self) -> &'static str {
        match self {
            AttributeValue::Int(_) => "int",
            AttributeValue::Bool(_) => "bool",
            AttributeValue::String(_) => "string",
            AttributeValue::Version(_) => "version",
        }
    }
}

/// One device of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Unique, non-empty ID within the resource.
    pub id: String,
    /// Current health.
    pub health: Health,
    /// NUMA nodes the device is attached to; empty means no preference.
    pub numa_nodes: Vec<i64>,
    /// What the device is (ABI 1.1): qualified name (`example.com/model`,
    /// or a bare identifier) to typed value. Empty from 1.0 backends.
    pub attributes: BTreeMap<String, AttributeValue>,
    /// How much of something the device has (ABI 1.1): qualified name to a
    /// Kubernetes quantity (`80Gi`, `1500m`). Empty from 1.0 backends.
    /// Attributes and capacities together: at most 32 per device.
    pub capacities: BTreeMap<String, String>,
    /// What the device takes from its resource's counter sets while it is
    /// allocated (ABI 1.2, DRA's partitionable devices): at most two
    /// entries, one per set. Empty from 1.0 and 1.1 backends.
    pub consumes: Vec<CounterConsumption>,
    /// Whether, and how, several DRA claims may be allocated the device at
    /// once, each consuming part of its capacities (ABI 1.2, consumable
    /// capacity). `None`: allocated whole, to one claim at a time.
    pub shared: Option<SharedDevice>,
}

impl Device {
    /// A device with the given health and no NUMA affinity.
    pub fn new(id: impl Into<String>, health: Health) -> Self {
        Device {
            id: id.into(),
            health,
            numa_nodes: Vec::new(),
            attributes: BTreeMap::new(),
            capacities: BTreeMap::new(),
            consumes: Vec::new(),
            shared: None,
        }
    }

    /// A healthy device without NUMA affinity.
    pub fn healthy(id: impl Into<String>) -> Self {
        Device::new(id, Health::Healthy)
    }

    /// The same device attached to these NUMA nodes.
    pub fn with_numa_nodes(mut self, numa_nodes: Vec<i64>) -> Self {
        self.numa_nodes = numa_nodes;
        self
    }

    /// The same device with one more attribute (ABI 1.1).
    pub fn with_attribute(mut self, name: impl Into<String>, value: AttributeValue) -> Self {
        self.attributes.insert(name.into(), value);
        self
    }

    /// The same device with one more capacity (ABI 1.1), a Kubernetes
    /// quantity such as `80Gi`.
    pub fn with_capacity(mut self, name: impl Into<String>, quantity: impl Into<String>) -> Self {
        self.capacities.insert(name.into(), quantity.into());
        self
    }

    /// The same device taking `counters` (counter name → quantity) from
    /// the counter set `counter_set` of its resource while it is allocated
    /// (ABI 1.2): a partition of what the set stands for.
    pub fn consuming<N: Into<String>, Q: Into<String>>(
        mut self,
        counter_set: impl Into<String>,
        counters: impl IntoIterator<Item = (N, Q)>,
    ) -> Self {
        self.consumes.push(CounterConsumption {
            counter_set: counter_set.into(),
            counters: counters.into_iter().map(|(name, quantity)| (name.into(), quantity.into())).collect(),
        });
        self
    }

    /// The same device, shared by several DRA claims at once, each
    /// consuming part of its capacities (ABI 1.2). Add request policies
    /// with [`with_request_policy`](Self::with_request_policy).
    pub fn shared(mut self) -> Self {
        self.shared.get_or_insert_with(SharedDevice::default);
        self
    }

    /// The same device, shared (see [`shared`](Self::shared)), with
    /// `policy` for its capacity `capacity` (ABI 1.2).
    pub fn with_request_policy(mut self, capacity: impl Into<String>, policy: RequestPolicy) -> Self {
        self.shared.get_or_insert_with(SharedDevice::default).request_policies.insert(capacity.into(), policy);
        self
    }
}

/// A named set of counters a resource's devices draw from (ABI 1.2, DRA's
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

impl CounterSet {
    /// A counter set named `name` with `counters` (name → quantity).
    pub fn new<N: Into<String>, Q: Into<String>>(
        name: impl Into<String>,
        counters: impl IntoIterator<Item = (N, Q)>,
    ) -> Self {
        CounterSet {
            name: name.into(),
            counters: counters.into_iter().map(|(name, quantity)| (name.into(), quantity.into())).collect(),
        }
    }
}

/// What one device takes from one counter set while it is allocated
/// (ABI 1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterConsumption {
    /// The counter set's name (one of the resource's sets).
    pub counter_set: String,
    /// Counter name (one of the set's) → how much the device takes.
    pub counters: BTreeMap<String, String>,
}

/// Which amounts of a shared device's capacity a claim may consume (ABI
/// 1.2; DRA's `CapacityRequestPolicy`). Quantities are Kubernetes
/// quantities, as written.
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
    /// These amounts only, ascending, at most ten.
    Values(Vec<String>),
}

/// How several claims share one device (ABI 1.2; DRA's
/// `allowMultipleAllocations`), the scheduler accounting for what each
/// consumes of its capacities.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedDevice {
    /// Capacity name (one of the device's capacities) → its request policy.
    /// A capacity without one may be consumed in any amount.
    pub request_policies: BTreeMap<String, RequestPolicy>,
}

/// What one DRA claim consumes of one shared device (ABI 1.2; the
/// allocation result's `consumedCapacity` and `shareID`), handed to the
/// backend's allocate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Share {
    /// The allocation's share of the device (a UID), when it has one.
    pub share_id: Option<String>,
    /// Capacity name → the amount this claim consumes (a quantity).
    pub consumed: BTreeMap<String, String>,
}

/// What a backend reports about one device it allocated for a DRA claim
/// (ABI 1.2; KEP-4817): the claim's `status.devices` entry for it, mostly
/// for network devices. Ignored for device-plugin allocations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    /// `networkData.interfaceName`: the interface in the pod (at most 256
    /// bytes).
    pub interface_name: Option<String>,
    /// `networkData.hardwareAddress`: a MAC address, say (at most 128 bytes).
    pub hardware_address: Option<String>,
    /// `networkData.ips`: addresses with a prefix length, in canonical
    /// form (`10.0.0.5/24`), at most 16.
    pub ips: Vec<String>,
    /// `data`: driver-specific data, the text of a JSON object (at most
    /// 10 KiB).
    pub data: Option<String>,
}

impl DeviceStatus {
    /// Whether it says nothing (no status entry is written for it).
    pub fn is_empty(&self) -> bool {
        self.interface_name.is_none() && self.hardware_address.is_none() && self.ips.is_empty() && self.data.is_none()
    }
}

/// A resource a backend serves, with the options the kubelet is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Extended resource name, e.g. `example.com/gpu`.
    pub name: String,
    /// The kubelet must call `pre_start` before each container start.
    pub pre_start_required: bool,
    /// The kubelet may call `preferred_allocation`.
    pub preferred_allocation: bool,
    /// ABI 1.1: the host calls `release` for devices no longer held by any
    /// container, and advertises them Unhealthy until it succeeds.
    pub release_required: bool,
    /// ABI 1.2: the counter sets the resource's devices consume from
    /// ([`Device::consuming`]), published in DRA ResourceSlices as
    /// `sharedCounters`. Empty for resources without partitions.
    pub counter_sets: Vec<CounterSet>,
}

impl Resource {
    /// A resource with neither optional call.
    pub fn new(name: impl Into<String>) -> Self {
        Resource {
            name: name.into(),
            pre_start_required: false,
            preferred_allocation: false,
            release_required: false,
            counter_sets: Vec::new(),
        }
    }

    /// Asks the kubelet to call `pre_start` before each container start.
    pub fn with_pre_start(mut self) -> Self {
        self.pre_start_required = true;
        self
    }

    /// Tells the kubelet that `preferred_allocation` is answered.
    pub fn with_preferred_allocation(mut self) -> Self {
        self.preferred_allocation = true;
        self
    }

    /// Asks the host to call `release` once devices are free again
    /// (ABI 1.1).
    pub fn with_release(mut self) -> Self {
        self.release_required = true;
        self
    }

    /// Declares one more counter set its devices consume from (ABI 1.2).
    pub fn with_counter_set(mut self, counter_set: CounterSet) -> Self {
        self.counter_sets.push(counter_set);
        self
    }
}

/// A bind mount for the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A device node for the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// cgroup permissions: any combination of `r`, `w`, `m`.
    pub permissions: String,
}

/// What one container gets for its devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Environment variables.
    pub envs: BTreeMap<String, String>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Device nodes.
    pub device_specs: Vec<DeviceSpec>,
    /// Container annotations.
    pub annotations: BTreeMap<String, String>,
    /// Fully qualified CDI device names (`vendor/class=name`).
    pub cdi_devices: Vec<String>,
    /// ABI 1.2: device ID → what the DRA claim's `status.devices` says of
    /// it (a network device's interface, MAC, addresses). Only DRA
    /// prepares read it; a device left out gets no entry.
    pub device_status: BTreeMap<String, DeviceStatus>,
}

/// One container's `GetPreferredAllocation` question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferredRequest {
    /// Devices the answer may choose from.
    pub available: Vec<String>,
    /// Devices the answer must contain.
    pub must_include: Vec<String>,
    /// How many devices the answer must contain.
    pub size: usize,
}
