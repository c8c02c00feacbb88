//! Commands that look at a config without serving: `devhost config check`
//! (validate only, start nothing) and `devhost list` (start each backend,
//! show what it sees, stop it; no kubelet needed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::handle::BackendHandle;
use crate::config::{HostConfig, LoadedBackends, load_backends};
use crate::dra::checkpoint::Checkpoint;
use crate::holders::{Holder, Holdings};
use crate::model::{AttributeValue, Device, REPLICA_SEPARATOR};

/// `devhost config check`: prints every problem; exit 0 only if none.
pub fn config_check(path: &Path) -> ExitCode {
    let config = match HostConfig::from_path(path) {
        Ok(config) => config,
        Err(error) => {
            println!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut loaded = load_backends(&config.backends_dir, config.call_timeout);
    let spec_dirs = config.cdi_spec_dirs();
    let view = crate::cdi::registry::Registry::new(spec_dirs.clone()).load_blocking();
    crate::cdi::check_static_kinds(&mut loaded, &view, &spec_dirs);
    let LoadedBackends { backends, errors, .. } = loaded;
    for error in &errors {
        println!("error: {error}");
    }
    for backend in &backends {
        println!("ok: {} ({})", backend.file.display(), describe(&backend.source));
        if matches!(backend.source, crate::config::BackendSource::Module { .. }) {
            for name in backend.resources.keys() {
                println!(
                    "unchecked: {}: [resources.{name:?}] (a module's resources are known only once it starts: `devhost list` starts it)",
                    backend.file.display()
                );
            }
        }
    }
    println!(
        "{} backend file(s) valid, {} refused, in {}",
        backends.len(),
        errors.len(),
        config.backends_dir.display()
    );
    // Where devhost will look for the kubelet, resolved (so a wrong root
    // shows here, not as a release that never runs).
    println!("plugin dir: {}", config.plugin_dir.display());
    println!("kubelet socket: {}", config.kubelet_socket.display());
    println!("kubelet root (DRA): {}", config.dra.kubelet_root.display());
    println!(
        "CDI: specs written to {}; names checked against {}",
        config.cdi_dir.display(),
        spec_dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    match &config.pod_resources.socket {
        Some(socket) => println!("pod resources socket: {}", socket.display()),
        None => println!("pod resources socket: off"),
    }
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn describe(source: &crate::config::BackendSource) -> String {
    match source {
        crate::config::BackendSource::Static(config) => {
            let names: Vec<&str> = config.resource_names().map(|(name, _)| name).collect();
            format!("static: {}", names.join(", "))
        }
        crate::config::BackendSource::Module { path, .. } => format!("module {}", path.display()),
    }
}

#[derive(Serialize)]
struct ListedBackend {
    backend: String,
    file: PathBuf,
    error: Option<String>,
    /// For a module: where it ran (`process` or `none`) and the SHA-256 of
    /// the code actually loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<&'static str>,
    /// The worker's sandbox, for a native module in a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    resources: Vec<ListedResource>,
}

#[derive(Serialize)]
struct ListedResource {
    name: String,
    pre_start_required: bool,
    preferred_allocation: bool,
    /// The DRA driver, for a resource served through DRA.
    #[serde(skip_serializing_if = "Option::is_none")]
    dra_driver: Option<String>,
    /// DRA partitionable devices: the resource's counter sets, name →
    /// counter → quantity.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    counter_sets: BTreeMap<String, BTreeMap<String, String>>,
    devices: Vec<ListedDevice>,
}

#[derive(Serialize)]
struct ListedDevice {
    id: String,
    health: String,
    numa_nodes: Vec<i64>,
    /// ABI 1.1: name → `{"<kind>": value}`, as a DRA ResourceSlice writes
    /// an attribute (`{"version": "550.54.15"}`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, serde_json::Value>,
    /// ABI 1.1: name → quantity.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    capacities: BTreeMap<String, String>,
    /// The containers holding it (`namespace/pod/container`), as the
    /// kubelet's PodResources API says; absent when it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    held_by: Option<Vec<String>>,
    /// DRA: the device's name in the ResourceSlices.
    #[serde(skip_serializing_if = "Option::is_none")]
    dra_name: Option<String>,
    /// DRA: the claims prepared with it (`namespace/name (uid)`), from
    /// the driver's checkpoint on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    claims: Option<Vec<String>>,
    /// `cdi = true`: other CDI spec files that define the device's CDI
    /// name too (devhost leaves the device out of its own spec for them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cdi_clashes: Vec<PathBuf>,
    /// DRA partitionable devices: what it consumes while allocated,
    /// counter set → counter → quantity.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    consumes_counters: BTreeMap<String, BTreeMap<String, String>>,
}

impl ListedDevice {
    /// One advertised device, with what its backend said about it (a
    /// shared device's replicas each show their device's attributes).
    fn new(
        advertised: &crate::proto::v1beta1::Device,
        published: &BTreeMap<&str, &Device>,
        holders: Option<&BTreeMap<String, Vec<Holder>>>,
    ) -> Self {
        let base = advertised.id.split_once(REPLICA_SEPARATOR).map_or(advertised.id.as_str(), |(base, _)| base);
        let device = published.get(advertised.id.as_str()).or_else(|| published.get(base));
        ListedDevice {
            id: advertised.id.clone(),
            health: advertised.health.clone(),
            numa_nodes: advertised.topology.iter().flat_map(|t| t.nodes.iter().map(|n| n.id)).collect(),
            attributes: device
                .map(|d| d.attributes.iter().map(|(name, value)| (name.clone(), attribute_json(value))).collect())
                .unwrap_or_default(),
            capacities: device.map(|d| d.capacities.clone()).unwrap_or_default(),
            held_by: holders
                .map(|holders| holders.get(&advertised.id).into_iter().flatten().map(ToString::to_string).collect()),
            dra_name: None,
            claims: None,
            cdi_clashes: Vec::new(),
            consumes_counters: BTreeMap::new(),
        }
    }

    /// For a resource with `cdi = true`: the spec files other than
    /// devhost's own that define the device's CDI name.
    fn with_cdi_clashes(mut self, resource: &str, view: &crate::cdi::registry::View, own: &Path) -> Self {
        let base = self.id.split_once(REPLICA_SEPARATOR).map_or(self.id.as_str(), |(base, _)| base);
        let name = crate::cdi::device_name(resource, base);
        self.cdi_clashes = view.others_defining(&name, own).map(|file| file.to_path_buf()).collect();
        self
    }

    /// The DRA view of the device: its DRA name and the claims `prepared`
    /// holds it for (none known: `None`).
    fn with_dra(mut self, prepared: Option<&Checkpoint>) -> Self {
        let name = crate::dra::names::device_name(&self.id);
        self.claims = prepared.map(|checkpoint| {
            checkpoint
                .claims
                .iter()
                .filter(|(_, claim)| claim.holds(&self.id))
                .map(|(uid, claim)| format!("{}/{} ({uid})", claim.namespace, claim.name))
                .collect()
        });
        self.dra_name = Some(name);
        self.held_by = None;
        self
    }
}

/// The claims `driver` has prepared on this node, from its checkpoint;
/// `None` (noted on stderr if it exists but cannot be read) otherwise.
fn prepared_claims(config: &HostConfig, driver: &str) -> Option<Checkpoint> {
    let path = config.dra.kubelet_root.join("plugins").join(driver).join("devhost-claims.json");
    if !path.exists() {
        return None;
    }
    Checkpoint::load(&path).map_err(|error| eprintln!("devhost: not showing prepared claims: {error}")).ok()
}

fn attribute_json(value: &AttributeValue) -> serde_json::Value {
    let inner = match value {
        AttributeValue::Int(n) => serde_json::Value::from(*n),
        AttributeValue::Bool(b) => serde_json::Value::from(*b),
        AttributeValue::String(text) | AttributeValue::Version(text) => serde_json::Value::from(text.as_str()),
    };
    serde_json::json!({ value.kind(): inner })
}

/// An attribute as the table shows it: `name=value`.
fn attribute_text(value: &serde_json::Value) -> String {
    match value.as_object().and_then(|kind| kind.values().next()) {
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => value.to_string(),
    }
}

/// `devhost list`: starts every backend, prints what it sees, stops it.
pub async fn list(path: &Path, json: bool) -> ExitCode {
    let config = match HostConfig::from_path(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("devhost: {error}");
            return ExitCode::from(2);
        }
    };
    let holdings = holdings(&config).await;
    let loaded = load_backends(&config.backends_dir, config.call_timeout);
    let mut listed: Vec<ListedBackend> = loaded
        .errors
        .iter()
        .map(|error| ListedBackend {
            backend: error.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            file: error.file.clone(),
            error: Some(error.to_string()),
            isolation: None,
            sandbox: None,
            sha256: None,
            resources: Vec::new(),
        })
        .collect();
    for backend in &loaded.backends {
        listed.push(list_backend(&config, backend, holdings.as_ref()).await);
    }
    listed.sort_by(|a, b| a.file.cmp(&b.file));
    let failed = listed.iter().any(|b| b.error.is_some());
    if json {
        match serde_json::to_string_pretty(&listed) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("devhost: cannot encode the list: {error}"),
        }
    } else {
        print_table(&listed);
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Who holds which device, if the kubelet's PodResources API answers. Off
/// a node (no socket) nothing is said; a socket that does not answer is
/// noted on stderr.
async fn holdings(config: &HostConfig) -> Option<Holdings> {
    let socket = config.pod_resources.socket.as_ref().filter(|socket| socket.exists())?;
    match crate::holders::client::holdings_once(socket, HOLDINGS_TIMEOUT).await {
        Ok(holdings) => Some(holdings),
        Err(error) => {
            eprintln!("devhost: not showing who holds each device: {error}");
            None
        }
    }
}

/// How long `devhost list` waits for the kubelet to say who holds what.
const HOLDINGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn list_backend(
    host: &HostConfig,
    config: &crate::config::BackendConfig,
    holdings: Option<&Holdings>,
) -> ListedBackend {
    let mut listed = ListedBackend {
        backend: config.name.clone(),
        file: config.file.clone(),
        error: None,
        isolation: None,
        sandbox: None,
        sha256: None,
        resources: Vec::new(),
    };
    let backend = match crate::loader::load(config).await {
        Ok(backend) => backend,
        Err(error) => {
            listed.error = Some(error);
            return listed;
        }
    };
    let cdi_view = crate::cdi::registry::Registry::new(host.cdi_spec_dirs()).load_blocking();
    let stop = CancellationToken::new();
    match BackendHandle::start(&config.name, backend, config.call_timeout, stop.clone()).await {
        Ok(handle) => {
            listed.sha256 = handle.running_sha256();
            listed.isolation = listed.sha256.is_some().then(|| handle.isolation());
            listed.sandbox = handle.sandbox();
            for (spec, state) in handle.resources() {
                let snapshot = state.snapshot();
                let published: BTreeMap<&str, &Device> =
                    snapshot.devices.iter().map(|device| (device.id.as_str(), device)).collect();
                let dra_driver = config.resources.get(&spec.name).and_then(|settings| settings.dra_driver.clone());
                let cdi = config.resources.get(&spec.name).is_some_and(|settings| settings.cdi);
                let own_spec = crate::cdi::spec_path(&host.cdi_dir, &spec.name);
                let prepared = dra_driver.as_deref().and_then(|driver| prepared_claims(host, driver));
                listed.resources.push(ListedResource {
                    name: spec.name.clone(),
                    pre_start_required: spec.pre_start_required,
                    preferred_allocation: spec.preferred_allocation,
                    devices: snapshot
                        .advertised()
                        .iter()
                        .map(|d| {
                            let device = ListedDevice::new(
                                d,
                                &published,
                                holdings.map(|h| h.get(&spec.name).unwrap_or(&NOBODY)),
                            );
                            let device =
                                if cdi { device.with_cdi_clashes(&spec.name, &cdi_view, &own_spec) } else { device };
                            let mut device =
                                if dra_driver.is_some() { device.with_dra(prepared.as_ref()) } else { device };
                            device.consumes_counters = published
                                .get(device.id.as_str())
                                .map(|published| published.consumes.as_slice())
                                .unwrap_or_default()
                                .iter()
                                .map(|consumed| (consumed.counter_set.clone(), consumed.counters.clone()))
                                .collect();
                            device
                        })
                        .collect(),
                    counter_sets: spec
                        .counter_sets
                        .iter()
                        .map(|set| (set.name.clone(), set.counters.clone()))
                        .collect(),
                    dra_driver,
                });
            }
            handle.shutdown().await;
        }
        Err(error) => listed.error = Some(error.to_string()),
    }
    stop.cancel();
    listed
}

/// `memory=20Gi,slices=4`.
fn counters_text(counters: &BTreeMap<String, String>) -> String {
    counters.iter().map(|(name, quantity)| format!("{name}={quantity}")).collect::<Vec<_>>().join(",")
}

/// The holders of a resource nobody holds anything of.
static NOBODY: BTreeMap<String, Vec<Holder>> = BTreeMap::new();

fn print_table(listed: &[ListedBackend]) {
    println!("{:<16} {:<32} {:<24} {:<10} NUMA", "BACKEND", "RESOURCE", "DEVICE", "HEALTH");
    for backend in listed {
        if let Some(error) = &backend.error {
            println!("{:<16} error: {error}", backend.backend);
            continue;
        }
        if let (Some(isolation), Some(sha256)) = (backend.isolation, &backend.sha256) {
            println!("{:<16} module sha256 {sha256} (isolation: {isolation})", backend.backend);
        }
        if let Some(sandbox) = &backend.sandbox {
            println!("{:<16} sandbox: {sandbox}", backend.backend);
        }
        for resource in &backend.resources {
            if let Some(driver) = &resource.dra_driver {
                println!("{:<16} {:<32} served through DRA as driver {driver}", backend.backend, resource.name);
            }
            for (set, counters) in &resource.counter_sets {
                println!(
                    "{:<16} {:<32} counter set {set}: {}",
                    backend.backend,
                    resource.name,
                    counters_text(counters)
                );
            }
            if resource.devices.is_empty() {
                println!("{:<16} {:<32} (no devices)", backend.backend, resource.name);
            }
            for device in &resource.devices {
                let numa = if device.numa_nodes.is_empty() {
                    "-".to_owned()
                } else {
                    device.numa_nodes.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
                };
                println!(
                    "{:<16} {:<32} {:<24} {:<10} {numa}",
                    backend.backend, resource.name, device.id, device.health
                );
                let info: Vec<String> = device
                    .attributes
                    .iter()
                    .map(|(name, value)| format!("{name}={}", attribute_text(value)))
                    .chain(device.capacities.iter().map(|(name, quantity)| format!("{name}={quantity}")))
                    .chain(device.held_by.iter().flatten().map(|holder| format!("held by {holder}")))
                    .chain(
                        device
                            .dra_name
                            .iter()
                            .filter(|name| **name != device.id)
                            .map(|name| format!("DRA name {name}")),
                    )
                    .chain(device.claims.iter().flatten().map(|claim| format!("prepared for claim {claim}")))
                    .chain(
                        device
                            .consumes_counters
                            .iter()
                            .map(|(set, counters)| format!("consumes {set}({})", counters_text(counters))),
                    )
                    .chain(device.cdi_clashes.iter().map(|file| {
                        format!(
                            "CDI name also defined by {} (left to it: answered without devhost's CDI name)",
                            file.display()
                        )
                    }))
                    .collect();
                if !info.is_empty() {
                    println!("{:<16} {:<32} {:<24} {}", "", "", "", info.join(" "));
                }
            }
        }
    }
}
