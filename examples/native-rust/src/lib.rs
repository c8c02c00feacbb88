//! The smallest native devhost backend in Rust: two devices of
//! `example.com/native-rust`, one of which a background thread flips between
//! Healthy and Unhealthy on a timer, pushing each change to the host. Its
//! `allocate` answers with every kind of result the ABI carries.
//!
//! Config (`[config]` in its `backends.d` file): `resource`, `devices`
//! (how many) and `flip_interval_ms`.

#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use devhost_abi::sdk::{Allocation, Backend, Device, DeviceSpec, Error, Health, Host, Mount, Resource};

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    resource: String,
    devices: usize,
    flip_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { resource: "example.com/native-rust".into(), devices: 2, flip_interval_ms: 1000 }
    }
}

struct Example {
    stop: mpsc::Sender<()>,
    flipper: JoinHandle<()>,
}

fn devices(count: usize, last_healthy: bool) -> Vec<Device> {
    let health = |i| if i + 1 == count && !last_healthy { Health::Unhealthy } else { Health::Healthy };
    (0..count).map(|i| Device::new(format!("rust-{i}"), health(i))).collect()
}

impl Backend for Example {
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        let config: Config = devhost_abi::sdk::parse_config(config)?;
        host.publish(&config.resource, &devices(config.devices, true)).map_err(|e| e.to_string())?;
        let (stop, stopped) = mpsc::channel();
        let (resource, count) = (config.resource.clone(), config.devices);
        let healthy = Arc::new(AtomicBool::new(true));
        let flipper = std::thread::spawn(move || {
            // Wakes on every tick until `shutdown` sends (or drops) `stop`.
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(config.flip_interval_ms))
            {
                let now = !healthy.fetch_xor(true, Ordering::Relaxed);
                let _ = host.publish(&resource, &devices(count, now));
            }
        });
        Ok((Example { stop, flipper }, vec![Resource::new(config.resource).with_preferred_allocation()]))
    }

    fn allocate(&self, _resource: &str, ids: &[String]) -> Result<Allocation, Error> {
        let mut answer = Allocation::default();
        answer.envs.insert("EXAMPLE_DEVICES".into(), ids.join(","));
        answer.annotations.insert("example.com/devices".into(), ids.join(","));
        for id in ids {
            let (container_path, host_path) = (format!("/var/run/example/{id}"), format!("/run/example/{id}"));
            answer.mounts.push(Mount { container_path, host_path, read_only: true });
            let (container_path, host_path) = (format!("/dev/example-{id}"), "/dev/null".to_owned());
            answer.device_specs.push(DeviceSpec { container_path, host_path, permissions: "rw".into() });
            answer.cdi_devices.push(format!("example.com/device={id}"));
        }
        Ok(answer)
    }

    fn preferred_allocation(
        &self,
        _resource: &str,
        request: &devhost_abi::sdk::PreferredRequest,
    ) -> Result<Option<Vec<String>>, Error> {
        // The required devices first, then the highest-numbered ones.
        let rest = request.available.iter().rev().filter(|id| !request.must_include.contains(id));
        Ok(Some(request.must_include.iter().chain(rest).take(request.size).cloned().collect()))
    }

    fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.flipper.join();
    }
}

devhost_abi::export_backend!(Example);
