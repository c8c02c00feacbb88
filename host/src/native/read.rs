//! Copying what a native backend hands over into owned Rust values, with the
//! contract's checks: strings are UTF-8 and not dangling, structs are at
//! least as large as ABI 1.0 defines them (fields a later minor added read
//! as zero from an older backend), health values and attribute kinds are
//! known. Each
//! error message names the value and says what was expected. This module
//! does not decide what a refusal means for the call; its callers do.

use devhost_abi::ffi::{
    DEVHOST_ATTRIBUTE_BOOL, DEVHOST_ATTRIBUTE_INT, DEVHOST_ATTRIBUTE_STRING, DEVHOST_ATTRIBUTE_VERSION,
    DEVHOST_DEVICE_SIZE_1_0, DEVHOST_HEALTH_HEALTHY, DEVHOST_HEALTH_UNHEALTHY, DevhostAttribute, DevhostCapacity,
    DevhostDevice, DevhostStr,
};

use crate::backend::{AttributeValue, Device, Health};

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

/// Copies a struct that starts with `u32 struct_size`, after checking that
/// the size covers at least `minimum` bytes (what ABI 1.0 defines of it):
/// the bytes its size covers are read, the fields past them (a later
/// minor's, from an older backend) read as zero. `name` is the C type name.
///
/// # Safety
///
/// `ptr` is NULL or points to at least `struct_size` readable bytes, and
/// `T` is one of the ABI's `#[repr(C)]` structs whose first field is
/// `u32 struct_size` and for which all-zero bytes are a valid value (NULL
/// pointers, zero counts, `None` functions).
pub(super) unsafe fn read_struct_from<T: Copy>(ptr: *const T, name: &str, minimum: usize) -> Result<T, String> {
    if ptr.is_null() {
        return Err(format!("a NULL {name} pointer"));
    }
    // SAFETY: every ABI struct starts with a `u32` size, readable per the
    // caller's contract; read unaligned since C may pack arrays oddly.
    let size = unsafe { ptr.cast::<u32>().read_unaligned() } as usize;
    if size < minimum {
        return Err(format!("{name}.struct_size is {size} bytes, expected at least {minimum} (ABI 1.0)"));
    }
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: the backend says `size` bytes are readable; at most
    // `size_of::<T>()` are copied into `value`, whose remaining bytes stay
    // zero, a valid `T` per the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), value.as_mut_ptr().cast::<u8>(), size.min(size_of::<T>()));
        Ok(value.assume_init())
    }
}

/// [`read_struct_from`] for a struct that has not grown since ABI 1.0.
///
/// # Safety
///
/// As for [`read_struct_from`].
pub(super) unsafe fn read_struct<T: Copy>(ptr: *const T, name: &str) -> Result<T, String> {
    // SAFETY: per the caller's contract.
    unsafe { read_struct_from(ptr, name, size_of::<T>()) }
}

/// Copies an array of ABI structs that each start with `u32 struct_size`:
/// every element has the first one's size, which is also the stride, and
/// is at least `minimum` bytes. Errors start with `what` (whose array it
/// is) and call an element a `noun`.
///
/// # Safety
///
/// `items` is NULL with `count` 0, or points to `count` elements laid out
/// `struct_size` bytes apart; `T` as for [`read_struct_from`].
unsafe fn read_array<T: Copy>(
    items: *const T,
    count: usize,
    name: &str,
    minimum: usize,
    what: &str,
    noun: &str,
) -> Result<Vec<T>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if items.is_null() {
        return Err(format!("{what}: the {noun} array is NULL with count {count}"));
    }
    // SAFETY: per the caller's contract the first element is readable.
    let first = unsafe { read_struct_from(items, name, minimum) }.map_err(|error| format!("{what}: {error}"))?;
    // SAFETY: as above, the size field is readable.
    let stride = unsafe { items.cast::<u32>().read_unaligned() } as usize;
    if stride.checked_mul(count).is_none_or(|total| total > isize::MAX as usize) {
        return Err(format!("{what}: {count} elements of {noun} of {stride} bytes do not fit in memory"));
    }
    let mut out = Vec::with_capacity(count);
    out.push(first);
    for index in 1..count {
        // SAFETY: `index * stride` is within the array (checked above).
        let element = unsafe { items.cast::<u8>().add(index * stride).cast::<T>() };
        // SAFETY: the element is readable per the caller's contract.
        let size = unsafe { element.cast::<u32>().read_unaligned() } as usize;
        if size != stride {
            return Err(format!(
                "{what}: element #{index} has struct_size {size}, but #0 has {stride} (all must match)"
            ));
        }
        // SAFETY: as above; its size equals the checked first one's.
        out.push(unsafe { read_struct_from(element, name, minimum) }.map_err(|error| format!("{what}: {error}"))?);
    }
    Ok(out)
}

/// Copies a published device list (and, from a 1.1 backend, each device's
/// attributes and capacities). Every element has the same `struct_size`,
/// which is also the array's stride, so a backend built for any minor is
/// read correctly.
///
/// # Safety
///
/// `devices` is NULL with `count` 0, or points to `count` devices laid out
/// `struct_size` bytes apart, each with valid strings, NUMA lists and (where
/// its size covers them) attribute and capacity arrays.
pub(super) unsafe fn read_devices(
    devices: *const DevhostDevice,
    count: usize,
    resource: &str,
) -> Result<Vec<Device>, String> {
    // SAFETY: per the caller's contract.
    let raw_devices = unsafe {
        read_array(
            devices,
            count,
            "DevhostDevice",
            DEVHOST_DEVICE_SIZE_1_0 as usize,
            &format!("resource {resource:?}"),
            "device",
        )?
    };
    let mut out = Vec::with_capacity(count);
    for (index, raw) in raw_devices.into_iter().enumerate() {
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
        let mut device = Device::new(id, health).with_numa_nodes(numa_nodes);
        let prefix = format!("resource {resource:?}: device {:?}", device.id);
        // SAFETY: the arrays are valid per the caller's contract (zero
        // counts from a 1.0 device, whose size does not cover them).
        let (attributes, capacities) = unsafe {
            (
                read_array(
                    raw.attributes,
                    raw.attributes_len,
                    "DevhostAttribute",
                    size_of::<DevhostAttribute>(),
                    &prefix,
                    "attribute",
                )?,
                read_array(
                    raw.capacities,
                    raw.capacities_len,
                    "DevhostCapacity",
                    size_of::<DevhostCapacity>(),
                    &prefix,
                    "capacity",
                )?,
            )
        };
        for attribute in attributes {
            // SAFETY: the attribute's strings are valid during the call.
            let (name, value) = unsafe { read_attribute(&attribute) }.map_err(|why| format!("{prefix}: {why}"))?;
            if device.attributes.insert(name.clone(), value).is_some() {
                return Err(format!("{prefix}: attribute {name:?} appears twice"));
            }
        }
        for capacity in capacities {
            // SAFETY: the capacity's strings are valid during the call.
            let (name, quantity) = unsafe {
                (read_str(capacity.name, "a capacity name")?, read_str(capacity.quantity, "a capacity quantity")?)
            };
            if device.capacities.insert(name.clone(), quantity).is_some() {
                return Err(format!("{prefix}: capacity {name:?} appears twice"));
            }
        }
        out.push(device);
    }
    Ok(out)
}

/// One attribute's name and typed value.
///
/// # Safety
///
/// The attribute's strings point to readable bytes (or are empty).
unsafe fn read_attribute(raw: &DevhostAttribute) -> Result<(String, AttributeValue), String> {
    // SAFETY: per the caller's contract.
    let name = unsafe { read_str(raw.name, "an attribute name")? };
    let value = match raw.kind {
        DEVHOST_ATTRIBUTE_INT => AttributeValue::Int(raw.int_value),
        DEVHOST_ATTRIBUTE_BOOL => match raw.int_value {
            0 => AttributeValue::Bool(false),
            1 => AttributeValue::Bool(true),
            other => return Err(format!("attribute {name:?} is a BOOL with int_value {other} (expected 0 or 1)")),
        },
        // SAFETY: per the caller's contract.
        DEVHOST_ATTRIBUTE_STRING => AttributeValue::String(unsafe { read_str(raw.text, "a string attribute")? }),
        // SAFETY: per the caller's contract.
        DEVHOST_ATTRIBUTE_VERSION => AttributeValue::Version(unsafe { read_str(raw.text, "a version attribute")? }),
        other => {
            return Err(format!(
                "attribute {name:?} has unknown kind {other} (expected 1 INT, 2 BOOL, 3 STRING or 4 VERSION)"
            ));
        }
    };
    Ok((name, value))
}
