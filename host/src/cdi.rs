//! CDI spec files for resources served with `cdi = true`: devhost writes one
//! spec per resource (kind = the resource name, one CDI device per real
//! device) into the CDI directory, keeps it current as devices come and go,
//! and removes it when the resource stops. Allocate then answers with CDI
//! names, and the container runtime applies the edits from the spec.
//!
//! A device's edits are what the backend's `allocate` answers for that one
//! device (envs, device nodes, mounts), learned once per device ID.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::handle::BackendHandle;
use crate::device_state::ResourceState;
use crate::model::Allocation;
use crate::server::socket::sanitise;

/// The CDI specification version the files declare.
pub const CDI_VERSION: &str = "0.6.0";

/// The CDI name of a device of `resource`: `<resource>=<device>`.
pub fn device_name(resource: &str, device: &str) -> String {
    format!("{resource}={device}")
}

/// Whether `resource` can be a CDI kind and `device` a CDI device name
/// (vendor and class start with a letter; names use `A-Za-z0-9_-.:`).
pub fn check_names(resource: &str, device: Option<&str>) -> Result<(), String> {
    let part = |text: &str, first_letter: bool, extra: &[u8]| {
        let bytes = text.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| if first_letter { b.is_ascii_alphabetic() } else { b.is_ascii_alphanumeric() });
        first_ok
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
    };
    let kind_ok =
        resource.split_once('/').is_some_and(|(vendor, class)| part(vendor, true, b"_-.") && part(class, true, b"_-."));
    if !kind_ok {
        return Err(format!("resource {resource:?} cannot be a CDI kind (vendor/class, each starting with a letter)"));
    }
    match device {
        Some(device) if !part(device, false, b"_-.:") => {
            Err(format!("device ID {device:?} cannot be a CDI device name (letters, digits, '_', '-', '.', ':')"))
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Serialize, PartialEq)]
struct Spec {
    #[serde(rename = "cdiVersion")]
    cdi_version: &'static str,
    kind: String,
    devices: Vec<SpecDevice>,
}

#[derive(Debug, Serialize, PartialEq)]
struct SpecDevice {
    name: String,
    #[serde(rename = "containerEdits")]
    container_edits: ContainerEdits,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
struct ContainerEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(rename = "deviceNodes", skip_serializing_if = "Vec::is_empty")]
    device_nodes: Vec<DeviceNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<SpecMount>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct DeviceNode {
    path: String,
    #[serde(rename = "hostPath")]
    host_path: String,
    permissions: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct SpecMount {
    #[serde(rename = "hostPath")]
    host_path: String,
    #[serde(rename = "containerPath")]
    container_path: String,
    options: Vec<&'static str>,
}

fn edits(allocation: &Allocation) -> ContainerEdits {
    ContainerEdits {
        env: allocation.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        device_nodes: allocation
            .device_specs
            .iter()
            .map(|d| DeviceNode {
                path: d.container_path.clone(),
                host_path: d.host_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: allocation
            .mounts
            .iter()
            .map(|m| SpecMount {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                options: if m.read_only { vec!["rbind", "ro"] } else { vec!["rbind", "rw"] },
            })
            .collect(),
    }
}

/// The spec file of `resource` served by `backend` in `dir`.
pub fn spec_path(dir: &Path, backend: &str, resource: &str) -> PathBuf {
    dir.join(format!("devhost-{}-{}.json", sanitise(backend), sanitise(resource)))
}

/// Keeps the spec file of one resource current until `stop`, then removes it.
pub async fn maintain(
    dir: PathBuf,
    resource: String,
    state: Arc<ResourceState>,
    backend: Arc<BackendHandle>,
    stop: CancellationToken,
) {
    let path = spec_path(&dir, backend.name(), &resource);
    let mut learned: BTreeMap<String, ContainerEdits> = BTreeMap::new();
    let mut written: Option<Spec> = None;
    let mut changes = state.subscribe();
    loop {
        let ids: Vec<String> = changes.borrow_and_update().devices.iter().map(|d| d.id.clone()).collect();
        learned.retain(|id, _| ids.contains(id));
        for id in &ids {
            if learned.contains_key(id) {
                continue;
            }
            if let Err(message) = check_names(&resource, Some(id)) {
                tracing::error!(resource, device_id = %id, "left out of the CDI spec: {message}");
                continue;
            }
            match backend.allocate(&resource, vec![id.clone()]).await {
                Ok(allocation) => {
                    learned.insert(id.clone(), edits(&allocation));
                }
                Err(error) => {
                    tracing::warn!(resource, device_id = %id, %error, "cannot learn the device's CDI edits yet")
                }
            }
        }
        let spec = Spec {
            cdi_version: CDI_VERSION,
            kind: resource.clone(),
            devices: ids
                .iter()
                .filter_map(|id| learned.get(id).map(|edits| (id, edits)))
                .map(|(id, edits)| SpecDevice { name: id.clone(), container_edits: edits.clone() })
                .collect(),
        };
        if written.as_ref() != Some(&spec) {
            match write_atomically(&path, &spec) {
                Ok(()) => {
                    tracing::info!(resource, file = %path.display(), devices = spec.devices.len(), "CDI spec written")
                }
                Err(error) => tracing::error!(resource, file = %path.display(), %error, "cannot write the CDI spec"),
            }
            written = Some(spec);
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(resource, file = %path.display(), "CDI spec removed"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(resource, file = %path.display(), %error, "cannot remove the CDI spec"),
    }
}

/// Writes through a temporary file and a rename, so a runtime never reads
/// half a spec.
fn write_atomically(path: &Path, spec: &Spec) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, &text)?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdi_names_follow_the_specification() {
        assert_eq!(check_names("example.com/gpu", Some("GPU-0:1_a.b")), Ok(()));
        assert!(check_names("1example.com/gpu", None).is_err(), "vendor starts with a letter");
        assert!(check_names("example.com/9gpu", None).is_err(), "class starts with a letter");
        assert!(check_names("example.com/gpu", Some("-x")).is_err());
        assert!(check_names("example.com/gpu", Some("a/b")).is_err());
        assert_eq!(device_name("example.com/gpu", "gpu-0"), "example.com/gpu=gpu-0");
        assert_eq!(
            spec_path(Path::new("/var/run/cdi"), "gpu", "example.com/gpu"),
            Path::new("/var/run/cdi/devhost-gpu-example.com_gpu.json")
        );
    }
}
