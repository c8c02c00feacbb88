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
//! devhost for `release` and resets idle GPUs then. With
//! `mig = "partitions"` a GPU in MIG mode is also published as DRA's
//! partitionable devices: a counter set and one device per possible MIG
//! placement ([`mig`]).
//!
//! Layout: [`model`] is the data layer between NVML and the logic;
//! [`nvml`] implements it over NVML; [`config`], [`xid`], [`sysfs`],
//! [`topology`], [`allocate`], [`health`], [`attributes`], [`mig`] and [`release`]
//! are the logic, tested without a GPU. Where NVML is absent, `init` fails
//! with one message and nothing is registered.

#![deny(unsafe_code)]

pub mod allocate;
pub mod attributes;
pub mod config;
#[cfg(test)]
mod fakes;
pub mod health;
pub mod mig;
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

use crate::config::{Config, Mig};
use crate::health::{HealthTracker, Monitor, Sink, monitor};
use crate::mig::Layout;
use crate::model::{Event, EventSource, Gpu, GpuSource};
use crate::topology::Topology;

/// One running instance: the GPUs found at `init`, their topology, the
/// health thread, and NVML and the host for `release`.
pub struct Nvidia {
    config: Config,
    gpus: Arc<Vec<Gpu>>,
    layout: Arc<Layout>,
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
            if gpu.mig_enabled == Some(true) && config.mig == Mig::Off {
                sink.log(
                    LogLevel::Warn,
                    &format!(
                        "GPU {}: MIG mode is on; it is served whole (MIG devices are not resources yet)",
                        gpu.uuid
                    ),
                );
            }
        }
        let layout = match config.mig {
            Mig::Off => Layout::default(),
            Mig::Partitions => mig_layout(&gpus, &*source, &*sink),
        };
        let topology = Topology::new(&gpus, |a, b| source.link(a, b));
        let devices = layout.devices(&gpus, |_| Health::Healthy);
        sink.publish(&config.resource, &devices).map_err(|error| Error::new(error.to_string()))?;
        let (gpus, layout) = (Arc::new(gpus), Arc::new(layout));
        let monitor =
            config.health.then(|| spawn_monitor(&config, source.clone(), sink.clone(), gpus.clone(), layout.clone()));
        let resource = Resource::new(config.resource.clone()).with_preferred_allocation();
        let resource = if config.reset_on_release { resource.with_release() } else { resource };
        let resource = layout.counter_sets().into_iter().fold(resource, Resource::with_counter_set);
        Ok((Nvidia { config, gpus, layout, topology, source, sink, monitor }, vec![resource]))
    }
}

/// With `mig = "partitions"`: each GPU in MIG mode's partitions, from its
/// MIG profiles, logging what is published and what is left out (and why)
/// once, at `init`. A GPU whose profiles NVML cannot give is served whole.
fn mig_layout(gpus: &[Gpu], source: &dyn GpuSource, sink: &dyn Sink) -> Layout {
    let mut layout = Layout { gpus: Vec::with_capacity(gpus.len()), typed: false };
    for gpu in gpus {
        let planned = match gpu.mig_enabled {
            Some(true) => match source.mig_profiles(&gpu.uuid) {
                Ok(profiles) => {
                    let (planned, warnings) = mig::plan(gpu, &profiles);
                    for warning in warnings {
                        sink.log(LogLevel::Warn, &warning);
                    }
                    planned
                }
                Err(error) => {
                    sink.log(
                        LogLevel::Warn,
                        &format!("GPU {}: no MIG partitions are published, it is served whole: {error}", gpu.uuid),
                    );
                    None
                }
            },
            _ => None,
        };
        if let Some(p) = &planned {
            let profiles: std::collections::BTreeSet<&str> =
                p.partitions.iter().map(|p| p.profile.name.as_str()).collect();
            sink.log(
                LogLevel::Info,
                &format!(
                    "GPU {}: MIG mode is on; published as counter set {} with {} MIG partitions ({}) besides the \
                     whole GPU",
                    gpu.uuid,
                    p.counter_set.name,
                    p.partitions.len(),
                    profiles.into_iter().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        layout.gpus.push(planned);
    }
    // Types only where there is something to tell apart: a node without
    // partitions publishes exactly what it did without the option.
    layout.typed = layout.gpus.iter().any(Option::is_some);
    layout
}

fn spawn_monitor(
    config: &Config,
    source: Arc<dyn GpuSource>,
    sink: Arc<dyn Sink>,
    gpus: Arc<Vec<Gpu>>,
    layout: Arc<Layout>,
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
        let (resource, layout) = (&resource[..], &*layout);
        let m = Monitor { source: &*source, sink: &*sink, resource, gpus: &gpus, layout, tracker, interval };
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
        allocate::allocation(&self.gpus, &self.layout, device_ids, &self.config.dev_root, self.config.cdi)
    }

    fn preferred_allocation(&self, _resource: &str, request: &PreferredRequest) -> Result<Option<Vec<String>>, Error> {
        // The topology knows whole GPUs only: no preference among partitions.
        let ids = request.available.iter().chain(&request.must_include);
        if ids.into_iter().any(|id| self.layout.partition(&self.gpus, id).is_some()) {
            return Ok(None);
        }
        self.topology.preferred(&request.available, &request.must_include, request.size).map(Some).map_err(Error::new)
    }

    fn release(&self, _resource: &str, device_ids: &[String]) -> Result<(), Error> {
        // Only a resource that asked for release is released; answer
        // anything else (a host that calls anyway) with nothing to do.
        if !self.config.reset_on_release {
            return Ok(());
        }
        // A partition is never created on the GPU (README: MIG), so there is
        // nothing of it to reset.
        let gpus: Vec<String> =
            device_ids.iter().filter(|id| self.layout.partition(&self.gpus, id).is_none()).cloned().collect();
        release::reset_idle(&*self.source, &*self.sink, &self.gpus, &gpus)
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
#[cfg(test)]
mod tests_mig;
