//! Serving a resource through Dynamic Resource Allocation instead of the
//! device plugin API (`docs/dra-api.md`): the names DRA needs.
//!
//! This is the first part of DRA support: names and configuration. The
//! kubelet plugin (registration through the plugin watcher, `DRAPlugin`,
//! `DRAResourceHealth`), claim preparation and ResourceSlices follow.

pub mod names;
