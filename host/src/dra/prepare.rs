//! `NodePrepareResources` and `NodeUnprepareResources` for one driver
//! (`docs/dra-api.md` §2; issue 16, item 3).
//!
//! Preparing a claim: read the `ResourceClaim` from the API server (its
//! UID must be the one the kubelet names), take the allocation results of
//! this driver in this node's pool, map each DRA device name back to the
//! backend's device ID, call the backend's `allocate` once per request of
//! the claim (the call the device-plugin path makes, with its deadline,
//! isolation and fault handling), write one CDI spec for the claim (its
//! UID in the file name, one CDI device per request), record the answer in
//! the checkpoint, and answer the kubelet. Every claim gets its own answer
//! or its own error; one bad claim never fails the batch.
//!
//! Both calls are idempotent: a claim in the checkpoint is answered from
//! it, without the API server or the backend, also after a devhost or
//! kubelet restart; unpreparing removes the spec, calls the backend's
//! `release` and forgets the claim, and a claim never prepared (or already
//! unprepared) is a success.
//!
//! What a batch costs (issue 29; `tests/real-peers`' DRA benchmark holds
//! it against a driver on upstream's `kubeletplugin` helper): its new
//! claims are read from the API server at once, before the driver's lock;
//! the lock is taken without a thread hop when no other process holds the
//! checkpoint's; after the backend's calls, the new claims' CDI specs and
//! then the checkpoint are written in one turn off the async threads, the
//! checkpoint flushed with its directory, so it is durable before the
//! kubelet has an answer. Unpreparing removes the batch's specs in one
//! turn, releases, and writes the checkpoint once for the whole batch.
//! Each batch logs where its time went at debug level (`prepare batch`,
//! `unprepare batch`).
//!
//! Admin access (`docs/dra-api.md` §1.1): a device whose allocation
//! result has `adminAccess: true` was given to a monitoring or debug pod
//! beside the device's ordinary claim, if any. It is prepared like any
//! other (the backend's `allocate`, whose edits the container needs), never
//! refused for being prepared for another claim, recorded as such in the
//! checkpoint, not counted as the device's holder, and never `release`d:
//! scrubbing a device because its watcher left would harm its holder.
//!
//! Shared devices (`docs/dra-api.md` §4.4): a result of a device that
//! allows multiple allocations carries `consumedCapacity` and `shareID`;
//! they go to the backend's `allocate` for this claim only
//! ([`crate::model::with_shares`]). Each claim has its own checkpoint
//! entry and CDI spec, so several claims on one device are prepared and
//! unprepared independently.
//!
//! Before any of it, the kubelet's claim and then the claim's allocation
//! are checked against Kubernetes' own limits (`limits`): a claim whose
//! namespace, name or UID no API server would have, or whose allocation
//! no API server would store, is refused on its own.

pub mod limits;
mod read;
pub mod status;

/// Runs file work that blocks (the checkpoint's write and fsync, a claim's
/// CDI spec) so that it does not hold an async worker: on the daemon's
/// multi-thread runtime the worker hands its other tasks on first.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Claims of one batch read from the API server at once (before the
/// batch takes the driver's lock).
const READS_AT_ONCE: usize = 8;

/// Where one batch's time went, for the debug lines `prepare batch` and
/// `unprepare batch` (what the DRA benchmark of `tests/real-peers` reads):
/// each phase summed over the batch's claims.
#[derive(Debug, Default)]
struct Phases {
    /// Reading claims from the API server (the batch's reads run at once).
    read: Duration,
    /// Taking the driver's lock and the checkpoint file's lock.
    lock: Duration,
    /// The backend's `allocate` (or `release`) calls.
    backend: Duration,
    /// Writing (or removing) the claims' CDI specs.
    cdi: Duration,
    /// Writing the checkpoint, flushed.
    checkpoint: Duration,
    /// Writing the claims' `status.devices`.
    status: Duration,
    /// Getting onto a thread that may block for the file work, and back.
    hop: Duration,
}

/// The time since `start`, added to `phase`.
fn add_since(phase: &mut Duration, start: Instant) {
    *phase += start.elapsed();
}

/// Whole microseconds of `duration`, for a log field.
fn us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::ResourceClaim;
use tokio::sync::Mutex;

use super::checkpoint::{Checkpoint, CheckpointLock, PreparedClaim, PreparedDevice};
use super::names;
use crate::backend::handle::BackendHandle;
use crate::cdi;
use crate::device_state::{ResourceState, Snapshot};
use crate::model::Share;
use crate::proto::dra::v1;
use crate::sockets::FileIdentity;

/// Prepares and unprepares the claims of one driver (one resource).
pub struct Preparer {
    driver: String,
    resource: String,
    pool: String,
    client: kube::Client,
    backend: Arc<BackendHandle>,
    state: Arc<ResourceState>,
    /// Where claim specs go and what the runtime will resolve.
    cdi: Arc<cdi::Host>,
    /// The backend's CDI names already reported as unresolvable.
    cdi_dropped: cdi::answer::DroppedNames,
    checkpoint_path: PathBuf,
    /// The checkpoint as on disk; the lock also makes prepares and
    /// unprepares of this driver take turns (each saves the file).
    prepared: Mutex<Checkpoint>,
    /// The checkpoint file as this process last read or wrote it (only
    /// touched under `prepared`'s lock): while the file is that one, a
    /// batch need not read it again. Another process replaces it by a
    /// rename, so its writes show as a new file.
    on_disk: std::sync::Mutex<Option<FileIdentity>>,
    /// Whether the log has said that the backend's annotations cannot
    /// reach containers through DRA (once a driver).
    annotations_said: std::sync::atomic::AtomicBool,
    /// The prepared claims whose `status.devices` entries this process
    /// has written (claims with none are never in it). A prepared claim
    /// with entries and not in it gets them written at its next prepare.
    status_written: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Where a driver keeps its files.
#[derive(Debug, Clone)]
pub struct PreparerFiles {
    /// devhost's CDI side: the spec directory the runtime reads, and what
    /// it will resolve.
    pub cdi: Arc<cdi::Host>,
    /// The checkpoint file of this driver.
    pub checkpoint: PathBuf,
}

impl Preparer {
    /// A preparer for `resource`, served as `driver` in pool `pool`; reads
    /// the checkpoint off the async threads (an unreadable one is an
    /// error: starting without it would prepare claims twice).
    pub async fn new(
        driver: &str,
        resource: &str,
        pool: &str,
        client: kube::Client,
        backend: Arc<BackendHandle>,
        state: Arc<ResourceState>,
        files: PreparerFiles,
    ) -> Result<Self, super::checkpoint::CheckpointError> {
        let path = files.checkpoint.clone();
        let (on_disk, prepared) =
            tokio::task::spawn_blocking(move || (FileIdentity::of(&path), Checkpoint::load(&path))).await.map_err(
                |error| super::checkpoint::CheckpointError::Unreadable {
                    path: files.checkpoint.clone(),
                    why: format!("the read did not finish: {error}"),
                },
            )?;
        let prepared = prepared?;
        crate::telemetry::global().dra().claims_prepared(driver, prepared.claims.len());
        Ok(Preparer {
            driver: driver.to_owned(),
            resource: resource.to_owned(),
            pool: pool.to_owned(),
            client,
            backend,
            state,
            cdi: files.cdi,
            cdi_dropped: cdi::answer::DroppedNames::new(resource),
            annotations_said: std::sync::atomic::AtomicBool::new(false),
            status_written: std::sync::Mutex::default(),
            checkpoint_path: files.checkpoint,
            prepared: Mutex::new(prepared),
            on_disk: std::sync::Mutex::new(on_disk),
        })
    }

    /// Answers a `NodePrepareResources` batch, claim by claim. The claims
    /// new in the batch are recorded in the checkpoint with one write,
    /// before any answer goes out; if that write fails, they are undone
    /// and each is answered with the error.
    pub async fn prepare(&self, request: v1::NodePrepareResourcesRequest) -> v1::NodePrepareResourcesResponse {
        let started = Instant::now();
        let mut phases = Phases::default();
        let mut read_before = self.read_new_claims(&request.claims).await;
        add_since(&mut phases.read, started);
        let locking = Instant::now();
        let held = self.hold().await;
        add_since(&mut phases.lock, locking);
        let (mut prepared, _lock) = match held {
            Ok(held) => held,
            Err(why) => {
                let claims =
                    request.claims.iter().map(|claim| (claim.uid.clone(), self.refused(claim, &why))).collect();
                return v1::NodePrepareResourcesResponse { claims };
            }
        };
        let mut claims = std::collections::HashMap::new();
        let mut specs = Vec::new();
        for claim in request.claims.iter().cloned() {
            let answer =
                match self.prepare_claim(&mut prepared, &claim, read_before.remove(&claim.uid), &mut phases).await {
                    Ok((devices, fresh)) => {
                        if let Some(spec) = fresh {
                            specs.push((claim.clone(), spec));
                        }
                        v1::NodePrepareResourceResponse { devices, error: String::new() }
                    }
                    Err(why) => self.refused(&claim, &why),
                };
            claims.insert(claim.uid, answer);
        }
        // The new claims' CDI specs, then the checkpoint recording the
        // claims whose spec is written: one turn off the async threads.
        let mut new = Vec::new();
        let mut saved = Ok(());
        if !specs.is_empty() {
            let writing = Instant::now();
            let mut unwritten = Vec::new();
            let (entered, saving, left);
            (saved, entered, saving, left) = blocking(|| {
                let entered = Instant::now();
                for (claim, spec) in specs {
                    match cdi::write_claim_spec(&self.cdi.dir, &self.driver, &claim.uid, &spec) {
                        Ok(_) => new.push(claim),
                        Err(why) => {
                            prepared.claims.remove(&claim.uid);
                            unwritten.push((claim, why));
                        }
                    }
                }
                let saving = Instant::now();
                let saved = if new.is_empty() { Ok(()) } else { self.save(&prepared) };
                (saved, entered, saving, Instant::now())
            });
            phases.hop += entered.duration_since(writing) + left.elapsed();
            phases.cdi += saving.duration_since(entered);
            phases.checkpoint += left.duration_since(saving);
            for (claim, why) in unwritten {
                claims.insert(claim.uid.clone(), self.refused(&claim, &why));
            }
        }
        let mut status_to_write = Vec::new();
        if !new.is_empty() {
            match saved {
                Ok(()) => {
                    for claim in &new {
                        let admin_access = prepared
                            .claims
                            .get(&claim.uid)
                            .is_some_and(|done| done.devices.iter().any(|device| device.admin_access));
                        tracing::info!(driver = %self.driver, claim = %format!("{}/{}", claim.namespace, claim.name),
                            uid = %claim.uid, admin_access, "claim prepared");
                    }
                }
                Err(error) => {
                    // Unrecorded, they must not stay prepared: a restart
                    // would not know to undo them.
                    for claim in &new {
                        prepared.claims.remove(&claim.uid);
                        let _ = blocking(|| cdi::remove_claim_spec(&self.cdi.dir, &self.driver, &claim.uid));
                        claims.insert(claim.uid.clone(), self.refused(claim, &error.to_string()));
                    }
                }
            }
        }
        crate::telemetry::global().dra().claims_prepared(&self.driver, prepared.claims.len());
        {
            let written = self.status_written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for claim in &request.claims {
                let answered = claims.get(&claim.uid).is_some_and(|answer| answer.error.is_empty());
                let Some(done) = prepared.claims.get(&claim.uid).filter(|_| answered) else { continue };
                if !done.status.is_empty() && !written.contains(&claim.uid) {
                    status_to_write.push((claim.clone(), done.status.clone()));
                }
            }
        }
        // The status goes out after the driver's lock is let go: a slow
        // API server must not hold up the other batches' claims, and a
        // claim whose status write fails stays prepared (its answer is
        // the error, so the kubelet asks again and the write is retried).
        drop(prepared);
        drop(_lock);
        if !status_to_write.is_empty() {
            let writing = Instant::now();
            for (claim, uid, result) in self.write_statuses(status_to_write).await {
                if let Err(why) = result {
                    claims.insert(uid, self.refused(&claim, &format!("prepared, but {why}")));
                }
            }
            add_since(&mut phases.status, writing);
        }
        tracing::debug!(driver = %self.driver, claims = request.claims.len(), new = new.len(),
            read_us = us(phases.read), lock_us = us(phases.lock), allocate_us = us(phases.backend),
            cdi_us = us(phases.cdi), checkpoint_us = us(phases.checkpoint), status_us = us(phases.status),
            hop_us = us(phases.hop), total_us = us(started.elapsed()), "prepare batch");
        v1::NodePrepareResourcesResponse { claims }
    }

    /// Writes each claim's `status.devices` entries ([`READS_AT_ONCE`] at a
    /// time), noting the claims written.
    async fn write_statuses(
        &self,
        to_write: Vec<(v1::Claim, Vec<serde_json::Value>)>,
    ) -> Vec<(v1::Claim, String, Result<(), String>)> {
        use futures_util::StreamExt;
        futures_util::stream::iter(to_write)
            .map(|(claim, entries)| async move {
                let result = self.write_status(&claim, &entries).await;
                if result.is_ok() {
                    self.status_written
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(claim.uid.clone());
                }
                let uid = claim.uid.clone();
                (claim, uid, result)
            })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await
    }

    async fn write_status(&self, claim: &v1::Claim, entries: &[serde_json::Value]) -> Result<(), String> {
        let entries = entries
            .iter()
            .map(|entry| serde_json::from_value(entry.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("its recorded status cannot be read back: {error}"))?;
        let object = self.read_claim(claim).await?;
        let written = status::write(&self.client, object, &self.driver, &entries).await?;
        if written {
            tracing::info!(driver = %self.driver, claim = %format!("{}/{}", claim.namespace, claim.name),
                uid = %claim.uid, devices = entries.len(), "claim status written");
        }
        Ok(())
    }

    /// Reads the batch's claims that are not prepared yet from the API
    /// server, [`READS_AT_ONCE`] at a time, before the batch takes the
    /// driver's lock: one batch's API calls never hold up another batch's
    /// claims. A claim the checkpoint already holds is answered from it,
    /// without the API server (when another batch holds the lock right
    /// now, every claim is read: the answer is the same).
    async fn read_new_claims(
        &self,
        claims: &[v1::Claim],
    ) -> std::collections::HashMap<String, Result<ResourceClaim, String>> {
        use futures_util::StreamExt;
        let known: std::collections::HashSet<String> = match self.prepared.try_lock() {
            Ok(prepared) => {
                claims.iter().filter(|c| prepared.claims.contains_key(&c.uid)).map(|c| c.uid.clone()).collect()
            }
            Err(_) => std::collections::HashSet::new(),
        };
        let to_read: Vec<v1::Claim> = claims.iter().filter(|claim| !known.contains(&claim.uid)).cloned().collect();
        futures_util::stream::iter(to_read)
            .map(move |claim| async move {
                let read = self.read_claim(&claim).await;
                (claim.uid, read)
            })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await
    }

    /// The checkpoint for one batch: this driver's turn in this process,
    /// the lock across processes (a rolling update's other devhost), and
    /// the file read afresh under it.
    async fn hold(&self) -> Result<(tokio::sync::MutexGuard<'_, Checkpoint>, CheckpointLock), String> {
        let mut prepared = self.prepared.lock().await;
        let known = *self.on_disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The usual case, without a hop to a blocking thread: the lock is
        // free and the file is the one this process last wrote (a look at
        // its inode, which a write of the other devhost would change).
        if let Some(lock) = CheckpointLock::try_take(&self.checkpoint_path).map_err(|error| error.to_string())? {
            let file = FileIdentity::of(&self.checkpoint_path);
            if file.is_some() && file == known {
                return Ok((prepared, lock));
            }
        }
        let path = self.checkpoint_path.clone();
        // The lock, and the file when another process replaced it: both
        // block on the disk (and a planted FIFO would block an open).
        let (lock, file, reread) = tokio::task::spawn_blocking(move || {
            let lock = CheckpointLock::take(&path)?;
            let file = FileIdentity::of(&path);
            let reread = if file.is_none() || file != known { Some(Checkpoint::load(&path)?) } else { None };
            Ok::<_, super::checkpoint::CheckpointError>((lock, file, reread))
        })
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
        if let Some(reread) = reread {
            *prepared = reread;
            *self.on_disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = file;
        }
        Ok((prepared, lock))
    }

    /// Saves the checkpoint (under the lock [`Self::hold`] took) and notes
    /// the file it now is.
    fn save(&self, prepared: &Checkpoint) -> Result<(), super::checkpoint::CheckpointError> {
        let saved = prepared.save(&self.checkpoint_path);
        let file = if saved.is_ok() { FileIdentity::of(&self.checkpoint_path) } else { None };
        *self.on_disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = file;
        saved
    }

    /// The answer for a claim that could not be prepared, logged and
    /// counted.
    fn refused(&self, claim: &v1::Claim, why: &str) -> v1::NodePrepareResourceResponse {
        let error = format!("{}: {why}", limits::claim_label(claim));
        tracing::warn!(driver = %self.driver, "cannot prepare {error}");
        crate::telemetry::global().dra().prepare_failed(&self.driver);
        v1::NodePrepareResourceResponse { devices: Vec::new(), error }
    }

    /// Answers a `NodeUnprepareResources` batch, claim by claim. The
    /// claims undone in the batch leave the checkpoint with one write,
    /// before any answer goes out; if that write fails, they stay recorded
    /// (the file still has them) and each is answered with the error, so
    /// the kubelet asks again and the undo is repeated.
    pub async fn unprepare(&self, request: v1::NodeUnprepareResourcesRequest) -> v1::NodeUnprepareResourcesResponse {
        let started = Instant::now();
        let mut phases = Phases::default();
        let held = self.hold().await;
        add_since(&mut phases.lock, started);
        let (mut prepared, _lock) = match held {
            Ok(held) => held,
            Err(why) => {
                let claims = request
                    .claims
                    .into_iter()
                    .map(|claim| {
                        let error = format!("{}: {why}", limits::claim_label(&claim));
                        (claim.uid, v1::NodeUnprepareResourceResponse { error })
                    })
                    .collect();
                return v1::NodeUnprepareResourcesResponse { claims };
            }
        };
        let mut claims = std::collections::HashMap::new();
        let count = request.claims.len();
        // The CDI specs of the batch's prepared claims go first (before
        // their devices are released), in one turn off the async threads.
        let mut to_remove: Vec<&str> = request
            .claims
            .iter()
            .map(|claim| claim.uid.as_str())
            .filter(|uid| prepared.claims.contains_key(*uid))
            .collect();
        to_remove.sort_unstable();
        to_remove.dedup();
        let mut removed = std::collections::HashMap::new();
        if !to_remove.is_empty() {
            let removing = Instant::now();
            removed = blocking(|| {
                to_remove
                    .into_iter()
                    .map(|uid| (uid.to_owned(), cdi::remove_claim_spec(&self.cdi.dir, &self.driver, uid)))
                    .collect()
            });
            add_since(&mut phases.cdi, removing);
        }
        let mut undone = Vec::new();
        for claim in &request.claims {
            let spec_removed = removed.remove(&claim.uid);
            let error = match self.unprepare_claim(&mut prepared, &claim.uid, spec_removed, &mut phases).await {
                Ok(Some(done)) => {
                    undone.push((claim, done));
                    continue;
                }
                Ok(None) => String::new(),
                Err(why) => self.unprepare_refused(claim, &why),
            };
            claims.insert(claim.uid.clone(), v1::NodeUnprepareResourceResponse { error });
        }
        let done = undone.len();
        if !undone.is_empty() {
            let saving = Instant::now();
            let saved = blocking(|| self.save(&prepared));
            add_since(&mut phases.checkpoint, saving);
            match saved {
                Ok(()) => {
                    let mut written = self.status_written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for (claim, done) in undone {
                        written.remove(&claim.uid);
                        let admin_access = done.devices.iter().any(|device| device.admin_access);
                        tracing::info!(driver = %self.driver, uid = %claim.uid, admin_access, "claim unprepared");
                        claims.insert(claim.uid.clone(), v1::NodeUnprepareResourceResponse { error: String::new() });
                    }
                }
                Err(error) => {
                    // The file still records them: so must this process,
                    // so that the kubelet's next unprepare undoes them again.
                    let error = error.to_string();
                    for (claim, done) in undone {
                        prepared.claims.insert(claim.uid.clone(), done);
                        let error = self.unprepare_refused(claim, &error);
                        claims.insert(claim.uid.clone(), v1::NodeUnprepareResourceResponse { error });
                    }
                }
            }
        }
        crate::telemetry::global().dra().claims_prepared(&self.driver, prepared.claims.len());
        tracing::debug!(driver = %self.driver, claims = count, undone = done, lock_us = us(phases.lock),
            release_us = us(phases.backend), cdi_us = us(phases.cdi), checkpoint_us = us(phases.checkpoint),
            total_us = us(started.elapsed()), "unprepare batch");
        v1::NodeUnprepareResourcesResponse { claims }
    }

    /// The claim's devices, and, when it was prepared just now, its CDI
    /// spec's devices (the claim is then in `prepared`, but neither the
    /// spec nor the checkpoint is written yet).
    async fn prepare_claim(
        &self,
        prepared: &mut Checkpoint,
        claim: &v1::Claim,
        read_before: Option<Result<ResourceClaim, String>>,
        phases: &mut Phases,
    ) -> Result<(Vec<v1::Device>, Option<Vec<(String, crate::model::Allocation)>>), String> {
        // Before anything: its namespace and name become the read's path.
        limits::check_claim(claim)?;
        if let Some(done) = prepared.claims.get(&claim.uid) {
            // Prepared before (the kubelet repeats itself after restarts):
            // the same answer, without the API server or the backend.
            return Ok((done.devices.iter().map(answer).collect(), None));
        }
        let object = match read_before {
            Some(read) => read?,
            // Seen prepared before the lock, undone since: read it now.
            None => {
                let reading = Instant::now();
                let read = self.read_claim(claim).await;
                add_since(&mut phases.read, reading);
                read?
            }
        };
        let results = self.results(&object)?;
        // The backend is called once per request; each request's devices
        // share one CDI device carrying that call's answer.
        let mut by_request: BTreeMap<&str, Vec<&Allocated>> = BTreeMap::new();
        for result in &results {
            by_request.entry(result.request.as_str()).or_default().push(result);
        }
        // The claim's CDI device names must be valid before the backend
        // is asked (a UID of odd characters would fail only at the write).
        for request in by_request.keys() {
            let id = cdi::claim_device_id(&self.driver, &cdi::claim_device_name(&claim.uid, request));
            let (kind, name) = id.split_once('=').unwrap_or((id.as_str(), ""));
            cdi::check_names(kind, Some(name)).map_err(|_| {
                format!(
                    "its UID cannot be part of a CDI device name (letters, digits, '_', '-', '.', ':', starting \
                     with a letter or digit) for request {request}"
                )
            })?;
        }
        let mut cdi_devices = Vec::new();
        let mut devices = Vec::new();
        let mut status_entries: Vec<serde_json::Value> = Vec::new();
        for (request, results) in by_request {
            // Admin access too: the container needs the device's edits;
            // only what unprepare does differs.
            let ids: Vec<String> = results.iter().map(|result| result.id.clone()).collect();
            // What this claim consumes of each shared device goes with the
            // call (in the order of the IDs).
            let shares: Vec<(String, crate::model::Share)> =
                results.iter().filter_map(|result| Some((result.id.clone(), result.share.clone()?))).collect();
            let allocating = Instant::now();
            let allocation = self.backend.allocate_shared(&self.resource, ids, shares).await;
            add_since(&mut phases.backend, allocating);
            let allocation = allocation.map_err(|error| format!("the backend's allocate failed: {error}"))?;
            if !allocation.annotations.is_empty() {
                self.say_annotations_dropped(&allocation.annotations);
            }
            self.status_entries(&results, &allocation.device_status, &mut status_entries)?;
            // The backend's own CDI devices (NVIDIA's, say) are passed on
            // where a spec defines them; its edits go into the claim's spec.
            let mut cdi_ids = allocation.cdi_devices.clone();
            if !cdi_ids.is_empty() {
                // Read now, not from the last second's view: a prepare is
                // rare, and a name it hands out is used for the claim's life.
                let view = self.cdi.registry.now().await;
                cdi::answer::keep_resolvable(&view, &mut cdi_ids, &self.cdi_dropped);
            }
            let has_edits =
                !(allocation.envs.is_empty() && allocation.device_specs.is_empty() && allocation.mounts.is_empty());
            if has_edits {
                let cdi_name = cdi::claim_device_name(&claim.uid, request);
                cdi_ids.insert(0, cdi::claim_device_id(&self.driver, &cdi_name));
                cdi_devices.push((cdi_name, allocation));
            }
            if cdi_ids.is_empty() {
                return Err(format!(
                    "the backend's allocate answer for request {request:?} gives the container nothing \
                     (no environment, device node, mount or CDI device)"
                ));
            }
            for result in results {
                devices.push(PreparedDevice {
                    requests: vec![result.request.clone()],
                    pool: self.pool.clone(),
                    device: result.device.clone(),
                    id: result.id.clone(),
                    cdi_ids: cdi_ids.clone(),
                    admin_access: result.admin_access,
                });
            }
        }
        let answers = devices.iter().map(answer).collect();
        prepared.claims.insert(
            claim.uid.clone(),
            PreparedClaim {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                devices,
                status: status_entries,
            },
        );
        Ok((answers, Some(cdi_devices)))
    }

    /// The error answer for a claim that could not be unprepared, logged.
    fn unprepare_refused(&self, claim: &v1::Claim, why: &str) -> String {
        let error = format!("{}: {why}", limits::claim_label(claim));
        tracing::warn!(driver = %self.driver, "cannot unprepare {error}");
        error
    }

    /// Undoes claim `uid` and takes it out of `prepared` (not yet saved),
    /// returning what it was; `None` when it was not prepared.
    /// `spec_removed` is how the removal of its CDI spec went, if the
    /// batch removed it already.
    async fn unprepare_claim(
        &self,
        prepared: &mut Checkpoint,
        uid: &str,
        spec_removed: Option<std::io::Result<()>>,
        phases: &mut Phases,
    ) -> Result<Option<PreparedClaim>, String> {
        if !prepared.claims.contains_key(uid) {
            // Never prepared here, or already undone: nothing to do.
            return Ok(None);
        }
        let removed = match spec_removed {
            Some(removed) => removed,
            None => {
                let removing = Instant::now();
                let removed = blocking(|| cdi::remove_claim_spec(&self.cdi.dir, &self.driver, uid));
                add_since(&mut phases.cdi, removing);
                removed
            }
        };
        removed.map_err(|error| format!("cannot remove its CDI spec: {error}"))?;
        // A device prepared for admin access is not released: the claim
        // only watched it, and its holder (if any) still uses it. Nor is a
        // shared device (consumable capacity) another prepared claim still
        // holds: releasing scrubs the device under its other users.
        let ids = prepared.to_release(uid);
        if !ids.is_empty() {
            let releasing = Instant::now();
            let released = self.backend.release(&self.resource, ids).await;
            add_since(&mut phases.backend, releasing);
            released.map_err(|error| format!("the backend's release failed (the kubelet will ask again): {error}"))?;
        }
        Ok(prepared.claims.remove(uid))
    }

    /// Says once that the backend's container annotations do not reach
    /// containers on the DRA path: the kubelet's DRA manager hands the
    /// runtime only CDI device IDs, and container runtimes do not copy a
    /// CDI spec's annotations into the container (`docs/dra-api.md` §1).
    fn say_annotations_dropped(&self, annotations: &std::collections::BTreeMap<String, String>) {
        if self.annotations_said.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let keys: Vec<&str> = annotations.keys().map(String::as_str).collect();
        tracing::warn!(
            driver = %self.driver,
            resource = %self.resource,
            annotations = ?keys,
            "the backend's allocate answer carries container annotations, which DRA cannot give a container (the \
             kubelet passes only CDI devices to the runtime); they are left out. Served as a device plugin, the \
             resource keeps them"
        );
    }

    /// Adds the `status.devices` entries of one request's devices, from
    /// what the backend's allocate reported of them (`device_status`), to
    /// `entries`: each checked against the API server's limits, for a
    /// device of the call, once per device and share.
    fn status_entries(
        &self,
        results: &[&Allocated],
        reported: &BTreeMap<String, crate::model::DeviceStatus>,
        entries: &mut Vec<serde_json::Value>,
    ) -> Result<(), String> {
        for (id, device_status) in reported {
            let Some(result) = results.iter().find(|result| &result.id == id) else {
                return Err(format!(
                    "the backend's allocate reported a status for device {}, which is not one of the call's",
                    crate::server::status::echo(id)
                ));
            };
            if device_status.is_empty() {
                continue;
            }
            devhost_abi::partitions::check_device_status(device_status)
                .map_err(|why| format!("the backend's status for device {}: {why}", result.device))?;
            let share_id = result.share.as_ref().and_then(|share| share.share_id.as_deref());
            let entry = status::entry(&self.driver, &self.pool, &result.device, share_id, device_status);
            let entry =
                serde_json::to_value(&entry).map_err(|error| format!("cannot encode a device status: {error}"))?;
            // A device twice in the claim (admin access beside use) has
            // one entry: the API server refuses duplicates.
            let key = |e: &serde_json::Value| (e["pool"].clone(), e["device"].clone(), e["shareID"].clone());
            if !entries.iter().any(|e| key(e) == key(&entry)) {
                entries.push(entry);
            }
        }
        Ok(())
    }

    /// The claim as the API server has it, if it is the one the kubelet
    /// means. kube-rs puts the namespace and name into the path as they
    /// are: only names [`limits::check_claim`] passed (DNS names, nothing
    /// to escape) reach it.
    async fn read_claim(&self, claim: &v1::Claim) -> Result<ResourceClaim, String> {
        limits::check_claim(claim)?;
        let object = read::claim(&self.client, &claim.namespace, &claim.name).await?;
        let uid = object.metadata.uid.as_deref().unwrap_or_default();
        if uid != claim.uid {
            return Err(format!(
                "the ResourceClaim of that name has UID {}: it was deleted and created again",
                crate::server::status::echo(uid)
            ));
        }
        Ok(object)
    }

    /// Each device allocated to the claim by this driver.
    fn results(&self, claim: &ResourceClaim) -> Result<Vec<Allocated>, String> {
        allocated(claim, &self.driver, &self.pool, &self.state.snapshot())
    }
}

/// Each device allocated to `claim` by `driver`, from `pool`, mapped to the
/// backend's IDs of the devices in `snapshot`.
fn allocated(claim: &ResourceClaim, driver: &str, pool: &str, snapshot: &Snapshot) -> Result<Vec<Allocated>, String> {
    let allocation =
        claim.status.as_ref().and_then(|status| status.allocation.as_ref()).ok_or("the claim is not allocated")?;
    let all = allocation.devices.as_ref().and_then(|devices| devices.results.as_deref()).unwrap_or_default();
    limits::check_results(all, driver)?;
    let mut out = Vec::new();
    for result in all {
        if result.driver != driver {
            continue;
        }
        if result.pool != pool {
            return Err(format!(
                "device {} is allocated from pool {:?}, not this node's pool {:?}",
                result.device, result.pool, pool
            ));
        }
        let id = names::device_id(&result.device)
            .filter(|id| snapshot.devices.iter().any(|device| &device.id == id))
            .or_else(|| {
                snapshot
                    .devices
                    .iter()
                    .find(|device| names::device_name(&device.id) == result.device)
                    .map(|device| device.id.clone())
            })
            .ok_or_else(|| format!("device {} is not (or no longer) published by this driver", result.device))?;
        out.push(Allocated {
            request: result.request.clone(),
            device: result.device.clone(),
            id,
            // A bool pointer upstream: unset is false.
            admin_access: result.admin_access == Some(true),
            share: share(result)?,
        });
    }
    if out.is_empty() {
        // The kubelet asks only the drivers an allocation names.
        return Err(format!("no device of driver {driver} is allocated to the claim"));
    }
    Ok(out)
}

/// A share ID longer than this is refused: the API server's are UIDs (36
/// characters).
const MAX_SHARE_ID: usize = 64;
/// Consumed capacities of one result at most: a device has at most 32
/// attributes and capacities together.
const MAX_CONSUMED: usize = 32;

/// What the claim consumes of a shared device (`consumedCapacity`, set
/// only for devices that allow multiple allocations, and `shareID`);
/// `None` for a device allocated whole. Amounts that are no quantity, and
/// share IDs no API server gives, are refused.
fn share(result: &k8s_openapi::api::resource::v1::DeviceRequestAllocationResult) -> Result<Option<Share>, String> {
    if result.consumed_capacity.is_none() && result.share_id.is_none() {
        return Ok(None);
    }
    let consumed = result.consumed_capacity.clone().unwrap_or_default();
    if consumed.len() > MAX_CONSUMED {
        return Err(format!(
            "device {} is allocated with {} consumed capacities; a device has at most {MAX_CONSUMED}",
            result.device,
            consumed.len()
        ));
    }
    let mut amounts = BTreeMap::new();
    for (name, quantity) in consumed {
        let name_ok = !name.is_empty()
            && name.len() <= 63 + 1 + 253
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !name_ok || super::slices::quantity_nanos(&quantity.0).is_none() {
            return Err(format!(
                "device {} is allocated with a consumed capacity that is no capacity name and quantity ({} bytes)",
                result.device,
                name.len() + quantity.0.len()
            ));
        }
        amounts.insert(name, quantity.0);
    }
    if let Some(id) = &result.share_id {
        let id_ok =
            !id.is_empty() && id.len() <= MAX_SHARE_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(format!(
                "device {} is allocated with a shareID of {} bytes that is no UID (at most {MAX_SHARE_ID} of \
                 letters, digits and '-')",
                result.device,
                id.len()
            ));
        }
    }
    Ok(Some(Share { share_id: result.share_id.clone(), consumed: amounts }))
}

/// One device of this driver allocated to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allocated {
    /// The claim's request it satisfies.
    request: String,
    /// Its DRA device name.
    device: String,
    /// The backend's ID of it.
    id: String,
    /// Allocated for administrative access (the result's `adminAccess`).
    admin_access: bool,
    /// What the claim consumes of the device, when it is shared.
    share: Option<Share>,
}

fn answer(device: &PreparedDevice) -> v1::Device {
    v1::Device {
        request_names: device.requests.clone(),
        pool_name: device.pool.clone(),
        device_name: device.device.clone(),
        cdi_device_ids: device.cdi_ids.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Device, Health};

    const DRIVER: &str = "gpu.example.com";

    /// A claim allocated `results` (request, device, adminAccess as the
    /// API server stores it: absent, false or true).
    fn claim(results: &[(&str, &str, Option<bool>)]) -> ResourceClaim {
        let results: Vec<serde_json::Value> = results
            .iter()
            .map(|(request, device, admin)| {
                let mut result =
                    serde_json::json!({"request": request, "driver": DRIVER, "pool": "node-a", "device": device});
                if let Some(admin) = admin {
                    result["adminAccess"] = serde_json::json!(admin);
                }
                result
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "monitoring", "name": "watch", "uid": "uid-1"},
            "spec": {"devices": {"requests": []}},
            "status": {"allocation": {"devices": {"results": results}}},
        }))
        .expect("a ResourceClaim")
    }

    fn gpus() -> Arc<Snapshot> {
        let state = ResourceState::new("example.com/gpu");
        state
            .publish(vec![Device::new("gpu-0", Health::Healthy), Device::new("gpu-1", Health::Healthy)])
            .expect("publish");
        state.snapshot()
    }

    #[test]
    fn a_shared_device_s_consumed_capacity_and_share_id_are_read_and_checked() {
        let mut shared = claim(&[("net", "gpu-0", None), ("whole", "gpu-1", None)]);
        let result = &mut shared.status.as_mut().expect("status").allocation.as_mut().expect("allocation");
        let results = result.devices.as_mut().and_then(|devices| devices.results.as_mut()).expect("results");
        results[0].share_id = Some("6c1b3d0e-4f8a-4b7e-9a51-0d2c6e7f8a91".into());
        results[0].consumed_capacity = Some(BTreeMap::from([
            ("bandwidth".to_owned(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("2G".into())),
            ("queues".to_owned(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into())),
        ]));
        let read = allocated(&shared, DRIVER, "node-a", &gpus()).expect("allocated");
        let share = read[0].share.as_ref().expect("gpu-0 is a share");
        assert_eq!(share.share_id.as_deref(), Some("6c1b3d0e-4f8a-4b7e-9a51-0d2c6e7f8a91"));
        let consumed: Vec<(&str, &str)> = share.consumed.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(consumed, [("bandwidth", "2G"), ("queues", "0")]);
        assert_eq!(read[1].share, None, "a device allocated whole has no share");

        let edit = |change: &dyn Fn(&mut k8s_openapi::api::resource::v1::DeviceRequestAllocationResult)| {
            let mut bad = shared.clone();
            let allocation = bad.status.as_mut().and_then(|status| status.allocation.as_mut()).expect("allocation");
            let results = allocation.devices.as_mut().and_then(|devices| devices.results.as_mut()).expect("results");
            change(&mut results[0]);
            bad
        };
        let long_id = edit(&|result| result.share_id = Some("x".repeat(65)));
        let error = allocated(&long_id, DRIVER, "node-a", &gpus()).expect_err("a share ID no server gives");
        assert!(error.contains("shareID of 65 bytes"), "{error}");
        let no_quantity = edit(&|result| {
            let lots = k8s_openapi::apimachinery::pkg::api::resource::Quantity("lots".into());
            result.consumed_capacity = Some(BTreeMap::from([("bandwidth".to_owned(), lots)]));
        });
        let error = allocated(&no_quantity, DRIVER, "node-a", &gpus()).expect_err("no quantity");
        assert!(error.contains("no capacity name and quantity"), "{error}");
    }

    #[test]
    fn admin_access_is_read_from_each_allocation_result_and_unset_is_false() {
        let claim = claim(&[("watch", "gpu-0", Some(true)), ("use", "gpu-1", None), ("also", "gpu-0", Some(false))]);
        let allocated = allocated(&claim, DRIVER, "node-a", &gpus()).expect("allocated");
        let seen: Vec<(&str, &str, bool)> =
            allocated.iter().map(|a| (a.request.as_str(), a.id.as_str(), a.admin_access)).collect();
        assert_eq!(seen, [("watch", "gpu-0", true), ("use", "gpu-1", false), ("also", "gpu-0", false)]);
    }
}
