//! Serving a resource through Dynamic Resource Allocation instead of the
//! device plugin API (`docs/dra-api.md`).
//!
//! Parts: the names DRA needs (`names`); the kubelet side of a driver
//! (`plugin`: registration through the plugin watcher, `DRAPlugin` in both
//! packages, `DRAResourceHealth` fed by the device state); claims prepared
//! through the backend into a CDI spec per claim (`prepare`), remembered in
//! an on-disk checkpoint (`checkpoint`); the ResourceSlice objects of a
//! driver's pool (`slices`) and their publisher (`publish`). The daemon
//! runs them per resource (`daemon::dra`).

pub mod checkpoint;
pub mod names;
pub mod plugin;
pub mod prepare;
pub mod publish;
pub mod slices;
