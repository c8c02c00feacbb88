//! The backend as a whole over a fake NVML: what `init` publishes and logs,
//! Allocate and preferred allocation through the `Backend` trait, health
//! pushed from its thread, and a clean shutdown.

use std::sync::Arc;

use devhost_abi::sdk::{Backend, Health, PreferredRequest};

use super::*;
use crate::fakes::{Fake, Lists, Recorder, gpu, wait_until};

/// A sysfs tree where GPU index `i` sits at bus `i + 1` with NUMA `numa[i]`.
fn sysfs(numa: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    for (i, node) in numa.iter().enumerate() {
        let dir = root.path().join(format!("bus/pci/devices/0000:{:02x}:00.0", i + 1));
        std::fs::create_dir_all(&dir).expect("device dir");
        std::fs::write(dir.join("numa_node"), format!("{node}\n")).expect("numa_node");
    }
    root
}

fn config(sysfs: &std::path::Path, dev: &std::path::Path, extra: &str) -> Config {
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
