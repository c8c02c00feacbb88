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
use crate::dra::names::is_dns_subdomain;
use crate::proto::dra::health::dra_resource_health_client::DraResourceHealthClient;
use crate::proto::dra::health::{NodeWatchResourcesRequest, NodeWatchResourcesResponse};
use crate::proto::dra::pluginregistration::registration_client::RegistrationClient;
use crate::proto::dra::pluginregistration::{InfoRequest, RegistrationStatus};
use crate::proto::dra::{v1, v1beta1};
use crate::server::socket::FileIdentity;

/// How often the registry directory is scanned (the kubelet reacts to
/// inotify and reconciles every second; a test needs no less).
const SCAN: Duration = Duration::from_millis(50);
/// The kubelet's deadlines (§2.9).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// A kubelet of 1.34 or later: both `DRAPlugin` packages and health.
pub const KUBELET_1_34: &[&str] = &["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth"];
/// A 1.32 kubelet: `v1beta1.DRAPlugin` only.
pub const KUBELET_1_32: &[&str] = &["v1beta1.DRAPlugin"];

/// One driver the watcher registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraRegistration {
    /// The driver name.
    pub driver: String,
    /// The service socket it dials.
    pub endpoint: PathBuf,
    /// The `DRAPlugin` service it chose, e.g. `v1.DRAPlugin`.
    pub service: String,
    /// Whether both sides offer `v1.DRAResourceHealth`.
    pub health: bool,
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
}

/// A fake plugin watcher with a DRA handler.
pub struct FakePluginWatcher {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl FakePluginWatcher {
    /// Watches `<kubelet_root>/plugins_registry/` (created mode 0755, as the
    /// kubelet does) as a kubelet that knows the services `known`.
    pub async fn start(kubelet_root: &Path, known: &[&str]) -> Result<FakePluginWatcher, FakeKubeletError> {
        let registry = kubelet_root.join("plugins_registry");
        std::fs::create_dir_all(&registry)
            .map_err(|source| FakeKubeletError::CreateDir { dir: registry.clone(), source })?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let known: Vec<String> = known.iter().map(|k| (*k).to_owned()).collect();
        tokio::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            async move {
                loop {
                    scan(&registry, &known, &seen).await;
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
        let channel = crate::uds::connect(&registration.endpoint, DIAL_TIMEOUT).await.map_err(|e| e.to_string())?;
        Ok((channel, registration.service == "v1.DRAPlugin"))
    }

    /// Opens the health stream of `driver`, as the kubelet does when both
    /// sides offer `v1.DRAResourceHealth`.
    pub async fn watch_health(&self, driver: &str) -> Result<tonic::Streaming<NodeWatchResourcesResponse>, String> {
        let registration = self.driver(driver).ok_or_else(|| format!("driver {driver} is not registered"))?;
        if !registration.health {
            return Err(format!("driver {driver} offers no v1.DRAResourceHealth this kubelet knows"));
        }
        let channel = crate::uds::connect(&registration.endpoint, DIAL_TIMEOUT).await.map_err(|e| e.to_string())?;
        let mut client = DraResourceHealthClient::new(channel);
        client
            .node_watch_resources(NodeWatchResourcesRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.to_string())
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
async fn scan(registry: &Path, known: &[String], seen: &Arc<Mutex<Seen>>) {
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
        present.into_iter().filter(|(path, _)| !seen.sockets.contains_key(path)).collect()
    };
    for (socket, identity) in new {
        let outcome = register(&socket, known, seen).await;
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(registration) => {
                seen.sockets.insert(socket, (identity, Some(registration)));
            }
            Err(refusal) => {
                seen.refusals.push(refusal);
                seen.sockets.insert(socket, (identity, None));
            }
        }
    }
}

/// Registers the plugin behind `socket`, or says why not (after telling it).
async fn register(socket: &Path, known: &[String], seen: &Arc<Mutex<Seen>>) -> Result<DraRegistration, String> {
    let channel =
        crate::uds::connect(socket, DIAL_TIMEOUT).await.map_err(|e| format!("dial {}: {e}", socket.display()))?;
    let mut client = RegistrationClient::new(channel);
    let info = tokio::time::timeout(GET_INFO_TIMEOUT, client.get_info(InfoRequest {}))
        .await
        .map_err(|_| format!("GetInfo on {} timed out", socket.display()))?
        .map_err(|status| format!("GetInfo on {}: {status}", socket.display()))?
        .into_inner();
    let endpoint = if info.endpoint.is_empty() { socket.to_owned() } else { PathBuf::from(&info.endpoint) };
    let verdict = judge(&info, &endpoint, known, seen);
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

/// The kubelet's checks; the `DRAPlugin` service chosen and whether health
/// is offered, or the refusal.
fn judge(
    info: &crate::proto::dra::pluginregistration::PluginInfo,
    endpoint: &Path,
    known: &[String],
    seen: &Arc<Mutex<Seen>>,
) -> Result<(String, bool), String> {
    if info.r#type != "DRAPlugin" {
        return Err(format!("no handler registered for plugin type: {}", info.r#type));
    }
    if info.supported_versions.is_empty() {
        return Err("empty list of supported gRPC services".to_owned());
    }
    // Newest first, as the kubelet prefers them.
    let service = ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        .into_iter()
        .find(|s| known.iter().any(|k| k == s) && info.supported_versions.iter().any(|v| v == s))
        .ok_or_else(|| {
            format!(
                "none of the plugin's services {:?} is one this kubelet supports {known:?}",
                info.supported_versions
            )
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
    let health = "v1.DRAResourceHealth";
    let offered = known.iter().any(|k| k == health) && info.supported_versions.iter().any(|v| v == health);
    Ok((service.to_owned(), offered))
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
