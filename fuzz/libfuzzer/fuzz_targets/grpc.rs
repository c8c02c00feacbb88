//! libFuzzer target `grpc`: a thin wrapper around
//! `devhost_fuzz::targets::grpc::run` (invariants documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(init: devhost_fuzz::libfuzzer::init("grpc"), |data: &[u8]| {
    devhost_fuzz::targets::grpc::run(data);
});
