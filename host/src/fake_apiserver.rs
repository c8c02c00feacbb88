//! The parts of a Kubernetes API server a DRA driver talks to, for tests
//! and the demo: plain HTTP on a real TCP socket, JSON in and out, written
//! from the API conventions and `docs/dra-api.md` §4 (never from devhost's
//! own code, so it can disagree with it).
//!
//! Served: `resource.k8s.io/v1` ResourceSlices (list with a label and field
//! selector, get, create, replace with optimistic concurrency, delete),
//! ResourceClaims (get) and Nodes (get). Every object gets a
//! `resourceVersion` from one counter, as etcd gives; a replace that names
//! an older one is a 409 Conflict; a create of an existing name is a 409
//! AlreadyExists. A slice is checked against the rules of §4 and refused
//! with 422 Invalid when it breaks one. Errors are `Status` objects.
//!
//! For tests: every request is logged with its time and outcome, the
//! server can be made unavailable (every request answered 503) and objects
//! can be put in or changed behind the client's back.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Request {
    /// Whether this request changed (or tried to change) a ResourceSlice.
    pub fn is_slice_write(&self) -> bool {
        self.path.starts_with(SLICES) && self.method != "GET"
    }
}

#[derive(Default)]
struct Store {
    version: u64,
    slices: BTreeMap<String, Value>,
    claims: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    unavailable: bool,
    hanging: bool,
    log: Vec<Request>,
}

impl Store {
    fn next_version(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
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
        let store = Shared::default();
        let app = Router::new()
            .route(SLICES, get(list_slices).post(create_slice))
            .route(&format!("{SLICES}/{{name}}"), get(get_slice).put(replace_slice).delete(delete_slice))
            .route("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}", get(get_claim))
            .route("/api/v1/nodes/{name}", get(get_node))
            .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such path") })
            .layer(axum::middleware::from_fn_with_state(store.clone(), gate))
            .with_state(store.clone());
        let shutdown = CancellationToken::new();
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

    /// Puts a ResourceSlice in without any check, as another client (an
    /// earlier instance of the driver, say) would have.
    pub fn put_slice(&self, mut slice: Value) {
        let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let mut store = self.store();
        store.stamp(&mut slice, &name);
        store.slices.insert(name, slice);
    }

    /// Deletes a ResourceSlice behind the client's back (as a restarted
    /// kubelet deletes its node's slices); whether it was there.
    pub fn delete_slice(&self, name: &str) -> bool {
        self.store().slices.remove(name).is_some()
    }

    /// Every ResourceSlice held, by name.
    pub fn slices(&self) -> BTreeMap<String, Value> {
        self.store().slices.clone()
    }

    /// While `true`, every request is answered 503 ServiceUnavailable.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.store().unavailable = unavailable;
    }

    /// While `true`, requests get no answer at all (a hung server); they
    /// are logged with status 0 when they arrive.
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
    let at = Instant::now();
    let (unavailable, hanging) = {
        let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
        if store.hanging {
            store.log.push(Request { method: method.clone(), path: path.clone(), status: 0, at });
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
    store.lock().unwrap_or_else(PoisonError::into_inner).log.push(Request { method, path, status, at });
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

async fn list_slices(State(store): State<Shared>, uri: Uri) -> Response {
    let query = query(&uri);
    let Some(labels) = selector(query.get("labelSelector").map_or("", String::as_str)) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported label selector");
    };
    let Some(fields) = selector(query.get("fieldSelector").map_or("", String::as_str)) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported field selector");
    };
    let mut store = lock(&store);
    let mut items = Vec::new();
    for slice in store.slices.values() {
        let labelled = labels.iter().all(|(key, value)| slice["metadata"]["labels"][key].as_str() == Some(value));
        let mut fielded = true;
        for (field, value) in &fields {
            let actual = match field.as_str() {
                "spec.nodeName" => slice["spec"]["nodeName"].as_str(),
                "spec.driver" => slice["spec"]["driver"].as_str(),
                "metadata.name" => slice["metadata"]["name"].as_str(),
                other => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("field label not supported: {other}"),
                    );
                }
            };
            fielded &= actual.unwrap_or_default() == value;
        }
        if labelled && fielded {
            items.push(slice.clone());
        }
    }
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
    if let Err(why) = validate_slice(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let mut store = lock(&store);
    if store.slices.contains_key(&name) {
        let message = format!("resourceslices.resource.k8s.io \"{name}\" already exists");
        return status(StatusCode::CONFLICT, "AlreadyExists", &message);
    }
    slice["metadata"]["uid"] = Value::Null;
    store.stamp(&mut slice, &name);
    store.slices.insert(name, slice.clone());
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
    if let Err(why) = validate_slice(&slice) {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    let mut store = lock(&store);
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
    store.stamp(&mut slice, &name);
    store.slices.insert(name, slice.clone());
    object(StatusCode::OK, &slice)
}

async fn delete_slice(State(store): State<Shared>, Path(name): Path<String>) -> Response {
    match lock(&store).slices.remove(&name) {
        Some(slice) => object(StatusCode::OK, &slice),
        None => not_found("resourceslices", &name),
    }
}

async fn get_claim(State(store): State<Shared>, Path((namespace, name)): Path<(String, String)>) -> Response {
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
    let limit = if tainted { 64 } else { 128 };
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
    }
    Ok(())
}
