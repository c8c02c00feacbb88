//! The adapter for major version 1 of the world (`devhost:backend@1.x`):
//! [`WasmBackend`], the host's [`Backend`] over one component instance at a
//! time, for every minor this devhost runs (1.0.0, frozen in
//! `abi/wit/devhost-backend-1.0.0/`, 1.1.0, in
//! `abi/wit/devhost-backend-1.1.0/`, and 1.2.0, in
//! `abi/wit/devhost-backend-1.2.0/`). The bindings of each minor, and the
//! conversion of each minor's answers into one internal form, live in
//! `minors`; nothing below it knows which minor a component implements,
//! except that a 1.0.0 one has no `release` and only a 1.2.0 one has
//! `allocate-shared`.
//!
//! Each `init` instantiates the component afresh in a new `Store` (so a
//! re-initialisation after a fault starts from clean memory) and starts a
//! poller thread that asks for the device lists every
//! `[sandbox] poll_interval_ms` and publishes those that changed; `shutdown`
//! stops the poller and drops the instance. Calls on one instance are
//! serialised by a mutex around its `Store`; every call has an epoch
//! deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use super::{
    SandboxConfig, StoreState, WasmError, WasmModule, WorldVersion, deadline_ticks, describe_fault, describe_trap,
};
use crate::backend::{Allocation, Backend, BackendError, Device, PreferredRequest, Publisher, ResourceSpec};
use crate::device_state::BackgroundFault;
use crate::model::Share;

mod minors;

pub use minors::NEWEST;
use minors::{Answer, DeviceList, Exports, Pre, Question};

/// One live instance: its store and its exports.
struct Live {
    store: Store<StoreState>,
    exports: Exports,
    /// Set after a trap: the instance must not be entered again.
    broken: Option<String>,
}

/// The slot an instance lives in, shared with its poller.
type Slot = Arc<Mutex<Option<Live>>>;

struct Poller {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// A WASM backend of world version 1.x (any minor up to [`NEWEST`]).
pub struct WasmBackend {
    name: Arc<str>,
    pre: Pre,
    config_json: String,
    sandbox: SandboxConfig,
    timeout: Duration,
    slot: Slot,
    poller: Mutex<Option<Poller>>,
}

impl std::fmt::Debug for WasmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmBackend").field("name", &self.name).finish()
    }
}

/// The outcome of one guarded call: the component's answer, or a fault
/// (trap, deadline, memory cap) described in words.
type Guarded<T> = Result<T, String>;

impl WasmBackend {
    /// Links `component` against the host's imports of the minor it
    /// exports (`version`: WASI 0.2 and `devhost:backend/host`) and checks
    /// its exports match that minor's world, without instantiating it.
    pub(super) fn new(
        engine: &Engine,
        component: &Component,
        module: WasmModule,
        version: WorldVersion,
    ) -> Result<Self, WasmError> {
        let pre = Pre::new(engine, component, version)
            .map_err(|message| WasmError::Invalid { path: module.path.clone(), message })?;
        Ok(WasmBackend {
            name: Arc::from(module.name.as_str()),
            pre,
            config_json: module.config_json,
            sandbox: module.sandbox,
            timeout: module.call_timeout,
            slot: Arc::default(),
            poller: Mutex::new(None),
        })
    }

    fn instantiate(&self) -> Result<Live, String> {
        let state = StoreState::new(&self.name, &self.sandbox)?;
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.timeout));
        let _running = super::Running::start();
        let stderr = store.data().stderr.clone();
        let exports = self
            .pre
            .instantiate(&mut store)
            .map_err(|error| describe_fault(&error, "instantiation", self.timeout, &stderr))?;
        Ok(Live { store, exports, broken: None })
    }

    /// Runs `f` on the live instance with the epoch deadline. A trap marks
    /// the instance broken and comes back as `Err(description)`.
    fn guarded<T>(
        slot: &Slot,
        timeout: Duration,
        operation: &str,
        f: impl FnOnce(&Exports, &mut Store<StoreState>) -> wasmtime::Result<T>,
    ) -> Guarded<T> {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(live) = slot.as_mut() else { return Err(format!("{operation}: the backend is not initialised")) };
        if let Some(reason) = &live.broken {
            return Err(format!("{operation}: the instance is broken since an earlier fault ({reason})"));
        }
        live.store.set_epoch_deadline(deadline_ticks(timeout));
        let stderr = live.store.data().stderr.clone();
        stderr.clear();
        let running = super::Running::start();
        let result = f(&live.exports, &mut live.store);
        drop(running);
        result.map_err(|error| {
            let description = describe_fault(&error, operation, timeout, &stderr);
            live.broken = Some(description.clone());
            description
        })
    }

    /// [`Self::guarded`] for host calls: a fault unwinds (without the
    /// panic hook) so that the handle reports it as a panic-like fault.
    fn call<T>(&self, operation: &str, f: impl FnOnce(&Exports, &mut Store<StoreState>) -> wasmtime::Result<T>) -> T {
        match Self::guarded(&self.slot, self.timeout, operation, f) {
            Ok(value) => value,
            Err(fault) => std::panic::resume_unwind(Box::new(fault)),
        }
    }

    fn stop_poller(&self) {
        let poller = self.poller.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(poller) = poller {
            drop(poller.stop);
            if poller.thread.join().is_err() {
                tracing::warn!(backend = %self.name, "the device-list poller panicked");
            }
        }
    }
}

impl Backend for WasmBackend {
    fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        self.stop_poller();
        let live = self.instantiate().map_err(BackendError::fault)?;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(live);
        let config = self.config_json.clone();
        let specs = self
            .call("init", |exports, store| exports.init(store, &config))
            .map_err(BackendError::new)?
            .map_err(|why| BackendError::fault(format!("init returned resources the model cannot hold: {why}")))?;
        let lists = self.call("list-devices", |exports, store| exports.list_devices(store));
        let mut last = HashMap::new();
        for (resource, devices) in convert_lists(lists, &specs).map_err(BackendError::fault)? {
            publisher.publish(&resource, devices.clone()).map_err(|e| BackendError::fault(e.to_string()))?;
            last.insert(resource, devices);
        }
        let (stop, stopped) = mpsc::channel();
        let poller = Polling {
            slot: self.slot.clone(),
            name: self.name.clone(),
            timeout: self.timeout,
            interval: self.sandbox.poll_interval,
            publisher,
            last,
        };
        let thread = std::thread::Builder::new()
            .name(format!("devhost-wasm-poll-{}", self.name))
            .spawn(move || poller.run(&stopped))
            .map_err(|error| BackendError::fault(format!("cannot start the device-list poller: {error}")))?;
        *self.poller.lock().unwrap_or_else(PoisonError::into_inner) = Some(Poller { stop, thread });
        Ok(specs)
    }

    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, BackendError> {
        let answer = self.call("allocate", |exports, store| exports.allocate(store, resource, device_ids));
        convert_allocation(answer.map_err(BackendError::new)?).map_err(BackendError::fault)
    }

    fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, Share)],
    ) -> Result<Allocation, BackendError> {
        // Without shares (every device-plugin Allocate, a DRA claim of no
        // shared device) it is a plain `allocate`, as the world says; a
        // component of a minor before 1.2.0 gets a plain `allocate` in any
        // case (it cannot have published a shared device).
        if shares.is_empty() || !self.pre.has_allocate_shared() {
            return self.allocate(resource, device_ids);
        }
        let answer =
            self.call("allocate-shared", |exports, store| exports.allocate_shared(store, resource, device_ids, shares));
        convert_allocation(answer.map_err(BackendError::new)?).map_err(BackendError::fault)
    }

    fn preferred_allocation(
        &self,
        resource: &str,
        request: &PreferredRequest,
    ) -> Result<Option<Vec<String>>, BackendError> {
        let question = Question {
            available: request.available.clone(),
            must_include: request.must_include.clone(),
            size: u32::try_from(request.size).map_err(|_| BackendError::new("size does not fit in 32 bits"))?,
        };
        self.call("preferred-allocation", |exports, store| exports.preferred_allocation(store, resource, &question))
            .map_err(BackendError::new)
    }

    fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        self.call("pre-start", |exports, store| exports.pre_start(store, resource, device_ids))
            .map_err(BackendError::new)
    }

    fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        // A 1.0.0 component has no `release` (and none of its resources
        // asks for it): nothing to scrub, as for a native 1.0 module, and
        // the instance is not entered at all.
        if !self.pre.has_release() {
            return Ok(());
        }
        self.call("release", |exports, store| exports.release(store, resource, device_ids)).map_err(BackendError::new)
    }

    fn shutdown(&self) {
        self.stop_poller();
        let live = self.slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(mut live) = live
            && live.broken.is_none()
        {
            live.store.set_epoch_deadline(deadline_ticks(self.timeout));
            let _running = super::Running::start();
            if let Err(error) = live.exports.shutdown(&mut live.store) {
                tracing::warn!(backend = %self.name, "{}", describe_trap(&error, "shutdown", self.timeout));
            }
        }
    }
}

/// The poller of one instance: asks for the device lists every `interval`
/// and publishes those that changed. The publisher validates them; a list
/// it refuses is a fault of the backend (the handle re-initialises it).
struct Polling {
    slot: Slot,
    name: Arc<str>,
    timeout: Duration,
    interval: Duration,
    publisher: Publisher,
    last: HashMap<String, Vec<Device>>,
}

impl Polling {
    fn run(mut self, stopped: &mpsc::Receiver<()>) {
        // Wakes on every interval until `shutdown` drops the sender.
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(self.interval) {
            match WasmBackend::guarded(&self.slot, self.timeout, "list-devices", |exports, store| {
                exports.list_devices(store)
            }) {
                Ok(lists) => self.publish_changes(lists),
                Err(fault) => {
                    // The instance is broken: its devices are no longer
                    // known to work. The next call into it is refused as a
                    // fault, which re-initialises it.
                    // The host marks its devices Unhealthy and re-initialises
                    // it (a fresh instance) with back-off.
                    self.publisher.report_fault(BackgroundFault {
                        operation: "list-devices",
                        message: fault,
                        kind: crate::device_state::FaultKind::Panicked,
                    });
                    return;
                }
            }
        }
    }

    fn publish_changes(&mut self, lists: Vec<DeviceList>) {
        for list in lists {
            let devices = match list.devices {
                Ok(devices) => devices,
                Err(error) => {
                    tracing::warn!(backend = %self.name, %error, "refused a device list from list-devices");
                    continue;
                }
            };
            if self.last.get(&list.resource) == Some(&devices) {
                continue;
            }
            match self.publisher.publish(&list.resource, devices.clone()) {
                Ok(()) => {
                    self.last.insert(list.resource, devices);
                }
                Err(error) => {
                    tracing::warn!(backend = %self.name, %error, "refused a device list from list-devices");
                }
            }
        }
    }
}

/// The lists `init` published, checked against the resources it declared.
fn convert_lists(lists: Vec<DeviceList>, specs: &[ResourceSpec]) -> Result<Vec<(String, Vec<Device>)>, String> {
    lists
        .into_iter()
        .map(|list| {
            if !specs.iter().any(|spec| spec.name == list.resource) {
                return Err(format!(
                    "list-devices returned a list for {:?}, which init did not declare",
                    list.resource
                ));
            }
            Ok((list.resource, list.devices?))
        })
        .collect()
}

/// The component's answer in the host's model, refused by the rules the C
/// ABI enforces on a native module's answer (unique and non-empty env
/// names and annotation keys, device-spec permissions of `r`, `w`, `m`,
/// non-empty CDI names), so both kinds of backend meet one contract. A
/// device status (1.2.0) listed twice for one device is refused too: the
/// model holds one per device. Whether each status is for a device of the
/// call and within the API server's limits is checked where a DRA prepare
/// reads it, for every kind of backend alike.
fn convert_allocation(answer: Answer) -> Result<Allocation, String> {
    fn unique(pairs: Vec<(String, String)>, what: &str) -> Result<BTreeMap<String, String>, String> {
        let mut map = BTreeMap::new();
        for (key, value) in pairs {
            if map.insert(key.clone(), value).is_some() {
                return Err(format!("allocate returned the {what} {key:?} twice"));
            }
        }
        if map.contains_key("") {
            return Err(format!("allocate returned an {what} with an empty name"));
        }
        Ok(map)
    }
    if let Some(spec) = answer
        .device_specs
        .iter()
        .find(|d| d.permissions.is_empty() || !d.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')))
    {
        return Err(format!(
            "device spec {:?} has permissions {:?} (expected a combination of r, w, m)",
            spec.container_path, spec.permissions
        ));
    }
    if answer.cdi_devices.iter().any(String::is_empty) {
        return Err("allocate returned an empty CDI device name".to_owned());
    }
    let mut device_status = BTreeMap::new();
    for (id, status) in answer.device_status {
        if device_status.contains_key(&id) {
            return Err(format!("allocate returned a device-status for device {id:?} twice"));
        }
        device_status.insert(id, status);
    }
    Ok(Allocation {
        envs: unique(answer.envs, "environment variable")?,
        mounts: answer.mounts,
        device_specs: answer.device_specs,
        annotations: unique(answer.annotations, "annotation")?,
        cdi_devices: answer.cdi_devices,
        device_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeviceStatus;

    fn answer(device_status: Vec<(String, DeviceStatus)>) -> Answer {
        Answer {
            envs: Vec::new(),
            mounts: Vec::new(),
            device_specs: Vec::new(),
            annotations: Vec::new(),
            cdi_devices: Vec::new(),
            device_status,
        }
    }

    #[test]
    fn a_device_status_reaches_the_allocation_and_one_twice_is_refused_naming_the_device() {
        let status = DeviceStatus { interface_name: Some("net1".into()), ..DeviceStatus::default() };
        let allocation = convert_allocation(answer(vec![("nic-0".into(), status.clone())])).expect("converts");
        assert_eq!(allocation.device_status, BTreeMap::from([("nic-0".to_owned(), status.clone())]));
        let twice = answer(vec![("nic-0".into(), status.clone()), ("nic-0".into(), DeviceStatus::default())]);
        assert_eq!(
            convert_allocation(twice),
            Err("allocate returned a device-status for device \"nic-0\" twice".to_owned())
        );
    }
}
