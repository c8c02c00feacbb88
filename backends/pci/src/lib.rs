//! devhost's PCI backend: PCI functions found in sysfs (NICs and their
//! SR-IOV VFs, VFIO-bound functions, FPGAs and accelerators), selected per
//! resource by vendor, device, class (with mask), bound driver, PF netdev
//! names with VF index ranges, and PCI addresses. The PCI address is the
//! device ID; NUMA nodes come from sysfs. Allocate gives VFIO group
//! devices for `vfio-pci` functions, else device nodes mapped from sysfs,
//! and `PCIDEVICE_<RESOURCE>` with the addresses. Health: still present,
//! still bound to a selected driver, optionally link up. Every device
//! carries DRA attributes (IDs, driver, SR-IOV role, PCIe root, NUMA node,
//! netdev and link speed). Optional function reset before each container,
//! or on release once no container holds the function (ABI 1.1).
//!
//! It builds natively (a rescan thread) and as a WASM component for
//! `wasm32-wasip2` (the SDK polls it; see README.md for what the sandbox
//! allows). Layout: [`sysfs`] reads, [`config`] parses and selects,
//! [`attributes`] describes, this file tracks state and answers.

#![deny(unsafe_code)]

pub mod attributes;
pub mod config;
pub mod sysfs;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use devhost_abi::sdk::{
    Allocation, AttributeValue, Backend, Device, DeviceSpec, Error, Health, Host, LogLevel, Resource,
};

use devhost_abi::model::DeviceStatus;

use crate::config::{Config, ResourceConfig};
use crate::sysfs::Function;

/// Where device lists go: the host in production, the SDK's recorder in
/// tests.
pub use devhost_abi::sdk::HostApi as Sink;

/// The driver whose functions are handed out as VFIO groups.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// One listed function.
#[derive(Debug, Clone)]
struct Tracked {
    function: Function,
    attributes: BTreeMap<String, AttributeValue>,
    healthy: bool,
    missing_since: Option<Instant>,
}

impl Tracked {
    fn device(&self) -> Device {
        let health = if self.healthy && self.missing_since.is_none() { Health::Healthy } else { Health::Unhealthy };
        let mut device = Device::new(self.function.address.clone(), health);
        device.numa_nodes = self.function.numa.into_iter().collect();
        device.attributes = self.attributes.clone();
        device
    }
}

type Listed = BTreeMap<String, BTreeMap<String, Tracked>>;

struct Shared {
    config: Config,
    listed: Mutex<Listed>,
    /// Attribute warnings already logged: each is logged once, not at
    /// every rescan.
    warned: Mutex<BTreeSet<String>>,
}

fn healthy(resource: &ResourceConfig, f: &Function) -> bool {
    !resource.check_link || f.netdevs.iter().all(|n| sysfs::operstate(f, n).as_deref() == Some("up"))
}

impl Shared {
    fn listed(&self) -> MutexGuard<'_, Listed> {
        // Every update replaces whole entries: a poisoned map is still sound.
        self.listed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads sysfs and publishes the lists that changed (all when `force`).
    fn rescan(&self, sink: &dyn Sink, force: bool) {
        let all = sysfs::functions(&self.config.sysfs_root);
        let now = Instant::now();
        let mut changed = Vec::new();
        let mut warnings = Vec::new();
        {
            let mut listed = self.listed();
            for resource in &self.config.resources {
                let entry = listed.entry(resource.name.clone()).or_default();
                let before: Vec<Device> = entry.values().map(Tracked::device).collect();
                let selected: BTreeMap<&str, &Function> =
                    all.iter().filter(|f| resource.selects(f, &all)).map(|f| (f.address.as_str(), f)).collect();
                for (address, tracked) in entry.iter_mut() {
                    if !selected.contains_key(address.as_str()) && tracked.missing_since.is_none() {
                        tracked.missing_since = Some(now);
                    }
                }
                let grace = self.config.removal_grace;
                entry.retain(|_, t| t.missing_since.is_none_or(|since| now.duration_since(since) < grace));
                for (address, f) in selected {
                    let (attributes, problems) = attributes::describe(f);
                    warnings.extend(problems);
                    let healthy = healthy(resource, f);
                    let tracked = Tracked { function: f.clone(), attributes, healthy, missing_since: None };
                    entry.insert(address.to_owned(), tracked);
                }
                let after: Vec<Device> = entry.values().map(Tracked::device).collect();
                if force || before != after {
                    changed.push((resource.name.clone(), after));
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

/// `PCIDEVICE_<RESOURCE>`: the resource name upper-cased, every other
/// character than `A-Z0-9` as `_` (the SR-IOV device plugin's convention).
pub fn env_name(resource: &str) -> String {
    let name: String =
        resource.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("PCIDEVICE_{name}")
}

/// The functions' sysfs `reset` files must exist and open for writing;
/// says what grant is missing otherwise. `option` is the key that asked
/// for resets (`reset_on_prestart`, `reset_on_release`), named in the
/// message.
fn check_reset(resource: &ResourceConfig, option: &str, functions: &[&Function]) -> Result<(), Error> {
    for f in functions {
        let path = f.dir.join("reset");
        if !path.exists() {
            return Err(Error::new(format!(
                "resource {:?}: {option}: function {} has no {} (the kernel offers no reset method for it)",
                resource.name,
                f.address,
                path.display()
            )));
        }
        if let Err(error) = std::fs::OpenOptions::new().write(true).open(&path) {
            return Err(Error::new(format!(
                "resource {:?}: {option} needs write access to {} ({error}); grant it: for the WASM \
                 build add {:?} to `[sandbox] write` (the native build needs devhost to run as root), or turn \
                 {option} off",
                resource.name,
                path.display(),
                f.dir.display().to_string()
            )));
        }
    }
    Ok(())
}

/// One running instance.
pub struct Pci {
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    #[cfg(not(target_arch = "wasm32"))]
    rescanner: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Pci {
    /// Reads sysfs once, validates what needs the functions (reset
    /// grants), publishes every resource through `sink`, and (native)
    /// starts the rescan thread.
    pub fn start(config: Config, sink: Arc<dyn Sink>) -> Result<(Pci, Vec<Resource>), Error> {
        let all = sysfs::functions(&config.sysfs_root);
        let mut resources = Vec::new();
        for resource in &config.resources {
            let selected: Vec<&Function> = all.iter().filter(|f| resource.selects(f, &all)).collect();
            let mut declared = Resource::new(resource.name.clone());
            if resource.reset_on_prestart {
                check_reset(resource, "reset_on_prestart", &selected)?;
                declared = declared.with_pre_start();
            }
            if resource.reset_on_release {
                check_reset(resource, "reset_on_release", &selected)?;
                declared = declared.with_release();
            }
            resources.push(declared);
        }
        let shared =
            Arc::new(Shared { config, listed: Mutex::new(BTreeMap::new()), warned: Mutex::new(BTreeSet::new()) });
        shared.rescan(sink.as_ref(), true);
        #[cfg(not(target_arch = "wasm32"))]
        let rescanner = {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let (thread_shared, thread_sink) = (Arc::clone(&shared), Arc::clone(&sink));
            let interval = shared.config.rescan_interval;
            let thread = std::thread::Builder::new()
                .name("devhost-pci-rescan".into())
                .spawn(move || {
                    // Until `shutdown` sends (or drops) `stop`.
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                        thread_shared.rescan(thread_sink.as_ref(), false);
                    }
                })
                .map_err(|error| Error::new(format!("cannot start the rescan thread: {error}")))?;
            Some((stop, thread))
        };
        let pci = Pci {
            shared,
            sink,
            #[cfg(not(target_arch = "wasm32"))]
            rescanner,
        };
        Ok((pci, resources))
    }

    fn resource(&self, name: &str) -> Result<&ResourceConfig, Error> {
        self.shared
            .config
            .resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| Error::new(format!("unknown resource {name:?}")))
    }

    fn functions(&self, resource: &str, ids: &[String]) -> Result<Vec<Function>, Error> {
        let listed = self.shared.listed();
        ids.iter()
            .map(|id| {
                let tracked = listed
                    .get(resource)
                    .and_then(|devices| devices.get(id))
                    .ok_or_else(|| Error::new(format!("{resource}: unknown device {id:?}")))?;
                match tracked.missing_since {
                    Some(_) => Err(Error::new(format!("{resource}: PCI function {id} is gone or was rebound"))),
                    None => Ok(tracked.function.clone()),
                }
            })
            .collect()
    }

    /// The Allocate answer for `ids` of `resource`.
    pub fn answer(&self, resource: &str, ids: &[String]) -> Result<Allocation, Error> {
        let config = self.resource(resource)?;
        let functions = self.functions(resource, ids)?;
        let mut answer = Allocation::default();
        let mut add = |path: String| {
            let spec = DeviceSpec { container_path: path.clone(), host_path: path, permissions: "rw".into() };
            if !answer.device_specs.contains(&spec) {
                answer.device_specs.push(spec);
            }
        };
        for f in &functions {
            if f.driver.as_deref() == Some(VFIO_DRIVER) {
                let group = f.iommu_group.as_ref().ok_or_else(|| {
                    Error::new(format!("{resource}: {} is bound to vfio-pci but has no IOMMU group", f.address))
                })?;
                add(format!("/dev/vfio/{group}"));
                add("/dev/vfio/vfio".to_owned());
            } else {
                for map in &config.device_nodes {
                    for name in sysfs::nodes(f, &map.sysfs) {
                        add(map.dev.replace("{name}", &name));
                    }
                }
            }
        }
        let addresses: Vec<&str> = functions.iter().map(|f| f.address.as_str()).collect();
        answer.envs.insert(env_name(resource), addresses.join(","));
        // A DRA claim's status shows each function's network interface
        // (KEP-4817): its netdev on the host and MAC address, for the
        // pod's network setup to find. A function bound to vfio-pci has
        // no netdev and no status.
        for f in &functions {
            let Some(netdev) = f.netdevs.first() else { continue };
            let status = DeviceStatus {
                interface_name: Some(netdev.clone()),
                hardware_address: sysfs::hardware_address(f, netdev),
                ..DeviceStatus::default()
            };
            answer.device_status.insert(f.address.clone(), status);
        }
        Ok(answer)
    }

    /// Resets each function before a container starts, when the resource
    /// has `reset_on_prestart`.
    pub fn reset(&self, resource: &str, ids: &[String]) -> Result<(), Error> {
        if !self.resource(resource)?.reset_on_prestart {
            return Ok(());
        }
        self.write_reset(resource, ids)
    }

    /// Resets each released function (no container holds it any more),
    /// when the resource has `reset_on_release`.
    pub fn release_functions(&self, resource: &str, ids: &[String]) -> Result<(), Error> {
        if !self.resource(resource)?.reset_on_release {
            return Ok(());
        }
        self.write_reset(resource, ids)
    }

    /// Resets each function through its sysfs `reset` file (a function
    /// level reset, or whatever reset method the kernel chose for it).
    fn write_reset(&self, resource: &str, ids: &[String]) -> Result<(), Error> {
        for f in self.functions(resource, ids)? {
            let path = f.dir.join("reset");
            std::fs::write(&path, "1").map_err(|error| {
                Error::new(format!("{resource}: resetting {} ({}): {error}", f.address, path.display()))
            })?;
        }
        Ok(())
    }

    fn stop(&mut self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some((stop, thread)) = self.rescanner.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Pci {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backend for Pci {
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        Pci::start(Config::parse(config)?, Arc::new(host))
    }

    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, Error> {
        self.answer(resource, device_ids)
    }

    fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), Error> {
        self.reset(resource, device_ids)
    }

    fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), Error> {
        self.release_functions(resource, device_ids)
    }

    fn poll(&self) {
        self.shared.rescan(self.sink.as_ref(), false);
    }

    fn shutdown(mut self) {
        self.stop();
    }
}

devhost_abi::export_backend!(Pci);

#[cfg(test)]
mod tests;
