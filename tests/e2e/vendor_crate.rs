//! A vendor's backend outside this repository (issue 14, item 4): a copy of
//! `abi/` alone, with no devhost workspace around it, as the path
//! dependency of a new crate that is built with its own `cargo build` and
//! then passes `devhost check`. And `abi/Cargo.toml`, which cannot inherit
//! from the workspace for that reason, stays in step with it.

use std::path::Path;
use std::process::Command;

use crate::harness::repo;

/// The vendor guide's Rust example, exactly as printed: the first
/// ` ```rust ` block of `docs/vendor-guide.md`.
fn guide_example() -> String {
    let guide = std::fs::read_to_string(repo().join("docs/vendor-guide.md")).expect("read the vendor guide");
    let (_, rest) = guide.split_once("```rust\n").expect("the guide has a Rust block");
    let (code, _) = rest.split_once("```").expect("the Rust block ends");
    code.to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir").map(|e| e.expect("entry")) {
        let path = entry.path();
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

#[test]
fn a_vendor_crate_outside_the_repository_builds_on_a_copy_of_the_sdk_and_passes_the_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&repo().join("abi"), &dir.path().join("devhost-abi"));
    let acme = dir.path().join("acme");
    std::fs::create_dir_all(acme.join("src")).expect("src");
    std::fs::write(
        acme.join("Cargo.toml"),
        "[package]\nname = \"acme-backend\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\ndevhost-abi = { path = \"../devhost-abi\" }\n\
         serde = { version = \"1\", features = [\"derive\"] }\n\n[workspace]\n",
    )
    .expect("Cargo.toml");
    std::fs::write(acme.join("src/lib.rs"), guide_example()).expect("lib.rs");
    // The guide's example reads `devices` from its `[config]` table.
    let file = acme.join("acme.toml");
    let module = dir.path().join("target/debug/libacme_backend.so");
    std::fs::write(&file, format!("[backend]\nmodule = {:?}\n\n[config]\ndevices = 2\n", module.display().to_string()))
        .expect("acme.toml");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(acme.join("Cargo.toml"))
        // Its own target directory: the vendor's, not this build's.
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .expect("run cargo");
    assert!(output.status.success(), "the vendor crate does not build:\n{}", String::from_utf8_lossy(&output.stderr));

    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .arg("check")
        .arg(&file)
        .args(["--watch", "1"])
        .output()
        .expect("run devhost check");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    for step in ["allocate", "release"] {
        assert!(text.contains(&format!("PASS  acme.example.com/card: {step}")), "{text}");
    }
}

/// The values `abi/Cargo.toml` writes out are the workspace's.
#[test]
fn the_sdk_manifest_stays_in_step_with_the_workspace() {
    let read = |path: &str| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(repo().join(path)).expect("read")).expect("parse")
    };
    let workspace = read("Cargo.toml");
    let abi = read("abi/Cargo.toml");
    let shared = &workspace["workspace"]["package"];
    for key in ["version", "edition", "rust-version", "license", "repository"] {
        assert_eq!(abi["package"].get(key), shared.get(key), "abi/Cargo.toml's {key}");
    }
    let dependencies = &workspace["workspace"]["dependencies"];
    for (section, name) in [
        ("dependencies", "serde"),
        ("dependencies", "serde_json"),
        ("dependencies", "semver"),
        ("dev-dependencies", "cbindgen"),
    ] {
        assert_eq!(abi[section].get(name), dependencies.get(name), "abi/Cargo.toml's {name}");
    }
    let wasm = &abi["target"]["cfg(target_arch = \"wasm32\")"]["dependencies"];
    assert_eq!(wasm.get("wit-bindgen"), dependencies.get("wit-bindgen"), "abi/Cargo.toml's wit-bindgen");
    assert_eq!(abi.get("lints").and_then(|l| l.get("rust")), workspace["workspace"]["lints"].get("rust"));
    assert_eq!(abi.get("lints").and_then(|l| l.get("clippy")), workspace["workspace"]["lints"].get("clippy"));
}

/// Runs `program` with `args` in `dir`; panics with its output on failure.
fn run_in(dir: &Path, program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        // The project's own target directory, as its README assumes.
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} in {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `devhost check` on `target`; panics unless every check passes.
fn check_passes(target: &Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .arg("check")
        .arg(target)
        .args(["--watch", "1"])
        .output()
        .expect("run devhost check");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {text}{}", target.display(), String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("0 failed"), "{text}");
}

/// `devhost new-backend` (issue 14 item 4): each project builds with the
/// commands its README gives, outside this repository, and passes the
/// check; the Rust one also as a WASM component.
#[test]
fn new_backend_projects_build_as_written_and_pass_the_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let new = |name: &str, lang: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
            .args(["new-backend", name, "--lang", lang, "--dir"])
            .arg(dir.path())
            .output()
            .expect("run devhost new-backend");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        dir.path().join(name)
    };

    let c = new("acme-c", "c");
    let readme = std::fs::read_to_string(c.join("README.md")).expect("README");
    assert!(readme.contains("```sh\nmake\n```"), "{readme}");
    run_in(&c, "make", &[]);
    check_passes(&c.join("backends.d/acme-c.toml"));

    let rust = new("acme-rust", "rust");
    let readme = std::fs::read_to_string(rust.join("README.md")).expect("README");
    assert!(readme.contains("cargo build --release\ncargo build --release --target wasm32-wasip2"), "{readme}");
    run_in(&rust, &cargo, &["build", "--release", "--offline", "--quiet"]);
    check_passes(&rust.join("backends.d/acme-rust.toml"));
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2")) {
        crate::harness::skip(crate::harness::Missing::Setup, "the wasm32-wasip2 target is not installed");
        return;
    }
    run_in(&rust, &cargo, &["build", "--release", "--offline", "--quiet", "--target", "wasm32-wasip2"]);
    check_passes(&rust.join("target/wasm32-wasip2/release/acme_rust.wasm"));
}
