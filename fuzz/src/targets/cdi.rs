//! The CDI spec writer (`host/src/cdi.rs`), through its public API only:
//! `check_names`, `device_name`, `spec_path` and `maintain`, the task that
//! writes a resource's spec file from what its backend's `allocate` answers
//! for each device and removes it at the end.
//!
//! Each input either checks names and paths (cheap), or runs `maintain`
//! for one resource of a backend written here whose per-device Allocate
//! answers (envs, device nodes, mounts, refusals) and device lists (one to
//! three, published in turn) come from the input.
//!
//! Invariants: `check_names` agrees with a literal transcription of the
//! CDI project's own rules (`container-device-interface` 1.1.1,
//! `src/parser.rs`: `parse_qualifier`, `validate_vendor_or_class_name`,
//! `validate_device_name`), and its errors name the value; the name of an
//! accepted device parses back (CDI's `parse_qualified_name`) into the
//! resource's vendor and class and the device; `spec_path` is a file
//! directly in the directory, `devhost-….json`, of safe characters only;
//! the spec file holds exactly `cdiVersion`, `kind` = the resource, and one
//! device per current ID that is a valid CDI name and whose Allocate
//! succeeded, in list order, each with the edits of its answer (`K=V` envs
//! in key order, device nodes, `rbind` mounts with `ro`/`rw`); every other
//! device is withheld (reported Unhealthy to the kubelet, with a reason)
//! and the ones in the spec are not; the file is removed when `maintain`
//! stops (it is the only instance serving it).
//!
//! Known findings, checked only with `DEVHOST_FUZZ_STRICT=1` (see
//! `fuzz/README.md`): F2, every spec written passes the CDI project's own
//! validation (`Spec::validate`: at least one device, no device with empty
//! edits, env names non-empty and without `=`, device node and mount
//! paths non-empty, permissions of `r`, `w`, `m`); F3, `spec_path` gives
//! different resources different files and a file name the kernel accepts
//! (at most 255 bytes).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Result as AResult, Unstructured};
use devhost::backend::handle::BackendHandle;
use devhost::backend::{Allocation, Backend, BackendError, DeviceSpec, Health, Mount, Publisher, ResourceSpec};
use devhost::cdi::{CDI_VERSION, check_names, device_name, maintain, spec_path};
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

/// Pieces names are built from: the edges of both rule sets.
const PIECES: &[&str] =
    &["a", "Z", "0", "9", "-", "_", ".", ":", "/", "=", "example.com", "gpu", "nvidia.com/gpu", "é", " ", "\0", "-x"];

/// Resources served with `cdi = true` (valid resource names and CDI kinds).
const RESOURCES: &[&str] = &["example.com/gpu", "vendor.example.org/Shared_GPU.v2", "a.io/x", "fuzz.example.com/cdi"];

/// Device IDs: valid CDI device names and some that are not.
const IDS: &[&str] =
    &["gpu-0", "gpu-1", "GPU:0", "a.b_c", "0", "mig-1g.5gb:3", "-x", "x-", "a/b", "a=b", "é", "a b", "x::0"];

/// Backend names (file stems).
const BACKENDS: &[&str] = &["gpu", "fuzz", "a-b", "nvidia gpu", "x.y"];

/// Env names, device and mount paths, permissions.
const KEYS: &[&str] = &["NVIDIA_VISIBLE_DEVICES", "A", "", "A=B", "é", "PATH"];
const PATHS: &[&str] = &["/dev/null", "/dev/nvidia0", "", "relative", "/a b"];
const PERMISSIONS: &[&str] = &["rw", "rwm", "r", "m", "", "q", "rwx"];

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
    let text = if u.arbitrary().unwrap_or(false) { name(u) } else { (*u.choose(RESOURCES).ok()?).to_owned() };
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

/// A backend serving one resource, whose Allocate answer per device ID is
/// chosen by the input.
struct Scripted {
    resource: String,
    answers: HashMap<String, Result<Allocation, String>>,
}

impl Backend for Scripted {
    fn init(&self, _publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        Ok(vec![ResourceSpec {
            name: self.resource.clone(),
            pre_start_required: false,
            preferred_allocation: false,
            release_required: false,
        }])
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

/// The file `maintain` must write for `ids`: every device whose ID is a
/// CDI name, whose Allocate succeeded, and whose edits the CDI project's
/// own validation accepts (and whose env names hold no `=`); with no such
/// device, no file.
fn expected(resource: &str, ids: &[String], answers: &HashMap<String, Result<Allocation, String>>) -> Value {
    let devices: Vec<Value> = ids
        .iter()
        .filter(|id| check_names(resource, Some(id)).is_ok())
        .filter_map(|id| Some((id, answers.get(id)?.as_ref().ok()?)))
        .filter(|(_, answer)| !answer.envs.keys().any(|name| name.contains('=')))
        .map(|(id, answer)| json!({ "name": id, "containerEdits": edits(answer) }))
        .filter(|device| {
            reference::spec_valid(&json!({ "cdiVersion": CDI_VERSION, "kind": resource, "devices": [device] })).is_ok()
        })
        .collect();
    json!({ "cdiVersion": CDI_VERSION, "kind": resource, "devices": devices })
}

fn edits(answer: &Allocation) -> Value {
    let mut edits = serde_json::Map::new();
    let env: Vec<String> = answer.envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !env.is_empty() {
        edits.insert("env".into(), json!(env));
    }
    let nodes: Vec<Value> = answer
        .device_specs
        .iter()
        .map(|d| json!({ "path": d.container_path, "hostPath": d.host_path, "permissions": d.permissions }))
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

/// Waits until exactly the devices of `ids` missing from the spec `want`
/// are withheld, and the kubelet's list says so.
async fn withheld(state: &ResourceState, ids: &[String], want: &Value) -> Result<(), String> {
    let in_spec: Vec<&str> =
        want["devices"].as_array().into_iter().flatten().filter_map(|d| d["name"].as_str()).collect();
    let expected: BTreeSet<&str> = ids.iter().map(String::as_str).filter(|id| !in_spec.contains(id)).collect();
    let started = Instant::now();
    loop {
        let snapshot = state.snapshot();
        let got: BTreeSet<&str> = snapshot.withheld.keys().map(String::as_str).collect();
        let advertised = snapshot.advertised();
        let healths: Vec<(&str, &str)> = advertised.iter().map(|d| (d.id.as_str(), d.health.as_str())).collect();
        let listed_right =
            healths.iter().all(|(id, health)| *health == if expected.contains(id) { "Unhealthy" } else { "Healthy" });
        if got == expected && listed_right {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!("withheld {got:?}, expected {expected:?}; the kubelet sees {healths:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `maintain` for one resource of a scripted backend, through the input's
/// device lists.
async fn spec_file(dir: &Path, u: &mut Unstructured<'_>) -> Result<(), String> {
    let resource = (*u.choose(RESOURCES).unwrap_or(&RESOURCES[0])).to_owned();
    let backend_name = (*u.choose(BACKENDS).unwrap_or(&BACKENDS[0])).to_owned();
    let lists = lists(u);
    let mut answers = HashMap::new();
    for id in lists.iter().flatten() {
        if !answers.contains_key(id) {
            let answer =
                if crate::rarely(u, 6) { Err("declined".to_owned()) } else { Ok(allocation(u).unwrap_or_default()) };
            answers.insert(id.clone(), answer);
        }
    }
    let backend: Arc<dyn Backend> = Arc::new(Scripted { resource: resource.clone(), answers: answers.clone() });
    let cancel = CancellationToken::new();
    let handle = BackendHandle::start(backend_name.clone(), backend, Duration::from_secs(2), cancel.clone())
        .await
        .map_err(|e| format!("the scripted backend did not start: {e}"))?;
    let state = handle.resources()[0].1.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(maintain(dir.to_owned(), resource.clone(), state.clone(), handle.clone(), stop.clone()));
    let path = spec_path(dir, &resource);
    let mut result = Ok(());
    for ids in &lists {
        let devices: Vec<Device> =
            ids.iter().map(|id| Device::new(id.clone(), Health::Healthy).with_numa_nodes(vec![])).collect();
        if let Err(error) = state.publish(devices) {
            result = Err(format!("a valid list was refused: {error}"));
            break;
        }
        let want = expected(&resource, ids, &answers);
        if let Err(error) = settled(&path, &want).await {
            result = Err(error);
            break;
        }
        if let Err(error) = withheld(&state, ids, &want).await {
            result = Err(error);
            break;
        }
        // F2 (fixed): a spec devhost writes passes the CDI project's own
        // validation; devices that would break it are withheld instead.
        if want["devices"].as_array().is_some_and(|d| !d.is_empty())
            && let Err(error) = reference::spec_valid(&want)
        {
            result = Err(format!("F2: devhost wrote a spec the CDI project refuses ({error}): {want}"));
            break;
        }
    }
    stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), task).await;
    cancel.cancel();
    result?;
    if stopped.is_err() {
        return Err("maintain did not stop within 5 s of its cancellation".into());
    }
    if path.exists() {
        return Err(format!("{} is still there after maintain stopped", path.display()));
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

    /// `validate_vendor_or_class_name`.
    fn vendor_or_class_ok(name: &str) -> bool {
        let count = name.chars().count();
        !name.is_empty()
            && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .skip(1)
                .take(count.saturating_sub(2))
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    }

    /// `validate_device_name`.
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

    /// `Spec::validate` on a spec with devices and device-level edits only
    /// (what devhost writes): the first rule broken, if any.
    pub fn spec_valid(spec: &Value) -> Result<(), String> {
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
        use super::*;

        #[test]
        fn the_reference_knows_the_facts() {
            assert!(kind_ok("nvidia.com/gpu") && kind_ok("vendor.example.org/Shared_GPU.v2"));
            for bad in ["nvidia.com", "a/b/c", "1a.com/gpu", "a.com/9gpu", "a.com/gpu-", "/gpu", "a.com/"] {
                assert!(!kind_ok(bad), "{bad}");
            }
            assert!(device_ok("0") && device_ok("GPU-0:1_a.b") && !device_ok("_gpu") && !device_ok("gpu_"));
            assert_eq!(parse_qualified_name("a.com/gpu=0"), Some(("a.com", "gpu", "0")));
            assert_eq!(parse_qualified_name("a.com/gpu=0=1"), None);
        }
    }
}
