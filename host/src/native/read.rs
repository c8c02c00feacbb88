//! Copying what a native backend hands over into owned Rust values, with the
//! contract's checks: strings are UTF-8 and not dangling, structs are at
//! least as large as the ABI version that introduced them defines them
//! (fields a later minor added read as zero from an older backend), health
//! values, flags, attribute and request-policy kinds are known, names are
//! not repeated. Each error message names the value and says what was
//! expected. The rules of the model itself (DRA's limits, counter sets,
//! request policies against capacities) are `devhost_abi`'s checks, applied
//! where the host accepts the data. This module does not decide what a
//! refusal means for the call; its callers do.

use std::collections::BTreeMap;

use devhost_abi::ffi::{
    DEVHOST_ATTRIBUTE_BOOL, DEVHOST_ATTRIBUTE_INT, DEVHOST_ATTRIBUTE_STRING, DEVHOST_ATTRIBUTE_VERSION,
    DEVHOST_DEVICE_SHARED, DEVHOST_DEVICE_SIZE_1_0, DEVHOST_HEALTH_HEALTHY, DEVHOST_HEALTH_UNHEALTHY,
    DEVHOST_REQUEST_POLICY_ANY, DEVHOST_REQUEST_POLICY_RANGE, DEVHOST_REQUEST_POLICY_VALUES, DevhostAttribute,
    DevhostCapacity, DevhostCounterSet, DevhostDevice, DevhostDeviceStatus, DevhostRequestPolicy, DevhostStr,
};
use devhost_abi::model::{CounterConsumption, CounterSet, DeviceStatus, RequestPolicy, SharedDevice, ValidRequests};

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
    // SAFETY: per the caller's contract.
    unsafe { read_struct_since(ptr, name, minimum, "1.0") }
}

/// [`read_struct_from`] for a struct that ABI `since` introduced, whose
/// size there is `minimum`.
///
/// # Safety
///
/// As for [`read_struct_from`].
unsafe fn read_struct_since<T: Copy>(ptr: *const T, name: &str, minimum: usize, since: &str) -> Result<T, String> {
    if ptr.is_null() {
        return Err(format!("a NULL {name} pointer"));
    }
    // SAFETY: every ABI struct starts with a `u32` size, readable per the
    // caller's contract; read unaligned since C may pack arrays oddly.
    let size = unsafe { ptr.cast::<u32>().read_unaligned() } as usize;
    if size < minimum {
        return Err(format!("{name}.struct_size is {size} bytes, expected at least {minimum} (ABI {since})"));
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

/// [`read_array_since`] for an array of a struct that ABI 1.0 introduced.
///
/// # Safety
///
/// As for [`read_array_since`].
unsafe fn read_array<T: Copy>(
    items: *const T,
    count: usize,
    name: &str,
    minimum: usize,
    what: &str,
    noun: &str,
) -> Result<Vec<T>, String> {
    // SAFETY: per the caller's contract.
    unsafe { read_array_since(items, count, (name, minimum, "1.0"), what, noun) }
}

/// [`read_array_since`] for a struct that has not grown since ABI `since`
/// introduced it (its whole size is required).
///
/// # Safety
///
/// As for [`read_array_since`].
unsafe fn read_new_array<T: Copy>(
    items: *const T,
    count: usize,
    name: &str,
    since: &str,
    what: &str,
    noun: &str,
) -> Result<Vec<T>, String> {
    // SAFETY: per the caller's contract.
    unsafe { read_array_since(items, count, (name, size_of::<T>(), since), what, noun) }
}

/// Copies an array of ABI structs that each start with `u32 struct_size`:
/// every element has the first one's size, which is also the stride, and
/// is at least `minimum` bytes (the size in ABI `since`, from `kind` =
/// `(C type name, minimum, since)`). Errors start with `what` (whose array
/// it is) and call an element a `noun`.
///
/// # Safety
///
/// `items` is NULL with `count` 0, or points to `count` elements laid out
/// `struct_size` bytes apart; `T` as for [`read_struct_from`].
unsafe fn read_array_since<T: Copy>(
    items: *const T,
    count: usize,
    kind: (&str, usize, &str),
    what: &str,
    noun: &str,
) -> Result<Vec<T>, String> {
    let (name, minimum, since) = kind;
    if count == 0 {
        return Ok(Vec::new());
    }
    if items.is_null() {
        return Err(format!("{what}: the {noun} array is NULL with count {count}"));
    }
    // SAFETY: per the caller's contract the first element is readable.
    let first =
        unsafe { read_struct_since(items, name, minimum, since) }.map_err(|error| format!("{what}: {error}"))?;
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
        out.push(
            unsafe { read_struct_since(element, name, minimum, since) }.map_err(|error| format!("{what}: {error}"))?,
        );
    }
    Ok(out)
}

/// Copies a published device list (and, from a 1.1 backend, each device's
/// attributes and capacities; from a 1.2 backend, what it consumes, whether
/// it is shared and its request policies). Every element has the same
/// `struct_size`, which is also the array's stride, so a backend built for
/// any minor is read correctly: the fields its size does not cover read as
/// none, whatever lies beyond it.
///
/// # Safety
///
/// `devices` is NULL with `count` 0, or points to `count` devices laid out
/// `struct_size` bytes apart, each with valid strings, NUMA lists and (where
/// its size covers them) attribute, capacity, consumption and request
/// policy arrays.
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
        let attributes = unsafe {
            read_new_array(raw.attributes, raw.attributes_len, "DevhostAttribute", "1.1", &prefix, "attribute")?
        };
        for attribute in attributes {
            // SAFETY: the attribute's strings are valid during the call.
            let (name, value) = unsafe { read_attribute(&attribute) }.map_err(|why| format!("{prefix}: {why}"))?;
            if device.attributes.insert(name.clone(), value).is_some() {
                return Err(format!("{prefix}: attribute {name:?} appears twice"));
            }
        }
        // SAFETY: as above.
        device.capacities = unsafe { read_pairs(raw.capacities, raw.capacities_len, &prefix, "capacity")? };
        // SAFETY: as above (zero counts and flags from a 1.0 or 1.1 device).
        unsafe { read_partitions(&raw, &mut device, &prefix)? };
        out.push(device);
    }
    Ok(out)
}

/// ABI 1.2: what a device consumes of its resource's counter sets, whether
/// it is shared, and its request policies.
///
/// # Safety
///
/// The arrays `raw` points to are valid (or their counts are 0).
unsafe fn read_partitions(raw: &DevhostDevice, device: &mut Device, prefix: &str) -> Result<(), String> {
    // SAFETY: per the caller's contract.
    let consumes = unsafe {
        read_new_array(raw.consumes, raw.consumes_len, "DevhostCounterConsumption", "1.2", prefix, "consumption")?
    };
    for consumption in consumes {
        // SAFETY: the entry's string and counters are valid during the call.
        let counter_set = unsafe { read_str(consumption.counter_set, &format!("{prefix}: a consumed counter set"))? };
        let what = format!("{prefix}: counter set {counter_set:?}");
        // SAFETY: as above.
        let counters = unsafe { read_pairs(consumption.counters, consumption.counters_len, &what, "counter")? };
        device.consumes.push(CounterConsumption { counter_set, counters });
    }
    let unknown = raw.flags & !DEVHOST_DEVICE_SHARED;
    if unknown != 0 {
        return Err(format!(
            "{prefix} has unknown flags {unknown:#x} (ABI 1.2 knows {DEVHOST_DEVICE_SHARED:#x} = DEVHOST_DEVICE_SHARED)"
        ));
    }
    // SAFETY: per the caller's contract.
    let policies = unsafe {
        read_new_array(
            raw.request_policies,
            raw.request_policies_len,
            "DevhostRequestPolicy",
            "1.2",
            prefix,
            "request policy",
        )?
    };
    if raw.flags & DEVHOST_DEVICE_SHARED == 0 {
        if let Some(first) = policies.first() {
            // SAFETY: the policy's strings are valid during the call.
            let capacity = unsafe { read_str(first.capacity, &format!("{prefix}: a request policy's capacity"))? };
            return Err(format!(
                "{prefix} has a request policy for capacity {capacity:?} but is not shared: a policy says what                  each of several claims may consume, so set DEVHOST_DEVICE_SHARED in its flags or give no policies"
            ));
        }
        return Ok(());
    }
    let mut shared = SharedDevice::default();
    for policy in &policies {
        // SAFETY: the policy's strings and values are valid during the call.
        let (capacity, policy) = unsafe { read_request_policy(policy, prefix)? };
        if shared.request_policies.insert(capacity.clone(), policy).is_some() {
            return Err(format!("{prefix}: request policy for capacity {capacity:?} appears twice"));
        }
    }
    device.shared = Some(shared);
    Ok(())
}

/// One request policy: the capacity it is for, and the policy.
///
/// # Safety
///
/// The policy's strings and `values` are valid (or empty).
unsafe fn read_request_policy(raw: &DevhostRequestPolicy, prefix: &str) -> Result<(String, RequestPolicy), String> {
    // SAFETY: per the caller's contract.
    let capacity = unsafe { read_str(raw.capacity, &format!("{prefix}: a request policy's capacity"))? };
    let what = format!("{prefix}: request policy for capacity {capacity:?}");
    // An empty quantity is no quantity (the struct's convention).
    let optional = |s: DevhostStr, field: &str| -> Result<Option<String>, String> {
        // SAFETY: per the caller's contract.
        let text = unsafe { read_str(s, &format!("{what}: its {field}"))? };
        Ok((!text.is_empty()).then_some(text))
    };
    let default = optional(raw.default_quantity, "default_quantity")?;
    let (min, max, step) = (optional(raw.min, "min")?, optional(raw.max, "max")?, optional(raw.step, "step")?);
    // SAFETY: per the caller's contract.
    let values = unsafe { read_strs(raw.values, raw.values_len, &format!("{what}: its values"))? };
    let range_fields = || {
        [("min", &min), ("max", &max), ("step", &step)]
            .into_iter()
            .filter(|(_, value)| value.is_some())
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    };
    let valid = match raw.kind {
        DEVHOST_REQUEST_POLICY_ANY => {
            let mut set = range_fields();
            if !values.is_empty() {
                set.push("values");
            }
            if !set.is_empty() {
                return Err(format!(
                    "{what}: kind DEVHOST_REQUEST_POLICY_ANY takes no min, max, step or values, but {set:?} are set"
                ));
            }
            None
        }
        DEVHOST_REQUEST_POLICY_RANGE => {
            if !values.is_empty() {
                return Err(format!(
                    "{what}: kind DEVHOST_REQUEST_POLICY_RANGE takes no values (that is DEVHOST_REQUEST_POLICY_VALUES)"
                ));
            }
            let Some(min) = min else {
                return Err(format!("{what}: kind DEVHOST_REQUEST_POLICY_RANGE needs a min"));
            };
            Some(ValidRequests::Range { min, max, step })
        }
        DEVHOST_REQUEST_POLICY_VALUES => {
            let set = range_fields();
            if !set.is_empty() {
                return Err(format!(
                    "{what}: kind DEVHOST_REQUEST_POLICY_VALUES takes no min, max or step, but {set:?} are set"
                ));
            }
            Some(ValidRequests::Values(values))
        }
        other => {
            return Err(format!(
                "{what} has unknown kind {other} (expected 1 = DEVHOST_REQUEST_POLICY_ANY, 2 = _RANGE or 3 = _VALUES)"
            ));
        }
    };
    Ok((capacity, RequestPolicy { default, valid }))
}

/// Copies a name → quantity array (capacities, counters, consumed amounts),
/// refusing a name given twice. Errors start with `what`.
///
/// # Safety
///
/// `items` is NULL with `count` 0, or points to `count` `DevhostCapacity`
/// laid out `struct_size` bytes apart, with valid strings.
pub(super) unsafe fn read_pairs(
    items: *const DevhostCapacity,
    count: usize,
    what: &str,
    noun: &str,
) -> Result<BTreeMap<String, String>, String> {
    // SAFETY: per the caller's contract.
    let pairs = unsafe { read_new_array(items, count, "DevhostCapacity", "1.1", what, noun)? };
    let mut out = BTreeMap::new();
    for pair in pairs {
        // SAFETY: the pair's strings are valid during the call.
        let (name, quantity) = unsafe {
            (
                read_str(pair.name, &format!("{what}: a {noun} name"))?,
                read_str(pair.quantity, &format!("{what}: a {noun} quantity"))?,
            )
        };
        if out.insert(name.clone(), quantity).is_some() {
            return Err(format!("{what}: {noun} {name:?} appears twice"));
        }
    }
    Ok(out)
}

/// Copies an array of strings (`DevhostStr`, no `struct_size`).
///
/// # Safety
///
/// `items` is NULL with `count` 0, or points to `count` valid strings.
unsafe fn read_strs(items: *const DevhostStr, count: usize, what: &str) -> Result<Vec<String>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if items.is_null() {
        return Err(format!("{what}: a NULL array with count {count}"));
    }
    if count > isize::MAX as usize / size_of::<DevhostStr>() {
        return Err(format!("{what}: an impossible count {count}"));
    }
    (0..count)
        .map(|index| {
            // SAFETY: element `index` is within the array (count checked);
            // read unaligned since C may place it oddly.
            let s = unsafe { items.add(index).read_unaligned() };
            // SAFETY: per the caller's contract.
            unsafe { read_str(s, &format!("{what}: entry #{index}")) }
        })
        .collect()
}

/// ABI 1.2: the counter sets a resource declares, from an `add_resource`
/// whose struct covers them (none from a 1.0 or 1.1 resource). Counter
/// names are unique within a set; the other rules (DNS labels, counts,
/// quantities, unique set names) are checked when the backend starts.
///
/// # Safety
///
/// The array `counter_sets` points to, and each set's strings and
/// counters, are valid (or the count is 0).
pub(super) unsafe fn read_counter_sets(
    counter_sets: *const DevhostCounterSet,
    count: usize,
    resource: &str,
) -> Result<Vec<CounterSet>, String> {
    let prefix = format!("resource {resource:?}");
    // SAFETY: per the caller's contract.
    let raw = unsafe { read_new_array(counter_sets, count, "DevhostCounterSet", "1.2", &prefix, "counter set")? };
    raw.iter()
        .map(|set| {
            // SAFETY: the set's name and counters are valid during the call.
            let name = unsafe { read_str(set.name, &format!("{prefix}: a counter set name"))? };
            let what = format!("{prefix}: counter set {name:?}");
            // SAFETY: as above.
            let counters = unsafe { read_pairs(set.counters, set.counters_len, &what, "counter")? };
            Ok(CounterSet { name, counters })
        })
        .collect()
}

/// ABI 1.2: one device status given with `add_device_status`: the device's
/// ID and what it says, checked against the API server's limits
/// (`devhost_abi::partitions::check_device_status`). Empty strings are none.
///
/// # Safety
///
/// `status` is NULL or points to at least its `struct_size` readable bytes,
/// with valid strings and `ips`.
pub(super) unsafe fn read_device_status(status: *const DevhostDeviceStatus) -> Result<(String, DeviceStatus), String> {
    // SAFETY: per the caller's contract.
    let raw = unsafe { read_struct_since(status, "DevhostDeviceStatus", size_of::<DevhostDeviceStatus>(), "1.2")? };
    // SAFETY: as above, for its strings.
    let id = unsafe { read_str(raw.device_id, "a device status's device ID")? };
    let what = format!("the status of device {id:?}");
    let optional = |s: DevhostStr, field: &str| -> Result<Option<String>, String> {
        // SAFETY: per the caller's contract.
        let text = unsafe { read_str(s, &format!("{what}: its {field}"))? };
        Ok((!text.is_empty()).then_some(text))
    };
    let status = DeviceStatus {
        interface_name: optional(raw.interface_name, "interface_name")?,
        hardware_address: optional(raw.hardware_address, "hardware_address")?,
        // SAFETY: per the caller's contract.
        ips: unsafe { read_strs(raw.ips, raw.ips_len, &format!("{what}: its ips"))? },
        data: optional(raw.data_json, "data_json")?,
    };
    devhost_abi::partitions::check_device_status(&status).map_err(|why| format!("{what}: {why}"))?;
    Ok((id, status))
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

#[cfg(test)]
mod tests {
    use devhost_abi::ffi::{DEVHOST_DEVICE_SIZE_1_1, DevhostCounterConsumption, size_of_u32};

    use super::*;

    /// Borrows a Rust string as a C one.
    fn s(text: &str) -> DevhostStr {
        DevhostStr::new(text)
    }

    fn device(id: &'static str) -> DevhostDevice {
        DevhostDevice {
            struct_size: size_of_u32::<DevhostDevice>(),
            health: DEVHOST_HEALTH_HEALTHY,
            id: s(id),
            numa_nodes: std::ptr::null(),
            numa_nodes_len: 0,
            attributes: std::ptr::null(),
            attributes_len: 0,
            capacities: std::ptr::null(),
            capacities_len: 0,
            consumes: std::ptr::null(),
            consumes_len: 0,
            flags: 0,
            reserved: 0,
            request_policies: std::ptr::null(),
            request_policies_len: 0,
        }
    }

    fn capacity(name: &'static str, quantity: &'static str) -> DevhostCapacity {
        DevhostCapacity {
            struct_size: size_of_u32::<DevhostCapacity>(),
            reserved: 0,
            name: s(name),
            quantity: s(quantity),
        }
    }

    fn policy(kind: u32, capacity: &'static str) -> DevhostRequestPolicy {
        DevhostRequestPolicy {
            struct_size: size_of_u32::<DevhostRequestPolicy>(),
            kind,
            capacity: s(capacity),
            default_quantity: s("1G"),
            min: s("1G"),
            max: DevhostStr::EMPTY,
            step: s("1G"),
            values: std::ptr::null(),
            values_len: 0,
        }
    }

    /// Reads one device the way `publish` does.
    fn read_one(device: &DevhostDevice) -> Result<Device, String> {
        // SAFETY: `device` and everything it points to live on the caller's
        // stack for the call.
        unsafe { read_devices(device, 1, "example.com/nic") }.map(|mut devices| devices.remove(0))
    }

    /// A 1.1 backend's device is 72 bytes: whatever follows it in memory
    /// (here 0xab garbage where 1.2's fields would be, then the next
    /// device at the 72-byte stride) is not its consumes, flags or policies.
    #[test]
    fn a_1_1_sized_device_with_garbage_beyond_its_size_consumes_nothing_and_is_not_shared() {
        const STRIDE: usize = DEVHOST_DEVICE_SIZE_1_1 as usize;
        // Aligned storage for two 1.1 devices and a 1.2-sized tail of garbage.
        let mut storage = vec![0xabab_abab_abab_abab_u64; (2 * STRIDE + size_of::<DevhostDevice>()) / 8];
        let base = storage.as_mut_ptr().cast::<u8>();
        for (index, id) in ["gpu-0", "gpu-1"].into_iter().enumerate() {
            let mut raw = device(id);
            raw.struct_size = DEVHOST_DEVICE_SIZE_1_1;
            // SAFETY: the first 72 bytes of element `index` are within
            // `storage`; only the 1.1 prefix is written, the rest stays 0xab.
            unsafe {
                std::ptr::copy_nonoverlapping(std::ptr::from_ref(&raw).cast::<u8>(), base.add(index * STRIDE), STRIDE);
            }
        }
        // SAFETY: two devices of 72 bytes each, with valid (static) IDs;
        // the bytes past each device's size are readable garbage.
        let devices = unsafe { read_devices(base.cast::<DevhostDevice>(), 2, "example.com/gpu") }.expect("read");
        assert_eq!(devices.len(), 2);
        assert_eq!((devices[0].id.as_str(), devices[1].id.as_str()), ("gpu-0", "gpu-1"));
        for device in devices {
            assert!(device.consumes.is_empty(), "{device:?}");
            assert_eq!(device.shared, None, "{device:?}");
        }
    }

    #[test]
    fn a_1_2_device_reads_with_its_consumption_and_its_policies() {
        let counters = [capacity("memory", "20Gi"), capacity("slices", "4")];
        let consumes = [DevhostCounterConsumption {
            struct_size: size_of_u32::<DevhostCounterConsumption>(),
            reserved: 0,
            counter_set: s("gpu-0-counters"),
            counters: counters.as_ptr(),
            counters_len: counters.len(),
        }];
        let values = [s("1"), s("2")];
        let mut queues = policy(DEVHOST_REQUEST_POLICY_VALUES, "queues");
        (queues.min, queues.step, queues.values, queues.values_len) =
            (DevhostStr::EMPTY, DevhostStr::EMPTY, values.as_ptr(), values.len());
        let policies = [policy(DEVHOST_REQUEST_POLICY_RANGE, "bandwidth"), queues];
        let capacities = [capacity("bandwidth", "10G"), capacity("queues", "2")];
        let mut raw = device("nic-0");
        (raw.consumes, raw.consumes_len) = (consumes.as_ptr(), consumes.len());
        (raw.capacities, raw.capacities_len) = (capacities.as_ptr(), capacities.len());
        (raw.flags, raw.request_policies, raw.request_policies_len) =
            (DEVHOST_DEVICE_SHARED, policies.as_ptr(), policies.len());
        let device = read_one(&raw).expect("a valid 1.2 device");
        assert_eq!(
            device.consumes,
            Device::healthy("x").consuming("gpu-0-counters", [("memory", "20Gi"), ("slices", "4")]).consumes
        );
        let shared = device.shared.expect("shared");
        assert_eq!(
            shared.request_policies["bandwidth"],
            RequestPolicy {
                default: Some("1G".into()),
                valid: Some(ValidRequests::Range { min: "1G".into(), max: None, step: Some("1G".into()) })
            }
        );
        assert_eq!(shared.request_policies["queues"].valid, Some(ValidRequests::Values(vec!["1".into(), "2".into()])));
    }

    #[test]
    fn request_policies_on_a_device_that_is_not_shared_are_refused_naming_device_and_capacity() {
        let policies = [policy(DEVHOST_REQUEST_POLICY_RANGE, "bandwidth")];
        let mut raw = device("nic-0");
        (raw.request_policies, raw.request_policies_len) = (policies.as_ptr(), policies.len());
        let error = read_one(&raw).expect_err("policies need DEVHOST_DEVICE_SHARED");
        assert!(
            error.starts_with(
                "resource \"example.com/nic\": device \"nic-0\" has a request policy for capacity \"bandwidth\" but is not shared"
            ),
            "{error}"
        );
        assert!(error.contains("set DEVHOST_DEVICE_SHARED in its flags"), "{error}");
    }

    #[test]
    fn an_unknown_request_policy_kind_and_unknown_flags_are_refused() {
        let policies = [policy(9, "bandwidth")];
        let mut raw = device("nic-0");
        (raw.flags, raw.request_policies, raw.request_policies_len) =
            (DEVHOST_DEVICE_SHARED, policies.as_ptr(), policies.len());
        let error = read_one(&raw).expect_err("kind 9 is unknown");
        assert_eq!(
            error,
            "resource \"example.com/nic\": device \"nic-0\": request policy for capacity \"bandwidth\" has unknown kind 9 \
             (expected 1 = DEVHOST_REQUEST_POLICY_ANY, 2 = _RANGE or 3 = _VALUES)"
        );
        let mut any = policy(DEVHOST_REQUEST_POLICY_ANY, "bandwidth");
        any.max = s("8G");
        let policies = [any];
        raw.request_policies = policies.as_ptr();
        let error = read_one(&raw).expect_err("ANY takes no range");
        assert!(error.ends_with("kind DEVHOST_REQUEST_POLICY_ANY takes no min, max, step or values, but [\"min\", \"max\", \"step\"] are set"), "{error}");
        let mut raw = device("nic-0");
        raw.flags = 6;
        let error = read_one(&raw).expect_err("flags 6 are unknown");
        assert!(error.contains("device \"nic-0\" has unknown flags 0x6"), "{error}");
    }

    #[test]
    fn a_counter_named_twice_and_a_bad_device_status_are_refused() {
        let counters = [capacity("memory", "1"), capacity("memory", "2")];
        let sets = [DevhostCounterSet {
            struct_size: size_of_u32::<DevhostCounterSet>(),
            reserved: 0,
            name: s("gpu-0"),
            counters: counters.as_ptr(),
            counters_len: counters.len(),
        }];
        // SAFETY: the sets and their counters live on this stack frame.
        let error = unsafe { read_counter_sets(sets.as_ptr(), 1, "example.com/gpu") }.expect_err("twice");
        assert_eq!(error, "resource \"example.com/gpu\": counter set \"gpu-0\": counter \"memory\" appears twice");
        let ips = [s("10.0.0.5")];
        let status = DevhostDeviceStatus {
            struct_size: size_of_u32::<DevhostDeviceStatus>(),
            reserved: 0,
            device_id: s("nic-0"),
            interface_name: s("eth1"),
            hardware_address: DevhostStr::EMPTY,
            ips: ips.as_ptr(),
            ips_len: 1,
            data_json: DevhostStr::EMPTY,
        };
        // SAFETY: the status and its addresses live on this stack frame.
        let error = unsafe { read_device_status(&status) }.expect_err("no prefix length");
        assert!(error.starts_with("the status of device \"nic-0\": ips: \"10.0.0.5\" is not an address"), "{error}");
        let ips = [s("10.0.0.5/24")];
        let status = DevhostDeviceStatus { ips: ips.as_ptr(), ..status };
        // SAFETY: as above.
        let (id, read) = unsafe { read_device_status(&status) }.expect("valid");
        assert_eq!((id.as_str(), read.interface_name.as_deref(), read.hardware_address), ("nic-0", Some("eth1"), None));
        assert_eq!(read.ips, ["10.0.0.5/24"]);
    }
}
