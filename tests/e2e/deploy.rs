//! `deploy/` against the code: the image's installed paths, the DaemonSet's
//! mounts, probes and ConfigMaps, and the Helm chart's values and templates
//! must agree with devhost's defaults and be accepted by devhost's own
//! config parser.
//!
//! Limits, said plainly: there is no container engine and no `helm` binary
//! here. The Dockerfile is read as text (its ENTRYPOINT and `install`
//! destinations), not built. The chart is not rendered by Helm: these tests
//! check that every `.Values` reference resolves in `values.yaml`, render
//! only the `devhost.hostConfig` helper (plain `.Values` substitutions with
//! `quote`/`int`) with a small stand-in, and check the backends in the
//! default values with devhost's parser.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use devhost::config::{BackendSource, HostConfig, Overrides, load_backends};
use serde::Deserialize;
use serde_norway::Value;

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

struct Manifests {
    daemonset: Value,
    config_maps: BTreeMap<String, Value>,
}

fn manifests() -> Manifests {
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    let namespace = text(kustomization, &["namespace"]);
    let mut daemonset = None;
    let mut config_maps = BTreeMap::new();
    let mut service_accounts = Vec::new();
    for file in list(kustomization, &["resources"]) {
        let file = format!("deploy/kubernetes/{}", file.as_str().expect("a file name"));
        for doc in yaml_documents(&file) {
            let kind = text(&doc, &["kind"]);
            let name = text(&doc, &["metadata", "name"]);
            if kind != "Namespace" {
                assert_eq!(text(&doc, &["metadata", "namespace"]), namespace, "{file}: {kind} {name}");
            }
            match kind.as_str() {
                "DaemonSet" => daemonset = Some(doc),
                "ConfigMap" => {
                    config_maps.insert(name, doc);
                }
                "ServiceAccount" => service_accounts.push(name),
                _ => {}
            }
        }
    }
    let daemonset = daemonset.expect("a DaemonSet");
    let account = text(&daemonset, &["spec", "template", "spec", "serviceAccountName"]);
    assert!(service_accounts.contains(&account), "ServiceAccount {account} is not in the manifests");
    Manifests { daemonset, config_maps }
}

#[test]
fn the_daemonset_mounts_probes_and_config_match_the_code() {
    let Manifests { daemonset, config_maps } = manifests();
    let pod = at(&daemonset, &["spec", "template", "spec"]);
    assert_eq!(text(pod, &["priorityClassName"]), "system-node-critical");
    let container = &list(pod, &["containers"])[0];
    assert!(
        container.get("command").is_none() && container.get("args").is_none(),
        "the DaemonSet runs the image's ENTRYPOINT"
    );
    assert_eq!(at(container, &["securityContext", "privileged"]).as_bool(), Some(true));
    let volumes = list(pod, &["volumes"]);
    let mounts = list(container, &["volumeMounts"]);
    let mount_at = |path: &str| named(mounts, "mountPath", path);
    let volume_of = |mount: &Value| named(volumes, "name", &text(mount, &["name"])).clone();

    // The kubelet's plugin directory: same path on the host and inside.
    let plugin_dir = devhost::proto::DEFAULT_PLUGIN_DIR;
    let mount = mount_at(plugin_dir);
    assert_ne!(mount.get("readOnly").and_then(Value::as_bool), Some(true), "devhost creates sockets there");
    assert_eq!(text(&volume_of(mount), &["hostPath", "path"]), plugin_dir);
    // /dev at the host's paths; /sys read only.
    assert_eq!(text(&volume_of(mount_at("/dev")), &["hostPath", "path"]), "/dev");
    let sys = mount_at("/sys");
    assert_eq!(sys.get("readOnly").and_then(Value::as_bool), Some(true), "/sys must be read only");
    assert_eq!(text(&volume_of(sys), &["hostPath", "path"]), "/sys");

    // devhost.toml where the ENTRYPOINT reads it, from a ConfigMap that
    // devhost's own parser accepts and that agrees with the mounts.
    let config_path = image_config_path();
    let config_mount = mount_at(config_path.to_str().expect("UTF-8"));
    let config_map = &config_maps[&text(&volume_of(config_mount), &["configMap", "name"])];
    let key = text(config_mount, &["subPath"]);
    let source = text(config_map, &["data", &key]);
    let host = HostConfig::parse(&config_path, &source, &Overrides::default())
        .unwrap_or_else(|error| panic!("devhost refuses the ConfigMap's {key}: {error}"));
    assert_eq!(host.plugin_dir, Path::new(plugin_dir));
    let port = host.metrics_address.expect("metrics on: the probes need them").port();
    assert_eq!(port, default_metrics_port());

    // backends.d as its own ConfigMap volume, where devhost.toml says.
    let backends_mount = mount_at(host.backends_dir.to_str().expect("UTF-8"));
    let backends_map = &config_maps[&text(&volume_of(backends_mount), &["configMap", "name"])];
    let files = string_map(at(backends_map, &["data"]));
    assert!(files.keys().all(|name| name.ends_with(".toml")), "{files:?}");
    check_backends(&files);

    // The WASM compile cache is writable (the root file system is not).
    let cache = Path::new(devhost::wasm::DEFAULT_WASM_CACHE_DIR);
    assert!(
        mounts.iter().any(|m| cache.starts_with(text(m, &["mountPath"])) && m.get("readOnly").is_none()),
        "no writable mount holds {}",
        cache.display()
    );

    // CDI specs go where devhost.toml says, on the host's CDI directory.
    let cdi_mount = mount_at(host.cdi_dir.to_str().expect("UTF-8"));
    assert!(cdi_mount.get("readOnly").is_none(), "devhost writes CDI specs");
    assert_eq!(text(&volume_of(cdi_mount), &["hostPath", "path"]), host.cdi_dir.display().to_string());

    // Probes on devhost's endpoints, on the port devhost serves them.
    let ports = list(container, &["ports"]);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(text(container, &[probe, "httpGet", "path"]), path);
        let port_ref = at(container, &[probe, "httpGet", "port"]);
        let probe_port = match port_ref.as_str() {
            Some(name) => at(named(ports, "name", name), &["containerPort"]).as_u64(),
            None => port_ref.as_u64(),
        };
        assert_eq!(probe_port, Some(u64::from(port)), "{probe}");
    }
    let annotations = at(&daemonset, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(text(annotations, &["prometheus.io/port"]), port.to_string());
    assert_eq!(text(annotations, &["prometheus.io/path"]), "/metrics");
    for (kind, resource) in [("requests", "memory"), ("requests", "cpu"), ("limits", "memory")] {
        at(container, &["resources", kind, resource]);
    }
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

/// A stand-in for Helm that renders one `define` block made only of text
/// and `{{ .Values.x }}` actions piped through `quote` or `int`.
fn render_define(helpers: &str, name: &str, values: &Value) -> String {
    let open = format!("{{{{- define \"{name}\" -}}}}");
    let body = &helpers[helpers.find(&open).expect("the define") + open.len()..];
    let body = body[..body.find("{{- end }}").expect("its end")].trim_start();
    let mut out = String::new();
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find("}}").expect("closed action");
        let mut stages = rest[start + 2..end].split('|').map(str::trim);
        let path = stages.next().and_then(|s| s.strip_prefix(".Values.")).expect("only .Values actions");
        let value = value_at(values, path).unwrap_or_else(|| panic!("{path} is not in values.yaml"));
        let mut rendered = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => panic!("{path}: cannot render {other:?}"),
        };
        for stage in stages {
            rendered = match stage {
                "quote" => serde_json::to_string(&rendered).expect("a string"),
                "int" => rendered.parse::<f64>().map(|f| (f as i64).to_string()).expect("a number"),
                other => panic!("the stand-in renderer does not know `{other}`"),
            };
        }
        out.push_str(&rendered);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn the_helm_chart_values_back_its_templates_and_devhost_accepts_what_they_render() {
    let chart = &yaml_documents("deploy/helm/devhost/Chart.yaml")[0];
    assert_eq!(text(chart, &["appVersion"]), env!("CARGO_PKG_VERSION"), "chart appVersion = devhost's version");
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    assert_eq!(text(&list(kustomization, &["images"])[0], &["newTag"]), env!("CARGO_PKG_VERSION"));

    let values = &yaml_documents("deploy/helm/devhost/values.yaml")[0];
    let templates = repo("deploy/helm/devhost/templates");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&templates).expect("templates/") {
        let path = entry.expect("entry").path();
        sources.insert(path.file_name().expect("name").to_string_lossy().into_owned(), read_path(&path));
    }
    for (file, source) in &sources {
        for reference in values_references(source) {
            assert!(value_at(values, &reference).is_some(), "{file}: .Values.{reference} is not in values.yaml");
        }
    }

    // The defaults agree with the code.
    assert_eq!(text(values, &["pluginDir"]), devhost::proto::DEFAULT_PLUGIN_DIR);
    assert_eq!(at(values, &["metrics", "port"]).as_u64(), Some(u64::from(default_metrics_port())));
    assert_eq!(text(values, &["priorityClassName"]), "system-node-critical");

    // devhost.toml as the chart renders it, through devhost's parser.
    let config_path = image_config_path();
    let rendered = render_define(&sources["_helpers.tpl"], "devhost.hostConfig", values);
    let host = HostConfig::parse(&config_path, &rendered, &Overrides::default())
        .unwrap_or_else(|error| panic!("devhost refuses the chart's devhost.toml:\n{rendered}\n{error}"));
    assert_eq!(host.plugin_dir, Path::new(devhost::proto::DEFAULT_PLUGIN_DIR));
    assert_eq!(host.metrics_address.map(|a| a.port()), Some(default_metrics_port()));
    assert_eq!(host.backends_dir, config_path.with_file_name("backends.d"));

    // The default backends pass devhost's parser, and are the plain
    // manifests' backends.
    let backends: BTreeMap<String, String> =
        string_map(at(values, &["backends"])).into_iter().map(|(name, toml)| (format!("{name}.toml"), toml)).collect();
    check_backends(&backends);
    let Manifests { config_maps, .. } = manifests();
    assert_eq!(string_map(at(&config_maps["devhost-backends"], &["data"])), backends);

    // The DaemonSet template mounts and probes what the plain manifest does
    // (checked as text: Helm cannot run here).
    let daemonset = &sources["daemonset.yaml"];
    for line in [
        "mountPath: {{ .Values.pluginDir }}",
        "path: {{ .Values.pluginDir }}",
        "containerPort: {{ .Values.metrics.port }}",
        "path: /healthz",
        "path: /readyz",
        "port: metrics",
        "subPath: devhost.toml",
        "path: /dev",
        "path: /sys",
    ] {
        assert!(daemonset.contains(line), "templates/daemonset.yaml lacks `{line}`");
    }
    for path in [config_path.to_str().expect("UTF-8"), "/etc/devhost/backends.d", "/var/cache/devhost"] {
        assert!(daemonset.contains(&format!("mountPath: {path}\n")), "templates/daemonset.yaml does not mount {path}");
    }
    assert!(daemonset.contains("mountPath: /sys\n              readOnly: true"), "/sys must be read only");
}

fn read_path(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// The NetworkPolicy example selects the DaemonSet's pods and the port
/// devhost serves metrics on, in the same namespace.
#[test]
fn the_network_policy_example_guards_the_metrics_port_of_devhost_pods() {
    let manifests = manifests();
    let policy = &yaml_documents("deploy/kubernetes/networkpolicy-example.yaml")[0];
    assert_eq!(text(policy, &["kind"]), "NetworkPolicy");
    assert_eq!(
        text(policy, &["metadata", "namespace"]),
        text(&manifests.daemonset, &["metadata", "namespace"]),
        "same namespace as the DaemonSet"
    );
    let selected = string_map(at(policy, &["spec", "podSelector", "matchLabels"]));
    let pod_labels = string_map(at(&manifests.daemonset, &["spec", "template", "metadata", "labels"]));
    for (key, value) in &selected {
        assert_eq!(pod_labels.get(key), Some(value), "the policy selects devhost's pods by {key}");
    }
    let ports = list(&list(policy, &["spec", "ingress"])[0], &["ports"]);
    let port = ports[0].get("port").and_then(Value::as_u64).expect("a port number");
    assert_eq!(port, u64::from(default_metrics_port()), "the policy guards devhost's metrics port");
}
