//! The minor versions of world 1 this devhost runs, behind one interface.
//!
//! wasmtime's `bindgen!` makes one set of Rust types per WIT package
//! version, so `devhost:backend@1.0.0` and `@1.1.0` have distinct types
//! even where 1.1.0 took 1.0.0's over unchanged. This module binds both
//! worlds, links and instantiates whichever one a component exports
//! ([`Pre`], [`Exports`]), and converts each minor's answers into one
//! internal form (the host's model, plus [`DeviceList`] and [`Answer`]), so
//! the adapter in [`super`] never sees a minor. What 1.0.0 lacks reads as
//! absent: no attributes, no capacities, `release_required` false, and no
//! `release` export ([`Pre::has_release`]).
//!
//! The types both minors share field for field are converted by one macro,
//! `shared!`, written once and expanded per minor, so the two cannot drift
//! apart; only what 1.1.0 added is written for it alone. Calls are written
//! once too (`on_api!`), for whichever minor an instance is.

use std::collections::BTreeMap;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use crate::backend::{AttributeValue, Device, DeviceSpec, Health, Mount, ResourceSpec};
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

/// The newest minor of world 1 this devhost runs; a component of a newer
/// one is refused before linking (see [`crate::wasm::load`]).
pub const NEWEST: WorldVersion = WorldVersion { major: 1, minor: 1, patch: 0 };

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
}

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
            fn from(answer: $minor::devhost::backend::types::Allocation) -> Self {
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

// What differs between the minors: 1.0.0's devices and resources have
// nothing of what 1.1.0 added.

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

impl From<v1_1::devhost::backend::types::AttributeValue> for AttributeValue {
    fn from(value: v1_1::devhost::backend::types::AttributeValue) -> Self {
        use v1_1::devhost::backend::types::AttributeValue as Wit;
        match value {
            Wit::Int(value) => AttributeValue::Int(value),
            Wit::Boolean(value) => AttributeValue::Bool(value),
            Wit::Text(value) => AttributeValue::String(value),
            Wit::Version(value) => AttributeValue::Version(value),
        }
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
        let mut device = Device::new(self.id, self.health.into()).with_numa_nodes(self.numa_nodes);
        // The model keeps names in maps; a name sent twice would silently
        // keep one value, so it is refused here, as the native ABI does.
        device.attributes =
            unique(self.attributes.into_iter().map(|a| (a.name, a.value.into())), &device.id, "attribute")?;
        device.capacities = unique(self.capacities.into_iter().map(|c| (c.name, c.quantity)), &device.id, "capacity")?;
        Ok(device)
    }
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
            // `load` refuses newer minors with a precise message first.
            _ => Err(format!("devhost:backend@{version} is newer than devhost:backend@{NEWEST}")),
        }
    }

    /// The engine it was compiled for.
    pub fn engine(&self) -> &Engine {
        match self {
            Pre::V1_0(pre) => pre.engine(),
            Pre::V1_1(pre) => pre.engine(),
        }
    }

    /// Whether its world has `release` (1.1.0 and later).
    pub fn has_release(&self) -> bool {
        !matches!(self, Pre::V1_0(_))
    }

    /// A fresh instance in `store`.
    pub fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Pre::V1_0(pre) => Exports::V1_0(pre.instantiate(store)?),
            Pre::V1_1(pre) => Exports::V1_1(pre.instantiate(store)?),
        })
    }
}

/// One instance's exports, of whichever minor it implements.
pub enum Exports {
    /// World 1.0.0.
    V1_0(v1_0::Backend),
    /// World 1.1.0.
    V1_1(v1_1::Backend),
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
        }
    };
}

/// The outer `Result` of every call is a trap (a fault); the inner one, if
/// any, is the component's own answer (`err` declines the request).
impl Exports {
    /// `init`: the resources it serves.
    pub fn init(
        &self,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<Vec<ResourceSpec>, String>> {
        Ok(on_api!(self, |api| api
            .call_init(&mut *store, config)?
            .map(|resources| resources.into_iter().map(ResourceSpec::from).collect())))
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
