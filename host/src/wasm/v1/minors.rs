//! The minor versions of world 1 this devhost runs, behind one interface.
//!
//! wasmtime's `bindgen!` makes one set of Rust types per WIT package
//! version, so `devhost:backend@1.0.0`, `@1.1.0` and `@1.2.0` have distinct
//! types even where a later minor took an earlier one's over unchanged.
//! This module binds every world, links and instantiates whichever one a
//! component exports ([`Pre`], [`Exports`]), and converts each minor's
//! answers into one internal form (the host's model, plus [`DeviceList`]
//! and [`Answer`]), so the adapter in [`super`] never sees a minor. What an
//! older minor lacks reads as absent: 1.0.0 has no attributes, no
//! capacities, `release_required` false and no `release` export
//! ([`Pre::has_release`]); 1.0.0 and 1.1.0 have no counter sets, devices
//! that consume nothing and are never shared, no device status, and no
//! `allocate-shared` export (a claim's shares reach their plain `allocate`,
//! [`Pre::has_allocate_shared`]).
//!
//! The types every minor shares field for field are converted by one
//! macro, `shared!`, written once and expanded per minor, so they cannot
//! drift apart; what 1.1.0 added, and 1.2.0 kept, by `since_1_1!`; only
//! what 1.2.0 added is written for it alone. Calls are written once too
//! (`on_api!`), for whichever minor an instance is.

use std::collections::BTreeMap;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use crate::backend::{AttributeValue, Device, DeviceSpec, Health, Mount, ResourceSpec};
use crate::model::{CounterConsumption, CounterSet, DeviceStatus, RequestPolicy, Share, SharedDevice, ValidRequests};
use crate::wasm::{StoreState, WorldVersion};

/// World `devhost:backend@1.0.0`, frozen in `abi/wit/devhost-backend-1.0.0/`.
mod v1_0 {
    wasmtime::component::bindgen!({
        path: "abi/wit/devhost-backend-1.0.0",
        world: "devhost:backend/backend@1.0.0",
    });
}

/// World `devhost:backend@1.1.0`, frozen in `abi/wit/devhost-backend-1.1.0/`.
mod v1_1 {
    wasmtime::component::bindgen!({
        path: "abi/wit/devhost-backend-1.1.0",
        world: "devhost:backend/backend@1.1.0",
    });
}

/// World `devhost:backend@1.2.0`, in `abi/wit/devhost-backend-1.2.0/`.
mod v1_2 {
    wasmtime::component::bindgen!({
        path: "abi/wit/devhost-backend-1.2.0",
        world: "devhost:backend/backend@1.2.0",
    });
}

/// The newest minor of world 1 this devhost runs; a component of a newer
/// one is refused before linking (see [`crate::wasm::load`]).
pub const NEWEST: WorldVersion = WorldVersion { major: 1, minor: 2, patch: 0 };

/// One resource's device list from `list-devices`, in the host's model.
/// `devices` is `Err` when the list cannot be held by the model at all (an
/// attribute or capacity named twice on one device); the message names the
/// resource, the device and the name.
pub struct DeviceList {
    /// The resource the list is for.
    pub resource: String,
    /// Its devices, or why they cannot be read.
    pub devices: Result<Vec<Device>, String>,
}

/// An `allocate` answer in the host's types, before the checks the
/// adapter applies to every minor's answer alike (unique env names and
/// annotation keys, device-spec permissions, CDI names).
pub struct Answer {
    /// Environment variables, as the component listed them.
    pub envs: Vec<(String, String)>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Device nodes.
    pub device_specs: Vec<DeviceSpec>,
    /// Container annotations, as the component listed them.
    pub annotations: Vec<(String, String)>,
    /// CDI device names.
    pub cdi_devices: Vec<String>,
    /// What the DRA claim's status says of each device (1.2.0), as the
    /// component listed it; empty from older minors.
    pub device_status: Vec<(String, DeviceStatus)>,
}

/// What `init` declared, in the host's model, or why the model cannot hold
/// it (a counter named twice in one counter set): a fault, not a decline.
pub type Declared = Result<Vec<ResourceSpec>, String>;

/// A `GetPreferredAllocation` question with its size already checked to
/// fit the world's `u32`.
pub struct Question {
    /// Devices the answer may choose from.
    pub available: Vec<String>,
    /// Devices the answer must contain.
    pub must_include: Vec<String>,
    /// How many devices the answer must contain.
    pub size: u32,
}

/// Writes, for one minor's bindings, everything that minor shares with the
/// others field for field: the `host` import (`log`), and the conversions of
/// health, allocations and the preferred-allocation question.
macro_rules! shared {
    ($minor:ident) => {
        impl $minor::devhost::backend::types::Host for StoreState {}

        impl $minor::devhost::backend::host::Host for StoreState {
            fn log(&mut self, level: $minor::devhost::backend::host::LogLevel, message: String) {
                use $minor::devhost::backend::host::LogLevel;
                let backend = &*self.backend;
                match level {
                    LogLevel::Error => tracing::error!(backend, "{message}"),
                    LogLevel::Warn => tracing::warn!(backend, "{message}"),
                    LogLevel::Info => tracing::info!(backend, "{message}"),
                    LogLevel::Debug => tracing::debug!(backend, "{message}"),
                }
            }
        }

        impl From<$minor::devhost::backend::types::Health> for Health {
            fn from(health: $minor::devhost::backend::types::Health) -> Self {
                match health {
                    $minor::devhost::backend::types::Health::Healthy => Health::Healthy,
                    $minor::devhost::backend::types::Health::Unhealthy => Health::Unhealthy,
                }
            }
        }

        impl From<$minor::devhost::backend::types::Allocation> for Answer {
            fn from(mut answer: $minor::devhost::backend::types::Allocation) -> Self {
                let device_status = TakeDeviceStatus::take_device_status(&mut answer);
                Answer {
                    envs: answer.envs,
                    mounts: answer
                        .mounts
                        .into_iter()
                        .map(|m| Mount {
                            container_path: m.container_path,
                            host_path: m.host_path,
                            read_only: m.read_only,
                        })
                        .collect(),
                    device_specs: answer
                        .device_specs
                        .into_iter()
                        .map(|d| DeviceSpec {
                            container_path: d.container_path,
                            host_path: d.host_path,
                            permissions: d.permissions,
                        })
                        .collect(),
                    annotations: answer.annotations,
                    cdi_devices: answer.cdi_devices,
                    device_status,
                }
            }
        }

        impl From<&Question> for $minor::devhost::backend::types::PreferredRequest {
            fn from(question: &Question) -> Self {
                $minor::devhost::backend::types::PreferredRequest {
                    available: question.available.clone(),
                    must_include: question.must_include.clone(),
                    size: question.size,
                }
            }
        }
    };
}

shared!(v1_0);
shared!(v1_1);
shared!(v1_2);

/// The device status an allocation of a minor reports, taken out of it
/// (empty before 1.2.0), for the conversion `shared!` writes.
trait TakeDeviceStatus {
    fn take_device_status(&mut self) -> Vec<(String, DeviceStatus)>;
}

impl TakeDeviceStatus for v1_0::devhost::backend::types::Allocation {
    fn take_device_status(&mut self) -> Vec<(String, DeviceStatus)> {
        Vec::new()
    }
}

impl TakeDeviceStatus for v1_1::devhost::backend::types::Allocation {
    fn take_device_status(&mut self) -> Vec<(String, DeviceStatus)> {
        Vec::new()
    }
}

impl TakeDeviceStatus for v1_2::devhost::backend::types::Allocation {
    fn take_device_status(&mut self) -> Vec<(String, DeviceStatus)> {
        std::mem::take(&mut self.device_status)
            .into_iter()
            .map(|(id, status)| {
                let status = DeviceStatus {
                    interface_name: status.interface_name,
                    hardware_address: status.hardware_address,
                    ips: status.ips,
                    data: status.data,
                };
                (id, status)
            })
            .collect()
    }
}

/// Writes, for a minor from 1.1.0 on, the conversion of what 1.1.0 added
/// and later minors kept field for field: typed attribute values.
macro_rules! since_1_1 {
    ($minor:ident) => {
        impl From<$minor::devhost::backend::types::AttributeValue> for AttributeValue {
            fn from(value: $minor::devhost::backend::types::AttributeValue) -> Self {
                use $minor::devhost::backend::types::AttributeValue as Wit;
                match value {
                    Wit::Int(value) => AttributeValue::Int(value),
                    Wit::Boolean(value) => AttributeValue::Bool(value),
                    Wit::Text(value) => AttributeValue::String(value),
                    Wit::Version(value) => AttributeValue::Version(value),
                }
            }
        }
    };
}

since_1_1!(v1_1);
since_1_1!(v1_2);

// What differs between the minors: 1.0.0's devices and resources have
// nothing of what 1.1.0 added, 1.1.0's nothing of what 1.2.0 added.

impl From<v1_0::devhost::backend::types::Resource> for ResourceSpec {
    fn from(resource: v1_0::devhost::backend::types::Resource) -> Self {
        ResourceSpec {
            name: resource.name,
            pre_start_required: resource.pre_start_required,
            preferred_allocation: resource.preferred_allocation,
            release_required: false,
            counter_sets: Vec::new(),
        }
    }
}

impl From<v1_1::devhost::backend::types::Resource> for ResourceSpec {
    fn from(resource: v1_1::devhost::backend::types::Resource) -> Self {
        ResourceSpec {
            name: resource.name,
            pre_start_required: resource.pre_start_required,
            preferred_allocation: resource.preferred_allocation,
            release_required: resource.release_required,
            counter_sets: Vec::new(),
        }
    }
}

/// A 1.2.0 resource in the host's model, or why the model cannot hold it:
/// a counter set whose counter is named twice (the model keeps counters in
/// a map, and would silently keep one).
impl TryFrom<v1_2::devhost::backend::types::Resource> for ResourceSpec {
    type Error = String;

    fn try_from(resource: v1_2::devhost::backend::types::Resource) -> Result<Self, String> {
        let counter_sets = resource
            .counter_sets
            .into_iter()
            .map(|set| {
                let counters = counters(set.counters)
                    .map_err(|why| format!("resource {:?}: counter set {:?}: {why}", resource.name, set.name))?;
                Ok(CounterSet { name: set.name, counters })
            })
            .collect::<Result<_, String>>()?;
        Ok(ResourceSpec {
            name: resource.name,
            pre_start_required: resource.pre_start_required,
            preferred_allocation: resource.preferred_allocation,
            release_required: resource.release_required,
            counter_sets,
        })
    }
}

/// Counters into the model's map; a name twice is refused, naming it.
fn counters(list: Vec<v1_2::devhost::backend::types::Counter>) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for counter in list {
        if map.contains_key(&counter.name) {
            return Err(format!("counter {:?} appears twice", counter.name));
        }
        map.insert(counter.name, counter.quantity);
    }
    Ok(map)
}

/// A resource of any minor in the host's model, or why the model cannot
/// hold it.
trait IntoSpec {
    fn into_spec(self) -> Result<ResourceSpec, String>;
}

impl IntoSpec for v1_0::devhost::backend::types::Resource {
    fn into_spec(self) -> Result<ResourceSpec, String> {
        Ok(self.into())
    }
}

impl IntoSpec for v1_1::devhost::backend::types::Resource {
    fn into_spec(self) -> Result<ResourceSpec, String> {
        Ok(self.into())
    }
}

impl IntoSpec for v1_2::devhost::backend::types::Resource {
    fn into_spec(self) -> Result<ResourceSpec, String> {
        self.try_into()
    }
}

/// A device of either minor in the host's model, or why the model cannot
/// hold it.
trait IntoDevice {
    fn into_device(self) -> Result<Device, String>;
}

impl IntoDevice for v1_0::devhost::backend::types::Device {
    fn into_device(self) -> Result<Device, String> {
        Ok(Device::new(self.id, self.health.into()).with_numa_nodes(self.numa_nodes))
    }
}

impl IntoDevice for v1_1::devhost::backend::types::Device {
    fn into_device(self) -> Result<Device, String> {
        described(
            Device::new(self.id, self.health.into()).with_numa_nodes(self.numa_nodes),
            self.attributes.into_iter().map(|a| (a.name, a.value.into())),
            self.capacities.into_iter().map(|c| (c.name, c.quantity)),
        )
    }
}

impl IntoDevice for v1_2::devhost::backend::types::Device {
    fn into_device(self) -> Result<Device, String> {
        let mut device = described(
            Device::new(self.id, self.health.into()).with_numa_nodes(self.numa_nodes),
            self.attributes.into_iter().map(|a| (a.name, a.value.into())),
            self.capacities.into_iter().map(|c| (c.name, c.quantity)),
        )?;
        let id = device.id.clone();
        device.consumes = self
            .consumes
            .into_iter()
            .map(|consumption| {
                let counters = counters(consumption.counters).map_err(|why| {
                    format!("device {id:?}: consumes from counter set {:?}: {why}", consumption.counter_set)
                })?;
                Ok(CounterConsumption { counter_set: consumption.counter_set, counters })
            })
            .collect::<Result<_, String>>()?;
        if let Some(shared) = self.shared {
            let policies = shared.request_policies.into_iter().map(|policy| {
                let valid = policy.valid.map(|valid| match valid {
                    v1_2::devhost::backend::types::ValidRequests::Range(range) => {
                        ValidRequests::Range { min: range.min, max: range.max, step: range.step }
                    }
                    v1_2::devhost::backend::types::ValidRequests::Values(values) => ValidRequests::Values(values),
                });
                (policy.capacity, RequestPolicy { default: policy.default, valid })
            });
            let request_policies = unique(policies, &id, "request policy for capacity")?;
            device.shared = Some(SharedDevice { request_policies });
        }
        Ok(device)
    }
}

/// `device` with the typed attributes and capacities of 1.1.0. The model
/// keeps names in maps; a name sent twice would silently keep one value,
/// so it is refused here, as the native ABI does.
fn described(
    mut device: Device,
    attributes: impl Iterator<Item = (String, AttributeValue)>,
    capacities: impl Iterator<Item = (String, String)>,
) -> Result<Device, String> {
    device.attributes = unique(attributes, &device.id, "attribute")?;
    device.capacities = unique(capacities, &device.id, "capacity")?;
    Ok(device)
}

fn unique<V>(
    pairs: impl Iterator<Item = (String, V)>,
    device: &str,
    what: &str,
) -> Result<BTreeMap<String, V>, String> {
    let mut map = BTreeMap::new();
    for (name, value) in pairs {
        if map.contains_key(&name) {
            return Err(format!("device {device:?}: {what} {name:?} appears twice"));
        }
        map.insert(name, value);
    }
    Ok(map)
}

fn device_list(resource: String, devices: Vec<impl IntoDevice>) -> DeviceList {
    let devices = devices
        .into_iter()
        .map(IntoDevice::into_device)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|why| format!("resource {resource:?}: {why}"));
    DeviceList { resource, devices }
}

/// A component linked and checked against its minor's world, ready to be
/// instantiated.
pub enum Pre {
    /// World 1.0.0.
    V1_0(v1_0::BackendPre<StoreState>),
    /// World 1.1.0.
    V1_1(v1_1::BackendPre<StoreState>),
    /// World 1.2.0.
    V1_2(v1_2::BackendPre<StoreState>),
}

impl Pre {
    /// Links `component` against the host's imports of its minor (WASI 0.2
    /// and `devhost:backend/host`) and checks that its exports match that
    /// minor's world, without instantiating it. `version` is what the
    /// component exports; its minor must be at most [`NEWEST`]'s.
    pub fn new(engine: &Engine, component: &Component, version: WorldVersion) -> Result<Self, String> {
        let mut linker: Linker<StoreState> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| format!("{e:#}"))?;
        let misfit = |e: wasmtime::Error| format!("does not fit devhost:backend@{version}: {e:#}");
        match version.minor {
            0 => {
                v1_0::Backend::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |state| state)
                    .map_err(|e| format!("{e:#}"))?;
                let pre = linker.instantiate_pre(component).map_err(misfit)?;
                Ok(Pre::V1_0(v1_0::BackendPre::new(pre).map_err(misfit)?))
            }
            1 => {
                v1_1::Backend::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |state| state)
                    .map_err(|e| format!("{e:#}"))?;
                let pre = linker.instantiate_pre(component).map_err(misfit)?;
                Ok(Pre::V1_1(v1_1::BackendPre::new(pre).map_err(misfit)?))
            }
            2 => {
                v1_2::Backend::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |state| state)
                    .map_err(|e| format!("{e:#}"))?;
                let pre = linker.instantiate_pre(component).map_err(misfit)?;
                Ok(Pre::V1_2(v1_2::BackendPre::new(pre).map_err(misfit)?))
            }
            // `load` refuses newer minors with a precise message first.
            _ => Err(format!("devhost:backend@{version} is newer than devhost:backend@{NEWEST}")),
        }
    }

    /// The engine it was compiled for.
    pub fn engine(&self) -> &Engine {
        match self {
            Pre::V1_0(pre) => pre.engine(),
            Pre::V1_1(pre) => pre.engine(),
            Pre::V1_2(pre) => pre.engine(),
        }
    }

    /// Whether its world has `release` (1.1.0 and later).
    pub fn has_release(&self) -> bool {
        !matches!(self, Pre::V1_0(_))
    }

    /// Whether its world has `allocate-shared` (1.2.0 and later).
    pub fn has_allocate_shared(&self) -> bool {
        matches!(self, Pre::V1_2(_))
    }

    /// A fresh instance in `store`.
    pub fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Pre::V1_0(pre) => Exports::V1_0(pre.instantiate(store)?),
            Pre::V1_1(pre) => Exports::V1_1(pre.instantiate(store)?),
            Pre::V1_2(pre) => Exports::V1_2(pre.instantiate(store)?),
        })
    }
}

/// One instance's exports, of whichever minor it implements.
pub enum Exports {
    /// World 1.0.0.
    V1_0(v1_0::Backend),
    /// World 1.1.0.
    V1_1(v1_1::Backend),
    /// World 1.2.0.
    V1_2(v1_2::Backend),
}

/// Runs `$call` with `$api` bound to the `api` export of whichever minor
/// `$exports` is: the same call, written once, on each minor's types (the
/// conversions it uses exist for every minor).
macro_rules! on_api {
    ($exports:expr, |$api:ident| $call:expr) => {
        match $exports {
            Exports::V1_0(exports) => {
                let $api = exports.devhost_backend_api();
                $call
            }
            Exports::V1_1(exports) => {
                let $api = exports.devhost_backend_api();
                $call
            }
            Exports::V1_2(exports) => {
                let $api = exports.devhost_backend_api();
                $call
            }
        }
    };
}

/// The outer `Result` of every call is a trap (a fault); the inner one, if
/// any, is the component's own answer (`err` declines the request).
impl Exports {
    /// `init`: the resources it serves (the inner `Result`: whether the
    /// model can hold them).
    pub fn init(&self, store: &mut Store<StoreState>, config: &str) -> wasmtime::Result<Result<Declared, String>> {
        Ok(on_api!(self, |api| api
            .call_init(&mut *store, config)?
            .map(|resources| resources.into_iter().map(IntoSpec::into_spec).collect())))
    }

    /// `list-devices`: every resource's current list.
    pub fn list_devices(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Vec<DeviceList>> {
        Ok(on_api!(self, |api| api
            .call_list_devices(&mut *store)?
            .into_iter()
            .map(|list| device_list(list.resource, list.devices))
            .collect()))
    }

    /// `allocate`: what one container gets.
    pub fn allocate(
        &self,
        store: &mut Store<StoreState>,
        resource: &str,
        device_ids: &[String],
    ) -> wasmtime::Result<Result<Answer, String>> {
        Ok(on_api!(self, |api| api.call_allocate(&mut *store, resource, device_ids)?.map(Answer::from)))
    }

    /// `preferred-allocation`: `None` for the host's default policy.
    pub fn preferred_allocation(
        &self,
        store: &mut Store<StoreState>,
        resource: &str,
        question: &Question,
    ) -> wasmtime::Result<Result<Option<Vec<String>>, String>> {
        on_api!(self, |api| api.call_preferred_allocation(&mut *store, resource, &question.into()))
    }

    /// `pre-start`.
    pub fn pre_start(
        &self,
        store: &mut Store<StoreState>,
        resource: &str,
        device_ids: &[String],
    ) -> wasmtime::Result<Result<(), String>> {
        on_api!(self, |api| api.call_pre_start(&mut *store, resource, device_ids))
    }

    /// `release` (1.1.0). A 1.0.0 instance has no such export and nothing
    /// to release; callers check [`Pre::has_release`] first, so as not to
    /// enter it at all.
    pub fn release(
        &self,
        store: &mut Store<StoreState>,
        resource: &str,
        device_ids: &[String],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Exports::V1_0(_) => Ok(Ok(())),
            Exports::V1_1(exports) => exports.devhost_backend_api().call_release(store, resource, device_ids),
            Exports::V1_2(exports) => exports.devhost_backend_api().call_release(store, resource, device_ids),
        }
    }

    /// `allocate-shared` (1.2.0): what one container of a DRA claim gets,
    /// with what the claim consumes of each shared device. An older minor
    /// has no such export: it is asked a plain `allocate` (the shares are
    /// dropped, as its world cannot carry them; it never published a
    /// shared device either).
    pub fn allocate_shared(
        &self,
        store: &mut Store<StoreState>,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, Share)],
    ) -> wasmtime::Result<Result<Answer, String>> {
        match self {
            Exports::V1_0(_) | Exports::V1_1(_) => self.allocate(store, resource, device_ids),
            Exports::V1_2(exports) => {
                let shares: Vec<v1_2::devhost::backend::types::Share> = shares
                    .iter()
                    .map(|(id, share)| v1_2::devhost::backend::types::Share {
                        device_id: id.clone(),
                        share_id: share.share_id.clone(),
                        consumed: share
                            .consumed
                            .iter()
                            .map(|(name, quantity)| v1_2::devhost::backend::types::Capacity {
                                name: name.clone(),
                                quantity: quantity.clone(),
                            })
                            .collect(),
                    })
                    .collect();
                Ok(exports
                    .devhost_backend_api()
                    .call_allocate_shared(store, resource, device_ids, &shares)?
                    .map(Answer::from))
            }
        }
    }

    /// `shutdown`.
    pub fn shutdown(&self, store: &mut Store<StoreState>) -> wasmtime::Result<()> {
        on_api!(self, |api| api.call_shutdown(&mut *store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1_1::devhost::backend::types as wit;

    fn device(attributes: &[(&str, wit::AttributeValue)], capacities: &[(&str, &str)]) -> wit::Device {
        wit::Device {
            id: "d0".into(),
            health: wit::Health::Unhealthy,
            numa_nodes: vec![1],
            attributes: attributes
                .iter()
                .map(|(name, value)| wit::Attribute { name: (*name).into(), value: value.clone() })
                .collect(),
            capacities: capacities
                .iter()
                .map(|(name, quantity)| wit::Capacity { name: (*name).into(), quantity: (*quantity).into() })
                .collect(),
        }
    }

    #[test]
    fn a_1_1_device_reaches_the_model_with_every_attribute_kind() {
        let list = device_list(
            "r.io/x".into(),
            vec![device(
                &[
                    ("a.io/int", wit::AttributeValue::Int(-3)),
                    ("a.io/bool", wit::AttributeValue::Boolean(true)),
                    ("a.io/text", wit::AttributeValue::Text("t".into())),
                    ("driverVersion", wit::AttributeValue::Version("1.2.3".into())),
                ],
                &[("a.io/memory", "8Gi")],
            )],
        );
        let expected = Device::new("d0", Health::Unhealthy)
            .with_numa_nodes(vec![1])
            .with_attribute("a.io/int", AttributeValue::Int(-3))
            .with_attribute("a.io/bool", AttributeValue::Bool(true))
            .with_attribute("a.io/text", AttributeValue::String("t".into()))
            .with_attribute("driverVersion", AttributeValue::Version("1.2.3".into()))
            .with_capacity("a.io/memory", "8Gi");
        assert_eq!(list.resource, "r.io/x");
        assert_eq!(list.devices, Ok(vec![expected]));
    }

    #[test]
    fn a_name_twice_on_one_device_is_refused_naming_it() {
        let twice = [("a.io/n", wit::AttributeValue::Int(1)), ("a.io/n", wit::AttributeValue::Int(2))];
        let list = device_list("r.io/x".into(), vec![device(&twice, &[])]);
        assert_eq!(list.devices, Err("resource \"r.io/x\": device \"d0\": attribute \"a.io/n\" appears twice".into()));
        let list = device_list("r.io/x".into(), vec![device(&[], &[("a.io/m", "1"), ("a.io/m", "2")])]);
        assert_eq!(list.devices, Err("resource \"r.io/x\": device \"d0\": capacity \"a.io/m\" appears twice".into()));
    }

    mod v1_2_tests {
        use super::super::*;
        use v1_2::devhost::backend::types as wit;

        fn counter(name: &str, quantity: &str) -> wit::Counter {
            wit::Counter { name: name.into(), quantity: quantity.into() }
        }

        fn device(consumes: Vec<wit::CounterConsumption>, shared: Option<wit::SharedDevice>) -> wit::Device {
            wit::Device {
                id: "nic-0".into(),
                health: wit::Health::Healthy,
                numa_nodes: Vec::new(),
                attributes: Vec::new(),
                capacities: vec![wit::Capacity { name: "a.io/bw".into(), quantity: "10G".into() }],
                consumes,
                shared,
            }
        }

        fn policy(capacity: &str, valid: Option<wit::ValidRequests>) -> wit::RequestPolicy {
            wit::RequestPolicy { capacity: capacity.into(), default: Some("1G".into()), valid }
        }

        #[test]
        fn a_1_2_device_reaches_the_model_with_what_it_consumes_and_its_request_policies() {
            let consumes = vec![wit::CounterConsumption {
                counter_set: "gpu-0".into(),
                counters: vec![counter("memory", "20Gi"), counter("slices", "4")],
            }];
            let range = wit::ValidRange { min: "1G".into(), max: Some("8G".into()), step: None };
            let shared = wit::SharedDevice {
                request_policies: vec![
                    policy("a.io/bw", Some(wit::ValidRequests::Range(range))),
                    policy("a.io/slots", Some(wit::ValidRequests::Values(vec!["1G".into(), "2G".into()]))),
                ],
            };
            let list = device_list("r.io/x".into(), vec![device(consumes, Some(shared))]);
            let range = ValidRequests::Range { min: "1G".into(), max: Some("8G".into()), step: None };
            let values = ValidRequests::Values(vec!["1G".into(), "2G".into()]);
            let expected = Device::healthy("nic-0")
                .with_capacity("a.io/bw", "10G")
                .consuming("gpu-0", [("memory", "20Gi"), ("slices", "4")])
                .with_request_policy("a.io/bw", RequestPolicy { default: Some("1G".into()), valid: Some(range) })
                .with_request_policy("a.io/slots", RequestPolicy { default: Some("1G".into()), valid: Some(values) });
            assert_eq!(list.devices, Ok(vec![expected]));
        }

        #[test]
        fn a_shared_device_without_policies_is_shared_and_none_is_not() {
            let shared = device(Vec::new(), Some(wit::SharedDevice { request_policies: Vec::new() }));
            let list =
                device_list("r.io/x".into(), vec![shared, wit::Device { id: "d1".into(), ..device(Vec::new(), None) }]);
            let devices = list.devices.expect("converts");
            assert_eq!(devices[0].shared, Some(SharedDevice::default()));
            assert_eq!(devices[1].shared, None);
        }

        #[test]
        fn what_the_model_cannot_hold_is_refused_naming_the_field() {
            let twice = vec![wit::CounterConsumption {
                counter_set: "gpu-0".into(),
                counters: vec![counter("memory", "1Gi"), counter("memory", "2Gi")],
            }];
            let list = device_list("r.io/x".into(), vec![device(twice, None)]);
            assert_eq!(
                list.devices,
                Err("resource \"r.io/x\": device \"nic-0\": consumes from counter set \"gpu-0\": counter \"memory\" appears twice"
                    .into())
            );
            let shared = wit::SharedDevice { request_policies: vec![policy("a.io/bw", None), policy("a.io/bw", None)] };
            let list = device_list("r.io/x".into(), vec![device(Vec::new(), Some(shared))]);
            assert_eq!(
                list.devices,
                Err("resource \"r.io/x\": device \"nic-0\": request policy for capacity \"a.io/bw\" appears twice"
                    .into())
            );
            let resource = wit::Resource {
                name: "r.io/x".into(),
                pre_start_required: false,
                preferred_allocation: false,
                release_required: false,
                counter_sets: vec![wit::CounterSet {
                    name: "gpu-0".into(),
                    counters: vec![counter("slices", "8"), counter("slices", "4")],
                }],
            };
            assert_eq!(
                resource.into_spec(),
                Err("resource \"r.io/x\": counter set \"gpu-0\": counter \"slices\" appears twice".into())
            );
        }

        #[test]
        fn a_1_2_resource_declares_its_counter_sets() {
            let resource = wit::Resource {
                name: "r.io/x".into(),
                pre_start_required: true,
                preferred_allocation: false,
                release_required: true,
                counter_sets: vec![wit::CounterSet {
                    name: "gpu-0".into(),
                    counters: vec![counter("memory", "40Gi"), counter("slices", "8")],
                }],
            };
            let spec = resource.into_spec().expect("converts");
            assert_eq!(spec.counter_sets, [CounterSet::new("gpu-0", [("memory", "40Gi"), ("slices", "8")])]);
            assert!(spec.pre_start_required && spec.release_required && !spec.preferred_allocation);
        }

        #[test]
        fn a_1_2_allocation_carries_its_device_status() {
            let status = wit::DeviceStatus {
                interface_name: Some("net1".into()),
                hardware_address: None,
                ips: vec!["10.0.0.5/24".into()],
                data: Some("{\"a\":1}".into()),
            };
            let answer = Answer::from(wit::Allocation {
                envs: vec![("A".into(), "1".into())],
                mounts: Vec::new(),
                device_specs: Vec::new(),
                annotations: Vec::new(),
                cdi_devices: Vec::new(),
                device_status: vec![("nic-0".into(), status)],
            });
            let expected = DeviceStatus {
                interface_name: Some("net1".into()),
                hardware_address: None,
                ips: vec!["10.0.0.5/24".into()],
                data: Some("{\"a\":1}".into()),
            };
            assert_eq!(answer.device_status, [("nic-0".to_owned(), expected)]);
            assert_eq!(answer.envs, [("A".to_owned(), "1".to_owned())]);
        }
    }

    #[test]
    fn a_1_0_resource_never_asks_for_release() {
        let resource = v1_0::devhost::backend::types::Resource {
            name: "r.io/x".into(),
            pre_start_required: true,
            preferred_allocation: true,
        };
        let spec = ResourceSpec::from(resource);
        assert_eq!((spec.pre_start_required, spec.preferred_allocation, spec.release_required), (true, true, false));
    }
}
