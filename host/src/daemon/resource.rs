//! The life of one resource: serve on a fresh socket, register with the
//! kubelet (waiting for it if it is not there), then watch for the signs of
//! a kubelet restart (our socket deleted, a new `kubelet.sock`) and start
//! over with a new server generation. Device state is kept throughout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::backend::ResourceSpec;
use crate::backend::handle::BackendHandle;
use crate::device_state::ResourceState;
use crate::model::ResourceSettings;
use crate::registration::{Kubelet, REGISTER_TIMEOUT};
use crate::server::{DevicePluginService, ResourceServer};
use crate::sockets::FileIdentity;
use crate::sockets::files as socket;
use crate::telemetry;

/// Periodic re-check, in case an inotify event is lost.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// First and longest wait between failed registrations.
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// First retry after the kubelet socket refused a connection.
const FIRST_CONNECT_RETRY: Duration = Duration::from_millis(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Everything one resource's task needs.
#[derive(Debug)]
pub struct ResourceTask {
    /// The resource and its options.
    pub spec: ResourceSpec,
    /// Its devices.
    pub state: Arc<ResourceState>,
    /// The backend that serves it.
    pub backend: Arc<BackendHandle>,
    /// Our socket's path.
    pub socket: PathBuf,
    /// The kubelet's registration socket (and a connection to it shared by
    /// every resource).
    pub kubelet: Arc<Kubelet>,
    /// Wakes the task on changes in the plugin directory.
    pub dir_events: broadcast::Receiver<()>,
    /// Stops the task.
    pub shutdown: CancellationToken,
    /// Sharing and CDI.
    pub settings: ResourceSettings,
    /// The CDI names of Allocate answers: checked, and devhost's own
    /// with `cdi = true`.
    pub cdi: Option<Arc<crate::cdi::answer::Answers>>,
}

enum Next {
    Shutdown,
    /// The kubelet restarted: a new server generation registers anew.
    Restart(&'static str),
    /// `Register` failed after the kubelet may have connected to this
    /// generation: a 1.37 kubelet refuses the same socket again while that
    /// connection lives (API facts §2.6), so a new generation (which ends
    /// it) registers after `delay`.
    Regenerate {
        reason: String,
        delay: Duration,
    },
}

impl ResourceTask {
    /// Runs until `shutdown`; leaves no socket behind.
    pub async fn run(mut self) {
        let resource = self.spec.name.clone();
        // Back-off between failed registrations, across generations.
        let mut retry = FIRST_RETRY;
        loop {
            let generation = self.shutdown.child_token();
            let service = DevicePluginService::new(
                self.spec.clone(),
                self.state.clone(),
                self.backend.clone(),
                generation.clone(),
            )
            .with_cdi(self.cdi.clone());
            let server = match ResourceServer::start(&self.socket, service, generation) {
                Ok(server) => server,
                Err(error) => {
                    tracing::error!(resource = %resource, socket = %self.socket.display(), %error, "cannot serve on socket; retrying");
                    if self.wait(MAX_RETRY).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            tracing::info!(resource = %resource, socket = %self.socket.display(), "serving");
            let next = self.register_and_watch(&server, &mut retry).await;
            telemetry::global().unregistered(&resource, matches!(next, Next::Restart(_)));
            server.stop().await;
            match next {
                Next::Shutdown => {
                    tracing::info!(resource = %resource, "stopped");
                    return;
                }
                Next::Restart(reason) => {
                    tracing::info!(resource = %resource, reason, "re-creating socket and registering again");
                }
                Next::Regenerate { reason, delay } => {
                    tracing::info!(resource = %resource, reason, retry_in = ?delay, "re-creating socket before registering again");
                    if self.back_off(delay).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn register_and_watch(&mut self, server: &ResourceServer, retry: &mut Duration) -> Next {
        let kubelet = match self.register(server, retry).await {
            Ok(identity) => identity,
            Err(next) => return next,
        };
        tracing::info!(resource = %self.spec.name, socket = %server.socket().display(), "registered with the kubelet");
        telemetry::global().registered(&self.spec.name);
        loop {
            if self.wait(CHECK_INTERVAL).await.is_err() {
                return Next::Shutdown;
            }
            if server.socket_lost() {
                return Next::Restart("our socket was deleted (kubelet restart)");
            }
            if FileIdentity::of(self.kubelet.socket()).is_some_and(|current| current != kubelet) {
                return Next::Restart("kubelet.sock was re-created (kubelet restart)");
            }
        }
    }

    /// Registers, retrying with back-off (`retry`, reset on success);
    /// returns the identity of the kubelet socket it registered with.
    async fn register(&mut self, server: &ResourceServer, retry: &mut Duration) -> Result<FileIdentity, Next> {
        let endpoint = server.socket().file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let mut waiting_logged = false;
        // A kubelet socket that refuses connections belongs to a kubelet
        // between bind and listen (microseconds: its creation event has
        // already been seen) or to a dead one: try again soon, backing off
        // to the normal delay.
        let mut refused_delay = FIRST_CONNECT_RETRY;
        loop {
            if server.socket_lost() {
                return Err(Next::Restart("our socket was deleted before registration"));
            }
            let Some(kubelet) = FileIdentity::of(self.kubelet.socket()) else {
                if !waiting_logged {
                    tracing::info!(resource = %self.spec.name, kubelet_socket = %self.kubelet.socket().display(), "waiting for the kubelet");
                    waiting_logged = true;
                }
                self.wait(CHECK_INTERVAL).await.map_err(|()| Next::Shutdown)?;
                continue;
            };
            let options = DevicePluginService::options(&self.spec);
            let attempt = self.kubelet.register(kubelet, &self.spec.name, &endpoint, options, REGISTER_TIMEOUT);
            let result = tokio::select! {
                () = self.shutdown.cancelled() => return Err(Next::Shutdown),
                result = attempt => result,
            };
            let delay = *retry;
            match result {
                Ok(()) => {
                    *retry = FIRST_RETRY;
                    return Ok(kubelet);
                }
                Err(error) if error.is_unreachable() && refused_delay < delay => {
                    tracing::debug!(resource = %self.spec.name, %error, retry_in = ?refused_delay, "registration failed");
                    let soon = refused_delay;
                    refused_delay *= 2;
                    self.wait(soon).await.map_err(|()| Next::Shutdown)?;
                }
                Err(error) => {
                    tracing::warn!(resource = %self.spec.name, %error, retry_in = ?delay, "registration failed");
                    *retry = (delay * 2).min(MAX_RETRY);
                    if !error.is_unreachable() {
                        // The kubelet got far enough to dial us, perhaps.
                        return Err(Next::Regenerate { reason: error.to_string(), delay });
                    }
                    self.back_off(delay).await.map_err(|()| Next::Shutdown)?;
                }
            }
        }
    }

    /// Waits out a retry delay: the whole of it, unless the kubelet
    /// restarts meanwhile (its socket is replaced: then at once); `Err` on
    /// shutdown. Other plugin-directory events, this resource's own socket
    /// being re-created among them, do not cut it short: a kubelet that
    /// refuses every `Register` is asked a few times a minute, not in a
    /// loop.
    async fn back_off(&mut self, delay: Duration) -> Result<(), ()> {
        let until = tokio::time::Instant::now() + delay;
        let kubelet = FileIdentity::of(self.kubelet.socket());
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.wait(left).await?;
            let now = FileIdentity::of(self.kubelet.socket());
            if now.is_some() && now != kubelet {
                return Ok(());
            }
        }
    }

    /// Waits for a plugin-directory event or `timeout`; `Err` on shutdown.
    /// The callers' checks are level-triggered (they look at the files
    /// themselves), so an event is acted on at once: a kubelet restart's
    /// burst (every socket deleted, then `kubelet.sock` created) wakes
    /// them once per step, each time re-checking, with no settling delay.
    async fn wait(&mut self, timeout: Duration) -> Result<(), ()> {
        let events = &mut self.dir_events;
        let event = async {
            if let Err(broadcast::error::RecvError::Closed) = events.recv().await {
                // The watcher is gone: only the periodic checks remain.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = self.shutdown.cancelled() => return Err(()),
            () = event => {}
            () = tokio::time::sleep(timeout) => return Ok(()),
        }
        // Events already queued are about the state the caller is about to
        // read anyway: one check covers them.
        while let Ok(()) | Err(broadcast::error::TryRecvError::Lagged(_)) = self.dir_events.try_recv() {}
        Ok(())
    }
}

/// The socket path for `resource` in `plugin_dir`, after removing sockets
/// earlier devhost instances left behind for it.
pub fn prepare_socket(plugin_dir: &std::path::Path, resource: &str, instance: &str) -> PathBuf {
    for stale in socket::remove_stale(plugin_dir, resource) {
        tracing::info!(resource, socket = %stale.display(), "removed a stale socket of an earlier devhost");
    }
    plugin_dir.join(socket::socket_name(plugin_dir, resource, instance))
}
