//! The daemon: serves every backend in `backends.d/`, one task per resource
//! (serve, register, survive kubelet restarts), and follows the directory
//! without a restart: on a change there (inotify), on SIGHUP, and on a
//! periodic rescan (which also notices replaced module files). On shutdown
//! it stops every resource and removes every socket it created.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{HostConfig, ParseCache, load_backends_cached};
use crate::registration::PluginDirWatcher;
use crate::sockets::files as socket;

mod backends;
mod dra;
#[allow(unsafe_code)]
mod memory;
mod resource;

pub use backends::Backends;
pub use resource::ResourceTask;

/// How long changes in `backends.d/` must settle before a reload (an
/// editor's save is several events).
const RELOAD_SETTLE: Duration = Duration::from_millis(200);
/// Rescan even without events: catches module files replaced outside
/// `backends.d/` and a directory that appears late.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

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
    if !config.plugin_dir.is_dir() {
        // Only devhost and the kubelet (root) need it, whatever the umask.
        std::fs::create_dir_all(&config.plugin_dir)
            .and_then(|()| {
                std::fs::set_permissions(&config.plugin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o750))
            })
            .map_err(|source| DaemonError::PluginDir { dir: config.plugin_dir.clone(), source })?;
    }
    let watcher = PluginDirWatcher::start(&config.plugin_dir)
        .map_err(|source| DaemonError::Watch { dir: config.plugin_dir.clone(), source })?;
    let instance = socket::instance_id();
    let assignments = crate::holders::follow(&config.pod_resources, shutdown.clone());
    let cdi = crate::cdi::Host::new(config.cdi_dir.clone(), config.cdi_spec_dirs(), &instance);
    cdi.check_dir();
    let dra = dra::DraContext::new(&config.dra, cdi.clone(), &instance).await;
    let kubelet = Arc::new(crate::registration::Kubelet::new(&config.kubelet_socket));
    let context = backends::Context {
        plugin_dir: &config.plugin_dir,
        kubelet: &kubelet,
        watcher: &watcher,
        instance: &instance,
        cdi: &cdi,
        assignments: &assignments,
        dra: &dra,
    };

    let (reload, mut reloads) = mpsc::channel::<&'static str>(1);
    let _config_watch = watch_config_dir(&config.backends_dir, reload.clone());
    reload_on_sighup(reload.clone());

    let mut backends = Backends::default();
    let mut parsed = ParseCache::default();
    reconcile(&mut backends, &mut parsed, config, &context).await;
    if backends.resources().is_empty() {
        tracing::warn!(dir = %config.backends_dir.display(), "no backend is serving; add or fix files there");
    }
    loop {
        let cause = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(cause) = reloads.recv() => cause,
            () = tokio::time::sleep(RESCAN_INTERVAL) => "periodic rescan",
        };
        // Let a burst of file events settle; one reload serves every cause
        // that queued up meanwhile (and the log names them all).
        tokio::time::sleep(RELOAD_SETTLE).await;
        let mut causes = vec![cause];
        while let Ok(more) = reloads.try_recv() {
            if !causes.contains(&more) {
                causes.push(more);
            }
        }
        let cause = causes.join(", ");
        let cause = cause.as_str();
        tracing::debug!(cause, "reloading backends");
        reconcile(&mut backends, &mut parsed, config, &context).await;
        tracing::debug!(cause, resources = backends.resources().len(), "backends reconciled");
    }
    tracing::info!("shutting down");
    backends.stop_all().await;
    cdi.withdraw();
    Ok(())
}

/// Reads `backends.d` and brings the backends in line with it. Readiness
/// waits for the first listing that succeeds: a pod whose `backends.d`
/// cannot be read (a wrong mount) has tried no backend file and is not
/// ready, so a rolling update does not replace a working pod with it.
async fn reconcile(
    backends: &mut Backends,
    parsed: &mut ParseCache,
    config: &HostConfig,
    context: &backends::Context<'_>,
) {
    let Some(mut loaded) = read_backends_dir(config, parsed).await else { return };
    // Checked at every reconcile, not cached with the parse: a vendor's
    // spec installed later lets the backend start at the next rescan.
    let view = context.cdi.registry.current().await;
    crate::cdi::check_static_kinds(&mut loaded, &view, context.cdi.registry.dirs());
    let listed = loaded.listed;
    backends.reconcile(loaded, context).await;
    if listed {
        crate::telemetry::global().mark_started();
    }
    // Parsing a big file leaves tens of MiB of freed heap behind, and even
    // re-reading one leaves its text's buffer: give both back.
    memory::release_free_heap();
}

/// Lists, reads and parses `backends.d` off the runtime threads: the
/// directory and its files are the operator's (or a volume's), and a
/// stalled mount or a big file must not hold a thread that serves the
/// kubelet. `None` (logged) if that work itself failed; the backends stay
/// as they are until the next reload.
async fn read_backends_dir(config: &HostConfig, parsed: &mut ParseCache) -> Option<crate::config::LoadedBackends> {
    let (dir, timeout, mut cache) = (config.backends_dir.clone(), config.call_timeout, std::mem::take(parsed));
    let read = tokio::task::spawn_blocking(move || {
        let loaded = load_backends_cached(&dir, timeout, &mut cache);
        (loaded, cache)
    })
    .await;
    match read {
        Ok((loaded, cache)) => {
            *parsed = cache;
            Some(loaded)
        }
        Err(error) => {
            tracing::error!(dir = %config.backends_dir.display(), %error, "reading the backends directory failed; backends left as they are");
            None
        }
    }
}

/// Watches `dir` for changes; `None` (with a warning) if it cannot, in
/// which case SIGHUP and the periodic rescan still reload.
fn watch_config_dir(dir: &Path, reload: mpsc::Sender<&'static str>) -> Option<notify::RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| !event.kind.is_access()) {
            // A full channel already holds a pending reload.
            let _ = reload.try_send("backends.d changed");
        }
    });
    match watcher.and_then(|mut watcher| watcher.watch(dir, RecursiveMode::NonRecursive).map(|()| watcher)) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the backends directory; reloading on SIGHUP and every {RESCAN_INTERVAL:?}");
            None
        }
    }
}

fn reload_on_sighup(reload: mpsc::Sender<&'static str>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading backends.d");
                    if reload.send("SIGHUP").await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP; backends.d is still watched"),
    }
}
