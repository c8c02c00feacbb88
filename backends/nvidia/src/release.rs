//! Releasing GPUs (ABI 1.1), with `reset_on_release` on: devhost calls
//! `release` once no container holds a GPU any more, and each released GPU
//! is reset for the next tenant, but only when NVML shows no process with
//! it open (a container that is still being torn down, or a process on
//! the host): resetting a GPU under a running process would kill its work
//! and can wedge the driver. A GPU that is still busy, or whose reset
//! fails, makes the call fail with the reason; devhost keeps it Unhealthy
//! and calls `release` again later, so a busy GPU is reset once it is idle.

use devhost_abi::sdk::{Error, LogLevel};

use crate::health::Sink;
use crate::model::{Gpu, GpuSource};

/// Resets every GPU of `ids` that is idle, logging each reset through
/// `sink`. The GPUs are tried in turn, so one that fails does not keep the
/// others from being reset; the error names every GPU that was not reset,
/// and why.
pub fn reset_idle(source: &dyn GpuSource, sink: &dyn Sink, gpus: &[Gpu], ids: &[String]) -> Result<(), Error> {
    let mut failures = Vec::new();
    for id in ids {
        let Some(gpu) = gpus.iter().find(|gpu| &gpu.uuid == id) else {
            failures.push(format!("unknown GPU {id} (expected one of this backend's UUIDs)"));
            continue;
        };
        match source.processes(id) {
            Ok(pids) if pids.is_empty() => {}
            Ok(pids) => {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                failures.push(format!("GPU {id} was not reset: process(es) {} still have it open", pids.join(", ")));
                continue;
            }
            Err(error) => {
                failures.push(format!("GPU {id} was not reset: NVML cannot tell whether it is idle: {error}"));
                continue;
            }
        }
        match source.reset(gpu) {
            Ok(()) => sink.log(LogLevel::Info, &format!("GPU {id} was reset after its release")),
            Err(error) => failures.push(format!("resetting GPU {id} failed: {error}")),
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(Error::new(failures.join("; "))) }
}
