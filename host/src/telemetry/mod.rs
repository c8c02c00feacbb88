//! What devhost tells operators about itself: Prometheus metrics and the
//! readiness of its resources. One registry per process (one daemon per
//! process), so every part reports without being handed a handle.
//!
//! Device counts are read from the live device states when scraped, so
//! they are never stale; everything else is counted where it happens.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::device_state::ResourceState;

mod cdi;
mod dra;
use crate::model::Health;
pub use cdi::CdiMetrics;
pub use dra::DraMetrics;

pub mod http;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    resource: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    resource: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcResultLabels {
    resource: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCallLabels {
    backend: String,
    operation: String,
    kind: String,
}

/// A worker protection of a backend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    backend: String,
    protection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendInfoLabels {
    backend: String,
    isolation: String,
    sha256: String,
}

/// The process's metrics and resource readiness.
pub struct Telemetry {
    registry: Registry,
    devices: Family<DeviceLabels, Gauge>,
    rpcs: Family<RpcResultLabels, Counter>,
    rpc_seconds: Family<RpcLabels, Histogram>,
    backend_errors: Family<BackendCallLabels, Counter>,
    backend_restarts: Family<BackendLabel, Counter>,
    worker_oom_kills: Family<BackendLabel, Counter>,
    worker_sandbox: Family<SandboxLabels, Gauge>,
    /// Backends whose worker runs without part of its sandbox, and what
    /// it lacks (said in `/readyz`).
    unsandboxed: Mutex<std::collections::BTreeMap<String, String>>,
    backend_info: Family<BackendInfoLabels, Gauge>,
    backend_output_dropped: Family<BackendLabel, Counter>,
    backend_log_dropped: Family<BackendLabel, Counter>,
    /// The one `backend_info` series of each backend.
    backend_info_labels: Mutex<BTreeMap<String, BackendInfoLabels>>,
    registrations: Family<ResourceLabel, Counter>,
    kubelet_restarts: Family<ResourceLabel, Counter>,
    streams: Family<ResourceLabel, Gauge>,
    registered: Family<ResourceLabel, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    in_use: Family<ResourceLabel, Gauge>,
    releases: Family<ResourceLabel, Counter>,
    release_failures: Family<ResourceLabel, Counter>,
    release_seconds: Family<ResourceLabel, Histogram>,
    pod_resources_up: Gauge,
    dra: DraMetrics,
    cdi: CdiMetrics,
    open_descriptors: Gauge,
    descriptor_limit: Gauge,
    resources: Mutex<Resources>,
    /// Every backend file has been tried once (started or refused).
    started: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Resources {
    /// Resources the daemon serves now, with their device state.
    configured: BTreeMap<String, Weak<ResourceState>>,
    /// Those currently registered with the kubelet.
    registered: BTreeSet<String>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// One resource's RPC series for one method ([`Telemetry::rpc_series`]).
#[derive(Clone)]
pub struct RpcSeries {
    telemetry: &'static Telemetry,
    resource: String,
    method: &'static str,
    ok: Counter,
    seconds: Histogram,
}

impl std::fmt::Debug for RpcSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcSeries").field("resource", &self.resource).field("method", &self.method).finish()
    }
}

impl RpcSeries {
    /// Counts one call answered with `code` after `elapsed`, as
    /// [`Telemetry::rpc`] does.
    pub fn record(&self, code: tonic::Code, elapsed: Duration) {
        if code == tonic::Code::Ok {
            self.ok.inc();
            self.seconds.observe(elapsed.as_secs_f64());
        } else {
            self.telemetry.rpc(&self.resource, self.method, code, elapsed);
        }
    }
}

/// The process-wide telemetry.
pub fn global() -> &'static Telemetry {
    static GLOBAL: OnceLock<Telemetry> = OnceLock::new();
    GLOBAL.get_or_init(Telemetry::new)
}

fn release_histogram() -> Histogram {
    // 1 ms to ~65 s: a scrub can take a while.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn rpc_histogram() -> Histogram {
    // 50 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Telemetry {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("devhost");
        let devices = Family::<DeviceLabels, Gauge>::default();
        registry.register("devices", "Devices per resource and health, as the kubelet is told", devices.clone());
        let rpcs = Family::<RpcResultLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "DevicePlugin RPCs answered, by resource, method and status code",
            rpcs.clone(),
        );
        let rpc_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "rpc_duration",
            "Time to answer a DevicePlugin RPC, by resource and method",
            Unit::Seconds,
            rpc_seconds.clone(),
        );
        let backend_errors = Family::<BackendCallLabels, Counter>::default();
        registry.register(
            "backend_call_errors",
            "Failed calls into backends, by kind: failed, panicked, timed_out, invalid, crashed, unavailable",
            backend_errors.clone(),
        );
        let backend_restarts = Family::<BackendLabel, Counter>::default();
        registry.register("backend_restarts", "Backends re-initialised after a fault", backend_restarts.clone());
        let worker_oom_kills = Family::<BackendLabel, Counter>::default();
        registry.register(
            "worker_oom_kills",
            "Native backends' workers killed by the kernel at their cgroup's memory limit (memory_mb)",
            worker_oom_kills.clone(),
        );
        let worker_sandbox = Family::<SandboxLabels, Gauge>::default();
        registry.register(
            "worker_sandbox",
            "1 if the current worker of a native backend has this protection (pid_namespace, cgroup, lockdown: no_new_privs, capabilities, seccomp), 0 if the kernel refused it and the backend's file allowed running without",
            worker_sandbox.clone(),
        );
        let backend_info = Family::<BackendInfoLabels, Gauge>::default();
        registry.register(
            "backend_info",
            "1 per running module backend: where it runs and the SHA-256 of the code actually loaded",
            backend_info.clone(),
        );
        let backend_output_dropped = Family::<BackendLabel, Counter>::default();
        registry.register(
            "backend_output_dropped",
            "Lines a worker's module wrote to its stdout or stderr that were over the rate limit and not logged",
            backend_output_dropped.clone(),
        );
        let backend_log_dropped = Family::<BackendLabel, Counter>::default();
        registry.register(
            "backend_log_dropped",
            "Lines a module logged through the host callback that were over the rate limit and not logged",
            backend_log_dropped.clone(),
        );
        let registrations = Family::<ResourceLabel, Counter>::default();
        registry.register("registrations", "Successful Register calls to the kubelet", registrations.clone());
        let kubelet_restarts = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "kubelet_restarts_seen",
            "Kubelet restarts (or lost sockets) a resource recovered from",
            kubelet_restarts.clone(),
        );
        let streams = Family::<ResourceLabel, Gauge>::default();
        registry.register("list_and_watch_streams", "Open ListAndWatch streams", streams.clone());
        let registered = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "resource_registered",
            "1 while the resource is registered with the kubelet",
            registered.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections not served, by listener (resource, metrics, probes) and reason: descriptors (out of descriptors or memory; accepting backs off) or cap (the listener's connection cap)",
            refused.clone(),
        );
        let in_use = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "devices_in_use",
            "Devices of the resource some container holds, as the kubelet's PodResources API says (absent while it cannot be read)",
            in_use.clone(),
        );
        let releases = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "device_releases",
            "Devices released (ABI 1.1 release) for their next tenant",
            releases.clone(),
        );
        let release_failures = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "device_release_failures",
            "Devices whose release failed (each stays Unhealthy until a later release succeeds)",
            release_failures.clone(),
        );
        let release_seconds =
            Family::<ResourceLabel, Histogram>::new_with_constructor(release_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "device_release_duration",
            "Time one release call took, by resource",
            Unit::Seconds,
            release_seconds.clone(),
        );
        let pod_resources_up = Gauge::default();
        registry.register(
            "pod_resources_up",
            "1 while the kubelet's PodResources API answers (who holds which device), 0 while it does not",
            pod_resources_up.clone(),
        );
        let dra = DraMetrics::register(&mut registry);
        let cdi = CdiMetrics::register(&mut registry);
        let open_descriptors = Gauge::default();
        registry.register("open_descriptors", "File descriptors devhost has open", open_descriptors.clone());
        let descriptor_limit = Gauge::default();
        registry.register(
            "descriptor_limit",
            "devhost's soft limit on open file descriptors",
            descriptor_limit.clone(),
        );
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build.get_or_create(&vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        registry.register("build_info", "devhost's version", build);
        Telemetry {
            registry,
            devices,
            rpcs,
            rpc_seconds,
            backend_errors,
            backend_restarts,
            worker_oom_kills,
            worker_sandbox,
            unsandboxed: Mutex::default(),
            backend_info,
            backend_output_dropped,
            backend_log_dropped,
            backend_info_labels: Mutex::default(),
            registrations,
            kubelet_restarts,
            streams,
            registered,
            refused,
            in_use,
            releases,
            release_failures,
            release_seconds,
            pod_resources_up,
            dra,
            cdi,
            open_descriptors,
            descriptor_limit,
            resources: Mutex::new(Resources::default()),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn resources(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.resources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counter of accepts on listeners of kind `listener` (`resource`,
    /// `metrics`) that failed for lack of descriptors (or memory), for the
    /// accept loops to count in.
    pub fn accept_refused(&self, listener: &str) -> Counter {
        self.refused
            .get_or_create(&RefusedLabels { listener: listener.to_owned(), reason: "descriptors".to_owned() })
            .clone()
    }

    /// A connection to the `listener` server (`metrics`, `probes`) closed
    /// at once: at its cap.
    pub fn connection_capped(&self, listener: &str) {
        self.refuse(listener, "cap");
    }

    fn refuse(&self, listener: &str, reason: &str) {
        self.refused.get_or_create(&RefusedLabels { listener: listener.to_owned(), reason: reason.to_owned() }).inc();
    }

    /// A resource now served, with its device state.
    pub fn add_resource(&self, state: &Arc<ResourceState>) {
        self.resources().configured.insert(state.name().to_owned(), Arc::downgrade(state));
    }

    /// A resource no longer served (its backend stopped or was replaced).
    pub fn forget_resource(&self, resource: &str) {
        let mut resources = self.resources();
        resources.configured.remove(resource);
        resources.registered.remove(resource);
        let label = ResourceLabel { resource: resource.to_owned() };
        self.registered.remove(&label);
        self.in_use.remove(&label);
        for health in [Health::Healthy, Health::Unhealthy] {
            self.devices.remove(&DeviceLabels { resource: resource.to_owned(), health: health.as_str().to_owned() });
        }
    }

    /// How many devices of `resource` containers hold; `None` while the
    /// PodResources API cannot tell (the series is removed, not left stale).
    pub fn devices_in_use(&self, resource: &str, count: Option<usize>) {
        let label = ResourceLabel { resource: resource.to_owned() };
        match count {
            Some(count) => {
                self.in_use.get_or_create(&label).set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            None => {
                self.in_use.remove(&label);
            }
        }
    }

    /// One `release` call for `devices` devices of `resource` ended.
    pub fn released(&self, resource: &str, devices: usize, ok: bool, elapsed: Duration) {
        let label = ResourceLabel { resource: resource.to_owned() };
        let counter = if ok { &self.releases } else { &self.release_failures };
        counter.get_or_create(&label).inc_by(u64::try_from(devices).unwrap_or(u64::MAX));
        self.release_seconds.get_or_create(&label).observe(elapsed.as_secs_f64());
    }

    /// The metrics of CDI names.
    pub fn cdi(&self) -> &CdiMetrics {
        &self.cdi
    }

    /// The DRA metrics.
    pub fn dra(&self) -> &DraMetrics {
        &self.dra
    }

    /// Whether the kubelet's PodResources API answered the last time.
    pub fn pod_resources_up(&self, up: bool) {
        self.pod_resources_up.set(i64::from(up));
    }

    /// The resource registered with the kubelet.
    pub fn registered(&self, resource: &str) {
        self.resources().registered.insert(resource.to_owned());
        let label = ResourceLabel { resource: resource.to_owned() };
        self.registrations.get_or_create(&label).inc();
        self.registered.get_or_create(&label).set(1);
    }

    /// The resource lost its registration (kubelet restart, socket gone).
    pub fn unregistered(&self, resource: &str, kubelet_restart: bool) {
        let was_registered = self.resources().registered.remove(resource);
        let label = ResourceLabel { resource: resource.to_owned() };
        self.registered.get_or_create(&label).set(0);
        if kubelet_restart && was_registered {
            self.kubelet_restarts.get_or_create(&label).inc();
        }
    }

    /// One answered RPC.
    pub fn rpc(&self, resource: &str, method: &str, code: tonic::Code, elapsed: Duration) {
        let code = format!("{code:?}");
        let labels = RpcResultLabels { resource: resource.to_owned(), method: method.to_owned(), code };
        self.rpcs.get_or_create(&labels).inc();
        let labels = RpcLabels { resource: resource.to_owned(), method: method.to_owned() };
        self.rpc_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The series of `method` of `resource`, looked up once: counting a
    /// call through them takes no label strings, hashing or lookups (the
    /// per-call work of [`rpc`](Self::rpc)). Series are never removed, so
    /// the handles stay those the registry exports.
    pub fn rpc_series(&'static self, resource: &str, method: &'static str) -> RpcSeries {
        let ok = RpcResultLabels { resource: resource.to_owned(), method: method.to_owned(), code: "Ok".into() };
        let labels = RpcLabels { resource: resource.to_owned(), method: method.to_owned() };
        RpcSeries {
            telemetry: self,
            resource: resource.to_owned(),
            method,
            ok: self.rpcs.get_or_create(&ok).clone(),
            seconds: self.rpc_seconds.get_or_create(&labels).clone(),
        }
    }

    /// A ListAndWatch stream opened; the guard counts it closed when dropped.
    pub fn stream_opened(&'static self, resource: &str) -> StreamGuard {
        let label = ResourceLabel { resource: resource.to_owned() };
        self.streams.get_or_create(&label).inc();
        StreamGuard { telemetry: self, label }
    }

    /// A failed call into a backend.
    pub fn backend_error(&self, backend: &str, operation: &str, kind: &str) {
        let labels =
            BackendCallLabels { backend: backend.to_owned(), operation: operation.to_owned(), kind: kind.to_owned() };
        self.backend_errors.get_or_create(&labels).inc();
    }

    /// Failed calls into `backend` for `operation` so far, of the given
    /// `kinds` (`devhost check` uses it to see a fault that devhost hid from
    /// the kubelet by answering for the backend).
    pub fn backend_errors(&self, backend: &str, operation: &str, kinds: &[&str]) -> u64 {
        kinds
            .iter()
            .filter_map(|kind| {
                let labels = BackendCallLabels {
                    backend: backend.to_owned(),
                    operation: operation.to_owned(),
                    kind: (*kind).to_owned(),
                };
                self.backend_errors.get(&labels).map(|counter| counter.get())
            })
            .sum()
    }

    /// A backend re-initialised after a fault.
    pub fn backend_restarted(&self, backend: &str) {
        self.backend_restarts.get_or_create(&BackendLabel { backend: backend.to_owned() }).inc();
    }

    /// The counter of `backend`'s module output lines dropped by the rate
    /// limit, for its output readers to count in.
    pub fn backend_output_dropped(&self, backend: &str) -> Counter {
        self.backend_output_dropped.get_or_create(&BackendLabel { backend: backend.to_owned() }).clone()
    }

    /// The counter of `backend`'s log lines (the host callback) dropped by
    /// the rate limit, for its limiter to count in.
    pub fn backend_log_dropped(&self, backend: &str) -> Counter {
        self.backend_log_dropped.get_or_create(&BackendLabel { backend: backend.to_owned() }).clone()
    }

    /// A worker of `backend` was killed by the kernel at its cgroup's
    /// memory limit.
    pub fn worker_oom_killed(&self, backend: &str) {
        self.worker_oom_kills.get_or_create(&BackendLabel { backend: backend.to_owned() }).inc();
    }

    /// The protections the current worker of `backend` has (`true`) or
    /// lacks; `missing` says what it lacks, for `/readyz`.
    pub fn worker_sandbox(&self, backend: &str, protections: &[(&str, bool)], missing: &[String]) {
        for (protection, applied) in protections {
            let labels = SandboxLabels { backend: backend.to_owned(), protection: (*protection).to_owned() };
            self.worker_sandbox.get_or_create(&labels).set(i64::from(*applied));
        }
        let mut unsandboxed = self.unsandboxed.lock().unwrap_or_else(PoisonError::into_inner);
        if missing.is_empty() {
            unsandboxed.remove(backend);
        } else {
            unsandboxed.insert(backend.to_owned(), missing.join("; "));
        }
    }

    /// Warnings `/readyz` adds to its text while ready: workers running
    /// without part of their sandbox.
    pub fn readiness_warnings(&self) -> Vec<String> {
        let unsandboxed = self.unsandboxed.lock().unwrap_or_else(PoisonError::into_inner);
        unsandboxed
            .iter()
            .map(|(backend, missing)| {
                format!("warning: backend {backend}'s worker runs without part of its sandbox: {missing}")
            })
            .collect()
    }

    /// The module code a backend runs now (`isolation` is `process` or
    /// `none`); replaces what was said of it before.
    pub fn backend_loaded(&self, backend: &str, isolation: &str, sha256: &str) {
        let labels = BackendInfoLabels {
            backend: backend.to_owned(),
            isolation: isolation.to_owned(),
            sha256: sha256.to_owned(),
        };
        let mut current = self.backend_info_labels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = current.insert(backend.to_owned(), labels.clone()) {
            self.backend_info.remove(&previous);
        }
        self.backend_info.get_or_create(&labels).set(1);
    }

    /// A backend stopped: its `backend_info` series goes.
    pub fn backend_stopped(&self, backend: &str) {
        let mut current = self.backend_info_labels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = current.remove(backend) {
            self.backend_info.remove(&previous);
        }
    }

    /// Says that every backend file has been tried: from now on readiness
    /// depends on registration alone.
    pub fn mark_started(&self) {
        self.started.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Ready once every backend file has been tried and every resource
    /// served is registered with the kubelet (through the plugin watcher
    /// for DRA drivers); otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("starting: backends are still loading".to_owned());
        }
        let resources = self.resources();
        let mut missing: Vec<String> =
            resources.configured.keys().filter(|name| !resources.registered.contains(*name)).cloned().collect();
        missing.extend(self.dra.unregistered());
        if missing.is_empty() { Ok(()) } else { Err(format!("not registered: {}", missing.join(", "))) }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        self.refresh_devices();
        self.refresh_descriptors();
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode metrics");
        }
        text
    }

    fn refresh_descriptors(&self) {
        let (open, limit) = crate::sockets::accept::descriptor_use();
        for (gauge, value) in [(&self.open_descriptors, open), (&self.descriptor_limit, limit)] {
            if let Some(value) = value {
                gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
    }

    fn refresh_devices(&self) {
        let states: Vec<Arc<ResourceState>> = self.resources().configured.values().filter_map(Weak::upgrade).collect();
        for state in states {
            let snapshot = state.snapshot();
            let (total, healthy) = snapshot.advertised_counts();
            for (health, count) in [(Health::Healthy, healthy), (Health::Unhealthy, total - healthy)] {
                let labels = DeviceLabels { resource: state.name().to_owned(), health: health.as_str().to_owned() };
                self.devices.get_or_create(&labels).set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Counts one open ListAndWatch stream until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    telemetry: &'static Telemetry,
    label: ResourceLabel,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.telemetry.streams.get_or_create(&self.label).dec();
    }
}
