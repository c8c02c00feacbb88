//! The watch on a driver's own slices on one node (issue 24, item 3): a
//! restarting kubelet deletes the node's slices in the background, and that
//! deletion can land after devhost registered again; without a watch only
//! the five-minute re-read would notice.
//!
//! One watch connection per driver and node, with the selection the
//! publisher's list uses (the driver label and `spec.nodeName`): the
//! server ends it after [`super::Pacing::watch_timeout`] and it is opened
//! again from the last resourceVersion seen (an event's or a bookmark's),
//! so a quiet pool costs one cheap request every few minutes and no
//! objects. A watch the server can no longer resume (410 Gone) starts
//! afresh; a failed one is opened again with back-off (the publisher's
//! 1 s doubling to 30 s). Whenever a watch starts afresh, what happened
//! while nothing watched is unknown, so the publisher is told to read the
//! pool again.
//!
//! The watch only reports what it saw; the publisher decides what is news
//! (its own writes come back as events too) and reads the server again.
//! Not here: reading or writing slices.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, WatchEvent, WatchParams};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Pacing;

/// What the watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SliceEvent {
    /// A slice of the pool as the server now holds it (created or changed,
    /// or, when the watch starts afresh, as it is).
    Seen {
        /// The slice's name.
        name: String,
        /// Its resourceVersion.
        version: String,
    },
    /// A slice of the pool was deleted.
    Gone {
        /// The slice's name.
        name: String,
    },
    /// The watch started afresh: changes while nothing watched are unknown.
    Restarted,
}

/// How long past its `timeoutSeconds` a watch may stay open before the
/// connection counts as dead (the server ends it at that time).
const GRACE: Duration = Duration::from_secs(15);
/// A watch that ends sooner than this counts as failed, so a server that
/// ends every watch at once is asked again with back-off, not in a loop.
const SHORTEST: Duration = Duration::from_secs(1);

/// How one watch ended.
enum Ended {
    /// The server ended it (its timeout): open the next from where it was.
    Done,
    /// The server cannot resume from that resourceVersion any more.
    Expired,
    /// Nobody reads the events any more.
    Closed,
    /// It could not be opened, broke, or stayed silent past its deadline.
    Failed(String),
}

/// Watches one driver's slices on one node.
pub(super) struct SliceWatch {
    api: Api<ResourceSlice>,
    params: WatchParams,
    driver: String,
    node: String,
    timeout: Duration,
    backoff_start: Duration,
    backoff_max: Duration,
}

impl SliceWatch {
    /// A watch of the slices `selector` (label selector, field selector)
    /// picks, paced as `pacing` says.
    pub(super) fn new(
        api: Api<ResourceSlice>,
        selector: (String, String),
        driver: &str,
        node: &str,
        pacing: &Pacing,
    ) -> Self {
        let seconds = u32::try_from(pacing.watch_timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let params = WatchParams::default().labels(&selector.0).fields(&selector.1).timeout(seconds);
        SliceWatch {
            api,
            params,
            driver: driver.to_owned(),
            node: node.to_owned(),
            timeout: Duration::from_secs(u64::from(seconds)),
            backoff_start: pacing.backoff_start,
            backoff_max: pacing.backoff_max,
        }
    }

    /// Watches until `stop`, or until `events` has no receiver, sending
    /// what it sees to `events`.
    pub(super) async fn run(self, events: mpsc::Sender<SliceEvent>, stop: CancellationToken) {
        // Where the next watch resumes; `None`: afresh.
        let mut resume: Option<String> = None;
        let mut backoff = self.backoff_start;
        let mut failing = false;
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                ended = self.follow(&mut resume, &events, failing) => ended,
                () = stop.cancelled() => return,
            };
            let lasted = started.elapsed() >= SHORTEST;
            let why = match ended {
                Ended::Closed => return,
                Ended::Done | Ended::Expired if lasted => {
                    (backoff, failing) = (self.backoff_start, false);
                    continue;
                }
                Ended::Done => "the server ended the watch at once".to_owned(),
                Ended::Expired => "the server cannot resume the watch (410 Gone) and ended it at once".to_owned(),
                Ended::Failed(why) => {
                    if lasted {
                        // It ran a while: this failure starts a new count.
                        backoff = self.backoff_start;
                    }
                    why
                }
            };
            failing = true;
            tracing::warn!(driver = %self.driver, node = %self.node, error = %why, retry_in = ?backoff,
                "cannot watch the ResourceSlices; watching again after a pause (until then, slices deleted \
                 behind devhost's back are noticed at the next re-read of the pool)");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(self.backoff_max);
        }
    }

    /// One watch, from `resume` (afresh when `None`), until it ends; keeps
    /// `resume` at the last resourceVersion seen.
    async fn follow(&self, resume: &mut Option<String>, events: &mpsc::Sender<SliceEvent>, failing: bool) -> Ended {
        let deadline = Instant::now() + self.timeout + GRACE;
        let afresh = resume.is_none();
        // An empty resourceVersion: start at the newest state, which the
        // server first sends as ADDED events.
        let from = resume.clone().unwrap_or_default();
        let stream = match tokio::time::timeout_at(deadline, self.api.watch(&self.params, &from)).await {
            Err(_) => return Ended::Failed("no answer to the watch request".to_owned()),
            Ok(Err(kube::Error::Api(status))) if status.code == 410 => {
                *resume = None;
                return Ended::Expired;
            }
            Ok(Err(error)) => return Ended::Failed(error.to_string()),
            Ok(Ok(stream)) => stream,
        };
        if failing {
            tracing::info!(driver = %self.driver, node = %self.node, "watching the ResourceSlices again");
        }
        if afresh && events.send(SliceEvent::Restarted).await.is_err() {
            return Ended::Closed;
        }
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    return Ended::Failed(format!(
                        "the watch stayed open {GRACE:?} past its timeoutSeconds ({}); the connection is taken for dead",
                        self.timeout.as_secs()
                    ));
                }
                Ok(None) => return Ended::Done,
                Ok(Some(Err(kube::Error::Api(status)))) if status.code == 410 => {
                    *resume = None;
                    return Ended::Expired;
                }
                Ok(Some(Err(error))) => return Ended::Failed(error.to_string()),
                Ok(Some(Ok(event))) => event,
            };
            let news = match event {
                WatchEvent::Added(slice) | WatchEvent::Modified(slice) => {
                    if let Some(version) = &slice.metadata.resource_version {
                        *resume = Some(version.clone());
                    }
                    // The label is ours, but only the spec says whose slice
                    // it is (the publisher's list filters the same way).
                    match (slice.metadata.name, slice.metadata.resource_version) {
                        (Some(name), Some(version)) if slice.spec.driver == self.driver => {
                            Some(SliceEvent::Seen { name, version })
                        }
                        _ => None,
                    }
                }
                WatchEvent::Deleted(slice) => {
                    if let Some(version) = &slice.metadata.resource_version {
                        *resume = Some(version.clone());
                    }
                    slice.metadata.name.map(|name| SliceEvent::Gone { name })
                }
                WatchEvent::Bookmark(bookmark) => {
                    *resume = Some(bookmark.metadata.resource_version);
                    None
                }
                WatchEvent::Error(status) if status.code == 410 => {
                    *resume = None;
                    return Ended::Expired;
                }
                WatchEvent::Error(status) => {
                    return Ended::Failed(format!("{} ({} {})", status.message, status.code, status.reason));
                }
            };
            if let Some(news) = news
                && events.send(news).await.is_err()
            {
                return Ended::Closed;
            }
        }
    }
}
