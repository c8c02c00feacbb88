//! The Allocate answer for a set of GPUs: the device nodes that exist
//! (`/dev/nvidia<minor>` per GPU, then the shared `nvidiactl`, `nvidia-uvm`
//! and `nvidia-uvm-tools`), `NVIDIA_VISIBLE_DEVICES` with the UUIDs, and
//! with CDI on, `nvidia.com/gpu=<UUID>` per GPU.
//!
//! Existence is checked under the configured `dev_root` (the host's `/dev`
//! as devhost sees it); the paths in the answer are the kubelet's, always
//! under `/dev`.

use std::path::Path;

use devhost_abi::sdk::{Allocation, DeviceSpec, Error};

use crate::model::Gpu;

/// The control nodes every GPU container needs, when present.
pub const SHARED_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// The CDI kind of whole GPUs.
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// Builds the answer for `ids`, each of which must be one of `gpus`.
pub fn allocation(gpus: &[Gpu], ids: &[String], dev_root: &Path, cdi: bool) -> Result<Allocation, Error> {
    let mut chosen = Vec::with_capacity(ids.len());
    for id in ids {
        let gpu = gpus
            .iter()
            .find(|gpu| &gpu.uuid == id)
            .ok_or_else(|| Error::new(format!("unknown GPU {id} (expected one of this backend's UUIDs)")))?;
        chosen.push(gpu);
    }
    let mut answer = Allocation::default();
    let nodes =
        chosen.iter().map(|gpu| format!("nvidia{}", gpu.minor)).chain(SHARED_NODES.iter().map(|n| (*n).to_owned()));
    for node in nodes {
        if dev_root.join(&node).exists() {
            let path = format!("/dev/{node}");
            answer.device_specs.push(DeviceSpec {
                container_path: path.clone(),
                host_path: path,
                permissions: "rw".into(),
            });
        }
    }
    let uuids: Vec<&str> = chosen.iter().map(|gpu| gpu.uuid.as_str()).collect();
    answer.envs.insert("NVIDIA_VISIBLE_DEVICES".into(), uuids.join(","));
    if cdi {
        answer.cdi_devices = uuids.iter().map(|uuid| format!("{CDI_KIND}={uuid}")).collect();
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, minor: u32) -> Gpu {
        Gpu {
            uuid: uuid.into(),
            index: minor,
            minor,
            bus_id: String::new(),
            numa_node: None,
            memory_bytes: 0,
            mig_enabled: Some(false),
            name: String::new(),
            details: Default::default(),
        }
    }

    fn dev(nodes: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for node in nodes {
            std::fs::write(dir.path().join(node), "").expect("fixture node");
        }
        dir
    }

    fn specs(answer: &Allocation) -> Vec<&str> {
        answer.device_specs.iter().map(|s| s.host_path.as_str()).collect()
    }

    #[test]
    fn the_answer_has_the_nodes_that_exist_and_the_uuids() {
        let gpus = [gpu("GPU-a", 0), gpu("GPU-b", 3)];
        let dev = dev(&["nvidia0", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"]);
        let ids = ["GPU-b".to_owned(), "GPU-a".to_owned()];
        let answer = allocation(&gpus, &ids, dev.path(), false).expect("answer");
        assert_eq!(
            specs(&answer),
            ["/dev/nvidia3", "/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
        );
        assert!(answer.device_specs.iter().all(|s| s.container_path == s.host_path && s.permissions == "rw"));
        assert_eq!(answer.envs.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str), Some("GPU-b,GPU-a"));
        assert_eq!(answer.envs.len(), 1);
        assert!(answer.cdi_devices.is_empty() && answer.mounts.is_empty() && answer.annotations.is_empty());
    }

    #[test]
    fn missing_nodes_are_left_out() {
        let gpus = [gpu("GPU-a", 0), gpu("GPU-b", 1)];
        let dev = dev(&["nvidia1", "nvidiactl"]);
        let answer = allocation(&gpus, &["GPU-a".into(), "GPU-b".into()], dev.path(), false).expect("answer");
        assert_eq!(specs(&answer), ["/dev/nvidia1", "/dev/nvidiactl"]);
    }

    #[test]
    fn cdi_names_are_added_when_enabled() {
        let gpus = [gpu("GPU-a", 0)];
        let dev = dev(&[]);
        let answer = allocation(&gpus, &["GPU-a".into()], dev.path(), true).expect("answer");
        assert_eq!(answer.cdi_devices, ["nvidia.com/gpu=GPU-a"]);
        assert!(answer.device_specs.is_empty());
    }

    #[test]
    fn an_unknown_id_is_refused_by_name() {
        let error =
            allocation(&[gpu("GPU-a", 0)], &["GPU-z".into()], Path::new("/nonexistent"), false).expect_err("unknown");
        assert_eq!(error.to_string(), "unknown GPU GPU-z (expected one of this backend's UUIDs)");
    }
}
