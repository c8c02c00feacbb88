//! Copying what a native backend hands over into owned Rust values, with the
//! contract's checks: strings are UTF-8 and not dangling, structs are at
//! least as large as ABI 1.0 defines them, health values are known. Each
//! error message names the value and says what was expected. This module
//! does not decide what a refusal means for the call; its callers do.

use devhost_abi::ffi::{DEVHOST_HEALTH_HEALTHY, DEVHOST_HEALTH_UNHEALTHY, DevhostDevice, DevhostStr};

use crate::backend::{Device, Health};

/// Copies a backend string; `what` names it in the error ("the resource
/// name").
///
/// # Safety
///
/// `s.ptr` points to `s.len` readable bytes, or `s.len` is 0.
pub(super) unsafe fn read_str(s: DevhostStr, what: &str) -> Result<String, String> {
    if s.len == 0 {
        return Ok(String::new());
    }
    if s.ptr.is_null() {
        return Err(format!("{what} is a NULL pointer with length {}", s.len));
    }
    if s.len > isize::MAX as usize {
        return Err(format!("{what} has an impossible length {}", s.len));
    }
    // SAFETY: per the caller's contract; the length fits in `isize`.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_owned()),
        Err(error) => Err(format!(
            "{what} is not valid UTF-8 (byte {:#04x} at offset {}; lossy: {:?})",
            bytes[error.valid_up_to()],
            error.valid_up_to(),
            String::from_utf8_lossy(bytes)
        )),
    }
}

/// Copies the ABI 1.0 part of a struct that starts with `u32 struct_size`,
/// after checking that the size covers it; `name` is the C type name.
///
/// # Safety
///
/// `ptr` is NULL or points to at least `struct_size` readable bytes, and
/// `T` is one of the ABI's `#[repr(C)]` structs whose first field is
/// `u32 struct_size`.
pub(super) unsafe fn read_struct<T: Copy>(ptr: *const T, name: &str) -> Result<T, String> {
    if ptr.is_null() {
        return Err(format!("a NULL {name} pointer"));
    }
    // SAFETY: every ABI struct starts with a `u32` size, readable per the
    // caller's contract; read unaligned since C may pack arrays oddly.
    let size = unsafe { ptr.cast::<u32>().read_unaligned() } as usize;
    let minimum = std::mem::size_of::<T>();
    if size < minimum {
        return Err(format!("{name}.struct_size is {size} bytes, expected at least {minimum} (ABI 1.0)"));
    }
    // SAFETY: the backend says `size >= size_of::<T>()` bytes are readable.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Copies a published device list. Every element has the same
/// `struct_size`, which is also the array's stride, so a backend built for a
/// later minor (larger devices) is read correctly.
///
/// # Safety
///
/// `devices` is NULL with `count` 0, or points to `count` devices laid out
/// `struct_size` bytes apart, each with valid strings and NUMA lists.
pub(super) unsafe fn read_devices(
    devices: *const DevhostDevice,
    count: usize,
    resource: &str,
) -> Result<Vec<Device>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if devices.is_null() {
        return Err(format!("resource {resource:?}: devices is NULL with count {count}"));
    }
    // SAFETY: per the caller's contract the first device is readable.
    let first =
        unsafe { read_struct(devices, "DevhostDevice") }.map_err(|error| format!("resource {resource:?}: {error}"))?;
    let stride = first.struct_size as usize;
    if stride.checked_mul(count).is_none_or(|total| total > isize::MAX as usize) {
        return Err(format!("resource {resource:?}: {count} devices of {stride} bytes do not fit in memory"));
    }
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        // SAFETY: `index * stride` is within the array (checked above), and
        // each element has at least the v1 size (checked for the first, and
        // each must have the same size as the first).
        let raw = unsafe { devices.cast::<u8>().add(index * stride).cast::<DevhostDevice>().read_unaligned() };
        if raw.struct_size as usize != stride {
            return Err(format!(
                "resource {resource:?}: device #{index} has struct_size {}, but device #0 has {stride} (all must match)",
                raw.struct_size
            ));
        }
        // SAFETY: the element's strings are valid per the caller's contract.
        let id = unsafe { read_str(raw.id, &format!("resource {resource:?}: the ID of device #{index}"))? };
        let health = match raw.health {
            DEVHOST_HEALTH_HEALTHY => Health::Healthy,
            DEVHOST_HEALTH_UNHEALTHY => Health::Unhealthy,
            other => {
                return Err(format!(
                    "resource {resource:?}: device {id:?} has unknown health {other} (expected 1 = DEVHOST_HEALTH_HEALTHY or 2 = DEVHOST_HEALTH_UNHEALTHY)"
                ));
            }
        };
        let numa_nodes = match (raw.numa_nodes_len, raw.numa_nodes.is_null()) {
            (0, _) => Vec::new(),
            (len, true) => {
                return Err(format!("resource {resource:?}: device {id:?} has NULL numa_nodes with length {len}"));
            }
            (len, false) if len > isize::MAX as usize / 8 => {
                return Err(format!("resource {resource:?}: device {id:?} has an impossible numa_nodes length {len}"));
            }
            // SAFETY: a non-NULL list of `len` entries, valid during the call.
            (len, false) => unsafe { std::slice::from_raw_parts(raw.numa_nodes, len) }.to_vec(),
        };
        out.push(Device::new(id, health).with_numa_nodes(numa_nodes));
    }
    Ok(out)
}
