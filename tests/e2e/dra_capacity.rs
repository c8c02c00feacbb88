//! Shared devices with consumable capacity (issue 28, item 3; KEP-5075),
//! host side: a static backend declares one NIC `shared`, its bandwidth
//! with a request policy. devhost publishes it with
//! `allowMultipleAllocations` and the policy (docs/dra-api.md §4.4; the
//! fake API server checks them as the real one does), and two claims the
//! scheduler allocated the same NIC, each with its own `consumedCapacity`
//! and `shareID`, are prepared independently: each container's CDI edits
//! carry that claim's amount.

use serde_json::{Value, json};

use crate::dra::{DraNode, GPU_DRIVER, claim};
use crate::harness::{Node, WAIT};

/// The NIC as the static backend's file declares it (served under the
/// test driver's name, whatever the hardware).
const BACKEND: &str = r#"[backend]
kind = "static"
[config]
[[config.resource]]
name = "example.com/gpu"
env = { NIC_IDS = "{ids}", NIC_BANDWIDTH = "{capacity.bandwidth}" }
[[config.resource.device]]
id = "nic-0"
shared = true
capacities = { bandwidth = { value = "10G", request_policy = { default = "1G", valid_range = { min = "1G", max = "8G", step = "1000M" } } } }
[resources."example.com/gpu"]
api = "dra"
"#;

/// A claim allocated a share of `nic-0` consuming `bandwidth`.
fn shared_claim(name: &str, uid: &str, share: &str, bandwidth: &str) -> Value {
    let mut claim = claim(name, uid, &[("net", "node-a", "nic-0")]);
    let result = &mut claim["status"]["allocation"]["devices"]["results"][0];
    result["shareID"] = json!(share);
    result["consumedCapacity"] = json!({"bandwidth": bandwidth});
    claim
}

#[tokio::test(flavor = "multi_thread")]
async fn two_claims_share_one_device_each_with_its_consumed_capacity() {
    let node = Node::new();
    node.backend("capacity", BACKEND);
    let dra = DraNode::around(node, GPU_DRIVER, std::path::PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");

    // The slice, as the API server stored it.
    let deadline = std::time::Instant::now() + WAIT;
    let nic = loop {
        let nic = dra
            .server
            .slices()
            .into_values()
            .filter(|s| s["spec"]["driver"] == GPU_DRIVER)
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == "nic-0");
        if let Some(nic) = nic {
            break nic;
        }
        assert!(std::time::Instant::now() < deadline, "nic-0 never published; log:\n{}", devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(nic["allowMultipleAllocations"], true, "{nic:#}");
    let bandwidth = &nic["capacity"]["bandwidth"];
    assert_eq!(bandwidth["value"], "10G", "{nic:#}");
    assert_eq!(bandwidth["requestPolicy"]["default"], "1G", "{nic:#}");
    assert_eq!(bandwidth["requestPolicy"]["validRange"]["min"], "1G", "{nic:#}");
    assert_eq!(bandwidth["requestPolicy"]["validRange"]["max"], "8G", "{nic:#}");
    // 1000M is written back in canonical form, as the API server does.
    assert_eq!(bandwidth["requestPolicy"]["validRange"]["step"], "1G", "{nic:#}");

    // The scheduler allocated the NIC twice: 2G to one claim, 5G to another.
    let share_a = "6c1b3d0e-4f8a-4b7e-9a51-0d2c6e7f8a91";
    let share_b = "9e2f4a1b-7c3d-4e5f-8a6b-1c2d3e4f5a6b";
    dra.server.put_claim(shared_claim("web", "uid-web", share_a, "2G"));
    dra.server.put_claim(shared_claim("batch", "uid-batch", share_b, "5G"));
    let first = dra.prepare(&devhost, &[("ml", "uid-web", "web")]).await;
    assert_eq!(first.claims["uid-web"].error, "", "{first:?}");
    let second = dra.prepare(&devhost, &[("ml", "uid-batch", "batch")]).await;
    assert_eq!(second.claims["uid-batch"].error, "", "the second share is prepared beside the first: {second:?}");
    assert_eq!(first.claims["uid-web"].devices[0].device_name, "nic-0");
    assert_eq!(second.claims["uid-batch"].devices[0].device_name, "nic-0");

    // Each claim's own CDI spec carries its own amount.
    let envs = |uid: &str| -> String {
        let spec_file = dra.cdi_dir().join(format!("devhost-{GPU_DRIVER}-claim-{uid}.json"));
        let cdi: Value = serde_json::from_slice(&std::fs::read(&spec_file).expect("claim spec")).expect("JSON");
        cdi.to_string()
    };
    let web = envs("uid-web");
    assert!(web.contains("NIC_BANDWIDTH=2G") && web.contains("NIC_IDS=nic-0"), "{web}");
    let batch = envs("uid-batch");
    assert!(batch.contains("NIC_BANDWIDTH=5G") && batch.contains("NIC_IDS=nic-0"), "{batch}");

    // Unpreparing one share leaves the other prepared.
    let answer = dra.watcher.unprepare(GPU_DRIVER, &[("ml", "uid-web", "web")]).await.expect("unprepare answers");
    assert_eq!(answer.claims["uid-web"].error, "", "{answer:?}");
    assert!(!dra.cdi_dir().join(format!("devhost-{GPU_DRIVER}-claim-uid-web.json")).exists());
    assert!(envs("uid-batch").contains("NIC_BANDWIDTH=5G"));
    let again = dra.prepare(&devhost, &[("ml", "uid-batch", "batch")]).await;
    assert_eq!(again.claims["uid-batch"], second.claims["uid-batch"], "answered from the checkpoint, unchanged");
}
