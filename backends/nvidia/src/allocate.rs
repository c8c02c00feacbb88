//! The Allocate answer for a set of GPUs: the device nodes that exist
//! (`/dev/nvidia<minor>` per GPU, then the shared `nvidiactl`, `nvidia-uvm`
//! and `nvidia-uvm-tools`), `NVIDIA_VISIBLE_DEVICES` with the UUIDs, and
//! with CDI on, `nvidia.com/gpu=<UUID>` per GPU.
//!
//! A MIG partition (`mig = "partitions"`, [`crate::mig`]) gets its GPU's
//! device node and the shared nodes, and `NVIDIA_MIG_PROFILE`,
//! `NVIDIA_MIG_PLACEMENT` (`<start>:<size>` in memory slices) and
//! `NVIDIA_MIG_PARENT` (the GPU's UUID), one entry per partition, comma
//! separated, in the order of the IDs. No GPU instance is created for it,
//! so it has no MIG UUID, no `/dev/nvidia-caps` node and no CDI name; and
//! `NVIDIA_VISIBLE_DEVICES` names whole GPUs only (`void` when there are
//! none), so that the NVIDIA container runtime never hands the container
//! the whole GPU behind a partition.
//!
//! Existence is checked under the configured `dev_root` (the host's `/dev`
//! as devhost sees it); the paths in the answer are the kubelet's, always
//! under `/dev`.

use std::path::Path;

use devhost_abi::sdk::{Allocation, DeviceSpec, Error};

use crate::mig::{Layout, Partition};
use crate::model::Gpu;

/// The control nodes every GPU container needs, when present.
pub const SHARED_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// The CDI kind of whole GPUs.
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// The value of `NVIDIA_VISIBLE_DEVICES` when only partitions are
/// allocated: the NVIDIA container runtime then adds no GPU at all (an
/// image's own `NVIDIA_VISIBLE_DEVICES=all` would add every GPU).
pub const NO_VISIBLE_DEVICES: &str = "void";

/// Builds the answer for `ids`, each of which must be one of `gpus` (by
/// UUID) or one of the partitions in `layout`.
pub fn allocation(
    gpus: &[Gpu],
    layout: &Layout,
    ids: &[String],
    dev_root: &Path,
    cdi: bool,
) -> Result<Allocation, Error> {
    let mut chosen = Vec::with_capacity(ids.len());
    let mut partitions: Vec<(&Gpu, &Partition)> = Vec::new();
    for id in ids {
        if let Some(gpu) = gpus.iter().find(|gpu| &gpu.uuid == id) {
            chosen.push(gpu);
        } else if let Some(found) = layout.partition(gpus, id) {
            partitions.push(found);
        } else if layout.gpus.iter().any(Option::is_some) {
            return Err(Error::new(format!(
                "unknown device {id} (expected one of this backend's GPU UUIDs or MIG partition IDs)"
            )));
        } else {
            return Err(Error::new(format!("unknown GPU {id} (expected one of this backend's UUIDs)")));
        }
    }
    let mut answer = Allocation::default();
    let mut gpu_nodes: Vec<String> = Vec::new();
    for minor in chosen.iter().chain(partitions.iter().map(|(gpu, _)| gpu)).map(|gpu| gpu.minor) {
        let node = format!("nvidia{minor}");
        if !gpu_nodes.contains(&node) {
            gpu_nodes.push(node);
        }
    }
    let nodes = gpu_nodes.into_iter().chain(SHARED_NODES.iter().map(|n| (*n).to_owned()));
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
    let visible = if uuids.is_empty() { NO_VISIBLE_DEVICES.to_owned() } else { uuids.join(",") };
    answer.envs.insert("NVIDIA_VISIBLE_DEVICES".into(), visible);
    if !partitions.is_empty() {
        let list = |f: &dyn Fn(&Gpu, &Partition) -> String| {
            partitions.iter().map(|(gpu, p)| f(gpu, p)).collect::<Vec<_>>().join(",")
        };
        answer.envs.insert("NVIDIA_MIG_PROFILE".into(), list(&|_, p| p.profile.name.clone()));
        answer
            .envs
            .insert("NVIDIA_MIG_PLACEMENT".into(), list(&|_, p| format!("{}:{}", p.placement.start, p.placement.size)));
        answer.envs.insert("NVIDIA_MIG_PARENT".into(), list(&|gpu, _| gpu.uuid.clone()));
    }
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
        let answer = allocation(&gpus, &Layout::default(), &ids, dev.path(), false).expect("answer");
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
        let answer = allocation(&gpus, &Layout::default(), &["GPU-a".into(), "GPU-b".into()], dev.path(), false)
            .expect("answer");
        assert_eq!(specs(&answer), ["/dev/nvidia1", "/dev/nvidiactl"]);
    }

    #[test]
    fn cdi_names_are_added_when_enabled() {
        let gpus = [gpu("GPU-a", 0)];
        let dev = dev(&[]);
        let answer = allocation(&gpus, &Layout::default(), &["GPU-a".into()], dev.path(), true).expect("answer");
        assert_eq!(answer.cdi_devices, ["nvidia.com/gpu=GPU-a"]);
        assert!(answer.device_specs.is_empty());
    }

    #[test]
    fn an_unknown_id_is_refused_by_name() {
        let error =
            allocation(&[gpu("GPU-a", 0)], &Layout::default(), &["GPU-z".into()], Path::new("/nonexistent"), false)
                .expect_err("unknown");
        assert_eq!(error.to_string(), "unknown GPU GPU-z (expected one of this backend's UUIDs)");
    }
}
