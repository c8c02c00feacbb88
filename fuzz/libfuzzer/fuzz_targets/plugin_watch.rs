//! libFuzzer target `plugin-watch`: a thin wrapper around
//! `devhost_fuzz::targets::plugin_watch::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("plugin-watch"), |data: &[u8]| {
    devhost_fuzz::targets::plugin_watch::run(data);
});
