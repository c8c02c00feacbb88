//! The data layer between NVML and the backend's logic: what one GPU looks
//! like ([`Gpu`]), how two GPUs are connected ([`Link`]), and the two traits
//! the logic talks to ([`GpuSource`] for discovery and probing,
//! [`EventSource`] for XID events). The real implementations live in
//! [`crate::nvml`]; tests substitute fakes, so nothing outside that module
//! needs a GPU.

use std::time::Duration;

/// One GPU as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// `GPU-…` UUID: the device ID advertised to the kubelet.
    pub uuid: String,
    /// NVML's index (enumeration order).
    pub index: u32,
    /// The minor number: the device node is `/dev/nvidia<minor>`.
    pub minor: u32,
    /// PCI bus ID as NVML reports it (`00000000:3B:00.0`).
    pub bus_id: String,
    /// The NUMA node from sysfs; `None` when the platform reports none (-1).
    pub numa_node: Option<i64>,
    /// Total framebuffer memory in bytes (0 when NVML could not say).
    pub memory_bytes: u64,
    /// Whether MIG mode is currently enabled; `None` when NVML could not
    /// say (a GPU without MIG support reads `Some(false)`).
    pub mig_enabled: Option<bool>,
    /// The product name (empty when NVML could not say).
    pub name: String,
    /// What else NVML says about the GPU, published as attributes only.
    pub details: Details,
}

/// What the backend publishes about a GPU besides its health and NUMA
/// node, as NVML (or sysfs) reports it, unconverted: [`crate::attributes`]
/// turns it into DRA attributes. `None` where NVML could not say (older
/// drivers, fakes), and the attribute is then left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details {
    /// The kernel driver's version as NVML spells it (`550.54.15`).
    pub driver_version: Option<String>,
    /// The CUDA version the driver supports, as NVML encodes it
    /// (`major * 1000 + minor * 10`: 12040 is 12.4).
    pub cuda_driver_version: Option<i32>,
    /// The CUDA compute capability (`(9, 0)` for Hopper).
    pub compute_capability: Option<(i32, i32)>,
    /// The PCIe root complex from sysfs (`pci0000:3a`); filled in by the
    /// backend, not by the [`GpuSource`].
    pub pcie_root: Option<String>,
}

/// One MIG GPU-instance profile of a GPU in MIG mode, as NVML describes it
/// (`nvmlGpuInstanceProfileInfo_v2_t` and the profile's possible
/// placements): what one GPU instance of this profile takes of the GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigProfile {
    /// The profile's ID (`info.id`, what `nvmlDeviceCreateGpuInstance*`
    /// and the placements call take; not the `NVML_GPU_INSTANCE_PROFILE_*`
    /// index it was asked for).
    pub id: u32,
    /// The name without NVML's `MIG ` prefix (`1g.10gb`, `1g.10gb+me`).
    pub name: String,
    /// Compute slices (`sliceCount`: 1 for `1g.*`, 7 for `7g.*`).
    pub slices: u32,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines.
    pub copy_engines: u32,
    /// Video decoders.
    pub decoders: u32,
    /// Video encoders.
    pub encoders: u32,
    /// JPEG engines.
    pub jpeg_engines: u32,
    /// Optical flow accelerators.
    pub ofa_engines: u32,
    /// Framebuffer memory in MiB (`memorySizeMB`, which is MiB).
    pub memory_mib: u64,
    /// Where an instance of the profile can sit, in memory slices.
    pub placements: Vec<Placement>,
}

/// A possible placement of a GPU instance (`nvmlGpuInstancePlacement_t`):
/// the memory slices `start .. start + size` of the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    /// The first memory slice.
    pub start: u32,
    /// How many memory slices.
    pub size: u32,
}

/// How two GPUs talk to each other, as NVML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Link {
    /// Active NVLinks connecting the pair (directly or through NVSwitch).
    pub nvlinks: u32,
    /// PCIe closeness: 0 unknown, 1 across the system (SMP interconnect),
    /// 2 same NUMA node, 3 same host bridge, 4 several PCIe switches,
    /// 5 one PCIe switch, 6 the same board.
    pub pcie: u8,
}

impl Link {
    /// A single number for comparing links: any NVLink beats any PCIe path,
    /// more NVLinks beat fewer, and closer PCIe paths break ties.
    pub fn score(self) -> u64 {
        u64::from(self.nvlinks) * 100 + u64::from(self.pcie)
    }
}

/// One thing NVML reported while waiting for events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A critical-XID event on a GPU; `xid` is `None` when NVML could not
    /// say which (its "unknown" value).
    Xid {
        /// The GPU's UUID.
        uuid: String,
        /// The XID number.
        xid: Option<u64>,
    },
    /// Nothing arrived before the timeout.
    Timeout,
    /// Waiting failed (a GPU fell off the bus, the driver went away); every
    /// GPU is probed at once.
    Failed(String),
}

/// Discovery and probing: the part of NVML the backend's logic uses.
pub trait GpuSource: Send + Sync + 'static {
    /// Every GPU on the node, in index order, with `numa_node` left `None`
    /// (the caller reads it from sysfs).
    fn gpus(&self) -> Result<Vec<Gpu>, String>;

    /// How GPUs `a` and `b` are connected.
    fn link(&self, a: &Gpu, b: &Gpu) -> Link;

    /// Asks NVML whether the GPU is usable; `Err` says why not.
    fn probe(&self, uuid: &str) -> Result<(), String>;

    /// Starts listening for critical XID events on these GPUs. Returns the
    /// source and, per GPU that could not be registered, a warning.
    fn events(&self, uuids: &[String]) -> Result<(Box<dyn EventSource + '_>, Vec<String>), String>;

    /// The IDs of the processes that have the GPU open now (compute and
    /// graphics): a GPU is reset only when this is empty.
    fn processes(&self, uuid: &str) -> Result<Vec<u32>, String>;

    /// Whether [`GpuSource::reset`] can work at all; `Err` says why not.
    /// Asked once at `init` when `reset_on_release` is on, so that an
    /// impossible reset is refused before any GPU is handed out.
    fn can_reset(&self) -> Result<(), String>;

    /// Resets the GPU (an idle one: the caller checked
    /// [`GpuSource::processes`]); `Err` says why it failed.
    fn reset(&self, gpu: &Gpu) -> Result<(), String>;

    /// The MIG GPU-instance profiles of a GPU in MIG mode, each with its
    /// possible placements (profiles the GPU does not support are left
    /// out). Asked once at `init`, only with `mig = "partitions"` and only
    /// for GPUs in MIG mode. `Err` says why not (an NVML without the MIG
    /// calls, a failed call): that GPU is then served whole.
    fn mig_profiles(&self, uuid: &str) -> Result<Vec<MigProfile>, String>;
}

/// A stream of XID events.
pub trait EventSource {
    /// Waits at most `timeout` for the next event.
    fn wait(&mut self, timeout: Duration) -> Event;
}
