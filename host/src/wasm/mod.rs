//! WASM backends: components of the world `devhost:backend/backend@1.x`
//! (`abi/wit/`), run by wasmtime with WASI 0.2 in a sandbox, and adapted to
//! the host's one [`Backend`](crate::backend::Backend) trait.
//!
//! What this module owns: reading and validating a module (a component,
//! not a core module; of devhost's world; of a major version this devhost
//! supports), compiling it once (through the on-disk cache in [`cache`]),
//! the sandbox each instance runs in ([`SandboxConfig`]: read-only
//! preopens, a memory cap, an epoch deadline on every call, no network, no
//! environment, stdout/stderr into the log), and polling each instance for
//! its device lists. One submodule per supported major version of the world
//! ([`v1`], which runs minors 1.0.0, 1.1.0 and 1.2.0 and refuses newer ones); a
//! future 2.0 goes beside it and [`load`] dispatches.
//!
//! What it does not own: deadlines on the host side, fault bookkeeping and
//! re-initialisation with back-off. Those are the
//! [`BackendHandle`](crate::backend::handle::BackendHandle)'s, as for every
//! backend: a trap here surfaces as a panic-like fault (the adapter unwinds
//! with the trap's message, without running the panic hook) and invalid
//! data as [`BackendError::fault`](crate::model::BackendError::fault).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{DirPerms, FilePerms, ResourceTable, WasiCtx, WasiCtxView, WasiView};

use crate::backend::Backend;

#[allow(unsafe_code)]
mod cache;
mod stdio;
pub mod v1;
mod validate;

pub use validate::WorldVersion;

/// Default linear-memory cap of a WASM backend, in MiB.
pub const DEFAULT_WASM_MEMORY_MB: u64 = 64;
/// Default interval on which devhost asks a WASM backend for its devices.
pub const DEFAULT_WASM_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default directory of the compiled-code cache of WASM backends.
pub const DEFAULT_WASM_CACHE_DIR: &str = "/var/cache/devhost/wasm";

/// What a WASM backend may touch (`[sandbox]`). Nothing that is not listed
/// here: no network, no environment variables, no inherited stdio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Host directories the component may read (never write), each visible
    /// inside at the same path.
    pub read: Vec<PathBuf>,
    /// Host directories the component may also write, each visible inside
    /// at the same path. Meant to be narrow (one PCI function's directory,
    /// say) beside a broad read grant: inside, the longest matching grant
    /// applies.
    pub write: Vec<PathBuf>,
    /// Cap on the component's linear memory, in bytes.
    pub memory_bytes: u64,
    /// How often devhost asks the component for its device lists.
    pub poll_interval: Duration,
    /// Where compiled code is cached between runs of devhost; `None`
    /// compiles on every start.
    pub cache_dir: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            read: Vec::new(),
            write: Vec::new(),
            memory_bytes: DEFAULT_WASM_MEMORY_MB << 20,
            poll_interval: DEFAULT_WASM_POLL_INTERVAL,
            cache_dir: Some(PathBuf::from(DEFAULT_WASM_CACHE_DIR)),
        }
    }
}

/// How often the engine's epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Why a WASM module could not be loaded. Each names the module file.
#[derive(Debug, Error)]
pub enum WasmError {
    /// The file could not be read.
    #[error("{path}: cannot read the module: {source}")]
    Read {
        /// The module.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not match its `sha256` pin.
    #[error("{path}: SHA-256 is {actual}, but the config pins {expected}")]
    Pin {
        /// The module.
        path: PathBuf,
        /// What the file hashes to.
        actual: String,
        /// The pin.
        expected: String,
    },
    /// Not a WebAssembly file at all.
    #[error("{path}: not a WebAssembly file (it does not start with \"\\0asm\")")]
    NotWasm {
        /// The module.
        path: PathBuf,
    },
    /// A core module where a component was expected.
    #[error(
        "{path}: is a core WebAssembly module, not a component; a WASM backend must be a component of the world \
         devhost:backend/backend@1.x (build it for wasm32-wasip2)"
    )]
    CoreModule {
        /// The module.
        path: PathBuf,
    },
    /// A component, but not of devhost's world.
    #[error(
        "{path}: is a component of another world: it exports [{exports}], but a devhost backend exports \
         devhost:backend/api@1.x"
    )]
    OtherWorld {
        /// The module.
        path: PathBuf,
        /// What it exports, comma-separated.
        exports: String,
    },
    /// devhost's world, in a major version this devhost does not support.
    #[error(
        "{path}: implements devhost:backend@{version}, but this devhost supports devhost:backend@1.x \
         (unsupported major version {major})"
    )]
    UnsupportedVersion {
        /// The module.
        path: PathBuf,
        /// The version it exports.
        version: WorldVersion,
        /// Its major version.
        major: u64,
    },
    /// devhost's world, in a minor version newer than this devhost runs.
    #[error(
        "{path}: implements devhost:backend@{version}, but the newest version this devhost supports is \
         devhost:backend@{newest} (a newer minor version: upgrade devhost, or build the component against \
         devhost:backend@{newest})"
    )]
    NewerMinor {
        /// The module.
        path: PathBuf,
        /// The version it exports.
        version: WorldVersion,
        /// The newest version this devhost runs.
        newest: WorldVersion,
    },
    /// wasmtime refused the component, or its imports/exports do not match
    /// the world.
    #[error("{path}: {message}")]
    Invalid {
        /// The module.
        path: PathBuf,
        /// What wasmtime said.
        message: String,
    },
    /// The WASM engine could not start.
    #[error("the WASM engine could not start: {0}")]
    Engine(String),
}

/// Everything [`load`] needs to know about one WASM backend.
#[derive(Debug, Clone)]
pub struct WasmModule {
    /// The backend's name, for the log.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// Optional SHA-256 pin (lower-case hex).
    pub sha256: Option<String>,
    /// The `[config]` table as JSON, handed to `init`.
    pub config_json: String,
    /// Its sandbox.
    pub sandbox: SandboxConfig,
    /// The deadline of every call (the epoch deadline is a little shorter,
    /// so that a runaway call is interrupted before the host gives up on it).
    pub call_timeout: Duration,
}

/// Reads, validates and compiles `module` and returns a backend ready for
/// `init` (which instantiates it). Fails without instantiating anything when
/// the file is not a component of a supported version of devhost's world.
pub fn load(module: WasmModule) -> Result<Arc<dyn Backend>, WasmError> {
    let engine = engine()?;
    let path = module.path.clone();
    let bytes = std::fs::read(&path).map_err(|source| WasmError::Read { path: path.clone(), source })?;
    let digest = hex(&Sha256::digest(&bytes));
    if let Some(expected) = &module.sha256
        && *expected != digest
    {
        return Err(WasmError::Pin { path, actual: digest, expected: expected.clone() });
    }
    validate::header(&path, &bytes)?;
    let component = cache::compile(engine, &bytes, &digest, module.sandbox.cache_dir.as_deref())
        .map_err(|error| WasmError::Invalid { path: path.clone(), message: format!("cannot compile: {error:#}") })?;
    let version = validate::world(&path, engine, &component)?;
    match version.major {
        // Minors are dispatched inside the adapter; one newer than the
        // adapter knows has exports (and maybe imports) no binding of this
        // devhost can type-check, so it is refused here by name.
        1 if version.minor > v1::NEWEST.minor => Err(WasmError::NewerMinor { path, version, newest: v1::NEWEST }),
        1 => Ok(Arc::new(v1::WasmBackend::new(engine, &component, module, version)?)),
        major => Err(WasmError::UnsupportedVersion { path, version, major }),
    }
}

/// Compiles `path` the way [`load`] does and says whether the compiled
/// code came from the cache (for benchmarks and tests).
pub fn compile_only(path: &Path, cache_dir: Option<&Path>) -> Result<bool, WasmError> {
    let engine = engine()?;
    let bytes = std::fs::read(path).map_err(|source| WasmError::Read { path: path.to_owned(), source })?;
    validate::header(path, &bytes)?;
    let digest = hex(&Sha256::digest(&bytes));
    let hit = cache_dir.is_some_and(|dir| cache::entry(engine, &digest, dir).is_file());
    cache::compile(engine, &bytes, &digest, cache_dir)
        .map_err(|error| WasmError::Invalid { path: path.to_owned(), message: format!("cannot compile: {error:#}") })?;
    Ok(hit)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process's one engine: epoch interruption on, and a thread that
/// advances the epoch every [`EPOCH_TICK`] while guest code runs (see
/// [`Running`]) and sleeps otherwise.
fn engine() -> Result<&'static Engine, WasmError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.epoch_interruption(true);
            config.wasm_component_model(true);
            let engine = Engine::new(&config).map_err(|error| format!("{error:#}"))?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("devhost-wasm-epoch".into())
                .spawn(move || {
                    loop {
                        Running::wait_for_a_call();
                        std::thread::sleep(EPOCH_TICK);
                        ticker.increment_epoch();
                    }
                })
                .map_err(|error| format!("cannot start the epoch thread: {error}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(|error| WasmError::Engine(error.clone()))
}

/// Guest code running now, held for the length of each call into a
/// component. The epoch only has to advance while one runs (a deadline
/// counts ticks from the call's start), so an idle devhost does not wake
/// every 10 ms for nothing.
pub(crate) struct Running(());

/// How many calls are running, and the epoch thread's wake-up.
static CALLS: (std::sync::Mutex<usize>, std::sync::Condvar) = (std::sync::Mutex::new(0), std::sync::Condvar::new());

impl Running {
    /// Marks a call as running until the value is dropped.
    pub(crate) fn start() -> Self {
        let (count, wake) = &CALLS;
        *count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        wake.notify_one();
        Running(())
    }

    /// Blocks the epoch thread while no call runs.
    fn wait_for_a_call() {
        let (count, wake) = &CALLS;
        let mut running = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *running == 0 {
            running = wake.wait(running).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let (count, _) = &CALLS;
        *count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
    }
}

/// Epoch ticks for a call deadline: 80% of the host's deadline, so the
/// component is interrupted (and says so) before the host stops waiting.
fn deadline_ticks(timeout: Duration) -> u64 {
    let ticks = timeout.as_millis() * 8 / 10 / EPOCH_TICK.as_millis();
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// What one instance's `Store` holds: its WASI context, its resource
/// table, and its memory cap.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    /// The backend's name, to tag its log lines.
    pub(crate) backend: Arc<str>,
    /// The last lines the component wrote to stderr.
    pub(crate) stderr: stdio::Recent,
}

impl StoreState {
    /// A fresh sandbox: only `sandbox.read` is visible (read-only, at the
    /// same paths), stdout/stderr go to the log, nothing else is granted.
    pub(crate) fn new(backend: &Arc<str>, sandbox: &SandboxConfig) -> Result<Self, String> {
        let stderr = stdio::Recent::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(stdio::LogStream::new(backend.clone(), "stdout"))
            .stderr(stdio::LogStream::keeping(backend.clone(), "stderr", stderr.clone()))
            .allow_blocking_current_thread(true);
        for dir in &sandbox.read {
            let guest = dir.to_str().ok_or_else(|| format!("read: {dir:?} is not UTF-8"))?;
            wasi.preopened_dir(dir, guest, DirPerms::READ, FilePerms::READ)
                .map_err(|error| format!("cannot grant read access to {}: {error:#}", dir.display()))?;
        }
        for dir in &sandbox.write {
            let guest = dir.to_str().ok_or_else(|| format!("write: {dir:?} is not UTF-8"))?;
            wasi.preopened_dir(dir, guest, DirPerms::all(), FilePerms::all())
                .map_err(|error| format!("cannot grant write access to {}: {error:#}", dir.display()))?;
        }
        Ok(StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory_cap: usize::try_from(sandbox.memory_bytes).unwrap_or(usize::MAX),
            backend: backend.clone(),
            stderr,
        })
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The message of the trap a memory-cap hit raises.
#[derive(Debug, Error)]
#[error("exceeded its memory cap of {cap_mb} MiB (it asked to grow its memory to {desired_mb} MiB)")]
pub(crate) struct MemoryCapHit {
    cap_mb: usize,
    desired_mb: usize,
}

impl ResourceLimiter for StoreState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            // An error (not `Ok(false)`) traps at once with this message,
            // instead of letting the guest abort with an opaque trap.
            return Err(MemoryCapHit { cap_mb: self.memory_cap >> 20, desired_mb: desired.div_ceil(1 << 20) }.into());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Describes a failed call into a component in words for the log and the
/// kubelet: a deadline interrupt, a memory-cap hit, or a trap.
/// [`describe_trap`], followed by what the component wrote to stderr during
/// the call (a Rust panic's message and place, say), if anything.
pub(crate) fn describe_fault(
    error: &wasmtime::Error,
    operation: &str,
    timeout: Duration,
    stderr: &stdio::Recent,
) -> String {
    let description = describe_trap(error, operation, timeout);
    match stderr.text() {
        Some(said) => format!("{description}; its stderr: {said}"),
        None => description,
    }
}

pub(crate) fn describe_trap(error: &wasmtime::Error, operation: &str, timeout: Duration) -> String {
    if let Some(hit) = error.downcast_ref::<MemoryCapHit>() {
        return format!("{operation} {hit}");
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!(
            "{operation} was interrupted at its epoch deadline ({:?}, 80% of call_timeout_ms {})",
            EPOCH_TICK * u32::try_from(deadline_ticks(timeout)).unwrap_or(u32::MAX),
            timeout.as_millis()
        ),
        Some(trap) => format!("{operation} trapped: {trap}"),
        None => format!("{operation} failed in the component: {error:#}"),
    }
}
