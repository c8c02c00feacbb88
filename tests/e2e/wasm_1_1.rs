//! WASM world `devhost:backend@1.1.0` end to end, with real components and
//! the real host: a 1.1.0 component built on the SDK (`examples/wasm-rust`)
//! publishes typed attributes and capacities that `devhost list` shows and
//! asks for `release`, which the host calls (and which faults like every
//! other call when it traps or runs away); a component of the frozen 1.0.0
//! world, built with wit-bindgen and not the SDK
//! (`tests/fixtures/wasm/v1-0/`), loads and serves as before, with no
//! attributes, no release flag, and no `release` call reaching it; broken
//! attributes, and a component of a minor newer than this devhost runs
//! (1.3.0), are refused naming what is wrong.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devhost::backend::handle::{BackendHandle, CallError};
use devhost::config::parse_backend;
use devhost::model::AttributeValue;
use tokio_util::sync::CancellationToken;

use crate::harness::WAIT;
use crate::wasm::{component, wasm_file, wat_fixture};

const EXAMPLE: &str = "example.com/wasm-rust";
const LEGACY: &str = "example.com/legacy";

/// `devhost list --json` on a config directory holding `files`.
fn list(dir: &Path, files: &[(&str, String)]) -> serde_json::Value {
    let backends = dir.join("backends.d");
    std::fs::create_dir_all(&backends).expect("backends.d");
    for (name, text) in files {
        std::fs::write(backends.join(format!("{name}.toml")), text).expect("write backend file");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(dir)
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
fn devhost_list_shows_1_1_attributes_1_0_devices_without_them_and_names_what_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let modules = dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let cache = dir.path().join("cache");
    let example = component("devhost_example_wasm_rust", &modules);
    let legacy = component("devhost_fixture_wasm_v1_0", &modules);
    let hostile = component("devhost_fixture_wasm_hostile", &modules);
    let newer = wat_fixture("newer-minor", &modules);
    let listed = list(
        dir.path(),
        &[
            ("example", wasm_file(&example, &cache, "", "devices = 2\nrelease = true")),
            ("legacy", wasm_file(&legacy, &cache, "", "")),
            (
                "badattribute",
                wasm_file(&hostile, &cache, "", "resource = \"hostile.example.com/bad\"\nmode = \"bad-attribute\""),
            ),
            ("newer", wasm_file(&newer, &cache, "", "")),
        ],
    );

    // Every kind of attribute and a capacity cross the 1.1.0 boundary.
    let example = backend(&listed, "example");
    assert_eq!(example["error"], serde_json::Value::Null, "{example}");
    assert_eq!(example["resources"][0]["name"], EXAMPLE);
    assert_eq!(
        example["resources"][0]["devices"][1],
        serde_json::json!({
            "id": "wasm-1",
            "health": "Healthy",
            "numa_nodes": [1],
            "attributes": {
                "example.com/model": {"string": "wasm-example"},
                "example.com/firmware": {"version": "1.2.0"},
                "example.com/virtual": {"bool": true},
                "example.com/releases": {"int": 0},
            },
            "capacities": {"example.com/memory": "1Gi"},
        })
    );

    // A 1.0.0 component serves as before: its devices carry nothing more.
    let legacy = backend(&listed, "legacy");
    assert_eq!(legacy["error"], serde_json::Value::Null, "{legacy}");
    assert_eq!(
        legacy["resources"],
        serde_json::json!([{
            "name": LEGACY,
            "pre_start_required": false,
            "preferred_allocation": false,
            "devices": [
                {"id": "legacy-0", "health": "Healthy", "numa_nodes": [0]},
                {"id": "legacy-1", "health": "Healthy", "numa_nodes": [1]},
            ],
        }])
    );

    // DRA's rules apply to a component's attributes as to a module's.
    let error = backend(&listed, "badattribute")["error"].as_str().expect("refused").to_owned();
    assert!(
        error.contains(
            "resource \"hostile.example.com/bad\": device \"h0\": attribute \"driverVersion\": version \"12.4\" is not a semantic version"
        ),
        "{error}"
    );

    // A newer minor than this devhost runs: refused by name, both versions.
    assert_eq!(
        backend(&listed, "newer")["error"],
        format!(
            "{}: implements devhost:backend@1.3.0, but the newest version this devhost supports is \
             devhost:backend@1.2.0 (a newer minor version: upgrade devhost, or build the component against \
             devhost:backend@1.2.0)",
            newer.display()
        )
    );
}

/// Loads `text` (a backends.d file named `name`) and starts it in this
/// process, as the daemon does.
async fn start(dir: &Path, name: &str, text: &str, cancel: &CancellationToken) -> Arc<BackendHandle> {
    let file = dir.join(format!("{name}.toml"));
    let config = parse_backend(&file, text, Duration::from_secs(5)).expect("a valid backend file");
    let runner = devhost::loader::load(&config).await.expect("loads");
    BackendHandle::start(&config.name, runner, config.call_timeout, cancel.clone()).await.expect("starts")
}

/// The value of `attribute` on device `id` of the handle's first resource.
fn attribute(handle: &BackendHandle, id: &str, attribute: &str) -> Option<AttributeValue> {
    let snapshot = handle.resources()[0].1.snapshot();
    snapshot.devices.iter().find(|d| d.id == id)?.attributes.get(attribute).cloned()
}

/// `release` reaches a 1.1.0 component with the resource and the IDs (the
/// example counts releases per device and publishes the counts), declines
/// with the component's message, and never reaches a 1.0.0 component.
#[tokio::test(flavor = "multi_thread")]
async fn release_reaches_a_1_1_component_with_its_ids_and_never_a_1_0_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let example = component("devhost_example_wasm_rust", dir.path());
    let legacy = component("devhost_fixture_wasm_v1_0", dir.path());
    let cancel = CancellationToken::new();

    let text = wasm_file(&example, &cache, "poll_interval_ms = 20", "devices = 2\nrelease = true");
    let handle = start(dir.path(), "example", &text, &cancel).await;
    assert!(handle.resources()[0].0.release_required, "release = true: the resource asks for release");
    handle.release(EXAMPLE, vec!["wasm-1".into()]).await.expect("release");
    let released = tokio::time::timeout(WAIT, async {
        while attribute(&handle, "wasm-1", "example.com/releases") != Some(AttributeValue::Int(1)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "wasm-1's release count never reached 1: {:?}", handle.resources()[0].1.snapshot());
    assert_eq!(attribute(&handle, "wasm-0", "example.com/releases"), Some(AttributeValue::Int(0)), "only wasm-1");
    let error = handle.release("example.com/other", vec!["wasm-0".into()]).await.expect_err("declined");
    assert_eq!(error.to_string(), "backend \"example\": release failed: unknown resource \"example.com/other\"");
    assert!(matches!(error, CallError::Failed { .. }), "an err declines the request, it is no fault: {error:?}");
    handle.shutdown().await;

    let text = wasm_file(&example, &cache, "", "devices = 2");
    let handle = start(dir.path(), "norelease", &text, &cancel).await;
    assert!(!handle.resources()[0].0.release_required, "a 1.1.0 resource asks for release only when it says so");
    handle.shutdown().await;

    // A 1.0.0 component: no release flag, and `release` is answered by the
    // host without entering the component (it has no such export).
    let handle = start(dir.path(), "legacy", &wasm_file(&legacy, &cache, "", ""), &cancel).await;
    assert_eq!(handle.resources().len(), 1);
    let (spec, state) = &handle.resources()[0];
    assert_eq!((spec.name.as_str(), spec.release_required), (LEGACY, false));
    assert!(state.snapshot().devices.iter().all(|d| d.attributes.is_empty() && d.capacities.is_empty()));
    handle.release(LEGACY, vec!["legacy-0".into()]).await.expect("nothing to release in a 1.0.0 component");
    let answer = handle.allocate(LEGACY, vec!["legacy-1".into(), "legacy-0".into()]).await.expect("it serves");
    assert_eq!(answer.envs.get("LEGACY_DEVICES").map(String::as_str), Some("legacy-1,legacy-0"));
    handle.shutdown().await;
    cancel.cancel();
}

/// `release` runs under the same guards as every call into a component:
/// a trap and a runaway call are faults with their reasons.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_or_a_runaway_in_release_is_a_fault_with_its_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let hostile = component("devhost_fixture_wasm_hostile", dir.path());
    let cancel = CancellationToken::new();
    let file = |mode: &str| {
        wasm_file(&hostile, &cache, "", &format!("resource = \"hostile.example.com/{mode}\"\nmode = {mode:?}"))
            .replace("call_timeout_ms = 2000", "call_timeout_ms = 1000")
    };

    let handle = start(dir.path(), "trap", &file("trap"), &cancel).await;
    let error = handle.release("hostile.example.com/trap", vec!["h0".into()]).await.expect_err("traps");
    let message = error.to_string();
    assert!(matches!(error, CallError::Panicked { .. }), "{error:?}");
    assert!(
        message.starts_with(
            "backend \"trap\": release panicked: release trapped: wasm trap: wasm `unreachable` instruction executed; \
             its stderr: thread '<unnamed>' (1) panicked at tests/fixtures/wasm/hostile/src/lib.rs:"
        ) && message.ends_with("deliberate trap in release"),
        "{message}"
    );
    handle.shutdown().await;

    let handle = start(dir.path(), "loop", &file("loop"), &cancel).await;
    let error = handle.release("hostile.example.com/loop", vec!["h0".into()]).await.expect_err("stopped");
    // The epoch interruption at 80 % of the deadline, or, on a machine too
    // loaded to run the epoch ticker in time, the host's own deadline.
    assert!(
        [
            "backend \"loop\": release panicked: release was interrupted at its epoch deadline (800ms, 80% of call_timeout_ms 1000)",
            "backend \"loop\": release did not return within its 1s deadline",
        ]
        .contains(&error.to_string().as_str()),
        "{error}"
    );
    handle.shutdown().await;
    cancel.cancel();
}
