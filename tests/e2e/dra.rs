//! DRA (issue 16): a resource configured with `api = "dra"` is served by
//! the real daemon as a DRA driver (registration through the plugin
//! watcher, ResourceSlices on the API server, claims prepared into CDI
//! specs through the backend, idempotently across restarts, health on the
//! kubelet's stream) and never through the device plugin API; its
//! neighbours serve as always. The kubelet and the API server are the
//! project's fakes, on real sockets. (The wire contracts are in
//! `wire_contract.rs`.)

use std::path::{Path, PathBuf};

use devhost::fake_apiserver::FakeApiServer;
use devhost::fake_kubelet::{FakeKubelet, FakePluginWatcher, KUBELET_1_37};
use serde_json::{Value, json};

use crate::harness::{Devhost, Node, WAIT, healthy_state, static_backend};

pub(crate) const GPU_DRIVER: &str = "gpu.example.com";

/// A node with a backend serving one resource through DRA as `driver`, a
/// host config pointing devhost at `server` as node `node-a`, and the fake
/// kubelet's two sides.
pub(crate) struct DraNode {
    pub(crate) node: Node,
    driver: String,
    state: PathBuf,
    pub(crate) server: FakeApiServer,
    pub(crate) watcher: FakePluginWatcher,
    pub(crate) kubelet: std::sync::Arc<FakeKubelet>,
}

impl DraNode {
    /// The static backend: `example.com/gpu` (gpu-0, gpu-1, healthy while
    /// their state files exist) through DRA, `example.com/nic` as a device
    /// plugin.
    pub(crate) async fn start() -> DraNode {
        Self::start_with("", |_| {}).await
    }

    /// [`DraNode::start`], with `extra` added to the GPU resource's table
    /// (`cdi_kind = …`, say) and `prepare_cdi` run on the CDI directory
    /// before devhost starts (a vendor's spec, say).
    pub(crate) async fn start_with(extra: &str, prepare_cdi: impl FnOnce(&Path)) -> DraNode {
        let node = Node::new();
        let state = healthy_state(node.dir.path(), &["gpu-0", "gpu-1"]);
        let text =
            static_backend(&[("example.com/gpu", &["gpu-0", "gpu-1"]), ("example.com/nic", &["nic-0"])], Some(&state))
                .replacen("[[config.resource.device]]", &format!("{extra}[[config.resource.device]]"), 1)
                + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
        node.backend("mixed", &text);
        prepare_cdi(&node.dir.path().join("cdi"));
        DraNode::around(node, GPU_DRIVER, state).await
    }

    /// Where devhost writes (and the runtime reads) CDI specs.
    pub(crate) fn cdi_dir(&self) -> PathBuf {
        self.node.dir.path().join("cdi")
    }

    /// `node` (its backends written), serving `driver`.
    pub(crate) async fn around(node: Node, driver: &str, state: PathBuf) -> DraNode {
        let server = FakeApiServer::start().await.expect("API server");
        server.add_node("node-a");
        let root = node.dir.path();
        let kubeconfig = root.join("kubeconfig.yaml");
        std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
        let host = format!(
            "call_timeout_ms = 2000\nmetrics_address = \"127.0.0.1:0\"\ncdi_dir = {:?}\ncdi_spec_dirs = []\n[dra]\nkubelet_root = {:?}\nnode_name = \"node-a\"\nkubeconfig = {:?}\n",
            root.join("cdi"),
            root,
            kubeconfig
        );
        std::fs::write(node.config_file(), host).expect("host config");
        // The kubelet root is the plugin directory's parent: the node's dir.
        let watcher = FakePluginWatcher::start(root, KUBELET_1_37).await.expect("plugin watcher");
        let kubelet = std::sync::Arc::new(FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet"));
        DraNode { node, driver: driver.to_owned(), state, server, watcher, kubelet }
    }

    fn cdi_spec(&self, uid: &str) -> PathBuf {
        self.node.dir.path().join(format!("cdi/devhost-{}-claim-{uid}.json", self.driver))
    }

    fn checkpoint(&self) -> Value {
        let path = self.node.dir.path().join(format!("plugins/{}/devhost-claims.json", self.driver));
        serde_json::from_slice(&std::fs::read(path).expect("checkpoint")).expect("JSON")
    }

    /// The devices of the driver's slices, and their generations.
    fn published(&self) -> (Vec<String>, Vec<i64>) {
        let mut names = Vec::new();
        let mut generations = Vec::new();
        for slice in self.server.slices().values().filter(|s| s["spec"]["driver"] == self.driver.as_str()) {
            generations.push(slice["spec"]["pool"]["generation"].as_i64().expect("generation"));
            for device in slice["spec"]["devices"].as_array().into_iter().flatten() {
                names.push(device["name"].as_str().expect("name").to_owned());
            }
        }
        names.sort();
        (names, generations)
    }

    /// The driver's published device `name`.
    fn device(&self, name: &str) -> Option<Value> {
        self.server
            .slices()
            .into_values()
            .filter(|s| s["spec"]["driver"] == self.driver.as_str())
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == name)
    }

    async fn until(&self, what: &str, devhost: &Devhost, mut ready: impl FnMut(&DraNode) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !ready(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}; log:\n{}", devhost.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn claim_reads(&self) -> usize {
        self.server.requests().iter().filter(|r| r.path.contains("/resourceclaims/")).count()
    }

    /// Prepares `claims`, retrying while the driver is (re)registering.
    pub(crate) async fn prepare(
        &self,
        devhost: &Devhost,
        claims: &[(&str, &str, &str)],
    ) -> devhost::proto::dra::v1::NodePrepareResourcesResponse {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.watcher.prepare(&self.driver, claims).await {
                Ok(answer) => return answer,
                Err(error) => {
                    assert!(tokio::time::Instant::now() < deadline, "never answered ({error}); log:\n{}", devhost.log())
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A ResourceClaim allocated `devices` (request, pool, device) of the gpu
/// driver, as the scheduler leaves it.
pub(crate) fn claim(name: &str, uid: &str, devices: &[(&str, &str, &str)]) -> Value {
    claim_of(GPU_DRIVER, name, uid, devices)
}

/// A ResourceClaim allocated `devices` (request, pool, device) of `driver`.
fn claim_of(driver: &str, name: &str, uid: &str, devices: &[(&str, &str, &str)]) -> Value {
    let results: Vec<Value> = devices
        .iter()
        .map(|(request, pool, device)| json!({"request": request, "driver": driver, "pool": pool, "device": device}))
        .collect();
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": "ml", "name": name, "uid": uid},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": results}}},
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The whole path: registration, slices, a prepared claim with its CDI
/// spec, per-claim errors beside it, a repeat answered from the
/// checkpoint, health on the stream and in the slices, unprepare.
#[tokio::test(flavor = "multi_thread")]
async fn a_dra_resource_is_served_as_a_dra_driver_and_never_as_a_device_plugin() {
    use tokio_stream::StreamExt;

    let dra = DraNode::start().await;
    let devhost = dra.node.start_devhost();
    dra.kubelet.wait_for_registrations("example.com/nic", 1, WAIT).await.expect("the neighbour registers");
    let registration = dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    assert_eq!(registration.service, "v1.DRAPlugin");
    devhost.wait_until_ready().await;
    assert!(dra.kubelet.devices("example.com/gpu").is_none(), "served through the device plugin API");
    assert_eq!(dra.node.sockets().iter().filter(|s| s.contains("example.com_gpu")).count(), 0);
    dra.until("the slices are published", &devhost, |d| {
        d.published() == (vec!["gpu-0".into(), "gpu-1".into()], vec![1])
    })
    .await;

    dra.server.put_claim(claim("one", "uid-1", &[("gpus", "node-a", "gpu-1")]));
    dra.server.put_claim(claim("elsewhere", "uid-3", &[("gpus", "node-b", "gpu-0")]));
    dra.server.put_claim(json!({
        "metadata": {"namespace": "ml", "name": "pending", "uid": "uid-4"}, "spec": {"devices": {"requests": []}},
    }));
    dra.server.put_claim(claim("unknown", "uid-5", &[("gpus", "node-a", "gpu-7")]));
    dra.server.put_claim(claim_of("nic.example.com", "theirs", "uid-6", &[("nics", "node-a", "nic-0")]));
    let batch = [
        ("ml", "uid-1", "one"),
        ("ml", "uid-2", "one"),
        ("ml", "uid-3", "elsewhere"),
        ("ml", "uid-4", "pending"),
        ("ml", "uid-5", "unknown"),
        ("ml", "uid-6", "theirs"),
    ];
    let answer = dra.watcher.prepare(GPU_DRIVER, &batch).await.expect("answered");
    let one = &answer.claims["uid-1"];
    assert_eq!(one.error, "", "{answer:?}");
    assert_eq!(one.devices.len(), 1);
    let device = &one.devices[0];
    assert_eq!(
        (device.request_names.as_slice(), device.pool_name.as_str(), device.device_name.as_str()),
        (&["gpus".to_owned()][..], "node-a", "gpu-1")
    );
    assert_eq!(device.cdi_device_ids, ["k8s.gpu.example.com/claim=uid-1-gpus"]);
    let spec: Value = serde_json::from_str(&read(&dra.cdi_spec("uid-1"))).expect("CDI JSON");
    assert_eq!(spec["kind"], "k8s.gpu.example.com/claim");
    assert_eq!(spec["devices"][0]["name"], "uid-1-gpus");
    let edits = &spec["devices"][0]["containerEdits"];
    assert_eq!(edits["env"], json!(["IDS=gpu-1"]), "the backend's allocate answer for gpu-1");
    assert_eq!(edits["deviceNodes"][0]["path"], "/dev/gpu-1");
    // Each bad claim gets its own error; the batch is not failed for them.
    let error = |uid: &str| answer.claims[uid].error.clone();
    assert!(error("uid-2").contains("has UID \"uid-1\""), "{}", error("uid-2"));
    assert!(error("uid-3").contains("pool \"node-b\", not this node's pool \"node-a\""), "{}", error("uid-3"));
    assert!(error("uid-4").contains("not allocated"), "{}", error("uid-4"));
    assert!(error("uid-5").contains("device gpu-7 is not (or no longer) published"), "{}", error("uid-5"));
    assert!(error("uid-6").contains("no device of driver gpu.example.com"), "{}", error("uid-6"));
    crate::sharing::assert_valid_cdi(&spec);
    assert!(!dra.cdi_spec("uid-3").exists());
    assert_eq!(dra.checkpoint()["claims"].as_object().expect("claims").keys().collect::<Vec<_>>(), ["uid-1"]);

    // `devhost list` on the node shows the driver, each device's DRA name
    // and the claims prepared with it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(dra.node.config_file())
        .output()
        .expect("devhost list");
    let listed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let gpu = listed[0]["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "example.com/gpu");
    let gpu = gpu.expect("the DRA resource is listed");
    assert_eq!(gpu["dra_driver"], GPU_DRIVER);
    assert_eq!(gpu["devices"][1]["dra_name"], "gpu-1");
    assert_eq!(gpu["devices"][1]["claims"], json!(["ml/one (uid-1)"]));
    assert_eq!(gpu["devices"][0]["claims"], json!([]));

    // Operators see it in the metrics.
    let (_, metrics) = crate::harness::http_get(&devhost.metrics_address().await, "/metrics").await;
    for series in [
        "devhost_dra_registered{driver=\"gpu.example.com\"} 1",
        "devhost_dra_claims_prepared{driver=\"gpu.example.com\"} 1",
        "devhost_dra_prepare_errors_total{driver=\"gpu.example.com\"} 5",
        "devhost_dra_slices_up{driver=\"gpu.example.com\"} 1",
        "devhost_dra_slice_writes_total{driver=\"gpu.example.com\"} 1",
    ] {
        assert!(metrics.lines().any(|line| line == series), "no {series:?} in:\n{metrics}");
    }

    // The kubelet asks again: the same answer, without reading the claim.
    let reads = dra.claim_reads();
    let again = dra.watcher.prepare(GPU_DRIVER, &[("ml", "uid-1", "one")]).await.expect("answered");
    assert_eq!(again.claims["uid-1"], *one);
    assert_eq!(dra.claim_reads(), reads, "answered from the checkpoint");

    // A kubelet restart: it deletes the node's slices, then a new plugin
    // watcher finds the registration socket and registers the driver
    // again, and devhost publishes the slices again; a removed socket is
    // served again.
    let registered = |log: String| log.matches("registered with the kubelet as a DRA driver").count();
    let before = registered(devhost.log());
    dra.watcher.stop();
    assert!(dra.server.delete_slice("node-a-gpu.example.com-0"), "the slice was there");
    let watcher = FakePluginWatcher::start(dra.node.dir.path(), KUBELET_1_37).await.expect("watcher");
    let dra = DraNode { watcher, ..dra };
    dra.until("registered again after a kubelet restart", &devhost, |_| registered(devhost.log()) > before).await;
    dra.until("the slice is published again", &devhost, |d| d.published().0 == ["gpu-0", "gpu-1"]).await;
    let socket = dra.watcher.driver(GPU_DRIVER).expect("registered").socket;
    let name = socket.file_name().and_then(|n| n.to_str()).expect("a name").to_owned();
    assert!(name.starts_with("gpu.example.com-") && name.ends_with("-reg.sock"), "this instance's own: {name}");
    std::fs::remove_file(&socket).expect("remove");
    devhost.wait_for_log("the DRA plugin's sockets were removed").await;
    dra.until("registered again after its socket was removed", &devhost, |_| registered(devhost.log()) > before + 1)
        .await;
    let again = dra.prepare(&devhost, &[("ml", "uid-1", "one")]).await;
    assert_eq!(again.claims["uid-1"], *one, "the same answer after both");

    // Health: on the kubelet's stream at once, and in the slices.
    let mut health = dra.watcher.watch_health(GPU_DRIVER).await.expect("health stream");
    std::fs::remove_file(dra.state.join("gpu-0.ok")).expect("make gpu-0 unhealthy");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, health.next())
            .await
            .expect("a health message")
            .expect("open")
            .expect("ok");
        let gpu0 = message.devices.iter().find(|d| d.device.as_ref().is_some_and(|id| id.device_name == "gpu-0"));
        if gpu0.is_some_and(|d| d.health == devhost::proto::dra::health::HealthStatus::Unhealthy as i32) {
            break;
        }
    }
    // (Generation 3: the slice was published again after the kubelet's restart.)
    dra.until("the unhealthy device leaves the slices", &devhost, |d| d.published() == (vec!["gpu-1".into()], vec![3]))
        .await;

    let undone =
        dra.watcher.unprepare(GPU_DRIVER, &[("ml", "uid-1", "one"), ("ml", "uid-9", "never")]).await.expect("answered");
    assert_eq!((undone.claims["uid-1"].error.as_str(), undone.claims["uid-9"].error.as_str()), ("", ""));
    assert!(!dra.cdi_spec("uid-1").exists(), "the claim's CDI spec is removed");
    assert!(dra.checkpoint()["claims"].as_object().expect("claims").is_empty());
    devhost.wait_for_log("claim unprepared").await;
}

/// A prepared claim survives a devhost SIGKILL: the new process answers
/// the kubelet's repeat from the checkpoint even while the API server is
/// unavailable, and unprepares it then.
#[tokio::test(flavor = "multi_thread")]
async fn prepared_claims_survive_a_restart_without_the_api_server() {
    let dra = DraNode::start().await;
    let mut devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    dra.server.put_claim(claim("two", "uid-2", &[("a", "node-a", "gpu-0"), ("b", "node-a", "gpu-1")]));
    let first = dra.watcher.prepare(GPU_DRIVER, &[("ml", "uid-2", "two")]).await.expect("answered");
    let devices = &first.claims["uid-2"].devices;
    assert_eq!(first.claims["uid-2"].error, "");
    let ids: Vec<(&str, &str)> =
        devices.iter().map(|d| (d.device_name.as_str(), d.cdi_device_ids[0].as_str())).collect();
    assert_eq!(
        ids,
        [("gpu-0", "k8s.gpu.example.com/claim=uid-2-a"), ("gpu-1", "k8s.gpu.example.com/claim=uid-2-b")],
        "one CDI device per request"
    );

    devhost.stop_with(nix::sys::signal::Signal::SIGKILL).await;
    dra.server.set_unavailable(true);
    let devhost = dra.node.start_another_devhost("devhost-2.log");
    // The watcher follows the new process's sockets.
    let again = dra.prepare(&devhost, &[("ml", "uid-2", "two")]).await;
    // The killed process's sockets were removed; only the new one's stay.
    let registry = std::fs::read_dir(dra.node.dir.path().join("plugins_registry")).expect("registry").count();
    let service = std::fs::read_dir(dra.node.dir.path().join("plugins/gpu.example.com"))
        .expect("driver dir")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".sock"))
        .count();
    assert_eq!((registry, service), (1, 1), "{}", devhost.log());
    assert_eq!(again.claims["uid-2"], first.claims["uid-2"], "the same answer from the checkpoint");
    devhost.wait_for_log("could not publish the ResourceSlices").await;
    let undone = dra.watcher.unprepare(GPU_DRIVER, &[("ml", "uid-2", "two")]).await.expect("answered");
    assert_eq!(undone.claims["uid-2"].error, "");
    assert!(!dra.cdi_spec("uid-2").exists());
    dra.server.set_unavailable(false);
    dra.until("the slices are published after the outage", &devhost, |d| d.published().0.len() == 2).await;
}

/// Without a node name or API-server access a DRA resource is not served
/// (and says why), never as a device plugin; its neighbours serve.
#[tokio::test(flavor = "multi_thread")]
async fn a_dra_resource_without_api_server_access_says_so_and_its_neighbours_serve() {
    let node = Node::new();
    let text = static_backend(&[("example.com/gpu", &["gpu-0"]), ("example.com/nic", &["nic-0"])], None)
        + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    node.backend("mixed", &text);
    std::fs::write(node.config_file(), "metrics_address = \"127.0.0.1:0\"\n[dra]\nnode_name = \"node-a\"\n")
        .expect("host config");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations("example.com/nic", 1, WAIT).await.expect("the neighbour registers");
    devhost.wait_for_log("api = \"dra\" needs the API server").await;
    assert!(devhost.log().contains("no in-cluster API-server access"), "{}", devhost.log());
    // Not ready: a rolling update stops here instead of replacing a pod
    // that serves the driver.
    let (code, body) = crate::harness::http_get(&devhost.metrics_address().await, "/readyz").await;
    assert!(code == 503 && body.contains("DRA driver gpu.example.com"), "{code} {body}");
    assert!(kubelet.devices("example.com/gpu").is_none(), "served through the device plugin API");
}

mod kubelet_plugin {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use devhost::device_state::ResourceState;
    use devhost::dra::plugin::{DraPaths, DraPlugin};
    use devhost::fake_kubelet::{FakePluginWatcher, HealthApi, KUBELET_1_32, KUBELET_1_37, KubeletVersion};
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
        DraPlugin::start(driver, "node-a", &DraPaths::new(root, driver), state, None, None, CancellationToken::new())
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
        let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_37).await.expect("watcher");
        let state = gpus(Health::Healthy);
        let plugin = start(root.path(), DRIVER, state.clone());
        let registration = watcher.wait_for_driver(DRIVER, WAIT).await.expect("registered");
        assert_eq!(registration.endpoint, root.path().join("plugins/gpu.example.com/dra.sock"));
        assert_eq!(registration.socket, root.path().join("plugins_registry/gpu.example.com-reg.sock"));
        assert_eq!(registration.service, "v1.DRAPlugin", "the newest package both know");
        assert_eq!(registration.health, Some(HealthApi::V1), "health offered and known");
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
            error.starts_with(
                "claim ml/gpu-claim (uid-1): driver gpu.example.com cannot prepare claims: it has no API server"
            ),
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
        assert_eq!(registration.health, None);
        let answer = watcher.prepare(DRIVER, &[("ml", "uid-1", "gpu-claim")]).await.expect("answered through v1beta1");
        assert!(answer.claims["uid-1"].error.contains("has no API server to read them from"), "{answer:?}");
        plugin.stop().await;
    }

    /// Each kubelet minor from 1.32 to 1.37 opens the health stream its
    /// code opens (1.36: `v1alpha1` on every plugin, listed or not; 1.37:
    /// `v1` as listed; older: none) and gets devhost's device health on
    /// it, with no stream ending in an error.
    #[tokio::test(flavor = "multi_thread")]
    async fn every_kubelet_minor_gets_health_the_way_it_asks() {
        for version in KubeletVersion::all() {
            let root = tempfile::tempdir().expect("temp dir");
            let watcher = FakePluginWatcher::start(root.path(), version).await.expect("watcher");
            let plugin = start(root.path(), DRIVER, gpus(Health::Unhealthy));
            let registration = watcher.wait_for_driver(DRIVER, WAIT).await.expect("registered");
            wait_registered(&plugin).await;
            let supported: Vec<String> =
                devhost::dra::plugin::SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect();
            assert_eq!(registration.health, version.health_api(&supported), "kubelet {version}");
            if registration.health.is_some() {
                let deadline = tokio::time::Instant::now() + WAIT;
                while watcher.health_messages(DRIVER).is_empty() {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "kubelet {version}: no health message; stream errors: {:?}",
                        watcher.health_errors()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let first = &watcher.health_messages(DRIVER)[0];
                assert_eq!(health(first)[1].1, HealthStatus::Unhealthy, "kubelet {version}: the device state");
            }
            assert_eq!(watcher.health_errors(), Vec::<String>::new(), "kubelet {version}");
            plugin.stop().await;
        }
    }

    /// The kubelet's refusal reaches devhost with its reason.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_refused_registration_is_known_with_the_kubelets_reason() {
        let root = tempfile::tempdir().expect("temp dir");
        let watcher = FakePluginWatcher::start(root.path(), KUBELET_1_37).await.expect("watcher");
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

/// The ResourceSlice publisher against the fake API server (plain HTTP on
/// a real socket, kube-rs as the client): what it writes, when, and what
/// it does when the server is away or someone else wrote.
mod slice_publisher {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use devhost::device_state::ResourceState;
    use devhost::dra::publish::{Pacing, Progress, SlicePublisher, client_for_url, watch_client_for_url};
    use devhost::dra::slices::{SliceSource, slices};
    use devhost::fake_apiserver::FakeApiServer;
    use devhost::model::{Device, Health};
    use serde_json::Value;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    use crate::harness::WAIT;

    const DRIVER: &str = "gpu.example.com";

    fn gpus(count: usize) -> Vec<Device> {
        (0..count).map(|i| Device::new(format!("gpu-{i}"), Health::Healthy)).collect()
    }

    fn state(devices: Vec<Device>) -> Arc<ResourceState> {
        let state = Arc::new(ResourceState::new("example.com/gpu"));
        state.publish(devices).expect("publish");
        state
    }

    struct Running {
        progress: watch::Receiver<Progress>,
        /// What the kubelet's registration notifies.
        resync: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
        task: JoinHandle<SlicePublisher>,
    }

    impl Running {
        /// Waits for the first round after `rounds` that ended well.
        async fn round_after(&mut self, rounds: u64) -> Progress {
            let waited = tokio::time::timeout(WAIT, self.progress.wait_for(|p| p.rounds > rounds)).await;
            waited.expect("a round in time").expect("publisher running").clone()
        }

        async fn stop(self) -> SlicePublisher {
            self.stop.cancel();
            self.task.await.expect("publisher task")
        }
    }

    fn start(server: &FakeApiServer, state: &ResourceState, pacing: Pacing) -> Running {
        start_with(server, state, pacing, false, false)
    }

    /// A publisher on node-a, with device taints or not, watching its
    /// slices or not (the daemon's: taints as configured, always watching).
    fn start_with(
        server: &FakeApiServer,
        state: &ResourceState,
        pacing: Pacing,
        taints: bool,
        watching: bool,
    ) -> Running {
        let client = client_for_url(&server.url()).expect("client");
        let mut publisher = SlicePublisher::new(client, DRIVER, "node-a", taints, pacing);
        if watching {
            publisher = publisher.watching(watch_client_for_url(&server.url()).expect("watch client"));
        }
        let progress = publisher.progress();
        let resync = publisher.resync();
        let stop = CancellationToken::new();
        let (changes, token) = (state.subscribe(), stop.clone());
        let task = tokio::spawn(async move {
            publisher.run(changes, token).await;
            publisher
        });
        Running { progress, resync, stop, task }
    }

    /// The slices of `driver` on `node` the server holds, by name.
    fn pool(server: &FakeApiServer, driver: &str, node: &str) -> BTreeMap<String, Value> {
        server
            .slices()
            .into_iter()
            .filter(|(_, s)| s["spec"]["driver"] == driver && s["spec"]["nodeName"] == node)
            .collect()
    }

    /// Every device name in `pool`, sorted, and the pool's generations.
    fn devices_and_generations(pool: &BTreeMap<String, Value>) -> (Vec<String>, Vec<i64>) {
        let mut names: Vec<String> = pool
            .values()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .map(|d| d["name"].as_str().expect("a name").to_owned())
            .collect();
        names.sort();
        let mut generations: Vec<i64> =
            pool.values().map(|s| s["spec"]["pool"]["generation"].as_i64().expect("a generation")).collect();
        generations.dedup();
        (names, generations)
    }

    fn slice_writes(server: &FakeApiServer) -> usize {
        server.requests().iter().filter(|r| r.is_slice_write()).count()
    }

    async fn until(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !ready() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn publishes_the_pool_and_writes_nothing_when_nothing_changed() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let gpus3 = state(gpus(3));
        let mut running = start(&server, &gpus3, Pacing::default());
        let first = running.round_after(0).await;
        assert_eq!((first.generation, first.writes, first.error.as_deref()), (1, 1, None));
        let pool = pool(&server, DRIVER, "node-a");
        let slice = &pool["node-a-gpu.example.com-0"];
        assert_eq!(slice["metadata"]["labels"]["devhost.io/driver"], DRIVER);
        assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], "uid-node-node-a", "the Node owns it");
        assert_eq!(slice["spec"]["pool"]["name"], "node-a");
        assert_eq!(slice["spec"]["pool"]["resourceSliceCount"], 1);
        assert_eq!(devices_and_generations(&pool), (vec!["gpu-0".into(), "gpu-1".into(), "gpu-2".into()], vec![1]));

        // The same devices again, three times: rounds, and not one write.
        for _ in 0..3 {
            let rounds = running.progress.borrow().rounds;
            gpus3.publish(gpus(3)).expect("publish");
            running.round_after(rounds).await;
        }
        assert_eq!(slice_writes(&server), 1, "{:?}", server.requests());
        // A real change is written, under the next generation.
        let rounds = running.progress.borrow().rounds;
        gpus3.publish(gpus(2)).expect("publish");
        let changed = running.round_after(rounds).await;
        assert_eq!(changed.generation, 2);
        let pool = self::pool(&server, DRIVER, "node-a");
        assert_eq!(devices_and_generations(&pool), (vec!["gpu-0".into(), "gpu-1".into()], vec![2]));
        assert_eq!(slice_writes(&server), 2);
        running.stop().await;
    }

    /// Twenty changes in a burst are written as the newest state, in
    /// rounds at least `min_interval` apart (the server's clock says so).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_burst_of_changes_is_coalesced_and_paced() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let gpus4 = state(gpus(4));
        let mut running = start(&server, &gpus4, Pacing::default());
        running.round_after(0).await;
        for flip in 0..20 {
            let mut devices = gpus(4);
            devices[flip % 4] = Device::new(format!("gpu-{}", flip % 4), Health::Unhealthy);
            gpus4.publish(devices).expect("publish");
        }
        // The newest state: gpu-3 Unhealthy, so left out (no taints here).
        until("the newest state is published", || {
            devices_and_generations(&pool(&server, DRIVER, "node-a")).0 == ["gpu-0", "gpu-1", "gpu-2"]
        })
        .await;
        // The publisher records a round after the server has answered its
        // write: wait for the record before comparing the two.
        let slice_writes_now = || server.requests().into_iter().filter(|r| r.is_slice_write()).count() as i64;
        until("the publisher has recorded its last round", || {
            running.progress.borrow().generation == slice_writes_now()
        })
        .await;
        let generation = running.progress.borrow().generation;
        assert!(generation <= 3, "20 changes were coalesced, not written one by one: generation {generation}");
        let writes: Vec<_> = server.requests().into_iter().filter(|r| r.is_slice_write()).collect();
        assert_eq!(writes.len() as i64, generation, "one write a round (one slice): {writes:?}");
        for pair in writes.windows(2) {
            let gap = pair[1].at.duration_since(pair[0].at);
            assert!(gap >= Duration::from_secs(1), "two rounds {gap:?} apart");
        }
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_large_pool_is_split_and_shrinks_without_leftovers() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let many = state(gpus(300));
        let mut running = start(&server, &many, Pacing::default());
        running.round_after(0).await;
        let pool = pool(&server, DRIVER, "node-a");
        let sizes: Vec<usize> =
            pool.values().map(|s| s["spec"]["devices"].as_array().expect("devices").len()).collect();
        assert_eq!(sizes, [128, 128, 44], "{:?}", pool.keys());
        assert!(pool.values().all(|s| s["spec"]["pool"]["resourceSliceCount"] == 3));
        assert_eq!(devices_and_generations(&pool).0.len(), 300);
        assert_eq!(devices_and_generations(&pool).1, [1]);

        let rounds = running.progress.borrow().rounds;
        many.publish(gpus(100)).expect("publish");
        let shrunk = running.round_after(rounds).await;
        let pool = self::pool(&server, DRIVER, "node-a");
        assert_eq!(pool.keys().collect::<Vec<_>>(), ["node-a-gpu.example.com-0"], "the extra slices are deleted");
        assert_eq!(devices_and_generations(&pool).1, [shrunk.generation]);
        assert_eq!(shrunk.generation, 2);
        assert_eq!(pool["node-a-gpu.example.com-0"]["spec"]["pool"]["resourceSliceCount"], 1);
        running.stop().await;
    }

    /// What an earlier devhost published: kept untouched when it is still
    /// right, and otherwise replaced under a higher generation, with its
    /// extra slices deleted; other drivers' and other nodes' slices are
    /// never touched.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_earlier_instances_slices_are_adopted() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let owner = {
            let client = client_for_url(&server.url()).expect("client");
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
            let node = nodes.get("node-a").await.expect("node");
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: "node-a".into(),
                uid: node.metadata.uid.expect("uid"),
                controller: Some(true),
                block_owner_deletion: None,
            }
        };
        let earlier = |driver: &str, node: &str, generation: i64, devices: usize| {
            let state = state(gpus(devices));
            let source = SliceSource { driver, node, generation, owner: Some(owner.clone()), taints: false };
            slices(&source, &state.snapshot())
        };
        // Still right: adopted as it is, not one write.
        for slice in earlier(DRIVER, "node-a", 5, 3) {
            server.put_slice(serde_json::to_value(slice).expect("json"));
        }
        let gpus3 = state(gpus(3));
        let mut running = start(&server, &gpus3, Pacing::default());
        let adopted = running.round_after(0).await;
        assert_eq!((adopted.generation, adopted.writes), (5, 0));
        assert_eq!(slice_writes(&server), 0);
        running.stop().await;

        // Stale: three slices of generation 7 where one is needed now.
        for slice in earlier(DRIVER, "node-a", 7, 260) {
            server.put_slice(serde_json::to_value(slice).expect("json"));
        }
        let neighbours: Vec<Value> = earlier(DRIVER, "node-b", 3, 2)
            .into_iter()
            .chain(earlier("nic.example.com", "node-a", 4, 2))
            .map(|s| serde_json::to_value(s).expect("json"))
            .collect();
        for slice in &neighbours {
            server.put_slice(slice.clone());
        }
        let before = server.slices();
        let mut running = start(&server, &gpus3, Pacing::default());
        let replaced = running.round_after(0).await;
        assert_eq!(replaced.generation, 8, "above every generation found");
        let pool = pool(&server, DRIVER, "node-a");
        assert_eq!(pool.keys().collect::<Vec<_>>(), ["node-a-gpu.example.com-0"]);
        assert_eq!(devices_and_generations(&pool), (vec!["gpu-0".into(), "gpu-1".into(), "gpu-2".into()], vec![8]));
        let after = server.slices();
        for slice in &neighbours {
            let name = slice["metadata"]["name"].as_str().expect("name");
            assert_eq!(after.get(name), before.get(name), "{name} untouched");
        }
        running.stop().await;
    }

    /// The server answers 503 for a while: the publisher retries with
    /// growing waits, on the newest state, and publishes it once the
    /// server is back; the Node it could not read is looked up then.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_unavailable_api_server_is_retried_with_the_newest_state() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        server.set_unavailable(true);
        let pacing = Pacing {
            min_interval: Duration::from_millis(100),
            backoff_start: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            ..Pacing::default()
        };
        let gpus2 = state(gpus(2));
        let mut running = start(&server, &gpus2, pacing);
        until("four failed attempts", || server.requests().iter().filter(|r| r.status == 503).count() >= 4).await;
        let reported = tokio::time::timeout(WAIT, running.progress.wait_for(|p| p.error.is_some())).await;
        let error = reported.expect("in time").expect("running").error.clone().expect("the error is reported");
        assert!(error.contains("unavailable"), "{error}");
        assert_eq!(running.progress.borrow().rounds, 0);
        let failed: Vec<_> = server.requests().into_iter().filter(|r| r.status == 503).collect();
        for (pair, least) in failed.windows(2).zip([50, 100, 200]) {
            let gap = pair[1].at.duration_since(pair[0].at);
            assert!(gap >= Duration::from_millis(least), "retried after {gap:?}, not after at least {least} ms");
        }
        gpus2.publish(gpus(5)).expect("publish");
        gpus2.publish(gpus(4)).expect("publish");
        server.set_unavailable(false);
        let recovered = running.round_after(0).await;
        assert_eq!((recovered.generation, recovered.error), (1, None));
        let pool = pool(&server, DRIVER, "node-a");
        assert_eq!(devices_and_generations(&pool).0.len(), 4, "the newest state");
        assert_eq!(pool["node-a-gpu.example.com-0"]["metadata"]["ownerReferences"][0]["name"], "node-a");
        running.stop().await;
    }

    /// Someone else changed the slice (a higher generation, a new
    /// resourceVersion): the replace is refused with 409, the next round
    /// reads the server again and publishes above that generation.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_slice_changed_behind_its_back_is_read_again() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let pacing = Pacing { backoff_start: Duration::from_millis(50), ..Pacing::default() };
        let gpus3 = state(gpus(3));
        let mut running = start(&server, &gpus3, pacing);
        running.round_after(0).await;
        let mut theirs = server.slices()["node-a-gpu.example.com-0"].clone();
        theirs["spec"]["pool"]["generation"] = 41.into();
        server.put_slice(theirs);
        let rounds = running.progress.borrow().rounds;
        gpus3.publish(gpus(1)).expect("publish");
        let after = running.round_after(rounds).await;
        assert!(server.requests().iter().any(|r| r.status == 409), "{:?}", server.requests());
        assert_eq!(after.generation, 42);
        let pool = pool(&server, DRIVER, "node-a");
        assert_eq!(devices_and_generations(&pool), (vec!["gpu-0".into()], vec![42]));
        running.stop().await;
    }

    /// A server that takes requests and never answers: stopping the
    /// publisher does not wait for it (a backend reload or a shutdown
    /// would otherwise hang behind the API server).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_hung_api_server_never_holds_up_a_stop() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        server.set_hanging(true);
        let running = start(&server, &state(gpus(2)), Pacing::default());
        until("a request is left hanging", || server.requests().iter().any(|r| r.status == 0)).await;
        let stopped = tokio::time::timeout(Duration::from_secs(5), running.stop()).await;
        assert!(stopped.is_ok(), "the stop waited for the hung server");
    }

    /// The taint of `device` in `pool`, if it has one.
    fn taint(pool: &BTreeMap<String, Value>, device: &str) -> Option<Value> {
        pool.values()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == device)
            .and_then(|d| d["taints"].get(0).cloned())
    }

    /// gpu-0..gpu-2, those in `sick` Unhealthy.
    fn with_unhealthy(sick: &[usize]) -> Vec<Device> {
        (0..3)
            .map(|i| {
                Device::new(format!("gpu-{i}"), if sick.contains(&i) { Health::Unhealthy } else { Health::Healthy })
            })
            .collect()
    }

    /// Issue 24, item 5: with device taints the server stamps each taint's
    /// `timeAdded`, so what it holds never equals what devhost sends byte
    /// for byte. Six hours of five-minute re-reads (72 re-reads 20 ms apart,
    /// the server's clock an hour on), two registrations by the kubelet and
    /// a restart of the publisher write nothing; a real change is written
    /// once, the taint that stays keeps the time the server first gave it,
    /// and the new one gets the server's time of the write.
    #[tokio::test(flavor = "multi_thread")]
    async fn with_taints_hours_of_re_reads_registrations_and_a_restart_write_nothing() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let gpus3 = state(with_unhealthy(&[1]));
        let pacing = Pacing { resync: Duration::from_millis(20), ..Pacing::default() };
        let mut running = start_with(&server, &gpus3, pacing.clone(), true, true);
        let first = running.round_after(0).await;
        assert_eq!((first.generation, first.writes), (1, 1));
        let stamped = taint(&pool(&server, DRIVER, "node-a"), "gpu-1").expect("gpu-1 is tainted")["timeAdded"].clone();
        assert!(stamped.is_string(), "the server stamped the taint: {stamped}");
        server.advance_clock(Duration::from_secs(3600));

        let re_reads = running.progress.borrow().rounds + 72;
        until("72 re-reads, or a write", || running.progress.borrow().rounds >= re_reads || slice_writes(&server) > 1)
            .await;
        assert_eq!(slice_writes(&server), 1, "six hours of re-reads wrote: {:?}", server.requests());
        for _ in 0..2 {
            let rounds = running.progress.borrow().rounds;
            running.resync.notify_one();
            running.round_after(rounds).await;
        }
        running.stop().await;
        let mut running = start_with(&server, &gpus3, pacing, true, true);
        let restarted = running.round_after(0).await;
        assert_eq!((restarted.generation, restarted.writes), (1, 0), "the restarted publisher adopts the pool");
        let rounds = running.progress.borrow().rounds;
        running.round_after(rounds + 12).await;
        let writes: Vec<_> = server.requests().into_iter().filter(|r| r.is_slice_write()).collect();
        assert_eq!(writes.len(), 1, "only the first publication: {writes:?}");

        // A real change: gpu-0 goes Unhealthy too.
        let rounds = running.progress.borrow().rounds;
        gpus3.publish(with_unhealthy(&[0, 1])).expect("publish");
        let changed = running.round_after(rounds).await;
        assert_eq!((changed.generation, changed.writes), (2, 1));
        let pool = pool(&server, DRIVER, "node-a");
        assert_eq!(taint(&pool, "gpu-1").expect("gpu-1")["timeAdded"], stamped, "the lasting taint keeps its time");
        let new = taint(&pool, "gpu-0").expect("gpu-0 is tainted")["timeAdded"].clone();
        assert!(
            new.as_str() > stamped.as_str(),
            "the new taint has the server's time, an hour on: {new} after {stamped}"
        );
        running.stop().await;
    }

    /// Issue 24, item 3, the watch itself: a slice deleted behind the
    /// publisher's back is back within a second; the watch is renewed at
    /// its timeout from where it was (no read of the pool); while the
    /// server is away it is tried again with back-off, not in a loop, and
    /// works once it is back; a watch the server can no longer resume
    /// starts afresh, and the pool is read again.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_watch_brings_deleted_slices_back_and_outlives_outages() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let pacing = Pacing {
            min_interval: Duration::from_millis(100),
            backoff_start: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            watch_timeout: Duration::from_secs(1),
            ..Pacing::default()
        };
        let gpus2 = state(gpus(2));
        let mut running = start_with(&server, &gpus2, pacing, false, true);
        running.round_after(0).await;
        let watches = || server.requests().into_iter().filter(|r| r.is_watch()).collect::<Vec<_>>();
        until("the pool is watched", || !watches().is_empty()).await;
        let slice = "node-a-gpu.example.com-0";
        let back_within = |limit: Duration| {
            let server = &server;
            async move {
                assert!(server.delete_slice(slice), "it was there");
                let deleted = tokio::time::Instant::now();
                while !server.slices().contains_key(slice) {
                    assert!(deleted.elapsed() < limit, "not back within {limit:?}: {:?}", server.requests());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        back_within(Duration::from_secs(1)).await;

        // Renewed at the server's end of each watch, from its bookmark.
        let lists = || server.requests().iter().filter(|r| r.is_slice_list()).count();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (listed, watched) = (lists(), watches().len());
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let renewed = &watches()[watched..];
        assert!(renewed.len() >= 2, "{renewed:?}");
        let resumed =
            |r: &&devhost::fake_apiserver::Request| !r.query.split('&').any(|pair| pair == "resourceVersion=");
        assert!(renewed.iter().all(|r| r.status == 200 && resumed(&r)), "from a version: {renewed:?}");
        assert_eq!(lists(), listed, "renewing the watch reads nothing");

        // The server goes away for a second: the watch is retried with
        // growing pauses (50, 100, 200, 400 ms), then works again.
        let watched = watches().len();
        server.set_unavailable(true);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let refused = watches()[watched..].iter().filter(|r| r.status == 503).count();
        assert!((2..=6).contains(&refused), "{refused} watches refused in a second");
        server.set_unavailable(false);
        let watched = watches().len();
        until("the pool is watched again", || watches()[watched..].iter().any(|r| r.status == 200)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        back_within(Duration::from_secs(2)).await;

        // A deletion while the watch is down, and the server's history of
        // it forgotten: the watch cannot resume (410 Expired), starts
        // afresh, the pool is read again, and the slice comes back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listed = lists();
        server.set_unavailable(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(server.delete_slice(slice), "it was there");
        server.forget_history();
        server.set_unavailable(false);
        let deleted = tokio::time::Instant::now();
        while !server.slices().contains_key(slice) {
            assert!(deleted.elapsed() < Duration::from_secs(3), "not back: {:?}", server.requests());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lists(), listed + 1, "read again once");
        running.stop().await;
    }

    /// `remove` deletes the pool and nothing else.
    #[tokio::test(flavor = "multi_thread")]
    async fn remove_deletes_the_pool_only() {
        let server = FakeApiServer::start().await.expect("server");
        server.add_node("node-a");
        let many = state(gpus(200));
        let mut running = start(&server, &many, Pacing::default());
        running.round_after(0).await;
        let foreign = serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "node-a-nic", "labels": {"devhost.io/driver": "nic.example.com"}},
            "spec": {"driver": "nic.example.com", "nodeName": "node-a",
                     "pool": {"name": "node-a", "generation": 1, "resourceSliceCount": 1}, "devices": []},
        });
        server.put_slice(foreign);
        let mut publisher = running.stop().await;
        assert_eq!(pool(&server, DRIVER, "node-a").len(), 2, "stopping leaves the slices for the next devhost");
        publisher.remove().await.expect("remove");
        assert!(pool(&server, DRIVER, "node-a").is_empty(), "{:?}", server.slices().keys());
        assert_eq!(server.slices().keys().collect::<Vec<_>>(), ["node-a-nic"], "another driver's slice stays");
    }
}

/// A native 1.1 module through DRA: its attributes and capacity in the
/// slice, its allocate answer in the claim's CDI spec, and `release` on
/// unprepare; a release that fails keeps the claim (the kubelet asks
/// again) until one succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_native_module_is_served_through_dra_and_released_on_unprepare() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = crate::native_loader::compile_c(
        &crate::harness::repo().join("tests/fixtures/native/attributes_1_1.c"),
        &modules,
    );
    let (log, fail) = (node.dir.path().join("release.log"), node.dir.path().join("scrub-fails"));
    node.backend(
        "fixture",
        &format!(
            "[backend]\nmodule = {:?}\n[config]\nrelease_log = {:?}\nfail_while = {:?}\n[resources.\"fixture.example.com/gpu\"]\napi = \"dra\"\n",
            module.display().to_string(),
            log.display().to_string(),
            fail.display().to_string()
        ),
    );
    let dra = DraNode::around(node, "gpu.fixture.example.com", PathBuf::new()).await;
    let devhost = dra.node.start_devhost();
    dra.until("the slice is published", &devhost, |d| d.published().0 == ["fixture-0", "fixture-1"]).await;
    let device = dra.device("fixture-0").expect("fixture-0");
    assert_eq!(device["attributes"]["example.com/model"], json!({"string": "fixture-9000"}));
    assert_eq!(device["attributes"]["driverVersion"], json!({"version": "550.54.15"}));
    assert_eq!(device["capacity"]["example.com/memory"], json!({"value": "80Gi"}));

    dra.server.put_claim(claim_of("gpu.fixture.example.com", "native", "uid-n", &[("gpu", "node-a", "fixture-1")]));
    let answer = dra.prepare(&devhost, &[("ml", "uid-n", "native")]).await;
    assert_eq!(answer.claims["uid-n"].error, "", "{answer:?}");
    let spec: Value = serde_json::from_str(&read(&dra.cdi_spec("uid-n"))).expect("CDI JSON");
    crate::sharing::assert_valid_cdi(&spec);
    assert_eq!(spec["devices"][0]["containerEdits"]["env"], json!(["FIXTURE_DEVICE=fixture-1"]));

    std::fs::write(&fail, "").expect("make release fail");
    let claims = [("ml", "uid-n", "native")];
    let failed = dra.watcher.unprepare(&dra.driver, &claims).await.expect("answered");
    let error = &failed.claims["uid-n"].error;
    assert!(error.contains("release failed") && error.contains("scrub failed"), "{error}");
    assert!(dra.checkpoint()["claims"]["uid-n"].is_object(), "kept until released");
    std::fs::remove_file(&fail).expect("let release succeed");
    let undone = dra.watcher.unprepare(&dra.driver, &claims).await.expect("answered");
    assert_eq!(undone.claims["uid-n"].error, "");
    assert_eq!(read(&log), "fixture.example.com/gpu fixture-1\n", "released once, with the claim's device");
    assert!(!dra.cdi_spec("uid-n").exists());

    // Stopping (a rolling update) leaves the slices for the next devhost.
    let mut devhost = devhost;
    devhost.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    assert_eq!(dra.published().0, ["fixture-0", "fixture-1"]);
}

/// A WASM component through DRA: prepared, and released on unprepare (the
/// example counts releases in an attribute, which reaches the slice).
#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_component_is_served_through_dra_and_released_on_unprepare() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = crate::wasm::component("devhost_example_wasm_rust", &modules);
    let text = crate::wasm::wasm_file(
        &module,
        &node.dir.path().join("cache"),
        "poll_interval_ms = 50",
        "devices = 2\nrelease = true",
    ) + "[resources.\"example.com/wasm-rust\"]\napi = \"dra\"\n";
    node.backend("wasm", &text);
    let dra = DraNode::around(node, "wasm-rust.example.com", PathBuf::new()).await;
    let devhost = dra.node.start_devhost();
    dra.until("the slice is published", &devhost, |d| d.published().0 == ["wasm-0", "wasm-1"]).await;
    let releases =
        |d: &DraNode| d.device("wasm-1").map(|device| device["attributes"]["example.com/releases"]["int"].clone());
    assert_eq!(releases(&dra), Some(json!(0)));

    dra.server.put_claim(claim_of("wasm-rust.example.com", "wasm", "uid-w", &[("gpu", "node-a", "wasm-1")]));
    let answer = dra.prepare(&devhost, &[("ml", "uid-w", "wasm")]).await;
    let prepared = &answer.claims["uid-w"];
    assert_eq!(prepared.error, "", "{answer:?}");
    // The component's own name (example.com/wasm=wasm-1) is left out: no
    // spec defines it, and a runtime would refuse the container.
    assert_eq!(prepared.devices[0].cdi_device_ids, ["k8s.wasm-rust.example.com/claim=uid-w-gpu"]);
    let spec: Value = serde_json::from_str(&read(&dra.cdi_spec("uid-w"))).expect("CDI JSON");
    crate::sharing::assert_valid_cdi(&spec);
    assert_eq!(spec["devices"][0]["containerEdits"]["env"], json!(["EXAMPLE_WASM_DEVICES=wasm-1"]));

    let undone = dra.watcher.unprepare(&dra.driver, &[("ml", "uid-w", "wasm")]).await.expect("answered");
    assert_eq!(undone.claims["uid-w"].error, "");
    dra.until("the component counted the release", &devhost, |d| releases(d) == Some(json!(1))).await;
}

/// A backend that panics in allocate fails the claims it was asked for,
/// each with its own error, while the batch is answered and a neighbour
/// backend's resource keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_fault_during_prepare_fails_that_claim_only() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = crate::native_loader::rust_module("devhost_fixture_native_panic", &modules);
    node.backend(
        "panic",
        &format!(
            "[backend]\nmodule = {:?}\n[resources.\"fixture.example.com/panic\"]\napi = \"dra\"\n",
            module.display().to_string()
        ),
    );
    node.backend("nic", &static_backend(&[("example.com/nic", &["nic-0"])], None));
    let dra = DraNode::around(node, "panic.fixture.example.com", PathBuf::new()).await;
    let devhost = dra.node.start_devhost();
    dra.kubelet.wait_for_registrations("example.com/nic", 1, WAIT).await.expect("the neighbour registers");
    dra.until("the slice is published", &devhost, |d| d.published().0 == ["p-0", "p-1"]).await;
    dra.server.put_claim(claim_of("panic.fixture.example.com", "boom", "uid-b", &[("gpu", "node-a", "p-0")]));
    let answer = dra.prepare(&devhost, &[("ml", "uid-b", "boom"), ("ml", "uid-x", "boom")]).await;
    let error = &answer.claims["uid-b"].error;
    assert!(error.contains("allocate failed") && error.contains("exploded on purpose"), "{error}");
    assert!(answer.claims["uid-x"].error.contains("has UID \"uid-b\""), "{answer:?}");
    assert!(!dra.cdi_spec("uid-b").exists());
    let nic = dra.kubelet.allocate("example.com/nic", &["nic-0"]).await.expect("the neighbour serves");
    assert_eq!(nic.container_responses[0].envs["IDS"], "nic-0");
    let again = dra.prepare(&devhost, &[("ml", "uid-b", "boom")]).await;
    assert!(again.claims["uid-b"].error.contains("allocate failed"), "tried again, not remembered: {again:?}");
}

/// A resource moves between the device plugin API and DRA by editing its
/// file: served one way at a time, each way in turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_moves_between_device_plugin_and_dra_by_hot_reload() {
    let node = Node::new();
    let plain = static_backend(&[("example.com/gpu", &["gpu-0"])], None);
    node.backend("gpu", &plain);
    let dra = DraNode::around(node, GPU_DRIVER, PathBuf::new()).await;
    let devhost = dra.node.start_devhost();
    dra.kubelet.wait_for_registrations("example.com/gpu", 1, WAIT).await.expect("a device plugin first");
    assert!(dra.watcher.driver(GPU_DRIVER).is_none());

    dra.node.backend("gpu", &(plain.clone() + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n"));
    devhost.reload().await;
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("then a DRA driver");
    dra.until("the device plugin socket is gone", &devhost, |d| {
        !d.node.sockets().iter().any(|s| s.contains("example.com_gpu"))
    })
    .await;
    dra.until("the slice is published", &devhost, |d| d.published().0 == ["gpu-0"]).await;

    dra.node.backend("gpu", &plain);
    devhost.reload().await;
    dra.kubelet.wait_for_registrations("example.com/gpu", 2, WAIT).await.expect("a device plugin again");
    dra.until("the DRA driver is gone", &devhost, |d| d.watcher.driver(GPU_DRIVER).is_none()).await;
    dra.until("its slices are deleted", &devhost, |d| d.published().0.is_empty()).await;
}

/// With `[dra] device_taints = true` an Unhealthy device stays in the
/// slice with a `NoSchedule` taint saying why, instead of leaving it.
#[tokio::test(flavor = "multi_thread")]
async fn with_device_taints_an_unhealthy_device_is_published_tainted() {
    let dra = DraNode::start().await;
    let config = dra.node.config_file();
    let text = std::fs::read_to_string(&config).expect("host config");
    assert!(text.trim_end().ends_with(&format!("kubeconfig = {:?}", dra.node.dir.path().join("kubeconfig.yaml"))));
    std::fs::write(&config, text + "device_taints = true\n").expect("host config");
    std::fs::remove_file(dra.state.join("gpu-1.ok")).expect("make gpu-1 unhealthy");
    let devhost = dra.node.start_devhost();
    dra.until("both devices are published", &devhost, |d| d.published().0 == ["gpu-0", "gpu-1"]).await;
    dra.until("gpu-1 is tainted", &devhost, |d| d.device("gpu-1").is_some_and(|gpu| gpu["taints"].is_array())).await;
    let taint = &dra.device("gpu-1").expect("gpu-1")["taints"][0];
    assert_eq!((taint["key"].as_str(), taint["effect"].as_str()), (Some("devhost.io/unhealthy"), Some("NoSchedule")));
    assert!(dra.device("gpu-0").expect("gpu-0").get("taints").is_none_or(Value::is_null), "a healthy device has none");
}

/// A claim is answered only once it is in the checkpoint: when the
/// checkpoint cannot be written, every new claim of the batch fails with
/// the reason and leaves no CDI spec; the kubelet's retry then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_that_cannot_be_recorded_is_not_prepared() {
    let dra = DraNode::start().await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    dra.server.put_claim(claim("a", "uid-a", &[("gpus", "node-a", "gpu-0")]));
    dra.server.put_claim(claim("b", "uid-b", &[("gpus", "node-a", "gpu-1")]));
    let checkpoint = dra.node.dir.path().join("plugins/gpu.example.com/devhost-claims.json");
    // A directory where the file goes: the rename over it fails.
    std::fs::create_dir_all(checkpoint.join("blocked")).expect("block the checkpoint");
    let batch = [("ml", "uid-a", "a"), ("ml", "uid-b", "b")];
    let answer = dra.watcher.prepare(GPU_DRIVER, &batch).await.expect("answered");
    for uid in ["uid-a", "uid-b"] {
        let claim = &answer.claims[uid];
        assert!(claim.error.contains("DRA checkpoint") && claim.devices.is_empty(), "{claim:?}");
        assert!(!dra.cdi_spec(uid).exists(), "no spec left for {uid}");
    }
    std::fs::remove_dir_all(&checkpoint).expect("unblock");
    let answer = dra.watcher.prepare(GPU_DRIVER, &batch).await.expect("answered");
    assert!(answer.claims.values().all(|claim| claim.error.is_empty()), "{answer:?}");
    assert!(dra.cdi_spec("uid-a").exists() && dra.cdi_spec("uid-b").exists());
    assert_eq!(dra.checkpoint()["claims"].as_object().expect("claims").len(), 2, "{}", devhost.log());
}

/// A rolling update: the new devhost serves beside the old one, each on its
/// own sockets (registered side by side, as kubelets from 1.33 do), and a
/// claim one of them prepared while both ran is unprepared by the other
/// after the first stopped: the checkpoint they share is read afresh under
/// a lock, so the CDI spec goes and `release` runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_update_shares_prepared_claims_between_the_two_devhosts() {
    let dra = DraNode::start().await;
    let first = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the first registers");
    let second = dra.node.start_another_devhost("devhost-2.log");
    second.wait_for_log("registered with the kubelet as a DRA driver").await;
    let sockets = std::fs::read_dir(dra.node.dir.path().join("plugins_registry")).expect("registry").count();
    assert_eq!(sockets, 2, "each devhost its own registration socket");

    dra.server.put_claim(claim("r", "uid-r", &[("gpus", "node-a", "gpu-0")]));
    let answer = dra.prepare(&first, &[("ml", "uid-r", "r")]).await;
    assert_eq!(answer.claims["uid-r"].error, "");
    assert!(dra.cdi_spec("uid-r").exists());
    let logged = |devhost: &Devhost| devhost.log().contains("claim prepared");
    dra.until("one of them logged the claim", &first, |_| logged(&first) || logged(&second)).await;
    let (mut preparer, survivor) =
        if first.log().contains("claim prepared") { (first, second) } else { (second, first) };
    preparer.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    dra.until("only the survivor is registered", &survivor, |d| {
        std::fs::read_dir(d.node.dir.path().join("plugins_registry")).map(|dir| dir.count()).unwrap_or(0) == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let undone = loop {
        match dra.watcher.unprepare(GPU_DRIVER, &[("ml", "uid-r", "r")]).await {
            Ok(undone) => break undone,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(undone.claims["uid-r"].error, "");
    assert!(!dra.cdi_spec("uid-r").exists(), "the survivor knew the claim and removed its spec:\n{}", survivor.log());
    survivor.wait_for_log("claim unprepared").await;
}

/// Deletes `slice` behind devhost's back and waits, at most `limit`, for
/// devhost to publish it again.
async fn comes_back(dra: &DraNode, devhost: &Devhost, slice: &str, limit: std::time::Duration, what: &str) {
    assert!(dra.server.delete_slice(slice), "{what}: the slice was there");
    let deleted = tokio::time::Instant::now();
    while !dra.server.slices().contains_key(slice) {
        assert!(deleted.elapsed() < limit, "{what}: not published again within {limit:?}; log:\n{}", devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How many times a ResourceSlice was written (created, replaced, deleted).
fn slice_writes(dra: &DraNode) -> usize {
    dra.server.requests().iter().filter(|r| r.is_slice_write()).count()
}

/// Issue 24, item 3: a restarting kubelet deletes the node's slices in the
/// background, and the deletion can land after devhost registered the
/// driver again. Slices deleted after the registration are back within
/// seconds, the five-minute re-read left as it is (devhost watches its own
/// slices), after a kubelet restart too; and the watch is all a quiet pool
/// costs: one open connection, no reads, no writes.
#[tokio::test(flavor = "multi_thread")]
async fn slices_deleted_after_the_driver_registered_come_back_within_seconds() {
    const SLICE: &str = "node-a-gpu.example.com-0";
    let seconds = std::time::Duration::from_secs;
    let dra = DraNode::start().await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    dra.until("the slices are published", &devhost, |d| d.published().0 == ["gpu-0", "gpu-1"]).await;
    // The watch opens beside the first publication; a devhost without one
    // gets the same few seconds.
    let watching = |d: &DraNode| d.server.requests().iter().any(|r| r.is_watch() && r.status == 200);
    let deadline = tokio::time::Instant::now() + seconds(5);
    while !watching(&dra) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    comes_back(&dra, &devhost, SLICE, seconds(5), "deleted after the registration").await;

    // A kubelet restart: the new plugin watcher registers the driver, and
    // the kubelet's deletion lands after that.
    let registered = |log: String| log.matches("registered with the kubelet as a DRA driver").count();
    let before = registered(devhost.log());
    dra.watcher.stop();
    let watcher = FakePluginWatcher::start(dra.node.dir.path(), KUBELET_1_37).await.expect("watcher");
    let dra = DraNode { watcher, ..dra };
    dra.until("registered again after a kubelet restart", &devhost, |_| registered(devhost.log()) > before).await;
    comes_back(&dra, &devhost, SLICE, seconds(5), "deleted after the kubelet restarted and registered the driver")
        .await;

    // Quiet: nothing read or written, one watch open all along.
    tokio::time::sleep(seconds(2)).await;
    let from = dra.server.requests().len();
    tokio::time::sleep(seconds(3)).await;
    let calls: Vec<_> = dra.server.requests()[from..]
        .iter()
        .filter(|r| r.path.starts_with("/apis/resource.k8s.io/v1/resourceslices"))
        .cloned()
        .collect();
    assert!(calls.is_empty(), "a quiet pool costs no requests: {calls:?}");
    let watches: Vec<_> = dra.server.requests().into_iter().filter(|r| r.is_watch()).collect();
    assert_eq!(watches.len(), 1, "one watch connection: {watches:?}");
}

/// Issue 24, item 5, through the daemon: with `device_taints = true` and a
/// tainted device, the API server stamps the taint's `timeAdded`. Two
/// kubelet restarts (each registers the driver again, which re-reads the
/// pool) and a devhost restart (which adopts it) write nothing, so the
/// taint keeps the time it was first given (the server's clock is an hour
/// on by then); a real change is written once, with that time kept.
#[tokio::test(flavor = "multi_thread")]
async fn with_device_taints_re_registrations_and_a_restart_write_nothing() {
    let seconds = std::time::Duration::from_secs;
    let dra = DraNode::start().await;
    let config = dra.node.config_file();
    let text = std::fs::read_to_string(&config).expect("host config");
    std::fs::write(&config, text + "device_taints = true\n").expect("host config");
    std::fs::remove_file(dra.state.join("gpu-1.ok")).expect("make gpu-1 unhealthy");
    let mut devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(GPU_DRIVER, WAIT).await.expect("the driver registers");
    dra.until("gpu-1 is published tainted", &devhost, |d| d.device("gpu-1").is_some_and(|g| g["taints"].is_array()))
        .await;
    let time = |d: &DraNode, device: &str| d.device(device).expect("published")["taints"][0]["timeAdded"].clone();
    let stamped = time(&dra, "gpu-1");
    assert!(stamped.is_string(), "the server stamped the taint: {stamped}");
    // The registration's re-read and the first publication settle.
    tokio::time::sleep(seconds(2)).await;
    dra.server.advance_clock(seconds(3600));
    let writes = slice_writes(&dra);

    let registered = |log: String| log.matches("registered with the kubelet as a DRA driver").count();
    let mut dra = dra;
    for restart in 0..2 {
        let before = registered(devhost.log());
        dra.watcher.stop();
        let watcher = FakePluginWatcher::start(dra.node.dir.path(), KUBELET_1_37).await.expect("watcher");
        dra = DraNode { watcher, ..dra };
        dra.until("registered again", &devhost, |_| registered(devhost.log()) > before).await;
        tokio::time::sleep(seconds(1)).await;
        assert_eq!(slice_writes(&dra), writes, "kubelet restart {restart}: {:?}", dra.server.requests());
    }
    devhost.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    let devhost = dra.node.start_another_devhost("devhost-2.log");
    devhost.wait_for_log("registered with the kubelet as a DRA driver").await;
    let address = devhost.metrics_address().await;
    let up = "devhost_dra_slices_up{driver=\"gpu.example.com\"} 1";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !crate::harness::http_get(&address, "/metrics").await.1.lines().any(|line| line == up) {
        assert!(tokio::time::Instant::now() < deadline, "the new devhost never read the pool; log:\n{}", devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(seconds(2)).await;
    assert_eq!(slice_writes(&dra), writes, "after a devhost restart: {:?}", dra.server.requests());
    assert_eq!(time(&dra, "gpu-1"), stamped);
    assert_eq!(dra.published().1, [1], "one generation all along");

    // A real change: gpu-0 goes Unhealthy too.
    std::fs::remove_file(dra.state.join("gpu-0.ok")).expect("make gpu-0 unhealthy");
    dra.until("gpu-0 is published tainted", &devhost, |d| d.device("gpu-0").is_some_and(|g| g["taints"].is_array()))
        .await;
    tokio::time::sleep(seconds(1)).await;
    assert_eq!(slice_writes(&dra), writes + 1, "one write for the change: {:?}", dra.server.requests());
    assert_eq!(time(&dra, "gpu-1"), stamped, "the lasting taint keeps its time");
    let new = time(&dra, "gpu-0");
    assert!(new.as_str() > stamped.as_str(), "the new taint has the server's time, an hour on: {new} after {stamped}");
    assert_eq!(dra.published().1, [2]);
}

/// Issue 24, item 7: a backend's Allocate annotations cannot reach a
/// container through DRA (the kubelet hands the runtime only CDI devices):
/// claims are prepared with the rest of the answer, the annotations are
/// left out of the claim's CDI spec, and the log says so once per driver,
/// naming them.
#[tokio::test(flavor = "multi_thread")]
async fn annotations_on_the_dra_path_are_left_out_and_said_once() {
    let node = Node::new();
    let text = static_backend(&[("example.com/gpu", &["gpu-0", "gpu-1"])], None)
        .replace("env = { IDS", "annotations = { \"example.com/allocated-by\" = \"devhost\" }\nenv = { IDS")
        + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    node.backend("gpu", &text);
    let dra = DraNode::around(node, GPU_DRIVER, PathBuf::new()).await;
    dra.server.put_claim(claim("a", "uid-a", &[("gpus", "node-a", "gpu-0")]));
    dra.server.put_claim(claim("b", "uid-b", &[("gpus", "node-a", "gpu-1")]));
    let devhost = dra.node.start_devhost();
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b")] {
        let answer = dra.prepare(&devhost, &[("ml", uid, name)]).await;
        assert_eq!(answer.claims[uid].error, "", "prepared without its annotations: {answer:?}");
        let spec = read(&dra.cdi_spec(uid));
        assert!(spec.contains("IDS=") && !spec.contains("allocated-by"), "{spec}");
    }
    let log = devhost.log();
    assert_eq!(log.matches("carries container annotations").count(), 1, "said once:\n{log}");
    assert!(log.contains("example.com/allocated-by"), "the annotation is named:\n{log}");
}
