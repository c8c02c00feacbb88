//! The kubelet's plugin watcher and its DRA handler, written from
//! `docs/device-plugin-api.md` §2.9 and `docs/dra-api.md` §2, for tests:
//! it watches `<root>/plugins_registry/`, and for each new socket does what
//! the kubelet does: dial (10 s), `GetInfo` (1 s), validate, and
//! `NotifyRegistrationStatus`. It then offers the kubelet's DRA calls on
//! the registered endpoint, through the newest `DRAPlugin` package both
//! sides know.
//!
//! What it checks, as the kubelet does: the type must have a handler (only
//! `DRAPlugin` here), an empty `supported_versions` is refused ("empty list
//! of supported gRPC services"), a list without a `DRAPlugin` service this
//! kubelet knows is refused, the name must be a DNS subdomain, an empty
//! endpoint means the registration socket, and an endpoint another driver
//! registered is refused. Files starting with `.` and non-sockets are
//! ignored; a removed socket deregisters its driver, and a socket
//! re-created at the same path registers again.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;

use super::FakeKubeletError;
use super::versions::{HEALTH_RETRY, HealthApi, KubeletVersion};
use crate::dra::names::is_dns_subdomain;
use crate::proto::dra::health::dra_resource_health_client::DraResourceHealthClient;
use crate::proto::dra::health::{NodeWatchResourcesRequest, NodeWatchResourcesResponse, v1alpha1};
use crate::proto::dra::pluginregistration::registration_client::RegistrationClient;
use crate::proto::dra::pluginregistration::{InfoRequest, RegistrationStatus};
use crate::proto::dra::{v1, v1beta1};
use crate::sockets::FileIdentity;

/// How often the registry directory is scanned (the kubelet reacts to
/// inotify and reconciles every second; a test needs no less).
const SCAN: Duration = Duration::from_millis(50);
/// The kubelet's deadlines (§2.9).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// One driver the watcher registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraRegistration {
    /// The driver name.
    pub driver: String,
    /// The service socket it dials.
    pub endpoint: PathBuf,
    /// The `DRAPlugin` service it chose, e.g. `v1.DRAPlugin`.
    pub service: String,
    /// The health stream this kubelet opens on it, if any.
    pub health: Option<HealthApi>,
    /// The registration socket it came from.
    pub socket: PathBuf,
}

#[derive(Default)]
struct Seen {
    /// Registration socket → its identity and the driver registered from it
    /// (`None`: refused).
    sockets: BTreeMap<PathBuf, (FileIdentity, Option<DraRegistration>)>,
    /// Every refusal sent, in order.
    refusals: Vec<String>,
    /// Registration socket → the token that ends its health stream.
    health_streams: BTreeMap<PathBuf, CancellationToken>,
    /// Driver → health messages received on the stream the watcher opened.
    health_messages: BTreeMap<String, Vec<NodeWatchResourcesResponse>>,
    /// Every error the opened health streams ended with, as the kubelet
    /// logs them (`Error receiving from WatchResources stream`).
    health_errors: Vec<String>,
}

/// A fake plugin watcher with a DRA handler.
pub struct FakePluginWatcher {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl FakePluginWatcher {
    /// Watches `<kubelet_root>/plugins_registry/` (created mode 0755, as the
    /// kubelet does) as a kubelet of `version`: the `DRAPlugin` services it
    /// knows, and the health stream it opens on each registered plugin.
    pub async fn start(kubelet_root: &Path, version: KubeletVersion) -> Result<FakePluginWatcher, FakeKubeletError> {
        let registry = kubelet_root.join("plugins_registry");
        std::fs::create_dir_all(&registry)
            .map_err(|source| FakeKubeletError::CreateDir { dir: registry.clone(), source })?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        tokio::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            async move {
                loop {
                    scan(&registry, version, &seen, &stop).await;
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(SCAN) => {}
                    }
                }
            }
        });
        Ok(FakePluginWatcher { seen, stop })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The registered driver `driver`, if it is registered now.
    pub fn driver(&self, driver: &str) -> Option<DraRegistration> {
        self.seen().sockets.values().filter_map(|(_, r)| r.clone()).find(|r| r.driver == driver)
    }

    /// Every driver registered now.
    pub fn drivers(&self) -> Vec<DraRegistration> {
        self.seen().sockets.values().filter_map(|(_, r)| r.clone()).collect()
    }

    /// Waits until `driver` is registered.
    pub async fn wait_for_driver(&self, driver: &str, timeout: Duration) -> Result<DraRegistration, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(registration) = self.driver(driver) {
                return Ok(registration);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "driver {driver} not registered within {timeout:?}; refusals: {:?}",
                    self.refusals()
                ));
            }
            tokio::time::sleep(SCAN).await;
        }
    }

    /// Every refusal sent to a plugin, in order.
    pub fn refusals(&self) -> Vec<String> {
        self.seen().refusals.clone()
    }

    /// The health messages `driver` sent on the stream the watcher opened
    /// (as the kubelet does, per its version).
    pub fn health_messages(&self, driver: &str) -> Vec<NodeWatchResourcesResponse> {
        self.seen().health_messages.get(driver).cloned().unwrap_or_default()
    }

    /// Every error a health stream the watcher opened ended with.
    pub fn health_errors(&self) -> Vec<String> {
        self.seen().health_errors.clone()
    }

    /// `NodePrepareResources` for `claims` (namespace, uid, name) through
    /// the package the driver was registered with, answered as `v1`.
    pub async fn prepare(
        &self,
        driver: &str,
        claims: &[(&str, &str, &str)],
    ) -> Result<v1::NodePrepareResourcesResponse, String> {
        let (channel, v1_service) = self.dial(driver).await?;
        let request = v1::NodePrepareResourcesRequest { claims: claim_list(claims) };
        if v1_service {
            let mut client = v1::dra_plugin_client::DraPluginClient::new(channel);
            return client
                .node_prepare_resources(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.to_string());
        }
        let mut client = v1beta1::dra_plugin_client::DraPluginClient::new(channel);
        let answer = client
            .node_prepare_resources(same_wire::<_, v1beta1::NodePrepareResourcesRequest>(&request)?)
            .await
            .map_err(|s| s.to_string())?;
        same_wire(&answer.into_inner())
    }

    /// `NodeUnprepareResources` for `claims` (namespace, uid, name), as
    /// [`prepare`](Self::prepare).
    pub async fn unprepare(
        &self,
        driver: &str,
        claims: &[(&str, &str, &str)],
    ) -> Result<v1::NodeUnprepareResourcesResponse, String> {
        let (channel, v1_service) = self.dial(driver).await?;
        let request = v1::NodeUnprepareResourcesRequest { claims: claim_list(claims) };
        if v1_service {
            let mut client = v1::dra_plugin_client::DraPluginClient::new(channel);
            return client
                .node_unprepare_resources(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.to_string());
        }
        let mut client = v1beta1::dra_plugin_client::DraPluginClient::new(channel);
        let answer = client
            .node_unprepare_resources(same_wire::<_, v1beta1::NodeUnprepareResourcesRequest>(&request)?)
            .await
            .map_err(|s| s.to_string())?;
        same_wire(&answer.into_inner())
    }

    /// A channel to `driver`'s endpoint, and whether it was registered
    /// with `v1.DRAPlugin` (else `v1beta1`).
    async fn dial(&self, driver: &str) -> Result<(tonic::transport::Channel, bool), String> {
        let registration = self.driver(driver).ok_or_else(|| format!("driver {driver} is not registered"))?;
        let channel =
            crate::sockets::client::connect(&registration.endpoint, DIAL_TIMEOUT).await.map_err(|e| e.to_string())?;
        Ok((channel, registration.service == "v1.DRAPlugin"))
    }

    /// Opens another health stream of `driver`, through the version this
    /// kubelet opens on it.
    pub async fn watch_health(&self, driver: &str) -> Result<tonic::Streaming<NodeWatchResourcesResponse>, String> {
        let registration = self.driver(driver).ok_or_else(|| format!("driver {driver} is not registered"))?;
        let api = registration.health.ok_or_else(|| format!("this kubelet opens no health stream on {driver}"))?;
        open_health(&registration.endpoint, api).await
    }

    /// Stops watching.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakePluginWatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One pass over the registry: new or re-created sockets register, gone
/// ones deregister.
async fn scan(registry: &Path, version: KubeletVersion, seen: &Arc<Mutex<Seen>>, stop: &CancellationToken) {
    let mut present = BTreeMap::new();
    for entry in std::fs::read_dir(registry).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_socket()) {
            continue;
        }
        if let Some(identity) = FileIdentity::of(&entry.path()) {
            present.insert(entry.path(), identity);
        }
    }
    let new: Vec<(PathBuf, FileIdentity)> = {
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.sockets.retain(|path, (identity, _)| present.get(path) == Some(identity));
        let Seen { sockets, health_streams, .. } = &mut *seen;
        health_streams.retain(|path, token| {
            let kept = sockets.contains_key(path);
            if !kept {
                token.cancel();
            }
            kept
        });
        present.into_iter().filter(|(path, _)| !seen.sockets.contains_key(path)).collect()
    };
    for (socket, identity) in new {
        let outcome = register(&socket, version, seen).await;
        let mut seen_now = seen.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(registration) => {
                if let Some(api) = registration.health {
                    let token = stop.child_token();
                    seen_now.health_streams.insert(socket.clone(), token.clone());
                    tokio::spawn(keep_health_open(registration.clone(), api, seen.clone(), token));
                }
                seen_now.sockets.insert(socket, (identity, Some(registration)));
            }
            Err(refusal) => {
                seen_now.refusals.push(refusal);
                seen_now.sockets.insert(socket, (identity, None));
            }
        }
    }
}

/// Registers the plugin behind `socket`, or says why not (after telling it).
async fn register(socket: &Path, version: KubeletVersion, seen: &Arc<Mutex<Seen>>) -> Result<DraRegistration, String> {
    // The real plugin watcher dials the bare socket path with no
    // `WithAuthority`: grpc-go sends the path, percent-encoded.
    let authority = crate::sockets::client::plugin_watcher_authority(socket);
    let channel = crate::sockets::client::connect_as(socket, DIAL_TIMEOUT, &authority)
        .await
        .map_err(|e| format!("dial {}: {e}", socket.display()))?;
    let mut client = RegistrationClient::new(channel);
    let info = tokio::time::timeout(GET_INFO_TIMEOUT, client.get_info(InfoRequest {}))
        .await
        .map_err(|_| format!("GetInfo on {} timed out", socket.display()))?
        .map_err(|status| format!("GetInfo on {}: {status}", socket.display()))?
        .into_inner();
    let endpoint = if info.endpoint.is_empty() { socket.to_owned() } else { PathBuf::from(&info.endpoint) };
    let verdict = judge(&info, &endpoint, version, seen);
    let status = match &verdict {
        Ok(_) => RegistrationStatus { plugin_registered: true, error: String::new() },
        Err(error) => RegistrationStatus { plugin_registered: false, error: error.clone() },
    };
    let _ = tokio::time::timeout(NOTIFY_TIMEOUT, client.notify_registration_status(status)).await;
    verdict.map(|(service, health)| DraRegistration {
        driver: info.name,
        endpoint,
        service,
        health,
        socket: socket.to_owned(),
    })
}

/// The kubelet's checks; the `DRAPlugin` service chosen and the health
/// stream it will open, or the refusal.
fn judge(
    info: &crate::proto::dra::pluginregistration::PluginInfo,
    endpoint: &Path,
    version: KubeletVersion,
    seen: &Arc<Mutex<Seen>>,
) -> Result<(String, Option<HealthApi>), String> {
    if info.r#type != "DRAPlugin" {
        return Err(format!("no handler registered for plugin type: {}", info.r#type));
    }
    if info.supported_versions.is_empty() {
        return Err("empty list of supported gRPC services".to_owned());
    }
    // Newest first, as the kubelet prefers them.
    let known = version.dra_services();
    let service = known.iter().find(|s| info.supported_versions.iter().any(|v| v == *s)).ok_or_else(|| {
        format!("none of the plugin's services {:?} is one this kubelet supports {known:?}", info.supported_versions)
    })?;
    if !is_dns_subdomain(&info.name) {
        return Err(format!("driver name {:?} is not a DNS subdomain", info.name));
    }
    let taken = seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .sockets
        .values()
        .filter_map(|(_, r)| r.as_ref())
        .any(|r| r.endpoint == endpoint && r.driver != info.name);
    if taken {
        return Err(format!("endpoint {} is already registered by another plugin", endpoint.display()));
    }
    Ok(((*service).to_owned(), version.health_api(&info.supported_versions)))
}

/// Opens `api`'s health stream on `endpoint`, dialled as the kubelet's DRA
/// client dials (`:authority` localhost).
async fn open_health(endpoint: &Path, api: HealthApi) -> Result<tonic::Streaming<NodeWatchResourcesResponse>, String> {
    let channel = crate::sockets::client::connect(endpoint, DIAL_TIMEOUT).await.map_err(|e| e.to_string())?;
    let opened = match api {
        HealthApi::V1 => DraResourceHealthClient::new(channel).node_watch_resources(NodeWatchResourcesRequest {}).await,
        HealthApi::V1alpha1 => {
            v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(channel)
                .node_watch_resources(NodeWatchResourcesRequest {})
                .await
        }
    };
    opened.map(tonic::Response::into_inner).map_err(|status| format!("{api:?}: {status}"))
}

/// What the kubelet's DRA manager does for a registered plugin while the
/// ResourceHealthStatus gate is on: keeps the health stream open, records
/// what arrives, and after an error opens it again [`HEALTH_RETRY`] later.
async fn keep_health_open(
    registration: DraRegistration,
    api: HealthApi,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let record_error = |error: String| {
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .health_errors
            .push(format!("{}: {error}", registration.driver));
    };
    loop {
        match open_health(&registration.endpoint, api).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(message)) => seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .health_messages
                        .entry(registration.driver.clone())
                        .or_default()
                        .push(message),
                    Ok(None) => break,
                    Err(status) => {
                        record_error(format!("{api:?}: {status}"));
                        break;
                    }
                }
            },
            Err(error) => record_error(error),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEALTH_RETRY) => {}
        }
    }
}

fn claim_list(claims: &[(&str, &str, &str)]) -> Vec<v1::Claim> {
    claims
        .iter()
        .map(|(namespace, uid, name)| v1::Claim {
            namespace: (*namespace).into(),
            uid: (*uid).into(),
            name: (*name).into(),
        })
        .collect()
}

/// Re-reads one message as another with the same wire contract (the
/// `v1beta1` and `v1` DRA messages).
fn same_wire<From: Message, To: Message + Default>(message: &From) -> Result<To, String> {
    To::decode(message.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}
