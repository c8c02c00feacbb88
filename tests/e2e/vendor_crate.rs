//! A vendor's backend outside this repository (issue 14, item 4): a copy of
//! `abi/` alone, with no devhost workspace around it, as the path
//! dependency of a new crate that is built with its own `cargo build` and
//! then passes `devhost check`. And `abi/Cargo.toml`, which cannot inherit
//! from the workspace for that reason, stays in step with it.

use std::path::Path;
use std::process::Command;

use crate::harness::repo;

/// A backend as a vendor would write it from the vendor guide.
const VENDOR_LIB: &str = r#"
use devhost_abi::sdk::{Allocation, Backend, Device, Error, Health, Host, Resource};

struct Acme;

impl Backend for Acme {
    fn init(_config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error> {
        let devices = [Device::new("acme-0", Health::Healthy), Device::new("acme-1", Health::Healthy)];
        host.publish("acme.example.com/accel", &devices).map_err(|e| e.to_string())?;
        Ok((Acme, vec![Resource::new("acme.example.com/accel")]))
    }

    fn allocate(&self, _resource: &str, ids: &[String]) -> Result<Allocation, Error> {
        let mut answer = Allocation::default();
        answer.envs.insert("ACME_DEVICES".into(), ids.join(","));
        Ok(answer)
    }
}

devhost_abi::export_backend!(Acme);
"#;

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
         [dependencies]\ndevhost-abi = { path = \"../devhost-abi\" }\n\n[workspace]\n",
    )
    .expect("Cargo.toml");
    std::fs::write(acme.join("src/lib.rs"), VENDOR_LIB).expect("lib.rs");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(acme.join("Cargo.toml"))
        // Its own target directory: the vendor's, not this build's.
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .expect("run cargo");
    assert!(output.status.success(), "the vendor crate does not build:\n{}", String::from_utf8_lossy(&output.stderr));

    let module = dir.path().join("target/debug/libacme_backend.so");
    let output = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .arg("check")
        .arg(&module)
        .args(["--watch", "1"])
        .output()
        .expect("run devhost check");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("PASS  acme.example.com/accel: allocate"), "{text}");
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
    for (section, name) in [("dependencies", "serde"), ("dependencies", "serde_json"), ("dev-dependencies", "cbindgen")]
    {
        assert_eq!(abi[section].get(name), dependencies.get(name), "abi/Cargo.toml's {name}");
    }
    let wasm = &abi["target"]["cfg(target_arch = \"wasm32\")"]["dependencies"];
    assert_eq!(wasm.get("wit-bindgen"), dependencies.get("wit-bindgen"), "abi/Cargo.toml's wit-bindgen");
    assert_eq!(abi.get("lints").and_then(|l| l.get("rust")), workspace["workspace"]["lints"].get("rust"));
    assert_eq!(abi.get("lints").and_then(|l| l.get("clippy")), workspace["workspace"]["lints"].get("clippy"));
}
