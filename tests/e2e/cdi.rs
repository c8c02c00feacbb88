//! CDI as container runtimes apply it (issue 25): every answer of the real
//! `devhost` binary is handed to the runtimes' own CDI library (the
//! oracle, `cdi_oracle`), and what the container gets must be exactly what
//! the backend's plain answer says, plus a vendor's edits where a vendor's
//! name is passed on.

use std::path::Path;
use std::time::Duration;

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::{ContainerAllocateResponse, DeviceSpec, Mount};
use serde_json::{Value, json};

use crate::cdi_oracle::{Container, MountPoint, assert_gives, expected, inject_names, write_vendor_spec};
use crate::harness::{Devhost, Node, WAIT, http_get};

const GPU: &str = "example.com/gpu";

/// A node whose CDI specs go to `cdi` (the only directory the runtime reads
/// here), with metrics on.
fn node_with_cdi(cdi: &Path) -> Node {
    let node = Node::new();
    std::fs::write(
        node.config_file(),
        format!("metrics_address = \"127.0.0.1:0\"\ncdi_dir = {:?}\ncdi_spec_dirs = []\n", cdi.display().to_string()),
    )
    .expect("host config");
    node
}

/// One static device: its ID, device node (container path, host node) and
/// mounts (host, container).
struct Dev<'a> {
    id: &'a str,
    node: Option<(&'a str, &'a str)>,
    mount: Option<(&'a str, &'a str)>,
}

fn dev<'a>(id: &'a str, node: Option<(&'a str, &'a str)>, mount: Option<(&'a str, &'a str)>) -> Dev<'a> {
    Dev { id, node, mount }
}

/// A static resource whose answers set `IDS` to the allocated IDs.
fn resource(name: &str, devices: &[Dev<'_>], extra: &str) -> String {
    let mut text = format!(
        "[[config.resource]]\nname = \"{name}\"\nenv = {{ IDS = \"{{ids}}\" }}\nannotations = {{ \"example.com/by\" = \"devhost\" }}\n{extra}"
    );
    for device in devices {
        text += &format!("[[config.resource.device]]\nid = \"{}\"\n", device.id);
        if let Some((path, host)) = device.node {
            text += &format!(
                "device_spec = [{{ host_path = \"{host}\", container_path = \"{path}\", permissions = \"rw\" }}]\n"
            );
        }
        if let Some((host, path)) = device.mount {
            text += &format!("mount = [{{ host_path = \"{host}\", container_path = \"{path}\", read_only = true }}]\n");
        }
    }
    text
}

fn static_file(resources: &[String], settings: &str) -> String {
    format!("[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 20\n{}\n{settings}", resources.join("\n"))
}

/// What the container must get for `ids` of `devices` (in the order the
/// backend answers: the allocated order).
fn plain(devices: &[Dev<'_>], ids: &[&str]) -> Container {
    let chosen: Vec<&Dev<'_>> = ids.iter().map(|id| devices.iter().find(|d| d.id == *id).expect("known")).collect();
    let specs: Vec<DeviceSpec> = chosen
        .iter()
        .filter_map(|d| d.node)
        .map(|(path, host)| DeviceSpec {
            container_path: path.into(),
            host_path: host.into(),
            permissions: "rw".into(),
        })
        .collect();
    let mounts: Vec<Mount> = chosen
        .iter()
        .filter_map(|d| d.mount)
        .map(|(host, path)| Mount { container_path: path.into(), host_path: host.into(), read_only: true })
        .collect();
    expected([("IDS", ids.join(","))], &specs, &mounts)
}

fn names(answer: &ContainerAllocateResponse) -> Vec<&str> {
    answer.cdi_devices.iter().map(|c| c.name.as_str()).collect()
}

async fn allocate(kubelet: &FakeKubelet, resource: &str, ids: &[&str]) -> ContainerAllocateResponse {
    let mut answer = kubelet.allocate(resource, ids).await.unwrap_or_else(|e| panic!("allocate {ids:?}: {e}"));
    answer.container_responses.remove(0)
}

/// The devices a spec file describes, if it can be read.
fn spec_devices(path: &Path) -> Option<Vec<String>> {
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(spec["devices"].as_array()?.iter().filter_map(|d| Some(d["name"].as_str()?.to_owned())).collect())
}

async fn wait_for(what: &str, devhost: &Devhost, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}; log:\n{}", devhost.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(devhost: &Devhost, series: &str) -> Option<String> {
    let (_, body) = http_get(&devhost.metrics_address().await, "/metrics").await;
    body.lines().find_map(|line| line.strip_prefix(series).map(|value| value.trim().to_owned()))
}

/// Item 1: the shipped example answers only CDI names a runtime resolves:
/// `example.com/accelerator` comes with a spec devhost writes, and every
/// answer, injected by the runtimes' library, gives the container exactly
/// the plain answer. Before the fix the example's `cdi_kind` names resolved
/// nowhere and the runtime refused the container.
#[tokio::test]
async fn item1_the_shipped_example_hands_out_only_names_that_resolve() {
    let node = Node::new();
    let config = node.dir.path().join("example");
    std::fs::create_dir_all(config.join("backends.d")).expect("dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let example = std::fs::read_to_string(repo.join("backends.d/example.toml")).expect("example backend");
    std::fs::write(config.join("backends.d/example.toml"), &example).expect("copy");
    // As shipped, but with the CDI directory of this test (not the machine's).
    let cdi = node.dir.path().join("cdi");
    let host = std::fs::read_to_string(repo.join("devhost.toml")).expect("example host config");
    let host = host.replace(
        "cdi_dir = \"/var/run/cdi\"",
        &format!("cdi_dir = {:?}\ncdi_spec_dirs = []", cdi.display().to_string()),
    );
    assert!(host.contains("cdi_spec_dirs = []"), "the example names its CDI dir");
    std::fs::write(config.join("devhost.toml"), host).expect("host config");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost =
        Devhost::start(&config.join("devhost.toml"), &node.plugin_dir(), &node.dir.path().join("devhost.log"));
    // Served as shipped (tests/e2e/host.rs checked this before issue 25).
    let request = kubelet.wait_for_registrations("example.com/accelerator", 1, WAIT).await.expect("registered");
    assert_eq!(request.options.map(|o| o.get_preferred_allocation_available), Some(true));
    let spec = cdi.join("devhost-example.com_accelerator.json");
    wait_for("no spec for the accelerators", &devhost, || spec_devices(&spec).is_some_and(|d| d.len() == 2)).await;

    let zoneinfo = "/usr/share/zoneinfo";
    let acc = [
        dev("acc-0", Some(("/dev/acc0", "/dev/null")), None),
        dev("acc-1", Some(("/dev/acc1", "/dev/null")), Some((zoneinfo, "/opt/acc/data"))),
    ];
    for ids in [&["acc-0"][..], &["acc-1"], &["acc-0", "acc-1"]] {
        let answer = allocate(&kubelet, "example.com/accelerator", ids).await;
        assert!(!names(&answer).is_empty(), "{ids:?}: devhost's spec carries the device nodes");
        let mut want = plain(&acc, ids);
        want.env = [("EXAMPLE_ACCELERATORS".to_owned(), ids.join(","))].into();
        assert_gives(&format!("accelerator {ids:?}"), &answer, &[&cdi], &want);
    }
    kubelet.wait_for_registrations("example.com/fuse", 1, WAIT).await.expect("registered");
    if Path::new("/dev/fuse").exists() {
        let answer = allocate(&kubelet, "example.com/fuse", &["fuse::0"]).await;
        let fuse = [DeviceSpec {
            container_path: "/dev/fuse".into(),
            host_path: "/dev/fuse".into(),
            permissions: "rwm".into(),
        }];
        assert_gives("fuse", &answer, &[&cdi], &expected(Vec::<(&str, &str)>::new(), &fuse, &[]));
    }
}

/// Item 1: `cdi_kind` naming devices no CDI spec defines is refused, by
/// `devhost config check` and at load, with the file, line and key; once
/// the vendor's spec is there the backend loads (at the next rescan).
#[tokio::test]
async fn item1_a_cdi_kind_no_spec_defines_is_refused_with_file_and_key() {
    let cdi = tempfile::tempdir().expect("cdi dir");
    let node = node_with_cdi(cdi.path());
    let devices = [dev("v-0", Some(("/dev/v0", "/dev/null")), None)];
    let file = node.backend(
        "vendor",
        &static_file(&[resource("example.com/vendored", &devices, "cdi_kind = \"vendor.example.com/acc\"\n")], ""),
    );
    let output = std::process::Command::new(crate::harness::devhost_binary())
        .args(["config", "check", &node.config_file().display().to_string()])
        .output()
        .expect("config check");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{text}");
    let expected = format!(
        "error: {}:9:12: cdi_kind = \"vendor.example.com/acc\" of resource \"example.com/vendored\": vendor.example.com/acc=v-0 does not resolve",
        file.display()
    );
    assert!(text.contains(&expected), "{text}\nlacks\n{expected}");

    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    devhost.wait_for_log("cdi_kind = \"vendor.example.com/acc\" of resource").await;
    assert!(kubelet.registrations().is_empty(), "a refused backend serves nothing");
    write_vendor_spec(
        cdi.path(),
        "vendor.json",
        "vendor.example.com/acc",
        &[("v-0", json!({"env": ["VENDOR=1"]}))],
        Value::Null,
    );
    kubelet
        .wait_for_registrations("example.com/vendored", 1, Duration::from_secs(30))
        .await
        .expect("loads once the spec is there");
    let answer = allocate(&kubelet, "example.com/vendored", &["v-0"]).await;
    assert_eq!(names(&answer), ["vendor.example.com/acc=v-0"]);
    let mut want = plain(&devices, &["v-0"]);
    want.env.insert("VENDOR".into(), "1".into());
    assert_gives("vendored", &answer, &[cdi.path()], &want);
}

/// Item 2: a container with several devices (and with replicas) gets the
/// whole answer: allocation-wide variables in the plain fields, each
/// device's nodes and mounts from devhost's spec, and the backend's own
/// CDI names (a vendor's spec defines them) kept. Before the fix the
/// container got `IDS=<last device>` and the vendor's names were dropped.
#[tokio::test]
async fn item2_a_container_with_several_devices_gets_what_allocate_said() {
    let cdi = tempfile::tempdir().expect("cdi dir");
    let data = tempfile::tempdir().expect("data dir");
    let data = data.path().display().to_string();
    let node = node_with_cdi(cdi.path());
    let gpus = [
        dev("gpu-0", Some(("/dev/gpu0", "/dev/null")), None),
        dev("gpu-1", Some(("/dev/gpu1", "/dev/zero")), Some((data.as_str(), "/opt/gpu1"))),
        dev("gpu-2", None, None),
    ];
    let shared = [dev("s-0", Some(("/dev/s0", "/dev/null")), None), dev("s-1", Some(("/dev/s1", "/dev/zero")), None)];
    let vendored = [dev("v-0", Some(("/dev/v0", "/dev/null")), None), dev("v-1", Some(("/dev/v1", "/dev/zero")), None)];
    write_vendor_spec(
        cdi.path(),
        "vendor.json",
        "vendor.example.com/acc",
        &[
            ("v-0", json!({"env": ["VENDOR_DEVICE=v-0"]})),
            (
                "v-1",
                json!({"mounts": [{"hostPath": data, "containerPath": "/opt/vendor", "options": ["rbind", "ro"]}]}),
            ),
        ],
        json!({"env": ["VENDOR_LIB=/usr/lib/vendor"]}),
    );
    node.backend(
        "gpu",
        &static_file(
            &[
                resource(GPU, &gpus, ""),
                resource("example.com/shared", &shared, ""),
                resource("example.com/vendored", &vendored, "cdi_kind = \"vendor.example.com/acc\"\n"),
            ],
            "[resources.\"example.com/gpu\"]\ncdi = true\n[resources.\"example.com/shared\"]\ncdi = true\nreplicas = 2\n[resources.\"example.com/vendored\"]\ncdi = true\n",
        ),
    );
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    for resource in [GPU, "example.com/shared", "example.com/vendored"] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
    }
    let spec = cdi.path().join("devhost-example.com_gpu.json");
    wait_for("no GPU spec", &devhost, || spec_devices(&spec).is_some_and(|d| d.len() == 2)).await;
    assert_eq!(
        spec_devices(&spec),
        Some(vec!["gpu-0".to_owned(), "gpu-1".to_owned()]),
        "gpu-2 has no edits of its own"
    );
    let spec_text: Value = serde_json::from_str(&std::fs::read_to_string(&spec).expect("spec")).expect("JSON");
    crate::sharing::assert_valid_cdi(&spec_text);

    for ids in [&["gpu-0", "gpu-1"][..], &["gpu-1", "gpu-0"], &["gpu-0", "gpu-1", "gpu-2"], &["gpu-2"]] {
        let answer = allocate(&kubelet, GPU, ids).await;
        assert_eq!(answer.envs.get("IDS"), Some(&ids.join(",")), "{ids:?}: variables stay plain");
        assert_gives(&format!("{ids:?}"), &answer, &[cdi.path()], &plain(&gpus, ids));
    }

    let answer = allocate(&kubelet, "example.com/shared", &["s-0::0", "s-0::1", "s-1::0"]).await;
    assert_eq!(names(&answer), ["example.com/shared=s-0", "example.com/shared=s-1"]);
    assert_gives("replicas", &answer, &[cdi.path()], &plain(&shared, &["s-0", "s-1"]));

    wait_for("no vendored spec", &devhost, || {
        spec_devices(&cdi.path().join("devhost-example.com_vendored.json")).is_some()
    })
    .await;
    let answer = allocate(&kubelet, "example.com/vendored", &["v-0", "v-1"]).await;
    assert_eq!(
        names(&answer),
        [
            "example.com/vendored=v-0",
            "example.com/vendored=v-1",
            "vendor.example.com/acc=v-0",
            "vendor.example.com/acc=v-1"
        ],
        "devhost's names, then the backend's own"
    );
    let mut want = plain(&vendored, &["v-0", "v-1"]);
    want.env.extend([
        ("VENDOR_DEVICE".to_owned(), "v-0".to_owned()),
        ("VENDOR_LIB".to_owned(), "/usr/lib/vendor".to_owned()),
    ]);
    want.mounts.insert("/opt/vendor".into(), MountPoint { source: data.clone(), read_only: true });
    assert_gives("vendored", &answer, &[cdi.path()], &want);
}

/// Item 3: a backend's own CDI names in a DRA answer are passed on only
/// while a spec defines them; once the vendor's spec is gone they are left
/// out (logged once) and the claim's own CDI device still gives the
/// container the backend's answer. Before the fix they were passed on
/// unresolvable.
#[tokio::test(flavor = "multi_thread")]
async fn item3_dra_passes_on_only_backend_names_that_resolve() {
    let dra = crate::dra::DraNode::start_with("cdi_kind = \"vendor.example.com/gpu\"\n", |cdi| {
        write_vendor_spec(
            cdi,
            "vendor.json",
            "vendor.example.com/gpu",
            &[("gpu-0", json!({"env": ["VENDOR_GPU=0"]})), ("gpu-1", json!({"env": ["VENDOR_GPU=1"]}))],
            Value::Null,
        );
    })
    .await;
    let devhost = dra.node.start_devhost();
    dra.watcher.wait_for_driver(crate::dra::GPU_DRIVER, WAIT).await.expect("the driver registers");
    let cdi = dra.cdi_dir();
    let claims = [("one", "uid-1", "gpu-0"), ("two", "uid-2", "gpu-1"), ("three", "uid-3", "gpu-0")];
    for (name, uid, device) in claims {
        dra.server.put_claim(crate::dra::claim(name, uid, &[("gpus", "node-a", device)]));
    }
    let prepare = |uid: &'static str, name: &'static str| {
        let dra = &dra;
        async move {
            let answer = dra.watcher.prepare(crate::dra::GPU_DRIVER, &[("ml", uid, name)]).await.expect("answered");
            let claim = &answer.claims[uid];
            assert_eq!(claim.error, "", "{answer:?}");
            claim.devices[0].cdi_device_ids.clone()
        }
    };
    let ids = prepare("uid-1", "one").await;
    assert_eq!(ids, ["k8s.gpu.example.com/claim=uid-1-gpus", "vendor.example.com/gpu=gpu-0"]);
    let want = expected(
        [("IDS", "gpu-0"), ("VENDOR_GPU", "0")],
        &[DeviceSpec { container_path: "/dev/gpu-0".into(), host_path: "/dev/null".into(), permissions: "rw".into() }],
        &[],
    );
    if let Some(injected) = inject_names(&ids, &[&cdi]) {
        assert_eq!(injected.container_or_panic(), &want);
    }

    std::fs::remove_file(cdi.join("vendor.json")).expect("the vendor's spec goes");
    for (uid, name, device) in [("uid-2", "two", "gpu-1"), ("uid-3", "three", "gpu-0")] {
        let ids = prepare(uid, name).await;
        assert_eq!(ids, [format!("k8s.gpu.example.com/claim={uid}-gpus")], "the vendor's name is left out");
        let node = format!("/dev/{device}");
        let want = expected(
            [("IDS", device)],
            &[DeviceSpec { container_path: node, host_path: "/dev/null".into(), permissions: "rw".into() }],
            &[],
        );
        if let Some(injected) = inject_names(&ids, &[&cdi]) {
            assert_eq!(injected.container_or_panic(), &want);
        }
    }
    let log = devhost.log();
    for name in ["vendor.example.com/gpu=gpu-1", "vendor.example.com/gpu=gpu-0"] {
        let said = log.lines().filter(|l| l.contains("left out of the answer") && l.contains(name)).count();
        assert_eq!(said, 1, "{name} is reported once:\n{log}");
    }
}

/// Item 4: a rolling update with a changed config (the new instance has
/// another host node for gpu-0 and a gpu-2; the old one a gpu-1 the new
/// one lacks). The newer instance writes the shared spec and the older
/// one stops writing it: the file never flips back, the old instance's
/// gpu-1 stays resolvable while it runs, and every answer of either,
/// injected, gives exactly its plain answer. Before the fix the old
/// instance rewrote its version at its next check (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_a_rolling_update_with_a_changed_config_never_flips_the_spec() {
    let cdi = tempfile::tempdir().expect("cdi dir");
    let old_devices =
        [dev("gpu-0", Some(("/dev/gpu0", "/dev/null")), None), dev("gpu-1", Some(("/dev/gpu1", "/dev/null")), None)];
    let new_devices =
        [dev("gpu-0", Some(("/dev/gpu0", "/dev/zero")), None), dev("gpu-2", Some(("/dev/gpu2", "/dev/null")), None)];
    let settings = "[resources.\"example.com/gpu\"]\ncdi = true\n";
    let old_node = node_with_cdi(cdi.path());
    old_node.backend("gpu", &static_file(&[resource(GPU, &old_devices, "")], settings));
    let new_node = node_with_cdi(cdi.path());
    new_node.backend("gpu", &static_file(&[resource(GPU, &new_devices, "")], settings));
    let spec = cdi.path().join("devhost-example.com_gpu.json");

    let old_kubelet = FakeKubelet::start(&old_node.plugin_dir()).await.expect("kubelet");
    let mut old = old_node.start_devhost();
    old_kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("the old instance registers");
    wait_for("no spec from the old instance", &old, || spec_devices(&spec).is_some()).await;
    let old_written = tokio::time::Instant::now();
    let new_kubelet = FakeKubelet::start(&new_node.plugin_dir()).await.expect("kubelet");
    let new = new_node.start_devhost();
    new_kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("the new instance registers");
    wait_for("the new instance never wrote the spec", &new, || {
        spec_devices(&spec).is_some_and(|d| d.contains(&"gpu-2".to_owned()))
    })
    .await;

    // Past the old instance's next look at the file (10 s now, 30 s before
    // the fix), with both serving.
    let mut round = 0;
    while old_written.elapsed() < Duration::from_secs(34) {
        let devices = spec_devices(&spec).unwrap_or_default();
        assert!(devices.contains(&"gpu-2".to_owned()), "the spec flipped back to the old instance's: {devices:?}");
        assert!(devices.contains(&"gpu-1".to_owned()), "the old instance's gpu-1 became unresolvable: {devices:?}");
        if round % 10 == 0 {
            for ids in [&["gpu-0"][..], &["gpu-1"], &["gpu-0", "gpu-1"]] {
                let answer = allocate(&old_kubelet, GPU, ids).await;
                assert_gives(&format!("old {ids:?}"), &answer, &[cdi.path()], &plain(&old_devices, ids));
            }
            for ids in [&["gpu-0"][..], &["gpu-2"], &["gpu-2", "gpu-0"]] {
                let answer = allocate(&new_kubelet, GPU, ids).await;
                assert_eq!(names(&answer).len(), ids.len(), "the newer instance's names all resolve: {answer:?}");
                assert_gives(&format!("new {ids:?}"), &answer, &[cdi.path()], &plain(&new_devices, ids));
            }
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(old.log().contains("a newer devhost instance writes this CDI spec now"), "{}", old.log());
    // gpu-0's entry is the newer instance's (/dev/zero): the old one's
    // answers for it went plain instead of naming it.
    assert!(old.log().contains("answered without devhost's CDI names"), "{}", old.log());
    assert!(!new.log().contains("changed by someone else"), "{}", new.log());

    assert!(old.stop_with(nix::sys::signal::Signal::SIGTERM).await.success(), "the old instance stops cleanly");
    wait_for("gpu-1 outlived the old instance", &new, || {
        spec_devices(&spec).is_some_and(|d| d == ["gpu-0".to_owned(), "gpu-2".to_owned()])
    })
    .await;
}

/// Item 5: a vendor's spec of the same kind names gpu-0 (as the NVIDIA
/// toolkit's spec names GPUs by UUID): devhost leaves gpu-0 out of its own
/// spec so the vendor's name resolves, reports the clash (log once,
/// metric, `devhost list`), and answers gpu-0 with plain fields. Before
/// the fix both files defined the name and it resolved from neither.
#[tokio::test]
async fn item5_a_vendor_spec_of_the_same_kind_is_left_alone_and_reported() {
    let cdi = tempfile::tempdir().expect("cdi dir");
    let node = node_with_cdi(cdi.path());
    let gpus =
        [dev("gpu-0", Some(("/dev/gpu0", "/dev/null")), None), dev("gpu-1", Some(("/dev/gpu1", "/dev/zero")), None)];
    let vendor = write_vendor_spec(
        cdi.path(),
        "vendor.json",
        GPU,
        &[
            ("gpu-0", json!({"deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null"}]})),
            ("all", json!({"deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null"}]})),
        ],
        json!({"env": ["VENDOR_TOOLKIT=1"]}),
    );
    node.backend("gpu", &static_file(&[resource(GPU, &gpus, "")], "[resources.\"example.com/gpu\"]\ncdi = true\n"));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");
    let spec = cdi.path().join("devhost-example.com_gpu.json");
    wait_for("no spec", &devhost, || spec_devices(&spec).is_some()).await;
    assert_eq!(spec_devices(&spec), Some(vec!["gpu-1".to_owned()]), "gpu-0 is left to the vendor's spec");

    let answer = allocate(&kubelet, GPU, &["gpu-0", "gpu-1"]).await;
    assert_eq!(names(&answer), ["example.com/gpu=gpu-1"]);
    assert_gives("both", &answer, &[cdi.path()], &plain(&gpus, &["gpu-0", "gpu-1"]));
    let vendor_name = vec!["example.com/gpu=gpu-0".to_owned()];
    if let Some(injected) = inject_names(&vendor_name, &[cdi.path()]) {
        injected.container_or_panic();
        assert_eq!(injected.defined_in.get(&vendor_name[0]), Some(&vendor), "the vendor's name resolves from its spec");
    }

    devhost.wait_for_log("another CDI spec defines example.com/gpu=gpu-0").await;
    let series = "devhost_cdi_clashing_devices{resource=\"example.com/gpu\"}";
    assert_eq!(metric(&devhost, series).await.as_deref(), Some("1"));
    let output = std::process::Command::new(crate::harness::devhost_binary())
        .args(["list", "--config", &node.config_file().display().to_string()])
        .output()
        .expect("devhost list");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = format!("CDI name also defined by {}", vendor.display());
    assert_eq!(text.matches(&line).count(), 1, "devhost list shows the clash for gpu-0 only:\n{text}");
    // A rescan later the clash is not logged again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said = devhost.log().matches("another CDI spec defines example.com/gpu=gpu-0").count();
    assert_eq!(said, 1, "{}", devhost.log());
}
