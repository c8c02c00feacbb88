//! Keeping a driver's ResourceSlices on the API server equal to its device
//! state, gently (`docs/dra-api.md` §4; issue 16, item 4):
//!
//! * **Latest state wins.** The publisher reads the device state through a
//!   watch channel: however many changes happen while it writes or waits,
//!   the next round publishes only the newest.
//! * **At most one round of writes a second** per driver and node (a round
//!   brings every slice of the pool to one new generation), and **none when
//!   nothing changed**: a round compares what it would publish with what
//!   the server holds and writes only on a difference.
//! * **Generations only go up.** A change bumps the pool's generation on
//!   every slice; a restarted devhost first lists the slices it published
//!   before (by the driver label and the node), continues from the highest
//!   generation found, keeps them as they are when they already say the
//!   right thing, and otherwise replaces them and deletes the extra ones.
//! * **What the server holds is read again** when the kubelet registers
//!   the driver (a restarted kubelet deletes a node's slices of drivers
//!   not yet back) and every five minutes, so slices someone deleted are
//!   published again; a read that finds them right writes nothing.
//! * **An unreachable API server blocks nothing else.** A failed round is
//!   retried with back-off (1 s doubling to 30 s) on the newest state, the
//!   next round reads the server afresh, and the kubelet side (health,
//!   prepared claims) never waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::slices::{self, DRIVER_LABEL, SliceSource};
use crate::device_state::Snapshot;

/// How often the server's slices are read again without a cause.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);

/// How gently the publisher writes.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// The least time between two rounds of writes.
    pub min_interval: Duration,
    /// The first wait after a failed round.
    pub backoff_start: Duration,
    /// The longest wait after failed rounds (the wait doubles up to it).
    pub backoff_max: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            min_interval: Duration::from_secs(1),
            backoff_start: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the publisher has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Rounds that ended in step with the state they read, written or not.
    pub rounds: u64,
    /// The pool's generation on the server after the last such round.
    pub generation: i64,
    /// Creates, replaces and deletes that succeeded.
    pub writes: u64,
    /// Why the last round failed; `None` after a round that did not.
    pub error: Option<String>,
}

/// Publishes one driver's pool on one node.
pub struct SlicePublisher {
    slices: Api<ResourceSlice>,
    nodes: Api<Node>,
    driver: String,
    node: String,
    taints: bool,
    pacing: Pacing,
    /// The Node as owner, once looked up (`Some(None)`: the Node was not
    /// found, the slices go without an owner).
    owner: Option<Option<OwnerReference>>,
    /// The pool's slices on the server by name, as last read or written;
    /// `None` until listed, and again after a failed round so that the next
    /// one reads the server afresh.
    held: Option<BTreeMap<String, ResourceSlice>>,
    generation: i64,
    writes: u64,
    progress: watch::Sender<Progress>,
    resync: Arc<Notify>,
}

impl SlicePublisher {
    /// A publisher of `driver`'s pool on `node`; `taints` says whether the
    /// cluster has device taints (see [`SliceSource::taints`]).
    pub fn new(client: kube::Client, driver: &str, node: &str, taints: bool, pacing: Pacing) -> Self {
        SlicePublisher {
            slices: Api::all(client.clone()),
            nodes: Api::all(client),
            driver: driver.to_owned(),
            node: node.to_owned(),
            taints,
            pacing,
            owner: None,
            held: None,
            generation: 0,
            writes: 0,
            progress: watch::Sender::new(Progress::default()),
            resync: Arc::new(Notify::new()),
        }
    }

    /// Notified, the publisher reads the server's slices again and
    /// publishes what is missing or wrong (the kubelet registered the
    /// driver: a restarted kubelet deletes slices).
    pub fn resync(&self) -> Arc<Notify> {
        self.resync.clone()
    }

    /// Follows what the publisher does.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Publishes `state` until `shutdown`, or until the state's sender is
    /// gone. The slices stay on the server (a restarted devhost adopts
    /// them); [`SlicePublisher::remove`] deletes them.
    pub async fn run(&mut self, mut state: watch::Receiver<Arc<Snapshot>>, shutdown: CancellationToken) {
        let mut backoff = self.pacing.backoff_start;
        let mut not_before = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(not_before) => {}
                () = shutdown.cancelled() => return,
            }
            let snapshot = state.borrow_and_update().clone();
            // A hung API server holds a round for at most the client's
            // timeout, and never holds up a stop.
            let round = tokio::select! {
                round = self.round(&snapshot) => round,
                () = shutdown.cancelled() => return,
            };
            match round {
                Ok(wrote) => {
                    backoff = self.pacing.backoff_start;
                    if wrote {
                        not_before = Instant::now() + self.pacing.min_interval;
                        tracing::info!(driver = %self.driver, node = %self.node, generation = self.generation,
                            "ResourceSlices published");
                    }
                    self.report(None);
                    tokio::select! {
                        changed = state.changed() => if changed.is_err() { return },
                        () = self.resync.notified() => self.held = None,
                        () = tokio::time::sleep(RESYNC_EVERY) => self.held = None,
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(error) => {
                    tracing::warn!(driver = %self.driver, node = %self.node, %error, retry_in = ?backoff,
                        "could not publish the ResourceSlices; retrying with the newest device state \
                         (claims and health keep being served)");
                    self.report(Some(error.to_string()));
                    not_before = Instant::now() + backoff;
                    backoff = (backoff * 2).min(self.pacing.backoff_max);
                }
            }
        }
    }

    /// Deletes every slice of the pool (the resource is no longer served).
    pub async fn remove(&mut self) -> Result<(), kube::Error> {
        self.held = None;
        for name in self.list().await?.into_keys() {
            self.delete(&name).await?;
        }
        tracing::info!(driver = %self.driver, node = %self.node, "ResourceSlices deleted");
        Ok(())
    }

    fn report(&self, error: Option<String>) {
        let (generation, writes) = (self.generation, self.writes);
        let new_writes = writes.saturating_sub(self.progress.borrow().writes);
        crate::telemetry::global().dra().published(&self.driver, new_writes, error.is_none());
        self.progress.send_modify(|progress| {
            if error.is_none() {
                progress.rounds += 1;
                progress.generation = generation;
            }
            progress.writes = writes;
            progress.error = error;
        });
    }

    /// Brings the server in line with `snapshot`; whether anything was
    /// written.
    async fn round(&mut self, snapshot: &Snapshot) -> Result<bool, kube::Error> {
        if self.owner.is_none() {
            self.owner = Some(self.node_owner().await?);
        }
        let mut held = match self.held.take() {
            Some(held) => held,
            None => {
                let listed = self.list().await?;
                let highest = listed.values().map(|slice| slice.spec.pool.generation).max().unwrap_or(0);
                self.generation = self.generation.max(highest);
                listed
            }
        };
        if unchanged(&held, &self.desired(snapshot)) {
            self.held = Some(held);
            return Ok(false);
        }
        self.generation += 1;
        let desired = self.desired(snapshot);
        let wanted: BTreeSet<String> = desired.iter().filter_map(|slice| slice.metadata.name.clone()).collect();
        let params = PostParams::default();
        for mut slice in desired {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let written = match held.get(&name) {
                Some(current) => {
                    slice.metadata.resource_version = current.metadata.resource_version.clone();
                    self.slices.replace(&name, &params, &slice).await?
                }
                None => self.slices.create(&params, &slice).await?,
            };
            self.writes += 1;
            held.insert(name, written);
        }
        let stale: Vec<String> = held.keys().filter(|name| !wanted.contains(*name)).cloned().collect();
        for name in stale {
            self.delete(&name).await?;
            held.remove(&name);
        }
        self.held = Some(held);
        Ok(true)
    }

    fn desired(&self, snapshot: &Snapshot) -> Vec<ResourceSlice> {
        let source = SliceSource {
            driver: &self.driver,
            node: &self.node,
            generation: self.generation,
            owner: self.owner.clone().flatten(),
            taints: self.taints,
        };
        slices::slices(&source, snapshot)
    }

    /// The slices this driver published for this node, by name.
    async fn list(&self) -> Result<BTreeMap<String, ResourceSlice>, kube::Error> {
        let params = ListParams::default()
            .labels(&format!("{DRIVER_LABEL}={}", self.driver))
            .fields(&format!("spec.nodeName={}", self.node));
        let listed = self.slices.list(&params).await?;
        Ok(listed
            .items
            .into_iter()
            // The label is ours, but only the spec says what a slice is.
            .filter(|slice| slice.spec.driver == self.driver)
            .filter_map(|slice| Some((slice.metadata.name.clone()?, slice)))
            .collect())
    }

    async fn delete(&mut self, name: &str) -> Result<(), kube::Error> {
        match self.slices.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                self.writes += 1;
                Ok(())
            }
            // Gone already: what we wanted.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The Node as the slices' owner, so they go with it; `None` when
    /// there is no such Node (then nothing removes them but devhost).
    async fn node_owner(&self) -> Result<Option<OwnerReference>, kube::Error> {
        match self.nodes.get(&self.node).await {
            Ok(node) => Ok(node.metadata.uid.map(|uid| OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: self.node.clone(),
                uid,
                controller: Some(true),
                block_owner_deletion: None,
            })),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::warn!(node = %self.node, "no Node object of this name: the ResourceSlices get no owner");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// Whether the server already holds exactly `desired` (names, specs,
/// labels and owners; server-set metadata aside).
fn unchanged(held: &BTreeMap<String, ResourceSlice>, desired: &[ResourceSlice]) -> bool {
    held.len() == desired.len()
        && desired.iter().all(|want| {
            let name = want.metadata.name.as_deref().unwrap_or_default();
            held.get(name).is_some_and(|have| {
                have.spec == want.spec
                    && have.metadata.labels == want.metadata.labels
                    && have.metadata.owner_references == want.metadata.owner_references
            })
        })
}

/// A client for the API server at `url` (plain HTTP or HTTPS without
/// credentials: the fake API server of the tests and the demo).
pub fn client_for_url(url: &str) -> Result<kube::Client, String> {
    let uri = url.parse().map_err(|error| format!("{url}: not a URL: {error}"))?;
    super::api_client(kube::Config::new(uri))
}
