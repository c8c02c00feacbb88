//! One resource server: a Unix socket in the plugin directory and a tonic
//! server answering the kubelet's `DevicePlugin` RPCs for one resource.
//!
//! A server is one *generation*: after a kubelet restart the daemon stops it
//! (ending its streams, so the kubelet's duplicate check sees the old
//! connection gone) and starts a new one on a fresh socket. Device state
//! lives outside it and survives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod preferred;
pub mod service;
pub mod status;

pub use service::DevicePluginService;

use crate::proto::v1beta1::device_plugin_server::DevicePluginServer;
use crate::sockets::{self, FileIdentity};

/// How long a stopping server may take to finish in-flight calls.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running server generation.
#[derive(Debug)]
pub struct ResourceServer {
    socket: PathBuf,
    identity: FileIdentity,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ResourceServer {
    /// Binds `socket` (mode 0600, replacing a stale file) and starts serving
    /// `service` on it. `stop` must be the token the service was built with.
    pub fn start(socket: &Path, service: DevicePluginService, stop: CancellationToken) -> std::io::Result<Self> {
        let (listener, identity) = sockets::bind(socket)?;
        let shutdown = stop.clone().cancelled_owned();
        let name = socket.file_name().map_or_else(String::new, |name| name.to_string_lossy().into_owned());
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    sockets::unix_incoming(listener, name, crate::telemetry::global().accept_refused("resource")),
                    shutdown,
                ),
        );
        Ok(ResourceServer { socket: socket.to_owned(), identity, stop, task })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the socket file this server listens on is gone or replaced
    /// (the kubelet deleted it, or someone else created a file there).
    pub fn socket_lost(&self) -> bool {
        FileIdentity::of(&self.socket) != Some(self.identity)
    }

    /// Stops serving: open streams end, in-flight calls get a grace period,
    /// and the socket file is removed if it is still this server's.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        match tokio::time::timeout(STOP_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(socket = %self.socket.display(), %error, "server ended with an error"),
            Ok(Err(error)) => tracing::error!(socket = %self.socket.display(), %error, "server task failed"),
            Err(_) => {
                tracing::warn!(socket = %self.socket.display(), "in-flight calls outlived the grace period; aborting them");
                task.abort();
            }
        }
        if FileIdentity::of(&self.socket) == Some(self.identity)
            && let Err(error) = std::fs::remove_file(&self.socket)
        {
            tracing::warn!(socket = %self.socket.display(), %error, "cannot remove socket");
        }
    }
}
