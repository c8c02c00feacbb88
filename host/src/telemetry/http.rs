//! The operator's HTTP endpoints, on two listeners:
//!
//! * the metrics port (`metrics_address`, by default `0.0.0.0:9477`):
//!   `/metrics` (Prometheus text), and `/healthz` and `/readyz` as well for
//!   whoever reads them there;
//! * the probe port (`probe_address`, by default `127.0.0.1:9478`): only
//!   `/healthz` (the process is alive and serving HTTP) and `/readyz`
//!   (every served resource is registered with the kubelet; 503 with the
//!   missing ones otherwise). The shipped DaemonSet's probes read it through
//!   `devhost probe` (an exec probe, see [`probe_command`]), inside the pod's
//!   own network namespace: a client flooding the metrics port, which
//!   anyone who reaches the pod can, cannot starve the liveness probe into
//!   restarting devhost.
//!
//! Both serve one request per connection and hold a bounded number of
//! connections. When every slot is taken, a new connection whose request
//! is already waiting in its socket (a prompt client: Prometheus, a probe)
//! takes the slot of the oldest connection that has not sent a request;
//! one with nothing to read is closed at once. A client that keeps many
//! idle connections open (and reopens each one closed) thus cannot lock a
//! prompt client out, as it could when the newest connection was always
//! the one refused. (A client that sends a byte and then stalls can still
//! crowd the metrics port for the header timeout: the probe port, out of
//! its reach, is what the liveness probe relies on.)

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::sockets::accept::AcceptBackoff;

/// Connections to the metrics port served at once; beyond it the oldest
/// that has not sent a request is closed (counted as refused, reason
/// `cap`), and when every one is answering a request the newest is. A
/// flood of idle clients holds a bounded number of descriptors; Prometheus
/// needs one.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections to the probe port served at once (the kubelet's probes need
/// one each, a few seconds apart).
pub const MAX_PROBE_CONNECTIONS: usize = 8;
/// A client must send a request's headers within this time, or the
/// connection is closed (slow or idle clients).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The same on the probe port, within the kubelet's probe timeout.
pub const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection (one request: no keep-alive) is closed after this long,
/// whether or not its answer was sent.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `address` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown`. Returns the bound address (useful with port 0).
pub async fn serve(address: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics)).merge(probe_routes());
    let limits = Limits { name: "metrics", max: MAX_CONNECTIONS, header_timeout: HEADER_TIMEOUT };
    tokio::spawn(accept_loop(listener, app, limits, shutdown));
    Ok(bound)
}

/// Binds `address` and serves only `/healthz` and `/readyz` until
/// `shutdown`, on their own connection slots. Returns the bound address.
pub async fn serve_probes(address: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let limits = Limits { name: "probes", max: MAX_PROBE_CONNECTIONS, header_timeout: PROBE_HEADER_TIMEOUT };
    tokio::spawn(accept_loop(listener, probe_routes(), limits, shutdown));
    Ok(bound)
}

fn probe_routes() -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz))
}

/// How one listener shares out its connections.
struct Limits {
    /// The listener's name in `devhost_connections_refused_total`.
    name: &'static str,
    max: usize,
    header_timeout: Duration,
}

impl Limits {
    /// Counts a connection closed because of `max`, in
    /// `devhost_connections_refused_total{listener, reason="cap"}`.
    fn capped(&self) {
        crate::telemetry::global().connection_capped(self.name);
    }
}

/// A connection being served.
struct Open {
    id: u64,
    /// Set once its request's headers are in: it is then answered, never
    /// closed to make room.
    started: Arc<AtomicBool>,
    /// Cancelled to close it (it had sent nothing yet) for a newer one.
    evict: CancellationToken,
}

/// The connections being served, oldest first.
struct Table {
    max: usize,
    next_id: u64,
    open: VecDeque<Open>,
}

impl Table {
    fn full(&self) -> bool {
        self.open.len() >= self.max
    }

    /// Takes a slot for a new connection. If every slot is taken, one whose
    /// request is `waiting` gets the slot of the oldest connection that has
    /// sent no request; `None` (refuse the new one) otherwise.
    fn admit(&mut self, waiting: bool, capped: impl FnOnce()) -> Option<(u64, Arc<AtomicBool>, CancellationToken)> {
        if self.full() {
            if !waiting {
                return None;
            }
            let idle = self.open.iter().position(|open| !open.started.load(Ordering::Acquire))?;
            if let Some(oldest) = self.open.remove(idle) {
                oldest.evict.cancel();
            }
            capped();
        }
        let id = self.next_id;
        self.next_id += 1;
        let (started, evict) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
        self.open.push_back(Open { id, started: started.clone(), evict: evict.clone() });
        Some((id, started, evict))
    }

    fn close(&mut self, id: u64) {
        if let Some(at) = self.open.iter().position(|open| open.id == id) {
            self.open.remove(at);
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let table = Arc::new(Mutex::new(Table { max: limits.max, next_id: 0, open: VecDeque::new() }));
    let bound = listener.local_addr().map_or_else(|_| limits.name.to_owned(), |bound| bound.to_string());
    let mut backoff = AcceptBackoff::new(bound, crate::telemetry::global().accept_refused(limits.name));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.accepted();
                stream
            }
            Err(error) => {
                backoff.failed(&error).await;
                continue;
            }
        };
        let full = table.lock().unwrap_or_else(PoisonError::into_inner).full();
        let (stream, waiting) = if full {
            match request_waiting(stream) {
                Ok(checked) => checked,
                Err(_) => continue,
            }
        } else {
            (stream, false)
        };
        let admitted = table.lock().unwrap_or_else(PoisonError::into_inner).admit(waiting, || limits.capped());
        let Some((id, started, evict)) = admitted else {
            limits.capped();
            continue;
        };
        let flag = started.clone();
        let service = TowerToHyperService::new(app.clone().map_request(move |request| {
            flag.store(true, Ordering::Release);
            request
        }));
        let (table, shutdown, header_timeout) = (table.clone(), shutdown.clone(), limits.header_timeout);
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                _ = connection.as_mut() => true,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => false,
                () = shutdown.cancelled() => false,
                // Closed for a newer connection: dropped below, unless its
                // request came in meanwhile.
                () = evict.cancelled() => !started.load(Ordering::Acquire),
            };
            if !ended {
                // Let the request in progress finish, then close.
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(header_timeout, connection).await;
            }
            table.lock().unwrap_or_else(PoisonError::into_inner).close(id);
        });
    }
}

/// What `devhost probe` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// `/healthz`: the process is alive and answers HTTP.
    Live,
    /// `/readyz`: every served resource is registered.
    Ready,
}

impl Probe {
    fn path(self) -> &'static str {
        match self {
            Probe::Live => "/healthz",
            Probe::Ready => "/readyz",
        }
    }
}

/// How long `devhost probe` waits in all, within the kubelet's 2 s probe
/// timeout (the rest is the process's start).
pub const PROBE_CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);

/// `devhost probe`: asks the probe port (`address`, or the `probe_address`
/// of the host config file `config`) and exits 0 on a 200, 1 otherwise,
/// printing the answer's body or what went wrong. Blocking and without an
/// async runtime: the kubelet runs it every few seconds.
pub fn probe_command(which: Probe, config: &std::path::Path, address: Option<SocketAddr>) -> std::process::ExitCode {
    let address = match address {
        Some(address) => address,
        None => match crate::config::HostConfig::load(config, &crate::config::Overrides::default()) {
            Ok(host) => match host.probe_address {
                Some(address) => address,
                None => {
                    eprintln!("devhost probe: probe_address is off in {}", config.display());
                    return std::process::ExitCode::FAILURE;
                }
            },
            Err(error) => {
                eprintln!("devhost probe: {error}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    match probe(address, which.path(), PROBE_CLIENT_TIMEOUT) {
        Ok((200, body)) => {
            print!("{body}");
            std::process::ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprint!("devhost probe: {address}{} answered {status}: {body}", which.path());
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("devhost probe: {address}{}: {error}", which.path());
            std::process::ExitCode::FAILURE
        }
    }
}

/// One `GET path` (HTTP/1.0) to `address` within `timeout`: status and body.
fn probe(address: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))
    };
    let mut stream = std::net::TcpStream::connect_timeout(&address, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut buffer)? {
            0 => break,
            read if response.len() + read > 64 * 1024 => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "answer over 64 KiB"));
            }
            read => response.extend_from_slice(&buffer[..read]),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let status = response
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Whether the client of a just-accepted connection has sent something yet
/// (its request, for a prompt client), without reading it.
fn request_waiting(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, bool)> {
    // Out of the reactor for a non-blocking peek: a new socket's readiness
    // is not known to it yet.
    let stream = stream.into_std()?;
    let waiting = matches!(stream.peek(&mut [0u8; 1]), Ok(read) if read > 0);
    Ok((tokio::net::TcpStream::from_std(stream)?, waiting))
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], super::global().encode())
}

async fn readyz() -> impl IntoResponse {
    match super::global().readiness() {
        Ok(()) => {
            let mut text = "ready\n".to_owned();
            for warning in super::global().readiness_warnings() {
                text += &warning;
                text.push('\n');
            }
            (StatusCode::OK, text)
        }
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_the_oldest_idle_connection_and_never_a_started_one() {
        fn nothing() {}
        let mut table = Table { max: 3, next_id: 0, open: VecDeque::new() };
        let (_, first, first_evict) = table.admit(false, nothing).expect("room");
        let (_, _, second_evict) = table.admit(false, nothing).expect("room");
        let (_, third, _) = table.admit(false, nothing).expect("room");
        first.store(true, Ordering::Release);
        assert!(table.admit(false, nothing).is_none(), "full: a connection with nothing sent is refused");
        // Full: the oldest idle one (the second) makes room for a prompt
        // client, not the first, which is answering a request.
        let (_, fourth, _) = table.admit(true, nothing).expect("an idle one makes room");
        assert!(second_evict.is_cancelled() && !first_evict.is_cancelled());
        third.store(true, Ordering::Release);
        fourth.store(true, Ordering::Release);
        assert!(table.admit(true, nothing).is_none(), "every slot is answering: the newest is refused");
        table.close(0);
        assert!(table.admit(false, nothing).is_some(), "a closed connection frees its slot");
    }
}
