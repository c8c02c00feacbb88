//! libFuzzer target `native-abi`: a thin wrapper around
//! `devhost_fuzz::targets::native_abi::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("native-abi"), |data: &[u8]| {
    devhost_fuzz::targets::native_abi::run(data);
});
