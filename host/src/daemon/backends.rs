//! The running backends, keyed by their config file, and how they follow
//! `backends.d/`: a new file starts its backend, a changed file (or module)
//! replaces just that backend, a removed file stops it. A file that fails to
//! parse or load is reported and whatever ran for it before keeps running.
//! Every other backend, with its sockets and open streams, is untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::resource::{self, ResourceTask};
use crate::backend::handle::BackendHandle;
use crate::config::{BackendConfig, BackendSource, LoadedBackends};
use crate::registration::PluginDirWatcher;
use crate::sockets::FileIdentity;
use crate::telemetry;

/// One backend that is serving.
struct Running {
    config: BackendConfig,
    /// The module file as it was when loaded, to notice a replaced module.
    module: Option<FileIdentity>,
    handle: Arc<BackendHandle>,
    /// Stops this backend's resource tasks and its supervisor.
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What the daemon needs to start resource tasks.
pub struct Context<'a> {
    /// The kubelet's device plugin directory.
    pub plugin_dir: &'a Path,
    /// The kubelet's registration socket, and the connection to it every
    /// resource registers over.
    pub kubelet: &'a Arc<crate::registration::Kubelet>,
    /// Plugin directory events for resource tasks.
    pub watcher: &'a PluginDirWatcher,
    /// This process's socket-name suffix.
    pub instance: &'a str,
    /// devhost's CDI side: where specs go, what the runtime sees.
    pub cdi: &'a Arc<crate::cdi::Host>,
    /// Who holds which device, from the kubelet.
    pub assignments: &'a crate::holders::AssignmentsWatch,
    /// What resources served through DRA share.
    pub dra: &'a super::dra::DraContext,
}

/// The set of running backends.
#[derive(Default)]
pub struct Backends {
    running: BTreeMap<PathBuf, Running>,
    /// Files whose backend did not start: retried with back-off, or at once
    /// when the file or its module changes.
    failed: BTreeMap<PathBuf, Failed>,
    /// The config error last reported per file: a rescan does not repeat it.
    reported: BTreeMap<PathBuf, String>,
    /// The DRA drivers served after the last reconcile.
    dra_drivers: BTreeSet<String>,
}

/// A backend that did not start, and when to try it again.
struct Failed {
    config: BackendConfig,
    module: Option<FileIdentity>,
    retry: Retry,
}

/// Back-off for a backend that does not start (a driver not installed yet,
/// say): the rescan tries it again after `delay`, which doubles up to
/// [`MAX_RETRY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    delay: Duration,
    at: Instant,
}

/// First wait before a failed backend is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Longest wait between tries.
const MAX_RETRY: Duration = Duration::from_secs(300);

impl Retry {
    /// The back-off after a failure at `now`, following `previous`.
    fn after(previous: Option<Retry>, now: Instant) -> Retry {
        let delay = previous.map_or(FIRST_RETRY, |retry| (retry.delay * 2).min(MAX_RETRY));
        Retry { delay, at: now + delay }
    }
}

fn module_identity(config: &BackendConfig) -> Option<FileIdentity> {
    match &config.source {
        BackendSource::Module { path, .. } => FileIdentity::of(path),
        BackendSource::Static(_) => None,
    }
}

impl Backends {
    /// Brings the running set in line with `loaded` (see the module docs).
    pub async fn reconcile(&mut self, loaded: LoadedBackends, context: &Context<'_>) {
        let refused: BTreeSet<PathBuf> = loaded.errors.iter().map(|error| error.file.clone()).collect();
        self.reported.retain(|file, _| refused.contains(file));
        for error in &loaded.errors {
            let text = error.to_string();
            if self.reported.get(&error.file) == Some(&text) {
                continue;
            }
            let kept = if !loaded.listed {
                "; every backend keeps serving as it was"
            } else if loaded.superseded.contains(&error.file) {
                ""
            } else if self.running.contains_key(&error.file) {
                "; its previous version keeps serving"
            } else {
                ""
            };
            tracing::error!(%error, "backend config refused{kept}");
            self.reported.insert(error.file.clone(), text);
        }
        if !loaded.listed {
            // Not knowing which files exist is not knowing that any went.
            return;
        }
        for file in &loaded.superseded {
            if let Some(running) = self.running.remove(file) {
                tracing::info!(backend = %running.config.name, file = %file.display(), "stopping the backend: a file that sorts before it claims one of its resources");
                stop(running).await;
            }
        }
        let desired: BTreeMap<PathBuf, BackendConfig> =
            loaded.backends.into_iter().map(|config| (config.file.clone(), config)).collect();

        let gone: Vec<PathBuf> = self
            .running
            .keys()
            .filter(|file| !desired.contains_key(*file) && !refused.contains(*file))
            .cloned()
            .collect();
        for file in gone {
            if let Some(running) = self.running.remove(&file) {
                tracing::info!(backend = %running.config.name, file = %file.display(), "backend file removed; stopping its resources");
                stop(running).await;
            }
        }

        self.failed.retain(|file, _| desired.contains_key(file));
        let now = Instant::now();
        for (file, config) in desired {
            let module = module_identity(&config);
            let previous = self.running.get(&file);
            if previous.is_some_and(|running| running.config == config && running.module == module) {
                continue;
            }
            let previous = previous.is_some();
            // The same failed file, not yet due: wait. A changed one: now.
            let failed = self.failed.get(&file).filter(|f| f.config == config && f.module == module).map(|f| f.retry);
            if failed.is_some_and(|retry| now < retry.at) {
                continue;
            }
            let started = match start_backend(&config).await {
                Some((handle, backend_stop)) => self.claim(&file, &config, handle, backend_stop).await,
                None => None,
            };
            let Some((handle, backend_stop)) = started else {
                if previous {
                    tracing::error!(backend = %config.name, file = %file.display(), "the changed backend did not start; its previous version keeps serving");
                }
                let retry = Retry::after(failed, now);
                tracing::info!(backend = %config.name, file = %file.display(), retry_in = ?retry.delay, "will try the backend again then, or at once when its file or module changes");
                self.failed.insert(file, Failed { config, module, retry });
                continue;
            };
            self.failed.remove(&file);
            if let Some(old) = self.running.remove(&file) {
                tracing::info!(backend = %config.name, file = %file.display(), "backend changed; replacing it");
                stop(old).await;
            }
            handle.announce();
            let running = spawn_resources(config, module, handle, backend_stop, context);
            self.running.insert(file, running);
        }
        // A driver no longer served (its file removed, or its resource
        // moved to the device plugin API) takes its slices with it; one
        // that only restarted (a changed file) is still served here.
        let served = self.dra_drivers();
        for driver in self.dra_drivers.difference(&served) {
            context.dra.remove_slices(driver);
        }
        self.dra_drivers = served;
    }

    /// The DRA drivers of the running backends' resources.
    fn dra_drivers(&self) -> BTreeSet<String> {
        self.running
            .values()
            .flat_map(|running| {
                running.handle.resources().iter().filter_map(|(spec, _)| {
                    running.config.resources.get(&spec.name).and_then(|settings| settings.dra_driver.clone())
                })
            })
            .collect()
    }

    /// Every resource served now.
    pub fn resources(&self) -> Vec<String> {
        self.running.values().flat_map(|r| r.handle.resources().iter().map(|(spec, _)| spec.name.clone())).collect()
    }

    /// Settles the resources a just-started backend declares against the
    /// running ones: the file that sorts first wins, whichever started
    /// first, so the winner is the same after a restart and after a hot
    /// add. A running backend from a later file gives way (stopped, and
    /// retried with back-off); one from an earlier file keeps its resource
    /// and the new backend is stopped (`None`).
    async fn claim(
        &mut self,
        file: &PathBuf,
        config: &BackendConfig,
        handle: Arc<BackendHandle>,
        backend_stop: CancellationToken,
    ) -> Option<(Arc<BackendHandle>, CancellationToken)> {
        let mut later = BTreeSet::new();
        for (spec, _) in handle.resources() {
            let owner = self
                .running
                .iter()
                .filter(|(owner, _)| *owner != file)
                .find(|(_, running)| running.handle.resources().iter().any(|(theirs, _)| theirs.name == spec.name));
            let Some((owner_file, owner)) = owner else { continue };
            if owner_file < file {
                tracing::error!(backend = %config.name, file = %file.display(), resource = %spec.name, "resource {:?} is already served by backend {:?} from {}, which sorts first; backend not started", spec.name, owner.config.name, owner_file.display());
                handle.shutdown().await;
                backend_stop.cancel();
                return None;
            }
            later.insert(owner_file.clone());
        }
        let now = Instant::now();
        for owner_file in later {
            if let Some(owner) = self.running.remove(&owner_file) {
                tracing::info!(backend = %owner.config.name, file = %owner_file.display(), claimed_by = %file.display(), "stopping the backend: a file that sorts before it claims one of its resources");
                let (config, module) = (owner.config.clone(), owner.module);
                stop(owner).await;
                self.failed.insert(owner_file, Failed { config, module, retry: Retry::after(None, now) });
            }
        }
        Some((handle, backend_stop))
    }

    /// Stops every backend at once (each within its own deadline, so one
    /// that hangs delays no other): streams end, sockets are removed.
    pub async fn stop_all(&mut self) {
        let stopping = std::mem::take(&mut self.running).into_values().map(stop);
        futures_util::future::join_all(stopping).await;
    }
}

async fn stop(running: Running) {
    running.stop.cancel();
    running.tasks.close();
    running.tasks.wait().await;
    running.handle.shutdown().await;
    telemetry::global().backend_stopped(running.handle.name());
    for (spec, _) in running.handle.resources() {
        telemetry::global().forget_resource(&spec.name);
    }
}

/// Builds and initialises one backend; `None` (after logging why) if it
/// cannot serve.
async fn start_backend(config: &BackendConfig) -> Option<(Arc<BackendHandle>, CancellationToken)> {
    let file = config.file.display().to_string();
    let backend = match crate::loader::load(config).await {
        Ok(backend) => backend,
        Err(error) => {
            tracing::error!(backend = %config.name, file, %error, "backend not loaded");
            return None;
        }
    };
    let stop = CancellationToken::new();
    let handle = match BackendHandle::start(&config.name, backend, config.call_timeout, stop.clone()).await {
        Ok(handle) => handle,
        Err(error) => {
            tracing::error!(backend = %config.name, file, %error, "backend did not start");
            return None;
        }
    };
    tracing::info!(backend = %config.name, resources = handle.resources().len(), "backend started");
    handle.start_polling(config.poll_interval, stop.clone());
    Some((handle, stop))
}

fn spawn_resources(
    config: BackendConfig,
    module: Option<FileIdentity>,
    handle: Arc<BackendHandle>,
    stop: CancellationToken,
    context: &Context<'_>,
) -> Running {
    let tasks = TaskTracker::new();
    for name in config.resources.keys().filter(|name| !handle.resources().iter().any(|(spec, _)| &spec.name == *name)) {
        tracing::error!(backend = %config.name, file = %config.file.display(), resource = %name, "[resources.{name:?}] names no resource of this backend; ignored");
    }
    for (spec, state) in handle.resources() {
        let mut settings = config.resources.get(&spec.name).cloned().unwrap_or_default();
        if let Some(driver) = &settings.dra_driver {
            // Never served both ways: the DRA scheduler does not see
            // device-plugin allocations.
            let task = super::dra::DraTask {
                driver: driver.clone(),
                resource: spec.name.clone(),
                state: state.clone(),
                backend: handle.clone(),
                context: context.dra.clone(),
                shutdown: stop.clone(),
                counter_sets: Arc::new(spec.counter_sets.clone()),
            };
            let span = tracing::info_span!("dra", resource = %spec.name, driver = %driver, backend = %handle.name());
            tasks.spawn(task.run().instrument(span));
            continue;
        }
        if let Err(error) = state.set_sharing(settings.sharing) {
            tracing::error!(resource = %spec.name, %error, "cannot share this resource's devices; serving them unshared");
            settings.sharing = crate::model::Sharing::default();
        }
        if settings.cdi {
            let maintain = crate::cdi::resource::maintain(
                context.cdi.clone(),
                spec.name.clone(),
                state.clone(),
                handle.clone(),
                stop.clone(),
            );
            tasks.spawn(maintain.instrument(tracing::info_span!("cdi", resource = %spec.name)));
        }
        let cdi = Some(Arc::new(crate::cdi::answer::Answers::new(context.cdi.clone(), &spec.name, settings.cdi)));
        let task = ResourceTask {
            settings,
            cdi,
            spec: spec.clone(),
            state: state.clone(),
            backend: handle.clone(),
            socket: resource::prepare_socket(context.plugin_dir, &spec.name, context.instance),
            kubelet: context.kubelet.clone(),
            dir_events: context.watcher.subscribe(),
            shutdown: stop.clone(),
        };
        let usage = crate::holders::release::UsageTask {
            spec: spec.clone(),
            state: state.clone(),
            backend: handle.clone(),
            assignments: context.assignments.clone(),
            shutdown: stop.clone(),
        };
        tasks.spawn(usage.run().instrument(tracing::info_span!("usage", resource = %spec.name)));
        telemetry::global().add_resource(state);
        let span = tracing::info_span!("resource", resource = %spec.name, backend = %handle.name());
        tasks.spawn(task.run().instrument(span));
    }
    Running { config, module, handle, stop, tasks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_ten_seconds_to_five_minutes() {
        let now = Instant::now();
        let mut retry = Retry::after(None, now);
        assert_eq!(retry, Retry { delay: FIRST_RETRY, at: now + FIRST_RETRY });
        let mut delays = vec![retry.delay.as_secs()];
        for _ in 0..6 {
            retry = Retry::after(Some(retry), now);
            delays.push(retry.delay.as_secs());
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry.at, now + MAX_RETRY);
    }
}
