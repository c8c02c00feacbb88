//! What a WASM backend costs over a native one (not a timed test; run it
//! by hand, see the README):
//!
//! * the latency of one `allocate` of two devices, p50 and p99 over many
//!   calls, into the same backend (`examples/wasm-rust`) built twice: as
//!   a WASM component and as a native library, both called directly
//!   through the host's `Backend` trait;
//! * warm start of the WASM example (load, validate, compile or fetch from
//!   the cache, instantiate, `init`), without and with the compilation
//!   cache.
//!
//! Needs both release builds of the example:
//! `cargo build --release -p devhost-example-wasm-rust` and
//! `cargo build --release --target wasm32-wasip2 -p devhost-example-wasm-rust`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devhost::backend::{Backend, Publisher};
use devhost::wasm::{SandboxConfig, WasmModule};

const CALLS: usize = 5_000;
const STARTS: usize = 5;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from)
}

fn built(path: PathBuf) -> Result<PathBuf> {
    if !path.is_file() {
        bail!("{} is missing; build the release examples first (see the top of host/benches/wasm.rs)", path.display());
    }
    Ok(path)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn allocate_latency(backend: &dyn Backend, resource: &str, ids: &[String]) -> Result<(Duration, Duration)> {
    for _ in 0..200 {
        backend.allocate(resource, ids).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let start = Instant::now();
        let answer = backend.allocate(resource, ids).map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(start.elapsed());
        std::hint::black_box(answer);
    }
    Ok(percentiles(samples))
}

fn wasm_module(path: &Path, cache_dir: Option<PathBuf>) -> WasmModule {
    WasmModule {
        name: "bench".into(),
        path: path.to_owned(),
        sha256: None,
        config_json: "{}".into(),
        sandbox: SandboxConfig { cache_dir, ..SandboxConfig::default() },
        call_timeout: Duration::from_secs(5),
    }
}

fn start_wasm(module: WasmModule) -> Result<Arc<dyn Backend>> {
    let backend = devhost::wasm::load(module)?;
    backend.init(Publisher::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(backend)
}

fn median_start(path: &Path, cache_dir: Option<PathBuf>) -> Result<Duration> {
    let mut samples = Vec::new();
    for _ in 0..STARTS {
        let start = Instant::now();
        let backend = start_wasm(wasm_module(path, cache_dir.clone()))?;
        samples.push(start.elapsed());
        backend.shutdown();
    }
    Ok(percentiles(samples).0)
}

fn main() -> Result<()> {
    let target = target_dir();
    let wasm = built(target.join("wasm32-wasip2/release/devhost_example_wasm_rust.wasm"))?;
    let native = built(target.join("release/libdevhost_example_wasm_rust.so"))?;
    let ids = vec!["dev-0".to_owned(), "dev-1".to_owned()];

    let native_backend = devhost::native::load(&native, None, r#"{"poll_interval_ms": 3600000}"#.into())
        .context("loading the native build of the example")?;
    native_backend.init(Publisher::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (native_p50, native_p99) = allocate_latency(native_backend.as_ref(), "example.com/wasm-rust", &ids)?;
    native_backend.shutdown();

    let cache = tempfile::tempdir()?;
    let wasm_backend = start_wasm(wasm_module(&wasm, Some(cache.path().to_owned())))?;
    let (wasm_p50, wasm_p99) = allocate_latency(wasm_backend.as_ref(), "example.com/wasm-rust", &ids)?;
    wasm_backend.shutdown();

    let uncached = median_start(&wasm, None)?;
    let cached = median_start(&wasm, Some(cache.path().to_owned()))?;

    let added = |wasm: Duration, native: Duration| wasm.as_secs_f64() * 1e6 - native.as_secs_f64() * 1e6;
    println!("allocate of 2 devices by examples/wasm-rust, {CALLS} calls after 200 warm-up calls:");
    println!("  native build (.so):       p50 {native_p50:>10.2?}  p99 {native_p99:>10.2?}");
    println!("  WASM component (.wasm):   p50 {wasm_p50:>10.2?}  p99 {wasm_p99:>10.2?}");
    println!(
        "  added by WASM:            p50 {:+.2}µs  p99 {:+.2}µs",
        added(wasm_p50, native_p50),
        added(wasm_p99, native_p99)
    );
    println!("WASM example start (load + validate + compile + instantiate + init), median of {STARTS}:");
    println!("  without the compilation cache: {uncached:.2?}");
    println!("  with the compilation cache:    {cached:.2?}");
    Ok(())
}
