//! `devhost-fuzz`: runs the fuzz targets for longer than the CI does.
//!
//! ```text
//! cargo run --release -p devhost-fuzz -- all --seconds 600
//! cargo run --release -p devhost-fuzz -- grpc --seconds 3600 --seed 7
//! cargo run --release -p devhost-fuzz -- config --replay target/fuzz/config/failure-…
//! ```
//!
//! Exit code 0: no invariant broke; 1: a failure (its input is saved under
//! `target/fuzz/<target>/`); 2: bad usage. `DEVHOST_FUZZ_STRICT=1` adds the
//! checks of known, open findings (see `fuzz/README.md`).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use devhost_fuzz::targets::{NAMES, by_name};
use devhost_fuzz::{Budget, run, run_one};

const USAGE: &str = "usage: devhost-fuzz <target|all> [--seconds N] [--iterations N] [--seed N] [--replay FILE]\n\
                     targets: resource-name, config, native-abi, native-read, wasm, wasm-data, grpc, \
                     worker-protocol, cdi, plugin-watch";

fn main() {
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("devhost-fuzz: {error:#}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<bool> {
    let mut args = std::env::args().skip(1);
    let which = args.next().context("no target")?;
    let mut budget = Budget { iterations: u64::MAX, time: Duration::from_secs(60), seed: 1 };
    let mut replay = None;
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => budget.time = Duration::from_secs(value.parse()?),
            "--iterations" => budget.iterations = value.parse()?,
            "--seed" => budget.seed = value.parse()?,
            "--replay" => replay = Some(value),
            other => bail!("unknown option {other}"),
        }
    }
    let names: Vec<&str> = if which == "all" { NAMES.to_vec() } else { vec![which.as_str()] };
    if let Some(file) = replay {
        let data = std::fs::read(&file).with_context(|| format!("cannot read {file}"))?;
        let mut target = by_name(names[0]).map_err(anyhow::Error::msg)?;
        return match run_one(target.as_mut(), &data) {
            Ok(()) => {
                println!("{file}: passes");
                Ok(true)
            }
            Err(message) => {
                println!("{file}: {message}");
                Ok(false)
            }
        };
    }
    let mut clean = true;
    for name in names {
        let mut target = by_name(name).map_err(anyhow::Error::msg)?;
        let outcome = run(target.as_mut(), budget);
        let rate = outcome.inputs as f64 / outcome.elapsed.as_secs_f64().max(1e-9);
        println!(
            "{:<14} {:>9} inputs in {:>6.1} s ({rate:>8.0}/s), corpus {:>3}: {}",
            outcome.target,
            outcome.inputs,
            outcome.elapsed.as_secs_f64(),
            outcome.corpus,
            match &outcome.failure {
                None => "ok".to_owned(),
                Some((message, input)) => format!("FAILED: {message}\n  input saved to {}", input.display()),
            }
        );
        clean &= outcome.failure.is_none();
    }
    Ok(clean)
}
