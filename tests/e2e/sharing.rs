//! Sharing (`replicas`) and CDI specs (issue 7), through the real binary.

use std::path::{Path, PathBuf};

use devhost::fake_kubelet::FakeKubelet;

use crate::harness::{Node, WAIT, static_backend};

const GPU: &str = "example.com/gpu";

fn with_settings(text: String, settings: &str) -> String {
    format!("{text}\n[resources.\"{GPU}\"]\n{settings}\n")
}

#[tokio::test]
async fn replicas_advertise_each_device_n_times_and_map_back_to_real_devices() {
    let node = Node::new();
    let state = node.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    for id in ["gpu-0", "gpu-1"] {
        std::fs::write(state.join(format!("{id}.ok")), "").expect("health file");
    }
    let text = static_backend(&[(GPU, &["gpu-0", "gpu-1"])], Some(&state));
    node.backend("gpu", &with_settings(text, "replicas = 3\nreplica_policy = \"spread\""));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();

    let devices = kubelet.wait_for_devices(GPU, WAIT, |d| d.len() == 6).await.expect("six replicas");
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["gpu-0::0", "gpu-0::1", "gpu-0::2", "gpu-1::0", "gpu-1::1", "gpu-1::2"]);

    // Two replicas of one device: the backend sees that device once.
    let answer = kubelet.allocate(GPU, &["gpu-0::1", "gpu-0::2"]).await.expect("allocate");
    let container = &answer.container_responses[0];
    assert_eq!(container.envs.get("IDS").map(String::as_str), Some("gpu-0"));
    assert_eq!(container.devices.len(), 1, "one device node for one real device");
    let error = kubelet.allocate(GPU, &["gpu-0::3"]).await.expect_err("no fourth replica");
    assert_eq!(error.status().map(tonic::Status::code), Some(tonic::Code::InvalidArgument));

    // Spread: two replicas come from two different real devices.
    let all: Vec<&str> = ids.clone();
    let preferred = kubelet.preferred_allocation(GPU, &all, &[], 2).await.expect("preferred");
    let chosen = &preferred.container_responses[0].device_i_ds;
    let mut reals: Vec<&str> = chosen.iter().map(|id| id.split("::").next().unwrap_or_default()).collect();
    reals.sort_unstable();
    assert_eq!(reals, ["gpu-0", "gpu-1"], "{chosen:?}");

    // Health of the real device applies to all of its replicas.
    std::fs::remove_file(state.join("gpu-1.ok")).expect("gpu-1 fails");
    let devices = kubelet
        .wait_for_devices(GPU, WAIT, |d| d.iter().filter(|d| d.health == "Unhealthy").count() == 3)
        .await
        .expect("three unhealthy replicas");
    assert!(devices.iter().filter(|d| d.health == "Unhealthy").all(|d| d.id.starts_with("gpu-1::")));
}

/// The CDI specification's JSON schema, from the CDI project's crate that
/// `scripts/setup` fetched into Cargo's registry.
fn cdi_schema() -> serde_json::Value {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let schema_dir = std::fs::read_dir(cargo_home.join("registry/src"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|index| index.path().join("container-device-interface-1.1.1/src/schema"))
        .find(|dir| dir.join("schema.json").exists())
        .expect("the CDI schema is missing: run scripts/setup (it fetches container-device-interface 1.1.1)");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(schema_dir.join(name)).expect("read schema")).expect("JSON")
    };
    let mut schema = read("schema.json");
    // schema.json refers to "defs.json#/definitions/X"; bring the
    // definitions into the same document.
    fn local_refs(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(target)) = map.get_mut("$ref")
                    && let Some(rest) = target.strip_prefix("defs.json")
                {
                    *target = rest.to_owned();
                }
                map.values_mut().for_each(local_refs);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(local_refs),
            _ => {}
        }
    }
    local_refs(&mut schema);
    schema["definitions"] = read("defs.json")["definitions"].clone();
    schema
}

pub(crate) fn assert_valid_cdi(spec: &serde_json::Value) {
    let validator = jsonschema::draft7::new(&cdi_schema()).expect("the CDI schema compiles");
    let errors: Vec<String> = validator.iter_errors(spec).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "spec is not valid CDI: {errors:?}\n{spec:#}");
}

#[test]
fn the_schema_check_rejects_an_invalid_spec() {
    let validator = jsonschema::draft7::new(&cdi_schema()).expect("compiles");
    let bad = serde_json::json!({"cdiVersion": "0.6.0", "kind": "example.com/gpu", "devices": [{"name": "x", "containerEdits": {"deviceNodes": [{"hostPath": "/dev/null"}]}}]});
    assert!(!validator.is_valid(&bad), "a device node without `path` must fail the schema");
}

#[tokio::test]
async fn cdi_specs_are_valid_kept_current_and_removed() {
    let node = Node::new();
    let cdi_dir = node.dir.path().join("cdi");
    std::fs::write(
        node.config_file(),
        format!("metrics_address = \"\"\ncdi_dir = {:?}\ncdi_spec_dirs = []\n", cdi_dir.display().to_string()),
    )
    .expect("host config");
    let file =
        node.backend("gpu", &with_settings(static_backend(&[(GPU, &["gpu-0@0", "gpu-1@1"])], None), "cdi = true"));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    kubelet.wait_for_registrations(GPU, 1, WAIT).await.expect("registered");

    let spec_file = cdi_dir.join("devhost-example.com_gpu.json");
    let spec = wait_for_spec(&spec_file, 2).await;
    assert_valid_cdi(&spec);
    assert_eq!(spec["kind"], GPU);
    assert_eq!(spec["devices"][0]["name"], "gpu-0");
    let edits = &spec["devices"][0]["containerEdits"];
    assert_eq!(edits["env"], serde_json::Value::Null, "variables describe the allocation: they stay plain");
    assert_eq!(
        edits["deviceNodes"],
        serde_json::json!([{"path": "/dev/gpu-0", "hostPath": "/dev/null", "permissions": "rw"}])
    );

    // Allocate answers with CDI names for what the spec carries, the rest
    // plain; the runtime's CDI library gives the container the whole answer.
    let answer = kubelet.allocate(GPU, &["gpu-1"]).await.expect("allocate");
    let container = &answer.container_responses[0];
    let names: Vec<&str> = container.cdi_devices.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["example.com/gpu=gpu-1"]);
    assert!(container.devices.is_empty(), "no double injection");
    assert_eq!(container.envs.get("IDS").map(String::as_str), Some("gpu-1"));
    let node_of = |id: &str| devhost::proto::v1beta1::DeviceSpec {
        container_path: format!("/dev/{id}"),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    };
    let want = crate::cdi_oracle::expected([("IDS", "gpu-1")], &[node_of("gpu-1")], &[]);
    crate::cdi_oracle::assert_gives("gpu-1", container, &[&cdi_dir], &want);

    // A new device shows up in the spec.
    std::fs::write(
        &file,
        with_settings(static_backend(&[(GPU, &["gpu-0@0", "gpu-1@1", "gpu-2@1"])], None), "cdi = true"),
    )
    .expect("change the backend");
    let spec = wait_for_spec(&spec_file, 3).await;
    assert_valid_cdi(&spec);

    // The backend goes: so does its spec.
    std::fs::remove_file(&file).expect("remove backend");
    let deadline = tokio::time::Instant::now() + WAIT;
    while spec_file.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the spec outlived its backend");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn wait_for_spec(path: &Path, devices: usize) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let spec: serde_json::Value =
                serde_json::from_str(&text).expect("a complete JSON spec (written atomically)");
            if spec["devices"].as_array().map(Vec::len) == Some(devices) {
                return spec;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no spec with {devices} devices at {}", path.display());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
