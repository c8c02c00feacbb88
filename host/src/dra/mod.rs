//! Serving a resource through Dynamic Resource Allocation instead of the
//! device plugin API (`docs/dra-api.md`).
//!
//! Built so far: the names DRA needs (`names`), the kubelet side of a
//! driver (`plugin`: registration through the plugin watcher, `DRAPlugin`
//! in both packages, `DRAResourceHealth` fed by the device state), the
//! ResourceSlice objects of a driver's pool (`slices`), and the on-disk
//! checkpoint of prepared claims (`checkpoint`). Not yet: the API-server
//! client (publishing the slices, reading claims, so that
//! `NodePrepareResources` answers each claim with an error saying so),
//! preparing through the backend with a CDI spec per claim, and the daemon
//! serving `api = "dra"` resources with all of it.

pub mod checkpoint;
pub mod names;
pub mod plugin;
pub mod slices;
