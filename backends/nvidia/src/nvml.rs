//! The real data layer: [`GpuSource`] and [`EventSource`] over NVML
//! through `nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time (no
//! link-time dependency, so the backend builds and loads anywhere and fails
//! cleanly where NVML is absent). Nothing here is reached by the unit
//! tests; everything it returns is plain data for the rest of the crate.
//!
//! The MIG profile calls (`mig = "partitions"`) go through the raw NVML
//! symbols in `mig_ffi`, the crate's one FFI module: nvml-wrapper 0.13's
//! `possible_placements` hands back an empty list (it never sets the
//! length of the vector NVML filled), and it has no call that returns a
//! profile's name. They are looked up when first used, so an NVML
//! without them still loads: its GPUs are then served whole, and the log
//! says why.

use std::ffi::OsStr;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TopologyLevel;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

use crate::model::{Details, Event, EventSource, Gpu, GpuSource, Link, MigProfile};
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
    /// What was loaded, for messages.
    library: String,
}

/// Loads and initialises NVML from `library`; the error is the one line an
/// operator needs.
pub fn load(library: &str) -> Result<NvmlSource, String> {
    match Nvml::builder().lib_path(OsStr::new(library)).init() {
        Ok(nvml) => Ok(NvmlSource { nvml, library: library.to_owned() }),
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

    fn mig_profiles(&self, uuid: &str) -> Result<Vec<MigProfile>, String> {
        let lib = self.nvml.lib();
        let missing = |symbol: &str, error: &dyn std::fmt::Display| {
            format!("{} has no {symbol} ({error}); the NVIDIA driver is too old to list MIG profiles", self.library)
        };
        let info = *lib
            .nvmlDeviceGetGpuInstanceProfileInfoV
            .as_ref()
            .map_err(|e| missing("nvmlDeviceGetGpuInstanceProfileInfoV", e))?;
        let placements = *lib
            .nvmlDeviceGetGpuInstancePossiblePlacements_v2
            .as_ref()
            .map_err(|e| missing("nvmlDeviceGetGpuInstancePossiblePlacements_v2", e))?;
        let device = self.device(uuid)?;
        let mut profiles = Vec::new();
        for index in 0..mig_ffi::PROFILE_COUNT {
            let mut profile = match mig_ffi::profile_info(info, &device, index) {
                Ok(profile) => profile,
                // A profile this GPU does not have.
                Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
                Err(error) => return Err(format!("reading MIG profile {index} failed: {error}")),
            };
            profile.placements = match mig_ffi::placements(placements, &device, profile.id) {
                Ok(list) => list,
                Err(NvmlError::NotSupported) => continue,
                Err(error) => {
                    return Err(format!("reading the placements of MIG profile {} failed: {error}", profile.name));
                }
            };
            profiles.push(profile);
        }
        Ok(profiles)
    }
}

/// The raw NVML MIG calls, with NVML's structs (`nvml-wrapper-sys`).
#[allow(unsafe_code)]
mod mig_ffi {
    use std::ffi::c_uint;

    use nvml_wrapper::Device;
    use nvml_wrapper::error::NvmlError;
    use nvml_wrapper_sys::bindings::{
        NVML_GPU_INSTANCE_PROFILE_COUNT, nvmlDevice_t, nvmlGpuInstancePlacement_t, nvmlGpuInstanceProfileInfo_v2_t,
        nvmlReturn_t,
    };

    use crate::model::{MigProfile, Placement};

    /// `nvmlDeviceGetGpuInstanceProfileInfoV`.
    pub type ProfileInfoV =
        unsafe extern "C" fn(nvmlDevice_t, c_uint, *mut nvmlGpuInstanceProfileInfo_v2_t) -> nvmlReturn_t;
    /// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`.
    pub type PossiblePlacements =
        unsafe extern "C" fn(nvmlDevice_t, c_uint, *mut nvmlGpuInstancePlacement_t, *mut c_uint) -> nvmlReturn_t;

    /// The `NVML_GPU_INSTANCE_PROFILE_*` indices are `0 .. PROFILE_COUNT`.
    pub const PROFILE_COUNT: u32 = NVML_GPU_INSTANCE_PROFILE_COUNT;

    /// `nvmlGpuInstanceProfileInfo_v2`: NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2),
    /// the struct's size with the version in the top byte.
    const PROFILE_INFO_V2: c_uint = size_of::<nvmlGpuInstanceProfileInfo_v2_t>() as c_uint | (2 << 24);

    fn check(code: nvmlReturn_t) -> Result<(), NvmlError> {
        if code == 0 { Ok(()) } else { Err(NvmlError::from(code)) }
    }

    /// The profile at `NVML_GPU_INSTANCE_PROFILE_*` index `index`, without
    /// its placements.
    pub fn profile_info(call: ProfileInfoV, device: &Device<'_>, index: u32) -> Result<MigProfile, NvmlError> {
        // SAFETY: the struct is plain C data (integers and a char array),
        // for which all zero bytes is a valid value.
        let mut info: nvmlGpuInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
        info.version = PROFILE_INFO_V2;
        // SAFETY: `call` is the library's symbol, loaded for as long as
        // the `Nvml` that `device` borrows lives; the handle is that
        // library's, valid while it lives; `info` is a writable v2 struct
        // with its version set, as the call wants.
        check(unsafe { call(device.handle(), index, &mut info) })?;
        let name: Vec<u8> = info.name.iter().take_while(|c| **c != 0).map(|c| c.to_ne_bytes()[0]).collect();
        let name = String::from_utf8_lossy(&name);
        Ok(MigProfile {
            id: info.id,
            name: name.trim().strip_prefix("MIG ").unwrap_or(name.trim()).to_owned(),
            slices: info.sliceCount,
            multiprocessors: info.multiprocessorCount,
            copy_engines: info.copyEngineCount,
            decoders: info.decoderCount,
            encoders: info.encoderCount,
            jpeg_engines: info.jpegCount,
            ofa_engines: info.ofaCount,
            memory_mib: info.memorySizeMB,
            placements: Vec::new(),
        })
    }

    /// The possible placements of profile ID `id` (`info.id`).
    pub fn placements(call: PossiblePlacements, device: &Device<'_>, id: u32) -> Result<Vec<Placement>, NvmlError> {
        let mut count: c_uint = 0;
        // SAFETY: as in `profile_info`; a null array asks NVML for the
        // number of placements only, written to `count`.
        check(unsafe { call(device.handle(), id, std::ptr::null_mut(), &mut count) })?;
        let mut list = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
        let mut filled = count;
        // SAFETY: `list` has `count` writable elements, and `filled` says
        // so to NVML, which writes at most that many and sets how many.
        check(unsafe { call(device.handle(), id, list.as_mut_ptr(), &mut filled) })?;
        list.truncate(filled.min(count) as usize);
        Ok(list.into_iter().map(|p| Placement { start: p.start, size: p.size }).collect())
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
            let device = crate::attributes::device(&gpu, devhost_abi::sdk::Health::Healthy);
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

    /// The e2e tests' fake NVML (`tests/fixtures/native/fake_nvml.c`),
    /// built into `dir` with `defines`, serving `config`.
    fn fake_nvml(dir: &std::path::Path, config: &str, defines: &[&str]) -> String {
        let conf = dir.join("fake-nvml.conf");
        std::fs::write(&conf, config).expect("fake NVML config");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/native/fake_nvml.c");
        let library = dir.join(format!("libfake_nvml{}.so", defines.len()));
        let status = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-shared", "-fPIC", "-pthread", "-o"])
            .arg(&library)
            .arg(format!("-DFAKE_NVML_CONFIG={:?}", conf.display().to_string()))
            .args(defines)
            .arg(source)
            .status()
            .expect("run the C compiler (cc), which the e2e tests need too");
        assert!(status.success(), "compiling {source} failed");
        library.display().to_string()
    }

    /// The fake NVML's lines for `profiles`, at their H100 indices.
    fn profile_lines(profiles: &[MigProfile]) -> String {
        let index = |id: u32| match id {
            19 => 0,
            14 => 1,
            9 => 2,
            5 => 3,
            0 => 4,
            20 => 7,
            15 => 9,
            other => panic!("no H100 profile ID {other}"),
        };
        let mut text = String::new();
        for p in profiles {
            let at: Vec<String> = p.placements.iter().map(|pl| format!("{}:{}", pl.start, pl.size)).collect();
            text += &format!(
                "profile {} {} {} {} {} {} {} {} {} {} {} {}\n",
                index(p.id),
                p.id,
                p.name,
                p.slices,
                p.multiprocessors,
                p.copy_engines,
                p.decoders,
                p.encoders,
                p.jpeg_engines,
                p.ofa_engines,
                p.memory_mib,
                at.join(",")
            );
        }
        text
    }

    /// The raw MIG calls over the fake NVML: every profile with its ID,
    /// name, engines, memory and placements, in index order; nothing for a
    /// GPU not in MIG mode; and a clear error from an NVML without them.
    #[test]
    fn mig_profiles_come_back_through_nvml_s_raw_calls() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut profiles = crate::fakes::h100_profiles();
        // NVML's order is the index order: +me (7) before 1g.20gb (9).
        profiles.insert(5, crate::fakes::one_g_me());
        let config = format!(
            "gpu GPU-0 0 81559 00000000:3B:00.0 NVIDIA H100 80GB HBM3\nmig on\n{}\
             gpu GPU-1 1 81559 00000000:86:00.0 NVIDIA H100 80GB HBM3\n",
            profile_lines(&profiles)
        );
        let source = load(&fake_nvml(dir.path(), &config, &[])).expect("the fake NVML loads");
        let gpus = source.gpus().expect("GPUs");
        let mig: Vec<Option<bool>> = gpus.iter().map(|g| g.mig_enabled).collect();
        assert_eq!(mig, [Some(true), Some(false)]);
        assert_eq!(source.mig_profiles("GPU-0").expect("profiles"), profiles);
        assert_eq!(source.mig_profiles("GPU-1").expect("no MIG, no profiles"), []);
        drop(source);

        let old = load(&fake_nvml(dir.path(), &config, &["-DFAKE_NVML_NO_MIG"])).expect("an older NVML loads");
        let error = old.mig_profiles("GPU-0").expect_err("no MIG calls");
        assert!(
            error.contains("has no nvmlDeviceGetGpuInstanceProfileInfoV (")
                && error.ends_with("); the NVIDIA driver is too old to list MIG profiles"),
            "{error}"
        );
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
