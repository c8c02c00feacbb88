//! The backend as a whole over a fake NVML: what `init` publishes and logs
//! (attributes included), Allocate and preferred allocation through the
//! `Backend` trait, health pushed from its thread, release and reset, and a
//! clean shutdown.

use std::sync::Arc;

use devhost_abi::sdk::{AttributeValue, Backend, Health, LogLevel, PreferredRequest};

use super::*;
use crate::attributes as attr;
use crate::fakes::{Fake, Lists, Recorder, gpu, wait_until};

/// A sysfs tree laid out as the kernel does: GPU index `i` sits at bus
/// `i + 1` with NUMA `numa[i]`, in `devices/pci0000:00/…` for the first two
/// and `devices/pci0000:80/…` for the rest, and `bus/pci/devices/<address>`
/// links to it.
pub(crate) fn sysfs(numa: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(root.path().join("bus/pci/devices")).expect("bus dir");
    for (i, node) in numa.iter().enumerate() {
        let address = format!("0000:{:02x}:00.0", i + 1);
        let pcie_root = if i < 2 { "pci0000:00" } else { "pci0000:80" };
        let real = format!("devices/{pcie_root}/{address}");
        std::fs::create_dir_all(root.path().join(&real)).expect("device dir");
        std::fs::write(root.path().join(&real).join("numa_node"), format!("{node}\n")).expect("numa_node");
        std::os::unix::fs::symlink(format!("../../../{real}"), root.path().join("bus/pci/devices").join(&address))
            .expect("bus link");
    }
    root
}

pub(crate) fn config(sysfs: &std::path::Path, dev: &std::path::Path, extra: &str) -> Config {
    let json = format!(
        r#"{{"sysfs_root": {:?}, "dev_root": {:?}, "probe_interval_ms": 20 {extra}}}"#,
        sysfs.display().to_string(),
        dev.display().to_string()
    );
    Config::parse(&json).expect("valid config")
}

fn four_gpus() -> Fake {
    Fake {
        gpus: (0..4).map(|i| gpu(&format!("GPU-{i}"), i, None)).collect(),
        nvlinks: vec![(2, 3, 4)],
        ..Fake::default()
    }
}

#[test]
fn init_publishes_every_gpu_healthy_with_numa_and_serves_allocate_and_preferred() {
    let (sys, dev) = (sysfs(&["0", "0", "1", "1"]), tempfile::tempdir().expect("dev"));
    for node in ["nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm"] {
        std::fs::write(dev.path().join(node), "").expect("node");
    }
    let sink = Arc::new(Recorder::default());
    let (backend, resources) =
        Nvidia::start(config(sys.path(), dev.path(), r#", "cdi": true"#), Arc::new(four_gpus()), sink.clone())
            .expect("starts");
    assert_eq!(resources, [Resource::new("nvidia.com/gpu").with_preferred_allocation()]);
    let published = sink.published()[0].clone();
    assert_eq!(published.0, "nvidia.com/gpu");
    let numa: Vec<(&str, Health, &[i64])> =
        published.1.iter().map(|d| (d.id.as_str(), d.health, d.numa_nodes.as_slice())).collect();
    assert_eq!(
        numa,
        [
            ("GPU-0", Health::Healthy, &[0][..]),
            ("GPU-1", Health::Healthy, &[0][..]),
            ("GPU-2", Health::Healthy, &[1][..]),
            ("GPU-3", Health::Healthy, &[1][..])
        ]
    );
    assert!(sink.messages().contains(
        &"GPU GPU-2: index 2, /dev/nvidia2, PCI 00000000:03:00.0, NUMA node 1, 81920 MiB, MIG off, Fake GPU".to_owned()
    ));

    let answer = backend.allocate("nvidia.com/gpu", &["GPU-2".into(), "GPU-3".into()]).expect("allocate");
    let specs: Vec<&str> = answer.device_specs.iter().map(|s| s.host_path.as_str()).collect();
    assert_eq!(specs, ["/dev/nvidia2", "/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"]);
    assert_eq!(answer.envs.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str), Some("GPU-2,GPU-3"));
    assert_eq!(answer.cdi_devices, ["nvidia.com/gpu=GPU-2", "nvidia.com/gpu=GPU-3"]);

    let all: Vec<String> = (0..4).map(|i| format!("GPU-{i}")).collect();
    let request = PreferredRequest { available: all.clone(), must_include: vec![], size: 2 };
    let preferred = backend.preferred_allocation("nvidia.com/gpu", &request).expect("preferred");
    assert_eq!(preferred, Some(vec!["GPU-2".to_owned(), "GPU-3".to_owned()]), "the NVLinked pair on one node");
    let request = PreferredRequest { available: all, must_include: vec!["GPU-0".into()], size: 2 };
    let preferred = backend.preferred_allocation("nvidia.com/gpu", &request).expect("preferred");
    assert_eq!(preferred, Some(vec!["GPU-0".to_owned(), "GPU-1".to_owned()]), "GPU-0's NUMA node");
    backend.shutdown();
}

#[test]
fn xid_events_reach_the_published_list_and_shutdown_stops_the_thread() {
    let (sys, dev) = (sysfs(&["-1", "-1", "-1", "-1"]), tempfile::tempdir().expect("dev"));
    let fake = Arc::new(four_gpus());
    let sink = Arc::new(Recorder::default());
    let (backend, _) = Nvidia::start(config(sys.path(), dev.path(), ""), fake.clone(), sink.clone()).expect("starts");
    assert!(sink.published()[0].1.iter().all(|d| d.numa_nodes.is_empty()), "-1: no NUMA");

    fake.broken.lock().expect("broken").push("GPU-1".into());
    fake.events.lock().expect("events").push_back(Event::Xid { uuid: "GPU-1".into(), xid: Some(48) });
    wait_until("GPU-1 goes Unhealthy", || sink.lists().len() == 2);
    assert_eq!(sink.lists()[1][1], ("GPU-1".to_owned(), Health::Unhealthy));
    fake.broken.lock().expect("broken").clear();
    wait_until("GPU-1 recovers", || sink.lists().len() == 3);
    assert_eq!(sink.lists()[2][1], ("GPU-1".to_owned(), Health::Healthy));

    backend.shutdown();
    let count = sink.lists().len();
    fake.events.lock().expect("events").push_back(Event::Xid { uuid: "GPU-0".into(), xid: Some(79) });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sink.lists().len(), count, "nothing is published after shutdown");
}

#[test]
fn health_off_starts_no_thread() {
    let (sys, dev) = (sysfs(&["0"]), tempfile::tempdir().expect("dev"));
    let fake = Fake { gpus: vec![gpu("GPU-0", 0, None)], ..Fake::default() };
    let (backend, _) = Nvidia::start(
        config(sys.path(), dev.path(), r#", "health": false"#),
        Arc::new(fake),
        Arc::new(Recorder::default()),
    )
    .expect("starts");
    assert!(backend.monitor.is_none());
}

#[test]
fn no_gpus_and_missing_sysfs_entries_are_reported() {
    let (sys, dev) = (sysfs(&[]), tempfile::tempdir().expect("dev"));
    let error =
        Nvidia::start(config(sys.path(), dev.path(), ""), Arc::new(Fake::default()), Arc::new(Recorder::default()))
            .err()
            .expect("no GPUs");
    assert_eq!(error.to_string(), "NVML reports no GPUs on this node: nothing to serve as nvidia.com/gpu");

    let sink = Arc::new(Recorder::default());
    let fake = Fake { gpus: vec![gpu("GPU-0", 0, None)], ..Fake::default() };
    let (backend, _) = Nvidia::start(config(sys.path(), dev.path(), ""), Arc::new(fake), sink.clone()).expect("starts");
    let warning =
        sink.messages().into_iter().find(|m| m.starts_with("GPU GPU-0: no NUMA affinity (no directory for PCI device"));
    assert!(warning.is_some(), "{:?}", sink.messages());
    backend.shutdown();
}

#[test]
fn every_gpu_is_published_with_valid_attributes_and_its_memory() {
    let (sys, dev) = (sysfs(&["0", "0", "1", "1"]), tempfile::tempdir().expect("dev"));
    let fake = Arc::new(four_gpus());
    let sink = Arc::new(Recorder::default());
    let (backend, _) = Nvidia::start(config(sys.path(), dev.path(), ""), fake.clone(), sink.clone()).expect("starts");
    let devices = sink.latest("nvidia.com/gpu").expect("published");
    let gpu2 = &devices[2];
    let string = |s: &str| AttributeValue::String(s.into());
    let version = |s: &str| AttributeValue::Version(s.into());
    let expected = [
        (attr::UUID, string("GPU-2")),
        (attr::INDEX, AttributeValue::Int(2)),
        (attr::MINOR, AttributeValue::Int(2)),
        (attr::PRODUCT_NAME, string("Fake GPU")),
        (attr::DRIVER_VERSION, version("535.104.5")),
        (attr::CUDA_DRIVER_VERSION, version("12.2.0")),
        (attr::COMPUTE_CAPABILITY, version("9.0.0")),
        (attr::PCIE_BUS_ID, string("0000:03:00.0")),
        (attr::PCIE_ROOT, string("pci0000:80")),
        (attr::MIG_ENABLED, AttributeValue::Bool(false)),
    ];
    let expected: std::collections::BTreeMap<String, AttributeValue> =
        expected.into_iter().map(|(name, value)| (name.to_owned(), value)).collect();
    assert_eq!(gpu2.attributes, expected);
    assert_eq!(gpu2.capacities.get(attr::MEMORY).map(String::as_str), Some("80Gi"));
    assert_eq!(gpu2.capacities.len(), 1);
    let roots: Vec<Option<&AttributeValue>> = devices.iter().map(|d| d.attributes.get(attr::PCIE_ROOT)).collect();
    assert_eq!(
        roots,
        [
            Some(&string("pci0000:00")),
            Some(&string("pci0000:00")),
            Some(&string("pci0000:80")),
            Some(&string("pci0000:80"))
        ]
    );
    for device in &devices {
        devhost_abi::sdk::testing::assert_valid_device(device);
    }
    assert!(
        sink.logs().iter().all(|(level, _)| *level != LogLevel::Warn),
        "valid values need no warning: {:?}",
        sink.messages()
    );

    // A health change republishes the whole list: the attributes stay.
    fake.broken.lock().expect("broken").push("GPU-2".into());
    fake.events.lock().expect("events").push_back(Event::Xid { uuid: "GPU-2".into(), xid: Some(79) });
    wait_until("GPU-2 goes Unhealthy", || sink.lists().len() == 2);
    let after = sink.latest("nvidia.com/gpu").expect("republished");
    assert_eq!(after[2].health, Health::Unhealthy);
    assert_eq!(after[2].attributes, expected, "the same attributes in every publish");
    backend.shutdown();
}

#[test]
fn values_that_break_dras_rules_are_fixed_or_left_out_and_logged_once() {
    let (sys, dev) = (sysfs(&["0", "0"]), tempfile::tempdir().expect("dev"));
    let mut odd = gpu("GPU-0", 0, None);
    odd.name = "N".repeat(100);
    odd.details.driver_version = Some("550.54.15.2".into());
    odd.details.cuda_driver_version = None;
    odd.mig_enabled = None;
    odd.memory_bytes = 0;
    let mut new_driver = gpu("GPU-1", 1, None);
    new_driver.details.driver_version = Some("418.87".into());
    new_driver.memory_bytes = 143_771 << 20;
    let fake = Arc::new(Fake { gpus: vec![odd, new_driver], ..Fake::default() });
    let sink = Arc::new(Recorder::default());
    let (backend, _) = Nvidia::start(config(sys.path(), dev.path(), ""), fake.clone(), sink.clone()).expect("starts");
    let devices = sink.latest("nvidia.com/gpu").expect("published");
    for device in &devices {
        devhost_abi::sdk::testing::assert_valid_device(device);
    }
    let odd = &devices[0];
    assert_eq!(odd.attributes.get(attr::PRODUCT_NAME), Some(&AttributeValue::String("N".repeat(64))));
    for absent in [attr::DRIVER_VERSION, attr::CUDA_DRIVER_VERSION, attr::MIG_ENABLED] {
        assert!(!odd.attributes.contains_key(absent), "{absent}: {:?}", odd.attributes);
    }
    assert!(odd.capacities.is_empty(), "no memory figure, no capacity");
    assert_eq!(devices[1].attributes.get(attr::DRIVER_VERSION), Some(&AttributeValue::Version("418.87.0".into())));
    assert_eq!(devices[1].capacities.get(attr::MEMORY).map(String::as_str), Some("143771Mi"));

    // Republishing (a health change) does not log the warnings again.
    fake.events.lock().expect("events").push_back(Event::Xid { uuid: "GPU-1".into(), xid: Some(79) });
    // At least two lists: the probe (every 20 ms here, no longer broken)
    // may already have published GPU-1's recovery as a third.
    wait_until("GPU-1 goes Unhealthy", || sink.lists().len() >= 2);
    assert_eq!(sink.lists()[1][1], ("GPU-1".to_owned(), Health::Unhealthy));
    let warnings: Vec<String> = sink
        .logs()
        .into_iter()
        .filter(|(level, m)| *level == LogLevel::Warn && m.contains(": attribute "))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("GPU GPU-0: attribute nvidia.com/productName cut to 64 bytes"), "{warnings:?}");
    assert!(warnings[1].starts_with("GPU GPU-0: attribute nvidia.com/driverVersion left out"), "{warnings:?}");
    backend.shutdown();
}

#[test]
fn without_reset_on_release_no_release_is_asked_for_and_nothing_is_reset() {
    let (sys, dev) = (sysfs(&["0"]), tempfile::tempdir().expect("dev"));
    // The real NVML cannot reset; with the flag off that must not matter.
    let fake = Arc::new(Fake {
        gpus: vec![gpu("GPU-0", 0, None)],
        cannot_reset: Some(crate::nvml::NO_RESET.into()),
        ..Fake::default()
    });
    let (backend, resources) =
        Nvidia::start(config(sys.path(), dev.path(), ""), fake.clone(), Arc::new(Recorder::default())).expect("starts");
    assert_eq!(resources.len(), 1);
    assert!(!resources[0].release_required, "{resources:?}");
    backend.release("nvidia.com/gpu", &["GPU-0".into()]).expect("nothing to do");
    assert!(fake.resets.lock().expect("resets").is_empty());
    backend.shutdown();
}

#[test]
fn reset_on_release_resets_idle_gpus_and_keeps_busy_or_failing_ones_for_later() {
    let (sys, dev) = (sysfs(&["0", "0", "1", "1"]), tempfile::tempdir().expect("dev"));
    let fake = Arc::new(four_gpus());
    let sink = Arc::new(Recorder::default());
    let (backend, resources) = Nvidia::start(
        config(sys.path(), dev.path(), r#", "reset_on_release": true, "health": false"#),
        fake.clone(),
        sink.clone(),
    )
    .expect("starts");
    assert_eq!(resources, [Resource::new("nvidia.com/gpu").with_preferred_allocation().with_release()]);

    backend.release("nvidia.com/gpu", &["GPU-1".into(), "GPU-3".into()]).expect("both idle");
    assert_eq!(*fake.resets.lock().expect("resets"), ["GPU-1", "GPU-3"]);
    assert!(sink.messages().contains(&"GPU GPU-1 was reset after its release".to_owned()));

    // A process still has GPU-0 open, GPU-2's reset fails: GPU-1 is reset
    // all the same, and the error names both others.
    fake.processes.lock().expect("processes").extend([("GPU-0".to_owned(), 4242), ("GPU-0".to_owned(), 17)]);
    fake.reset_fails.lock().expect("fails").push("GPU-2".into());
    let error = backend
        .release("nvidia.com/gpu", &["GPU-0".into(), "GPU-1".into(), "GPU-2".into(), "GPU-x".into()])
        .expect_err("not all released");
    assert_eq!(
        error.to_string(),
        "GPU GPU-0 was not reset: process(es) 4242, 17 still have it open; \
         resetting GPU GPU-2 failed: the GPU did not come back from the reset; \
         unknown GPU GPU-x (expected one of this backend's UUIDs)"
    );
    assert_eq!(*fake.resets.lock().expect("resets"), ["GPU-1", "GPU-3", "GPU-1"]);

    // Once idle, the next release (devhost retries) resets it.
    fake.processes.lock().expect("processes").clear();
    backend.release("nvidia.com/gpu", &["GPU-0".into()]).expect("idle now");
    assert_eq!(fake.resets.lock().expect("resets").last().map(String::as_str), Some("GPU-0"));
    backend.shutdown();
}

#[test]
fn reset_on_release_is_refused_at_init_where_gpus_cannot_be_reset() {
    let (sys, dev) = (sysfs(&["0"]), tempfile::tempdir().expect("dev"));
    let fake =
        Fake { gpus: vec![gpu("GPU-0", 0, None)], cannot_reset: Some(crate::nvml::NO_RESET.into()), ..Fake::default() };
    let error = Nvidia::start(
        config(sys.path(), dev.path(), r#", "reset_on_release": true"#),
        Arc::new(fake),
        Arc::new(Recorder::default()),
    )
    .err()
    .expect("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "reset_on_release = true, but this backend cannot reset GPUs here: {}; set reset_on_release = false \
             (released GPUs are then handed on without a reset)",
            crate::nvml::NO_RESET
        )
    );
}
