//! libFuzzer target `cdi`: a thin wrapper around
//! `devhost_fuzz::targets::cdi::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("cdi"), |data: &[u8]| {
    devhost_fuzz::targets::cdi::run(data);
});
