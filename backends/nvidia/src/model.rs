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
    /// Whether MIG mode is currently enabled.
    pub mig_enabled: bool,
    /// The product name, for logs.
    pub name: String,
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
}

/// A stream of XID events.
pub trait EventSource {
    /// Waits at most `timeout` for the next event.
    fn wait(&mut self, timeout: Duration) -> Event;
}
