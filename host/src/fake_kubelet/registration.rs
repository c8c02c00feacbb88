//! The kubelet's `v1beta1.Registration` service and what follows an accepted
//! registration: dialing the plugin, `GetDevicePluginOptions` inside the
//! `Register` call, and one task per connection consuming `ListAndWatch`.
//! Also the socket-directory cleanup a starting kubelet does. It does not
//! own the public handle or the recorded state (see `state`).

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::state::Shared;
use crate::proto::API_VERSION;
use crate::proto::v1beta1::registration_server::Registration;
use crate::proto::v1beta1::{DevicePluginOptions, Empty, RegisterRequest, device_plugin_client::DevicePluginClient};

/// The kubelet's dial timeout (§2.3).
pub(super) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The checkpoint file the kubelet's cleanup never deletes.
const CHECKPOINT_NAME: &str = "kubelet_internal_checkpoint";

/// One serving generation of the registration service. A restart cancels
/// the token, which ends the server, every ListAndWatch task, and makes any
/// `Register` still in flight fail instead of being accepted afterwards.
#[derive(Clone)]
pub(super) struct Generation {
    pub(super) token: CancellationToken,
    pub(super) tracker: TaskTracker,
}

/// `v1beta1.Registration` as the kubelet implements it.
pub(super) struct RegistrationService {
    pub(super) shared: Arc<Shared>,
    pub(super) generation: Generation,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        let index = self.shared.received(request.clone());
        match self.connect(&request).await {
            Ok(()) if self.shared.take_lost_answer(&request.resource_name) => {
                // Connected and registered on the kubelet's side; the plugin
                // sees a failure, as when its Register deadline passed.
                tracing::info!(resource = %request.resource_name, "registration accepted; its answer is lost (injected)");
                Err(Status::deadline_exceeded("the answer to Register was lost (injected by the test)"))
            }
            Ok(()) => Ok(Response::new(Empty {})),
            Err(status) => {
                tracing::info!(resource = %request.resource_name, error = %status.message(), "registration refused");
                self.shared.refused(index, status.message());
                Err(status)
            }
        }
    }
}

impl RegistrationService {
    /// Validation and connection in the kubelet's order (§2.2, §2.3, §2.6).
    async fn connect(&self, request: &RegisterRequest) -> Result<(), Status> {
        if request.version != API_VERSION {
            return Err(Status::unknown(format!(
                "requested API version {:?} is not supported by kubelet. Supported version is [{:?}]",
                request.version, API_VERSION
            )));
        }
        let resource = &request.resource_name;
        if !super::names::is_extended_resource_name(resource) {
            return Err(Status::unknown(format!("the ResourceName {resource:?} is invalid")));
        }
        let socket = join_endpoint(&self.shared.plugin_dir, &request.endpoint);
        let channel = crate::sockets::client::connect(&socket, DIAL_TIMEOUT)
            .await
            .map_err(|e| Status::unknown(format!("failed to dial device plugin: {}", error_chain(&e))))?;
        let options = DevicePluginClient::new(channel.clone())
            .get_device_plugin_options(Empty {})
            .await
            .map_err(|s| Status::unknown(format!("failed to get device plugin options: {}", render_status(&s))))?
            .into_inner();
        self.accept(request, &socket, options, channel)
    }

    /// The 1.37 duplicate check, then recording and spawning ListAndWatch.
    fn accept(
        &self,
        request: &RegisterRequest,
        socket: &Path,
        options: DevicePluginOptions,
        channel: Channel,
    ) -> Result<(), Status> {
        if self.generation.token.is_cancelled() {
            return Err(Status::unavailable("kubelet is stopping; register again with the new kubelet"));
        }
        let id = self.shared.accept(request, socket, options, channel.clone()).map_err(Status::unknown)?;
        let resource = request.resource_name.clone();
        tracing::info!(resource = %resource, socket = %socket.display(), "device plugin connected");
        let shared = Arc::clone(&self.shared);
        let token = self.generation.token.child_token();
        self.generation.tracker.spawn(run_list_and_watch(shared, resource, id, channel, token));
        Ok(())
    }
}

/// Consumes one connection's ListAndWatch stream until it ends or the
/// kubelet side stops, then records the disconnect (§2.4, §2.5).
async fn run_list_and_watch(
    shared: Arc<Shared>,
    resource: String,
    id: u64,
    channel: Channel,
    token: CancellationToken,
) {
    let result = tokio::select! {
        () = token.cancelled() => Ok(()),
        result = consume(&shared, &resource, id, channel) => result,
    };
    match result {
        Ok(()) => tracing::info!(resource = %resource, "ListAndWatch ended"),
        Err(status) => tracing::info!(
            resource = %resource,
            error = %render_status(&status),
            "ListAndWatch ended unexpectedly for device plugin"
        ),
    }
    shared.disconnected(&resource, id);
}

async fn consume(shared: &Shared, resource: &str, id: u64, channel: Channel) -> Result<(), Status> {
    let mut stream = DevicePluginClient::new(channel).list_and_watch(Empty {}).await?.into_inner();
    while let Some(message) = stream.message().await? {
        tracing::debug!(resource = %resource, devices = message.devices.len(), "ListAndWatch message");
        shared.devices_received(resource, id, message.devices);
    }
    Ok(())
}

/// `filepath.Join(dir, endpoint)` as Go does it: an absolute endpoint is
/// still placed under `dir`, and `.`/`..` are resolved lexically.
pub(super) fn join_endpoint(dir: &Path, endpoint: &str) -> PathBuf {
    let mut path = PathBuf::new();
    for component in dir.components().chain(Path::new(endpoint).components()) {
        match component {
            Component::Prefix(_) | Component::RootDir if path.as_os_str().is_empty() => {
                path.push(component.as_os_str());
            }
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => match path.components().next_back() {
                Some(Component::Normal(_)) => {
                    path.pop();
                }
                // `/..` is `/`; a relative path keeps its leading `..`s.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => path.push(".."),
            },
            Component::Normal(name) => path.push(name),
        }
    }
    path
}

/// The 1.33+ cleanup of a starting kubelet (§2.1 step 3): deletes every Unix
/// socket in `dir` except the checkpoint; regular files, directories and
/// unreadable entries stay. Returns the deleted paths.
pub(super) fn remove_sockets(dir: &Path) -> Result<Vec<PathBuf>, super::FakeKubeletError> {
    let cleanup = |path: &Path| {
        let path = path.to_owned();
        move |source| super::FakeKubeletError::Cleanup { path, source }
    };
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(cleanup(dir))? {
        let path = entry.map_err(cleanup(dir))?.path();
        if path.file_name().is_some_and(|n| n == CHECKPOINT_NAME) {
            continue;
        }
        // Like os.Stat: follows symlinks, and skips what it cannot read.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() || !metadata.file_type().is_socket() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cleanup(&path)(e)),
        }
    }
    Ok(removed)
}

/// A status as grpc-go prints it.
pub(super) fn render_status(status: &Status) -> String {
    format!("rpc error: code = {:?} desc = {}", status.code(), status.message())
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
