//! `backends.d/*.toml`: one file per backend. The file names the backend's
//! kind (`kind = "static"` for the built-in one) or its module, and carries
//! the backend's own `[config]` table.
//!
//! A module whose file name ends in `.wasm` is a WASM component and runs in
//! the sandbox its `[sandbox]` table describes ([`SandboxConfig`]); any
//! other module is a native shared library, run in a worker process whose
//! sandbox the `[backend]` keys of [`WorkerSandbox`] describe (or in
//! devhost's own process with `isolation = "none"`).
//!
//! Files are read in name order. Each bad file yields one [`ConfigError`]
//! and is skipped; the others load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::StaticConfig;
use super::worker_sandbox::RawWorkerKeys;
pub use super::worker_sandbox::WorkerSandbox;
use super::{ConfigError, line_column};
pub use crate::wasm::SandboxConfig;

/// Where a backend's code comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSource {
    /// The built-in `static` backend with its parsed config (shared: the
    /// parse cache, the running backend and the daemon's bookkeeping hold
    /// one copy of a 10,000-device config, not three).
    Static(std::sync::Arc<StaticConfig>),
    /// A module file: a native `.so`, or a WASM component (`.wasm`).
    Module {
        /// Absolute path of the module.
        path: PathBuf,
        /// Optional pinned SHA-256 (lower-case hex) of the file.
        sha256: Option<String>,
        /// `Some` for a WASM component (a `.wasm` file): its sandbox.
        /// `None` for a native library.
        wasm: Option<SandboxConfig>,
        /// Where a native library runs; WASM components always run in
        /// their sandbox in devhost's process ([`Isolation::None`]).
        isolation: Isolation,
    },
}

/// Where a native module's code runs (`[backend] isolation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In a worker process of its own (the default for native modules), in
    /// its sandbox: a crash, hang or hostile call costs only this backend.
    Process(WorkerSandbox),
    /// In devhost's own process: no per-call cost, but a crash in the
    /// module takes devhost down.
    None,
}

/// One validated backend file.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// The backend's name: its file name without `.toml`.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Its code.
    pub source: BackendSource,
    /// Deadline of one call into it.
    pub call_timeout: Duration,
    /// How often a native module with ABI 1.1's `poll` is polled
    /// (`[backend] poll_interval_ms`, default 1000).
    pub poll_interval: Duration,
    /// Its own `[config]` table, handed to module backends at init.
    pub settings: toml::Table,
    /// Host-side settings per resource (`[resources."<name>"]`).
    pub resources: std::collections::BTreeMap<String, crate::model::ResourceSettings>,
}

/// The result of reading a `backends.d/` directory.
#[derive(Debug, Default)]
pub struct LoadedBackends {
    /// The files that passed validation, in name order.
    pub backends: Vec<BackendConfig>,
    /// One error per file that did not.
    pub errors: Vec<ConfigError>,
    /// Files refused because a file that sorts before them claims one of
    /// their resources: whatever ran for them stops (the file that sorts
    /// first wins, after a restart and a hot add alike).
    pub superseded: Vec<PathBuf>,
    /// Whether the directory itself was listed. When it was not (renamed
    /// away, out of descriptors, a network filesystem's hiccup), the result
    /// says nothing about which backends exist: the daemon changes nothing.
    pub listed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile<Config = serde::de::IgnoredAny> {
    backend: RawBackend,
    /// A static backend's `[config]` (which can hold 10,000 devices) as
    /// `StaticConfig` reads it, or skipped (`IgnoredAny`): a module's is
    /// parsed by [`ModuleSettings`]. Building a `toml::Table` of it here as
    /// well doubled the memory a big file takes to load.
    config: Option<Config>,
    sandbox: Option<Spanned<RawSandbox>>,
    #[serde(default)]
    resources: std::collections::BTreeMap<Spanned<String>, Spanned<super::resource_settings::RawResourceSettings>>,
}

/// A module backend's `[config]` table (the rest of the file is checked
/// by [`RawFile`]).
#[derive(Debug, Deserialize)]
struct ModuleSettings {
    #[serde(default)]
    config: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    #[serde(default)]
    read: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    write: Vec<Spanned<PathBuf>>,
    memory_mb: Option<Spanned<u64>>,
    poll_interval_ms: Option<Spanned<u64>>,
    /// A directory, or `false` to turn the cache off.
    cache_dir: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    kind: Option<Spanned<String>>,
    module: Option<Spanned<PathBuf>>,
    sha256: Option<Spanned<String>>,
    call_timeout_ms: Option<Spanned<u64>>,
    poll_interval_ms: Option<Spanned<u64>>,
    isolation: Option<Spanned<String>>,
    memory_mb: Option<Spanned<u64>>,
    pids_max: Option<Spanned<u64>>,
    capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    uid: Option<Spanned<u32>>,
    gid: Option<Spanned<u32>>,
    seccomp: Option<Spanned<bool>>,
    unsandboxed: Option<Spanned<String>>,
}

impl RawBackend {
    /// The worker sandbox's keys, taken out of the table.
    fn take_worker_keys(&mut self) -> RawWorkerKeys {
        RawWorkerKeys {
            memory_mb: self.memory_mb.take(),
            pids_max: self.pids_max.take(),
            capabilities: self.capabilities.take(),
            uid: self.uid.take(),
            gid: self.gid.take(),
            seccomp: self.seccomp.take(),
            unsandboxed: self.unsandboxed.take(),
        }
    }
}

/// How often a native module's ABI 1.1 `poll` is called by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest `poll_interval_ms`: polling faster only burns CPU.
pub const MIN_POLL_INTERVAL_MS: u64 = 10;

/// Built-in backend kinds.
const KINDS: &[&str] = &["static"];

/// Reads every `*.toml` file in `dir` (hidden files skipped). Statically
/// known resource names must be unique across files: a later file that
/// claims a taken name is refused, naming the file that has it.
pub fn load_backends(dir: &Path, default_timeout: Duration) -> LoadedBackends {
    load_backends_cached(dir, default_timeout, &mut ParseCache::default())
}

/// A file's SHA-256, how long it took to parse, and what it parsed to.
type CachedParse = ([u8; 32], Duration, Result<BackendConfig, ConfigError>);

/// Parsed files by path, each with the SHA-256 of the text it was parsed
/// from: the daemon's periodic rescan re-reads every file but parses only
/// the ones whose text changed (a 10,000-device static file takes tens of
/// MiB and milliseconds to parse).
#[derive(Debug, Default)]
pub struct ParseCache {
    entries: HashMap<PathBuf, CachedParse>,
    /// Files parsed (not found in the cache) by the latest load.
    parsed: usize,
}

impl ParseCache {
    /// How many files the latest load had to parse.
    pub fn parsed(&self) -> usize {
        self.parsed
    }

    fn parse(&mut self, file: &Path, source: &str, default_timeout: Duration) -> Result<BackendConfig, ConfigError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(source.as_bytes()).into();
        if let Some((seen, timeout, result)) = self.entries.get(file)
            && *seen == digest
            && *timeout == default_timeout
        {
            return result.clone();
        }
        self.parsed += 1;
        let result = parse_apart(file, source, default_timeout);
        self.entries.insert(file.to_owned(), (digest, default_timeout, result.clone()));
        result
    }
}

/// [`parse_backend`] on a thread of its own, keeping a copy of the result
/// made back on the caller's thread. Parsing a 10,000-device file takes
/// tens of MiB of short-lived TOML values, interleaved with the config it
/// builds; on its own thread all of that lands in an allocator arena the
/// copy does not use, so once the thread ends and the original is dropped
/// the whole arena is free and can be returned to the system (see
/// `daemon::memory`). Parsed in place, the long-lived config would pin the
/// freed pages around it for the life of the process.
fn parse_apart(file: &Path, source: &str, default_timeout: Duration) -> Result<BackendConfig, ConfigError> {
    let parsed = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("devhost-parse".into())
            .spawn_scoped(scope, || parse_backend(file, source, default_timeout))
            .map(|thread| thread.join())
    });
    match parsed {
        Ok(Ok(result)) => result.map(|mut config| {
            if let BackendSource::Static(static_config) = &mut config.source {
                *static_config = std::sync::Arc::new(StaticConfig::clone(static_config));
            }
            config
        }),
        // No thread to spare, or the parser panicked: parse here (a panic
        // then propagates as it would have).
        _ => parse_backend(file, source, default_timeout),
    }
}

/// [`load_backends`], parsing only the files whose text differs from what
/// `cache` holds for them; the cache then holds exactly the files listed.
pub fn load_backends_cached(dir: &Path, default_timeout: Duration, cache: &mut ParseCache) -> LoadedBackends {
    cache.parsed = 0;
    let mut loaded = LoadedBackends::default();
    let files = match backend_files(dir) {
        Ok(files) => files,
        Err(error) => {
            loaded.errors.push(ConfigError::file(dir, format!("cannot read the backends directory: {error}")));
            return loaded;
        }
    };
    loaded.listed = true;
    cache.entries.retain(|file, _| files.contains(file));
    let mut claimed: HashMap<String, String> = HashMap::new();
    for file in files {
        let result = read_config_file(&file).and_then(|source| {
            let backend = cache.parse(&file, &source, default_timeout)?;
            check_module_exists(&backend, &source)?;
            claim_resources(&backend, &source, &claimed).inspect_err(|_| loaded.superseded.push(file.clone()))?;
            Ok((backend, source))
        });
        match result {
            Ok((backend, source)) => {
                if let BackendSource::Static(config) = &backend.source {
                    for (name, span) in config.resource_names() {
                        let (line, column) = line_column(&source, span.start);
                        claimed.insert(name.to_owned(), format!("{}:{line}:{column}", file.display()));
                    }
                }
                loaded.backends.push(backend);
            }
            Err(error) => loaded.errors.push(error),
        }
    }
    loaded
}

/// The `*.toml` files of `dir`, in name order. An error reading any entry
/// fails the whole listing: a partial list would read as removed files.
fn backend_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with('.') && path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The largest config file devhost reads: far above any real one, and
/// small enough that a runaway file is not parsed on every rescan.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Reads a config file of at most [`MAX_CONFIG_BYTES`]: a regular file
/// only, opened without blocking (a FIFO named `x.toml` in `backends.d`
/// would otherwise hold the reload until something wrote to it).
pub fn read_config_file(file: &Path) -> Result<String, ConfigError> {
    use crate::untrusted_file::ReadError;
    let bytes = crate::untrusted_file::read(file, MAX_CONFIG_BYTES).map_err(|error| match error {
        ReadError::TooLarge { .. } => ConfigError::file(
            file,
            format!("the file is larger than {} MiB; a config file this large is refused", MAX_CONFIG_BYTES >> 20),
        ),
        error => ConfigError::file(file, format!("cannot read: {error}")),
    })?;
    String::from_utf8(bytes).map_err(|_| ConfigError::file(file, "cannot read: the file is not UTF-8"))
}

/// A module file that is not there is a config error at its `module` key
/// (checked apart from [`parse_backend`], which reads no other file).
fn check_module_exists(backend: &BackendConfig, source: &str) -> Result<(), ConfigError> {
    let BackendSource::Module { path, .. } = &backend.source else { return Ok(()) };
    if path.exists() {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Key {
        backend: ModuleKey,
    }
    #[derive(Deserialize)]
    struct ModuleKey {
        module: Spanned<PathBuf>,
    }
    let message = format!("module {} does not exist", path.display());
    Err(match toml::from_str::<Key>(source) {
        Ok(key) => ConfigError::at(&backend.file, source, key.backend.module.span(), message),
        Err(_) => ConfigError::file(&backend.file, message),
    })
}

fn claim_resources(
    backend: &BackendConfig,
    source: &str,
    claimed: &HashMap<String, String>,
) -> Result<(), ConfigError> {
    let BackendSource::Static(config) = &backend.source else { return Ok(()) };
    for (name, span) in config.resource_names() {
        if let Some(owner) = claimed.get(name) {
            return Err(ConfigError::at(
                &backend.file,
                source,
                span,
                format!("resource {name:?} is already served by {owner}; each resource may be served by one backend"),
            ));
        }
    }
    Ok(())
}

impl<Config> RawFile<Config> {
    /// The file without its `[config]`, and the `[config]`.
    fn split(self) -> (RawFile, Option<Config>) {
        let RawFile { backend, config, sandbox, resources } = self;
        (RawFile { backend, config: None, sandbox, resources }, config)
    }
}

/// Validates one backend file's `source`, read from `file`.
pub fn parse_backend(file: &Path, source: &str, default_timeout: Duration) -> Result<BackendConfig, ConfigError> {
    // A static backend's file is parsed once, `[config]` included: for
    // 10,000 devices the TOML parse is most of the start-up time and its
    // peak memory. Any other file (a module's free-form `[config]`), or one
    // with an error, is parsed as before, so every message stays the same.
    let (mut raw, static_config) = match toml::from_str::<RawFile<Spanned<super::static_backend::RawConfig>>>(source) {
        Ok(raw) if raw.backend.kind.is_some() && raw.backend.module.is_none() => raw.split(),
        _ => (toml::from_str::<RawFile>(source).map_err(|error| ConfigError::from_toml(file, source, &error))?, None),
    };
    let name = file.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_owned();
    let at = |span, message: String| ConfigError::at(file, source, span, message);

    let worker_keys = raw.backend.take_worker_keys();
    let call_timeout = match raw.backend.call_timeout_ms {
        Some(ms) if *ms.get_ref() == 0 => return Err(at(ms.span(), "call_timeout_ms must be at least 1".into())),
        Some(ms) => Duration::from_millis(*ms.get_ref()),
        None => default_timeout,
    };
    let poll_interval = match raw.backend.poll_interval_ms {
        Some(ms) if *ms.get_ref() < MIN_POLL_INTERVAL_MS => {
            return Err(at(ms.span(), format!("poll_interval_ms must be at least {MIN_POLL_INTERVAL_MS}")));
        }
        Some(ms) => Duration::from_millis(*ms.get_ref()),
        None => DEFAULT_POLL_INTERVAL,
    };
    // Only module backends are handed their `[config]`; a static backend's
    // is parsed into its `StaticConfig` below, and keeping the table too
    // would hold a second copy of every device (tens of MiB for 10,000).
    let settings = match raw.backend.module {
        Some(_) => toml::from_str::<ModuleSettings>(source)
            .map_err(|error| ConfigError::from_toml(file, source, &error))?
            .config
            .unwrap_or_default(),
        None => toml::Table::new(),
    };
    let backend_source = match (raw.backend.kind, raw.backend.module) {
        (Some(kind), None) => {
            if kind.get_ref() != "static" {
                return Err(at(
                    kind.span(),
                    format!("unknown backend kind {:?}; built-in kinds are: {}", kind.get_ref(), KINDS.join(", ")),
                ));
            }
            if let Some(pin) = raw.backend.sha256 {
                return Err(at(pin.span(), "sha256 pins a module file; a built-in kind has none".into()));
            }
            if let Some(sandbox) = raw.sandbox {
                return Err(at(sandbox.span(), "[sandbox] applies to WASM modules (.wasm) only".into()));
            }
            if let Some(isolation) = raw.backend.isolation {
                return Err(at(
                    isolation.span(),
                    "isolation applies to native modules; a built-in kind has none".into(),
                ));
            }
            if let Some((key, span)) = worker_keys.first_set() {
                return Err(at(span, format!("{key} applies to a native module's worker; a built-in kind has none")));
            }
            let config = match static_config {
                Some(config) => StaticConfig::from_raw(file, source, Some(config))?,
                None => StaticConfig::parse(file, source)?,
            };
            BackendSource::Static(std::sync::Arc::new(config))
        }
        (None, Some(module)) => {
            let sha256 = match raw.backend.sha256 {
                Some(pin) if !is_sha256_hex(pin.get_ref()) => {
                    return Err(at(pin.span(), "sha256 must be 64 lower-case hexadecimal characters".into()));
                }
                pin => pin.map(Spanned::into_inner),
            };
            let base = file.parent().unwrap_or(Path::new("."));
            let is_wasm = module.get_ref().extension().is_some_and(|ext| ext == "wasm");
            let wasm = match raw.sandbox {
                Some(sandbox) if !is_wasm => {
                    return Err(at(
                        sandbox.span(),
                        "[sandbox] applies to WASM modules (.wasm) only; a native library's worker is sandboxed by [backend] keys (memory_mb, pids_max, capabilities, seccomp)".into(),
                    ));
                }
                Some(sandbox) => Some(parse_sandbox(sandbox.into_inner(), base, &at)?),
                None if is_wasm => Some(SandboxConfig::default()),
                None => None,
            };
            let isolation = parse_isolation(raw.backend.isolation, worker_keys, is_wasm, &at)?;
            BackendSource::Module { path: base.join(module.get_ref()), sha256, wasm, isolation }
        }
        (Some(kind), Some(_)) => {
            return Err(at(
                kind.span(),
                "set either `kind` (a built-in backend) or `module` (a file), not both".into(),
            ));
        }
        (None, None) => {
            return Err(ConfigError::file(
                file,
                "[backend] needs `kind = \"static\"` or `module = \"/path/to/backend.so\"`",
            ));
        }
    };
    if let BackendSource::Static(config) = &backend_source {
        let declared: Vec<&str> = config.resource_names().map(|(name, _)| name).collect();
        if let Some(name) = raw.resources.keys().find(|name| !declared.contains(&name.get_ref().as_str())) {
            return Err(at(
                name.span(),
                format!(
                    "[resources.{:?}] names no resource of this backend (it declares: {})",
                    name.get_ref(),
                    declared.join(", ")
                ),
            ));
        }
    }
    let resources = super::resource_settings::parse(file, source, raw.resources)?;
    Ok(BackendConfig {
        name,
        file: file.to_owned(),
        source: backend_source,
        call_timeout,
        poll_interval,
        settings,
        resources,
    })
}

/// `isolation` and the worker's sandbox keys of a module: process
/// isolation, sandboxed, by default for native modules; none of these keys
/// for WASM (its sandbox is its isolation) or `isolation = "none"`.
fn parse_isolation(
    isolation: Option<Spanned<String>>,
    worker_keys: RawWorkerKeys,
    is_wasm: bool,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<Isolation, ConfigError> {
    if is_wasm {
        if let Some(isolation) = isolation {
            return Err(at(
                isolation.span(),
                "isolation applies to native modules; a WASM component runs in its [sandbox]".into(),
            ));
        }
        if let Some(mb) = &worker_keys.memory_mb {
            return Err(at(mb.span(), "a WASM component's memory is limited by [sandbox] memory_mb".into()));
        }
        if let Some((key, span)) = worker_keys.first_set() {
            return Err(at(span, format!("{key} applies to a native module's worker; a WASM component has none")));
        }
        return Ok(Isolation::None);
    }
    match isolation {
        None => Ok(Isolation::Process(worker_keys.parse(at)?)),
        Some(value) => match value.get_ref().as_str() {
            "process" => Ok(Isolation::Process(worker_keys.parse(at)?)),
            "none" => match worker_keys.first_set() {
                Some((key, _)) => {
                    Err(at(value.span(), format!("{key} needs isolation = \"process\" (it applies to the worker)")))
                }
                None => Ok(Isolation::None),
            },
            other => Err(at(value.span(), format!("isolation must be \"process\" or \"none\", not {other:?}"))),
        },
    }
}

fn parse_sandbox(
    raw: RawSandbox,
    base: &Path,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<SandboxConfig, ConfigError> {
    let mut sandbox = SandboxConfig::default();
    for (key, dirs, granted) in [("read", raw.read, &mut sandbox.read), ("write", raw.write, &mut sandbox.write)] {
        for dir in dirs {
            check_grant(dir.get_ref()).map_err(|why| at(dir.span(), format!("{key}: {:?} {why}", dir.get_ref())))?;
            granted.push(dir.into_inner());
        }
    }
    if let Some(mb) = raw.memory_mb {
        if !(1..=4096).contains(mb.get_ref()) {
            return Err(at(mb.span(), "memory_mb must be between 1 and 4096 (a 32-bit memory)".into()));
        }
        sandbox.memory_bytes = *mb.get_ref() << 20;
    }
    if let Some(ms) = raw.poll_interval_ms {
        if *ms.get_ref() < 10 {
            return Err(at(ms.span(), "poll_interval_ms must be at least 10".into()));
        }
        sandbox.poll_interval = Duration::from_millis(*ms.get_ref());
    }
    if let Some(cache) = raw.cache_dir {
        sandbox.cache_dir = match cache.get_ref() {
            toml::Value::Boolean(false) => None,
            toml::Value::String(dir) if !dir.is_empty() => Some(base.join(dir)),
            _ => {
                return Err(at(
                    cache.span(),
                    "cache_dir must be a directory path, or false to turn the cache off".into(),
                ));
            }
        };
    }
    Ok(sandbox)
}

/// A sandbox grant must say plainly what it grants: an absolute path with
/// no `.` or `..` (`/grant/..` would silently widen to `/`), naming a
/// directory if it exists.
fn check_grant(dir: &Path) -> Result<(), &'static str> {
    if !dir.is_absolute() {
        return Err("must be an absolute path");
    }
    // By bytes: `Path::components` hides `.` and `//`.
    let bytes = dir.as_os_str().as_encoded_bytes();
    let inner = bytes.strip_suffix(b"/").filter(|rest| !rest.is_empty()).unwrap_or(bytes);
    if inner.split(|&b| b == b'/').skip(1).any(|part| matches!(part, b"" | b"." | b"..")) && inner != b"/" {
        return Err("must be a normalised path (no `.`, `..` or `//`)");
    }
    if dir.exists() && !dir.is_dir() {
        return Err("must be a directory");
    }
    Ok(())
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_must_be_absolute_normalised_directories() {
        for good in ["/", "/sys/bus/pci", "/sys/bus/pci/", "/no/such/dir"] {
            assert_eq!(check_grant(Path::new(good)), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("grant", "must be an absolute path"),
            ("/grant/..", "must be a normalised path (no `.`, `..` or `//`)"),
            ("/grant/./x", "must be a normalised path (no `.`, `..` or `//`)"),
            ("/grant//x", "must be a normalised path (no `.`, `..` or `//`)"),
            ("/etc/hostname", "must be a directory"),
        ] {
            assert_eq!(check_grant(Path::new(bad)), Err(why), "{bad}");
        }
    }

    const GOOD: &str = r#"
[backend]
kind = "static"

[[config.resource]]
name = "example.com/a"

[[config.resource.device]]
id = "a0"
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write fixture");
    }

    #[test]
    fn a_bad_file_is_reported_and_the_good_ones_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a-good.toml", GOOD);
        write(dir.path(), "b-broken.toml", "[backend]\nkind = \"static\"\nfrobnicate = true\n");
        write(dir.path(), "c-name.toml", &GOOD.replace("example.com/a", "example.com/c").replace("a0", "c0"));
        write(dir.path(), ".hidden.toml", "not toml at all");
        write(dir.path(), "notes.txt", "ignored");
        let loaded = load_backends(dir.path(), Duration::from_secs(1));
        let names: Vec<&str> = loaded.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["a-good", "c-name"]);
        assert_eq!(loaded.errors.len(), 1);
        let error = loaded.errors[0].to_string();
        assert!(
            error.starts_with(&format!(
                "{}:3:1: unknown field `frobnicate`",
                dir.path().join("b-broken.toml").display()
            )),
            "{error}"
        );
    }

    #[test]
    fn the_cache_parses_only_changed_files_and_gives_the_same_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.toml", GOOD);
        write(dir.path(), "b.toml", "[backend]\nkind = \"static\"\nfrobnicate = true\n");
        let mut cache = ParseCache::default();
        let first = load_backends_cached(dir.path(), Duration::from_secs(1), &mut cache);
        assert_eq!(cache.parsed(), 2);
        let again = load_backends_cached(dir.path(), Duration::from_secs(1), &mut cache);
        assert_eq!(cache.parsed(), 0, "nothing changed, nothing parsed");
        assert_eq!((again.backends, again.errors), (first.backends, first.errors));
        write(dir.path(), "a.toml", &GOOD.replace("a0", "a1"));
        let changed = load_backends_cached(dir.path(), Duration::from_secs(1), &mut cache);
        assert_eq!(cache.parsed(), 1, "only the changed file");
        assert_eq!(changed.backends, load_backends(dir.path(), Duration::from_secs(1)).backends);
        std::fs::remove_file(dir.path().join("b.toml")).expect("remove");
        load_backends_cached(dir.path(), Duration::from_secs(1), &mut cache);
        assert_eq!(cache.entries.len(), 1, "a removed file leaves the cache");
    }

    #[test]
    fn a_static_backend_keeps_no_copy_of_its_config_table() {
        let config = parse_backend(Path::new("/x/a.toml"), GOOD, Duration::from_secs(1)).expect("valid");
        assert!(matches!(config.source, BackendSource::Static(_)));
        assert!(config.settings.is_empty(), "{:?}", config.settings);
    }

    #[test]
    fn a_resource_claimed_twice_is_refused_in_the_later_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.toml", GOOD);
        write(dir.path(), "b.toml", GOOD);
        let loaded = load_backends(dir.path(), Duration::from_secs(1));
        assert_eq!(loaded.backends.len(), 1);
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        assert_eq!(
            loaded.errors[0].to_string(),
            format!(
                "{}:6:8: resource \"example.com/a\" is already served by {}:6:8; each resource may be served by one backend",
                b.display(),
                a.display()
            )
        );
    }

    #[test]
    fn module_backends_resolve_relative_paths_and_check_pins() {
        let file = Path::new("/etc/devhost/backends.d/gpu.toml");
        let config = parse_backend(
            file,
            "[backend]\nmodule = \"libgpu.so\"\ncall_timeout_ms = 250\n[config]\nx = 1\n",
            Duration::from_secs(1),
        )
        .expect("valid");
        assert_eq!(
            config.source,
            BackendSource::Module {
                path: "/etc/devhost/backends.d/libgpu.so".into(),
                sha256: None,
                wasm: None,
                isolation: Isolation::Process(WorkerSandbox::default())
            }
        );
        assert_eq!(config.call_timeout, Duration::from_millis(250));
        assert_eq!(config.settings.get("x"), Some(&toml::Value::Integer(1)));
        let error = parse_backend(file, "[backend]\nmodule = \"x.so\"\nsha256 = \"ABC\"\n", Duration::from_secs(1))
            .expect_err("bad pin");
        assert_eq!(
            error.to_string(),
            "/etc/devhost/backends.d/gpu.toml:3:10: sha256 must be 64 lower-case hexadecimal characters"
        );
        let error = parse_backend(file, "[backend]\nkind = \"gpu\"\n", Duration::from_secs(1)).expect_err("kind");
        assert_eq!(
            error.to_string(),
            "/etc/devhost/backends.d/gpu.toml:2:8: unknown backend kind \"gpu\"; built-in kinds are: static"
        );
        let error = parse_backend(file, "[backend]\n", Duration::from_secs(1)).expect_err("neither");
        assert!(error.to_string().contains("needs `kind = \"static\"` or `module"), "{error}");
    }

    #[test]
    fn native_modules_run_in_a_worker_unless_isolation_is_none() {
        let file = Path::new("/etc/devhost/backends.d/gpu.toml");
        let parse = |text: &str| parse_backend(file, text, Duration::from_secs(1));
        let isolation = |text: &str| match parse(text).expect("valid").source {
            BackendSource::Module { isolation, .. } => isolation,
            other => panic!("not a module: {other:?}"),
        };
        assert_eq!(isolation("[backend]\nmodule = \"g.so\"\n"), Isolation::Process(WorkerSandbox::default()));
        assert_eq!(
            isolation("[backend]\nmodule = \"g.so\"\nisolation = \"process\"\nmemory_mb = 64\n"),
            Isolation::Process(WorkerSandbox { memory_mb: 64, ..WorkerSandbox::default() })
        );
        assert_eq!(
            isolation(
                "[backend]\nmodule = \"g.so\"\npids_max = 32\ncapabilities = [\"sys_admin\", \"CAP_SYS_ADMIN\"]\nuid = 65534\ngid = 65534\nseccomp = false\nunsandboxed = \"allow\"\n"
            ),
            Isolation::Process(WorkerSandbox {
                memory_mb: 256,
                pids_max: 32,
                capabilities: vec!["CAP_SYS_ADMIN".to_owned()],
                uid: Some(65534),
                gid: Some(65534),
                seccomp: false,
                allow_unsandboxed: true,
                disabled: false,
            })
        );
        assert_eq!(isolation("[backend]\nmodule = \"g.so\"\nisolation = \"none\"\n"), Isolation::None);
        assert_eq!(isolation("[backend]\nmodule = \"n.wasm\"\n"), Isolation::None);
        let refused = [
            (
                "[backend]\nmodule = \"g.so\"\nisolation = \"thread\"\n",
                "3:13: isolation must be \"process\" or \"none\", not \"thread\"",
            ),
            (
                "[backend]\nmodule = \"g.so\"\nisolation = \"none\"\nmemory_mb = 64\n",
                "3:13: memory_mb needs isolation = \"process\" (it applies to the worker)",
            ),
            (
                "[backend]\nmodule = \"g.so\"\nmemory_mb = 8\n",
                "3:13: memory_mb must be at least 16 (the worker itself needs some)",
            ),
            (
                "[backend]\nmodule = \"n.wasm\"\nisolation = \"process\"\n",
                "3:13: isolation applies to native modules; a WASM component runs in its [sandbox]",
            ),
            (
                "[backend]\nkind = \"static\"\nisolation = \"none\"\n",
                "3:13: isolation applies to native modules; a built-in kind has none",
            ),
            (
                "[backend]\nmodule = \"g.so\"\npids_max = 2\n",
                "3:12: pids_max must be at least 8 (the worker's own threads count)",
            ),
            ("[backend]\nmodule = \"g.so\"\ncapabilities = [\"CAP_SYS_ADMIN\", \"CAP_FLY\"]\n", "3:34: capabilities: "),
            (
                "[backend]\nmodule = \"g.so\"\nunsandboxed = \"maybe\"\n",
                "3:15: unsandboxed must be \"refuse\", \"allow\" or \"always\", not \"maybe\"",
            ),
            (
                "[backend]\nmodule = \"g.so\"\nisolation = \"none\"\nseccomp = false\n",
                "3:13: seccomp needs isolation = \"process\" (it applies to the worker)",
            ),
            (
                "[backend]\nkind = \"static\"\npids_max = 64\n",
                "3:12: pids_max applies to a native module's worker; a built-in kind has none",
            ),
            (
                "[backend]\nmodule = \"n.wasm\"\ncapabilities = []\n",
                "3:16: capabilities applies to a native module's worker; a WASM component has none",
            ),
        ];
        for (text, expected) in refused {
            let error = parse(text).expect_err(text).to_string();
            let expected = format!("{}:{expected}", file.display());
            // A capability's message is the parser's own; its place is ours.
            if expected.ends_with("capabilities: ") {
                assert!(error.starts_with(&expected) && error.contains("CAP_FLY"), "{text}: {error}");
            } else {
                assert_eq!(error, expected, "{text}");
            }
        }
    }

    #[test]
    fn wasm_modules_get_a_sandbox_with_safe_defaults() {
        let file = Path::new("/etc/devhost/backends.d/nic.toml");
        let config = parse_backend(file, "[backend]\nmodule = \"nic.wasm\"\n", Duration::from_secs(1)).expect("valid");
        assert_eq!(
            config.source,
            BackendSource::Module {
                path: "/etc/devhost/backends.d/nic.wasm".into(),
                sha256: None,
                wasm: Some(SandboxConfig::default()),
                isolation: Isolation::None,
            }
        );
        let source = "[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nread = [\"/sys/bus/pci\", \"/dev\"]\n\
                      memory_mb = 16\npoll_interval_ms = 250\ncache_dir = \"cache\"\n";
        let config = parse_backend(file, source, Duration::from_secs(1)).expect("valid");
        let BackendSource::Module { wasm: Some(sandbox), .. } = config.source else { panic!("a wasm module") };
        assert_eq!(sandbox.read, [PathBuf::from("/sys/bus/pci"), PathBuf::from("/dev")]);
        assert_eq!(sandbox.memory_bytes, 16 << 20);
        assert_eq!(sandbox.poll_interval, Duration::from_millis(250));
        assert_eq!(sandbox.cache_dir, Some(PathBuf::from("/etc/devhost/backends.d/cache")));
        let source = "[backend]\nmodule = \"nic.wasm\"\n[sandbox]\ncache_dir = false\n";
        let config = parse_backend(file, source, Duration::from_secs(1)).expect("valid");
        let BackendSource::Module { wasm: Some(sandbox), .. } = config.source else { panic!("a wasm module") };
        assert_eq!(sandbox.cache_dir, None);
    }

    #[test]
    fn sandbox_errors_point_at_the_value() {
        let file = Path::new("/b/nic.toml");
        let error =
            |source: &str| parse_backend(file, source, Duration::from_secs(1)).expect_err("invalid").to_string();
        assert_eq!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nread = [\"sys\"]\n"),
            "/b/nic.toml:4:9: read: \"sys\" must be an absolute path"
        );
        assert_eq!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nwrite = [\"reset\"]\n"),
            "/b/nic.toml:4:10: write: \"reset\" must be an absolute path"
        );
        let source = "[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nread = [\"/sys\"]\nwrite = [\"/sys/bus/pci/devices/0000:af:00.0\"]\n";
        let config = parse_backend(file, source, Duration::from_secs(1)).expect("valid");
        let BackendSource::Module { wasm: Some(sandbox), .. } = config.source else { panic!("a wasm module") };
        assert_eq!(sandbox.write, [PathBuf::from("/sys/bus/pci/devices/0000:af:00.0")]);
        assert_eq!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nmemory_mb = 0\n"),
            "/b/nic.toml:4:13: memory_mb must be between 1 and 4096 (a 32-bit memory)"
        );
        assert_eq!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\npoll_interval_ms = 1\n"),
            "/b/nic.toml:4:20: poll_interval_ms must be at least 10"
        );
        assert_eq!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\ncache_dir = true\n"),
            "/b/nic.toml:4:13: cache_dir must be a directory path, or false to turn the cache off"
        );
        assert!(
            error("[backend]\nmodule = \"nic.wasm\"\n[sandbox]\nwritable = []\n")
                .starts_with("/b/nic.toml:4:1: unknown field `writable`"),
        );
        assert_eq!(
            error("[backend]\nmodule = \"libnic.so\"\n[sandbox]\nread = []\n"),
            "/b/nic.toml:3:1: [sandbox] applies to WASM modules (.wasm) only; a native library's worker is sandboxed by [backend] keys (memory_mb, pids_max, capabilities, seccomp)"
        );
    }
}
