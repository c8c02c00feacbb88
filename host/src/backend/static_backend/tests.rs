use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::config::static_backend::TWO_GPUS;
use crate::device_state::ResourceState;
use crate::model::{DeviceSpec, Mount};

fn parse(source: &str) -> StaticConfig {
    StaticConfig::parse(Path::new("/etc/devhost/backends.d/demo.toml"), source).expect("valid config")
}

#[test]
fn allocate_merges_device_and_resource_answers() {
    let backend = StaticBackend::new(parse(TWO_GPUS));
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
    let backend = StaticBackend::new(parse(TWO_GPUS));
    let publisher = Publisher::default();
    let specs = backend.init(publisher.clone()).expect("init");
    assert_eq!(specs[0].name, "example.com/gpu");
    assert!(specs[0].preferred_allocation && !specs[0].pre_start_required);
    let state = publisher.seal(&["example.com/gpu".to_owned()]).remove(0);
    let snapshot = state.snapshot();
    let advertised = snapshot.advertised();
    let health: Vec<&str> = advertised.iter().map(|d| d.health.as_str()).collect();
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
    let backend = StaticBackend::new(parse(&source));
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

/// Two shared NICs; `{capacity.bandwidth}` shows what each gives.
const SHARED_NICS: &str = r#"[backend]
kind = "static"
[[config.resource]]
name = "example.com/nic"
env = { NIC_IDS = "{ids}", NIC_BANDWIDTH = "{capacity.bandwidth}", NIC_QUEUES = "q={capacity.queues};", RAW = "{capacity.open" }
[[config.resource.device]]
id = "nic-0"
shared = true
capacities = { bandwidth = { value = "10G", request_policy = { default = "1G", valid_range = { min = "1G", step = "1G" } } }, queues = "8" }
[[config.resource.device]]
id = "nic-1"
shared = true
capacities = { bandwidth = "25G" }
"#;

#[tokio::test]
async fn allocate_shows_each_share_s_consumed_capacity_and_whole_devices_their_capacity() {
    let backend = StaticBackend::new(parse(SHARED_NICS));
    let ids = vec!["nic-0".to_owned(), "nic-1".to_owned()];
    let env = |allocation: &Allocation, key: &str| allocation.envs.get(key).cloned().unwrap_or_default();

    // Without shares (the device-plugin path): each device's whole capacity;
    // a capacity a device lacks is empty.
    let whole = backend.allocate("example.com/nic", &ids).expect("allocates");
    assert_eq!(env(&whole, "NIC_IDS"), "nic-0,nic-1");
    assert_eq!(env(&whole, "NIC_BANDWIDTH"), "10G,25G");
    assert_eq!(env(&whole, "NIC_QUEUES"), "q=8,;");
    assert_eq!(env(&whole, "RAW"), "{capacity.open", "an unterminated placeholder stays as written");

    // With the claim's shares, as DRA's prepare passes them.
    let share = |amount: &str| Share {
        share_id: Some("0f4b3c1e-1111-2222-3333-444455556666".into()),
        consumed: BTreeMap::from([("bandwidth".to_owned(), amount.to_owned())]),
    };
    let shares = vec![("nic-0".to_owned(), share("2G")), ("nic-1".to_owned(), share("5G"))];
    let shared = backend.allocate_shared("example.com/nic", &ids, &shares).expect("allocates");
    assert_eq!(env(&shared, "NIC_BANDWIDTH"), "2G,5G");
    assert_eq!(env(&shared, "NIC_QUEUES"), "q=8,;", "a capacity the share does not name: the whole device's");

    // A share names its device: only that device's amount is the claim's.
    let one = vec![("nic-1".to_owned(), share("5G"))];
    let other = backend.allocate_shared("example.com/nic", &ids, &one).expect("allocates");
    assert_eq!(env(&other, "NIC_BANDWIDTH"), "10G,5G");
}

#[test]
fn an_allocation_carries_each_allocated_device_s_network_status_from_the_file() {
    let source = r#"[backend]
kind = "static"
[[config.resource]]
name = "example.com/nic"
[[config.resource.device]]
id = "nic-0"
network = { interface_name = "eth1", ips = ["10.0.0.5/24"] }
[[config.resource.device]]
id = "nic-1"
[[config.resource.device]]
id = "nic-2"
network = { interface_name = "eth2" }
"#;
    let config =
        crate::config::static_backend::StaticConfig::parse(std::path::Path::new("nic.toml"), source).expect("valid");
    let backend = StaticBackend::new(config);
    let ids = ["nic-0".to_owned(), "nic-1".to_owned()];
    let allocation = backend.allocate("example.com/nic", &ids).expect("known devices");
    let status = &allocation.device_status;
    assert_eq!(status.keys().collect::<Vec<_>>(), ["nic-0"], "nic-1 declares none, nic-2 is not allocated");
    assert_eq!(status["nic-0"].interface_name.as_deref(), Some("eth1"));
    assert_eq!(status["nic-0"].ips, ["10.0.0.5/24"]);
}
