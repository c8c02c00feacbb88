//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive and serving HTTP) and `/readyz` (every served
//! resource is registered with the kubelet; 503 with the missing ones
//! otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::sockets::accept::AcceptBackoff;

/// Connections served at once; more are closed as soon as accepted, so a
/// flood of idle clients holds a bounded number of descriptors. Prometheus
/// and the kubelet's probes need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send a request's headers within this time, or the
/// connection is closed (slow or idle clients).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed (gracefully, between requests) after this long,
/// however busy: keep-alive clients reconnect.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `address` and serves the endpoints until `shutdown`. Returns the
/// bound address (useful with port 0).
pub async fn serve(address: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    tokio::spawn(accept_loop(listener, app, bound, shutdown));
    Ok(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, app: Router, bound: SocketAddr, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new(bound.to_string(), crate::telemetry::global().accept_refused("metrics"));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::telemetry::global().metrics_connection_capped();
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                _ = connection.as_mut() => true,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => false,
                () = shutdown.cancelled() => false,
            };
            if !ended {
                // Let the request in progress finish, then close.
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
            }
            drop(slot);
        });
    }
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], super::global().encode())
}

async fn readyz() -> impl IntoResponse {
    match super::global().readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
