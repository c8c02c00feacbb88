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
//!   not yet back), when the pool's watch (`watch`) says a slice was
//!   deleted or changed by someone else (the kubelet's deletion can land
//!   after the registration; issue 24, item 3), and every five minutes, so
//!   slices someone deleted are published again; a read that finds them
//!   right writes nothing.
//! * **"Right" means what the server would store**, not the bytes devhost
//!   would send: a taint's `timeAdded` the server stamped, a quantity it
//!   wrote in its canonical form or an empty list it left out is no change
//!   (`slices::stores_as`), and a taint that stays keeps its `timeAdded`
//!   when the slice is rewritten (issue 24, item 5).
//! * **An unreachable API server blocks nothing else.** A failed round is
//!   retried with back-off (1 s doubling to 30 s) on the newest state, the
//!   next round reads the server afresh, and the kubelet side (health,
//!   prepared claims) never waits for it.

mod watch;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::{Notify, mpsc, watch as channel};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::watch::{SliceEvent, SliceWatch};
use super::slices::{self, DRIVER_LABEL, SliceSource};
use crate::device_state::Snapshot;

/// How often the server's slices are read again without a cause.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// How long one watch of the pool's slices runs before the server ends it
/// and devhost opens the next (kube-rs's default; client-go's reflector
/// picks 5 to 10 minutes).
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// The resourceVersions of its own last writes the publisher remembers, to
/// tell the watch's echo of them from someone else's change.
const OWN_VERSIONS: usize = 64;
/// Watch events waiting for the publisher (it reads them between rounds).
const EVENT_QUEUE: usize = 256;

/// How gently the publisher writes and reads.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// The least time between two rounds of writes (and between two reads
    /// a watch event causes).
    pub min_interval: Duration,
    /// The first wait after a failed round (or a failed watch).
    pub backoff_start: Duration,
    /// The longest wait after failed rounds (the wait doubles up to it).
    pub backoff_max: Duration,
    /// How often the server's slices are read again without a cause
    /// ([`RESYNC_EVERY`]; tests shorten it to compress hours).
    pub resync: Duration,
    /// How long one watch runs before the server ends it
    /// ([`WATCH_TIMEOUT`], sent as `timeoutSeconds`, whole seconds).
    pub watch_timeout: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            min_interval: Duration::from_secs(1),
            backoff_start: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            resync: RESYNC_EVERY,
            watch_timeout: WATCH_TIMEOUT,
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
    /// The resourceVersions its own recent writes got, newest last.
    own_versions: VecDeque<String>,
    /// Where the pool's slices are watched from (a client without a read
    /// timeout: see [`watch_client`]); `None`: not watched.
    watch: Option<Api<ResourceSlice>>,
    progress: channel::Sender<Progress>,
    resync: Arc<Notify>,
    /// The resource's counter sets (partitionable devices), published in
    /// slices of their own beside the devices that consume them.
    counter_sets: Arc<Vec<crate::model::CounterSet>>,
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
            own_versions: VecDeque::new(),
            watch: None,
            progress: channel::Sender::new(Progress::default()),
            resync: Arc::new(Notify::new()),
            counter_sets: Arc::default(),
        }
    }

    /// Also publishes `counter_sets`, the resource's counter sets, in
    /// slices of their own (`docs/dra-api.md` §4.3); the devices' own
    /// `consumesCounters` come with the devices. None changes nothing.
    #[must_use]
    pub fn with_counter_sets(mut self, counter_sets: Arc<Vec<crate::model::CounterSet>>) -> Self {
        self.counter_sets = counter_sets;
        self
    }

    /// Also watches the pool's slices through `client` while it runs, so a
    /// slice deleted or changed behind its back is published again within
    /// a second instead of at the next re-read. `client` must have no read
    /// timeout shorter than [`Pacing::watch_timeout`] ([`watch_client`]):
    /// a quiet watch reads nothing for minutes.
    #[must_use]
    pub fn watching(mut self, client: kube::Client) -> Self {
        self.watch = Some(Api::all(client));
        self
    }

    /// Notified, the publisher reads the server's slices again and
    /// publishes what is missing or wrong (the kubelet registered the
    /// driver: a restarted kubelet deletes slices).
    pub fn resync(&self) -> Arc<Notify> {
        self.resync.clone()
    }

    /// Follows what the publisher does.
    pub fn progress(&self) -> channel::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Publishes `state` until `shutdown`, or until the state's sender is
    /// gone. The slices stay on the server (a restarted devhost adopts
    /// them); [`SlicePublisher::remove`] deletes them.
    pub async fn run(&mut self, state: channel::Receiver<Arc<Snapshot>>, shutdown: CancellationToken) {
        let Some(api) = self.watch.clone() else {
            self.publish(state, None, shutdown).await;
            return;
        };
        let (sender, events) = mpsc::channel(EVENT_QUEUE);
        let watch = SliceWatch::new(api, self.selector(), &self.driver, &self.node, &self.pacing);
        // The watch lives exactly as long as the publishing: it runs in
        // this task, beside it, and stops when it returns.
        let watching = shutdown.child_token();
        let publishing = async {
            self.publish(state, Some(events), shutdown).await;
            watching.cancel();
        };
        tokio::join!(publishing, watch.run(sender, watching.clone()));
    }

    async fn publish(
        &mut self,
        mut state: channel::Receiver<Arc<Snapshot>>,
        mut events: Option<mpsc::Receiver<SliceEvent>>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = self.pacing.backoff_start;
        let mut not_before = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(not_before) => {}
                () = shutdown.cancelled() => return,
            }
            if self.held.is_none() {
                // The list this round reads is newer than every event
                // already queued.
                while let Some(Ok(_)) = events.as_mut().map(mpsc::Receiver::try_recv) {}
            }
            let snapshot = state.borrow_and_update().clone();
            let started = Instant::now();
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
                    let resync_at = Instant::now() + self.pacing.resync;
                    loop {
                        tokio::select! {
                            changed = state.changed() => if changed.is_err() { return } else { break },
                            () = self.resync.notified() => { self.held = None; break }
                            () = tokio::time::sleep_until(resync_at) => { self.held = None; break }
                            event = next_event(&mut events) => if self.is_news(&event) {
                                if event == SliceEvent::Restarted {
                                    // Changes while nothing watched are unknown (a
                                    // watch's first start, or after a 410).
                                    tracing::debug!(driver = %self.driver, node = %self.node,
                                        "the slice watch started afresh; reading the pool again");
                                } else {
                                    tracing::info!(driver = %self.driver, node = %self.node, ?event,
                                        "a ResourceSlice of the pool was deleted or changed by someone else; reading the pool again");
                                }
                                self.held = None;
                                // However busy the watch, at most one read a
                                // round's interval.
                                not_before = not_before.max(started + self.pacing.min_interval);
                                break;
                            },
                            () = shutdown.cancelled() => return,
                        }
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

    /// Whether a watch event says something the publisher does not know:
    /// not the echo of its own write, not a slice it deleted itself.
    fn is_news(&self, event: &SliceEvent) -> bool {
        // Without a pool held, the next round reads the server anyway.
        let Some(held) = &self.held else { return false };
        match event {
            SliceEvent::Seen { name, version } => {
                held.get(name).and_then(|slice| slice.metadata.resource_version.as_ref()) != Some(version)
                    && !self.own_versions.contains(version)
            }
            SliceEvent::Gone { name } => held.contains_key(name),
            SliceEvent::Restarted => true,
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
        if unchanged(&held, &self.desired(snapshot, &held)) {
            self.held = Some(held);
            return Ok(false);
        }
        self.generation += 1;
        let desired = self.desired(snapshot, &held);
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
            if let Some(version) = written.metadata.resource_version.clone() {
                if self.own_versions.len() == OWN_VERSIONS {
                    self.own_versions.pop_front();
                }
                self.own_versions.push_back(version);
            }
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

    /// The slices for `snapshot`, each taint that stays with the time the
    /// server gave it when it was added.
    fn desired(&self, snapshot: &Snapshot, held: &BTreeMap<String, ResourceSlice>) -> Vec<ResourceSlice> {
        let source = SliceSource {
            driver: &self.driver,
            node: &self.node,
            generation: self.generation,
            owner: self.owner.clone().flatten(),
            taints: self.taints,
        };
        let mut desired = slices::partitioned_slices(&source, &self.counter_sets, snapshot);
        slices::keep_taint_times(&mut desired, held.values());
        desired
    }

    /// Which slices are this driver's on this node: (label selector, field
    /// selector), the same for the list and the watch.
    fn selector(&self) -> (String, String) {
        (format!("{DRIVER_LABEL}={}", self.driver), format!("spec.nodeName={}", self.node))
    }

    /// The slices this driver published for this node, by name.
    async fn list(&self) -> Result<BTreeMap<String, ResourceSlice>, kube::Error> {
        let (labels, fields) = self.selector();
        let params = ListParams::default().labels(&labels).fields(&fields);
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

/// Whether the server already holds what writing `desired` would store
/// (names, specs, labels and owners; server-set metadata and fields, and
/// the server's spelling of values, aside: [`slices::stores_as`]).
fn unchanged(held: &BTreeMap<String, ResourceSlice>, desired: &[ResourceSlice]) -> bool {
    held.len() == desired.len()
        && desired.iter().all(|want| {
            let name = want.metadata.name.as_deref().unwrap_or_default();
            held.get(name).is_some_and(|have| slices::stores_as(have, want))
        })
}

/// The next watch event; never, without a watch.
async fn next_event(events: &mut Option<mpsc::Receiver<SliceEvent>>) -> SliceEvent {
    match events {
        Some(events) => match events.recv().await {
            Some(event) => event,
            // The watch stopped: only with the publishing.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A client for the API server at `url` (plain HTTP or HTTPS without
/// credentials: the fake API server of the tests and the demo).
pub fn client_for_url(url: &str) -> Result<kube::Client, String> {
    super::api_client(config_for_url(url)?)
}

/// [`watch_client`] for the API server at `url`, as [`client_for_url`].
pub fn watch_client_for_url(url: &str) -> Result<kube::Client, String> {
    watch_client(config_for_url(url)?)
}

fn config_for_url(url: &str) -> Result<kube::Config, String> {
    let uri = url.parse().map_err(|error| format!("{url}: not a URL: {error}"))?;
    Ok(kube::Config::new(uri))
}

/// A client for `config` to watch slices with: devhost's connect and write
/// timeouts and no kube-rs retries, as [`super::api_client`], but no read
/// timeout, since a watch of a quiet pool reads nothing until the server
/// ends it; the watch keeps its own deadline instead (the server's end of
/// the watch, plus a grace), so a dead connection is still noticed.
pub fn watch_client(mut config: kube::Config) -> Result<kube::Client, String> {
    config.default_retry = false;
    config.connect_timeout = Some(super::API_CONNECT_TIMEOUT);
    config.read_timeout = None;
    config.write_timeout = Some(super::API_READ_TIMEOUT);
    kube::Client::try_from(config).map_err(|error| format!("API-server client for watches: {error}"))
}
