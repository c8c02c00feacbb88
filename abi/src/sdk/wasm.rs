//! The SDK's WASM packaging: the glue [`export_backend!`](crate::export_backend)
//! expands to when the crate is built for `wasm32` (`wasm32-wasip2`). It
//! exports the world `devhost:backend/backend@1.2.0`
//! (`abi/wit/devhost-backend-1.2.0/`) and adapts it to the same [`Backend`]
//! trait the native shims use: device attributes and capacities, a
//! resource's `release-required` and the `release` export carry what ABI
//! 1.1 added natively; a resource's counter sets, what a device consumes of
//! them, shared devices' request policies, the `allocate-shared` export
//! ([`Backend::allocate_shared`]) and an allocation's device status what
//! ABI 1.2 added. A devhost that only knows 1.0.0 or 1.1.0 cannot run such
//! a component and refuses to load it.
//!
//! A component has no threads, so the push model of the native ABI becomes
//! a poll: [`Host::publish`] only stores the latest list of each resource,
//! and the host's periodic `list-devices` call reads what was stored.
//! Everything here is plain safe Rust; the generated bindings hold the only
//! `unsafe` (wit-bindgen's canonical-ABI glue).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Allocation, AttributeValue, Backend, Device, Health, LogLevel, PreferredRequest, PublishError, Resource};
use crate::model::{CounterSet, Share, ValidRequests};

/// The bindings wit-bindgen generates for the world (guest side).
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/devhost-backend-1.2.0",
        world: "devhost:backend/backend@1.2.0",
        pub_export_macro: true,
        export_macro_name: "__devhost_export_component",
        default_bindings_module: "devhost_abi::sdk::wasm::bindings",
    });
}

use bindings::devhost::backend::host as wit_host;
use bindings::devhost::backend::types as wit;

/// The latest device list of each resource, as published.
#[derive(Debug, Default)]
struct Published {
    lists: BTreeMap<String, Vec<Device>>,
    closed: bool,
}

/// The backend's link to devhost. In a component it keeps the latest list
/// each resource published; devhost reads them on its poll interval.
#[derive(Debug, Clone, Default)]
pub struct Host {
    published: Arc<Mutex<Published>>,
}

impl Host {
    /// Replaces the whole device list of `resource`. devhost sees it at its
    /// next poll (and right after `init`); it validates the list then.
    pub fn publish(&self, resource: &str, devices: &[Device]) -> Result<(), PublishError> {
        let mut published = self.published.lock().unwrap_or_else(PoisonError::into_inner);
        if published.closed {
            return Err(PublishError::Closed);
        }
        published.lists.insert(resource.to_owned(), devices.to_vec());
        Ok(())
    }

    /// One line in devhost's log, tagged with the backend.
    pub fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Error => wit_host::LogLevel::Error,
            LogLevel::Warn => wit_host::LogLevel::Warn,
            LogLevel::Info => wit_host::LogLevel::Info,
            LogLevel::Debug => wit_host::LogLevel::Debug,
        };
        wit_host::log(level, message);
    }

    fn close(&self) {
        self.published.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
    }

    fn snapshot(&self) -> Vec<wit::DeviceList> {
        let published = self.published.lock().unwrap_or_else(PoisonError::into_inner);
        published
            .lists
            .iter()
            .map(|(resource, devices)| wit::DeviceList {
                resource: resource.clone(),
                devices: devices.iter().map(device_to_wit).collect(),
            })
            .collect()
    }
}

struct Live<B> {
    backend: B,
    host: Host,
}

/// The component's one backend instance (a component instance is never
/// shared: devhost instantiates the component afresh for each instance).
#[doc(hidden)]
pub struct Instance<B> {
    live: Mutex<Option<Live<B>>>,
}

impl<B: Backend> Instance<B> {
    /// No instance yet: `init` makes one.
    pub const fn new() -> Self {
        Instance { live: Mutex::new(None) }
    }

    fn with<T>(&self, f: impl FnOnce(&B) -> Result<T, String>) -> Result<T, String> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        match live.as_ref() {
            Some(live) => f(&live.backend),
            None => Err("the backend is not initialised".to_owned()),
        }
    }

    /// `init` of the world.
    pub fn init(&self, config_json: &str) -> Result<Vec<wit::Resource>, String> {
        let host = Host::default();
        let (backend, resources) = B::init(config_json, host.clone()).map_err(|error| error.to_string())?;
        let old = self.live.lock().unwrap_or_else(PoisonError::into_inner).replace(Live { backend, host });
        if let Some(old) = old {
            old.host.close();
            old.backend.shutdown();
        }
        Ok(resources.into_iter().map(resource_to_wit).collect())
    }

    /// `list-devices` of the world: what was last published.
    pub fn list_devices(&self) -> Vec<wit::DeviceList> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(live) = live.as_ref() else { return Vec::new() };
        live.backend.poll();
        live.host.snapshot()
    }

    /// `allocate` of the world.
    pub fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<wit::Allocation, String> {
        self.with(|backend| backend.allocate(resource, device_ids).map(allocation_to_wit).map_err(|e| e.to_string()))
    }

    /// `allocate-shared` of the world (1.2.0): [`Backend::allocate_shared`]
    /// with each share's device ID beside what the claim consumes of it.
    pub fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: Vec<wit::Share>,
    ) -> Result<wit::Allocation, String> {
        let shares: Vec<(String, Share)> = shares
            .into_iter()
            .map(|share| {
                let consumed = share.consumed.into_iter().map(|c| (c.name, c.quantity)).collect();
                (share.device_id, Share { share_id: share.share_id, consumed })
            })
            .collect();
        self.with(|backend| {
            backend.allocate_shared(resource, device_ids, &shares).map(allocation_to_wit).map_err(|e| e.to_string())
        })
    }

    /// `preferred-allocation` of the world.
    pub fn preferred_allocation(
        &self,
        resource: &str,
        request: wit::PreferredRequest,
    ) -> Result<Option<Vec<String>>, String> {
        let request = PreferredRequest {
            available: request.available,
            must_include: request.must_include,
            size: request.size as usize,
        };
        self.with(|backend| backend.preferred_allocation(resource, &request).map_err(|e| e.to_string()))
    }

    /// `pre-start` of the world.
    pub fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), String> {
        self.with(|backend| backend.pre_start(resource, device_ids).map_err(|e| e.to_string()))
    }

    /// `release` of the world (1.1.0).
    pub fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), String> {
        self.with(|backend| backend.release(resource, device_ids).map_err(|e| e.to_string()))
    }

    /// `shutdown` of the world.
    pub fn shutdown(&self) {
        let old = self.live.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(old) = old {
            old.host.close();
            old.backend.shutdown();
        }
    }
}

impl<B: Backend> Default for Instance<B> {
    fn default() -> Self {
        Self::new()
    }
}

fn device_to_wit(device: &Device) -> wit::Device {
    wit::Device {
        id: device.id.clone(),
        health: match device.health {
            Health::Healthy => wit::Health::Healthy,
            Health::Unhealthy => wit::Health::Unhealthy,
        },
        numa_nodes: device.numa_nodes.clone(),
        attributes: device
            .attributes
            .iter()
            .map(|(name, value)| wit::Attribute {
                name: name.clone(),
                value: match value {
                    AttributeValue::Int(value) => wit::AttributeValue::Int(*value),
                    AttributeValue::Bool(value) => wit::AttributeValue::Boolean(*value),
                    AttributeValue::String(value) => wit::AttributeValue::Text(value.clone()),
                    AttributeValue::Version(value) => wit::AttributeValue::Version(value.clone()),
                },
            })
            .collect(),
        capacities: device
            .capacities
            .iter()
            .map(|(name, quantity)| wit::Capacity { name: name.clone(), quantity: quantity.clone() })
            .collect(),
        consumes: device
            .consumes
            .iter()
            .map(|consumption| wit::CounterConsumption {
                counter_set: consumption.counter_set.clone(),
                counters: counters_to_wit(&consumption.counters),
            })
            .collect(),
        shared: device.shared.as_ref().map(|shared| wit::SharedDevice {
            request_policies: shared
                .request_policies
                .iter()
                .map(|(capacity, policy)| wit::RequestPolicy {
                    capacity: capacity.clone(),
                    default: policy.default.clone(),
                    valid: policy.valid.as_ref().map(|valid| match valid {
                        ValidRequests::Range { min, max, step } => wit::ValidRequests::Range(wit::ValidRange {
                            min: min.clone(),
                            max: max.clone(),
                            step: step.clone(),
                        }),
                        ValidRequests::Values(values) => wit::ValidRequests::Values(values.clone()),
                    }),
                })
                .collect(),
        }),
    }
}

fn counters_to_wit(counters: &BTreeMap<String, String>) -> Vec<wit::Counter> {
    counters.iter().map(|(name, quantity)| wit::Counter { name: name.clone(), quantity: quantity.clone() }).collect()
}

fn counter_set_to_wit(set: CounterSet) -> wit::CounterSet {
    wit::CounterSet { counters: counters_to_wit(&set.counters), name: set.name }
}

fn resource_to_wit(resource: Resource) -> wit::Resource {
    wit::Resource {
        name: resource.name,
        pre_start_required: resource.pre_start_required,
        preferred_allocation: resource.preferred_allocation,
        release_required: resource.release_required,
        counter_sets: resource.counter_sets.into_iter().map(counter_set_to_wit).collect(),
    }
}

fn allocation_to_wit(allocation: Allocation) -> wit::Allocation {
    wit::Allocation {
        envs: allocation.envs.into_iter().collect(),
        mounts: allocation
            .mounts
            .into_iter()
            .map(|m| wit::Mount { container_path: m.container_path, host_path: m.host_path, read_only: m.read_only })
            .collect(),
        device_specs: allocation
            .device_specs
            .into_iter()
            .map(|d| wit::DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        annotations: allocation.annotations.into_iter().collect(),
        cdi_devices: allocation.cdi_devices,
        device_status: allocation
            .device_status
            .into_iter()
            .map(|(id, status)| {
                let status = wit::DeviceStatus {
                    interface_name: status.interface_name,
                    hardware_address: status.hardware_address,
                    ips: status.ips,
                    data: status.data,
                };
                (id, status)
            })
            .collect(),
    }
}
