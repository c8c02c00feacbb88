use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::device_state::ResourceState;

const FILE: &str = "/etc/devhost/backends.d/demo.toml";

fn parse(source: &str) -> Result<StaticConfig, ConfigError> {
    StaticConfig::parse(Path::new(FILE), source)
}

const TWO_GPUS: &str = r#"
[backend]
kind = "static"

[[config.resource]]
name = "example.com/gpu"
preferred_allocation = true
env = { DEMO_VISIBLE_DEVICES = "{ids}" }
annotations = { "example.com/owner" = "demo" }
cdi_kind = "example.com/gpu"

[[config.resource.device]]
id = "gpu-0"
numa = [0]
env = { GPU0 = "yes" }
device_spec = [{ host_path = "/dev/null", container_path = "/dev/gpu0", permissions = "rw" }]
mount = [{ host_path = "/opt/gpu0", container_path = "/opt/gpu", read_only = true }]

[[config.resource.device]]
id = "gpu-1"
numa = [1]
health = "Unhealthy"
"#;

#[test]
fn allocate_merges_device_and_resource_answers() {
    let backend = StaticBackend::new(parse(TWO_GPUS).expect("valid"));
    let ids = vec!["gpu-0".to_owned(), "gpu-1".to_owned()];
    let allocation = backend.allocate("example.com/gpu", &ids).expect("allocates");
    assert_eq!(allocation.envs.get("DEMO_VISIBLE_DEVICES").map(String::as_str), Some("gpu-0,gpu-1"));
    assert_eq!(allocation.envs.get("GPU0").map(String::as_str), Some("yes"));
    assert_eq!(allocation.annotations.get("example.com/owner").map(String::as_str), Some("demo"));
    assert_eq!(allocation.cdi_devices, ["example.com/gpu=gpu-0", "example.com/gpu=gpu-1"]);
    assert_eq!(
        allocation.device_specs,
        [DeviceSpec { host_path: "/dev/null".into(), container_path: "/dev/gpu0".into(), permissions: "rw".into() }]
    );
    assert_eq!(
        allocation.mounts,
        [Mount { host_path: "/opt/gpu0".into(), container_path: "/opt/gpu".into(), read_only: true }]
    );
    let error = backend.allocate("example.com/gpu", &["gpu-9".to_owned()]).expect_err("unknown");
    assert_eq!(error.message, "unknown device ID \"gpu-9\"");
}

#[test]
fn init_publishes_configured_devices() {
    let backend = StaticBackend::new(parse(TWO_GPUS).expect("valid"));
    let publisher = Publisher::default();
    let specs = backend.init(publisher.clone()).expect("init");
    assert_eq!(specs[0].name, "example.com/gpu");
    assert!(specs[0].preferred_allocation && !specs[0].pre_start_required);
    let state = publisher.seal(&["example.com/gpu".to_owned()]).remove(0);
    let snapshot = state.snapshot();
    let health: Vec<&str> = snapshot.response.devices.iter().map(|d| d.health.as_str()).collect();
    assert_eq!(health, ["Healthy", "Unhealthy"]);
    backend.shutdown();
}

#[test]
fn health_path_changes_are_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("present");
    std::fs::write(&marker, "").expect("marker");
    let source = format!(
        "[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 10\n[[config.resource]]\nname = \"a.io/x\"\n[[config.resource.device]]\nid = \"x0\"\nhealth_path = {:?}\n",
        marker
    );
    let backend = StaticBackend::new(parse(&source).expect("valid"));
    let publisher = Publisher::default();
    backend.init(publisher.clone()).expect("init");
    let state: std::sync::Arc<ResourceState> = publisher.seal(&["a.io/x".to_owned()]).remove(0);
    let updates = state.subscribe();
    assert_eq!(state.snapshot().devices[0].health, Health::Healthy);
    std::fs::remove_file(&marker).expect("remove marker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.snapshot().devices[0].health != Health::Unhealthy {
        assert!(Instant::now() < deadline, "health change not published");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(updates.has_changed().expect("sender alive"));
    backend.shutdown();
}

#[test]
fn semantic_errors_point_at_the_value() {
    let cases = [
        (
            TWO_GPUS.replace("example.com/gpu\"\npreferred", "Example.com/gpu\"\npreferred"),
            "6:8: domain \"Example.com\" of resource name \"Example.com/gpu\" must be a lower-case DNS subdomain",
        ),
        (TWO_GPUS.replace("id = \"gpu-1\"", "id = \"gpu-0\""), "20:6: device ID \"gpu-0\" appears twice"),
        (
            TWO_GPUS.replace("health = \"Unhealthy\"", "health = \"sick\""),
            "22:10: health must be \"Healthy\" or \"Unhealthy\"",
        ),
        (TWO_GPUS.replace("numa = [1]", "numa = [-1]"), "21:9: NUMA node IDs are 0 or more"),
        (
            TWO_GPUS.replace("permissions = \"rw\"", "permissions = \"rx\""),
            "16:87: permissions must be a combination of r, w and m",
        ),
        (
            TWO_GPUS.replace("container_path = \"/opt/gpu\"", "container_path = \"opt\""),
            "17:54: container_path must be absolute",
        ),
        (
            TWO_GPUS.replace("cdi_kind = \"example.com/gpu\"", "cdi_kind = \"gpu\""),
            "10:12: cdi_kind must be a CDI kind",
        ),
        (TWO_GPUS.replace("numa = [0]", "numa = [0]\ncolour = \"red\""), "15:1: unknown field `colour`"),
    ];
    for (source, expected) in cases {
        let error = parse(&source).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}

#[test]
fn duplicate_resource_in_one_file_is_refused() {
    let source = format!("{TWO_GPUS}\n[[config.resource]]\nname = \"example.com/gpu\"\n");
    let error = parse(&source).expect_err("duplicate").to_string();
    assert!(error.ends_with("resource \"example.com/gpu\" is declared twice in this file"), "{error}");
}
