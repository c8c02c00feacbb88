//! libFuzzer target `wasm-data`: a thin wrapper around
//! `devhost_fuzz::targets::wasm_data::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("wasm-data"), |data: &[u8]| {
    devhost_fuzz::targets::wasm_data::run(data);
});
