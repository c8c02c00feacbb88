//! The PCI backend (`backends/pci`) through the real binary and the fake
//! kubelet, natively and as a WASM component granted read-only access to
//! the sysfs tree: the standard fixture (dual-port NIC with VFs, VFIO
//! functions, an FPGA with a DRM node), health changes reaching
//! ListAndWatch, Allocate for every selector kind, reset on pre-start and
//! on release (a pod that goes away, through the fake PodResources API),
//! the functions' attributes as devhost lists them (so the host's own DRA
//! rules accept them), and this machine's real `/sys`.

#[path = "../fixtures/sysfs/pci.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devhost::fake_kubelet::{FakeKubelet, FakePodResources};
use devhost::proto::v1beta1;

use crate::harness::{Devhost, Node, WAIT, http_get};
use crate::native_loader::rust_module;

/// Every selector kind, one resource each, over the standard fixture.
const RESOURCES: &str = r#"
[[config.resource]]
name = "a.io/vendor-device"
vendors = ["8086"]
devices = ["1592"]
[[config.resource]]
name = "a.io/class"
class = "0x030000"
class_mask = "0xff0000"
[[config.resource]]
name = "a.io/vfio"
drivers = ["vfio-pci"]
[[config.resource]]
name = "a.io/pf"
pf_names = ["ens1f1"]
[[config.resource]]
name = "a.io/range"
pf_names = ["ens1f0#2-3"]
drivers = ["iavf"]
check_link = true
[[config.resource]]
name = "a.io/fpga"
addresses = ["0000:af:00.0"]
device_nodes = [{ sysfs = "drm/renderD*", dev = "/dev/dri/{name}" }]
"#;

fn wasm_component(dir: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    let built = target.join("wasm32-wasip2/release/devhost_pci.wasm");
    assert!(built.is_file(), "{} is missing: run scripts/test (it builds the WASM components)", built.display());
    let copy = dir.join("devhost_pci.wasm");
    std::fs::copy(&built, &copy).expect("copy the component");
    copy
}

/// The backend file for `sys`: native, or a component granted `sys`
/// read-only.
fn backend_file(node: &Node, wasm: bool, sys: &Path, resources: &str, extra: &str) -> String {
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let sys = sys.display().to_string();
    let config =
        format!("[config]\nsysfs_root = {sys:?}\nrescan_interval_ms = 50\nremoval_grace_ms = 600000\n{resources}");
    if wasm {
        let module = wasm_component(&modules).display().to_string();
        let cache = node.dir.path().join("cache").display().to_string();
        format!(
            "[backend]\nmodule = {module:?}\ncall_timeout_ms = 5000\n[sandbox]\nread = [{sys:?}]\npoll_interval_ms = 50\ncache_dir = {cache:?}\n{extra}\n{config}"
        )
    } else {
        let module = rust_module("devhost_pci", &modules).display().to_string();
        format!("[backend]\nmodule = {module:?}\ncall_timeout_ms = 5000\n{extra}\n{config}")
    }
}

fn paths(answer: &v1beta1::AllocateResponse) -> Vec<&str> {
    answer.container_responses[0].devices.iter().map(|d| d.host_path.as_str()).collect()
}

fn env<'a>(answer: &'a v1beta1::AllocateResponse, name: &str) -> Option<&'a str> {
    answer.container_responses[0].envs.get(name).map(String::as_str)
}

async fn ids(kubelet: &FakeKubelet, resource: &str, expected: &[&str]) {
    kubelet
        .wait_for_devices(resource, WAIT, |d| {
            let mut got: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
            got.sort();
            got == expected
        })
        .await
        .unwrap_or_else(|e| panic!("{resource}: never {expected:?}: {e}"));
}

async fn health(kubelet: &FakeKubelet, resource: &str, id: &str, health: &str) {
    kubelet
        .wait_for_devices(resource, WAIT, |d| d.iter().any(|d| d.id == id && d.health == health))
        .await
        .unwrap_or_else(|e| panic!("{resource}: {id} never {health}: {e}"));
}

async fn fixture_through_the_binary(wasm: bool) {
    let node = Node::new();
    let sys = node.dir.path().join("sys");
    fixture::standard(&sys);
    let cdi = node.dir.path().join("cdi");
    std::fs::write(
        node.config_file(),
        format!(
            "call_timeout_ms = 5000\nmetrics_address = \"127.0.0.1:0\"\ncdi_dir = {:?}\n",
            cdi.display().to_string()
        ),
    )
    .expect("devhost.toml");
    let extra = "[resources.\"a.io/fpga\"]\ncdi = true\n";
    node.backend("pci", &backend_file(&node, wasm, &sys, RESOURCES, extra));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();

    ids(&kubelet, "a.io/vendor-device", &["0000:3b:00.0", "0000:3b:00.1"]).await;
    ids(&kubelet, "a.io/class", &["0000:5e:00.0"]).await;
    ids(&kubelet, "a.io/vfio", &["0000:3b:0a.0", "0000:3b:0a.1", "0000:5e:00.0"]).await;
    ids(&kubelet, "a.io/pf", &fixture::PORT1_VFS).await;
    ids(&kubelet, "a.io/range", &["0000:3b:02.2", "0000:3b:02.3"]).await;
    ids(&kubelet, "a.io/fpga", &["0000:af:00.0"]).await;
    let numa = kubelet.devices("a.io/vendor-device").expect("listed")[0].topology.clone();
    assert_eq!(numa.map(|t| t.nodes.iter().map(|n| n.id).collect::<Vec<_>>()), Some(vec![1]), "NUMA node 1");
    let fpga = kubelet.devices("a.io/fpga").expect("listed")[0].topology.clone();
    assert!(fpga.is_none_or(|t| t.nodes.is_empty()), "no topology where the kernel says -1");

    let answer = kubelet.allocate("a.io/vendor-device", &["0000:3b:00.1"]).await.expect("allocate");
    assert_eq!(env(&answer, "PCIDEVICE_A_IO_VENDOR_DEVICE"), Some("0000:3b:00.1"));
    assert!(paths(&answer).is_empty());
    let answer = kubelet.allocate("a.io/class", &["0000:5e:00.0"]).await.expect("allocate");
    assert_eq!(paths(&answer), ["/dev/vfio/77", "/dev/vfio/vfio"]);
    let answer = kubelet.allocate("a.io/vfio", &["0000:3b:0a.1", "0000:5e:00.0"]).await.expect("allocate");
    assert_eq!(paths(&answer), ["/dev/vfio/61", "/dev/vfio/vfio", "/dev/vfio/77"]);
    assert_eq!(env(&answer, "PCIDEVICE_A_IO_VFIO"), Some("0000:3b:0a.1,0000:5e:00.0"));
    let answer = kubelet.allocate("a.io/pf", &["0000:3b:0a.0"]).await.expect("allocate");
    assert_eq!(paths(&answer), ["/dev/vfio/60", "/dev/vfio/vfio"]);
    let answer = kubelet.allocate("a.io/range", &["0000:3b:02.3"]).await.expect("allocate");
    assert_eq!(env(&answer, "PCIDEVICE_A_IO_RANGE"), Some("0000:3b:02.3"));
    let answer = kubelet.allocate("a.io/fpga", &["0000:af:00.0"]).await.expect("allocate");
    let cdi_names: Vec<&str> = answer.container_responses[0].cdi_devices.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cdi_names, ["a.io/fpga=0000:af:00.0"], "CDI names from the host's cdi = true");

    // Health: link down, rebinding, unplugging reach ListAndWatch.
    fixture::set_link(&sys, "0000:3b:02.2", "ens1f0v2", false);
    health(&kubelet, "a.io/range", "0000:3b:02.2", "Unhealthy").await;
    fixture::set_link(&sys, "0000:3b:02.2", "ens1f0v2", true);
    health(&kubelet, "a.io/range", "0000:3b:02.2", "Healthy").await;
    fixture::bind(&sys, "0000:3b:0a.0", None);
    health(&kubelet, "a.io/vfio", "0000:3b:0a.0", "Unhealthy").await;
    fixture::remove(&sys, "0000:af:00.0");
    health(&kubelet, "a.io/fpga", "0000:af:00.0", "Unhealthy").await;
}

#[tokio::test]
async fn native_fixture_every_selector_allocate_and_health() {
    fixture_through_the_binary(false).await;
}

#[tokio::test]
async fn wasm_component_reads_the_fixture_through_a_read_only_grant() {
    fixture_through_the_binary(true).await;
}

#[tokio::test]
async fn reset_on_prestart_native_resets_wasm_needs_a_write_grant() {
    let node = Node::new();
    let sys = node.dir.path().join("sys");
    fixture::standard(&sys);
    let resources = "[[config.resource]]\nname = \"a.io/fpga\"\ndevices = [\"0b30\"]\nreset_on_prestart = true\n";
    node.backend("native", &backend_file(&node, false, &sys, resources, ""));
    let wasm_resources = resources.replace("a.io/fpga", "a.io/fpga-wasm");
    node.backend("wasm", &backend_file(&node, true, &sys, &wasm_resources, ""));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    let registration = kubelet.wait_for_registrations("a.io/fpga", 1, WAIT).await.expect("registered");
    assert_eq!(registration.options.map(|o| o.pre_start_required), Some(true));
    kubelet.pre_start("a.io/fpga", &["0000:af:00.0"]).await.expect("pre-start");
    let reset = fixture::function_dir(&sys, "0000:af:00.0").join("reset");
    assert_eq!(std::fs::read_to_string(reset).expect("reset"), "1");
    devhost.wait_for_log("reset_on_prestart needs write access to").await;
    devhost.wait_for_log("to `[sandbox] write`").await;
    assert_eq!(kubelet.registration_count("a.io/fpga-wasm"), 0, "without the grant the component is not served");

    // With a write grant of just that function's directory, the component
    // resets it too.
    let function = sys.join("bus/pci/devices/0000:af:00.0").display().to_string();
    let granted = resources.replace("a.io/fpga", "a.io/fpga-granted");
    node.backend("granted", &backend_file(&node, true, &sys, &granted, &format!("write = [{function:?}]")));
    kubelet.wait_for_registrations("a.io/fpga-granted", 1, WAIT).await.expect("served with the grant");
    let reset = fixture::function_dir(&sys, "0000:af:00.0").join("reset");
    std::fs::write(&reset, "").expect("clear the reset file");
    kubelet.pre_start("a.io/fpga-granted", &["0000:af:00.0"]).await.expect("pre-start in the sandbox");
    assert_eq!(std::fs::read_to_string(&reset).expect("reset"), "1", "the component wrote the reset file");
}

#[tokio::test]
async fn real_sys_network_controller_native_and_wasm() {
    let nic = std::fs::read_dir("/sys/bus/pci/devices").ok().and_then(|entries| {
        entries.flatten().find_map(|e| {
            let class = std::fs::read_to_string(e.path().join("class")).ok()?;
            class.trim().starts_with("0x02").then(|| e.file_name().to_string_lossy().into_owned())
        })
    });
    let Some(nic) = nic else {
        crate::harness::skip(
            crate::harness::Missing::Machine,
            "this machine's /sys/bus/pci has no network controller (class 0x02xxxx)",
        );
        return;
    };
    let node = Node::new();
    let sys = Path::new("/sys");
    let native = "[[config.resource]]\nname = \"a.io/nic\"\nclass = \"0x020000\"\nclass_mask = \"0xff0000\"\n";
    node.backend("native", &backend_file(&node, false, sys, native, ""));
    node.backend("wasm", &backend_file(&node, true, sys, &native.replace("a.io/nic", "a.io/nic-wasm"), ""));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    for resource in ["a.io/nic", "a.io/nic-wasm"] {
        health(&kubelet, resource, &nic, "Healthy").await;
        let answer = kubelet.allocate(resource, &[nic.as_str()]).await.expect("allocate");
        let name = format!("PCIDEVICE_{}", resource.to_uppercase().replace(['.', '/', '-'], "_"));
        assert_eq!(env(&answer, &name), Some(nic.as_str()), "{resource}");
    }
}

/// `devhost list --json` over the node's config directory (no daemon).
fn list(node: &Node) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(node.dir.path().join("config"))
        .output()
        .expect("run devhost list");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("devhost list --json printed no JSON ({error}): {}", String::from_utf8_lossy(&output.stderr))
    })
}

#[test]
fn attributes_pass_the_hosts_rules_and_are_the_same_native_and_as_a_component() {
    let node = Node::new();
    let sys = node.dir.path().join("sys");
    fixture::standard(&sys);
    std::fs::write(fixture::function_dir(&sys, "0000:3b:00.0").join("net/ens1f0/speed"), "25000\n").expect("speed");
    let all = "[[config.resource]]\nname = \"a.io/all\"\nvendors = [\"8086\", \"10de\"]\n";
    node.backend("native", &backend_file(&node, false, &sys, all, ""));
    node.backend("wasm", &backend_file(&node, true, &sys, &all.replace("a.io/all", "a.io/all-wasm"), ""));
    let listed = list(&node);
    let devices = |name: &str| {
        let backend = listed.as_array().expect("a list").iter().find(|b| b["backend"] == name).expect("listed");
        // The host checks every publish against DRA's rules and refuses
        // the whole list otherwise: no error means all were accepted.
        assert_eq!(backend["error"], serde_json::Value::Null, "{name}: {backend}");
        backend["resources"][0]["devices"].as_array().expect("devices").clone()
    };
    let (native, wasm) = (devices("native"), devices("wasm"));
    assert_eq!(native.len(), 14);
    let pf = native.iter().find(|d| d["id"] == "0000:3b:00.0").expect("the PF");
    assert_eq!(
        pf["attributes"],
        serde_json::json!({
            "pci.devhost.io/address": {"string": "0000:3b:00.0"},
            "pci.devhost.io/vendor": {"string": "8086"},
            "pci.devhost.io/device": {"string": "1592"},
            "pci.devhost.io/class": {"string": "020000"},
            "pci.devhost.io/driver": {"string": "ice"},
            "pci.devhost.io/virtualFunction": {"bool": false},
            "pci.devhost.io/iommuGroup": {"int": 10},
            "pci.devhost.io/numaNode": {"int": 1},
            "pci.devhost.io/netdev": {"string": "ens1f0"},
            "pci.devhost.io/linkSpeedMbps": {"int": 25000},
            "resource.kubernetes.io/pcieRoot": {"string": "pci0000:3b"},
        })
    );
    let vf = native.iter().find(|d| d["id"] == "0000:3b:02.5").expect("a VF");
    assert_eq!(vf["attributes"]["pci.devhost.io/pfAddress"], serde_json::json!({"string": "0000:3b:00.0"}));
    assert_eq!(vf["attributes"]["pci.devhost.io/vfIndex"], serde_json::json!({"int": 5}));
    assert_eq!(native, wasm, "the component reads sysfs (links included) as the native build does");
}

/// Waits until the metric line starting with `series` has `value`.
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

/// Waits until the function's `reset` file holds `text`.
async fn reset_file(path: &Path, text: &str) {
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        assert!(Instant::now() < deadline, "{} never {text:?}", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_on_release_resets_a_function_once_its_pod_is_gone_native_and_wasm() {
    let node = Node::new();
    let sys = node.dir.path().join("sys");
    fixture::standard(&sys);
    let socket = node.dir.path().join("pod-resources/kubelet.sock");
    std::fs::write(
        node.config_file(),
        format!(
            "call_timeout_ms = 5000\nmetrics_address = \"127.0.0.1:0\"\n\n[pod_resources]\nsocket = {:?}\ninterval_ms = 100\nrestart_grace_ms = 0\n",
            socket.display().to_string()
        ),
    )
    .expect("host config");
    let resources = "[[config.resource]]\nname = \"a.io/fpga\"\ndevices = [\"0b30\"]\nreset_on_release = true\n";
    node.backend("native", &backend_file(&node, false, &sys, resources, ""));
    let function = sys.join("bus/pci/devices/0000:af:00.0").display().to_string();
    let granted = resources.replace("a.io/fpga", "a.io/fpga-wasm");
    node.backend("wasm", &backend_file(&node, true, &sys, &granted, &format!("write = [{function:?}]")));
    let pods = FakePodResources::start(&socket).await.expect("pod resources");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    let reset = fixture::function_dir(&sys, "0000:af:00.0").join("reset");

    for resource in ["a.io/fpga", "a.io/fpga-wasm"] {
        let registration = kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
        assert_eq!(
            registration.options.map(|o| o.pre_start_required),
            Some(false),
            "{resource}: release, not pre-start"
        );
        std::fs::write(&reset, "").expect("clear the reset file");
        kubelet.allocate(resource, &["0000:af:00.0"]).await.expect("allocate");
        pods.assign("ml", "train", "main", resource, &["0000:af:00.0"]);
        metric(&devhost, &format!("devhost_devices_in_use{{resource=\"{resource}\"}}"), "1").await;
        assert_eq!(std::fs::read_to_string(&reset).expect("reset"), "", "{resource}: not reset while held");
        pods.remove_pod("ml", "train");
        reset_file(&reset, "1").await;
        health(&kubelet, resource, "0000:af:00.0", "Healthy").await;
        metric(&devhost, &format!("devhost_device_releases_total{{resource=\"{resource}\"}}"), "1").await;
    }
}
