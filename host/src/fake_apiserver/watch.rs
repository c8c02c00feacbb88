//! `GET …/resourceslices?watch=true`, as the API conventions describe a
//! watch and as kube-rs and client-go consume it:
//!
//! * the answer is `200` with a chunked body, one JSON object a line:
//!   `{"type": "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK" | "ERROR",
//!   "object": …}`;
//! * `resourceVersion` empty or `0`: the selected slices as they are now,
//!   as ADDED events, then every change; a version: every change after it;
//!   a version older than the server keeps changes for: one ERROR event
//!   with a 410 `Expired` Status, then the end (as the real server answers
//!   once etcd has compacted it);
//! * `sendInitialEvents=true` (a streaming list, as kube-rs's and
//!   client-go's watchers may ask): the selected slices as they are now,
//!   whatever the version, then a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`, then every change;
//! * a change that moves a slice into or out of the selection is an ADDED
//!   or DELETED to that watch;
//! * the watch ends after `timeoutSeconds` (30 minutes when not given),
//!   with a BOOKMARK carrying the current version first when
//!   `allowWatchBookmarks=true`; it also ends when the server becomes
//!   unavailable, is told to end its watches, or stops.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::{Shared, lock, selected, status};

/// A watch's length when the client names none (the real server picks
/// between 30 and 60 minutes).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Which slices a watch sees.
struct Selection {
    labels: Vec<(String, String)>,
    fields: Vec<(String, String)>,
}

impl Selection {
    fn picks(&self, slice: &Value) -> bool {
        selected(slice, &self.labels, &self.fields).unwrap_or(false)
    }
}

/// Answers a watch request (its selectors already checked).
pub(super) fn watch_slices(
    shared: Shared,
    query: &BTreeMap<String, String>,
    labels: Vec<(String, String)>,
    fields: Vec<(String, String)>,
) -> Response {
    let timeout = match query.get("timeoutSeconds").map(|seconds| seconds.parse::<u64>()) {
        None => DEFAULT_TIMEOUT,
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "timeoutSeconds: not a whole number"),
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|allow| allow == "true");
    let selection = Selection { labels, fields };
    let store = lock(&shared);
    let streaming_list = query.get("sendInitialEvents").is_some_and(|send| send == "true");
    let (first, cursor) = match query.get("resourceVersion").map_or("", String::as_str) {
        _ if streaming_list => {
            let mut now: Vec<String> = store
                .slices
                .values()
                .filter(|slice| selection.picks(slice))
                .map(|slice| line("ADDED", slice))
                .collect();
            let end = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {
                "resourceVersion": store.version.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"},
            }});
            now.push(line("BOOKMARK", &end));
            (now, Some(store.version))
        }
        "" | "0" => {
            let now: Vec<String> = store
                .slices
                .values()
                .filter(|slice| selection.picks(slice))
                .map(|slice| line("ADDED", slice))
                .collect();
            (now, Some(store.version))
        }
        version => match version.parse::<u64>() {
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("resourceVersion {version:?}: not valid"),
                );
            }
            Ok(version) if version < store.compacted => (vec![expired(version, store.compacted)], None),
            Ok(version) => (Vec::new(), Some(version)),
        },
    };
    let watch = Watch {
        shared: shared.clone(),
        selection,
        deadline: Instant::now() + timeout,
        bookmarks,
        epoch: store.watch_epoch,
        ticks: store.ticks.subscribe(),
        shutdown: store.shutdown.clone(),
    };
    drop(store);
    let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(watch.stream(sender, first, cursor));
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(receiver)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// One open watch.
struct Watch {
    shared: Shared,
    selection: Selection,
    deadline: Instant,
    bookmarks: bool,
    epoch: u64,
    ticks: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Watch {
    /// Sends `first`, then every change after `cursor` (none when `None`)
    /// until the watch ends or the client goes.
    async fn stream(
        mut self,
        sender: mpsc::Sender<Result<Bytes, Infallible>>,
        first: Vec<String>,
        cursor: Option<u64>,
    ) {
        for line in first {
            if sender.send(Ok(Bytes::from(line))).await.is_err() {
                return;
            }
        }
        let Some(mut cursor) = cursor else { return };
        loop {
            drop(self.ticks.borrow_and_update());
            let (lines, over) = self.changes_after(&mut cursor);
            for line in lines {
                if sender.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            if over {
                return;
            }
            tokio::select! {
                changed = self.ticks.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(self.deadline) => {
                    if self.bookmarks {
                        let version = lock(&self.shared).version.to_string();
                        let bookmark = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                                              "metadata": {"resourceVersion": version}});
                        let _ = sender.send(Ok(Bytes::from(line("BOOKMARK", &bookmark)))).await;
                    }
                    return;
                }
                () = self.shutdown.cancelled() => return,
                () = sender.closed() => return,
            }
        }
    }

    /// The events after `cursor` this watch sees, moving `cursor` on, and
    /// whether the watch is over.
    fn changes_after(&self, cursor: &mut u64) -> (Vec<String>, bool) {
        let store = lock(&self.shared);
        if store.unavailable || store.watch_epoch != self.epoch {
            return (Vec::new(), true);
        }
        if *cursor < store.compacted {
            return (vec![expired(*cursor, store.compacted)], true);
        }
        let mut lines = Vec::new();
        for change in store.history.iter().filter(|change| change.version > *cursor) {
            let now = self.selection.picks(&change.object);
            let before = change.before.as_ref().is_some_and(|before| self.selection.picks(before));
            let kind = match (change.kind, before, now) {
                ("MODIFIED", true, true) => "MODIFIED",
                ("MODIFIED", false, true) => "ADDED",
                ("MODIFIED", true, false) => "DELETED",
                ("ADDED" | "DELETED", _, true) => change.kind,
                _ => continue,
            };
            lines.push(line(kind, &change.object));
        }
        *cursor = store.version;
        (lines, false)
    }
}

/// One event line.
fn line(kind: &str, object: &Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

/// The ERROR event for a watch from `version`, older than `oldest`.
fn expired(version: u64, oldest: u64) -> String {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {version} ({oldest})"), "reason": "Expired", "code": 410,
    });
    line("ERROR", &status)
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use k8s_openapi::api::resource::v1::ResourceSlice;
    use kube::api::{Api, PostParams, WatchEvent, WatchParams};
    use serde_json::json;

    use super::super::FakeApiServer;

    fn slice(name: &str, node: &str) -> serde_json::Value {
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name, "labels": {"devhost.io/driver": "d.example.com"}},
            "spec": {"driver": "d.example.com", "nodeName": node,
                     "pool": {"name": node, "generation": 1, "resourceSliceCount": 1}, "devices": []},
        })
    }

    /// (type, name) of each event until the watch ends, and the last
    /// resourceVersion seen.
    async fn events(api: &Api<ResourceSlice>, params: &WatchParams, from: &str) -> (Vec<(String, String)>, String) {
        let stream = api.watch(params, from).await.expect("watch");
        let mut stream = std::pin::pin!(stream);
        let (mut seen, mut version) = (Vec::new(), String::new());
        while let Some(event) = stream.next().await {
            let (kind, name, at) = match event.expect("an event") {
                WatchEvent::Added(s) => ("ADDED", s.metadata.name, s.metadata.resource_version),
                WatchEvent::Modified(s) => ("MODIFIED", s.metadata.name, s.metadata.resource_version),
                WatchEvent::Deleted(s) => ("DELETED", s.metadata.name, s.metadata.resource_version),
                WatchEvent::Bookmark(b) => ("BOOKMARK", None, Some(b.metadata.resource_version)),
                WatchEvent::Error(status) => ("ERROR", Some(format!("{} {}", status.code, status.reason)), None),
            };
            seen.push((kind.to_owned(), name.unwrap_or_default()));
            version = at.unwrap_or(version);
        }
        (seen, version)
    }

    /// kube-rs's client for `server`, without its retries (a 503 would be
    /// retried for minutes).
    fn api(server: &FakeApiServer) -> Api<ResourceSlice> {
        let mut config = kube::Config::new(server.url().parse().expect("url"));
        config.default_retry = false;
        Api::all(kube::Client::try_from(config).expect("client"))
    }

    fn pairs(events: &[(&str, &str)]) -> Vec<(String, String)> {
        events.iter().map(|(kind, name)| ((*kind).to_owned(), (*name).to_owned())).collect()
    }

    /// kube-rs's own watch against the fake: the current state first,
    /// changes by the selection, the end at `timeoutSeconds` with a
    /// bookmark, a resume from it, 410 once the history is forgotten.
    #[tokio::test(flavor = "multi_thread")]
    async fn kube_rs_watches_slices_as_from_the_real_server() {
        let server = FakeApiServer::start().await.expect("server");
        let api = api(&server);
        server.put_slice(slice("a", "node-a"));
        server.put_slice(slice("elsewhere", "node-b"));
        let params =
            WatchParams::default().labels("devhost.io/driver=d.example.com").fields("spec.nodeName=node-a").timeout(1);
        let changes = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let created = serde_json::from_value(slice("b", "node-a")).expect("slice");
            api.create(&PostParams::default(), &created).await.expect("create");
            let mut moved = slice("a", "node-b");
            moved["metadata"]["resourceVersion"] = server.slices()["a"]["metadata"]["resourceVersion"].clone();
            api.replace("a", &PostParams::default(), &serde_json::from_value(moved).expect("slice"))
                .await
                .expect("replace");
            server.delete_slice("b");
            server.put_slice(slice("elsewhere", "node-b"));
        };
        let ((seen, version), ()) = tokio::join!(events(&api, &params, ""), changes);
        assert_eq!(
            seen,
            pairs(&[("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b"), ("BOOKMARK", "")]),
            "a moved to another node leaves the selection"
        );

        let resumed = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            server.put_slice(slice("c", "node-a"));
        };
        let ((seen, _), ()) = tokio::join!(events(&api, &params, &version), resumed);
        assert_eq!(seen, pairs(&[("ADDED", "c"), ("BOOKMARK", "")]), "only what came after the bookmark");

        server.forget_history();
        let (seen, _) = events(&api, &params, &version).await;
        assert_eq!(seen, pairs(&[("ERROR", "410 Expired")]));
        let mut streaming = params.clone();
        streaming.send_initial_events = true;
        let (seen, _) = events(&api, &streaming, "").await;
        assert_eq!(seen, pairs(&[("ADDED", "c"), ("BOOKMARK", ""), ("BOOKMARK", "")]), "a streaming list");
        let request = server.requests().into_iter().rfind(|r| r.is_watch()).expect("a watch");
        assert!(request.query.contains("timeoutSeconds=1"), "{request:?}");
    }

    /// A watch ends when the server is told to end them or becomes
    /// unavailable; the next is refused while it is.
    #[tokio::test(flavor = "multi_thread")]
    async fn watches_end_with_the_server() {
        let server = FakeApiServer::start().await.expect("server");
        let api = api(&server);
        let params = WatchParams::default().timeout(60);
        let ended = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            server.end_watches();
        };
        let started = std::time::Instant::now();
        let ((seen, _), ()) = tokio::join!(events(&api, &params, ""), ended);
        assert!(seen.is_empty() && started.elapsed() < std::time::Duration::from_secs(5), "{seen:?}");
        let unavailable = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            server.set_unavailable(true);
        };
        let ((seen, _), ()) = tokio::join!(events(&api, &params, ""), unavailable);
        assert!(seen.is_empty(), "{seen:?}");
        assert!(api.watch(&params, "").await.is_err(), "refused while unavailable");
    }
}
