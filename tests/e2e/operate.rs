//! Operating devhost (issue 7): hot reload of `backends.d/` without
//! disturbing untouched resources, and the metrics and probe endpoints.

use std::time::Duration;

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1;
use tokio_stream::StreamExt;

use crate::harness::{Node, WAIT, assert_quiet_until_health_change, healthy_state, http_get, static_backend};

const GPU: &str = "example.com/gpu";
const NIC: &str = "example.com/nic";
const FPGA: &str = "example.com/fpga";

/// The value of the metric line that starts with `prefix`, if present.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|line| line.starts_with(prefix)).and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn backends_d_changes_apply_without_touching_other_resources() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0"])], None));
    let nic_state = healthy_state(&node.dir.path().join("nic"), &["nic-0"]);
    node.backend("nic", &static_backend(&[(NIC, &["nic-0"])], Some(&nic_state)));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("gpu");
    let nic = kubelet.wait_for_registrations(NIC, 1, WAIT).await.expect("nic");
    // An extra stream on the untouched resource: it must stay open throughout.
    let mut client = kubelet.client(NIC).await.expect("client");
    let mut nic_stream = client.list_and_watch(v1beta1::Empty {}).await.expect("stream").into_inner();
    nic_stream.next().await.expect("first").expect("ok");

    // Added file: its backend starts and registers.
    let fpga = node.backend("fpga", &static_backend(&[(FPGA, &["fpga-0"])], None));
    let added = kubelet.wait_for_registrations(FPGA, 1, WAIT).await.expect("added backend registers");
    assert!(node.plugin_dir().join(&added.endpoint).exists());
    // Applied because inotify saw the file, not by the 10 s rescan: the
    // reload that started it names that cause.
    let log = devhost.log();
    let started = log.find("backend started backend=fpga").expect("the fpga backend started");
    let cause = log[..started].rfind("reloading backends cause=").map(|at| &log[at..started]);
    assert!(
        cause.is_some_and(|c| c.starts_with("reloading backends cause=\"backends.d changed")),
        "the added file was applied by {cause:?}, not by inotify"
    );

    // Changed file: just that backend is replaced and re-registers.
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0", "gpu-1"])], None));
    kubelet.wait_for_registrations(GPU, 2, WAIT).await.expect("changed backend re-registers");
    kubelet.wait_for_devices(GPU, WAIT, |d| d.len() == 2).await.expect("the new device list");

    // Broken file: reported with its position; the previous version serves.
    let gpu_file = node.backend("gpu", "[backend]\nkind = \"static\"\n[[config.resource]\n");
    devhost.wait_for_log(&format!("{}:3:19: ", gpu_file.display())).await;
    devhost.wait_for_log("its previous version keeps serving").await;
    kubelet.allocate(GPU, &["gpu-1"]).await.expect("the previous good GPU backend still answers");
    assert_eq!(kubelet.registration_count(GPU), 2, "a broken file causes no re-registration");

    // Removed file: its resources stop and their sockets go.
    std::fs::remove_file(&fpga).expect("remove");
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.plugin_dir().join(&added.endpoint).exists() {
        assert!(tokio::time::Instant::now() < deadline, "the removed backend's socket stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kubelet
        .wait_for_devices(FPGA, WAIT, |_| !kubelet.connected(FPGA))
        .await
        .expect("the kubelet's stream to the removed resource ended");

    // SIGHUP reloads too (nothing changed, so nothing restarts), and the
    // still-broken GPU file is not reported again.
    let reported = |log: &str| log.matches(&format!("{}:3:19: ", gpu_file.display())).count();
    let before = reported(&devhost.log());
    for _ in 0..2 {
        devhost.reload().await;
    }
    assert_eq!(reported(&devhost.log()), before, "an unchanged config error is reported once");

    // The untouched resource kept its socket, registration and stream.
    assert_eq!(kubelet.registration_count(NIC), 1);
    assert!(node.plugin_dir().join(&nic.endpoint).exists());
    assert!(kubelet.connected(NIC));
    assert_quiet_until_health_change(&mut nic_stream, &nic_state, "nic-0").await;
}

#[tokio::test]
async fn metrics_and_probes_follow_the_resources() {
    let node = Node::new();
    let state = healthy_state(node.dir.path(), &["gpu-0", "gpu-1"]);
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0", "gpu-1"])], Some(&state)));
    let devhost = node.start_devhost();
    let address = devhost.metrics_address().await;

    assert_eq!(http_get(&address, "/healthz").await, (200, "ok\n".to_owned()));
    // Not ready while the backends load, then not ready for want of a
    // kubelet: 503 throughout, saying why.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (status, body) = loop {
        let (status, body) = http_get(&address, "/readyz").await;
        if !body.starts_with("starting: ") {
            break (status, body);
        }
        assert_eq!(status, 503, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "the backends never finished loading");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((status, body.as_str()), (503, "not registered: example.com/gpu\n"), "no kubelet yet");

    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(&address, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "/readyz never turned ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    kubelet.allocate(GPU, &["gpu-0"]).await.expect("allocate");
    kubelet.allocate(GPU, &["nope"]).await.expect_err("unknown id");
    std::fs::remove_file(state.join("gpu-1.ok")).expect("make gpu-1 unhealthy");
    kubelet.wait_for_devices(GPU, WAIT, |d| d.iter().any(|d| d.health == "Unhealthy")).await.expect("unhealthy");

    let (status, text) = http_get(&address, "/metrics").await;
    assert_eq!(status, 200);
    let r = "resource=\"example.com/gpu\"";
    assert_eq!(metric(&text, &format!("devhost_devices{{{r},health=\"Healthy\"}}")), Some(1.0), "{text}");
    assert_eq!(metric(&text, &format!("devhost_devices{{{r},health=\"Unhealthy\"}}")), Some(1.0));
    assert_eq!(metric(&text, &format!("devhost_rpc_requests_total{{{r},method=\"Allocate\",code=\"Ok\"}}")), Some(1.0));
    assert_eq!(
        metric(&text, &format!("devhost_rpc_requests_total{{{r},method=\"Allocate\",code=\"InvalidArgument\"}}")),
        Some(1.0)
    );
    assert_eq!(metric(&text, &format!("devhost_rpc_duration_seconds_count{{{r},method=\"Allocate\"}}")), Some(2.0));
    assert_eq!(metric(&text, &format!("devhost_registrations_total{{{r}}}")), Some(1.0));
    assert_eq!(metric(&text, &format!("devhost_resource_registered{{{r}}}")), Some(1.0));
    assert_eq!(metric(&text, &format!("devhost_list_and_watch_streams{{{r}}}")), Some(1.0), "the kubelet's stream");

    // A kubelet restart is counted, and readiness returns after re-registration.
    kubelet.restart().await.expect("restart");
    kubelet.wait_for_registrations(GPU, 2, WAIT).await.expect("re-registered");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = http_get(&address, "/metrics").await;
        if metric(&text, &format!("devhost_kubelet_restarts_seen_total{{{r}}}")) == Some(1.0)
            && metric(&text, &format!("devhost_registrations_total{{{r}}}")) == Some(2.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "restart not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(&address, "/readyz").await.0, 200);
}
