//! `devhost check`: the vendor conformance check. It runs one backend the
//! way a node would, but privately: its own temporary plugin directory, the
//! fake kubelet, the real daemon. Then it checks, as the kubelet sees it,
//! everything a backend must get right, and reports pass or fail per check
//! with its timing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backend::handle::{BackendHandle, CallError, StartError};
use crate::config::{BackendConfig, BackendSource, HostConfig, Overrides, parse_backend};
use crate::fake_kubelet::FakeKubelet;
use crate::model::ResourceSpec;
use crate::proto::{HEALTHY, MAX_MESSAGE_BYTES, UNHEALTHY, v1beta1};

/// How long the backend has to register and list its devices.
const REGISTER_WAIT: Duration = Duration::from_secs(15);

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The check's name, e.g. `allocate`.
    pub check: String,
    /// Passed or not.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
    /// How long the check took.
    pub elapsed: Duration,
}

/// Every outcome, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// The outcomes.
    pub outcomes: Vec<Outcome>,
    /// What the checks saw besides pass or fail: each health transition,
    /// with its time.
    pub notes: Vec<String>,
}

/// How long to watch each resource's health, unless told (`--watch`):
/// long enough for a backend that flips a device every second (the
/// examples) to show a change, short enough for a quick check.
pub const DEFAULT_WATCH: Duration = Duration::from_secs(3);

impl Report {
    fn record(&mut self, check: &str, started: Instant, result: Result<String, String>) -> bool {
        let passed = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.outcomes.push(Outcome { check: check.to_owned(), passed, detail, elapsed: started.elapsed() });
        passed
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        !self.outcomes.is_empty() && self.outcomes.iter().all(|o| o.passed)
    }
}

/// The backend file (or bare module) under test, as a config.
fn backend_config(target: &Path, call_timeout: Duration) -> Result<BackendConfig, String> {
    let is_toml = target.extension().is_some_and(|ext| ext == "toml");
    if is_toml {
        let source = std::fs::read_to_string(target).map_err(|e| format!("cannot read {}: {e}", target.display()))?;
        return parse_backend(target, &source, call_timeout).map_err(|e| e.to_string());
    }
    let path = std::path::absolute(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let name = path.file_stem().map_or_else(|| "backend".to_owned(), |s| s.to_string_lossy().into_owned());
    let text = format!("[backend]\nmodule = {:?}\n", path.display().to_string());
    parse_backend(&PathBuf::from(format!("{name}.toml")), &text, call_timeout).map_err(|e| e.to_string())
}

/// The backend file to place in the private `backends.d/`: the original
/// with its module path made absolute.
fn private_copy(config: &BackendConfig, target: &Path) -> Result<String, String> {
    let mut table: toml::Table = if target.extension().is_some_and(|ext| ext == "toml") {
        let text = std::fs::read_to_string(target).map_err(|e| e.to_string())?;
        toml::from_str(&text).map_err(|e| e.to_string())?
    } else {
        toml::Table::new()
    };
    if let BackendSource::Module { path, .. } = &config.source {
        let backend = table.entry("backend").or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(backend) = backend.as_table_mut() {
            backend.insert("module".into(), toml::Value::String(path.display().to_string()));
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// Runs every check against `target` (a backend TOML file or a module),
/// watching each resource's health for `watch`.
pub async fn run(target: &Path, call_timeout: Duration, watch: Duration) -> Report {
    let mut report = Report::default();
    let started = Instant::now();
    let config = match backend_config(target, call_timeout) {
        Ok(config) => config,
        Err(error) => {
            report.record("config", started, Err(error));
            return report;
        }
    };
    report.record("config", started, Ok(format!("{} parses", target.display())));

    let Some(specs) = check_init(&config, &mut report).await else { return report };
    if let Err(error) = check_with_kubelet(&config, target, &specs, watch, &mut report).await {
        report.record("sandbox", Instant::now(), Err(error));
    }
    report
}

/// Loads and initialises the backend directly, for a precise message if it
/// cannot, and returns the resources it declares.
async fn check_init(config: &BackendConfig, report: &mut Report) -> Option<Vec<ResourceSpec>> {
    let started = Instant::now();
    let backend = match crate::loader::load(config).await {
        Ok(backend) => backend,
        Err(error) => {
            report.record("load", started, Err(error));
            return None;
        }
    };
    report.record("load", started, Ok("module accepted".into()));
    let started = Instant::now();
    let stop = CancellationToken::new();
    let handle = match BackendHandle::start(&config.name, backend, config.call_timeout, stop.clone()).await {
        Ok(handle) => handle,
        // Declared names the kubelet would refuse are their own check.
        Err(error @ (StartError::ResourceName { .. } | StartError::Resources { .. })) => {
            report.record("init", started, Ok("returned".into()));
            report.record("resource names", started, Err(error.to_string()));
            return None;
        }
        Err(error) => {
            report.record("init", started, Err(error.to_string()));
            return None;
        }
    };
    let specs: Vec<ResourceSpec> = handle.resources().iter().map(|(spec, _)| spec.clone()).collect();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    report.record("init", started, Ok(format!("declared {}", names.join(", "))));
    // The same sandbox as under the daemon: what it lacks shows here.
    if let Some(sandbox) = handle.sandbox() {
        report.record("worker sandbox", started, Ok(sandbox));
    }
    report.record("resource names", started, Ok("valid extended resource names, no duplicates".into()));
    check_release(&handle, config.call_timeout, report).await;
    let started = Instant::now();
    let result = handle.try_shutdown().await.map(|()| format!("returned within {:?}", config.call_timeout));
    stop.cancel();
    report.record("shutdown", started, result.map_err(|error| error.to_string()));
    Some(specs)
}

/// Calls `release` (ABI 1.1) with every device of each resource that asks
/// for it, as devhost does once no container holds them.
async fn check_release(handle: &BackendHandle, deadline: Duration, report: &mut Report) {
    for (spec, state) in handle.resources() {
        if !spec.release_required {
            continue;
        }
        let ids: Vec<String> = state.snapshot().devices.iter().map(|device| device.id.clone()).collect();
        let started = Instant::now();
        let count = ids.len();
        let result = handle.release(&spec.name, ids).await;
        let result = result.map(|()| format!("{count} device(s) released within {deadline:?}"));
        report.record(&format!("{}: release", spec.name), started, result.map_err(|error| error.to_string()));
    }
}

async fn check_with_kubelet(
    config: &BackendConfig,
    target: &Path,
    specs: &[ResourceSpec],
    watch: Duration,
    report: &mut Report,
) -> Result<(), String> {
    let root = tempfile::Builder::new().prefix("devhost-check-").tempdir().map_err(|e| e.to_string())?;
    let backends = root.path().join("backends.d");
    std::fs::create_dir_all(&backends).map_err(|e| e.to_string())?;
    std::fs::write(backends.join(format!("{}.toml", config.name)), private_copy(config, target)?)
        .map_err(|e| e.to_string())?;
    let overrides = Overrides { plugin_dir: Some(root.path().join("plugins")), kubelet_socket: None };
    let mut host = HostConfig::defaults(root.path(), &overrides);
    host.metrics_address = None;
    host.cdi_dir = root.path().join("cdi");
    // The fake kubelet has no pods: nothing to learn from a real one.
    host.pod_resources.socket = None;
    host.call_timeout = config.call_timeout;

    let kubelet = FakeKubelet::start(&host.plugin_dir).await.map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn({
        let (host, shutdown) = (host.clone(), shutdown.clone());
        async move { crate::daemon::run(&host, shutdown).await }
    });
    for spec in specs {
        check_resource(&kubelet, &config.name, spec, (config.call_timeout, watch), report).await;
    }
    shutdown.cancel();
    let started = Instant::now();
    let stopped = daemon.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
    let left: Vec<String> = std::fs::read_dir(&host.plugin_dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<String> = left.into_iter().filter(|name| name != crate::proto::KUBELET_SOCKET_NAME).collect();
    report.record(
        "clean stop",
        started,
        stopped
            .and_then(|()| if left.is_empty() { Ok("no socket left".into()) } else { Err(format!("left {left:?}")) }),
    );
    kubelet.stop().await;
    Ok(())
}

async fn check_resource(
    kubelet: &FakeKubelet,
    backend: &str,
    spec: &ResourceSpec,
    (deadline, watch): (Duration, Duration),
    report: &mut Report,
) {
    let resource = &spec.name;
    let started = Instant::now();
    let registered = kubelet.wait_for_registrations(resource, 1, REGISTER_WAIT).await;
    // Judged from the wire (what the fake kubelet received) against what
    // the backend declared, not with the daemon's own code.
    let registered = registered
        .map_err(|e| e.to_string())
        .and_then(|request| judge_registration(spec, &request, &kubelet.options(resource).unwrap_or_default()));
    if !report.record(&format!("{resource}: registration"), started, registered) {
        return;
    }

    let started = Instant::now();
    let devices = kubelet.wait_for_devices(resource, REGISTER_WAIT, |_| true).await.map_err(|e| e.to_string());
    let devices = devices.and_then(|devices| check_device_list(&devices).map(|()| devices));
    let detail = devices.as_ref().map(|d| format!("{} devices, unique non-empty IDs, exact health strings", d.len()));
    report.record(&format!("{resource}: device IDs"), started, detail.map_err(Clone::clone));
    let Ok(devices) = devices else { return };

    // Health over time: every message the kubelet receives while watching
    // must be a valid full list; each change is noted with its time.
    let started = Instant::now();
    let lists = watch_lists(kubelet, resource, watch).await;
    let health = lists
        .iter()
        .enumerate()
        .try_for_each(|(n, (_, list))| check_device_list(list).map_err(|e| format!("update {}: {e}", n + 1)))
        .map(|()| match lists.len() {
            0 => format!(
                "no update in {watch:?}: health did not change (a backend that changes it less often: --watch SECONDS)"
            ),
            n => format!("{n} update(s) in {watch:?}, each a valid full list"),
        });
    let mut previous = devices.clone();
    for (at, list) in &lists {
        for change in transitions(&previous, list) {
            report.notes.push(format!("{resource}: +{:.2}s {change}", at.as_secs_f64()));
        }
        previous.clone_from(list);
    }
    report.record(&format!("{resource}: health updates"), started, health);

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    for device in devices.iter().filter(|d| d.health == HEALTHY) {
        let call = Instant::now();
        match kubelet.allocate(resource, &[device.id.as_str()]).await {
            Ok(answer) if answer.container_responses.len() == 1 && prost_len(&answer) < MAX_MESSAGE_BYTES => {}
            Ok(answer) => {
                failures.push(format!("{}: {} container responses", device.id, answer.container_responses.len()))
            }
            Err(error) => failures.push(format!("{}: {error}", device.id)),
        }
        slowest = slowest.max(call.elapsed());
    }
    let allocate = if failures.is_empty() {
        Ok(format!("every healthy device allocates; slowest {slowest:?} (deadline {deadline:?})"))
    } else {
        Err(failures.join("; "))
    };
    report.record(&format!("{resource}: allocate"), started, allocate);

    if spec.preferred_allocation {
        let started = Instant::now();
        let before = crate::telemetry::global().backend_errors(backend, "preferred_allocation", &CallError::KINDS);
        let result = check_preferred(kubelet, resource, &devices).await;
        let result = without_faults(backend, "preferred_allocation", before, result);
        report.record(&format!("{resource}: preferred allocation"), started, result);
    }
    if spec.pre_start_required {
        let started = Instant::now();
        let ids: Vec<&str> = devices.iter().take(1).map(|d| d.id.as_str()).collect();
        let result = kubelet.pre_start(resource, &ids).await.map(|_| "answered".to_owned()).map_err(|e| e.to_string());
        report.record(&format!("{resource}: pre-start"), started, result);
    }
}

/// A step whose answers looked right to the kubelet may still have broken
/// the contract: devhost answers for a backend whose answer it refused (a
/// preferred allocation falls back to the default policy) and marks its
/// devices Unhealthy. So a step passes only if the backend's `operation`
/// failed no call while it ran (counted by devhost's own metrics, which
/// this in-process check shares).
fn without_faults(
    backend: &str,
    operation: &str,
    before: u64,
    result: Result<String, String>,
) -> Result<String, String> {
    let detail = result?;
    let errors = crate::telemetry::global().backend_errors(backend, operation, &CallError::KINDS) - before;
    if errors == 0 {
        Ok(detail)
    } else {
        Err(format!(
            "the kubelet got answers, but devhost refused {errors} of the backend's {operation} answer(s) \
             (the reason is logged above) and marked its devices Unhealthy"
        ))
    }
}

/// A registration as the kubelet received it, against what the backend
/// declared: the API version the kubelet accepts, and the options the
/// kubelet was told.
fn judge_registration(
    spec: &ResourceSpec,
    request: &v1beta1::RegisterRequest,
    options: &v1beta1::DevicePluginOptions,
) -> Result<String, String> {
    let resource = &spec.name;
    let declared = (spec.pre_start_required, spec.preferred_allocation);
    let sent = (options.pre_start_required, options.get_preferred_allocation_available);
    if request.version != "v1beta1" {
        Err(format!("{resource}: Register carried version {:?}, the kubelet accepts \"v1beta1\"", request.version))
    } else if request.resource_name != *resource {
        Err(format!("{resource}: Register named {:?}", request.resource_name))
    } else if sent != declared {
        Err(format!(
            "{resource}: GetDevicePluginOptions answered pre_start_required = {}, get_preferred_allocation_available = {}; the backend declared {} and {}",
            sent.0, sent.1, declared.0, declared.1
        ))
    } else {
        Ok(format!("registered {resource} on {}", request.endpoint))
    }
}

/// Every device list the kubelet receives for `resource` during `watch`,
/// each with how long after the start it arrived (to within 5 ms).
async fn watch_lists(kubelet: &FakeKubelet, resource: &str, watch: Duration) -> Vec<(Duration, Vec<v1beta1::Device>)> {
    let started = Instant::now();
    let mut seen = kubelet.device_list_count(resource);
    let mut lists = Vec::new();
    while started.elapsed() < watch {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = kubelet.device_list_count(resource);
        if now != seen {
            let at = started.elapsed();
            lists.extend(kubelet.device_lists_since(resource, seen).into_iter().map(|list| (at, list)));
            seen = now;
        }
    }
    lists
}

/// What changed from one device list to the next, one line per device:
/// `id: Healthy → Unhealthy`, `id: added (Healthy)`, `id: removed`.
fn transitions(before: &[v1beta1::Device], after: &[v1beta1::Device]) -> Vec<String> {
    let mut changes = Vec::new();
    for device in after {
        match before.iter().find(|d| d.id == device.id) {
            Some(old) if old.health != device.health => {
                changes.push(format!("{}: {} → {}", device.id, old.health, device.health));
            }
            Some(_) => {}
            None => changes.push(format!("{}: added ({})", device.id, device.health)),
        }
    }
    for device in before.iter().filter(|d| !after.iter().any(|a| a.id == d.id)) {
        changes.push(format!("{}: removed", device.id));
    }
    changes
}

fn prost_len(answer: &v1beta1::AllocateResponse) -> usize {
    prost::Message::encoded_len(answer)
}

fn check_device_list(devices: &[v1beta1::Device]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for device in devices {
        if device.id.is_empty() {
            return Err("a device has an empty ID".into());
        }
        if !seen.insert(device.id.as_str()) {
            return Err(format!("device ID {:?} appears twice", device.id));
        }
        if device.health != HEALTHY && device.health != UNHEALTHY {
            return Err(format!("device {:?} has health {:?}", device.id, device.health));
        }
    }
    Ok(())
}

/// The preferred-allocation contract for sizes 1..=3: only available IDs,
/// must-include honoured, exact size.
async fn check_preferred(kubelet: &FakeKubelet, resource: &str, devices: &[v1beta1::Device]) -> Result<String, String> {
    let available: Vec<&str> = devices.iter().filter(|d| d.health == HEALTHY).map(|d| d.id.as_str()).collect();
    let mut asked = 0;
    for size in 1..=available.len().min(3) {
        let must: Vec<&str> = available.iter().rev().take(1).copied().collect();
        let answer = kubelet
            .preferred_allocation(resource, &available, &must, i32::try_from(size).unwrap_or(1))
            .await
            .map_err(|e| e.to_string())?;
        let [container] = answer.container_responses.as_slice() else {
            return Err(format!(
                "size {size}: {} container responses to one container request",
                answer.container_responses.len()
            ));
        };
        preferred_contract(&available, &must, size, &container.device_i_ds).map_err(|e| format!("size {size}: {e}"))?;
        asked += 1;
    }
    Ok(format!("{asked} request(s): only available IDs, must-include honoured, exact size"))
}

/// The kubelet's contract for a preferred allocation (API facts §2.10),
/// checked here on its own: only available IDs, none twice, every
/// must-include ID, and exactly `size` IDs.
fn preferred_contract(available: &[&str], must: &[&str], size: usize, chosen: &[String]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for id in chosen {
        if !available.contains(&id.as_str()) {
            return Err(format!("chose {id:?}, which is not available"));
        }
        if !seen.insert(id.as_str()) {
            return Err(format!("chose {id:?} twice"));
        }
    }
    if let Some(missing) = must.iter().find(|id| !seen.contains(**id)) {
        return Err(format!("left out {missing:?}, which must be included"));
    }
    if chosen.len() != size {
        return Err(format!("chose {} devices where {size} were asked for", chosen.len()));
    }
    Ok(())
}

/// Prints the report as a table.
pub fn print(report: &Report) {
    for outcome in &report.outcomes {
        let verdict = if outcome.passed { "PASS" } else { "FAIL" };
        println!("{verdict}  {:<44} {:>9.1?}  {}", outcome.check, outcome.elapsed, outcome.detail);
    }
    if !report.notes.is_empty() {
        println!("health changes seen:");
        for note in &report.notes {
            println!("  {note}");
        }
    }
    let failed = report.outcomes.iter().filter(|o| !o.passed).count();
    println!("{} checks, {failed} failed", report.outcomes.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_contract_refuses_each_kind_of_bad_answer() {
        let available = ["a", "b", "c"];
        let ids = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(preferred_contract(&available, &["c"], 2, &ids(&["c", "a"])), Ok(()));
        assert_eq!(
            preferred_contract(&available, &["c"], 2, &ids(&["c", "z"])),
            Err("chose \"z\", which is not available".into())
        );
        assert_eq!(preferred_contract(&available, &["c"], 2, &ids(&["c", "c"])), Err("chose \"c\" twice".into()));
        assert_eq!(
            preferred_contract(&available, &["c"], 2, &ids(&["a", "b"])),
            Err("left out \"c\", which must be included".into())
        );
        assert_eq!(
            preferred_contract(&available, &["c"], 2, &ids(&["c"])),
            Err("chose 1 devices where 2 were asked for".into())
        );
    }

    fn device(id: &str, health: &str) -> v1beta1::Device {
        v1beta1::Device { id: id.into(), health: health.into(), topology: None }
    }

    #[test]
    fn device_lists_breaking_the_contract_fail_the_check() {
        assert_eq!(check_device_list(&[device("a", HEALTHY), device("b", UNHEALTHY)]), Ok(()));
        assert_eq!(
            check_device_list(&[device("a", HEALTHY), device("", HEALTHY)]),
            Err("a device has an empty ID".into())
        );
        assert_eq!(
            check_device_list(&[device("a", HEALTHY), device("a", UNHEALTHY)]),
            Err("device ID \"a\" appears twice".into())
        );
        assert_eq!(check_device_list(&[device("a", "healthy")]), Err("device \"a\" has health \"healthy\"".into()));
    }

    #[test]
    fn transitions_name_each_change() {
        let before = [device("a", HEALTHY), device("b", HEALTHY)];
        let after = [device("a", UNHEALTHY), device("c", HEALTHY)];
        assert_eq!(transitions(&before, &after), ["a: Healthy → Unhealthy", "c: added (Healthy)", "b: removed"]);
        assert!(transitions(&before, &before).is_empty());
    }

    #[test]
    fn registrations_are_judged_from_what_the_kubelet_received() {
        let spec = ResourceSpec {
            name: "example.com/gpu".into(),
            pre_start_required: true,
            preferred_allocation: false,
            release_required: false,
            counter_sets: Vec::new(),
        };
        let request = v1beta1::RegisterRequest {
            version: "v1beta1".into(),
            endpoint: "devhost-gpu.sock".into(),
            resource_name: "example.com/gpu".into(),
            options: None,
        };
        let options =
            v1beta1::DevicePluginOptions { pre_start_required: true, get_preferred_allocation_available: false };
        assert_eq!(
            judge_registration(&spec, &request, &options),
            Ok("registered example.com/gpu on devhost-gpu.sock".into())
        );
        let old = v1beta1::RegisterRequest { version: "v1alpha".into(), ..request.clone() };
        assert!(judge_registration(&spec, &old, &options).is_err_and(|e| e.contains("version \"v1alpha\"")));
        let renamed = v1beta1::RegisterRequest { resource_name: "example.com/nic".into(), ..request.clone() };
        assert!(judge_registration(&spec, &renamed, &options).is_err_and(|e| e.contains("Register named")));
        let told = v1beta1::DevicePluginOptions { pre_start_required: false, ..options };
        assert!(judge_registration(&spec, &request, &told).is_err_and(|e| e.contains("pre_start_required = false")));
    }
}
