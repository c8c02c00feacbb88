//! The NVIDIA backend's CDI names through the real `devhost` binary, the
//! real `devhost_nvidia` module and a fake NVML
//! (`tests/fixtures/native/fake_nvml.c`) serving two GPUs, checked with the
//! CDI library containerd uses ([`crate::cdi_oracle`]). The rule under test
//! (issue 25): every CDI name devhost hands out resolves in exactly one
//! spec, and the container gets exactly the plain answer plus what that
//! spec adds.
//!
//! * No spec defines the backend's names `nvidia.com/gpu=<UUID>`: they are
//!   left out of the answer (logged once each, counted), and the container
//!   gets the plain answer, with or without
//!   `[resources."nvidia.com/gpu"] cdi = true`.
//! * A vendor spec (`nvidia.yaml`, as `nvidia-ctk cdi generate` writes
//!   one) defines them: they are passed on, devhost's own spec does not
//!   define them too, `devhost list` names the clash, and the container
//!   gets the plain answer plus the vendor's edits.
//! * The same where the GPUs have device nodes (so devhost would describe
//!   them in its own spec): the clash is logged once and counted too.
//!
//! Except in that last test the node's `dev_root` holds no `/dev/nvidia*`
//! node, so the answers carry no device specs: they would name
//! `/dev/nvidia<minor>` on this machine, which the oracle (like
//! containerd) could not stat. On a machine with NVML the tests skip: the
//! module would find real GPUs there.

use std::path::{Path, PathBuf};

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::ContainerAllocateResponse;

use crate::cdi_oracle::{self, Container, DeviceNode, MountPoint};
use crate::harness::{Devhost, Missing, Node, WAIT, http_get, repo, skip};
use crate::native_loader::{compile_c_with, rust_module};

const GPU: &str = "nvidia.com/gpu";
/// The fake GPUs: UUID, minor number, PCI bus ID as NVML spells it.
const GPUS: [(&str, u32, &str); 2] = [
    ("GPU-8c3f0a52-1d2e-4b6f-9a71-0c5e2d4b7f10", 0, "00000000:3B:00.0"),
    ("GPU-1f9e7d4c-6a3b-42d8-b5e0-93c1a7f2e864", 1, "00000000:86:00.0"),
];
/// The host nodes the vendor spec maps each GPU's `/dev/nvidia<minor>` to
/// (real nodes, which the oracle stats like containerd).
const VENDOR_NODES: [&str; 2] = ["/dev/null", "/dev/zero"];
const DROPPED: &str = "the backend's CDI name is left out of the answer";

/// One node running devhost with the NVIDIA module over the fake NVML.
struct Bed {
    node: Node,
    cdi: PathBuf,
    kubelet: FakeKubelet,
    devhost: Devhost,
}

/// How the bed is configured.
#[derive(Clone, Copy)]
struct Setup {
    /// `[resources."nvidia.com/gpu"] cdi = true` in the backend file.
    host_cdi: bool,
    /// A vendor spec `nvidia.yaml` in the CDI directory.
    vendor_spec: bool,
    /// `nvidia0`, `nvidia1` and `nvidiactl` under `dev_root` (plain files:
    /// the backend only checks that they exist), so that the answers carry
    /// device specs for `/dev/nvidia*`, which do not exist on this machine.
    gpu_nodes: bool,
}

impl Bed {
    /// Starts devhost (registered, ready) with the module's own `cdi = true`;
    /// `None` after a skip.
    async fn start(setup: Setup) -> Option<Bed> {
        if crate::nvidia::nvml_present() {
            skip(Missing::Machine, "NVML is installed here; these tests run the backend over a fake NVML");
            return None;
        }
        let node = Node::new();
        let root = node.dir.path();
        let (modules, dev, sys, cdi) = (root.join("modules"), root.join("dev"), root.join("sys"), root.join("cdi"));
        for dir in [&modules, &dev, &cdi] {
            std::fs::create_dir_all(dir).expect("node dir");
        }
        if setup.gpu_nodes {
            for node in ["nvidia0", "nvidia1", "nvidiactl"] {
                std::fs::write(dev.join(node), "").expect("a GPU node under dev_root");
            }
        }
        // NUMA node 0 for both GPUs, as sysfs names their PCI functions.
        for (_, _, bus_id) in GPUS {
            let function = sys.join("bus/pci/devices").join(bus_id[4..].to_ascii_lowercase());
            std::fs::create_dir_all(&function).expect("sysfs function");
            std::fs::write(function.join("numa_node"), "0\n").expect("numa_node");
        }
        let nvml = fake_nvml(root, &modules);
        let module = rust_module("devhost_nvidia", &modules);
        if setup.vendor_spec {
            vendor_spec(&cdi, &root.join("driver"));
        }
        std::fs::write(
            node.config_file(),
            format!(
                "call_timeout_ms = 5000\nmetrics_address = \"127.0.0.1:0\"\ncdi_dir = {:?}\ncdi_spec_dirs = []\n",
                cdi.display().to_string()
            ),
        )
        .expect("host config");
        let mut backend = format!(
            "[backend]\nmodule = {:?}\n[config]\nlibrary = {:?}\ncdi = true\ndev_root = {:?}\nsysfs_root = {:?}\n",
            module.display().to_string(),
            nvml.display().to_string(),
            dev.display().to_string(),
            sys.display().to_string(),
        );
        if setup.host_cdi {
            backend += &format!("[resources.\"{GPU}\"]\ncdi = true\n");
        }
        node.backend("gpu", &backend);
        let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
        let devhost = node.start_devhost();
        kubelet.wait_for_registrations(GPU, 1, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", devhost.log()));
        kubelet
            .wait_for_devices(GPU, WAIT, |devices| {
                devices.len() == GPUS.len() && devices.iter().all(|d| d.health == "Healthy")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", devhost.log()));
        devhost.wait_until_ready().await;
        Some(Bed { node, cdi, kubelet, devhost })
    }

    /// The answer for one container holding both GPUs.
    async fn allocate_both(&self) -> ContainerAllocateResponse {
        let ids: Vec<&str> = GPUS.iter().map(|(uuid, _, _)| *uuid).collect();
        let answer =
            self.kubelet.allocate(GPU, &ids).await.unwrap_or_else(|e| panic!("Allocate: {e}\n{}", self.devhost.log()));
        assert_eq!(answer.container_responses.len(), 1, "{answer:?}");
        answer.container_responses.into_iter().next().expect("one container")
    }

    /// `devhost list` on this node's config (table, or JSON).
    fn list(&self, json: bool) -> String {
        let mut command = std::process::Command::new(crate::harness::devhost_binary());
        command.arg("list").arg("--config").arg(self.node.config_file());
        if json {
            command.arg("--json");
        }
        let output = command.output().expect("run devhost list");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "devhost list failed:\n{text}\n{}", String::from_utf8_lossy(&output.stderr));
        text
    }

    /// The value of the metric line that starts with `series`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let (status, text) = http_get(&self.devhost.metrics_address().await, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        text.lines().find(|line| line.starts_with(series)).and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }
}

/// The fake NVML built for this node, reading its GPUs from a file beside
/// it (the path is compiled in, so parallel tests share no environment).
fn fake_nvml(root: &Path, modules: &Path) -> PathBuf {
    let config = root.join("fake-nvml.conf");
    let mut text =
        String::from("# the fake NVML's GPUs (tests/fixtures/native/fake_nvml.c)\ndriver 550.54.15\ncuda 12040\n");
    for (uuid, minor, bus_id) in GPUS {
        text += &format!("gpu {uuid} {minor} 81559 {bus_id} NVIDIA H100 80GB HBM3\n");
    }
    std::fs::write(&config, text).expect("fake NVML config");
    let define = format!("-DFAKE_NVML_CONFIG={:?}", config.display().to_string());
    compile_c_with(
        &repo().join("tests/fixtures/native/fake_nvml.c"),
        &modules.join("libfake_nvml.so"),
        &repo().join("abi/include"),
        &[&define],
    )
}

/// A vendor spec as `nvidia-ctk cdi generate` writes one: every GPU by
/// index and by UUID, and `all`, with its device node (here mapped to a
/// real node), and spec-wide edits every name brings: a variable, the
/// control node and a driver directory.
fn vendor_spec(cdi: &Path, driver: &Path) -> PathBuf {
    std::fs::create_dir_all(driver).expect("driver dir");
    let node = |minor: u32, host: &str| format!("    - path: /dev/nvidia{minor}\n      hostPath: {host}\n");
    let mut text = String::from("---\ncdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n");
    let mut all = String::new();
    for ((uuid, minor, _), host) in GPUS.iter().zip(VENDOR_NODES) {
        for name in [minor.to_string(), (*uuid).to_owned()] {
            text += &format!("- name: {name:?}\n  containerEdits:\n    deviceNodes:\n{}", node(*minor, host));
        }
        all += &node(*minor, host);
    }
    text += &format!("- name: all\n  containerEdits:\n    deviceNodes:\n{all}");
    text += &format!(
        "containerEdits:\n  env:\n  - NVIDIA_CTK_LIBCUDA_DIR=/usr/lib/x86_64-linux-gnu\n  deviceNodes:\n  \
         - path: /dev/nvidiactl\n    hostPath: /dev/full\n  mounts:\n  - hostPath: {}\n    \
         containerPath: /usr/local/nvidia/lib64\n    options: [ro, nosuid, nodev, bind]\n",
        driver.display()
    );
    let path = cdi.join("nvidia.yaml");
    std::fs::write(&path, text).expect("vendor spec");
    path
}

/// The backend's names for both GPUs.
fn backend_names() -> Vec<String> {
    GPUS.iter().map(|(uuid, _, _)| format!("{GPU}={uuid}")).collect()
}

fn node_of(path: &str, access: &str) -> DeviceNode {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    DeviceNode {
        kind: 'c',
        major: nix::sys::stat::major(meta.rdev()),
        minor: nix::sys::stat::minor(meta.rdev()),
        access: access.into(),
    }
}

/// What the plain answer of both GPUs must be: their UUIDs, nothing else.
fn assert_plain(answer: &ContainerAllocateResponse) {
    let uuids: Vec<&str> = GPUS.iter().map(|(uuid, _, _)| *uuid).collect();
    assert_eq!(
        answer.envs.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str),
        Some(uuids.join(",").as_str()),
        "{answer:?}"
    );
    assert_eq!(answer.envs.len(), 1, "{answer:?}");
    assert!(answer.devices.is_empty() && answer.mounts.is_empty(), "no /dev/nvidia* under dev_root: {answer:?}");
}

/// (a) No spec defines `nvidia.com/gpu=<UUID>`: the answer carries the
/// UUIDs in its plain env and no CDI name (a runtime would refuse the
/// whole container for one unresolvable name), each dropped name is logged
/// once however often it is dropped, and the container gets the plain
/// answer.
async fn names_no_spec_defines_are_left_out(setup: Setup) {
    let Some(bed) = Bed::start(setup).await else { return };
    let mut answer = bed.allocate_both().await;
    for _ in 0..3 {
        answer = bed.allocate_both().await;
        assert_plain(&answer);
        let names: Vec<&str> = answer.cdi_devices.iter().map(|d| d.name.as_str()).collect();
        assert!(names.is_empty(), "names no spec defines were handed out: {names:?}\n{}", bed.devhost.log());
    }
    // The log is written by a background thread: wait for the lines.
    for name in backend_names() {
        bed.devhost.wait_for_log(&format!("cdi_device={name}")).await;
    }
    let log = bed.devhost.log();
    for name in backend_names() {
        let lines = log.lines().filter(|l| l.contains(DROPPED) && l.contains(&name)).count();
        assert_eq!(lines, 1, "{name} must be logged once after four Allocates:\n{log}");
    }
    let dropped = format!("devhost_cdi_names_dropped_total{{resource=\"{GPU}\"}}");
    assert_eq!(bed.metric(&dropped).await, Some(8.0), "two names dropped from each of four answers");
    assert!(
        !bed.cdi.join("devhost-nvidia.com_gpu.json").exists(),
        "no devhost spec without device nodes or mounts to describe"
    );

    let Some(injected) = cdi_oracle::inject(&answer, &[&bed.cdi]) else { return };
    let container = injected.container_or_panic();
    assert_eq!(container, &Container::from_plain(&answer));
    let uuids: Vec<&str> = GPUS.iter().map(|(uuid, _, _)| *uuid).collect();
    assert_eq!(container.env["NVIDIA_VISIBLE_DEVICES"], uuids.join(","));
    assert!(injected.spec_errors.is_empty(), "{:?}", injected.spec_errors);
}

/// (a) with devhost's CDI on for the resource (`[resources."nvidia.com/gpu"]
/// cdi = true`) besides the module's own `cdi = true`.
#[tokio::test]
async fn backend_cdi_names_no_spec_defines_are_left_out_and_the_container_gets_the_plain_answer() {
    names_no_spec_defines_are_left_out(Setup { host_cdi: true, vendor_spec: false, gpu_nodes: false }).await;
}

/// (a) with the module's own `cdi = true` alone, as the backend's README
/// configures it: the names are checked on this path too.
#[tokio::test]
async fn backend_cdi_names_no_spec_defines_are_left_out_without_devhost_cdi_too() {
    names_no_spec_defines_are_left_out(Setup { host_cdi: false, vendor_spec: false, gpu_nodes: false }).await;
}

/// The container a vendor spec's names give on their own: each GPU's node,
/// and the spec-wide variable, control node and mount.
fn vendor_edits(driver: &Path) -> Container {
    let mut edits = Container::default();
    edits.env.insert("NVIDIA_CTK_LIBCUDA_DIR".into(), "/usr/lib/x86_64-linux-gnu".into());
    for ((_, minor, _), host) in GPUS.iter().zip(VENDOR_NODES) {
        edits.devices.insert(format!("/dev/nvidia{minor}"), node_of(host, "rwm"));
    }
    edits.devices.insert("/dev/nvidiactl".into(), node_of("/dev/full", "rwm"));
    edits
        .mounts
        .insert("/usr/local/nvidia/lib64".into(), MountPoint { source: driver.display().to_string(), read_only: true });
    edits
}

/// Each backend name resolved in `file`.
fn all_defined_in(file: &Path) -> std::collections::BTreeMap<String, PathBuf> {
    backend_names().into_iter().map(|name| (name, file.to_owned())).collect()
}

/// Asserts that devhost's own spec, if written at all, defines none of
/// the GPUs.
fn assert_own_spec_leaves_them(cdi: &Path) {
    let own = cdi.join("devhost-nvidia.com_gpu.json");
    if let Ok(text) = std::fs::read_to_string(&own) {
        let spec: serde_json::Value = serde_json::from_str(&text).expect("devhost's spec is JSON");
        let defined: Vec<&str> =
            spec["devices"].as_array().into_iter().flatten().filter_map(|d| d["name"].as_str()).collect();
        for (uuid, _, _) in GPUS {
            assert!(!defined.contains(&uuid), "devhost's spec defines {uuid} too: {text}");
        }
    }
}

/// (b) A vendor spec defines every GPU by UUID: the backend's names are
/// passed on and resolve there alone (devhost's own spec, if any, does not
/// define them), `devhost list` shows the clash, and the container gets
/// the plain answer plus the vendor's edits.
#[tokio::test]
async fn a_vendor_spec_defines_the_backend_cdi_names_and_the_container_gets_its_edits_too() {
    let Some(bed) = Bed::start(Setup { host_cdi: true, vendor_spec: true, gpu_nodes: false }).await else { return };
    let vendor = bed.cdi.join("nvidia.yaml");
    let answer = bed.allocate_both().await;
    assert_plain(&answer);
    let names: Vec<String> = answer.cdi_devices.iter().map(|d| d.name.clone()).collect();
    assert_eq!(names, backend_names(), "{}", bed.devhost.log());
    assert!(!bed.devhost.log().contains(DROPPED), "{}", bed.devhost.log());
    assert_own_spec_leaves_them(&bed.cdi);
    let table = bed.list(false);
    let clash = format!("CDI name also defined by {}", vendor.display());
    assert_eq!(table.matches(&clash).count(), GPUS.len(), "{table}");

    let Some(injected) = cdi_oracle::inject(&answer, &[&bed.cdi]) else { return };
    let mut want = Container::from_plain(&answer);
    let vendor_edits = vendor_edits(&bed.node.dir.path().join("driver"));
    want.env.extend(vendor_edits.env);
    want.devices.extend(vendor_edits.devices);
    want.mounts.extend(vendor_edits.mounts);
    assert_eq!(injected.container_or_panic(), &want);
    assert_eq!(injected.defined_in, all_defined_in(&vendor));
    assert!(injected.spec_errors.is_empty(), "{:?}", injected.spec_errors);
}

/// (b) where the GPUs have device nodes, so that devhost would describe
/// them in its own spec: it leaves both to the vendor's spec (no entry, no
/// spec at all), logs each clash once and counts them, and its answers
/// carry the backend's names, which resolve in the vendor's spec alone.
/// The plain answer names `/dev/nvidia*`, which this machine lacks, so the
/// oracle checks the names alone.
#[tokio::test]
async fn with_gpu_nodes_devhost_leaves_the_vendor_spec_its_names_and_counts_the_clashes() {
    let Some(bed) = Bed::start(Setup { host_cdi: true, vendor_spec: true, gpu_nodes: true }).await else { return };
    let vendor = bed.cdi.join("nvidia.yaml");
    let clashing = format!("devhost_cdi_clashing_devices{{resource=\"{GPU}\"}}");
    let deadline = std::time::Instant::now() + WAIT;
    while bed.metric(&clashing).await != Some(GPUS.len() as f64) {
        assert!(std::time::Instant::now() < deadline, "the clashes were never counted:\n{}", bed.devhost.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut answer = bed.allocate_both().await;
    for _ in 0..2 {
        answer = bed.allocate_both().await;
    }
    let specs: Vec<&str> = answer.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(specs, ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"], "{answer:?}");
    let names: Vec<String> = answer.cdi_devices.iter().map(|d| d.name.clone()).collect();
    assert_eq!(names, backend_names(), "{}", bed.devhost.log());
    assert_own_spec_leaves_them(&bed.cdi);
    for name in backend_names() {
        bed.devhost.wait_for_log(&format!("another CDI spec defines {name}")).await;
    }
    let log = bed.devhost.log();
    for name in backend_names() {
        let said = format!("another CDI spec defines {name}");
        assert_eq!(log.matches(&said).count(), 1, "{said:?} must be logged once:\n{log}");
    }
    assert!(!log.contains(DROPPED), "{log}");
    let table = bed.list(false);
    let clash = format!("CDI name also defined by {}", vendor.display());
    assert_eq!(table.matches(&clash).count(), GPUS.len(), "{table}");

    let Some(injected) = cdi_oracle::inject_names(&names, &[&bed.cdi]) else { return };
    assert_eq!(injected.container_or_panic(), &vendor_edits(&bed.node.dir.path().join("driver")));
    assert_eq!(injected.defined_in, all_defined_in(&vendor));
    assert!(injected.spec_errors.is_empty(), "{:?}", injected.spec_errors);
}
