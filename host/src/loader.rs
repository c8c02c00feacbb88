//! Turns a validated backend file into a running backend: the built-in
//! kinds, or a module loaded by the adapter for its kind (a native library
//! through [`crate::native`], in a [`crate::worker`] process unless its
//! file says `isolation = "none"`; a WASM component through
//! [`crate::wasm`]). The only place that knows which kinds exist;
//! everything above it sees a [`Runner`].

use std::sync::Arc;

use crate::backend::handle::Runner;
use crate::backend::static_backend::StaticBackend;
use crate::config::{BackendConfig, BackendSource, Isolation};
use crate::worker::{WorkerBackend, WorkerSpec};

/// Builds the backend `config` describes. The error says what failed, in
/// the adapter's words (each names the module file). A native module in a
/// worker is loaded in its worker now, so it is refused with the same
/// message as in-process.
pub async fn load(config: &BackendConfig) -> Result<Runner, String> {
    match &config.source {
        BackendSource::Static(static_config) => Ok(Arc::new(StaticBackend::new(static_config.clone())).into()),
        BackendSource::Module { path, sha256, wasm, isolation } => {
            let settings = serde_json::to_string(&config.settings)
                .map_err(|error| format!("cannot pass [config] to the module as JSON: {error}"))?;
            match (wasm, isolation) {
                (Some(sandbox), _) => {
                    let module = crate::wasm::WasmModule {
                        name: config.name.clone(),
                        path: path.clone(),
                        sha256: sha256.clone(),
                        config_json: settings,
                        sandbox: sandbox.clone(),
                        call_timeout: config.call_timeout,
                    };
                    // Reading and compiling a component takes seconds of
                    // CPU and blocks on the disk: off the async threads.
                    tokio::task::spawn_blocking(move || crate::wasm::load(module))
                        .await
                        .map_err(|error| format!("loading the component did not finish: {error}"))?
                        .map(Runner::from)
                        .map_err(|error| error.to_string())
                }
                (None, Isolation::Process(sandbox)) => WorkerBackend::prepare(WorkerSpec {
                    backend: config.name.clone(),
                    file: config.file.clone(),
                    module: path.clone(),
                    sha256: sha256.clone(),
                    config_json: settings,
                    sandbox: sandbox.clone(),
                    timeout: config.call_timeout,
                })
                .await
                .map(Runner::from),
                (None, Isolation::None) => {
                    // The checks read the file and `init` runs the module's
                    // code: off the async threads.
                    let (path, sha256) = (path.clone(), sha256.clone());
                    let (backend, loaded) = tokio::task::spawn_blocking(move || {
                        crate::native::load_with_digest(&path, sha256.as_deref(), settings).map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|error| format!("loading the module did not finish: {error}"))??;
                    Ok(Runner::InProcess { backend, sha256: Some(loaded) })
                }
            }
        }
    }
}
