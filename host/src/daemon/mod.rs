//! The daemon: loads the configured backends, starts one task per resource
//! (serve, register, survive kubelet restarts), and on shutdown stops them
//! all and removes every socket it created.
//!
//! A backend that fails to load or start is reported and skipped; the
//! others serve.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::handle::BackendHandle;
use crate::config::{BackendConfig, HostConfig, load_backends};
use crate::registration::PluginDirWatcher;
use crate::server::socket;

mod resource;

pub use resource::ResourceTask;

/// Why the daemon could not run at all.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The plugin directory is missing and cannot be created.
    #[error("cannot create the plugin directory {dir}: {source}")]
    PluginDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plugin directory cannot be watched.
    #[error("cannot watch the plugin directory {dir} for kubelet restarts: {source}")]
    Watch {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// Serves every backend in `config` until `shutdown` fires.
pub async fn run(config: &HostConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&config.plugin_dir)
        .map_err(|source| DaemonError::PluginDir { dir: config.plugin_dir.clone(), source })?;
    let watcher = PluginDirWatcher::start(&config.plugin_dir)
        .map_err(|source| DaemonError::Watch { dir: config.plugin_dir.clone(), source })?;

    let loaded = load_backends(&config.backends_dir, config.call_timeout);
    for error in &loaded.errors {
        tracing::error!(%error, "backend config refused; the other backends load");
    }
    let backends_stop = CancellationToken::new();
    let instance = socket::instance_id();
    let tasks = TaskTracker::new();
    let mut started: Vec<Arc<BackendHandle>> = Vec::new();
    let mut owners: HashMap<String, String> = HashMap::new();
    for backend_config in &loaded.backends {
        let Some(handle) = start_backend(backend_config, &backends_stop, &owners).await else { continue };
        for (spec, state) in handle.resources() {
            owners.insert(spec.name.clone(), handle.name().to_owned());
            let task = ResourceTask {
                spec: spec.clone(),
                state: state.clone(),
                backend: handle.clone(),
                socket: resource::prepare_socket(&config.plugin_dir, &spec.name, &instance),
                kubelet_socket: config.kubelet_socket.clone(),
                dir_events: watcher.subscribe(),
                shutdown: shutdown.clone(),
            };
            let span = tracing::info_span!("resource", resource = %spec.name, backend = %handle.name());
            tasks.spawn(task.run().instrument(span));
        }
        started.push(handle);
    }
    if started.is_empty() {
        tracing::warn!(dir = %config.backends_dir.display(), "no backend is serving; fix the backend files and restart");
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    tasks.close();
    tasks.wait().await;
    backends_stop.cancel();
    for handle in started {
        handle.shutdown().await;
    }
    Ok(())
}

/// Builds and initialises one backend; `None` (after logging why) if it
/// cannot serve. A resource another backend already serves is refused.
async fn start_backend(
    config: &BackendConfig,
    stop: &CancellationToken,
    owners: &HashMap<String, String>,
) -> Option<Arc<BackendHandle>> {
    let file = config.file.display().to_string();
    let backend = match crate::loader::load(config) {
        Ok(backend) => backend,
        Err(error) => {
            tracing::error!(backend = %config.name, file, %error, "backend not loaded");
            return None;
        }
    };
    let handle = match BackendHandle::start(&config.name, backend, config.call_timeout, stop.child_token()).await {
        Ok(handle) => handle,
        Err(error) => {
            tracing::error!(backend = %config.name, file, %error, "backend did not start");
            return None;
        }
    };
    if let Some((spec, owner)) =
        handle.resources().iter().find_map(|(spec, _)| owners.get(&spec.name).map(|owner| (spec, owner)))
    {
        tracing::error!(backend = %config.name, file, resource = %spec.name, "resource {:?} is already served by backend {owner:?}; backend not started", spec.name);
        handle.shutdown().await;
        return None;
    }
    tracing::info!(backend = %config.name, resources = handle.resources().len(), "backend started");
    Some(handle)
}
