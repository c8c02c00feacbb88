//! Talking to the kubelet: sending `Register`, and watching the plugin
//! directory, where a kubelet restart shows (every socket deleted, a new
//! `kubelet.sock` created).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;
use tonic::transport::Channel;

use crate::proto::v1beta1::{self, registration_client::RegistrationClient};
use crate::sockets::FileIdentity;
use crate::sockets::client as uds;

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
    /// The connection to the kubelet failed under the call: the shared
    /// connection was dialled again and refused, or broke mid-call (a
    /// restarting kubelet closes it). The status is the transport's
    /// (`Unavailable`, or one carrying the transport's error), not the
    /// kubelet's: its `Register` refuses with a plain error, `Unknown`,
    /// sent in the call's trailers. As [`KubeletError::Connect`], it says
    /// nothing about the resource.
    #[error("cannot reach the kubelet at {socket}: {}", status.message())]
    Unreachable {
        /// The kubelet socket.
        socket: PathBuf,
        /// The transport's status.
        status: tonic::Status,
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

impl KubeletError {
    /// Whether the kubelet could not be reached at all (no one listening,
    /// a connection that broke): a kubelet between `bind` and `listen`, or
    /// a dead one, rather than one that refused.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, KubeletError::Connect { .. } | KubeletError::Unreachable { .. })
    }
}

/// The kubelet's registration socket, and one connection to it shared by
/// every resource: after a kubelet restart, 50 resources register over one
/// HTTP/2 connection (one `Register` stream each) instead of dialling and
/// handshaking 50 times. The connection is dialled again when
/// `kubelet.sock` is a new file (a restarted kubelet) and after a call on
/// it failed.
#[derive(Debug)]
pub struct Kubelet {
    socket: PathBuf,
    /// The connection, the identity of the socket file it was dialled to,
    /// and its number (so that a failed call forgets only its own).
    connection: tokio::sync::Mutex<Option<(FileIdentity, u64, Channel)>>,
    dialled: AtomicU64,
}

impl Kubelet {
    /// The kubelet listening (or to listen) on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Kubelet { socket: socket.into(), connection: tokio::sync::Mutex::new(None), dialled: AtomicU64::new(0) }
    }

    /// The registration socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Registers one resource with the kubelet whose socket file is
    /// `identity`: `endpoint` is the socket's file name in the plugin
    /// directory. The plugin must already be serving on it.
    pub async fn register(
        &self,
        identity: FileIdentity,
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
        let mut dialled = None;
        let attempt = async {
            let (number, channel) = self.connection(identity, timeout).await?;
            dialled = Some(number);
            RegistrationClient::new(channel).register(request).await.map_err(|status| {
                if from_transport(&status) {
                    KubeletError::Unreachable { socket: self.socket.clone(), status }
                } else {
                    KubeletError::Refused { socket: self.socket.clone(), resource: resource.to_owned(), status }
                }
            })
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => {
                Err(KubeletError::TimedOut { socket: self.socket.clone(), resource: resource.to_owned(), timeout })
            }
        };
        if let (Err(_), Some(number)) = (&result, dialled) {
            // The kubelet's own refusal leaves the connection good, but a
            // broken one looks no different from here: dial anew (cheap,
            // and failures are rare).
            let mut connection = self.connection.lock().await;
            if connection.as_ref().is_some_and(|(_, current, _)| *current == number) {
                *connection = None;
            }
        }
        result
    }

    /// The shared connection to the kubelet whose socket file is
    /// `identity`, dialled now if there is none to it. Dialled under the
    /// lock, so a burst of registrations dials once.
    async fn connection(&self, identity: FileIdentity, timeout: Duration) -> Result<(u64, Channel), KubeletError> {
        let mut connection = self.connection.lock().await;
        if let Some((dialled_to, number, channel)) = connection.as_ref()
            && *dialled_to == identity
        {
            return Ok((*number, channel.clone()));
        }
        let channel = uds::connect(&self.socket, timeout)
            .await
            .map_err(|source| KubeletError::Connect { socket: self.socket.clone(), source })?;
        let number = self.dialled.fetch_add(1, Ordering::Relaxed);
        *connection = Some((identity, number, channel.clone()));
        Ok((number, channel))
    }
}

/// Whether `status` is the transport's, not the kubelet's answer: a
/// connection refused or lost is `Unavailable`, and a broken HTTP/2
/// connection carries the transport's error (`h2`) as its source, where a
/// status the kubelet sent is read from its trailers and carries none.
fn from_transport(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    use futures_util::StreamExt;
    use tokio_stream::wrappers::UnixListenerStream;
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::proto::v1beta1::registration_server::{Registration, RegistrationServer};

    /// A registration socket that counts the connections it accepts and
    /// the resources registered, refusing any whose name ends in `/refused`.
    #[derive(Clone, Default)]
    struct Counting {
        connections: Arc<AtomicUsize>,
        registered: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl Registration for Counting {
        async fn register(
            &self,
            request: Request<v1beta1::RegisterRequest>,
        ) -> Result<Response<v1beta1::Empty>, Status> {
            let resource = request.into_inner().resource_name;
            if resource.ends_with("/refused") {
                return Err(Status::invalid_argument("refused by the test"));
            }
            self.registered.lock().expect("not poisoned").push(resource);
            Ok(Response::new(v1beta1::Empty {}))
        }
    }

    /// Serves `counting` on `socket` (replacing the file) until `stop`.
    fn serve(socket: &Path, counting: &Counting, stop: &CancellationToken) -> FileIdentity {
        let (listener, identity) = crate::sockets::bind(socket).expect("binds");
        let connections = counting.connections.clone();
        let incoming = UnixListenerStream::new(listener).inspect(move |_| {
            connections.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(counting.clone()))
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        identity
    }

    async fn register_all(kubelet: &Kubelet, identity: FileIdentity, resources: &[String]) -> Vec<bool> {
        let calls = resources.iter().map(|resource| {
            kubelet.register(identity, resource, "x.sock", v1beta1::DevicePluginOptions::default(), REGISTER_TIMEOUT)
        });
        futures_util::future::join_all(calls).await.iter().map(Result::is_ok).collect()
    }

    #[tokio::test]
    async fn resources_share_one_connection_per_kubelet_socket_and_a_failure_dials_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let kubelet = Kubelet::new(&socket);
        let (first, first_stop) = (Counting::default(), CancellationToken::new());
        let identity = serve(&socket, &first, &first_stop);

        let resources: Vec<String> = (0..20).map(|n| format!("example.com/r{n}")).collect();
        assert_eq!(register_all(&kubelet, identity, &resources).await, vec![true; 20]);
        assert_eq!(first.registered.lock().expect("not poisoned").len(), 20);
        assert_eq!(first.connections.load(Ordering::SeqCst), 1, "20 registrations, one connection");

        // The kubelet's refusal: the error is the kubelet's, and the next
        // registration dials again.
        let refused = kubelet
            .register(
                identity,
                "example.com/refused",
                "x.sock",
                v1beta1::DevicePluginOptions::default(),
                REGISTER_TIMEOUT,
            )
            .await;
        assert!(matches!(refused, Err(KubeletError::Refused { .. })), "{refused:?}");
        assert_eq!(register_all(&kubelet, identity, &resources[..1]).await, [true]);
        assert_eq!(first.connections.load(Ordering::SeqCst), 2);

        // A restarted kubelet: a new socket file, a new connection, and the
        // first registration on it succeeds.
        first_stop.cancel();
        let (second, second_stop) = (Counting::default(), CancellationToken::new());
        let identity = serve(&socket, &second, &second_stop);
        assert_eq!(register_all(&kubelet, identity, &resources).await, vec![true; 20]);
        assert_eq!(second.connections.load(Ordering::SeqCst), 1);
        assert_eq!(second.registered.lock().expect("not poisoned").len(), 20);
        second_stop.cancel();
    }

    #[test]
    fn a_status_from_the_kubelets_trailers_is_its_answer_and_one_carrying_a_transport_error_is_not() {
        assert!(!from_transport(&Status::unknown("Unsupported API version")), "the kubelet's refusal");
        assert!(!from_transport(&Status::invalid_argument("refused by the test")));
        assert!(from_transport(&Status::unavailable("Connection refused (os error 111)")));
        let broken = Status::from_error(Box::new(std::io::Error::other("connection lost")));
        assert!(std::error::Error::source(&broken).is_some());
        assert!(from_transport(&broken), "{broken:?}");
    }

    /// A kubelet that stops listening while its socket file stays (it is
    /// restarting): the shared connection, dialled again under the call,
    /// is refused. That is the kubelet unreachable, which devhost retries
    /// within a millisecond, not a refusal of the resource, which it
    /// retries after 200 ms with a new socket (seen as a 200 ms p99 in
    /// the restart benchmark).
    #[tokio::test]
    async fn a_kubelet_gone_under_the_shared_connection_is_unreachable_not_a_refusal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let kubelet = Kubelet::new(&socket);
        let (counting, stop) = (Counting::default(), CancellationToken::new());
        let identity = serve(&socket, &counting, &stop);
        let resource = ["example.com/r0".to_owned()];
        assert_eq!(register_all(&kubelet, identity, &resource).await, [true]);

        stop.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "the test kubelet still listens");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(FileIdentity::of(&socket), Some(identity), "the socket file stays");
        let options = v1beta1::DevicePluginOptions::default();
        let error = kubelet
            .register(identity, &resource[0], "x.sock", options, REGISTER_TIMEOUT)
            .await
            .expect_err("no one listens");
        assert!(error.is_unreachable(), "{error:?}");
        assert!(!matches!(error, KubeletError::Refused { .. }), "{error}");
    }
}
