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
