//! libFuzzer target `worker-protocol`: a thin wrapper around
//! `devhost_fuzz::targets::worker_protocol::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("worker-protocol"), |data: &[u8]| {
    devhost_fuzz::targets::worker_protocol::run(data);
});
