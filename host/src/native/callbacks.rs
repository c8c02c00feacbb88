//! The host's side of the ABI: the static callback table every native
//! backend receives, the per-instance [`HostContext`] behind
//! `DevhostHost *`, and the per-call [`CallSink`] behind `DevhostCall *`.
//!
//! Every callback copies what it is given during the call, checks it against
//! the contract (UTF-8, struct sizes, known health values, the call it is
//! allowed in) and never lets a panic cross back into C. Invalid data is
//! refused with `DEVHOST_E_INVALID` and remembered with a precise message, so
//! the backend call that sent it fails with that message even if the backend
//! ignores the status. This module does not call into backends.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, PoisonError};

use devhost_abi::ffi::*;

use super::read::{read_counter_sets, read_device_status, read_devices, read_str, read_struct, read_struct_from};
use crate::backend::{Allocation, DeviceSpec, Mount, ResourceSpec};
use crate::device_state::Publisher;

/// The one callback table of this process; backends may keep the pointer.
pub(super) static HOST_API: DevhostHostApi = DevhostHostApi {
    struct_size: size_of_u32::<DevhostHostApi>(),
    abi_version: DEVHOST_ABI_VERSION,
    publish,
    log,
    set_error,
    add_resource,
    add_env,
    add_mount,
    add_device_spec,
    add_annotation,
    add_cdi_device,
    add_device_id,
    add_device_status,
};

/// What stands behind one `DevhostHost *`: the module it belongs to and the
/// publisher of the instance's resources. Leaked on purpose, so a backend
/// thread that publishes late gets `DEVHOST_E_CLOSED`, never a dangling
/// pointer; it is a few dozen bytes per (re-)initialisation.
pub(super) struct HostContext {
    module: String,
    state: Mutex<ContextState>,
}

struct ContextState {
    /// `None` once the instance is shut down.
    publisher: Option<Publisher>,
    /// Set while `init` runs: a refused publish then fails `init`.
    in_init: bool,
    /// The first publish refused during `init`.
    init_error: Option<String>,
}

impl HostContext {
    /// An open context for one instance of `module`.
    pub(super) fn open(module: String, publisher: Publisher) -> &'static HostContext {
        let state = ContextState { publisher: Some(publisher), in_init: true, init_error: None };
        Box::leak(Box::new(HostContext { module, state: Mutex::new(state) }))
    }

    /// The pointer handed to the backend.
    pub(super) fn as_ptr(&'static self) -> *mut DevhostHost {
        std::ptr::from_ref(self).cast_mut().cast()
    }

    /// Ends the `init` phase; returns the first publish refused during it.
    pub(super) fn end_init(&self) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.in_init = false;
        state.init_error.take()
    }

    /// Refuses every later publish. Waits for a publish in progress, so
    /// nothing from this instance lands after it returns.
    pub(super) fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).publisher = None;
    }
}

/// Which backend call a [`CallSink`] collects for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Init,
    Allocate,
    /// ABI 1.2's `allocate_shared`: results as for `allocate`.
    AllocateShared,
    PreferredAllocation,
    PreStart,
    Release,
    Poll,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::Allocate => "allocate",
            Phase::AllocateShared => "allocate_shared",
            Phase::PreferredAllocation => "preferred_allocation",
            Phase::PreStart => "pre_start",
            Phase::Release => "release",
            Phase::Poll => "poll",
        }
    }
}

/// What one backend call handed over through the result callbacks.
#[derive(Debug, Default)]
pub(super) struct Collected {
    /// The message given with `set_error` (the last one).
    pub error: Option<String>,
    /// The first contract violation seen during the call.
    pub invalid: Option<String>,
    pub resources: Vec<ResourceSpec>,
    pub allocation: Allocation,
    pub device_ids: Vec<String>,
}

/// What stands behind one `DevhostCall *`; lives on the caller's stack for
/// the duration of the backend call. Locked because a backend may hand over
/// results from several of its threads during the call.
pub(super) struct CallSink {
    phase: Phase,
    /// The device IDs the call is about (`allocate`, `allocate_shared`):
    /// the only devices a status may be given for.
    device_ids: Vec<String>,
    collected: Mutex<Collected>,
}

/// The phases an allocation's results (`add_env`, `add_mount`, ...) are
/// allowed in.
const ALLOCATING: &[Phase] = &[Phase::Allocate, Phase::AllocateShared];

impl CallSink {
    pub(super) fn new(phase: Phase) -> Self {
        CallSink::with_devices(phase, &[])
    }

    /// A sink for a call about `device_ids`.
    pub(super) fn with_devices(phase: Phase, device_ids: &[String]) -> Self {
        CallSink { phase, device_ids: device_ids.to_vec(), collected: Mutex::new(Collected::default()) }
    }

    /// The pointer handed to the backend; valid while `self` is.
    pub(super) fn as_ptr(&self) -> *mut DevhostCall {
        std::ptr::from_ref(self).cast_mut().cast()
    }

    pub(super) fn into_inner(self) -> Collected {
        self.collected.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs a result callback: checks the call pointer and the phase, records
/// the first violation, and keeps panics on this side of the boundary.
fn with_call(
    call: *mut DevhostCall,
    callback: &str,
    allowed: &[Phase],
    f: impl FnOnce(&mut Collected) -> Result<(), String>,
) -> i32 {
    with_call_on(call, callback, allowed, |collected, _| f(collected))
}

/// [`with_call`] for a callback that also needs the call's device IDs.
fn with_call_on(
    call: *mut DevhostCall,
    callback: &str,
    allowed: &[Phase],
    f: impl FnOnce(&mut Collected, &[String]) -> Result<(), String>,
) -> i32 {
    // SAFETY: a non-NULL `call` is the `CallSink` the host passed to the
    // backend call now running (the ABI makes it valid only during it).
    let Some(sink) = (unsafe { call.cast::<CallSink>().as_ref() }) else {
        tracing::error!(callback, "native backend passed a NULL DevhostCall");
        return DEVHOST_E_INVALID;
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut collected = sink.collected.lock().unwrap_or_else(PoisonError::into_inner);
        let (code, violation) = if !allowed.contains(&sink.phase) {
            let allowed: Vec<&str> = allowed.iter().map(|phase| phase.name()).collect();
            let message = format!(
                "called {callback} during {}; it is allowed only during {}",
                sink.phase.name(),
                allowed.join(" or ")
            );
            (DEVHOST_E_WRONG_CALL, Some(message))
        } else {
            match f(&mut collected, &sink.device_ids) {
                Ok(()) => (DEVHOST_OK, None),
                Err(message) => (DEVHOST_E_INVALID, Some(message)),
            }
        };
        if let Some(message) = violation {
            collected.invalid.get_or_insert(message);
        }
        code
    }));
    result.unwrap_or(DEVHOST_E_INTERNAL)
}

unsafe extern "C" fn publish(
    host: *mut DevhostHost,
    resource: DevhostStr,
    devices: *const DevhostDevice,
    count: usize,
) -> i32 {
    // SAFETY: a non-NULL `host` is a leaked, never-freed `HostContext`.
    let Some(ctx) = (unsafe { host.cast::<HostContext>().as_ref() }) else {
        tracing::error!("native backend called publish with a NULL DevhostHost");
        return DEVHOST_E_INVALID;
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut state = ctx.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(publisher) = state.publisher.clone() else {
            tracing::warn!(backend = %ctx.module, "native backend published after its shutdown; ignored");
            return DEVHOST_E_CLOSED;
        };
        // SAFETY: the ABI makes `resource` and `devices` valid during the call.
        let outcome = unsafe { read_str(resource, "the resource name") }.and_then(|resource| {
            // SAFETY: as above.
            let devices = unsafe { read_devices(devices, count, &resource)? };
            publisher.publish(&resource, devices).map_err(|error| error.to_string())
        });
        match outcome {
            Ok(()) => DEVHOST_OK,
            Err(message) => {
                let message = format!("published an invalid device list: {message}");
                tracing::warn!(backend = %ctx.module, "{message}");
                if state.in_init {
                    state.init_error.get_or_insert(message);
                }
                DEVHOST_E_INVALID
            }
        }
    }));
    result.unwrap_or(DEVHOST_E_INTERNAL)
}

unsafe extern "C" fn log(host: *mut DevhostHost, level: u32, message: DevhostStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a non-NULL `host` is a leaked, never-freed `HostContext`.
        let module = unsafe { host.cast::<HostContext>().as_ref() }.map_or("(entry point)", |ctx| &ctx.module);
        // Limited before anything is copied: a module logging in a tight
        // loop costs a lock per line, not the log (in a worker: not the
        // socket to devhost either, which limits again).
        let limiter = crate::log_limit::api_log(module);
        let verdict = limiter.check();
        if let Some(dropped) = verdict.summary {
            tracing::warn!(backend = %module, dropped, "{}", crate::log_limit::LOG_DROPPED);
        }
        if !verdict.admit {
            return;
        }
        // SAFETY: the ABI makes `message` valid during the call.
        let text = unsafe { read_str(message, "the log message") }.unwrap_or_else(|error| error);
        let text = crate::log_limit::cut(text.as_bytes(), text.len(), limiter.policy().max_line);
        match level {
            DEVHOST_LOG_ERROR => tracing::error!(backend = %module, "{text}"),
            DEVHOST_LOG_WARN => tracing::warn!(backend = %module, "{text}"),
            DEVHOST_LOG_INFO => tracing::info!(backend = %module, "{text}"),
            DEVHOST_LOG_DEBUG => tracing::debug!(backend = %module, "{text}"),
            other => tracing::warn!(backend = %module, level = other, "(unknown log level) {text}"),
        }
    }));
}

unsafe extern "C" fn set_error(call: *mut DevhostCall, message: DevhostStr) {
    let all = [
        Phase::Init,
        Phase::Allocate,
        Phase::AllocateShared,
        Phase::PreferredAllocation,
        Phase::PreStart,
        Phase::Release,
        Phase::Poll,
    ];
    with_call(call, "set_error", &all, |collected| {
        // SAFETY: the ABI makes `message` valid during the call.
        let text = unsafe { read_str(message, "the error message") }?;
        collected.error = Some(text);
        Ok(())
    });
}

unsafe extern "C" fn add_resource(call: *mut DevhostCall, resource: *const DevhostResource) -> i32 {
    with_call(call, "add_resource", &[Phase::Init], |collected| {
        // SAFETY: the ABI makes `resource` valid during the call; a 1.0 or
        // 1.1 resource's size does not cover the counter sets, read as none.
        let raw = unsafe { read_struct_from(resource, "DevhostResource", DEVHOST_RESOURCE_SIZE_1_1 as usize)? };
        // SAFETY: as above, for the string it points to.
        let name = unsafe { read_str(raw.name, "a resource name")? };
        let known =
            DEVHOST_RESOURCE_PRE_START_REQUIRED | DEVHOST_RESOURCE_PREFERRED_ALLOCATION | DEVHOST_RESOURCE_RELEASE;
        if raw.flags & !known != 0 {
            return Err(format!("resource {name:?} has unknown flags {:#x} (ABI 1.2 knows {known:#x})", raw.flags));
        }
        // SAFETY: as above, for the counter sets and their counters.
        let counter_sets = unsafe { read_counter_sets(raw.counter_sets, raw.counter_sets_len, &name)? };
        collected.resources.push(ResourceSpec {
            name,
            pre_start_required: raw.flags & DEVHOST_RESOURCE_PRE_START_REQUIRED != 0,
            preferred_allocation: raw.flags & DEVHOST_RESOURCE_PREFERRED_ALLOCATION != 0,
            release_required: raw.flags & DEVHOST_RESOURCE_RELEASE != 0,
            counter_sets,
        });
        Ok(())
    })
}

unsafe extern "C" fn add_env(call: *mut DevhostCall, key: DevhostStr, value: DevhostStr) -> i32 {
    with_call(call, "add_env", ALLOCATING, |collected| {
        // SAFETY: the ABI makes both strings valid during the call.
        let (key, value) = unsafe { (read_str(key, "an env name")?, read_str(value, "an env value")?) };
        if key.is_empty() {
            return Err("an env variable has an empty name".to_owned());
        }
        collected.allocation.envs.insert(key, value);
        Ok(())
    })
}

unsafe extern "C" fn add_annotation(call: *mut DevhostCall, key: DevhostStr, value: DevhostStr) -> i32 {
    with_call(call, "add_annotation", ALLOCATING, |collected| {
        // SAFETY: the ABI makes both strings valid during the call.
        let (key, value) = unsafe { (read_str(key, "an annotation key")?, read_str(value, "an annotation value")?) };
        if key.is_empty() {
            return Err("an annotation has an empty key".to_owned());
        }
        collected.allocation.annotations.insert(key, value);
        Ok(())
    })
}

unsafe extern "C" fn add_mount(call: *mut DevhostCall, mount: *const DevhostMount) -> i32 {
    with_call(call, "add_mount", ALLOCATING, |collected| {
        // SAFETY: the ABI makes `mount` and its strings valid during the call.
        let mount = unsafe {
            let raw = read_struct(mount, "DevhostMount")?;
            Mount {
                container_path: read_str(raw.container_path, "a mount's container path")?,
                host_path: read_str(raw.host_path, "a mount's host path")?,
                read_only: raw.read_only != 0,
            }
        };
        collected.allocation.mounts.push(mount);
        Ok(())
    })
}

unsafe extern "C" fn add_device_spec(call: *mut DevhostCall, spec: *const DevhostDeviceSpec) -> i32 {
    with_call(call, "add_device_spec", ALLOCATING, |collected| {
        // SAFETY: the ABI makes `spec` and its strings valid during the call.
        let spec = unsafe {
            let raw = read_struct(spec, "DevhostDeviceSpec")?;
            DeviceSpec {
                container_path: read_str(raw.container_path, "a device spec's container path")?,
                host_path: read_str(raw.host_path, "a device spec's host path")?,
                permissions: read_str(raw.permissions, "a device spec's permissions")?,
            }
        };
        if spec.permissions.is_empty() || !spec.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(format!(
                "device spec {:?} has permissions {:?} (expected a combination of r, w, m)",
                spec.container_path, spec.permissions
            ));
        }
        collected.allocation.device_specs.push(spec);
        Ok(())
    })
}

unsafe extern "C" fn add_cdi_device(call: *mut DevhostCall, name: DevhostStr) -> i32 {
    with_call(call, "add_cdi_device", ALLOCATING, |collected| {
        // SAFETY: the ABI makes `name` valid during the call.
        let name = unsafe { read_str(name, "a CDI device name")? };
        if name.is_empty() {
            return Err("a CDI device name is empty".to_owned());
        }
        collected.allocation.cdi_devices.push(name);
        Ok(())
    })
}

unsafe extern "C" fn add_device_id(call: *mut DevhostCall, id: DevhostStr) -> i32 {
    with_call(call, "add_device_id", &[Phase::PreferredAllocation], |collected| {
        // SAFETY: the ABI makes `id` valid during the call.
        let id = unsafe { read_str(id, "a preferred device ID")? };
        collected.device_ids.push(id);
        Ok(())
    })
}

unsafe extern "C" fn add_device_status(call: *mut DevhostCall, status: *const DevhostDeviceStatus) -> i32 {
    with_call_on(call, "add_device_status", ALLOCATING, |collected, device_ids| {
        // SAFETY: the ABI makes `status`, its strings and its list of
        // addresses valid during the call.
        let (id, status) = unsafe { read_device_status(status)? };
        if !device_ids.contains(&id) {
            return Err(format!("gave the status of device {id:?}, which is not one of the call's {device_ids:?}"));
        }
        if collected.allocation.device_status.contains_key(&id) {
            return Err(format!("gave the status of device {id:?} twice (once per device)"));
        }
        collected.allocation.device_status.insert(id, status);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status<'a>(id: &'a str, ips: &'a [DevhostStr]) -> DevhostDeviceStatus {
        DevhostDeviceStatus {
            struct_size: size_of_u32::<DevhostDeviceStatus>(),
            reserved: 0,
            device_id: DevhostStr::new(id),
            interface_name: DevhostStr::new("eth1"),
            hardware_address: DevhostStr::new("02:00:00:00:00:01"),
            ips: ips.as_ptr(),
            ips_len: ips.len(),
            data_json: DevhostStr::EMPTY,
        }
    }

    /// Calls `add_device_status` as a module would, during a call of
    /// `phase` about `ids`; the codes and what the call collected.
    fn give(phase: Phase, ids: &[&str], statuses: &[DevhostDeviceStatus]) -> (Vec<i32>, Collected) {
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        let sink = CallSink::with_devices(phase, &ids);
        // SAFETY: the sink and each status (with what it points to) outlive
        // the callback, as during a real call.
        let codes =
            statuses.iter().map(|status| unsafe { (HOST_API.add_device_status)(sink.as_ptr(), status) }).collect();
        (codes, sink.into_inner())
    }

    #[test]
    fn a_device_status_is_taken_once_for_a_device_of_the_call_during_allocate_only() {
        let ips = [DevhostStr::new("10.0.0.5/24")];
        let (codes, collected) = give(Phase::AllocateShared, &["gpu-0", "nic-0"], &[status("nic-0", &ips)]);
        assert_eq!(codes, [DEVHOST_OK]);
        assert_eq!(collected.invalid, None);
        let got = &collected.allocation.device_status["nic-0"];
        assert_eq!(
            (got.interface_name.as_deref(), got.ips.as_slice()),
            (Some("eth1"), &["10.0.0.5/24".to_owned()][..])
        );

        let (codes, collected) = give(Phase::Allocate, &["nic-0"], &[status("nic-0", &ips), status("nic-0", &ips)]);
        assert_eq!(codes, [DEVHOST_OK, DEVHOST_E_INVALID]);
        assert_eq!(collected.invalid.as_deref(), Some("gave the status of device \"nic-0\" twice (once per device)"));

        let (codes, collected) = give(Phase::Allocate, &["gpu-0"], &[status("nic-0", &ips)]);
        assert_eq!(codes, [DEVHOST_E_INVALID]);
        assert_eq!(
            collected.invalid.as_deref(),
            Some("gave the status of device \"nic-0\", which is not one of the call's [\"gpu-0\"]")
        );

        let bad = [DevhostStr::new("10.0.0.5/33")];
        let (codes, collected) = give(Phase::Allocate, &["nic-0"], &[status("nic-0", &bad)]);
        assert_eq!(codes, [DEVHOST_E_INVALID]);
        let why = collected.invalid.expect("refused");
        assert!(why.starts_with("the status of device \"nic-0\": ips: \"10.0.0.5/33\""), "{why}");

        let (codes, collected) = give(Phase::PreStart, &["nic-0"], &[status("nic-0", &ips)]);
        assert_eq!(codes, [DEVHOST_E_WRONG_CALL]);
        assert_eq!(
            collected.invalid.as_deref(),
            Some("called add_device_status during pre_start; it is allowed only during allocate or allocate_shared")
        );
    }
}
