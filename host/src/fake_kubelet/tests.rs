//! Unit tests: the fake kubelet against a tiny in-test device plugin, both
//! on real Unix sockets in a temp dir.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::registration::join_endpoint;
use super::*;
use crate::proto::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use crate::proto::v1beta1::registration_client::RegistrationClient;
use crate::proto::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse, ContainerPreferredAllocationResponse, Empty,
    ListAndWatchResponse, PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};

const RESOURCE: &str = "example.com/gpu";
const WAIT: Duration = Duration::from_secs(5);

/// A minimal device plugin: fixed options, a settable device list, and a
/// record of every Allocate request.
struct TestPlugin {
    options: DevicePluginOptions,
    devices: watch::Receiver<Vec<Device>>,
    allocations: Arc<Mutex<Vec<AllocateRequest>>>,
    token: CancellationToken,
}

#[tonic::async_trait]
impl DevicePlugin for TestPlugin {
    async fn get_device_plugin_options(&self, _: Request<Empty>) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(self.options))
    }

    type ListAndWatchStream = ReceiverStream<Result<ListAndWatchResponse, Status>>;

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut devices = self.devices.clone();
        let token = self.token.clone();
        tokio::spawn(async move {
            loop {
                let snapshot = devices.borrow_and_update().clone();
                if tx.send(Ok(ListAndWatchResponse::new(snapshot))).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = token.cancelled() => return,
                    changed = devices.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| ContainerPreferredAllocationResponse {
                device_i_ds: c.available_device_i_ds.into_iter().take(c.allocation_size as usize).collect(),
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse { container_responses: responses }))
    }

    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        let request = request.into_inner();
        let responses = request
            .container_requests
            .iter()
            .map(|c| ContainerAllocateResponse {
                envs: [("DEVICES".to_owned(), c.devices_ids.join(","))].into(),
                ..Default::default()
            })
            .collect();
        self.allocations.lock().map_err(|_| Status::internal("poisoned"))?.push(request);
        Ok(Response::new(AllocateResponse { container_responses: responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// A running [`TestPlugin`].
struct Plugin {
    endpoint: String,
    devices: watch::Sender<Vec<Device>>,
    allocations: Arc<Mutex<Vec<AllocateRequest>>>,
    token: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Plugin {
    /// Serves on `<dir>/<endpoint>` before anything registers (§2.3).
    fn start(dir: &Path, endpoint: &str, options: DevicePluginOptions, ids: &[&str]) -> anyhow::Result<Plugin> {
        let (devices, rx) = watch::channel(healthy(ids));
        let allocations = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let listener = tokio::net::UnixListener::bind(dir.join(endpoint))?;
        let service = TestPlugin { options, devices: rx, allocations: Arc::clone(&allocations), token: token.clone() };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), token.clone().cancelled_owned()),
        );
        Ok(Plugin { endpoint: endpoint.to_owned(), devices, allocations, token, server })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.server).await???;
        Ok(())
    }
}

fn healthy(ids: &[&str]) -> Vec<Device> {
    ids.iter()
        .map(|id| Device { id: (*id).to_owned(), health: crate::proto::HEALTHY.to_owned(), topology: None })
        .collect()
}

/// Calls `Register` on the kubelet socket as a plugin would.
async fn register(
    kubelet: &FakeKubelet,
    version: &str,
    endpoint: &str,
    resource: &str,
) -> anyhow::Result<Result<(), Status>> {
    let channel = crate::sockets::client::connect(&kubelet.socket_path(), WAIT).await?;
    let request = RegisterRequest {
        version: version.to_owned(),
        endpoint: endpoint.to_owned(),
        resource_name: resource.to_owned(),
        options: None,
    };
    Ok(RegistrationClient::new(channel).register(request).await.map(|_| ()))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn registration_is_accepted_and_list_and_watch_consumed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    assert!(is_socket(&kubelet.socket_path()));
    let options = DevicePluginOptions { pre_start_required: true, get_preferred_allocation_available: false };
    let plugin = Plugin::start(dir.path(), "gpu.sock", options, &["gpu-0", "gpu-1"])?;

    register(&kubelet, "v1beta1", &plugin.endpoint, RESOURCE).await??;
    let latest = kubelet.wait_for_registrations(RESOURCE, 1, WAIT).await?;
    assert_eq!(latest.endpoint, "gpu.sock");
    assert_eq!(kubelet.registration_count(RESOURCE), 1);
    assert_eq!(kubelet.registrations().len(), 1);
    assert_eq!(kubelet.options(RESOURCE), Some(options));
    assert!(kubelet.connected(RESOURCE));

    let devices = kubelet.wait_for_devices(RESOURCE, WAIT, |d| d.len() == 2).await?;
    assert_eq!(devices, healthy(&["gpu-0", "gpu-1"]));
    assert_eq!(kubelet.list_and_watch_messages(RESOURCE), 1);

    plugin.devices.send(healthy(&["gpu-0", "gpu-1", "gpu-2"]))?;
    kubelet.wait_for_devices(RESOURCE, WAIT, |d| d.len() == 3).await?;
    assert_eq!(kubelet.list_and_watch_messages(RESOURCE), 2);

    // The plugin going away ends the stream: disconnected, calls refused.
    plugin.stop().await?;
    wait_until("the stream ended", || !kubelet.connected(RESOURCE)).await?;
    let err = kubelet.allocate(RESOURCE, &["gpu-0"]).await.err().context("allocate after stop")?;
    assert!(matches!(err, FakeKubeletError::EndpointStopped { .. }), "{err}");
    assert_eq!(kubelet.devices(RESOURCE).map(|d| d.len()), Some(3));

    let err = kubelet
        .wait_for_devices(RESOURCE, Duration::from_millis(50), |d| d.is_empty())
        .await
        .err()
        .context("empty list never sent")?;
    assert!(err.to_string().contains(r#""gpu-2" "Healthy""#), "{err}");
    kubelet.stop().await;
    assert!(!kubelet.socket_path().exists());
    Ok(())
}

#[tokio::test]
async fn bad_version_and_resource_name_are_refused_with_kubelet_texts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let plugin = Plugin::start(dir.path(), "gpu.sock", DevicePluginOptions::default(), &["gpu-0"])?;

    let status = register(&kubelet, "v1alpha2", "gpu.sock", RESOURCE).await?.err().context("v1alpha2")?;
    assert_eq!(status.code(), tonic::Code::Unknown);
    assert_eq!(
        status.message(),
        r#"requested API version "v1alpha2" is not supported by kubelet. Supported version is ["v1beta1"]"#
    );

    let status = register(&kubelet, "v1beta1", "gpu.sock", "gpu").await?.err().context("bad name")?;
    assert_eq!(status.code(), tonic::Code::Unknown);
    assert_eq!(status.message(), r#"the ResourceName "gpu" is invalid"#);

    let status = register(&kubelet, "v1beta1", "missing.sock", RESOURCE).await?.err().context("no socket")?;
    assert_eq!(status.code(), tonic::Code::Unknown);
    assert!(status.message().starts_with("failed to dial device plugin: "), "{}", status.message());

    assert_eq!(kubelet.registrations().len(), 3);
    assert_eq!(kubelet.registration_count(RESOURCE), 0);
    assert!(!kubelet.connected(RESOURCE));
    let err = kubelet
        .wait_for_registrations(RESOURCE, 1, Duration::from_millis(50))
        .await
        .err()
        .context("nothing accepted")?;
    assert!(err.to_string().contains("0 accepted, 2 refused"), "{err}");
    assert!(err.to_string().contains("failed to dial device plugin"), "{err}");
    plugin.stop().await?;
    kubelet.stop().await;
    Ok(())
}

#[tokio::test]
async fn same_socket_is_refused_while_connected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let plugin = Plugin::start(dir.path(), "gpu.sock", DevicePluginOptions::default(), &["gpu-0"])?;
    register(&kubelet, "v1beta1", "gpu.sock", RESOURCE).await??;

    let status = register(&kubelet, "v1beta1", "gpu.sock", RESOURCE).await?.err().context("duplicate")?;
    assert_eq!(status.code(), tonic::Code::Unknown);
    assert!(status.message().contains(RESOURCE), "{}", status.message());
    assert!(status.message().contains("gpu.sock"), "{}", status.message());
    assert_eq!(kubelet.registration_count(RESOURCE), 1);

    // Another instance on its own socket is a new, current connection.
    let second = Plugin::start(dir.path(), "gpu-2.sock", DevicePluginOptions::default(), &["gpu-9"])?;
    register(&kubelet, "v1beta1", "gpu-2.sock", RESOURCE).await??;
    kubelet.wait_for_devices(RESOURCE, WAIT, |d| d == healthy(&["gpu-9"])).await?;
    assert_eq!(kubelet.registration_count(RESOURCE), 2);
    plugin.stop().await?;
    second.stop().await?;
    kubelet.stop().await;
    Ok(())
}

#[tokio::test]
async fn restart_deletes_only_sockets_and_serves_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let plugin = Plugin::start(dir.path(), "gpu.sock", DevicePluginOptions::default(), &["gpu-0"])?;
    register(&kubelet, "v1beta1", "gpu.sock", RESOURCE).await??;
    kubelet.wait_for_devices(RESOURCE, WAIT, |d| d.len() == 1).await?;
    let marker = dir.path().join("DEPRECATION");
    let checkpoint = dir.path().join("kubelet_internal_checkpoint");
    std::fs::write(&marker, "")?;
    std::fs::write(&checkpoint, "{}")?;
    let plugin_socket: PathBuf = dir.path().join("gpu.sock");
    assert!(is_socket(&plugin_socket));

    kubelet.restart().await?;
    assert!(!plugin_socket.exists(), "plugin socket survived the restart");
    assert!(marker.is_file() && checkpoint.is_file(), "regular files must survive");
    assert!(is_socket(&kubelet.socket_path()), "no new kubelet.sock");
    assert!(!kubelet.connected(RESOURCE));
    assert_eq!(kubelet.registration_count(RESOURCE), 1);
    assert_eq!(kubelet.devices(RESOURCE).map(|d| d.len()), Some(1));
    plugin.stop().await?;

    // The plugin recreates its socket and registers with the new kubelet.
    let plugin = Plugin::start(dir.path(), "gpu.sock", DevicePluginOptions::default(), &["gpu-0", "gpu-1"])?;
    register(&kubelet, "v1beta1", "gpu.sock", RESOURCE).await??;
    kubelet.wait_for_registrations(RESOURCE, 2, WAIT).await?;
    kubelet.wait_for_devices(RESOURCE, WAIT, |d| d.len() == 2).await?;
    assert!(kubelet.connected(RESOURCE));
    assert_eq!(kubelet.list_and_watch_messages(RESOURCE), 1);
    plugin.stop().await?;
    kubelet.stop().await;
    Ok(())
}

#[tokio::test]
async fn allocate_sends_exactly_one_container_request() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubelet = FakeKubelet::start(dir.path()).await?;
    let plugin = Plugin::start(dir.path(), "gpu.sock", DevicePluginOptions::default(), &["gpu-0", "gpu-1"])?;
    let err = kubelet.allocate(RESOURCE, &["gpu-0"]).await.err().context("unregistered")?;
    assert!(matches!(err, FakeKubeletError::NotRegistered { .. }), "{err}");
    register(&kubelet, "v1beta1", "gpu.sock", RESOURCE).await??;

    let response = kubelet.allocate(RESOURCE, &["gpu-1", "gpu-0"]).await?;
    assert_eq!(response.container_responses.len(), 1);
    let allocations = plugin.allocations.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    assert_eq!(allocations.len(), 1);
    assert_eq!(allocations[0].container_requests.len(), 1);
    assert_eq!(allocations[0].container_requests[0].devices_ids, ["gpu-1", "gpu-0"]);

    let preferred = kubelet.preferred_allocation(RESOURCE, &["gpu-0", "gpu-1"], &[], 1).await?;
    assert_eq!(preferred.container_responses.len(), 1);
    assert_eq!(preferred.container_responses[0].device_i_ds, ["gpu-0"]);
    kubelet.pre_start(RESOURCE, &["gpu-0"]).await?;
    kubelet.client(RESOURCE).await?.get_device_plugin_options(Empty {}).await?;
    plugin.stop().await?;
    kubelet.stop().await;
    Ok(())
}

#[test]
fn endpoint_joins_like_go_filepath_join() {
    let dir = Path::new("/var/lib/kubelet/device-plugins");
    assert_eq!(join_endpoint(dir, "x.sock"), dir.join("x.sock"));
    assert_eq!(join_endpoint(dir, "/x.sock"), dir.join("x.sock"));
    assert_eq!(join_endpoint(dir, "./a/../x.sock"), dir.join("x.sock"));
    assert_eq!(join_endpoint(dir, "../x.sock"), Path::new("/var/lib/kubelet/x.sock"));
    assert_eq!(join_endpoint(dir, "../../../../../x.sock"), Path::new("/x.sock"));
    assert_eq!(join_endpoint(Path::new("rel"), "../../x"), Path::new("../x"));
}
