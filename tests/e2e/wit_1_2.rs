//! WASM world `devhost:backend@1.2.0` end to end (issue 28), with real
//! components and the real host. The example component, built on the SDK
//! (`examples/wasm-rust`, `partitions = true`), declares a counter set that
//! a whole GPU and its two halves consume, and a NIC shared by several DRA
//! claims with a request policy on its bandwidth: devhost publishes all of
//! it in the ResourceSlices (the fake API server checks them as the real
//! one does), and two claims sharing the NIC each reach the component's
//! `allocate-shared` with their own consumed amount. A 1.2.0 allocation's
//! device status reaches the host's `Allocation`. Components of the frozen
//! worlds 1.0.0 and 1.1.0 (`tests/fixtures/wasm/v1-0/`, `v1-1/`, built
//! with wit-bindgen and not the SDK) load and serve unchanged beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devhost::backend::handle::BackendHandle;
use devhost::config::parse_backend;
use devhost::model::{AttributeValue, CounterSet, DeviceStatus, RequestPolicy, Share, ValidRequests};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::dra::{DraNode, GPU_DRIVER, claim};
use crate::harness::{Node, WAIT};
use crate::wasm::{component, wasm_file};

const EXAMPLE: &str = "example.com/wasm-rust";
const BANDWIDTH: &str = "example.com/bandwidth";

/// A claim allocated a share of `nic-0` consuming `bandwidth`.
fn shared_claim(name: &str, uid: &str, share: &str, bandwidth: &str) -> Value {
    let mut claim = claim(name, uid, &[("net", "node-a", "nic-0")]);
    let result = &mut claim["status"]["allocation"]["devices"]["results"][0];
    result["shareID"] = json!(share);
    result["consumedCapacity"] = json!({ BANDWIDTH: bandwidth });
    claim
}

/// The environment of a prepared claim's CDI spec, as text.
fn claim_spec(dra: &DraNode, uid: &str) -> String {
    let spec_file = dra.cdi_dir().join(format!("devhost-{GPU_DRIVER}-claim-{uid}.json"));
    let cdi: Value = serde_json::from_slice(&std::fs::read(&spec_file).expect("claim spec")).expect("JSON");
    cdi.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_2_component_s_partitions_and_shared_device_reach_the_slices_and_each_share_its_claim() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = component("devhost_example_wasm_rust", &modules);
    let text = wasm_file(
        &module,
        &node.dir.path().join("cache"),
        "poll_interval_ms = 50",
        "resource = \"example.com/gpu\"\npartitions = true",
    ) + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    node.backend("partitions", &text);
    let dra = DraNode::around(node, GPU_DRIVER, std::path::PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");

    // The counter set and the four devices, in the slices the rules allow.
    let deadline = std::time::Instant::now() + WAIT;
    let slices = loop {
        let slices: Vec<Value> =
            dra.server.slices().into_values().filter(|s| s["spec"]["driver"] == GPU_DRIVER).collect();
        let devices: usize = slices.iter().map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len)).sum();
        if devices == 4 && slices.iter().any(|s| s["spec"].get("sharedCounters").is_some()) {
            break slices;
        }
        assert!(std::time::Instant::now() < deadline, "slices never complete: {slices:#?}\nlog:\n{}", devhost.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counters: Vec<&Value> = slices.iter().filter(|s| s["spec"].get("sharedCounters").is_some()).collect();
    assert_eq!(counters.len(), 1, "one slice of counter sets: {slices:#?}");
    let shared_counters = &counters[0]["spec"]["sharedCounters"];
    assert_eq!(
        shared_counters,
        &json!([{"name": "gpu-0-counters", "counters": {"memory": {"value": "40Gi"}, "slices": {"value": "8"}}}]),
        "the component's counter set, as declared"
    );
    let device = |name: &str| -> Value {
        slices
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no device {name} in {slices:#?}"))
    };
    let whole = device("gpu-0");
    assert_eq!(
        whole["consumesCounters"],
        json!([{"counterSet": "gpu-0-counters", "counters": {"memory": {"value": "40Gi"}, "slices": {"value": "8"}}}]),
        "{whole:#}"
    );
    for half in ["gpu-0-half-0", "gpu-0-half-1"] {
        let half = device(half);
        assert_eq!(half["consumesCounters"][0]["counterSet"], "gpu-0-counters", "{half:#}");
        assert_eq!(half["consumesCounters"][0]["counters"]["memory"]["value"], "20Gi", "{half:#}");
        assert_eq!(half["consumesCounters"][0]["counters"]["slices"]["value"], "4", "{half:#}");
        assert!(half.get("allowMultipleAllocations").is_none(), "a partition is not shared: {half:#}");
    }
    let nic = device("nic-0");
    assert_eq!(nic["allowMultipleAllocations"], true, "{nic:#}");
    assert!(nic.get("consumesCounters").is_none(), "{nic:#}");
    assert_eq!(
        nic["capacity"][BANDWIDTH],
        json!({"value": "10G", "requestPolicy": {"default": "1G", "validRange": {"min": "1G", "max": "8G", "step": "1G"}}}),
        "{nic:#}"
    );

    // A claim the scheduler gave a half: the component allocates that half.
    dra.server.put_claim(claim("half", "uid-half", &[("gpu", "node-a", "gpu-0-half-1")]));
    let answer = dra.prepare(&devhost, &[("ml", "uid-half", "half")]).await;
    assert_eq!(answer.claims["uid-half"].error, "", "{answer:?}\nlog:\n{}", devhost.log());
    let half = claim_spec(&dra, "uid-half");
    assert!(half.contains("EXAMPLE_WASM_DEVICES=gpu-0-half-1"), "{half}");
    assert!(!half.contains("EXAMPLE_WASM_SHARES"), "no share, so a plain allocate: {half}");

    // Two claims share the NIC, each with its own amount: each reaches
    // the component's allocate-shared with its own.
    dra.server.put_claim(shared_claim("web", "uid-web", "6c1b3d0e-4f8a-4b7e-9a51-0d2c6e7f8a91", "2G"));
    dra.server.put_claim(shared_claim("batch", "uid-batch", "9e2f4a1b-7c3d-4e5f-8a6b-1c2d3e4f5a6b", "5G"));
    let first = dra.prepare(&devhost, &[("ml", "uid-web", "web")]).await;
    assert_eq!(first.claims["uid-web"].error, "", "{first:?}\nlog:\n{}", devhost.log());
    let second = dra.prepare(&devhost, &[("ml", "uid-batch", "batch")]).await;
    assert_eq!(second.claims["uid-batch"].error, "", "the second share beside the first: {second:?}");
    assert_eq!(first.claims["uid-web"].devices[0].device_name, "nic-0");
    assert_eq!(second.claims["uid-batch"].devices[0].device_name, "nic-0");
    let web = claim_spec(&dra, "uid-web");
    assert!(web.contains("EXAMPLE_WASM_SHARES=nic-0:example.com/bandwidth=2G"), "{web}");
    assert!(web.contains("EXAMPLE_WASM_DEVICES=nic-0"), "{web}");
    let batch = claim_spec(&dra, "uid-batch");
    assert!(batch.contains("EXAMPLE_WASM_SHARES=nic-0:example.com/bandwidth=5G"), "{batch}");
}

/// Loads `text` (a backends.d file named `name`) and starts it in this
/// process, as the daemon does.
async fn start(dir: &Path, name: &str, text: &str, cancel: &CancellationToken) -> Arc<BackendHandle> {
    let file = dir.join(format!("{name}.toml"));
    let config = parse_backend(&file, text, Duration::from_secs(5)).expect("a valid backend file");
    let runner = devhost::loader::load(&config).await.expect("loads");
    BackendHandle::start(&config.name, runner, config.call_timeout, cancel.clone()).await.expect("starts")
}

/// One share of `nic-0` consuming `amount` of its bandwidth.
fn share(id: &str, amount: &str) -> Vec<(String, Share)> {
    let consumed = BTreeMap::from([(BANDWIDTH.to_owned(), amount.to_owned())]);
    vec![("nic-0".to_owned(), Share { share_id: Some(id.to_owned()), consumed })]
}

/// What a 1.2.0 component declares reaches the host's model (the resource's
/// counter sets, each device's consumption and request policy), and what
/// its allocation reports of each device (`device-status`) reaches the
/// host's `Allocation`, beside the env it set from the share.
#[tokio::test(flavor = "multi_thread")]
async fn a_1_2_component_s_declarations_and_device_status_reach_the_host() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let example = component("devhost_example_wasm_rust", dir.path());
    let cancel = CancellationToken::new();
    let text = wasm_file(&example, &cache, "", "partitions = true\ndevice_status = true");
    let handle = start(dir.path(), "example", &text, &cancel).await;

    let (spec, state) = &handle.resources()[0];
    assert_eq!(spec.name, EXAMPLE);
    assert_eq!(spec.counter_sets, [CounterSet::new("gpu-0-counters", [("memory", "40Gi"), ("slices", "8")])]);
    let devices = state.snapshot().devices.clone();
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["gpu-0", "gpu-0-half-0", "gpu-0-half-1", "nic-0"]);
    assert_eq!(devices[1].consumes[0].counter_set, "gpu-0-counters");
    assert_eq!(devices[1].consumes[0].counters["memory"], "20Gi");
    let policy = RequestPolicy {
        default: Some("1G".into()),
        valid: Some(ValidRequests::Range { min: "1G".into(), max: Some("8G".into()), step: Some("1G".into()) }),
    };
    let shared = devices[3].shared.as_ref().expect("nic-0 is shared");
    assert_eq!(shared.request_policies, BTreeMap::from([(BANDWIDTH.to_owned(), policy)]));
    assert!(devices[..3].iter().all(|d| d.shared.is_none()), "{devices:?}");

    let allocation = handle
        .allocate_shared(EXAMPLE, vec!["nic-0".into()], share("share-1", "3G"))
        .await
        .expect("allocate-shared answers");
    assert_eq!(allocation.envs.get("EXAMPLE_WASM_SHARES").map(String::as_str), Some("nic-0:example.com/bandwidth=3G"));
    let expected = DeviceStatus {
        interface_name: Some("ex-nic-0".into()),
        hardware_address: Some("02:00:00:00:00:01".into()),
        ips: vec!["10.0.0.5/24".into()],
        data: Some("{\"id\":\"nic-0\"}".into()),
    };
    assert_eq!(allocation.device_status, BTreeMap::from([("nic-0".to_owned(), expected)]));

    // Without shares a 1.2.0 component is asked its plain `allocate`.
    let plain = handle.allocate(EXAMPLE, vec!["gpu-0".into()]).await.expect("allocate answers");
    assert_eq!(plain.envs.get("EXAMPLE_WASM_DEVICES").map(String::as_str), Some("gpu-0"));
    assert!(!plain.envs.contains_key("EXAMPLE_WASM_SHARES"), "{plain:?}");
    assert_eq!(plain.device_status.keys().collect::<Vec<_>>(), ["gpu-0"]);
    handle.shutdown().await;
    cancel.cancel();
}

/// The value of `attribute` on device `id` of the handle's first resource.
fn attribute(handle: &BackendHandle, id: &str, attribute: &str) -> Option<AttributeValue> {
    let snapshot = handle.resources()[0].1.snapshot();
    snapshot.devices.iter().find(|d| d.id == id)?.attributes.get(attribute).cloned()
}

/// Components of the frozen worlds 1.1.0 and 1.0.0, built with wit-bindgen
/// against those worlds and not the SDK, load and serve as before: 1.1.0's
/// attributes, capacities and `release` work, nothing of 1.2.0 appears, and
/// a claim's shares reach their plain `allocate`.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_1_1_and_1_0_components_load_and_serve_unchanged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let frozen = component("devhost_fixture_wasm_v1_1", dir.path());
    let legacy = component("devhost_fixture_wasm_v1_0", dir.path());
    let cancel = CancellationToken::new();

    let handle = start(dir.path(), "frozen", &wasm_file(&frozen, &cache, "poll_interval_ms = 20", ""), &cancel).await;
    let (spec, state) = &handle.resources()[0];
    assert_eq!((spec.name.as_str(), spec.release_required), ("example.com/frozen", true));
    assert!(spec.counter_sets.is_empty() && !spec.pre_start_required && !spec.preferred_allocation);
    let devices = state.snapshot().devices.clone();
    assert_eq!(devices.len(), 2);
    for (i, device) in devices.iter().enumerate() {
        assert_eq!(device.id, format!("frozen-{i}"));
        assert_eq!(device.numa_nodes, [i as i64]);
        assert_eq!(device.attributes["example.com/model"], AttributeValue::String("frozen-1.1".into()));
        assert_eq!(device.capacities["example.com/memory"], "4Gi");
        assert!(device.consumes.is_empty() && device.shared.is_none(), "{device:?}");
    }
    let answer = handle
        .allocate_shared("example.com/frozen", vec!["frozen-1".into()], share("share-1", "1G"))
        .await
        .expect("a 1.1.0 component is asked its plain allocate");
    assert_eq!(answer.envs, BTreeMap::from([("FROZEN_DEVICES".to_owned(), "frozen-1".to_owned())]));
    assert!(answer.device_status.is_empty());
    handle.release("example.com/frozen", vec!["frozen-1".into()]).await.expect("release");
    let released = tokio::time::timeout(WAIT, async {
        while attribute(&handle, "frozen-1", "example.com/releases") != Some(AttributeValue::Int(1)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "frozen-1's release count never reached 1: {:?}", handle.resources()[0].1.snapshot());
    let error = handle.release("example.com/other", vec!["frozen-0".into()]).await.expect_err("declined");
    assert_eq!(error.to_string(), "backend \"frozen\": release failed: unknown resource \"example.com/other\"");
    handle.shutdown().await;

    let handle = start(dir.path(), "legacy", &wasm_file(&legacy, &cache, "", ""), &cancel).await;
    let answer = handle
        .allocate_shared("example.com/legacy", vec!["legacy-0".into()], share("share-2", "1G"))
        .await
        .expect("a 1.0.0 component is asked its plain allocate");
    assert_eq!(answer.envs, BTreeMap::from([("LEGACY_DEVICES".to_owned(), "legacy-0".to_owned())]));
    handle.shutdown().await;
    cancel.cancel();
}
