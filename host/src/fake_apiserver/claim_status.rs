//! The `status` subresource of ResourceClaims: an update (PUT) that
//! changes only the status, with optimistic concurrency, and the API
//! server's checks of `status.devices` (KEP-4817, `docs/dra-api.md` §6),
//! transcribed here on their own: every entry names a device of the
//! claim's allocation (driver, pool, device and shareID), once; at most 8
//! conditions; `data` a JSON object of at most 10 Ki; `networkData` with
//! an `interfaceName` of at most 256 bytes, a `hardwareAddress` of at most
//! 128 and at most 16 distinct `ips`, each an address with a prefix length
//! in canonical form. The allocation itself cannot change once set.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::{Shared, lock, not_found, object, parse, status};

pub(super) async fn replace_claim_status(
    State(store): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let sent = match parse(&body) {
        Ok(sent) => sent,
        Err(response) => return *response,
    };
    if sent["metadata"]["name"].as_str() != Some(&name) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the name in the body does not match the URL");
    }
    let mut store = lock(&store);
    if store.forbid_claim_status {
        let message = format!(
            "resourceclaims.resource.k8s.io \"{name}\" is forbidden: User \"system:serviceaccount:devhost:devhost\" \
             cannot update resource \"resourceclaims/status\" in API group \"resource.k8s.io\" in the namespace \
             \"{namespace}\""
        );
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let key = (namespace, name.clone());
    let Some(current) = store.claims.get(&key).cloned() else {
        return not_found("resourceclaims", &name);
    };
    match sent["metadata"]["resourceVersion"].as_str() {
        Some(version) if Some(version) == current["metadata"]["resourceVersion"].as_str() => {}
        Some(_) => {
            let message = format!(
                "Operation cannot be fulfilled on resourceclaims.resource.k8s.io \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            );
            return status(StatusCode::CONFLICT, "Conflict", &message);
        }
        None => {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.resourceVersion: must be specified");
        }
    }
    let allocation = &current["status"]["allocation"];
    let sent_allocation = &sent["status"]["allocation"];
    if !allocation.is_null() && sent_allocation != allocation {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "status.allocation: field is immutable");
    }
    if let Err(why) = check_devices(&sent["status"]["devices"], sent_allocation) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    if store.forbid_device_status
        && let Some(driver) = changed_driver(&current["status"]["devices"], &sent["status"]["devices"])
    {
        // kube-apiserver 1.37.2's words (tests/real-peers saw them).
        let message = format!(
            "ResourceClaim.resource.k8s.io \"{name}\" is invalid: status.devices: Forbidden: changing \
             status.devices requires resource=\"resourceclaims/driver\", verb=\"[arbitrary-node:update]\" \
             permission: resourceclaims.resource.k8s.io \"{driver}\" is forbidden: User \
             \"system:serviceaccount:devhost:devhost\" cannot arbitrary-node:update resource \
             \"resourceclaims/driver\" in API group \"resource.k8s.io\" in the namespace \"{}\"",
            key.0
        );
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
    }
    // The status subresource takes the status only: metadata and spec
    // stay as stored.
    let mut claim = current;
    claim["status"] = sent["status"].clone();
    store.stamp(&mut claim, &name);
    store.claims.insert(key, claim.clone());
    object(StatusCode::OK, &claim)
}

/// A driver whose entries differ between the stored `before` and the sent
/// `after` (added, changed or removed; an entry is keyed by driver, pool,
/// device and shareID), as the API server finds the drivers whose right it
/// checks; `None` when every entry is as stored.
fn changed_driver(before: &Value, after: &Value) -> Option<String> {
    let key = |entry: &Value| {
        (entry["driver"].clone(), entry["pool"].clone(), entry["device"].clone(), entry["shareID"].clone())
    };
    let entries = |list: &Value| list.as_array().cloned().unwrap_or_default();
    let (before, after) = (entries(before), entries(after));
    let unmatched_after = after.iter().find(|entry| !before.contains(entry));
    let removed = before.iter().find(|entry| !after.iter().any(|sent| key(sent) == key(entry)));
    unmatched_after.or(removed).map(|entry| entry["driver"].as_str().unwrap_or_default().to_owned())
}

/// `status.devices` against the claim's `allocation`.
fn check_devices(devices: &Value, allocation: &Value) -> Result<(), String> {
    let Some(devices) = devices.as_array() else {
        return if devices.is_null() { Ok(()) } else { Err("status.devices: must be a list".into()) };
    };
    let allocated: Vec<(&Value, &Value, &Value, &Value)> = allocation["devices"]["results"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| (&r["driver"], &r["pool"], &r["device"], r.get("shareID").unwrap_or(&Value::Null)))
                .collect()
        })
        .unwrap_or_default();
    let mut seen = Vec::new();
    for (at, entry) in devices.iter().enumerate() {
        let path = format!("status.devices[{at}]");
        for field in ["driver", "pool", "device"] {
            if entry[field].as_str().is_none_or(str::is_empty) {
                return Err(format!("{path}.{field}: Required value"));
            }
        }
        let key = (&entry["driver"], &entry["pool"], &entry["device"], entry.get("shareID").unwrap_or(&Value::Null));
        if !allocated.contains(&key) {
            return Err(format!("{path}: Invalid value: must be an allocated device in the claim"));
        }
        if seen.contains(&key) {
            return Err(format!("{path}: Duplicate value"));
        }
        seen.push(key);
        if let Some(conditions) = entry.get("conditions").and_then(Value::as_array)
            && conditions.len() > 8
        {
            return Err(format!("{path}.conditions: Too many: {} items, must have at most 8", conditions.len()));
        }
        if let Some(data) = entry.get("data").filter(|data| !data.is_null()) {
            if !data.is_object() {
                return Err(format!("{path}.data: Invalid value: must be a valid JSON object"));
            }
            let size = data.to_string().len();
            if size > 10 * 1024 {
                return Err(format!("{path}.data: Too long: may not be more than 10240 bytes ({size})"));
            }
        }
        check_network(&entry["networkData"], &format!("{path}.networkData"))?;
    }
    Ok(())
}

fn check_network(network: &Value, path: &str) -> Result<(), String> {
    if network.is_null() {
        return Ok(());
    }
    for (field, max) in [("interfaceName", 256), ("hardwareAddress", 128)] {
        if let Some(text) = network[field].as_str()
            && text.len() > max
        {
            return Err(format!("{path}.{field}: Too long: may not be more than {max} bytes"));
        }
    }
    let ips = network["ips"].as_array().map(Vec::as_slice).unwrap_or_default();
    if ips.len() > 16 {
        return Err(format!("{path}.ips: Too many: {} items, must have at most 16", ips.len()));
    }
    for (at, ip) in ips.iter().enumerate() {
        let text = ip.as_str().unwrap_or_default();
        match interface_address(text) {
            None => {
                return Err(format!(
                    "{path}.ips[{at}]: Invalid value: {text:?}: must be a valid address in CIDR form, (e.g. \
                     10.9.8.7/24 or 2001:db8::1/64)"
                ));
            }
            Some(canonical) if canonical != text => {
                return Err(format!(
                    "{path}.ips[{at}]: Invalid value: {text:?}: must be in canonical form ({canonical:?})"
                ));
            }
            Some(_) => {}
        }
        if ips[..at].contains(ip) {
            return Err(format!("{path}.ips[{at}]: Duplicate value: {text:?}"));
        }
    }
    Ok(())
}

/// `text` as `address/bits` in canonical form, if it is one.
fn interface_address(text: &str) -> Option<String> {
    let (address, bits) = text.rsplit_once('/')?;
    let address: std::net::IpAddr = address.parse().ok()?;
    if bits.is_empty()
        || bits.len() > 3
        || !bits.bytes().all(|b| b.is_ascii_digit())
        || (bits.len() > 1 && bits.starts_with('0'))
    {
        return None;
    }
    let bits: u32 = bits.parse().ok()?;
    (bits <= if address.is_ipv4() { 32 } else { 128 }).then(|| format!("{address}/{bits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_is_found_changed_when_its_entry_is_added_changed_or_removed_and_not_when_kept() {
        let nic = |driver: &str, ip: &str| serde_json::json!({"driver": driver, "pool": "p", "device": "nic-0", "networkData": {"ips": [ip]}});
        let (a, b) = (nic("a.example.com", "10.0.0.1/24"), nic("b.example.com", "10.0.0.2/24"));
        let list = |entries: &[&Value]| Value::Array(entries.iter().map(|e| (*e).clone()).collect());
        assert_eq!(changed_driver(&list(&[&a, &b]), &list(&[&b, &a])), None, "kept, in another order");
        assert_eq!(changed_driver(&Value::Null, &list(&[&a])).as_deref(), Some("a.example.com"), "added");
        let a2 = nic("a.example.com", "10.0.0.9/24");
        assert_eq!(changed_driver(&list(&[&a, &b]), &list(&[&a2, &b])).as_deref(), Some("a.example.com"), "changed");
        assert_eq!(changed_driver(&list(&[&a, &b]), &list(&[&a])).as_deref(), Some("b.example.com"), "removed");
    }

    #[test]
    fn device_status_entries_are_checked_as_the_api_server_checks_them() {
        let allocation = serde_json::json!({"devices": {"results": [
            {"request": "nic", "driver": "net.example.com", "pool": "node-a", "device": "nic-0"},
        ]}});
        let entry = |network: Value| serde_json::json!([{"driver": "net.example.com", "pool": "node-a", "device": "nic-0", "networkData": network}]);
        let good = entry(serde_json::json!({"interfaceName": "eth1", "ips": ["10.0.0.5/24", "2001:db8::5/64"]}));
        assert_eq!(check_devices(&good, &allocation), Ok(()));
        for (devices, error) in [
            (
                serde_json::json!([{"driver": "net.example.com", "pool": "node-a", "device": "nic-9"}]),
                "must be an allocated device",
            ),
            (
                serde_json::json!([{"driver": "other.example.com", "pool": "node-a", "device": "nic-0"}]),
                "must be an allocated device",
            ),
            (serde_json::json!([{"pool": "node-a", "device": "nic-0"}]), "driver: Required value"),
            (entry(serde_json::json!({"interfaceName": "x".repeat(257)})), "interfaceName: Too long"),
            (entry(serde_json::json!({"hardwareAddress": "x".repeat(129)})), "hardwareAddress: Too long"),
            (entry(serde_json::json!({"ips": ["10.0.0.5"]})), "CIDR form"),
            (entry(serde_json::json!({"ips": ["2001:DB8::5/64"]})), "canonical form"),
            (entry(serde_json::json!({"ips": ["10.0.0.5/24", "10.0.0.5/24"]})), "Duplicate value"),
            (
                entry(serde_json::json!({"ips": (0..17).map(|n| format!("10.0.0.{n}/24")).collect::<Vec<_>>()})),
                "Too many: 17",
            ),
        ] {
            let why = check_devices(&devices, &allocation).expect_err(error);
            assert!(why.contains(error), "expected {error:?}, got {why:?}");
        }
        let twice = serde_json::json!([
            {"driver": "net.example.com", "pool": "node-a", "device": "nic-0"},
            {"driver": "net.example.com", "pool": "node-a", "device": "nic-0"},
        ]);
        assert!(check_devices(&twice, &allocation).expect_err("duplicate").contains("Duplicate value"));
        let data = serde_json::json!([{"driver": "net.example.com", "pool": "node-a", "device": "nic-0", "data": [1]}]);
        assert!(check_devices(&data, &allocation).expect_err("not an object").contains("JSON object"));
    }
}
