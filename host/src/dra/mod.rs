//! Serving a resource through Dynamic Resource Allocation instead of the
//! device plugin API (`docs/dra-api.md`).
//!
//! Parts: the names DRA needs (`names`); the kubelet side of a driver
//! (`plugin`: registration through the plugin watcher, `DRAPlugin` in both
//! packages, `DRAResourceHealth` fed by the device state); claims prepared
//! through the backend into a CDI spec per claim (`prepare`), remembered in
//! an on-disk checkpoint (`checkpoint`); the ResourceSlice objects of a
//! driver's pool (`slices`) and their publisher (`publish`). The daemon
//! runs them per resource (`daemon::dra`).

pub mod checkpoint;
pub mod names;
pub mod plugin;
pub mod prepare;
pub mod publish;
pub mod slices;

use std::time::Duration;

/// The longest devhost waits to connect to the API server.
pub const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest devhost waits for one API-server answer (the slice watch, the
/// one long-running call, has a client without it:
/// `publish::watch_client`): a hung server fails the call, and
/// the caller retries (the publisher on the newest state; the kubelet
/// repeats a failed prepare) instead of waiting for minutes.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A client for `config`, with devhost's timeouts and without kube-rs's
/// own retries (every caller has its own back-off).
pub fn api_client(mut config: kube::Config) -> Result<kube::Client, String> {
    config.default_retry = false;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    config.read_timeout = Some(API_READ_TIMEOUT);
    config.write_timeout = Some(API_READ_TIMEOUT);
    kube::Client::try_from(config).map_err(|error| format!("API-server client: {error}"))
}
