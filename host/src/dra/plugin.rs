//! The kubelet side of one DRA driver (`docs/dra-api.md` §1–3): a
//! registration socket in `<root>/plugins_registry/` serving the plugin
//! watcher's `pluginregistration.Registration`, and the service socket
//! `<root>/plugins/<driver>/dra.sock` serving `DRAPlugin` in its `v1` and
//! `v1beta1` packages and `DRAResourceHealth` in `v1` (kubelets from 1.37,
//! when listed) and `v1alpha1` (a 1.36 kubelet opens it on every plugin).
//!
//! The resource's device state feeds `NodeWatchResources`, every change at
//! once; claims are prepared and unprepared by the driver's
//! [`Preparer`]. Without one (no API server to read claims from) each
//! claim is answered with its own error saying so (never a failed batch),
//! and unpreparing succeeds, as nothing was prepared.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt};
use prost::Message;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::names;
use super::prepare::Preparer;
use crate::device_state::{ResourceState, Snapshot};
use crate::model::Health;
use crate::proto::dra::health::dra_resource_health_server::{DraResourceHealth, DraResourceHealthServer};
use crate::proto::dra::health::v1alpha1;
use crate::proto::dra::health::{
    DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest, NodeWatchResourcesResponse,
};
use crate::proto::dra::pluginregistration::registration_server::{Registration, RegistrationServer};
use crate::proto::dra::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};
use crate::proto::dra::{v1, v1beta1};
use crate::sockets::{self, FileIdentity, files as socket};

/// `PluginInfo.type` of a DRA driver.
pub const PLUGIN_TYPE: &str = "DRAPlugin";
/// The gRPC services devhost offers, newest first: both `DRAPlugin`
/// packages (kubelets from 1.32 on) and the health stream.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth"];
/// After this long without an update the kubelet takes a device's health
/// as Unknown; devhost re-sends the state well within it.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long after its registration socket is served a driver waits for a
/// kubelet to call it before saying none has (a wrong kubelet root, a
/// directory not mounted from the host, a kubelet not running).
pub const KUBELET_SILENT_AFTER: Duration = Duration::from_secs(30);

/// Where one driver's sockets go under the kubelet's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraPaths {
    /// `<root>/plugins_registry/<driver>-reg.sock`, watched by the kubelet.
    pub registration: PathBuf,
    /// `<root>/plugins/<driver>/dra.sock`, the endpoint it registers.
    pub service: PathBuf,
}

impl DraPaths {
    /// The conventional paths of `driver` under `kubelet_root`.
    pub fn new(kubelet_root: &Path, driver: &str) -> Self {
        DraPaths {
            registration: kubelet_root.join("plugins_registry").join(format!("{driver}-reg.sock")),
            service: kubelet_root.join("plugins").join(driver).join("dra.sock"),
        }
    }

    /// The paths of `driver` for one devhost instance:
    /// `<driver>-<instance>-reg.sock` and `plugins/<driver>/dra-<instance>.sock`.
    /// Two instances (the old and the new pod of a rolling update) each
    /// serve their own, which kubelets from 1.33 register side by side,
    /// instead of taking each other's sockets away.
    pub fn for_instance(kubelet_root: &Path, driver: &str, instance: &str) -> Self {
        DraPaths {
            registration: kubelet_root.join("plugins_registry").join(format!("{driver}-{instance}-reg.sock")),
            service: kubelet_root.join("plugins").join(driver).join(format!("dra-{instance}.sock")),
        }
    }

    /// Removes the sockets of `driver` that earlier instances left behind
    /// (nobody listens on them); a live instance's stay.
    pub fn remove_stale(kubelet_root: &Path, driver: &str) -> Vec<PathBuf> {
        let registry = socket::remove_refusing(&kubelet_root.join("plugins_registry"), |name| {
            name.strip_prefix(driver).is_some_and(|rest| rest.starts_with('-') && rest.ends_with("-reg.sock"))
        });
        let service = socket::remove_refusing(&kubelet_root.join("plugins").join(driver), |name| {
            name.starts_with("dra") && name.ends_with(".sock")
        });
        registry.into_iter().chain(service).collect()
    }
}

/// A running DRA driver: both sockets served until [`DraPlugin::stop`].
#[derive(Debug)]
pub struct DraPlugin {
    paths: DraPaths,
    identities: [FileIdentity; 2],
    registered: Arc<AtomicBool>,
    stop: CancellationToken,
    tasks: [JoinHandle<Result<(), tonic::transport::Error>>; 2],
    /// Says so when no kubelet calls in time ([`KUBELET_SILENT_AFTER`]).
    watchdog: JoinHandle<()>,
}

impl DraPlugin {
    /// Serves `driver` for `state`'s devices in pool `pool` (the node name):
    /// the service socket first, then the registration socket, whose
    /// appearance is what the kubelet acts on.
    pub fn start(
        driver: &str,
        pool: &str,
        paths: &DraPaths,
        state: Arc<ResourceState>,
        preparer: Option<Arc<Preparer>>,
        on_registered: Option<Arc<tokio::sync::Notify>>,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        for socket in [&paths.service, &paths.registration] {
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let registered = Arc::new(AtomicBool::new(false));
        let contacted = Arc::new(AtomicBool::new(false));
        let (service_listener, service_identity) = socket::bind(&paths.service)?;
        let service = DraService { driver: driver.to_owned(), preparer };
        let health = HealthService { pool: pool.to_owned(), state, stop: stop.clone() };
        let service_task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::dra_plugin_server::DraPluginServer::new(service.clone()))
                .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(service))
                .add_service(DraResourceHealthServer::new(health.clone()))
                .add_service(v1alpha1::dra_resource_health_server::DraResourceHealthServer::new(health))
                .serve_with_incoming_shutdown(
                    sockets::unix_incoming(
                        service_listener,
                        format!("{driver} dra.sock"),
                        crate::telemetry::global().accept_refused("resource"),
                    ),
                    stop.clone().cancelled_owned(),
                ),
        );
        let (registration_listener, registration_identity) = socket::bind(&paths.registration)?;
        let registration = RegistrationService {
            driver: driver.to_owned(),
            endpoint: paths.service.display().to_string(),
            registered: registered.clone(),
            contacted: contacted.clone(),
            on_registered,
        };
        let registration_task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(registration))
                .serve_with_incoming_shutdown(
                    sockets::unix_incoming(
                        registration_listener,
                        format!("{driver} registration"),
                        crate::telemetry::global().accept_refused("resource"),
                    ),
                    stop.clone().cancelled_owned(),
                ),
        );
        let watchdog =
            tokio::spawn(say_if_silent(driver.to_owned(), paths.registration.clone(), contacted, stop.clone()));
        Ok(DraPlugin {
            paths: paths.clone(),
            identities: [service_identity, registration_identity],
            registered,
            stop,
            tasks: [service_task, registration_task],
            watchdog,
        })
    }

    /// Whether the kubelet said it registered the driver (and has not
    /// refused it since).
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// Whether either socket is gone or replaced (a kubelet or an operator
    /// removed it): the driver must start again to be reachable.
    pub fn sockets_lost(&self) -> bool {
        [&self.paths.service, &self.paths.registration]
            .iter()
            .zip(&self.identities)
            .any(|(path, identity)| FileIdentity::of(path).as_ref() != Some(identity))
    }

    /// Stops serving and removes both sockets (the registration socket
    /// first, so the kubelet deregisters before the endpoint goes).
    pub async fn stop(self) {
        for (path, identity) in [&self.paths.registration, &self.paths.service].iter().zip(self.identities.iter().rev())
        {
            if FileIdentity::of(path).as_ref() == Some(identity) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = self.watchdog.await;
    }
}

/// Waits [`KUBELET_SILENT_AFTER`]; if no kubelet has called the registration
/// socket by then, says so once (log, metric, `/readyz`), naming the socket
/// and what to check. The kubelet's plugin watcher calls `GetInfo` within a
/// second of a socket appearing in the `plugins_registry/` it watches, so
/// silence means it watches another directory, or none.
async fn say_if_silent(driver: String, socket: PathBuf, contacted: Arc<AtomicBool>, stop: CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(KUBELET_SILENT_AFTER) => {}
    }
    if contacted.load(Ordering::SeqCst) {
        return;
    }
    let registry = socket.parent().map_or_else(|| socket.clone(), Path::to_path_buf);
    tracing::warn!(
        driver = %driver,
        socket = %socket.display(),
        "no kubelet has called the DRA driver's registration socket within {KUBELET_SILENT_AFTER:?}: the kubelet's \
         plugin watcher must watch {} (its --root-dir, followed by plugins_registry/); check [dra] kubelet_root, that \
         the directory is the host's (mounted into devhost's pod) and that the kubelet is running",
        registry.display()
    );
    crate::telemetry::global().dra().silent(&driver, &socket.display().to_string());
}

struct RegistrationService {
    driver: String,
    endpoint: String,
    registered: Arc<AtomicBool>,
    /// Whether a kubelet has called this socket at all.
    contacted: Arc<AtomicBool>,
    /// Told each time the kubelet registers the driver.
    on_registered: Option<Arc<tokio::sync::Notify>>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        self.contacted.store(true, Ordering::SeqCst);
        Ok(Response::new(PluginInfo {
            r#type: PLUGIN_TYPE.to_owned(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        self.contacted.store(true, Ordering::SeqCst);
        self.registered.store(status.plugin_registered, Ordering::SeqCst);
        if status.plugin_registered {
            crate::telemetry::global().dra().registered(&self.driver, true);
            tracing::info!(driver = %self.driver, endpoint = %self.endpoint, "registered with the kubelet as a DRA driver");
            if let Some(notify) = &self.on_registered {
                notify.notify_one();
            }
        } else {
            crate::telemetry::global().dra().refused(&self.driver, &status.error);
            tracing::error!(driver = %self.driver, reason = %status.error, "the kubelet refused the DRA driver");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// `DRAPlugin`, served in both packages. The two are the same contract on
/// the wire, so the `v1beta1` messages are re-read as `v1` ones.
#[derive(Clone)]
struct DraService {
    driver: String,
    preparer: Option<Arc<Preparer>>,
}

impl DraService {
    async fn prepare(&self, request: v1::NodePrepareResourcesRequest) -> v1::NodePrepareResourcesResponse {
        if let Some(preparer) = &self.preparer {
            return preparer.prepare(request).await;
        }
        let claims = request
            .claims
            .into_iter()
            .map(|claim| {
                let error = format!(
                    "{}: driver {} cannot prepare claims: it has no API server to read them from",
                    super::prepare::limits::claim_label(&claim),
                    self.driver
                );
                (claim.uid, v1::NodePrepareResourceResponse { devices: Vec::new(), error })
            })
            .collect();
        v1::NodePrepareResourcesResponse { claims }
    }

    async fn unprepare(&self, request: v1::NodeUnprepareResourcesRequest) -> v1::NodeUnprepareResourcesResponse {
        if let Some(preparer) = &self.preparer {
            return preparer.unprepare(request).await;
        }
        // Nothing was prepared, so there is nothing to undo: success.
        let claims = request
            .claims
            .into_iter()
            .map(|claim| (claim.uid, v1::NodeUnprepareResourceResponse { error: String::new() }))
            .collect();
        v1::NodeUnprepareResourcesResponse { claims }
    }
}

/// Re-reads one message as another with the same wire contract.
fn same_wire<From: Message, To: Message + Default>(message: &From) -> Result<To, Status> {
    To::decode(message.encode_to_vec().as_slice()).map_err(|error| Status::internal(error.to_string()))
}

#[tonic::async_trait]
impl v1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        Ok(Response::new(self.prepare(request.into_inner()).await))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        Ok(Response::new(self.unprepare(request.into_inner()).await))
    }
}

#[tonic::async_trait]
impl v1beta1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let answer = self.prepare(same_wire(&request.into_inner())?).await;
        Ok(Response::new(same_wire(&answer)?))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let answer = self.unprepare(same_wire(&request.into_inner())?).await;
        Ok(Response::new(same_wire(&answer)?))
    }
}

/// `DRAResourceHealth`: the device state, as DRA names and health, served
/// as `v1` and as `v1alpha1` (the same messages).
#[derive(Clone)]
struct HealthService {
    pool: String,
    state: Arc<ResourceState>,
    stop: CancellationToken,
}

/// One health message: every device of `snapshot`, with why an Unhealthy
/// one is (the backend's fault, or why devhost withholds it).
fn health_message(pool: &str, snapshot: &Snapshot) -> NodeWatchResourcesResponse {
    let now =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let timeout = i64::try_from(HEALTH_TIMEOUT.as_secs()).unwrap_or(i64::MAX);
    let devices = snapshot
        .devices
        .iter()
        .map(|device| {
            let why = snapshot.fault.clone().or_else(|| snapshot.withheld.get(&device.id).cloned());
            let healthy = device.health == Health::Healthy && why.is_none();
            DeviceHealth {
                device: Some(DeviceIdentifier {
                    pool_name: pool.to_owned(),
                    device_name: names::device_name(&device.id),
                }),
                health: if healthy { HealthStatus::Healthy } else { HealthStatus::Unhealthy }.into(),
                last_updated_time: now,
                health_check_timeout_seconds: timeout,
                message: why.unwrap_or_default(),
            }
        })
        .collect();
    NodeWatchResourcesResponse { devices }
}

/// The health stream, whichever version asked for it.
type HealthStream = Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, Status>> + Send>>;

/// What a 1.36 kubelet opens on every DRA plugin, listed or not.
#[tonic::async_trait]
impl v1alpha1::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = HealthStream;

    async fn node_watch_resources(
        &self,
        request: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<HealthStream>, Status> {
        DraResourceHealth::node_watch_resources(self, request).await
    }
}

#[tonic::async_trait]
impl DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = HealthStream;

    async fn node_watch_resources(
        &self,
        _: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let pool = self.pool.clone();
        // The current state at once, then every change; and the same state
        // again well within the kubelet's timeout, so a quiet device never
        // turns Unknown.
        let changes = WatchStream::new(self.state.subscribe());
        let refresh = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
            tokio::time::Instant::now() + HEALTH_TIMEOUT / 3,
            HEALTH_TIMEOUT / 3,
        ));
        let state = self.state.clone();
        let refreshed = refresh.map(move |_| state.snapshot());
        let stop = self.stop.clone().cancelled_owned();
        let stream = futures_util::stream::select(changes, refreshed)
            .map(move |snapshot| Ok(health_message(&pool, &snapshot)))
            .take_until(stop);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::dra::pluginregistration::registration_client::RegistrationClient;

    fn start(root: &Path, driver: &str) -> DraPlugin {
        crate::telemetry::global().dra().serve(driver);
        let state = Arc::new(ResourceState::new("example.com/gpu"));
        DraPlugin::start(driver, "node-a", &DraPaths::new(root, driver), state, None, None, CancellationToken::new())
            .expect("start")
    }

    fn problems(driver: &str, problem: &str) -> bool {
        let series = format!("devhost_dra_registration_problems_total{{driver=\"{driver}\",problem=\"{problem}\"}} 1");
        crate::telemetry::global().encode().lines().any(|line| line == series)
    }

    fn said(driver: &str) -> Option<String> {
        let prefix = format!("DRA driver {driver}");
        crate::telemetry::global().dra().unregistered().into_iter().find(|line| line.starts_with(&prefix))
    }

    /// Issue 24, item 6: a kubelet watching another root never calls; after
    /// 30 s that is said once, naming the socket, in the metrics and in
    /// `/readyz`. A driver the kubelet called, or refused, is not "silent".
    #[tokio::test]
    async fn a_registration_socket_no_kubelet_calls_is_named_and_a_refusal_says_why() {
        let root = tempfile::tempdir().expect("tempdir");
        let silent = start(root.path(), "silent.example.com");
        let called = start(root.path(), "called.example.com");
        let refused = start(root.path(), "refused.example.com");
        let client = |driver: &str| {
            let socket = DraPaths::new(root.path(), driver).registration;
            async move {
                let authority = crate::sockets::client::plugin_watcher_authority(&socket);
                let channel = crate::sockets::client::connect_as(&socket, Duration::from_secs(10), &authority)
                    .await
                    .expect("connect");
                RegistrationClient::new(channel)
            }
        };
        client("called.example.com").await.get_info(InfoRequest {}).await.expect("GetInfo");
        client("refused.example.com")
            .await
            .notify_registration_status(RegistrationStatus {
                plugin_registered: false,
                error: "plugin name is taken".to_owned(),
            })
            .await
            .expect("notify");

        // Thirty seconds pass with nothing else.
        tokio::time::pause();
        tokio::time::sleep(KUBELET_SILENT_AFTER + Duration::from_secs(1)).await;
        tokio::time::resume();
        // Let the watchdogs run.
        tokio::time::sleep(Duration::from_millis(50)).await;

        let socket = DraPaths::new(root.path(), "silent.example.com").registration;
        assert_eq!(
            said("silent.example.com"),
            Some(format!(
                "DRA driver silent.example.com (no kubelet has called its registration socket {}: is [dra] kubelet_root the kubelet's root directory?)",
                socket.display()
            ))
        );
        assert!(problems("silent.example.com", "silent"));
        assert_eq!(said("called.example.com").as_deref(), Some("DRA driver called.example.com"), "called: waiting");
        assert!(!problems("called.example.com", "silent"));
        assert_eq!(
            said("refused.example.com").as_deref(),
            Some("DRA driver refused.example.com (refused by the kubelet: plugin name is taken)")
        );
        assert!(problems("refused.example.com", "refused") && !problems("refused.example.com", "silent"));
        for plugin in [silent, called, refused] {
            plugin.stop().await;
        }
    }
}
