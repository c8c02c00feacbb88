//! DRA (issue 16), as far as it is built: a resource configured with
//! `api = "dra"` is never served through the device plugin API, and the
//! log says why it is not served at all yet; its neighbours serve as
//! always. (The wire contracts are in `wire_contract.rs`.)

use devhost::fake_kubelet::FakeKubelet;

use crate::harness::{Node, WAIT, static_backend};

#[tokio::test(flavor = "multi_thread")]
async fn a_dra_resource_is_never_served_as_a_device_plugin() {
    let node = Node::new();
    let text = static_backend(&[("example.com/gpu", &["gpu-0"]), ("example.com/nic", &["nic-0"])], None)
        + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    node.backend("mixed", &text);
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations("example.com/nic", 1, WAIT).await.expect("the neighbour registers");
    devhost.wait_until_ready().await;
    devhost.wait_for_log("this devhost cannot serve DRA drivers yet").await;
    assert!(devhost.log().contains("driver=\"gpu.example.com\""), "the derived driver is named:\n{}", devhost.log());
    assert!(kubelet.devices("example.com/gpu").is_none(), "served through the device plugin API");
    assert_eq!(node.sockets().iter().filter(|s| s.contains("example.com_gpu")).count(), 0, "{:?}", node.sockets());
}

mod kubelet_plugin {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use devhost::device_state::ResourceState;
    use devhost::dra::plugin::{DraPaths, DraPlugin};
    use devhost::fake_kubelet::{FakePluginWatcher, KUBELET_1_32, KUBELET_1_34};
    use devhost::model::{Device, Health};
    use devhost::proto::dra::health::{HealthStatus, NodeWatchResourcesResponse};
    use tokio_util::sync::CancellationToken;

    use crate::harness::WAIT;

    const DRIVER: &str = "gpu.example.com";

    fn gpus(second: Health) -> Arc<ResourceState> {
        let state = Arc::new(ResourceState::new("example.com/gpu"));
        state.publish(vec![Device::new("gpu-0", Health::Healthy), Device::new("GPU-1", second)]).expect("publish");
        state
    }

    fn start(root: &Path, driver: &str, state: Arc<ResourceState>) -> DraPlugin {
        DraPlugin::start(driver, "node-a", &DraPaths::new(root, driver), state, CancellationToken::new())
            .expect("start")
    }

    /// (device name, health, message) of each device in one message.
    fn health(message: &NodeWatchResourcesResponse) -> Vec<(String, HealthStatus, String)> {
        message
            .devices
            .iter()
            .map(|d| {
                let id = d.device.as_ref().expect("a device");
                assert_eq!(id.pool_name, "node-a", "the node's pool");
                (id.device_name.clone(), d.health(), d.message.clone())
            })
            .collect()
    }

    async fn next(stream: &mut tonic::Streaming<NodeWatchResourcesResponse>) -> NodeWatchResourcesResponse {
        tokio::time::timeout(WAIT, stream.message()).await.expect("a message in time").expect("ok").expect("open")
    }

    async fn wait_registered(plugin: &DraPlugin) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !plugin.registered() {
            assert!(tokio::time::Instant::now() < deadline, "the kubelet's registration status never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registration through the plugin watcher as a 1.34+ kubelet sees it,
    /// the health stream following the device state, and claims answered
    /// one by one while they cannot be prepared yet.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_driver_registers_through_the_plugin_watcher_and_streams_health() {
        let root = tempfile::tempdir().expect("temp dir");
        let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_34).await.expect("watcher");
        let state = gpus(Health::Healthy);
        let plugin = start(root.path(), DRIVER, state.clone());
        let registration = watcher.wait_for_driver(DRIVER, WAIT).await.expect("registered");
        assert_eq!(registration.endpoint, root.path().join("plugins/gpu.example.com/dra.sock"));
        assert_eq!(registration.socket, root.path().join("plugins_registry/gpu.example.com-reg.sock"));
        assert_eq!(registration.service, "v1.DRAPlugin", "the newest package both know");
        assert!(registration.health, "health offered and known");
        wait_registered(&plugin).await;

        let mut stream = watcher.watch_health(DRIVER).await.expect("health stream");
        let first = next(&mut stream).await;
        assert_eq!(
            health(&first),
            [
                ("gpu-0".to_owned(), HealthStatus::Healthy, String::new()),
                ("x-4750552d31".to_owned(), HealthStatus::Healthy, String::new())
            ],
            "device IDs as DRA names"
        );
        assert_eq!(first.devices[0].health_check_timeout_seconds, 30);
        assert!(first.devices[0].last_updated_time > 1_700_000_000, "Unix seconds");
        state
            .publish(vec![Device::new("gpu-0", Health::Healthy), Device::new("GPU-1", Health::Unhealthy)])
            .expect("publish");
        assert_eq!(health(&next(&mut stream).await)[1].1, HealthStatus::Unhealthy, "a change at once");
        state.set_fault(Some("backend \"gpu\": worker killed by SIGSEGV".into()));
        let faulted = health(&next(&mut stream).await);
        assert!(faulted.iter().all(|(_, h, m)| *h == HealthStatus::Unhealthy && m.contains("SIGSEGV")), "{faulted:?}");

        let answer =
            watcher.prepare(DRIVER, &[("ml", "uid-1", "gpu-claim"), ("ml", "uid-2", "other")]).await.expect("answered");
        assert_eq!(answer.claims.len(), 2, "one answer per claim");
        let error = &answer.claims["uid-1"].error;
        assert!(
            error.starts_with("claim ml/gpu-claim (uid-1): driver gpu.example.com cannot prepare claims yet"),
            "{error}"
        );

        // The registration socket removed: the kubelet deregisters, and
        // devhost sees that its sockets are lost.
        std::fs::remove_file(root.path().join("plugins_registry/gpu.example.com-reg.sock")).expect("remove");
        let deadline = tokio::time::Instant::now() + WAIT;
        while watcher.driver(DRIVER).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "never deregistered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(plugin.sockets_lost());
        plugin.stop().await;
        assert!(!root.path().join("plugins/gpu.example.com/dra.sock").exists(), "sockets removed on stop");
    }

    /// A 1.32 kubelet knows only `v1beta1.DRAPlugin`: devhost is served
    /// through it (the same answers), without a health stream.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_older_kubelet_is_served_through_v1beta1() {
        let root = tempfile::tempdir().expect("temp dir");
        let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_32).await.expect("watcher");
        let plugin = start(root.path(), DRIVER, gpus(Health::Healthy));
        let registration = watcher.wait_for_driver(DRIVER, WAIT).await.expect("registered");
        assert_eq!(registration.service, "v1beta1.DRAPlugin");
        assert!(!registration.health);
        let answer = watcher.prepare(DRIVER, &[("ml", "uid-1", "gpu-claim")]).await.expect("answered through v1beta1");
        assert!(answer.claims["uid-1"].error.contains("cannot prepare claims yet"), "{answer:?}");
        plugin.stop().await;
    }

    /// The kubelet's refusal reaches devhost with its reason.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_refused_registration_is_known_with_the_kubelets_reason() {
        let root = tempfile::tempdir().expect("temp dir");
        let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_34).await.expect("watcher");
        let plugin = start(root.path(), "GPU", gpus(Health::Healthy));
        let deadline = tokio::time::Instant::now() + WAIT;
        while watcher.refusals().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never judged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(watcher.refusals(), ["driver name \"GPU\" is not a DNS subdomain"]);
        assert!(!plugin.registered());
        plugin.stop().await;
    }
}

/// The ResourceSlices devhost builds are valid `resource.k8s.io/v1`
/// objects for every Kubernetes minor that serves them (1.34 to 1.37),
/// checked with Kubernetes' own OpenAPI schemas (`kubernetes-validate
/// --strict`), with attributes of every kind, capacities and taints.
#[test]
fn resource_slices_pass_kubernetes_own_schemas() {
    use devhost::device_state::ResourceState;
    use devhost::dra::slices::{SliceSource, slices};
    use devhost::model::{AttributeValue, Device, Health};

    let Some(python) = crate::deploy::deploy_python() else { return };
    let state = ResourceState::new("example.com/gpu");
    let devices = (0..150)
        .map(|i| {
            let health = if i == 7 { Health::Unhealthy } else { Health::Healthy };
            Device::new(format!("GPU-{i}"), health)
                .with_attribute("resource.kubernetes.io/pcieRoot", AttributeValue::String("pci0000:3a".into()))
                .with_attribute("driverVersion", AttributeValue::Version("550.54.15".into()))
                .with_attribute("index", AttributeValue::Int(i))
                .with_attribute("migEnabled", AttributeValue::Bool(false))
                .with_capacity("memory", "80Gi")
        })
        .collect();
    state.publish(devices).expect("valid devices");
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: "node-a".into(),
        uid: "5f1c0c5e-0000-4000-8000-000000000001".into(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let source =
        SliceSource { driver: "gpu.example.com", node: "node-a", generation: 1, owner: Some(owner), taints: true };
    let slices = slices(&source, &state.snapshot());
    assert_eq!(slices.len(), 3);
    let text: Vec<String> = slices.iter().map(|s| serde_json::to_string(s).expect("serialise")).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("slices.yaml");
    std::fs::write(&file, text.join("\n---\n")).expect("write");
    let output = std::process::Command::new(python)
        .arg(crate::harness::repo().join("scripts/deploy-check"))
        .args(["validate", "1.34", "1.37"])
        .arg(&file)
        .output()
        .expect("run deploy-check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains("no-schema"), "validated, not skipped: {stdout}");
    assert!(
        text[0].starts_with("{\"apiVersion\":\"resource.k8s.io/v1\",\"kind\":\"ResourceSlice\""),
        "{}",
        &text[0][..80]
    );
}
