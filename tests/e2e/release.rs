//! Who holds which device, and `release` (issue 15, item 2), end to end:
//! the real devhost binary, a real 1.1 module, the fake kubelet for the
//! device plugin API and the fake kubelet's PodResources API for who holds
//! what. A pod that goes away gets its devices released exactly once, each
//! advertised Unhealthy while it is scrubbed; a failing release keeps the
//! device Unhealthy, with the reason, until a release succeeds; a
//! PodResources API that is absent, slow or restarting changes nothing
//! else, and a restarted kubelet's first answers release nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devhost::fake_kubelet::{FakeKubelet, FakePodResources};

use crate::harness::{Devhost, Node, WAIT, http_get, repo};
use crate::native_loader::compile_c;

const GPU: &str = "fixture.example.com/gpu";

/// A node whose devhost asks the PodResources socket it returns every
/// 100 ms, serving the 1.1 fixture with `config` (TOML lines).
fn node_with(config: &str, restart_grace_ms: u64) -> (Node, PathBuf) {
    let node = Node::new();
    let socket = node.dir.path().join("pod-resources/kubelet.sock");
    std::fs::write(
        node.config_file(),
        format!(
            "call_timeout_ms = 5000\nmetrics_address = \"127.0.0.1:0\"\n\n[pod_resources]\nsocket = {:?}\n\
             interval_ms = 100\nrestart_grace_ms = {restart_grace_ms}\n",
            socket.display().to_string()
        ),
    )
    .expect("host config");
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = compile_c(&repo().join("tests/fixtures/native/attributes_1_1.c"), &modules);
    node.backend("gpu", &format!("[backend]\nmodule = {:?}\n\n[config]\n{config}\n", module.display().to_string()));
    (node, socket)
}

fn release_log(node: &Node) -> PathBuf {
    node.dir.path().join("release.log")
}

fn releases(node: &Node) -> Vec<String> {
    std::fs::read_to_string(release_log(node)).unwrap_or_default().lines().map(str::to_owned).collect()
}

async fn health(kubelet: &FakeKubelet, id: &str, health: &str) {
    kubelet
        .wait_for_devices(GPU, WAIT, |devices| devices.iter().any(|d| d.id == id && d.health == health))
        .await
        .unwrap_or_else(|error| panic!("{id} never {health}: {error}"));
}

/// The value of the metric line starting with `series`, once it is `value`.
async fn metric(devhost: &Devhost, series: &str, value: &str) {
    let address = devhost.metrics_address().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(&address, "/metrics").await;
        let found = body.lines().find(|l| l.starts_with(series)).map(|l| l.rsplit(' ').next().unwrap_or("").to_owned());
        if found.as_deref() == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never {value} (last {found:?}):\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn in_use() -> String {
    format!("devhost_devices_in_use{{resource=\"{GPU}\"}}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_goes_away_has_its_devices_released_once_unhealthy_meanwhile() {
    let (node, socket) = node_with("", 0);
    let log = release_log(&node);
    std::fs::write(
        node.backends_dir().join("gpu.toml"),
        std::fs::read_to_string(node.backends_dir().join("gpu.toml")).expect("backend file")
            + &format!("release_log = {:?}\nrelease_ms = 2500\n", log.display().to_string()),
    )
    .expect("backend file");
    let pods = FakePodResources::start(&socket).await.expect("pod resources");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    metric(&devhost, &in_use(), "0").await;

    kubelet.allocate(GPU, &["fixture-0"]).await.expect("allocate");
    pods.assign_on_numa("ml", "train", "main", GPU, &["fixture-0"], &[0, 1]);
    metric(&devhost, &in_use(), "1").await;
    assert!(releases(&node).is_empty(), "nothing is released while the pod holds it");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(node.dir.path().join("config"))
        .output()
        .expect("run devhost list");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("devhost list --json");
    let devices = &listed[0]["resources"][0]["devices"];
    assert_eq!(devices[0]["id"], "fixture-0");
    assert_eq!(devices[0]["held_by"], serde_json::json!(["ml/train/main"]), "{listed}");
    assert_eq!(devices[1]["held_by"], serde_json::json!([]), "{listed}");

    pods.remove_pod("ml", "train");
    health(&kubelet, "fixture-0", "Unhealthy").await;
    let during = kubelet.devices(GPU).expect("devices");
    assert!(during.iter().any(|d| d.id == "fixture-1" && d.health == "Healthy"), "only the freed device: {during:?}");
    let refused = kubelet.allocate(GPU, &["fixture-0"]).await.expect_err("a device being scrubbed is not handed out");
    assert!(refused.to_string().contains("being released"), "{refused}");
    health(&kubelet, "fixture-0", "Healthy").await;
    assert_eq!(releases(&node), [format!("{GPU} fixture-0")]);
    metric(&devhost, &format!("devhost_device_releases_total{{resource=\"{GPU}\"}}"), "1").await;
    metric(&devhost, &in_use(), "0").await;
    // Many more answers without the pod: still released once.
    let calls = pods.list_calls();
    while pods.list_calls() < calls + 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(releases(&node), [format!("{GPU} fixture-0")], "released exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_release_keeps_the_device_unhealthy_with_its_reason_until_one_succeeds() {
    let (node, socket) = node_with("", 0);
    let failing = node.dir.path().join("scrubber-broken");
    std::fs::write(&failing, "").expect("failure marker");
    std::fs::write(
        node.backends_dir().join("gpu.toml"),
        std::fs::read_to_string(node.backends_dir().join("gpu.toml")).expect("backend file")
            + &format!(
                "release_log = {:?}\nfail_while = {:?}\n",
                release_log(&node).display().to_string(),
                failing.display().to_string()
            ),
    )
    .expect("backend file");
    let pods = FakePodResources::start(&socket).await.expect("pod resources");
    pods.assign("ml", "train", "main", GPU, &["fixture-1"]);
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    metric(&devhost, &in_use(), "1").await;

    pods.remove_pod("ml", "train");
    let reason = format!("scrub failed: {} exists", failing.display());
    devhost.wait_for_log(&reason).await;
    metric(&devhost, &format!("devhost_device_release_failures_total{{resource=\"{GPU}\"}}"), "1").await;
    health(&kubelet, "fixture-1", "Unhealthy").await;
    let refused =
        kubelet.allocate(GPU, &["fixture-1"]).await.expect_err("a device that failed release is not handed out");
    assert!(
        refused.to_string().contains(&format!("release failed: backend \"gpu\": release failed: {reason}")),
        "{refused}"
    );
    // It is retried (with back-off) and stays out of service meanwhile.
    let failures = |log: &str| log.matches("release failed: the devices stay Unhealthy").count();
    let deadline = Instant::now() + WAIT;
    while failures(&devhost.log()) < 2 {
        assert!(Instant::now() < deadline, "the release was not retried:\n{}", devhost.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kubelet.devices(GPU).expect("devices").iter().find(|d| d.id == "fixture-1").expect("listed").health,
        "Unhealthy"
    );
    assert!(releases(&node).is_empty());

    std::fs::remove_file(&failing).expect("repair the scrubber");
    health(&kubelet, "fixture-1", "Healthy").await;
    assert_eq!(releases(&node), [format!("{GPU} fixture-1")]);
    kubelet.allocate(GPU, &["fixture-1"]).await.expect("released: allocatable again");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_slow_or_restarting_pod_resources_api_changes_nothing_else() {
    let (node, socket) = node_with("", 2000);
    std::fs::write(
        node.backends_dir().join("gpu.toml"),
        std::fs::read_to_string(node.backends_dir().join("gpu.toml")).expect("backend file")
            + &format!("release_log = {:?}\n", release_log(&node).display().to_string()),
    )
    .expect("backend file");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    // Absent: devhost serves, says why it cannot follow holders, and
    // reports no in-use figure rather than a wrong one.
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered without the PodResources API");
    devhost.wait_for_log("who holds which device is unknown").await;
    assert!(devhost.log().contains(&socket.display().to_string()), "the log names the socket:\n{}", devhost.log());
    kubelet.allocate(GPU, &["fixture-0"]).await.expect("allocate serves");
    metric(&devhost, "devhost_pod_resources_up", "0").await;

    // Slow (beyond the client's deadline): still nothing else changes.
    let pods = FakePodResources::start(&socket).await.expect("pod resources");
    pods.set_delay(Duration::from_secs(8));
    pods.assign("ml", "train", "main", GPU, &["fixture-0"]);
    kubelet.allocate(GPU, &["fixture-1"]).await.expect("allocate serves while the API is slow");
    pods.set_delay(Duration::ZERO);
    metric(&devhost, &in_use(), "1").await;
    metric(&devhost, "devhost_pod_resources_up", "1").await;

    // Restarting, and answering without the pod at first (a kubelet that
    // has not re-admitted its pods yet): nothing is released within the
    // grace, although each answer lacks the pod.
    pods.remove_pod("ml", "train");
    pods.restart().await.expect("restart");
    devhost.wait_for_log("PodResources socket was replaced").await;
    pods.assign("ml", "train", "main", GPU, &["fixture-0"]);
    let calls = pods.list_calls();
    while pods.list_calls() < calls + 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(releases(&node).is_empty(), "released during the restart grace: {:?}", releases(&node));
    // After the grace the pod really goes: now it is released.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    pods.remove_pod("ml", "train");
    let deadline = Instant::now() + WAIT;
    while releases(&node).is_empty() {
        assert!(Instant::now() < deadline, "never released after the grace:\n{}", devhost.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(releases(&node), [format!("{GPU} fixture-0")]);
}
