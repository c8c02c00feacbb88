//! DRA figures through the real binary: claims prepared as the kubelet asks
//! (through the fake plugin watcher's client, over the driver's socket),
//! with the fake API server on loopback; ResourceSlices published for
//! 1,000 devices; and the API server's write rate while a device flaps.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devhost::fake_apiserver::FakeApiServer;
use devhost::fake_kubelet::{FakePluginWatcher, KUBELET_1_37};
use serde_json::{Value, json};

use super::{Node, Table, WAIT, dist, ms, scaled, static_file};

/// `static_file`'s resource, served through DRA, and its default driver.
const RESOURCE: &str = "bench.example.com/r0";
const DRIVER: &str = "r0.bench.example.com";
const PREPARES: usize = 500;
const BATCHES: usize = 200;
const FLAP_FOR: Duration = Duration::from_secs(60);
const FLAP_EVERY: Duration = Duration::from_millis(10);

/// A node whose devhost serves `backend` (a backends.d file) through DRA,
/// with the fake API server and plugin watcher.
struct DraNode {
    node: Node,
    server: FakeApiServer,
    watcher: FakePluginWatcher,
}

impl DraNode {
    async fn new(backend: &str) -> Result<DraNode> {
        let node = Node::new()?;
        let server = FakeApiServer::start().await?;
        server.add_node("node-a");
        let root = node.dir.path();
        let kubeconfig = root.join("kubeconfig.yaml");
        std::fs::write(&kubeconfig, server.kubeconfig())?;
        std::fs::write(
            root.join("config/devhost.toml"),
            format!(
                "call_timeout_ms = 5000\nmetrics_address = \"\"\ncdi_dir = {:?}\n[pod_resources]\nsocket = \"\"\n\
                 [dra]\nnode_name = \"node-a\"\nkubeconfig = {:?}\n",
                root.join("cdi"),
                kubeconfig
            ),
        )?;
        node.backend("dra", &format!("{backend}[resources.{RESOURCE:?}]\napi = \"dra\"\n"))?;
        // The kubelet root is the plugin directory's parent.
        let watcher = FakePluginWatcher::start(root, KUBELET_1_37).await?;
        Ok(DraNode { node, server, watcher })
    }

    /// Devices in the driver's slices.
    fn published(&self) -> usize {
        self.server
            .slices()
            .values()
            .filter(|slice| slice["spec"]["driver"] == DRIVER)
            .map(|slice| slice["spec"]["devices"].as_array().map_or(0, Vec::len))
            .sum()
    }

    async fn until_published(&self, devices: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.published() != devices {
            ensure!(Instant::now() < deadline, "{devices} devices never published (now {})", self.published());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Prepares `claims` (uid, name) and checks every answer.
    async fn prepare(&self, claims: &[(String, String)]) -> Result<()> {
        let claims: Vec<(&str, &str, &str)> =
            claims.iter().map(|(uid, name)| ("bench", uid.as_str(), name.as_str())).collect();
        let answer = self.watcher.prepare(DRIVER, &claims).await.map_err(anyhow::Error::msg)?;
        for (_, uid, _) in &claims {
            let claim = answer.claims.get(*uid).with_context(|| format!("no answer for {uid}"))?;
            if !claim.error.is_empty() {
                bail!("claim {uid}: {}", claim.error);
            }
        }
        Ok(())
    }
}

/// A claim allocated `device` of the driver, as the scheduler leaves it.
fn claim(uid: &str, device: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "bench", "name": uid, "uid": uid},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": "node-a", "device": device}
        ]}}},
    })
}

pub(super) async fn dra(table: &mut Table) -> Result<()> {
    prepare(table).await?;
    publish_1000(table).await?;
    flapping(table).await
}

async fn prepare(table: &mut Table) -> Result<()> {
    let mut dra = DraNode::new(&static_file(1, 8, "")).await?;
    let started = Instant::now();
    dra.node.start()?;
    dra.watcher.wait_for_driver(DRIVER, WAIT).await.map_err(anyhow::Error::msg)?;
    let registered = started.elapsed();
    dra.until_published(8).await?;
    table.row(
        "DRA: process start → driver registered / slices published",
        format!("{} / {}", ms(registered), ms(started.elapsed())),
        "8 devices; the plugin watcher scans every 50 ms, so registration includes up to 50 ms of its wait",
    );

    // One claim a call: each new (the claim is read, allocate called, its
    // CDI spec and the checkpoint written), then each again (answered
    // from the checkpoint).
    let mut fresh = Vec::new();
    let mut uids = Vec::new();
    for i in 0..scaled(PREPARES) {
        let uid = format!("one-{i}");
        dra.server.put_claim(claim(&uid, &format!("d-{}", i % 8)));
        let started = Instant::now();
        dra.prepare(&[(uid.clone(), uid.clone())]).await?;
        fresh.push(started.elapsed());
        uids.push(uid);
    }
    let mut repeated = Vec::new();
    for uid in &uids {
        let started = Instant::now();
        dra.prepare(&[(uid.clone(), uid.clone())]).await?;
        repeated.push(started.elapsed());
    }
    table.row(
        "DRA NodePrepareResources, 1 claim",
        dist(&fresh),
        format!("{} claims, each new: ResourceClaim read from the API server (loopback), allocate, CDI spec and checkpoint written (fsync)", fresh.len()),
    );
    table.row(
        "DRA NodePrepareResources, 1 claim prepared before",
        dist(&repeated),
        "the kubelet's repeat: answered from the checkpoint, no API server or backend call (each call here dials the socket anew)",
    );

    let mut batches = Vec::new();
    for b in 0..scaled(BATCHES) {
        let claims: Vec<(String, String)> = (0..8)
            .map(|c| {
                let uid = format!("batch-{b}-{c}");
                dra.server.put_claim(claim(&uid, &format!("d-{c}")));
                (uid.clone(), uid)
            })
            .collect();
        let started = Instant::now();
        dra.prepare(&claims).await?;
        batches.push(started.elapsed());
    }
    table.row(
        "DRA NodePrepareResources, 8 claims a call",
        dist(&batches),
        format!(
            "{} calls of 8 new claims (prepared one after another, recorded with one checkpoint write a call)",
            batches.len()
        ),
    );
    Ok(())
}

async fn publish_1000(table: &mut Table) -> Result<()> {
    let mut dra = DraNode::new(&static_file(1, 1_000, "")).await?;
    let started = Instant::now();
    dra.node.start()?;
    dra.until_published(1_000).await?;
    let slices = dra.server.slices().len();
    table.row(
        "DRA: process start → 1,000 devices published",
        ms(started.elapsed()),
        format!("{slices} ResourceSlices (128 devices each at most), created through kube-rs on the fake API server"),
    );
    Ok(())
}

async fn flapping(table: &mut Table) -> Result<()> {
    let node_dir = tempfile::tempdir()?;
    let flag = node_dir.path().join("d-0.ok");
    std::fs::write(&flag, "")?;
    let backend = format!(
        "[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 2\n[[config.resource]]\nname = {RESOURCE:?}\n\
         [[config.resource.device]]\nid = \"d-0\"\nhealth_path = {:?}\n[[config.resource.device]]\nid = \"d-1\"\n",
        flag.display().to_string()
    );
    let mut dra = DraNode::new(&backend).await?;
    dra.node.start()?;
    dra.until_published(2).await?;
    let writes = |server: &FakeApiServer| server.requests().iter().filter(|r| r.is_slice_write()).count();
    let before = writes(&dra.server);
    let flaps = scaled(usize::try_from(FLAP_FOR.as_millis() / FLAP_EVERY.as_millis()).unwrap_or(6_000));
    let started = Instant::now();
    for i in 0..flaps {
        if i % 2 == 0 {
            std::fs::remove_file(&flag)?;
        } else {
            std::fs::write(&flag, "")?;
        }
        tokio::time::sleep(FLAP_EVERY).await;
    }
    let elapsed = started.elapsed();
    let written = writes(&dra.server) - before;
    table.row(
        "DRA: API-server writes while one device flaps every 10 ms",
        format!("{:.2} writes/s", written as f64 / elapsed.as_secs_f64()),
        format!("{flaps} health changes in {:.1} s: {written} slice writes (one slice; the publisher allows one round a second)", elapsed.as_secs_f64()),
    );
    Ok(())
}
