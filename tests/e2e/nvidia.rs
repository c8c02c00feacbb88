//! The NVIDIA backend (issue 6) through the real `devhost` binary on a node
//! without NVML (this project's machines and CI): its init fails with one
//! clear message, `nvidia.com/gpu` is never registered, and a static
//! backend beside it serves. On a machine with a GPU the module would serve
//! instead, so the test skips there with a message.

use std::path::Path;

use devhost::fake_kubelet::FakeKubelet;

use crate::harness::{Node, WAIT, static_backend};
use crate::native_loader::rust_module;

/// Whether the dynamic linker could find NVML here (its cache, or the
/// usual directories).
pub(crate) fn nvml_present() -> bool {
    let cached = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("libnvidia-ml.so.1"));
    cached
        || ["/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1", "/usr/lib/libnvidia-ml.so.1"]
            .iter()
            .any(|p| Path::new(p).exists())
}

#[tokio::test]
async fn without_nvml_init_fails_with_one_message_and_nothing_registers() {
    if nvml_present() {
        crate::harness::skip(
            crate::harness::Missing::Machine,
            "NVML is installed here; this test covers nodes without it",
        );
        return;
    }
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = rust_module("devhost_nvidia", &modules);
    node.backend("gpu", &format!("[backend]\nmodule = {:?}\n[config]\ncdi = true\n", module.display().to_string()));
    node.backend("static", &static_backend(&[("example.com/good", &["g-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    kubelet.wait_for_registrations("example.com/good", 1, WAIT).await.expect("the static backend serves");
    devhost
        .wait_for_log(
            "NVML is not available: libnvidia-ml.so.1 could not be loaded (libnvidia-ml.so.1: cannot open shared object file: No such file or directory); is the NVIDIA driver installed and the library mounted into the container?",
        )
        .await;
    // Ready: every backend file tried, every started resource registered.
    devhost.wait_until_ready().await;
    let registered: Vec<String> = kubelet.registrations().into_iter().map(|r| r.resource_name).collect();
    assert_eq!(registered, ["example.com/good"], "nvidia.com/gpu must not register without NVML");
    assert!(kubelet.devices("nvidia.com/gpu").is_none(), "no device list for nvidia.com/gpu");
    kubelet.allocate("example.com/good", &["g-0"]).await.expect("the static backend answers");
}
