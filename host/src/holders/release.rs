//! One task per resource: keeps `devhost_devices_in_use` current and, for
//! a resource whose backend asks for `release` (ABI 1.1), releases the
//! devices that were held and no longer are.
//!
//! A device being released, and one whose release failed, is withheld
//! (advertised Unhealthy, with why), so the kubelet cannot hand it to the
//! next pod half-scrubbed; a failed release is retried with back-off until
//! it succeeds. Each device is released once per time it is freed: the
//! first answer of the kubelet is only a baseline (devhost does not know
//! what was freed while it was not running), and answers the kubelet gives
//! right after a restart only add holders (see `Assignments::trusted`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Assignments, AssignmentsWatch};
use crate::backend::ResourceSpec;
use crate::backend::handle::BackendHandle;
use crate::device_state::{ResourceState, Withholder};
use crate::telemetry;

/// First wait before a failed release is tried again; it doubles.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a failed release.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Follows who holds this resource's devices.
pub struct UsageTask {
    /// The resource.
    pub spec: ResourceSpec,
    /// Its live state (withheld devices are marked here).
    pub state: Arc<ResourceState>,
    /// The backend that releases.
    pub backend: Arc<BackendHandle>,
    /// The kubelet's answers.
    pub assignments: AssignmentsWatch,
    /// Ends the task.
    pub shutdown: CancellationToken,
}

/// A freed device not yet released.
#[derive(Debug)]
struct Pending {
    /// When to (re)try.
    at: Instant,
    /// The wait after the next failure.
    delay: Duration,
    /// Why it is withheld now.
    reason: String,
}

impl UsageTask {
    /// Runs until shutdown.
    pub async fn run(mut self) {
        let resource = self.spec.name.clone();
        // Real device IDs some container held at the last trusted answer;
        // `None` until the first answer.
        let mut held: Option<BTreeSet<String>> = None;
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        let mut assignments = self.assignments.borrow_and_update().clone();
        loop {
            self.observe(assignments.as_deref(), &mut held, &mut pending);
            self.release_due(&mut pending).await;
            let next = pending.values().map(|p| p.at).min();
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                changed = self.assignments.changed() => {
                    if changed.is_err() {
                        // The follower ended: the daemon is stopping.
                        self.shutdown.cancelled().await;
                        break;
                    }
                    assignments = self.assignments.borrow_and_update().clone();
                }
                () = sleep_until(next), if next.is_some() => {}
            }
        }
        telemetry::global().devices_in_use(&resource, None);
    }

    /// Takes in one answer (or its absence).
    fn observe(
        &self,
        assignments: Option<&Assignments>,
        held: &mut Option<BTreeSet<String>>,
        pending: &mut BTreeMap<String, Pending>,
    ) {
        let resource = &self.spec.name;
        let Some(assignments) = assignments else {
            telemetry::global().devices_in_use(resource, None);
            return;
        };
        let snapshot = self.state.snapshot();
        // The kubelet names replicas of a shared device; release is about
        // the device itself.
        let now: BTreeSet<String> = assignments
            .holdings
            .get(resource)
            .into_iter()
            .flat_map(|devices| devices.keys())
            .map(|id| snapshot.real_device(id).map_or_else(|| id.clone(), |device| device.id.clone()))
            .collect();
        telemetry::global().devices_in_use(resource, Some(now.len()));
        if !self.spec.release_required {
            return;
        }
        let before = held.get_or_insert_with(|| now.clone());
        if assignments.trusted {
            for freed in before.difference(&now) {
                tracing::debug!(resource, device = %freed, "no container holds the device any more: releasing it");
                pending.insert(
                    freed.clone(),
                    Pending {
                        at: Instant::now(),
                        delay: FIRST_RETRY,
                        reason: "being released for its next tenant".into(),
                    },
                );
            }
            *before = now.clone();
        } else {
            before.extend(now.iter().cloned());
        }
        // A device held again is in use: scrubbing it now would harm its
        // holder, and the kubelet only gave it out while it was Healthy.
        let before_count = pending.len();
        pending.retain(|id, _| !now.contains(id));
        if pending.len() != before_count {
            self.withhold(pending);
        }
    }

    /// Releases every pending device that is due, in one call.
    async fn release_due(&self, pending: &mut BTreeMap<String, Pending>) {
        let now = Instant::now();
        let due: Vec<String> = pending.iter().filter(|(_, p)| p.at <= now).map(|(id, _)| id.clone()).collect();
        if due.is_empty() {
            return;
        }
        for id in &due {
            if let Some(entry) = pending.get_mut(id).filter(|entry| !entry.reason.starts_with("being released")) {
                entry.reason = format!("being released again ({})", entry.reason);
            }
        }
        self.withhold(pending);
        let resource = &self.spec.name;
        let started = std::time::Instant::now();
        let result = self.backend.release(resource, due.clone()).await;
        let elapsed = started.elapsed();
        telemetry::global().released(resource, due.len(), result.is_ok(), elapsed);
        match result {
            Ok(()) => {
                tracing::info!(resource, devices = ?due, ?elapsed, "released for their next tenant");
                for id in &due {
                    pending.remove(id);
                }
            }
            Err(error) => {
                let retry = pending.get(&due[0]).map_or(FIRST_RETRY, |p| p.delay);
                tracing::warn!(resource, devices = ?due, %error, retry_in = ?retry, "release failed: the devices stay Unhealthy until a release succeeds");
                for id in &due {
                    if let Some(entry) = pending.get_mut(id) {
                        entry.at = Instant::now() + entry.delay;
                        entry.delay = (entry.delay * 2).min(MAX_RETRY);
                        entry.reason = format!("release failed: {error}");
                    }
                }
            }
        }
        self.withhold(pending);
    }

    fn withhold(&self, pending: &BTreeMap<String, Pending>) {
        let withheld: HashMap<String, String> =
            pending.iter().map(|(id, entry)| (id.clone(), entry.reason.clone())).collect();
        self.state.set_withheld(Withholder::Release, withheld);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
