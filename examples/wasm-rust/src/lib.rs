//! A devhost backend written once on the SDK and shipped either way: built
//! for `wasm32-wasip2` it is a sandboxed WASM component, built for the host
//! it is a native `cdylib`. It serves `devices` devices of `resource`; a
//! device is Unhealthy while a file named `<id>.unhealthy` exists in
//! `health_dir` (a directory the operator grants read-only with
//! `[sandbox] read = [...]`). Every device has NUMA node `i % 2`, so the
//! host's default preferred allocation has something to choose by; the
//! backend answers `preferred_allocation` itself (lowest IDs first).
//!
//! Each device also says what it is (ABI 1.1, world 1.1.0): typed
//! attributes of every kind (`example.com/model`, `example.com/firmware`,
//! `example.com/virtual`, and `example.com/releases`, how often `release`
//! freed it) and a capacity (`example.com/memory`). With `release = true`
//! the resource asks for `release`, which has nothing to scrub here and
//! only counts.
//!
//! As a component it has no threads: devhost polls it, and [`Backend::poll`]
//! re-reads the health files then. Built natively, a thread does the same.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use devhost_abi::sdk::{
    Allocation, AttributeValue, Backend, Device, DeviceSpec, Error, Health, Host, LogLevel, PreferredRequest, Resource,
};

#[derive(serde::Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
struct Config {
    resource: String,
    devices: usize,
    health_dir: Option<PathBuf>,
    /// Native build only: how often its thread re-reads the health files.
    poll_interval_ms: u64,
    /// Ask devhost to call `release` once no container holds a device.
    release: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resource: "example.com/wasm-rust".into(),
            devices: 2,
            health_dir: None,
            poll_interval_ms: 1000,
            release: false,
        }
    }
}

/// Reads the health files and publishes the device list.
#[derive(Clone)]
struct Prober {
    config: Config,
    host: Host,
    /// How often `release` freed each device.
    released: Arc<Mutex<BTreeMap<String, i64>>>,
}

impl Prober {
    fn devices(&self) -> Vec<Device> {
        (0..self.config.devices)
            .map(|i| {
                let id = format!("wasm-{i}");
                let flagged =
                    self.config.health_dir.as_ref().is_some_and(|dir| dir.join(format!("{id}.unhealthy")).exists());
                let released = self.released.lock().unwrap_or_else(PoisonError::into_inner).get(&id).copied();
                Device::new(id, if flagged { Health::Unhealthy } else { Health::Healthy })
                    .with_numa_nodes(vec![(i % 2) as i64])
                    .with_attribute("example.com/model", AttributeValue::String("wasm-example".into()))
                    .with_attribute("example.com/firmware", AttributeValue::Version("1.2.0".into()))
                    .with_attribute("example.com/virtual", AttributeValue::Bool(true))
                    .with_attribute("example.com/releases", AttributeValue::Int(released.unwrap_or(0)))
                    .with_capacity("example.com/memory", "1Gi")
            })
            .collect()
    }

    fn publish(&self) -> Result<(), Error> {
        self.host.publish(&self.config.resource, &self.devices()).map_err(|e| Error::new(e.to_string()))
    }
}

struct Example {
    prober: Prober,
    #[cfg(not(target_arch = "wasm32"))]
    stop: std::sync::mpsc::Sender<()>,
    #[cfg(not(target_arch = "wasm32"))]
    thread: std::thread::JoinHandle<()>,
}

impl Backend for Example {
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        let config: Config = devhost_abi::sdk::parse_config(config)?;
        let prober = Prober { config, host, released: Arc::default() };
        prober.publish()?;
        prober.host.log(LogLevel::Info, &format!("serving {} devices", prober.config.devices));
        let mut resource = Resource::new(prober.config.resource.clone()).with_preferred_allocation();
        if prober.config.release {
            resource = resource.with_release();
        }
        let resources = vec![resource];
        #[cfg(not(target_arch = "wasm32"))]
        {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let background = prober.clone();
            let interval = std::time::Duration::from_millis(background.config.poll_interval_ms);
            let thread = std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let _ = background.publish();
                }
            });
            Ok((Example { prober, stop, thread }, resources))
        }
        #[cfg(target_arch = "wasm32")]
        Ok((Example { prober }, resources))
    }

    fn poll(&self) {
        if let Err(error) = self.prober.publish() {
            self.prober.host.log(LogLevel::Warn, &format!("cannot publish: {error}"));
        }
    }

    fn allocate(&self, resource: &str, ids: &[String]) -> Result<Allocation, Error> {
        if resource != self.prober.config.resource {
            return Err(Error::new(format!("unknown resource {resource:?}")));
        }
        let mut answer = Allocation::default();
        answer.envs.insert("EXAMPLE_WASM_DEVICES".into(), ids.join(","));
        answer.annotations.insert("example.com/wasm-devices".into(), ids.join(","));
        for id in ids {
            answer.device_specs.push(DeviceSpec {
                container_path: format!("/dev/example-{id}"),
                host_path: "/dev/null".into(),
                permissions: "rw".into(),
            });
            answer.cdi_devices.push(format!("example.com/wasm={id}"));
        }
        Ok(answer)
    }

    fn release(&self, resource: &str, ids: &[String]) -> Result<(), Error> {
        if resource != self.prober.config.resource {
            return Err(Error::new(format!("unknown resource {resource:?}")));
        }
        // Nothing to scrub: count, so the release shows in the devices'
        // attributes (a component's list at the next poll).
        let mut released = self.prober.released.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            *released.entry(id.clone()).or_default() += 1;
        }
        drop(released);
        self.prober.host.log(LogLevel::Info, &format!("released {}", ids.join(", ")));
        self.prober.publish()
    }

    fn preferred_allocation(&self, _resource: &str, request: &PreferredRequest) -> Result<Option<Vec<String>>, Error> {
        // The required devices first, then the lowest IDs available.
        let mut chosen = request.must_include.clone();
        let mut rest: Vec<&String> = request.available.iter().filter(|id| !chosen.contains(id)).collect();
        rest.sort();
        chosen.extend(rest.into_iter().take(request.size.saturating_sub(chosen.len())).cloned());
        Ok(Some(chosen))
    }

    fn shutdown(self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            drop(self.stop);
            let _ = self.thread.join();
        }
    }
}

devhost_abi::export_backend!(Example);
