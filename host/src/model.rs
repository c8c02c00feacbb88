//! The device model every part of devhost shares: devices and their health,
//! resources and their options, and what an allocation gives a container.
//! Plain data, no behaviour beyond small helpers, and no gRPC: the servers
//! translate it to the kubelet's messages at the edge.

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

pub use devhost_abi::model::{
    CounterConsumption, CounterSet, DeviceStatus, RequestPolicy, Share, SharedDevice, ValidRequests,
};
pub use devhost_abi::partitions::{
    MAX_CONSUMPTIONS_PER_DEVICE, MAX_COUNTER_SETS_PER_SLICE, MAX_COUNTERS_PER_CONSUMPTION, MAX_COUNTERS_PER_SET,
    MAX_REQUEST_POLICY_VALUES,
};
