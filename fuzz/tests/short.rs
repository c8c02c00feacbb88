//! The CI's short fuzz run: every target for a few seconds with a fixed
//! seed (the same inputs on every run), plus the committed corpus (without
//! `crash-*` files). `cargo run --release -p devhost-fuzz -- all --seconds
//! 600` runs longer; `scripts/fuzz` runs the same targets under libFuzzer.

use std::time::Duration;

use devhost_fuzz::targets::by_name;
use devhost_fuzz::{Budget, run};

fn short(name: &str, seconds: u64) {
    let mut target = by_name(name).unwrap_or_else(|error| panic!("{name}: {error}"));
    let budget = Budget { iterations: u64::MAX, time: Duration::from_secs(seconds), seed: 0x5eed };
    let outcome = run(target.as_mut(), budget);
    println!("{name}: {} inputs in {:.1?}", outcome.inputs, outcome.elapsed);
    if let Some((message, input)) = outcome.failure {
        panic!("{name}: {message}\ninput saved to {}", input.display());
    }
    assert!(outcome.inputs > 0, "{name}: no input ran");
}

#[test]
fn resource_name() {
    short("resource-name", 2);
}

#[test]
fn config() {
    short("config", 3);
}

#[test]
fn native_abi() {
    short("native-abi", 3);
}

#[test]
fn wasm() {
    short("wasm", 3);
}

#[test]
fn grpc() {
    short("grpc", 3);
}

#[test]
fn native_read() {
    short("native-read", 3);
}

#[test]
fn wasm_data() {
    short("wasm-data", 3);
}

#[test]
fn worker_protocol() {
    short("worker-protocol", 3);
}

#[test]
fn cdi() {
    short("cdi", 3);
}

#[test]
fn plugin_watch() {
    short("plugin-watch", 3);
}

/// Every target the library knows has a short run here.
#[test]
fn every_target_has_a_short_run() {
    let this = include_str!("short.rs");
    for name in devhost_fuzz::targets::NAMES {
        assert!(this.contains(&format!("short(\"{name}\"")), "no short run for {name}");
    }
}
