//! The native adapter's readers directly: `host/src/native/read.rs` (the
//! copying and checking of what a module hands over), `callbacks.rs` (the
//! host's C callback table) and `adapter.rs` (a module behind the `Backend`
//! trait: statuses, phases, instances, shutdown). Those modules are private
//! to `devhost::native`, so this target compiles the very same files into
//! itself (`#[path]` below, unchanged; `crate::backend` and
//! `crate::device_state` resolve to devhost's through re-exports in this
//! crate's root). The native module is played by Rust functions here with
//! the ABI's signatures: no C compiler, no `dlopen`, every byte and every
//! pointer chosen by the input, and memory always as large as claimed (the
//! contract a module can keep; AddressSanitizer under libFuzzer watches
//! that the host reads no further).
//!
//! An input is a sequence of steps: `init`, `allocate`, `preferred`,
//! `pre_start`, a publish from a backend thread (through the current, an
//! old or a NULL host pointer) and `shutdown`. In each backend call the
//! module makes input-chosen host calls (`publish`, `log`, `set_error`,
//! `add_resource`, `add_env`, `add_annotation`, `add_mount`,
//! `add_device_spec`, `add_cdi_device`, `add_device_id`,
//! `add_device_status` (ABI 1.2), some with a NULL call pointer) with
//! strings that may be non-UTF-8, NULL with a length or impossibly long,
//! structs of any `struct_size` (a resource of 1.1's size or 1.2's), device
//! arrays of any stride, health value and NUMA list, then returns any
//! status.
//!
//! Invariants, against a model of the ABI written here from
//! `abi/include/devhost_backend.h` and `abi/README.md`: every callback
//! returns the code the contract gives (`DEVHOST_OK`, `E_INVALID`,
//! `E_WRONG_CALL`, `E_CLOSED`); a call with a contract violation fails as
//! a fault, whatever status the module returns; otherwise `DEVHOST_OK`
//! gives exactly what was handed over (resources, allocation, preferred
//! IDs), `DEVHOST_ERROR` declines with the module's last message,
//! `DEVHOST_FAULT` unwinds with it, `DEVHOST_USE_DEFAULT` (preferred only)
//! leaves the choice to the host, any other status is a fault; a list
//! refused during `init` fails `init`; the device states hold exactly the
//! lists accepted; the module sees the resource, IDs and request it was
//! called with and its own instance pointer; `shutdown` runs exactly once
//! for each instance whose `init` returned `DEVHOST_OK`, and never for
//! one whose `init` did not.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arbitrary::{Result as AResult, Unstructured};
use devhost::backend::{Allocation, Backend, BackendError, Device, DeviceSpec, Health, Mount, PreferredRequest};
use devhost::backend::{Publisher, ResourceSpec};
use devhost::device_state::ResourceState;
use devhost_abi::ffi::*;

use crate::Target;

#[path = "../../../host/src/native/adapter.rs"]
#[allow(dead_code, clippy::all)]
mod adapter;
#[path = "../../../host/src/native/callbacks.rs"]
#[allow(dead_code, clippy::all)]
mod callbacks;
#[path = "../../../host/src/native/read.rs"]
#[allow(dead_code, clippy::all)]
mod read;

/// The target (its state lives in the thread-locals of the fake module).
pub struct NativeRead;

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(|| Ok(NativeRead), data);
}

// ---------------------------------------------------------------------
// What the module hands over: strings, structs, device arrays.

/// A string as the module passes it. The bytes it points to live as long
/// as the value.
#[derive(Debug, Clone)]
enum RawStr {
    /// Points to these bytes (NULL when empty, as C does).
    Bytes(Vec<u8>),
    /// NULL with this length (> 0 breaks the contract).
    Null(usize),
    /// A real pointer with a length over `isize::MAX`: must be refused
    /// without being read.
    Huge,
}

impl RawStr {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<RawStr> {
        Ok(match u.int_in_range(0..=15u8)? {
            0..=6 => RawStr::Bytes((*u.choose(WORDS)?).as_bytes().to_vec()),
            7..=12 => RawStr::Bytes(u.arbitrary::<String>()?.into_bytes()),
            13 => RawStr::Bytes(u.arbitrary::<Vec<u8>>()?),
            14 => RawStr::Null(u.int_in_range(0..=3)?),
            _ => RawStr::Huge,
        })
    }

    fn raw(&self) -> DevhostStr {
        match self {
            RawStr::Bytes(bytes) if bytes.is_empty() => DevhostStr { ptr: std::ptr::null(), len: 0 },
            RawStr::Bytes(bytes) => DevhostStr { ptr: bytes.as_ptr(), len: bytes.len() },
            RawStr::Null(len) => DevhostStr { ptr: std::ptr::null(), len: *len },
            RawStr::Huge => DevhostStr { ptr: WORDS[1].as_ptr(), len: isize::MAX as usize + 1 },
        }
    }

    /// What the host must read: the text, or `None` for a violation.
    fn text(&self) -> Option<String> {
        match self {
            RawStr::Bytes(bytes) => String::from_utf8(bytes.clone()).ok(),
            RawStr::Null(0) => Some(String::new()),
            RawStr::Null(_) | RawStr::Huge => None,
        }
    }
}

const WORDS: &[&str] = &["", "gpu-0", "gpu-1", "example.com/gpu", "fuzz.example.com/b", "/dev/null", "rw", "r", "K"];

/// A NUMA list as the module passes it.
#[derive(Debug, Clone)]
enum RawNuma {
    Nodes(Vec<i64>),
    /// NULL with this length.
    Null(usize),
    /// A real pointer with a length no array can have.
    Huge,
}

/// `DevhostDevice` as ABI 1.0 laid it out: this target publishes 1.0
/// devices (attributes are checked by the host's model rules, not here).
#[repr(C)]
#[derive(Clone, Copy)]
struct DeviceV1_0 {
    struct_size: u32,
    health: u32,
    id: DevhostStr,
    numa_nodes: *const i64,
    numa_nodes_len: usize,
}

/// One device of a published array.
#[derive(Debug, Clone)]
struct RawDevice {
    /// Its own `struct_size`, if not the array's stride.
    size: Option<u32>,
    health: u32,
    id: RawStr,
    numa: RawNuma,
}

/// A published device array.
#[derive(Debug, Clone)]
struct RawList {
    /// `struct_size` of device 0, the stride.
    stride: u32,
    devices: Vec<RawDevice>,
    /// NULL devices with this count.
    null: Option<usize>,
    /// A count so large that count × stride overflows.
    overflow: bool,
}

impl RawList {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<RawList> {
        let base = DEVHOST_DEVICE_SIZE_1_0;
        let stride = match u.int_in_range(0..=7u8)? {
            0..=4 => base,
            5 => u.int_in_range(4..=base - 1)?,
            6 => base + 8 * u.int_in_range(1..=4)?,
            _ => base + u.int_in_range(1..=7)?,
        };
        let mut devices = Vec::new();
        for _ in 0..u.int_in_range(0..=5)? {
            let health = match u.int_in_range(0..=9u8)? {
                0..=5 => DEVHOST_HEALTH_HEALTHY,
                6..=8 => DEVHOST_HEALTH_UNHEALTHY,
                _ => u.arbitrary()?,
            };
            let numa = match u.int_in_range(0..=9u8)? {
                0..=7 => RawNuma::Nodes(u.arbitrary::<Vec<i64>>()?.into_iter().take(4).collect()),
                8 => RawNuma::Null(u.int_in_range(0..=2)?),
                _ => RawNuma::Huge,
            };
            let size = if crate::rarely(u, 12) { Some(u.arbitrary()?) } else { None };
            let id = if u.ratio(3, 4)? {
                RawStr::Bytes(format!("gpu-{}", u.int_in_range(0..=6)?).into_bytes())
            } else {
                RawStr::arbitrary(u)?
            };
            devices.push(RawDevice { size, health, id, numa });
        }
        let null = if crate::rarely(u, 20) { Some(u.int_in_range(0..=3)?) } else { None };
        let overflow = !devices.is_empty() && crate::rarely(u, 20);
        Ok(RawList { stride, devices, null, overflow })
    }

    /// The array: `count × stride` bytes (at least 4), each device at its
    /// offset, and what its pointers point to.
    fn build(&self) -> (Vec<u8>, usize) {
        let stride = self.stride as usize;
        let count = self.devices.len();
        let mut bytes = vec![0u8; (count * stride).max(4)];
        for (index, device) in self.devices.iter().enumerate() {
            // Device 0's size is the stride, by definition.
            let size = if index == 0 { self.stride } else { device.size.unwrap_or(self.stride) };
            if stride < DEVHOST_DEVICE_SIZE_1_0 as usize {
                if index == 0 {
                    bytes[..4].copy_from_slice(&size.to_le_bytes());
                }
                continue;
            }
            let (numa_nodes, numa_nodes_len) = match &device.numa {
                RawNuma::Nodes(nodes) => {
                    (if nodes.is_empty() { std::ptr::null() } else { nodes.as_ptr() }, nodes.len())
                }
                RawNuma::Null(len) => (std::ptr::null(), *len),
                RawNuma::Huge => (std::ptr::NonNull::<i64>::dangling().as_ptr().cast_const(), usize::MAX / 4),
            };
            let raw = DeviceV1_0 {
                struct_size: size,
                health: device.health,
                id: device.id.raw(),
                numa_nodes,
                numa_nodes_len,
            };
            // SAFETY: the element's `stride` (>= the 1.0 size) bytes lie
            // within `bytes`; unaligned writes are allowed. A larger stride
            // leaves the 1.1 fields zero: no attributes, no capacities.
            unsafe { bytes.as_mut_ptr().add(index * stride).cast::<DeviceV1_0>().write_unaligned(raw) };
        }
        let count = if self.overflow { usize::MAX / stride.max(1) + 1 } else { count };
        (bytes, count)
    }

    /// What the host must read: the devices, or `None` for a violation.
    fn devices(&self) -> Option<Vec<Device>> {
        if let Some(count) = self.null {
            return (count == 0).then(Vec::new);
        }
        if self.devices.is_empty() {
            return Some(Vec::new());
        }
        if (self.stride as usize) < DEVHOST_DEVICE_SIZE_1_0 as usize || self.overflow {
            return None;
        }
        let mut out = Vec::new();
        for (index, device) in self.devices.iter().enumerate() {
            if index > 0 && device.size.is_some_and(|size| size != self.stride) {
                return None;
            }
            let id = device.id.text()?;
            let health = match device.health {
                DEVHOST_HEALTH_HEALTHY => Health::Healthy,
                DEVHOST_HEALTH_UNHEALTHY => Health::Unhealthy,
                _ => return None,
            };
            let numa_nodes = match &device.numa {
                RawNuma::Nodes(nodes) => nodes.clone(),
                RawNuma::Null(0) => Vec::new(),
                RawNuma::Null(_) | RawNuma::Huge => return None,
            };
            out.push(Device::new(id, health).with_numa_nodes(numa_nodes));
        }
        Some(out)
    }
}

/// A struct that starts with `u32 struct_size`, in a buffer of exactly the
/// size it claims (at least 4 bytes), or NULL. A buffer smaller than `T`
/// holds `T`'s first bytes (as a module built against an older minor lays
/// it out).
fn struct_bytes<T: Copy>(value: T, size: u32, null: bool) -> Option<Vec<u8>> {
    if null {
        return None;
    }
    let mut bytes = vec![0u8; (size as usize).max(4)];
    if bytes.len() >= size_of::<T>() {
        // SAFETY: the buffer holds at least size_of::<T>() bytes.
        unsafe { bytes.as_mut_ptr().cast::<T>().write_unaligned(value) };
    } else {
        let prefix = (size as usize).min(size_of::<T>());
        // SAFETY: `value` has size_of::<T>() readable bytes, the buffer at
        // least `prefix`.
        unsafe { std::ptr::copy_nonoverlapping(std::ptr::from_ref(&value).cast::<u8>(), bytes.as_mut_ptr(), prefix) };
        bytes[..4].copy_from_slice(&size.to_le_bytes());
    }
    Some(bytes)
}

fn struct_ptr<T>(bytes: &Option<Vec<u8>>) -> *const T {
    bytes.as_ref().map_or(std::ptr::null(), |b| b.as_ptr().cast())
}

/// A `struct_size`: mostly right, sometimes short or longer.
fn struct_size<T>(u: &mut Unstructured<'_>) -> AResult<u32> {
    let size = size_of_u32::<T>();
    Ok(match u.int_in_range(0..=9u8)? {
        0..=7 => size,
        8 => u.int_in_range(4..=size - 1)?,
        _ => size + u.int_in_range(1..=16)?,
    })
}

// ---------------------------------------------------------------------
// What the module does.

/// Whose host pointer a publish goes through.
#[derive(Debug, Clone, Copy)]
enum HostRef {
    /// The instance being initialised, or the latest one.
    Current,
    /// The n-th `init` of this input (closed unless it is the live one).
    Init(usize),
    Null,
}

/// One host call the module makes.
#[derive(Debug, Clone)]
enum Action {
    Publish {
        host: HostRef,
        resource: RawStr,
        list: RawList,
    },
    Log {
        level: u32,
        message: RawStr,
        null_host: bool,
    },
    SetError(RawStr),
    AddResource {
        size: u32,
        flags: u32,
        name: RawStr,
        null: bool,
    },
    AddEnv(RawStr, RawStr),
    AddAnnotation(RawStr, RawStr),
    AddMount {
        size: u32,
        read_only: u32,
        container: RawStr,
        host: RawStr,
        null: bool,
    },
    AddDeviceSpec {
        size: u32,
        container: RawStr,
        host: RawStr,
        permissions: RawStr,
        null: bool,
    },
    AddCdi(RawStr),
    AddDeviceId(RawStr),
    /// ABI 1.2: a device status.
    AddDeviceStatus {
        size: u32,
        id: RawStr,
        interface: RawStr,
        ips: Vec<RawStr>,
        data: RawStr,
        null: bool,
    },
    /// `add_env` with a NULL call pointer.
    NullCall,
}

fn resource_name(u: &mut Unstructured<'_>) -> AResult<RawStr> {
    Ok(if u.ratio(3, 4)? {
        RawStr::Bytes((*u.choose(&["example.com/gpu", "fuzz.example.com/b"])?).as_bytes().to_vec())
    } else {
        RawStr::arbitrary(u)?
    })
}

impl Action {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<Action> {
        Ok(match u.int_in_range(0..=13u8)? {
            0 | 1 => Action::Publish {
                host: match u.int_in_range(0..=9u8)? {
                    0..=7 => HostRef::Current,
                    8 => HostRef::Init(u.int_in_range(0..=3)?),
                    _ => HostRef::Null,
                },
                resource: resource_name(u)?,
                list: RawList::arbitrary(u)?,
            },
            2 => {
                Action::Log { level: u.int_in_range(0..=5)?, message: RawStr::arbitrary(u)?, null_host: u.arbitrary()? }
            }
            3 => Action::SetError(RawStr::arbitrary(u)?),
            4 | 5 => Action::AddResource {
                size: struct_size::<DevhostResource>(u)?,
                flags: if crate::rarely(u, 8) { u.arbitrary()? } else { u.int_in_range(0..=3)? },
                name: resource_name(u)?,
                null: crate::rarely(u, 20),
            },
            6 => Action::AddEnv(RawStr::arbitrary(u)?, RawStr::arbitrary(u)?),
            7 => Action::AddAnnotation(RawStr::arbitrary(u)?, RawStr::arbitrary(u)?),
            8 => Action::AddMount {
                size: struct_size::<DevhostMount>(u)?,
                read_only: if u.arbitrary()? { u.arbitrary()? } else { u.int_in_range(0..=1)? },
                container: RawStr::arbitrary(u)?,
                host: RawStr::arbitrary(u)?,
                null: crate::rarely(u, 20),
            },
            9 => Action::AddDeviceSpec {
                size: struct_size::<DevhostDeviceSpec>(u)?,
                container: RawStr::arbitrary(u)?,
                host: RawStr::arbitrary(u)?,
                permissions: if u.ratio(3, 4)? {
                    RawStr::Bytes((*u.choose(&["rw", "r", "rwm", "m", "", "x", "rr"])?).as_bytes().to_vec())
                } else {
                    RawStr::arbitrary(u)?
                },
                null: crate::rarely(u, 20),
            },
            10 => Action::AddCdi(RawStr::arbitrary(u)?),
            11 => Action::AddDeviceId(RawStr::arbitrary(u)?),
            12 => {
                let pick = |u: &mut Unstructured<'_>, words: &[&str]| -> AResult<RawStr> {
                    if u.ratio(3, 4)? {
                        Ok(RawStr::Bytes((*u.choose(words)?).as_bytes().to_vec()))
                    } else {
                        RawStr::arbitrary(u)
                    }
                };
                Action::AddDeviceStatus {
                    size: struct_size::<DevhostDeviceStatus>(u)?,
                    id: pick(u, &["gpu-0", "gpu-1"])?,
                    interface: pick(u, &["", "eth1"])?,
                    ips: (0..u.int_in_range(0..=2)?)
                        .map(|_| pick(u, &["10.0.0.5/24", "10.0.0.6/24", "10.0.0.5", "2001:DB8::5/64"]))
                        .collect::<AResult<_>>()?,
                    data: pick(u, &["", "{\"vf\":3}", "[1]", "{"])?,
                    null: crate::rarely(u, 20),
                }
            }
            _ => Action::NullCall,
        })
    }
}

/// What the module does in one backend call: its host calls, then its
/// status (and, for `init`, whether it leaves `*instance` NULL).
#[derive(Debug, Clone)]
struct Script {
    actions: Vec<Action>,
    status: i32,
}

impl Script {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<Script> {
        let mut actions = Vec::new();
        for _ in 0..u.int_in_range(0..=6)? {
            actions.push(Action::arbitrary(u)?);
        }
        let status = match u.int_in_range(0..=15u8)? {
            0..=11 => DEVHOST_OK,
            12 => DEVHOST_ERROR,
            13 => DEVHOST_FAULT,
            14 => DEVHOST_USE_DEFAULT,
            _ => u.arbitrary()?,
        };
        Ok(Script { actions, status })
    }
}

/// One step of an input.
#[derive(Debug, Clone)]
enum Step {
    Init(Script),
    Allocate(Script, String, Vec<String>),
    Preferred(Script, String, PreferredRequest),
    PreStart(Script, String, Vec<String>),
    /// A publish from a backend thread, outside any call.
    Publish(HostRef, RawStr, RawList),
    Shutdown,
}

fn ids(u: &mut Unstructured<'_>) -> AResult<Vec<String>> {
    (0..u.int_in_range(0..=3)?).map(|_| Ok(if u.arbitrary()? { "gpu-0".into() } else { u.arbitrary()? })).collect()
}

impl Step {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<Step> {
        Ok(match u.int_in_range(0..=9u8)? {
            0 | 1 => Step::Init(Script::arbitrary(u)?),
            2 | 3 => Step::Allocate(Script::arbitrary(u)?, "example.com/gpu".into(), ids(u)?),
            4 => Step::Preferred(
                Script::arbitrary(u)?,
                u.arbitrary()?,
                PreferredRequest { available: ids(u)?, must_include: ids(u)?, size: u.arbitrary()? },
            ),
            5 => Step::PreStart(Script::arbitrary(u)?, u.arbitrary()?, ids(u)?),
            6 | 7 => Step::Publish(
                if crate::rarely(u, 4) { HostRef::Init(u.int_in_range(0..=3)?) } else { HostRef::Current },
                resource_name(u)?,
                RawList::arbitrary(u)?,
            ),
            _ => Step::Shutdown,
        })
    }
}

// ---------------------------------------------------------------------
// The module itself: the ABI's functions, driven by thread-locals.

/// What the fake module sees and does, per thread.
#[derive(Default)]
struct Module {
    /// The script of the next backend call.
    script: Option<Script>,
    /// Host pointers of every `init` of this input, in order.
    hosts: Vec<usize>,
    /// Codes the host callbacks returned, in order.
    codes: Vec<i32>,
    /// Instance numbers `shutdown` was called with, in order.
    shutdowns: Vec<usize>,
    /// The instance pointer, resource, IDs and request of the last call.
    seen: Option<(usize, String, Vec<String>, Option<PreferredRequest>)>,
    /// Instances made so far (instance pointers are 1, 2, ...).
    instances: usize,
}

thread_local! {
    static MODULE: RefCell<Module> = RefCell::new(Module::default());
}

fn host_of(host: HostRef, current: *mut DevhostHost) -> *mut DevhostHost {
    match host {
        HostRef::Current => current,
        HostRef::Init(n) => {
            MODULE.with(|m| m.borrow().hosts.get(n).copied()).map_or(current, |h| h as *mut DevhostHost)
        }
        HostRef::Null => std::ptr::null_mut(),
    }
}

/// Publishes `list` for `resource` through `host`.
fn publish(host: *mut DevhostHost, resource: &RawStr, list: &RawList) -> i32 {
    let (bytes, count) = list.build();
    let devices: *const DevhostDevice = match list.null {
        Some(_) => std::ptr::null(),
        None if list.devices.is_empty() => std::ptr::null(),
        None => bytes.as_ptr().cast(),
    };
    let count = list.null.unwrap_or(count);
    // SAFETY: every pointer is NULL (with its length telling so) or points to
    // as many bytes as claimed, alive for the call.
    unsafe { (callbacks::HOST_API.publish)(host, resource.raw(), devices, count) }
}

/// Runs one host call; returns its code (0 for the `void` ones).
fn act(action: &Action, call: *mut DevhostCall, current: *mut DevhostHost) -> i32 {
    let api = &callbacks::HOST_API;
    // SAFETY (for every call below): the pointers are NULL or point to as many
    // bytes as claimed, alive for the call; `call` is the host's own.
    unsafe {
        match action {
            Action::Publish { host, resource, list } => publish(host_of(*host, current), resource, list),
            Action::Log { level, message, null_host } => {
                (api.log)(if *null_host { std::ptr::null_mut() } else { current }, *level, message.raw());
                0
            }
            Action::SetError(message) => {
                (api.set_error)(call, message.raw());
                0
            }
            Action::AddResource { size, flags, name, null } => {
                let raw = DevhostResource {
                    struct_size: *size,
                    flags: *flags,
                    name: name.raw(),
                    counter_sets: std::ptr::null(),
                    counter_sets_len: 0,
                };
                let bytes = struct_bytes(raw, *size, *null);
                (api.add_resource)(call, struct_ptr(&bytes))
            }
            Action::AddEnv(key, value) => (api.add_env)(call, key.raw(), value.raw()),
            Action::AddAnnotation(key, value) => (api.add_annotation)(call, key.raw(), value.raw()),
            Action::AddMount { size, read_only, container, host, null } => {
                let raw = DevhostMount {
                    struct_size: *size,
                    read_only: *read_only,
                    container_path: container.raw(),
                    host_path: host.raw(),
                };
                let bytes = struct_bytes(raw, *size, *null);
                (api.add_mount)(call, struct_ptr(&bytes))
            }
            Action::AddDeviceSpec { size, container, host, permissions, null } => {
                let raw = DevhostDeviceSpec {
                    struct_size: *size,
                    reserved: 0,
                    container_path: container.raw(),
                    host_path: host.raw(),
                    permissions: permissions.raw(),
                };
                let bytes = struct_bytes(raw, *size, *null);
                (api.add_device_spec)(call, struct_ptr(&bytes))
            }
            Action::AddCdi(name) => (api.add_cdi_device)(call, name.raw()),
            Action::AddDeviceId(id) => (api.add_device_id)(call, id.raw()),
            Action::AddDeviceStatus { size, id, interface, ips, data, null } => {
                let ips: Vec<DevhostStr> = ips.iter().map(RawStr::raw).collect();
                let raw = DevhostDeviceStatus {
                    struct_size: *size,
                    reserved: 0,
                    device_id: id.raw(),
                    interface_name: interface.raw(),
                    hardware_address: DevhostStr::EMPTY,
                    ips: if ips.is_empty() { std::ptr::null() } else { ips.as_ptr() },
                    ips_len: ips.len(),
                    data_json: data.raw(),
                };
                let bytes = struct_bytes(raw, *size, *null);
                (api.add_device_status)(call, struct_ptr(&bytes))
            }
            Action::NullCall => (api.add_env)(std::ptr::null_mut(), DevhostStr::new("K"), DevhostStr::new("V")),
        }
    }
}

/// Plays the script of the current call.
fn play(call: *mut DevhostCall, current: *mut DevhostHost) -> i32 {
    let Some(script) = MODULE.with(|m| m.borrow_mut().script.take()) else { return DEVHOST_FAULT };
    for action in &script.actions {
        let code = act(action, call, current);
        MODULE.with(|m| m.borrow_mut().codes.push(code));
    }
    script.status
}

/// A string the host passed, read back.
///
/// # Safety
///
/// `s` is a valid `DevhostStr` for the call.
unsafe fn passed(s: DevhostStr) -> String {
    if s.len == 0 {
        return String::new();
    }
    // SAFETY: per the caller.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(s.ptr, s.len) }).into_owned()
}

/// # Safety
///
/// `ids` points to `count` valid strings.
unsafe fn passed_list(ids: *const DevhostStr, count: usize) -> Vec<String> {
    if count == 0 {
        return Vec::new();
    }
    // SAFETY: per the caller; each string is valid.
    unsafe { std::slice::from_raw_parts(ids, count).iter().map(|s| passed(*s)).collect() }
}

unsafe extern "C" fn module_init(
    args: *const DevhostInitArgs,
    call: *mut DevhostCall,
    instance: *mut *mut c_void,
) -> i32 {
    // SAFETY: the host passes valid init arguments.
    let args = unsafe { &*args };
    if args.struct_size != size_of_u32::<DevhostInitArgs>() || args.abi_version != DEVHOST_ABI_VERSION {
        return 99; // Noticed by the harness as an unknown status.
    }
    let number = MODULE.with(|m| {
        let mut m = m.borrow_mut();
        m.hosts.push(args.host as usize);
        m.instances += 1;
        m.instances
    });
    let status = play(call, args.host);
    if status == DEVHOST_OK {
        // SAFETY: the host passes a valid out-pointer.
        unsafe { *instance = number as *mut c_void };
    }
    status
}

fn current_host() -> *mut DevhostHost {
    MODULE.with(|m| m.borrow().hosts.last().copied().unwrap_or(0)) as *mut DevhostHost
}

unsafe extern "C" fn module_devices(
    instance: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    ids: *const DevhostStr,
    count: usize,
) -> i32 {
    // SAFETY: the host passes valid strings for the call.
    let seen = unsafe { (instance as usize, passed(resource), passed_list(ids, count), None) };
    MODULE.with(|m| m.borrow_mut().seen = Some(seen));
    play(call, current_host())
}

unsafe extern "C" fn module_preferred(
    instance: *mut c_void,
    call: *mut DevhostCall,
    resource: DevhostStr,
    request: *const DevhostPreferredRequest,
) -> i32 {
    // SAFETY: the host passes a valid request for the call.
    let seen = unsafe {
        let request = &*request;
        if request.struct_size != size_of_u32::<DevhostPreferredRequest>() {
            return 98;
        }
        let asked = PreferredRequest {
            available: passed_list(request.available, request.available_len),
            must_include: passed_list(request.must_include, request.must_include_len),
            size: request.size,
        };
        (instance as usize, passed(resource), Vec::new(), Some(asked))
    };
    MODULE.with(|m| m.borrow_mut().seen = Some(seen));
    play(call, current_host())
}

unsafe extern "C" fn module_shutdown(instance: *mut c_void) {
    MODULE.with(|m| m.borrow_mut().shutdowns.push(instance as usize));
}

// ---------------------------------------------------------------------
// The model: what the host must do.

/// A call's phase, as the ABI names it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Init,
    Allocate,
    Preferred,
    PreStart,
}

/// The device states behind one `init`'s publisher.
#[derive(Debug, Default, Clone)]
struct States {
    sealed: bool,
    lists: BTreeMap<String, Vec<Device>>,
}

/// What the host's side is, per the contract.
#[derive(Debug, Default)]
struct Model {
    /// The live instance (numbered from 1: the n-th `init` makes n + 1).
    live: Option<usize>,
    /// `init`s whose host context is open, with their publisher's states.
    open: BTreeMap<usize, States>,
    /// The `init` running now.
    initialising: Option<usize>,
    inits: usize,
    /// Instances `shutdown` ran for, in order.
    shut: Vec<usize>,
}

/// What one call collects, per the contract.
#[derive(Debug, Default)]
struct Collect {
    invalid: bool,
    error: Option<String>,
    resources: Vec<ResourceSpec>,
    allocation: Allocation,
    ids: Vec<String>,
    /// A list refused during `init`.
    init_publish_error: bool,
    /// The device IDs of the call (`allocate`): those a status may be for.
    call_ids: Vec<String>,
}

fn text_of(s: &RawStr) -> Option<String> {
    s.text()
}

impl Model {
    /// The code a publish through `host` must return, applying it.
    fn publish(&mut self, host: Option<usize>, resource: &RawStr, list: &RawList, c: &mut Collect) -> i32 {
        let Some(init) = host else { return DEVHOST_E_INVALID };
        let in_init = self.initialising == Some(init);
        let Some(states) = self.open.get_mut(&init) else { return DEVHOST_E_CLOSED };
        let Some(resource) = text_of(resource) else {
            c.init_publish_error |= in_init;
            return DEVHOST_E_INVALID;
        };
        let Some(devices) = list.devices() else {
            c.init_publish_error |= in_init;
            return DEVHOST_E_INVALID;
        };
        if !states.lists.contains_key(&resource) && states.sealed {
            c.init_publish_error |= in_init;
            return DEVHOST_E_INVALID;
        }
        // The state exists from here on, even if the list is refused.
        states.lists.entry(resource.clone()).or_default();
        let mut seen = std::collections::HashSet::new();
        if devices.iter().any(|d| d.id.is_empty() || !seen.insert(d.id.clone())) {
            c.init_publish_error |= in_init;
            return DEVHOST_E_INVALID;
        }
        states.lists.insert(resource, devices);
        DEVHOST_OK
    }

    /// The code one host call must return, applying it.
    fn act(&mut self, action: &Action, phase: Phase, host: Option<usize>, c: &mut Collect) -> i32 {
        let allowed = |phases: &[Phase]| phases.contains(&phase);
        let violation = |c: &mut Collect, code: i32| {
            c.invalid = true;
            code
        };
        match action {
            Action::Publish { host: which, resource, list } => {
                let host = self.host(*which, host);
                self.publish(host, resource, list, c)
            }
            Action::Log { .. } => 0,
            Action::SetError(message) => {
                match text_of(message) {
                    Some(text) => c.error = Some(text),
                    None => c.invalid = true,
                }
                0
            }
            Action::NullCall => DEVHOST_E_INVALID,
            _ if !allowed(match action {
                Action::AddResource { .. } => &[Phase::Init],
                Action::AddDeviceId(_) => &[Phase::Preferred],
                _ => &[Phase::Allocate],
            }) =>
            {
                violation(c, DEVHOST_E_WRONG_CALL)
            }
            Action::AddResource { size, flags, name, null } => {
                let known = DEVHOST_RESOURCE_PRE_START_REQUIRED
                    | DEVHOST_RESOURCE_PREFERRED_ALLOCATION
                    | DEVHOST_RESOURCE_RELEASE;
                match text_of(name) {
                    // 1.1's size is enough: a smaller resource has no
                    // counter sets (this module declares none either way).
                    Some(name) if !null && *size >= DEVHOST_RESOURCE_SIZE_1_1 && flags & !known == 0 => {
                        c.resources.push(ResourceSpec {
                            name,
                            pre_start_required: flags & DEVHOST_RESOURCE_PRE_START_REQUIRED != 0,
                            preferred_allocation: flags & DEVHOST_RESOURCE_PREFERRED_ALLOCATION != 0,
                            release_required: flags & DEVHOST_RESOURCE_RELEASE != 0,
                            counter_sets: Vec::new(),
                        });
                        DEVHOST_OK
                    }
                    _ => violation(c, DEVHOST_E_INVALID),
                }
            }
            Action::AddEnv(key, value) | Action::AddAnnotation(key, value) => match (text_of(key), text_of(value)) {
                (Some(key), Some(value)) if !key.is_empty() => {
                    let map = if matches!(action, Action::AddEnv(..)) {
                        &mut c.allocation.envs
                    } else {
                        &mut c.allocation.annotations
                    };
                    map.insert(key, value);
                    DEVHOST_OK
                }
                _ => violation(c, DEVHOST_E_INVALID),
            },
            Action::AddMount { size, read_only, container, host, null } => match (text_of(container), text_of(host)) {
                (Some(container_path), Some(host_path)) if !null && *size >= size_of_u32::<DevhostMount>() => {
                    c.allocation.mounts.push(Mount { container_path, host_path, read_only: *read_only != 0 });
                    DEVHOST_OK
                }
                _ => violation(c, DEVHOST_E_INVALID),
            },
            Action::AddDeviceSpec { size, container, host, permissions, null } => {
                match (text_of(container), text_of(host), text_of(permissions)) {
                    (Some(container_path), Some(host_path), Some(permissions))
                        if !null
                            && *size >= size_of_u32::<DevhostDeviceSpec>()
                            && !permissions.is_empty()
                            && permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) =>
                    {
                        c.allocation.device_specs.push(DeviceSpec { container_path, host_path, permissions });
                        DEVHOST_OK
                    }
                    _ => violation(c, DEVHOST_E_INVALID),
                }
            }
            Action::AddCdi(name) => match text_of(name) {
                Some(name) if !name.is_empty() => {
                    c.allocation.cdi_devices.push(name);
                    DEVHOST_OK
                }
                _ => violation(c, DEVHOST_E_INVALID),
            },
            Action::AddDeviceId(id) => match text_of(id) {
                Some(id) => {
                    c.ids.push(id);
                    DEVHOST_OK
                }
                None => violation(c, DEVHOST_E_INVALID),
            },
            Action::AddDeviceStatus { size, id, interface, ips, data, null } => {
                let ips: Option<Vec<String>> = ips.iter().map(text_of).collect();
                let (Some(id), Some(interface), Some(ips), Some(data)) =
                    (text_of(id), text_of(interface), ips, text_of(data))
                else {
                    return violation(c, DEVHOST_E_INVALID);
                };
                // The contract's rules: the whole 1.2 struct, a device of the
                // call, once, within the API server's limits (empty = none).
                let status = devhost_abi::model::DeviceStatus {
                    interface_name: (!interface.is_empty()).then_some(interface),
                    hardware_address: None,
                    ips,
                    data: (!data.is_empty()).then_some(data),
                };
                if *null
                    || *size < size_of_u32::<DevhostDeviceStatus>()
                    || !c.call_ids.contains(&id)
                    || c.allocation.device_status.contains_key(&id)
                    || devhost_abi::partitions::check_device_status(&status).is_err()
                {
                    return violation(c, DEVHOST_E_INVALID);
                }
                c.allocation.device_status.insert(id, status);
                DEVHOST_OK
            }
        }
    }

    /// The `init` a host reference means (`None`: a NULL host).
    fn host(&self, which: HostRef, current: Option<usize>) -> Option<usize> {
        match which {
            HostRef::Current => current,
            HostRef::Init(n) if n < self.inits => Some(n),
            HostRef::Init(_) => current,
            HostRef::Null => None,
        }
    }
}

/// How a call must end.
#[derive(Debug, PartialEq)]
enum Outcome<T> {
    Ok(T),
    /// Declined with this message (not a fault).
    Declined(String),
    /// A contract violation: a fault error.
    Fault,
    /// `DEVHOST_FAULT`: an unwind with this message.
    Unwind(String),
}

fn settle<T>(status: i32, c: &Collect, extra: &[i32], value: T) -> Outcome<T> {
    if c.invalid {
        return Outcome::Fault;
    }
    match status {
        DEVHOST_OK => Outcome::Ok(value),
        s if extra.contains(&s) => Outcome::Ok(value),
        DEVHOST_ERROR => Outcome::Declined(c.error.clone().unwrap_or_else(|| "failed without a message".into())),
        DEVHOST_FAULT => {
            Outcome::Unwind(c.error.clone().unwrap_or_else(|| "reported a fault without a message".into()))
        }
        _ => Outcome::Fault,
    }
}

/// The host's answer, as an outcome.
fn observed<T>(result: std::thread::Result<Result<T, BackendError>>) -> Outcome<T> {
    match result {
        Ok(Ok(value)) => Outcome::Ok(value),
        Ok(Err(error)) if error.fault => Outcome::Fault,
        Ok(Err(error)) => Outcome::Declined(error.message),
        Err(panic) => Outcome::Unwind(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default(),
        ),
    }
}

// ---------------------------------------------------------------------
// The run.

impl Target for NativeRead {
    fn name(&self) -> &'static str {
        "native-read"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![vec![1, 0, 2, 4, 40, 0, 0, 0, 0, 9, 0, 2, 2, 0, 0, 9, 0, 4, 9], vec![0; 64]]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        let with_preferred = u.arbitrary::<bool>().unwrap_or(true);
        let with_pre_start = u.arbitrary::<bool>().unwrap_or(true);
        let mut steps = vec![Step::Init(Script::arbitrary(&mut u).unwrap_or(Script { actions: vec![], status: 0 }))];
        while steps.len() < 10
            && let Ok(step) = Step::arbitrary(&mut u)
        {
            steps.push(step);
        }
        MODULE.with(|m| *m.borrow_mut() = Module::default());
        let fns = adapter::BackendFns {
            init: module_init,
            allocate: module_devices,
            preferred_allocation: with_preferred.then_some(module_preferred as _),
            pre_start: with_pre_start.then_some(module_devices as _),
            shutdown: module_shutdown,
            release: None,
            poll: None,
            allocate_shared: None,
        };
        let backend = Arc::new(adapter::NativeBackend::new("fuzz.so".into(), fns, "{}".into()));
        let result = drive(&backend, &steps, with_preferred, with_pre_start);
        drop(backend);
        result
    }
}

fn codes_since(start: usize) -> Vec<i32> {
    MODULE.with(|m| m.borrow().codes[start..].to_vec())
}

fn codes_len() -> usize {
    MODULE.with(|m| m.borrow().codes.len())
}

fn drive(
    backend: &Arc<adapter::NativeBackend>,
    steps: &[Step],
    with_preferred: bool,
    with_pre_start: bool,
) -> Result<(), String> {
    let mut model = Model::default();
    // The device states of each sealed publisher, by `init` number.
    let mut states: BTreeMap<usize, Vec<(String, Arc<ResourceState>)>> = BTreeMap::new();
    for (index, step) in steps.iter().enumerate() {
        let start = codes_len();
        let context = |what: String| format!("step #{index} {step:?}: {what}");
        let mut c = Collect::default();
        let mut want_codes = Vec::new();
        // Outside `init`, "the current host" is that of the latest `init`.
        let latest = model.inits.checked_sub(1);
        match step {
            Step::Init(script) => {
                let number = model.inits;
                model.inits += 1;
                model.open.insert(number, States::default());
                model.initialising = Some(number);
                for action in &script.actions {
                    want_codes.push(model.act(action, Phase::Init, Some(number), &mut c));
                }
                model.initialising = None;
                MODULE.with(|m| m.borrow_mut().script = Some(script.clone()));
                let publisher = Publisher::default();
                let got = observed(catch_unwind(AssertUnwindSafe(|| backend.init(publisher.clone()))));
                let mut want = settle(script.status, &c, &[], c.resources.clone());
                // A list refused during `init` fails it, and the message
                // says why (after the module's own words, if it declined).
                let refused = "published an invalid device list";
                let mut prefix_only = false;
                if c.init_publish_error {
                    match &want {
                        Outcome::Ok(_) => {
                            want = Outcome::Declined(refused.into());
                            prefix_only = true;
                        }
                        Outcome::Declined(said) => {
                            want = Outcome::Declined(format!("{said} (devhost refused its device list: {refused}"));
                            prefix_only = true;
                        }
                        _ => {}
                    }
                }
                // This module has no `release`: a resource asking for it
                // is a contract violation (`abi/README.md`, ABI 1.1).
                if matches!(&want, Outcome::Ok(resources) if resources.iter().any(|r| r.release_required)) {
                    want = Outcome::Fault;
                }
                let got = match (got, &want) {
                    (Outcome::Declined(message), Outcome::Declined(prefix))
                        if prefix_only && message.starts_with(prefix.as_str()) =>
                    {
                        Outcome::Declined(prefix.clone())
                    }
                    (got, _) => got,
                };
                if got != want {
                    return Err(context(format!("init ended {got:?}, the contract says {want:?}")));
                }
                let instance = number + 1;
                match want {
                    Outcome::Ok(resources) => {
                        // The new instance replaces the live one, whose
                        // context closes and whose shutdown runs.
                        if let Some(previous) = model.live.replace(instance) {
                            model.shut.push(previous);
                            model.open.remove(&(previous - 1));
                            states.remove(&(previous - 1));
                        }
                        let names: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
                        states.insert(number, names.iter().cloned().zip(publisher.seal(&names)).collect());
                        if let Some(model_states) = model.open.get_mut(&number) {
                            model_states.sealed = true;
                            model_states.lists.retain(|name, _| names.contains(name));
                            for name in names {
                                model_states.lists.entry(name).or_default();
                            }
                        }
                    }
                    _ => {
                        // A failed init leaves the live instance as it was;
                        // its own context closes, and its shutdown runs only
                        // if it returned DEVHOST_OK.
                        model.open.remove(&number);
                        if script.status == DEVHOST_OK {
                            model.shut.push(instance);
                        }
                    }
                }
            }
            Step::Allocate(script, resource, ids) | Step::PreStart(script, resource, ids) => {
                let pre_start = matches!(step, Step::PreStart(..));
                let phase = if pre_start { Phase::PreStart } else { Phase::Allocate };
                let called = model.live.is_some() && (!pre_start || with_pre_start);
                c.call_ids = ids.clone();
                if called {
                    for action in &script.actions {
                        want_codes.push(model.act(action, phase, latest, &mut c));
                    }
                    MODULE.with(|m| m.borrow_mut().script = Some(script.clone()));
                }
                let (got, want) = if pre_start {
                    let got = observed(catch_unwind(AssertUnwindSafe(|| backend.pre_start(resource, ids))));
                    let want = match (with_pre_start, model.live) {
                        (false, _) => Outcome::Ok(()),
                        (true, None) => Outcome::Declined(not_initialised()),
                        (true, Some(_)) => settle(script.status, &c, &[], ()),
                    };
                    (got.map_ok(|()| None), want.map_ok(|()| None))
                } else {
                    let got = observed(catch_unwind(AssertUnwindSafe(|| backend.allocate(resource, ids))));
                    let want = match model.live {
                        None => Outcome::Declined(not_initialised()),
                        Some(_) => settle(script.status, &c, &[], c.allocation.clone()),
                    };
                    (got.map_ok(Some), want.map_ok(Some))
                };
                if got != want {
                    return Err(context(format!("ended {got:?}, the contract says {want:?}")));
                }
                if called {
                    check_seen(model.live, resource, ids, None).map_err(context)?;
                }
            }
            Step::Preferred(script, resource, request) => {
                let called = model.live.is_some() && with_preferred;
                if called {
                    for action in &script.actions {
                        want_codes.push(model.act(action, Phase::Preferred, latest, &mut c));
                    }
                    MODULE.with(|m| m.borrow_mut().script = Some(script.clone()));
                }
                let got = observed(catch_unwind(AssertUnwindSafe(|| backend.preferred_allocation(resource, request))));
                let want = match (with_preferred, model.live) {
                    (false, _) => Outcome::Ok(None),
                    (true, None) => Outcome::Declined(not_initialised()),
                    (true, Some(_)) => match settle(script.status, &c, &[DEVHOST_USE_DEFAULT], ()) {
                        Outcome::Ok(()) if script.status == DEVHOST_OK => Outcome::Ok(Some(c.ids.clone())),
                        other => other.map_ok(|()| None),
                    },
                };
                if got != want {
                    return Err(context(format!("preferred ended {got:?}, the contract says {want:?}")));
                }
                if called {
                    check_seen(model.live, resource, &[], Some(request)).map_err(context)?;
                }
            }
            Step::Publish(which, resource, list) => {
                let host = model.host(*which, latest);
                want_codes.push(model.publish(host, resource, list, &mut c));
                let host = match host {
                    Some(n) => MODULE.with(|m| m.borrow().hosts[n]) as *mut DevhostHost,
                    None => std::ptr::null_mut(),
                };
                let code = publish(host, resource, list);
                MODULE.with(|m| m.borrow_mut().codes.push(code));
            }
            Step::Shutdown => {
                backend.shutdown();
                if let Some(live) = model.live.take() {
                    model.shut.push(live);
                    model.open.remove(&(live - 1));
                    states.remove(&(live - 1));
                }
            }
        }
        let got_codes = codes_since(start);
        if got_codes != want_codes {
            return Err(context(format!("the host calls returned {got_codes:?}, the contract says {want_codes:?}")));
        }
        for (number, named) in &states {
            let Some(model_states) = model.open.get(number) else { continue };
            for (name, state) in named {
                let want = model_states.lists.get(name).cloned().unwrap_or_default();
                let got = state.snapshot().devices.clone();
                if got != want {
                    return Err(context(format!("{name:?} holds {got:?}, the contract says {want:?}")));
                }
            }
        }
        let shut = MODULE.with(|m| m.borrow().shutdowns.clone());
        if shut != model.shut {
            return Err(context(format!("shutdown ran for instances {shut:?}, the contract says {:?}", model.shut)));
        }
    }
    Ok(())
}

fn not_initialised() -> String {
    "not initialised (no successful init since the last shutdown)".into()
}

/// The module saw its own instance and the arguments the host was given.
fn check_seen(
    live: Option<usize>,
    resource: &str,
    ids: &[String],
    request: Option<&PreferredRequest>,
) -> Result<(), String> {
    let seen = MODULE.with(|m| m.borrow_mut().seen.take());
    let want = (live.unwrap_or(0), resource.to_owned(), ids.to_vec(), request.cloned());
    match seen {
        Some(seen) if seen == want => Ok(()),
        other => Err(format!("the module was called with {other:?}, the host was asked {want:?}")),
    }
}

impl<T> Outcome<T> {
    fn map_ok<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Ok(value) => Outcome::Ok(f(value)),
            Outcome::Declined(message) => Outcome::Declined(message),
            Outcome::Fault => Outcome::Fault,
            Outcome::Unwind(message) => Outcome::Unwind(message),
        }
    }
}
