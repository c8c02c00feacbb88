//! Native backends in-process: the loader (`devhost::native::load`) and the
//! backend handle driving the Rust and C examples and the hostile fixtures
//! of `tests/fixtures/native/`, each with the exact error it must produce.
//!
//! The Rust cdylibs come from `cargo build --workspace` (found next to this
//! test binary); the C sources are compiled here with the system `cc`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devhost::backend::handle::{BackendHandle, CallError};
use devhost::backend::{Backend, Health, PreferredRequest};
use devhost::native::{self, AbiError};
use tokio_util::sync::CancellationToken;

/// Call deadline of the backends under test: generous, so that a loaded
/// machine (or a panic printing its backtrace) never looks like a hang.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline in the test that is about deadlines.
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, from this binary's path `target/<profile>/deps/e2e-*`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("the test binary lives in target/<profile>/deps").to_owned()
}

/// Copies the workspace cdylib `lib<name>.so` into `dir` with mode 0755 (so
/// the result does not depend on the umask of the build).
pub(crate) fn rust_module(name: &str, dir: &Path) -> PathBuf {
    let built = target_dir().join(format!("lib{name}.so"));
    assert!(built.is_file(), "{} is missing: run `cargo build --workspace` before `cargo test`", built.display());
    install(&built, &dir.join(format!("lib{name}.so")), 0o755)
}

/// Compiles one C source against `abi/include` into `dir`, mode 0755.
pub(crate) fn compile_c(source: &Path, dir: &Path) -> PathBuf {
    let stem = source.file_stem().and_then(|s| s.to_str()).expect("a source file name");
    compile_c_with(source, &dir.join(format!("lib{stem}.so")), &repo().join("abi/include"), &[])
}

/// `compile_c` into `out`, against the header in `include`, with extra
/// compiler flags (`-DNAME`).
pub(crate) fn compile_c_with(source: &Path, out: &Path, include: &Path, flags: &[&str]) -> PathBuf {
    let out = out.to_owned();
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-pthread", "-I"])
        .arg(include)
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(source)
        .output()
        .expect("the system C compiler `cc` runs");
    assert!(output.status.success(), "cc {} failed:\n{}", source.display(), String::from_utf8_lossy(&output.stderr));
    install(&out, &out, 0o755)
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/native").join(name)
}

fn install(from: &Path, to: &Path, mode: u32) -> PathBuf {
    if from != to {
        std::fs::copy(from, to).expect("copy the module");
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).expect("chmod the module");
    to.to_owned()
}

fn load(module: &Path, config: &str) -> Arc<dyn Backend> {
    match native::load(module, None, config.to_owned()) {
        Ok(backend) => backend,
        Err(error) => panic!("loading {} failed: {error}", module.display()),
    }
}

fn load_error(module: &Path, sha256: Option<&str>) -> String {
    match native::load(module, sha256, "{}".to_owned()) {
        Ok(_) => panic!("{} loaded, but it must be refused", module.display()),
        Err(error) => error.to_string(),
    }
}

async fn start(name: &str, backend: Arc<dyn Backend>) -> Arc<BackendHandle> {
    start_with(name, backend, TIMEOUT).await
}

async fn start_with(name: &str, backend: Arc<dyn Backend>, timeout: Duration) -> Arc<BackendHandle> {
    match BackendHandle::start(name, backend, timeout, CancellationToken::new()).await {
        Ok(handle) => handle,
        Err(error) => panic!("starting {name} failed: {error}"),
    }
}

async fn start_error(name: &str, backend: Arc<dyn Backend>) -> String {
    match BackendHandle::start(name, backend, TIMEOUT, CancellationToken::new()).await {
        Ok(_) => panic!("{name} started, but its init must fail"),
        Err(error) => error.to_string(),
    }
}

/// The health strings the kubelet would see for the handle's first resource.
fn healths(handle: &BackendHandle) -> Vec<(String, String)> {
    let snapshot = handle.resources()[0].1.snapshot();
    snapshot.advertised().iter().map(|d| (d.id.clone(), d.health.clone())).collect()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn allocate(handle: &BackendHandle, ids: &[&str]) -> Result<devhost::backend::Allocation, CallError> {
    let resource = handle.resources()[0].0.name.clone();
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    handle.allocate(&resource, ids).await
}

/// Checks an example's answer, its health flips and its shutdown.
async fn exercise_example(handle: &BackendHandle, prefix: &str) {
    let ids = [format!("{prefix}-0"), format!("{prefix}-1")];
    let healthy = |health: &str| ids.iter().map(|id| (id.clone(), health.to_owned())).collect::<Vec<_>>();
    assert_eq!(healths(handle)[0], healthy("Healthy")[0]);
    // The background thread flips the second device: both states show up.
    let mut receiver = handle.resources()[0].1.subscribe();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "the device {} never flipped; seen {seen:?}", ids[1]);
        let _ = tokio::time::timeout(Duration::from_secs(1), receiver.changed()).await;
        let snapshot = receiver.borrow_and_update().clone();
        seen.insert(snapshot.advertised()[1].health.clone());
    }

    let answer = allocate(handle, &[&ids[0], &ids[1]]).await.expect("allocate answers");
    let joined = ids.join(",");
    assert_eq!(answer.envs.get("EXAMPLE_DEVICES"), Some(&joined));
    assert_eq!(answer.annotations.get("example.com/devices"), Some(&joined));
    assert_eq!(answer.mounts.len(), 2);
    assert_eq!(answer.mounts[0].container_path, format!("/var/run/example/{}", ids[0]));
    assert_eq!(answer.mounts[0].host_path, format!("/run/example/{}", ids[0]));
    assert!(answer.mounts[0].read_only);
    assert_eq!(answer.device_specs[1].container_path, format!("/dev/example-{}", ids[1]));
    assert_eq!(answer.device_specs[1].host_path, "/dev/null");
    assert_eq!(answer.device_specs[1].permissions, "rw");
    assert_eq!(answer.cdi_devices, ids.iter().map(|id| format!("example.com/device={id}")).collect::<Vec<_>>());

    handle.shutdown().await;
    let after = handle.resources()[0].1.snapshot();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Arc::ptr_eq(&after, &handle.resources()[0].1.snapshot()), "nothing is published after shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_example_serves_and_pushes_health_from_its_thread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = rust_module("devhost_example_native_rust", dir.path());
    let handle = start("native-rust", load(&module, r#"{"flip_interval_ms": 50}"#)).await;
    let spec = &handle.resources()[0].0;
    assert_eq!(
        (spec.name.as_str(), spec.preferred_allocation, spec.pre_start_required),
        ("example.com/native-rust", true, false)
    );
    let request = PreferredRequest { available: vec!["rust-0".into(), "rust-1".into()], must_include: vec![], size: 1 };
    let resource = spec.name.clone();
    let preferred = handle.preferred_allocation(&resource, request).await;
    assert_eq!(preferred, Ok(Some(vec!["rust-1".to_owned()])));
    exercise_example(&handle, "rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn c_example_serves_and_pushes_health_from_its_thread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&repo().join("examples/native-c/example.c"), dir.path());
    c_example_serves(&module).await;
}

/// The append-only promise: the C example built against the header of ABI
/// 1.0, as released (a frozen copy in the fixtures), is a 1.0 module with
/// 1.0's smaller structs, and serves exactly as the one built today.
#[tokio::test(flavor = "multi_thread")]
async fn c_example_built_against_the_1_0_header_serves_as_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let header = fixture("abi-1.0");
    let text = std::fs::read_to_string(header.join("devhost_backend.h")).expect("the 1.0 header");
    assert!(text.contains("#define DEVHOST_ABI_VERSION_MINOR 0"), "the frozen header is 1.0's");
    let out = dir.path().join("libexample_1_0.so");
    let module = compile_c_with(&repo().join("examples/native-c/example.c"), &out, &header, &[]);
    c_example_serves(&module).await;
}

async fn c_example_serves(module: &Path) {
    let handle = start("native-c", load(module, r#"{"flip_interval_ms": 50}"#)).await;
    let spec = &handle.resources()[0].0;
    assert_eq!(
        (spec.name.as_str(), spec.preferred_allocation, spec.pre_start_required),
        ("example.com/native-c", false, true)
    );
    let resource = spec.name.clone();
    let request = PreferredRequest { available: vec!["c-0".into()], must_include: vec![], size: 1 };
    let preferred = handle.preferred_allocation(&resource, request).await;
    assert_eq!(preferred, Ok(None), "no preferred_allocation: the host's default policy");
    let resource = spec.name.clone();
    let pre_start = handle.pre_start(&resource, vec!["c-0".to_owned()]).await;
    assert_eq!(pre_start, Ok(()));
    exercise_example(&handle, "c").await;
}

#[test]
fn hostile_module_files_are_refused_with_exact_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();

    let not_elf = install(&fixture("not-elf.so"), &dir.path().join("not-elf.so"), 0o644);
    assert_eq!(
        load_error(&not_elf, None),
        format!(
            "native backend {d}/not-elf.so: not an ELF shared library (starts with bytes [54 68 69 73], expected [7f 45 4c 46])"
        )
    );
    let no_entry = compile_c(&fixture("no_entry.c"), dir.path());
    assert_eq!(
        load_error(&no_entry, None),
        format!(
            "native backend {d}/libno_entry.so: no symbol `devhost_backend_entry` (expected a backend built against devhost_backend.h or with devhost_abi::export_backend!)"
        )
    );
    let future = compile_c(&fixture("future_major.c"), dir.path());
    assert_eq!(
        load_error(&future, None),
        format!(
            "native backend {d}/libfuture_major.so: implements backend ABI 2.3, but this devhost implements ABI 1.2 (expected major 1)"
        )
    );
    let small = compile_c(&fixture("small_struct.c"), dir.path());
    assert_eq!(
        load_error(&small, None),
        format!(
            "native backend {d}/libsmall_struct.so: DevhostBackendApi.struct_size is 8 bytes, expected at least 48 (ABI 1.0)"
        )
    );

    let good = rust_module("devhost_example_native_rust", dir.path());
    let writable = install(&good, &dir.path().join("group-writable.so"), 0o775);
    assert_eq!(
        load_error(&writable, None),
        format!(
            "native backend {d}/group-writable.so: mode 0775 lets group or others write it (expected no group/other write permission, e.g. 0755)"
        )
    );
    assert_eq!(
        load_error(&dir.path().join("absent.so"), None),
        format!("native backend {d}/absent.so: no such file (expected the path of a shared library)")
    );
    assert_eq!(
        load_error(dir.path(), None),
        format!("native backend {d}: not a regular file (expected a shared library file)")
    );

    let zeros = "0".repeat(64);
    let error = load_error(&good, Some(&zeros));
    // The file's digest from coreutils, not from devhost's own code.
    let output = Command::new("sha256sum").arg(&good).output().expect("sha256sum runs");
    let actual = String::from_utf8_lossy(&output.stdout).split_whitespace().next().expect("a digest").to_owned();
    assert_eq!(actual.len(), 64, "{actual}");
    assert_eq!(error, format!("native backend {}: sha256 is {actual}, but the config pins {zeros}", good.display()));
    assert!(native::load(&good, Some(&actual.to_uppercase()), "{}".to_owned()).is_ok(), "the right pin loads");
}

#[test]
fn a_module_owned_by_another_user_is_refused() {
    // Only root can hand a file to another uid; elsewhere this test has nothing to check.
    let dir = tempfile::tempdir().expect("temp dir");
    let module = rust_module("devhost_example_native_rust", dir.path());
    if Command::new("chown").arg("65534").arg(&module).status().map_or(true, |s| !s.success()) {
        crate::harness::skip(crate::harness::Missing::Machine, "cannot chown (not root)");
        return;
    }
    let error = load_error(&module, None);
    assert!(
        error.starts_with(&format!(
            "native backend {}: owned by uid 65534 (expected root or devhost's own uid ",
            module.display()
        )),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn init_returning_an_error_is_reported_with_its_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("init_error.c"), dir.path());
    let error = start_error("init-error", load(&module, "{}")).await;
    assert_eq!(error, "backend \"init-error\": init failed: cannot open /dev/acme0: no such device");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_device_data_is_refused_with_precise_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = compile_c(&fixture("garbage.c"), dir.path());
    let prefix = "backend \"garbage\": init failed: published an invalid device list: resource \"fixture.example.com/garbage\": ";
    let cases = [
        ("utf8", "the ID of device #1 is not valid UTF-8 (byte 0xff at offset 4; lossy: \"gpu-\u{fffd}\")"),
        ("empty", "device #1 has an empty ID"),
        ("duplicate", "device ID \"gpu-0\" appears more than once"),
        (
            "health",
            "device \"gpu-1\" has unknown health 7 (expected 1 = DEVHOST_HEALTH_HEALTHY or 2 = DEVHOST_HEALTH_UNHEALTHY)",
        ),
        ("size", "DevhostDevice.struct_size is 4 bytes, expected at least 40 (ABI 1.0)"),
    ];
    for (garbage, expected) in cases {
        let backend = load(&module, &format!(r#"{{"garbage": "{garbage}"}}"#));
        assert_eq!(start_error("garbage", backend).await, format!("{prefix}{expected}"), "garbage = {garbage}");
    }
    // A clean list, then a non-UTF-8 env name in allocate.
    let handle = start("garbage", load(&module, "{}")).await;
    let error = allocate(&handle, &["gpu-0"]).await.expect_err("a non-UTF-8 env name fails allocate");
    assert_eq!(
        error.to_string(),
        "backend \"garbage\": allocate returned invalid data: an env name is not valid UTF-8 (byte 0xc3 at offset 3; lossy: \"BAD\u{fffd}\")"
    );
    // Invalid data is a fault: the backend's devices go Unhealthy until it
    // is re-initialised.
    assert!(error.is_fault());
    assert!(healths(&handle).iter().all(|(_, health)| health == "Unhealthy"), "{:?}", healths(&handle));
    assert_recovers(&handle).await;
}

/// Starts the Rust example as the well-behaved neighbour of a hostile backend.
async fn good_neighbour(dir: &Path) -> Arc<BackendHandle> {
    let module = rust_module("devhost_example_native_rust", dir);
    start("good", load(&module, r#"{"flip_interval_ms": 3600000}"#)).await
}

async fn assert_unharmed(good: &BackendHandle) {
    assert_eq!(healths(good), vec![("rust-0".into(), "Healthy".into()), ("rust-1".into(), "Healthy".into())]);
    assert!(allocate(good, &["rust-0"]).await.is_ok(), "the good backend keeps answering");
}

/// Waits for the supervisor to re-initialise a faulted backend.
async fn assert_recovers(handle: &BackendHandle) {
    let state = handle.resources()[0].1.clone();
    eventually("the faulted backend is re-initialised", || state.snapshot().fault.is_none()).await;
    assert!(healths(handle).iter().all(|(_, health)| health == "Healthy"), "{:?}", healths(handle));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_allocate_faults_only_that_backend_which_then_reinits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = good_neighbour(dir.path()).await;
    let module = rust_module("devhost_fixture_native_panic", dir.path());
    let bad = start("panic", load(&module, "{}")).await;
    let error = allocate(&bad, &["p-0"]).await.expect_err("allocate panics");
    assert_eq!(error.to_string(), "backend \"panic\": allocate panicked: allocate of p-0 exploded on purpose");
    assert!(error.is_fault());
    let snapshot = bad.resources()[0].1.snapshot();
    assert_eq!(snapshot.fault.as_deref(), Some(error.to_string().as_str()));
    assert!(snapshot.advertised().iter().all(|d| d.health == "Unhealthy"));
    assert_eq!(snapshot.devices[0].health, Health::Healthy, "the backend's own view is kept");
    assert_unharmed(&good).await;
    assert_recovers(&bad).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_hanging_past_its_deadline_faults_only_that_backend_which_then_reinits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = good_neighbour(dir.path()).await;
    let module = compile_c(&fixture("hang.c"), dir.path());
    let bad = start_with("hang", load(&module, "{}"), SHORT_TIMEOUT).await;
    let started = Instant::now();
    let error = allocate(&bad, &["h-0"]).await.expect_err("allocate hangs");
    // The fixture never returns: any bound shows the deadline ended the call.
    assert!(started.elapsed() < Duration::from_secs(10), "the deadline, not the hang, ends the call");
    assert_eq!(error.to_string(), "backend \"hang\": allocate did not return within its 200ms deadline");
    assert_eq!(healths(&bad), vec![("h-0".into(), "Unhealthy".into())]);
    assert_unharmed(&good).await;
    assert_recovers(&bad).await;
}

#[test]
fn abi_errors_name_both_versions() {
    let error = AbiError::MajorMismatch { module: "/m.so".into(), backend: "0.9".into(), host: "1.1".into(), major: 1 };
    assert_eq!(
        error.to_string(),
        "native backend /m.so: implements backend ABI 0.9, but this devhost implements ABI 1.1 (expected major 1)"
    );
}
