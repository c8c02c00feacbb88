//! `devhost demo --dra`: the same demo backend, its GPUs served through
//! Dynamic Resource Allocation, with the fake kubelet (plugin watcher and
//! device plugin side) and the fake API server in one process. It shows
//! what DRA adds: the driver registered through the plugin watcher, the
//! ResourceSlice the scheduler reads, a claim prepared into a CDI spec, a
//! health change on the kubelet's stream and in the slice, unprepare.

use std::path::Path;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{DemoNode, GPU, LICENSE, WAIT, step};
use crate::config::{HostConfig, Overrides};
use crate::fake_apiserver::FakeApiServer;
use crate::fake_kubelet::{FakeKubelet, FakePluginWatcher, KUBELET_1_36};
use crate::proto::dra::health::HealthStatus;

const DRIVER: &str = "gpu.example.com";
const NODE: &str = "demo-node";

/// What the demo backend's GPUs are, for the slice (DRA publishes them).
const GPU_ATTRIBUTES: &str = "attributes = { model = \"demo-9000\", driverVersion = { version = \"1.2.0\" } }\ncapacities = { memory = \"16Gi\" }\n";

pub(super) async fn demo() -> anyhow::Result<()> {
    let node = DemoNode::new("devhost-demo-dra-")?;
    let DemoNode { root, plugin_dir, config_dir, state_dir } = &node;
    let backend_text = node.backend_text().replace("health_path = ", &format!("{GPU_ATTRIBUTES}health_path = "))
        + "\n[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    let backend_file = config_dir.join("backends.d/demo.toml");
    std::fs::write(&backend_file, backend_text)?;

    let server = FakeApiServer::start().await?;
    server.add_node(NODE);
    let kubeconfig = root.path().join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, server.kubeconfig())?;

    println!(
        "devhost demo --dra: devhost, a fake kubelet and a fake API server in one process, under {}.",
        root.path().display()
    );
    println!("Nothing here touches this machine's kubelet, cluster or devices.\n");
    println!("The backend is the demo's `static` one ({}), with one line more:", backend_file.display());
    println!("   [resources.\"{GPU}\"] api = \"dra\"");
    println!("so {GPU} is served through DRA as driver {DRIVER}, and {LICENSE} stays a device plugin.");

    let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_36).await?;
    let kubelet = FakeKubelet::start(plugin_dir).await?;
    let mut config =
        HostConfig::defaults(config_dir, &Overrides { plugin_dir: Some(plugin_dir.clone()), kubelet_socket: None });
    config.pod_resources.socket = None;
    config.metrics_address = None;
    config.cdi_dir = root.path().join("cdi");
    config.cdi_runtime_dirs = Vec::new();
    config.dra.kubelet_root = root.path().to_owned();
    config.dra.node_name = Some(NODE.to_owned());
    config.dra.kubeconfig = Some(kubeconfig);
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { crate::daemon::run(&config, shutdown).await }
    });

    step(
        1,
        "Registration through the plugin watcher",
        "a DRA driver puts a registration socket into the kubelet's plugins_registry directory; the kubelet \
         asks it who it is and which API versions it speaks, then dials its service socket:",
    );
    let registration =
        watcher.wait_for_driver(DRIVER, std::time::Duration::from_secs(20)).await.map_err(anyhow::Error::msg)?;
    println!(
        "   driver {DRIVER}: service {}, health stream: {}",
        registration.endpoint.display(),
        match registration.health {
            Some(api) => format!("{api:?} (what a 1.36 kubelet opens on every DRA plugin)"),
            None => "none".to_owned(),
        }
    );
    println!("   the kubelet chose {} (devhost also speaks v1beta1, for 1.32 and 1.33)", registration.service);
    kubelet.wait_for_registrations(LICENSE, 1, WAIT).await?;
    println!("   {LICENSE} registered on kubelet.sock as a device plugin, as before");

    step(
        2,
        "The ResourceSlice",
        "the scheduler allocates from ResourceSlices, which the driver publishes on the API server: one pool \
         per node, each device with the attributes and capacities the backend reports (claims select on them):",
    );
    let slice = wait_for_slice(&server, |devices| devices.len() == 2).await?;
    print_slice(&slice);

    step(
        3,
        "A claim prepared",
        "a pod's ResourceClaim was allocated gpu-0 by the scheduler. When the pod lands on this node, the \
         kubelet asks the driver to prepare the claim: devhost reads the claim, calls the backend's allocate \
         (the same call the device plugin's Allocate makes) and writes a CDI spec for the claim, which the \
         container runtime applies:",
    );
    server.put_claim(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "default", "name": "training-gpu", "uid": "4f2c9a1e-demo"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0"}
        ]}}},
    }));
    let claim = [("default", "4f2c9a1e-demo", "training-gpu")];
    let answer = watcher.prepare(DRIVER, &claim).await.map_err(anyhow::Error::msg)?;
    let prepared = answer.claims.get("4f2c9a1e-demo").ok_or_else(|| anyhow::anyhow!("no answer for the claim"))?;
    anyhow::ensure!(prepared.error.is_empty(), "prepare failed: {}", prepared.error);
    for device in &prepared.devices {
        println!(
            "   request {:?}: device {} → CDI {}",
            device.request_names.join(","),
            device.device_name,
            device.cdi_device_ids.join(", ")
        );
    }
    let spec_file = config.cdi_dir.join(format!("devhost-{DRIVER}-claim-4f2c9a1e-demo.json"));
    print_cdi_edits(&spec_file)?;
    let again = watcher.prepare(DRIVER, &claim).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(again.claims.get("4f2c9a1e-demo") == Some(prepared), "a repeated prepare answered differently");
    println!("   asked again (as a restarted kubelet does): the same answer, from devhost's checkpoint");

    step(
        4,
        "A health change",
        "the demo removes gpu-1's health file. The kubelet hears it at once on the driver's health stream; the \
         slice is published again without gpu-1, so the scheduler allocates it to no new claim:",
    );
    let mut health = watcher.watch_health(DRIVER).await.map_err(anyhow::Error::msg)?;
    std::fs::remove_file(state_dir.join("gpu-1.ok"))?;
    loop {
        let message = tokio::time::timeout(WAIT, health.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the health stream ended"))??;
        let gpu1 = message.devices.iter().find(|d| d.device.as_ref().is_some_and(|id| id.device_name == "gpu-1"));
        if let Some(device) = gpu1.filter(|d| d.health == HealthStatus::Unhealthy as i32) {
            println!(
                "   health stream: gpu-1 Unhealthy ({})",
                if device.message.is_empty() { "no reason given" } else { &device.message }
            );
            break;
        }
    }
    let slice = wait_for_slice(&server, |devices| devices.len() == 1).await?;
    print_slice(&slice);

    step(5, "Unprepare", "the pod is gone; the kubelet asks the driver to unprepare the claim:");
    let undone = watcher.unprepare(DRIVER, &claim).await.map_err(anyhow::Error::msg)?;
    let error = undone.claims.get("4f2c9a1e-demo").map(|c| c.error.clone()).unwrap_or_default();
    anyhow::ensure!(error.is_empty(), "unprepare failed: {error}");
    println!(
        "   claim unprepared; its CDI spec is {}",
        if spec_file.exists() { "still there (unexpected)" } else { "removed" }
    );

    shutdown.cancel();
    daemon.await??;
    kubelet.stop().await;
    watcher.stop();
    step(6, "Shutdown", "devhost stopped and removed its sockets; the slices stay for the next devhost to adopt.");
    println!("\nOn a cluster (Kubernetes 1.34+): set api = \"dra\" for the resource in its backends.d file, and see");
    println!("examples/dra/ for a DeviceClass, a ResourceClaimTemplate and a Pod, and the operator guide.");
    Ok(())
}

/// The driver's one slice, once its devices satisfy `ready`.
async fn wait_for_slice(server: &FakeApiServer, ready: impl Fn(&[Value]) -> bool) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let slice = server.slices().into_values().find(|slice| slice["spec"]["driver"] == DRIVER);
        if let Some(slice) = slice
            && ready(slice["spec"]["devices"].as_array().map_or(&[][..], Vec::as_slice))
        {
            return Ok(slice);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the ResourceSlice was not published in time");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn print_slice(slice: &Value) {
    let spec = &slice["spec"];
    println!(
        "   ResourceSlice {}: node {}, pool {} generation {}",
        slice["metadata"]["name"].as_str().unwrap_or_default(),
        spec["nodeName"].as_str().unwrap_or_default(),
        spec["pool"]["name"].as_str().unwrap_or_default(),
        spec["pool"]["generation"]
    );
    for device in spec["devices"].as_array().into_iter().flatten() {
        let attributes: Vec<String> = device["attributes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, value)| {
                let shown = value.as_object().and_then(|kind| kind.values().next()).unwrap_or(value);
                format!("{name}={}", shown.as_str().map_or_else(|| shown.to_string(), str::to_owned))
            })
            .collect();
        let capacity: Vec<String> = device["capacity"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, value)| format!("{name}={}", value["value"].as_str().unwrap_or_default()))
            .collect();
        println!(
            "   {:<8} {} {}",
            device["name"].as_str().unwrap_or_default(),
            attributes.join(" "),
            capacity.join(" ")
        );
    }
}

fn print_cdi_edits(file: &Path) -> anyhow::Result<()> {
    let spec: Value = serde_json::from_slice(&std::fs::read(file)?)?;
    println!("   CDI spec {} (kind {}):", file.display(), spec["kind"].as_str().unwrap_or_default());
    for device in spec["devices"].as_array().into_iter().flatten() {
        let edits = &device["containerEdits"];
        for env in edits["env"].as_array().into_iter().flatten() {
            println!("      environment  {}", env.as_str().unwrap_or_default());
        }
        for node in edits["deviceNodes"].as_array().into_iter().flatten() {
            println!(
                "      device node  {}, seen in the container as {}",
                node["hostPath"].as_str().unwrap_or_default(),
                node["path"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}
