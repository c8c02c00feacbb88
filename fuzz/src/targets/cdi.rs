//! The CDI spec writer of resources served with `cdi = true`
//! (`host/src/cdi/`), through its public API only: `check_names`,
//! `device_name`, `spec_path`, `cdi::resource::maintain` (the task that
//! keeps a resource's spec file current from what its backend's
//! single-device `allocate` answers for each device, and removes it at the
//! end) and, for the answers that follow, `cdi::answer::Answers`.
//!
//! Each input either checks names and paths (cheap), or runs `maintain`
//! for one resource of a backend written here whose per-device Allocate
//! answers (envs, device nodes, mounts, refusals) and device lists (one to
//! three, published in turn) come from the input; sometimes a vendor's
//! spec file, also from the input, is in the CDI directories first, and
//! sometimes the backend's answer changes after devhost learned it.
//!
//! Invariants:
//! * `check_names` agrees with a literal transcription of the CDI
//!   project's own rules (`container-device-interface` 1.1.1,
//!   `src/parser.rs`: `parse_qualifier`, `validate_vendor_or_class_name`,
//!   `validate_device_name`), except that a vendor or class of one
//!   character is refused too (the Go library v1.1 that containerd uses
//!   panics on one while loading a spec), and its errors name the value;
//!   the name of an accepted device parses back (CDI's
//!   `parse_qualified_name`) into the resource's vendor and class and the
//!   device.
//! * `spec_path` is a file directly in the directory, `devhost-….json`, of
//!   safe characters only.
//! * The spec file holds exactly `cdiVersion` `0.6.0`, `kind` = the
//!   resource, `annotations` `devhost.io/writer` (the instance ID given to
//!   `Host::new`) and `devhost.io/started` (its start, decimal nanoseconds
//!   since 1970), and one device per current ID, in list order, that is a
//!   valid CDI device name of a valid kind, whose single-device Allocate
//!   succeeded with at least one device node or mount, that CDI's
//!   validation accepts (node paths non-empty, permissions of `r`, `w`,
//!   `m`, mount paths non-empty; no env name with `=` in the answer) and
//!   that no other spec file in the CDI directories names (devhost's or
//!   one of lower priority); each device with
//!   `annotations` `devhost.io/instance` (the instance ID) and
//!   `containerEdits` of only its `deviceNodes` and `rbind` `mounts` with
//!   `ro`/`rw`, never `env` (variables stay in Allocate's plain fields).
//!   With no such device there is no file (CDI refuses an empty spec).
//! * No device is withheld: the snapshot's withheld set stays empty and
//!   every device stays Healthy to the kubelet.
//! * Answers (`Answers::container`, for each device alone and for all of
//!   a list's devices together, with the answers devhost learned or,
//!   sometimes, ones the backend changed since) keep variables and
//!   annotations plain, and are either plain (no devhost CDI name, nodes
//!   and mounts as the backend answered; always so for a device left out
//!   of the spec) or name exactly the devices in the spec, whose entries
//!   plus what stays plain give the container what the backend's answer
//!   says (CDI replacing a node or mount at the same container path; of
//!   an answer's two nodes or mounts at one path, either will do);
//!   devices in the spec are named when their entries give exactly what
//!   the answer says (an unchanged answer, every node with a host path).
//! * A vendor's spec file is left as it was; devhost's file is removed when
//!   `maintain` stops (it is the only instance serving it), 255-byte
//!   names included (F8).
//!
//! Findings (fixed, see `fuzz/README.md`), checked always: F2, every spec
//! written passes the CDI project's own validation (`Spec::validate`: at
//! least one device, no device with empty edits, env names non-empty and
//! without `=`, device node and mount paths non-empty, permissions of `r`,
//! `w`, `m`; annotation keys qualified names, which need `cdiVersion`
//! 0.6.0 or later), and a device that would break it is left out and
//! answered plainly; F3, `spec_path` gives different resources different
//! files and a file name the kernel accepts (at most 255 bytes); F8, the
//! spec file of a resource with a 255-byte file name is removed when
//! `maintain` stops too (its lock file's name was one byte too long).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arbitrary::{Result as AResult, Unstructured};
use devhost::backend::handle::BackendHandle;
use devhost::backend::{Allocation, Backend, BackendError, DeviceSpec, Health, Mount, Publisher, ResourceSpec};
use devhost::cdi::answer::Answers;
use devhost::cdi::resource::maintain;
use devhost::cdi::{Host, check_names, device_name, spec_path};
use devhost::device_state::ResourceState;
use devhost::model::Device;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Target;

/// The target: a runtime and a scratch directory for spec files.
pub struct Cdi {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    serial: u64,
}

impl Cdi {
    /// Starts the runtime and creates the scratch directory.
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-cdi-").tempdir().map_err(|e| e.to_string())?;
        Ok(Cdi { runtime, dir, serial: 0 })
    }
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(Cdi::new, data);
}

/// Pieces names are built from: the edges of both rule sets (`e/gpu` and
/// `a.io/x` have a one-character vendor or class).
const PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    "9",
    "-",
    "_",
    ".",
    ":",
    "/",
    "=",
    "example.com",
    "gpu",
    "nvidia.com/gpu",
    "é",
    " ",
    "\0",
    "-x",
    "e/gpu",
    "a.io/x",
];

/// Resources served with `cdi = true`: valid resource names, all valid CDI
/// kinds but `a.io/x`, whose one-letter class CDI cannot load (the
/// configuration refuses it with `cdi = true`; `maintain` must still write
/// no file for it), and two so long that their spec file names are 255
/// bytes, the most the kernel allows (one cut with a hash, one not).
static RESOURCES: LazyLock<Vec<String>> = LazyLock::new(|| {
    // 235 characters; a resource's domain may have 244.
    let domain = format!("{}.{}.{}.{}.example.com", "a".repeat(60), "b".repeat(60), "c".repeat(60), "d".repeat(40));
    let mut names: Vec<String> =
        ["example.com/gpu", "vendor.example.org/Shared_GPU.v2", "a.io/x", "fuzz.example.com/cdi"]
            .map(String::from)
            .into();
    names.push(format!("{domain}/{}", "g".repeat(63)));
    names.push(format!("{domain}/gpu-xy"));
    names
});

/// Device IDs: valid CDI device names and some that are not.
const IDS: &[&str] =
    &["gpu-0", "gpu-1", "GPU:0", "a.b_c", "0", "mig-1g.5gb:3", "-x", "x-", "a/b", "a=b", "é", "a b", "x::0"];

/// Backend names (file stems).
const BACKENDS: &[&str] = &["gpu", "fuzz", "a-b", "nvidia gpu", "x.y"];

/// devhost instance IDs (the suffix of its sockets; odd ones too).
const INSTANCES: &[&str] = &["devhost-4f2a9c", "a", "x y/é", "-"];

/// Env names, device and mount paths, permissions.
const KEYS: &[&str] = &["NVIDIA_VISIBLE_DEVICES", "A", "", "A=B", "é", "PATH"];
const PATHS: &[&str] = &["/dev/null", "/dev/nvidia0", "", "relative", "/a b"];
const PERMISSIONS: &[&str] = &["rw", "rwm", "r", "m", "", "q", "rwx"];

/// The annotations devhost's spec carries.
const WRITER: &str = "devhost.io/writer";
const STARTED: &str = "devhost.io/started";
const INSTANCE: &str = "devhost.io/instance";

impl Target for Cdi {
    fn name(&self) -> &'static str {
        "cdi"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![b"\0example.com/gpu\0GPU-0".to_vec(), vec![1, 0, 1, 2, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0]]
    }

    fn dictionary(&self) -> &'static [&'static str] {
        PIECES
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        if u.arbitrary::<bool>().unwrap_or(false) {
            self.serial += 1;
            let dir = self.dir.path().join(self.serial.to_string());
            let result = self.runtime.block_on(spec_file(&dir, &mut u));
            let _ = std::fs::remove_dir_all(&dir);
            result
        } else {
            names(&mut u)?;
            paths(&mut u)
        }
    }
}

/// A name from pieces, runs and arbitrary characters.
fn name(u: &mut Unstructured<'_>) -> String {
    let mut text = String::new();
    for _ in 0..u.int_in_range(0..=8usize).unwrap_or(0) {
        match u.int_in_range(0..=2u8).unwrap_or(0) {
            0 => text.push_str(u.choose(PIECES).copied().unwrap_or("a")),
            1 => {
                let c = *u.choose(&['a', 'B', '7', '-', '.']).unwrap_or(&'a');
                text.extend(std::iter::repeat_n(c, u.int_in_range(1..=40).unwrap_or(1)));
            }
            _ => text.push(u.arbitrary::<char>().unwrap_or('x')),
        }
    }
    text
}

/// `check_names` against the CDI project's rules.
fn names(u: &mut Unstructured<'_>) -> Result<(), String> {
    let resource = name(u);
    let device = name(u);
    let kind_ok = reference::kind_ok(&resource);
    let device_ok = reference::device_ok(&device);
    let kind_only = check_names(&resource, None);
    if kind_only.is_ok() != kind_ok {
        return Err(format!("check_names({resource:?}, None) = {kind_only:?}, CDI's rules say valid = {kind_ok}"));
    }
    let both = check_names(&resource, Some(&device));
    if both.is_ok() != (kind_ok && device_ok) {
        return Err(format!(
            "check_names({resource:?}, {device:?}) = {both:?}, CDI's rules say kind {kind_ok}, device {device_ok}"
        ));
    }
    match both {
        Err(message) if !message.contains(&format!("{resource:?}")) && !message.contains(&format!("{device:?}")) => {
            Err(format!("the error {message:?} names neither {resource:?} nor {device:?}"))
        }
        Err(_) => Ok(()),
        Ok(()) => {
            let qualified = device_name(&resource, &device);
            let (vendor, class) = resource.split_once('/').unwrap_or_default();
            match reference::parse_qualified_name(&qualified) {
                Some(parts) if parts == (vendor, class, device.as_str()) => Ok(()),
                other => Err(format!("{qualified:?} parses as {other:?}")),
            }
        }
    }
}

/// A backend file stem: not empty, no `/` or NUL, not `.` or `..`.
fn backend_name(u: &mut Unstructured<'_>) -> String {
    let mut text =
        if u.arbitrary().unwrap_or(false) { name(u) } else { (*u.choose(BACKENDS).unwrap_or(&"gpu")).into() };
    text.retain(|c| c != '/' && c != '\0');
    if text.is_empty() || text == "." || text == ".." {
        text.insert(0, 'b');
    }
    text
}

/// A valid resource name, or `None`.
fn resource_name(u: &mut Unstructured<'_>) -> Option<String> {
    let text = if u.arbitrary().unwrap_or(false) { name(u) } else { u.choose(&RESOURCES).ok()?.clone() };
    devhost::resource_name::validate(&text).is_ok().then_some(text)
}

/// `spec_path` on input-chosen names.
fn paths(u: &mut Unstructured<'_>) -> Result<(), String> {
    let dir = Path::new("/var/run/cdi");
    let first = (backend_name(u), resource_name(u));
    let second = (backend_name(u), resource_name(u));
    let mut made = Vec::new();
    for (backend, resource) in [&first, &second] {
        let Some(resource) = resource else { continue };
        let path = spec_path(dir, resource);
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if path.parent() != Some(dir) || !file.starts_with("devhost-") || !file.ends_with(".json") {
            return Err(format!("spec_path({backend:?}, {resource:?}) = {}", path.display()));
        }
        if !file.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
            return Err(format!("spec_path({backend:?}, {resource:?}) = {file:?}: unsafe characters"));
        }
        if crate::strict("F3") && file.len() > 255 {
            return Err(format!(
                "F3: spec_path({backend:?}, {resource:?}) is a {}-byte file name (the kernel allows 255)",
                file.len()
            ));
        }
        made.push((backend, resource, path));
    }
    if let [(b1, r1, p1), (b2, r2, p2)] = made.as_slice()
        && r1 != r2
        && p1 == p2
        && crate::strict("F3")
    {
        return Err(format!(
            "F3: backend {b1:?} resource {r1:?} and backend {b2:?} resource {r2:?} share the spec file {}",
            p1.display()
        ));
    }
    Ok(())
}

/// The Allocate answer (or refusal) per device ID.
type Script = HashMap<String, Result<Allocation, String>>;

/// A backend serving one resource, whose Allocate answer per device ID is
/// chosen by the input.
struct Scripted {
    resource: String,
    answers: Script,
}

impl Backend for Scripted {
    fn init(&self, _publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        Ok(vec![ResourceSpec::new(self.resource.clone())])
    }

    fn allocate(&self, _resource: &str, device_ids: &[String]) -> Result<Allocation, BackendError> {
        match device_ids {
            [id] => self.answers.get(id).cloned().unwrap_or_else(|| Err(format!("unknown {id}"))),
            _ => Err(format!("expected one ID, got {device_ids:?}")),
        }
        .map_err(BackendError::new)
    }
}

fn choose_str(u: &mut Unstructured<'_>, from: &[&str]) -> AResult<String> {
    if crate::rarely(u, 5) { u.arbitrary() } else { Ok((*u.choose(from)?).to_owned()) }
}

fn allocation(u: &mut Unstructured<'_>) -> AResult<Allocation> {
    let mut answer = Allocation::default();
    for _ in 0..u.int_in_range(0..=2)? {
        answer.envs.insert(choose_str(u, KEYS)?, choose_str(u, IDS)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        answer.device_specs.push(DeviceSpec {
            container_path: choose_str(u, PATHS)?,
            host_path: choose_str(u, PATHS)?,
            permissions: choose_str(u, PERMISSIONS)?,
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        answer.mounts.push(Mount {
            container_path: choose_str(u, PATHS)?,
            host_path: choose_str(u, PATHS)?,
            read_only: u.arbitrary()?,
        });
    }
    if u.arbitrary()? {
        answer.annotations.insert("a.io/x".into(), choose_str(u, IDS)?);
    }
    if u.arbitrary()? {
        // A backend's own CDI name that no spec defines: never passed on.
        answer.cdi_devices.push("other.io/x=y".into());
    }
    Ok(answer)
}

/// The device lists to publish in turn (unique, non-empty IDs each).
fn lists(u: &mut Unstructured<'_>) -> Vec<Vec<String>> {
    (0..u.int_in_range(1..=3).unwrap_or(1))
        .map(|_| {
            let mut ids: Vec<String> = Vec::new();
            for _ in 0..u.int_in_range(0..=5).unwrap_or(0) {
                let id = choose_str(u, IDS).unwrap_or_default();
                if !id.is_empty() && !ids.contains(&id) {
                    ids.push(id);
                }
            }
            ids
        })
        .collect()
}

/// An answer like `answer` with one thing changed: what a backend whose
/// answers change may hand Allocate after devhost learned the entry.
fn changed(u: &mut Unstructured<'_>, answer: &Allocation) -> AResult<Allocation> {
    let mut answer = answer.clone();
    let nodes = answer.device_specs.len();
    let mounts = answer.mounts.len();
    match u.int_in_range(0..=6u8)? {
        0 if nodes > 0 => {
            answer.device_specs.remove(u.choose_index(nodes)?);
        }
        1 if mounts > 0 => {
            answer.mounts.remove(u.choose_index(mounts)?);
        }
        2 if nodes > 0 => {
            let i = u.choose_index(nodes)?;
            answer.device_specs[i].host_path = choose_str(u, PATHS)?;
        }
        3 if nodes > 0 => {
            let i = u.choose_index(nodes)?;
            answer.device_specs[i].permissions = choose_str(u, PERMISSIONS)?;
        }
        4 if mounts > 0 => {
            let i = u.choose_index(mounts)?;
            answer.mounts[i].read_only = !answer.mounts[i].read_only;
        }
        5 if nodes > 0 => {
            // Another node at the same container path.
            let mut node = answer.device_specs[u.choose_index(nodes)?].clone();
            node.host_path = choose_str(u, PATHS)?;
            let at = u.int_in_range(0..=nodes)?;
            answer.device_specs.insert(at, node);
        }
        _ => answer.device_specs.push(DeviceSpec {
            container_path: choose_str(u, PATHS)?,
            host_path: choose_str(u, PATHS)?,
            permissions: choose_str(u, PERMISSIONS)?,
        }),
    }
    Ok(answer)
}

/// A vendor's spec file, in devhost's directory or in one of lower
/// priority (`etc/` beside devhost's files: as `/etc/cdi` is to
/// `/var/run/cdi`) before `maintain` starts.
struct Vendor {
    /// Its file name (a `.txt` is no spec).
    file: &'static str,
    /// Whether it is in the directory of lower priority.
    lower: bool,
    version: &'static str,
    kind: String,
    devices: Vec<String>,
}

impl Vendor {
    /// Sometimes a vendor's file naming some of the IDs the lists hold
    /// (and maybe one of its own), of the resource's kind or another.
    fn arbitrary(u: &mut Unstructured<'_>, resource: &str, lists: &[Vec<String>]) -> Option<Vendor> {
        if !crate::rarely(u, 3) {
            return None;
        }
        let file = *u.choose(&["vendor.json", "vendor.yaml", "zz-vendor.json", "vendor.txt"]).ok()?;
        let version = *u.choose(&["0.6.0", "0.5.0", "9.9.9"]).ok()?;
        let kind = if crate::rarely(u, 4) { "other.example.com/gpu".to_owned() } else { resource.to_owned() };
        let mut devices: Vec<String> = Vec::new();
        for id in lists.iter().flatten() {
            if !devices.contains(id) && u.arbitrary().unwrap_or(false) {
                devices.push(id.clone());
            }
        }
        if u.arbitrary().unwrap_or(false) {
            devices.push("vendor-only".into());
        }
        let lower = u.arbitrary().unwrap_or(false);
        Some(Vendor { file, lower, version, kind, devices })
    }

    /// Where it is, `dir` being devhost's directory.
    fn path(&self, dir: &Path) -> std::path::PathBuf {
        if self.lower { lower_dir(dir).join(self.file) } else { dir.join(self.file) }
    }

    fn text(&self) -> String {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| json!({ "name": d, "containerEdits": { "deviceNodes": [{ "path": "/dev/vendor" }] } }))
            .collect();
        let spec = json!({ "cdiVersion": self.version, "kind": self.kind, "devices": devices });
        serde_json::to_string_pretty(&spec).unwrap_or_default()
    }

    /// The qualified names the file defines for a runtime: all of its
    /// devices if the CDI library loads it, none otherwise.
    fn defines(&self) -> BTreeSet<String> {
        let loads = (self.file.ends_with(".json") || self.file.ends_with(".yaml"))
            && ["0.5.0", "0.6.0"].contains(&self.version)
            && reference::kind_ok(&self.kind)
            && !self.devices.is_empty()
            && self.devices.iter().all(|d| reference::device_ok(d));
        if !loads {
            return BTreeSet::new();
        }
        self.devices.iter().map(|d| format!("{}={d}", self.kind)).collect()
    }
}

/// The file `maintain` must write for `ids` (with no device in it, CDI
/// would refuse it: then there must be no file).
fn expected(resource: &str, host: &Host, ids: &[String], answers: &Script, vendor: &BTreeSet<String>) -> Value {
    let instance = host.instance.id.as_str();
    let devices: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let edits = entry(resource, id, answers.get(id)?, vendor)?;
            Some(json!({ "name": id, "annotations": { INSTANCE: instance }, "containerEdits": edits }))
        })
        .collect();
    json!({
        "cdiVersion": "0.6.0",
        "kind": resource,
        "annotations": { WRITER: instance, STARTED: host.instance.started.to_string() },
        "devices": devices,
    })
}

/// The edits of `id`'s entry, or `None` for a device devhost must leave
/// out: not a CDI name of a CDI kind, Allocate failed, nothing of its own
/// (no device node, no mount), an env name CDI cannot hold, edits CDI
/// refuses, or another spec file names it.
fn entry(resource: &str, id: &str, answer: &Result<Allocation, String>, vendor: &BTreeSet<String>) -> Option<Value> {
    if !reference::kind_ok(resource) || !reference::device_ok(id) || vendor.contains(&format!("{resource}={id}")) {
        return None;
    }
    let answer = answer.as_ref().ok()?;
    if (answer.device_specs.is_empty() && answer.mounts.is_empty()) || answer.envs.keys().any(|k| k.contains('=')) {
        return None;
    }
    let edits = edits(answer);
    let alone =
        json!({ "cdiVersion": "0.6.0", "kind": resource, "devices": [{ "name": id, "containerEdits": edits }] });
    reference::spec_valid(&alone).ok()?;
    Some(edits)
}

/// A device's own edits as the spec holds them: device nodes (an empty
/// host path or permissions left out) and mounts; never variables.
fn edits(answer: &Allocation) -> Value {
    let mut edits = serde_json::Map::new();
    let nodes: Vec<Value> = answer
        .device_specs
        .iter()
        .map(|d| {
            let mut node = serde_json::Map::new();
            node.insert("path".into(), json!(d.container_path));
            if !d.host_path.is_empty() {
                node.insert("hostPath".into(), json!(d.host_path));
            }
            if !d.permissions.is_empty() {
                node.insert("permissions".into(), json!(d.permissions));
            }
            Value::Object(node)
        })
        .collect();
    if !nodes.is_empty() {
        edits.insert("deviceNodes".into(), json!(nodes));
    }
    let mounts: Vec<Value> = answer
        .mounts
        .iter()
        .map(|m| {
            let options = if m.read_only { ["rbind", "ro"] } else { ["rbind", "rw"] };
            json!({ "hostPath": m.host_path, "containerPath": m.container_path, "options": options })
        })
        .collect();
    if !mounts.is_empty() {
        edits.insert("mounts".into(), json!(mounts));
    }
    Value::Object(edits)
}

/// Waits until the spec file at `path` holds `want` (or, for a spec with
/// no devices, which CDI would refuse, until there is no file).
async fn settled(path: &Path, want: &Value) -> Result<(), String> {
    let started = Instant::now();
    let mut last = None;
    if want["devices"].as_array().is_some_and(Vec::is_empty) {
        while started.elapsed() < Duration::from_secs(5) {
            if !path.exists() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        return Err(format!("{} is still there with no device to describe", path.display()));
    }
    while started.elapsed() < Duration::from_secs(5) {
        if let Ok(text) = std::fs::read(path) {
            match serde_json::from_slice::<Value>(&text) {
                Ok(got) if got == *want => return Ok(()),
                Ok(got) => last = Some(got.to_string()),
                Err(error) => return Err(format!("{} is not JSON ({error}): {:?}", path.display(), text)),
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(format!("{} never became {want}; last: {last:?}", path.display()))
}

/// No device is withheld (CDI withholds none any more) and the kubelet
/// sees every device Healthy, as published.
fn nothing_withheld(state: &ResourceState) -> Result<(), String> {
    let snapshot = state.snapshot();
    if !snapshot.withheld.is_empty() {
        return Err(format!("devices are withheld: {:?}", snapshot.withheld));
    }
    let advertised = snapshot.advertised();
    let unhealthy: Vec<&str> = advertised.iter().filter(|d| d.health != "Healthy").map(|d| d.id.as_str()).collect();
    if !unhealthy.is_empty() {
        return Err(format!("the kubelet sees {unhealthy:?} Unhealthy"));
    }
    Ok(())
}

/// Device nodes by container path (host path, permissions) and mounts by
/// container path (host path, read-only).
type Given = (BTreeMap<String, (String, String)>, BTreeMap<String, (String, bool)>);

/// A device node's host path as CDI takes it: its path when it has none.
fn host_of(host: &str, path: &str) -> String {
    if host.is_empty() { path } else { host }.to_owned()
}

/// What the container gets from the plain fields of `plain` and then the
/// CDI entries' edits in order, each replacing what has the same container path, as
/// CDI applies them.
fn container_gets(plain: &Allocation, entries: &[&Value]) -> Given {
    let mut nodes: BTreeMap<String, (String, String)> = plain
        .device_specs
        .iter()
        .map(|d| (d.container_path.clone(), (host_of(&d.host_path, &d.container_path), d.permissions.clone())))
        .collect();
    let mut mounts: BTreeMap<String, (String, bool)> =
        plain.mounts.iter().map(|m| (m.container_path.clone(), (m.host_path.clone(), m.read_only))).collect();
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    for node in entries.iter().filter_map(|e| e["deviceNodes"].as_array()).flatten() {
        let path = text(&node["path"]);
        nodes.insert(path.clone(), (host_of(&text(&node["hostPath"]), &path), text(&node["permissions"])));
    }
    for mount in entries.iter().filter_map(|e| e["mounts"].as_array()).flatten() {
        let read_only = mount["options"].as_array().is_some_and(|o| o.iter().any(|o| o == "ro"));
        mounts.insert(text(&mount["containerPath"]), (text(&mount["hostPath"]), read_only));
    }
    (nodes, mounts)
}

/// Whether what the container gets from `got`'s plain fields and
/// `entries` is what `answer` says: the same container paths, each with a node or
/// mount the answer gives there. An answer with two nodes (or mounts) at
/// one container path does not say which the container gets (the plain
/// path leaves it to the runtime); either will do.
fn gives_what_answered(got: &Allocation, entries: &[&Value], answer: &Allocation) -> bool {
    let (nodes, mounts) = container_gets(got, entries);
    let mut answer_nodes: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for d in &answer.device_specs {
        let node = (host_of(&d.host_path, &d.container_path), d.permissions.clone());
        answer_nodes.entry(d.container_path.clone()).or_default().insert(node);
    }
    let mut answer_mounts: BTreeMap<String, BTreeSet<(String, bool)>> = BTreeMap::new();
    for m in &answer.mounts {
        answer_mounts.entry(m.container_path.clone()).or_default().insert((m.host_path.clone(), m.read_only));
    }
    fn within<V: Ord>(got: &BTreeMap<String, V>, answer: &BTreeMap<String, BTreeSet<V>>) -> bool {
        got.len() == answer.len() && got.iter().all(|(path, v)| answer.get(path).is_some_and(|set| set.contains(v)))
    }
    within(&nodes, &answer_nodes) && within(&mounts, &answer_mounts)
}

/// Each device's single-device answer, and one answer for all the devices
/// together (their answers joined), against the spec `want`: the answers
/// devhost learned the entries from, or (`later`) ones the backend changed
/// since.
async fn answered(
    answers: &Answers,
    resource: &str,
    ids: &[String],
    scripted: &Script,
    later: &HashMap<String, Allocation>,
    want: &Value,
) -> Result<(), String> {
    let entries: HashMap<&str, &Value> = want["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["name"].as_str()?, &d["containerEdits"])))
        .collect();
    let mut all: Vec<String> = Vec::new();
    let mut joined = Allocation::default();
    let mut unchanged = true;
    for id in ids {
        let Some(Ok(learned)) = scripted.get(id) else { continue };
        let answer = later.get(id).unwrap_or(learned);
        judge(answers, resource, std::slice::from_ref(id), answer, answer == learned, &entries).await?;
        all.push(id.clone());
        joined.envs.extend(answer.envs.clone());
        joined.device_specs.extend(answer.device_specs.iter().cloned());
        joined.mounts.extend(answer.mounts.iter().cloned());
        joined.annotations.extend(answer.annotations.clone());
        joined.cdi_devices.extend(answer.cdi_devices.iter().cloned());
        unchanged &= answer == learned;
    }
    if all.len() > 1 {
        judge(answers, resource, &all, &joined, unchanged, &entries).await?;
    }
    Ok(())
}

/// `Answers::container` for the devices `ids` given the backend's
/// `answer` (`unchanged`: the one devhost learned their entries from):
/// variables and annotations stay plain; either no CDI name and the plain
/// fields as answered, or exactly the names of the devices in the spec
/// and, with their entries, what the answer says; named whenever the
/// entries give exactly what it says (unchanged, every node with a host
/// path).
async fn judge(
    answers: &Answers,
    resource: &str,
    ids: &[String],
    answer: &Allocation,
    unchanged: bool,
    entries: &HashMap<&str, &Value>,
) -> Result<(), String> {
    let got = answers.container(ids, answer.clone()).await;
    let in_spec: Vec<&Value> = ids.iter().filter_map(|id| entries.get(id.as_str()).copied()).collect();
    let names: Vec<String> =
        ids.iter().filter(|id| entries.contains_key(id.as_str())).map(|id| format!("{resource}={id}")).collect();
    let why = if got.envs != answer.envs || got.annotations != answer.annotations {
        Some("variables and annotations are not as the backend answered")
    } else if got.cdi_devices.is_empty() {
        if got.device_specs != answer.device_specs || got.mounts != answer.mounts {
            Some("answered without a CDI name, the device nodes or mounts are not as the backend answered")
        } else if !in_spec.is_empty() && unchanged && answer.device_specs.iter().all(|d| !d.host_path.is_empty()) {
            Some("the spec entries give exactly what the backend answered, yet it is answered without their names")
        } else {
            None
        }
    } else if got.cdi_devices != names {
        Some("the CDI names are not those of the devices in the spec")
    } else if !gives_what_answered(&got, &in_spec, answer) {
        Some("the spec entries and what stays plain give the container other than what the backend answered")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "the answer for {ids:?}: {why}; backend answered {answer:?}, devhost {got:?}; entries {in_spec:?}"
        )),
        None => Ok(()),
    }
}

/// The CDI directory of lower priority than devhost's `dir` (inside it:
/// CDI reads no subdirectory).
fn lower_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("etc")
}

/// Nanoseconds since 1970, now.
fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// `maintain` for one resource of a scripted backend, through the input's
/// device lists.
async fn spec_file(dir: &Path, u: &mut Unstructured<'_>) -> Result<(), String> {
    let resource = u.choose(&RESOURCES).unwrap_or(&RESOURCES[0]).clone();
    let backend_name = (*u.choose(BACKENDS).unwrap_or(&BACKENDS[0])).to_owned();
    let lists = lists(u);
    let mut scripted = HashMap::new();
    for id in lists.iter().flatten() {
        if !scripted.contains_key(id) {
            let answer =
                if crate::rarely(u, 6) { Err("declined".to_owned()) } else { Ok(allocation(u).unwrap_or_default()) };
            scripted.insert(id.clone(), answer);
        }
    }
    let vendor = Vendor::arbitrary(u, &resource, &lists);
    let instance = *u.choose(INSTANCES).unwrap_or(&INSTANCES[0]);
    let mut later = HashMap::new();
    for (id, answer) in &scripted {
        if let Ok(answer) = answer
            && crate::rarely(u, 3)
            && let Ok(other) = changed(u, answer)
        {
            later.insert(id.clone(), other);
        }
    }
    let mut vendor_names = BTreeSet::new();
    if let Some(vendor) = &vendor {
        let path = vendor.path(dir);
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        std::fs::write(&path, vendor.text()).map_err(|e| format!("cannot write the vendor file: {e}"))?;
        vendor_names = vendor.defines();
    }
    let before = now_nanos();
    let host = Host::new(dir.to_owned(), vec![lower_dir(dir), dir.to_owned()], instance);
    let after = now_nanos();
    // A minute either way: the wall clock may be set meanwhile.
    let minute = 60_000_000_000;
    if host.instance.id != instance
        || !(before.saturating_sub(minute)..=after + minute).contains(&host.instance.started)
    {
        return Err(format!(
            "Host::new(…, {instance:?}) is instance {:?} started at {} ns, not between {before} and {after}",
            host.instance.id, host.instance.started
        ));
    }
    let backend: Arc<dyn Backend> = Arc::new(Scripted { resource: resource.clone(), answers: scripted.clone() });
    let cancel = CancellationToken::new();
    let handle = BackendHandle::start(backend_name.clone(), backend, Duration::from_secs(2), cancel.clone())
        .await
        .map_err(|e| format!("the scripted backend did not start: {e}"))?;
    let state = handle.resources()[0].1.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(maintain(host.clone(), resource.clone(), state.clone(), handle.clone(), stop.clone()));
    let answers = Answers::new(host.clone(), &resource, true);
    let path = spec_path(dir, &resource);
    let mut result = Ok(());
    for ids in &lists {
        let devices: Vec<Device> =
            ids.iter().map(|id| Device::new(id.clone(), Health::Healthy).with_numa_nodes(vec![])).collect();
        if let Err(error) = state.publish(devices) {
            result = Err(format!("a valid list was refused: {error}"));
            break;
        }
        let want = expected(&resource, &host, ids, &scripted, &vendor_names);
        result = settled(&path, &want).await;
        // F2 (fixed): a spec devhost writes passes the CDI project's own
        // validation; devices that would break it are left out instead.
        if result.is_ok()
            && want["devices"].as_array().is_some_and(|d| !d.is_empty())
            && let Err(error) = reference::spec_valid(&want)
        {
            result = Err(format!("F2: devhost wrote a spec the CDI project refuses ({error}): {want}"));
        }
        if result.is_ok() {
            result = nothing_withheld(&state);
        }
        if result.is_ok() {
            result = answered(&answers, &resource, ids, &scripted, &later, &want).await;
        }
        if result.is_err() {
            break;
        }
    }
    stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), task).await;
    if result.is_ok() {
        result = nothing_withheld(&state);
    }
    cancel.cancel();
    host.withdraw();
    result?;
    if stopped.is_err() {
        return Err("maintain did not stop within 5 s of its cancellation".into());
    }
    // F8 (fixed): the lock file beside a spec of a 255-byte name was a
    // byte too long for the kernel, and the spec stayed.
    let long_name = path.file_name().is_some_and(|name| name.len() >= 255);
    if path.exists() {
        let finding = if long_name { "F8: " } else { "" };
        return Err(format!("{finding}{} is still there after maintain stopped", path.display()));
    }
    if let Some(vendor) = &vendor
        && std::fs::read_to_string(vendor.path(dir)).ok() != Some(vendor.text())
    {
        return Err(format!("the vendor's {} was changed or removed", vendor.file));
    }
    Ok(())
}

/// The CDI project's rules, transcribed from `container-device-interface`
/// 1.1.1 (`src/parser.rs`, `src/spec.rs`, `src/device.rs`,
/// `src/container_edits.rs`), independently of devhost's code.
mod reference {
    use serde_json::Value;

    /// `parse_qualifier` + `validate_vendor_name` + `validate_class_name`.
    pub fn kind_ok(kind: &str) -> bool {
        let parts: Vec<&str> = kind.split('/').collect();
        parts.len() == 2
            && !parts[0].is_empty()
            && !parts[1].is_empty()
            && vendor_or_class_ok(parts[0])
            && vendor_or_class_ok(parts[1])
    }

    /// `validate_vendor_or_class_name`, plus one rule the Rust crate does
    /// not have: at least two characters. The Go library (v1.1) that
    /// containerd and CRI-O load specs with slices `name[1:len(name)-1]`
    /// in `validateVendorOrClassName`, which panics on a one-character
    /// name (`[1:0]`), so a spec of such a kind brings the loader down and
    /// no CDI name on the node resolves; devhost refuses it.
    fn vendor_or_class_ok(name: &str) -> bool {
        let count = name.chars().count();
        count >= 2
            && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .skip(1)
                .take(count.saturating_sub(2))
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    }

    /// `validate_device_name` (one character is fine: the Go library
    /// returns before slicing).
    pub fn device_ok(name: &str) -> bool {
        let count = name.chars().count();
        !name.is_empty()
            && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .skip(1)
                .take(count.saturating_sub(2))
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':')
    }

    /// `parse_qualified_name`: vendor, class and name, if valid.
    pub fn parse_qualified_name(device: &str) -> Option<(&str, &str, &str)> {
        if device.is_empty() || device.starts_with('/') {
            return None;
        }
        let parts: Vec<&str> = device.split('=').collect();
        if parts.len() != 2 || parts[0].is_empty() || parts[1].is_empty() {
            return None;
        }
        let qualifier: Vec<&str> = parts[0].split('/').collect();
        if qualifier.len() != 2 || qualifier[0].is_empty() || qualifier[1].is_empty() {
            return None;
        }
        let (vendor, class, name) = (qualifier[0], qualifier[1], parts[1]);
        (vendor_or_class_ok(vendor) && vendor_or_class_ok(class) && device_ok(name)).then_some((vendor, class, name))
    }

    /// An annotation key as Kubernetes (and so CDI's annotation check)
    /// takes it: `[prefix/]name`, the prefix a DNS subdomain of at most
    /// 253 characters, the name at most 63 of `A-Za-z0-9-_.`, starting and
    /// ending alphanumeric.
    fn annotation_key_ok(key: &str) -> bool {
        let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
        let name_ok = (1..=63).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let prefix_ok = prefix.is_none_or(|prefix| {
            (1..=253).contains(&prefix.len())
                && prefix.split('.').all(|label| {
                    (1..=63).contains(&label.len())
                        && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        });
        name_ok && prefix_ok
    }

    /// The annotations of a spec or device: keys valid; any annotation
    /// needs `cdiVersion` 0.6.0 or later (the version that added them).
    fn annotations_ok(annotations: &Value, version: &str) -> Result<(), String> {
        let Some(annotations) = annotations.as_object() else { return Ok(()) };
        if let Some(key) = annotations.keys().find(|key| !annotation_key_ok(key)) {
            return Err(format!("invalid annotation key {key:?}"));
        }
        if !annotations.is_empty() && ["0.3.0", "0.4.0", "0.5.0"].contains(&version) {
            return Err(format!("annotations need cdiVersion 0.6.0 or later, not {version}"));
        }
        Ok(())
    }

    /// `Spec::validate` on a spec with devices and device-level edits only
    /// (what devhost writes): the first rule broken, if any.
    pub fn spec_valid(spec: &Value) -> Result<(), String> {
        let version = spec["cdiVersion"].as_str().unwrap_or_default();
        if !["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0"].contains(&version) {
            return Err(format!("unsupported cdiVersion {version:?}"));
        }
        let kind = spec["kind"].as_str().unwrap_or_default();
        if !kind_ok(kind) {
            return Err(format!("invalid kind {kind:?}"));
        }
        annotations_ok(&spec["annotations"], version)?;
        let devices = spec["devices"].as_array().cloned().unwrap_or_default();
        if devices.is_empty() {
            return Err("invalid spec, no devices".into());
        }
        let mut seen = std::collections::HashSet::new();
        for device in &devices {
            let name = device["name"].as_str().unwrap_or_default();
            if !device_ok(name) {
                return Err(format!("invalid device name {name:?}"));
            }
            if !seen.insert(name) {
                return Err(format!("invalid spec, multiple device {name}"));
            }
            annotations_ok(&device["annotations"], version).map_err(|error| format!("device {name}: {error}"))?;
            let edits = &device["containerEdits"];
            if edits.as_object().is_none_or(|e| e.is_empty()) {
                return Err(format!("device {name}: invalid device, empty device edits"));
            }
            for env in edits["env"].as_array().into_iter().flatten() {
                let env = env.as_str().unwrap_or_default();
                if env.split_once('=').is_none_or(|(key, _)| key.is_empty()) {
                    return Err(format!("device {name}: invalid environment variable {env:?}"));
                }
            }
            for node in edits["deviceNodes"].as_array().into_iter().flatten() {
                if node["path"].as_str().unwrap_or_default().is_empty() {
                    return Err(format!("device {name}: invalid (empty) device path"));
                }
                let permissions = node["permissions"].as_str().unwrap_or_default();
                if !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
                    return Err(format!("device {name}: invalid permissions {permissions}"));
                }
            }
            for mount in edits["mounts"].as_array().into_iter().flatten() {
                if mount["hostPath"].as_str().unwrap_or_default().is_empty() {
                    return Err(format!("device {name}: invalid mount, empty host path"));
                }
                if mount["containerPath"].as_str().unwrap_or_default().is_empty() {
                    return Err(format!("device {name}: invalid mount, empty container path"));
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use serde_json::json;

        use super::*;

        #[test]
        fn the_reference_knows_the_facts() {
            assert!(kind_ok("nvidia.com/gpu") && kind_ok("vendor.example.org/Shared_GPU.v2") && kind_ok("ab/cd"));
            for bad in ["nvidia.com", "a/b/c", "1a.com/gpu", "a.com/9gpu", "a.com/gpu-", "/gpu", "a.com/"] {
                assert!(!kind_ok(bad), "{bad}");
            }
            for one_letter in ["a.io/x", "e/gpu", "a/b"] {
                assert!(!kind_ok(one_letter), "{one_letter}: the Go library panics on it");
            }
            assert!(device_ok("0") && device_ok("GPU-0:1_a.b") && !device_ok("_gpu") && !device_ok("gpu_"));
            assert_eq!(parse_qualified_name("a.com/gpu=0"), Some(("a.com", "gpu", "0")));
            assert_eq!(parse_qualified_name("a.com/gpu=0=1"), None);
            assert_eq!(parse_qualified_name("a.com/g=0"), None);
        }

        #[test]
        fn the_reference_validates_annotations() {
            let spec = |version: &str, key: &str| {
                json!({ "cdiVersion": version, "kind": "a.io/dev", "annotations": { key: "v" },
                        "devices": [{ "name": "0", "containerEdits": { "deviceNodes": [{ "path": "/dev/null" }] } }] })
            };
            assert_eq!(spec_valid(&spec("0.6.0", "devhost.io/writer")), Ok(()));
            assert!(spec_valid(&spec("0.5.0", "devhost.io/writer")).is_err(), "annotations came with 0.6.0");
            assert!(spec_valid(&spec("0.6.0", "Devhost.io/writer")).is_err(), "a prefix is lower case");
            assert!(spec_valid(&spec("0.6.0", "a.io/-x")).is_err());
        }
    }
}
