//! The native loader against a module swapped under it: what was checked is
//! byte for byte what runs, a module in a directory someone else controls is
//! refused however they race it, and a module replaced on disk (renamed over
//! or rewritten in place) really loads its new code, with the digest of the
//! bytes actually loaded.
//!
//! The attacker's code is a C module whose constructor creates a marker
//! file: merely being loaded is detected, whether or not it is a backend.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devhost::backend::Backend;
use devhost::backend::handle::BackendHandle;
use devhost::native::{self, AbiError};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::native_loader::{compile_c, rust_module};

/// The uid and gid of `nobody`, the attacker.
const NOBODY: u32 = 65534;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether this test runs as root: a new file belongs to the effective uid.
fn is_root() -> bool {
    let file = tempfile::tempfile().expect("a temp file");
    file.metadata().expect("fstat the temp file").uid() == 0
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the module");
    Sha256::digest(&bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Writes `source` to `staged`, mode 0755, and renames it over `target`.
fn install_over(source: &Path, staged: &Path, target: &Path) {
    std::fs::copy(source, staged).expect("stage a module");
    chmod(staged, 0o755);
    std::fs::rename(staged, target).expect("rename it over the module");
}

/// A temp dir with mode 0755 (so that `nobody` may enter it), canonical.
fn open_tempdir() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().expect("temp dir");
    chmod(base.path(), 0o755);
    let path = std::fs::canonicalize(base.path()).expect("canonical temp dir");
    (base, path)
}

/// Compiles the attacker's module into `dir`: loading it, nothing more,
/// creates `marker`.
fn evil_module(dir: &Path, marker: &Path) -> PathBuf {
    let marker = marker.to_str().expect("a UTF-8 temp path");
    assert!(!marker.contains(['"', '\\']), "{marker} fits in a C string literal as is");
    let source = dir.join("evil.c");
    std::fs::write(
        &source,
        format!(
            r#"#include <fcntl.h>
#include <unistd.h>

__attribute__((constructor)) static void evil(void) {{
    int fd = open("{marker}", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {{
        (void)write(fd, "evil code ran\n", 14);
        close(fd);
    }}
}}
"#
        ),
    )
    .expect("write evil.c");
    compile_c(&source, dir)
}

/// Kills and reaps the attacker, even when the test fails.
struct Attacker(Child);

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_module_in_a_directory_another_user_controls_is_refused_while_they_swap_it() {
    if !is_root() {
        crate::harness::skip(
            crate::harness::Missing::Machine,
            &format!("needs root to hand a directory to uid {NOBODY} and run an attacker as that uid"),
        );
        return;
    }
    let (_base, base) = open_tempdir();
    let marker = base.join("evil-code-ran");
    let evil = evil_module(&base, &marker);
    let good = rust_module("devhost_example_native_rust", &base);
    let name = good.file_name().expect("a file name").to_owned();

    // Control: the same module in a root-owned 0755 directory loads.
    let trusted = base.join("trusted");
    std::fs::create_dir(&trusted).expect("mkdir");
    chmod(&trusted, 0o755);
    std::fs::copy(&good, trusted.join(&name)).expect("copy the module");
    native::load(&trusted.join(&name), None, "{}".to_owned()).expect("a module in a trusted directory loads");

    // The attic: nobody's directory, holding a root-owned, 0755, good module.
    let attic = base.join("attic");
    std::fs::create_dir(&attic).expect("mkdir");
    chmod(&attic, 0o755);
    let module = attic.join(&name);
    std::fs::copy(&good, &module).expect("copy the module");
    chmod(&module, 0o755);
    std::os::unix::fs::chown(&attic, Some(NOBODY), Some(NOBODY)).expect("chown the attic to nobody");
    let expected = format!(
        "native backend {}: module directory {} is owned by uid {NOBODY} (expected root or devhost's own uid 0)",
        module.display(),
        attic.display()
    );

    // nobody swaps the evil module and a good one in as fast as it can.
    let attacker = Command::new("sh")
        .arg("-c")
        .arg(r#"while :; do cp "$1" .evil && mv -f .evil "$3"; cp "$2" .good && mv -f .good "$3"; done"#)
        .arg("attacker")
        .arg(&evil)
        .arg(&good)
        .arg(&module)
        .current_dir(&attic)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the attacker as nobody");
    let attacker = Attacker(attacker);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&module).map_or(true, |metadata| metadata.uid() != NOBODY) {
        assert!(Instant::now() < deadline, "the attacker never replaced {}", module.display());
        std::thread::sleep(Duration::from_millis(5));
    }

    for attempt in 0..250 {
        match native::load(&module, None, "{}".to_owned()) {
            Ok(_) => panic!("attempt {attempt}: a module in nobody's directory loaded"),
            Err(error) => assert_eq!(error.to_string(), expected, "attempt {attempt}"),
        }
        assert!(!marker.exists(), "attempt {attempt}: the attacker's code ran in devhost");
    }
    drop(attacker);
    assert!(!marker.exists(), "the attacker's code ran in devhost");

    // The marker does work: loading the evil module (from root's own
    // directory) runs its constructor, though it is no backend.
    let error = native::load(&evil, None, "{}".to_owned()).err().expect("evil.c has no entry point");
    assert_eq!(error, AbiError::MissingEntry { module: evil.clone() });
    assert!(marker.exists(), "the evil module's constructor creates the marker when it is loaded");
}

#[test]
fn a_pinned_module_swapped_while_it_loads_never_runs_other_code() {
    let (_base, base) = open_tempdir();
    let marker = base.join("evil-code-ran");
    let evil = evil_module(&base, &marker);
    let good = compile_c(&repo().join("examples/native-c/example.c"), &base);
    let (good_sha, evil_sha) = (sha256_hex(&good), sha256_hex(&evil));
    let modules = base.join("modules");
    std::fs::create_dir(&modules).expect("mkdir");
    chmod(&modules, 0o755);
    // A new path for each attempt: the loader must not get away with
    // loading the first file it ever saw at a path.
    let module_at = |attempt: u64| modules.join(format!("libbackend-{attempt}.so"));

    // The owner's own deploy script gone wrong: it swaps the pinned module
    // and another one, each written beside it and renamed over it.
    let stop = Arc::new(AtomicBool::new(false));
    let current = Arc::new(AtomicU64::new(0));
    let swaps = Arc::new(AtomicU64::new(0));
    install_over(&good, &modules.join(".staged-main"), &module_at(0));
    let swapper = {
        let (stop, current, swaps, modules) = (stop.clone(), current.clone(), swaps.clone(), modules.clone());
        let (good, evil) = (good.clone(), evil.clone());
        std::thread::spawn(move || {
            let staged = modules.join(".staged");
            while !stop.load(Ordering::Relaxed) {
                let target = modules.join(format!("libbackend-{}.so", current.load(Ordering::Relaxed)));
                for source in [&evil, &good] {
                    install_over(source, &staged, &target);
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let (mut loaded, mut refused) = (0, 0);
    for attempt in 0..150 {
        let module = module_at(attempt);
        install_over(&good, &modules.join(".staged-main"), &module);
        current.store(attempt, Ordering::Relaxed);
        let result = native::load_with_digest(&module, Some(&good_sha), "{}".to_owned());
        assert!(!marker.exists(), "attempt {attempt}: code other than the pinned module ran");
        match result {
            Ok((_, digest)) => {
                assert_eq!(digest, good_sha, "attempt {attempt}: the digest of what was loaded");
                loaded += 1;
            }
            Err(AbiError::ChecksumMismatch { actual, .. }) => {
                assert_eq!(actual, evil_sha, "attempt {attempt}: the only other module there");
                refused += 1;
            }
            Err(error) => panic!("attempt {attempt}: {error}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("the swapper thread");
    eprintln!("{loaded} loads of the pinned module, {refused} refusals, {} swaps", swaps.load(Ordering::Relaxed));
    assert!(swaps.load(Ordering::Relaxed) > 0, "the module was swapped while it loaded");
    assert!(!marker.exists(), "code other than the pinned module ran");
}

async fn start(name: &str, backend: Arc<dyn Backend>) -> Arc<BackendHandle> {
    match BackendHandle::start(name, backend, Duration::from_secs(5), CancellationToken::new()).await {
        Ok(handle) => handle,
        Err(error) => panic!("starting {name} failed: {error}"),
    }
}

/// The resource and device IDs the backend published.
fn published(handle: &BackendHandle) -> (String, Vec<String>) {
    let (spec, state) = &handle.resources()[0];
    let ids = state.snapshot().advertised().iter().map(|device| device.id.clone()).collect();
    (spec.name.clone(), ids)
}

/// Loads `module`, checks the digest against the file's own, and starts it.
async fn load_and_start(module: &Path, name: &str) -> Arc<BackendHandle> {
    let expected = sha256_hex(module);
    let config = r#"{"flip_interval_ms": 3600000}"#.to_owned();
    let (backend, digest) = native::load_with_digest(module, None, config).expect("the module loads");
    assert_eq!(digest, expected, "load_with_digest reports the sha256 of the bytes on disk");
    start(name, backend).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_replaced_on_disk_loads_its_new_code() {
    let (_base, base) = open_tempdir();
    let build = base.join("build");
    std::fs::create_dir(&build).expect("mkdir");
    let rust = rust_module("devhost_example_native_rust", &build);
    let c = compile_c(&repo().join("examples/native-c/example.c"), &build);
    let panic = rust_module("devhost_fixture_native_panic", &build);
    let module = base.join("libbackend.so");

    std::fs::copy(&rust, &module).expect("install the Rust example");
    let first = load_and_start(&module, "first").await;
    assert_eq!(published(&first), ("example.com/native-rust".to_owned(), vec!["rust-0".into(), "rust-1".into()]));

    // A new file renamed over the old path.
    let staged = base.join(".staged");
    std::fs::copy(&c, &staged).expect("stage the C example");
    chmod(&staged, 0o755);
    std::fs::rename(&staged, &module).expect("rename it over the module");
    let second = load_and_start(&module, "second").await;
    assert_eq!(published(&second), ("example.com/native-c".to_owned(), vec!["c-0".into(), "c-1".into()]));

    // The same file (same inode) rewritten in place, under the running C
    // example: the loaded copy is not that file, so it keeps working.
    let inode = std::fs::metadata(&module).expect("stat").ino();
    std::fs::write(&module, std::fs::read(&panic).expect("read the panic fixture")).expect("rewrite in place");
    assert_eq!(std::fs::metadata(&module).expect("stat").ino(), inode, "rewritten in place");
    let third = load_and_start(&module, "third").await;
    let (resource, ids) = published(&third);
    assert_eq!(ids, vec!["p-0".to_owned(), "p-1".to_owned()], "the panic fixture's devices, from {resource}");

    let resource = published(&second).0;
    let answer = second
        .allocate(&resource, vec!["c-0".to_owned()])
        .await
        .expect("the C example, loaded before its file was rewritten, still answers");
    assert_eq!(answer.envs.get("EXAMPLE_DEVICES").map(String::as_str), Some("c-0"));
    assert_eq!(published(&first).1, vec!["rust-0".to_owned(), "rust-1".to_owned()]);

    for handle in [first, second, third] {
        handle.shutdown().await;
    }
}
