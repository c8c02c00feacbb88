//! Config parsing and validation: `HostConfig::parse` and `parse_backend`
//! on raw text and on TOML assembled from the keys devhost knows, and
//! `load_backends` on directories of such files.
//!
//! Invariants: nothing panics; an error names its file and, when it has a
//! position, the position lies inside the text; an accepted static backend
//! serves only names the kubelet's rule accepts, has a non-zero deadline
//! and health interval; across a directory, no statically known resource
//! name is accepted twice, and every file is either accepted or refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use devhost::config::{BackendSource, ConfigError, HostConfig, Overrides, load_backends, parse_backend};

use crate::Target;
use crate::targets::resource_name::is_extended_resource_name;

/// The target, with a scratch `backends.d/`.
pub struct Config {
    dir: tempfile::TempDir,
}

impl Config {
    /// Creates the scratch directory.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-config-").tempdir().map_err(|e| e.to_string())?;
        Ok(Config { dir })
    }
}

/// Lines the structured generator assembles files from.
const LINES: &[&str] = &[
    "[backend]",
    "kind = \"static\"",
    "kind = \"nope\"",
    "module = \"/usr/lib/devhost/x.so\"",
    "module = \"x.wasm\"",
    "module = \"\"",
    "sha256 = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"",
    "sha256 = \"XYZ\"",
    "call_timeout_ms = 0",
    "call_timeout_ms = 1",
    "call_timeout_ms = 18446744073709551615",
    "call_timeout_ms = -1",
    "call_timeout_ms = 1.5",
    "[config]",
    "health_interval_ms = 0",
    "health_interval_ms = 20",
    "[[config.resource]]",
    "pre_start = true",
    "preferred_allocation = true",
    "env = { IDS = \"{ids}\", X = \"y\" }",
    "annotations = { \"a/b\" = \"c\" }",
    "cdi_kind = \"example.com/dev\"",
    "cdi_kind = \"bad\"",
    "[[config.resource.device]]",
    "health = \"Unhealthy\"",
    "health = \"healthy\"",
    "numa = [0, 1]",
    "numa = [-1]",
    "numa = []",
    "health_path = \"/tmp/x\"",
    "health_path = \"relative\"",
    "device_spec = [{ host_path = \"/dev/null\" }]",
    "device_spec = [{ host_path = \"/dev/null\", container_path = \"/dev/x\", permissions = \"rwm\" }]",
    "device_spec = [{ host_path = \"/dev/null\", permissions = \"q\" }]",
    "mount = [{ host_path = \"/a\", container_path = \"/b\", read_only = true }]",
    "[sandbox]",
    "read = [\"/run\"]",
    "read = [\"relative\"]",
    "memory_mb = 0",
    "memory_mb = 4097",
    "memory_mb = 16",
    "poll_interval_ms = 9",
    "cache_dir = false",
    "cache_dir = \"cache\"",
    "[resources.\"example.com/gpu\"]",
    "[resources.\"Bad/Name\"]",
    "replicas = 0",
    "replicas = 2",
    "replicas = 1025",
    "replica_policy = \"pack\"",
    "replica_policy = \"nope\"",
    "cdi = true",
    "plugin_dir = \"/tmp/p\"",
    "kubelet_socket = \"k.sock\"",
    "backends_dir = \"b\"",
    "metrics_address = \"\"",
    "metrics_address = \"127.0.0.1:0\"",
    "metrics_address = \"nonsense\"",
    "cdi_dir = \"cdi\"",
    "[log]",
    "format = \"json\"",
    "format = \"xml\"",
    "level = \"debug\"",
    "unknown = 1",
    "= broken",
    "[",
    "\"",
];

/// Values for `name = ...` and `id = ...` lines.
const NAMES: &[&str] = &[
    "example.com/gpu",
    "example.com/nic",
    "Example.com/gpu",
    "kubernetes.io/gpu",
    "gpu",
    "a/b/c",
    "",
    "gpu-0",
    "gpu-1",
    "x,y",
    "é",
];

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(Config::new, data);
}

impl Target for Config {
    fn name(&self) -> &'static str {
        "config"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config");
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        for file in [examples.join("devhost.toml"), examples.join("backends.d/example.toml")] {
            if let Ok(bytes) = std::fs::read(&file) {
                seeds.push(bytes);
            }
        }
        seeds
    }

    fn dictionary(&self) -> &'static [&'static str] {
        LINES
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let raw = String::from_utf8_lossy(data).into_owned();
        let built = assemble(&mut Unstructured::new(data));
        for text in [&raw, &built] {
            check_host(text)?;
            check_backend(text)?;
        }
        self.check_dir(data, &built)
    }
}

/// A TOML file from known lines and names (each line chosen by the input).
fn assemble(u: &mut Unstructured<'_>) -> String {
    let mut text = String::new();
    // An exhausted input yields the lower bound forever: stop when empty.
    // At most 256 lines: every key and table fits many times over, and
    // libFuzzer's 4 KiB inputs would otherwise make 60 KiB files whose
    // parsing is all the time an input takes.
    let mut lines = 0;
    while !u.is_empty() && lines < 256 {
        lines += 1;
        let Ok(choice) = u.int_in_range(0..=LINES.len() + 1) else { break };
        match choice {
            n if n < LINES.len() => text += LINES[n],
            n if n == LINES.len() => {
                let name = u.choose(NAMES).copied().unwrap_or("");
                text += &format!("name = {name:?}");
            }
            _ => {
                let id = u.choose(NAMES).copied().unwrap_or("");
                text += &format!("id = {id:?}");
            }
        }
        text.push('\n');
    }
    text
}

fn check_error(error: &ConfigError, file: &Path, source: &str) -> Result<(), String> {
    let shown = error.to_string();
    if !shown.starts_with(&file.display().to_string()) {
        return Err(format!("the error {shown:?} does not start with the file name"));
    }
    if error.message.trim().is_empty() {
        return Err(format!("an empty error message for {source:?}"));
    }
    if let Some((line, column)) = error.location {
        // Columns count characters within the reported line; one past its
        // end is where a missing value or newline would go.
        let Some(text) = source.split('\n').nth(line.wrapping_sub(1)) else {
            return Err(format!("{shown:?}: line {line} lies outside the text ({} lines)", source.split('\n').count()));
        };
        if column == 0 || column > text.chars().count() + 1 {
            return Err(format!("{shown:?}: column {column} lies outside line {line} ({text:?})"));
        }
    }
    Ok(())
}

fn check_host(text: &str) -> Result<(), String> {
    let file = Path::new("/fuzz/devhost.toml");
    match HostConfig::parse(file, text, &Overrides::default()) {
        Ok(config) if config.call_timeout.is_zero() => Err(format!("{text:?}: accepted with a zero call timeout")),
        Ok(_) => Ok(()),
        Err(error) => check_error(&error, file, text),
    }
}

fn check_backend(text: &str) -> Result<(), String> {
    let file = Path::new("/fuzz/backends.d/fuzz.toml");
    match parse_backend(file, text, Duration::from_secs(1)) {
        Ok(config) => {
            if config.call_timeout.is_zero() {
                return Err(format!("{text:?}: accepted with a zero call timeout"));
            }
            if let BackendSource::Static(static_config) = &config.source {
                if static_config.health_interval.is_zero() {
                    return Err(format!("{text:?}: accepted with a zero health interval"));
                }
                for (name, _) in static_config.resource_names() {
                    // Judged by the fuzz crate's own transcription of the
                    // kubelet's rule, not by devhost's validator.
                    if !is_extended_resource_name(name) {
                        return Err(format!("{text:?}: accepted the invalid resource name {name:?}"));
                    }
                }
            }
            Ok(())
        }
        Err(error) => check_error(&error, file, text),
    }
}

impl Config {
    /// Up to three files (raw bytes and assembled text) in one directory:
    /// `load_backends` accepts or refuses each, and never accepts one
    /// resource name twice.
    fn check_dir(&self, data: &[u8], built: &str) -> Result<(), String> {
        let dir = self.dir.path();
        for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let half = data.len() / 2;
        let files: [(&str, &[u8]); 3] =
            [("a.toml", &data[..half]), ("b.toml", built.as_bytes()), ("c.toml", built.as_bytes())];
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
        }
        let loaded = load_backends(dir, Duration::from_secs(1));
        if loaded.backends.len() + loaded.errors.len() != files.len() {
            return Err(format!(
                "{} files, but {} accepted and {} refused",
                files.len(),
                loaded.backends.len(),
                loaded.errors.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for backend in &loaded.backends {
            if let BackendSource::Static(config) = &backend.source {
                for (name, _) in config.resource_names() {
                    if !seen.insert(name.to_owned()) {
                        return Err(format!("{name:?} accepted twice in one directory ({built:?})"));
                    }
                }
            }
        }
        for error in &loaded.errors {
            let source =
                std::fs::read(&error.file).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            check_error(error, &error.file, &source)?;
        }
        Ok(())
    }
}
