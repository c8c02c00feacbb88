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
//! With `partitions = true` (ABI 1.2, world 1.2.0) it serves a partitioned
//! GPU and a shared NIC instead: the resource declares the counter set
//! `gpu-0-counters` (`memory` 40Gi, `slices` 8), which `gpu-0` (the whole
//! GPU) and its halves `gpu-0-half-0` and `gpu-0-half-1` consume, and
//! `nic-0` is shared by several DRA claims, each consuming part of its
//! `example.com/bandwidth` (10G; default 1G, 1G to 8G in steps of 1G).
//! `allocate_shared` puts what a claim consumes into
//! `EXAMPLE_WASM_SHARES` (`nic-0:example.com/bandwidth=2G`). With
//! `device_status = true` each allocation also reports a device status per
//! device (interface `ex-<id>`, address `10.0.0.5/24`, data `{"id": ...}`).
//!
//! As a component it has no threads: devhost polls it, and [`Backend::poll`]
//! re-reads the health files then. Built natively, a thread does the same.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use devhost_abi::model::{CounterSet, DeviceStatus, RequestPolicy, Share, ValidRequests};
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
    /// Serve a partitioned GPU and a shared NIC (ABI 1.2) instead.
    partitions: bool,
    /// Report a device status for each allocated device (ABI 1.2).
    device_status: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resource: "example.com/wasm-rust".into(),
            devices: 2,
            health_dir: None,
            poll_interval_ms: 1000,
            release: false,
            partitions: false,
            device_status: false,
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
        if self.config.partitions {
            return partitioned();
        }
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

/// The counter set of the partitioned GPU (`partitions = true`).
fn gpu_counters() -> CounterSet {
    CounterSet::new("gpu-0-counters", [("memory", "40Gi"), ("slices", "8")])
}

/// The partitioned GPU and the shared NIC (`partitions = true`): the whole
/// GPU and its two halves consume `gpu-0-counters`; `nic-0` is shared.
fn partitioned() -> Vec<Device> {
    let whole = Device::healthy("gpu-0").consuming("gpu-0-counters", [("memory", "40Gi"), ("slices", "8")]);
    let halves = (0..2).map(|i| {
        Device::healthy(format!("gpu-0-half-{i}")).consuming("gpu-0-counters", [("memory", "20Gi"), ("slices", "4")])
    });
    let policy = RequestPolicy {
        default: Some("1G".into()),
        valid: Some(ValidRequests::Range { min: "1G".into(), max: Some("8G".into()), step: Some("1G".into()) }),
    };
    let nic = Device::healthy("nic-0")
        .with_capacity("example.com/bandwidth", "10G")
        .with_request_policy("example.com/bandwidth", policy);
    std::iter::once(whole).chain(halves).chain(std::iter::once(nic)).collect()
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
        if prober.config.partitions {
            resource = resource.with_counter_set(gpu_counters());
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
            if self.prober.config.device_status {
                let status = DeviceStatus {
                    interface_name: Some(format!("ex-{id}")),
                    hardware_address: Some("02:00:00:00:00:01".into()),
                    ips: vec!["10.0.0.5/24".into()],
                    data: Some(format!("{{\"id\":{id:?}}}")),
                };
                answer.device_status.insert(id.clone(), status);
            }
        }
        Ok(answer)
    }

    fn allocate_shared(&self, resource: &str, ids: &[String], shares: &[(String, Share)]) -> Result<Allocation, Error> {
        let mut answer = self.allocate(resource, ids)?;
        // What this claim consumes of each shared device: two claims on
        // `nic-0` each see their own amount.
        let consumed: Vec<String> = shares
            .iter()
            .flat_map(|(id, share)| share.consumed.iter().map(move |(name, amount)| format!("{id}:{name}={amount}")))
            .collect();
        answer.envs.insert("EXAMPLE_WASM_SHARES".into(), consumed.join(","));
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
