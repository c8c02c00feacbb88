//! End-to-end tests of the host core (issue 2): the real `devhost` binary
//! against the fake kubelet in a temporary plugin directory.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1;
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;

use crate::harness::{Node, WAIT, static_backend};

const GPU: &str = "example.com/gpu";
const NIC: &str = "example.com/nic";

fn healthy(devices: &[v1beta1::Device]) -> Vec<&str> {
    devices.iter().filter(|d| d.health == "Healthy").map(|d| d.id.as_str()).collect()
}

#[tokio::test]
async fn register_request_carries_version_endpoint_name_and_options() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0@0", "gpu-1@1"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();

    let request = kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    assert_eq!(request.version, "v1beta1");
    assert_eq!(request.resource_name, GPU);
    assert!(
        request.endpoint.starts_with("devhost-example.com_gpu-") && request.endpoint.ends_with(".sock"),
        "endpoint is a plain file name: {:?}",
        request.endpoint
    );
    assert!(!request.endpoint.contains('/'));
    let expected = v1beta1::DevicePluginOptions { pre_start_required: true, get_preferred_allocation_available: true };
    assert_eq!(request.options, Some(expected));
    assert_eq!(kubelet.options(GPU), Some(expected), "GetDevicePluginOptions answers the same options");

    let socket = node.plugin_dir().join(&request.endpoint);
    let mode = std::fs::metadata(&socket).expect("socket exists").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
}

#[tokio::test]
async fn two_resources_get_two_sockets_and_two_registrations() {
    let node = Node::new();
    node.backend("devices", &static_backend(&[(GPU, &["gpu-0"]), (NIC, &["nic-0", "nic-1"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();

    let gpu = kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("gpu registered");
    let nic = kubelet.wait_for_registrations(NIC, 1, WAIT).await.expect("nic registered");
    assert_ne!(gpu.endpoint, nic.endpoint);
    let mut expected = vec!["kubelet.sock".to_owned(), gpu.endpoint, nic.endpoint];
    expected.sort();
    assert_eq!(node.sockets(), expected);
    kubelet.wait_for_devices(NIC, WAIT, |d| d.len() == 2).await.expect("nic devices");
    kubelet.wait_for_devices(GPU, WAIT, |d| d.len() == 1).await.expect("gpu devices");
}

#[tokio::test]
async fn all_five_rpcs_are_answered() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0@0", "gpu-1@1", "gpu-2@1"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");

    // ListAndWatch (consumed by the kubelet) and GetDevicePluginOptions.
    let devices = kubelet.wait_for_devices(GPU, WAIT, |d| d.len() == 3).await.expect("devices");
    assert_eq!(healthy(&devices), ["gpu-0", "gpu-1", "gpu-2"]);
    let topology: Vec<i64> = devices.iter().map(|d| d.topology.as_ref().expect("topology").nodes[0].id).collect();
    assert_eq!(topology, [0, 1, 1]);
    let mut client = kubelet.client(GPU).await.expect("client");
    let options = client.get_device_plugin_options(v1beta1::Empty {}).await.expect("options").into_inner();
    assert!(options.pre_start_required && options.get_preferred_allocation_available);

    // GetPreferredAllocation: the default policy keeps to one NUMA node.
    let preferred = kubelet.preferred_allocation(GPU, &["gpu-0", "gpu-1", "gpu-2"], &[], 2).await.expect("preferred");
    assert_eq!(preferred.container_responses.len(), 1);
    assert_eq!(preferred.container_responses[0].device_i_ds, ["gpu-1", "gpu-2"]);
    let preferred =
        kubelet.preferred_allocation(GPU, &["gpu-0", "gpu-1", "gpu-2"], &["gpu-0"], 2).await.expect("preferred");
    assert!(preferred.container_responses[0].device_i_ds.contains(&"gpu-0".to_owned()), "must_include honoured");

    // Allocate: one container response per container request.
    let answer = kubelet.allocate(GPU, &["gpu-1", "gpu-2"]).await.expect("allocate");
    assert_eq!(answer.container_responses.len(), 1);
    let container = &answer.container_responses[0];
    assert_eq!(container.envs.get("IDS").map(String::as_str), Some("gpu-1,gpu-2"));
    let specs: Vec<&str> = container.devices.iter().map(|d| d.container_path.as_str()).collect();
    assert_eq!(specs, ["/dev/gpu-1", "/dev/gpu-2"]);
    assert!(container.cdi_devices.is_empty(), "no CDI name without a spec that defines it");
    let two = v1beta1::AllocateRequest {
        container_requests: vec![
            v1beta1::ContainerAllocateRequest { devices_ids: vec!["gpu-0".into()] },
            v1beta1::ContainerAllocateRequest { devices_ids: vec!["gpu-1".into()] },
        ],
    };
    let answer = client.allocate(two).await.expect("allocate two").into_inner();
    assert_eq!(answer.container_responses.len(), 2);
    assert_eq!(answer.container_responses[1].envs.get("IDS").map(String::as_str), Some("gpu-1"));

    // PreStartContainer.
    kubelet.pre_start(GPU, &["gpu-0"]).await.expect("pre-start");
}

#[tokio::test]
async fn unknown_device_ids_are_refused_with_invalid_argument() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");

    let error = kubelet.allocate(GPU, &["gpu-0", "gpu-7"]).await.expect_err("unknown ID");
    let status = error.status().expect("an RPC status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "resource \"example.com/gpu\" has no device \"gpu-7\"");
    let error = kubelet.pre_start(GPU, &["nope"]).await.expect_err("unknown ID");
    assert_eq!(error.status().expect("status").code(), tonic::Code::InvalidArgument);
    let error = kubelet.preferred_allocation(GPU, &["gpu-0"], &[], -1).await.expect_err("negative size");
    assert_eq!(error.status().expect("status").code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn health_changes_reach_every_open_list_and_watch_stream() {
    let node = Node::new();
    let state = node.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    for id in ["gpu-0", "gpu-1"] {
        std::fs::write(state.join(format!("{id}.ok")), "").expect("health file");
    }
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0", "gpu-1"])], Some(&state)));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    kubelet.wait_for_devices(GPU, WAIT, |d| healthy(d).len() == 2).await.expect("both healthy");

    // Two more streams besides the kubelet's own.
    let mut client = kubelet.client(GPU).await.expect("client");
    let mut first = client.list_and_watch(v1beta1::Empty {}).await.expect("stream").into_inner();
    let mut second = client.list_and_watch(v1beta1::Empty {}).await.expect("stream").into_inner();
    for stream in [&mut first, &mut second] {
        let snapshot = stream.next().await.expect("first message").expect("ok");
        assert_eq!(snapshot.devices.len(), 2, "the first message is the full list");
    }

    std::fs::remove_file(state.join("gpu-1.ok")).expect("remove health file");
    let devices = kubelet.wait_for_devices(GPU, WAIT, |d| healthy(d) == ["gpu-0"]).await.expect("update");
    assert_eq!(devices.iter().find(|d| d.id == "gpu-1").map(|d| d.health.as_str()), Some("Unhealthy"));
    for stream in [&mut first, &mut second] {
        let update = tokio::time::timeout(WAIT, stream.next()).await.expect("in time").expect("message").expect("ok");
        assert_eq!(healthy(&update.devices), ["gpu-0"], "full snapshot with exact strings");
        assert_eq!(update.devices.len(), 2);
    }

    std::fs::write(state.join("gpu-1.ok"), "").expect("restore health file");
    kubelet.wait_for_devices(GPU, WAIT, |d| healthy(d).len() == 2).await.expect("recovered");
}

#[tokio::test]
async fn bad_backend_files_are_reported_with_positions_and_good_ones_serve() {
    let node = Node::new();
    node.backend("a-good", &static_backend(&[(GPU, &["gpu-0"])], None));
    let bad_name = node.backend("b-bad-name", &static_backend(&[("Example.com/gpu", &["x"])], None));
    let broken = node.backend("c-broken", "[backend]\nkind = \"static\"\n[config\n");
    let taken = node.backend("d-taken", &static_backend(&[(GPU, &["again"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("the good backend registers");
    devhost.wait_for_log("backend config refused").await;
    let log = devhost.log();
    for expected in [
        format!(
            "{}:6:8: domain \"Example.com\" of resource name \"Example.com/gpu\" must be a lower-case DNS subdomain",
            bad_name.display()
        ),
        format!("{}:3:8: unclosed table, expected `]`", broken.display()),
        format!(
            "{}:6:8: resource \"example.com/gpu\" is already served by {}:6:8",
            taken.display(),
            node.backends_dir().join("a-good.toml").display()
        ),
    ] {
        assert!(log.contains(&expected), "log lacks {expected:?}:\n{log}");
    }
    let devices = kubelet.wait_for_devices(GPU, WAIT, |d| !d.is_empty()).await.expect("devices");
    assert_eq!(devices[0].id, "gpu-0", "the good file's device, not the duplicate's");
    assert_eq!(kubelet.registrations().len(), 1, "nothing else registered");
}

#[tokio::test]
async fn devhost_started_before_the_kubelet_waits_for_it() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0"])], None));
    let devhost = node.start_devhost();
    devhost.wait_for_log("waiting for the kubelet").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered once the kubelet appeared");
    kubelet.wait_for_devices(GPU, WAIT, |d| d.len() == 1).await.expect("devices");
}

#[tokio::test]
async fn twenty_kubelet_restarts_each_end_with_every_resource_registered() {
    let node = Node::new();
    node.backend("devices", &static_backend(&[(GPU, &["gpu-0"]), (NIC, &["nic-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    for resource in [GPU, NIC] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("first registration");
    }
    for round in 1..=20 {
        kubelet.restart().await.expect("restart");
        for resource in [GPU, NIC] {
            kubelet
                .wait_for_registrations(resource, round + 1, WAIT)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {resource} did not re-register: {e}"));
            kubelet
                .wait_for_devices(resource, WAIT, |d| d.len() == 1)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {resource} devices: {e}"));
            assert!(kubelet.connected(resource), "round {round}: {resource} stream open");
        }
    }
    let allocation = kubelet.allocate(GPU, &["gpu-0"]).await.expect("allocate after restarts");
    assert_eq!(allocation.container_responses.len(), 1);
    assert_eq!(node.sockets().len(), 3, "kubelet.sock and one socket per resource: {:?}", node.sockets());
}

#[tokio::test]
async fn a_deleted_socket_is_recreated_and_registered_again() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    let request = kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    std::fs::remove_file(node.plugin_dir().join(&request.endpoint)).expect("delete socket");
    let again = kubelet.wait_for_registrations(GPU, 2, WAIT).await.expect("registered again");
    assert!(node.plugin_dir().join(&again.endpoint).exists());
    kubelet.allocate(GPU, &["gpu-0"]).await.expect("serving on the new socket");
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_leaves_no_socket() {
    let node = Node::new();
    node.backend("devices", &static_backend(&[(GPU, &["gpu-0"]), (NIC, &["nic-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let mut devhost = node.start_devhost();
    for resource in [GPU, NIC] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
    }
    let status = devhost.stop_with(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", devhost.log());
    assert_eq!(node.sockets(), ["kubelet.sock"], "only the kubelet's socket is left");
}

#[tokio::test]
async fn sockets_left_by_a_killed_devhost_do_not_block_the_next_one() {
    let node = Node::new();
    node.backend("gpu", &static_backend(&[(GPU, &["gpu-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let mut first = node.start_devhost();
    let old = kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    first.stop_with(Signal::SIGKILL).await;
    assert!(node.plugin_dir().join(&old.endpoint).exists(), "SIGKILL leaves the socket behind");

    let _second = node.start_devhost();
    let new = kubelet.wait_for_registrations(GPU, 2, WAIT).await.expect("registered again");
    assert_ne!(new.endpoint, old.endpoint, "a new instance gets a new socket name");
    assert!(!node.plugin_dir().join(&old.endpoint).exists(), "the stale socket was removed");
    kubelet.allocate(GPU, &["gpu-0"]).await.expect("serving");
}
