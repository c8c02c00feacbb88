//! MIG partitions (`mig = "partitions"`) through the whole backend over a
//! fake NVML: the counter set declared with the resource, one device per
//! possible placement with exactly what it consumes, the scheduler's
//! arithmetic over those counters (overlapping placements never fit
//! together, disjoint ones do), Allocate of a partition, health shared
//! with the GPU, and nothing changed where the option or MIG is off.

use std::collections::BTreeMap;
use std::sync::Arc;

use devhost_abi::partitions::{check_consumes, check_counter_sets, quantity_nanos};
use devhost_abi::sdk::testing::assert_valid_device;
use devhost_abi::sdk::{AttributeValue, Backend, CounterSet, Device, Health, LogLevel, PreferredRequest};

use super::*;
use crate::fakes::{Fake, Lists, Recorder, gpu, h100_profiles, one_g_me, wait_until};
use crate::mig::{self as m, Partitions};
use crate::model::Placement;
use crate::tests::{config, sysfs};

const PARTITIONS: &str = r#", "mig": "partitions""#;

/// GPU-0 in MIG mode with an H100's profiles, GPU-1 not.
fn mig_node() -> Fake {
    let mut gpu0 = gpu("GPU-0", 0, None);
    gpu0.mig_enabled = Some(true);
    Fake {
        gpus: vec![gpu0, gpu("GPU-1", 1, None)],
        mig: vec![("GPU-0".into(), Ok(h100_profiles()))],
        ..Fake::default()
    }
}

fn counters(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `memory-slice-<n>` = 1 for each of `slices`, and `rest`.
fn with_slices(slices: std::ops::Range<u32>, rest: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut all = counters(rest);
    all.extend(slices.map(|n| (format!("memory-slice-{n}"), "1".to_owned())));
    all
}

/// The scheduler's check: whether `devices` allocated together stay
/// within every counter of `set` (compared by value, as quantities).
fn fit_together(set: &CounterSet, devices: &[&Device]) -> bool {
    set.counters.iter().all(|(name, total)| {
        let used: i128 = devices
            .iter()
            .flat_map(|d| &d.consumes)
            .filter(|c| c.counter_set == set.name)
            .filter_map(|c| c.counters.get(name))
            .map(|q| quantity_nanos(q).expect("a quantity"))
            .sum();
        used <= quantity_nanos(total).expect("a quantity")
    })
}

/// The memory slices a device consumes.
fn slices_of(device: &Device) -> Vec<String> {
    device.consumes.iter().flat_map(|c| c.counters.keys()).filter(|k| k.starts_with("memory-slice-")).cloned().collect()
}

fn start(fake: Fake, extra: &str) -> (Nvidia, Vec<Resource>, Arc<Recorder>, Arc<Fake>) {
    let (sys, dev) = (sysfs(&["0", "1"]), tempfile::tempdir().expect("dev"));
    let (fake, sink) = (Arc::new(fake), Arc::new(Recorder::default()));
    let (backend, resources) =
        Nvidia::start(config(sys.path(), dev.path(), extra), fake.clone(), sink.clone()).expect("starts");
    (backend, resources, sink, fake)
}

#[test]
fn a_mig_gpu_yields_its_counter_set_and_every_placement_with_exact_consumptions() {
    let (backend, resources, sink, _) = start(mig_node(), PARTITIONS);
    let set = CounterSet {
        name: "gpu-0".into(),
        counters: with_slices(
            0..8,
            &[
                ("multiprocessors", "132"),
                ("copy-engines", "7"),
                ("decoders", "7"),
                ("jpeg-engines", "7"),
                ("ofa-engines", "1"),
                ("memory", "81152Mi"),
            ],
        ),
    };
    assert_eq!(resources, [Resource::new("nvidia.com/gpu").with_preferred_allocation().with_counter_set(set.clone())]);
    check_counter_sets(&resources[0].counter_sets).expect("the API's rules for counter sets");

    let devices = sink.latest("nvidia.com/gpu").expect("published");
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    let mut expected = vec!["GPU-0".to_owned()];
    expected.extend((0..7).map(|s| format!("gpu-0-mig-1g10gb-{s}")));
    expected.extend([0, 2, 4].map(|s| format!("gpu-0-mig-2g20gb-{s}")));
    expected.extend([0, 4].map(|s| format!("gpu-0-mig-3g40gb-{s}")));
    expected.extend(["gpu-0-mig-4g40gb-0".to_owned(), "gpu-0-mig-7g80gb-0".to_owned()]);
    expected.extend([0, 2, 4, 6].map(|s| format!("gpu-0-mig-1g20gb-{s}")));
    expected.push("GPU-1".into());
    assert_eq!(ids, expected);

    for device in &devices {
        assert_valid_device(device);
        check_consumes(device, &resources[0].counter_sets).unwrap_or_else(|why| panic!("{why}"));
        assert_eq!(device.health, Health::Healthy);
    }
    let device = |id: &str| devices.iter().find(|d| d.id == id).expect(id);
    let consumed = |id: &str| {
        let d = device(id);
        assert_eq!(d.consumes.len(), 1, "{d:?}");
        assert_eq!(d.consumes[0].counter_set, "gpu-0");
        d.consumes[0].counters.clone()
    };
    // The whole GPU takes everything; each partition its slices and share.
    assert_eq!(consumed("GPU-0"), set.counters);
    let one_g = [("multiprocessors", "16"), ("copy-engines", "1"), ("decoders", "1"), ("jpeg-engines", "1")];
    assert_eq!(consumed("gpu-0-mig-1g10gb-3"), with_slices(3..4, &[&one_g[..], &[("memory", "9984Mi")]].concat()));
    assert_eq!(consumed("gpu-0-mig-1g20gb-6"), with_slices(6..8, &[&one_g[..], &[("memory", "20096Mi")]].concat()));
    assert_eq!(
        consumed("gpu-0-mig-3g40gb-4"),
        with_slices(
            4..8,
            &[
                ("multiprocessors", "60"),
                ("copy-engines", "3"),
                ("decoders", "3"),
                ("jpeg-engines", "3"),
                ("memory", "40448Mi")
            ]
        )
    );
    assert_eq!(consumed("gpu-0-mig-7g80gb-0"), set.counters, "7g.80gb is the whole GPU in MIG mode");
    assert!(device("GPU-1").consumes.is_empty(), "a GPU without MIG has no counter set");

    // What a partition says about itself.
    let string = |s: &str| AttributeValue::String(s.into());
    let partition = device("gpu-0-mig-2g20gb-4");
    let attributes: BTreeMap<&str, &AttributeValue> =
        partition.attributes.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(attributes[m::TYPE], &string("mig"));
    assert_eq!(attributes[m::PROFILE], &string("2g.20gb"));
    assert_eq!(attributes[m::PLACEMENT_START], &AttributeValue::Int(4));
    assert_eq!(attributes[m::PLACEMENT_SIZE], &AttributeValue::Int(2));
    assert_eq!(attributes[m::PARENT_UUID], &string("GPU-0"));
    assert_eq!(attributes[m::PARENT_INDEX], &AttributeValue::Int(0));
    assert_eq!(attributes[m::PARENT_MINOR], &AttributeValue::Int(0));
    assert_eq!(attributes[crate::attributes::PRODUCT_NAME], &string("Fake GPU"));
    assert_eq!(attributes[crate::attributes::PCIE_ROOT], &string("pci0000:00"));
    for own in [crate::attributes::UUID, crate::attributes::INDEX, crate::attributes::MIG_ENABLED] {
        assert!(!attributes.contains_key(own), "{own} is the GPU's, not the partition's");
    }
    assert_eq!(partition.capacities.get(crate::attributes::MEMORY).map(String::as_str), Some("20096Mi"));
    assert_eq!(partition.capacities.get(m::MULTIPROCESSORS).map(String::as_str), Some("32"));
    assert_eq!(partition.numa_nodes, [0], "its GPU's NUMA node");
    assert_eq!(device("GPU-0").attributes.get(m::TYPE), Some(&string("gpu")));
    assert_eq!(device("GPU-1").attributes.get(m::TYPE), Some(&string("gpu")));

    let info = sink.logs().into_iter().find(|(_, m)| m.contains("MIG partitions")).expect("logged");
    assert_eq!(
        info,
        (
            LogLevel::Info,
            "GPU GPU-0: MIG mode is on; published as counter set gpu-0 with 18 MIG partitions (1g.10gb, 1g.20gb, \
             2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb) besides the whole GPU"
                .to_owned()
        )
    );
    assert!(sink.logs().iter().all(|(level, _)| *level != LogLevel::Warn), "{:?}", sink.messages());
    backend.shutdown();
}

#[test]
fn overlapping_placements_share_a_memory_slice_and_the_scheduler_refuses_them_together() {
    let (backend, resources, sink, _) = start(mig_node(), PARTITIONS);
    let set = &resources[0].counter_sets[0];
    let devices = sink.latest("nvidia.com/gpu").expect("published");
    let gpu0: Vec<&Device> = devices.iter().filter(|d| d.id != "GPU-1").collect();
    let span = |d: &Device| match d.id.as_str() {
        "GPU-0" => (0, 8),
        _ => {
            let int = |name: &str| match d.attributes[name] {
                AttributeValue::Int(n) => n,
                ref other => panic!("{name}: {other:?}"),
            };
            (int(m::PLACEMENT_START), int(m::PLACEMENT_START) + int(m::PLACEMENT_SIZE))
        }
    };
    let (mut overlapping, mut disjoint) = (0, 0);
    for (i, a) in gpu0.iter().enumerate() {
        for b in &gpu0[i + 1..] {
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            let overlap = a0 < b1 && b0 < a1;
            let shared: Vec<String> = slices_of(a).into_iter().filter(|s| slices_of(b).contains(s)).collect();
            assert_eq!(!shared.is_empty(), overlap, "{} and {}: shared slices {shared:?}", a.id, b.id);
            assert_eq!(fit_together(set, &[a, b]), !overlap, "{} with {}", a.id, b.id);
            if overlap { overlapping += 1 } else { disjoint += 1 }
        }
    }
    assert!(overlapping > 50 && disjoint > 50, "both kinds were checked: {overlapping} {disjoint}");

    // Whole layouts the hardware can make fit; one partition more does not.
    let device = |id: &str| *gpu0.iter().find(|d| d.id == id).expect(id);
    let seven: Vec<&Device> = (0..7).map(|s| device(&format!("gpu-0-mig-1g10gb-{s}"))).collect();
    assert!(fit_together(set, &seven), "seven 1g.10gb");
    let mixed = [device("gpu-0-mig-4g40gb-0"), device("gpu-0-mig-2g20gb-4"), device("gpu-0-mig-1g20gb-6")];
    assert!(fit_together(set, &mixed), "4g.40gb + 2g.20gb + 1g.20gb");
    assert!(!fit_together(set, &[&mixed[..], &[device("gpu-0-mig-1g10gb-6")]].concat()));
    backend.shutdown();

    // The one OFA of an H100 keeps two `1g.10gb+me` apart although their
    // memory slices are disjoint (NVML allows one instance of it).
    let mut g = gpu("GPU-0", 0, None);
    g.mig_enabled = Some(true);
    let (Some(planned), warnings) = m::plan(&g, &[h100_profiles()[4].clone(), one_g_me()]) else { panic!("planned") };
    assert!(warnings.is_empty(), "{warnings:?}");
    let layout = m::Layout { gpus: vec![Some(planned.clone())], typed: true };
    let devices = layout.devices(&[g], |_| Health::Healthy);
    let me = |s: u32| devices.iter().find(|d| d.id == format!("gpu-0-mig-1g10gb-me-{s}")).expect("+me");
    assert!(fit_together(&planned.counter_set, &[me(0)]));
    assert!(!fit_together(&planned.counter_set, &[me(0), me(1)]));
}

#[test]
fn with_the_option_off_or_without_mig_exactly_the_old_list_is_published() {
    // The old list: one device per GPU, as attributes::device makes it.
    let old = |fake: &Fake| -> Vec<Device> {
        let sys = sysfs(&["0", "1"]);
        fake.gpus
            .iter()
            .map(|g| {
                let mut g = g.clone();
                g.numa_node = crate::sysfs::numa_node(sys.path(), &g.bus_id).expect("numa");
                g.details.pcie_root = crate::sysfs::pcie_root(sys.path(), &g.bus_id);
                crate::attributes::device(&g, Health::Healthy)
            })
            .collect()
    };
    let plain = Resource::new("nvidia.com/gpu").with_preferred_allocation();

    // MIG on, option off (the default): served whole, as before.
    let (backend, resources, sink, fake) = start(mig_node(), "");
    assert_eq!(resources, std::slice::from_ref(&plain));
    assert_eq!(sink.latest("nvidia.com/gpu").expect("published"), old(&fake));
    assert!(
        sink.messages()
            .contains(&"GPU GPU-0: MIG mode is on; it is served whole (MIG devices are not resources yet)".to_owned())
    );
    backend.shutdown();

    // Option on, no GPU in MIG mode: the same.
    let fake = Fake { gpus: vec![gpu("GPU-0", 0, None), gpu("GPU-1", 1, None)], ..mig_node() };
    let (backend, resources, sink, fake) = start(fake, PARTITIONS);
    assert_eq!(resources, std::slice::from_ref(&plain));
    assert_eq!(sink.latest("nvidia.com/gpu").expect("published"), old(&fake));
    backend.shutdown();

    // Option on, an NVML without the MIG calls: served whole, one line says why.
    let why = "libnvidia-ml.so.1 has no nvmlDeviceGetGpuInstanceProfileInfoV (…); the NVIDIA driver is too old \
               to list MIG profiles";
    let fake = Fake { mig: vec![("GPU-0".into(), Err(why.into()))], ..mig_node() };
    let (backend, resources, sink, fake) = start(fake, PARTITIONS);
    assert_eq!(resources, [plain]);
    assert_eq!(sink.latest("nvidia.com/gpu").expect("published"), old(&fake));
    let warnings: Vec<String> =
        sink.logs().into_iter().filter(|(level, _)| *level == LogLevel::Warn).map(|(_, m)| m).collect();
    assert_eq!(warnings, [format!("GPU GPU-0: no MIG partitions are published, it is served whole: {why}")]);
    backend.shutdown();
}

#[test]
fn allocate_gives_a_partition_its_gpu_node_and_the_mig_variables() {
    let (sys, dev) = (sysfs(&["0", "1"]), tempfile::tempdir().expect("dev"));
    for node in ["nvidia0", "nvidia1", "nvidiactl"] {
        std::fs::write(dev.path().join(node), "").expect("node");
    }
    let sink = Arc::new(Recorder::default());
    let extra = format!(r#"{PARTITIONS}, "cdi": true"#);
    let (backend, _) =
        Nvidia::start(config(sys.path(), dev.path(), &extra), Arc::new(mig_node()), sink.clone()).expect("starts");
    let specs = |a: &Allocation| a.device_specs.iter().map(|s| s.host_path.clone()).collect::<Vec<_>>();

    let ids = ["gpu-0-mig-1g10gb-3".to_owned(), "gpu-0-mig-2g20gb-4".to_owned()];
    let answer = backend.allocate("nvidia.com/gpu", &ids).expect("allocate");
    assert_eq!(specs(&answer), ["/dev/nvidia0", "/dev/nvidiactl"], "the GPU's node once");
    let env = |a: &Allocation, k: &str| a.envs.get(k).cloned();
    assert_eq!(env(&answer, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some("void"), "never the whole GPU");
    assert_eq!(env(&answer, "NVIDIA_MIG_PROFILE").as_deref(), Some("1g.10gb,2g.20gb"));
    assert_eq!(env(&answer, "NVIDIA_MIG_PLACEMENT").as_deref(), Some("3:1,4:2"));
    assert_eq!(env(&answer, "NVIDIA_MIG_PARENT").as_deref(), Some("GPU-0,GPU-0"));
    assert!(answer.cdi_devices.is_empty(), "no CDI name for a partition: {answer:?}");

    // A partition and a whole GPU in one container.
    let answer = backend.allocate("nvidia.com/gpu", &["GPU-1".into(), "gpu-0-mig-7g80gb-0".into()]).expect("mixed");
    assert_eq!(specs(&answer), ["/dev/nvidia1", "/dev/nvidia0", "/dev/nvidiactl"]);
    assert_eq!(env(&answer, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some("GPU-1"));
    assert_eq!(env(&answer, "NVIDIA_MIG_PLACEMENT").as_deref(), Some("0:8"));
    assert_eq!(answer.cdi_devices, ["nvidia.com/gpu=GPU-1"]);

    let error = backend.allocate("nvidia.com/gpu", &["gpu-0-mig-1g10gb-7".into()]).expect_err("no such placement");
    assert_eq!(
        error.to_string(),
        "unknown device gpu-0-mig-1g10gb-7 (expected one of this backend's GPU UUIDs or MIG partition IDs)"
    );
    // The topology ranks whole GPUs only.
    let request = PreferredRequest {
        available: vec!["GPU-1".into(), "gpu-0-mig-1g10gb-0".into()],
        must_include: vec![],
        size: 1,
    };
    assert_eq!(backend.preferred_allocation("nvidia.com/gpu", &request).expect("answered"), None);
    backend.shutdown();
}

#[test]
fn partitions_share_their_gpu_s_health_and_keep_their_consumptions() {
    let (backend, _, sink, fake) = start(mig_node(), PARTITIONS);
    let before = sink.latest("nvidia.com/gpu").expect("published");
    fake.broken.lock().expect("broken").push("GPU-0".into());
    fake.events.lock().expect("events").push_back(Event::Xid { uuid: "GPU-0".into(), xid: Some(79) });
    wait_until("GPU-0 goes Unhealthy", || sink.lists().len() == 2);
    let after = sink.latest("nvidia.com/gpu").expect("republished");
    assert_eq!(after.len(), before.len());
    for (was, now) in before.iter().zip(&after) {
        let expected = if now.id == "GPU-1" { Health::Healthy } else { Health::Unhealthy };
        assert_eq!(now.health, expected, "{}", now.id);
        assert_eq!((&now.id, &now.consumes, &now.attributes), (&was.id, &was.consumes, &was.attributes));
    }
    backend.shutdown();
}

#[test]
fn placements_that_cannot_be_published_are_left_out_with_a_warning() {
    let mut g = gpu("GPU-0", 0, None);
    g.mig_enabled = Some(true);
    let mut odd = h100_profiles()[0].clone();
    odd.placements.push(Placement { start: 3, size: 0 });
    let mut clash = h100_profiles()[0].clone();
    clash.name = "1g.10gb.".into();
    let (planned, warnings) = m::plan(&g, &[odd, clash]);
    let Some(Partitions { partitions, .. }) = planned else { panic!("planned") };
    assert_eq!(partitions.len(), 7);
    assert_eq!(warnings.len(), 8, "{warnings:?}");
    assert_eq!(
        warnings[0],
        "GPU GPU-0: MIG profile 1g.10gb placement at slice 3 left out: NVML gives it no memory slices"
    );
    assert_eq!(
        warnings[1],
        "GPU GPU-0: MIG profile 1g.10gb. at slice 0 left out: device ID gpu-0-mig-1g10gb-0 is taken by another profile"
    );

    // 30 memory slices and 6 more counters pass the 32 a set may have.
    let mut wide = h100_profiles()[0].clone();
    wide.placements = (0..30).map(|start| Placement { start, size: 1 }).collect();
    let (planned, warnings) = m::plan(&g, &[wide]);
    assert!(planned.is_none());
    assert!(
        warnings[0].contains("span 30 memory slices, which with 5 more counters is more than the 32"),
        "{warnings:?}"
    );

    let (planned, warnings) = m::plan(&g, &[]);
    assert!(planned.is_none());
    assert_eq!(warnings, ["GPU GPU-0: MIG mode is on but NVML lists no MIG placement to publish; it is served whole"]);
}
