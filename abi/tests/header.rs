//! The committed C header must be exactly what cbindgen generates from
//! `src/ffi.rs`; `DEVHOST_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("abi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen generates the header from src/ffi.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let committed_path = crate_dir.join("include/devhost_backend.h");
    if std::env::var_os("DEVHOST_BLESS").is_some_and(|value| value == "1") {
        std::fs::write(&committed_path, &generated).expect("write abi/include/devhost_backend.h");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "abi/include/devhost_backend.h is stale: it differs from what cbindgen generates from abi/src/ffi.rs; \
         run `DEVHOST_BLESS=1 cargo test -p devhost-abi --test header` and commit the result"
    );
}
