//! Test doubles: a fake NVML ([`Fake`]) and a recording host ([`Recorder`]).
//! The fake answers like a current driver (versions, compute capability,
//! MIG off) and records every GPU reset, so release can be tested without
//! a GPU.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use devhost_abi::sdk::Health;

use crate::model::{Details, Event, EventSource, Gpu, GpuSource, Link, MigProfile, Placement};

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

/// The MIG profiles of an H100 80GB as NVML lists them (the same figures
/// as `nvidia-smi mig -lgip`, and as `tests/fixtures/native/fake_nvml.c`'s
/// e2e configuration), in `NVML_GPU_INSTANCE_PROFILE_*` order: 1g.10gb at
/// slices 0..6, 1g.20gb at 0, 2, 4, 6, 2g.20gb at 0, 2, 4, 3g.40gb at 0
/// and 4, 4g.40gb and 7g.80gb at 0. The `+me` profile is left out (see
/// [`one_g_me`]).
pub fn h100_profiles() -> Vec<MigProfile> {
    let at = |starts: &[u32], size: u32| starts.iter().map(|&start| Placement { start, size }).collect();
    let profile = |id, name: &str, slices, sms, engines, memory_mib, placements| MigProfile {
        id,
        name: name.into(),
        slices,
        multiprocessors: sms,
        copy_engines: engines,
        decoders: engines,
        encoders: 0,
        jpeg_engines: engines,
        ofa_engines: u32::from(slices == 7),
        memory_mib,
        placements,
    };
    vec![
        profile(19, "1g.10gb", 1, 16, 1, 9984, at(&[0, 1, 2, 3, 4, 5, 6], 1)),
        profile(14, "2g.20gb", 2, 32, 2, 20096, at(&[0, 2, 4], 2)),
        profile(9, "3g.40gb", 3, 60, 3, 40448, at(&[0, 4], 4)),
        profile(5, "4g.40gb", 4, 64, 4, 40448, at(&[0], 4)),
        profile(0, "7g.80gb", 7, 132, 7, 81152, at(&[0], 8)),
        profile(15, "1g.20gb", 1, 16, 1, 20096, at(&[0, 2, 4, 6], 2)),
    ]
}

/// H100's `1g.10gb+me`: one compute slice with every media engine (7
/// decoders and JPEG engines, the one OFA), at slices 0..6.
pub fn one_g_me() -> MigProfile {
    MigProfile {
        id: 20,
        name: "1g.10gb+me".into(),
        decoders: 7,
        jpeg_engines: 7,
        ofa_engines: 1,
        ..h100_profiles()[0].clone()
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
    /// Per GPU UUID, what `mig_profiles` answers (none listed: no profiles).
    pub mig: Vec<(String, Result<Vec<MigProfile>, String>)>,
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
    fn mig_profiles(&self, uuid: &str) -> Result<Vec<MigProfile>, String> {
        self.mig.iter().find(|(u, _)| u == uuid).map_or(Ok(Vec::new()), |(_, answer)| answer.clone())
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
