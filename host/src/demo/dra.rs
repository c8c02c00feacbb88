//! `devhost demo --dra`: the same demo backend, its GPUs served through
//! Dynamic Resource Allocation, with the fake kubelet (plugin watcher and
//! device plugin side) and the fake API server in one process. It shows
//! what DRA adds: the driver registered through the plugin watcher, the
//! ResourceSlice the scheduler reads, a claim prepared into a CDI spec, a
//! GPU published as overlapping partitions and a claim given one half, a
//! NIC two claims share with their own bandwidth, a health change on the
//! kubelet's stream and in the slice, unprepare. There is no scheduler:
//! the demo writes each claim's allocation itself, and says so.

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{DemoNode, GPU, LICENSE, WAIT, step};
use crate::config::{HostConfig, Overrides};
use crate::dra::slices::quantity_nanos;
use crate::fake_apiserver::FakeApiServer;
use crate::fake_kubelet::{FakeKubelet, FakePluginWatcher, KUBELET_1_36};
use crate::proto::dra::health::HealthStatus;
use crate::proto::dra::v1::NodePrepareResourceResponse;

/// The second backend file: a GPU as partitions and a shared NIC, the
/// canonical example of both.
const DRA_BACKEND: &str = include_str!("dra.toml");
const DRIVER: &str = "gpu.example.com";
const SLICED_DRIVER: &str = "sliced-gpu.example.com";
const NIC_DRIVER: &str = "nic.example.com";
const NODE: &str = "demo-node";

/// What the demo backend's GPUs are, for the slice (DRA publishes them).
const GPU_ATTRIBUTES: &str = "attributes = { model = \"demo-9000\", driverVersion = { version = \"1.2.0\" } }\ncapacities = { memory = \"16Gi\" }\n";

/// A claim as the kubelet names it: namespace, UID, name.
type ClaimRef<'a> = (&'a str, &'a str, &'a str);

pub(super) async fn demo() -> anyhow::Result<()> {
    let node = DemoNode::new("devhost-demo-dra-")?;
    let DemoNode { root, plugin_dir, config_dir, state_dir } = &node;
    let backend_text = node.backend_text().replace("health_path = ", &format!("{GPU_ATTRIBUTES}health_path = "))
        + "\n[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    let backend_file = config_dir.join("backends.d/demo.toml");
    std::fs::write(&backend_file, backend_text)?;
    let dra_file = config_dir.join("backends.d/demo-dra.toml");
    std::fs::write(&dra_file, DRA_BACKEND)?;

    let server = FakeApiServer::start().await?;
    server.add_node(NODE);
    let kubeconfig = root.path().join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, server.kubeconfig())?;

    println!(
        "devhost demo --dra: devhost, a fake kubelet and a fake API server in one process, under {}.",
        root.path().display()
    );
    println!("Nothing here touches this machine's kubelet, cluster or devices. There is no scheduler either:");
    println!("the demo plays its part and writes each claim's allocation itself.\n");
    println!("The backend is the demo's `static` one ({}), with one line more:", backend_file.display());
    println!("   [resources.\"{GPU}\"] api = \"dra\"");
    println!("so {GPU} is served through DRA as driver {DRIVER}, and {LICENSE} stays a device plugin.");
    println!("A second file ({}) declares what only DRA can express:", dra_file.display());
    println!("   example.com/sliced-gpu  one GPU as overlapping partitions (driver {SLICED_DRIVER})");
    println!("   example.com/nic         one NIC that claims share (driver {NIC_DRIVER})");

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
    let spec_file = |driver: &str, uid: &str| config.cdi_dir.join(format!("devhost-{driver}-claim-{uid}.json"));

    step(
        1,
        "Registration through the plugin watcher",
        "a DRA driver puts a registration socket into the kubelet's plugins_registry directory; the kubelet \
         asks it who it is and which API versions it speaks, then dials its service socket:",
    );
    let registration = watcher.wait_for_driver(DRIVER, WAIT).await.map_err(anyhow::Error::msg)?;
    println!(
        "   driver {DRIVER}: service {}, health stream: {}",
        registration.endpoint.display(),
        match registration.health {
            Some(api) => format!("{api:?} (what a 1.36 kubelet opens on every DRA plugin)"),
            None => "none".to_owned(),
        }
    );
    println!("   the kubelet chose {} (devhost also speaks v1beta1, for 1.32 and 1.33)", registration.service);
    for driver in [SLICED_DRIVER, NIC_DRIVER] {
        watcher.wait_for_driver(driver, WAIT).await.map_err(anyhow::Error::msg)?;
    }
    println!("   drivers {SLICED_DRIVER} and {NIC_DRIVER} registered the same way");
    kubelet.wait_for_registrations(LICENSE, 1, WAIT).await?;
    println!("   {LICENSE} registered on kubelet.sock as a device plugin, as before");

    step(
        2,
        "The ResourceSlice",
        "the scheduler allocates from ResourceSlices, which the driver publishes on the API server: one pool \
         per node, each device with the attributes and capacities the backend reports (claims select on them):",
    );
    print_slices(&wait_for_slices(&server, DRIVER, |slices| devices(slices).count() == 2).await?);

    step(
        3,
        "A claim prepared",
        "a pod's ResourceClaim was allocated gpu-0 (by the demo, in the scheduler's place). When the pod lands \
         on this node, the kubelet asks the driver to prepare the claim: devhost reads the claim, calls the \
         backend's allocate (the same call the device plugin's Allocate makes) and writes a CDI spec for the \
         claim, which the container runtime applies:",
    );
    let result = json!({"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0"});
    server.put_claim(claim(
        "training-gpu",
        "4f2c9a1e-demo",
        json!({"name": "gpu", "exactly": {"deviceClassName": DRIVER}}),
        result,
    ));
    let gpu_claim = ("default", "4f2c9a1e-demo", "training-gpu");
    let prepared = prepare(&watcher, DRIVER, gpu_claim).await?;
    print_prepared(&prepared, "");
    print_cdi_edits(&spec_file(DRIVER, gpu_claim.1))?;
    let again = watcher.prepare(DRIVER, &[gpu_claim]).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(again.claims.get(gpu_claim.1) == Some(&prepared), "a repeated prepare answered differently");
    println!("   asked again (as a restarted kubelet does): the same answer, from devhost's checkpoint");

    step(
        4,
        "A GPU in partitions",
        "example.com/sliced-gpu publishes gpu-2 three ways: whole and as two halves. The counter set gpu-2 \
         (in a slice of its own) is what the GPU has; each partition consumes from it, so the scheduler never \
         gives out partitions that together need more:",
    );
    let pool = wait_for_slices(&server, SLICED_DRIVER, |slices| {
        devices(slices).count() == 3 && slices.iter().any(|s| s["spec"].get("sharedCounters").is_some())
    })
    .await?;
    print_slices(&pool);
    println!("   The demo, as the scheduler, gives claim inference-half gpu-2-half-1. Counters left in gpu-2:");
    let used = consumed(device(&pool, "gpu-2-half-1")?);
    for other in ["gpu-2-half-0", "gpu-2"] {
        let fits = fits_beside(&pool, &used, device(&pool, other)?)?;
        println!("      {other:<13}{}", if fits { "still fits" } else { "no longer fits" });
    }
    let result = json!({"request": "gpu", "driver": SLICED_DRIVER, "pool": NODE, "device": "gpu-2-half-1"});
    let request = json!({"name": "gpu", "exactly": {"deviceClassName": SLICED_DRIVER}});
    server.put_claim(claim("inference-half", "7d3e5b2a-demo", request, result));
    let half_claim = ("default", "7d3e5b2a-demo", "inference-half");
    println!("   Prepared, the container gets that half and its memory:");
    print_prepared(&prepare(&watcher, SLICED_DRIVER, half_claim).await?, "");
    print_container_edits(&spec_file(SLICED_DRIVER, half_claim.1))?;

    step(
        5,
        "A shared NIC",
        "example.com/nic publishes nic-0 with allowMultipleAllocations: several claims may hold it at once, \
         each consuming part of its bandwidth (rounded by the request policy):",
    );
    let pool = wait_for_slices(&server, NIC_DRIVER, |slices| devices(slices).count() == 1).await?;
    print_slices(&pool);
    let shares = [
        ("web", "c3a7e1d2-demo", "a1d5c3e0-5b7f-4c2a-9e14-3f6b8d2c7a10", "10G"),
        ("batch", "e8b4f6a9-demo", "b7e9f2a4-1c3d-4e8f-a05b-6d4c2e1f9b38", "5G"),
    ];
    let amounts: Vec<&str> = shares.iter().map(|share| share.3).collect();
    let capacity = device(&pool, "nic-0")?["capacity"]["bandwidth"]["value"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(
        within(&amounts, &capacity),
        "the demo's shares ({}) exceed nic-0's bandwidth {capacity}",
        amounts.join(" + ")
    );
    println!(
        "   The demo, as the scheduler, allocates nic-0 twice, {}",
        shares.iter().map(|(name, _, _, amount)| format!("{amount} to claim {name}")).collect::<Vec<_>>().join(" and ")
    );
    println!("   (within its {capacity} together), each with its own shareID. devhost prepares each claim on its own:");
    for (name, uid, share, amount) in shares {
        let request = json!({"name": "net", "exactly": {"deviceClassName": NIC_DRIVER,
            "capacity": {"requests": {"bandwidth": amount}}}});
        let result = json!({"request": "net", "driver": NIC_DRIVER, "pool": NODE, "device": "nic-0",
            "shareID": share, "consumedCapacity": {"bandwidth": amount}});
        server.put_claim(claim(name, uid, request, result));
        print_prepared(&prepare(&watcher, NIC_DRIVER, ("default", uid, name)).await?, &format!("claim {name}: "));
        print_container_edits(&spec_file(NIC_DRIVER, uid))?;
    }
    let (web, batch) = (&shares[0], &shares[1]);
    unprepare(&watcher, NIC_DRIVER, ("default", web.1, web.0), &spec_file(NIC_DRIVER, web.1)).await?;
    let batch_spec = std::fs::read_to_string(spec_file(NIC_DRIVER, batch.1))?;
    anyhow::ensure!(
        batch_spec.contains(&format!("EXAMPLE_NIC_BANDWIDTH={}", batch.3)),
        "unpreparing claim {} changed claim {}'s CDI spec: {batch_spec}",
        web.0,
        batch.0
    );
    println!("   claim {}'s share is untouched: its CDI spec still gives EXAMPLE_NIC_BANDWIDTH={}", batch.0, batch.3);

    step(
        6,
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
    print_slices(&wait_for_slices(&server, DRIVER, |slices| devices(slices).count() == 1).await?);

    step(7, "Unprepare", "the pods are gone; the kubelet asks each driver to unprepare their claims:");
    unprepare(&watcher, DRIVER, gpu_claim, &spec_file(DRIVER, gpu_claim.1)).await?;
    unprepare(&watcher, SLICED_DRIVER, half_claim, &spec_file(SLICED_DRIVER, half_claim.1)).await?;
    unprepare(&watcher, NIC_DRIVER, ("default", batch.1, batch.0), &spec_file(NIC_DRIVER, batch.1)).await?;

    shutdown.cancel();
    daemon.await??;
    kubelet.stop().await;
    watcher.stop();
    step(8, "Shutdown", "devhost stopped and removed its sockets; the slices stay for the next devhost to adopt.");
    println!("\nOn a cluster (Kubernetes 1.34+): set api = \"dra\" for the resource in its backends.d file, and see");
    println!("examples/dra/ for a DeviceClass, a ResourceClaimTemplate and a Pod, and the operator guide.");
    println!("Partitions and shared devices need 1.36+; the second file above is the example of both.");
    Ok(())
}

/// A ResourceClaim in namespace `default` with one request, allocated
/// `result`: what the scheduler would leave on the API server.
fn claim(name: &str, uid: &str, request: Value, result: Value) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "default", "name": name, "uid": uid},
        "spec": {"devices": {"requests": [request]}},
        "status": {"allocation": {"devices": {"results": [result]}}},
    })
}

/// Prepares `claim` through `driver`; its answer, or why it failed.
async fn prepare(
    watcher: &FakePluginWatcher,
    driver: &str,
    claim: ClaimRef<'_>,
) -> anyhow::Result<NodePrepareResourceResponse> {
    let mut answer = watcher.prepare(driver, &[claim]).await.map_err(anyhow::Error::msg)?;
    let prepared =
        answer.claims.remove(claim.1).ok_or_else(|| anyhow::anyhow!("{driver}: no answer for claim {}", claim.2))?;
    anyhow::ensure!(prepared.error.is_empty(), "{driver}: prepare of claim {} failed: {}", claim.2, prepared.error);
    Ok(prepared)
}

/// Unprepares `claim` through `driver` and says whether its CDI spec went.
async fn unprepare(
    watcher: &FakePluginWatcher,
    driver: &str,
    claim: ClaimRef<'_>,
    spec_file: &Path,
) -> anyhow::Result<()> {
    let undone = watcher.unprepare(driver, &[claim]).await.map_err(anyhow::Error::msg)?;
    let error = undone.claims.get(claim.1).map(|c| c.error.clone()).unwrap_or_default();
    anyhow::ensure!(error.is_empty(), "{driver}: unprepare of claim {} failed: {error}", claim.2);
    println!(
        "   claim {} unprepared; its CDI spec is {}",
        claim.2,
        if spec_file.exists() { "still there (unexpected)" } else { "removed" }
    );
    Ok(())
}

fn print_prepared(prepared: &NodePrepareResourceResponse, prefix: &str) {
    for device in &prepared.devices {
        println!(
            "   {prefix}request {:?}: device {} → CDI {}",
            device.request_names.join(","),
            device.device_name,
            device.cdi_device_ids.join(", ")
        );
    }
}

/// The driver's slices (sorted by name), once they satisfy `ready`.
async fn wait_for_slices(
    server: &FakeApiServer,
    driver: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // `slices()` is keyed by name, so the order is stable.
        let slices: Vec<Value> =
            server.slices().into_values().filter(|slice| slice["spec"]["driver"] == driver).collect();
        if !slices.is_empty() && ready(&slices) {
            return Ok(slices);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the ResourceSlices of driver {driver} were not published in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every device of `slices`.
fn devices(slices: &[Value]) -> impl Iterator<Item = &Value> {
    slices.iter().flat_map(|slice| slice["spec"]["devices"].as_array().into_iter().flatten())
}

/// The device called `name` in `slices`.
fn device<'a>(slices: &'a [Value], name: &str) -> anyhow::Result<&'a Value> {
    devices(slices).find(|d| d["name"] == name).ok_or_else(|| anyhow::anyhow!("device {name} is not in the slices"))
}

/// (counter set, counter) → amount, in billionths.
type Counters = BTreeMap<(String, String), i128>;

/// What `device` consumes, by counter set and counter.
fn consumed(device: &Value) -> Counters {
    let mut counters = Counters::new();
    for consumption in device["consumesCounters"].as_array().into_iter().flatten() {
        let set = consumption["counterSet"].as_str().unwrap_or_default();
        for (name, value) in consumption["counters"].as_object().into_iter().flatten() {
            let amount = value["value"].as_str().and_then(quantity_nanos).unwrap_or_default();
            *counters.entry((set.to_owned(), name.clone())).or_default() += amount;
        }
    }
    counters
}

/// Whether `device` can still be allocated while `used` is taken from the
/// pool's counter sets: the scheduler's check, done by the demo.
fn fits_beside(pool: &[Value], used: &Counters, device: &Value) -> anyhow::Result<bool> {
    let mut totals = Counters::new();
    for slice in pool {
        for set in slice["spec"]["sharedCounters"].as_array().into_iter().flatten() {
            let name = set["name"].as_str().unwrap_or_default();
            for (counter, value) in set["counters"].as_object().into_iter().flatten() {
                let amount = value["value"].as_str().and_then(quantity_nanos).unwrap_or_default();
                totals.insert((name.to_owned(), counter.clone()), amount);
            }
        }
    }
    let mut fits = true;
    for (key, needed) in consumed(device) {
        let total =
            totals.get(&key).ok_or_else(|| anyhow::anyhow!("counter {} of set {} is not in the pool", key.1, key.0))?;
        fits &= used.get(&key).copied().unwrap_or_default() + needed <= *total;
    }
    Ok(fits)
}

/// Whether `amounts` together stay within `capacity`.
fn within(amounts: &[&str], capacity: &str) -> bool {
    let sum: Option<i128> = amounts.iter().map(|amount| quantity_nanos(amount)).sum();
    sum.zip(quantity_nanos(capacity)).is_some_and(|(sum, capacity)| sum <= capacity)
}

/// `{"memory": {"value": "40Gi"}, ...}` as `memory=40Gi ...`.
fn quantities(counters: &Value) -> String {
    let shown: Vec<String> = counters
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| format!("{name}={}", value["value"].as_str().unwrap_or_default()))
        .collect();
    shown.join(" ")
}

/// Each slice's pool and generation, its counter sets and its devices: a
/// device's attributes and capacities, what it consumes of a counter set,
/// whether claims may share it and each capacity's request policy.
fn print_slices(slices: &[Value]) {
    let width = devices(slices).filter_map(|d| d["name"].as_str()).map(str::len).max().unwrap_or(0).max(8);
    for slice in slices {
        let spec = &slice["spec"];
        println!(
            "   ResourceSlice {}: node {}, pool {} generation {}",
            slice["metadata"]["name"].as_str().unwrap_or_default(),
            spec["nodeName"].as_str().unwrap_or_default(),
            spec["pool"]["name"].as_str().unwrap_or_default(),
            spec["pool"]["generation"]
        );
        for set in spec["sharedCounters"].as_array().into_iter().flatten() {
            println!(
                "   sharedCounters {}: {}",
                set["name"].as_str().unwrap_or_default(),
                quantities(&set["counters"])
            );
        }
        for device in spec["devices"].as_array().into_iter().flatten() {
            let mut parts: Vec<String> = device["attributes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, value)| {
                    let shown = value.as_object().and_then(|kind| kind.values().next()).unwrap_or(value);
                    format!("{name}={}", shown.as_str().map_or_else(|| shown.to_string(), str::to_owned))
                })
                .collect();
            let mut policies = Vec::new();
            for (name, capacity) in device["capacity"].as_object().into_iter().flatten() {
                parts.push(format!("{name}={}", capacity["value"].as_str().unwrap_or_default()));
                if let Some(policy) = capacity.get("requestPolicy") {
                    policies.push(format!(
                        "   requestPolicy {name}: {}",
                        request_policy(policy, capacity["value"].as_str().unwrap_or_default())
                    ));
                }
            }
            for consumption in device["consumesCounters"].as_array().into_iter().flatten() {
                parts.push(format!(
                    "consumesCounters {}: {}",
                    consumption["counterSet"].as_str().unwrap_or_default(),
                    quantities(&consumption["counters"])
                ));
            }
            if device["allowMultipleAllocations"] == true {
                parts.push("allowMultipleAllocations".to_owned());
            }
            println!("   {:<width$} {}", device["name"].as_str().unwrap_or_default(), parts.join(" "));
            for policy in policies {
                println!("   {:<width$}{policy}", "");
            }
        }
    }
}

/// A capacity's `requestPolicy`, in one line: `default 1G, 1G to 25G in
/// steps of 1G` or `default 1G, one of 1G 2G 4G`. Without a `max`, a
/// range ends at the capacity's `value`.
fn request_policy(policy: &Value, capacity: &str) -> String {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let mut shown = vec![format!("default {}", text(&policy["default"]))];
    if let Some(range) = policy.get("validRange") {
        let max = range.get("max").map_or_else(|| capacity.to_owned(), text);
        let step = range.get("step").map(|step| format!(" in steps of {}", text(step))).unwrap_or_default();
        shown.push(format!("{} to {max}{step}", text(&range["min"])));
    }
    if let Some(values) = policy["validValues"].as_array() {
        shown.push(format!("one of {}", values.iter().map(text).collect::<Vec<_>>().join(" ")));
    }
    shown.join(", ")
}

/// The claim's CDI spec file and the container edits in it.
fn print_cdi_edits(file: &Path) -> anyhow::Result<()> {
    let spec: Value = serde_json::from_slice(&std::fs::read(file)?)?;
    println!("   CDI spec {} (kind {}):", file.display(), spec["kind"].as_str().unwrap_or_default());
    print_container_edits(file)
}

/// What the container gets from a claim's CDI spec: its environment and
/// device nodes.
fn print_container_edits(file: &Path) -> anyhow::Result<()> {
    let spec: Value = serde_json::from_slice(&std::fs::read(file)?)?;
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
