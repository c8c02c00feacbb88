//! Module validation before instantiation: the file's header says whether
//! it is a core module or a component, and a compiled component's exports
//! say which world, and which version of it, it implements.

use std::fmt;
use std::path::Path;

use wasmtime::Engine;
use wasmtime::component::Component;

use super::WasmError;

/// The interface every version of devhost's world exports, without version.
pub const API_INTERFACE: &str = "devhost:backend/api";

/// A version of devhost's world, from the component's export name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldVersion {
    /// Major: incompatible changes.
    pub major: u64,
    /// Minor: additions.
    pub minor: u64,
    /// Patch.
    pub patch: u64,
}

impl fmt::Display for WorldVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Refuses anything that is not a WebAssembly component by its header:
/// the magic, then a layer/version field that differs between core
/// modules (`01 00 00 00`) and components (`0d 00 01 00`).
pub fn header(path: &Path, bytes: &[u8]) -> Result<(), WasmError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(WasmError::NotWasm { path: path.to_owned() });
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(WasmError::CoreModule { path: path.to_owned() }),
        [_, _, 1, 0] => Ok(()),
        _ => Err(WasmError::Invalid {
            path: path.to_owned(),
            message: format!("unknown WebAssembly binary version {:02x?}", &bytes[4..8]),
        }),
    }
}

/// The version of devhost's world `component` implements, from the name
/// of its exported `devhost:backend/api@X.Y.Z` interface.
pub fn world(path: &Path, engine: &Engine, component: &Component) -> Result<WorldVersion, WasmError> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_owned()).collect();
    let ours = exports.iter().find_map(|name| name.strip_prefix(API_INTERFACE)?.strip_prefix('@'));
    let Some(version) = ours else {
        return Err(WasmError::OtherWorld { path: path.to_owned(), exports: exports.join(", ") });
    };
    parse_version(version).ok_or_else(|| WasmError::Invalid {
        path: path.to_owned(),
        message: format!("exports {API_INTERFACE}@{version}, which is not a MAJOR.MINOR.PATCH version"),
    })
}

fn parse_version(text: &str) -> Option<WorldVersion> {
    let mut parts = text.splitn(3, '.').map(|part| part.parse::<u64>().ok());
    Some(WorldVersion { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_tell_core_modules_from_components() {
        let path = Path::new("/m.wasm");
        assert!(matches!(header(path, b"\0asm\x01\0\0\0"), Err(WasmError::CoreModule { .. })));
        assert!(header(path, b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(header(path, b"\x7fELF\x02\x01\x01\0"), Err(WasmError::NotWasm { .. })));
        assert_eq!(parse_version("1.2.3"), Some(WorldVersion { major: 1, minor: 2, patch: 3 }));
        assert_eq!(parse_version("1.2"), None);
    }
}
