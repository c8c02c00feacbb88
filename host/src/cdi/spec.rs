//! The CDI spec file format, as devhost writes it and as it reads any spec
//! (its own and vendors') back: kind, devices with their container edits,
//! annotations. Only what devhost needs is modelled; a spec's other edits
//! (hooks, net devices, …) are noted, not kept.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::Allocation;

/// The CDI specification version the files declare (0.6.0 is the first
/// with annotations, which devhost uses to say who wrote an entry).
pub const CDI_VERSION: &str = "0.6.0";

/// One spec file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Spec {
    /// The specification version the file follows.
    #[serde(rename = "cdiVersion", default)]
    pub cdi_version: String,
    /// `vendor/class`: the part of every device's name before `=`.
    #[serde(default)]
    pub kind: String,
    /// Metadata (not applied to containers).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The devices.
    #[serde(default)]
    pub devices: Vec<SpecDevice>,
    /// Edits applied once for any device of the spec (devhost writes none).
    #[serde(rename = "containerEdits", default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One device of a spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SpecDevice {
    /// The part of its name after `=`.
    #[serde(default)]
    pub name: String,
    /// Metadata (not applied to containers).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// What it does to a container.
    #[serde(rename = "containerEdits", default)]
    pub container_edits: ContainerEdits,
}

/// What CDI does to a container for one device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ContainerEdits {
    /// `NAME=value` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes.
    #[serde(rename = "deviceNodes", default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// Bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<SpecMount>,
    /// Hooks, net devices, RDT, extra GIDs: edits devhost never writes and
    /// cannot express in a plain Allocate answer.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl ContainerEdits {
    /// Whether the edits do nothing.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.device_nodes.is_empty() && self.mounts.is_empty() && !self.has_other()
    }

    /// Whether there are edits beyond environment, device nodes and mounts.
    pub fn has_other(&self) -> bool {
        self.other.values().any(|value| !(value.is_null() || value.as_array().is_some_and(Vec::is_empty)))
    }
}

/// A device node of a spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DeviceNode {
    /// Path in the container.
    #[serde(default)]
    pub path: String,
    /// Path on the host (`path` when empty).
    #[serde(rename = "hostPath", default, skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    /// cgroup permissions: of `r`, `w`, `m`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub permissions: String,
    /// Type, numbers, owner, mode: read, never written.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A mount of a spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SpecMount {
    /// Path on the host.
    #[serde(rename = "hostPath", default)]
    pub host_path: String,
    /// Path in the container.
    #[serde(rename = "containerPath", default)]
    pub container_path: String,
    /// Mount options (`rbind`, `ro`/`rw`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Type and the like: read, never written.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl SpecMount {
    /// Whether CDI mounts it read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|option| option == "ro")
    }
}

/// All the edits of an Allocate answer: what a DRA claim's CDI device
/// carries (DRA has no other way to hand them to the container).
pub fn all_edits(allocation: &Allocation) -> ContainerEdits {
    ContainerEdits {
        env: allocation.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        ..device_edits(allocation)
    }
}

/// The per-device edits of a single-device Allocate answer: its device
/// nodes and mounts. Environment variables stay out: a backend's variables
/// describe the whole allocation (`EXAMPLE_ACCELERATORS=acc-0,acc-1`), and
/// CDI keeps only the last device's value of a variable several devices
/// set, so they travel in the answer's plain fields.
pub fn device_edits(allocation: &Allocation) -> ContainerEdits {
    ContainerEdits {
        env: Vec::new(),
        device_nodes: allocation
            .device_specs
            .iter()
            .map(|d| DeviceNode {
                path: d.container_path.clone(),
                host_path: d.host_path.clone(),
                permissions: d.permissions.clone(),
                other: BTreeMap::new(),
            })
            .collect(),
        mounts: allocation
            .mounts
            .iter()
            .map(|m| SpecMount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                options: vec!["rbind".into(), if m.read_only { "ro" } else { "rw" }.into()],
                other: BTreeMap::new(),
            })
            .collect(),
        other: BTreeMap::new(),
    }
}

/// Why CDI would refuse a device with these edits (the CDI project's
/// device validation: env entries `NAME=value` with a name, device node
/// and mount paths present, permissions of `r`, `w`, `m`); a spec holding
/// such a device is refused whole. `allocation` is the answer they came
/// from (an env name with `=` cannot be written as an entry).
pub fn invalid_edits(allocation: &Allocation, edits: &ContainerEdits) -> Option<String> {
    if let Some(name) = allocation.envs.keys().find(|name| name.contains('=')) {
        return Some(format!("environment variable {name:?} has '=' in its name"));
    }
    if let Some(env) = edits.env.iter().find(|env| env.split_once('=').is_none_or(|(name, _)| name.is_empty())) {
        return Some(format!("environment entry {env:?} has no variable name"));
    }
    if let Some(node) = edits.device_nodes.iter().find(|node| node.path.is_empty()) {
        return Some(format!("device node {:?} has no path in the container", node.host_path));
    }
    if let Some(node) =
        edits.device_nodes.iter().find(|node| !node.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')))
    {
        return Some(format!("device node {:?} has permissions {:?}, not of r, w, m", node.path, node.permissions));
    }
    if let Some(mount) = edits.mounts.iter().find(|mount| mount.host_path.is_empty() || mount.container_path.is_empty())
    {
        return Some(format!("mount {:?} → {:?} has an empty path", mount.host_path, mount.container_path));
    }
    None
}

/// Parses a spec file's text: JSON for `.json`, YAML otherwise (as the
/// CDI library, which reads both through YAML).
pub fn parse(path: &Path, text: &[u8]) -> Result<Spec, String> {
    if path.extension().is_some_and(|ext| ext == "json") {
        serde_json::from_slice(text).map_err(|error| error.to_string())
    } else {
        serde_norway::from_slice(text).map_err(|error| error.to_string())
    }
}

/// Writes through a temporary file and a rename, so a runtime never reads
/// half a spec.
pub fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        // Runtimes read it whatever devhost's umask.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, text)?;
    // Readable by the container runtime whatever devhost's umask.
    file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceSpec, Mount};

    #[test]
    fn edits_cdi_would_refuse_are_named() {
        let plain = Allocation::default();
        let node = |path: &str, permissions: &str| DeviceNode {
            path: path.into(),
            host_path: "/dev/null".into(),
            permissions: permissions.into(),
            ..DeviceNode::default()
        };
        let ok = ContainerEdits { env: vec!["A=1".into()], ..ContainerEdits::default() };
        assert_eq!(invalid_edits(&plain, &ok), None);
        let bad_env = ContainerEdits { env: vec!["=1".into()], ..ContainerEdits::default() };
        assert!(invalid_edits(&plain, &bad_env).is_some_and(|w| w.contains("no variable name")));
        let bad_node = ContainerEdits { device_nodes: vec![node("", "rw")], ..ContainerEdits::default() };
        assert!(invalid_edits(&plain, &bad_node).is_some_and(|w| w.contains("no path in the container")));
        let bad_perm = ContainerEdits { device_nodes: vec![node("/dev/x", "rwx")], ..ContainerEdits::default() };
        assert!(invalid_edits(&plain, &bad_perm).is_some_and(|w| w.contains("not of r, w, m")));
        let renamed = Allocation { envs: [("A=B".to_owned(), "1".to_owned())].into(), ..Allocation::default() };
        assert!(invalid_edits(&renamed, &ok).is_some_and(|w| w.contains("'=' in its name")));
    }

    #[test]
    fn device_edits_leave_the_environment_to_the_plain_answer() {
        let allocation = Allocation {
            envs: [("IDS".to_owned(), "a".to_owned())].into(),
            device_specs: vec![DeviceSpec {
                container_path: "/dev/a".into(),
                host_path: "/dev/null".into(),
                permissions: "rw".into(),
            }],
            mounts: vec![Mount { container_path: "/opt".into(), host_path: "/usr".into(), read_only: true }],
            ..Allocation::default()
        };
        let edits = device_edits(&allocation);
        assert!(edits.env.is_empty());
        assert_eq!(edits.device_nodes[0].path, "/dev/a");
        assert!(edits.mounts[0].read_only());
        assert_eq!(all_edits(&allocation).env, ["IDS=a"]);
    }

    #[test]
    fn specs_read_back_as_written_and_vendor_yaml_parses() {
        let spec = Spec {
            cdi_version: CDI_VERSION.into(),
            kind: "a.io/dev".into(),
            annotations: [("devhost.io/writer".to_owned(), "w".to_owned())].into(),
            devices: vec![SpecDevice { name: "d".into(), ..SpecDevice::default() }],
            container_edits: ContainerEdits::default(),
        };
        let text = serde_json::to_vec(&spec).expect("encode");
        assert_eq!(parse(Path::new("x.json"), &text), Ok(spec));
        let yaml = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"0\"\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\ncontainerEdits:\n  hooks:\n  - hookName: createContainer\n    path: /usr/bin/nvidia-cdi-hook\n";
        let vendor = parse(Path::new("nvidia.yaml"), yaml.as_bytes()).expect("vendor YAML");
        assert_eq!(vendor.devices[0].name, "0");
        assert_eq!(vendor.devices[0].container_edits.device_nodes[0].path, "/dev/nvidia0");
        assert!(vendor.container_edits.has_other(), "hooks are noted");
    }
}
