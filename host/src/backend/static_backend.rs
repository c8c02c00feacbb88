//! The built-in `static` backend: devices, health and Allocate answers come
//! from its TOML file (schema and validation: `crate::config::StaticConfig`).
//! It needs no hardware, powers the demo and the tests, and serves simple
//! real cases (a shared `/dev/fuse`, a license token).
//!
//! A device may name a `health_path`: it is Healthy while that path exists.
//! The paths are checked every `health_interval_ms` on a backend thread, and
//! only changes are published.

use std::collections::HashMap;
use std::sync::{Arc, mpsc};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Allocation, Backend, BackendError, Device, Health, Publisher, ResourceSpec};
use crate::config::static_backend::{CAPACITY_PLACEHOLDER_PREFIX, IDS_PLACEHOLDER, StaticConfig, StaticResource};
use crate::model::Share;

/// The running static backend.
pub struct StaticBackend {
    config: Arc<StaticConfig>,
    /// Per resource (in config order), each device's position by ID: an
    /// Allocate among 10,000 devices is a lookup, not a scan.
    positions: Vec<HashMap<String, usize>>,
    watcher: Mutex<Option<HealthWatcher>>,
}

struct HealthWatcher {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl StaticBackend {
    /// A backend serving `config`.
    pub fn new(config: impl Into<Arc<StaticConfig>>) -> Self {
        let config = config.into();
        let positions = config
            .resources
            .iter()
            .map(|r| r.devices.iter().enumerate().map(|(at, d)| (d.device.id.clone(), at)).collect())
            .collect();
        StaticBackend { config, positions, watcher: Mutex::new(None) }
    }

    /// The resource called `name`, with its device positions.
    fn resource(&self, name: &str) -> Result<(&StaticResource, &HashMap<String, usize>), BackendError> {
        self.config
            .resources
            .iter()
            .zip(&self.positions)
            .find(|(r, _)| r.spec.name == name)
            .ok_or_else(|| BackendError::new(format!("resource {name:?} is not served by this backend")))
    }
}

/// The devices of `resource` with health from their `health_path`s.
fn current_devices(resource: &StaticResource) -> Vec<Device> {
    resource
        .devices
        .iter()
        .map(|d| {
            let mut device = d.device.clone();
            if d.health_path.as_ref().is_some_and(|path| !path.exists()) {
                device.health = Health::Unhealthy;
            }
            device
        })
        .collect()
}

impl Backend for StaticBackend {
    /// Its answers are lookups in its own config: nothing to wait for.
    fn answers_at_once(&self) -> bool {
        true
    }

    fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        let mut last: Vec<Vec<Device>> = Vec::new();
        for resource in &self.config.resources {
            let devices = current_devices(resource);
            publisher.publish(&resource.spec.name, devices.clone()).map_err(|e| BackendError::new(e.to_string()))?;
            last.push(devices);
        }
        let watched = self.config.resources.iter().any(|r| r.devices.iter().any(|d| d.health_path.is_some()));
        if watched {
            let (stop, stopped) = mpsc::channel();
            let resources = self.config.resources.clone();
            let interval = self.config.health_interval;
            let thread = std::thread::Builder::new()
                .name("static-health".into())
                .spawn(move || watch_health(&resources, &publisher, interval, &stopped, last))
                .map_err(|e| BackendError::new(format!("cannot start the health thread: {e}")))?;
            *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(HealthWatcher { stop, thread });
        }
        Ok(self.config.resources.iter().map(|r| r.spec.clone()).collect())
    }

    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, BackendError> {
        self.allocate_shared(resource, device_ids, &[])
    }

    /// `{capacity.<name>}` in the resource's `env` is each device's amount:
    /// what the claim consumes of a shared device, else its whole capacity.
    fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, Share)],
    ) -> Result<Allocation, BackendError> {
        let (resource, positions) = self.resource(resource)?;
        let mut allocation = Allocation::default();
        for id in device_ids {
            let device = positions
                .get(id)
                .map(|&at| &resource.devices[at])
                .ok_or_else(|| BackendError::new(format!("unknown device ID {id:?}")))?;
            let own = &device.allocation;
            allocation.envs.extend(own.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
            allocation.mounts.extend(own.mounts.iter().cloned());
            allocation.device_specs.extend(own.device_specs.iter().cloned());
            allocation.device_status.extend(own.device_status.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Some(kind) = &resource.cdi_kind {
                allocation.cdi_devices.push(format!("{kind}={id}"));
            }
        }
        let ids = device_ids.join(",");
        // DRA's consumed capacity of shared devices, when the host's
        // prepare passed it.
        let share_of = |id: &str| shares.iter().find(|(shared, _)| shared == id).map(|(_, share)| share);
        let amounts = |capacity: &str| -> String {
            let each = device_ids.iter().map(|id| {
                let own = share_of(id).and_then(|share: &Share| share.consumed.get(capacity));
                let whole = || positions.get(id).and_then(|&p| resource.devices[p].device.capacities.get(capacity));
                own.or_else(whole).map_or("", String::as_str)
            });
            each.collect::<Vec<&str>>().join(",")
        };
        allocation.envs.extend(
            resource.env.iter().map(|(k, v)| (k.clone(), with_capacities(&v.replace(IDS_PLACEHOLDER, &ids), &amounts))),
        );
        allocation.annotations.extend(resource.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(allocation)
    }

    fn shutdown(&self) {
        let watcher = self.watcher.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(HealthWatcher { stop, thread }) = watcher {
            drop(stop);
            if thread.join().is_err() {
                tracing::warn!("static backend health thread panicked");
            }
        }
    }
}

/// `value` with each `{capacity.<name>}` replaced by `amounts(name)`; an
/// unterminated placeholder is left as written.
fn with_capacities(value: &str, amounts: &impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find(CAPACITY_PLACEHOLDER_PREFIX) {
        let after = &rest[at + CAPACITY_PLACEHOLDER_PREFIX.len()..];
        let Some(end) = after.find('}') else { break };
        out.push_str(&rest[..at]);
        out.push_str(&amounts(&after[..end]));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn watch_health(
    resources: &[StaticResource],
    publisher: &Publisher,
    interval: Duration,
    stopped: &mpsc::Receiver<()>,
    mut last: Vec<Vec<Device>>,
) {
    // The sender is dropped on shutdown, which ends the wait at once.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
        for (resource, previous) in resources.iter().zip(last.iter_mut()) {
            let devices = current_devices(resource);
            if devices != *previous {
                if let Err(error) = publisher.publish(&resource.spec.name, devices.clone()) {
                    tracing::error!(resource = %resource.spec.name, %error, "publishing health change failed");
                    continue;
                }
                *previous = devices;
            }
        }
    }
}

#[cfg(test)]
mod tests;
