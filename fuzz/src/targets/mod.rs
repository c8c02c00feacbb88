//! The fuzz targets, each with its invariants.

use crate::Target;

pub mod config;
pub mod grpc;
pub mod native_abi;
pub mod resource_name;
pub mod wasm;

/// Every target's name, in the order `all` runs them.
pub const NAMES: &[&str] = &["resource-name", "config", "native-abi", "wasm", "grpc"];

/// Builds the target called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Target>, String> {
    Ok(match name {
        "resource-name" => Box::new(resource_name::ResourceName),
        "config" => Box::new(config::Config::new()?),
        "native-abi" => Box::new(native_abi::NativeAbi::new()?),
        "wasm" => Box::new(wasm::Wasm::new()?),
        "grpc" => Box::new(grpc::Grpc::new()?),
        other => return Err(format!("unknown target {other:?}; targets: {}", NAMES.join(", "))),
    })
}
