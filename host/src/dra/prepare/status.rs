//! A prepared claim's `status.devices` (KEP-4817, `docs/dra-api.md` §6):
//! one entry for each device of this driver the backend reported a status
//! for, written with an update of the claim's `status` subresource.
//!
//! Why an update and not server-side apply: the update names the
//! `resourceVersion` it read, so an entry another driver wrote meanwhile
//! is never lost (a conflict reads the claim again and merges anew), and
//! devhost keeps other drivers' entries as they are. Only this driver's
//! entries are replaced, and nothing is written when they are already what
//! the backend reports. Like the read, the write is bounded in time and
//! in the size of the answer read.

use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, NetworkDeviceData, ResourceClaim};
use kube::core::{Request, Resource};

use crate::model::DeviceStatus;

/// One write of the status, request and answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(20);
/// Writes tried when another writer changed the claim in between.
const ATTEMPTS: usize = 3;

/// The `status.devices` entry of one device of `driver` in `pool`.
pub fn entry(
    driver: &str,
    pool: &str,
    device: &str,
    share_id: Option<&str>,
    status: &DeviceStatus,
) -> AllocatedDeviceStatus {
    let network = status.interface_name.is_some() || status.hardware_address.is_some() || !status.ips.is_empty();
    AllocatedDeviceStatus {
        driver: driver.to_owned(),
        pool: pool.to_owned(),
        device: device.to_owned(),
        share_id: share_id.map(str::to_owned),
        conditions: None,
        // Checked to be a JSON object (`check_device_status`) before.
        data: status
            .data
            .as_deref()
            .and_then(|data| serde_json::from_str(data).ok())
            .map(k8s_openapi::apimachinery::pkg::runtime::RawExtension),
        network_data: network.then(|| NetworkDeviceData {
            interface_name: status.interface_name.clone(),
            hardware_address: status.hardware_address.clone(),
            ips: (!status.ips.is_empty()).then(|| status.ips.clone()),
        }),
    }
}

/// `claim`'s `status.devices` with the entries of `driver` replaced by
/// `ours`, or `None` when they already are `ours` (in any order).
pub fn merged(
    claim: &ResourceClaim,
    driver: &str,
    ours: &[AllocatedDeviceStatus],
) -> Option<Vec<AllocatedDeviceStatus>> {
    let current = claim.status.as_ref().and_then(|status| status.devices.clone()).unwrap_or_default();
    let key = |entry: &AllocatedDeviceStatus| serde_json::to_string(entry).unwrap_or_default();
    let mut have: Vec<String> = current.iter().filter(|entry| entry.driver == driver).map(key).collect();
    let mut want: Vec<String> = ours.iter().map(key).collect();
    have.sort();
    want.sort();
    if have == want {
        return None;
    }
    let mut devices: Vec<AllocatedDeviceStatus> = current.into_iter().filter(|entry| entry.driver != driver).collect();
    devices.extend(ours.iter().cloned());
    Some(devices)
}

/// Writes `ours` as `driver`'s entries of the claim read as `claim`;
/// whether anything was written. A conflict (another writer was first)
/// reads the claim again, up to [`ATTEMPTS`] writes in all.
pub async fn write(
    client: &kube::Client,
    mut claim: ResourceClaim,
    driver: &str,
    ours: &[AllocatedDeviceStatus],
) -> Result<bool, String> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let uid = claim.metadata.uid.clone();
    for attempt in 1..=ATTEMPTS {
        let Some(devices) = merged(&claim, driver, ours) else {
            return Ok(false);
        };
        claim.status.get_or_insert_with(Default::default).devices = Some(devices);
        let answer =
            tokio::time::timeout(WRITE_DEADLINE, put(client, &namespace, &name, &claim)).await.map_err(|_| {
                format!(
                    "cannot write the ResourceClaim's status: the API server did not answer within {WRITE_DEADLINE:?}"
                )
            })?;
        match answer? {
            Written::Done => return Ok(true),
            Written::Conflict if attempt < ATTEMPTS => {
                claim = super::read::claim(client, &namespace, &name).await?;
                if claim.metadata.uid != uid {
                    return Err("the ResourceClaim was deleted and created again while its status was written".into());
                }
            }
            Written::Conflict => break,
        }
    }
    Err(format!("cannot write the ResourceClaim's status: it changed under each of {ATTEMPTS} writes"))
}

enum Written {
    Done,
    Conflict,
}

async fn put(client: &kube::Client, namespace: &str, name: &str, claim: &ResourceClaim) -> Result<Written, String> {
    let body = serde_json::to_vec(claim).map_err(|error| format!("cannot encode the ResourceClaim: {error}"))?;
    let request = Request::new(ResourceClaim::url_path(&(), Some(namespace)))
        .replace_subresource("status", name, &Default::default(), body)
        .map_err(|error| format!("cannot build the ResourceClaim status request: {error}"))?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|error| format!("cannot write the ResourceClaim's status: {error}"))?;
    let status = response.status();
    // Only an error's message is wanted: read a bounded part of it.
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| format!("cannot write the ResourceClaim's status: {error}"))?;
        if let Some(data) = frame.data_ref() {
            if text.len() + data.len() > super::read::MAX_CLAIM_BYTES {
                return Err("the API server's answer to the ResourceClaim status write is too large".into());
            }
            text.extend_from_slice(data);
        }
    }
    if status.is_success() {
        return Ok(Written::Done);
    }
    if status == http::StatusCode::CONFLICT {
        return Ok(Written::Conflict);
    }
    let message = super::read::api_server_message(&text);
    Err(format!(
        "cannot write the ResourceClaim's status: the API server answered {status}{}",
        message.map(|message| format!(": {message}")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_with(devices: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "net", "uid": "uid-1"},
            "spec": {"devices": {"requests": []}},
            "status": {"devices": devices},
        }))
        .expect("a ResourceClaim")
    }

    #[test]
    fn only_this_driver_s_entries_are_replaced_and_an_unchanged_status_is_not_written() {
        let eth1 =
            DeviceStatus { interface_name: Some("eth1".into()), ips: vec!["10.0.0.5/24".into()], ..Default::default() };
        let ours = [entry("net.example.com", "node-a", "nic-0", None, &eth1)];
        let claim = claim_with(serde_json::json!([
            {"driver": "gpu.example.com", "pool": "node-a", "device": "gpu-0", "data": {"x": 1}},
            {"driver": "net.example.com", "pool": "node-a", "device": "nic-0"},
        ]));
        let devices = merged(&claim, "net.example.com", &ours).expect("a change");
        let json = serde_json::to_value(&devices).expect("JSON");
        assert_eq!(json[0]["driver"], "gpu.example.com", "the other driver's entry stays: {json:#}");
        assert_eq!(json[0]["data"]["x"], 1);
        assert_eq!(json[1]["networkData"]["interfaceName"], "eth1");
        assert_eq!(json[1]["networkData"]["ips"][0], "10.0.0.5/24");
        assert_eq!(devices.len(), 2);

        let written = claim_with(json);
        assert_eq!(merged(&written, "net.example.com", &ours), None, "nothing changed");
        assert!(merged(&written, "net.example.com", &[]).is_some(), "an entry to drop is a change");
    }
}
