//! Serving a resource through Dynamic Resource Allocation instead of the
//! device plugin API (`docs/dra-api.md`).
//!
//! Built so far: the names DRA needs (`names`) and the kubelet side of a
//! driver (`plugin`: registration through the plugin watcher, `DRAPlugin`
//! in both packages, `DRAResourceHealth` fed by the device state). Not yet:
//! reading claims from the API server (so `NodePrepareResources` answers
//! each claim with an error saying so), CDI specs per claim, the checkpoint,
//! ResourceSlices, and the daemon serving `api = "dra"` resources with it.

pub mod names;
pub mod plugin;
