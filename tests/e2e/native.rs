//! Native backends through the real `devhost` binary (issue 3): modules
//! loaded from `backends.d/`, registered with the fake kubelet, pushing
//! health from their own threads; hostile modules refused with their exact
//! errors while good backends beside them serve.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1;

use crate::harness::{Node, WAIT, static_backend};
use crate::native_loader::{compile_c, rust_module};

const RUST: &str = "example.com/native-rust";
const C: &str = "example.com/native-c";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn module_file(module: &Path, config: &str) -> String {
    format!("[backend]\nmodule = {:?}\ncall_timeout_ms = 5000\n[config]\n{config}\n", module.display().to_string())
}

/// Waits until device `id` of `resource` has been seen both Healthy and
/// Unhealthy over the kubelet's ListAndWatch stream.
async fn wait_for_flip(kubelet: &FakeKubelet, resource: &str, id: &str) {
    for health in ["Unhealthy", "Healthy"] {
        kubelet
            .wait_for_devices(resource, WAIT, |d| d.iter().any(|d| d.id == id && d.health == health))
            .await
            .unwrap_or_else(|e| panic!("{resource}: {id} never became {health}: {e}"));
    }
}

/// Checks an example's answer for `ids`, and that the runtime's CDI library,
/// with the vendor's spec in `cdi`, gives the container just that.
fn check_allocation(answer: &v1beta1::AllocateResponse, ids: &[&str], cdi_dir: &Path) {
    assert_eq!(answer.container_responses.len(), 1);
    let container = &answer.container_responses[0];
    let joined = ids.join(",");
    assert_eq!(container.envs.get("EXAMPLE_DEVICES"), Some(&joined), "envs");
    assert_eq!(container.annotations.get("example.com/devices"), Some(&joined), "annotations");
    let mounts: Vec<(&str, &str, bool)> =
        container.mounts.iter().map(|m| (m.host_path.as_str(), m.container_path.as_str(), m.read_only)).collect();
    let expected: Vec<(String, String)> =
        ids.iter().map(|id| (format!("/run/example/{id}"), format!("/var/run/example/{id}"))).collect();
    assert_eq!(mounts, expected.iter().map(|(h, c)| (h.as_str(), c.as_str(), true)).collect::<Vec<_>>(), "mounts");
    let specs: Vec<(&str, &str)> =
        container.devices.iter().map(|d| (d.container_path.as_str(), d.permissions.as_str())).collect();
    let expected: Vec<String> = ids.iter().map(|id| format!("/dev/example-{id}")).collect();
    assert_eq!(specs, expected.iter().map(|p| (p.as_str(), "rw")).collect::<Vec<_>>(), "device specs");
    let cdi: Vec<&str> = container.cdi_devices.iter().map(|c| c.name.as_str()).collect();
    let expected: Vec<String> = ids.iter().map(|id| format!("example.com/device={id}")).collect();
    assert_eq!(cdi, expected, "CDI names (the vendor's spec defines them)");
    let want = crate::cdi_oracle::with_vendor_nodes(crate::cdi_oracle::Container::from_plain(container), ids);
    crate::cdi_oracle::assert_gives("the example's answer", container, &[cdi_dir], &want);
}

#[tokio::test]
async fn rust_and_c_examples_serve_through_the_binary() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let rust = rust_module("devhost_example_native_rust", &modules);
    let c = compile_c(&repo().join("examples/native-c/example.c"), &modules);
    let cdi = crate::cdi_oracle::vendor_cdi(&node, "example.com/device", &["rust-0", "rust-1", "c-0", "c-1"]);
    node.backend("native-rust", &module_file(&rust, "flip_interval_ms = 150"));
    node.backend("native-c", &module_file(&c, "flip_interval_ms = 150"));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();

    let rust_registration = kubelet.wait_for_registrations(RUST, 1, WAIT).await.expect("rust registered");
    assert_eq!(rust_registration.options.map(|o| o.get_preferred_allocation_available), Some(true));
    let c_registration = kubelet.wait_for_registrations(C, 1, WAIT).await.expect("c registered");
    assert_eq!(c_registration.options.map(|o| o.pre_start_required), Some(true));

    // Health pushed from each backend's own thread reaches ListAndWatch.
    wait_for_flip(&kubelet, RUST, "rust-1").await;
    wait_for_flip(&kubelet, C, "c-1").await;

    check_allocation(
        &kubelet.allocate(RUST, &["rust-0", "rust-1"]).await.expect("rust allocate"),
        &["rust-0", "rust-1"],
        &cdi,
    );
    check_allocation(&kubelet.allocate(C, &["c-0", "c-1"]).await.expect("c allocate"), &["c-0", "c-1"], &cdi);
    kubelet.pre_start(C, &["c-0"]).await.expect("c pre-start");
    let preferred = kubelet.preferred_allocation(RUST, &["rust-0", "rust-1"], &[], 1).await.expect("preferred");
    assert_eq!(preferred.container_responses[0].device_i_ds, ["rust-1"], "the backend's own policy");
}

#[tokio::test]
async fn hostile_modules_are_refused_with_exact_errors_while_good_backends_serve() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let fixtures = repo().join("tests/fixtures/native");
    let not_elf = modules.join("not-elf.so");
    std::fs::copy(fixtures.join("not-elf.so"), &not_elf).expect("copy");
    std::fs::set_permissions(&not_elf, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let writable = rust_module("devhost_example_native_rust", &modules);
    let group_writable = modules.join("group-writable.so");
    std::fs::rename(&writable, &group_writable).expect("rename");
    std::fs::set_permissions(&group_writable, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    let no_entry = compile_c(&fixtures.join("no_entry.c"), &modules);
    let future = compile_c(&fixtures.join("future_major.c"), &modules);
    let small = compile_c(&fixtures.join("small_struct.c"), &modules);
    let init_error = compile_c(&fixtures.join("init_error.c"), &modules);
    for (name, module) in [
        ("not-elf", &not_elf),
        ("group-writable", &group_writable),
        ("no-entry", &no_entry),
        ("future-major", &future),
        ("small-struct", &small),
        ("init-error", &init_error),
    ] {
        node.backend(name, &module_file(module, ""));
    }
    node.backend("static", &static_backend(&[("example.com/good", &["g-0"])], None));
    let c = compile_c(&repo().join("examples/native-c/example.c"), &modules);
    node.backend("zz-native-c", &module_file(&c, "flip_interval_ms = 3600000"));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    kubelet.wait_for_registrations("example.com/good", 1, WAIT).await.expect("static serves");
    kubelet.wait_for_registrations(C, 1, WAIT).await.expect("good native serves");
    let m = |path: &Path| path.display().to_string();
    for expected in [
        format!(
            "native backend {}: not an ELF shared library (starts with bytes [54 68 69 73], expected [7f 45 4c 46])",
            m(&not_elf)
        ),
        format!(
            "native backend {}: mode 0775 lets group or others write it (expected no group/other write permission, e.g. 0755)",
            m(&group_writable)
        ),
        format!(
            "native backend {}: no symbol `devhost_backend_entry` (expected a backend built against devhost_backend.h or with devhost_abi::export_backend!)",
            m(&no_entry)
        ),
        format!(
            "native backend {}: implements backend ABI 2.3, but this devhost implements ABI 1.2 (expected major 1)",
            m(&future)
        ),
        format!(
            "native backend {}: DevhostBackendApi.struct_size is 8 bytes, expected at least 48 (ABI 1.0)",
            m(&small)
        ),
        "backend \"init-error\": init failed: cannot open /dev/acme0: no such device".to_owned(),
    ] {
        devhost.wait_for_log(&expected).await;
    }
    assert_eq!(kubelet.registrations().len(), 2, "only the good backends registered");
    kubelet.allocate("example.com/good", &["g-0"]).await.expect("static answers");
    kubelet.allocate(C, &["c-0"]).await.expect("native answers");
}

#[tokio::test]
async fn a_panicking_backend_goes_unhealthy_and_recovers_while_its_neighbour_serves() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let panic = rust_module("devhost_fixture_native_panic", &modules);
    node.backend("panic", &module_file(&panic, ""));
    node.backend("good", &static_backend(&[("example.com/good", &["g-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    let resource = "fixture.example.com/panic";
    kubelet
        .wait_for_devices(resource, WAIT, |d| d.iter().all(|d| d.health == "Healthy") && !d.is_empty())
        .await
        .expect("healthy");
    kubelet.wait_for_registrations("example.com/good", 1, WAIT).await.expect("good serves");

    let error = kubelet.allocate(resource, &["p-0"]).await.expect_err("allocate panics");
    let status = error.status().expect("an RPC status");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert_eq!(status.message(), "backend \"panic\": allocate panicked: allocate of p-0 exploded on purpose");
    kubelet
        .wait_for_devices(resource, WAIT, |d| d.iter().all(|d| d.health == "Unhealthy"))
        .await
        .expect("its devices go Unhealthy");
    for _ in 0..20 {
        kubelet.allocate("example.com/good", &["g-0"]).await.expect("the neighbour keeps answering");
    }
    assert_eq!(kubelet.devices("example.com/good").map(|d| d[0].health.clone()).as_deref(), Some("Healthy"));
    kubelet
        .wait_for_devices(resource, WAIT, |d| d.iter().all(|d| d.health == "Healthy"))
        .await
        .expect("re-initialised with back-off, healthy again");
}

/// The `devhost __worker <backend>` process below devhost's child of the
/// same name (its PID namespace's init), as the host sees it.
fn worker_of(devhost: i32, backend: &str) -> Option<i32> {
    let args = ["devhost", "__worker", backend];
    let is_worker = |p: &crate::procs::Process| p.state != 'Z' && p.args == args;
    let init = crate::procs::children(devhost).into_iter().find(is_worker)?;
    Some(crate::procs::children(init.pid).into_iter().find(is_worker).map_or(init.pid, |worker| worker.pid))
}

/// The process (not a zombie) `pid` exists.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

#[tokio::test]
async fn a_module_replaced_on_disk_serves_its_new_code_from_a_new_worker() {
    use sha2::Digest;
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let fixtures = repo().join("tests/fixtures/native");
    let old = compile_c(&fixtures.join("pid_report.c"), &modules);
    let new = compile_c(&repo().join("examples/native-c/example.c"), &modules);
    let module = modules.join("libvendor.so");
    std::fs::copy(&old, &module).expect("install the first version");
    node.backend("vendor", &module_file(&module, ""));
    node.backend("static", &static_backend(&[("example.com/good", &["g-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations("fixture.example.com/pid-report", 1, WAIT).await.expect("first version");
    let answer = kubelet.allocate("fixture.example.com/pid-report", &["pid-0"]).await.expect("allocate");
    assert_eq!(
        answer.container_responses[0].envs["FIXTURE_PID"], "2",
        "the fixture runs in its worker's own PID namespace"
    );
    let old_worker = worker_of(devhost.pid().as_raw(), "vendor").expect("the first worker runs");

    // Replace the module the way an upgrade does: a new file renamed over
    // it (noticed by the periodic rescan, which compares module files).
    let staged = modules.join(".libvendor.so.new");
    std::fs::copy(&new, &staged).expect("stage");
    std::fs::rename(&staged, &module).expect("replace");
    let sha256: String =
        sha2::Sha256::digest(std::fs::read(&module).expect("read")).iter().map(|b| format!("{b:02x}")).collect();

    kubelet.wait_for_registrations(C, 1, WAIT).await.expect("the new code's resource registers");
    let answer = kubelet.allocate(C, &["c-0"]).await.expect("the new code answers");
    assert_eq!(answer.container_responses[0].envs.get("EXAMPLE_DEVICES").map(String::as_str), Some("c-0"));
    let deadline = std::time::Instant::now() + WAIT;
    while alive(old_worker) {
        assert!(std::time::Instant::now() < deadline, "the old worker {old_worker} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let address = devhost.metrics_address().await;
    let (_, metrics) = crate::harness::http_get(&address, "/metrics").await;
    let info = metrics.lines().find(|l| l.starts_with("devhost_backend_info{") && l.contains("backend=\"vendor\""));
    let info = info.unwrap_or_else(|| panic!("no devhost_backend_info for vendor:\n{metrics}"));
    assert!(info.contains(&format!("sha256=\"{sha256}\"")) && info.contains("isolation=\"process\""), "{info}");
    let series = metrics.lines().filter(|l| l.starts_with("devhost_backend_info{") && l.contains("backend=\"vendor\""));
    assert_eq!(series.count(), 1, "the old module's series is gone:\n{metrics}");
    assert!(devhost.log().contains("backend changed; replacing it"), "{}", devhost.log());
    // Just that backend: the static neighbour kept its registration and stream.
    assert_eq!(kubelet.registration_count("example.com/good"), 1, "the neighbour never re-registered");
    assert!(kubelet.connected("example.com/good"), "the neighbour's stream stayed open");
    kubelet.allocate("example.com/good", &["g-0"]).await.expect("the neighbour answers");
}

/// A backend that failed to start waits out its back-off (10 s at first),
/// unless its module changes: then the next reload starts it at once.
#[tokio::test]
async fn a_failed_backend_whose_module_changes_is_tried_at_once() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let failing = compile_c(&repo().join("tests/fixtures/native/init_error.c"), &modules);
    let good = compile_c(&repo().join("examples/native-c/example.c"), &modules);
    let module = modules.join("libvendor.so");
    std::fs::copy(&failing, &module).expect("install the failing version");
    node.backend("vendor", &module_file(&module, ""));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    devhost.wait_for_log("will try the backend again then, or at once when its file or module changes").await;

    // Fixed module, renamed into place; a reload (as the periodic rescan
    // would do) starts it without waiting for the back-off.
    let staged = modules.join(".libvendor.so.new");
    std::fs::copy(&good, &staged).expect("stage");
    std::fs::rename(&staged, &module).expect("replace");
    devhost.reload().await;
    let log = devhost.log();
    let reconciled = log.rfind("backends reconciled cause=").expect("the reload's reconcile");
    let started = log.rfind("backend started backend=vendor").unwrap_or_else(|| panic!("not started:\n{log}"));
    assert!(started < reconciled, "started by that reload, not later:\n{log}");
    assert_eq!(log.matches("backend started backend=vendor").count(), 1, "{log}");
    kubelet.wait_for_registrations(C, 1, WAIT).await.expect("the fixed module's resource registers");
}

/// Garbage from one backend (item 7 of issue 17): the precise message is
/// logged or returned, and in the same daemon, at the same time, a good
/// backend keeps serving without a flicker: one registration, one open
/// stream, no new device list, every Allocate answered.
#[tokio::test]
async fn garbage_from_one_backend_is_refused_precisely_while_its_neighbour_serves() {
    const GOOD: &str = "example.com/good";
    const GARBAGE: &str = "fixture.example.com/garbage";
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let garbage = compile_c(&repo().join("tests/fixtures/native/garbage.c"), &modules);
    node.backend("garbage", &module_file(&garbage, "garbage = \"duplicate\""));
    node.backend("good", &static_backend(&[(GOOD, &["g-0"])], None));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    kubelet.wait_for_registrations(GOOD, 1, WAIT).await.expect("the neighbour serves");
    devhost
        .wait_for_log(&format!(
            "backend \"garbage\": init failed: published an invalid device list: resource \"{GARBAGE}\": device ID \"gpu-0\" appears more than once"
        ))
        .await;
    assert_eq!(kubelet.registration_count(GARBAGE), 0, "a backend whose init failed serves nothing");
    kubelet.wait_for_devices(GOOD, WAIT, |d| !d.is_empty()).await.expect("the neighbour's first list");
    let lists = kubelet.device_list_count(GOOD);

    // Now garbage in Allocate, from a backend that started well.
    node.backend("garbage", &module_file(&garbage, "garbage = \"alloc-env\""));
    devhost.reload().await;
    kubelet.wait_for_registrations(GARBAGE, 1, WAIT).await.expect("the garbage backend starts");
    for _ in 0..5 {
        let error = kubelet.allocate(GARBAGE, &["gpu-0"]).await.expect_err("garbage is never passed on");
        let status = error.status().expect("an RPC status");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert_eq!(
            status.message(),
            "backend \"garbage\": allocate returned invalid data: an env name is not valid UTF-8 (byte 0xc3 at offset 3; lossy: \"BAD\u{fffd}\")"
        );
        let answer = kubelet.allocate(GOOD, &["g-0"]).await.expect("the neighbour answers between the faults");
        assert_eq!(answer.container_responses.len(), 1);
    }
    assert_eq!(kubelet.registration_count(GOOD), 1, "the neighbour never re-registered");
    assert!(kubelet.connected(GOOD), "the neighbour's stream stayed open");
    assert_eq!(kubelet.device_list_count(GOOD), lists, "the neighbour's devices never changed");
    assert_eq!(kubelet.devices(GOOD).map(|d| d[0].health.clone()).as_deref(), Some("Healthy"));
}
