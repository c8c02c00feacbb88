//! libFuzzer target `native-read`: a thin wrapper around
//! `devhost_fuzz::targets::native_read::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("native-read"), |data: &[u8]| {
    devhost_fuzz::targets::native_read::run(data);
});
