//! ABI 1.1 end to end, with real shared libraries: a 1.1 module's typed
//! attributes and capacities reach `devhost list`, through a worker process
//! and in devhost's own process alike; the host drives its `poll` and its
//! `release`; broken attributes and a release flag without the function are
//! refused naming what is wrong; a module of a future minor (1.9) loads.
//! 1.0 modules are covered by the existing tests, and by the C example built
//! against the frozen 1.0 header (`native_loader.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devhost::backend::handle::BackendHandle;
use devhost::config::parse_backend;
use devhost::fake_kubelet::FakeKubelet;
use tokio_util::sync::CancellationToken;

use crate::harness::{Node, WAIT, repo};
use crate::native_loader::{compile_c, compile_c_with};

const GPU: &str = "fixture.example.com/gpu";

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/native").join(name)
}

/// A backends.d file for `module` with `[backend]` and `[config]` lines.
fn module_file(module: &Path, backend: &str, config: &str) -> String {
    format!("[backend]\nmodule = {:?}\n{backend}\n[config]\n{config}\n", module.display().to_string())
}

/// `devhost list --json` on a config directory holding `files`.
pub(crate) fn list(files: &[(&str, String)]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let backends = dir.path().join("backends.d");
    std::fs::create_dir_all(&backends).expect("backends.d");
    for (name, text) in files {
        std::fs::write(backends.join(format!("{name}.toml")), text).expect("write backend file");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(dir.path())
        .output()
        .expect("run devhost list");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("devhost list --json printed no JSON ({error}): {}", String::from_utf8_lossy(&output.stderr))
    })
}

fn backend<'a>(listed: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    listed.as_array().expect("a list").iter().find(|b| b["backend"] == name).expect("the backend is listed")
}

#[test]
fn attributes_of_a_1_1_module_reach_devhost_list_from_a_worker_and_in_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("attributes_1_1.c"), dir.path());
    let listed = list(&[
        ("isolated", module_file(&module, "", "")),
        ("inprocess", module_file(&module, "isolation = \"none\"", "")),
    ]);
    for name in ["isolated", "inprocess"] {
        let backend = backend(&listed, name);
        assert_eq!(backend["error"], serde_json::Value::Null, "{name}: {backend}");
        let resource = &backend["resources"][0];
        assert_eq!(resource["name"], GPU);
        assert_eq!(
            resource["devices"][1],
            serde_json::json!({
                "id": "fixture-1",
                "health": "Healthy",
                "numa_nodes": [1],
                "attributes": {
                    "example.com/model": {"string": "fixture-9000"},
                    "driverVersion": {"version": "550.54.15"},
                    "example.com/index": {"int": 1},
                    "example.com/mig": {"bool": true},
                    "example.com/polls": {"int": 0},
                },
                "capacities": {"example.com/memory": "40Gi"},
            }),
            "{name}"
        );
        assert_eq!(resource["devices"][0]["capacities"]["example.com/memory"], "80Gi", "{name}");
    }
}

#[test]
fn broken_attributes_and_a_release_flag_without_release_are_refused_naming_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("attributes_1_1.c"), dir.path());
    let no_release = compile_c_with(
        &fixture("attributes_1_1.c"),
        &dir.path().join("libno_release.so"),
        &repo().join("abi/include"),
        &["-DNO_RELEASE"],
    );
    let listed = list(&[
        ("badversion", module_file(&module, "", "bad_version = true")),
        ("norelease", module_file(&no_release, "", "")),
    ]);
    let error = backend(&listed, "badversion")["error"].as_str().expect("refused").to_owned();
    assert!(
        error.contains(
            "resource \"fixture.example.com/gpu\": device \"fixture-0\": attribute \"driverVersion\": version \"12.4\" is not a semantic version"
        ),
        "{error}"
    );
    let error = backend(&listed, "norelease")["error"].as_str().expect("refused").to_owned();
    assert!(
        error.ends_with(
            "resource \"fixture.example.com/gpu\" asks for release (DEVHOST_RESOURCE_RELEASE) but DevhostBackendApi.release is NULL"
        ),
        "{error}"
    );
}

#[test]
fn a_module_of_a_future_minor_loads_and_serves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("future_minor.c"), dir.path());
    let listed = list(&[("future", module_file(&module, "", ""))]);
    let backend = backend(&listed, "future");
    assert_eq!(backend["error"], serde_json::Value::Null, "{backend}");
    assert_eq!(
        backend["resources"][0]["devices"],
        serde_json::json!([{"id": "f-0", "health": "Healthy", "numa_nodes": []}])
    );
}

/// The host polls a 1.1 module on its `poll_interval_ms`: the fixture
/// flips fixture-0 at every poll, and the kubelet sees both states, with
/// the module in a worker process (the default).
#[tokio::test(flavor = "multi_thread")]
async fn the_host_drives_poll_and_the_kubelet_sees_what_it_publishes() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = compile_c(&fixture("attributes_1_1.c"), &modules);
    node.backend("gpu", &module_file(&module, "poll_interval_ms = 50", "flip = true"));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    for health in ["Unhealthy", "Healthy"] {
        kubelet
            .wait_for_devices(GPU, WAIT, |d| d.iter().any(|d| d.id == "fixture-0" && d.health == health))
            .await
            .unwrap_or_else(|error| panic!("fixture-0 never {health}: {error}"));
    }
}

/// `release` reaches the module, in a worker process and in devhost's own,
/// with the resource and the IDs, and `poll` is called on the interval.
#[tokio::test(flavor = "multi_thread")]
async fn release_and_poll_reach_the_module_wherever_it_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("attributes_1_1.c"), dir.path());
    // Workers re-execute devhost, not this test binary.
    devhost::worker::set_executable(env!("CARGO_BIN_EXE_devhost").into());
    for isolation in ["process", "none"] {
        let log = dir.path().join(format!("release-{isolation}.log"));
        let file = dir.path().join(format!("{isolation}.toml"));
        let text = module_file(
            &module,
            &format!("isolation = {isolation:?}"),
            &format!("release_log = {:?}", log.display().to_string()),
        );
        let config = parse_backend(&file, &text, Duration::from_secs(5)).expect("a valid backend file");
        assert_eq!(config.poll_interval, Duration::from_secs(1), "the default interval");
        let runner = devhost::loader::load(&config).await.expect("loads");
        let cancel = CancellationToken::new();
        let handle: Arc<BackendHandle> =
            BackendHandle::start(&config.name, runner, config.call_timeout, cancel.clone()).await.expect("starts");
        assert!(handle.resources()[0].0.release_required, "{isolation}: the resource asks for release");
        assert!(handle.polls(), "{isolation}: a 1.1 module with poll");
        handle.release(GPU, vec!["fixture-1".into(), "fixture-0".into()]).await.expect("release");
        assert_eq!(
            std::fs::read_to_string(&log).expect("release wrote its log"),
            format!("{GPU} fixture-1 fixture-0\n"),
            "{isolation}"
        );

        let mut states = handle.resources()[0].1.subscribe();
        handle.start_polling(Duration::from_millis(20), cancel.clone());
        let polled = tokio::time::timeout(WAIT, async {
            loop {
                states.changed().await.expect("the state lives");
                let snapshot = states.borrow_and_update().clone();
                let polls = snapshot.devices[0].attributes.get("example.com/polls");
                if matches!(polls, Some(devhost::model::AttributeValue::Int(n)) if *n >= 3) {
                    break;
                }
            }
        })
        .await;
        assert!(polled.is_ok(), "{isolation}: three polls within {WAIT:?}");
        handle.shutdown().await;
        cancel.cancel();
    }
}
