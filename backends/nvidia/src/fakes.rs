//! Test doubles: a fake NVML ([`Fake`]) and a recording host ([`Recorder`]).
//! The fake answers like a current driver (versions, compute capability,
//! MIG off) and records every GPU reset, so release can be tested without
//! a GPU.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use devhost_abi::sdk::Health;

use crate::model::{Details, Event, EventSource, Gpu, GpuSource, Link};

/// A GPU with the given index (also its minor) and NUMA node, described
/// as NVML describes an 80 GiB GPU on driver 535.104.05 (CUDA 12.2).
pub fn gpu(uuid: &str, index: u32, numa: Option<i64>) -> Gpu {
    Gpu {
        uuid: uuid.into(),
        index,
        minor: index,
        bus_id: format!("00000000:{:02X}:00.0", index + 1),
        numa_node: numa,
        memory_bytes: 80 << 30,
        mig_enabled: Some(false),
        name: "Fake GPU".into(),
        details: Details {
            // Not semver as NVML spells it (a leading zero).
            driver_version: Some("535.104.05".into()),
            cuda_driver_version: Some(12020),
            compute_capability: Some((9, 0)),
            pcie_root: None,
        },
    }
}

/// A fake NVML: a GPU list, NVLinks between index pairs, probe failures
/// per GPU, a queue of events, processes per GPU, and the resets asked
/// for.
#[derive(Default)]
pub struct Fake {
    pub gpus: Vec<Gpu>,
    pub nvlinks: Vec<(u32, u32, u32)>,
    pub broken: Mutex<Vec<String>>,
    pub events: Mutex<VecDeque<Event>>,
    /// `(uuid, pid)`: processes that have a GPU open.
    pub processes: Mutex<Vec<(String, u32)>>,
    /// `Some(why)`: this NVML cannot reset GPUs at all (like the real one).
    pub cannot_reset: Option<String>,
    /// GPUs whose reset fails.
    pub reset_fails: Mutex<Vec<String>>,
    /// The UUIDs reset so far, in order.
    pub resets: Mutex<Vec<String>>,
}

impl GpuSource for Fake {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Ok(self.gpus.clone())
    }
    fn link(&self, a: &Gpu, b: &Gpu) -> Link {
        let pair = (a.index.min(b.index), a.index.max(b.index));
        let nvlinks = self.nvlinks.iter().find(|(x, y, _)| (*x, *y) == pair).map_or(0, |(_, _, n)| *n);
        Link { nvlinks, pcie: 1 }
    }
    fn probe(&self, uuid: &str) -> Result<(), String> {
        let broken = self.broken.lock().map_err(|_| "poisoned")?;
        if broken.iter().any(|b| b == uuid) { Err("GPU is lost".into()) } else { Ok(()) }
    }
    fn events(&self, _: &[String]) -> Result<(Box<dyn EventSource + '_>, Vec<String>), String> {
        Ok((Box::new(FakeEvents(self)), Vec::new()))
    }
    fn processes(&self, uuid: &str) -> Result<Vec<u32>, String> {
        let processes = self.processes.lock().map_err(|_| "poisoned")?;
        Ok(processes.iter().filter(|(u, _)| u == uuid).map(|(_, pid)| *pid).collect())
    }
    fn can_reset(&self) -> Result<(), String> {
        self.cannot_reset.clone().map_or(Ok(()), Err)
    }
    fn reset(&self, gpu: &Gpu) -> Result<(), String> {
        self.can_reset()?;
        if self.reset_fails.lock().map_err(|_| "poisoned")?.contains(&gpu.uuid) {
            return Err("the GPU did not come back from the reset".into());
        }
        self.resets.lock().map_err(|_| "poisoned")?.push(gpu.uuid.clone());
        Ok(())
    }
}

struct FakeEvents<'a>(&'a Fake);

impl EventSource for FakeEvents<'_> {
    fn wait(&mut self, timeout: Duration) -> Event {
        let next = self.0.events.lock().ok().and_then(|mut q| q.pop_front());
        next.unwrap_or_else(|| {
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            Event::Timeout
        })
    }
}

/// Records what the backend publishes and logs: the SDK's test host.
pub use devhost_abi::sdk::testing::Recorder;

/// The published lists as `(id, health)` pairs, the view these tests use.
pub trait Lists {
    /// Every published list, oldest first.
    fn lists(&self) -> Vec<Vec<(String, Health)>>;
}

impl Lists for Recorder {
    fn lists(&self) -> Vec<Vec<(String, Health)>> {
        self.published().iter().map(|(_, list)| list.iter().map(|d| (d.id.clone(), d.health)).collect()).collect()
    }
}

/// Waits up to 10 s for `check`.
pub fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
