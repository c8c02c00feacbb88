//! libFuzzer target `config`: a thin wrapper around
//! `devhost_fuzz::targets::config::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("config"), |data: &[u8]| {
    devhost_fuzz::targets::config::run(data);
});
