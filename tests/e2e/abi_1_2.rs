//! ABI 1.2 end to end, with real shared libraries
//! (`tests/fixtures/native/partitions_1_2.c`): a module's counter set,
//! what its partitions consume and its shared NIC's request policy reach
//! the DRA ResourceSlices; two claims sharing the NIC are prepared with
//! their own amounts, which reach the module's `allocate_shared`; the
//! device status it gives reaches the host; broken declarations are
//! refused naming what is wrong. All of it in a worker process (the
//! default) and in devhost's own (`isolation = "none"`). Modules built
//! against the frozen 1.0 and 1.1 headers still load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devhost::backend::handle::{BackendHandle, CallError};
use devhost::config::parse_backend;
use devhost_abi::model::{CounterSet, DeviceStatus, Share};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::abi_1_1::list;
use crate::dra::DraNode;
use crate::harness::{Node, WAIT, repo};
use crate::native_loader::{compile_c, compile_c_with};

const RESOURCE: &str = "fixture.example.com/accel";
/// The DRA driver devhost names after the resource.
const DRIVER: &str = "accel.fixture.example.com";

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/native").join(name)
}

/// A backends.d file for `module` with `[backend]` and `[config]` lines.
fn module_file(module: &Path, backend: &str, config: &str) -> String {
    format!("[backend]\nmodule = {:?}\n{backend}\n[config]\n{config}\n", module.display().to_string())
}

/// A claim the scheduler allocated a share of `nic-0` to, consuming
/// `bandwidth`.
fn shared_claim(name: &str, uid: &str, share: &str, bandwidth: &str) -> Value {
    let mut claim = claim(name, uid, "nic-0");
    let result = &mut claim["status"]["allocation"]["devices"]["results"][0];
    result["shareID"] = json!(share);
    result["consumedCapacity"] = json!({"bandwidth": bandwidth});
    claim
}

/// A claim the scheduler allocated `device` of the driver to.
fn claim(name: &str, uid: &str, device: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "ml", "name": name, "uid": uid},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "dev", "driver": DRIVER, "pool": "node-a", "device": device}
        ]}}},
    })
}

/// The module through DRA with `isolation`: the slices carry its counter
/// set, its partitions' consumption and its NIC's sharing; two claims on
/// the NIC each get their own amount, a claim on a half its ID.
async fn serve_through_dra(isolation: &str) {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = compile_c(&fixture("partitions_1_2.c"), &modules);
    let backend = format!("isolation = {isolation:?}");
    let text = module_file(&module, &backend, "") + &format!("[resources.{RESOURCE:?}]\napi = \"dra\"\n");
    node.backend("accel", &text);
    let dra = DraNode::around(node, DRIVER, PathBuf::from("/nonexistent")).await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(DRIVER, WAIT).await.expect("the driver registers");

    let deadline = std::time::Instant::now() + WAIT;
    let slices = loop {
        let slices: Vec<Value> = dra.server.slices().into_values().filter(|s| s["spec"]["driver"] == DRIVER).collect();
        let devices: usize = slices.iter().map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len)).sum();
        if devices == 4 && slices.iter().any(|s| s["spec"].get("sharedCounters").is_some()) {
            break slices;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{isolation}: slices never complete: {slices:#?}\n{}",
            devhost.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counters: Vec<&Value> = slices.iter().filter(|s| s["spec"].get("sharedCounters").is_some()).collect();
    assert_eq!(counters.len(), 1, "{isolation}: one slice of counter sets: {slices:#?}");
    let set = &counters[0]["spec"]["sharedCounters"][0];
    assert_eq!(set["name"], "gpu-0-counters", "{isolation}: {set:#}");
    assert_eq!(set["counters"]["memory"]["value"], "40Gi", "{isolation}: {set:#}");
    assert_eq!(set["counters"]["slices"]["value"], "8", "{isolation}: {set:#}");
    let device = |name: &str| -> Value {
        slices
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{isolation}: no device {name} in {slices:#?}"))
    };
    let whole = device("gpu-0");
    assert_eq!(whole["consumesCounters"][0]["counterSet"], "gpu-0-counters", "{isolation}: {whole:#}");
    assert_eq!(whole["consumesCounters"][0]["counters"]["memory"]["value"], "40Gi", "{isolation}: {whole:#}");
    // The module wrote 20480Mi; the slice has it in canonical form.
    let half = device("gpu-0-half-1");
    assert_eq!(half["consumesCounters"][0]["counters"]["memory"]["value"], "20Gi", "{isolation}: {half:#}");
    assert_eq!(half["consumesCounters"][0]["counters"]["slices"]["value"], "4", "{isolation}: {half:#}");
    let nic = device("nic-0");
    assert_eq!(nic["allowMultipleAllocations"], true, "{isolation}: {nic:#}");
    assert!(nic.get("consumesCounters").is_none(), "{isolation}: {nic:#}");
    let bandwidth = &nic["capacity"]["bandwidth"];
    assert_eq!(bandwidth["value"], "10G", "{isolation}: {nic:#}");
    assert_eq!(bandwidth["requestPolicy"]["default"], "1G", "{isolation}: {nic:#}");
    let range = &bandwidth["requestPolicy"]["validRange"];
    assert_eq!((&range["min"], &range["max"], &range["step"]), (&json!("1G"), &json!("8G"), &json!("1G")), "{nic:#}");
    assert_eq!(whole.get("allowMultipleAllocations"), None, "{isolation}: only the NIC is shared: {whole:#}");

    // Two claims on the NIC, 2G and 5G: each container gets its own.
    let (share_a, share_b) = ("6c1b3d0e-4f8a-4b7e-9a51-0d2c6e7f8a91", "9e2f4a1b-7c3d-4e5f-8a6b-1c2d3e4f5a6b");
    dra.server.put_claim(shared_claim("web", "uid-web", share_a, "2G"));
    dra.server.put_claim(shared_claim("batch", "uid-batch", share_b, "5G"));
    dra.server.put_claim(claim("half", "uid-half", "gpu-0-half-1"));
    for (uid, name) in [("uid-web", "web"), ("uid-batch", "batch"), ("uid-half", "half")] {
        let answer = dra.prepare(&devhost, &[("ml", uid, name)]).await;
        assert_eq!(answer.claims[uid].error, "", "{isolation}: {answer:?}\n{}", devhost.log());
    }
    let envs = |uid: &str| -> String {
        let spec = dra.cdi_dir().join(format!("devhost-{DRIVER}-claim-{uid}.json"));
        let cdi: Value = serde_json::from_slice(&std::fs::read(&spec).expect("the claim's CDI spec")).expect("JSON");
        cdi["devices"][0]["containerEdits"]["env"].to_string()
    };
    let web = envs("uid-web");
    assert!(web.contains("FIXTURE_BANDWIDTH=2G"), "{isolation}: {web}");
    assert!(web.contains(&format!("FIXTURE_SHARES=nic-0/{share_a}/2G")), "{isolation}: {web}");
    let batch = envs("uid-batch");
    assert!(batch.contains("FIXTURE_BANDWIDTH=5G"), "{isolation}: {batch}");
    assert!(batch.contains(&format!("FIXTURE_SHARES=nic-0/{share_b}/5G")), "{isolation}: {batch}");
    // No share: the module's plain allocate answered.
    assert_eq!(envs("uid-half"), r#"["FIXTURE_IDS=gpu-0-half-1"]"#, "{isolation}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_s_partitions_and_shared_nic_reach_the_slices_and_each_claim_its_amount_in_a_worker() {
    serve_through_dra("process").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_s_partitions_and_shared_nic_reach_the_slices_and_each_claim_its_amount_in_process() {
    serve_through_dra("none").await;
}

/// Starts `module` with `[config]` lines `config`, as devhost does.
async fn start(dir: &Path, module: &Path, isolation: &str, config: &str) -> (Arc<BackendHandle>, CancellationToken) {
    // Workers re-execute devhost, not this test binary.
    devhost::worker::set_executable(env!("CARGO_BIN_EXE_devhost").into());
    let file = dir.join(format!("accel-{isolation}.toml"));
    let text = module_file(module, &format!("isolation = {isolation:?}"), config);
    let config = parse_backend(&file, &text, Duration::from_secs(5)).expect("a valid backend file");
    let runner = devhost::loader::load(&config).await.expect("loads");
    let cancel = CancellationToken::new();
    let handle = BackendHandle::start(&config.name, runner, config.call_timeout, cancel.clone()).await.expect("starts");
    (handle, cancel)
}

fn bandwidth_share(id: &str, amount: &str) -> (String, Share) {
    let consumed = BTreeMap::from([("bandwidth".to_owned(), amount.to_owned())]);
    ("nic-0".to_owned(), Share { share_id: Some(id.to_owned()), consumed })
}

/// What the module declares reaches the host's model, the shares reach
/// `allocate_shared`, and the device status it gives reaches the
/// allocation, wherever the module runs; a status for a device the call is
/// not about is refused, naming it; without `allocate_shared` (a module
/// that never defined it) the host calls `allocate`.
#[tokio::test(flavor = "multi_thread")]
async fn shares_reach_allocate_shared_and_its_device_status_reaches_the_host_wherever_the_module_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("partitions_1_2.c"), dir.path());
    let plain = compile_c_with(
        &fixture("partitions_1_2.c"),
        &dir.path().join("libno_allocate_shared.so"),
        &repo().join("abi/include"),
        &["-DNO_ALLOCATE_SHARED"],
    );
    for isolation in ["process", "none"] {
        let (handle, cancel) = start(dir.path(), &module, isolation, "").await;
        let (spec, state) = &handle.resources()[0];
        assert_eq!(spec.name, RESOURCE);
        assert_eq!(
            spec.counter_sets,
            [CounterSet::new("gpu-0-counters", [("memory", "40Gi"), ("slices", "8")])],
            "{isolation}"
        );
        let devices = state.snapshot().devices.clone();
        let half = devices.iter().find(|d| d.id == "gpu-0-half-1").expect("gpu-0-half-1");
        assert_eq!(half.consumes[0].counters["memory"], "20480Mi", "{isolation}: {half:?}");
        let nic = devices.iter().find(|d| d.id == "nic-0").expect("nic-0");
        let policy = &nic.shared.as_ref().expect("nic-0 is shared").request_policies["bandwidth"];
        assert_eq!(policy.default.as_deref(), Some("1G"), "{isolation}: {nic:?}");

        let ids = vec!["nic-0".to_owned()];
        let allocation = handle
            .allocate_shared(RESOURCE, ids.clone(), vec![bandwidth_share("s-1", "3G")])
            .await
            .unwrap_or_else(|error| panic!("{isolation}: {error}"));
        assert_eq!(allocation.envs["FIXTURE_BANDWIDTH"], "3G", "{isolation}");
        assert_eq!(allocation.envs["FIXTURE_SHARES"], "nic-0/s-1/3G", "{isolation}");
        let status = DeviceStatus {
            interface_name: Some("eth1".into()),
            hardware_address: Some("02:00:00:00:00:01".into()),
            ips: vec!["10.0.0.5/24".into()],
            data: Some(r#"{"vf":3}"#.into()),
        };
        assert_eq!(allocation.device_status, BTreeMap::from([("nic-0".to_owned(), status)]), "{isolation}");
        // No shares: the plain allocate, which gives no status.
        let allocation = handle.allocate(RESOURCE, ids.clone()).await.expect("allocates");
        assert_eq!(allocation.envs, BTreeMap::from([("FIXTURE_IDS".to_owned(), "nic-0".to_owned())]), "{isolation}");
        assert!(allocation.device_status.is_empty(), "{isolation}");
        handle.shutdown().await;
        cancel.cancel();

        let (handle, cancel) = start(dir.path(), &module, isolation, "breaks = \"foreign_status\"").await;
        let error = handle.allocate_shared(RESOURCE, ids.clone(), vec![bandwidth_share("s-2", "1G")]).await;
        match error {
            Err(CallError::Invalid { message, .. }) => assert!(
                message.contains("the status of device \"gpu-0\"")
                    && message.contains("not one of the call's [\"nic-0\"]"),
                "{isolation}: {message}"
            ),
            other => panic!("{isolation}: a status for a device not in the call must be refused, got {other:?}"),
        }
        handle.shutdown().await;
        cancel.cancel();

        let (handle, cancel) = start(dir.path(), &plain, isolation, "").await;
        let allocation =
            handle.allocate_shared(RESOURCE, ids.clone(), vec![bandwidth_share("s-3", "2G")]).await.expect("allocates");
        assert_eq!(
            allocation.envs,
            BTreeMap::from([("FIXTURE_IDS".to_owned(), "nic-0".to_owned())]),
            "{isolation}: without allocate_shared the host calls allocate"
        );
        handle.shutdown().await;
        cancel.cancel();
    }
}

fn backend<'a>(listed: &'a Value, name: &str) -> &'a Value {
    listed.as_array().expect("a list").iter().find(|b| b["backend"] == name).expect("the backend is listed")
}

#[test]
fn a_policy_on_a_device_not_shared_and_an_undeclared_counter_set_are_refused_naming_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("partitions_1_2.c"), dir.path());
    let listed = list(&[
        ("unshared", module_file(&module, "", "breaks = \"unshared_policy\"")),
        ("unknownset", module_file(&module, "isolation = \"none\"", "breaks = \"unknown_set\"")),
        ("fine", module_file(&module, "", "")),
    ]);
    let error = backend(&listed, "unshared")["error"].as_str().expect("refused").to_owned();
    assert!(
        error.contains(
            "resource \"fixture.example.com/accel\": device \"nic-0\" has a request policy for capacity \"bandwidth\" but is not shared"
        ),
        "{error}"
    );
    let error = backend(&listed, "unknownset")["error"].as_str().expect("refused").to_owned();
    assert!(error.contains("device \"gpu-0\" consumes from unknown counter set \"gpu-9-counters\""), "{error}");
    let fine = backend(&listed, "fine");
    assert_eq!(fine["error"], Value::Null, "{fine}");
    assert_eq!(fine["resources"][0]["devices"].as_array().map(Vec::len), Some(4), "{fine}");
}

/// The append-only promise for 1.0 and 1.1: the frozen headers are what
/// was released, the 1.1 fixture is built against the frozen 1.1 header
/// whatever `-I` says, and modules built against either load and serve.
#[test]
fn modules_built_against_the_frozen_1_0_and_1_1_headers_still_load() {
    for (version, minor) in [("abi-1.0", 0), ("abi-1.1", 1)] {
        let text = std::fs::read_to_string(fixture(version).join("devhost_backend.h")).expect("a frozen header");
        assert!(text.contains(&format!("#define DEVHOST_ABI_VERSION_MINOR {minor}\n")), "{version}");
        assert!(!text.contains("allocate_shared"), "{version} is frozen before 1.2");
    }
    let current = std::fs::read_to_string(repo().join("abi/include/devhost_backend.h")).expect("the header");
    assert!(current.contains("#define DEVHOST_ABI_VERSION_MINOR 2\n"));

    // The preprocessor says which header the 1.1 fixture really includes.
    let output = Command::new("cc")
        .args(["-E", "-I"])
        .arg(repo().join("abi/include"))
        .arg(fixture("attributes_1_1.c"))
        .output()
        .expect("cc -E runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let preprocessed = String::from_utf8_lossy(&output.stdout);
    assert!(preprocessed.contains("abi-1.1/devhost_backend.h"), "the 1.1 fixture includes the frozen header");
    assert!(!preprocessed.contains("abi/include/devhost_backend.h"), "and not today's");

    let dir = tempfile::tempdir().expect("temp dir");
    let example = repo().join("examples/native-c/example.c");
    let c_1_0 = compile_c_with(&example, &dir.path().join("libexample_1_0.so"), &fixture("abi-1.0"), &[]);
    let c_1_1 = compile_c_with(&example, &dir.path().join("libexample_1_1.so"), &fixture("abi-1.1"), &[]);
    let attributes_1_1 = compile_c(&fixture("attributes_1_1.c"), dir.path());
    let listed = list(&[
        ("c10", module_file(&c_1_0, "", "")),
        ("c11", module_file(&c_1_1, "", "")),
        ("c11inprocess", module_file(&c_1_1, "isolation = \"none\"", "")),
        ("attributes", module_file(&attributes_1_1, "", "")),
    ]);
    for name in ["c10", "c11", "c11inprocess"] {
        let listed = backend(&listed, name);
        assert_eq!(listed["error"], Value::Null, "{name}: {listed}");
        assert_eq!(listed["resources"][0]["name"], "example.com/native-c", "{name}: {listed}");
        for device in listed["resources"][0]["devices"].as_array().expect("devices") {
            assert!(device.get("consumes").is_none() && device.get("shared").is_none(), "{name}: {device}");
        }
    }
    let attributes = backend(&listed, "attributes");
    assert_eq!(attributes["error"], Value::Null, "{attributes}");
    assert_eq!(attributes["resources"][0]["devices"][0]["capacities"]["example.com/memory"], "80Gi", "{attributes}");
}
