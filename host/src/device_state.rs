//! Device state per resource: a tokio `watch` channel holding the latest full
//! snapshot. Backends write it through a [`Publisher`]; every open
//! `ListAndWatch` stream reads it. Latest state wins, so a burst of updates
//! costs each stream one message.
//!
//! A snapshot is validated once when published (non-empty, unique IDs; under
//! the kubelet's 4 MiB message limit) and carries its device list encoded
//! as a `ListAndWatchResponse`, so streams never re-check, rebuild or
//! re-encode it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;
use prost::bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;

use crate::model::{Device, Health, REPLICA_SEPARATOR, Sharing};
use crate::proto::{MAX_MESSAGE_BYTES, v1beta1};

/// Why a published device list was refused. The previous list stays.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    /// The backend published for a resource it did not declare.
    #[error("resource {resource:?} is not served by this backend (it declared: {declared})")]
    UnknownResource {
        /// The resource named in the publish.
        resource: String,
        /// The resources the backend declared, comma-separated.
        declared: String,
    },
    /// A device had an empty ID.
    #[error("resource {resource:?}: device #{index} has an empty ID")]
    EmptyId {
        /// The resource.
        resource: String,
        /// Position of the device in the list.
        index: usize,
    },
    /// Two devices shared an ID.
    #[error("resource {resource:?}: device ID {id:?} appears more than once")]
    DuplicateId {
        /// The resource.
        resource: String,
        /// The repeated ID.
        id: String,
    },
    /// A device's attributes or capacities broke DRA's rules
    /// ([`crate::device_info`]).
    #[error("resource {resource:?}: device {id:?}: {why}")]
    BadDeviceInfo {
        /// The resource.
        resource: String,
        /// The device.
        id: String,
        /// The broken rule, with the name and value.
        why: String,
    },
    /// The list would not fit in one kubelet message.
    #[error(
        "resource {resource:?}: {devices} devices encode to {bytes} bytes, over the kubelet's {limit}-byte message limit"
    )]
    TooLarge {
        /// The resource.
        resource: String,
        /// Number of devices.
        devices: usize,
        /// Encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// One immutable, validated state of a resource.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The devices as the backend published them.
    pub devices: Vec<Device>,
    /// Set while the backend is faulted: every device is then reported
    /// Unhealthy, and this says why.
    pub fault: Option<String>,
    /// How the devices are shared; with replicas, the kubelet sees each
    /// device that many times.
    pub sharing: Sharing,
    /// Devices the host cannot hand out although the backend says they are
    /// Healthy (their CDI spec could not be written, say), each with why:
    /// reported Unhealthy while listed here.
    pub withheld: Arc<HashMap<String, String>>,
    /// The device list as every `ListAndWatch` stream sends it, encoded
    /// once when the state is made, straight from `devices` (no generated
    /// message is built: for 10,000 devices that was 30,000 allocations
    /// per change, and as many frees when the state was replaced).
    wire: Bytes,
    /// How many devices the kubelet sees (each replica counts).
    advertised: usize,
    /// Position of each device by ID, built at the first lookup (a state
    /// nobody looks up in costs nothing more to publish).
    index: std::sync::OnceLock<std::collections::HashMap<String, usize>>,
}

impl Snapshot {
    fn new(
        devices: Vec<Device>,
        fault: Option<String>,
        sharing: Sharing,
        withheld: Arc<HashMap<String, String>>,
    ) -> Self {
        let replicas = sharing.replicas.max(1);
        let mut snapshot = Snapshot {
            devices,
            fault,
            sharing,
            withheld,
            wire: Bytes::new(),
            advertised: 0,
            index: std::sync::OnceLock::new(),
        };
        // Roughly what a device with a short ID and one NUMA node takes.
        let mut wire = Vec::with_capacity(snapshot.devices.len() * replicas * 32);
        let mut replica_id = String::new();
        for device in &snapshot.devices {
            let health = snapshot.advertised_health(device).as_str();
            if replicas > 1 {
                for n in 0..replicas {
                    replica_id.clear();
                    let _ = write!(replica_id, "{}{REPLICA_SEPARATOR}{n}", device.id);
                    v1beta1::encode_device(&replica_id, health, &device.numa_nodes, &mut wire);
                }
            } else {
                v1beta1::encode_device(&device.id, health, &device.numa_nodes, &mut wire);
            }
        }
        snapshot.wire = Bytes::from(wire);
        snapshot.advertised = snapshot.devices.len() * replicas;
        snapshot
    }

    /// The health the kubelet sees for `device`: Unhealthy while the
    /// backend is faulted or the host withholds it, else its own.
    fn advertised_health(&self, device: &Device) -> Health {
        if self.fault.is_some() || self.withheld.contains_key(&device.id) { Health::Unhealthy } else { device.health }
    }

    /// The message to send on a `ListAndWatch` stream: the encoding made
    /// with this state, shared by every stream (a clone shares the bytes).
    pub fn message(&self) -> v1beta1::ListAndWatchResponse {
        v1beta1::ListAndWatchResponse::pre_encoded(self.wire.clone())
    }

    /// The devices as the kubelet sees them (replica IDs when shared, the
    /// advertised health, topology), decoded from what the streams send.
    pub fn advertised(&self) -> Vec<v1beta1::Device> {
        v1beta1::ListAndWatchResponse::decode(self.wire.clone())
            .map(|response| response.devices)
            .unwrap_or_else(|error| unreachable!("devhost's own encoding decodes: {error}"))
    }

    /// How many devices the kubelet sees, and how many of them Healthy.
    pub fn advertised_counts(&self) -> (usize, usize) {
        let replicas = self.sharing.replicas.max(1);
        let healthy = self.devices.iter().filter(|device| self.advertised_health(device) == Health::Healthy).count();
        (self.advertised, healthy * replicas)
    }

    /// The device with this (real) ID, if the resource has it.
    pub fn device(&self, id: &str) -> Option<&Device> {
        let index = self.index.get_or_init(|| {
            self.devices.iter().enumerate().map(|(position, device)| (device.id.clone(), position)).collect()
        });
        index.get(id).map(|&position| &self.devices[position])
    }

    /// The real device behind an ID the kubelet uses (a replica ID when the
    /// resource is shared), if there is one.
    pub fn real_device(&self, advertised: &str) -> Option<&Device> {
        if self.sharing.replicas <= 1 {
            return self.device(advertised);
        }
        let (real, replica) = advertised.rsplit_once(REPLICA_SEPARATOR)?;
        let replica: usize = replica.parse().ok()?;
        (replica < self.sharing.replicas).then(|| self.device(real)).flatten()
    }
}

/// `ListAndWatch` streams one resource serves at once. The kubelet keeps
/// one (two while it replaces a connection); each stream an unread client
/// holds buffers up to a flow-control window of device lists, so the cap
/// bounds the memory and the encoding work a misbehaving client can cost.
pub const MAX_STREAMS: usize = 8;

/// Who withholds devices from the kubelet (each keeps its own list; the
/// snapshot reports the union). A device whose CDI spec cannot be written
/// is not withheld: it is answered without a CDI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Withholder {
    /// Devices being released (scrubbed) for their next tenant, or whose
    /// release failed.
    Release,
}

/// The live state of one resource.
#[derive(Debug)]
pub struct ResourceState {
    name: String,
    sender: watch::Sender<Arc<Snapshot>>,
    /// Each withholder's devices and why, merged into every snapshot.
    withheld_by: std::sync::Mutex<std::collections::BTreeMap<Withholder, HashMap<String, String>>>,
    /// One permit per open `ListAndWatch` stream, across server generations.
    streams: Arc<tokio::sync::Semaphore>,
    /// The counter sets its devices may consume from, once the backend's
    /// `init` has declared them (ABI 1.2); what a device consumes is
    /// checked against them from then on.
    counter_sets: std::sync::OnceLock<Vec<crate::model::CounterSet>>,
}

impl ResourceState {
    /// A resource with no devices yet.
    pub fn new(name: impl Into<String>) -> Self {
        let (sender, _) = watch::channel(Arc::new(Snapshot::default()));
        ResourceState {
            name: name.into(),
            sender,
            withheld_by: std::sync::Mutex::default(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            counter_sets: std::sync::OnceLock::new(),
        }
    }

    /// Sets the counter sets the resource's devices consume from, as its
    /// backend declared them at `init`, and checks the devices it has
    /// published so far against them (a device published during `init`
    /// could not be checked before). Only the first declaration counts: a
    /// re-initialised backend keeps its resources as they were.
    pub fn declare_counter_sets(&self, counter_sets: Vec<crate::model::CounterSet>) -> Result<(), PublishError> {
        let counter_sets = self.counter_sets.get_or_init(|| counter_sets);
        for device in &self.snapshot().devices {
            self.check_consumes(device, counter_sets)?;
        }
        Ok(())
    }

    fn check_consumes(&self, device: &Device, counter_sets: &[crate::model::CounterSet]) -> Result<(), PublishError> {
        devhost_abi::partitions::check_consumes(device, counter_sets).map_err(|why| PublishError::BadDeviceInfo {
            resource: self.name.clone(),
            id: device.id.clone(),
            why,
        })
    }

    /// A place for one more `ListAndWatch` stream, held until it ends;
    /// `None` at [`MAX_STREAMS`].
    pub fn open_stream(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.sender.borrow().clone()
    }

    /// A receiver that sees the current snapshot and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    /// Replaces the device list after validating it; keeps any fault mark.
    pub fn publish(&self, devices: Vec<Device>) -> Result<(), PublishError> {
        self.validate(&devices)?;
        self.replace(move |current| {
            Snapshot::new(devices, current.fault.clone(), current.sharing, current.withheld.clone())
        })
    }

    /// Shares every device `sharing.replicas` times from now on. Refused if
    /// the advertised list would no longer fit one kubelet message.
    pub fn set_sharing(&self, sharing: Sharing) -> Result<(), PublishError> {
        self.replace(|current| {
            Snapshot::new(current.devices.clone(), current.fault.clone(), sharing, current.withheld.clone())
        })
    }

    /// Builds the next snapshot from the current one, atomically (a fault
    /// mark set meanwhile is never lost), and sends it if it fits one
    /// kubelet message even with every device reported Unhealthy.
    fn replace(&self, next: impl FnOnce(&Snapshot) -> Snapshot) -> Result<(), PublishError> {
        self.replace_if(|current| {
            let candidate = next(current);
            self.check_size(&candidate).map(|()| Some(candidate))
        })
    }

    /// Sends the snapshot `next` makes of the current one, if it makes
    /// one. The replaced snapshot is dropped after the streams are woken:
    /// freeing 10,000 devices costs as much as encoding them.
    fn replace_if(
        &self,
        next: impl FnOnce(&Snapshot) -> Result<Option<Snapshot>, PublishError>,
    ) -> Result<(), PublishError> {
        let mut result = Ok(());
        let mut retired = None;
        self.sender.send_if_modified(|current| match next(current) {
            Ok(Some(candidate)) => {
                retired = Some(std::mem::replace(current, Arc::new(candidate)));
                true
            }
            Ok(None) => false,
            Err(error) => {
                result = Err(error);
                false
            }
        });
        drop(retired);
        result
    }

    /// Marks every device Unhealthy (or lifts the mark with `None`) without
    /// forgetting their own health.
    pub fn set_fault(&self, fault: Option<String>) {
        let _ = self.replace_if(|current| {
            Ok((current.fault != fault)
                .then(|| Snapshot::new(current.devices.clone(), fault, current.sharing, current.withheld.clone())))
        });
    }

    /// Reports the devices `by` lists in `withheld` Unhealthy (each with
    /// why), replacing what `by` listed before; devices another withholder
    /// lists stay withheld.
    pub fn set_withheld(&self, by: Withholder, withheld: HashMap<String, String>) {
        // Held across the send, so two withholders never publish stale unions.
        let mut all = self.withheld_by.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.insert(by, withheld);
        let mut withheld: HashMap<String, String> = HashMap::new();
        for reasons in all.values() {
            for (id, why) in reasons {
                withheld
                    .entry(id.clone())
                    .and_modify(|all| *all = format!("{all}; {why}"))
                    .or_insert_with(|| why.clone());
            }
        }
        let _ = self.replace_if(|current| {
            Ok((*current.withheld != withheld).then(|| {
                let (devices, fault) = (current.devices.clone(), current.fault.clone());
                Snapshot::new(devices, fault, current.sharing, Arc::new(withheld))
            }))
        });
    }

    fn validate(&self, devices: &[Device]) -> Result<(), PublishError> {
        let resource = || self.name.clone();
        // A health change re-sends the current state's IDs in their order:
        // they were found non-empty and unique when that state was
        // published, so only a list with other IDs is checked again.
        let current = self.snapshot();
        let same_ids = current.devices.len() == devices.len()
            && current.devices.iter().zip(devices).all(|(current, new)| current.id == new.id);
        let mut seen = (!same_ids).then(|| HashSet::with_capacity(devices.len()));
        for (index, device) in devices.iter().enumerate() {
            if let Some(seen) = seen.as_mut() {
                if device.id.is_empty() {
                    return Err(PublishError::EmptyId { resource: resource(), index });
                }
                if !seen.insert(device.id.as_str()) {
                    return Err(PublishError::DuplicateId { resource: resource(), id: device.id.clone() });
                }
            }
            crate::device_info::check(device).map_err(|why| PublishError::BadDeviceInfo {
                resource: resource(),
                id: device.id.clone(),
                why,
            })?;
            if let Some(counter_sets) = self.counter_sets.get() {
                self.check_consumes(device, counter_sets)?;
            }
        }
        Ok(())
    }

    fn check_size(&self, snapshot: &Snapshot) -> Result<(), PublishError> {
        // Worst case: every device reported Unhealthy, 2 bytes longer than
        // Healthy, plus a byte where a length prefix grows.
        let advertised = snapshot.advertised;
        let bytes = snapshot.wire.len() + 3 * advertised;
        // Leave room for gRPC framing.
        let limit = MAX_MESSAGE_BYTES - 1024;
        if bytes > limit {
            return Err(PublishError::TooLarge { resource: self.name.clone(), devices: advertised, bytes, limit });
        }
        Ok(())
    }
}

/// A backend's handle for pushing device lists; cheap to clone and usable
/// from any thread.
#[derive(Debug, Clone, Default)]
pub struct Publisher {
    inner: Arc<Mutex<PublisherInner>>,
}

/// A fault a backend's own thread ran into, outside any host call: a device
/// list the host refused, or (for polled backends) a failed poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundFault {
    /// What the thread was doing, e.g. `publish` or `list-devices`.
    pub operation: &'static str,
    /// What went wrong.
    pub message: String,
    /// What kind of fault it is.
    pub kind: FaultKind,
}

/// Kinds of [`BackgroundFault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The backend sent data that breaks the contract.
    InvalidData,
    /// The backend crashed or trapped in-process.
    Panicked,
    /// The backend's worker process died; the message says how.
    Crashed,
}

/// Called with every background fault after `init`.
type FaultFn = Arc<dyn Fn(BackgroundFault) + Send + Sync>;

/// Called after every accepted publish with the resource and its devices
/// as they now stand (a worker process forwards them to devhost).
pub type ForwardFn = Arc<dyn Fn(&str, &[Device]) + Send + Sync>;

#[derive(Default)]
struct PublisherInner {
    resources: HashMap<String, Arc<ResourceState>>,
    /// Once sealed (after `init`), only declared resources may be published.
    sealed: bool,
    on_fault: Option<FaultFn>,
    forward: Option<ForwardFn>,
}

impl std::fmt::Debug for PublisherInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherInner")
            .field("resources", &self.resources.keys())
            .field("sealed", &self.sealed)
            .finish()
    }
}

impl Publisher {
    /// A sealed publisher over existing resources, for a backend that is
    /// re-initialised: its resources keep their states and their streams.
    pub fn for_states(states: &[Arc<ResourceState>]) -> Self {
        let resources = states.iter().map(|state| (state.name.clone(), state.clone())).collect();
        Publisher {
            inner: Arc::new(Mutex::new(PublisherInner { resources, sealed: true, on_fault: None, forward: None })),
        }
    }

    /// Sets what happens on a background fault after `init` (the host marks
    /// the backend's devices Unhealthy and re-initialises it).
    pub fn on_fault(&self, hook: FaultFn) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).on_fault = Some(hook);
    }

    /// Sets what happens after each accepted publish.
    pub fn forward(&self, hook: ForwardFn) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).forward = Some(hook);
    }

    /// Reports a fault found on a backend's own thread (after `init`; during
    /// `init` the error is `init`'s to return).
    pub fn report_fault(&self, fault: BackgroundFault) {
        let hook = {
            let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.on_fault.clone().filter(|_| inner.sealed)
        };
        if let Some(hook) = hook {
            hook(fault);
        }
    }

    /// Replaces the device list of `resource`. A refused list after `init`
    /// is also reported as a fault of the backend.
    pub fn publish(&self, resource: &str, devices: Vec<Device>) -> Result<(), PublishError> {
        let state = self.state(resource);
        let result = state.as_ref().map_err(Clone::clone).and_then(|state| state.publish(devices));
        match (&result, state) {
            (Ok(()), Ok(state)) => {
                let forward = self.inner.lock().unwrap_or_else(PoisonError::into_inner).forward.clone();
                if let Some(forward) = forward {
                    forward(resource, &state.snapshot().devices);
                }
            }
            (Err(error), _) => self.report_fault(BackgroundFault {
                operation: "publish",
                message: error.to_string(),
                kind: FaultKind::InvalidData,
            }),
            (Ok(()), Err(_)) => {}
        }
        result
    }

    /// The state of `resource`. During `init` a backend may publish a
    /// resource it is about to declare: its state is created on first use.
    fn state(&self, resource: &str) -> Result<Arc<ResourceState>, PublishError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = inner.resources.get(resource) {
            return Ok(state.clone());
        }
        if inner.sealed {
            let mut declared: Vec<&str> = inner.resources.keys().map(String::as_str).collect();
            declared.sort_unstable();
            return Err(PublishError::UnknownResource { resource: resource.to_owned(), declared: declared.join(", ") });
        }
        let state = Arc::new(ResourceState::new(resource));
        inner.resources.insert(resource.to_owned(), state.clone());
        Ok(state)
    }

    /// Ends the `init` phase: from now on only `declared` resources may be
    /// published. Returns their states in order; states created by
    /// publishing during init are kept, so nothing published is lost.
    pub fn seal(&self, declared: &[String]) -> Vec<Arc<ResourceState>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.resources.retain(|name, _| declared.contains(name));
        let states = declared
            .iter()
            .map(|name| {
                inner.resources.entry(name.clone()).or_insert_with(|| Arc::new(ResourceState::new(name))).clone()
            })
            .collect();
        inner.sealed = true;
        states
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, health: Health, numa: &[i64]) -> Device {
        Device::new(id.to_owned(), health).with_numa_nodes(numa.to_vec())
    }

    #[test]
    fn snapshot_carries_exact_health_strings_and_topology() {
        let state = ResourceState::new("example.com/gpu");
        state
            .publish(vec![device("a", Health::Healthy, &[0]), device("b", Health::Unhealthy, &[])])
            .expect("valid list");
        let response = state.snapshot().advertised();
        assert_eq!(response[0].health, "Healthy");
        assert_eq!(response[1].health, "Unhealthy");
        assert_eq!(response[0].topology.as_ref().map(|t| t.nodes[0].id), Some(0));
        assert_eq!(response[1].topology, None, "no NUMA affinity means no topology");
    }

    #[test]
    fn fault_marks_all_unhealthy_and_lifting_it_restores_health() {
        let state = ResourceState::new("example.com/gpu");
        state.publish(vec![device("a", Health::Healthy, &[])]).expect("valid list");
        state.set_fault(Some("backend hung".into()));
        assert_eq!(state.snapshot().advertised()[0].health, "Unhealthy");
        state.publish(vec![device("a", Health::Healthy, &[]), device("b", Health::Healthy, &[])]).expect("valid");
        assert!(state.snapshot().advertised().iter().all(|d| d.health == "Unhealthy"), "fault survives publish");
        state.set_fault(None);
        assert!(state.snapshot().advertised().iter().all(|d| d.health == "Healthy"));
    }

    #[test]
    fn invalid_lists_are_refused_and_the_previous_list_stays() {
        let state = ResourceState::new("r.io/x");
        state.publish(vec![device("a", Health::Healthy, &[])]).expect("valid list");
        let dup = state.publish(vec![device("a", Health::Healthy, &[]), device("a", Health::Unhealthy, &[])]);
        assert_eq!(dup, Err(PublishError::DuplicateId { resource: "r.io/x".into(), id: "a".into() }));
        let empty = state.publish(vec![device("", Health::Healthy, &[])]);
        assert_eq!(empty, Err(PublishError::EmptyId { resource: "r.io/x".into(), index: 0 }));
        assert_eq!(state.snapshot().devices, vec![device("a", Health::Healthy, &[])]);
        // As long as the current list, differing in one ID only: checked.
        state.publish(vec![device("a", Health::Healthy, &[]), device("b", Health::Healthy, &[])]).expect("valid list");
        let dup = state.publish(vec![device("a", Health::Healthy, &[]), device("a", Health::Healthy, &[])]);
        assert_eq!(dup, Err(PublishError::DuplicateId { resource: "r.io/x".into(), id: "a".into() }));
        let empty = state.publish(vec![device("a", Health::Healthy, &[]), device("", Health::Healthy, &[])]);
        assert_eq!(empty, Err(PublishError::EmptyId { resource: "r.io/x".into(), index: 1 }));
        // The same IDs again (a health change): accepted, attributes still checked.
        state.publish(vec![device("a", Health::Unhealthy, &[]), device("b", Health::Healthy, &[])]).expect("valid");
        let mut bad = device("b", Health::Healthy, &[]);
        bad.attributes.insert("not a name".into(), crate::model::AttributeValue::Bool(true));
        let refused = state.publish(vec![device("a", Health::Unhealthy, &[]), bad]);
        assert!(matches!(refused, Err(PublishError::BadDeviceInfo { .. })), "{refused:?}");
        assert_eq!(state.snapshot().devices[0].health, Health::Unhealthy);
    }

    #[test]
    fn lists_over_the_message_limit_are_refused() {
        let state = ResourceState::new("r.io/x");
        let long = "x".repeat(200);
        let devices: Vec<Device> =
            (0..25_000).map(|i| device(&format!("{long}-{i}"), Health::Healthy, &[0, 1])).collect();
        match state.publish(devices) {
            Err(PublishError::TooLarge { devices: 25_000, bytes, limit, .. }) => assert!(bytes > limit),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // 10,000 devices with realistic IDs fit.
        let devices: Vec<Device> = (0..10_000).map(|i| device(&format!("GPU-{i:08}"), Health::Healthy, &[0])).collect();
        assert_eq!(state.publish(devices), Ok(()));
    }

    #[test]
    fn replicas_advertise_each_device_n_times_with_its_health() {
        let state = ResourceState::new("r.io/x");
        state.publish(vec![device("a", Health::Healthy, &[0]), device("b", Health::Unhealthy, &[])]).expect("valid");
        state.set_sharing(Sharing { replicas: 3, policy: crate::model::ReplicaPolicy::Pack }).expect("fits");
        let snapshot = state.snapshot();
        let advertised = snapshot.advertised();
        let ids: Vec<(&str, &str)> = advertised.iter().map(|d| (d.id.as_str(), d.health.as_str())).collect();
        assert_eq!(
            ids,
            [
                ("a::0", "Healthy"),
                ("a::1", "Healthy"),
                ("a::2", "Healthy"),
                ("b::0", "Unhealthy"),
                ("b::1", "Unhealthy"),
                ("b::2", "Unhealthy")
            ]
        );
        assert_eq!(snapshot.advertised()[2].topology.as_ref().map(|t| t.nodes[0].id), Some(0));
        assert_eq!(snapshot.real_device("a::2").map(|d| d.id.as_str()), Some("a"));
        assert!(snapshot.real_device("a::3").is_none(), "replica out of range");
        assert!(snapshot.real_device("a").is_none(), "real IDs are not advertised when shared");
        // Health of the real device applies to every replica.
        state.publish(vec![device("a", Health::Unhealthy, &[0]), device("b", Health::Unhealthy, &[])]).expect("valid");
        assert!(state.snapshot().advertised().iter().all(|d| d.health == "Unhealthy"));
    }

    #[test]
    fn publisher_accepts_any_resource_during_init_then_only_declared_ones() {
        let publisher = Publisher::default();
        publisher.publish("a.io/early", vec![device("1", Health::Healthy, &[])]).expect("during init");
        let states = publisher.seal(&["a.io/early".to_owned(), "a.io/late".to_owned()]);
        assert_eq!(states[0].snapshot().devices.len(), 1, "published during init is kept");
        assert!(states[1].snapshot().devices.is_empty());
        let err = publisher.publish("a.io/other", vec![]).expect_err("undeclared after seal");
        assert_eq!(
            err.to_string(),
            "resource \"a.io/other\" is not served by this backend (it declared: a.io/early, a.io/late)"
        );
    }

    #[test]
    fn what_devices_consume_is_checked_against_the_declared_counter_sets() {
        use crate::model::CounterSet;
        let state = ResourceState::new("a.io/gpu");
        let half = |set: &str| Device::healthy("half").consuming(set, [("memory", "20Gi")]);
        // During init, before the declaration, a consumption cannot be
        // checked: the declaration checks what was published.
        state.publish(vec![half("gpu-9")]).expect("not yet checkable");
        let sets = vec![CounterSet::new("gpu-0", [("memory", "40Gi")])];
        let error = state.declare_counter_sets(sets).expect_err("gpu-9 is not declared");
        assert!(error.to_string().contains("device \"half\" consumes from unknown counter set \"gpu-9\""), "{error}");
        // From then on every publish is checked, and a refused list changes nothing.
        state.publish(vec![half("gpu-0")]).expect("a declared set");
        let error = state.publish(vec![half("gpu-1")]).expect_err("refused");
        assert!(matches!(error, PublishError::BadDeviceInfo { .. }), "{error}");
        assert_eq!(state.snapshot().devices[0].consumes[0].counter_set, "gpu-0");
    }
}
