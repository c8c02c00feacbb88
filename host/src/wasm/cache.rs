//! The on-disk cache of compiled components, so that a restart of devhost
//! does not recompile. An entry is keyed by the module's SHA-256 and by
//! wasmtime's compatibility hash of the engine (its version, target and
//! settings): `<sha256>-<engine>.cwasm`.
//!
//! Loading an entry runs native code that wasmtime wrote, so the one
//! `unsafe` call of the WASM host is here, guarded by ownership checks: the
//! directory and the entry must belong to devhost's own user and be
//! writable by nobody else. Anything wrong with the cache (unwritable, a
//! stale or foreign entry) falls back to compiling, never to failing.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// The cache entry of the module with SHA-256 `digest` in `dir`.
pub(super) fn entry(engine: &Engine, digest: &str, dir: &Path) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
}

/// Compiles `bytes` (SHA-256 `digest`), through the cache in `dir` when
/// there is one.
pub(super) fn compile(engine: &Engine, bytes: &[u8], digest: &str, dir: Option<&Path>) -> wasmtime::Result<Component> {
    let Some(dir) = dir else { return Component::new(engine, bytes) };
    let path = entry(engine, digest, dir);
    if trusted(&path) {
        // SAFETY: `deserialize_file` requires bytes produced by wasmtime's
        // own `serialize`/`precompile_component`. The entry was written by
        // `store` below (same engine settings: the name carries their
        // hash, and wasmtime checks its header again), into a directory
        // that `trusted` checked only devhost's user can write.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(error) => tracing::warn!(entry = %path.display(), "ignoring a bad compilation cache entry: {error:#}"),
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    if let Err(error) = store(dir, &path, &compiled) {
        tracing::warn!(dir = %dir.display(), "cannot write the compilation cache: {error}");
    }
    // SAFETY: `compiled` was produced just now by this engine's
    // `precompile_component`, which is what `deserialize` requires.
    unsafe { Component::deserialize(engine, &compiled) }
}

/// Whether `path` is a regular file that, like its directory, is owned by
/// this process's user and writable by no one else.
fn trusted(path: &Path) -> bool {
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return false };
    let private = |p: &Path, dir: bool| {
        std::fs::symlink_metadata(p).is_ok_and(|m| {
            (if dir { m.is_dir() } else { m.is_file() }) && m.uid() == me && m.permissions().mode() & 0o022 == 0
        })
    };
    path.parent().is_some_and(|dir| private(dir, true)) && private(path, false)
}

fn store(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(compiled)?;
    file.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_entry_is_written_once_and_reused() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let bytes = wat::parse_str("(component)").expect("wat");
        compile(&engine, &bytes, "abc", Some(&cache)).expect("compiles");
        let path = entry(&engine, "abc", &cache);
        assert!(trusted(&path), "the entry is private to this user");
        // A rewrite is a new file renamed into place: a new inode.
        let inode = |path: &Path| std::fs::metadata(path).expect("entry").ino();
        let written = inode(&path);
        compile(&engine, &bytes, "abc", Some(&cache)).expect("from the cache");
        assert_eq!(inode(&path), written, "the second load used the entry, not a new compilation");
        // And the entry is really read: a corrupt one is replaced.
        std::fs::write(&path, b"not a compiled component").expect("corrupt the entry");
        let corrupted = inode(&path);
        compile(&engine, &bytes, "abc", Some(&cache)).expect("compiled again");
        assert_ne!(inode(&path), corrupted, "a bad entry is compiled afresh and stored anew");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(!trusted(&path), "a world-writable entry is not loaded");
    }
}
