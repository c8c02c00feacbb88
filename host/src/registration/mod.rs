//! Talking to the kubelet: sending `Register`, and watching the plugin
//! directory, where a kubelet restart shows (every socket deleted, a new
//! `kubelet.sock` created).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::proto::v1beta1::{self, registration_client::RegistrationClient};
use crate::uds;

mod watch;

pub use watch::PluginDirWatcher;

/// How long `Register` may take. The kubelet dials back and calls
/// `GetDevicePluginOptions` inside it with a 10 s dial timeout, so a
/// shorter deadline could fail spuriously (API facts §2.3).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a registration failed.
#[derive(Debug, Error)]
pub enum KubeletError {
    /// The kubelet socket could not be dialled.
    #[error("cannot connect to the kubelet at {socket}: {source}")]
    Connect {
        /// The kubelet socket.
        socket: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The kubelet answered `Register` with an error.
    #[error("the kubelet at {socket} refused to register {resource:?}: {} ({:?})", status.message(), status.code())]
    Refused {
        /// The kubelet socket.
        socket: PathBuf,
        /// The resource.
        resource: String,
        /// The kubelet's answer.
        status: tonic::Status,
    },
    /// No answer in time.
    #[error("the kubelet at {socket} did not answer Register for {resource:?} within {timeout:?}")]
    TimedOut {
        /// The kubelet socket.
        socket: PathBuf,
        /// The resource.
        resource: String,
        /// The deadline.
        timeout: Duration,
    },
}

/// Registers one resource: `endpoint` is the socket's file name in the
/// plugin directory. The plugin must already be serving on it.
pub async fn register(
    kubelet_socket: &Path,
    resource: &str,
    endpoint: &str,
    options: v1beta1::DevicePluginOptions,
    timeout: Duration,
) -> Result<(), KubeletError> {
    let request = v1beta1::RegisterRequest {
        version: crate::proto::API_VERSION.to_owned(),
        endpoint: endpoint.to_owned(),
        resource_name: resource.to_owned(),
        options: Some(options),
    };
    let attempt = async {
        let channel = uds::connect(kubelet_socket, timeout)
            .await
            .map_err(|source| KubeletError::Connect { socket: kubelet_socket.to_owned(), source })?;
        RegistrationClient::new(channel).register(request).await.map_err(|status| KubeletError::Refused {
            socket: kubelet_socket.to_owned(),
            resource: resource.to_owned(),
            status,
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => {
            Err(KubeletError::TimedOut { socket: kubelet_socket.to_owned(), resource: resource.to_owned(), timeout })
        }
    }
}
