//! The rules for what a backend says about partitions and sharing (ABI
//! 1.2): counter sets, what each device consumes of them, shared devices'
//! request policies and the device status a DRA claim shows. They are the
//! API server's validation of a `ResourceSlice` and of a claim's
//! `status.devices` (devhost's `docs/dra-api.md` §4.3, §4.4 and §6), so
//! that what a backend declares is published unchanged. devhost checks
//! every declaration and published list with them; a backend's own tests
//! can call them to know the host will accept what it says.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{CounterConsumption, CounterSet, Device, DeviceStatus, RequestPolicy, ValidRequests};
use crate::quantity::check_quantity;
pub use crate::quantity::quantity_nanos;

/// Counter sets in one ResourceSlice at most (the API's
/// `ResourceSliceMaxCounterSets`; `docs/dra-api.md` §4.3).
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;
/// Counters in one counter set at most (`ResourceSliceMaxCountersPerCounterSet`).
pub const MAX_COUNTERS_PER_SET: usize = 32;
/// Counter sets one device consumes from at most
/// (`ResourceSliceMaxDeviceCounterConsumptionsPerDevice`).
pub const MAX_CONSUMPTIONS_PER_DEVICE: usize = 2;
/// Counters one device consumes from one set at most
/// (`ResourceSliceMaxCountersPerDeviceCounterConsumption`).
pub const MAX_COUNTERS_PER_CONSUMPTION: usize = 32;

/// Values one `valid_values` request policy may list at most (the API's
/// `CapacityRequestPolicyDiscreteMaxOptions`; `docs/dra-api.md` §4.4).
pub const MAX_REQUEST_POLICY_VALUES: usize = 10;
/// `NetworkDeviceData.interfaceName` is at most this long.
pub const MAX_INTERFACE_NAME: usize = 256;
/// At most this many addresses in `NetworkDeviceData.ips`.
pub const MAX_DEVICE_IPS: usize = 16;
/// `NetworkDeviceData.hardwareAddress` is at most this long.
pub const MAX_HARDWARE_ADDRESS: usize = 128;
/// `AllocatedDeviceStatus.data`, as JSON, is at most this many bytes.
pub const MAX_DEVICE_STATUS_DATA: usize = 10 * 1024;

/// Checks a resource's counter sets as a ResourceSlice's validation does:
/// names are DNS labels and unique, each set has 1 to
/// [`MAX_COUNTERS_PER_SET`] counters, quantities parse. The error names
/// the set or counter and the broken rule.
pub fn check_counter_sets(counter_sets: &[CounterSet]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for set in counter_sets {
        check_counter_name("counter set", &set.name)?;
        if !names.insert(set.name.as_str()) {
            return Err(format!("counter set {:?} is declared twice", set.name));
        }
        if set.counters.is_empty() {
            return Err(format!("counter set {:?} has no counters", set.name));
        }
        if set.counters.len() > MAX_COUNTERS_PER_SET {
            return Err(format!(
                "counter set {:?} has {} counters, more than the {MAX_COUNTERS_PER_SET} a set may have",
                set.name,
                set.counters.len()
            ));
        }
        for (counter, quantity) in &set.counters {
            check_counter_name("counter", counter).map_err(|why| format!("counter set {:?}: {why}", set.name))?;
            check_quantity(quantity)
                .map_err(|why| format!("counter set {:?}, counter {counter:?}: {why}", set.name))?;
        }
    }
    Ok(())
}

/// Checks what `device` consumes against its resource's `counter_sets`:
/// at most [`MAX_CONSUMPTIONS_PER_DEVICE`] sets, each once, each a set
/// and counters the resource declares, quantities that parse. The error
/// names the device, set and counter.
pub fn check_consumes(device: &Device, counter_sets: &[CounterSet]) -> Result<(), String> {
    let id = &device.id;
    let consumptions = &device.consumes;
    if consumptions.len() > MAX_CONSUMPTIONS_PER_DEVICE {
        return Err(format!(
            "device {id:?} consumes from {} counter sets, more than the {MAX_CONSUMPTIONS_PER_DEVICE} a device may",
            consumptions.len()
        ));
    }
    let sets: BTreeMap<&str, &CounterSet> = counter_sets.iter().map(|set| (set.name.as_str(), set)).collect();
    for (index, consumption) in consumptions.iter().enumerate() {
        check_consumption(id, consumption, &sets)?;
        if consumptions[..index].iter().any(|earlier| earlier.counter_set == consumption.counter_set) {
            return Err(format!(
                "device {id:?} consumes from counter set {:?} twice (one entry per set)",
                consumption.counter_set
            ));
        }
    }
    Ok(())
}

fn check_consumption(
    device: &str,
    consumption: &CounterConsumption,
    sets: &BTreeMap<&str, &CounterSet>,
) -> Result<(), String> {
    let name = &consumption.counter_set;
    let Some(set) = sets.get(name.as_str()) else {
        let known: Vec<&str> = sets.keys().copied().collect();
        return Err(format!("device {device:?} consumes from unknown counter set {name:?} (declared: {known:?})"));
    };
    if consumption.counters.is_empty() {
        return Err(format!("device {device:?} consumes nothing from counter set {name:?}: name at least one counter"));
    }
    if consumption.counters.len() > MAX_COUNTERS_PER_CONSUMPTION {
        return Err(format!(
            "device {device:?} consumes {} counters of set {name:?}, more than the {MAX_COUNTERS_PER_CONSUMPTION} allowed",
            consumption.counters.len()
        ));
    }
    for (counter, quantity) in &consumption.counters {
        if !set.counters.contains_key(counter) {
            let known: Vec<&String> = set.counters.keys().collect();
            return Err(format!(
                "device {device:?} consumes unknown counter {counter:?} of set {name:?} (it has: {known:?})"
            ));
        }
        check_quantity(quantity)
            .map_err(|why| format!("device {device:?}, counter {counter:?} of set {name:?}: {why}"))?;
    }
    Ok(())
}

/// Counter set and counter names are DNS labels: 1 to 63 of `a-z0-9-`,
/// starting and ending with a letter or digit.
pub fn check_counter_name(what: &str, name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} must be a DNS label (1-63 of a-z, 0-9 and -, alphanumeric at both ends)"))
    }
}

/// Whether `name` is a DNS label (RFC 1123): 1 to 63 of `a-z`, `0-9` and
/// `-`, alphanumeric at both ends.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Checks a shared device's request policies: each names one of the
/// device's capacities and fits its value ([`check_request_policy`]).
pub fn check_shared(device: &Device) -> Result<(), String> {
    let Some(shared) = &device.shared else { return Ok(()) };
    for (name, policy) in &shared.request_policies {
        let Some(capacity) = device.capacities.get(name) else {
            let known: Vec<&String> = device.capacities.keys().collect();
            return Err(format!(
                "request policy for {name:?}, which is not one of the device's capacities ({known:?})"
            ));
        };
        check_request_policy(policy, capacity).map_err(|why| format!("request policy for {name:?}: {why}"))?;
    }
    Ok(())
}

/// Checks `policy` against the capacity's value `capacity` as the API
/// server's validation does (`docs/dra-api.md` §4.4), plus devhost's own
/// rule that the default fits the capacity. The error names the broken
/// rule and the amounts.
pub fn check_request_policy(policy: &RequestPolicy, capacity: &str) -> Result<(), String> {
    let value = |what: &str, quantity: &str| {
        quantity_nanos(quantity).ok_or_else(|| format!("{what} {quantity:?} is not a Kubernetes quantity"))
    };
    let total = value("capacity", capacity)?;
    let default = policy.default.as_deref().map(|text| value("default", text).map(|n| (text, n))).transpose()?;
    if let Some((text, n)) = default {
        if n < 0 {
            return Err(format!("default {text:?} is negative"));
        }
        if n > total {
            return Err(format!("default {text:?} is more than the capacity {capacity:?}"));
        }
    }
    let Some(valid) = &policy.valid else { return Ok(()) };
    let Some((default_text, default)) = default else {
        let which = match valid {
            ValidRequests::Range { .. } => "valid_range",
            ValidRequests::Values(_) => "valid_values",
        };
        return Err(format!("a default is required with {which}"));
    };
    match valid {
        ValidRequests::Values(values) => {
            if values.is_empty() {
                return Err("valid_values is empty: list at least one amount or leave it out".into());
            }
            if values.len() > MAX_REQUEST_POLICY_VALUES {
                return Err(format!(
                    "valid_values has {} amounts, more than the {MAX_REQUEST_POLICY_VALUES} allowed",
                    values.len()
                ));
            }
            let mut previous: Option<(&str, i128)> = None;
            for text in values {
                let n = value("valid value", text)?;
                if n > total {
                    return Err(format!("valid value {text:?} is more than the capacity {capacity:?}"));
                }
                if let Some((before, m)) = previous {
                    if n < m {
                        return Err(format!("valid_values must ascend: {text:?} comes after {before:?}"));
                    }
                    if n == m {
                        return Err(format!("valid_values lists {text:?} twice (as {before:?})"));
                    }
                }
                previous = Some((text.as_str(), n));
            }
            if !values.iter().any(|text| value("valid value", text).ok() == Some(default)) {
                return Err(format!("default {default_text:?} is not one of valid_values {values:?}"));
            }
        }
        ValidRequests::Range { min, max, step } => {
            let least = value("min", min)?;
            if least < 0 {
                return Err(format!("min {min:?} is negative"));
            }
            if least > total {
                return Err(format!("min {min:?} is more than the capacity {capacity:?}"));
            }
            if default < least {
                return Err(format!("default {default_text:?} is less than min {min:?}"));
            }
            let most = max.as_deref().map(|text| value("max", text).map(|n| (text, n))).transpose()?;
            if let Some((text, n)) = most {
                if least > n {
                    return Err(format!("min {min:?} is more than max {text:?}"));
                }
                if n > total {
                    return Err(format!("max {text:?} is more than the capacity {capacity:?}"));
                }
                if default > n {
                    return Err(format!("default {default_text:?} is more than max {text:?}"));
                }
            }
            if let Some(step_text) = step {
                let step = value("step", step_text)?;
                if step <= 0 {
                    return Err(format!("step {step_text:?} must be more than zero"));
                }
                if least + step > total {
                    return Err(format!(
                        "min {min:?} plus one step {step_text:?} is more than the capacity {capacity:?}"
                    ));
                }
                let aligned = |what: &str, text: &str, n: i128| {
                    if (n - least) % step == 0 {
                        Ok(())
                    } else {
                        Err(format!("{what} {text:?} is not min {min:?} plus a whole number of steps {step_text:?}"))
                    }
                };
                aligned("default", default_text, default)?;
                if let Some((text, n)) = most {
                    aligned("max", text, n)?;
                }
            }
        }
    }
    Ok(())
}

/// Checks a device status against the API server's limits for an
/// `AllocatedDeviceStatus` (`docs/dra-api.md` §6); the error names the
/// field.
pub fn check_device_status(status: &DeviceStatus) -> Result<(), String> {
    if let Some(name) = &status.interface_name
        && name.len() > MAX_INTERFACE_NAME
    {
        return Err(format!("interface_name is {} bytes, more than {MAX_INTERFACE_NAME}", name.len()));
    }
    if let Some(address) = &status.hardware_address
        && address.len() > MAX_HARDWARE_ADDRESS
    {
        return Err(format!("hardware_address is {} bytes, more than {MAX_HARDWARE_ADDRESS}", address.len()));
    }
    if status.ips.len() > MAX_DEVICE_IPS {
        return Err(format!("ips has {} entries, more than {MAX_DEVICE_IPS}", status.ips.len()));
    }
    let mut seen = BTreeSet::new();
    for ip in &status.ips {
        let canonical = canonical_interface_address(ip)
            .ok_or_else(|| format!("ips: {ip:?} is not an address with a prefix length (\"10.0.0.5/24\")"))?;
        if &canonical != ip {
            return Err(format!("ips: {ip:?} is not in canonical form ({canonical:?})"));
        }
        if !seen.insert(ip) {
            return Err(format!("ips lists {ip:?} twice"));
        }
    }
    if let Some(data) = &status.data {
        let value: serde_json::Value = serde_json::from_str(data).map_err(|why| format!("data is not JSON: {why}"))?;
        if !value.is_object() {
            return Err("data must be a JSON object".into());
        }
        if data.len() > MAX_DEVICE_STATUS_DATA {
            return Err(format!("data is {} bytes of JSON, more than {MAX_DEVICE_STATUS_DATA}", data.len()));
        }
    }
    Ok(())
}

/// `address/prefix` as Go's `netip.Prefix` writes it, if `text` is an IP
/// address with a prefix length that fits it.
fn canonical_interface_address(text: &str) -> Option<String> {
    let (address, prefix) = text.split_once('/')?;
    let address: std::net::IpAddr = address.parse().ok()?;
    // Digits only, no sign or leading zero, as upstream's parser wants.
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || (prefix.len() > 1 && prefix.starts_with('0'))
    {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then(|| format!("{address}/{prefix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(default: &str, min: &str, max: Option<&str>, step: Option<&str>) -> RequestPolicy {
        RequestPolicy {
            default: Some(default.into()),
            valid: Some(ValidRequests::Range { min: min.into(), max: max.map(Into::into), step: step.map(Into::into) }),
        }
    }

    #[test]
    fn policies_are_checked_against_the_capacity_by_value() {
        assert_eq!(check_request_policy(&range("1Gi", "1024Mi", Some("8Gi"), Some("1Gi")), "10Gi"), Ok(()));
        assert_eq!(check_request_policy(&RequestPolicy::default(), "10G"), Ok(()), "no policy at all");
        let values = |default: &str, values: &[&str]| RequestPolicy {
            default: Some(default.into()),
            valid: Some(ValidRequests::Values(values.iter().map(|v| (*v).to_owned()).collect())),
        };
        assert_eq!(check_request_policy(&values("1000m", &["1", "2"]), "2"), Ok(()), "1000m is one of them");
        for (policy, capacity, error) in [
            (range("1G", "1G", Some("20G"), None), "10G", "max \"20G\" is more than the capacity"),
            (range("3G", "1G", Some("2G"), None), "10G", "default \"3G\" is more than max"),
            (range("1G", "1G", Some("2500M"), Some("1G")), "10G", "max \"2500M\" is not min"),
            (range("1G", "1G", None, Some("0")), "10G", "step \"0\" must be more than zero"),
            (range("1G", "3G", Some("2G"), None), "10G", "default \"1G\" is less than min"),
            (range("20G", "1G", None, None), "10G", "default \"20G\" is more than the capacity"),
            (range("1G", "1G", None, None), "ten", "capacity \"ten\" is not a Kubernetes quantity"),
            (values("1", &["1", "1000m"]), "8", "valid_values lists \"1000m\" twice"),
            (values("1", &[]), "8", "valid_values is empty"),
            (values("1", &["1"; 11]), "8", "11 amounts, more than the 10 allowed"),
            (
                RequestPolicy { default: None, valid: Some(ValidRequests::Values(vec!["1".into()])) },
                "8",
                "a default is required with valid_values",
            ),
        ] {
            let why = check_request_policy(&policy, capacity).expect_err(error);
            assert!(why.contains(error), "expected {error:?}, got {why:?}");
        }
    }

    #[test]
    fn counter_sets_and_what_devices_consume_follow_the_slice_rules() {
        let gpu = CounterSet::new("gpu-0", [("memory", "40Gi"), ("slices", "8")]);
        assert_eq!(check_counter_sets(std::slice::from_ref(&gpu)), Ok(()));
        for (sets, error) in [
            (vec![gpu.clone(), gpu.clone()], "counter set \"gpu-0\" is declared twice"),
            (vec![CounterSet::new("GPU", [("memory", "1")])], "must be a DNS label"),
            (vec![CounterSet::new("gpu-1", Vec::<(String, String)>::new())], "has no counters"),
            (
                vec![CounterSet::new("gpu-1", [("memory", "lots")])],
                "counter \"memory\": \"lots\" is not a Kubernetes quantity",
            ),
            (vec![CounterSet::new("big", (0..33).map(|i| (format!("c{i}"), "1")))], "33 counters, more than the 32"),
        ] {
            let why = check_counter_sets(&sets).expect_err(error);
            assert!(why.contains(error), "expected {error:?}, got {why:?}");
        }
        let sets = [gpu];
        let half = Device::healthy("half").consuming("gpu-0", [("memory", "20Gi"), ("slices", "4")]);
        assert_eq!(check_consumes(&half, &sets), Ok(()));
        for (device, error) in [
            (Device::healthy("d").consuming("gpu-9", [("memory", "1")]), "unknown counter set \"gpu-9\""),
            (Device::healthy("d").consuming("gpu-0", [("cores", "1")]), "unknown counter \"cores\""),
            (Device::healthy("d").consuming("gpu-0", Vec::<(String, String)>::new()), "consumes nothing"),
            (Device::healthy("d").consuming("gpu-0", [("memory", "1x")]), "not a Kubernetes quantity"),
            (Device::healthy("d").consuming("gpu-0", [("memory", "1")]).consuming("gpu-0", [("slices", "1")]), "twice"),
            (
                Device::healthy("d")
                    .consuming("gpu-0", [("memory", "1")])
                    .consuming("a", [("x", "1")])
                    .consuming("b", [("x", "1")]),
                "3 counter sets, more than the 2",
            ),
        ] {
            let why = check_consumes(&device, &sets).expect_err(error);
            assert!(why.contains(error), "expected {error:?}, got {why:?}");
            assert!(why.contains("device \"d\""), "{why}");
        }
    }

    #[test]
    fn a_shared_device_s_policies_name_its_capacities() {
        let nic = Device::healthy("nic").with_capacity("bandwidth", "10G");
        let policy = range("1G", "1G", None, Some("1G"));
        assert_eq!(check_shared(&nic.clone().with_request_policy("bandwidth", policy.clone())), Ok(()));
        assert_eq!(check_shared(&nic.clone().shared()), Ok(()), "shared, every capacity consumed freely");
        let why = check_shared(&nic.clone().with_request_policy("queues", policy)).expect_err("no such capacity");
        assert!(why.contains("\"queues\", which is not one of the device's capacities"), "{why}");
        let why = check_shared(&nic.with_request_policy("bandwidth", range("20G", "1G", None, None))).expect_err("big");
        assert!(why.contains("request policy for \"bandwidth\": default \"20G\" is more than the capacity"), "{why}");
    }

    #[test]
    fn a_device_status_is_checked_against_the_api_server_s_limits() {
        let good = DeviceStatus {
            interface_name: Some("eth1".into()),
            hardware_address: Some("02:00:00:00:00:05".into()),
            ips: vec!["10.0.0.5/24".into(), "2001:db8::5/64".into()],
            data: Some(r#"{"vf": 3}"#.into()),
        };
        assert_eq!(check_device_status(&good), Ok(()));
        assert!(DeviceStatus::default().is_empty());
        let with = |change: &dyn Fn(&mut DeviceStatus)| {
            let mut status = good.clone();
            change(&mut status);
            check_device_status(&status).expect_err("refused")
        };
        assert!(with(&|s| s.interface_name = Some("x".repeat(257))).contains("interface_name is 257 bytes"));
        assert!(with(&|s| s.hardware_address = Some("x".repeat(129))).contains("hardware_address is 129"));
        assert!(with(&|s| s.ips = (0..17).map(|n| format!("10.0.0.{n}/24")).collect()).contains("17 entries"));
        assert!(with(&|s| s.ips = vec!["10.0.0.5".into()]).contains("not an address with a prefix"));
        assert!(with(&|s| s.ips = vec!["10.0.0.5/33".into()]).contains("not an address with a prefix"));
        assert!(with(&|s| s.ips = vec!["2001:DB8::5/64".into()]).contains("canonical form"));
        assert!(with(&|s| s.ips = vec!["10.0.0.5/24".into(), "10.0.0.5/24".into()]).contains("twice"));
        assert!(with(&|s| s.data = Some("[1]".into())).contains("JSON object"));
        assert!(with(&|s| s.data = Some("{".into())).contains("not JSON"));
        let big = format!(r#"{{"x": "{}"}}"#, "y".repeat(10 * 1024));
        assert!(with(&|s| s.data = Some(big.clone())).contains("more than 10240"));
    }
}
