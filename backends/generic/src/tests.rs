//! Whole-backend tests over fixture trees built in temp dirs: USB serial
//! adapters in a fake sysfs, plain nodes in a fake `/dev`, hot-plug through
//! the rescan thread.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use devhost_abi::sdk::testing::Recorder;
use devhost_abi::sdk::{AttributeValue, Device, DeviceSpec, Health, LogLevel, Mount};

use crate::Generic;
use crate::attributes as attr;
use crate::config::Config;

/// Waits on what the SDK's test host recorded.
trait Waits {
    /// Waits until the latest list of `resource` is `expected` (`(id, health)`).
    fn wait_for(&self, resource: &str, expected: &[(&str, Health)]);
}

impl Waits for Recorder {
    fn wait_for(&self, resource: &str, expected: &[(&str, Health)]) {
        let expected: Vec<(String, Health)> = expected.iter().map(|(id, h)| (id.to_string(), *h)).collect();
        let latest = || -> Option<Vec<(String, Health)>> {
            Some(self.latest(resource)?.iter().map(|d| (d.id.clone(), d.health)).collect())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while latest().as_ref() != Some(&expected) {
            assert!(Instant::now() < deadline, "{resource}: {:?}, expected {expected:?}", latest());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, "").expect("write");
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, format!("{text}\n")).expect("write");
}

/// A USB serial adapter as the kernel lays it out: `/dev/<tty>` and
/// `class/tty/<tty>` → `devices/.../usb1/<port>/<port>:1.<iface>/<tty>/tty/<tty>`.
pub(crate) fn usb_serial(root: &Path, tty: &str, port: &str, ids: (&str, &str), serial: Option<&str>, iface: u8) {
    let sys = root.join("sys");
    let usb = sys.join("devices/pci0000:00/0000:00:14.0/usb1").join(port);
    write(&usb.join("idVendor"), ids.0);
    write(&usb.join("idProduct"), ids.1);
    if let Some(serial) = serial {
        write(&usb.join("serial"), serial);
    }
    let interface = usb.join(format!("{port}:1.{iface}"));
    write(&interface.join("bInterfaceNumber"), &format!("{iface:02}"));
    let node = interface.join(tty).join("tty").join(tty);
    write(&node.join("dev"), "188:0");
    std::fs::create_dir_all(sys.join("class/tty")).expect("class dir");
    std::os::unix::fs::symlink(&node, sys.join("class/tty").join(tty)).expect("class link");
    touch(&root.join("dev").join(tty));
}

/// The latest published device `id` of `resource`.
fn device(recorder: &Recorder, resource: &str, id: &str) -> Device {
    let devices = recorder.latest(resource).unwrap_or_default();
    devices.into_iter().find(|d| d.id == id).unwrap_or_else(|| panic!("{resource}: no device {id}"))
}

/// String attributes as a map.
fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, AttributeValue> {
    pairs.iter().map(|(name, value)| (name.to_string(), AttributeValue::String(value.to_string()))).collect()
}

/// Every published device of every list passes DRA's rules.
fn all_valid(recorder: &Recorder) {
    for (_, devices) in recorder.published() {
        for device in &devices {
            devhost_abi::sdk::testing::assert_valid_device(device);
        }
    }
}

fn config(root: &Path, groups: &str) -> Config {
    let json = format!(
        r#"{{"dev_root": {:?}, "sysfs_root": {:?}, "rescan_interval_ms": 20, "removal_grace_ms": 300, "group": {groups}}}"#,
        root.display().to_string(),
        root.join("sys").display().to_string()
    );
    Config::parse(&json).expect("valid config")
}

#[test]
fn usb_serial_adapters_get_ids_from_their_serial_not_their_tty_number() {
    let root = tempfile::tempdir().expect("tempdir");
    usb_serial(root.path(), "ttyUSB0", "1-1", ("0403", "6001"), Some("A50285BI"), 0);
    usb_serial(root.path(), "ttyUSB1", "1-2", ("10c4", "ea60"), Some("0001"), 0);
    usb_serial(root.path(), "ttyUSB2", "1-3", ("0403", "6010"), None, 1);
    let config = config(
        root.path(),
        r#"[{"resource": "example.com/ftdi", "paths": ["/dev/ttyUSB*"], "usb": [{"vendor": "0403"}]},
            {"resource": "example.com/cp210x", "paths": ["/dev/ttyUSB*"], "usb": [{"vendor": "10c4", "product": "ea60"}], "grouping": "usb"},
            {"resource": "example.com/any", "paths": ["/dev/ttyUSB*"]}]"#,
    );
    let recorder = Arc::new(Recorder::default());
    let (generic, resources) = Generic::start(config, recorder.clone()).expect("start");
    assert_eq!(resources.len(), 3);
    recorder.wait_for(
        "example.com/ftdi",
        &[("usb-0403-6001-A50285BI-if00", Health::Healthy), ("usb-0403-6010-1-3-if01", Health::Healthy)],
    );
    recorder.wait_for("example.com/cp210x", &[("usb-10c4-ea60-0001", Health::Healthy)]);
    recorder.wait_for(
        "example.com/any",
        &[("ttyUSB0", Health::Healthy), ("ttyUSB1", Health::Healthy), ("ttyUSB2", Health::Healthy)],
    );
    let ftdi = device(&recorder, "example.com/ftdi", "usb-0403-6001-A50285BI-if00");
    assert_eq!(
        ftdi.attributes,
        strings(&[
            (attr::PATH, "/dev/ttyUSB0"),
            (attr::USB_VENDOR, "0403"),
            (attr::USB_PRODUCT, "6001"),
            (attr::USB_SERIAL, "A50285BI"),
        ])
    );
    assert_eq!(
        device(&recorder, "example.com/ftdi", "usb-0403-6010-1-3-if01").attributes,
        strings(&[(attr::PATH, "/dev/ttyUSB2"), (attr::USB_VENDOR, "0403"), (attr::USB_PRODUCT, "6010")]),
        "no serial file: no serial attribute (the port in its ID is not a serial number)"
    );
    assert_eq!(
        device(&recorder, "example.com/cp210x", "usb-10c4-ea60-0001").attributes,
        strings(&[
            (attr::PATH, "/dev/ttyUSB1"),
            (attr::USB_VENDOR, "10c4"),
            (attr::USB_PRODUCT, "ea60"),
            (attr::USB_SERIAL, "0001"),
        ])
    );
    assert_eq!(
        device(&recorder, "example.com/any", "ttyUSB1").attributes,
        device(&recorder, "example.com/cp210x", "usb-10c4-ea60-0001").attributes,
        "a USB device's identity is published without a usb filter too"
    );
    all_valid(&recorder);
    let answer = generic.answer("example.com/ftdi", &["usb-0403-6001-A50285BI-if00".into()]).expect("allocate");
    let host_path = root.path().join("dev/ttyUSB0").display().to_string();
    assert_eq!(
        answer.device_specs,
        [DeviceSpec { container_path: "/dev/ttyUSB0".into(), host_path, permissions: "rw".into() }]
    );
}

#[test]
fn hot_plug_advertises_new_nodes_and_keeps_vanished_ones_unhealthy_for_the_grace() {
    let root = tempfile::tempdir().expect("tempdir");
    usb_serial(root.path(), "ttyUSB0", "1-1", ("0403", "6001"), Some("AAA"), 0);
    let config = config(
        root.path(),
        r#"[{"resource": "example.com/serial", "paths": ["/dev/ttyUSB*"], "usb": [{"vendor": "0403"}]}]"#,
    );
    let recorder = Arc::new(Recorder::default());
    let (generic, _) = Generic::start(config, recorder.clone()).expect("start");
    recorder.wait_for("example.com/serial", &[("usb-0403-6001-AAA-if00", Health::Healthy)]);

    // A second adapter (serial BBB) appears on another port.
    usb_serial(root.path(), "ttyUSB1", "1-2", ("0403", "6001"), Some("BBB"), 0);
    recorder.wait_for(
        "example.com/serial",
        &[("usb-0403-6001-AAA-if00", Health::Healthy), ("usb-0403-6001-BBB-if00", Health::Healthy)],
    );
    std::fs::remove_file(root.path().join("dev/ttyUSB0")).expect("unplug");
    recorder.wait_for(
        "example.com/serial",
        &[("usb-0403-6001-AAA-if00", Health::Unhealthy), ("usb-0403-6001-BBB-if00", Health::Healthy)],
    );
    let error = generic.answer("example.com/serial", &["usb-0403-6001-AAA-if00".into()]).expect_err("gone");
    assert!(error.to_string().contains("is gone"), "{error}");
    recorder.wait_for("example.com/serial", &[("usb-0403-6001-BBB-if00", Health::Healthy)]);
    generic.answer("example.com/serial", &["usb-0403-6001-BBB-if00".into()]).expect("still served");

    // The first adapter re-plugged on a third port, as ttyUSB2: its ID is
    // its serial's, so it comes back as the same device.
    usb_serial(root.path(), "ttyUSB2", "1-3", ("0403", "6001"), Some("AAA"), 0);
    recorder.wait_for(
        "example.com/serial",
        &[("usb-0403-6001-AAA-if00", Health::Healthy), ("usb-0403-6001-BBB-if00", Health::Healthy)],
    );
    let answer = generic.answer("example.com/serial", &["usb-0403-6001-AAA-if00".into()]).expect("served again");
    assert_eq!(answer.device_specs[0].container_path, "/dev/ttyUSB2", "the same ID now names the new node");
    let replugged = device(&recorder, "example.com/serial", "usb-0403-6001-AAA-if00");
    assert_eq!(
        replugged.attributes.get(attr::PATH),
        Some(&AttributeValue::String("/dev/ttyUSB2".into())),
        "the path attribute follows the node"
    );
}

#[test]
fn grouped_paths_form_one_device_with_every_path_and_the_mounts() {
    let root = tempfile::tempdir().expect("tempdir");
    for node in ["dev/snd/controlC0", "dev/snd/pcmC0D0p", "dev/snd/timer", "dev/fuse", "dev/net/tun"] {
        touch(&root.path().join(node));
    }
    let config = config(
        root.path(),
        r#"[{"resource": "example.com/sound", "paths": ["/dev/snd/*"], "grouping": "all", "permissions": "rwm",
             "mounts": [{"host_path": "/usr/share/alsa", "container_path": "/usr/share/alsa"}]},
            {"resource": "example.com/node", "paths": ["/dev/fuse", "/dev/net/tun"]}]"#,
    );
    let recorder = Arc::new(Recorder::default());
    let (generic, _) = Generic::start(config, recorder.clone()).expect("start");
    recorder.wait_for("example.com/sound", &[("sound", Health::Healthy)]);
    recorder.wait_for("example.com/node", &[("fuse", Health::Healthy), ("net-tun", Health::Healthy)]);
    assert_eq!(
        device(&recorder, "example.com/sound", "sound").attributes,
        strings(&[(attr::PATH, "/dev/snd/controlC0")]),
        "a device of several paths: the first; no USB parent, no USB attributes"
    );
    assert_eq!(device(&recorder, "example.com/node", "net-tun").attributes, strings(&[(attr::PATH, "/dev/net/tun")]));
    all_valid(&recorder);
    let answer = generic.answer("example.com/sound", &["sound".into()]).expect("allocate");
    let paths: Vec<(&str, &str)> =
        answer.device_specs.iter().map(|s| (s.container_path.as_str(), s.permissions.as_str())).collect();
    assert_eq!(paths, [("/dev/snd/controlC0", "rwm"), ("/dev/snd/pcmC0D0p", "rwm"), ("/dev/snd/timer", "rwm")]);
    assert_eq!(
        answer.mounts,
        [Mount { container_path: "/usr/share/alsa".into(), host_path: "/usr/share/alsa".into(), read_only: true }]
    );
    let answer = generic.answer("example.com/node", &["net-tun".into()]).expect("allocate");
    assert_eq!(answer.device_specs.len(), 1, "exactly the requested device");
    assert_eq!(answer.device_specs[0].container_path, "/dev/net/tun");
    assert!(generic.answer("example.com/node", &["nope".into()]).is_err());
}

#[test]
fn values_past_dras_limits_are_left_out_and_logged_once() {
    let root = tempfile::tempdir().expect("tempdir");
    // A by-id name longer than DRA's 64 bytes, and a serial number too.
    let long_name = format!("usb-FTDI_FT232R_USB_UART_{}-if00-port0", "A".repeat(40));
    touch(&root.path().join("dev/serial/by-id").join(&long_name));
    usb_serial(root.path(), "ttyUSB0", "1-1", ("0403", "6001"), Some(&"S".repeat(65)), 0);
    let config = config(
        root.path(),
        r#"[{"resource": "example.com/by-id", "paths": ["/dev/serial/by-id/*"]},
            {"resource": "example.com/ftdi", "paths": ["/dev/ttyUSB*"], "usb": [{"vendor": "0403"}]}]"#,
    );
    let recorder = Arc::new(Recorder::default());
    let (_generic, _) = Generic::start(config, recorder.clone()).expect("start");
    let by_id = format!("serial-by-id-{long_name}");
    recorder.wait_for("example.com/by-id", &[(&by_id, Health::Healthy)]);
    assert!(device(&recorder, "example.com/by-id", &by_id).attributes.is_empty(), "the path is left out, not cut");
    let id = format!("usb-0403-6001-{}-if00", "S".repeat(65));
    recorder.wait_for("example.com/ftdi", &[(&id, Health::Healthy)]);
    assert_eq!(
        device(&recorder, "example.com/ftdi", &id).attributes,
        strings(&[(attr::PATH, "/dev/ttyUSB0"), (attr::USB_VENDOR, "0403"), (attr::USB_PRODUCT, "6001")]),
        "the serial is left out, the rest published"
    );
    // Several rescans later, each warning was logged once.
    std::thread::sleep(Duration::from_millis(150));
    all_valid(&recorder);
    let warnings: Vec<String> =
        recorder.logs().into_iter().filter(|(level, _)| *level == LogLevel::Warn).map(|(_, m)| m).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.contains(&format!(
            "example.com/by-id: device {by_id}: attribute generic.devhost.io/path left out: \"/dev/serial/by-id/{long_name}\" is {} bytes, DRA allows 64",
            "/dev/serial/by-id/".len() + long_name.len()
        )),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w
            .starts_with(&format!("example.com/ftdi: device {id}: attribute generic.devhost.io/usbSerial left out: "))),
        "{warnings:?}"
    );
}

#[test]
fn real_dev_nodes_every_linux_machine_has() {
    let config = Config::parse(
        r#"{"group": [{"resource": "example.com/null", "paths": ["/dev/null", "/dev/zero"]},
                      {"resource": "example.com/fuse", "paths": ["/dev/fuse"]}]}"#,
    )
    .expect("valid");
    let recorder = Arc::new(Recorder::default());
    let (generic, _) = Generic::start(config, recorder.clone()).expect("start");
    recorder.wait_for("example.com/null", &[("null", Health::Healthy), ("zero", Health::Healthy)]);
    assert_eq!(device(&recorder, "example.com/null", "null").attributes, strings(&[(attr::PATH, "/dev/null")]));
    all_valid(&recorder);
    let answer = generic.answer("example.com/null", &["zero".into()]).expect("allocate");
    assert_eq!(
        answer.device_specs,
        [DeviceSpec { container_path: "/dev/zero".into(), host_path: "/dev/zero".into(), permissions: "rw".into() }]
    );
    if Path::new("/dev/fuse").exists() {
        recorder.wait_for("example.com/fuse", &[("fuse", Health::Healthy)]);
    } else {
        eprintln!("skipping the /dev/fuse check: this machine has no /dev/fuse");
    }
    // A real character device with no USB parent is not a USB device.
    assert_eq!(crate::scan::usb_info(Path::new("/sys"), Path::new("/dev/null")), None);
}
