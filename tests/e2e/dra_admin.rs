//! DRA admin access (issue 28, item 4): a claim whose allocation result has
//! `adminAccess: true` (a monitoring or debug pod) names a device already
//! prepared for an ordinary claim. It is prepared too, with the device's
//! edits, but it does not hold the device and unpreparing it never calls
//! the backend's `release`; the ordinary claim's unprepare does. The flag
//! lives in the checkpoint, so a devhost restart keeps both.
//!
//! The real daemon serves the native fixture module (its `release` writes
//! what it is asked into a log file) against the project's fake API server
//! and the fake kubelet's plugin watcher, on real sockets.

use std::path::{Path, PathBuf};

use devhost::dra::checkpoint::Checkpoint;
use serde_json::{Value, json};

use crate::harness::{Node, WAIT};

const DRIVER: &str = "gpu.fixture.example.com";

/// A ResourceClaim allocated `device` for `request` through `driver`'s
/// pool on node-a, with admin access requested and allocated as the
/// scheduler leaves it (`exactly.adminAccess` on the request,
/// `adminAccess` on the result) when `admin` is set.
fn claim(namespace: &str, name: &str, uid: &str, request: &str, device: &str, admin: bool) -> Value {
    let mut exactly = json!({"deviceClassName": "gpu.fixture.example.com"});
    let mut result = json!({"request": request, "driver": DRIVER, "pool": "node-a", "device": device});
    if admin {
        exactly["adminAccess"] = json!(true);
        result["adminAccess"] = json!(true);
    }
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"devices": {"requests": [{"name": request, "exactly": exactly}]}},
        "status": {"allocation": {"devices": {"results": [result]}}},
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

struct AdminNode {
    dra: crate::dra::DraNode,
    release_log: PathBuf,
}

impl AdminNode {
    /// The native fixture module serving `fixture.example.com/gpu`
    /// (fixture-0, fixture-1) through DRA as [`DRIVER`].
    async fn start() -> AdminNode {
        let node = Node::new();
        let root = node.dir.path().to_owned();
        let modules = root.join("modules");
        std::fs::create_dir_all(&modules).expect("modules dir");
        let module = crate::native_loader::compile_c(
            &crate::harness::repo().join("tests/fixtures/native/attributes_1_1.c"),
            &modules,
        );
        let release_log = root.join("release.log");
        node.backend(
            "fixture",
            &format!(
                "[backend]\nmodule = {:?}\n[config]\nrelease_log = {:?}\n[resources.\"fixture.example.com/gpu\"]\napi = \"dra\"\n",
                module.display().to_string(),
                release_log.display().to_string(),
            ),
        );
        // No state file: the fixture's devices are always Healthy.
        let dra = crate::dra::DraNode::around(node, DRIVER, root.join("no-state")).await;
        AdminNode { dra, release_log }
    }

    fn cdi_spec(&self, uid: &str) -> PathBuf {
        self.dra.node.dir.path().join(format!("cdi/devhost-{DRIVER}-claim-{uid}.json"))
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.dra.node.dir.path().join(format!("plugins/{DRIVER}/devhost-claims.json"))
    }

    /// What the backend's `release` was asked, one line per call.
    fn releases(&self) -> String {
        std::fs::read_to_string(&self.release_log).unwrap_or_default()
    }

    /// The claims (UIDs) the checkpoint says hold `id`: what lists a
    /// device's holders asks.
    fn holders(&self, id: &str) -> Vec<String> {
        let checkpoint = Checkpoint::load(&self.checkpoint_path()).expect("checkpoint");
        checkpoint.claims.iter().filter(|(_, claim)| claim.holds(id)).map(|(uid, _)| uid.clone()).collect()
    }
}

/// The whole rule: both claims prepared on one device (the admin one with
/// the device's edits), only the ordinary one holds it, a restart keeps
/// both (answered from the checkpoint), the admin claim's unprepare calls
/// no `release` and the ordinary one's does.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_access_claim_shares_a_held_device_without_holding_or_releasing_it() {
    let admin = AdminNode::start().await;
    let mut devhost = admin.dra.node.start_devhost();
    admin.dra.watcher.wait_for_driver(DRIVER, WAIT).await.expect("the driver registers");
    admin.dra.server.put_claim(claim("ml", "train", "uid-train", "gpu", "fixture-0", false));
    admin.dra.server.put_claim(claim("monitoring", "watch", "uid-watch", "gpu", "fixture-0", true));

    // The ordinary claim first, then the admin one on the same device: it
    // is not refused for the device being prepared already.
    let train = admin.dra.prepare(&devhost, &[("ml", "uid-train", "train")]).await;
    assert_eq!(train.claims["uid-train"].error, "", "{train:?}");
    let watch = admin.dra.prepare(&devhost, &[("monitoring", "uid-watch", "watch")]).await;
    let watched = &watch.claims["uid-watch"];
    assert_eq!(watched.error, "", "{watch:?}");
    assert_eq!(watched.devices.len(), 1);
    assert_eq!(watched.devices[0].device_name, "fixture-0");
    assert_eq!(watched.devices[0].cdi_device_ids, [format!("k8s.{DRIVER}/claim=uid-watch-gpu")]);
    // The container gets the device's edits (the backend's allocate answer).
    let spec: Value = serde_json::from_str(&read(&admin.cdi_spec("uid-watch"))).expect("CDI JSON");
    crate::sharing::assert_valid_cdi(&spec);
    assert_eq!(spec["devices"][0]["containerEdits"]["env"], json!(["FIXTURE_DEVICE=fixture-0"]));

    // Recorded as admin access; only the ordinary claim holds the device.
    let text: Value = serde_json::from_str(&read(&admin.checkpoint_path())).expect("checkpoint JSON");
    assert_eq!(text["claims"]["uid-watch"]["devices"][0]["admin_access"], true, "{text}");
    assert!(text["claims"]["uid-train"]["devices"][0].get("admin_access").is_none(), "{text}");
    assert_eq!(admin.holders("fixture-0"), ["uid-train"]);
    assert!(admin.holders("fixture-1").is_empty());

    // A devhost restart: both stay prepared, answered from the checkpoint
    // (no read of either claim) with the same answers.
    devhost.stop_with(nix::sys::signal::Signal::SIGKILL).await;
    let devhost = admin.dra.node.start_another_devhost("devhost-2.log");
    let reads = admin.dra.claim_reads();
    let again =
        admin.dra.prepare(&devhost, &[("ml", "uid-train", "train"), ("monitoring", "uid-watch", "watch")]).await;
    assert_eq!(again.claims["uid-watch"], *watched, "the admin claim stays prepared");
    assert_eq!(again.claims["uid-train"], train.claims["uid-train"]);
    assert_eq!(admin.dra.claim_reads(), reads, "answered from the checkpoint");
    assert_eq!(admin.holders("fixture-0"), ["uid-train"], "still only the ordinary claim after the restart");

    // The admin claim goes: its spec goes, the backend releases nothing.
    let undone = admin.dra.watcher.unprepare(DRIVER, &[("monitoring", "uid-watch", "watch")]).await.expect("answered");
    assert_eq!(undone.claims["uid-watch"].error, "");
    assert!(!admin.cdi_spec("uid-watch").exists(), "the admin claim's CDI spec is removed");
    assert!(admin.cdi_spec("uid-train").exists(), "the holder's spec stays");
    assert_eq!(admin.releases(), "", "no release for a claim that only watched the device");
    // The operator sees which unprepare was an admin claim's.
    devhost.wait_for_log("admin_access=true").await;
    let line = devhost.log().lines().find(|l| l.contains("admin_access=true")).map(str::to_owned);
    assert!(line.as_deref().is_some_and(|l| l.contains("claim unprepared") && l.contains("uid-watch")), "{line:?}");
    let text: Value = serde_json::from_str(&read(&admin.checkpoint_path())).expect("checkpoint JSON");
    assert_eq!(text["claims"].as_object().expect("claims").keys().collect::<Vec<_>>(), ["uid-train"]);

    // The ordinary claim goes: released once, with its device.
    let undone = admin.dra.watcher.unprepare(DRIVER, &[("ml", "uid-train", "train")]).await.expect("answered");
    assert_eq!(undone.claims["uid-train"].error, "");
    assert_eq!(admin.releases(), "fixture.example.com/gpu fixture-0\n", "{}", devhost.log());
    assert!(!admin.cdi_spec("uid-train").exists());
}
