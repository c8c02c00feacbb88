//! `devhost check`, the vendor conformance check: passes on the example
//! backends, and fails, naming the check, on deliberately broken ones.

use std::path::Path;
use std::process::Command;

use crate::native_loader::{compile_c, rust_module};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `devhost check`; returns the exit code and the output.
fn check(target: &Path, extra: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .arg("check")
        .arg(target)
        .args(extra)
        .output()
        .expect("run devhost check");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

fn line<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines().find(|l| l[6..].starts_with(check)).unwrap_or_else(|| panic!("no {check:?} line in:\n{text}"))
}

#[test]
fn the_example_backends_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = compile_c(&repo().join("examples/native-c/example.c"), dir.path());
    let rust = rust_module("devhost_example_native_rust", dir.path());
    for target in [repo().join("examples/config/backends.d/example.toml"), rust, c] {
        let (code, text) = check(&target, &[]);
        assert_eq!(code, 0, "{}:\n{text}", target.display());
        assert!(!text.contains("FAIL"), "{text}");
        assert!(text.contains(": allocate") && text.contains("clean stop"), "{text}");
        // Each check ran and says what it saw.
        for (check, saw) in [
            (": registration", "registered "),
            (": device IDs", "unique non-empty IDs, exact health strings"),
            (": health updates", " in 3s"),
            (": allocate", "every healthy device allocates"),
        ] {
            let found =
                text.lines().find(|l| l.contains(check)).unwrap_or_else(|| panic!("no {check:?} line:\n{text}"));
            assert!(found.starts_with("PASS") && found.contains(saw), "{check}: {found}");
        }
        // A native module is checked in the sandbox the daemon gives it.
        if target.extension().is_some_and(|ext| ext == "so") {
            let sandbox = line(&text, "worker sandbox");
            for part in ["PASS", "own PID namespace", "cgroup", "no_new_privs", "capabilities: none", "seccomp"] {
                assert!(sandbox.contains(part), "{}: {part:?} not in {sandbox}", target.display());
            }
        }
    }
}

#[test]
fn broken_backends_fail_with_the_check_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = repo().join("tests/fixtures/native");

    let hang = compile_c(&fixtures.join("hang.c"), dir.path());
    let (code, text) = check(&hang, &["--call-timeout-ms", "1000"]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "fixture.example.com/hang: allocate");
    assert!(failed.starts_with("FAIL") && failed.contains("did not return within its 1s deadline"), "{text}");

    let init_error = compile_c(&fixtures.join("init_error.c"), dir.path());
    let (code, text) = check(&init_error, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(line(&text, "init").starts_with("FAIL"), "{text}");
    assert!(text.contains("cannot open /dev/acme0: no such device"), "{text}");

    let (code, text) = check(&fixtures.join("not-elf.so"), &[]);
    assert_eq!(code, 1, "{text}");
    assert!(line(&text, "load").starts_with("FAIL") && text.contains("not an ELF shared library"), "{text}");

    let bad_name = compile_c(&fixtures.join("bad_name.c"), dir.path());
    let (code, text) = check(&bad_name, &[]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "resource names");
    assert!(failed.starts_with("FAIL") && failed.contains("\"Fixture.example.com\""), "{text}");

    let slow = compile_c(&fixtures.join("slow_shutdown.c"), dir.path());
    let (code, text) = check(&slow, &["--call-timeout-ms", "1000"]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "shutdown");
    assert!(failed.starts_with("FAIL") && failed.contains("shutdown did not return within its 1s deadline"), "{text}");

    let panic = rust_module("devhost_fixture_native_panic", dir.path());
    let (code, text) = check(&panic, &[]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "fixture.example.com/panic: allocate");
    assert!(failed.starts_with("FAIL") && failed.contains("panicked"), "{text}");
}

#[test]
fn a_crashing_module_fails_the_check_it_crashed_in_naming_the_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = repo().join("tests/fixtures/native");

    let segv_init = compile_c(&fixtures.join("segv_init.c"), dir.path());
    let (code, text) = check(&segv_init, &[]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "init");
    assert!(failed.starts_with("FAIL") && failed.contains("worker killed by SIGSEGV during init"), "{text}");

    let segv = compile_c(&fixtures.join("segv_allocate.c"), dir.path());
    let (code, text) = check(&segv, &[]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "fixture.example.com/segv-allocate: allocate");
    assert!(failed.starts_with("FAIL") && failed.contains("worker killed by SIGSEGV during allocate"), "{text}");
    // The checker itself survived the crash and finished every check.
    assert!(line(&text, "clean stop").starts_with("PASS"), "{text}");

    let abort = compile_c(&fixtures.join("abort_allocate.c"), dir.path());
    let (code, text) = check(&abort, &[]);
    assert_eq!(code, 1, "{text}");
    let failed = line(&text, "fixture.example.com/abort-allocate: allocate");
    assert!(failed.starts_with("FAIL") && failed.contains("worker killed by SIGABRT during allocate"), "{text}");
}

/// A `backends.d` file for `module` with `breaks = "<what>"`.
fn breaker_file(dir: &Path, module: &Path, breaks: &str) -> std::path::PathBuf {
    let file = dir.join(format!("breaks-{breaks}.toml"));
    let text = format!("[backend]\nmodule = {:?}\n[config]\nbreaks = {breaks:?}\n", module.display().to_string());
    std::fs::write(&file, text).expect("write the backend file");
    file
}

/// Each check a backend (or its file) can break fails alone, naming what
/// broke, while the others pass: the fixture keeps every other contract, and
/// with nothing broken it passes every check.
#[test]
fn each_check_fails_alone_on_a_backend_made_to_break_it() {
    const RESOURCE: &str = "fixture.example.com/contract-breaker";
    let dir = tempfile::tempdir().expect("tempdir");
    let module = compile_c(&repo().join("tests/fixtures/native/contract_breaker.c"), dir.path());
    let failed = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("FAIL"))
            .map(|l| l[6..].split("  ").next().unwrap_or("").to_owned())
            .collect()
    };

    let (code, text) = check(&breaker_file(dir.path(), &module, "nothing"), &[]);
    assert_eq!(code, 0, "{text}");
    assert!(failed(&text).is_empty(), "{text}");
    for step in ["preferred allocation", "pre-start"] {
        assert!(line(&text, &format!("{RESOURCE}: {step}")).starts_with("PASS"), "{text}");
    }

    let (code, text) = check(&breaker_file(dir.path(), &module, "preferred"), &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(failed(&text), [format!("{RESOURCE}: preferred allocation")], "{text}");
    // The kubelet got devhost's default answer; the check still sees that
    // the backend's own answer was refused, and the log says why.
    let failure = line(&text, &format!("{RESOURCE}: preferred allocation"));
    assert!(failure.contains("devhost refused") && failure.contains("preferred_allocation"), "{failure}");
    assert!(text.contains("chose \"cb-9\", which is not among the available devices"), "{text}");

    let (code, text) = check(&breaker_file(dir.path(), &module, "pre-start"), &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(failed(&text), [format!("{RESOURCE}: pre-start")], "{text}");
    assert!(line(&text, &format!("{RESOURCE}: pre-start")).contains("cannot reset cb-0"), "{text}");

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[backend]\nmodule = \"x.so\"\n[config\n").expect("write");
    let (code, text) = check(&broken, &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(failed(&text), ["config"], "{text}");
    assert!(line(&text, "config").contains(&format!("{}:3:", broken.display())), "the position is named: {text}");
}

/// `--watch` lists every health change with its time: the Rust example
/// flips `rust-1` every second, so five seconds show both directions.
#[test]
fn watching_lists_every_health_change_with_its_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rust = rust_module("devhost_example_native_rust", dir.path());
    let (code, text) = check(&rust, &["--watch", "5"]);
    assert_eq!(code, 0, "{text}");
    let health = line(&text, "example.com/native-rust: health updates");
    assert!(health.starts_with("PASS") && health.contains("update(s) in 5s, each a valid full list"), "{health}");
    let notes: Vec<&str> =
        text.lines().skip_while(|l| *l != "health changes seen:").skip(1).take_while(|l| l.starts_with("  ")).collect();
    assert!(notes.iter().any(|n| n.ends_with("rust-1: Healthy → Unhealthy")), "{text}");
    assert!(notes.iter().any(|n| n.ends_with("rust-1: Unhealthy → Healthy")), "{text}");
    assert!(notes.iter().all(|n| n.starts_with("  example.com/native-rust: +")), "{notes:?}");
}

/// Where the kernel refuses the sandbox (here: devhost not root, so it can
/// neither make the worker's cgroup nor its PID namespace), a native
/// backend does not run unsandboxed behind the operator's back: the check
/// fails at `load`, naming what was refused and the file that can allow
/// it; with `unsandboxed = "allow"` it passes and says what is missing.
#[test]
fn a_sandbox_the_kernel_refuses_stops_the_backend_unless_its_file_allows_it() {
    if !nix::unistd::geteuid().is_root() {
        crate::harness::skip(crate::harness::Missing::Machine, "needs root to run devhost check as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let module = rust_module("devhost_example_native_rust", dir.path());
    let as_nobody = |file: &Path| {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_devhost"))
            .arg("check")
            .arg(file)
            .env("HOME", dir.path())
            .current_dir(dir.path())
            .output()
            .expect("run devhost check as nobody");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code().unwrap_or(-1), text)
    };
    let file = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        let text = format!("[backend]\nmodule = {:?}\n{extra}", module.display().to_string());
        std::fs::write(&path, text).expect("backend file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    };
    let strict = file("strict.toml", "");
    let (code, text) = as_nobody(&strict);
    assert_ne!(code, 0, "{text}");
    let load = line(&text, "load");
    assert!(load.starts_with("FAIL"), "{text}");
    assert!(load.contains("cgroup") && load.contains("the worker was not started"), "{load}");
    assert!(load.contains(&format!("set unsandboxed = \"allow\" in {}", strict.display())), "{load}");

    let allowing = file("allowing.toml", "unsandboxed = \"allow\"\n");
    let (code, text) = as_nobody(&allowing);
    let sandbox = line(&text, "worker sandbox");
    assert!(sandbox.contains("MISSING") && sandbox.contains("no cgroup"), "{text}");
    assert_eq!(code, 0, "{text}");
}
