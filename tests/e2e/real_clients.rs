//! Every socket devhost serves, called by a gRPC implementation its
//! authors did not write: Python `grpcio` (gRPC C-core), with its default
//! `:authority` for a `unix:` target, the percent-encoded socket path, as
//! the kubelet's plugin watcher sends it (issue 24). A device-plugin
//! socket, the DRA registration socket, the DRA service socket with both
//! health versions: each call must be answered by devhost itself, not
//! refused by the HTTP/2 layer.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::dra::{DraNode, GPU_DRIVER, claim};
use crate::harness::{Missing, WAIT, repo, skip};

/// The virtual environment `scripts/setup` installs grpcio into.
fn python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let python = target.join("grpc-client/venv/bin/python");
    if python.exists() {
        Some(python)
    } else {
        skip(Missing::Setup, &format!("no grpcio client at {} (scripts/setup installs it)", python.display()));
        None
    }
}

/// The one file in `dir` whose name starts with `prefix` and ends with
/// `suffix`.
fn socket_in(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    assert_eq!(found.len(), 1, "one {prefix}*{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().expect("one")
}

/// Runs the grpcio client with `calls`; its answers by RPC name.
fn grpcio(python: &Path, calls: &[String]) -> Vec<Value> {
    let output = Command::new(python)
        .arg(repo().join("tests/e2e/grpc_client.py"))
        .arg(repo().join("proto"))
        .args(calls)
        .output()
        .expect("run the grpcio client");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpcio client failed: {stderr}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}; stderr: {stderr}")))
        .collect()
}

fn answer<'a>(lines: &'a [Value], rpc: &str) -> &'a Value {
    let line = lines.iter().find(|line| line["rpc"] == rpc).unwrap_or_else(|| panic!("no {rpc} in {lines:?}"));
    assert_eq!(line["ok"], true, "{rpc} failed through grpcio: {}", line["error"]);
    &line["answer"]
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_with_its_default_authority_is_answered_on_every_socket() {
    let Some(python) = python() else { return };
    let dra = DraNode::start().await;
    dra.server.put_claim(claim("grpcio", "uid-grpcio", &[("gpus", "node-a", "gpu-0")]));
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("registered through the fake plugin watcher");
    dra.kubelet.wait_for_registrations("example.com/nic", 1, WAIT).await.expect("nic registered");

    let root = dra.node.dir.path();
    let device_plugin = socket_in(&dra.node.plugin_dir(), "devhost-example.com_nic-", ".sock");
    let registration = socket_in(&root.join("plugins_registry"), "gpu.example.com-", "-reg.sock");
    let service = socket_in(&root.join(format!("plugins/{GPU_DRIVER}")), "dra-", ".sock");
    let python_for_thread = python.clone();
    let lines = tokio::task::spawn_blocking(move || {
        grpcio(
            &python_for_thread,
            &[
                format!("device-plugin:{}:nic-0", device_plugin.display()),
                format!("registration:{}", registration.display()),
                format!("dra:{}:uid-grpcio", service.display()),
            ],
        )
    })
    .await
    .expect("client thread");

    // The device-plugin socket: all of devhost's answers.
    answer(&lines, "GetDevicePluginOptions");
    assert_eq!(answer(&lines, "ListAndWatch")["devices"][0]["ID"], "nic-0");
    let allocated = &answer(&lines, "Allocate")["containerResponses"][0];
    assert_eq!(allocated["envs"]["IDS"], "nic-0", "the backend's answer: {allocated}");
    assert_eq!(answer(&lines, "GetPreferredAllocation")["containerResponses"][0]["deviceIDs"], json!(["nic-0"]));

    // The registration socket: who the driver is.
    let info = answer(&lines, "GetInfo");
    assert_eq!(info["type"], "DRAPlugin");
    assert_eq!(info["name"], GPU_DRIVER);
    answer(&lines, "NotifyRegistrationStatus");

    // The DRA service socket: the claim prepared into its CDI device, then
    // unprepared; health in both versions.
    let prepared = &answer(&lines, "NodePrepareResources")["claims"]["uid-grpcio"];
    assert_eq!(prepared.get("error"), None, "{prepared}");
    let cdi = prepared["devices"][0]["cdiDeviceIds"][0].as_str().expect("a CDI device");
    assert!(cdi.starts_with("k8s.gpu.example.com/claim="), "{cdi}");
    assert_eq!(answer(&lines, "NodeUnprepareResources")["claims"]["uid-grpcio"], json!({}));
    for version in ["v1", "v1alpha1"] {
        let health = answer(&lines, &format!("{version}.NodeWatchResources"));
        assert_eq!(health["devices"].as_array().map(Vec::len), Some(2), "{version}: {health}");
    }
    drop(devhost);
}
