//! `devhost deviceclass`: the real binary on a backends.d with a resource
//! served through DRA and one served as a device plugin; the Helm chart's
//! `deviceClasses` renders the same classes from the same files; both are
//! valid `resource.k8s.io/v1` for Kubernetes 1.34 to 1.37 by Kubernetes'
//! own strict schemas (kubernetes-validate, through scripts/deploy-check).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};

/// A static backend with one resource served through DRA (default driver)
/// and one served as a device plugin.
const STATIC: &str = r#"[backend]
kind = "static"

[[config.resource]]
name = "example.com/gpu"
[[config.resource.device]]
id = "gpu-0"

[[config.resource]]
name = "example.com/fuse"
[[config.resource.device]]
id = "fuse-0"

[resources."example.com/gpu"]
api = "dra"
"#;

/// A module backend (its file need not exist to make classes) with a
/// resource served through DRA under a driver name of its own.
const MODULE: &str = r#"[backend]
module = "/usr/lib/devhost/backends/libnpu.so"

[resources."acme.io/npu"]
api = "dra"
driver = "npu.drivers.acme.io"
"#;

/// Runs `devhost ARGS`: exit code, stdout, stderr.
fn devhost(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_devhost")).args(args).output().expect("run devhost");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A backends.d in a temporary directory with `files` (name -> text).
fn backends_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write backend file");
    }
    dir
}

/// Every document of a YAML stream, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|error| panic!("invalid YAML: {error}\n{text}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The class devhost should make for `resource` served by `driver`.
fn expected(resource: &str, driver: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": driver},
        "spec": {
            "selectors": [{"cel": {"expression": format!("device.driver == \"{driver}\"")}}],
            "extendedResourceName": resource,
        },
    })
}

#[test]
fn deviceclass_prints_a_class_per_dra_resource_and_notes_device_plugin_ones() {
    let dir = backends_dir(&[("gpu.toml", STATIC), ("npu.toml", MODULE)]);
    let path = dir.path().display().to_string();
    let (code, stdout, stderr) = devhost(&["deviceclass", &path]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        documents(&stdout),
        [expected("example.com/gpu", "gpu.example.com"), expected("acme.io/npu", "npu.drivers.acme.io")]
    );
    let gpu_file = dir.path().join("gpu.toml");
    assert!(
        stderr.contains(&format!(
            "example.com/fuse ({}): served as a device plugin (no api = \"dra\"): no DRA driver, no DeviceClass",
            gpu_file.display()
        )),
        "{stderr}"
    );
    assert!(!stdout.contains("example.com/fuse"), "{stdout}");

    // One file, and a beta version of the same shape.
    let (code, stdout, _) =
        devhost(&["deviceclass", &gpu_file.display().to_string(), "--api-version", "resource.k8s.io/v1beta2"]);
    assert_eq!(code, 0);
    let mut beta = expected("example.com/gpu", "gpu.example.com");
    beta["apiVersion"] = json!("resource.k8s.io/v1beta2");
    assert_eq!(documents(&stdout), [beta]);
    let (code, _, stderr) = devhost(&["deviceclass", &path, "--api-version", "resource.k8s.io/v2"]);
    assert_eq!(code, 2, "bad usage: {stderr}");
    assert!(stderr.contains("possible values: resource.k8s.io/v1"), "{stderr}");

    // Only device plugins: nothing on stdout, and stderr says so.
    let plugins = backends_dir(&[("fuse.toml", &STATIC.replace("api = \"dra\"", "api = \"device-plugin\""))]);
    let (code, stdout, stderr) = devhost(&["deviceclass", &plugins.path().display().to_string()]);
    assert_eq!((code, stdout.as_str()), (0, ""), "{stderr}");
    assert!(stderr.contains("example.com/gpu") && stderr.contains("no resource in"), "{stderr}");
}

#[test]
fn deviceclass_refuses_a_broken_file_with_the_configs_own_message() {
    let broken = STATIC.replace("api = \"dra\"", "api = \"dra\"\nreplicas = 2");
    let dir = backends_dir(&[("gpu.toml", &broken), ("npu.toml", MODULE)]);
    let (code, stdout, stderr) = devhost(&["deviceclass", &dir.path().display().to_string()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    // The good file's class is still printed.
    assert_eq!(documents(&stdout), [expected("acme.io/npu", "npu.drivers.acme.io")]);
    let message = format!(
        "{}:16:12: replicas applies to the device plugin API; with api = \"dra\" a claim shares a device",
        dir.path().join("gpu.toml").display()
    );
    assert!(stderr.contains(&format!("error: {message}")), "{stderr}");

    // `devhost config check` says the same of the same file.
    let config = tempfile::tempdir().expect("temp dir");
    std::fs::write(config.path().join("devhost.toml"), format!("backends_dir = {:?}\n", dir.path()))
        .expect("write devhost.toml");
    let (_, stdout, _) = devhost(&["config", "check", &config.path().display().to_string()]);
    assert!(stdout.contains(&format!("error: {message}")), "{stdout}");
}

/// The chart rendered with `values` (scripts/deploy-check render-helm),
/// or Helm's message.
fn render_chart(python: &Path, values: &Path) -> Result<String, String> {
    let manifests = crate::deploy::helm_manifests(python, &[values])?;
    Ok(manifests.get("devhost/templates/deviceclasses.yaml").cloned().unwrap_or_default())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A values file with the required image, `extra`, and `files` as the
/// chart's `backends` (name without `.toml` -> text).
fn values(dir: &Path, extra: &str, files: &[(&str, &str)]) -> PathBuf {
    let mut text = format!("image:\n  repository: registry.example.com/devhost\n{extra}backends:\n  fuse: null\n");
    for (name, toml) in files {
        text.push_str(&format!("  {}: |\n", name.trim_end_matches(".toml")));
        for line in toml.lines() {
            text.push_str(&format!("    {line}\n"));
        }
    }
    let path = dir.join("values.yaml");
    std::fs::write(&path, text).expect("write values");
    path
}

/// `kubernetes-validate --strict` for 1.34 to 1.37 over `text`: the
/// failures, if any.
fn validate(python: &Path, text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("classes.yaml");
    std::fs::write(&file, text).expect("write manifests");
    let output = Command::new(python)
        .arg(repo("scripts/deploy-check"))
        .args(["validate", "1.34", "1.37"])
        .arg(&file)
        .output()
        .expect("run scripts/deploy-check");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    match output.status.code() {
        Some(0) if !stdout.contains("no-schema") => Ok(()),
        Some(0) => panic!("validated, not skipped: {stdout}"),
        Some(1) => Err(stdout),
        _ => panic!("scripts/deploy-check validate failed: {stdout}{}", String::from_utf8_lossy(&output.stderr)),
    }
}

/// Name, kind, version and spec (the chart adds its labels) by name.
fn comparable(docs: Vec<Value>) -> BTreeMap<String, Value> {
    docs.into_iter()
        .map(|doc| {
            let name = doc["metadata"]["name"].as_str().expect("a name").to_owned();
            (
                name.clone(),
                json!({"apiVersion": doc["apiVersion"], "kind": doc["kind"], "name": name, "spec": doc["spec"]}),
            )
        })
        .collect()
}

#[test]
fn the_charts_device_classes_are_the_clis_and_both_are_valid_for_kubernetes_1_34_to_1_37() {
    let Some(python) = crate::deploy::deploy_python() else { return };
    let upper = STATIC.replace("example.com/gpu", "example.com/GPU");
    let files = [("gpu.toml", STATIC), ("npu.toml", MODULE), ("accel.toml", upper.as_str())];
    // Each backends.d separately (GPU and gpu would both claim the driver
    // gpu.example.com): the derived name lower-cases the resource's name.
    for set in [&files[..2], &files[2..]] {
        let dir = backends_dir(set);
        let (code, cli, stderr) = devhost(&["deviceclass", &dir.path().display().to_string()]);
        assert_eq!(code, 0, "{stderr}");
        let chart = render_chart(&python, &values(dir.path(), "", set)).unwrap_or_else(|error| panic!("{error}"));
        let (cli_docs, chart_docs) = (documents(&cli), documents(&chart));
        assert!(!cli_docs.is_empty());
        assert_eq!(comparable(chart_docs), comparable(cli_docs), "chart:\n{chart}\ncli:\n{cli}");
        validate(&python, &cli).unwrap_or_else(|failures| panic!("devhost deviceclass:\n{failures}"));
        validate(&python, &chart).unwrap_or_else(|failures| panic!("the chart:\n{failures}"));
    }

    // The validator can fail: a misspelt field is refused by each version.
    let dir = backends_dir(&files[..1]);
    let (_, cli, _) = devhost(&["deviceclass", &dir.path().display().to_string()]);
    let failures =
        validate(&python, &cli.replace("extendedResourceName", "extendedResourceNames")).expect_err("refused");
    for minor in 34..=37 {
        assert!(failures.contains(&format!("Kubernetes 1.{minor}: ")), "1.{minor} not checked:\n{failures}");
    }

    // Off: with deviceClasses.enabled false, or without DRA in the chart.
    for extra in ["deviceClasses:\n  enabled: false\n", "dra:\n  enabled: false\n"] {
        let chart = render_chart(&python, &values(dir.path(), extra, &files[..1])).expect("renders");
        assert!(documents(&chart).is_empty(), "{extra}: {chart}");
    }
    // Two resources with one driver: refused by both.
    let clash = format!("{STATIC}\n[resources.\"example.com/fuse\"]\napi = \"dra\"\ndriver = \"gpu.example.com\"\n");
    let dir = backends_dir(&[("gpu.toml", &clash)]);
    let (code, _, stderr) = devhost(&["deviceclass", &dir.path().display().to_string()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot tell their devices apart"), "{stderr}");
    let message = render_chart(&python, &values(dir.path(), "", &[("gpu.toml", &clash)])).expect_err("refused");
    assert!(message.contains("cannot tell their devices apart"), "{message}");
}
