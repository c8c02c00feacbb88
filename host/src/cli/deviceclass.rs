//! `devhost deviceclass`: the DRA DeviceClass of each resource a backends.d
//! file (or directory) serves through DRA, as YAML for `kubectl apply`.
//!
//! Each class selects its resource's devices by driver and sets
//! `spec.extendedResourceName` to the resource's device-plugin name
//! (KEP-5004, DRA extended resources: beta and on by default from
//! Kubernetes 1.36). The scheduler then satisfies a container's
//! `resources.limits: {example.com/gpu: 1}` from DRA devices on nodes where
//! the resource is served through DRA, and from the device plugin's
//! allocatable elsewhere: a node moves from device plugin to DRA without a
//! change to any pod spec (docs/operator-guide.md, "Moving a node from
//! device plugin to DRA").
//!
//! The class is named after the driver (a DNS subdomain, so a valid
//! DeviceClass name, and stable: it is the driver name written in the file
//! or derived from the resource name, `example.com/gpu` →
//! `gpu.example.com`). The Helm chart's `templates/deviceclasses.yaml`
//! renders the same classes from the chart's `backends` values.
//!
//! This module reads files only: it starts no backend and needs no module
//! file on the machine it runs on (a module's resources served through DRA
//! are all named by its `[resources."<name>"]` tables).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::config::{BackendConfig, BackendSource, ConfigError};

/// The API version printed unless `--api-version` says otherwise: DRA's GA
/// version, served from Kubernetes 1.34.
pub const DEFAULT_API_VERSION: &str = "resource.k8s.io/v1";

/// The versions of `resource.k8s.io` whose DeviceClass has the same shape
/// (`spec.selectors[].cel.expression` and `spec.extendedResourceName`).
pub const API_VERSIONS: &[&str] = &["resource.k8s.io/v1", "resource.k8s.io/v1beta2", "resource.k8s.io/v1beta1"];

/// One DeviceClass object, serialized with the Kubernetes field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceClass {
    /// `resource.k8s.io/v1` (or a beta version of the same shape).
    pub api_version: String,
    /// Always `DeviceClass`.
    pub kind: &'static str,
    /// The class's name.
    pub metadata: Metadata,
    /// What it selects and which extended resource it stands for.
    pub spec: Spec,
}

/// `metadata` of a [`DeviceClass`]: only its name (cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metadata {
    /// [`class_name`] of the driver.
    pub name: String,
}

/// `spec` of a [`DeviceClass`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// One CEL selector: the devices of the resource's driver.
    pub selectors: Vec<Selector>,
    /// The resource's device-plugin name (`example.com/gpu`).
    pub extended_resource_name: String,
}

/// One entry of `spec.selectors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selector {
    /// The CEL selector.
    pub cel: Cel,
}

/// A CEL selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cel {
    /// `device.driver == "<driver>"`.
    pub expression: String,
}

/// The DeviceClass name for `driver`: the driver name itself. A driver
/// name is a DNS subdomain of at most 253 characters (the config refuses
/// any other), exactly what a DeviceClass name must be; and one class per
/// driver is what selecting by driver gives.
pub fn class_name(driver: &str) -> String {
    driver.to_owned()
}

/// The class of `resource` served by DRA `driver`, as `api_version`.
pub fn device_class(resource: &str, driver: &str, api_version: &str) -> DeviceClass {
    DeviceClass {
        api_version: api_version.to_owned(),
        kind: "DeviceClass",
        metadata: Metadata { name: class_name(driver) },
        spec: Spec {
            // Driver names are DNS subdomains: no quote or backslash to
            // escape inside the CEL string literal.
            selectors: vec![Selector { cel: Cel { expression: format!("device.driver == \"{driver}\"") } }],
            extended_resource_name: resource.to_owned(),
        },
    }
}

/// `classes` as a multi-document YAML stream, one `---` before each.
pub fn to_yaml(classes: &[DeviceClass]) -> Result<String, serde_norway::Error> {
    let mut text = String::new();
    for class in classes {
        text.push_str("---\n");
        text.push_str(&serde_norway::to_string(class)?);
    }
    Ok(text)
}

/// What a set of backend files gives: the classes, a note for each
/// resource served as a device plugin, and every error.
#[derive(Debug, Default)]
pub struct Classes {
    /// One class per resource served through DRA, in file then name order.
    pub classes: Vec<DeviceClass>,
    /// `<resource> (<file>)` of each resource served as a device plugin.
    pub device_plugin_only: Vec<String>,
    /// Files refused by the config parser, and conflicts between classes.
    pub errors: Vec<String>,
}

/// The classes of every backend file at `path` (a file, or a backends.d
/// directory: its `*.toml` files that are not hidden, in name order).
pub fn classes_at(path: &Path, api_version: &str) -> Classes {
    let mut result = Classes::default();
    let files = match backend_files(path) {
        Ok(files) => files,
        Err(error) => {
            result.errors.push(error.to_string());
            return result;
        }
    };
    // Which resource and file gave each class, to refuse a second class of
    // the same name or extended resource.
    let mut by_name: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    let mut by_resource: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in files {
        let backend = match crate::config::read_config_file(&file)
            .and_then(|source| crate::config::parse_backend(&file, &source, PARSE_TIMEOUT))
        {
            Ok(backend) => backend,
            Err(error) => {
                result.errors.push(error.to_string());
                continue;
            }
        };
        for (resource, driver) in served(&backend) {
            let Some(driver) = driver else {
                result.device_plugin_only.push(format!("{resource} ({})", file.display()));
                continue;
            };
            let class = device_class(&resource, &driver, api_version);
            let name = class.metadata.name.clone();
            if let Some((other, other_file)) = by_name.get(&name) {
                result.errors.push(format!(
                    "{}: resource {resource:?} has driver {driver:?}, as {other:?} has in {}: a DeviceClass \
                     selecting by driver cannot tell their devices apart; give each its own driver",
                    file.display(),
                    other_file.display()
                ));
                continue;
            }
            if let Some(other_file) = by_resource.get(&resource) {
                result.errors.push(format!(
                    "{}: resource {resource:?} is also served in {}: one DeviceClass per extended resource",
                    file.display(),
                    other_file.display()
                ));
                continue;
            }
            by_name.insert(name, (resource.clone(), file.clone()));
            by_resource.insert(resource, file.clone());
            result.classes.push(class);
        }
    }
    result
}

/// Every resource of `backend` the file names, with its DRA driver
/// (`None`: served as a device plugin), in name order.
fn served(backend: &BackendConfig) -> BTreeMap<String, Option<String>> {
    let mut resources: BTreeMap<String, Option<String>> =
        backend.resources.iter().map(|(name, settings)| (name.clone(), settings.dra_driver.clone())).collect();
    // A static backend declares its resources; one without a
    // `[resources]` table is a device plugin. A module's others are known
    // only once it runs, and are device plugins too (DRA needs the table).
    if let BackendSource::Static(config) = &backend.source {
        for (name, _) in config.resource_names() {
            resources.entry(name.to_owned()).or_insert(None);
        }
    }
    resources
}

/// The deadline handed to the parser: unused here (nothing is called).
const PARSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend files at `path`: itself if it is not a directory, else the
/// directory's `*.toml` files that are not hidden, in name order (the
/// daemon's rule for backends.d).
fn backend_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let cannot =
        |error: std::io::Error| ConfigError::file(path, format!("cannot read the backends directory: {error}"));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(cannot)? {
        let file = entry.map_err(cannot)?.path();
        let name = file.file_name().and_then(|name| name.to_str()).unwrap_or("");
        if !name.starts_with('.') && file.extension().is_some_and(|ext| ext == "toml") && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// `devhost deviceclass PATH [--api-version V]`: the classes on stdout; on
/// stderr a note for each device-plugin resource and every error. Exit 1
/// if any error (the classes that could be made are printed all the same).
pub fn run(path: &Path, api_version: &str) -> ExitCode {
    let Classes { classes, device_plugin_only, errors } = classes_at(path, api_version);
    for resource in &device_plugin_only {
        eprintln!(
            "devhost deviceclass: {resource}: served as a device plugin (no api = \"dra\"): no DRA driver, no DeviceClass"
        );
    }
    match to_yaml(&classes) {
        Ok(text) => print!("{text}"),
        Err(error) => {
            eprintln!("devhost deviceclass: cannot write YAML: {error}");
            return ExitCode::FAILURE;
        }
    }
    if classes.is_empty() && errors.is_empty() {
        eprintln!("devhost deviceclass: no resource in {} is served through DRA", path.display());
    }
    for error in &errors {
        eprintln!("error: {error}");
    }
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    const STATIC: &str = "[backend]\nkind = \"static\"\n\n[[config.resource]]\nname = \"example.com/gpu\"\n\
        [[config.resource.device]]\nid = \"gpu-0\"\n\n[[config.resource]]\nname = \"example.com/fuse\"\n\
        [[config.resource.device]]\nid = \"fuse-0\"\n\n[resources.\"example.com/gpu\"]\napi = \"dra\"\n";

    #[test]
    fn a_class_is_named_after_its_driver_and_selects_it() {
        let class = device_class("example.com/gpu", "gpu.example.com", DEFAULT_API_VERSION);
        assert_eq!(class.metadata.name, "gpu.example.com");
        assert!(crate::dra::names::is_dns_subdomain(&class.metadata.name));
        assert_eq!(class.spec.selectors[0].cel.expression, "device.driver == \"gpu.example.com\"");
        assert_eq!(class.spec.extended_resource_name, "example.com/gpu");
        let yaml = to_yaml(&[class]).expect("YAML");
        assert!(yaml.starts_with("---\napiVersion: resource.k8s.io/v1\nkind: DeviceClass\n"), "{yaml}");
        assert!(yaml.contains("extendedResourceName: example.com/gpu"), "{yaml}");
    }

    #[test]
    fn only_dra_resources_get_a_class_with_the_derived_or_written_driver() {
        let module = "[backend]\nmodule = \"/nowhere/libgpu.so\"\n\n[resources.\"acme.io/npu\"]\napi = \"dra\"\n\
            driver = \"npu.drivers.acme.io\"\n\n[resources.\"acme.io/vf\"]\nreplicas = 2\n";
        let dir = backends(&[("a.toml", STATIC), ("b.toml", module), (".hidden.toml", "broken"), ("c.txt", "x")]);
        let found = classes_at(dir.path(), DEFAULT_API_VERSION);
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        let pairs: Vec<(&str, &str)> = found
            .classes
            .iter()
            .map(|class| (class.metadata.name.as_str(), class.spec.extended_resource_name.as_str()))
            .collect();
        // The module file is missing here: generating classes does not
        // need it.
        assert_eq!(pairs, [("gpu.example.com", "example.com/gpu"), ("npu.drivers.acme.io", "acme.io/npu")]);
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        assert_eq!(
            found.device_plugin_only,
            [format!("example.com/fuse ({})", a.display()), format!("acme.io/vf ({})", b.display())]
        );
        // One file, and another API version of the same shape.
        let one = classes_at(&a, "resource.k8s.io/v1beta2");
        assert_eq!(one.classes.len(), 1);
        assert_eq!(one.classes[0].api_version, "resource.k8s.io/v1beta2");
    }

    #[test]
    fn broken_files_give_the_configs_own_message_and_conflicts_are_refused() {
        let bad = "[backend]\nkind = \"static\"\n[[config.resource]]\nname = \"a.io/x\"\n[[config.resource.device]]\n\
            id = \"x\"\n[resources.\"a.io/x\"]\napi = \"dra\"\ndriver = \"X\"\n";
        let dir = backends(&[("a.toml", STATIC), ("bad.toml", bad)]);
        let found = classes_at(dir.path(), DEFAULT_API_VERSION);
        let file = dir.path().join("bad.toml");
        let parsed = crate::config::parse_backend(&file, bad, PARSE_TIMEOUT).expect_err("refused").to_string();
        assert_eq!(found.errors, std::slice::from_ref(&parsed));
        assert!(parsed.contains("9:10: driver \"X\" is not a DNS subdomain"), "{parsed}");
        assert_eq!(found.classes.len(), 1, "the good file's class is still made");

        // Two resources with one driver: the second is refused.
        let same_driver =
            format!("{STATIC}[resources.\"example.com/fuse\"]\napi = \"dra\"\ndriver = \"gpu.example.com\"\n");
        let dir = backends(&[("a.toml", &same_driver)]);
        let found = classes_at(dir.path(), DEFAULT_API_VERSION);
        assert_eq!(found.classes.len(), 1);
        assert!(
            found.errors[0].contains("has driver \"gpu.example.com\", as \"example.com/fuse\""),
            "{:?}",
            found.errors
        );

        let missing = classes_at(&dir.path().join("none.toml"), DEFAULT_API_VERSION);
        assert!(
            missing.errors[0].contains("none.toml") && missing.errors[0].contains("cannot read"),
            "{:?}",
            missing.errors
        );
    }

    /// The YAML deserializes into k8s-openapi's `resource.k8s.io/v1`
    /// DeviceClass (the v1.34 types this crate builds with; the v1.36 and
    /// v1.37 DeviceClassSpec has the same fields) and serializes back to
    /// the same value. k8s-openapi ignores unknown fields, so a misspelt
    /// field would be dropped on the way and the comparison would fail:
    /// this proves every field name.
    #[test]
    fn the_yaml_round_trips_through_k8s_openapis_device_class() {
        use k8s_openapi::api::resource::v1::DeviceClass as Api;
        let dir = backends(&[("a.toml", STATIC)]);
        let found = classes_at(dir.path(), DEFAULT_API_VERSION);
        let yaml = to_yaml(&found.classes).expect("YAML");
        let ours: serde_json::Value =
            serde_norway::from_str(yaml.trim_start_matches("---\n")).expect("our YAML parses");
        let typed: Api = serde_norway::from_str(yaml.trim_start_matches("---\n")).expect("a DeviceClass");
        assert_eq!(typed.spec.extended_resource_name.as_deref(), Some("example.com/gpu"));
        assert_eq!(serde_json::to_value(&typed).expect("JSON"), ours, "a field was lost: a misspelt name");

        // The check can fail: a misspelt field is lost on the way.
        let misspelt = yaml.replace("extendedResourceName", "extendedResource");
        let ours: serde_json::Value = serde_norway::from_str(misspelt.trim_start_matches("---\n")).expect("YAML");
        let typed: Api = serde_norway::from_str(misspelt.trim_start_matches("---\n")).expect("still parses");
        assert_ne!(serde_json::to_value(&typed).expect("JSON"), ours);
    }

    #[test]
    fn every_class_has_a_valid_extended_resource_name() {
        // The config refuses any resource name the kubelet would (the same
        // rule, IsExtendedResourceName, as the API server applies to
        // extendedResourceName): `kubernetes.io/` names never get here.
        let refused = STATIC.replace("example.com/gpu", "kubernetes.io/gpu");
        let dir = backends(&[("a.toml", &refused)]);
        let found = classes_at(dir.path(), DEFAULT_API_VERSION);
        assert!(found.classes.is_empty());
        assert!(found.errors[0].contains("must not contain \"kubernetes.io/\""), "{:?}", found.errors);
        let dir = backends(&[("a.toml", STATIC)]);
        for class in classes_at(dir.path(), DEFAULT_API_VERSION).classes {
            crate::resource_name::validate(&class.spec.extended_resource_name).expect("valid");
        }
    }
}
