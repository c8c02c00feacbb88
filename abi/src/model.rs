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
}

impl Resource {
    /// A resource with neither optional call.
    pub fn new(name: impl Into<String>) -> Self {
        Resource { name: name.into(), pre_start_required: false, preferred_allocation: false, release_required: false }
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
