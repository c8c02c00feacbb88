//! devhost: one Kubernetes device-plugin daemon for every accelerator on a
//! node.
//!
//! The parts, in the order data flows through them: [`config`] reads
//! `devhost.toml` and `backends.d/`; [`loader`] builds each backend
//! ([`native`] for shared libraries, run in [`worker`] processes); [`backend`] holds the one trait every
//! backend is adapted to, over the data of [`model`]; [`device_state`] keeps
//! each resource's latest device list; [`server`] serves one resource on its
//! own socket; [`registration`] talks to the kubelet and watches the plugin
//! directory for its restarts; [`daemon`] ties them together. [`sockets`]
//! is the floor every Unix-socket server and client stands on.
//! [`fake_kubelet`] is the kubelet's side, for tests, the demo and
//! conformance checks.

#![deny(unsafe_code)]

pub mod backend;
pub mod cdi;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod daemon;
pub mod demo;
pub mod device_info;
pub mod device_state;
pub mod dra;
pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod holders;
pub mod loader;
pub mod log_limit;
pub mod model;
#[allow(unsafe_code)]
pub mod native;
pub mod proto;
pub mod registration;
pub mod resource_name;
pub mod server;
pub mod sockets;
pub mod telemetry;
pub mod untrusted_file;
pub mod wasm;
pub mod worker;
