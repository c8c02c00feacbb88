//! The device model every part of devhost shares: devices and their health,
//! resources and their options, and what an allocation gives a container.
//! Plain data, no behaviour beyond small helpers, and no gRPC: the servers
//! translate it to the kubelet's messages at the edge.

use std::collections::BTreeMap;

use thiserror::Error;

/// The health of one device, as the kubelet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Usable: counts towards allocatable.
    Healthy,
    /// Not usable: counts towards capacity only.
    Unhealthy,
}

impl Health {
    /// The exact string the kubelet compares against.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => crate::proto::HEALTHY,
            Health::Unhealthy => crate::proto::UNHEALTHY,
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
}

impl Device {
    /// A healthy device without NUMA affinity.
    pub fn healthy(id: impl Into<String>) -> Self {
        Device { id: id.into(), health: Health::Healthy, numa_nodes: Vec::new() }
    }
}

/// A resource a backend serves, with the options the kubelet is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// Extended resource name, e.g. `example.com/gpu`.
    pub name: String,
    /// The kubelet must call `PreStartContainer` before each container start.
    pub pre_start_required: bool,
    /// The kubelet may call `GetPreferredAllocation`.
    pub preferred_allocation: bool,
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

/// What one container gets for the devices allocated to it.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceSettings {
    /// Sharing of its devices between containers.
    pub sharing: Sharing,
    /// Write a CDI spec for it and answer Allocate with CDI names.
    pub cdi: bool,
}
