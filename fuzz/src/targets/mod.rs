//! The fuzz targets, each with its invariants.

use crate::Target;

pub mod cdi;
pub mod config;
pub mod grpc;
pub mod native_abi;
#[allow(unsafe_code)]
pub mod native_read;
pub mod plugin_watch;
pub mod resource_name;
pub mod wasm;
pub mod wasm_data;
pub mod worker_protocol;

/// Every target's name, in the order `all` runs them.
pub const NAMES: &[&str] = &[
    "resource-name",
    "config",
    "native-abi",
    "native-read",
    "wasm",
    "wasm-data",
    "grpc",
    "worker-protocol",
    "cdi",
    "plugin-watch",
];

/// Builds the target called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Target>, String> {
    Ok(match name {
        "resource-name" => Box::new(resource_name::ResourceName),
        "config" => Box::new(config::Config::new()?),
        "native-abi" => Box::new(native_abi::NativeAbi::new()?),
        "wasm" => Box::new(wasm::Wasm::new()?),
        "grpc" => Box::new(grpc::Grpc::new()?),
        "native-read" => Box::new(native_read::NativeRead),
        "wasm-data" => Box::new(wasm_data::WasmData::new()?),
        "worker-protocol" => Box::new(worker_protocol::WorkerProtocol),
        "cdi" => Box::new(cdi::Cdi::new()?),
        "plugin-watch" => Box::new(plugin_watch::PluginWatch::new()?),
        other => return Err(format!("unknown target {other:?}; targets: {}", NAMES.join(", "))),
    })
}
