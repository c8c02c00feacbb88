//! libFuzzer target `wasm`: a thin wrapper around
//! `devhost_fuzz::targets::wasm::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("wasm"), |data: &[u8]| {
    devhost_fuzz::targets::wasm::run(data);
});
