//! Partitionable devices (issue 28, item 2), host side: a static backend
//! declares one GPU as a counter set and three overlapping partitions (the
//! whole GPU and its two halves) that consume it. devhost publishes the
//! counter set in a ResourceSlice of its own and each partition with its
//! `consumesCounters`, as the API's rules want (docs/dra-api.md §4.3; the
//! fake API server checks them as the real one does), and a claim the
//! scheduler allocated a half to is prepared with that half's ID.

use serde_json::Value;

use crate::dra::{DraNode, GPU_DRIVER, claim};
use crate::harness::{Node, WAIT};

/// The GPU as the static backend's file declares it.
const BACKEND: &str = r#"[backend]
kind = "static"
[config]
[[config.resource]]
name = "example.com/gpu"
env = { IDS = "{ids}" }
[[config.resource.counter_set]]
name = "gpu-0-counters"
counters = { memory = "40Gi", slices = "8" }
[[config.resource.device]]
id = "gpu-0"
consumes = [{ counter_set = "gpu-0-counters", counters = { memory = "40Gi", slices = "8" } }]
[[config.resource.device]]
id = "gpu-0-half-0"
consumes = [{ counter_set = "gpu-0-counters", counters = { memory = "20Gi", slices = "4" } }]
[[config.resource.device]]
id = "gpu-0-half-1"
consumes = [{ counter_set = "gpu-0-counters", counters = { memory = "20480Mi", slices = "4" } }]
[resources."example.com/gpu"]
api = "dra"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_published_as_overlapping_partitions_of_one_counter_set() {
    let node = Node::new();
    node.backend("partitions", BACKEND);
    let dra = DraNode::around(node, GPU_DRIVER, std::path::PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");

    // Counter set and devices, each in the slices the rules allow.
    let deadline = std::time::Instant::now() + WAIT;
    let slices = loop {
        let slices: Vec<Value> =
            dra.server.slices().into_values().filter(|s| s["spec"]["driver"] == GPU_DRIVER).collect();
        let devices: usize = slices.iter().map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len)).sum();
        if devices == 3 && slices.iter().any(|s| s["spec"].get("sharedCounters").is_some()) {
            break slices;
        }
        assert!(std::time::Instant::now() < deadline, "slices never complete: {slices:#?}\nlog:\n{}", devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let counters: Vec<&Value> = slices.iter().filter(|s| s["spec"].get("sharedCounters").is_some()).collect();
    assert_eq!(counters.len(), 1, "one slice of counter sets: {slices:#?}");
    let spec = &counters[0]["spec"];
    assert!(spec.get("devices").is_none(), "a counter-set slice carries no devices: {spec:#}");
    assert_eq!(spec["sharedCounters"][0]["name"], "gpu-0-counters");
    assert_eq!(spec["sharedCounters"][0]["counters"]["memory"]["value"], "40Gi");
    assert_eq!(spec["sharedCounters"][0]["counters"]["slices"]["value"], "8");
    // One pool: every slice carries its generation and the total count.
    let generations: Vec<&Value> = slices.iter().map(|s| &s["spec"]["pool"]["generation"]).collect();
    assert!(generations.windows(2).all(|pair| pair[0] == pair[1]), "{generations:?}");
    for slice in &slices {
        assert_eq!(slice["spec"]["pool"]["resourceSliceCount"], slices.len(), "{slice:#}");
    }
    let device = |name: &str| -> Value {
        slices
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no device {name} in {slices:#?}"))
    };
    let whole = device("gpu-0");
    assert_eq!(whole["consumesCounters"][0]["counterSet"], "gpu-0-counters");
    assert_eq!(whole["consumesCounters"][0]["counters"]["memory"]["value"], "40Gi");
    // 20480Mi is written back in canonical form, as the API server does.
    let half = device("gpu-0-half-1");
    assert_eq!(half["consumesCounters"][0]["counters"]["memory"]["value"], "20Gi");
    assert_eq!(half["consumesCounters"][0]["counters"]["slices"]["value"], "4");

    // The scheduler gave a claim the second half: that is what the backend
    // is asked to allocate.
    dra.server.put_claim(claim("half", "uid-half", &[("gpu", "node-a", "gpu-0-half-1")]));
    let answer = dra.prepare(&devhost, &[("ml", "uid-half", "half")]).await;
    assert_eq!(answer.claims["uid-half"].error, "", "{answer:?}");
    let spec_file = dra.cdi_dir().join(format!("devhost-{GPU_DRIVER}-claim-uid-half.json"));
    let cdi: Value = serde_json::from_slice(&std::fs::read(&spec_file).expect("claim spec")).expect("JSON");
    let envs = cdi.to_string();
    assert!(envs.contains("IDS=gpu-0-half-1"), "the half's ID reached allocate: {envs}");
}
