//! `deploy/` against the code: the image's installed paths, the DaemonSet's
//! mounts, probes and ConfigMaps, and the Helm chart's values and templates
//! must agree with devhost's defaults and be accepted by devhost's own
//! config parser; what DRA needs (RBAC, NODE_NAME, the kubelet's plugin
//! directories) is there; the DRA examples in examples/dra/ are valid and
//! name devhost's drivers.
//!
//! The manifests are checked as the cluster gets them: the chart rendered by
//! Helm itself (Helm 4 as a library, `helm-python-sdk`, offline, with its
//! values schema), the kustomization by `kubectl kustomize`, and every
//! object validated against the strict OpenAPI schemas of Kubernetes 1.29
//! to 1.37 (`kubernetes-validate`). scripts/setup installs both Python
//! packages (scripts/deploy-tools.txt); `scripts/deploy-check` drives them.
//!
//! Limits, said plainly: there is no container engine here. The Dockerfile
//! is read as text (its ENTRYPOINT and `install` destinations), not built.
//! kubectl is not installed by scripts/setup (no registry here carries it):
//! where it is missing, the kustomize renders are skipped and say so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use devhost::config::{BackendSource, HostConfig, Overrides, load_backends};
use serde::Deserialize;
use serde_norway::Value;

use crate::harness::{Missing, skip};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
}

/// Every document of a (multi-document) YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|error| panic!("{path}: invalid YAML: {error}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `value[a][b]...`, panicking with the path when a step is missing.
fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter()
        .fold(value, |value, key| value.get(*key).unwrap_or_else(|| panic!("missing {} in {value:?}", path.join("."))))
}

fn text(value: &Value, path: &[&str]) -> String {
    at(value, path).as_str().unwrap_or_else(|| panic!("{} is not a string", path.join("."))).to_owned()
}

fn list<'a>(value: &'a Value, path: &[&str]) -> &'a Vec<Value> {
    at(value, path).as_sequence().unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

/// The entry of a list of named objects (volumes, mounts, ports).
fn named<'a>(items: &'a [Value], key: &str, wanted: &str) -> &'a Value {
    items
        .iter()
        .find(|item| item.get(key).and_then(Value::as_str) == Some(wanted))
        .unwrap_or_else(|| panic!("no entry with {key} = {wanted:?} in {items:?}"))
}

fn default_metrics_port() -> u16 {
    HostConfig::defaults(Path::new("/etc/devhost"), &Overrides::default())
        .metrics_address
        .expect("metrics are on by default")
        .port()
}

/// The exec-form ENTRYPOINT of deploy/Dockerfile.
fn entrypoint() -> Vec<String> {
    let dockerfile = read("deploy/Dockerfile");
    let line = dockerfile.lines().find(|line| line.starts_with("ENTRYPOINT ")).expect("an ENTRYPOINT");
    serde_json::from_str(line.trim_start_matches("ENTRYPOINT ")).expect("ENTRYPOINT in exec form (a JSON array)")
}

/// The `--config` file the image runs with.
fn image_config_path() -> PathBuf {
    let entry = entrypoint();
    let flag = entry.iter().position(|arg| arg == "--config").expect("ENTRYPOINT passes --config");
    PathBuf::from(&entry[flag + 1])
}

/// The paths the Dockerfile installs into the image (`install ... /out/<path>`).
fn image_files() -> Vec<String> {
    read("deploy/Dockerfile")
        .split_whitespace()
        .filter_map(|word| word.trim_end_matches(';').strip_prefix("/out/").map(|path| format!("/{path}")))
        .collect()
}

/// Writes `files` (name -> TOML) into a fresh backends.d and loads it the
/// way the daemon does; panics with every error devhost reports, except
/// that a module file is missing: the modules live in the image, not on
/// this machine (`the_image_installs_what_the_shipped_backend_files_name`
/// checks the image installs each one).
fn check_backends(files: &BTreeMap<String, String>) -> Vec<devhost::config::BackendConfig> {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, source) in files {
        std::fs::write(dir.path().join(name), source).expect("write backend file");
    }
    let loaded = load_backends(dir.path(), std::time::Duration::from_secs(10));
    let errors: Vec<String> = loaded
        .errors
        .iter()
        .map(ToString::to_string)
        .filter(|error| !(error.contains(": module /usr/lib/devhost/") && error.ends_with(" does not exist")))
        .collect();
    assert!(errors.is_empty(), "devhost refuses the backend files: {errors:#?}");
    files
        .iter()
        .map(|(name, source)| {
            devhost::config::parse_backend(&dir.path().join(name), source, std::time::Duration::from_secs(10))
                .unwrap_or_else(|error| panic!("{error}"))
        })
        .collect()
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .expect("a mapping")
        .iter()
        .filter_map(|(key, value)| Some((key.as_str()?.to_owned(), value.as_str()?.to_owned())))
        .collect()
}

/// The Python of the virtual environment scripts/setup makes for the
/// deploy tools (scripts/deploy-tools.txt); `None` (a setup skip) without it.
pub(crate) fn deploy_python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo("target"), PathBuf::from);
    let python = target.join("deploy-tools/venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    skip(
        Missing::Setup,
        &format!("{} is missing: scripts/setup installs the deploy tools (scripts/deploy-tools.txt)", python.display()),
    );
    None
}

/// Every document of a multi-document YAML text.
fn documents(what: &str, text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|error| panic!("{what}: invalid YAML: {error}\n{text}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// A set of rendered manifests: the YAML text as `kubectl apply` would get
/// it, and its documents.
struct Rendered {
    what: String,
    text: String,
    docs: Vec<Value>,
    /// Helm's NOTES.txt, printed after an install.
    notes: String,
}

impl Rendered {
    fn new(what: &str, text: String, notes: String) -> Rendered {
        let docs = documents(what, &text);
        Rendered { what: what.to_owned(), text, docs, notes }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|doc| doc.get("kind").and_then(Value::as_str) == Some(kind)).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{}: {} {kind} objects, want one", self.what, found.len());
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|doc| doc.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.what))
    }
}

/// `kubectl kustomize DIR`: the manifests exactly as `kubectl apply -k DIR`
/// sends them. `None` (a machine skip) where kubectl is not installed.
fn kustomize(dir: &Path) -> Option<Rendered> {
    let output = match std::process::Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            skip(Missing::Machine, "kubectl is not installed: the kustomization is not rendered");
            return None;
        }
        Err(error) => panic!("cannot run kubectl: {error}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl kustomize {} failed: {stderr}", dir.display());
    let text = String::from_utf8(output.stdout).expect("UTF-8 manifests");
    Some(Rendered::new(&format!("kustomize {}", dir.display()), text, String::new()))
}

/// The chart rendered by Helm (`helm template devhost deploy/helm/devhost
/// -n devhost -f FILE...`), or Helm's error message.
fn helm(python: &Path, values: &[&Path]) -> Result<Rendered, String> {
    let manifests = helm_manifests(python, values)?;
    let notes = manifests.get("devhost/templates/NOTES.txt").cloned().unwrap_or_default();
    let text = manifests
        .iter()
        .filter(|(name, _)| name.ends_with(".yaml"))
        .map(|(_, text)| format!("---\n{text}\n"))
        .collect::<String>();
    let label = values.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(" ");
    Ok(Rendered::new(&format!("helm -f {label}"), text, notes))
}

/// Each file the chart renders with `values`, by its template's path
/// (`devhost/templates/…`), or Helm's error message.
pub(crate) fn helm_manifests(python: &Path, values: &[&Path]) -> Result<BTreeMap<String, String>, String> {
    let output = std::process::Command::new(python)
        .arg(repo("scripts/deploy-check"))
        .args(["render-helm", repo("deploy/helm/devhost").to_str().expect("UTF-8"), "devhost", "devhost"])
        .args(values)
        .output()
        .expect("run scripts/deploy-check");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    match output.status.code() {
        Some(0) => {}
        Some(2) => return Err(stderr),
        _ => panic!("scripts/deploy-check render-helm failed: {stderr}"),
    }
    #[derive(Deserialize)]
    struct Output {
        manifests: BTreeMap<String, String>,
    }
    let Output { manifests } = serde_json::from_slice(&output.stdout).expect("deploy-check prints JSON");
    Ok(manifests)
}

/// A values file with `text` in a temporary directory.
fn values_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write values");
    path
}

/// The one value an install must set.
const IMAGE_VALUES: &str = "image:\n  repository: registry.example.com/devhost\n";

/// The Python to run Helm with, a temporary directory for values files,
/// and in it the file that sets the required image.
fn chart_inputs() -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    let python = deploy_python()?;
    let dir = tempfile::tempdir().expect("temp dir");
    let image = values_file(&dir, "image.yaml", IMAGE_VALUES);
    Some((python, dir, image))
}

/// The chart with its defaults and the required image.
fn helm_defaults(python: &Path, dir: &tempfile::TempDir) -> Rendered {
    helm(python, &[&values_file(dir, "image.yaml", IMAGE_VALUES)]).unwrap_or_else(|error| panic!("{error}"))
}

/// The chart with every value set (deploy/helm/devhost/ci/full-values.yaml).
fn helm_full(python: &Path) -> Rendered {
    helm(python, &[&repo("deploy/helm/devhost/ci/full-values.yaml")]).unwrap_or_else(|error| panic!("{error}"))
}

/// `kubernetes-validate --strict` for every minor version 1.29..1.37; the
/// kinds it has no schema for (custom resources), or every failure.
fn validate(python: &Path, rendered: &Rendered) -> Result<Vec<String>, String> {
    validate_versions(python, rendered, "1.29", "1.37")
}

/// `kubernetes-validate --strict` for every minor version `from..=to`.
fn validate_versions(python: &Path, rendered: &Rendered, from: &str, to: &str) -> Result<Vec<String>, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, &rendered.text).expect("write manifests");
    let output = std::process::Command::new(python)
        .arg(repo("scripts/deploy-check"))
        .args(["validate", from, to])
        .arg(&file)
        .output()
        .expect("run scripts/deploy-check");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => Ok(stdout.lines().filter_map(|line| line.strip_prefix("no-schema ")).map(str::to_owned).collect()),
        Some(1) => Err(stdout),
        _ => panic!("scripts/deploy-check validate failed: {stdout}{stderr}"),
    }
}

/// `value` as a map of strings (labels, annotations, a ConfigMap's data).
fn labels(value: Option<&Value>) -> BTreeMap<String, String> {
    value.map(string_map).unwrap_or_default()
}

/// Every `selector` label is among `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// What a render must agree on with devhost's code, whatever the values:
/// the config devhost reads (through its own parser), the mounts it needs,
/// the probes and metrics port, the Service and ServiceMonitor that point
/// at the pods. Returns the parsed host settings for further checks.
fn check_against_code(rendered: &Rendered) -> HostConfig {
    let what = &rendered.what;
    let daemonset = rendered.one("DaemonSet");
    let namespace = text(daemonset, &["metadata", "namespace"]);
    for doc in &rendered.docs {
        let kind = text(doc, &["kind"]);
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            assert!(at(doc, &["metadata"]).get("namespace").is_none(), "{what}: {kind} is cluster-scoped");
        } else {
            assert_eq!(text(doc, &["metadata", "namespace"]), namespace, "{what}: {kind} in another namespace");
        }
    }
    let pod = at(daemonset, &["spec", "template", "spec"]);
    let pod_labels = labels(at(daemonset, &["spec", "template", "metadata"]).get("labels"));
    let selector = labels(Some(at(daemonset, &["spec", "selector", "matchLabels"])));
    assert!(selects(&selector, &pod_labels), "{what}: the DaemonSet's selector does not select its pods");
    let account = text(pod, &["serviceAccountName"]);
    rendered.named("ServiceAccount", &account);
    // The account's token is in the pod exactly when the account has rights
    // to use it for (DRA's ClusterRole, bound to it).
    assert_eq!(
        token_mounted(rendered),
        !granted(rendered, &namespace, &account).is_empty(),
        "{what}: the token is mounted if and only if the account is bound to rules"
    );

    let container = &list(pod, &["containers"])[0];
    assert!(
        container.get("command").is_none() && container.get("args").is_none(),
        "{what}: the DaemonSet runs the image's ENTRYPOINT"
    );
    assert!(!text(container, &["image"]).is_empty(), "{what}: no image");
    let volumes = list(pod, &["volumes"]);
    let mounts = list(container, &["volumeMounts"]);
    let mount_at = |path: &str| named(mounts, "mountPath", path);
    let volume_of = |mount: &Value| named(volumes, "name", &text(mount, &["name"])).clone();

    // devhost.toml where the ENTRYPOINT reads it, from a ConfigMap that
    // devhost's own parser accepts and that agrees with the mounts.
    let config_path = image_config_path();
    let config_mount = mount_at(config_path.to_str().expect("UTF-8"));
    let config_map = rendered.named("ConfigMap", &text(&volume_of(config_mount), &["configMap", "name"]));
    let key = text(config_mount, &["subPath"]);
    let source = text(config_map, &["data", &key]);
    let host = HostConfig::parse(&config_path, &source, &Overrides::default())
        .unwrap_or_else(|error| panic!("{what}: devhost refuses the ConfigMap's {key}: {error}"));
    // One devhost.toml for every node: a node name in it would be every
    // node's (DRA takes it from NODE_NAME, set per pod).
    let raw: toml::Table = source.parse().expect("TOML");
    let dra = raw.get("dra").and_then(toml::Value::as_table);
    assert!(dra.is_none_or(|dra| !dra.contains_key("node_name")), "{what}: [dra] node_name in a shared devhost.toml");

    // The kubelet's plugin directory: the same path on the host and inside.
    let plugin_dir = host.plugin_dir.to_str().expect("UTF-8");
    let mount = mount_at(plugin_dir);
    assert_ne!(mount.get("readOnly").and_then(Value::as_bool), Some(true), "{what}: devhost creates sockets there");
    assert_eq!(text(&volume_of(mount), &["hostPath", "path"]), plugin_dir, "{what}");
    // The PodResources socket's directory, at the host's path (the
    // directory, so a restarted kubelet's new socket is seen).
    let socket =
        host.pod_resources.socket.as_deref().unwrap_or_else(|| panic!("{what}: the PodResources client is off"));
    let pod_resources = socket.parent().and_then(Path::to_str).expect("a directory");
    assert_eq!(text(&volume_of(mount_at(pod_resources)), &["hostPath", "path"]), pod_resources, "{what}");
    // /dev at the host's paths; /sys read only.
    assert_eq!(text(&volume_of(mount_at("/dev")), &["hostPath", "path"]), "/dev");
    let sys = mount_at("/sys");
    assert_eq!(sys.get("readOnly").and_then(Value::as_bool), Some(true), "{what}: /sys must be read only");
    assert_eq!(text(&volume_of(sys), &["hostPath", "path"]), "/sys");

    // backends.d as its own ConfigMap volume, where devhost.toml says.
    let backends_mount = mount_at(host.backends_dir.to_str().expect("UTF-8"));
    let backends_map = rendered.named("ConfigMap", &text(&volume_of(backends_mount), &["configMap", "name"]));
    let files = labels(backends_map.get("data"));
    assert!(files.keys().all(|name| name.ends_with(".toml")), "{what}: {files:?}");
    check_backends(&files);

    // The WASM compile cache is writable (the root file system is not).
    let cache = Path::new(devhost::wasm::DEFAULT_WASM_CACHE_DIR);
    assert!(
        mounts.iter().any(|m| cache.starts_with(text(m, &["mountPath"])) && m.get("readOnly").is_none()),
        "{what}: no writable mount holds {}",
        cache.display()
    );
    // CDI specs go where devhost.toml says, on the host's CDI directory.
    let cdi_mount = mount_at(host.cdi_dir.to_str().expect("UTF-8"));
    assert!(cdi_mount.get("readOnly").is_none(), "{what}: devhost writes CDI specs");
    assert_eq!(text(&volume_of(cdi_mount), &["hostPath", "path"]), host.cdi_dir.display().to_string());
    // Every directory the runtime reads CDI specs from is seen as it is.
    let problems = cdi_problems(rendered, &host);
    assert!(problems.is_empty(), "{what}: {problems:#?}");

    // The metrics port where devhost serves it.
    let port = host.metrics_address.expect("metrics on").port();
    let ports = list(container, &["ports"]);
    let metrics_port = named(ports, "name", "metrics");
    assert_eq!(at(metrics_port, &["containerPort"]).as_u64(), Some(u64::from(port)), "{what}");
    // The probes exec the image's devhost on the config it runs with, and
    // that config serves them on loopback, apart from the metrics port
    // (tests/e2e/hostile_probe.rs: a flood of the metrics port cannot fail
    // them).
    let probe_address = host.probe_address.unwrap_or_else(|| panic!("{what}: probe_address is off"));
    assert!(probe_address.ip().is_loopback(), "{what}: the probe port is for the pod alone: {probe_address}");
    assert_ne!(host.metrics_address.map(|a| a.port()), Some(probe_address.port()), "{what}");
    for (probe, which) in [("livenessProbe", "live"), ("readinessProbe", "ready")] {
        assert!(at(container, &[probe]).get("httpGet").is_none(), "{what}: {probe} is not an httpGet");
        assert_eq!(
            probe_command(container, probe)[1..],
            ["probe", which, "--config", config_path.to_str().expect("UTF-8")]
        );
        assert_eq!(probe_command(container, probe)[0], entrypoint()[0], "{what}: {probe} runs the image's devhost");
    }
    let annotations = labels(at(daemonset, &["spec", "template", "metadata"]).get("annotations"));
    if let Some(scrape_port) = annotations.get("prometheus.io/port") {
        assert_eq!(scrape_port, &port.to_string(), "{what}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
    }
    for (kind, resource) in [("requests", "memory"), ("requests", "cpu"), ("limits", "memory")] {
        at(container, &["resources", kind, resource]);
    }

    // The metrics Service reaches every pod's metrics port, and a
    // ServiceMonitor (if any) selects that Service and port.
    let service = rendered.one("Service");
    assert_eq!(text(service, &["spec", "clusterIP"]), "None", "{what}: headless, one endpoint per node");
    assert!(selects(&labels(Some(at(service, &["spec", "selector"]))), &pod_labels), "{what}: Service selector");
    let service_port = &list(service, &["spec", "ports"])[0];
    assert_eq!(text(service_port, &["targetPort"]), "metrics");
    assert_eq!(at(service_port, &["port"]).as_u64(), Some(u64::from(port)));
    for monitor in rendered.all("ServiceMonitor") {
        let service_labels = labels(at(service, &["metadata"]).get("labels"));
        assert!(selects(&labels(Some(at(monitor, &["spec", "selector", "matchLabels"]))), &service_labels));
        assert!(
            list(monitor, &["spec", "namespaceSelector", "matchNames"]).iter().any(|n| n.as_str() == Some(&namespace))
        );
        let endpoint = &list(monitor, &["spec", "endpoints"])[0];
        assert_eq!(text(endpoint, &["port"]), text(service_port, &["name"]), "{what}: ServiceMonitor port");
        assert_eq!(text(endpoint, &["path"]), "/metrics");
    }
    host
}

/// The `exec` command of the container's `probe` (`livenessProbe`, ...).
pub(crate) fn probe_command(container: &Value, probe: &str) -> Vec<String> {
    list(container, &[probe, "exec", "command"])
        .iter()
        .map(|arg| arg.as_str().unwrap_or_else(|| panic!("{probe}: an argument is not a string")).to_owned())
        .collect()
}

/// The shipped DaemonSet's (deploy/kubernetes/daemonset.yaml) `probe`
/// command, for tests that run it.
pub(crate) fn shipped_probe_command(probe: &str) -> Vec<String> {
    let daemonset = yaml_documents("deploy/kubernetes/daemonset.yaml").remove(0);
    probe_command(&list(at(&daemonset, &["spec", "template", "spec"]), &["containers"])[0], probe)
}

/// Why `mount` (at `path`) is not the host's own `path` through a
/// `DirectoryOrCreate` hostPath volume of `volumes`, if it is not.
fn not_from_the_host(path: &str, mount: &Value, volumes: &[Value]) -> Option<String> {
    let volume = volumes.iter().find(|volume| volume.get("name") == mount.get("name"));
    let host_path = volume.and_then(|volume| volume.get("hostPath"));
    let source = host_path.and_then(|h| h.get("path")).and_then(Value::as_str);
    let kind = host_path.and_then(|h| h.get("type")).and_then(Value::as_str);
    (source != Some(path) || kind != Some("DirectoryOrCreate") || mount.get("subPath").is_some())
        .then(|| format!("{path} is not the host's {path} (DirectoryOrCreate): {mount:?} from {volume:?}"))
}

/// What devhost needs to read CDI specs as the container runtime does,
/// `host` being the settings devhost parses from its devhost.toml: each
/// directory of `cdi_spec_dirs()` (devhost's own `cdi_dir` among them)
/// mounted whole from the same host path (DirectoryOrCreate: a node
/// without vendor specs may have no /etc/cdi), read only except `cdi_dir`,
/// where devhost writes its own specs. Without such a mount devhost finds
/// no specs there (its image has none), silently: it could hand out a name
/// that a vendor's spec (/etc/cdi/nvidia.yaml) clashes with, or one the
/// runtime cannot resolve. Every shortfall found; none when all is there.
fn cdi_problems(rendered: &Rendered, host: &HostConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let pod = at(rendered.one("DaemonSet"), &["spec", "template", "spec"]);
    let container = &list(pod, &["containers"])[0];
    let volumes = list(pod, &["volumes"]);
    let mounts = list(container, &["volumeMounts"]);
    for dir in host.cdi_spec_dirs() {
        let path = dir.display().to_string();
        let Some(mount) = mounts.iter().find(|m| m.get("mountPath").and_then(Value::as_str) == Some(path.as_str()))
        else {
            problems.push(format!("nothing is mounted at the CDI spec directory {path}"));
            continue;
        };
        let read_only = mount.get("readOnly").and_then(Value::as_bool) == Some(true);
        if dir == host.cdi_dir && read_only {
            problems.push(format!("{path} is read only: devhost writes its CDI specs there (cdi_dir)"));
        }
        if dir != host.cdi_dir && !read_only {
            problems.push(format!("{path} is writable: devhost only reads CDI spec directories other than cdi_dir"));
        }
        problems.extend(not_from_the_host(&path, mount, volumes));
    }
    problems
}

/// Kinds without a namespace.
const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterRole", "ClusterRoleBinding"];

/// What devhost asks of the API server for resources served through DRA
/// (host/src/dra/publish.rs, prepare.rs): its ResourceSlices in full (they
/// are cluster-scoped), the ResourceClaims it prepares and its Node (the
/// slices' owner) read only, and the status of the claims it prepared
/// (`status.devices`) written.
const DRA_RULES: &[(&str, &str, &[&str])] = &[
    ("resource.k8s.io", "resourceslices", &["get", "list", "watch", "create", "update", "patch", "delete"]),
    ("resource.k8s.io", "resourceclaims", &["get"]),
    ("resource.k8s.io", "resourceclaims/status", &["update"]),
    ("resource.k8s.io", "resourceclaims/driver", &["associated-node:update"]),
    ("", "nodes", &["get"]),
];

/// (API group, resource, verb) triples.
type Permissions = BTreeSet<(String, String, String)>;

fn dra_rules() -> Permissions {
    DRA_RULES
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|verb| ((*group).to_owned(), (*resource).to_owned(), (*verb).to_owned()))
        })
        .collect()
}

/// The strings of a list-of-strings field, none if it is absent.
fn strings(value: &Value, key: &str) -> Vec<String> {
    value
        .get(key)
        .and_then(Value::as_sequence)
        .map(|items| items.iter().map(|item| item.as_str().expect("a string").to_owned()).collect())
        .unwrap_or_default()
}

/// Everything the ClusterRoleBindings of `rendered` grant the ServiceAccount
/// `namespace/account`. A rule narrowed to some resource names, or one for
/// non-resource URLs, shows as such, so it never passes for a plain one.
fn granted(rendered: &Rendered, namespace: &str, account: &str) -> Permissions {
    let mut granted = Permissions::new();
    for binding in rendered.all("ClusterRoleBinding") {
        let subjects = binding.get("subjects").and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default();
        let is = |subject: &Value, key: &str, wanted: &str| subject.get(key).and_then(Value::as_str) == Some(wanted);
        let ours =
            |s: &Value| is(s, "kind", "ServiceAccount") && is(s, "name", account) && is(s, "namespace", namespace);
        if !subjects.iter().any(ours) {
            continue;
        }
        assert_eq!(text(binding, &["roleRef", "apiGroup"]), "rbac.authorization.k8s.io");
        assert_eq!(text(binding, &["roleRef", "kind"]), "ClusterRole");
        let role = rendered.named("ClusterRole", &text(binding, &["roleRef", "name"]));
        for rule in list(role, &["rules"]) {
            let narrowed = !strings(rule, "resourceNames").is_empty();
            for verb in strings(rule, "verbs") {
                for group in strings(rule, "apiGroups") {
                    for resource in strings(rule, "resources") {
                        let resource = if narrowed { format!("{resource} (some names only)") } else { resource };
                        granted.insert((group.clone(), resource, verb.clone()));
                    }
                }
                for url in strings(rule, "nonResourceURLs") {
                    granted.insert(("(non-resource URL)".to_owned(), url, verb.clone()));
                }
            }
        }
    }
    granted
}

/// Whether the DaemonSet's pods get their ServiceAccount's token: the pod's
/// automountServiceAccountToken, else the account's, else yes.
fn token_mounted(rendered: &Rendered) -> bool {
    let pod = at(rendered.one("DaemonSet"), &["spec", "template", "spec"]);
    let account = rendered.named("ServiceAccount", &text(pod, &["serviceAccountName"]));
    pod.get("automountServiceAccountToken")
        .or_else(|| account.get("automountServiceAccountToken"))
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

/// What resources served through DRA need from a render, `host` being the
/// settings devhost parses from its devhost.toml: exactly `DRA_RULES`,
/// bound to the DaemonSet's ServiceAccount, whose token is in the pod (the
/// in-cluster credentials: [dra] kubeconfig unset); NODE_NAME from
/// spec.nodeName; the kubelet's plugins/ and plugins_registry/ under
/// [dra] kubelet_root, writable, from the same host paths (DirectoryOrCreate).
/// Every shortfall found; none when all is there.
fn dra_problems(rendered: &Rendered, host: &HostConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let daemonset = rendered.one("DaemonSet");
    let namespace = text(daemonset, &["metadata", "namespace"]);
    let pod = at(daemonset, &["spec", "template", "spec"]);
    let account = text(pod, &["serviceAccountName"]);
    let granted = granted(rendered, &namespace, &account);
    let wanted = dra_rules();
    for missing in wanted.difference(&granted) {
        problems.push(format!("{namespace}/{account} may not {missing:?}"));
    }
    for extra in granted.difference(&wanted) {
        problems.push(format!("{namespace}/{account} may also {extra:?}, which DRA does not use"));
    }
    if !token_mounted(rendered) {
        problems.push("the ServiceAccount's token is not mounted".to_owned());
    }
    if let Some(file) = &host.dra.kubeconfig {
        problems.push(format!("[dra] kubeconfig = {}: the RBAC is the pod's own account's", file.display()));
    }

    let container = &list(pod, &["containers"])[0];
    let env = container.get("env").and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default();
    let node_name = env.iter().find(|var| var.get("name").and_then(Value::as_str) == Some("NODE_NAME"));
    let field = node_name
        .and_then(|var| var.get("valueFrom"))
        .and_then(|from| from.get("fieldRef"))
        .and_then(|field| field.get("fieldPath"))
        .and_then(Value::as_str);
    if field != Some("spec.nodeName") {
        problems.push(format!("NODE_NAME is not from the downward API's spec.nodeName: {node_name:?}"));
    }

    let volumes = list(pod, &["volumes"]);
    let mounts = list(container, &["volumeMounts"]);
    for dir in ["plugins", "plugins_registry"] {
        let path = host.dra.kubelet_root.join(dir).display().to_string();
        let Some(mount) = mounts.iter().find(|m| m.get("mountPath").and_then(Value::as_str) == Some(path.as_str()))
        else {
            problems.push(format!("nothing is mounted at {path}"));
            continue;
        };
        if mount.get("readOnly").and_then(Value::as_bool) == Some(true) {
            problems.push(format!("{path} is read only: devhost creates sockets there"));
        }
        problems.extend(not_from_the_host(&path, mount, volumes));
    }
    problems
}

/// A render has what resources served through DRA need (`dra_problems`).
fn check_dra(rendered: &Rendered, host: &HostConfig) {
    let problems = dra_problems(rendered, host);
    assert!(problems.is_empty(), "{}: {problems:#?}", rendered.what);
}

/// A container image reference as the container runtime parses it: only a
/// lowercase repository path can be pulled.
fn pullable(image: &str) -> bool {
    let repository = image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(image, |(repo, _)| repo);
    let path = repository.split_once('/').filter(|(host, _)| host.contains(['.', ':'])).map_or(repository, |(_, p)| p);
    !path.is_empty() && path.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
}

/// A render with default settings: agrees with the code, and with devhost's
/// own defaults for the plugin directory, the metrics port, the priority
/// class and seccomp; and has what resources served through DRA need.
fn check_defaults(rendered: &Rendered) {
    let host = check_against_code(rendered);
    check_dra(rendered, &host);
    assert_eq!(host.plugin_dir, Path::new(devhost::proto::DEFAULT_PLUGIN_DIR));
    assert_eq!(host.metrics_address.map(|a| a.port()), Some(default_metrics_port()));
    // The CDI directories containerd and CRI-O read by default (the
    // mounts of each are checked against the code by check_against_code).
    let defaults = HostConfig::defaults(Path::new("/etc/devhost"), &Overrides::default());
    assert_eq!(host.cdi_dir, defaults.cdi_dir, "{}", rendered.what);
    assert_eq!(host.cdi_spec_dirs(), defaults.cdi_spec_dirs(), "{}", rendered.what);
    let pod = at(rendered.one("DaemonSet"), &["spec", "template", "spec"]);
    assert_eq!(text(pod, &["priorityClassName"]), "system-node-critical");
    assert_eq!(text(pod, &["securityContext", "seccompProfile", "type"]), "RuntimeDefault");
}

#[test]
fn the_kustomization_renders_what_devhost_needs_and_nothing_pulls_until_the_image_is_set() {
    let Some(rendered) = kustomize(&repo("deploy/kubernetes")) else { return };
    check_defaults(&rendered);
    let daemonset = rendered.one("DaemonSet");
    let pod = at(daemonset, &["spec", "template", "spec"]);
    let namespace = rendered.one("Namespace");
    assert_eq!(text(namespace, &["metadata", "labels", "pod-security.kubernetes.io/enforce"]), "privileged");
    assert_eq!(text(namespace, &["metadata", "name"]), text(daemonset, &["metadata", "namespace"]));

    // The placeholder image cannot be pulled from anywhere.
    let image = text(&list(pod, &["containers"])[0], &["image"]);
    assert!(!pullable(&image), "the unset image {image} must not be a pullable reference");
    assert!(image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))), "{image}");

    // Set in one place, the image is the one an operator pushed: an overlay
    // with `images:`, as the operator guide says.
    let overlay = tempfile::tempdir().expect("temp dir");
    // Kustomize takes a base only by a relative path.
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!("{up}{}", repo("deploy/kubernetes").display().to_string().trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources:\n  - {base}\nimages:\n  - name: SET-YOUR-REGISTRY/devhost\n    newName: registry.example.com/devhost\n"
        ),
    )
    .expect("write overlay");
    let Some(overlaid) = kustomize(overlay.path()) else { return };
    let pod = at(overlaid.one("DaemonSet"), &["spec", "template", "spec"]);
    let image = text(&list(pod, &["containers"])[0], &["image"]);
    assert_eq!(image, format!("registry.example.com/devhost:{}", env!("CARGO_PKG_VERSION")));
    assert!(pullable(&image));

    // Moved to kube-system (the operator guide's way for clusters that
    // admit system-node-critical pods only there), DRA's binding follows
    // the ServiceAccount.
    let moved = tempfile::tempdir().expect("temp dir");
    let up = "../".repeat(moved.path().components().count() - 1);
    let base = format!("{up}{}", repo("deploy/kubernetes").display().to_string().trim_start_matches('/'));
    std::fs::write(
        moved.path().join("kustomization.yaml"),
        format!("namespace: kube-system\nresources:\n  - {base}\n"),
    )
    .expect("write overlay");
    let Some(moved) = kustomize(moved.path()) else { return };
    assert_eq!(text(moved.one("DaemonSet"), &["metadata", "namespace"]), "kube-system");
    let host = check_against_code(&moved);
    check_dra(&moved, &host);
}

#[test]
fn pullable_accepts_real_references_and_refuses_the_placeholder() {
    for image in ["registry.example.com/devhost:0.1.0", "localhost:5000/a/b", "devhost", "ghcr.io/x/y:1.2-rc"] {
        assert!(pullable(image), "{image}");
    }
    for image in ["SET-YOUR-REGISTRY/devhost:0.1.0", "registry.example.com/Devhost", ""] {
        assert!(!pullable(image), "{image}");
    }
}

/// The kustomization's backends.d files, as devhost would read them.
fn kustomize_backends() -> BTreeMap<String, String> {
    let dir = repo("deploy/kubernetes/backends.d");
    std::fs::read_dir(&dir)
        .expect("deploy/kubernetes/backends.d")
        .map(|entry| {
            let path = entry.expect("entry").path();
            (path.file_name().expect("name").to_string_lossy().into_owned(), read_path(&path))
        })
        .collect()
}

#[test]
fn the_kustomizations_files_are_what_devhost_config_check_accepts() {
    // `devhost config check deploy/kubernetes`, as the operator guide says
    // to run before applying: the very files the ConfigMaps are made of.
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    let generated: Vec<&Value> = list(kustomization, &["configMapGenerator"]).iter().collect();
    let files_of = |name: &str| -> Vec<String> {
        let generator = generated.iter().find(|g| text(g, &["name"]) == name).expect("a generator");
        list(generator, &["files"]).iter().map(|f| f.as_str().expect("a file").to_owned()).collect()
    };
    assert_eq!(files_of("devhost-config"), ["devhost.toml"]);
    let listed: Vec<String> = files_of("devhost-backends");
    let present: Vec<String> = kustomize_backends().keys().map(|name| format!("backends.d/{name}")).collect();
    assert_eq!(listed, present, "every backends.d file, and only those, is in the ConfigMap");
    let config_path = repo("deploy/kubernetes/devhost.toml");
    let host = HostConfig::parse(&config_path, &read("deploy/kubernetes/devhost.toml"), &Overrides::default())
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(host.backends_dir, repo("deploy/kubernetes/backends.d"));
    check_backends(&kustomize_backends());
}

#[test]
fn the_image_installs_what_the_shipped_backend_files_name() {
    let dockerfile = read("deploy/Dockerfile");
    let installed = image_files();
    let entry = entrypoint();
    assert!(installed.contains(&entry[0]), "ENTRYPOINT {} is not installed", entry[0]);
    assert_eq!(entry[1], "run");
    let config_path = image_config_path();
    assert!(installed.iter().any(|path| Path::new(path) == config_path), "{} not installed", config_path.display());
    assert!(dockerfile.contains("deploy/config/devhost.toml /out/etc/devhost/devhost.toml"));
    let host = HostConfig::parse(&config_path, &read("deploy/config/devhost.toml"), &Overrides::default())
        .expect("the image's devhost.toml is valid");
    assert_eq!(host, HostConfig::defaults(config_path.parent().expect("a directory"), &Overrides::default()));
    assert!(installed.iter().any(|path| Path::new(path) == host.backends_dir), "backends.d missing");

    // Each shipped backend file names a module the image installs, and is
    // itself installed among the ready-made backend files.
    let shipped = [
        "backends/nvidia/gpu.toml",
        "backends/generic/generic.toml",
        "backends/pci/pci.toml",
        "examples/native-rust/native-rust.toml",
        "examples/native-c/native-c.toml",
        "examples/wasm-rust/wasm-rust.toml",
    ];
    let files: BTreeMap<String, String> = shipped
        .iter()
        .map(|path| (Path::new(path).file_name().expect("name").to_string_lossy().into_owned(), read(path)))
        .collect();
    for backend in check_backends(&files) {
        let BackendSource::Module { path, .. } = &backend.source else { panic!("{}: not a module", backend.name) };
        let path = path.to_str().expect("UTF-8");
        assert!(path.starts_with("/usr/lib/devhost/backends/"), "{path}");
        assert!(installed.iter().any(|file| file == path), "the image does not install {path}");
    }
    for name in files.keys() {
        let file = format!("/usr/share/devhost/backends.d/{name}");
        assert!(installed.contains(&file), "the image does not install {file}");
    }

    // The files it copies are the ones the crates build: lib names from
    // each Cargo.toml, the C library from its Makefile.
    for (manifest, artifact) in [
        ("backends/nvidia/Cargo.toml", "target/release/lib{}.so"),
        ("examples/native-rust/Cargo.toml", "target/release/lib{}.so"),
        ("examples/wasm-rust/Cargo.toml", "target/wasm32-wasip2/release/{}.wasm"),
    ] {
        let cargo: toml::Table = read(manifest).parse().expect("Cargo.toml");
        let package = cargo["package"]["name"].as_str().expect("package name");
        let lib = cargo.get("lib").and_then(|lib| lib.get("name")).and_then(toml::Value::as_str);
        let lib = lib.map_or_else(|| package.replace('-', "_"), str::to_owned);
        let artifact = artifact.replace("{}", &lib);
        assert!(dockerfile.contains(&format!("-p {package}")), "the image does not build {package}");
        assert!(dockerfile.contains(&format!("{artifact} /out/")), "the image does not install {artifact}");
    }
    // Built natively for whatever platform buildx asks for: no stage, base
    // image or step names a CPU.
    for line in dockerfile.lines().filter(|line| !line.trim_start().starts_with('#')) {
        for pinned in ["--platform", "amd64", "arm64", "x86_64", "aarch64"] {
            assert!(!line.contains(pinned), "deploy/Dockerfile pins a platform: {line}");
        }
    }
    let makefile = read("examples/native-c/Makefile");
    assert!(makefile.lines().any(|line| line.starts_with("libdevhost_example_native_c.so:")));
    assert!(dockerfile.contains("examples/native-c/libdevhost_example_native_c.so /out/"));
}

/// Resolves a dotted `.Values` path in values.yaml.
fn value_at<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(values, |value, key| value.as_mapping()?.get(key))
}

/// Every `.Values.a.b` reference in `text`.
fn values_references(text: &str) -> Vec<String> {
    text.match_indices(".Values.")
        .map(|(start, needle)| {
            let rest = &text[start + needle.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len());
            rest[..end].trim_end_matches('.').to_owned()
        })
        .collect()
}

fn read_path(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Helm renders a missing value as empty without a word: every `.Values`
/// reference must exist in values.yaml.
#[test]
fn every_value_a_template_uses_is_in_values_yaml() {
    let chart = &yaml_documents("deploy/helm/devhost/Chart.yaml")[0];
    assert_eq!(text(chart, &["appVersion"]), env!("CARGO_PKG_VERSION"), "chart appVersion = devhost's version");
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    assert_eq!(text(&list(kustomization, &["images"])[0], &["newTag"]), env!("CARGO_PKG_VERSION"));
    let values = &yaml_documents("deploy/helm/devhost/values.yaml")[0];
    for entry in std::fs::read_dir(repo("deploy/helm/devhost/templates")).expect("templates/") {
        let path = entry.expect("entry").path();
        for reference in values_references(&read_path(&path)) {
            assert!(
                value_at(values, &reference).is_some(),
                "{}: .Values.{reference} is not in values.yaml",
                path.display()
            );
        }
    }
}

#[test]
fn the_charts_defaults_render_what_devhost_needs_and_match_the_plain_manifests() {
    let Some(python) = deploy_python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let rendered = helm_defaults(&python, &dir);
    check_defaults(&rendered);
    let daemonset = rendered.one("DaemonSet");
    let pod = at(daemonset, &["spec", "template", "spec"]);
    let container = &list(pod, &["containers"])[0];
    assert_eq!(text(container, &["image"]), format!("registry.example.com/devhost:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(at(container, &["securityContext", "privileged"]).as_bool(), Some(true));
    assert!(rendered.all("ServiceMonitor").is_empty(), "a ServiceMonitor needs its CRD: off by default");

    // The same backends as the kustomization's backends.d.
    let backends = rendered.named("ConfigMap", "devhost-backends");
    assert_eq!(labels(backends.get("data")), kustomize_backends());
    // The notes tell how to label the namespace if pods are refused.
    assert!(rendered.notes.contains("pod-security.kubernetes.io/enforce=privileged"), "{}", rendered.notes);
}

#[test]
fn every_value_in_the_full_values_file_reaches_the_objects() {
    let Some(python) = deploy_python() else { return };
    let rendered = helm_full(&python);
    let host = check_against_code(&rendered);
    let values = &yaml_documents("deploy/helm/devhost/ci/full-values.yaml")[0];
    assert_eq!(host.plugin_dir, Path::new(&text(values, &["pluginDir"])));
    // DRA's rights bound to the custom account, its mounts under the
    // custom kubelet root (the parent of pluginDir, as devhost takes it).
    assert_eq!(at(values, &["dra", "enabled"]).as_bool(), Some(true));
    assert_eq!(Some(host.dra.kubelet_root.as_path()), host.plugin_dir.parent());
    assert_eq!(at(values, &["dra", "deviceTaints"]).as_bool(), Some(host.dra.device_taints));
    assert!(host.dra.device_taints, "set away from its default");
    check_dra(&rendered, &host);
    let socket = host.pod_resources.socket.clone().expect("the PodResources client is on");
    assert_eq!(socket.parent(), Some(Path::new(&text(values, &["podResourcesDir"]))));
    assert_eq!(host.metrics_address.map(|a| u64::from(a.port())), at(values, &["metrics", "port"]).as_u64());
    assert_eq!(Some(host.call_timeout.as_millis() as u64), at(values, &["callTimeoutMs"]).as_u64());

    let daemonset = rendered.one("DaemonSet");
    assert_eq!(text(daemonset, &["metadata", "name"]), text(values, &["fullnameOverride"]));
    let template = at(daemonset, &["spec", "template"]);
    let pod = at(template, &["spec"]);
    let container = &list(pod, &["containers"])[0];
    let image = format!("{}:{}", text(values, &["image", "repository"]), text(values, &["image", "tag"]));
    assert_eq!(text(container, &["image"]), image);
    assert_eq!(text(container, &["imagePullPolicy"]), text(values, &["image", "pullPolicy"]));
    assert_eq!(at(pod, &["imagePullSecrets"]), at(values, &["imagePullSecrets"]));
    assert_eq!(text(pod, &["serviceAccountName"]), text(values, &["serviceAccount", "name"]));
    assert!(pod.get("priorityClassName").is_none(), "priorityClassName \"\" leaves it out");
    assert_eq!(text(pod, &["runtimeClassName"]), text(values, &["runtimeClassName"]));
    for (pod_key, values_key) in [
        ("securityContext", "podSecurityContext"),
        ("nodeSelector", "nodeSelector"),
        ("tolerations", "tolerations"),
        ("affinity", "affinity"),
    ] {
        assert_eq!(at(pod, &[pod_key]), at(values, &[values_key]), "{pod_key}");
    }
    assert_eq!(at(container, &["securityContext"]), at(values, &["securityContext"]));
    assert_eq!(at(container, &["resources"]), at(values, &["resources"]));
    // extraEnv after devhost's own NODE_NAME.
    let env = list(container, &["env"]);
    assert_eq!(text(&env[0], &["name"]), "NODE_NAME");
    assert_eq!(&env[1..], list(values, &["extraEnv"]).as_slice());
    assert_eq!(at(daemonset, &["spec", "updateStrategy"]), at(values, &["updateStrategy"]));
    let volume = &list(values, &["extraVolumes"])[0];
    assert!(list(pod, &["volumes"]).contains(volume));
    let mount = &list(values, &["extraVolumeMounts"])[0];
    assert!(list(container, &["volumeMounts"]).contains(mount));
    let pod_labels = labels(at(template, &["metadata"]).get("labels"));
    assert!(selects(&labels(values.get("podLabels")), &pod_labels));
    let annotations = labels(at(template, &["metadata"]).get("annotations"));
    assert!(selects(&labels(values.get("podAnnotations")), &annotations));
    assert!(!annotations.contains_key("prometheus.io/scrape"), "scrapeAnnotations: false");

    // backends: `fuse: null` drops the default; the others are the files.
    let files = labels(rendered.named("ConfigMap", "node-accelerators-backends").get("data"));
    assert_eq!(files.keys().collect::<Vec<_>>(), ["gpu.toml", "pci-nics.toml"]);
    assert_eq!(files["gpu.toml"], text(values, &["backends", "gpu"]));

    let monitor = rendered.one("ServiceMonitor");
    assert!(selects(
        &labels(at(values, &["metrics", "serviceMonitor"]).get("labels")),
        &labels(at(monitor, &["metadata"]).get("labels"))
    ));
    let endpoint = &list(monitor, &["spec", "endpoints"])[0];
    assert_eq!(text(endpoint, &["interval"]), text(values, &["metrics", "serviceMonitor", "interval"]));
    assert_eq!(text(endpoint, &["scrapeTimeout"]), text(values, &["metrics", "serviceMonitor", "scrapeTimeout"]));
}

#[test]
fn every_rendered_manifest_is_valid_for_kubernetes_1_29_to_1_37() {
    let Some(python) = deploy_python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut renders = vec![helm_defaults(&python, &dir), helm_full(&python)];
    renders.extend(kustomize(&repo("deploy/kubernetes")));
    for rendered in &renders {
        let unknown = validate(&python, rendered).unwrap_or_else(|failures| panic!("{}:\n{failures}", rendered.what));
        let expected: Vec<String> = rendered
            .all("ServiceMonitor")
            .iter()
            .map(|_| "monitoring.coreos.com/v1 ServiceMonitor".to_owned())
            .collect();
        assert_eq!(unknown, expected, "{}: kinds without a Kubernetes schema", rendered.what);
    }

    // The validator can fail: a misspelt field (strict) and a wrong type
    // are each refused for every version.
    for (from, to, named) in [
        ("imagePullPolicy:", "imagePullPolicyy:", "imagePullPolicyy"),
        ("failureThreshold: 3", "failureThreshold: three", "failureThreshold"),
    ] {
        assert!(renders[0].text.contains(from), "{from}");
        let broken = Rendered::new("broken", renders[0].text.replacen(from, to, 1), String::new());
        let failures = validate(&python, &broken).expect_err("refused");
        for minor in 29..=37 {
            assert!(failures.contains(&format!("Kubernetes 1.{minor}: ")), "1.{minor} not checked:\n{failures}");
        }
        assert!(failures.contains(named), "{failures}");
    }
}

#[test]
fn the_chart_refuses_bad_values_naming_the_value() {
    let Some((python, dir, image)) = chart_inputs() else { return };
    let refused = |name: &str, text: &str| -> String {
        let file = values_file(&dir, name, text);
        match helm(&python, &[&image, &file]) {
            Ok(_) => panic!("Helm accepted {name}:\n{text}"),
            Err(message) => message,
        }
    };
    // The image is required, and the message says what to do.
    let message = helm(&python, &[]).err().expect("no image: refused");
    for words in ["image.repository is required", "deploy/Dockerfile", "docs/operator-guide.md"] {
        assert!(message.contains(words), "{message}");
    }
    // values.schema.json: types, ranges, enums, misspelt keys.
    for (name, text, names) in [
        ("port.yaml", "metrics:\n  port: \"9477\"\n", "/metrics/port"),
        ("range.yaml", "metrics:\n  port: 70000\n", "/metrics/port"),
        ("typo.yaml", "imge:\n  repository: x\n", "imge"),
        ("nested-typo.yaml", "metrics:\n  servicemonitor:\n    enabled: true\n", "servicemonitor"),
        ("format.yaml", "log:\n  format: yaml\n", "/log/format"),
        ("structured.yaml", "backends:\n  gpu:\n    backend:\n      module: x.so\n", "/backends/gpu"),
        ("file-name.yaml", "backends:\n  \"../etc\": \"x\"\n", "../etc"),
        ("relative.yaml", "pluginDir: var/lib/kubelet\n", "/pluginDir"),
        ("dra.yaml", "dra:\n  enabled: \"yes\"\n", "/dra/enabled"),
    ] {
        let message = refused(name, text);
        assert!(message.contains(names), "{name}: the message does not name {names}:\n{message}");
    }
}

#[test]
fn host_settings_roll_the_pods_and_backend_changes_reach_them_in_place() {
    let Some((python, dir, image)) = chart_inputs() else { return };
    let checksum = |extra: Option<&str>| -> String {
        let mut files = vec![image.clone()];
        files.extend(extra.map(|text| values_file(&dir, "extra.yaml", text)));
        let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let rendered = helm(&python, &files).unwrap_or_else(|error| panic!("{error}"));
        text(rendered.one("DaemonSet"), &["spec", "template", "metadata", "annotations", "checksum/config"])
    };
    let base = checksum(None);
    assert_ne!(checksum(Some("log:\n  level: debug\n")), base, "a host setting must roll the pods");
    assert_ne!(checksum(Some("callTimeoutMs: 2000\n")), base, "a host setting must roll the pods");
    assert_eq!(checksum(Some("backends:\n  extra: |\n    [backend]\n    kind = \"static\"\n")), base);

    // Kustomize: devhost-config's name carries a hash of devhost.toml, so
    // the DaemonSet changes with it; devhost-backends keeps its name.
    let copy = tempfile::tempdir().expect("temp dir");
    copy_dir(&repo("deploy/kubernetes"), copy.path());
    let Some(before) = kustomize(copy.path()) else { return };
    let toml = copy.path().join("devhost.toml");
    let changed = read_path(&toml).replace("level = \"info\"", "level = \"debug\"");
    std::fs::write(&toml, changed).expect("write");
    std::fs::write(copy.path().join("backends.d/fuse.toml"), "# changed\n").expect("write");
    let Some(after) = kustomize(copy.path()) else { return };
    let volume = |rendered: &Rendered, name: &str| -> String {
        let pod = at(rendered.one("DaemonSet"), &["spec", "template", "spec"]);
        text(named(list(pod, &["volumes"]), "name", name), &["configMap", "name"])
    };
    assert_ne!(volume(&before, "config"), volume(&after, "config"), "devhost.toml changed: the pods must roll");
    assert!(volume(&after, "config").starts_with("devhost-config-"));
    assert_eq!(volume(&before, "backends"), "devhost-backends");
    assert_eq!(volume(&after, "backends"), "devhost-backends", "backends.d is reloaded in place");
}

/// Off (`dra.enabled: false`), the chart grants no API-server rights and
/// mounts neither the token nor the kubelet's plugin directories; the rest
/// still agrees with the code.
#[test]
fn the_chart_leaves_dras_rights_token_and_mounts_out_when_dra_is_off() {
    let Some((python, dir, image)) = chart_inputs() else { return };
    let off = values_file(&dir, "dra-off.yaml", "dra:\n  enabled: false\n");
    let rendered = helm(&python, &[&image, &off]).unwrap_or_else(|error| panic!("{error}"));
    let host = check_against_code(&rendered);
    assert!(rendered.all("ClusterRole").is_empty() && rendered.all("ClusterRoleBinding").is_empty());
    assert!(!token_mounted(&rendered), "no rights, no token");
    let problems = dra_problems(&rendered, &host);
    for expected in ["may not", "token is not mounted", "nothing is mounted at /var/lib/kubelet/plugins_registry"] {
        assert!(problems.iter().any(|problem| problem.contains(expected)), "{expected}: {problems:#?}");
    }
    assert!(!problems.iter().any(|problem| problem.contains("NODE_NAME")), "NODE_NAME is set either way");
}

/// Breaks the plain manifests once per case (`from`, found exactly once,
/// becomes `to`) and asserts that `check` reports it, saying `named`.
fn each_breakage_is_named(cases: &[(&str, &str, &str)], check: fn(&Rendered, &HostConfig) -> Vec<String>) {
    for (from, to, named) in cases {
        let edit = |text: String| {
            assert_eq!(text.matches(from).count(), 1, "{from}");
            text.replacen(from, to, 1)
        };
        let (broken, host) = plain_manifests(edit);
        let problems = check(&broken, &host);
        assert!(problems.iter().any(|problem| problem.contains(named)), "{to}: {named} not found in {problems:#?}");
    }
}

/// deploy/kubernetes's ServiceAccount, rbac.yaml and DaemonSet as written
/// (no renderer needed) and passed through `edit`, and its devhost.toml as
/// devhost parses it.
fn plain_manifests(edit: impl Fn(String) -> String) -> (Rendered, HostConfig) {
    let files = ["serviceaccount.yaml", "rbac.yaml", "daemonset.yaml"];
    let joined = files.iter().map(|file| format!("---\n{}\n", read(&format!("deploy/kubernetes/{file}"))));
    let joined = edit(joined.collect());
    let path = repo("deploy/kubernetes/devhost.toml");
    let host = HostConfig::parse(&path, &read("deploy/kubernetes/devhost.toml"), &Overrides::default())
        .unwrap_or_else(|error| panic!("{error}"));
    (Rendered::new("deploy/kubernetes", joined, String::new()), host)
}

/// The DRA check is not vacuous: the plain manifests pass it, and a rule or
/// verb taken away, one too many, the binding to another account, the
/// token off, NODE_NAME from elsewhere, a mount moved or a hostPath that
/// must already exist each fail it, saying what is wrong.
#[test]
fn the_dra_check_finds_a_missing_rule_an_unbound_account_or_a_missing_mount() {
    let (rendered, host) = plain_manifests(|text| text);
    check_dra(&rendered, &host);
    let cases = [
        ("\"update\", \"patch\", ", "\"update\", ", "\"resourceslices\", \"patch\""),
        ("resources: [\"resourceclaims\"]", "resources: [\"resourceclaimz\"]", "\"resourceclaims\", \"get\""),
        (
            "resources: [\"nodes\"]\n    verbs: [\"get\"]",
            "resources: [\"nodes\"]\n    verbs: [\"get\", \"list\"]",
            "may also",
        ),
        ("  - kind: ServiceAccount\n    name: devhost\n", "  - kind: ServiceAccount\n    name: default\n", "may not"),
        ("automountServiceAccountToken: true", "automountServiceAccountToken: false", "token"),
        ("fieldPath: spec.nodeName", "fieldPath: metadata.name", "NODE_NAME"),
        ("mountPath: /var/lib/kubelet/plugins_registry", "mountPath: /plugins_registry", "plugins_registry"),
        (
            "path: /var/lib/kubelet/plugins\n            type: DirectoryOrCreate",
            "path: /var/lib/kubelet/plugins\n            type: Directory",
            "DirectoryOrCreate",
        ),
    ];
    each_breakage_is_named(&cases, dra_problems);
}

/// The CDI check is not vacuous: the plain manifests pass it, and the
/// /etc/cdi mount taken away, made writable, from another host path or
/// from one that must already exist, devhost's own cdi_dir made read only,
/// or a spec directory devhost.toml adds left unmounted each fail it,
/// saying what is wrong.
#[test]
fn the_cdi_check_finds_a_spec_directory_unmounted_writable_or_from_elsewhere() {
    let (rendered, host) = plain_manifests(|text| text);
    assert!(host.cdi_spec_dirs().contains(&PathBuf::from("/etc/cdi")), "{:?}", host.cdi_spec_dirs());
    let problems = cdi_problems(&rendered, &host);
    assert!(problems.is_empty(), "{problems:#?}");
    let cases = [
        (
            "            - name: etc-cdi\n              mountPath: /etc/cdi\n              readOnly: true\n",
            "",
            "nothing is mounted at the CDI spec directory /etc/cdi",
        ),
        ("mountPath: /etc/cdi\n              readOnly: true", "mountPath: /etc/cdi", "/etc/cdi is writable"),
        (
            "path: /etc/cdi\n            type: DirectoryOrCreate",
            "path: /opt/cdi\n            type: DirectoryOrCreate",
            "not the host's /etc/cdi",
        ),
        (
            "path: /etc/cdi\n            type: DirectoryOrCreate",
            "path: /etc/cdi\n            type: Directory",
            "DirectoryOrCreate",
        ),
        (
            "mountPath: /var/run/cdi\n",
            "mountPath: /var/run/cdi\n              readOnly: true\n",
            "/var/run/cdi is read only",
        ),
    ];
    each_breakage_is_named(&cases, cdi_problems);
    // A directory the runtime is configured to read, added to
    // devhost.toml's cdi_spec_dirs but not to the DaemonSet.
    let mut more = host.clone();
    more.cdi_runtime_dirs.push(PathBuf::from("/opt/cdi"));
    let problems = cdi_problems(&rendered, &more);
    assert_eq!(problems, ["nothing is mounted at the CDI spec directory /opt/cdi"], "{problems:#?}");
}

/// The files of examples/dra/ (a YAML text each) and their documents.
fn dra_examples() -> (BTreeMap<String, String>, Vec<Value>) {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(repo("examples/dra")).expect("examples/dra") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            files.insert(path.file_name().expect("name").to_string_lossy().into_owned(), read_path(&path));
        }
    }
    let docs = files.iter().flat_map(|(name, text)| documents(name, text)).collect();
    (files, docs)
}

/// The examples are valid `resource.k8s.io/v1` and `v1` objects for every
/// Kubernetes minor that serves DRA's v1 (1.34 to 1.37), by Kubernetes' own
/// strict schemas; the v1beta1 shape of a request (deviceClassName without
/// `exactly`) is refused by each.
#[test]
fn the_dra_examples_are_valid_for_kubernetes_1_34_to_1_37() {
    let Some(python) = deploy_python() else { return };
    let (files, docs) = dra_examples();
    for kind in ["DeviceClass", "ResourceClaimTemplate", "Pod"] {
        let count = docs.iter().filter(|doc| doc.get("kind").and_then(Value::as_str) == Some(kind)).count();
        assert_eq!(count, 2, "a {kind} for the static demo backend and one for NVIDIA");
    }
    let text: String = files.values().map(|text| format!("---\n{text}\n")).collect();
    let examples = Rendered::new("examples/dra", text, String::new());
    let unknown = validate_versions(&python, &examples, "1.34", "1.37").unwrap_or_else(|failures| panic!("{failures}"));
    assert!(unknown.is_empty(), "validated, not skipped: {unknown:?}");

    let from = "          exactly:\n            deviceClassName: gpu.example.com";
    assert!(examples.text.contains(from), "{from}");
    let v1beta1 = examples.text.replacen(from, "          deviceClassName: gpu.example.com", 1);
    let failures = validate_versions(&python, &Rendered::new("v1beta1", v1beta1, String::new()), "1.34", "1.37")
        .expect_err("refused");
    for minor in 34..=37 {
        assert!(failures.contains(&format!("Kubernetes 1.{minor}: ")), "1.{minor} not checked:\n{failures}");
    }
    assert!(failures.contains("deviceClassName"), "{failures}");
}

/// The examples fit together and fit devhost: each Pod's claims name one
/// of its resourceClaims, made from a template here, whose requests name a
/// DeviceClass here, which selects exactly the driver devhost derives from
/// the README's backends.d settings (parsed by devhost): `gpu.example.com`
/// for the static example.com/gpu, `gpu.nvidia.com` for the NVIDIA
/// backend's nvidia.com/gpu. Nothing is left over.
#[test]
fn the_dra_examples_refer_to_each_other_and_to_devhosts_driver_names() {
    let (_, docs) = dra_examples();
    let of_kind = |kind: &str| -> Vec<&Value> {
        docs.iter().filter(|doc| doc.get("kind").and_then(Value::as_str) == Some(kind)).collect()
    };
    let name = |doc: &Value| text(doc, &["metadata", "name"]);

    // The README's TOML: the static backend file, and the lines added to
    // the NVIDIA backend's file.
    let readme = read("examples/dra/README.md");
    let blocks: Vec<&str> =
        readme.split("```toml\n").skip(1).map(|rest| rest.split_once("```").expect("a closed block").0).collect();
    assert_eq!(blocks.len(), 2, "the static backend's file and the NVIDIA lines");
    let nvidia = format!("{}\n{}", read("backends/nvidia/gpu.toml"), blocks[1]);
    let mut drivers = BTreeSet::new();
    for (file, source, resource) in
        [("example.toml", blocks[0], "example.com/gpu"), ("gpu.toml", nvidia.as_str(), "nvidia.com/gpu")]
    {
        let backends = check_backends(&BTreeMap::from([(file.to_owned(), source.to_owned())]));
        let settings = backends[0].resources.get(resource).unwrap_or_else(|| panic!("{file}: no {resource}"));
        let driver = settings.dra_driver.clone().unwrap_or_else(|| panic!("{file}: {resource} is not served by DRA"));
        assert_eq!(Some(&driver), devhost::dra::names::default_driver(resource).as_ref(), "the default name");
        drivers.insert(driver);
    }
    assert!(read("backends/nvidia/gpu.toml").contains("resource = \"nvidia.com/gpu\""));

    let mut selected = BTreeSet::new();
    for class in of_kind("DeviceClass") {
        let selectors = list(class, &["spec", "selectors"]);
        assert_eq!(selectors.len(), 1, "{}", name(class));
        let expression = text(&selectors[0], &["cel", "expression"]);
        let driver = drivers
            .iter()
            .find(|driver| expression == format!("device.driver == \"{driver}\""))
            .unwrap_or_else(|| panic!("{}: {expression} selects none of devhost's drivers {drivers:?}", name(class)));
        assert_eq!(&name(class), driver, "a DeviceClass named after its driver");
        selected.insert(driver.clone());
    }
    assert_eq!(selected, drivers, "a DeviceClass for each driver");

    let classes: BTreeSet<String> = of_kind("DeviceClass").into_iter().map(name).collect();
    let mut used_classes = BTreeSet::new();
    for template in of_kind("ResourceClaimTemplate") {
        for request in list(template, &["spec", "spec", "devices", "requests"]) {
            let class = text(request, &["exactly", "deviceClassName"]);
            assert!(classes.contains(&class), "{}: no DeviceClass {class}", name(template));
            used_classes.insert(class);
        }
    }
    assert_eq!(used_classes, classes, "every DeviceClass is claimed from");

    let templates: BTreeSet<String> = of_kind("ResourceClaimTemplate").into_iter().map(name).collect();
    let mut used_templates = BTreeSet::new();
    for pod in of_kind("Pod") {
        let mut claims = BTreeSet::new();
        for claim in list(pod, &["spec", "resourceClaims"]) {
            let template = text(claim, &["resourceClaimTemplateName"]);
            assert!(templates.contains(&template), "{}: no ResourceClaimTemplate {template}", name(pod));
            used_templates.insert(template);
            claims.insert(text(claim, &["name"]));
        }
        for container in list(pod, &["spec", "containers"]) {
            for claim in list(container, &["resources", "claims"]) {
                assert!(claims.contains(&text(claim, &["name"])), "{}: no resourceClaims entry {claim:?}", name(pod));
            }
        }
    }
    assert_eq!(used_templates, templates, "every template is used by a pod");
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

/// The NetworkPolicy example selects the DaemonSet's pods and the port
/// devhost serves metrics on, in the same namespace.
#[test]
fn the_network_policy_example_guards_the_metrics_port_of_devhost_pods() {
    let daemonset = &yaml_documents("deploy/kubernetes/daemonset.yaml")[0];
    let policy = &yaml_documents("deploy/kubernetes/networkpolicy-example.yaml")[0];
    assert_eq!(text(policy, &["kind"]), "NetworkPolicy");
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    assert_eq!(text(policy, &["metadata", "namespace"]), text(kustomization, &["namespace"]), "devhost's namespace");
    let selected = string_map(at(policy, &["spec", "podSelector", "matchLabels"]));
    let pod_labels = string_map(at(daemonset, &["spec", "template", "metadata", "labels"]));
    assert!(selects(&selected, &pod_labels), "the policy selects devhost's pods");
    let ports = list(&list(policy, &["spec", "ingress"])[0], &["ports"]);
    let port = ports[0].get("port").and_then(Value::as_u64).expect("a port number");
    assert_eq!(port, u64::from(default_metrics_port()), "the policy guards devhost's metrics port");
}
