//! The SDK's export shims: every `extern "C"` entry point a backend built
//! with [`export_backend!`](crate::export_backend) exposes, and the [`Host`]
//! handle that calls back into the host. All the SDK's `unsafe` lives here.
//! Each entry point copies what it borrows into Rust types, runs the
//! vendor's code inside `catch_unwind`, and answers with a status code: a
//! returned error becomes `DEVHOST_ERROR`, a panic `DEVHOST_FAULT`, both
//! with their message given through `set_error`.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use std::collections::BTreeMap;

use super::{
    Allocation, AttributeValue, Backend, Device, Error, Health, LogLevel, PreferredRequest, PublishError, Resource,
};
use crate::ffi::*;
use crate::model::{RequestPolicy, Share, ValidRequests};

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
        // ABI 1.2: what each device consumes (the counters of each entry
        // first, since the entries point into them) and its request
        // policies (their `values` lists first, likewise).
        let counters: Vec<Vec<Vec<DevhostCapacity>>> = devices
            .iter()
            .map(|device| device.consumes.iter().map(|consumption| capacities(&consumption.counters)).collect())
            .collect();
        let consumes: Vec<Vec<DevhostCounterConsumption>> = devices
            .iter()
            .zip(&counters)
            .map(|(device, counters)| {
                device
                    .consumes
                    .iter()
                    .zip(counters)
                    .map(|(consumption, counters)| DevhostCounterConsumption {
                        struct_size: size_of_u32::<DevhostCounterConsumption>(),
                        reserved: 0,
                        counter_set: DevhostStr::new(&consumption.counter_set),
                        counters: counters.as_ptr(),
                        counters_len: counters.len(),
                    })
                    .collect()
            })
            .collect();
        let values: Vec<Vec<Vec<DevhostStr>>> = devices
            .iter()
            .map(|device| policies_of(device).map(|(_, policy)| policy_values(policy)).collect())
            .collect();
        let policies: Vec<Vec<DevhostRequestPolicy>> = devices
            .iter()
            .zip(&values)
            .map(|(device, values)| {
                policies_of(device)
                    .zip(values)
                    .map(|((name, policy), values)| request_policy(name, policy, values))
                    .collect()
            })
            .collect();
        let raw: Vec<DevhostDevice> = devices
            .iter()
            .zip(&details)
            .zip(consumes.iter().zip(&policies))
            .map(|((device, (attributes, capacities)), (consumes, policies))| DevhostDevice {
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
                consumes: consumes.as_ptr(),
                consumes_len: consumes.len(),
                flags: if device.shared.is_some() { DEVHOST_DEVICE_SHARED } else { 0 },
                reserved: 0,
                request_policies: policies.as_ptr(),
                request_policies_len: policies.len(),
            })
            .collect();
        // SAFETY: `ctx` came from the host for this purpose; `raw`, the
        // arrays in `details`, `counters`, `consumes`, `values` and
        // `policies` and the strings they borrow outlive the call, which
        // copies them. A host older than 1.2 reads only the prefix it
        // knows (its loss: it has no partitions or shared devices).
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
    (attributes, capacities(&device.capacities))
}

/// Name → quantity pairs (capacities, counters, consumed amounts) as an
/// array of `DevhostCapacity`, borrowing the strings.
fn capacities(pairs: &BTreeMap<String, String>) -> Vec<DevhostCapacity> {
    pairs
        .iter()
        .map(|(name, quantity)| DevhostCapacity {
            struct_size: size_of_u32::<DevhostCapacity>(),
            reserved: 0,
            name: DevhostStr::new(name),
            quantity: DevhostStr::new(quantity),
        })
        .collect()
}

/// A device's request policies, capacity name first, in a stable order.
fn policies_of(device: &Device) -> impl Iterator<Item = (&String, &RequestPolicy)> {
    device.shared.iter().flat_map(|shared| shared.request_policies.iter())
}

/// The `values` list of a `VALUES` policy (empty for the other kinds).
fn policy_values(policy: &RequestPolicy) -> Vec<DevhostStr> {
    match &policy.valid {
        Some(ValidRequests::Values(values)) => values.iter().map(|value| DevhostStr::new(value)).collect(),
        _ => Vec::new(),
    }
}

/// `policy` for `capacity` as an ABI 1.2 struct; `values` is
/// [`policy_values`] of it, which the struct borrows.
fn request_policy(capacity: &str, policy: &RequestPolicy, values: &[DevhostStr]) -> DevhostRequestPolicy {
    let text = |value: &Option<String>| value.as_deref().map_or(DevhostStr::EMPTY, DevhostStr::new);
    let (kind, min, max, step) = match &policy.valid {
        None => (DEVHOST_REQUEST_POLICY_ANY, DevhostStr::EMPTY, DevhostStr::EMPTY, DevhostStr::EMPTY),
        Some(ValidRequests::Range { min, max, step }) => {
            (DEVHOST_REQUEST_POLICY_RANGE, DevhostStr::new(min), text(max), text(step))
        }
        Some(ValidRequests::Values(_)) => {
            (DEVHOST_REQUEST_POLICY_VALUES, DevhostStr::EMPTY, DevhostStr::EMPTY, DevhostStr::EMPTY)
        }
    };
    DevhostRequestPolicy {
        struct_size: size_of_u32::<DevhostRequestPolicy>(),
        kind,
        capacity: DevhostStr::new(capacity),
        default_quantity: text(&policy.default),
        min,
        max,
        step,
        values: values.as_ptr(),
        values_len: values.len(),
    }
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
        allocate_shared: Some(allocate_shared::<B>),
    }
}

/// The body of `devhost_backend_entry`: accepts a host of major 1 whose
/// table is at least 1.1's size (a 1.1 host has no `add_device_status`,
/// which the shims then never call), and returns `table`; NULL otherwise.
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
    if version_major(version) != DEVHOST_ABI_VERSION_MAJOR || size < DEVHOST_HOST_API_SIZE_1_1 {
        return std::ptr::null();
    }
    table
}

/// The host's table as a whole `DevhostHostApi`. A host of this ABI or a
/// newer one gives a table at least that large, used as it is. An older
/// (1.1) host's table is smaller: a reference to it would claim bytes the
/// host never gave, so its fields are copied into a table of this size
/// (once: the host's table is static), the callbacks it lacks set to
/// [`not_offered`]. The shims never call those: they check the host's
/// `struct_size`, which the copy keeps, before each newer callback.
///
/// # Safety
///
/// `host` points to a host table of at least `DEVHOST_HOST_API_SIZE_1_1`
/// bytes, valid for the life of the process.
unsafe fn whole_table(host: *const DevhostHostApi) -> &'static DevhostHostApi {
    static OLDER_HOST: std::sync::OnceLock<DevhostHostApi> = std::sync::OnceLock::new();
    // SAFETY: the first field of every host table (per the caller).
    let size = unsafe { (*host).struct_size } as usize;
    if size >= std::mem::size_of::<DevhostHostApi>() {
        // SAFETY: the whole struct is there, static (per the caller).
        return unsafe { &*host };
    }
    OLDER_HOST.get_or_init(|| {
        let mut table = std::mem::MaybeUninit::<DevhostHostApi>::uninit();
        let at = table.as_mut_ptr();
        // SAFETY: `at` is valid for writes of a whole table; the field
        // written first is the one a 1.1 table lacks, and then the host's
        // `size` bytes (at least 1.1's, less than a whole table, so
        // exactly the fields before it) cover every other field.
        unsafe {
            std::ptr::addr_of_mut!((*at).add_device_status).write(not_offered);
            std::ptr::copy_nonoverlapping(host.cast::<u8>(), at.cast::<u8>(), size);
            table.assume_init()
        }
    })
}

/// Stands in for a callback an older host does not offer; never called.
unsafe extern "C" fn not_offered(_call: *mut DevhostCall, _status: *const DevhostDeviceStatus) -> i32 {
    DEVHOST_E_WRONG_CALL
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
    // SAFETY: the host's callback table is static for the life of the
    // process, and at least 1.1's size (`entry` checked it).
    let api: &'static DevhostHostApi = unsafe { whole_table(args.host_api) };
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
    // ABI 1.2: the counter sets, each pointing into its counters.
    let counters: Vec<Vec<DevhostCapacity>> =
        resource.counter_sets.iter().map(|set| capacities(&set.counters)).collect();
    let counter_sets: Vec<DevhostCounterSet> = resource
        .counter_sets
        .iter()
        .zip(&counters)
        .map(|(set, counters)| DevhostCounterSet {
            struct_size: size_of_u32::<DevhostCounterSet>(),
            reserved: 0,
            name: DevhostStr::new(&set.name),
            counters: counters.as_ptr(),
            counters_len: counters.len(),
        })
        .collect();
    let raw = DevhostResource {
        struct_size: size_of_u32::<DevhostResource>(),
        flags,
        name: DevhostStr::new(&resource.name),
        counter_sets: counter_sets.as_ptr(),
        counter_sets_len: counter_sets.len(),
    };
    // SAFETY: `call` is live during `init`; `raw`, the arrays it points to
    // and their strings outlive the call.
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

unsafe extern "C" fn allocate_shared<B: Backend>(
    raw: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    device_ids: *const DevhostStr,
    count: usize,
    shares: *const DevhostShare,
    shares_len: usize,
) -> i32 {
    // SAFETY: the host passes the pointer `init` returned.
    let Some(this) = (unsafe { instance::<B>(raw) }) else { return DEVHOST_FAULT };
    guarded(this.host.api, call, || {
        // SAFETY: the host's arguments are valid during the call.
        let (resource, ids, shares) = unsafe {
            (string(resource, "resource")?, strings(device_ids, count, "device ID")?, read_shares(shares, shares_len)?)
        };
        let allocation = this.backend.allocate_shared(&resource, &ids, &shares)?;
        hand_over(this.host.api, call, &allocation)?;
        Ok(DEVHOST_OK)
    })
}

/// Copies the host's shares: device ID and what the claim consumes of it.
/// The stride is the first element's `struct_size` (a newer host's shares
/// may be larger; what this SDK does not know is skipped).
///
/// # Safety
///
/// `ptr` points to `len` shares laid out `struct_size` bytes apart (or is
/// NULL with `len` 0), each with valid strings and `consumed` arrays.
unsafe fn read_shares(ptr: *const DevhostShare, len: usize) -> Result<Vec<(String, Share)>, Error> {
    // SAFETY: per the caller's contract.
    let raw: Vec<DevhostShare> = unsafe { host_array(ptr, len, "share")? };
    raw.iter()
        .map(|share| {
            // SAFETY: the share's strings and array are valid, per the contract.
            let (id, share_id, consumed) = unsafe {
                (
                    string(share.device_id, "shared device ID")?,
                    string(share.share_id, "share ID")?,
                    host_array::<DevhostCapacity>(share.consumed, share.consumed_len, "consumed capacity")?,
                )
            };
            let consumed = consumed
                .iter()
                // SAFETY: as above, for each pair's strings.
                .map(|pair| unsafe { Ok((string(pair.name, "capacity name")?, string(pair.quantity, "quantity")?)) })
                .collect::<Result<BTreeMap<_, _>, Error>>()?;
            Ok((id, Share { share_id: (!share_id.is_empty()).then_some(share_id), consumed }))
        })
        .collect()
}

/// Copies an array of host structs that start with `u32 struct_size`,
/// stepping by the first element's size and keeping what this SDK knows of
/// each (zero beyond a smaller element's size).
///
/// # Safety
///
/// `ptr` points to `len` elements laid out `struct_size` bytes apart (or is
/// NULL with `len` 0); `T` is an ABI struct for which all-zero bytes are a
/// valid value.
unsafe fn host_array<T: Copy>(ptr: *const T, len: usize, what: &str) -> Result<Vec<T>, Error> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(Error::new(format!("the host passed a NULL {what} list")));
    }
    // SAFETY: the first element's size field is readable, per the contract.
    let stride = unsafe { ptr.cast::<u32>().read_unaligned() } as usize;
    if stride < 4 {
        return Err(Error::new(format!("the host passed a {what} list whose struct_size is {stride}")));
    }
    (0..len)
        .map(|index| {
            let mut value = std::mem::MaybeUninit::<T>::zeroed();
            // SAFETY: element `index` starts `index * stride` bytes in and
            // has `stride` readable bytes; at most `size_of::<T>()` of them
            // are copied into the zeroed value, a valid `T` either way.
            unsafe {
                let element = ptr.cast::<u8>().add(index * stride);
                std::ptr::copy_nonoverlapping(element, value.as_mut_ptr().cast::<u8>(), stride.min(size_of::<T>()));
                Ok(value.assume_init())
            }
        })
        .collect()
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
    // ABI 1.2: a host whose table does not reach `add_device_status` (1.1)
    // has nowhere to put a device status; it is left out there.
    if api.struct_size < DEVHOST_HOST_API_SIZE_1_1 + size_of_u32::<DevhostAddDeviceStatusFn>() {
        return Ok(());
    }
    let text = |value: &Option<String>| value.as_deref().map_or(DevhostStr::EMPTY, DevhostStr::new);
    for (id, status) in &allocation.device_status {
        let ips: Vec<DevhostStr> = status.ips.iter().map(|ip| s(ip)).collect();
        let raw = DevhostDeviceStatus {
            struct_size: size_of_u32::<DevhostDeviceStatus>(),
            reserved: 0,
            device_id: s(id),
            interface_name: text(&status.interface_name),
            hardware_address: text(&status.hardware_address),
            ips: ips.as_ptr(),
            ips_len: ips.len(),
            data_json: text(&status.data),
        };
        // SAFETY: see above; the host's table covers the callback (checked).
        accepted(unsafe { (api.add_device_status)(call, &raw) }, &format!("the status of device {id:?}"))?;
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
    unsafe extern "C" fn no_status(_: *mut DevhostCall, _: *const DevhostDeviceStatus) -> i32 {
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
            add_device_status: no_status,
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
        let older = unsafe { entry(&host(version(1, 1), DEVHOST_HOST_API_SIZE_1_1), &TABLE) };
        assert!(std::ptr::eq(older, &TABLE), "a 1.1 host, without add_device_status");
        // SAFETY: as above.
        assert!(unsafe { entry(&host(version(1, 0), 8), &TABLE) }.is_null(), "a truncated host table");
        // SAFETY: NULL is allowed.
        assert!(unsafe { entry(std::ptr::null(), &TABLE) }.is_null());
        assert_eq!(TABLE.struct_size, 72);
        assert!(TABLE.allocate_shared.is_some(), "ABI 1.2: allocate_shared is exported");
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

    /// A backend of ABI 1.2's kind: a shared NIC whose allocation reports
    /// what the claim consumes and a device status.
    struct Sharer;

    impl Backend for Sharer {
        fn init(_config: &str, _host: Host) -> Result<(Self, Vec<Resource>), Error> {
            Ok((Sharer, Vec::new()))
        }

        fn allocate(&self, _resource: &str, _device_ids: &[String]) -> Result<Allocation, Error> {
            Ok(Allocation::default())
        }

        fn allocate_shared(
            &self,
            _resource: &str,
            device_ids: &[String],
            shares: &[(String, Share)],
        ) -> Result<Allocation, Error> {
            let mut answer = Allocation::default();
            for (id, share) in shares {
                let said = format!("{:?} {:?}", share.share_id, share.consumed);
                answer.envs.insert(format!("SHARE_{id}"), said);
            }
            answer.device_status.insert(
                device_ids[0].clone(),
                crate::model::DeviceStatus {
                    interface_name: Some("eth1".into()),
                    ips: vec!["10.0.0.5/24".into()],
                    ..Default::default()
                },
            );
            Ok(answer)
        }
    }

    std::thread_local! {
        /// What the fake host's recording callbacks saw, in order.
        static SEEN: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn seen(line: String) {
        SEEN.with(|seen| seen.borrow_mut().push(line));
    }

    /// # Safety
    ///
    /// `s` is a valid string for the call.
    unsafe fn text(s: DevhostStr) -> String {
        // SAFETY: per the caller.
        unsafe { string(s, "test") }.expect("UTF-8")
    }

    unsafe extern "C" fn record_env(_: *mut DevhostCall, key: DevhostStr, value: DevhostStr) -> i32 {
        // SAFETY: the shim passes valid strings.
        seen(unsafe { format!("env {}={}", text(key), text(value)) });
        DEVHOST_OK
    }

    unsafe extern "C" fn record_status(_: *mut DevhostCall, status: *const DevhostDeviceStatus) -> i32 {
        // SAFETY: the shim passes a valid status with valid strings.
        let line = unsafe {
            let status = &*status;
            let ips = strings(status.ips, status.ips_len, "ip").expect("ips");
            format!(
                "status {} {} {ips:?} {:?}",
                text(status.device_id),
                text(status.interface_name),
                text(status.data_json)
            )
        };
        seen(line);
        DEVHOST_OK
    }

    unsafe extern "C" fn record_publish(
        _: *mut DevhostHost,
        _: DevhostStr,
        devices: *const DevhostDevice,
        count: usize,
    ) -> i32 {
        // SAFETY: the shim passes `count` valid 1.2 devices.
        let devices = unsafe { std::slice::from_raw_parts(devices, count) };
        for device in devices {
            // SAFETY: as above, for what each device points to.
            let line = unsafe {
                let consumes = host_array(device.consumes, device.consumes_len, "consumes").expect("consumes");
                let sets: Vec<String> = consumes.iter().map(|c| text(c.counter_set)).collect();
                let policies =
                    host_array(device.request_policies, device.request_policies_len, "policies").expect("policies");
                let kinds: Vec<(String, u32, String, String)> =
                    policies.iter().map(|p| (text(p.capacity), p.kind, text(p.min), text(p.step))).collect();
                format!("device {} flags {} consumes {sets:?} policies {kinds:?}", text(device.id), device.flags)
            };
            seen(line);
        }
        DEVHOST_OK
    }

    unsafe extern "C" fn record_resource(_: *mut DevhostCall, resource: *const DevhostResource) -> i32 {
        // SAFETY: the shim passes a valid 1.2 resource.
        let line = unsafe {
            let resource = &*resource;
            let sets = host_array(resource.counter_sets, resource.counter_sets_len, "sets").expect("sets");
            let sets: Vec<(String, usize)> = sets.iter().map(|set| (text(set.name), set.counters_len)).collect();
            format!("resource {} {sets:?}", text(resource.name))
        };
        seen(line);
        DEVHOST_OK
    }

    #[test]
    fn abi_1_2_travels_through_the_shims_both_ways() {
        let api: &'static DevhostHostApi = Box::leak(Box::new(DevhostHostApi {
            publish: record_publish,
            add_resource: record_resource,
            add_env: record_env,
            add_device_status: record_status,
            ..host(DEVHOST_ABI_VERSION, size_of_u32::<DevhostHostApi>())
        }));
        let host = Host { api, ctx: std::ptr::null_mut() };
        let nic = Device::healthy("nic-0").with_capacity("bandwidth", "10G").with_request_policy(
            "bandwidth",
            RequestPolicy {
                default: Some("1G".into()),
                valid: Some(ValidRequests::Range { min: "1G".into(), max: None, step: Some("1G".into()) }),
            },
        );
        let half = Device::healthy("half").consuming("gpu-0", [("memory", "20Gi")]);
        host.publish("a.io/x", &[half, nic]).expect("published");
        let gpu =
            Resource::new("a.io/x").with_counter_set(crate::model::CounterSet::new("gpu-0", [("memory", "40Gi")]));
        declare(api, std::ptr::null_mut(), &gpu).expect("declared");

        let instance = Box::into_raw(Box::new(Instance { backend: Sharer, host: host.clone() }));
        let consumed = [DevhostCapacity {
            struct_size: size_of_u32::<DevhostCapacity>(),
            reserved: 0,
            name: DevhostStr::new("bandwidth"),
            quantity: DevhostStr::new("2G"),
        }];
        let shares = [DevhostShare {
            struct_size: size_of_u32::<DevhostShare>(),
            reserved: 0,
            device_id: DevhostStr::new("nic-0"),
            share_id: DevhostStr::new("u-1"),
            consumed: consumed.as_ptr(),
            consumed_len: 1,
        }];
        let ids = [DevhostStr::new("nic-0")];
        // SAFETY: the instance came from `Box::into_raw` of an
        // `Instance<Sharer>`; every array lives on this frame.
        let status = unsafe {
            allocate_shared::<Sharer>(
                instance.cast(),
                std::ptr::null_mut(),
                DevhostStr::new("a.io/x"),
                ids.as_ptr(),
                1,
                shares.as_ptr(),
                1,
            )
        };
        assert_eq!(status, DEVHOST_OK);
        // SAFETY: as above; this is its only shutdown.
        unsafe { shutdown::<Sharer>(instance.cast()) };
        assert_eq!(
            SEEN.with(|seen| seen.borrow().clone()),
            [
                "device half flags 0 consumes [\"gpu-0\"] policies []",
                "device nic-0 flags 1 consumes [] policies [(\"bandwidth\", 2, \"1G\", \"1G\")]",
                "resource a.io/x [(\"gpu-0\", 1)]",
                "env SHARE_nic-0=Some(\"u-1\") {\"bandwidth\": \"2G\"}",
                "status nic-0 eth1 [\"10.0.0.5/24\"] \"\"",
            ]
        );
    }
}
