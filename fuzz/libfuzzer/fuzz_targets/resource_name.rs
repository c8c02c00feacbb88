//! libFuzzer target `resource-name`: a thin wrapper around
//! `devhost_fuzz::targets::resource_name::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("resource-name"), |data: &[u8]| {
    devhost_fuzz::targets::resource_name::run(data);
});
