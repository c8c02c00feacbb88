//! The CDI oracle: what a container really gets from one of devhost's
//! answers, computed by the CDI library containerd 2.2 and CRI-O use
//! (`tags.cncf.io/container-device-interface` v1.1.0, through the Go program
//! `tests/real-peers/cmd/cdi-inject`), next to what it should get from the
//! plain fields alone. A test builds an answer, asks [`inject`], and compares
//! the [`Container`]s: a name the runtime cannot resolve, a spec file that
//! conflicts with another or an env the library handles differently from
//! devhost's own reading then fails the test instead of a pod.
//!
//! Library facts the tests may rely on (checked against the library by
//! `tests/real-peers/cdi_inject_test.go`): one unresolvable name and nothing
//! of any name is applied; two spec files of one directory defining a name
//! make it unresolvable (and hide it from later directories too); a later
//! directory wins a name silently; a CDI env of a name the plain envs
//! already set is appended, so the last entry (the runtime's pick) wins.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use devhost::proto::v1beta1::{CdiDevice, ContainerAllocateResponse, DeviceSpec, Mount};
use serde::Deserialize;

use crate::harness::{Missing, repo, skip};

/// A device node in the container, with what its cgroup rules allow.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct DeviceNode {
    /// `'c'` (character) or `'b'` (block).
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    /// The union of the allow rules for the node's type and numbers, in
    /// `rwm` order; empty when nothing allows it.
    pub access: String,
}

/// A bind mount in the container.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct MountPoint {
    pub source: String,
    pub read_only: bool,
}

/// What one container gets, keyed by name or container path.
#[derive(Debug, PartialEq, Eq, Clone, Default)]
pub struct Container {
    pub env: BTreeMap<String, String>,
    pub devices: BTreeMap<String, DeviceNode>,
    pub mounts: BTreeMap<String, MountPoint>,
}

impl Container {
    /// What the container should get from an answer's plain fields (its
    /// CDI names ignored).
    pub fn from_plain(response: &ContainerAllocateResponse) -> Self {
        expected(&response.envs, &response.devices, &response.mounts)
    }
}

/// What a container should get from plain envs, device nodes and mounts,
/// as containerd builds it: each device node's type and numbers from the
/// host node itself (not following a link), its access the permissions
/// given (`rwm` when none).
pub fn expected<K: AsRef<str>, V: AsRef<str>>(
    envs: impl IntoIterator<Item = (K, V)>,
    devices: &[DeviceSpec],
    mounts: &[Mount],
) -> Container {
    let env = envs.into_iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())).collect();
    let devices = devices
        .iter()
        .map(|spec| {
            let meta = std::fs::symlink_metadata(&spec.host_path)
                .unwrap_or_else(|error| panic!("device {:?}: {error}", spec.host_path));
            let kind = match meta.file_type() {
                t if t.is_char_device() => 'c',
                t if t.is_block_device() => 'b',
                _ => panic!("device {:?}: not a device node", spec.host_path),
            };
            let access = if spec.permissions.is_empty() { "rwm" } else { &spec.permissions };
            let node = DeviceNode {
                kind,
                major: nix::sys::stat::major(meta.rdev()),
                minor: nix::sys::stat::minor(meta.rdev()),
                access: normalized(access),
            };
            (spec.container_path.clone(), node)
        })
        .collect();
    let mounts = mounts
        .iter()
        .map(|m| (m.container_path.clone(), MountPoint { source: m.host_path.clone(), read_only: m.read_only }))
        .collect();
    Container { env, devices, mounts }
}

/// Access letters as the oracle reports them: each once, `r`, `w`, `m`
/// first in that order, then any others as they came.
fn normalized(access: &str) -> String {
    let mut out: String = "rwm".chars().filter(|&c| access.contains(c)).collect();
    for c in access.chars() {
        if !out.contains(c) {
            out.push(c);
        }
    }
    out
}

/// The oracle's answer for one container.
#[derive(Debug, Clone)]
pub struct Injected {
    /// What the container gets (only the plain fields when injection failed,
    /// as the library applies all of the names or none).
    pub container: Container,
    /// Requested names no spec file defines (or that conflict).
    pub unresolved: Vec<String>,
    /// The injection error; empty when it worked.
    pub error: String,
    /// Every error of loading the spec directories (a file that does not
    /// parse or validate, two files defining one name), each once, sorted.
    pub spec_errors: Vec<String>,
    /// The spec file each requested name resolved to.
    pub defined_in: BTreeMap<String, PathBuf>,
}

impl Injected {
    /// The container, or a panic that says why the runtime would refuse it.
    pub fn container_or_panic(&self) -> &Container {
        if !self.error.is_empty() || !self.unresolved.is_empty() {
            panic!(
                "the runtime would refuse this container: {}\nunresolved: {:?}\nspec errors: {:#?}",
                self.error, self.unresolved, self.spec_errors
            );
        }
        &self.container
    }
}

/// What the runtime makes of a device plugin answer for one container (its
/// envs, device nodes, mounts and CDI names) with the CDI spec directories
/// `spec_dirs`, lowest priority first. `None` (and a setup skip) when the
/// oracle program has not been built.
pub fn inject(response: &ContainerAllocateResponse, spec_dirs: &[&Path]) -> Option<Injected> {
    let program = program()?;
    let input = serde_json::json!({
        "envs": response.envs,
        "devices": response.devices.iter().map(|d| serde_json::json!({
            "container_path": d.container_path, "host_path": d.host_path, "permissions": d.permissions,
        })).collect::<Vec<_>>(),
        "mounts": response.mounts.iter().map(|m| serde_json::json!({
            "container_path": m.container_path, "host_path": m.host_path, "read_only": m.read_only,
        })).collect::<Vec<_>>(),
        "cdi_devices": response.cdi_devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
    });
    let mut command = Command::new(&program);
    for dir in spec_dirs {
        command.arg("--spec-dir").arg(dir);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("run {}: {error}", program.display()));
    let mut stdin = child.stdin.take().expect("oracle stdin");
    stdin.write_all(input.to_string().as_bytes()).expect("write the oracle's input");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for the oracle");
    assert!(
        output.status.success(),
        "{} refused its input ({}): {}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Answer = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("the oracle's answer: {error}\n{}", String::from_utf8_lossy(&output.stdout)));
    Some(answer.into())
}

/// [`inject`] for CDI names alone: what a DRA driver's prepared claim gives
/// a container (the kubelet hands the runtime only the names).
pub fn inject_names(names: &[String], spec_dirs: &[&Path]) -> Option<Injected> {
    let response = ContainerAllocateResponse {
        cdi_devices: names.iter().map(|name| CdiDevice { name: name.clone() }).collect(),
        ..Default::default()
    };
    inject(&response, spec_dirs)
}

/// `$DEVHOST_CDI_INJECT`, else `cdi-inject` in the target directory (where
/// `scripts/test` builds it).
fn program() -> Option<PathBuf> {
    let program = std::env::var_os("DEVHOST_CDI_INJECT").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from).join("cdi-inject")
    });
    if program.is_file() {
        return Some(program);
    }
    skip(
        Missing::Setup,
        &format!(
            "the CDI oracle {} is missing: scripts/test builds it \
             (cd tests/real-peers && go build -o <target dir>/cdi-inject ./cmd/cdi-inject), or set DEVHOST_CDI_INJECT",
            program.display()
        ),
    );
    None
}

/// The program's JSON answer (`tests/real-peers/cmd/cdi-inject/main.go`).
#[derive(Deserialize)]
struct Answer {
    spec_errors: Vec<String>,
    unresolved: Vec<String>,
    error: String,
    /// `NAME=value` in the spec's order; a name may repeat.
    env: Vec<String>,
    devices: Vec<AnswerDevice>,
    mounts: Vec<AnswerMount>,
    devices_by_name: BTreeMap<String, PathBuf>,
}

#[derive(Deserialize)]
struct AnswerDevice {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    major: u64,
    minor: u64,
    access: String,
}

#[derive(Deserialize)]
struct AnswerMount {
    destination: String,
    source: String,
    options: Option<Vec<String>>,
}

impl From<Answer> for Injected {
    fn from(answer: Answer) -> Self {
        // Later entries win: runc and crun hand the process the last value
        // of a repeated name.
        let env = answer
            .env
            .iter()
            .map(|entry| entry.split_once('=').unwrap_or((entry, "")))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let devices = answer
            .devices
            .into_iter()
            .map(|d| {
                let kind = d.kind.chars().next().unwrap_or('?');
                (d.path, DeviceNode { kind, major: d.major, minor: d.minor, access: d.access })
            })
            .collect();
        let mounts = answer
            .mounts
            .into_iter()
            .map(|m| {
                let read_only = m.options.unwrap_or_default().iter().any(|o| o == "ro");
                (m.destination, MountPoint { source: m.source, read_only })
            })
            .collect();
        Injected {
            container: Container { env, devices, mounts },
            unresolved: answer.unresolved,
            error: answer.error,
            spec_errors: answer.spec_errors,
            defined_in: answer.devices_by_name,
        }
    }
}

/// The oracle's own tests: the Rust plumbing around the Go program (input,
/// answer, the expected container) on hand-written spec files. The library
/// facts themselves are checked in `tests/real-peers/cdi_inject_test.go`.
mod tests {
    use super::*;

    /// A CDI spec file of kind `example.com/dev` in `dir`.
    fn spec_file(dir: &Path, file: &str, devices: &str) -> PathBuf {
        let path = dir.join(file);
        let text = format!("cdiVersion: \"0.6.0\"\nkind: example.com/dev\ndevices:\n{devices}");
        std::fs::write(&path, text).expect("write spec file");
        path
    }

    fn rdev(path: &str) -> (u64, u64) {
        let meta = std::fs::metadata(path).expect("stat device");
        (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()))
    }

    #[test]
    fn a_plain_answer_and_a_cdi_device_give_the_container_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = spec_file(
            dir.path(),
            "dev.yaml",
            "- name: gpu-0\n  containerEdits:\n    env: [\"IDS=from-cdi\", \"CDI=1\"]\n    deviceNodes:\n    \
             - {path: /dev/cdi0, hostPath: /dev/zero, permissions: rw}\n    mounts:\n    \
             - {hostPath: /etc, containerPath: /cdi/etc, options: [ro, bind]}\n",
        );
        let response = ContainerAllocateResponse {
            envs: [("IDS".to_owned(), "gpu-0".to_owned())].into(),
            devices: vec![DeviceSpec {
                container_path: "/dev/gpu-0".into(),
                host_path: "/dev/null".into(),
                permissions: "wr".into(),
            }],
            mounts: vec![Mount { container_path: "/data".into(), host_path: "/tmp".into(), read_only: true }],
            cdi_devices: vec![CdiDevice { name: "example.com/dev=gpu-0".into() }],
            ..Default::default()
        };
        let Some(injected) = inject(&response, &[dir.path()]) else { return };

        let mut want = Container::from_plain(&response);
        let (null_major, null_minor) = rdev("/dev/null");
        assert_eq!(
            want.devices["/dev/gpu-0"],
            DeviceNode { kind: 'c', major: null_major, minor: null_minor, access: "rw".into() }
        );
        let (major, minor) = rdev("/dev/zero");
        want.devices.insert("/dev/cdi0".into(), DeviceNode { kind: 'c', major, minor, access: "rw".into() });
        want.env.insert("IDS".into(), "from-cdi".into());
        want.env.insert("CDI".into(), "1".into());
        want.mounts.insert("/cdi/etc".into(), MountPoint { source: "/etc".into(), read_only: true });
        assert_eq!(injected.container_or_panic(), &want);
        assert_eq!(injected.defined_in, BTreeMap::from([("example.com/dev=gpu-0".to_owned(), file)]));
        assert!(injected.spec_errors.is_empty(), "{:?}", injected.spec_errors);
    }

    #[test]
    fn two_files_of_one_dir_defining_a_name_leave_it_unresolved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let device = "- name: gpu-0\n  containerEdits:\n    env: [\"A=1\"]\n";
        spec_file(dir.path(), "a.yaml", device);
        spec_file(dir.path(), "b.yaml", device);
        let name = "example.com/dev=gpu-0".to_owned();
        let Some(injected) = inject_names(std::slice::from_ref(&name), &[dir.path()]) else { return };

        assert_eq!(injected.unresolved, [name]);
        assert!(injected.error.contains("unresolvable"), "{}", injected.error);
        assert!(injected.spec_errors.iter().any(|e| e.contains("conflicting device")), "{:?}", injected.spec_errors);
        assert!(injected.defined_in.is_empty());
        assert_eq!(injected.container, Container::default());
        let refused = std::panic::catch_unwind(|| injected.container_or_panic().clone());
        assert!(refused.is_err(), "container_or_panic accepted a refused container");
    }
}

/// Asserts that the runtime, given `response` with the CDI directories
/// `spec_dirs`, gives the container exactly `expected` (`what` names the
/// answer in the failure). Nothing is checked (a setup skip) without the
/// oracle program.
pub fn assert_gives(what: &str, response: &ContainerAllocateResponse, spec_dirs: &[&Path], expected: &Container) {
    let Some(injected) = inject(response, spec_dirs) else { return };
    let container = injected.container_or_panic();
    assert_eq!(
        container, expected,
        "{what}: the runtime gives the container something else than the answer says\nanswer: {response:?}"
    );
}

/// A CDI spec as a vendor ships it: `kind`, devices with their
/// `containerEdits` (as JSON), and spec-wide edits, written to `dir/file`
/// (`.json`; the CDI library reads YAML too, and JSON is YAML).
pub fn write_vendor_spec(
    dir: &Path,
    file: &str,
    kind: &str,
    devices: &[(&str, serde_json::Value)],
    spec_edits: serde_json::Value,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("CDI dir");
    let devices: Vec<serde_json::Value> =
        devices.iter().map(|(name, edits)| serde_json::json!({"name": name, "containerEdits": edits})).collect();
    let mut spec = serde_json::json!({"cdiVersion": "0.6.0", "kind": kind, "devices": devices});
    if !spec_edits.is_null() {
        spec["containerEdits"] = spec_edits;
    }
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).expect("JSON")).expect("write the vendor's spec");
    path
}

/// A node's host config with CDI specs in `<node>/cdi`, the only directory
/// the runtime reads, and a vendor's spec there defining `names` (each a
/// device node `/dev/vendor-<n>` from `/dev/zero`, `rw`), as a vendor ships one
/// beside a backend that answers with its own CDI names. Returns the CDI
/// directory.
pub fn vendor_cdi(node: &crate::harness::Node, kind: &str, devices: &[&str]) -> PathBuf {
    let cdi = node.dir.path().join("cdi");
    std::fs::write(
        node.config_file(),
        format!("metrics_address = \"127.0.0.1:0\"\ncdi_dir = {:?}\ncdi_spec_dirs = []\n", cdi.display().to_string()),
    )
    .expect("host config");
    let edits: Vec<(&str, serde_json::Value)> = devices
        .iter()
        .map(|device| {
            (*device, serde_json::json!({"deviceNodes": [{"path": format!("/dev/vendor-{device}"), "hostPath": "/dev/zero", "permissions": "rw"}]}))
        })
        .collect();
    write_vendor_spec(&cdi, &format!("vendor-{}.json", kind.replace('/', "_")), kind, &edits, serde_json::Value::Null);
    cdi
}

/// What the vendor's spec of [`vendor_cdi`] adds to a container for `devices`.
pub fn with_vendor_nodes(mut container: Container, devices: &[&str]) -> Container {
    let zero = std::fs::metadata("/dev/zero").expect("/dev/zero");
    for device in devices {
        container.devices.insert(
            format!("/dev/vendor-{device}"),
            DeviceNode {
                kind: 'c',
                major: nix::sys::stat::major(zero.rdev()),
                minor: nix::sys::stat::minor(zero.rdev()),
                access: "rw".into(),
            },
        );
    }
    container
}
