//! The kubelet's side of the device plugin API, written from API_FACTS:
//! a real gRPC peer on real Unix sockets, for end-to-end tests, `devhost
//! demo` and conformance checks.
//!
//! [`FakeKubelet`] serves `v1beta1.Registration` on `<plugin_dir>/kubelet.sock`
//! and, for each accepted registration, does what the kubelet does: dials the
//! plugin's socket, calls `GetDevicePluginOptions` inside `Register`, then
//! consumes `ListAndWatch` until the stream ends. It records everything it
//! sees and offers the kubelet's other calls (`Allocate`,
//! `GetPreferredAllocation`, `PreStartContainer`) shaped as the kubelet sends
//! them. [`FakeKubelet::restart`] simulates a kubelet restart, including the
//! 1.33+ socket cleanup.
//!
//! Parts: `registration` (the service, the ListAndWatch tasks, the socket
//! cleanup), `state` (what was recorded), `calls` (the kubelet's other RPCs),
//! `error`. It does not model node
//! status, allocation bookkeeping, the checkpoint or the plugin-watcher path.

mod calls;
mod error;
mod names;
mod plugin_watcher;
mod pod_resources;
mod registration;
mod state;
#[cfg(test)]
mod tests;
mod versions;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

pub use self::error::FakeKubeletError;
pub use self::plugin_watcher::{DraRegistration, FakePluginWatcher};
pub use self::pod_resources::FakePodResources;
use self::registration::{Generation, RegistrationService};
use self::state::{ResourceState, Shared, render_devices};
pub use self::versions::{HealthApi, KUBELET_1_32, KUBELET_1_34, KUBELET_1_36, KUBELET_1_37, KubeletVersion};
use crate::proto::KUBELET_SOCKET_NAME;
use crate::proto::v1beta1::registration_server::RegistrationServer;
use crate::proto::v1beta1::{Device, DevicePluginOptions, RegisterRequest};

/// How long `stop`/`restart` let in-flight `Register` calls finish before the
/// server task is aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A fake kubelet serving `v1beta1.Registration` in a plugin directory.
///
/// Dropping it without [`FakeKubelet::stop`] cancels its tasks and removes
/// `kubelet.sock` on a best-effort basis.
pub struct FakeKubelet {
    shared: Arc<Shared>,
    serving: tokio::sync::Mutex<Option<Serving>>,
}

/// The running registration server and its connection tasks.
struct Serving {
    generation: Generation,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FakeKubelet {
    /// Creates `plugin_dir` if needed, binds `<plugin_dir>/kubelet.sock` and
    /// serves v1beta1.Registration.
    ///
    /// A stale `kubelet.sock` is replaced; other sockets in the directory are
    /// left alone (only [`FakeKubelet::restart`] deletes them).
    pub async fn start(plugin_dir: &Path) -> Result<FakeKubelet, FakeKubeletError> {
        std::fs::create_dir_all(plugin_dir)
            .map_err(|source| FakeKubeletError::CreateDir { dir: plugin_dir.to_owned(), source })?;
        let kubelet = FakeKubelet {
            shared: Arc::new(Shared::new(plugin_dir.to_owned())),
            serving: tokio::sync::Mutex::new(None),
        };
        let socket = kubelet.socket_path();
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FakeKubeletError::Bind { path: socket, source });
            }
        }
        *kubelet.serving.lock().await = Some(kubelet.serve()?);
        Ok(kubelet)
    }

    /// Binds `kubelet.sock` and spawns the registration server.
    fn serve(&self) -> Result<Serving, FakeKubeletError> {
        let path = self.socket_path();
        let listener =
            UnixListener::bind(&path).map_err(|source| FakeKubeletError::Bind { path: path.clone(), source })?;
        let generation = Generation { token: CancellationToken::new(), tracker: TaskTracker::new() };
        let service = RegistrationService { shared: Arc::clone(&self.shared), generation: generation.clone() };
        let shutdown = generation.token.clone().cancelled_owned();
        let server =
            tokio::spawn(Server::builder().add_service(RegistrationServer::new(service)).serve_with_incoming_shutdown(
                crate::sockets::unix_incoming(listener, format!("{}", path.display()), Counter::default()),
                shutdown,
            ));
        tracing::info!(socket = %path.display(), "fake kubelet serving");
        Ok(Serving { generation, server })
    }

    /// Stops a generation: the server (after a grace period for in-flight
    /// calls), then every ListAndWatch task, which drops the connections.
    async fn shut_down(&self, serving: Serving) {
        let Serving { generation, mut server } = serving;
        generation.token.cancel();
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "fake kubelet registration server failed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "fake kubelet registration server task failed")
            }
            Err(_) => {
                tracing::warn!("fake kubelet registration server did not stop in time; aborting it");
                server.abort();
            }
        }
        generation.tracker.close();
        generation.tracker.wait().await;
        self.shared.disconnect_all();
    }

    /// The plugin directory.
    pub fn plugin_dir(&self) -> &Path {
        &self.shared.plugin_dir
    }

    /// `<plugin_dir>/kubelet.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.shared.plugin_dir.join(KUBELET_SOCKET_NAME)
    }

    /// Every RegisterRequest received, accepted or not, in order.
    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.shared.lock().requests.iter().map(|(r, _)| r.clone()).collect()
    }

    /// Waits until at least `count` accepted registrations for `resource`
    /// have happened since start; returns the latest one.
    pub async fn wait_for_registrations(
        &self,
        resource: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<RegisterRequest, FakeKubeletError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            {
                let state = self.shared.lock();
                let res = state.resources.get(resource);
                let accepted = res.map_or(0, |r| r.accepted);
                if accepted >= count
                    && let Some(latest) = res.and_then(|r| r.latest.clone())
                {
                    return Ok(latest);
                }
                let timed_out = tokio::time::Instant::now() >= deadline;
                if timed_out {
                    let refused: Vec<&String> = state
                        .requests
                        .iter()
                        .filter(|(r, _)| r.resource_name == resource)
                        .filter_map(|(_, refusal)| refusal.as_ref())
                        .collect();
                    return Err(FakeKubeletError::RegistrationTimeout {
                        resource: resource.to_owned(),
                        wanted: count,
                        accepted,
                        refused: refused.len(),
                        last_refusal: refused.last().map(|m| (*m).clone()),
                        timeout,
                    });
                }
            }
            // A timeout here loops once more to report what was seen.
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }

    /// Makes the next `count` accepted registrations of `resource` answer
    /// `DeadlineExceeded` although the kubelet connected and keeps the
    /// plugin registered: what a plugin sees when its `Register` deadline
    /// passes while a slow kubelet still completes the registration.
    pub fn lose_register_answers(&self, resource: &str, count: usize) {
        self.shared.lock().lost_answers.insert(resource.to_owned(), count);
    }

    /// Number of accepted registrations for `resource`.
    pub fn registration_count(&self, resource: &str) -> usize {
        self.with_resource(resource, |r| r.accepted).unwrap_or(0)
    }

    /// The DevicePluginOptions the plugin returned from
    /// GetDevicePluginOptions during its latest registration.
    pub fn options(&self, resource: &str) -> Option<DevicePluginOptions> {
        self.with_resource(resource, |r| r.options).flatten()
    }

    /// Latest device list received over the kubelet's ListAndWatch stream for
    /// `resource` (None before the first message). Only the current
    /// connection (latest registration) updates it; it is kept after the
    /// stream ends.
    pub fn devices(&self, resource: &str) -> Option<Vec<Device>> {
        self.with_resource(resource, |r| r.devices.clone()).flatten()
    }

    /// How many device lists `resource`'s current connections have
    /// delivered so far: a mark for [`FakeKubelet::device_lists_since`].
    pub fn device_list_count(&self, resource: &str) -> usize {
        self.with_resource(resource, |r| r.history_base + r.history.len()).unwrap_or(0)
    }

    /// Every device list received for `resource` after `mark` (as far as
    /// the kept history reaches), oldest first.
    pub fn device_lists_since(&self, resource: &str, mark: usize) -> Vec<Vec<Device>> {
        self.with_resource(resource, |r| {
            let first = mark.max(r.history_base) - r.history_base;
            r.history.iter().skip(first).cloned().collect()
        })
        .unwrap_or_default()
    }

    /// Waits until a device list satisfies `pred`: the latest one, or any
    /// received while waiting (a state that lasted only until the next
    /// message is not missed); returns it. Error on timeout says what was
    /// last seen.
    pub async fn wait_for_devices(
        &self,
        resource: &str,
        timeout: Duration,
        pred: impl Fn(&[Device]) -> bool,
    ) -> Result<Vec<Device>, FakeKubeletError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        // Lists received from now on, by their position in the history.
        let mut seen = self.with_resource(resource, |r| r.history_base + r.history.len()).unwrap_or(0);
        loop {
            let devices = self.devices(resource);
            if let Some(devices) = devices.as_deref()
                && pred(devices)
            {
                return Ok(devices.to_vec());
            }
            let missed = self.with_resource(resource, |r| {
                let first = seen.max(r.history_base) - r.history_base;
                let found = r.history.iter().skip(first).find(|list| pred(list)).cloned();
                (found, r.history_base + r.history.len())
            });
            if let Some((found, end)) = missed {
                if let Some(found) = found {
                    return Ok(found);
                }
                seen = end;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FakeKubeletError::DevicesTimeout {
                    resource: resource.to_owned(),
                    last_seen: render_devices(devices.as_deref()),
                    connected: self.connected(resource),
                    timeout,
                });
            }
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }

    /// Number of ListAndWatch messages received for `resource` on the current
    /// connection.
    pub fn list_and_watch_messages(&self, resource: &str) -> usize {
        self.with_resource(resource, |r| r.current().map_or(0, |c| c.messages)).unwrap_or(0)
    }

    /// Whether the plugin's ListAndWatch stream for `resource` is open (false
    /// after the stream ended, per §2.5). True from the accepted registration
    /// on, as the kubelet counts the endpoint live from then.
    pub fn connected(&self, resource: &str) -> bool {
        self.with_resource(resource, |r| r.current().is_some_and(|c| c.open)).unwrap_or(false)
    }

    /// Simulates a kubelet restart exactly as API_FACTS §2.1/§2.7: stop the
    /// registration server, drop every plugin connection (ending their
    /// ListAndWatch streams from the kubelet side), delete every Unix socket
    /// in the dir (1.33+ socket-only cleanup: regular files and
    /// `kubelet_internal_checkpoint` survive; this deletes devhost's sockets
    /// too), then bind a new kubelet.sock and serve again. Registrations and
    /// devices from before are kept in history but `connected()` becomes
    /// false until plugins re-register.
    pub async fn restart(&self) -> Result<(), FakeKubeletError> {
        let mut serving = self.serving.lock().await;
        if let Some(old) = serving.take() {
            self.shut_down(old).await;
        }
        let removed = registration::remove_sockets(&self.shared.plugin_dir)?;
        tracing::info!(removed = removed.len(), "fake kubelet restarting: sockets deleted");
        *serving = Some(self.serve()?);
        Ok(())
    }

    /// Stops serving and closes all plugin connections; removes kubelet.sock.
    pub async fn stop(&self) {
        let mut serving = self.serving.lock().await;
        if let Some(old) = serving.take() {
            self.shut_down(old).await;
            remove_socket(&self.socket_path());
        }
    }

    fn with_resource<T>(&self, resource: &str, f: impl FnOnce(&ResourceState) -> T) -> Option<T> {
        self.shared.lock().resources.get(resource).map(f)
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.serving.try_lock()
            && let Some(serving) = serving.take()
        {
            serving.generation.token.cancel();
            serving.server.abort();
            remove_socket(&self.socket_path());
        }
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %e, "cannot remove kubelet.sock");
    }
}
