//! Whole-backend tests over the standard fixture tree
//! (`tests/fixtures/sysfs/pci.rs`, built in a temp dir) and this machine's
//! real `/sys`.

#[path = "../../../tests/fixtures/sysfs/pci.rs"]
mod fixture;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use devhost_abi::sdk::testing::Recorder;
use devhost_abi::sdk::{AttributeValue, Backend, Device, Health, LogLevel};

use crate::Pci;
use crate::attributes as attr;
use crate::config::Config;

/// Views and waits on what the SDK's test host recorded.
trait Views {
    /// The latest list of `resource` (empty before the first).
    fn devices(&self, resource: &str) -> Vec<Device>;
    /// The IDs in the latest list of `resource`.
    fn ids(&self, resource: &str) -> Vec<String>;
    /// Waits until the latest list of `resource` satisfies `ok`.
    fn wait_for(&self, resource: &str, what: &str, ok: impl Fn(&[Device]) -> bool);
}

impl Views for Recorder {
    fn devices(&self, resource: &str) -> Vec<Device> {
        self.latest(resource).unwrap_or_default()
    }

    fn ids(&self, resource: &str) -> Vec<String> {
        self.devices(resource).into_iter().map(|d| d.id).collect()
    }

    fn wait_for(&self, resource: &str, what: &str, ok: impl Fn(&[Device]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok(&self.devices(resource)) {
            assert!(Instant::now() < deadline, "{resource}: never {what}: {:?}", self.devices(resource));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn start(sys: &Path, resources: &str) -> (Pci, Arc<Recorder>) {
    let json = format!(
        r#"{{"sysfs_root": {:?}, "rescan_interval_ms": 20, "removal_grace_ms": 300, "resource": {resources}}}"#,
        sys.display().to_string()
    );
    let recorder = Arc::new(Recorder::default());
    let (pci, _) = Pci::start(Config::parse(&json).expect("valid config"), recorder.clone()).expect("start");
    (pci, recorder)
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_selector_kind_picks_the_right_functions() {
    let dir = tempfile::tempdir().expect("tempdir");
    fixture::standard(dir.path());
    let (_pci, rec) = start(
        dir.path(),
        r#"[{"name": "a.io/vendor-device", "vendors": ["8086"], "devices": ["1592"]},
            {"name": "a.io/class", "class": "0x020000", "class_mask": "0xff0000"},
            {"name": "a.io/driver", "drivers": ["vfio-pci"]},
            {"name": "a.io/pf", "pf_names": ["ens1f1"]},
            {"name": "a.io/range", "pf_names": ["ens1f0#2-4"]},
            {"name": "a.io/address", "addresses": ["0000:af:00.0", "0000:3b:02.7"]},
            {"name": "a.io/combined", "vendors": ["8086"], "drivers": ["iavf"], "pf_names": ["ens1f0#6-7", "ens1f1"]}]"#,
    );
    assert_eq!(rec.ids("a.io/vendor-device"), ["0000:3b:00.0", "0000:3b:00.1"]);
    assert_eq!(rec.ids("a.io/class").len(), 12, "2 PFs and 10 VFs");
    assert_eq!(rec.ids("a.io/driver"), ["0000:3b:0a.0", "0000:3b:0a.1", "0000:5e:00.0"]);
    assert_eq!(rec.ids("a.io/pf"), fixture::PORT1_VFS);
    assert_eq!(rec.ids("a.io/range"), fixture::PORT0_VFS[2..=4]);
    assert_eq!(rec.ids("a.io/address"), ["0000:3b:02.7", "0000:af:00.0"]);
    assert_eq!(rec.ids("a.io/combined"), ["0000:3b:02.6", "0000:3b:02.7"]);
    let numa: Vec<Vec<i64>> = rec.devices("a.io/address").into_iter().map(|d| d.numa_nodes).collect();
    assert_eq!(numa, [vec![1], vec![]], "NUMA from sysfs, none where the kernel says -1");
}

#[test]
fn allocate_gives_vfio_groups_mapped_nodes_and_the_address_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    fixture::standard(dir.path());
    let (pci, _) = start(
        dir.path(),
        r#"[{"name": "intel.com/sriov_vfio", "drivers": ["vfio-pci"]},
            {"name": "acme.com/fpga", "vendors": ["8086"], "devices": ["0b30"],
             "device_nodes": [{"sysfs": "drm/renderD*", "dev": "/dev/dri/{name}"}]},
            {"name": "intel.com/sriov-netdevice", "pf_names": ["ens1f0"]}]"#,
    );
    let answer = pci.answer("intel.com/sriov_vfio", &ids(&["0000:3b:0a.0", "0000:3b:0a.1"])).expect("vfio");
    let paths: Vec<&str> = answer.device_specs.iter().map(|s| s.host_path.as_str()).collect();
    assert_eq!(paths, ["/dev/vfio/60", "/dev/vfio/vfio", "/dev/vfio/61"]);
    assert_eq!(answer.envs["PCIDEVICE_INTEL_COM_SRIOV_VFIO"], "0000:3b:0a.0,0000:3b:0a.1");
    let answer = pci.answer("acme.com/fpga", &ids(&["0000:af:00.0"])).expect("fpga");
    let paths: Vec<(&str, &str)> =
        answer.device_specs.iter().map(|s| (s.container_path.as_str(), s.permissions.as_str())).collect();
    assert_eq!(paths, [("/dev/dri/renderD128", "rw")]);
    assert_eq!(answer.envs["PCIDEVICE_ACME_COM_FPGA"], "0000:af:00.0");
    let answer = pci.answer("intel.com/sriov-netdevice", &ids(&["0000:3b:02.3"])).expect("netdevice");
    assert!(answer.device_specs.is_empty(), "a netdev VF needs no device node");
    assert_eq!(answer.envs["PCIDEVICE_INTEL_COM_SRIOV_NETDEVICE"], "0000:3b:02.3");
    assert!(pci.answer("acme.com/fpga", &ids(&["0000:3b:02.3"])).is_err(), "not a device of that resource");
}

#[test]
fn a_netdev_function_s_allocation_reports_its_interface_and_mac_for_the_claim_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path();
    fixture::standard(sys);
    let mac = "3c:fd:fe:a1:00:03";
    std::fs::write(fixture::function_dir(sys, "0000:3b:02.3").join("net/ens1f0v3/address"), format!("{mac}\n"))
        .expect("address");
    let (pci, _) = start(
        sys,
        r#"[{"name": "intel.com/sriov-netdevice", "pf_names": ["ens1f0"]},
            {"name": "intel.com/sriov_vfio", "drivers": ["vfio-pci"]}]"#,
    );
    let answer = pci.answer("intel.com/sriov-netdevice", &ids(&["0000:3b:02.3", "0000:3b:02.0"])).expect("netdevs");
    let status = &answer.device_status;
    assert_eq!(status.len(), 2, "{status:?}");
    assert_eq!(status["0000:3b:02.3"].interface_name.as_deref(), Some("ens1f0v3"));
    assert_eq!(status["0000:3b:02.3"].hardware_address.as_deref(), Some(mac));
    assert_eq!(status["0000:3b:02.0"].interface_name.as_deref(), Some("ens1f0v0"));
    assert_eq!(status["0000:3b:02.0"].hardware_address, None, "no address file: no MAC");
    for each in status.values() {
        devhost_abi::partitions::check_device_status(each).expect("within the API server's limits");
    }
    let vfio = pci.answer("intel.com/sriov_vfio", &ids(&["0000:3b:0a.0"])).expect("vfio");
    assert!(vfio.device_status.is_empty(), "a vfio-pci function has no netdev: {:?}", vfio.device_status);
}

#[test]
fn rebinding_link_loss_and_removal_reach_the_device_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path();
    fixture::standard(sys);
    let (pci, rec) =
        start(sys, r#"[{"name": "a.io/vf", "drivers": ["iavf"], "pf_names": ["ens1f0#0-1"], "check_link": true}]"#);
    fn health(id: &'static str, h: Health) -> impl Fn(&[Device]) -> bool {
        move |d: &[Device]| d.iter().any(|d| d.id == id && d.health == h)
    }
    rec.wait_for("a.io/vf", "both healthy", |d| d.len() == 2 && d.iter().all(|d| d.health == Health::Healthy));
    fixture::set_link(sys, "0000:3b:02.0", "ens1f0v0", false);
    rec.wait_for("a.io/vf", "link down", health("0000:3b:02.0", Health::Unhealthy));
    fixture::set_link(sys, "0000:3b:02.0", "ens1f0v0", true);
    rec.wait_for("a.io/vf", "link up", health("0000:3b:02.0", Health::Healthy));
    fixture::bind(sys, "0000:3b:02.1", Some("vfio-pci"));
    rec.wait_for("a.io/vf", "rebound", health("0000:3b:02.1", Health::Unhealthy));
    assert!(pci.answer("a.io/vf", &ids(&["0000:3b:02.1"])).is_err(), "a rebound function is not handed out");
    fixture::bind(sys, "0000:3b:02.1", Some("iavf"));
    rec.wait_for("a.io/vf", "bound again", health("0000:3b:02.1", Health::Healthy));
    fixture::remove(sys, "0000:3b:02.1");
    rec.wait_for("a.io/vf", "removed", health("0000:3b:02.1", Health::Unhealthy));
    rec.wait_for("a.io/vf", "dropped after the grace", |d| d.len() == 1);
}

#[test]
fn reset_on_prestart_writes_the_reset_file_and_validation_names_the_missing_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    fixture::standard(dir.path());
    let (pci, _) = start(dir.path(), r#"[{"name": "a.io/fpga", "devices": ["0b30"], "reset_on_prestart": true}]"#);
    pci.reset("a.io/fpga", &ids(&["0000:af:00.0"])).expect("reset");
    let reset = fixture::function_dir(dir.path(), "0000:af:00.0").join("reset");
    assert_eq!(std::fs::read_to_string(&reset).expect("reset file"), "1");

    std::fs::remove_file(&reset).expect("no reset method");
    let json = format!(
        r#"{{"sysfs_root": {:?}, "resource": [{{"name": "a.io/fpga", "devices": ["0b30"], "reset_on_prestart": true}}]}}"#,
        dir.path().display().to_string()
    );
    let error = Pci::start(Config::parse(&json).expect("valid"), Arc::new(Recorder::default())).err().expect("refused");
    assert!(error.to_string().contains("has no") && error.to_string().contains("no reset method"), "{error}");
    std::fs::create_dir(&reset).expect("a directory cannot be opened for writing");
    let error = Pci::start(Config::parse(&json).expect("valid"), Arc::new(Recorder::default())).err().expect("refused");
    assert!(error.to_string().contains("needs write access to"), "{error}");
}

/// `(name, value)` pairs as an attribute map.
fn attributes(pairs: &[(&str, AttributeValue)]) -> BTreeMap<String, AttributeValue> {
    pairs.iter().map(|(name, value)| (name.to_string(), value.clone())).collect()
}

fn string(value: &str) -> AttributeValue {
    AttributeValue::String(value.into())
}

#[test]
fn every_function_carries_its_attributes_and_they_pass_dras_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path();
    fixture::standard(sys);
    // The shared fixture has no link speeds: the PF's link is up at 25
    // Gb/s, VF 3's is down (the kernel reads -1).
    std::fs::write(fixture::function_dir(sys, "0000:3b:00.0").join("net/ens1f0/speed"), "25000\n").expect("speed");
    std::fs::write(fixture::function_dir(sys, "0000:3b:02.3").join("net/ens1f0v3/speed"), "-1\n").expect("speed");
    let (_pci, rec) = start(sys, r#"[{"name": "a.io/all", "vendors": ["8086", "10de"]}]"#);
    let devices = rec.devices("a.io/all");
    assert_eq!(devices.len(), 14);
    for device in &devices {
        devhost_abi::sdk::testing::assert_valid_device(device);
    }
    let of = |id: &str| devices.iter().find(|d| d.id == id).map(|d| d.attributes.clone()).unwrap_or_default();
    assert_eq!(
        of("0000:3b:00.0"),
        attributes(&[
            (attr::ADDRESS, string("0000:3b:00.0")),
            (attr::VENDOR, string("8086")),
            (attr::DEVICE, string("1592")),
            (attr::CLASS, string("020000")),
            (attr::DRIVER, string("ice")),
            (attr::VIRTUAL_FUNCTION, AttributeValue::Bool(false)),
            (attr::IOMMU_GROUP, AttributeValue::Int(10)),
            (attr::NUMA_NODE, AttributeValue::Int(1)),
            (attr::PCIE_ROOT, string("pci0000:3b")),
            (attr::NETDEV, string("ens1f0")),
            (attr::LINK_SPEED, AttributeValue::Int(25_000)),
        ])
    );
    assert_eq!(
        of("0000:3b:02.3"),
        attributes(&[
            (attr::ADDRESS, string("0000:3b:02.3")),
            (attr::VENDOR, string("8086")),
            (attr::DEVICE, string("1889")),
            (attr::CLASS, string("020000")),
            (attr::DRIVER, string("iavf")),
            (attr::VIRTUAL_FUNCTION, AttributeValue::Bool(true)),
            (attr::PF_ADDRESS, string("0000:3b:00.0")),
            (attr::VF_INDEX, AttributeValue::Int(3)),
            (attr::IOMMU_GROUP, AttributeValue::Int(53)),
            (attr::NUMA_NODE, AttributeValue::Int(1)),
            (attr::PCIE_ROOT, string("pci0000:3b")),
            (attr::NETDEV, string("ens1f0v3")),
        ]),
        "a link that is down has no speed"
    );
    let vfio_vf = of("0000:3b:0a.1");
    assert_eq!(vfio_vf.get(attr::PF_ADDRESS), Some(&string("0000:3b:00.1")));
    assert_eq!(vfio_vf.get(attr::VF_INDEX), Some(&AttributeValue::Int(1)));
    assert_eq!(vfio_vf.get(attr::DRIVER), Some(&string("vfio-pci")));
    assert!(!vfio_vf.contains_key(attr::NETDEV), "a VFIO-bound VF has no netdev");
    assert_eq!(
        of("0000:af:00.0"),
        attributes(&[
            (attr::ADDRESS, string("0000:af:00.0")),
            (attr::VENDOR, string("8086")),
            (attr::DEVICE, string("0b30")),
            (attr::CLASS, string("120000")),
            (attr::DRIVER, string("dfl-pci")),
            (attr::VIRTUAL_FUNCTION, AttributeValue::Bool(false)),
            (attr::IOMMU_GROUP, AttributeValue::Int(90)),
            (attr::PCIE_ROOT, string("pci0000:af")),
        ]),
        "no NUMA node where the kernel says -1, no netdev"
    );
    assert_eq!(of("0000:5e:00.0").get(attr::PCIE_ROOT), Some(&string("pci0000:5e")));
}

#[test]
fn attribute_changes_are_republished_and_bad_values_left_out_and_logged_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path();
    fixture::standard(sys);
    let (_pci, rec) = start(sys, r#"[{"name": "a.io/pf", "addresses": ["0000:3b:00.0", "0000:af:00.0"]}]"#);
    let speed = |d: &[Device]| d[0].attributes.get(attr::LINK_SPEED).cloned();
    assert_eq!(speed(&rec.devices("a.io/pf")), None, "no speed file");
    let speed_file = fixture::function_dir(sys, "0000:3b:00.0").join("net/ens1f0/speed");
    std::fs::write(&speed_file, "10000\n").expect("link up");
    rec.wait_for("a.io/pf", "at 10 Gb/s", |d| speed(d) == Some(AttributeValue::Int(10_000)));
    std::fs::write(&speed_file, "100000\n").expect("renegotiated");
    rec.wait_for("a.io/pf", "at 100 Gb/s", |d| speed(d) == Some(AttributeValue::Int(100_000)));

    // A driver name past DRA's 64 bytes: the attribute is left out, the
    // rest is still published, and the warning is logged once however
    // many rescans see it.
    let long = "d".repeat(70);
    fixture::bind(sys, "0000:af:00.0", Some(&long));
    rec.wait_for("a.io/pf", "without the driver", |d| !d[1].attributes.contains_key(attr::DRIVER));
    std::thread::sleep(Duration::from_millis(100));
    let devices = rec.devices("a.io/pf");
    assert_eq!(devices[1].attributes.get(attr::VENDOR), Some(&string("8086")));
    for device in &devices {
        devhost_abi::sdk::testing::assert_valid_device(device);
    }
    let warnings: Vec<String> =
        rec.logs().into_iter().filter(|(level, _)| *level == LogLevel::Warn).map(|(_, m)| m).collect();
    assert_eq!(
        warnings,
        [format!(
            "PCI function 0000:af:00.0: attribute pci.devhost.io/driver left out: {long:?} is 70 bytes, DRA allows 64"
        )]
    );
}

#[test]
fn reset_on_release_asks_for_release_and_writes_the_reset_file_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    fixture::standard(dir.path());
    let json = format!(
        r#"{{"sysfs_root": {:?}, "resource": [
            {{"name": "a.io/released", "devices": ["0b30"], "reset_on_release": true}},
            {{"name": "a.io/vfio", "addresses": ["0000:5e:00.0"]}}]}}"#,
        dir.path().display().to_string()
    );
    let (pci, resources) =
        Pci::start(Config::parse(&json).expect("valid"), Arc::new(Recorder::default())).expect("start");
    assert_eq!(
        resources,
        [devhost_abi::sdk::Resource::new("a.io/released").with_release(), devhost_abi::sdk::Resource::new("a.io/vfio"),],
        "release only where asked, and no pre-start for it"
    );
    let reset = fixture::function_dir(dir.path(), "0000:af:00.0").join("reset");
    pci.pre_start("a.io/released", &ids(&["0000:af:00.0"])).expect("nothing to do before a container");
    assert_eq!(std::fs::read_to_string(&reset).expect("reset file"), "\n", "not reset on pre-start");
    pci.release("a.io/released", &ids(&["0000:af:00.0"])).expect("release");
    assert_eq!(std::fs::read_to_string(&reset).expect("reset file"), "1", "reset on release");

    let other = fixture::function_dir(dir.path(), "0000:5e:00.0").join("reset");
    pci.release("a.io/vfio", &ids(&["0000:5e:00.0"])).expect("nothing to release");
    assert_eq!(std::fs::read_to_string(&other).expect("reset file"), "\n", "reset_on_release off: untouched");
    let error = pci.release("a.io/released", &ids(&["0000:3b:00.0"])).expect_err("not its device");
    assert_eq!(error.to_string(), "a.io/released: unknown device \"0000:3b:00.0\"");

    // The same grant checks as reset_on_prestart, naming this option.
    std::fs::remove_file(&reset).expect("no reset method");
    let error = Pci::start(Config::parse(&json).expect("valid"), Arc::new(Recorder::default())).err().expect("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "resource \"a.io/released\": reset_on_release: function 0000:af:00.0 has no {} (the kernel offers no reset method for it)",
            dir.path().join("bus/pci/devices/0000:af:00.0/reset").display()
        )
    );
    std::fs::create_dir(&reset).expect("a directory cannot be opened for writing");
    let error = Pci::start(Config::parse(&json).expect("valid"), Arc::new(Recorder::default())).err().expect("refused");
    let error = error.to_string();
    assert!(error.starts_with("resource \"a.io/released\": reset_on_release needs write access to "), "{error}");
    assert!(error.ends_with("or turn reset_on_release off"), "{error}");
}

#[test]
fn real_sys_virtio_network_controller() {
    let sys = Path::new("/sys");
    let functions = crate::sysfs::functions(sys);
    if !functions.iter().any(|f| f.class >> 16 == 0x02) {
        eprintln!("skipping: this machine's /sys/bus/pci has no network controller (class 0x02xxxx)");
        return;
    }
    let (pci, rec) = start(sys, r#"[{"name": "a.io/nic", "class": "0x020000", "class_mask": "0xff0000"}]"#);
    let nics = rec.ids("a.io/nic");
    assert!(!nics.is_empty());
    let answer = pci.answer("a.io/nic", &nics).expect("allocate");
    assert_eq!(answer.envs["PCIDEVICE_A_IO_NIC"], nics.join(","));
    for device in rec.devices("a.io/nic") {
        eprintln!("real NIC {} attributes: {:?}", device.id, device.attributes);
        devhost_abi::sdk::testing::assert_valid_device(&device);
        assert_eq!(device.attributes.get(attr::ADDRESS), Some(&string(&device.id)));
        let root = device.attributes.get(attr::PCIE_ROOT);
        assert!(
            matches!(root, Some(AttributeValue::String(root)) if crate::sysfs::is_pcie_root(root)),
            "a real function hangs off a PCIe root: {root:?}"
        );
    }
    for f in functions.iter().filter(|f| nics.contains(&f.address)) {
        eprintln!(
            "real NIC {}: {}:{} driver {:?} netdevs {:?} numa {:?}",
            f.address, f.vendor, f.device, f.driver, f.netdevs, f.numa
        );
    }
}
