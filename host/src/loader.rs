//! Turns a validated backend file into a running [`Backend`]: the built-in
//! kinds, or a module loaded by the adapter for its kind (a native library
//! through [`crate::native`], a WASM component through [`crate::wasm`]).
//! The only place that knows which kinds exist; everything above it sees
//! the trait.

use std::sync::Arc;

use crate::backend::Backend;
use crate::backend::static_backend::StaticBackend;
use crate::config::{BackendConfig, BackendSource};

/// Builds the backend `config` describes. The error says what failed, in
/// the adapter's words (each names the module file).
pub fn load(config: &BackendConfig) -> Result<Arc<dyn Backend>, String> {
    match &config.source {
        BackendSource::Static(static_config) => Ok(Arc::new(StaticBackend::new(static_config.clone()))),
        BackendSource::Module { path, sha256, wasm } => {
            let settings = serde_json::to_string(&config.settings)
                .map_err(|error| format!("cannot pass [config] to the module as JSON: {error}"))?;
            match wasm {
                Some(sandbox) => crate::wasm::load(crate::wasm::WasmModule {
                    name: config.name.clone(),
                    path: path.clone(),
                    sha256: sha256.clone(),
                    config_json: settings,
                    sandbox: sandbox.clone(),
                    call_timeout: config.call_timeout,
                })
                .map_err(|error| error.to_string()),
                None => crate::native::load(path, sha256.as_deref(), settings)
                    .map(|backend| backend as Arc<dyn Backend>)
                    .map_err(|error| error.to_string()),
            }
        }
    }
}
