//! The spec file of a resource served with `cdi = true`: one entry per
//! device with that device's own edits (its device nodes and mounts, as
//! its single-device `allocate` answers them), kept current as devices
//! come and go, rewritten if someone removes or changes it, and removed
//! when the last instance serving the resource stops.
//!
//! A device that another spec file also names (a vendor's spec of the same
//! kind) is left out: devhost does not make a vendor's device unresolvable
//! or shadow it; the clash is logged once, counted, and shown by
//! `devhost list`. Who writes the file when two instances serve the
//! resource is [`super::owners`]' business.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::owners::{self, OWNER_ANNOTATION, STARTED_ANNOTATION, Share, WRITER_ANNOTATION};
use super::registry;
use super::spec::{CDI_VERSION, ContainerEdits, Spec, SpecDevice, device_edits, invalid_edits, write_atomically};
use super::{Host, names};
use crate::backend::handle::BackendHandle;
use crate::device_state::ResourceState;

/// First wait before a failed spec write is tried again.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between tries of a failed write.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How often the file is read back to see that it is still as written.
const VERIFY_EVERY: Duration = Duration::from_secs(10);
/// How often it is looked at while another instance is involved (one
/// writes it, or this one carries another's devices).
const SHARED_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Keeps the spec file of one resource current until `stop`, then removes
/// it unless another instance still serves it.
pub async fn maintain(
    host: Arc<Host>,
    resource: String,
    state: Arc<ResourceState>,
    backend: Arc<BackendHandle>,
    stop: CancellationToken,
) {
    let path = names::spec_path(&host.dir, &resource);
    if let Err(error) = host.instance.announce(&host.dir) {
        tracing::warn!(resource, dir = %host.dir.display(), %error, "cannot take this instance's CDI liveness lock; another devhost sharing the directory will count it stopped");
    }
    let mut writer = SpecWriter::new(host.clone(), path.clone(), resource.clone());
    let share = writer.share().await;
    let mut learned: BTreeMap<String, Option<ContainerEdits>> = BTreeMap::new();
    let mut clashes = Clashes::default();
    let mut changes = state.subscribe();
    loop {
        let ids: Vec<String> = changes.borrow_and_update().devices.iter().map(|d| d.id.clone()).collect();
        learned.retain(|id, _| ids.contains(id));
        for id in &ids {
            if !learned.contains_key(id)
                && let Some(edits) = learn(&resource, id, &backend).await
            {
                learned.insert(id.clone(), edits);
            }
        }
        let view = host.registry.now().await;
        let clashing: BTreeSet<&String> = ids.iter().filter(|id| clashes.check(&view, &resource, id, &path)).collect();
        let entries: Vec<(String, ContainerEdits)> = ids
            .iter()
            .filter(|id| !clashing.contains(id))
            .filter_map(|id| Some((id.clone(), learned.get(id)?.clone()?)))
            .collect();
        clashes.report(&resource);
        // The directory is the operator's (a hung file system, a FIFO
        // planted at the path): its file work runs off the async threads.
        let changed;
        (writer, changed) = match tokio::task::spawn_blocking(move || {
            let changed = writer.keep(entries);
            (writer, changed)
        })
        .await
        {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(resource, %error, "the CDI spec writer failed; the spec is left as it is");
                return;
            }
        };
        if changed {
            // Answers from now on see the file as written.
            host.registry.now().await;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(writer.next_check()) => {}
        }
    }
    crate::telemetry::global().cdi().clashing_devices(&resource, 0);
    let _ = tokio::task::spawn_blocking(move || writer.remove(share)).await;
}

/// A device's own edits, from its single-device `allocate`: `Some(None)`
/// for a device with none (it gets no entry and no CDI name), `None` if
/// they cannot be learned yet (tried again at the next look).
async fn learn(resource: &str, id: &str, backend: &BackendHandle) -> Option<Option<ContainerEdits>> {
    if let Err(message) = names::check_names(resource, Some(id)) {
        tracing::error!(resource, device_id = %id, "left out of the CDI spec (answered without a CDI name): {message}");
        return Some(None);
    }
    match backend.allocate(resource, vec![id.to_owned()]).await {
        Ok(allocation) => {
            let edits = device_edits(&allocation);
            if let Some(why) = invalid_edits(&allocation, &edits) {
                tracing::error!(resource, device_id = %id, "left out of the CDI spec (answered without a CDI name): {why}");
                return Some(None);
            }
            Some((!edits.is_empty()).then_some(edits))
        }
        Err(error) => {
            tracing::warn!(resource, device_id = %id, %error, "cannot learn the device's CDI edits yet; it is answered without a CDI name meanwhile");
            None
        }
    }
}

/// Devices of this resource that another spec file names too.
#[derive(Default)]
struct Clashes {
    /// Device → the other files, as last seen.
    now: BTreeMap<String, Vec<PathBuf>>,
    /// The (device, file) pairs already logged.
    said: BTreeSet<(String, PathBuf)>,
}

impl Clashes {
    /// Whether another file names `id` (recorded for [`Clashes::report`]).
    fn check(&mut self, view: &registry::View, resource: &str, id: &str, own: &Path) -> bool {
        let name = names::device_name(resource, id);
        let others: Vec<PathBuf> = view.others_defining(&name, own).map(|file| file.to_path_buf()).collect();
        if others.is_empty() {
            self.now.remove(id);
            return false;
        }
        self.now.insert(id.to_owned(), others);
        true
    }

    /// Logs each new clash once and sets the gauge.
    fn report(&mut self, resource: &str) {
        for (id, files) in &self.now {
            for file in files {
                if self.said.insert((id.clone(), file.clone())) {
                    tracing::warn!(
                        resource,
                        device_id = %id,
                        file = %file.display(),
                        "another CDI spec defines {}; devhost leaves the device out of its own spec (two definitions would make it resolve from neither, or shadow the other) and gives it no CDI name of its own (the backend's names are passed on where they resolve)",
                        names::device_name(resource, id)
                    );
                }
            }
        }
        self.said.retain(|(id, _)| self.now.contains_key(id));
        crate::telemetry::global().cdi().clashing_devices(resource, self.now.len());
    }
}

/// A failed write, compared by its cause: the message names a temporary
/// file whose name differs at every try, so two tries failing alike (a
/// read-only file system) must not read as two errors to log.
struct Failure {
    kind: std::io::ErrorKind,
    errno: Option<i32>,
    text: String,
}

impl Failure {
    fn same_as(&self, other: &Failure) -> bool {
        (self.kind, self.errno) == (other.kind, other.errno)
    }
}

/// Writes one spec file and keeps it written: retries failed writes with
/// back-off, rewrites a file someone removed or changed, steps back for a
/// newer instance and carries an older live one's devices.
struct SpecWriter {
    host: Arc<Host>,
    path: PathBuf,
    resource: String,
    /// What this instance last wrote.
    written: Option<Vec<u8>>,
    /// While writes fail: the last error and the back-off.
    failing: Option<(Failure, Duration)>,
    /// The newer instance writing the file, while this one stands back.
    yielded_to: Option<String>,
    /// Whether the file holds another live instance's devices.
    carrying: bool,
    /// When the file was last looked at.
    checked: Instant,
}

impl SpecWriter {
    fn new(host: Arc<Host>, path: PathBuf, resource: String) -> Self {
        SpecWriter {
            host,
            path,
            resource,
            written: None,
            failing: None,
            yielded_to: None,
            carrying: false,
            checked: Instant::now(),
        }
    }

    /// This instance's share in the file; `None` (logged) if the lock file
    /// cannot be made: then the spec is written but never removed.
    async fn share(&self) -> Option<Share> {
        match Share::take(&self.path).await {
            Ok(share) => Some(share),
            Err(error) => {
                let lock = Share::path_for(&self.path);
                tracing::error!(resource = %self.resource, file = %lock.display(), %error, "cannot lock the CDI spec; it will be left in place when devhost stops");
                None
            }
        }
    }

    /// Makes the file hold `entries` (this instance's devices), unless a
    /// newer instance writes it; whether the file changed.
    fn keep(&mut self, entries: Vec<(String, ContainerEdits)>) -> bool {
        self.checked = Instant::now();
        let me = &self.host.instance;
        let on_disk = registry::read_bounded(&self.path).ok();
        let current = on_disk.as_deref().and_then(|text| super::spec::parse(&self.path, text).ok());
        let writer = current.as_ref().and_then(|spec| {
            let id = spec.annotations.get(WRITER_ANNOTATION)?;
            let started = spec.annotations.get(STARTED_ANNOTATION)?.parse::<u128>().ok()?;
            Some((id.clone(), started))
        });
        if let Some((id, started)) = &writer
            && me.is_older_than(id, *started)
            && owners::is_alive(&self.host.dir, id)
        {
            if self.yielded_to.as_ref() != Some(id) {
                tracing::info!(resource = %self.resource, file = %self.path.display(), writer = %id, "a newer devhost instance writes this CDI spec now; this one stops writing it and answers only with the entries it finds there");
                self.yielded_to = Some(id.clone());
            }
            self.written = None;
            self.failing = None;
            return false;
        }
        if let Some(newer) = self.yielded_to.take() {
            tracing::info!(resource = %self.resource, file = %self.path.display(), writer = %newer, "the newer devhost instance that wrote this CDI spec has stopped; this one writes it again");
        }
        let spec = self.spec(entries, current.as_ref());
        if spec.devices.is_empty() {
            // CDI refuses a spec without devices.
            self.written = None;
            return on_disk.is_some() && std::fs::remove_file(&self.path).is_ok();
        }
        let text = match serde_json::to_vec_pretty(&spec) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(resource = %self.resource, %error, "cannot encode the CDI spec");
                return false;
            }
        };
        if on_disk.as_ref() == Some(&text) {
            self.written = Some(text);
            return false;
        }
        if self.written.is_some() && on_disk != self.written {
            tracing::warn!(resource = %self.resource, file = %self.path.display(), "the CDI spec was removed or changed by someone else; writing it again");
        }
        self.write(text, spec.devices.len())
    }

    /// The spec this instance writes: its own entries, then those of other
    /// live instances found in `current` that it does not define itself
    /// (an older instance may still hand them out).
    fn spec(&mut self, entries: Vec<(String, ContainerEdits)>, current: Option<&Spec>) -> Spec {
        let me = &self.host.instance;
        let own: BTreeSet<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let mut devices: Vec<SpecDevice> = entries
            .into_iter()
            .map(|(name, container_edits)| SpecDevice {
                name,
                annotations: [(OWNER_ANNOTATION.to_owned(), me.id.clone())].into(),
                container_edits,
            })
            .collect();
        let mut alive: HashMap<String, bool> = HashMap::new();
        let carried: Vec<SpecDevice> = current
            .into_iter()
            .flat_map(|spec| spec.devices.iter())
            .filter(|device| !own.contains(&device.name))
            .filter(|device| {
                let Some(owner) = device.annotations.get(OWNER_ANNOTATION).filter(|owner| **owner != me.id) else {
                    return false;
                };
                *alive.entry(owner.clone()).or_insert_with(|| owners::is_alive(&self.host.dir, owner))
            })
            .cloned()
            .collect();
        self.carrying = !carried.is_empty();
        devices.extend(carried);
        Spec {
            cdi_version: CDI_VERSION.into(),
            kind: self.resource.clone(),
            annotations: [
                (WRITER_ANNOTATION.to_owned(), me.id.clone()),
                (STARTED_ANNOTATION.to_owned(), me.started.to_string()),
            ]
            .into(),
            devices,
            container_edits: ContainerEdits::default(),
        }
    }

    /// Writes the file; whether it was written.
    fn write(&mut self, text: Vec<u8>, devices: usize) -> bool {
        match write_atomically(&self.path, &text) {
            Ok(()) => {
                if let Some((failure, _)) = self.failing.take() {
                    tracing::info!(resource = %self.resource, file = %self.path.display(), "CDI spec written after earlier failures ({})", failure.text);
                } else {
                    tracing::info!(resource = %self.resource, file = %self.path.display(), devices, "CDI spec written");
                }
                self.written = Some(text);
                true
            }
            Err(error) => {
                let failure = Failure { kind: error.kind(), errno: error.raw_os_error(), text: error.to_string() };
                let retry = match &self.failing {
                    Some((previous, retry)) => {
                        if !previous.same_as(&failure) {
                            tracing::error!(resource = %self.resource, file = %self.path.display(), %error, "cannot write the CDI spec; its devices are answered without CDI names until it is written");
                        }
                        (*retry * 2).min(MAX_RETRY)
                    }
                    None => {
                        tracing::error!(resource = %self.resource, file = %self.path.display(), %error, "cannot write the CDI spec; its devices are answered without CDI names until it is written");
                        FIRST_RETRY
                    }
                };
                self.failing = Some((failure, retry));
                self.written = None;
                false
            }
        }
    }

    /// How long until the file needs looking at again.
    fn next_check(&self) -> Duration {
        if let Some((_, retry)) = &self.failing {
            return *retry;
        }
        let every = if self.yielded_to.is_some() || self.carrying { SHARED_CHECK_EVERY } else { VERIFY_EVERY };
        every.saturating_sub(self.checked.elapsed())
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
