//! What the libFuzzer targets (`fuzz/libfuzzer/fuzz_targets/`) need beyond
//! each target's `run`: their start-up hook, which can hand libFuzzer the
//! built-in seeds and the dictionary of a target (both defined once, in the
//! target, for both drivers).
//!
//! `scripts/fuzz` runs each libFuzzer binary once with
//! `DEVHOST_FUZZ_EXPORT=<dir>` set: [`init`] then writes the target's
//! built-in seeds to `<dir>/seeds/` and its dictionary to `<dir>/dict` (in
//! libFuzzer's format), and exits. Without the variable it does nothing.

use std::path::Path;

use crate::targets::by_name;

/// libFuzzer's start-up hook for target `name` (see the module docs).
pub fn init(name: &str) {
    let Some(dir) = std::env::var_os("DEVHOST_FUZZ_EXPORT") else { return };
    match export(name, Path::new(&dir)) {
        Ok(seeds) => {
            eprintln!("{name}: exported {seeds} seeds and the dictionary to {}", Path::new(&dir).display());
            std::process::exit(0);
        }
        Err(error) => {
            eprintln!("{name}: cannot export seeds: {error}");
            std::process::exit(2);
        }
    }
}

/// Writes the built-in seeds of `name` to `dir/seeds/` (named after a hash
/// of their bytes) and its dictionary to `dir/dict`; returns the number of
/// seeds.
pub fn export(name: &str, dir: &Path) -> Result<usize, String> {
    let target = by_name(name)?;
    let seeds_dir = dir.join("seeds");
    std::fs::create_dir_all(&seeds_dir).map_err(|e| format!("{}: {e}", seeds_dir.display()))?;
    let seeds = target.seeds();
    for seed in &seeds {
        let hash = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        let path = seeds_dir.join(format!("seed-{hash:016x}"));
        std::fs::write(&path, seed).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let dict: String = target.dictionary().iter().map(|word| format!("\"{}\"\n", escape(word.as_bytes()))).collect();
    let path = dir.join("dict");
    std::fs::write(&path, dict).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(seeds.len())
}

/// A dictionary entry in libFuzzer's syntax: printable ASCII as it is,
/// `\\`, `\"` and everything else as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'\\' => "\\\\".to_owned(),
            b'"' => "\\\"".to_owned(),
            0x20..=0x7e => char::from(b).to_string(),
            _ => format!("\\x{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_entries_are_escaped_for_libfuzzer() {
        assert_eq!(escape(b"a\"b\\c\0\xff"), "a\\\"b\\\\c\\x00\\xFF");
    }
}
