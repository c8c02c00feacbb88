//! The NVIDIA backend's MIG partitions (issue 28) through the real
//! `devhost` binary, the real `devhost_nvidia` module and the fake NVML
//! (`tests/fixtures/native/fake_nvml.c`) serving an H100 in MIG mode next
//! to one without, with `mig = "partitions"` and the resource served
//! through DRA: the GPU's counter set reaches a ResourceSlice of its own,
//! every MIG placement is a device consuming exactly its memory slices
//! (overlapping placements share one, disjoint ones none), the whole GPU
//! consumes all of them, and a claim the scheduler gave a partition is
//! prepared with that partition's profile and placement.
//!
//! Needs the ABI 1.2 transport (counter sets and consumptions from a
//! native module). On a machine with NVML the test skips: the module
//! would find real GPUs there.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::dra::DraNode;
use crate::harness::{Missing, Node, WAIT, repo, skip};
use crate::native_loader::{compile_c_with, rust_module};

/// The DRA driver devhost names after `nvidia.com/gpu`.
const DRIVER: &str = "gpu.nvidia.com";
const MIG_GPU: &str = "GPU-8c3f0a52-1d2e-4b6f-9a71-0c5e2d4b7f10";
const PLAIN_GPU: &str = "GPU-1f9e7d4c-6a3b-42d8-b5e0-93c1a7f2e864";

/// The fake NVML's GPUs: an H100 in MIG mode with its profiles (as
/// `nvidia-smi mig -lgip` lists them; the same figures as the unit tests'
/// `fakes::h100_profiles`), and one without MIG.
fn nvml_config() -> String {
    format!(
        "driver 550.54.15\ncuda 12040\n\
         gpu {MIG_GPU} 0 81559 00000000:3B:00.0 NVIDIA H100 80GB HBM3\nmig on\n\
         profile 0 19 1g.10gb 1 16 1 1 0 1 0 9984 0:1,1:1,2:1,3:1,4:1,5:1,6:1\n\
         profile 1 14 2g.20gb 2 32 2 2 0 2 0 20096 0:2,2:2,4:2\n\
         profile 2 9 3g.40gb 3 60 3 3 0 3 0 40448 0:4,4:4\n\
         profile 3 5 4g.40gb 4 64 4 4 0 4 0 40448 0:4\n\
         profile 4 0 7g.80gb 7 132 7 7 0 7 1 81152 0:8\n\
         profile 9 15 1g.20gb 1 16 1 1 0 1 0 20096 0:2,2:2,4:2,6:2\n\
         gpu {PLAIN_GPU} 1 81559 00000000:86:00.0 NVIDIA H100 80GB HBM3\n"
    )
}

/// The memory slices a published device consumes.
fn memory_slices(device: &Value) -> BTreeSet<String> {
    device["consumesCounters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["counters"].as_object().cloned().unwrap_or_default().into_iter().map(|(k, _)| k))
        .filter(|k| k.starts_with("memory-slice-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_h100_in_mig_mode_is_published_as_partitions_and_a_claim_gets_one() {
    if crate::nvidia::nvml_present() {
        skip(Missing::Machine, "NVML is installed here; this test runs the backend over a fake NVML");
        return;
    }
    let node = Node::new();
    let root = node.dir.path().to_owned();
    let (modules, dev, sys) = (root.join("modules"), root.join("dev"), root.join("sys"));
    for dir in [&modules, &dev, &sys, &root.join("cdi")] {
        std::fs::create_dir_all(dir).expect("node dir");
    }
    let conf = root.join("fake-nvml.conf");
    std::fs::write(&conf, nvml_config()).expect("fake NVML config");
    let nvml = compile_c_with(
        &repo().join("tests/fixtures/native/fake_nvml.c"),
        &modules.join("libfake_nvml.so"),
        &repo().join("abi/include"),
        &[&format!("-DFAKE_NVML_CONFIG={:?}", conf.display().to_string())],
    );
    let module = rust_module("devhost_nvidia", &modules);
    node.backend(
        "gpu",
        &format!(
            "[backend]\nmodule = {:?}\n[config]\nlibrary = {:?}\ndev_root = {:?}\nsysfs_root = {:?}\n\
             mig = \"partitions\"\n[resources.\"nvidia.com/gpu\"]\napi = \"dra\"\n",
            module.display().to_string(),
            nvml.display().to_string(),
            dev.display().to_string(),
            sys.display().to_string(),
        ),
    );
    let dra = DraNode::around(node, DRIVER, PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(DRIVER, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", devhost.log()));

    // 2 whole GPUs and 18 placements, and the counter set.
    let deadline = std::time::Instant::now() + WAIT;
    let slices = loop {
        let slices: Vec<Value> = dra.server.slices().into_values().filter(|s| s["spec"]["driver"] == DRIVER).collect();
        let devices: usize = slices.iter().map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len)).sum();
        if devices == 20 && slices.iter().any(|s| s["spec"].get("sharedCounters").is_some()) {
            break slices;
        }
        assert!(std::time::Instant::now() < deadline, "slices never complete: {slices:#?}\nlog:\n{}", devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let sets: Vec<&Value> = slices.iter().filter_map(|s| s["spec"]["sharedCounters"].as_array()).flatten().collect();
    assert_eq!(sets.len(), 1, "one counter set, for the GPU in MIG mode: {sets:#?}");
    let set = sets[0];
    assert_eq!(set["name"], "gpu-0");
    let counters = set["counters"].as_object().expect("counters");
    for n in 0..8 {
        assert_eq!(counters[&format!("memory-slice-{n}")]["value"], "1", "{set:#}");
    }
    assert_eq!(counters["multiprocessors"]["value"], "132", "{set:#}");
    assert_eq!(counters["memory"]["value"], "81152Mi", "{set:#}");
    assert_eq!(counters.len(), 14, "8 memory slices and 6 engine and memory counters: {set:#}");

    let devices: Vec<Value> =
        slices.iter().flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default()).collect();
    let device = |name: &str| -> &Value {
        devices.iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("no device {name} in {devices:#?}"))
    };
    let by_uuid = |uuid: &str| -> &Value {
        devices
            .iter()
            .find(|d| d["attributes"]["nvidia.com/uuid"]["string"] == uuid)
            .unwrap_or_else(|| panic!("no GPU {uuid} in {devices:#?}"))
    };
    let whole = by_uuid(MIG_GPU);
    assert_eq!(whole["consumesCounters"][0]["counterSet"], "gpu-0");
    assert_eq!(memory_slices(whole).len(), 8, "the whole GPU takes every slice: {whole:#}");
    assert!(by_uuid(PLAIN_GPU).get("consumesCounters").is_none(), "no MIG, no counters");

    let one = device("gpu-0-mig-1g10gb-3");
    assert_eq!(memory_slices(one), BTreeSet::from(["memory-slice-3".to_owned()]), "{one:#}");
    assert_eq!(one["consumesCounters"][0]["counters"]["multiprocessors"]["value"], "16", "{one:#}");
    assert_eq!(one["attributes"]["nvidia.com/profile"]["string"], "1g.10gb", "{one:#}");
    assert_eq!(one["attributes"]["nvidia.com/parentUUID"]["string"], MIG_GPU, "{one:#}");
    assert_eq!(one["attributes"]["nvidia.com/placementStart"]["int"], 3, "{one:#}");
    assert_eq!(one["capacity"]["nvidia.com/memory"]["value"], "9984Mi", "{one:#}");
    // Overlapping placements share a memory slice, disjoint ones none.
    let low = memory_slices(device("gpu-0-mig-3g40gb-0"));
    let high = memory_slices(device("gpu-0-mig-3g40gb-4"));
    assert!(low.contains("memory-slice-3") && !high.contains("memory-slice-3"), "{low:?} {high:?}");
    assert!(low.is_disjoint(&high));

    // The scheduler gave a claim the 2g.20gb at slice 4.
    dra.server.put_claim(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "ml", "name": "mig", "uid": "uid-mig"},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": "node-a", "device": "gpu-0-mig-2g20gb-4"}
        ]}}},
    }));
    let answer = dra.prepare(&devhost, &[("ml", "uid-mig", "mig")]).await;
    assert_eq!(answer.claims["uid-mig"].error, "", "{answer:?}\n{}", devhost.log());
    let spec = dra.cdi_dir().join(format!("devhost-{DRIVER}-claim-uid-mig.json"));
    let cdi = std::fs::read_to_string(&spec).unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
    for env in ["NVIDIA_MIG_PROFILE=2g.20gb", "NVIDIA_MIG_PLACEMENT=4:2", "NVIDIA_VISIBLE_DEVICES=void"] {
        assert!(cdi.contains(env), "{env} missing from the claim's CDI spec: {cdi}");
    }
    assert!(cdi.contains(&format!("NVIDIA_MIG_PARENT={MIG_GPU}")), "{cdi}");
}
