//! The SDK's export shims: every `extern "C"` entry point a backend built
//! with [`export_backend!`](crate::export_backend) exposes, and the [`Host`]
//! handle that calls back into the host. All the SDK's `unsafe` lives here.
//! Each entry point copies what it borrows into Rust types, runs the
//! vendor's code inside `catch_unwind`, and answers with a status code: a
//! returned error becomes `DEVHOST_ERROR`, a panic `DEVHOST_FAULT`, both
//! with their message given through `set_error`.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{
    Allocation, AttributeValue, Backend, Device, Error, Health, LogLevel, PreferredRequest, PublishError, Resource,
};
use crate::ffi::*;

/// The backend's handle on the host: publishes device lists and writes log
/// lines. Cheap to clone; usable from any thread until the backend's
/// `shutdown` returns.
#[derive(Clone)]
pub struct Host {
    api: &'static DevhostHostApi,
    ctx: *mut DevhostHost,
}

// SAFETY: the ABI makes the host callback table static and `publish`/`log`
// callable from any thread with this context, which the host keeps valid for
// the life of the process.
unsafe impl Send for Host {}
// SAFETY: as for `Send`; the handle has no interior state of its own.
unsafe impl Sync for Host {}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    /// Replaces the device list of `resource`.
    pub fn publish(&self, resource: &str, devices: &[Device]) -> Result<(), PublishError> {
        // Each device's attribute and capacity arrays, borrowed by `raw`.
        let details: Vec<(Vec<DevhostAttribute>, Vec<DevhostCapacity>)> = devices.iter().map(details).collect();
        let raw: Vec<DevhostDevice> = devices
            .iter()
            .zip(&details)
            .map(|(device, (attributes, capacities))| DevhostDevice {
                struct_size: size_of_u32::<DevhostDevice>(),
                health: match device.health {
                    Health::Healthy => DEVHOST_HEALTH_HEALTHY,
                    Health::Unhealthy => DEVHOST_HEALTH_UNHEALTHY,
                },
                id: DevhostStr::new(&device.id),
                numa_nodes: device.numa_nodes.as_ptr(),
                numa_nodes_len: device.numa_nodes.len(),
                attributes: attributes.as_ptr(),
                attributes_len: attributes.len(),
                capacities: capacities.as_ptr(),
                capacities_len: capacities.len(),
            })
            .collect();
        // SAFETY: `ctx` came from the host for this purpose; `raw`, the
        // arrays in `details` and the strings they borrow outlive the call,
        // which copies them.
        let code = unsafe { (self.api.publish)(self.ctx, DevhostStr::new(resource), raw.as_ptr(), raw.len()) };
        match code {
            DEVHOST_OK => Ok(()),
            DEVHOST_E_INVALID => Err(PublishError::Invalid),
            DEVHOST_E_CLOSED => Err(PublishError::Closed),
            other => Err(PublishError::Other(other)),
        }
    }

    /// Writes one line to the host's log.
    pub fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Error => DEVHOST_LOG_ERROR,
            LogLevel::Warn => DEVHOST_LOG_WARN,
            LogLevel::Info => DEVHOST_LOG_INFO,
            LogLevel::Debug => DEVHOST_LOG_DEBUG,
        };
        // SAFETY: `log` accepts this context from any thread at any time; the
        // message is borrowed for the call only.
        unsafe { (self.api.log)(self.ctx, level, DevhostStr::new(message)) }
    }
}

/// A device's attributes and capacities as ABI 1.1 arrays, borrowing the
/// device's strings.
fn details(device: &Device) -> (Vec<DevhostAttribute>, Vec<DevhostCapacity>) {
    let attributes = device
        .attributes
        .iter()
        .map(|(name, value)| {
            let (kind, int_value, text) = match value {
                AttributeValue::Int(n) => (DEVHOST_ATTRIBUTE_INT, *n, DevhostStr::EMPTY),
                AttributeValue::Bool(b) => (DEVHOST_ATTRIBUTE_BOOL, i64::from(*b), DevhostStr::EMPTY),
                AttributeValue::String(text) => (DEVHOST_ATTRIBUTE_STRING, 0, DevhostStr::new(text)),
                AttributeValue::Version(text) => (DEVHOST_ATTRIBUTE_VERSION, 0, DevhostStr::new(text)),
            };
            DevhostAttribute {
                struct_size: size_of_u32::<DevhostAttribute>(),
                kind,
                name: DevhostStr::new(name),
                int_value,
                text,
            }
        })
        .collect();
    let capacities = device
        .capacities
        .iter()
        .map(|(name, quantity)| DevhostCapacity {
            struct_size: size_of_u32::<DevhostCapacity>(),
            reserved: 0,
            name: DevhostStr::new(name),
            quantity: DevhostStr::new(quantity),
        })
        .collect();
    (attributes, capacities)
}

/// One live backend instance: what `init` hands the host as `void *`.
struct Instance<B> {
    backend: B,
    host: Host,
}

/// The static function table for `B`.
pub const fn table<B: Backend>() -> DevhostBackendApi {
    DevhostBackendApi {
        struct_size: size_of_u32::<DevhostBackendApi>(),
        abi_version: DEVHOST_ABI_VERSION,
        init: Some(init::<B>),
        allocate: Some(allocate::<B>),
        preferred_allocation: Some(preferred_allocation::<B>),
        pre_start: Some(pre_start::<B>),
        shutdown: Some(shutdown::<B>),
        release: Some(release::<B>),
        poll: Some(poll::<B>),
    }
}

/// The body of `devhost_backend_entry`: accepts a host of major 1 whose
/// table is at least the v1 size, and returns `table`; NULL otherwise.
///
/// # Safety
///
/// `host` is NULL or points to a host table whose first two fields are
/// readable (the ABI freezes them across all majors).
pub unsafe fn entry(host: *const DevhostHostApi, table: &'static DevhostBackendApi) -> *const DevhostBackendApi {
    if host.is_null() {
        return std::ptr::null();
    }
    // SAFETY: `struct_size` and `abi_version` are the first 8 bytes of every
    // major's host table; read them through raw field pointers only.
    let (size, version) = unsafe { ((*host).struct_size, (*host).abi_version) };
    if version_major(version) != DEVHOST_ABI_VERSION_MAJOR || size < size_of_u32::<DevhostHostApi>() {
        return std::ptr::null();
    }
    table
}

/// Copies a host string; the host promises UTF-8, and the copy checks it.
///
/// # Safety
///
/// `s` points to `s.len` readable bytes (or is NULL with `len` 0).
unsafe fn string(s: DevhostStr, what: &str) -> Result<String, Error> {
    if s.len == 0 {
        return Ok(String::new());
    }
    if s.ptr.is_null() {
        return Err(Error::new(format!("the host passed a NULL {what}")));
    }
    // SAFETY: per the caller's contract.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::new(format!("the host passed a {what} that is not UTF-8")))
}

/// Copies a host list of strings.
///
/// # Safety
///
/// `ptr` points to `len` valid `DevhostStr`s (or is NULL with `len` 0).
unsafe fn strings(ptr: *const DevhostStr, len: usize, what: &str) -> Result<Vec<String>, Error> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(Error::new(format!("the host passed a NULL {what} list")));
    }
    // SAFETY: per the caller's contract.
    let items = unsafe { std::slice::from_raw_parts(ptr, len) };
    // SAFETY: each item is a valid host string, per the same contract.
    items.iter().map(|&s| unsafe { string(s, what) }).collect()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned())
}

/// Runs `f` and turns its outcome into a status code, reporting the message
/// of an error or a panic through `set_error`.
fn guarded(api: &DevhostHostApi, call: *mut DevhostCall, f: impl FnOnce() -> Result<i32, Error>) -> i32 {
    let (status, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => return status,
        Ok(Err(error)) => (DEVHOST_ERROR, error.message),
        Err(payload) => (DEVHOST_FAULT, panic_message(payload)),
    };
    // The message travels even if `set_error` itself were to misbehave: a
    // panic here must not cross the FFI boundary either.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `call` is the live call context the host passed in.
        unsafe { (api.set_error)(call, DevhostStr::new(&message)) }
    }));
    status
}

/// Turns a host callback's status into an error naming what was refused.
fn accepted(code: i32, what: &str) -> Result<(), Error> {
    match code {
        DEVHOST_OK => Ok(()),
        code => Err(Error::new(format!("the host refused {what} (status {code}; its log says why)"))),
    }
}

unsafe extern "C" fn init<B: Backend>(
    args: *const DevhostInitArgs,
    call: *mut DevhostCall,
    instance: *mut *mut c_void,
) -> i32 {
    if args.is_null() || instance.is_null() {
        return DEVHOST_FAULT;
    }
    // SAFETY: the host passes a valid `DevhostInitArgs` for this call.
    let args = unsafe { *args };
    if args.host_api.is_null() {
        return DEVHOST_FAULT;
    }
    // SAFETY: the host's callback table is static for the life of the process.
    let api: &'static DevhostHostApi = unsafe { &*args.host_api };
    guarded(api, call, || {
        // SAFETY: the config string is valid during `init`.
        let config = unsafe { string(args.config_json, "config")? };
        let host = Host { api, ctx: args.host };
        let (backend, resources) = B::init(&config, host.clone())?;
        for resource in &resources {
            declare(api, call, resource)?;
        }
        let raw = Box::into_raw(Box::new(Instance { backend, host }));
        // SAFETY: `instance` is a valid out-pointer for this call.
        unsafe { *instance = raw.cast() };
        Ok(DEVHOST_OK)
    })
}

fn declare(api: &DevhostHostApi, call: *mut DevhostCall, resource: &Resource) -> Result<(), Error> {
    let mut flags = 0;
    if resource.pre_start_required {
        flags |= DEVHOST_RESOURCE_PRE_START_REQUIRED;
    }
    if resource.preferred_allocation {
        flags |= DEVHOST_RESOURCE_PREFERRED_ALLOCATION;
    }
    if resource.release_required {
        flags |= DEVHOST_RESOURCE_RELEASE;
    }
    let raw =
        DevhostResource { struct_size: size_of_u32::<DevhostResource>(), flags, name: DevhostStr::new(&resource.name) };
    // SAFETY: `call` is live during `init`; `raw` outlives the call.
    let code = unsafe { (api.add_resource)(call, &raw) };
    accepted(code, &format!("resource {:?}", resource.name))
}

/// Borrows the instance behind the host's `void *`.
///
/// # Safety
///
/// `instance` came from `init::<B>` and `shutdown` has not been called.
unsafe fn instance<'a, B>(instance: *mut c_void) -> Option<&'a Instance<B>> {
    // SAFETY: per the caller's contract, a live `Instance<B>` or NULL.
    unsafe { instance.cast::<Instance<B>>().as_ref() }
}

unsafe extern "C" fn allocate<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    device_ids: *const DevhostStr,
    count: usize,
) -> i32 {
    // SAFETY: the host passes the pointer `init` returned.
    let Some(this) = (unsafe { instance::<B>(raw) }) else { return DEVHOST_FAULT };
    guarded(this.host.api, call, || {
        // SAFETY: the host's arguments are valid during the call.
        let (resource, ids) = unsafe { (string(resource, "resource")?, strings(device_ids, count, "device ID")?) };
        let allocation = this.backend.allocate(&resource, &ids)?;
        hand_over(this.host.api, call, &allocation)?;
        Ok(DEVHOST_OK)
    })
}

/// Passes an allocation to the host, one callback per item.
fn hand_over(api: &DevhostHostApi, call: *mut DevhostCall, allocation: &Allocation) -> Result<(), Error> {
    let s = DevhostStr::new;
    // In every callback below, `call` is live during `allocate`, and every
    // borrowed string and struct outlives the callback, which copies it.
    for (key, value) in &allocation.envs {
        // SAFETY: see above.
        accepted(unsafe { (api.add_env)(call, s(key), s(value)) }, &format!("env {key:?}"))?;
    }
    for mount in &allocation.mounts {
        let raw = DevhostMount {
            struct_size: size_of_u32::<DevhostMount>(),
            read_only: u32::from(mount.read_only),
            container_path: s(&mount.container_path),
            host_path: s(&mount.host_path),
        };
        // SAFETY: see above.
        accepted(unsafe { (api.add_mount)(call, &raw) }, &format!("mount {:?}", mount.container_path))?;
    }
    for spec in &allocation.device_specs {
        let raw = DevhostDeviceSpec {
            struct_size: size_of_u32::<DevhostDeviceSpec>(),
            reserved: 0,
            container_path: s(&spec.container_path),
            host_path: s(&spec.host_path),
            permissions: s(&spec.permissions),
        };
        // SAFETY: see above.
        accepted(unsafe { (api.add_device_spec)(call, &raw) }, &format!("device spec {:?}", spec.container_path))?;
    }
    for (key, value) in &allocation.annotations {
        // SAFETY: see above.
        accepted(unsafe { (api.add_annotation)(call, s(key), s(value)) }, &format!("annotation {key:?}"))?;
    }
    for name in &allocation.cdi_devices {
        // SAFETY: see above.
        accepted(unsafe { (api.add_cdi_device)(call, s(name)) }, &format!("CDI device {name:?}"))?;
    }
    Ok(())
}

unsafe extern "C" fn preferred_allocation<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    request: *const DevhostPreferredRequest,
) -> i32 {
    // SAFETY: the host passes the pointer `init` returned.
    let Some(this) = (unsafe { instance::<B>(raw) }) else { return DEVHOST_FAULT };
    guarded(this.host.api, call, || {
        if request.is_null() {
            return Err(Error::new("the host passed a NULL request"));
        }
        // SAFETY: the host's arguments are valid during the call.
        let (resource, r) = unsafe { (string(resource, "resource")?, *request) };
        // SAFETY: as above; the lists are host-owned and valid during the call.
        let question = unsafe {
            PreferredRequest {
                available: strings(r.available, r.available_len, "available device ID")?,
                must_include: strings(r.must_include, r.must_include_len, "must-include device ID")?,
                size: r.size,
            }
        };
        let Some(ids) = this.backend.preferred_allocation(&resource, &question)? else {
            return Ok(DEVHOST_USE_DEFAULT);
        };
        for id in &ids {
            // SAFETY: `call` is live; `id` outlives the callback.
            let code = unsafe { (this.host.api.add_device_id)(call, DevhostStr::new(id)) };
            accepted(code, &format!("device ID {id:?}"))?;
        }
        Ok(DEVHOST_OK)
    })
}

unsafe extern "C" fn pre_start<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    device_ids: *const DevhostStr,
    count: usize,
) -> i32 {
    // SAFETY: the host's arguments, passed on as they came.
    unsafe { devices_call::<B>(raw, call, resource, device_ids, count, B::pre_start) }
}

unsafe extern "C" fn release<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    device_ids: *const DevhostStr,
    count: usize,
) -> i32 {
    // SAFETY: the host's arguments, passed on as they came.
    unsafe { devices_call::<B>(raw, call, resource, device_ids, count, B::release) }
}

/// The body of `pre_start` and `release`: a resource and device IDs in,
/// nothing but success or an error out.
///
/// # Safety
///
/// The arguments are the host's, valid for the duration of the call.
unsafe fn devices_call<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    device_ids: *const DevhostStr,
    count: usize,
    method: fn(&B, &str, &[String]) -> Result<(), Error>,
) -> i32 {
    // SAFETY: the host passes the pointer `init` returned.
    let Some(this) = (unsafe { instance::<B>(raw) }) else { return DEVHOST_FAULT };
    guarded(this.host.api, call, || {
        // SAFETY: the host's arguments are valid during the call.
        let (resource, ids) = unsafe { (string(resource, "resource")?, strings(device_ids, count, "device ID")?) };
        method(&this.backend, &resource, &ids)?;
        Ok(DEVHOST_OK)
    })
}

unsafe extern "C" fn poll<B: Backend>(raw: *mut c_void, call: *mut DevhostCall) -> i32 {
    // SAFETY: the host passes the pointer `init` returned.
    let Some(this) = (unsafe { instance::<B>(raw) }) else { return DEVHOST_FAULT };
    guarded(this.host.api, call, || {
        this.backend.poll();
        Ok(DEVHOST_OK)
    })
}

unsafe extern "C" fn shutdown<B: Backend>(raw: *mut c_void) {
    if raw.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Box::into_raw` in `init::<B>`, and the
    // host calls `shutdown` once, with no other call in flight.
    let Instance { backend, host } = *unsafe { Box::from_raw(raw.cast::<Instance<B>>()) };
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| backend.shutdown())) {
        let message = panic_message(payload);
        let _ = catch_unwind(AssertUnwindSafe(|| host.log(LogLevel::Error, &format!("shutdown panicked: {message}"))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl Backend for Nothing {
        fn init(_config: &str, _host: Host) -> Result<(Self, Vec<Resource>), Error> {
            Ok((Nothing, Vec::new()))
        }

        fn allocate(&self, _resource: &str, _device_ids: &[String]) -> Result<Allocation, Error> {
            Ok(Allocation::default())
        }
    }

    static TABLE: DevhostBackendApi = table::<Nothing>();

    unsafe extern "C" fn no_publish(_: *mut DevhostHost, _: DevhostStr, _: *const DevhostDevice, _: usize) -> i32 {
        DEVHOST_E_CLOSED
    }
    unsafe extern "C" fn no_log(_: *mut DevhostHost, _: u32, _: DevhostStr) {}
    unsafe extern "C" fn no_error(_: *mut DevhostCall, _: DevhostStr) {}
    unsafe extern "C" fn no_resource(_: *mut DevhostCall, _: *const DevhostResource) -> i32 {
        DEVHOST_E_WRONG_CALL
    }
    unsafe extern "C" fn no_pair(_: *mut DevhostCall, _: DevhostStr, _: DevhostStr) -> i32 {
        DEVHOST_E_WRONG_CALL
    }
    unsafe extern "C" fn no_mount(_: *mut DevhostCall, _: *const DevhostMount) -> i32 {
        DEVHOST_E_WRONG_CALL
    }
    unsafe extern "C" fn no_spec(_: *mut DevhostCall, _: *const DevhostDeviceSpec) -> i32 {
        DEVHOST_E_WRONG_CALL
    }
    unsafe extern "C" fn no_str(_: *mut DevhostCall, _: DevhostStr) -> i32 {
        DEVHOST_E_WRONG_CALL
    }

    fn host(abi_version: u32, struct_size: u32) -> DevhostHostApi {
        DevhostHostApi {
            struct_size,
            abi_version,
            publish: no_publish,
            log: no_log,
            set_error: no_error,
            add_resource: no_resource,
            add_env: no_pair,
            add_mount: no_mount,
            add_device_spec: no_spec,
            add_annotation: no_pair,
            add_cdi_device: no_str,
            add_device_id: no_str,
        }
    }

    #[test]
    fn entry_accepts_any_minor_of_major_1_and_refuses_the_rest() {
        let full = size_of_u32::<DevhostHostApi>();
        // SAFETY (each call): the host tables live on this stack frame.
        let accepted = unsafe { entry(&host(version(1, 7), full + 16), &TABLE) };
        assert!(std::ptr::eq(accepted, &TABLE));
        // SAFETY: as above.
        assert!(unsafe { entry(&host(version(2, 0), full), &TABLE) }.is_null(), "another major");
        // SAFETY: as above.
        assert!(unsafe { entry(&host(version(1, 0), 8), &TABLE) }.is_null(), "a truncated host table");
        // SAFETY: NULL is allowed.
        assert!(unsafe { entry(std::ptr::null(), &TABLE) }.is_null());
        assert_eq!(TABLE.struct_size, 64);
        assert_eq!(TABLE.abi_version, DEVHOST_ABI_VERSION);
    }

    #[test]
    fn a_panic_becomes_a_fault_with_its_message() {
        let api = host(DEVHOST_ABI_VERSION, size_of_u32::<DevhostHostApi>());
        let status = guarded(&api, std::ptr::null_mut(), || panic!("boom"));
        assert_eq!(status, DEVHOST_FAULT);
        let status = guarded(&api, std::ptr::null_mut(), || Err(Error::new("no")));
        assert_eq!(status, DEVHOST_ERROR);
    }
}
