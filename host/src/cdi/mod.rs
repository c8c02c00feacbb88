//! CDI spec files for resources served with `cdi = true`: devhost writes one
//! spec per resource (kind = the resource name, one CDI device per real
//! device) into the CDI directory, keeps it current as devices come and go,
//! and removes it when the resource stops. Allocate then answers with CDI
//! names, and the container runtime applies the edits from the spec.
//!
//! A device's edits are what the backend's `allocate` answers for that one
//! device (envs, device nodes, mounts), learned once per device ID.
//!
//! Two devhost instances may serve the same resource for a while (the old
//! and the new pod of a rolling update), and CDI refuses a device that two
//! spec files describe, so they share one spec file. Each instance holds a
//! shared `flock` on a lock file beside it (`.devhost-….lock`, which CDI
//! ignores) while it serves; the one that stops last, the only one that can
//! take the lock exclusively, removes the spec. The kernel drops the locks
//! of a killed instance.
//!
//! A device the spec on disk does not describe (its write failed, its edits
//! are not learned yet or are ones CDI would refuse, its ID is not a CDI
//! name) is reported Unhealthy
//! with the reason, so the kubelet never hands out a CDI name a runtime
//! cannot resolve; failed writes are retried with back-off, and the file is
//! checked now and then and rewritten if someone removed or changed it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::handle::BackendHandle;
use crate::device_state::ResourceState;
use crate::model::Allocation;
use crate::sockets::files::sanitise;

/// The CDI specification version the files declare.
pub const CDI_VERSION: &str = "0.6.0";

/// The CDI name of a device of `resource`: `<resource>=<device>`.
pub fn device_name(resource: &str, device: &str) -> String {
    format!("{resource}={device}")
}

/// Whether `resource` can be a CDI kind and `device` a CDI device name
/// (vendor and class start with a letter; names use `A-Za-z0-9_-.:`).
pub fn check_names(resource: &str, device: Option<&str>) -> Result<(), String> {
    let part = |text: &str, first_letter: bool, extra: &[u8]| {
        let bytes = text.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| if first_letter { b.is_ascii_alphabetic() } else { b.is_ascii_alphanumeric() });
        first_ok
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
    };
    let kind_ok =
        resource.split_once('/').is_some_and(|(vendor, class)| part(vendor, true, b"_-.") && part(class, true, b"_-."));
    if !kind_ok {
        return Err(format!("resource {resource:?} cannot be a CDI kind (vendor/class, each starting with a letter)"));
    }
    match device {
        Some(device) if !part(device, false, b"_-.:") => {
            Err(format!("device ID {device:?} cannot be a CDI device name (letters, digits, '_', '-', '.', ':')"))
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Serialize, PartialEq)]
struct Spec {
    #[serde(rename = "cdiVersion")]
    cdi_version: &'static str,
    kind: String,
    devices: Vec<SpecDevice>,
}

#[derive(Debug, Serialize, PartialEq)]
struct SpecDevice {
    name: String,
    #[serde(rename = "containerEdits")]
    container_edits: ContainerEdits,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
struct ContainerEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(rename = "deviceNodes", skip_serializing_if = "Vec::is_empty")]
    device_nodes: Vec<DeviceNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<SpecMount>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct DeviceNode {
    path: String,
    #[serde(rename = "hostPath")]
    host_path: String,
    permissions: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct SpecMount {
    #[serde(rename = "hostPath")]
    host_path: String,
    #[serde(rename = "containerPath")]
    container_path: String,
    options: Vec<&'static str>,
}

fn edits(allocation: &Allocation) -> ContainerEdits {
    ContainerEdits {
        env: allocation.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        device_nodes: allocation
            .device_specs
            .iter()
            .map(|d| DeviceNode {
                path: d.container_path.clone(),
                host_path: d.host_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: allocation
            .mounts
            .iter()
            .map(|m| SpecMount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                options: if m.read_only { vec!["rbind", "ro"] } else { vec!["rbind", "rw"] },
            })
            .collect(),
    }
}

/// The longest file name the kernel accepts.
const MAX_FILE_NAME: usize = 255;

/// The spec file of `resource` in `dir`: `devhost-<resource, / as _>.json`.
/// A resource is served by one backend at a time, so the resource alone
/// names the file (instances of a rolling update share it, whichever
/// backend file serves it); sanitising is one-to-one on valid resource
/// names (`_` cannot occur in the domain). A name too long for the kernel
/// is cut, with a hash of the whole resource name to keep it unique.
pub fn spec_path(dir: &Path, resource: &str) -> PathBuf {
    let sanitised = sanitise(resource);
    let name = format!("devhost-{sanitised}.json");
    if name.len() <= MAX_FILE_NAME {
        return dir.join(name);
    }
    let hash = resource.bytes().fold(0x811c_9dc5_u32, |hash, b| (hash ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let room = MAX_FILE_NAME - "devhost--12345678.json".len();
    dir.join(format!("devhost-{}-{hash:08x}.json", &sanitised[..room]))
}

/// The CDI kind of a DRA driver's claim devices: `k8s.<driver>/claim`.
fn claim_kind(driver: &str) -> String {
    format!("k8s.{driver}/claim")
}

/// The CDI device of one request of a prepared claim: `<claim UID>-<request>`
/// (a subrequest's `/` becomes `_`, which CDI allows and DNS labels lack).
pub fn claim_device_name(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}-{}", request.replace('/', "_"))
}

/// The fully qualified CDI name of `device` of `driver`'s claims.
pub fn claim_device_id(driver: &str, device: &str) -> String {
    device_name(&claim_kind(driver), device)
}

/// The spec file of one prepared claim of `driver`:
/// `devhost-<driver>-claim-<claim UID>.json` (hashed when too long).
pub fn claim_spec_path(dir: &Path, driver: &str, claim_uid: &str) -> PathBuf {
    spec_path(dir, &format!("{driver}-claim-{claim_uid}"))
}

/// Writes the CDI spec of a prepared claim: one device per request, with
/// the edits of that request's `allocate` answer; no file when there is no
/// device (CDI refuses an empty spec). The error says why the claim cannot
/// be prepared.
pub fn write_claim_spec(
    dir: &Path,
    driver: &str,
    claim_uid: &str,
    devices: &[(String, Allocation)],
) -> Result<Option<PathBuf>, String> {
    if devices.is_empty() {
        return Ok(None);
    }
    let kind = claim_kind(driver);
    let mut spec = Spec { cdi_version: CDI_VERSION, kind: kind.clone(), devices: Vec::new() };
    for (name, allocation) in devices {
        check_names(&kind, Some(name))?;
        let edits = edits(allocation);
        let renamed = allocation.envs.keys().find(|name| name.contains('='));
        if let Some(why) = renamed
            .map(|name| format!("environment variable {name:?} has '=' in its name"))
            .or_else(|| invalid_edits(&edits))
        {
            return Err(format!("the backend's allocate answer cannot be a CDI device: {why}"));
        }
        spec.devices.push(SpecDevice { name: name.clone(), container_edits: edits });
    }
    let path = claim_spec_path(dir, driver, claim_uid);
    let text = serde_json::to_vec_pretty(&spec).map_err(|error| format!("cannot encode the CDI spec: {error}"))?;
    write_atomically(&path, &text).map_err(|error| format!("cannot write the CDI spec {}: {error}", path.display()))?;
    Ok(Some(path))
}

/// Removes the CDI spec of a claim; one already gone is no error.
pub fn remove_claim_spec(dir: &Path, driver: &str, claim_uid: &str) -> std::io::Result<()> {
    match std::fs::remove_file(claim_spec_path(dir, driver, claim_uid)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Why CDI would refuse a device with these edits (the CDI project's
/// `Device::validate`: edits present, env entries `NAME=value` with a
/// name, device node and mount paths present, permissions of `r`, `w`,
/// `m`); a spec holding such a device would be refused whole.
fn invalid_edits(edits: &ContainerEdits) -> Option<String> {
    if edits.env.is_empty() && edits.device_nodes.is_empty() && edits.mounts.is_empty() {
        return Some("its Allocate answer has no environment, device node or mount for CDI to apply".into());
    }
    if let Some(env) = edits.env.iter().find(|env| env.split_once('=').is_none_or(|(name, _)| name.is_empty())) {
        return Some(format!("environment entry {env:?} has no variable name"));
    }
    if let Some(node) = edits.device_nodes.iter().find(|node| node.path.is_empty()) {
        return Some(format!("device node {:?} has no path in the container", node.host_path));
    }
    if let Some(node) =
        edits.device_nodes.iter().find(|node| !node.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')))
    {
        return Some(format!("device node {:?} has permissions {:?}, not of r, w, m", node.path, node.permissions));
    }
    if let Some(mount) = edits.mounts.iter().find(|mount| mount.host_path.is_empty() || mount.container_path.is_empty())
    {
        return Some(format!("mount {:?} → {:?} has an empty path", mount.host_path, mount.container_path));
    }
    None
}

/// First wait before a failed spec write is tried again.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between tries of a failed write.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How often a written spec is read back to see that it is still there.
const VERIFY_EVERY: Duration = Duration::from_secs(30);

/// The lock file beside `spec` (hidden, not `.json`: CDI ignores it).
fn lock_path(spec: &Path) -> PathBuf {
    let name = spec.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    spec.with_file_name(format!(".{}.lock", name.trim_end_matches(".json")))
}

/// This instance's share in a spec file: a shared lock on its lock file.
struct Share(Flock<std::fs::File>);

impl Share {
    /// Takes a shared lock, waiting while another instance holds it
    /// exclusively (it is removing the spec).
    async fn take(spec: &Path) -> std::io::Result<Share> {
        let lock = lock_path(spec);
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = lock.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock)?;
            Flock::lock(file, FlockArg::LockShared).map(Share).map_err(|(_, errno)| errno.into())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Whether this instance is the last one holding the spec (then it
    /// holds the lock exclusively until dropped).
    fn last(&self) -> bool {
        self.0.relock(FlockArg::LockExclusiveNonblock).is_ok()
    }
}

/// Keeps the spec file of one resource current until `stop`, then removes
/// it unless another instance still serves it.
pub async fn maintain(
    dir: PathBuf,
    resource: String,
    state: Arc<ResourceState>,
    backend: Arc<BackendHandle>,
    stop: CancellationToken,
) {
    let path = spec_path(&dir, &resource);
    let mut writer = SpecWriter::new(path.clone(), resource.clone());
    let share = writer.share().await;
    let mut learned: BTreeMap<String, ContainerEdits> = BTreeMap::new();
    let mut changes = state.subscribe();
    loop {
        let ids: Vec<String> = changes.borrow_and_update().devices.iter().map(|d| d.id.clone()).collect();
        learned.retain(|id, _| ids.contains(id));
        let mut withheld = HashMap::new();
        for id in &ids {
            if learned.contains_key(id) {
                continue;
            }
            if let Err(message) = check_names(&resource, Some(id)) {
                tracing::error!(resource, device_id = %id, "left out of the CDI spec: {message}");
                withheld.insert(id.clone(), format!("not in the CDI spec: {message}"));
                continue;
            }
            match backend.allocate(&resource, vec![id.clone()]).await {
                Ok(allocation) => {
                    let edits = edits(&allocation);
                    let renamed = allocation.envs.keys().find(|name| name.contains('='));
                    let refused = renamed
                        .map(|name| format!("environment variable {name:?} has '=' in its name"))
                        .or_else(|| invalid_edits(&edits));
                    if let Some(why) = refused {
                        tracing::error!(resource, device_id = %id, "left out of the CDI spec: {why}");
                        withheld.insert(id.clone(), format!("not in the CDI spec: {why}"));
                    } else {
                        learned.insert(id.clone(), edits);
                    }
                }
                Err(error) => {
                    tracing::warn!(resource, device_id = %id, %error, "cannot learn the device's CDI edits yet");
                    withheld.insert(id.clone(), format!("its CDI edits are not known yet: {error}"));
                }
            }
        }
        let spec = Spec {
            cdi_version: CDI_VERSION,
            kind: resource.clone(),
            devices: ids
                .iter()
                .filter_map(|id| learned.get(id).map(|edits| (id, edits)))
                .map(|(id, edits)| SpecDevice { name: id.clone(), container_edits: edits.clone() })
                .collect(),
        };
        if let Err(reason) = writer.keep(&spec) {
            for id in &ids {
                withheld.entry(id.clone()).or_insert_with(|| reason.clone());
            }
        }
        state.set_withheld(crate::device_state::Withholder::Cdi, withheld);
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(writer.next_check()) => {}
        }
    }
    writer.remove(share);
}

/// Writes one spec file and keeps it written: retries failed writes with
/// back-off and rewrites a file someone removed or changed.
struct SpecWriter {
    path: PathBuf,
    resource: String,
    /// The bytes on disk, as far as this instance knows.
    written: Option<Vec<u8>>,
    /// While writes fail: the last error and the back-off.
    failing: Option<(String, Duration)>,
    /// When the file was last read back.
    verified: Instant,
}

impl SpecWriter {
    fn new(path: PathBuf, resource: String) -> Self {
        SpecWriter { path, resource, written: None, failing: None, verified: Instant::now() }
    }

    /// This instance's share in the file; `None` (logged) if the lock file
    /// cannot be made: then the spec is written but never removed.
    async fn share(&self) -> Option<Share> {
        match Share::take(&self.path).await {
            Ok(share) => Some(share),
            Err(error) => {
                let lock = lock_path(&self.path);
                tracing::error!(resource = %self.resource, file = %lock.display(), %error, "cannot lock the CDI spec; it will be left in place when devhost stops");
                None
            }
        }
    }

    /// Makes the file hold `spec`; the error says why the devices cannot
    /// be handed out.
    fn keep(&mut self, spec: &Spec) -> Result<(), String> {
        if spec.devices.is_empty() {
            // CDI refuses a spec without devices; each device is withheld
            // with its own reason already. One written before goes: it
            // describes devices no longer served.
            if self.written.take().is_some() {
                let _ = std::fs::remove_file(&self.path);
            }
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(spec).map_err(|error| format!("cannot encode the CDI spec: {error}"))?;
        let due = self.verified.elapsed() >= VERIFY_EVERY;
        if self.written.as_ref() == Some(&text) && !due {
            return Ok(());
        }
        if due {
            self.verified = Instant::now();
            if self.written.as_ref() == Some(&text) && std::fs::read(&self.path).ok().as_ref() == Some(&text) {
                return Ok(());
            }
            if self.written.is_some() {
                tracing::warn!(resource = %self.resource, file = %self.path.display(), "the CDI spec was removed or changed by someone else; writing it again");
            }
        }
        match write_atomically(&self.path, &text) {
            Ok(()) => {
                if let Some((error, _)) = self.failing.take() {
                    tracing::info!(resource = %self.resource, file = %self.path.display(), "CDI spec written after earlier failures ({error})");
                } else {
                    tracing::info!(resource = %self.resource, file = %self.path.display(), devices = spec.devices.len(), "CDI spec written");
                }
                self.written = Some(text);
                Ok(())
            }
            Err(error) => {
                let error = error.to_string();
                let retry = match &self.failing {
                    Some((previous, retry)) => {
                        if *previous != error {
                            tracing::error!(resource = %self.resource, file = %self.path.display(), %error, "cannot write the CDI spec; its devices stay Unhealthy until it is written");
                        }
                        (*retry * 2).min(MAX_RETRY)
                    }
                    None => {
                        tracing::error!(resource = %self.resource, file = %self.path.display(), %error, "cannot write the CDI spec; its devices stay Unhealthy until it is written");
                        FIRST_RETRY
                    }
                };
                self.failing = Some((error.clone(), retry));
                self.written = None;
                Err(format!("cannot write its CDI spec {}: {error}", self.path.display()))
            }
        }
    }

    /// How long until the file needs looking at again.
    fn next_check(&self) -> Duration {
        match &self.failing {
            Some((_, retry)) => *retry,
            None => VERIFY_EVERY.saturating_sub(self.verified.elapsed()),
        }
    }

    /// Removes the file if this instance is the last one serving it.
    fn remove(self, share: Option<Share>) {
        let Some(share) = share else { return };
        if !share.last() {
            tracing::info!(resource = %self.resource, file = %self.path.display(), "CDI spec left in place: another devhost still serves it");
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::info!(resource = %self.resource, file = %self.path.display(), "CDI spec removed"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(resource = %self.resource, file = %self.path.display(), %error, "cannot remove the CDI spec")
            }
        }
        drop(share);
    }
}

/// Writes through a temporary file and a rename, so a runtime never reads
/// half a spec.
fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        // Runtimes read it whatever devhost's umask.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, text)?;
    // Readable by the container runtime whatever devhost's umask.
    file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdi_names_follow_the_specification() {
        assert_eq!(check_names("example.com/gpu", Some("GPU-0:1_a.b")), Ok(()));
        assert!(check_names("1example.com/gpu", None).is_err(), "vendor starts with a letter");
        assert!(check_names("example.com/9gpu", None).is_err(), "class starts with a letter");
        assert!(check_names("example.com/gpu", Some("-x")).is_err());
        assert!(check_names("example.com/gpu", Some("a/b")).is_err());
        assert_eq!(device_name("example.com/gpu", "gpu-0"), "example.com/gpu=gpu-0");
        assert_eq!(
            spec_path(Path::new("/var/run/cdi"), "example.com/gpu"),
            Path::new("/var/run/cdi/devhost-example.com_gpu.json")
        );
        let long = format!("{}.example.com/{}", "d".repeat(240), "n".repeat(63));
        let other = format!("{}.example.com/{}m", "d".repeat(240), "n".repeat(62));
        let (a, b) = (spec_path(Path::new("/x"), &long), spec_path(Path::new("/x"), &other));
        let name = a.file_name().expect("a file name").len();
        assert!(name <= MAX_FILE_NAME, "{name}");
        assert_ne!(a, b, "cut names stay apart");
    }

    #[test]
    fn edits_cdi_would_refuse_are_named() {
        let node = |path: &str, permissions: &str| DeviceNode {
            path: path.into(),
            host_path: "/dev/null".into(),
            permissions: permissions.into(),
        };
        let ok = ContainerEdits { env: vec!["A=1".into()], ..ContainerEdits::default() };
        assert_eq!(invalid_edits(&ok), None);
        assert!(invalid_edits(&ContainerEdits::default()).is_some_and(|w| w.contains("no environment")));
        let bad_env = ContainerEdits { env: vec!["=1".into()], ..ContainerEdits::default() };
        assert!(invalid_edits(&bad_env).is_some_and(|w| w.contains("no variable name")));
        let bad_node = ContainerEdits { device_nodes: vec![node("", "rw")], ..ContainerEdits::default() };
        assert!(invalid_edits(&bad_node).is_some_and(|w| w.contains("no path in the container")));
        let bad_perm = ContainerEdits { device_nodes: vec![node("/dev/x", "rwx")], ..ContainerEdits::default() };
        assert!(invalid_edits(&bad_perm).is_some_and(|w| w.contains("not of r, w, m")));
    }
}
