//! Configuration: the host file `devhost.toml` and one file per backend in
//! its `backends.d/` directory.
//!
//! Parsing has two phases. A raw `serde` struct (`deny_unknown_fields`, spans
//! on values that need a semantic check) catches syntax errors, unknown keys
//! and wrong types; a validation pass then produces the typed config and
//! reports semantic errors (invalid or duplicate resource names, bad IDs)
//! with the same file:line:column. A bad backend file is reported and
//! skipped; the good ones still load.

mod backends;
mod error;
mod host;
mod resource_settings;
pub mod static_backend;
mod worker_sandbox;

pub use backends::{
    BackendConfig, BackendSource, Isolation, LoadedBackends, ParseCache, WorkerSandbox, load_backends,
    load_backends_cached, parse_backend, read_config_file,
};
pub use error::{ConfigError, line_column};
pub use host::{DraSettings, HostConfig, LogFormat, Overrides};
pub use static_backend::StaticConfig;
