//! The generic backend (`backends/generic`) through the real binary and the
//! fake kubelet: USB serial adapters and grouped nodes in fixture trees
//! (hot-plug reaching ListAndWatch, Allocate answers), this machine's real
//! `/dev` nodes, sharing through the host's `replicas`, the example
//! config directory `examples/config-generic/`, and the devices'
//! attributes as devhost lists them (so the host's own DRA rules accept
//! them).

use std::path::{Path, PathBuf};

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1;

use crate::harness::{Devhost, Node, WAIT};
use crate::native_loader::rust_module;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn module(node: &Node) -> PathBuf {
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    rust_module("devhost_generic", &modules)
}

fn backend_file(module: &Path, extra: &str, config: &str) -> String {
    format!(
        "[backend]\nmodule = {:?}\ncall_timeout_ms = 5000\n{extra}\n[config]\n{config}\n",
        module.display().to_string()
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, format!("{text}\n")).expect("write");
}

/// A USB serial adapter as the kernel lays it out (see the unit tests of
/// `backends/generic`): `/dev/<tty>` and `class/tty/<tty>` →
/// `devices/.../usb1/<port>/<port>:1.0/<tty>/tty/<tty>`.
fn usb_serial(root: &Path, tty: &str, port: &str, vendor: &str, product: &str, serial: &str) {
    let sys = root.join("sys");
    let usb = sys.join("devices/pci0000:00/0000:00:14.0/usb1").join(port);
    write(&usb.join("idVendor"), vendor);
    write(&usb.join("idProduct"), product);
    write(&usb.join("serial"), serial);
    let interface = usb.join(format!("{port}:1.0"));
    write(&interface.join("bInterfaceNumber"), "00");
    let node = interface.join(tty).join("tty").join(tty);
    write(&node.join("dev"), "188:0");
    std::fs::create_dir_all(sys.join("class/tty")).expect("class dir");
    std::os::unix::fs::symlink(&node, sys.join("class/tty").join(tty)).expect("class link");
    write(&root.join("dev").join(tty), "");
}

fn specs(answer: &v1beta1::AllocateResponse) -> Vec<(String, String, String)> {
    answer.container_responses[0]
        .devices
        .iter()
        .map(|d| (d.container_path.clone(), d.host_path.clone(), d.permissions.clone()))
        .collect()
}

async fn health_of(kubelet: &FakeKubelet, resource: &str, expected: &[(&str, &str)]) {
    let expected: Vec<(String, String)> = expected.iter().map(|(i, h)| (i.to_string(), h.to_string())).collect();
    kubelet
        .wait_for_devices(resource, WAIT, |d| {
            let mut got: Vec<(String, String)> = d.iter().map(|d| (d.id.clone(), d.health.clone())).collect();
            got.sort();
            got == expected
        })
        .await
        .unwrap_or_else(|e| panic!("{resource}: never {expected:?}: {e}"));
}

#[tokio::test]
async fn usb_serial_and_grouped_nodes_hot_plug_through_the_binary() {
    let node = Node::new();
    let root = node.dir.path().join("root");
    usb_serial(&root, "ttyUSB0", "1-1", "0403", "6001", "FT1");
    usb_serial(&root, "ttyUSB1", "1-2", "10c4", "ea60", "CP1");
    for path in ["dev/snd/controlC0", "dev/snd/pcmC0D0p"] {
        write(&root.join(path), "");
    }
    let config = format!(
        "dev_root = {root:?}\nsysfs_root = {sys:?}\nrescan_interval_ms = 50\nremoval_grace_ms = 1500\n\
         [[config.group]]\nresource = \"example.com/ftdi\"\npaths = [\"/dev/ttyUSB*\"]\nusb = [{{ vendor = \"0403\", product = \"6001\" }}]\npermissions = \"rwm\"\n\
         mounts = [{{ host_path = \"/run/udev\", container_path = \"/run/udev\" }}]\n\
         [[config.group]]\nresource = \"example.com/serial\"\npaths = [\"/dev/ttyUSB*\"]\n\
         [[config.group]]\nresource = \"example.com/sound\"\npaths = [\"/dev/snd/*\"]\ngrouping = \"all\"\n",
        root = root.display().to_string(),
        sys = root.join("sys").display().to_string()
    );
    node.backend("generic", &backend_file(&module(&node), "", &config));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    for resource in ["example.com/ftdi", "example.com/serial", "example.com/sound"] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
    }
    health_of(&kubelet, "example.com/ftdi", &[("usb-0403-6001-FT1-if00", "Healthy")]).await;
    health_of(&kubelet, "example.com/serial", &[("ttyUSB0", "Healthy"), ("ttyUSB1", "Healthy")]).await;
    health_of(&kubelet, "example.com/sound", &[("sound", "Healthy")]).await;

    let answer = kubelet.allocate("example.com/ftdi", &["usb-0403-6001-FT1-if00"]).await.expect("allocate");
    let tty0 = root.join("dev/ttyUSB0").display().to_string();
    assert_eq!(specs(&answer), [("/dev/ttyUSB0".into(), tty0, "rwm".into())]);
    let mounts: Vec<(&str, &str, bool)> = answer.container_responses[0]
        .mounts
        .iter()
        .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
        .collect();
    assert_eq!(mounts, [("/run/udev", "/run/udev", true)]);
    let answer = kubelet.allocate("example.com/sound", &["sound"]).await.expect("allocate");
    let paths: Vec<String> = specs(&answer).into_iter().map(|s| s.0).collect();
    assert_eq!(paths, ["/dev/snd/controlC0", "/dev/snd/pcmC0D0p"]);
    let answer = kubelet.allocate("example.com/serial", &["ttyUSB1"]).await.expect("allocate");
    assert_eq!(specs(&answer).len(), 1, "exactly the requested device");

    // Hot-plug: a second FTDI adapter appears, the first is unplugged.
    usb_serial(&root, "ttyUSB2", "1-3", "0403", "6001", "FT2");
    health_of(
        &kubelet,
        "example.com/ftdi",
        &[("usb-0403-6001-FT1-if00", "Healthy"), ("usb-0403-6001-FT2-if00", "Healthy")],
    )
    .await;
    std::fs::remove_file(root.join("dev/ttyUSB0")).expect("unplug");
    health_of(
        &kubelet,
        "example.com/ftdi",
        &[("usb-0403-6001-FT1-if00", "Unhealthy"), ("usb-0403-6001-FT2-if00", "Healthy")],
    )
    .await;
    // Dropped once the removal grace has passed.
    health_of(&kubelet, "example.com/ftdi", &[("usb-0403-6001-FT2-if00", "Healthy")]).await;
}

#[tokio::test]
async fn real_dev_nodes_serve_with_host_replicas() {
    let node = Node::new();
    let mut config = String::from("rescan_interval_ms = 200\n");
    let mut present = Vec::new();
    for (resource, path, id) in [
        ("example.com/null", "/dev/null", "null"),
        ("example.com/fuse", "/dev/fuse", "fuse"),
        ("example.com/tun", "/dev/net/tun", "net-tun"),
        ("example.com/kvm", "/dev/kvm", "kvm"),
    ] {
        if !Path::new(path).exists() {
            crate::harness::skip(crate::harness::Missing::Machine, &format!("this machine has no {path}"));
            continue;
        }
        config += &format!("[[config.group]]\nresource = {resource:?}\npaths = [{path:?}]\n");
        present.push((resource, path, id));
    }
    let extra = "[resources.\"example.com/null\"]\nreplicas = 3\n";
    node.backend("generic", &backend_file(&module(&node), extra, &config));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = node.start_devhost();
    for (resource, path, id) in present {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
        if resource == "example.com/null" {
            health_of(&kubelet, resource, &[("null::0", "Healthy"), ("null::1", "Healthy"), ("null::2", "Healthy")])
                .await;
            let answer = kubelet.allocate(resource, &["null::2"]).await.expect("a replica maps back to /dev/null");
            assert_eq!(specs(&answer), [(path.into(), path.into(), "rw".into())]);
            continue;
        }
        health_of(&kubelet, resource, &[(id, "Healthy")]).await;
        let answer = kubelet.allocate(resource, &[id]).await.expect("allocate");
        assert_eq!(specs(&answer), [(path.into(), path.into(), "rw".into())], "{resource}");
    }
}

#[tokio::test]
async fn the_example_config_directory_serves() {
    let node = Node::new();
    let example = repo().join("examples/config-generic");
    let host = std::fs::read_to_string(example.join("devhost.toml")).expect("example devhost.toml");
    let host = host.replace("metrics_address = \"127.0.0.1:9477\"", "metrics_address = \"127.0.0.1:0\"");
    assert!(host.contains("127.0.0.1:0"), "the example's metrics address line changed");
    std::fs::write(node.config_file(), host).expect("devhost.toml");
    let backend = std::fs::read_to_string(example.join("backends.d/generic.toml")).expect("example backend file");
    let installed = "\"/usr/lib/devhost/backends/libdevhost_generic.so\"";
    assert!(backend.contains(installed), "the example's module line changed");
    let module = format!("{:?}", module(&node).display().to_string());
    node.backend("generic", &backend.replace(installed, &module));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let _devhost = Devhost::start(&node.config_file(), &node.plugin_dir(), &node.dir.path().join("devhost.log"));

    kubelet.wait_for_registrations("devhost.example.com/null", 1, WAIT).await.expect("registered");
    health_of(
        &kubelet,
        "devhost.example.com/null",
        &[("null::0", "Healthy"), ("null::1", "Healthy"), ("zero::0", "Healthy"), ("zero::1", "Healthy")],
    )
    .await;
    let answer = kubelet.allocate("devhost.example.com/null", &["zero::1"]).await.expect("allocate");
    assert_eq!(specs(&answer), [("/dev/zero".into(), "/dev/zero".into(), "rw".into())]);
    for (resource, path, id) in
        [("devhost.example.com/fuse", "/dev/fuse", "fuse"), ("devhost.example.com/tun", "/dev/net/tun", "net-tun")]
    {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
        if !Path::new(path).exists() {
            crate::harness::skip(
                crate::harness::Missing::Machine,
                &format!("the {path} allocation: this machine has no {path}"),
            );
            continue;
        }
        health_of(&kubelet, resource, &[(id, "Healthy")]).await;
        kubelet.allocate(resource, &[id]).await.expect("allocate");
    }
}

#[test]
fn attributes_reach_devhost_list_and_over_long_values_are_left_out() {
    let node = Node::new();
    let root = node.dir.path().join("root");
    usb_serial(&root, "ttyUSB0", "1-1", "0403", "6001", "A50285BI");
    let long = format!("usb-FTDI_FT232R_USB_UART_{}-if00-port0", "A".repeat(40));
    write(&root.join("dev/serial/by-id").join(&long), "");
    let config = format!(
        "dev_root = {:?}\nsysfs_root = {:?}\n\n[[config.group]]\nresource = \"example.com/ftdi\"\npaths = [\"/dev/ttyUSB*\"]\n\
         usb = [{{ vendor = \"0403\" }}]\n\n[[config.group]]\nresource = \"example.com/by-id\"\npaths = [\"/dev/serial/by-id/*\"]\n",
        root.display().to_string(),
        root.join("sys").display().to_string()
    );
    node.backend("generic", &backend_file(&module(&node), "", &config));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["list", "--json", "--config"])
        .arg(node.dir.path().join("config"))
        .output()
        .expect("run devhost list");
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("devhost list --json printed no JSON ({error}): {}", String::from_utf8_lossy(&output.stderr))
    });
    let backend = &listed[0];
    // The host checks every publish against DRA's rules and refuses the
    // whole list otherwise: no error means all were accepted.
    assert_eq!(backend["error"], serde_json::Value::Null, "{backend}");
    let resource = |name: &str| {
        backend["resources"].as_array().expect("resources").iter().find(|r| r["name"] == name).expect("listed").clone()
    };
    assert_eq!(
        resource("example.com/ftdi")["devices"][0],
        serde_json::json!({
            "id": "usb-0403-6001-A50285BI-if00",
            "health": "Healthy",
            "numa_nodes": [],
            "attributes": {
                "generic.devhost.io/path": {"string": "/dev/ttyUSB0"},
                "generic.devhost.io/usbVendor": {"string": "0403"},
                "generic.devhost.io/usbProduct": {"string": "6001"},
                "generic.devhost.io/usbSerial": {"string": "A50285BI"},
            },
        })
    );
    let by_id = &resource("example.com/by-id")["devices"][0];
    assert_eq!(by_id["id"], format!("serial-by-id-{long}"));
    assert!(
        by_id["attributes"].as_object().is_none_or(|a| a.is_empty()),
        "a path past 64 bytes is left out, and the device still listed: {by_id}"
    );
}
