//! The real data layer: [`GpuSource`] and [`EventSource`] over NVML
//! through `nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time (no
//! link-time dependency, so the backend builds and loads anywhere and fails
//! cleanly where NVML is absent). Nothing here is reached by the unit
//! tests; everything it returns is plain data for the rest of the crate.

use std::ffi::OsStr;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TopologyLevel;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

use crate::model::{Details, Event, EventSource, Gpu, GpuSource, Link};
use crate::sysfs::sysfs_names;

/// The most NVLinks one GPU has (NVML_NVLINK_MAX_LINKS in current drivers).
const MAX_NVLINKS: u32 = 18;

/// Why a GPU cannot be reset here: the answer of [`GpuSource::can_reset`]
/// and [`GpuSource::reset`].
///
/// NVML's public API has no call that resets a GPU: its `Reset` functions
/// restore clocks and counters only. `nvml-wrapper-sys` binds every public
/// NVML symbol and none resets a device, so there is no symbol to look up
/// either; `nvidia-smi --gpu-reset` goes through a private driver
/// interface. A PCI function-level reset through sysfs is not used in its
/// place: it would reset the GPU under the bound NVIDIA driver, which
/// resets GPUs only through its own path.
pub const NO_RESET: &str = "NVML has no call that resets a GPU (its public API resets clocks and counters \
only; nvidia-smi --gpu-reset uses a private driver interface)";

/// NVML, initialised.
pub struct NvmlSource {
    nvml: Nvml,
}

/// Loads and initialises NVML from `library`; the error is the one line an
/// operator needs.
pub fn load(library: &str) -> Result<NvmlSource, String> {
    match Nvml::builder().lib_path(OsStr::new(library)).init() {
        Ok(nvml) => Ok(NvmlSource { nvml }),
        Err(NvmlError::LibloadingError(error)) => Err(format!(
            "NVML is not available: {library} could not be loaded ({error}); is the NVIDIA driver installed and the library mounted into the container?"
        )),
        Err(NvmlError::FailedToLoadSymbol(symbol)) => Err(format!(
            "NVML is not usable: {library} has no symbol {symbol} (is the NVIDIA driver too old for this backend?)"
        )),
        Err(error) => Err(format!(
            "NVML is not usable: initialising {library} failed: {error}; is the NVIDIA kernel driver loaded?"
        )),
    }
}

/// `Ok` for success and for "not supported on this GPU": a probe only
/// fails on what the GPU could answer and did not.
fn usable<T>(result: Result<T, NvmlError>, what: &str) -> Result<Option<T>, String> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(error) => Err(format!("{what}: {error}")),
    }
}

/// Whether two bus IDs name the same PCI function, whatever their spelling.
fn same_bus(a: &str, b: &str) -> bool {
    match (sysfs_names(a), sysfs_names(b)) {
        (Some(a), Some(b)) => a[0] == b[0],
        _ => a.eq_ignore_ascii_case(b),
    }
}

impl NvmlSource {
    fn device(&self, uuid: &str) -> Result<Device<'_>, String> {
        self.nvml.device_by_uuid(uuid).map_err(|e| format!("NVML has no usable GPU {uuid}: {e}"))
    }

    /// The remote bus IDs of `device`'s active NVLinks.
    fn nvlink_peers(&self, device: &Device<'_>) -> Vec<String> {
        (0..MAX_NVLINKS)
            .filter_map(|n| {
                let link = device.link_wrapper_for(n);
                match link.is_active() {
                    Ok(true) => link.remote_pci_info().ok().map(|pci| pci.bus_id),
                    _ => None,
                }
            })
            .collect()
    }

    fn gpu(&self, index: u32) -> Result<Gpu, String> {
        let what = |field: &str, e: NvmlError| format!("GPU {index}: reading its {field} failed: {e}");
        let device = self.nvml.device_by_index(index).map_err(|e| what("handle", e))?;
        let uuid = device.uuid().map_err(|e| what("UUID", e))?;
        let minor = device.minor_number().map_err(|e| what("minor number", e))?;
        let bus_id = device.pci_info().map_err(|e| what("PCI info", e))?.bus_id;
        let mig_enabled = match device.mig_mode() {
            Ok(mode) => Some(mode.current == 1),
            // A GPU without MIG cannot have it on.
            Err(NvmlError::NotSupported) => Some(false),
            Err(_) => None,
        };
        // What follows is published, not needed: an older driver without
        // one of these calls just leaves its attribute out.
        let details = Details {
            driver_version: self.nvml.sys_driver_version().ok(),
            cuda_driver_version: self.nvml.sys_cuda_driver_version().ok(),
            compute_capability: device.cuda_compute_capability().ok().map(|cc| (cc.major, cc.minor)),
            pcie_root: None,
        };
        Ok(Gpu {
            uuid,
            index,
            minor,
            bus_id,
            numa_node: None,
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
            mig_enabled,
            name: device.name().unwrap_or_default(),
            details,
        })
    }
}

impl GpuSource for NvmlSource {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        let count = self.nvml.device_count().map_err(|e| format!("NVML could not count the GPUs: {e}"))?;
        (0..count).map(|index| self.gpu(index)).collect()
    }

    fn link(&self, a: &Gpu, b: &Gpu) -> Link {
        let (Ok(da), Ok(db)) = (self.device(&a.uuid), self.device(&b.uuid)) else { return Link::default() };
        let (peers_a, peers_b) = (self.nvlink_peers(&da), self.nvlink_peers(&db));
        let direct = peers_a.iter().filter(|peer| same_bus(peer, &b.bus_id)).count();
        // Links to something that is not a GPU go to an NVSwitch, which
        // connects every GPU on it with the narrower side's links.
        let switched =
            |peers: &[String]| peers.iter().filter(|p| self.nvml.device_by_pci_bus_id(p.as_str()).is_err()).count();
        let nvlinks = if direct > 0 { direct } else { switched(&peers_a).min(switched(&peers_b)) };
        let pcie = match da.topology_common_ancestor(db) {
            Ok(TopologyLevel::Internal) => 6,
            Ok(TopologyLevel::Single) => 5,
            Ok(TopologyLevel::Multiple) => 4,
            Ok(TopologyLevel::HostBridge) => 3,
            Ok(TopologyLevel::Node) => 2,
            Ok(TopologyLevel::System) => 1,
            Err(_) => 0,
        };
        Link { nvlinks: u32::try_from(nvlinks).unwrap_or(u32::MAX), pcie }
    }

    fn probe(&self, uuid: &str) -> Result<(), String> {
        let device = self.device(uuid)?;
        usable(device.memory_info(), "reading its memory failed")?;
        if usable(device.are_pages_pending_retired(), "reading its page retirement failed")? == Some(true) {
            return Err("ECC page retirement is pending: the GPU needs a reset".into());
        }
        Ok(())
    }

    fn events(&self, uuids: &[String]) -> Result<(Box<dyn EventSource + '_>, Vec<String>), String> {
        let new_set = || self.nvml.create_event_set().map_err(|e| format!("NVML could not create an event set: {e}"));
        let mut set = new_set()?;
        let mut registered: Vec<&String> = Vec::new();
        let mut warnings = Vec::new();
        for uuid in uuids {
            let device = self.device(uuid)?;
            match device.supported_event_types() {
                Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => {}
                _ => {
                    warnings.push(format!("GPU {uuid} does not report XID events; only probes watch its health"));
                    continue;
                }
            }
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(kept) => {
                    set = kept;
                    registered.push(uuid);
                }
                Err(error) => {
                    // A failed registration frees the set: build it again.
                    warnings.push(format!(
                        "GPU {uuid}: registering for XID events failed ({}); only probes watch its health",
                        error.error
                    ));
                    set = new_set()?;
                    for uuid in &registered {
                        set = self
                            .device(uuid)?
                            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                            .map_err(|e| format!("GPU {uuid}: registering for XID events again failed: {}", e.error))?;
                    }
                }
            }
        }
        Ok((Box::new(NvmlEvents { set }), warnings))
    }

    fn processes(&self, uuid: &str) -> Result<Vec<u32>, String> {
        let device = self.device(uuid)?;
        let mut pids = Vec::new();
        let lists =
            [("compute", device.running_compute_processes()), ("graphics", device.running_graphics_processes())];
        for (kind, list) in lists {
            match list {
                Ok(list) => pids.extend(list.into_iter().map(|p| p.pid)),
                // A GPU that cannot list one kind has none of that kind.
                Err(NvmlError::NotSupported) => {}
                Err(error) => return Err(format!("listing its {kind} processes failed: {error}")),
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn can_reset(&self) -> Result<(), String> {
        Err(NO_RESET.to_owned())
    }

    fn reset(&self, gpu: &Gpu) -> Result<(), String> {
        Err(format!("GPU {} ({}) cannot be reset: {NO_RESET}", gpu.uuid, gpu.bus_id))
    }
}

/// XID events from an NVML event set.
struct NvmlEvents<'n> {
    set: EventSet<'n>,
}

impl EventSource for NvmlEvents<'_> {
    fn wait(&mut self, timeout: Duration) -> Event {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        match self.set.wait(ms) {
            Ok(data) if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) => match data.device.uuid() {
                Ok(uuid) => {
                    let xid = match data.event_data {
                        Some(XidError::Value(xid)) => Some(xid),
                        Some(XidError::Unknown) | None => None,
                    };
                    Event::Xid { uuid, xid }
                }
                Err(error) => {
                    Event::Failed(format!("an XID event came from a GPU whose UUID NVML cannot read: {error}"))
                }
            },
            Ok(_) | Err(NvmlError::Timeout) => Event::Timeout,
            Err(error) => Event::Failed(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_compare_across_spellings() {
        assert!(same_bus("00000000:3B:00.0", "0000:3b:00.0"));
        assert!(!same_bus("00000000:3B:00.0", "00000000:3C:00.0"));
    }

    /// Runs against real NVML where there is one; skips with a message
    /// where there is not (CI, this project's machines).
    #[test]
    fn real_nvml_enumerates_and_probes_or_skips() {
        let source = match load(crate::config::DEFAULT_LIBRARY) {
            Ok(source) => source,
            Err(error) => {
                eprintln!("skipped: needs NVML and an NVIDIA GPU: {error}");
                return;
            }
        };
        let gpus = source.gpus().expect("NVML lists the GPUs");
        for gpu in &gpus {
            eprintln!("{gpu:?}");
            assert!(gpu.uuid.starts_with("GPU-") || gpu.uuid.starts_with("MIG-"), "{}", gpu.uuid);
            source.probe(&gpu.uuid).expect("a GPU in service probes usable");
            // Read-only: listing processes changes nothing on the GPU.
            eprintln!("processes on {}: {:?}", gpu.uuid, source.processes(&gpu.uuid).expect("NVML lists processes"));
            // The attributes of a real GPU pass DRA's rules, and a current
            // driver answers every call they come from.
            let mut gpu = gpu.clone();
            gpu.details.pcie_root = crate::sysfs::pcie_root(std::path::Path::new("/sys"), &gpu.bus_id);
            let device = crate::health::device(&gpu, devhost_abi::sdk::Health::Healthy);
            eprintln!("attributes: {:?}, capacities: {:?}", device.attributes, device.capacities);
            devhost_abi::sdk::testing::assert_valid_device(&device);
            for name in [
                crate::attributes::DRIVER_VERSION,
                crate::attributes::CUDA_DRIVER_VERSION,
                crate::attributes::PCIE_ROOT,
            ] {
                assert!(device.attributes.contains_key(name), "{name} missing on a real GPU: {:?}", device.attributes);
            }
            assert!(device.capacities.contains_key(crate::attributes::MEMORY));
        }
        assert!(source.can_reset().is_err(), "NVML cannot reset a GPU; and a real GPU is never reset here");
        let uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
        let (mut events, warnings) = source.events(&uuids).expect("an event set");
        eprintln!("event warnings: {warnings:?}");
        assert!(matches!(events.wait(Duration::from_millis(10)), Event::Timeout | Event::Xid { .. }));
    }

    #[test]
    fn a_missing_library_gives_one_clear_message() {
        let error = load("libdevhost-no-such-nvml.so.1").err().expect("no such library");
        assert!(
            error.starts_with("NVML is not available: libdevhost-no-such-nvml.so.1 could not be loaded ("),
            "{error}"
        );
        assert!(
            error.ends_with("); is the NVIDIA driver installed and the library mounted into the container?"),
            "{error}"
        );
    }
}
