//! The life of one resource served through DRA (`api = "dra"`): its
//! kubelet plugin (registration and service sockets, re-created when they
//! are removed), its claims prepared through the backend with a checkpoint
//! in the driver's kubelet directory, and its ResourceSlices kept current
//! on the API server. The API server's absence stops nothing the kubelet
//! needs: prepared claims stay answered from the checkpoint, health keeps
//! flowing, slices are published when it is back.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::handle::BackendHandle;
use crate::config::DraSettings;
use crate::device_state::ResourceState;
use crate::dra::plugin::{DraPaths, DraPlugin};
use crate::dra::prepare::{Preparer, PreparerFiles};
use crate::dra::publish::{Pacing, SlicePublisher, watch_client};

/// How often the plugin's sockets are checked (a kubelet or an operator
/// may remove them; the plugin watcher acts on a socket that appears).
const SOCKET_CHECK: Duration = Duration::from_secs(1);
/// The wait before starting the plugin again after it could not start.
const START_RETRY: Duration = Duration::from_secs(5);

/// What every DRA resource of this daemon shares.
#[derive(Clone)]
pub struct DraContext {
    /// The host's `[dra]` settings.
    pub settings: DraSettings,
    /// The API-server client, or why there is none.
    pub client: Result<kube::Client, String>,
    /// The client that watches the driver's slices (no read timeout: a
    /// quiet watch reads nothing for minutes); `None` without API access.
    pub watch_client: Option<kube::Client>,
    /// devhost's CDI side: where claim specs go, what the runtime sees.
    pub cdi: Arc<crate::cdi::Host>,
    /// This process's socket-name suffix.
    pub instance: String,
}

impl DraContext {
    /// Builds the API-server clients from the settings (a kubeconfig, or the
    /// pod's service account): one for calls, one for the slices' watch; a
    /// failure is kept and reported by each DRA resource, since a node
    /// without one is fine.
    pub async fn new(settings: &DraSettings, cdi: Arc<crate::cdi::Host>, instance: &str) -> Self {
        let config = config(settings).await;
        let watch_client = config.clone().ok().and_then(|config| match watch_client(config) {
            Ok(client) => Some(client),
            Err(error) => {
                tracing::warn!(%error, "ResourceSlices deleted behind devhost's back are noticed only at the next re-read");
                None
            }
        });
        let client = config.and_then(crate::dra::api_client);
        DraContext { settings: settings.clone(), client, watch_client, cdi, instance: instance.to_owned() }
    }
}

impl DraContext {
    /// Deletes the ResourceSlices of `driver` on this node, in the
    /// background (the driver is no longer served here). A failure is
    /// logged: the kubelet deletes them too once the driver is gone.
    pub fn remove_slices(&self, driver: &str) {
        let (Ok(client), Some(node)) = (&self.client, &self.settings.node_name) else { return };
        let mut publisher = SlicePublisher::new(client.clone(), driver, node, false, Pacing::default());
        let driver = driver.to_owned();
        tokio::spawn(async move {
            if let Err(error) = publisher.remove().await {
                tracing::warn!(driver, %error, "cannot delete the ResourceSlices of a driver no longer served; the kubelet deletes them once it sees the driver gone");
            }
        });
    }
}

async fn config(settings: &DraSettings) -> Result<kube::Config, String> {
    match &settings.kubeconfig {
        Some(file) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(file)
                .map_err(|error| format!("kubeconfig {}: {error}", file.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|error| format!("kubeconfig {}: {error}", file.display()))
        }
        None => kube::Config::incluster()
            .map_err(|error| format!("no in-cluster API-server access (and no [dra] kubeconfig): {error}")),
    }
}

/// Everything one DRA resource's task needs.
pub struct DraTask {
    /// The driver name.
    pub driver: String,
    /// The resource it serves.
    pub resource: String,
    /// Its devices.
    pub state: Arc<ResourceState>,
    /// The backend that serves it.
    pub backend: Arc<BackendHandle>,
    /// Shared DRA settings and client.
    pub context: DraContext,
    /// Stops the task.
    pub shutdown: CancellationToken,
    /// The counter sets its devices consume from (partitionable devices;
    /// empty when its backend declares none).
    pub counter_sets: Arc<Vec<crate::model::CounterSet>>,
}

impl DraTask {
    /// Serves the driver until shutdown. A driver that cannot be served
    /// (no node name, no API access, an unreadable checkpoint) keeps the
    /// pod not ready until then, as an unregistered resource does.
    pub async fn run(self) {
        let metrics = crate::telemetry::global().dra();
        metrics.serve(&self.driver);
        self.serve().await;
        self.shutdown.cancelled().await;
        metrics.forget(&self.driver);
    }

    async fn serve(&self) {
        let Some(node) = self.context.settings.node_name.clone() else {
            tracing::error!(driver = %self.driver, "api = \"dra\" needs this node's name: set NODE_NAME (the downward API's spec.nodeName) or [dra] node_name; the resource is not served");
            return;
        };
        let client = match &self.context.client {
            Ok(client) => client.clone(),
            Err(why) => {
                tracing::error!(driver = %self.driver, "api = \"dra\" needs the API server (to publish ResourceSlices and read claims): {why}; the resource is not served");
                return;
            }
        };
        let root = &self.context.settings.kubelet_root;
        for stale in DraPaths::remove_stale(root, &self.driver) {
            tracing::info!(driver = %self.driver, socket = %stale.display(), "removed a socket an earlier devhost left behind");
        }
        let paths = DraPaths::for_instance(root, &self.driver, &self.context.instance);
        let files = PreparerFiles {
            cdi: self.context.cdi.clone(),
            checkpoint: root.join("plugins").join(&self.driver).join("devhost-claims.json"),
        };
        let preparer = match Preparer::new(
            &self.driver,
            &self.resource,
            &node,
            client.clone(),
            self.backend.clone(),
            self.state.clone(),
            files,
        )
        .await
        {
            Ok(preparer) => Arc::new(preparer),
            Err(error) => {
                tracing::error!(driver = %self.driver, %error, "the resource is not served: without its checkpoint, claims could be prepared twice");
                return;
            }
        };
        let mut publisher =
            SlicePublisher::new(client, &self.driver, &node, self.context.settings.device_taints, Pacing::default());
        if let Some(watch_client) = &self.context.watch_client {
            publisher = publisher.watching(watch_client.clone());
        }
        publisher = publisher.with_counter_sets(self.counter_sets.clone());
        let resync = publisher.resync();
        let changes = self.state.subscribe();
        let publishing = self.shutdown.clone();
        let span = tracing::info_span!("slices", driver = %self.driver);
        let publish = tokio::spawn(async move { publisher.run(changes, publishing).await }.instrument(span));
        self.serve_kubelet(&node, &paths, preparer, resync).await;
        let _ = publish.await;
    }

    /// Runs the kubelet plugin until shutdown, starting it again whenever
    /// its sockets are lost.
    async fn serve_kubelet(
        &self,
        node: &str,
        paths: &DraPaths,
        preparer: Arc<Preparer>,
        resync: Arc<tokio::sync::Notify>,
    ) {
        loop {
            let stop = self.shutdown.child_token();
            let plugin = match DraPlugin::start(
                &self.driver,
                node,
                paths,
                self.state.clone(),
                Some(preparer.clone()),
                Some(resync.clone()),
                stop,
            ) {
                Ok(plugin) => plugin,
                Err(error) => {
                    tracing::error!(driver = %self.driver, socket = %paths.registration.display(), %error, "cannot serve the DRA plugin sockets; trying again in {START_RETRY:?}");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        () = tokio::time::sleep(START_RETRY) => continue,
                    }
                }
            };
            tracing::info!(driver = %self.driver, socket = %paths.registration.display(), "DRA driver serving; waiting for the kubelet's plugin watcher");
            loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => {
                        plugin.stop().await;
                        return;
                    }
                    () = tokio::time::sleep(SOCKET_CHECK) => {}
                }
                if plugin.sockets_lost() {
                    tracing::warn!(driver = %self.driver, "the DRA plugin's sockets were removed; serving them again so the kubelet registers the driver anew");
                    crate::telemetry::global().dra().registered(&self.driver, false);
                    plugin.stop().await;
                    break;
                }
            }
        }
    }
}
