//! The `#[repr(C)]` definitions of the native backend ABI, version 1: the
//! single source of truth for `include/devhost_backend.h` (generated from
//! this file by cbindgen) and for the host's loader, which uses these very
//! types. The SDK's safe view lives in [`crate::sdk`]; this module holds no
//! logic and no `unsafe`.
//!
//! Rules every item here keeps (see `abi/README.md` for the full contract):
//! every struct starts with `struct_size` (and `abi_version` where it has
//! one) and only ever grows at the end; strings are [`DevhostStr`]
//! (pointer + length, UTF-8, not NUL-terminated); nothing one side allocates
//! is freed by the other.

use std::ffi::c_void;
use std::marker::{PhantomData, PhantomPinned};

/// Major version of the ABI described here. A change of major breaks
/// compatibility: the host refuses a backend of another major.
pub const DEVHOST_ABI_VERSION_MAJOR: u32 = 1;
/// Minor version of the ABI described here. Minors only append fields,
/// callbacks and constants; both sides read what the other's sizes cover.
pub const DEVHOST_ABI_VERSION_MINOR: u32 = 2;
/// The packed version `(major << 16) | minor` of this ABI.
pub const DEVHOST_ABI_VERSION: u32 = (DEVHOST_ABI_VERSION_MAJOR << 16) | DEVHOST_ABI_VERSION_MINOR;

/// The symbol every backend exports; its type is [`DevhostBackendEntry`].
pub const DEVHOST_BACKEND_ENTRY_SYMBOL: &str = "devhost_backend_entry";

/// Status: the call succeeded.
pub const DEVHOST_OK: i32 = 0;
/// Status from a backend call: it failed; its message was given through
/// `DevhostHostApi::set_error`. The host reports it to the kubelet.
pub const DEVHOST_ERROR: i32 = 1;
/// Status from a backend call: the backend itself is broken (a caught panic,
/// a failed assertion). The host marks the backend's devices Unhealthy and
/// re-initialises it with back-off. A message may be given with `set_error`.
pub const DEVHOST_FAULT: i32 = 2;
/// Status from `preferred_allocation` only: no preference; the host's
/// default policy chooses.
pub const DEVHOST_USE_DEFAULT: i32 = 3;

/// Callback result: the data broke the contract (not UTF-8, empty or
/// duplicate ID, unknown health, struct too small, NULL pointer). The host
/// logged why; a result callback also makes the current call fail.
pub const DEVHOST_E_INVALID: i32 = -1;
/// Callback result: the `DevhostHost` context is closed (its backend
/// instance was shut down); nothing was published.
pub const DEVHOST_E_CLOSED: i32 = -2;
/// Callback result: this callback is not allowed during the current call
/// (for example `add_env` during `init`).
pub const DEVHOST_E_WRONG_CALL: i32 = -3;
/// Callback result: the host failed internally; nothing was recorded.
pub const DEVHOST_E_INTERNAL: i32 = -4;

/// Device health: usable.
pub const DEVHOST_HEALTH_HEALTHY: u32 = 1;
/// Device health: not usable.
pub const DEVHOST_HEALTH_UNHEALTHY: u32 = 2;

/// `DevhostResource::flags`: the kubelet must call `pre_start` before each
/// container start.
pub const DEVHOST_RESOURCE_PRE_START_REQUIRED: u32 = 1;
/// `DevhostResource::flags`: the backend answers `preferred_allocation`.
pub const DEVHOST_RESOURCE_PREFERRED_ALLOCATION: u32 = 2;
/// `DevhostResource::flags` (ABI 1.1): the host calls `release` for this
/// resource's devices once no container holds them. Needs a non-NULL
/// `DevhostBackendApi::release`.
pub const DEVHOST_RESOURCE_RELEASE: u32 = 4;

/// `DevhostAttribute::kind` (ABI 1.1): a signed integer in `int_value`.
pub const DEVHOST_ATTRIBUTE_INT: u32 = 1;
/// `DevhostAttribute::kind` (ABI 1.1): a boolean, `int_value` 0 or 1.
pub const DEVHOST_ATTRIBUTE_BOOL: u32 = 2;
/// `DevhostAttribute::kind` (ABI 1.1): a string of at most 64 bytes in
/// `text`.
pub const DEVHOST_ATTRIBUTE_STRING: u32 = 3;
/// `DevhostAttribute::kind` (ABI 1.1): a semantic version (semver 2.0) of
/// at most 64 bytes in `text`.
pub const DEVHOST_ATTRIBUTE_VERSION: u32 = 4;

/// `sizeof(DevhostDevice)` in ABI 1.0 (64-bit): the smallest device the
/// host accepts. A 1.0 device has no attributes and no capacities.
pub const DEVHOST_DEVICE_SIZE_1_0: u32 = 40;
/// `sizeof(DevhostBackendApi)` in ABI 1.0 (64-bit): the smallest table the
/// host accepts. A 1.0 table has no `release` and no `poll`.
pub const DEVHOST_BACKEND_API_SIZE_1_0: u32 = 48;
/// `sizeof(DevhostDevice)` in ABI 1.1 (64-bit). A device of this size has
/// attributes and capacities, but consumes no counters and is not shared.
pub const DEVHOST_DEVICE_SIZE_1_1: u32 = 72;
/// `sizeof(DevhostBackendApi)` in ABI 1.1 (64-bit). A table of this size
/// has no `allocate_shared`.
pub const DEVHOST_BACKEND_API_SIZE_1_1: u32 = 64;
/// `sizeof(DevhostResource)` in ABI 1.1, and in 1.0 (64-bit): the smallest
/// resource the host accepts. A resource of this size has no counter sets.
pub const DEVHOST_RESOURCE_SIZE_1_1: u32 = 24;
/// `sizeof(DevhostHostApi)` in ABI 1.1, and in 1.0 (64-bit). A host table
/// of this size has no `add_device_status`: a 1.2 backend checks
/// `host->struct_size` before calling it.
pub const DEVHOST_HOST_API_SIZE_1_1: u32 = 88;

/// `DevhostDevice::flags` (ABI 1.2): several DRA claims may be allocated
/// the device at once, each consuming part of its capacities (DRA's
/// `allowMultipleAllocations`); `request_policies` say which amounts.
/// Without it the device is allocated whole, to one claim at a time.
pub const DEVHOST_DEVICE_SHARED: u32 = 1;

/// `DevhostRequestPolicy::kind` (ABI 1.2): a claim may consume any amount
/// of the capacity, up to what is left; `default_quantity` is optional,
/// `min`, `max`, `step` and `values` must be empty.
pub const DEVHOST_REQUEST_POLICY_ANY: u32 = 1;
/// `DevhostRequestPolicy::kind` (ABI 1.2): `min`, then `min + n * step`
/// (any amount without a step) up to `max` (the capacity without one);
/// `default_quantity` and `min` are required, `values` must be empty.
pub const DEVHOST_REQUEST_POLICY_RANGE: u32 = 2;
/// `DevhostRequestPolicy::kind` (ABI 1.2): only the amounts in `values`
/// (ascending, at most ten); `default_quantity` is required and one of
/// them, `min`, `max` and `step` must be empty.
pub const DEVHOST_REQUEST_POLICY_VALUES: u32 = 3;

/// Log level: something failed.
pub const DEVHOST_LOG_ERROR: u32 = 1;
/// Log level: something is wrong but the backend carries on.
pub const DEVHOST_LOG_WARN: u32 = 2;
/// Log level: normal operation worth recording.
pub const DEVHOST_LOG_INFO: u32 = 3;
/// Log level: detail for debugging.
pub const DEVHOST_LOG_DEBUG: u32 = 4;

/// A borrowed UTF-8 string: `len` bytes at `ptr`, not NUL-terminated.
/// `ptr` may be NULL only when `len` is 0. Valid only during the call that
/// passes it; the receiver copies what it keeps.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostStr {
    /// First byte, or NULL for the empty string.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

/// Host-owned context of one backend instance, handed to `init`. Pass it
/// to `publish` and `log`. Thread-safe; the host keeps the pointer valid for
/// the life of the process, and after `shutdown` its `publish` answers
/// `DEVHOST_E_CLOSED`.
pub struct DevhostHost {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// Host-owned collector of one call's results (`set_error`, `add_*`).
/// Valid only until the backend call it was passed to returns; it may be
/// used from any thread during that call.
pub struct DevhostCall {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// One device in a `publish` list.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostDevice {
    /// `sizeof(DevhostDevice)` as the backend compiled it. Every element of
    /// one list has the same size, which is also the array's stride.
    pub struct_size: u32,
    /// `DEVHOST_HEALTH_HEALTHY` or `DEVHOST_HEALTH_UNHEALTHY`.
    pub health: u32,
    /// Unique, non-empty ID within the resource.
    pub id: DevhostStr,
    /// NUMA nodes the device is attached to (may be NULL when the count is 0).
    pub numa_nodes: *const i64,
    /// Number of entries in `numa_nodes`; 0 means no NUMA preference.
    pub numa_nodes_len: usize,
    /// ABI 1.1: what the device is, as typed attributes (may be NULL when
    /// the count is 0). Names are unique within the device.
    pub attributes: *const DevhostAttribute,
    /// ABI 1.1: number of entries in `attributes`.
    pub attributes_len: usize,
    /// ABI 1.1: how much of something the device has (may be NULL when the
    /// count is 0). Names are unique within the device; attributes and
    /// capacities together at most 32.
    pub capacities: *const DevhostCapacity,
    /// ABI 1.1: number of entries in `capacities`.
    pub capacities_len: usize,
    /// ABI 1.2: what the device takes from its resource's counter sets
    /// while it is allocated (DRA's partitionable devices; may be NULL when
    /// the count is 0). At most two entries, one per counter set, each a
    /// set the resource declares (`DevhostResource::counter_sets`).
    pub consumes: *const DevhostCounterConsumption,
    /// ABI 1.2: number of entries in `consumes`.
    pub consumes_len: usize,
    /// ABI 1.2: `DEVHOST_DEVICE_*` bits; unknown bits are refused.
    pub flags: u32,
    /// ABI 1.2: zero.
    pub reserved: u32,
    /// ABI 1.2: which amounts of its capacities a claim may consume, one
    /// policy per capacity at most (may be NULL when the count is 0). Only
    /// on a device flagged `DEVHOST_DEVICE_SHARED`; a capacity without a
    /// policy may be consumed in any amount.
    pub request_policies: *const DevhostRequestPolicy,
    /// ABI 1.2: number of entries in `request_policies`.
    pub request_policies_len: usize,
}

/// ABI 1.1: one typed attribute of a device. The rules are DRA's: `name`
/// is `domain/identifier` or a bare C identifier of at most 32 characters.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostAttribute {
    /// `sizeof(DevhostAttribute)` as the backend compiled it. Every element
    /// of one array has the same size, which is also the array's stride.
    pub struct_size: u32,
    /// `DEVHOST_ATTRIBUTE_*`: which of the fields below holds the value.
    pub kind: u32,
    /// Qualified name, e.g. `example.com/model`.
    pub name: DevhostStr,
    /// The value of an `INT` attribute, or 0/1 for a `BOOL` one.
    pub int_value: i64,
    /// The value of a `STRING` or `VERSION` attribute.
    pub text: DevhostStr,
}

/// ABI 1.1: one capacity of a device.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostCapacity {
    /// `sizeof(DevhostCapacity)` as the backend compiled it. Every element
    /// of one array has the same size, which is also the array's stride.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// Qualified name, e.g. `example.com/memory`.
    pub name: DevhostStr,
    /// A Kubernetes quantity, e.g. `80Gi`.
    pub quantity: DevhostStr,
}

/// ABI 1.2: a named set of counters a resource's devices draw from (DRA's
/// partitionable devices): a GPU's memory and compute slices, say. The set
/// itself is not allocatable; a device consuming from it is allocated only
/// while enough of each counter is left, so overlapping partitions (the
/// whole GPU, its halves) are never handed out together.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostCounterSet {
    /// `sizeof(DevhostCounterSet)` as the backend compiled it. Every
    /// element of one array has the same size, which is also the stride.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// A DNS label, unique among the resource's counter sets.
    pub name: DevhostStr,
    /// The counters: each a DNS-label name and how much there is (a
    /// Kubernetes quantity); 1 to 32, names unique within the set.
    pub counters: *const DevhostCapacity,
    /// Number of entries in `counters`.
    pub counters_len: usize,
}

/// ABI 1.2: what one device takes from one counter set while it is
/// allocated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostCounterConsumption {
    /// `sizeof(DevhostCounterConsumption)` as the backend compiled it.
    /// Every element of one array has the same size, which is also the
    /// stride.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// The counter set's name, one the resource declares.
    pub counter_set: DevhostStr,
    /// Counter name (one of the set's) and how much the device takes; at
    /// least one, names unique.
    pub counters: *const DevhostCapacity,
    /// Number of entries in `counters`.
    pub counters_len: usize,
}

/// ABI 1.2: which amounts of one capacity of a shared device a DRA claim
/// may consume (DRA's `CapacityRequestPolicy`). Quantities are Kubernetes
/// quantities; an empty string means none.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostRequestPolicy {
    /// `sizeof(DevhostRequestPolicy)` as the backend compiled it. Every
    /// element of one array has the same size, which is also the stride.
    pub struct_size: u32,
    /// `DEVHOST_REQUEST_POLICY_*`: which of the fields below apply.
    pub kind: u32,
    /// The capacity it is for: the name of one of the device's capacities.
    pub capacity: DevhostStr,
    /// What a request that names no amount consumes; required with `RANGE`
    /// and `VALUES`, optional (empty) with `ANY`.
    pub default_quantity: DevhostStr,
    /// `RANGE`: the least a claim consumes (required).
    pub min: DevhostStr,
    /// `RANGE`: the most a claim consumes (empty: the capacity).
    pub max: DevhostStr,
    /// `RANGE`: the granularity above `min` (empty: any amount).
    pub step: DevhostStr,
    /// `VALUES`: the amounts allowed, ascending (may be NULL when the count
    /// is 0).
    pub values: *const DevhostStr,
    /// Number of entries in `values`.
    pub values_len: usize,
}

/// A resource the backend serves, declared with `add_resource` during `init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostResource {
    /// `sizeof(DevhostResource)` as the backend compiled it.
    pub struct_size: u32,
    /// `DEVHOST_RESOURCE_*` bits; unknown bits are refused.
    pub flags: u32,
    /// Extended resource name, e.g. `example.com/gpu`.
    pub name: DevhostStr,
    /// ABI 1.2: the counter sets the resource's devices consume from (may
    /// be NULL when the count is 0), published in DRA ResourceSlices as
    /// `sharedCounters`; at most 8, names unique.
    pub counter_sets: *const DevhostCounterSet,
    /// ABI 1.2: number of entries in `counter_sets`.
    pub counter_sets_len: usize,
}

/// ABI 1.2: what one DRA claim consumes of one shared device, handed to
/// `allocate_shared` (host-owned, read-only, valid during the call).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostShare {
    /// `sizeof(DevhostShare)` as the host compiled it. Every element of one
    /// array has the same size, which is also the stride.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// The shared device, one of the call's device IDs.
    pub device_id: DevhostStr,
    /// The allocation's share of the device (a UID); empty when it has none.
    pub share_id: DevhostStr,
    /// Capacity name and the amount this claim consumes (a quantity).
    pub consumed: *const DevhostCapacity,
    /// Number of entries in `consumed`.
    pub consumed_len: usize,
}

/// ABI 1.2: what the backend reports about one device it allocated for a
/// DRA claim (the claim's `status.devices` entry, mostly for network
/// devices), given with `add_device_status`. Ignored for device-plugin
/// allocations. An empty string means none.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostDeviceStatus {
    /// `sizeof(DevhostDeviceStatus)` as the backend compiled it.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// The device, one of the call's device IDs.
    pub device_id: DevhostStr,
    /// The network interface in the pod (at most 256 bytes).
    pub interface_name: DevhostStr,
    /// Its hardware (MAC) address (at most 128 bytes).
    pub hardware_address: DevhostStr,
    /// Its addresses with a prefix length in canonical form (`10.0.0.5/24`),
    /// at most 16, unique (may be NULL when the count is 0).
    pub ips: *const DevhostStr,
    /// Number of entries in `ips`.
    pub ips_len: usize,
    /// Driver-specific data: the text of a JSON object (at most 10 KiB).
    pub data_json: DevhostStr,
}

/// A bind mount, added with `add_mount` during `allocate`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostMount {
    /// `sizeof(DevhostMount)` as the backend compiled it.
    pub struct_size: u32,
    /// Non-zero: mounted read-only.
    pub read_only: u32,
    /// Path inside the container.
    pub container_path: DevhostStr,
    /// Path on the host.
    pub host_path: DevhostStr,
}

/// A device node, added with `add_device_spec` during `allocate`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostDeviceSpec {
    /// `sizeof(DevhostDeviceSpec)` as the backend compiled it.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// Path inside the container.
    pub container_path: DevhostStr,
    /// Path on the host.
    pub host_path: DevhostStr,
    /// cgroup permissions: any combination of `r`, `w`, `m`.
    pub permissions: DevhostStr,
}

/// The question of one `preferred_allocation` call (host-owned, read-only).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostPreferredRequest {
    /// `sizeof(DevhostPreferredRequest)` as the host compiled it.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// Device IDs the answer may choose from.
    pub available: *const DevhostStr,
    /// Number of entries in `available`.
    pub available_len: usize,
    /// Device IDs the answer must contain.
    pub must_include: *const DevhostStr,
    /// Number of entries in `must_include`.
    pub must_include_len: usize,
    /// How many device IDs the answer must contain.
    pub size: usize,
}

/// The arguments of `init` (host-owned, read-only, valid during `init`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostInitArgs {
    /// `sizeof(DevhostInitArgs)` as the host compiled it.
    pub struct_size: u32,
    /// The host's ABI version, `(major << 16) | minor`.
    pub abi_version: u32,
    /// The host's callback table (the same one the entry point received).
    pub host_api: *const DevhostHostApi,
    /// This instance's context for `publish` and `log`.
    pub host: *mut DevhostHost,
    /// The backend's `[config]` table from its TOML file, as a JSON object.
    pub config_json: DevhostStr,
}

/// Publishes the full device list of `resource` (replacing the previous
/// one). Any thread, from the start of `init` until `shutdown` is called.
pub type DevhostPublishFn = unsafe extern "C" fn(
    host: *mut DevhostHost,
    resource: DevhostStr,
    devices: *const DevhostDevice,
    count: usize,
) -> i32;
/// Writes one line to the host's log. Any thread, any time; `host` may be
/// NULL (for example inside the entry point).
pub type DevhostLogFn = unsafe extern "C" fn(host: *mut DevhostHost, level: u32, message: DevhostStr);
/// Sets the error message of the current call (the last one wins).
pub type DevhostSetErrorFn = unsafe extern "C" fn(call: *mut DevhostCall, message: DevhostStr);
/// `init` only: declares one resource.
pub type DevhostAddResourceFn = unsafe extern "C" fn(call: *mut DevhostCall, resource: *const DevhostResource) -> i32;
/// `allocate` only: adds a key/value pair (environment variable or
/// annotation).
pub type DevhostAddPairFn = unsafe extern "C" fn(call: *mut DevhostCall, key: DevhostStr, value: DevhostStr) -> i32;
/// `allocate` only: adds a bind mount.
pub type DevhostAddMountFn = unsafe extern "C" fn(call: *mut DevhostCall, mount: *const DevhostMount) -> i32;
/// `allocate` only: adds a device node.
pub type DevhostAddDeviceSpecFn = unsafe extern "C" fn(call: *mut DevhostCall, spec: *const DevhostDeviceSpec) -> i32;
/// Adds one string: a CDI device name (`allocate`) or a device ID of the
/// answer (`preferred_allocation`).
pub type DevhostAddStrFn = unsafe extern "C" fn(call: *mut DevhostCall, value: DevhostStr) -> i32;
/// ABI 1.2, `allocate` and `allocate_shared` only: reports the status of
/// one of the call's devices, at most once per device.
pub type DevhostAddDeviceStatusFn =
    unsafe extern "C" fn(call: *mut DevhostCall, status: *const DevhostDeviceStatus) -> i32;

/// The host's callback table, passed to the entry point. Static: valid for
/// the life of the process. Read a field only when `struct_size` covers it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostHostApi {
    /// `sizeof(DevhostHostApi)` as the host compiled it.
    pub struct_size: u32,
    /// The host's ABI version, `(major << 16) | minor`.
    pub abi_version: u32,
    /// See [`DevhostPublishFn`].
    pub publish: DevhostPublishFn,
    /// See [`DevhostLogFn`].
    pub log: DevhostLogFn,
    /// See [`DevhostSetErrorFn`]; any backend call.
    pub set_error: DevhostSetErrorFn,
    /// See [`DevhostAddResourceFn`]; `init` only.
    pub add_resource: DevhostAddResourceFn,
    /// Adds an environment variable; `allocate` only.
    pub add_env: DevhostAddPairFn,
    /// See [`DevhostAddMountFn`]; `allocate` only.
    pub add_mount: DevhostAddMountFn,
    /// See [`DevhostAddDeviceSpecFn`]; `allocate` only.
    pub add_device_spec: DevhostAddDeviceSpecFn,
    /// Adds a container annotation; `allocate` only.
    pub add_annotation: DevhostAddPairFn,
    /// Adds a fully qualified CDI device name; `allocate` only.
    pub add_cdi_device: DevhostAddStrFn,
    /// Adds a device ID to the answer; `preferred_allocation` only.
    pub add_device_id: DevhostAddStrFn,
    /// ABI 1.2: see [`DevhostAddDeviceStatusFn`]; `allocate` and
    /// `allocate_shared` only. Present only when `struct_size` covers it
    /// (a 1.1 host's table is `DEVHOST_HOST_API_SIZE_1_1` bytes).
    pub add_device_status: DevhostAddDeviceStatusFn,
}

/// Creates a backend instance. Declares its resources with `add_resource`
/// and may publish device lists (now or later, from any thread). On
/// `DEVHOST_OK` it stores its instance pointer (may be NULL) in `*instance`;
/// on any other status it must leave nothing running: the host will not
/// call `shutdown` for it.
pub type DevhostInitFn = Option<
    unsafe extern "C" fn(args: *const DevhostInitArgs, call: *mut DevhostCall, instance: *mut *mut c_void) -> i32,
>;
/// The type of `allocate` (answers one container's `Allocate`; results via
/// `add_*`) and of `pre_start` (prepares devices; no results). The host has
/// checked that every ID is a device of `resource`.
pub type DevhostDevicesCallFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        call: *mut DevhostCall,
        resource: DevhostStr,
        device_ids: *const DevhostStr,
        count: usize,
    ) -> i32,
>;
/// Answers `GetPreferredAllocation` with `add_device_id`, or returns
/// `DEVHOST_USE_DEFAULT`.
pub type DevhostPreferredFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        call: *mut DevhostCall,
        resource: DevhostStr,
        request: *const DevhostPreferredRequest,
    ) -> i32,
>;
/// ABI 1.2: `allocate` for a DRA claim that is allocated shares of shared
/// devices (`DEVHOST_DEVICE_SHARED`): `shares` holds, for each shared device
/// among `device_ids`, what this claim consumes of it, in the order of
/// `device_ids`. Results as for `allocate`. Called instead of `allocate`
/// only when there is at least one share.
pub type DevhostAllocateSharedFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        call: *mut DevhostCall,
        resource: DevhostStr,
        device_ids: *const DevhostStr,
        count: usize,
        shares: *const DevhostShare,
        shares_len: usize,
    ) -> i32,
>;
/// ABI 1.1: re-checks the devices and publishes what changed (through
/// `publish`, during the call). Called by the host every
/// `poll_interval_ms` of the backend's file, never concurrently with
/// itself, with the call deadline. `DEVHOST_ERROR` is logged;
/// `DEVHOST_FAULT` re-initialises the backend.
pub type DevhostPollFn = Option<unsafe extern "C" fn(instance: *mut c_void, call: *mut DevhostCall) -> i32>;
/// Stops the instance: joins its threads, frees what it allocated. No call
/// on the instance is in flight or follows; nothing may be published after
/// it returns.
pub type DevhostShutdownFn = Option<unsafe extern "C" fn(instance: *mut c_void)>;

/// The backend's function table, returned by the entry point. Must stay
/// valid for the life of the process (a `static`). The host reads a field
/// only when `struct_size` covers it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DevhostBackendApi {
    /// `sizeof(DevhostBackendApi)` as the backend compiled it.
    pub struct_size: u32,
    /// The backend's ABI version, `(major << 16) | minor`.
    pub abi_version: u32,
    /// Required. See [`DevhostInitFn`].
    pub init: DevhostInitFn,
    /// Required. See [`DevhostDevicesCallFn`].
    pub allocate: DevhostDevicesCallFn,
    /// Optional (NULL: the host's default policy). See [`DevhostPreferredFn`].
    pub preferred_allocation: DevhostPreferredFn,
    /// Optional (NULL: nothing to prepare). See [`DevhostDevicesCallFn`].
    pub pre_start: DevhostDevicesCallFn,
    /// Required. See [`DevhostShutdownFn`].
    pub shutdown: DevhostShutdownFn,
    /// ABI 1.1, optional (NULL: nothing to do). Called once devices are no
    /// longer held by any container, to scrub or reset them before the next
    /// tenant; a [`DevhostDevicesCallFn`] with no results. While it runs, and
    /// after it fails, the devices are advertised Unhealthy.
    pub release: DevhostDevicesCallFn,
    /// ABI 1.1, optional (NULL: the backend publishes from its own threads
    /// only). See [`DevhostPollFn`].
    pub poll: DevhostPollFn,
    /// ABI 1.2, optional (NULL: the host calls `allocate`, and the shares
    /// are not passed). See [`DevhostAllocateSharedFn`].
    pub allocate_shared: DevhostAllocateSharedFn,
}

/// The type of the exported `devhost_backend_entry` symbol: negotiates the
/// version and returns the backend's static table, or NULL to refuse the
/// host's major version (after saying why through `host->log`).
pub type DevhostBackendEntry = unsafe extern "C" fn(host: *const DevhostHostApi) -> *const DevhostBackendApi;

/// Packs a version as `(major << 16) | minor`.
pub const fn version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor & 0xffff)
}

/// The major part of a packed version.
pub const fn version_major(version: u32) -> u32 {
    version >> 16
}

/// The minor part of a packed version.
pub const fn version_minor(version: u32) -> u32 {
    version & 0xffff
}

/// Size of a v1 struct as a `struct_size` value.
pub const fn size_of_u32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

impl DevhostStr {
    /// Borrows `s` (valid while `s` is).
    pub const fn new(s: &str) -> Self {
        DevhostStr { ptr: s.as_ptr(), len: s.len() }
    }

    /// The empty string.
    pub const EMPTY: DevhostStr = DevhostStr { ptr: std::ptr::null(), len: 0 };
}

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// ABI 1.0's layout on 64-bit targets, frozen: a change here breaks every
    /// backend built against 1.0. 1.1 only appended.
    #[test]
    fn v1_layout_is_frozen() {
        assert_eq!(size_of::<DevhostStr>(), 16);
        assert_eq!(offset_of!(DevhostDevice, attributes), DEVHOST_DEVICE_SIZE_1_0 as usize);
        assert_eq!(offset_of!(DevhostBackendApi, release), DEVHOST_BACKEND_API_SIZE_1_0 as usize);
        assert_eq!(DEVHOST_RESOURCE_SIZE_1_1, 24);
        assert_eq!(size_of::<DevhostMount>(), 40);
        assert_eq!(size_of::<DevhostDeviceSpec>(), 56);
        assert_eq!(size_of::<DevhostPreferredRequest>(), 48);
        assert_eq!(size_of::<DevhostInitArgs>(), 40);
        assert_eq!(DEVHOST_HOST_API_SIZE_1_1, 88);
        assert_eq!(offset_of!(DevhostHostApi, add_device_id), 80);
        assert_eq!(offset_of!(DevhostBackendApi, shutdown), 40);
        assert_eq!(offset_of!(DevhostInitArgs, config_json), 24);
    }

    /// ABI 1.1's layout on 64-bit targets, frozen from its release.
    #[test]
    fn v1_1_layout_is_frozen() {
        assert_eq!(DEVHOST_DEVICE_SIZE_1_1, 72);
        assert_eq!(size_of::<DevhostAttribute>(), 48);
        assert_eq!(size_of::<DevhostCapacity>(), 40);
        assert_eq!(DEVHOST_BACKEND_API_SIZE_1_1, 64);
        assert_eq!(offset_of!(DevhostBackendApi, poll), 56);
    }

    /// ABI 1.2's layout on 64-bit targets: what it appended starts where
    /// 1.1's structs ended.
    #[test]
    fn v1_2_layout_appends_to_1_1() {
        assert_eq!(offset_of!(DevhostDevice, consumes), DEVHOST_DEVICE_SIZE_1_1 as usize);
        assert_eq!(offset_of!(DevhostBackendApi, allocate_shared), DEVHOST_BACKEND_API_SIZE_1_1 as usize);
        assert_eq!(offset_of!(DevhostResource, counter_sets), DEVHOST_RESOURCE_SIZE_1_1 as usize);
        assert_eq!(offset_of!(DevhostHostApi, add_device_status), DEVHOST_HOST_API_SIZE_1_1 as usize);
        assert_eq!(size_of::<DevhostDevice>(), 112);
        assert_eq!(offset_of!(DevhostDevice, flags), 88);
        assert_eq!(size_of::<DevhostResource>(), 40);
        assert_eq!(size_of::<DevhostBackendApi>(), 72);
        assert_eq!(size_of::<DevhostHostApi>(), 96);
        assert_eq!(size_of::<DevhostCounterSet>(), 40);
        assert_eq!(size_of::<DevhostCounterConsumption>(), 40);
        assert_eq!(size_of::<DevhostRequestPolicy>(), 104);
        assert_eq!(size_of::<DevhostShare>(), 56);
        assert_eq!(size_of::<DevhostDeviceStatus>(), 88);
    }

    #[test]
    fn versions_pack_major_and_minor() {
        assert_eq!(DEVHOST_ABI_VERSION, version(1, 2));
        assert_eq!((version_major(version(2, 3)), version_minor(version(2, 3))), (2, 3));
    }
}
