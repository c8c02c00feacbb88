//! Fuzzing devhost. Each target turns arbitrary bytes into an input
//! (structure-aware, through [`arbitrary::Unstructured`]) and checks
//! invariants. Two drivers run the same targets:
//!
//! * a deterministic, stable-Rust driver ([`run`]) that feeds fresh random
//!   bytes and mutations of a seed corpus (`fuzz/corpus/<target>/`, plus
//!   built-in seeds and a dictionary per target); not coverage-guided, it
//!   runs in CI (`cargo test -p devhost-fuzz`) and by hand;
//! * libFuzzer with AddressSanitizer (`fuzz/libfuzzer/`, run by
//!   `scripts/fuzz`): coverage-guided, each of its targets a thin wrapper
//!   around the target's `run` function here ([`fuzz_input`], [`libfuzzer`]).
//!
//! Targets ([`targets`]):
//! * `resource-name`: `devhost::resource_name::validate` against a literal
//!   reimplementation of the kubelet's `IsExtendedResourceName`;
//! * `config`: host and backend files through parsing and validation, and
//!   whole `backends.d/` directories through `load_backends`;
//! * `native-abi`: data coming back through the C ABI, from a fixture
//!   module (`fuzz/fixtures/bytes_backend.c`) that publishes and answers
//!   with attacker-chosen bytes;
//! * `native-read`: the native adapter's readers and callbacks directly
//!   (`host/src/native/{read,callbacks,adapter}.rs`), with a backend
//!   written in Rust handing over attacker-chosen structs;
//! * `wasm`: mutated WebAssembly components and modules through the WASM
//!   adapter's load path (header, compile, world checks);
//! * `wasm-data`: a running component whose every answer (resources,
//!   device lists, allocations, preferred answers) is attacker-chosen
//!   canonical-ABI data, through the WASM adapter and the publisher;
//! * `grpc`: arbitrary `Allocate`, `GetPreferredAllocation`,
//!   `PreStartContainer` and raw undecodable frames against a real resource
//!   server on a Unix socket, checking the status codes;
//! * `worker-protocol`: the host/worker frames (`frame`, `frame_len`,
//!   `read_frame`, `Request`/`Reply` decoding and the model conversions);
//! * `cdi`: CDI names, spec paths and the spec files `cdi::resource::maintain` writes and the answers `cdi::answer` gives
//!   for a backend whose answers are attacker-chosen;
//! * `plugin-watch`: file operations in a plugin directory watched by
//!   `registration::PluginDirWatcher`.
//!
//! A failing input of the stable driver is written to
//! `target/fuzz/<target>/` and can be replayed with `--replay <file>`.
//! Checks for findings that are known and still open run only with
//! `DEVHOST_FUZZ_STRICT=1` or `=F<n>,…` ([`strict`]), so CI stays green
//! until they are fixed; corpus files named `crash-*` (their inputs) are
//! not run by the stable driver.

// `unsafe` only where a target plays a native backend calling the host's
// C callbacks (`targets::native_read`), which is unsafe by nature.
#![deny(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod libfuzzer;
pub mod rng;
pub mod targets;

// `targets::native_read` compiles host/src/native/{read,callbacks,
// adapter}.rs unchanged; they name devhost's types by their paths inside
// devhost (`crate::backend::…`, `crate::device_state::…`).
mod backend {
    pub use devhost::backend::*;
}
mod log_limit {
    pub use devhost::log_limit::*;
}
mod device_state {
    pub use devhost::device_state::*;
}

use rng::Rng;

/// One fuzz target.
pub trait Target {
    /// Its name on the command line and in `fuzz/corpus/<name>/`.
    fn name(&self) -> &'static str;

    /// Built-in seed inputs (the committed corpus adds to them).
    fn seeds(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    /// Byte strings worth splicing into inputs.
    fn dictionary(&self) -> &'static [&'static str] {
        &[]
    }

    /// Runs one input. `Err` is a broken invariant; a panic is caught by
    /// the driver and counts as one too.
    fn run(&mut self, data: &[u8]) -> Result<(), String>;
}

/// How long a run goes on: whichever limit comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most inputs.
    pub iterations: u64,
    /// Most time spent running inputs (the corpus is read first; the first
    /// input runs whatever the time).
    pub time: Duration,
    /// The generator's seed.
    pub seed: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The target.
    pub target: &'static str,
    /// Inputs run.
    pub inputs: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// Corpus entries used as seeds.
    pub corpus: usize,
    /// The first failure: its message and where its input was saved.
    pub failure: Option<(String, PathBuf)>,
}

/// The repository's `fuzz/corpus/<target>/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

/// Where failing inputs go: `<target dir>/fuzz/<target>/`.
pub fn artifacts_dir(target: &str) -> PathBuf {
    let root = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    root.join("fuzz").join(target)
}

/// True about once in `n` draws, and never once the input is used up (an
/// exhausted [`arbitrary::Unstructured`] yields the lower bound of every
/// range, which would otherwise make the rare case the usual one).
pub fn rarely(u: &mut arbitrary::Unstructured<'_>, n: u32) -> bool {
    !u.is_empty() && !u.ratio(n - 1, n).unwrap_or(true)
}

/// Findings that are fixed: their checks always run, as invariants.
const FIXED: &[&str] = &["F1", "F2", "F3", "F4", "F5", "F6"];

/// Whether the check for finding `finding` (`"F1"`, ..., listed in
/// `fuzz/README.md`) runs: always once the finding is fixed ([`FIXED`]);
/// for one still open, only with `DEVHOST_FUZZ_STRICT=1` (every such
/// check) or `DEVHOST_FUZZ_STRICT=F7,F8` (the ones named), so that CI and
/// long runs are not stopped by what is already reported.
pub fn strict(finding: &str) -> bool {
    FIXED.contains(&finding)
        || std::env::var("DEVHOST_FUZZ_STRICT")
            .is_ok_and(|value| value == "1" || value.split(',').any(|name| name.trim() == finding))
}

/// The committed corpus of `target`, without `crash-*` files: those are
/// inputs of open findings, kept for replaying (see `fuzz/README.md`).
fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|path| path.is_file())
                .filter(|path| !path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("crash-")))
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries.iter().filter_map(|path| std::fs::read(path).ok()).collect()
}

/// Runs one input, turning a panic into an error.
pub fn run_one(target: &mut dyn Target, data: &[u8]) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| target.run(data))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(format!("panicked: {message}"))
        }
    }
}

/// Runs one input through target `T` for libFuzzer: one instance per
/// thread, made by `make` on first use, kept for every later input. A broken
/// invariant panics, which libFuzzer reports as a crash with the input.
pub fn fuzz_input<T: Target + 'static>(make: fn() -> Result<T, String>, data: &[u8]) {
    use std::any::{Any, TypeId};
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static TARGETS: RefCell<HashMap<TypeId, Box<dyn Any>>> = RefCell::new(HashMap::new());
    }
    TARGETS.with(|targets| {
        let mut targets = targets.borrow_mut();
        let slot = targets.entry(TypeId::of::<T>()).or_insert_with(|| match make() {
            Ok(target) => Box::new(target),
            Err(error) => panic!("the fuzz target could not start: {error}"),
        });
        let Some(target) = slot.downcast_mut::<T>() else { unreachable!("one type per TypeId") };
        if let Err(message) = target.run(data) {
            panic!("{}: invariant broken: {message}", target.name());
        }
    });
}

/// Fuzzes `target` within `budget`: the corpus and seeds first, then fresh
/// and mutated inputs. Stops at the first failure and saves its input.
pub fn run(target: &mut dyn Target, budget: Budget) -> Outcome {
    let mut pool = target.seeds();
    let corpus = load_corpus(target.name());
    let corpus_len = corpus.len();
    pool.extend(corpus);
    let dictionary = target.dictionary();
    let mut rng = Rng::new(budget.seed);
    let mut inputs = 0u64;
    let mut failure = None;
    let mut queue: std::collections::VecDeque<Vec<u8>> = pool.iter().cloned().collect();
    // The time budget is for running inputs: reading the corpus (hundreds
    // of files) took longer than a whole short run on a loaded CI machine,
    // which then ran no input at all. The first input always runs.
    let started = Instant::now();
    while inputs < budget.iterations && (inputs == 0 || started.elapsed() < budget.time) {
        let data = match queue.pop_front() {
            Some(seed) => seed,
            None if pool.is_empty() || rng.below(4) == 0 => {
                let len = rng.below(256);
                rng.bytes(len)
            }
            None => mutate(&mut rng, &pool, dictionary),
        };
        inputs += 1;
        if let Err(message) = run_one(target, &data) {
            failure = Some((message, save(target.name(), &data)));
            break;
        }
    }
    Outcome { target: target.name(), inputs, elapsed: started.elapsed(), corpus: corpus_len, failure }
}

fn save(target: &str, data: &[u8]) -> PathBuf {
    let dir = artifacts_dir(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("failure-{hash:016x}"));
    let _ = std::fs::write(&path, data);
    path
}

/// One to eight mutations of a pool entry: bit flips, random bytes,
/// insertions, deletions, duplications, dictionary words, splices.
fn mutate(rng: &mut Rng, pool: &[Vec<u8>], dictionary: &[&str]) -> Vec<u8> {
    let mut data = pool[rng.below(pool.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes = rng.bytes(n);
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                data.drain(at..at + n);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                let copy: Vec<u8> = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, copy);
            }
            5 if !dictionary.is_empty() => {
                let word = dictionary[rng.below(dictionary.len())].as_bytes().to_vec();
                let at = rng.below(len + 1);
                if rng.below(2) == 0 || len == 0 {
                    data.splice(at..at, word);
                } else {
                    let end = (at + word.len()).min(len);
                    data.splice(at..end, word);
                }
            }
            _ => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let at = rng.below(len + 1);
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    data
}
