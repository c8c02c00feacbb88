//! devhost's NVIDIA GPU backend, a native backend on the devhost SDK.
//!
//! It loads NVML (`libnvidia-ml.so.1`) at run time, serves every GPU as one
//! device of `nvidia.com/gpu` (UUID as the device ID, NUMA node from
//! sysfs), watches critical XID events and probes GPUs on its own thread
//! (Unhealthy GPUs come back when NVML reports them usable), answers
//! Allocate with device nodes, `NVIDIA_VISIBLE_DEVICES` and optional CDI
//! names, and prefers GPUs on one NUMA node sharing the best links. Every
//! device carries DRA attributes (product, versions, PCI address and root,
//! MIG mode) and its memory as a capacity. With `reset_on_release` it asks
//! devhost for `release` and resets idle GPUs then.
//!
//! Layout: [`model`] is the data layer between NVML and the logic;
//! [`nvml`] implements it over NVML; [`config`], [`xid`], [`sysfs`],
//! [`topology`], [`allocate`], [`health`], [`attributes`] and [`release`]
//! are the logic, tested without a GPU. Where NVML is absent, `init` fails
//! with one message and nothing is registered.

#![deny(unsafe_code)]

pub mod allocate;
pub mod attributes;
pub mod config;
#[cfg(test)]
mod fakes;
pub mod health;
pub mod model;
pub mod nvml;
pub mod release;
pub mod sysfs;
pub mod topology;
pub mod xid;

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use devhost_abi::sdk::{Allocation, Backend, Error, Health, Host, LogLevel, PreferredRequest, Resource};

use crate::config::Config;
use crate::health::{HealthTracker, Monitor, Sink, device, monitor};
use crate::model::{Event, EventSource, Gpu, GpuSource};
use crate::topology::Topology;

/// One running instance: the GPUs found at `init`, their topology, the
/// health thread, and NVML and the host for `release`.
pub struct Nvidia {
    config: Config,
    gpus: Arc<Vec<Gpu>>,
    topology: Topology,
    source: Arc<dyn GpuSource>,
    sink: Arc<dyn Sink>,
    monitor: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// Stands in for NVML's event set where it could not be created: waits,
/// and leaves health to the probes.
struct NoEvents;

impl EventSource for NoEvents {
    fn wait(&mut self, timeout: Duration) -> Event {
        std::thread::sleep(timeout);
        Event::Timeout
    }
}

fn describe(gpu: &Gpu) -> String {
    let numa = gpu.numa_node.map_or("none".to_owned(), |n| n.to_string());
    format!(
        "GPU {}: index {}, /dev/nvidia{}, PCI {}, NUMA node {numa}, {} MiB, MIG {}, {}",
        gpu.uuid,
        gpu.index,
        gpu.minor,
        gpu.bus_id,
        gpu.memory_bytes >> 20,
        match gpu.mig_enabled {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        },
        gpu.name
    )
}

impl Nvidia {
    /// Starts an instance over `source`, publishing through `sink`: the
    /// body of `init` once NVML is loaded (tests pass fakes).
    pub fn start(
        config: Config,
        source: Arc<dyn GpuSource>,
        sink: Arc<dyn Sink>,
    ) -> Result<(Self, Vec<Resource>), Error> {
        if config.reset_on_release {
            source.can_reset().map_err(|why| {
                Error::new(format!(
                    "reset_on_release = true, but this backend cannot reset GPUs here: {why}; set \
                     reset_on_release = false (released GPUs are then handed on without a reset)"
                ))
            })?;
        }
        let mut gpus = source.gpus().map_err(Error::new)?;
        if gpus.is_empty() {
            return Err(Error::new(format!(
                "NVML reports no GPUs on this node: nothing to serve as {}",
                config.resource
            )));
        }
        for gpu in &mut gpus {
            gpu.numa_node = sysfs::numa_node(&config.sysfs_root, &gpu.bus_id).unwrap_or_else(|error| {
                sink.log(LogLevel::Warn, &format!("GPU {}: no NUMA affinity ({error})", gpu.uuid));
                None
            });
            gpu.details.pcie_root = sysfs::pcie_root(&config.sysfs_root, &gpu.bus_id);
            sink.log(LogLevel::Info, &describe(gpu));
            // Once here, not at every publish: the values never change.
            for warning in attributes::describe(gpu).warnings {
                sink.log(LogLevel::Warn, &warning);
            }
            if gpu.mig_enabled == Some(true) {
                sink.log(
                    LogLevel::Warn,
                    &format!(
                        "GPU {}: MIG mode is on; it is served whole (MIG devices are not resources yet)",
                        gpu.uuid
                    ),
                );
            }
        }
        let topology = Topology::new(&gpus, |a, b| source.link(a, b));
        let devices: Vec<_> = gpus.iter().map(|gpu| device(gpu, Health::Healthy)).collect();
        sink.publish(&config.resource, &devices).map_err(|error| Error::new(error.to_string()))?;
        let gpus = Arc::new(gpus);
        let monitor = config.health.then(|| spawn_monitor(&config, source.clone(), sink.clone(), gpus.clone()));
        let resource = Resource::new(config.resource.clone()).with_preferred_allocation();
        let resource = if config.reset_on_release { resource.with_release() } else { resource };
        Ok((Nvidia { config, gpus, topology, source, sink, monitor }, vec![resource]))
    }
}

fn spawn_monitor(
    config: &Config,
    source: Arc<dyn GpuSource>,
    sink: Arc<dyn Sink>,
    gpus: Arc<Vec<Gpu>>,
) -> (mpsc::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = mpsc::channel();
    let (resource, policy, interval) = (config.resource.clone(), config.xids.clone(), config.probe_interval);
    let thread = std::thread::spawn(move || {
        let uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
        let mut events: Box<dyn EventSource + '_> = match source.events(&uuids) {
            Ok((events, warnings)) => {
                for warning in warnings {
                    sink.log(LogLevel::Warn, &warning);
                }
                events
            }
            Err(error) => {
                sink.log(LogLevel::Warn, &format!("{error}; only probes watch the GPUs' health"));
                Box::new(NoEvents)
            }
        };
        let tracker = HealthTracker::new(uuids, policy, interval);
        let m = Monitor { source: &*source, sink: &*sink, resource: &resource, gpus: &gpus, tracker, interval };
        monitor(m, &mut *events, &stopped);
    });
    (stop, thread)
}

impl Backend for Nvidia {
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        let config = Config::parse(config)?;
        let source = nvml::load(&config.library).map_err(Error::new)?;
        Nvidia::start(config, Arc::new(source), Arc::new(host))
    }

    fn allocate(&self, _resource: &str, device_ids: &[String]) -> Result<Allocation, Error> {
        allocate::allocation(&self.gpus, device_ids, &self.config.dev_root, self.config.cdi)
    }

    fn preferred_allocation(&self, _resource: &str, request: &PreferredRequest) -> Result<Option<Vec<String>>, Error> {
        self.topology.preferred(&request.available, &request.must_include, request.size).map(Some).map_err(Error::new)
    }

    fn release(&self, _resource: &str, device_ids: &[String]) -> Result<(), Error> {
        // Only a resource that asked for release is released; answer
        // anything else (a host that calls anyway) with nothing to do.
        if !self.config.reset_on_release {
            return Ok(());
        }
        release::reset_idle(&*self.source, &*self.sink, &self.gpus, device_ids)
    }

    fn shutdown(self) {
        if let Some((stop, thread)) = self.monitor {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

devhost_abi::export_backend!(Nvidia);

#[cfg(test)]
mod tests;
