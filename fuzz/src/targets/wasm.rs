//! The WASM adapter's checks on module files: mutated components (the
//! example and the hostile fixture, when built) and core modules through
//! `devhost::wasm::load` (header, compile, world and version checks). The
//! checks on data a component returns at run time go through the
//! canonical ABI's typed values and are not reached from here.
//!
//! Invariants: nothing panics; a refusal names the module's path; only a
//! component (by its preamble) that names `devhost:backend/api@` is
//! accepted; the example component as built is accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devhost::wasm::{SandboxConfig, WasmModule};

use crate::Target;

/// The target, with a scratch file.
pub struct Wasm {
    dir: tempfile::TempDir,
    /// The example component as built, when it is: it must load.
    example: Option<Vec<u8>>,
}

/// `\0asm`, version 0x0d, layer 1: the header of a component.
const COMPONENT_PREAMBLE: &[u8] = b"\0asm\x0d\0\x01\0";
/// The interface a backend component exports, as its name appears in the
/// binary.
const INTERFACE: &[u8] = b"devhost:backend/api@";

impl Wasm {
    /// Creates the scratch directory.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-wasm-").tempdir().map_err(|e| e.to_string())?;
        Ok(Wasm { dir, example: std::fs::read(built("devhost_example_wasm_rust")).ok() })
    }
}

fn built(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    target.join("wasm32-wasip2/release").join(format!("{name}.wasm"))
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(Wasm::new, data);
}

impl Target for Wasm {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = vec![
            b"\0asm\x01\0\0\0".to_vec(),
            b"\0asm\x0d\0\x01\0".to_vec(),
            // An empty component.
            vec![0, 0x61, 0x73, 0x6d, 0x0d, 0, 0x01, 0],
        ];
        for name in ["devhost_example_wasm_rust", "devhost_fixture_wasm_hostile"] {
            if let Ok(bytes) = std::fs::read(built(name)) {
                seeds.push(bytes);
            }
        }
        seeds
    }

    fn dictionary(&self) -> &'static [&'static str] {
        &[
            "\0asm",
            "\x0d\0\x01\0",
            "\x01\0\0\0",
            "devhost:backend/api@1.0.0",
            "devhost:backend/api@1.1.0",
            "devhost:backend/api@1.2.0",
            "devhost:backend/api@2.0.0",
            "wasi:cli/run@0.2.0",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let path = self.dir.path().join("fuzz.wasm");
        std::fs::write(&path, data).map_err(|e| e.to_string())?;
        let module = WasmModule {
            name: "fuzz".into(),
            path: path.clone(),
            sha256: None,
            config_json: "{}".into(),
            sandbox: SandboxConfig { memory_bytes: 16 << 20, cache_dir: None, ..SandboxConfig::default() },
            call_timeout: Duration::from_secs(1),
        };
        let example = self.example.as_deref() == Some(data);
        match devhost::wasm::load(module) {
            // Only a component (its preamble: magic, version 0x0d, layer 1)
            // that names devhost's interface can be a backend.
            Ok(_) if !data.starts_with(COMPONENT_PREAMBLE) => Err("accepted a file that is not a component".into()),
            Ok(_) if !data.windows(INTERFACE.len()).any(|w| w == INTERFACE) => {
                Err("accepted a component that never names devhost:backend/api".into())
            }
            Ok(_) => Ok(()),
            Err(error) if example => Err(format!("the unchanged example component was refused: {error}")),
            Err(error) if error.to_string().contains(&path.display().to_string()) => Ok(()),
            Err(error) => Err(format!("the refusal does not name the module: {error}")),
        }
    }
}
