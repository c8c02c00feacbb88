//! The parts of a Kubernetes API server a DRA driver talks to, for tests
//! and the demo: plain HTTP on a real TCP socket, JSON in and out, written
//! from the API conventions and `docs/dra-api.md` §4 (never from devhost's
//! own code, so it can disagree with it).
//!
//! Served: `resource.k8s.io/v1` ResourceSlices (list with a label and field
//! selector, watch, get, create, replace with optimistic concurrency,
//! delete), ResourceClaims (get) and Nodes (get). Every object gets a
//! `resourceVersion` from one counter, as etcd gives; a replace that names
//! an older one is a 409 Conflict; a create of an existing name is a 409
//! AlreadyExists. A slice is checked against the rules of §4 and refused
//! with 422 Invalid when it breaks one. Errors are `Status` objects.
//!
//! A slice is stored as the real server stores it (`defaults`, §4.1): a
//! taint without `timeAdded` gets the server's clock (whole seconds) on
//! create and replace, quantities are written in canonical form, empty
//! lists and maps are left out, `metadata.generation` counts spec changes.
//! A client that compares what it sent with what it reads back byte for
//! byte sees a difference, as it would against the real server.
//!
//! `?watch=true` on the slice list streams changes as the real server does
//! (`watch`): one JSON event a line, from a `resourceVersion` (or the
//! current state as ADDED events first), ended after `timeoutSeconds`
//! (with a BOOKMARK when asked for), 410 Expired for a version too old.
//!
//! For tests: every request is logged with its query, time and outcome,
//! the server can be made unavailable (every request answered 503, open
//! watches ended) or hung, its watches ended or its history forgotten,
//! its clock moved on, and objects can be put in or changed behind the
//! client's back.

mod claim_status;
mod defaults;
mod watch;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// Slice changes kept for watches to resume from; a watch from before the
/// oldest is answered 410 Expired, as etcd's compaction makes the real
/// server answer.
const HISTORY: usize = 1000;

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, as sent (still percent-encoded).
    pub query: String,
    /// The status answered (for a watch: when it started).
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Request {
    /// Whether this request changed (or tried to change) a ResourceSlice.
    pub fn is_slice_write(&self) -> bool {
        self.path.starts_with(SLICES) && self.method != "GET"
    }

    /// Whether this request watched (`watch=true`) rather than read once.
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1")
    }

    /// Whether this request listed the ResourceSlices (read once, no watch).
    pub fn is_slice_list(&self) -> bool {
        self.method == "GET" && self.path == SLICES && !self.is_watch()
    }
}

/// One change to a slice, for watches.
#[derive(Debug, Clone)]
struct Change {
    /// The resourceVersion the change made.
    version: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    kind: &'static str,
    /// The slice after the change (as it was, for `DELETED`).
    object: Value,
    /// The slice before a `MODIFIED` (a watch's selector may have matched
    /// only one of the two).
    before: Option<Value>,
}

struct Store {
    version: u64,
    slices: BTreeMap<String, Value>,
    claims: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    unavailable: bool,
    hanging: bool,
    /// Claims answered by a hostile server (by name).
    hostile_claims: BTreeMap<String, HostileAnswer>,
    /// Writes of claims' status answered 403, as without the RBAC rule.
    forbid_claim_status: bool,
    /// Status writes that change `status.devices` answered 422, as without
    /// the `resourceclaims/driver` right the write needs.
    forbid_device_status: bool,
    log: Vec<Request>,
    /// Recent slice changes, oldest first.
    history: VecDeque<Change>,
    /// The oldest resourceVersion a watch may resume from.
    compacted: u64,
    /// Ticks on every slice change and whenever open watches must look at
    /// the store again (unavailable, ended).
    ticks: tokio::sync::watch::Sender<u64>,
    /// Open watches end when this moves on.
    watch_epoch: u64,
    /// How far the server's clock is ahead of the real one.
    clock_offset: SignedDuration,
    /// The server's stop, which ends open watches too.
    shutdown: CancellationToken,
}

impl Store {
    fn new(shutdown: CancellationToken) -> Self {
        Store {
            version: 0,
            slices: BTreeMap::new(),
            claims: BTreeMap::new(),
            nodes: BTreeMap::new(),
            unavailable: false,
            hanging: false,
            hostile_claims: BTreeMap::new(),
            forbid_claim_status: false,
            forbid_device_status: false,
            log: Vec::new(),
            history: VecDeque::new(),
            compacted: 0,
            ticks: tokio::sync::watch::Sender::new(0),
            watch_epoch: 0,
            clock_offset: SignedDuration::ZERO,
            shutdown,
        }
    }

    fn next_version(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    /// The server's clock, as `timeAdded` is written: RFC 3339, whole
    /// seconds, UTC.
    fn now(&self) -> String {
        let now = Timestamp::now().checked_add(self.clock_offset).unwrap_or_else(|_| Timestamp::now());
        now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    /// Tells open watches to look at the store again.
    fn tick(&self) {
        self.ticks.send_modify(|tick| *tick += 1);
    }

    /// Records a change to a slice for watches; `object` already carries
    /// the change's resourceVersion.
    fn record(&mut self, kind: &'static str, object: &Value, before: Option<Value>) {
        let version =
            object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(self.version);
        self.history.push_back(Change { version, kind, object: object.clone(), before });
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.version;
            }
        }
        self.tick();
    }

    /// Removes slice `name`, recording the deletion (under a version of its
    /// own, as the real server gives the deleted object); the slice as it
    /// was.
    fn remove_slice(&mut self, name: &str) -> Option<Value> {
        let mut slice = self.slices.remove(name)?;
        slice["metadata"]["resourceVersion"] = json!(self.next_version());
        self.record("DELETED", &slice, None);
        Some(slice)
    }

    /// Gives `object` a new resourceVersion (and a uid and creation time
    /// when it has none), as the server does on every write.
    fn stamp(&mut self, object: &mut Value, uid_from: &str) {
        let version = self.next_version();
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(version);
        if metadata.get("uid").is_none_or(Value::is_null) {
            metadata["uid"] = json!(format!("uid-{uid_from}-{version}"));
        }
        if metadata.get("creationTimestamp").is_none_or(Value::is_null) {
            metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
    }
}

type Shared = Arc<Mutex<Store>>;

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    address: SocketAddr,
    store: Shared,
    shutdown: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl FakeApiServer {
    /// Serves on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let store: Shared = Arc::new(Mutex::new(Store::new(shutdown.clone())));
        let app = Router::new()
            .route(SLICES, get(list_slices).post(create_slice))
            .route(&format!("{SLICES}/{{name}}"), get(get_slice).put(replace_slice).delete(delete_slice))
            .route("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}", get(get_claim))
            .route(
                "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}/status",
                get(get_claim).put(claim_status::replace_claim_status),
            )
            .route("/api/v1/nodes/{name}", get(get_node))
            .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such path") })
            .layer(axum::middleware::from_fn_with_state(store.clone(), gate))
            .with_state(store.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        Ok(FakeApiServer { address, store, shutdown })
    }

    /// The server's URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig file's text that points a client at this server (no
    /// credentials), for devhost's `[dra] kubeconfig`.
    pub fn kubeconfig(&self) -> String {
        let url = self.url();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        )
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a Node (its uid is `uid-node-<name>`).
    pub fn add_node(&self, name: &str) {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-node-{name}")},
        });
        let mut store = self.store();
        let mut node = node;
        store.stamp(&mut node, name);
        store.nodes.insert(name.to_owned(), node);
    }

    /// Puts a ResourceClaim in (or replaces it), as a user or the
    /// scheduler would. Its namespace and name come from its metadata.
    pub fn put_claim(&self, mut claim: Value) {
        let key = (
            claim["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
            claim["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        );
        let mut store = self.store();
        let uid_from = key.1.clone();
        store.stamp(&mut claim, &uid_from);
        store.claims.insert(key, claim);
    }

    /// The ResourceClaim `namespace/name` as stored, if there is one.
    pub fn claim(&self, namespace: &str, name: &str) -> Option<Value> {
        self.store().claims.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Puts a ResourceSlice in without any check or defaulting, as another
    /// client (an earlier instance of the driver, say) would have; open
    /// watches see it.
    pub fn put_slice(&self, mut slice: Value) {
        let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let mut store = self.store();
        store.stamp(&mut slice, &name);
        let before = store.slices.insert(name, slice.clone());
        let kind = if before.is_some() { "MODIFIED" } else { "ADDED" };
        store.record(kind, &slice, before);
    }

    /// Deletes a ResourceSlice behind the client's back (as a restarted
    /// kubelet deletes its node's slices); whether it was there. Open
    /// watches see it.
    pub fn delete_slice(&self, name: &str) -> bool {
        self.store().remove_slice(name).is_some()
    }

    /// Moves the server's clock (what it stamps as a taint's `timeAdded`)
    /// `by` ahead.
    pub fn advance_clock(&self, by: Duration) {
        let mut store = self.store();
        let by = SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
        store.clock_offset = store.clock_offset.saturating_add(by);
    }

    /// Ends every open watch (as a restarting server or a dropped
    /// connection does); clients open them again.
    pub fn end_watches(&self) {
        let mut store = self.store();
        store.watch_epoch += 1;
        store.tick();
    }

    /// Forgets the changes so far (as etcd's compaction does): a watch that
    /// resumes from an older resourceVersion gets 410 Expired.
    pub fn forget_history(&self) {
        let mut store = self.store();
        store.history.clear();
        store.compacted = store.version;
        store.tick();
    }

    /// Every ResourceSlice held, by name.
    pub fn slices(&self) -> BTreeMap<String, Value> {
        self.store().slices.clone()
    }

    /// While `true`, every request is answered 503 ServiceUnavailable, and
    /// open watches end.
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut store = self.store();
        store.unavailable = unavailable;
        store.tick();
    }

    /// While `true`, writes of a ResourceClaim's status are answered 403
    /// Forbidden, as a cluster without devhost's `resourceclaims/status`
    /// rule answers them.
    pub fn forbid_claim_status(&self, forbidden: bool) {
        self.store().forbid_claim_status = forbidden;
    }

    /// While `true`, a status write that adds, changes or removes an entry
    /// of `status.devices` is answered as the real API server answers a
    /// caller without the `resourceclaims/driver` right for that entry's
    /// driver (1.36+: `associated-node:update` for a token bound to a pod
    /// on the claim's node, else `arbitrary-node:update`): 422 Invalid,
    /// `status.devices: Forbidden`, naming the right. A write that leaves
    /// the entries as they are passes.
    pub fn forbid_device_status(&self, forbidden: bool) {
        self.store().forbid_device_status = forbidden;
    }

    /// Makes reads of the claim `name` (any namespace) answer as `answer`
    /// says: the hostile API servers of issue 26.
    pub fn answer_claim_hostilely(&self, name: &str, answer: HostileAnswer) {
        self.store().hostile_claims.insert(name.to_owned(), answer);
    }

    /// Makes every request wait, unanswered, until `set_hanging(false)`;
    /// they are logged with status 0 when they arrive.
    pub fn set_hanging(&self, hanging: bool) {
        self.store().hanging = hanging;
    }

    /// Every request so far, in order (those left hanging with status 0).
    pub fn requests(&self) -> Vec<Request> {
        self.store().log.clone()
    }
}

/// Logs every request and answers 503 while the server is unavailable.
async fn gate(State(store): State<Shared>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let at = Instant::now();
    let (unavailable, hanging) = {
        let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
        if store.hanging {
            let logged = Request { method: method.clone(), path: path.clone(), query: query.clone(), status: 0, at };
            store.log.push(logged);
        }
        (store.unavailable, store.hanging)
    };
    if hanging {
        return std::future::pending().await;
    }
    let response = if unavailable {
        status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the server is unavailable (fault injected)")
    } else {
        next.run(request).await
    };
    let status = response.status().as_u16();
    store.lock().unwrap_or_else(PoisonError::into_inner).log.push(Request { method, path, query, status, at });
    response
}

/// A `Status` object, as the API server answers errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn object(code: StatusCode, value: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn lock(store: &Shared) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `key=value` pairs of a selector (only equality, which is all a driver
/// needs); `None` for anything else.
fn selector(text: &str) -> Option<Vec<(String, String)>> {
    text.split(',')
        .filter(|term| !term.is_empty())
        .map(|term| {
            if term.contains("!=") {
                return None;
            }
            let (key, value) = term.split_once("==").or_else(|| term.split_once('='))?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The query's parameters, decoded.
fn query(uri: &Uri) -> BTreeMap<String, String> {
    let decode =
        |text: &str| percent_encoding::percent_decode_str(&text.replace('+', " ")).decode_utf8_lossy().into_owned();
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (decode(key), decode(value)))
        .collect()
}

/// Whether `slice` is one `labels` and `fields` select; an error names a
/// field the server cannot select on.
fn selected(slice: &Value, labels: &[(String, String)], fields: &[(String, String)]) -> Result<bool, String> {
    let labelled = labels.iter().all(|(key, value)| slice["metadata"]["labels"][key].as_str() == Some(value));
    let mut fielded = true;
    for (field, value) in fields {
        let actual = match field.as_str() {
            "spec.nodeName" => slice["spec"]["nodeName"].as_str(),
            "spec.driver" => slice["spec"]["driver"].as_str(),
            "metadata.name" => slice["metadata"]["name"].as_str(),
            other => return Err(format!("field label not supported: {other}")),
        };
        fielded &= actual.unwrap_or_default() == value;
    }
    Ok(labelled && fielded)
}

async fn list_slices(State(store): State<Shared>, uri: Uri) -> Response {
    let query = query(&uri);
    let Some(labels) = selector(query.get("labelSelector").map_or("", String::as_str)) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported label selector");
    };
    let Some(fields) = selector(query.get("fieldSelector").map_or("", String::as_str)) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported field selector");
    };
    if let Err(why) = selected(&Value::Null, &labels, &fields) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", &why);
    }
    if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch::watch_slices(store, &query, labels, fields);
    }
    let mut store = lock(&store);
    let items: Vec<Value> =
        store.slices.values().filter(|slice| selected(slice, &labels, &fields).unwrap_or(false)).cloned().collect();
    let version = store.next_version();
    let list = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
        "metadata": {"resourceVersion": version}, "items": items,
    });
    object(StatusCode::OK, &list)
}

async fn get_slice(State(store): State<Shared>, Path(name): Path<String>) -> Response {
    match lock(&store).slices.get(&name) {
        Some(slice) => object(StatusCode::OK, slice),
        None => not_found("resourceslices", &name),
    }
}

fn not_found(kind: &str, name: &str) -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", &format!("{kind}.resource.k8s.io \"{name}\" not found"))
}

fn parse(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|error| {
        Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", &format!("not a JSON object: {error}")))
    })
}

async fn create_slice(State(store): State<Shared>, body: Bytes) -> Response {
    let mut slice = match parse(&body) {
        Ok(slice) => slice,
        Err(response) => return *response,
    };
    // Checked as sent: an empty `devices` list beside `sharedCounters`
    // is refused although storing would drop it.
    if let Err(why) = devices_or_counters(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let mut store = lock(&store);
    defaults::default_slice(&mut slice, &store.now());
    canonical_counters(&mut slice);
    canonical_request_policies(&mut slice);
    if let Err(why) = validate_slice(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if store.slices.contains_key(&name) {
        let message = format!("resourceslices.resource.k8s.io \"{name}\" already exists");
        return status(StatusCode::CONFLICT, "AlreadyExists", &message);
    }
    slice["metadata"]["uid"] = Value::Null;
    slice["metadata"]["generation"] = json!(1);
    store.stamp(&mut slice, &name);
    store.slices.insert(name, slice.clone());
    store.record("ADDED", &slice, None);
    object(StatusCode::CREATED, &slice)
}

async fn replace_slice(State(store): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
    let mut slice = match parse(&body) {
        Ok(slice) => slice,
        Err(response) => return *response,
    };
    if slice["metadata"]["name"].as_str() != Some(&name) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the name in the body does not match the URL");
    }
    // Checked as sent: an empty `devices` list beside `sharedCounters`
    // is refused although storing would drop it.
    if let Err(why) = devices_or_counters(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let mut store = lock(&store);
    defaults::default_slice(&mut slice, &store.now());
    canonical_counters(&mut slice);
    canonical_request_policies(&mut slice);
    if let Err(why) = validate_slice(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let Some(current) = store.slices.get(&name) else {
        return not_found("resourceslices", &name);
    };
    // Optimistic concurrency: an update names the version it read.
    let current_version = current["metadata"]["resourceVersion"].clone();
    match slice["metadata"]["resourceVersion"].as_str() {
        Some(version) if Some(version) == current_version.as_str() => {}
        Some(_) => {
            let message = format!(
                "Operation cannot be fulfilled on resourceslices.resource.k8s.io \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            );
            return status(StatusCode::CONFLICT, "Conflict", &message);
        }
        None => {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.resourceVersion: must be specified");
        }
    }
    slice["metadata"]["uid"] = current["metadata"]["uid"].clone();
    slice["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    // Changing the spec moves the generation on; nothing else does.
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    slice["metadata"]["generation"] = json!(if current["spec"] == slice["spec"] { generation } else { generation + 1 });
    let before = current.clone();
    store.stamp(&mut slice, &name);
    store.slices.insert(name, slice.clone());
    store.record("MODIFIED", &slice, Some(before));
    object(StatusCode::OK, &slice)
}

async fn delete_slice(State(store): State<Shared>, Path(name): Path<String>) -> Response {
    match lock(&store).remove_slice(&name) {
        Some(slice) => object(StatusCode::OK, &slice),
        None => not_found("resourceslices", &name),
    }
}

/// How a hostile API server answers a claim read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileAnswer {
    /// `200 OK` and its headers at once, then one byte of body a second
    /// (for two minutes).
    Drip,
    /// `200 OK` and this many bytes of body, as fast as they are read.
    Huge(usize),
}

impl HostileAnswer {
    fn respond(self) -> Response {
        use futures_util::StreamExt;
        let body = match self {
            HostileAnswer::Drip => {
                axum::body::Body::from_stream(futures_util::stream::iter(0..120).then(|n| async move {
                    if n > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Ok::<_, std::convert::Infallible>(Bytes::from_static(if n == 0 { b"{" } else { b" " }))
                }))
            }
            HostileAnswer::Huge(total) => {
                const CHUNK: usize = 64 << 10;
                let chunks = total.div_ceil(CHUNK);
                axum::body::Body::from_stream(futures_util::stream::iter(0..chunks).map(move |n| {
                    let size = CHUNK.min(total - n * CHUNK);
                    Ok::<_, std::convert::Infallible>(Bytes::from(vec![b' '; size]))
                }))
            }
        };
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

async fn get_claim(State(store): State<Shared>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let hostile = lock(&store).hostile_claims.get(&name).copied();
    if let Some(answer) = hostile {
        return answer.respond();
    }
    match lock(&store).claims.get(&(namespace, name.clone())) {
        Some(claim) => object(StatusCode::OK, claim),
        None => not_found("resourceclaims", &name),
    }
}

async fn get_node(State(store): State<Shared>, Path(name): Path<String>) -> Response {
    match lock(&store).nodes.get(&name) {
        Some(node) => object(StatusCode::OK, node),
        None => status(StatusCode::NOT_FOUND, "NotFound", &format!("nodes \"{name}\" not found")),
    }
}

/// A DNS label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
fn dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A slice has `sharedCounters` or `devices`, never both (`docs/dra-api.md`
/// §4.3): the real server asks only whether each is there (not null), so an
/// empty list counts.
fn devices_or_counters(slice: &Value) -> Result<(), String> {
    let present = |key: &str| slice["spec"].get(key).is_some_and(|value| !value.is_null());
    if present("devices") && present("sharedCounters") {
        return Err("spec: Invalid value: \"\": only one of `sharedCounters` or `devices` is allowed".to_owned());
    }
    Ok(())
}

/// Writes every counter's quantity (counter sets and consumptions) in
/// canonical form, as the server writes capacities (§4.1).
fn canonical_counters(slice: &mut Value) {
    let Some(spec) = slice.get_mut("spec").and_then(Value::as_object_mut) else { return };
    for (key, value) in spec.iter_mut() {
        let maps: Vec<&mut Value> = match key.as_str() {
            "sharedCounters" => {
                value.as_array_mut().into_iter().flatten().filter_map(|set| set.get_mut("counters")).collect()
            }
            "devices" => value
                .as_array_mut()
                .into_iter()
                .flatten()
                .filter_map(|device| device.get_mut("consumesCounters").and_then(Value::as_array_mut))
                .flatten()
                .filter_map(|consumption| consumption.get_mut("counters"))
                .collect(),
            _ => continue,
        };
        for counter in maps.into_iter().filter_map(Value::as_object_mut).flat_map(|map| map.values_mut()) {
            if let Some(canonical) = counter["value"].as_str().and_then(defaults::canonical_quantity) {
                counter["value"] = json!(canonical);
            }
        }
    }
}

/// Counter sets in one slice, counters in one set or one consumption,
/// consumptions of one device (`docs/dra-api.md` §4.3).
const MAX_COUNTER_SETS: usize = 8;
const MAX_COUNTERS: usize = 32;
const MAX_CONSUMPTIONS: usize = 2;

/// A map of counters (`{name: {value}}`) at `path`: present and not empty,
/// at most [`MAX_COUNTERS`], DNS-label names, quantity values.
fn validate_counters(counters: &Value, path: &str) -> Result<(), String> {
    let Some(counters) = counters.as_object().filter(|counters| !counters.is_empty()) else {
        return Err(format!("{path}: Required value"));
    };
    if counters.len() > MAX_COUNTERS {
        return Err(format!("{path}: Too many: {} (must have at most {MAX_COUNTERS} items)", counters.len()));
    }
    for (name, counter) in counters {
        if !dns_label(name) {
            return Err(format!("{path}[{name}]: Invalid value: {name:?}: not a DNS label"));
        }
        let value = counter["value"].as_str().unwrap_or_default();
        if defaults::canonical_quantity(value).is_none() {
            return Err(format!("{path}[{name}].value: Invalid value: {value:?}: not a quantity"));
        }
    }
    Ok(())
}

/// `spec.sharedCounters` and each device's `consumesCounters`.
fn validate_partitions(spec: &Value, devices: &[Value]) -> Result<(), String> {
    let empty = Vec::new();
    let sets = spec["sharedCounters"].as_array().unwrap_or(&empty);
    if sets.len() > MAX_COUNTER_SETS {
        return Err(format!(
            "spec.sharedCounters: Too many: {} (must have at most {MAX_COUNTER_SETS} items)",
            sets.len()
        ));
    }
    let mut names = HashSet::new();
    for (index, set) in sets.iter().enumerate() {
        let name = set["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            return Err(format!("spec.sharedCounters[{index}].name: Invalid value: {name:?}: not a DNS label"));
        }
        if !names.insert(name) {
            return Err(format!("spec.sharedCounters[{index}].name: Duplicate value: {name:?}"));
        }
        validate_counters(&set["counters"], &format!("spec.sharedCounters[{index}].counters"))?;
    }
    for (index, device) in devices.iter().enumerate() {
        let consumptions = device["consumesCounters"].as_array().unwrap_or(&empty);
        let path = format!("spec.devices[{index}].consumesCounters");
        if consumptions.len() > MAX_CONSUMPTIONS {
            return Err(format!(
                "{path}: Too many: {} (must have at most {MAX_CONSUMPTIONS} items)",
                consumptions.len()
            ));
        }
        let mut sets = HashSet::new();
        for (at, consumption) in consumptions.iter().enumerate() {
            let set = consumption["counterSet"].as_str().unwrap_or_default();
            if !dns_label(set) {
                return Err(format!("{path}[{at}].counterSet: Invalid value: {set:?}: not a DNS label"));
            }
            if !sets.insert(set) {
                return Err(format!("{path}[{at}].counterSet: Duplicate value: {set:?}"));
            }
            validate_counters(&consumption["counters"], &format!("{path}[{at}].counters"))?;
        }
    }
    Ok(())
}

/// Writes the quantities of every capacity's `requestPolicy` in canonical
/// form, as the server writes every quantity (`docs/dra-api.md` §4.1).
fn canonical_request_policies(slice: &mut Value) {
    let Some(devices) = slice["spec"].get_mut("devices").and_then(Value::as_array_mut) else { return };
    let capacities = devices.iter_mut().filter_map(|device| device.get_mut("capacity").and_then(Value::as_object_mut));
    for capacity in capacities.flat_map(|map| map.values_mut()) {
        let Some(policy) = capacity.get_mut("requestPolicy").and_then(Value::as_object_mut) else { continue };
        let mut quantities: Vec<&mut Value> = Vec::new();
        for (key, value) in policy.iter_mut() {
            match key.as_str() {
                "default" => quantities.push(value),
                "validValues" => quantities.extend(value.as_array_mut().into_iter().flatten()),
                "validRange" => {
                    quantities.extend(value.as_object_mut().into_iter().flat_map(|range| range.values_mut()))
                }
                _ => {}
            }
        }
        for quantity in quantities {
            if let Some(canonical) = quantity.as_str().and_then(defaults::canonical_quantity) {
                *quantity = json!(canonical);
            }
        }
    }
}

/// Values a `validValues` request policy may list (the API's
/// `CapacityRequestPolicyDiscreteMaxOptions`, `docs/dra-api.md` §4.4).
const MAX_VALID_VALUES: usize = 10;

/// A quantity's value in billionths, read from its canonical form (a
/// whole number and a suffix); `None` when it is no quantity.
fn nanos(text: &str) -> Option<i128> {
    let canonical = defaults::canonical_quantity(text)?;
    let (negative, unsigned) = match canonical.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, canonical.as_str()),
    };
    let split = unsigned.find(|c: char| !c.is_ascii_digit()).unwrap_or(unsigned.len());
    let (digits, suffix) = unsigned.split_at(split);
    let number: i128 = digits.parse().ok()?;
    let scaled = match suffix {
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"].iter().position(|s| *s == suffix)? + 1;
            number.checked_mul(1_i128.checked_shl(u32::try_from(power * 10).ok()?)?)?.checked_mul(1_000_000_000)?
        }
        _ => {
            let ten: i32 = match suffix {
                "n" => -9,
                "u" => -6,
                "m" => -3,
                "" => 0,
                "k" => 3,
                "M" => 6,
                "G" => 9,
                "T" => 12,
                "P" => 15,
                "E" => 18,
                exponent => exponent.strip_prefix('e')?.parse().ok()?,
            };
            let scale = u32::try_from(ten + 9).ok()?;
            number.checked_mul(10_i128.checked_pow(scale)?)?
        }
    };
    Some(if negative { -scaled } else { scaled })
}

/// Each capacity's `requestPolicy` (consumable capacity, `docs/dra-api.md`
/// §4.4): only on a device with `allowMultipleAllocations: true`, and
/// then as upstream's validation checks it against the capacity's value.
fn validate_capacities(device: &Value, path: &str) -> Result<(), String> {
    let shared = device["allowMultipleAllocations"] == json!(true);
    let Some(capacities) = device["capacity"].as_object() else { return Ok(()) };
    for (name, capacity) in capacities {
        let Some(policy) = capacity.get("requestPolicy").filter(|policy| !policy.is_null()) else { continue };
        let path = format!("{path}.capacity[{name}].requestPolicy");
        if !shared {
            return Err(format!("{path}: Forbidden: allowMultipleAllocations must be true"));
        }
        let quantity = |value: &Value, at: &str| {
            let text = value.as_str().unwrap_or_default();
            nanos(text).ok_or_else(|| format!("{path}{at}: Invalid value: {text:?}: not a quantity"))
        };
        let total = quantity(&capacity["value"], ".value")?;
        let values = policy["validValues"].as_array().filter(|values| !values.is_empty());
        let range = policy.get("validRange").filter(|range| !range.is_null());
        if values.is_some() && range.is_some() {
            return Err(format!(
                "{path}: Forbidden: exactly one policy can be specified, cannot specify \"validValues\" and \"validRange\" at the same time"
            ));
        }
        let default = policy.get("default").filter(|default| !default.is_null());
        if let Some(values) = values {
            let Some(default) = default else {
                return Err(format!("{path}.default: Required value: required when validValues is defined"));
            };
            let default = quantity(default, ".default")?;
            if values.len() > MAX_VALID_VALUES {
                return Err(format!(
                    "{path}.validValues: Too many: {} (must have at most {MAX_VALID_VALUES} items)",
                    values.len()
                ));
            }
            let amounts: Vec<i128> = values
                .iter()
                .enumerate()
                .map(|(at, value)| quantity(value, &format!(".validValues[{at}]")))
                .collect::<Result<_, _>>()?;
            for (at, pair) in amounts.windows(2).enumerate() {
                if pair[0] > pair[1] {
                    return Err(format!(
                        "{path}.validValues[{}]: Invalid value: values must be sorted in ascending order",
                        at + 1
                    ));
                }
                if pair[0] == pair[1] {
                    return Err(format!("{path}.validValues[{}]: Duplicate value", at + 1));
                }
            }
            if let Some(at) = amounts.iter().position(|amount| *amount > total) {
                return Err(format!("{path}.validValues[{at}]: Invalid value: option is larger than capacity value"));
            }
            if !amounts.contains(&default) {
                return Err(format!(
                    "{path}.validValues: Invalid value: default value is not valid according to the requestPolicy"
                ));
            }
        } else if let Some(range) = range {
            let Some(default) = default else {
                return Err(format!("{path}.default: Required value: required when validRange is defined"));
            };
            let default = quantity(default, ".default")?;
            let Some(min) = range.get("min").filter(|min| !min.is_null()) else {
                return Err(format!("{path}.validRange.min: Required value: required when validRange is defined"));
            };
            let min = quantity(min, ".validRange.min")?;
            if min > total {
                return Err(format!("{path}.validRange.min: Invalid value: min is larger than capacity value"));
            }
            if default < min {
                return Err(format!("{path}.validRange.min: Invalid value: default is less than min"));
            }
            let max = match range.get("max").filter(|max| !max.is_null()) {
                Some(max) => Some(quantity(max, ".validRange.max")?),
                None => None,
            };
            if let Some(max) = max {
                if min > max {
                    return Err(format!("{path}.validRange.max: Invalid value: min is larger than max"));
                }
                if max > total {
                    return Err(format!("{path}.validRange.max: Invalid value: max is larger than capacity value"));
                }
                if default > max {
                    return Err(format!("{path}.validRange.max: Invalid value: default is more than max"));
                }
            }
            if let Some(step) = range.get("step").filter(|step| !step.is_null()) {
                let step = quantity(step, ".validRange.step")?;
                if min + step > total {
                    return Err(format!(
                        "{path}.validRange.step: Invalid value: one step is larger than capacity value"
                    ));
                }
                // Upstream compares whole units (a quantity's `Value()`,
                // rounded up); a zero step is no step it can divide by.
                let whole = |n: i128| n.div_euclid(1_000_000_000) + i128::from(n.rem_euclid(1_000_000_000) != 0);
                let step_units = whole(step);
                for (what, value) in [("default", Some(default)), ("max", max)] {
                    let Some(value) = value else { continue };
                    if step_units == 0 || (whole(value) - whole(min)) % step_units != 0 {
                        return Err(format!(
                            "{path}.validRange.step: Invalid value: {what} is not a multiple of a given step from min"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The rules of `docs/dra-api.md` §4 a slice must keep, transcribed here.
fn validate_slice(slice: &Value) -> Result<(), String> {
    let metadata = &slice["metadata"];
    if metadata["name"].as_str().is_none_or(str::is_empty) {
        return Err("metadata.name: Required value".to_owned());
    }
    let spec = &slice["spec"];
    if spec["driver"].as_str().is_none_or(str::is_empty) {
        return Err("spec.driver: Required value".to_owned());
    }
    let placements = ["nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection"];
    let set = placements
        .iter()
        .filter(|key| match &spec[**key] {
            Value::Null => false,
            Value::Bool(value) => *value,
            Value::String(value) => !value.is_empty(),
            _ => true,
        })
        .count();
    if set != 1 {
        return Err(format!("spec: exactly one of {placements:?} is required, {set} set"));
    }
    let pool = &spec["pool"];
    if pool["name"].as_str().is_none_or(str::is_empty) {
        return Err("spec.pool.name: Required value".to_owned());
    }
    if pool["generation"].as_i64().is_none_or(|generation| generation < 0) {
        return Err("spec.pool.generation: must be a non-negative integer".to_owned());
    }
    if pool["resourceSliceCount"].as_i64().is_none_or(|count| count < 1) {
        return Err("spec.pool.resourceSliceCount: must be at least 1".to_owned());
    }
    let empty = Vec::new();
    let devices = spec["devices"].as_array().unwrap_or(&empty);
    let tainted = devices.iter().any(|device| device["taints"].as_array().is_some_and(|taints| !taints.is_empty()));
    let consuming =
        devices.iter().any(|device| device["consumesCounters"].as_array().is_some_and(|list| !list.is_empty()));
    let limit = if tainted || consuming { 64 } else { 128 };
    if devices.len() > limit {
        return Err(format!("spec.devices: Too many: {} (must have at most {limit} items)", devices.len()));
    }
    let mut names = HashSet::new();
    for (index, device) in devices.iter().enumerate() {
        let name = device["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            return Err(format!("spec.devices[{index}].name: Invalid value: {name:?}: not a DNS label"));
        }
        if !names.insert(name) {
            return Err(format!("spec.devices[{index}].name: Duplicate value: {name:?}"));
        }
        let count = |key: &str| device[key].as_object().map_or(0, serde_json::Map::len);
        let together = count("attributes") + count("capacity");
        if together > 32 {
            return Err(format!("spec.devices[{index}]: Too many: {together} attributes and capacities (at most 32)"));
        }
        validate_capacities(device, &format!("spec.devices[{index}]"))?;
    }
    validate_partitions(spec, devices)
}

#[cfg(test)]
mod partition_tests {
    use super::*;

    fn slice(spec: Value) -> Value {
        let mut spec = spec;
        spec["driver"] = json!("gpu.example.com");
        spec["nodeName"] = json!("node-a");
        spec["pool"] = json!({"name": "node-a", "generation": 1, "resourceSliceCount": 2});
        json!({"metadata": {"name": "s"}, "spec": spec})
    }

    fn set(name: &str, counters: usize) -> Value {
        let counters: serde_json::Map<String, Value> =
            (0..counters).map(|i| (format!("c{i}"), json!({"value": "1"}))).collect();
        json!({"name": name, "counters": counters})
    }

    #[test]
    fn counter_set_slices_and_consuming_devices_are_checked_as_the_server_does() {
        let good = slice(json!({"sharedCounters": [set("gpu-0", 2)]}));
        assert_eq!(devices_or_counters(&good), Ok(()));
        assert_eq!(validate_slice(&good), Ok(()));

        let both = slice(json!({"sharedCounters": [set("gpu-0", 2)], "devices": []}));
        assert!(devices_or_counters(&both).expect_err("both").contains("only one of `sharedCounters` or `devices`"));

        let nine = slice(json!({"sharedCounters": (0..9).map(|i| set(&format!("s{i}"), 1)).collect::<Vec<_>>()}));
        assert!(validate_slice(&nine).expect_err("9 sets").contains("spec.sharedCounters: Too many: 9"));
        let wide = slice(json!({"sharedCounters": [set("gpu-0", 33)]}));
        assert!(validate_slice(&wide).expect_err("33").contains("counters: Too many: 33"));
        let twice = slice(json!({"sharedCounters": [set("gpu-0", 1), set("gpu-0", 1)]}));
        assert!(validate_slice(&twice).expect_err("twice").contains("Duplicate value"));
        let empty = slice(json!({"sharedCounters": [{"name": "gpu-0", "counters": {}}]}));
        assert!(validate_slice(&empty).expect_err("empty").contains("counters: Required value"));

        let consume = |entries: Vec<Value>| json!({"name": "d", "consumesCounters": entries});
        let entry = |set: &str| json!({"counterSet": set, "counters": {"memory": {"value": "20Gi"}}});
        let fine = slice(json!({"devices": [consume(vec![entry("a"), entry("b")])]}));
        assert_eq!(validate_slice(&fine), Ok(()));
        let three = slice(json!({"devices": [consume(vec![entry("a"), entry("b"), entry("c")])]}));
        assert!(validate_slice(&three).expect_err("3").contains("consumesCounters: Too many: 3"));
        let again = slice(json!({"devices": [consume(vec![entry("a"), entry("a")])]}));
        assert!(validate_slice(&again).expect_err("again").contains("counterSet: Duplicate value"));
        let bad = slice(
            json!({"devices": [consume(vec![json!({"counterSet": "a", "counters": {"m": {"value": "2 Gi"}}})])]}),
        );
        assert!(validate_slice(&bad).expect_err("bad quantity").contains("not a quantity"));
        let many: Vec<Value> =
            (0..65).map(|i| json!({"name": format!("d{i}"), "consumesCounters": [entry("a")]})).collect();
        assert!(validate_slice(&slice(json!({"devices": many}))).expect_err("65").contains("at most 64"));
    }

    #[test]
    fn counter_quantities_are_stored_canonically() {
        let mut sent = slice(json!({
            "devices": [{"name": "d", "consumesCounters": [{"counterSet": "a", "counters": {"m": {"value": "20480Mi"}}}]}],
        }));
        canonical_counters(&mut sent);
        assert_eq!(sent["spec"]["devices"][0]["consumesCounters"][0]["counters"]["m"]["value"], json!("20Gi"));
        let mut sets = slice(json!({"sharedCounters": [{"name": "a", "counters": {"m": {"value": "1000"}}}]}));
        canonical_counters(&mut sets);
        assert_eq!(sets["spec"]["sharedCounters"][0]["counters"]["m"]["value"], json!("1k"));
    }
}

#[cfg(test)]
mod request_policy_tests {
    use super::*;

    /// A slice of one device with capacity `bandwidth` of 10G and `policy`.
    fn slice(shared: bool, policy: Value) -> Value {
        let mut device = json!({"name": "nic-0", "capacity": {"bandwidth": {"value": "10G", "requestPolicy": policy}}});
        if shared {
            device["allowMultipleAllocations"] = json!(true);
        }
        json!({"metadata": {"name": "s"}, "spec": {
            "driver": "nic.example.com", "nodeName": "node-a",
            "pool": {"name": "node-a", "generation": 1, "resourceSliceCount": 1},
            "devices": [device],
        }})
    }

    fn refused(policy: Value) -> String {
        validate_slice(&slice(true, policy.clone())).expect_err(&format!("{policy} is refused"))
    }

    #[test]
    fn request_policies_are_checked_as_the_server_does() {
        let range = json!({"default": "1G", "validRange": {"min": "1G", "max": "10G", "step": "1G"}});
        assert_eq!(validate_slice(&slice(true, range.clone())), Ok(()));
        assert!(
            validate_slice(&slice(false, range))
                .expect_err("not shared")
                .contains("allowMultipleAllocations must be true")
        );
        assert_eq!(validate_slice(&slice(true, json!({"default": "2G"}))), Ok(()), "a default alone is unchecked");
        assert_eq!(validate_slice(&slice(true, json!({"default": "1G", "validValues": ["1G", "5G"]}))), Ok(()));

        assert!(
            refused(json!({"default": "1G", "validValues": ["1G"], "validRange": {"min": "1G"}}))
                .contains("exactly one policy")
        );
        assert!(refused(json!({"validValues": ["1G"]})).contains("default: Required value"));
        assert!(refused(json!({"validRange": {"min": "1G"}})).contains("default: Required value"));
        assert!(refused(json!({"default": "1G", "validRange": {}})).contains("min: Required value"));
        assert!(refused(json!({"default": "1G", "validValues": ["5G", "1G"]})).contains("ascending"));
        assert!(refused(json!({"default": "2G", "validValues": ["1G", "5G"]})).contains("default value is not valid"));
        assert!(refused(json!({"default": "1G", "validValues": ["1G", "20G"]})).contains("larger than capacity"));
        let eleven: Vec<String> = (1..=11).map(|n| format!("{n}00M")).collect();
        assert!(refused(json!({"default": "100M", "validValues": eleven})).contains("Too many: 11"));
        assert!(
            refused(json!({"default": "1G", "validRange": {"min": "20G"}})).contains("min is larger than capacity")
        );
        assert!(refused(json!({"default": "500M", "validRange": {"min": "1G"}})).contains("default is less than min"));
        assert!(refused(json!({"default": "1G", "validRange": {"min": "1G", "max": "20G"}})).contains("max is larger"));
        assert!(
            refused(json!({"default": "3G", "validRange": {"min": "1G", "max": "2G"}}))
                .contains("default is more than max")
        );
        assert!(refused(json!({"default": "1G", "validRange": {"min": "1G", "step": "10G"}})).contains("one step"));
        assert!(
            refused(json!({"default": "1500M", "validRange": {"min": "1G", "step": "1G"}}))
                .contains("multiple of a given step")
        );
        assert!(
            refused(json!({"default": "1G", "validRange": {"min": "1G", "max": "9500M", "step": "1G"}}))
                .contains("multiple")
        );
    }

    #[test]
    fn request_policy_quantities_are_stored_canonically() {
        let mut sent = slice(
            true,
            json!({"default": "1000M", "validRange": {"min": "1000M", "step": "1000000k"}, "validValues": []}),
        );
        canonical_request_policies(&mut sent);
        let policy = &sent["spec"]["devices"][0]["capacity"]["bandwidth"]["requestPolicy"];
        assert_eq!(policy["default"], "1G");
        assert_eq!(policy["validRange"]["min"], "1G");
        assert_eq!(policy["validRange"]["step"], "1G");
        assert_eq!(nanos("1Gi"), Some(1_073_741_824_000_000_000));
        assert_eq!(nanos("500m"), Some(500_000_000));
        assert_eq!(nanos("1e3"), Some(1_000_000_000_000));
        assert_eq!(nanos("x"), None);
    }
}
