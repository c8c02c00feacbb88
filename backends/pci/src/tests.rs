//! Whole-backend tests over the standard fixture tree
//! (`tests/fixtures/sysfs/pci.rs`, built in a temp dir) and this machine's
//! real `/sys`.

#[path = "../../../tests/fixtures/sysfs/pci.rs"]
mod fixture;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devhost_abi::sdk::testing::Recorder;
use devhost_abi::sdk::{Device, Health};

use crate::Pci;
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
    for f in functions.iter().filter(|f| nics.contains(&f.address)) {
        eprintln!(
            "real NIC {}: {}:{} driver {:?} netdevs {:?} numa {:?}",
            f.address, f.vendor, f.device, f.driver, f.netdevs, f.numa
        );
    }
}
