//! Device status (issue 28, item 5; KEP-4817), host side: a static
//! backend declares a NIC's `network`; once devhost prepared a claim
//! allocated that NIC, the claim's `status.devices` on the API server
//! shows the NIC's `networkData` (the fake API server checks the entry as
//! the real one does), another driver's entry stays as it was, and a
//! status already right is not written again (docs/dra-api.md §6).

use serde_json::{Value, json};

use crate::dra::{DraNode, GPU_DRIVER};
use crate::harness::{Node, WAIT};

/// Two NICs served as `GPU_DRIVER`'s devices; only nic-0 has a status.
const BACKEND: &str = r#"[backend]
kind = "static"
[config]
[[config.resource]]
name = "example.com/gpu"
env = { IDS = "{ids}" }
[[config.resource.device]]
id = "nic-0"
network = { interface_name = "eth1", hardware_address = "02:00:00:00:00:05", ips = ["10.0.0.5/24", "2001:db8::5/64"] }
[[config.resource.device]]
id = "nic-1"
[resources."example.com/gpu"]
api = "dra"
"#;

/// Status writes the server got so far.
fn status_writes(dra: &DraNode) -> usize {
    dra.server.requests().iter().filter(|r| r.method == "PUT" && r.path.ends_with("/status")).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_claim_shows_its_device_s_network_data_written_once() {
    let node = Node::new();
    node.backend("nics", BACKEND);
    let dra = DraNode::around(node, GPU_DRIVER, std::path::PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");

    // The scheduler allocated both NICs and a device of another driver,
    // which already wrote its own entry.
    let other = json!({"driver": "other.example.com", "pool": "node-a", "device": "dev-0", "data": {"mine": true}});
    dra.server.put_claim(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "ml", "name": "net", "uid": "uid-net"},
        "spec": {"devices": {"requests": []}},
        "status": {
            "allocation": {"devices": {"results": [
                {"request": "nic", "driver": GPU_DRIVER, "pool": "node-a", "device": "nic-0"},
                {"request": "nic", "driver": GPU_DRIVER, "pool": "node-a", "device": "nic-1"},
                {"request": "other", "driver": "other.example.com", "pool": "node-a", "device": "dev-0"},
            ]}},
            "devices": [other.clone()],
        },
    }));
    let answer = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    assert_eq!(answer.claims["uid-net"].error, "", "{answer:?}\nlog:\n{}", devhost.log());

    let claim = dra.server.claim("ml", "net").expect("the claim");
    let devices: Vec<Value> = claim["status"]["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 2, "the other driver's entry and nic-0's: {devices:#?}");
    assert_eq!(devices[0], other, "another driver's entry is kept as it was");
    let nic = &devices[1];
    assert_eq!((&nic["driver"], &nic["pool"], &nic["device"]), (&json!(GPU_DRIVER), &json!("node-a"), &json!("nic-0")));
    assert_eq!(
        nic["networkData"],
        json!({"interfaceName": "eth1", "hardwareAddress": "02:00:00:00:00:05", "ips": ["10.0.0.5/24", "2001:db8::5/64"]})
    );
    assert_eq!(status_writes(&dra), 1, "one write: {:#?}", dra.server.requests());

    // The kubelet asks again: answered from the checkpoint, nothing sent.
    let before = dra.server.requests().len();
    let again = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    assert_eq!(again.claims["uid-net"].error, "", "{again:?}");
    assert_eq!(dra.server.requests().len(), before, "a repeated prepare sends nothing");

    // Unprepared and prepared anew: the claim is read, and its status,
    // already right, is not written again.
    let undone = dra.watcher.unprepare(GPU_DRIVER, &[("ml", "uid-net", "net")]).await.expect("answered");
    assert_eq!(undone.claims["uid-net"].error, "", "{undone:?}");
    let reads = dra.claim_reads();
    let anew = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    assert_eq!(anew.claims["uid-net"].error, "", "{anew:?}");
    assert!(dra.claim_reads() > reads, "prepared anew, the claim was read");
    assert_eq!(status_writes(&dra), 1, "an unchanged status is not written: {:#?}", dra.server.requests());
    assert_eq!(dra.server.claim("ml", "net").expect("the claim")["status"]["devices"], json!(devices));
}

/// One NIC with a status, one claim allocated it.
fn nic_claim(dra: &DraNode) {
    dra.server.put_claim(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "ml", "name": "net", "uid": "uid-net"},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "nic", "driver": GPU_DRIVER, "pool": "node-a", "device": "nic-0"},
        ]}}},
    }));
}

/// devhost serving `BACKEND` through DRA, registered, and `nic_claim`'s
/// claim in the API server.
async fn serving_nic_claim() -> (DraNode, crate::harness::Devhost) {
    let node = Node::new();
    node.backend("nics", BACKEND);
    let dra = DraNode::around(node, GPU_DRIVER, std::path::PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    nic_claim(&dra);
    (dra, devhost)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_the_api_server_refuses_fails_the_prepare_and_is_written_when_the_kubelet_asks_again() {
    let (dra, devhost) = serving_nic_claim().await;

    // A cluster without the RBAC rule: the claim is prepared (its CDI
    // spec written, in the checkpoint) but the kubelet hears the error.
    dra.server.forbid_claim_status(true);
    let answer = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    let error = &answer.claims["uid-net"].error;
    assert!(error.contains("prepared, but cannot write the ResourceClaim's status"), "{answer:?}");
    assert!(error.contains("403 Forbidden") && error.contains("cannot update resource"), "{error}");
    assert_eq!(dra.server.claim("ml", "net").expect("the claim")["status"]["devices"], Value::Null);

    // Allowed again, the kubelet's next prepare writes it, without
    // calling the backend or preparing the claim twice.
    dra.server.forbid_claim_status(false);
    let again = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    assert_eq!(again.claims["uid-net"].error, "", "{again:?}\nlog:\n{}", devhost.log());
    assert_eq!(again.claims["uid-net"].devices.len(), 1, "{again:?}");
    let devices = &dra.server.claim("ml", "net").expect("the claim")["status"]["devices"];
    assert_eq!(devices[0]["networkData"]["interfaceName"], "eth1", "{devices:#}");
    // The log is written by a background thread: wait for the line.
    devhost.wait_for_log("claim status written").await;
    assert_eq!(devhost.log().matches("claim prepared").count(), 1, "prepared once:\n{}", devhost.log());
    assert_eq!(devhost.log().matches("claim status written").count(), 1, "{}", devhost.log());
}

/// The real API server (1.36+) answers a status write whose caller lacks
/// the `resourceclaims/driver` right with 422 and a message that ends with
/// the missing right (`tests/real-peers`' `TestDeviceStatusReachesTheRealAPIServerWithTheShippedRBAC`
/// saw it): the kubelet hears it whole, not cut before the right.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_write_without_the_driver_right_says_which_right_is_missing() {
    let (dra, devhost) = serving_nic_claim().await;

    dra.server.forbid_device_status(true);
    let answer = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    let error = &answer.claims["uid-net"].error;
    assert!(error.contains("prepared, but cannot write the ResourceClaim's status"), "{answer:?}");
    assert!(error.contains("422 Unprocessable Entity"), "{error}");
    assert!(error.contains(r#"cannot arbitrary-node:update resource \"resourceclaims/driver\""#), "{error}");
    assert!(!error.contains("bytes in all"), "the API server's message is cut: {error}");
    assert_eq!(dra.server.claim("ml", "net").expect("the claim")["status"]["devices"], Value::Null);

    dra.server.forbid_device_status(false);
    let again = dra.prepare(&devhost, &[("ml", "uid-net", "net")]).await;
    assert_eq!(again.claims["uid-net"].error, "", "{again:?}\nlog:\n{}", devhost.log());
    let devices = &dra.server.claim("ml", "net").expect("the claim")["status"]["devices"];
    assert_eq!(devices[0]["networkData"]["interfaceName"], "eth1", "{devices:#}");
}
