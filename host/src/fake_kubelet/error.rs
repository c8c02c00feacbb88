//! The one error type of the fake kubelet: setting up its socket, waiting
//! for what a plugin should have done, and calling the plugin.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why a fake kubelet operation failed.
#[derive(Debug, Error)]
pub enum FakeKubeletError {
    /// The plugin directory could not be created.
    #[error("cannot create plugin directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `kubelet.sock` could not be bound (or a stale one removed).
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The restart's socket cleanup could not list or delete an entry.
    #[error("cannot clean up sockets in the plugin directory at {}: {source}", path.display())]
    Cleanup {
        /// The directory or the socket that could not be removed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Fewer accepted registrations than awaited arrived in time.
    #[error(
        "timed out after {timeout:?} waiting for {wanted} accepted registration(s) of resource {resource:?}: \
         {accepted} accepted, {refused} refused{}",
        last_refusal.as_ref().map(|m| format!(" (last refusal: {m})")).unwrap_or_default()
    )]
    RegistrationTimeout {
        /// The resource waited for.
        resource: String,
        /// How many accepted registrations were awaited.
        wanted: usize,
        /// How many were accepted.
        accepted: usize,
        /// How many registrations naming the resource were refused.
        refused: usize,
        /// The refusal message of the latest refused one, if any.
        last_refusal: Option<String>,
        /// How long it waited.
        timeout: Duration,
    },
    /// The device list never satisfied the predicate in time.
    #[error(
        "timed out after {timeout:?} waiting for the device list of resource {resource:?} \
         (ListAndWatch stream {}): last seen {last_seen}",
        if *connected { "open" } else { "not open" }
    )]
    DevicesTimeout {
        /// The resource waited for.
        resource: String,
        /// The latest device list, rendered (`none` before the first message).
        last_seen: String,
        /// Whether the resource's ListAndWatch stream was open at the end.
        connected: bool,
        /// How long it waited.
        timeout: Duration,
    },
    /// No plugin ever registered the resource successfully.
    #[error("resource {resource:?} has no accepted registration, so the kubelet has no endpoint for it")]
    NotRegistered {
        /// The resource.
        resource: String,
    },
    /// The resource's ListAndWatch stream ended, so the kubelet refuses to
    /// call the plugin (its "endpoint has been stopped", §2.5).
    #[error(
        "endpoint {} of resource {resource:?} has been stopped (its ListAndWatch stream ended); \
         the plugin must register again",
        socket.display()
    )]
    EndpointStopped {
        /// The resource.
        resource: String,
        /// The socket of its latest registration.
        socket: PathBuf,
    },
    /// A fresh connection to the plugin's socket failed.
    #[error("failed to dial device plugin for resource {resource:?} at {}: {source}", socket.display())]
    Dial {
        /// The resource.
        resource: String,
        /// The plugin's socket.
        socket: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The plugin answered an RPC with an error status.
    #[error("{rpc} for resource {resource:?} failed: code {:?}: {}", status.code(), status.message())]
    Rpc {
        /// The resource.
        resource: String,
        /// The RPC name, as in the `.proto` (`Allocate`, ...).
        rpc: &'static str,
        /// The status the plugin returned.
        status: tonic::Status,
    },
}

impl FakeKubeletError {
    /// The gRPC status, for an [`FakeKubeletError::Rpc`] error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}
