//! devhost's generic backend: device nodes under `/dev` (or any path)
//! matched by glob patterns, optionally filtered by USB vendor/product ID
//! from sysfs, served as one resource per configured group. A rescan
//! thread handles hot-plug: new nodes are advertised, vanished ones go
//! Unhealthy and are dropped after a grace. Allocate answers device specs
//! (and the group's extra mounts) for exactly the requested devices. Every
//! device carries DRA attributes: its path and, for USB devices, vendor,
//! product and serial number.
//!
//! Layout: [`config`] parses and validates `[config]`; [`glob`] expands
//! patterns; [`scan`] turns matches into stable device IDs; [`attributes`]
//! describes them; [`state`] tracks presence over time. This file wires
//! them to the SDK.

#![deny(unsafe_code)]

pub mod attributes;
pub mod config;
pub mod glob;
pub mod scan;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use devhost_abi::sdk::{Allocation, Backend, DeviceSpec, Error, Host, LogLevel, Resource};

use crate::config::Config;
use crate::state::{Listed, Present};

/// Where device lists go: the host in production, the SDK's recorder in
/// tests.
pub use devhost_abi::sdk::HostApi as Sink;

/// The state shared by the calls and the rescan thread.
struct Shared {
    config: Config,
    listed: Mutex<BTreeMap<String, Listed>>,
    /// Attribute warnings already logged: each is logged once, not at
    /// every rescan.
    warned: Mutex<BTreeSet<String>>,
}

impl Shared {
    fn listed(&self) -> MutexGuard<'_, BTreeMap<String, Listed>> {
        // A panic elsewhere cannot leave the map half-updated in a way
        // that matters: every update replaces whole entries.
        self.listed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Scans every group and publishes the lists that changed (all of them
    /// when `force`).
    fn rescan(&self, sink: &dyn Sink, force: bool) {
        let now = Instant::now();
        let mut changed = Vec::new();
        let mut warnings = Vec::new();
        {
            let mut listed = self.listed();
            for group in &self.config.groups {
                let mut found = BTreeMap::new();
                for (id, seen) in scan::scan_group(&self.config, group) {
                    let (attributes, problems) = attributes::describe(&id, &seen);
                    warnings.extend(problems.into_iter().map(|p| format!("{}: {p}", group.resource)));
                    found.insert(id, Present { paths: seen.paths, attributes });
                }
                let entry = listed.entry(group.resource.clone()).or_default();
                if entry.update(found, now, self.config.removal_grace) || force {
                    changed.push((group.resource.clone(), entry.devices()));
                }
            }
        }
        {
            let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for warning in warnings {
                if warned.insert(warning.clone()) {
                    sink.log(LogLevel::Warn, &warning);
                }
            }
        }
        for (resource, devices) in changed {
            if let Err(error) = sink.publish(&resource, &devices) {
                sink.log(LogLevel::Warn, &format!("publishing {resource}: {error}"));
            }
        }
    }
}

/// One running instance.
pub struct Generic {
    shared: Arc<Shared>,
    rescanner: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Generic {
    /// Scans once, publishes every resource through `sink`, and starts the
    /// rescan thread: the body of `init` (tests pass a recorder).
    pub fn start(config: Config, sink: Arc<dyn Sink>) -> Result<(Generic, Vec<Resource>), Error> {
        let resources = config.groups.iter().map(|g| Resource::new(g.resource.clone())).collect();
        let interval = config.rescan_interval;
        let shared =
            Arc::new(Shared { config, listed: Mutex::new(BTreeMap::new()), warned: Mutex::new(BTreeSet::new()) });
        shared.rescan(sink.as_ref(), true);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_shared = Arc::clone(&shared);
        let rescanner = std::thread::Builder::new()
            .name("devhost-generic-rescan".into())
            .spawn(move || {
                // Until `shutdown` sends (or drops) `stop`.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    thread_shared.rescan(sink.as_ref(), false);
                }
            })
            .map_err(|error| Error::new(format!("cannot start the rescan thread: {error}")))?;
        Ok((Generic { shared, rescanner: Some((stop, rescanner)) }, resources))
    }

    /// The answer for `ids` of `resource`, from the devices as last scanned.
    pub fn answer(&self, resource: &str, ids: &[String]) -> Result<Allocation, Error> {
        let config = &self.shared.config;
        let group = config
            .groups
            .iter()
            .find(|g| g.resource == resource)
            .ok_or_else(|| Error::new(format!("unknown resource {resource:?}")))?;
        let listed = self.shared.listed();
        let devices = listed.get(resource);
        let mut answer = Allocation::default();
        for id in ids {
            let tracked = devices
                .and_then(|d| d.get(id))
                .ok_or_else(|| Error::new(format!("{resource}: unknown device {id:?}")))?;
            if tracked.missing_since.is_some() {
                let paths: Vec<String> = tracked.paths.iter().map(|p| p.display().to_string()).collect();
                return Err(Error::new(format!("{resource}: device {id:?} is gone ({} vanished)", paths.join(", "))));
            }
            for path in &tracked.paths {
                let spec = DeviceSpec {
                    container_path: path.display().to_string(),
                    host_path: glob::on_disk(&config.dev_root, path).display().to_string(),
                    permissions: group.permissions.clone(),
                };
                if !answer.device_specs.contains(&spec) {
                    answer.device_specs.push(spec);
                }
            }
        }
        answer.mounts = group.mounts.clone();
        Ok(answer)
    }

    fn stop(&mut self) {
        if let Some((stop, thread)) = self.rescanner.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Generic {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backend for Generic {
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        let config = Config::parse(config)?;
        Generic::start(config, Arc::new(host))
    }

    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, Error> {
        self.answer(resource, device_ids)
    }

    fn shutdown(mut self) {
        self.stop();
    }
}

devhost_abi::export_backend!(Generic);

#[cfg(test)]
mod tests;
