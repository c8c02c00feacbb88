//! Data coming back through the C ABI. The host's readers
//! (`host/src/native/read.rs`, the callbacks) are private to the native
//! adapter, so this target drives them the way a real module does: it
//! compiles `fuzz/fixtures/bytes_backend.c` once, loads it with
//! `devhost::native::load` and hands it a script of attacker-chosen bytes
//! that becomes its device list, its Allocate answer and its preferred
//! allocation. The script is read here the same way ([`predict`]), so the
//! target knows which contract violations the host must refuse.
//!
//! Invariants: nothing panics; a device list breaking the contract (not
//! UTF-8, NULL with a length, empty or duplicate ID, unknown health, short
//! or uneven struct sizes) fails `init`; an accepted list reaches the
//! device state exactly as sent; an Allocate answer breaking the contract
//! is an error, and a valid one arrives exactly as sent; after such an
//! Allocate, a preferred answer breaking the contract (or an error) is an
//! error, and a valid one (or "use the default") arrives exactly as sent.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devhost::backend::handle::BackendHandle;
use devhost::backend::{Allocation, Backend, DeviceSpec, Health, Mount};
use tokio_util::sync::CancellationToken;

use crate::Target;

const DEFAULT_RESOURCE: &str = "fuzz.example.com/abi";

/// The target: the compiled fixture and a runtime for the handle.
pub struct NativeAbi {
    _dir: tempfile::TempDir,
    module: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl NativeAbi {
    /// Compiles the fixture with the system `cc`.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-abi-").tempdir().map_err(|e| e.to_string())?;
        let module = compile(dir.path())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(NativeAbi { _dir: dir, module, runtime })
    }
}

fn compile(dir: &Path) -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = dir.join("libbytes_backend.so");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-pthread", "-I"])
        .arg(repo.join("abi/include"))
        .arg("-o")
        .arg(&out)
        .arg(repo.join("fuzz/fixtures/bytes_backend.c"))
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !output.status.success() {
        return Err(format!("cc failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The script reader, the same as the fixture's.
struct Script<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// A string from the script: `None` is NULL with a length.
type Str = Option<Vec<u8>>;

impl Script<'_> {
    fn next(&mut self) -> u8 {
        let byte = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        byte
    }

    fn str(&mut self) -> Str {
        let n = self.next() as usize;
        if n == 255 {
            return None;
        }
        let left = self.bytes.len().saturating_sub(self.pos);
        let n = n.min(left);
        let out = self.bytes.get(self.pos..self.pos + n).unwrap_or_default().to_vec();
        self.pos += n;
        Some(out)
    }
}

fn text(s: &Str) -> Option<String> {
    s.as_ref().and_then(|bytes| String::from_utf8(bytes.clone()).ok())
}

/// What the host must make of a script.
struct Prediction {
    /// The device list (IDs and health) when it keeps the contract and the
    /// resource is declared cleanly under the default name; `None` when
    /// `init` may fail for another reason (a chosen name, unknown flags).
    accepted: Option<Vec<(String, Health)>>,
    /// The list breaks the contract: `init` must fail.
    refused: bool,
    /// Where the allocate part starts.
    allocate_at: usize,
}

fn predict(bytes: &[u8]) -> Prediction {
    let mut s = Script { bytes, pos: 0 };
    let flags = s.next();
    let name = if flags & 1 != 0 { s.str() } else { Some(DEFAULT_RESOURCE.as_bytes().to_vec()) };
    let count = (s.next() % 9) as usize;
    let mode = s.next() % 4;
    let mut refused = text(&name).is_none();
    if count > 0 && mode == 2 || count > 1 && mode == 3 {
        refused = true;
    }
    let mut devices = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..count {
        let health = match s.next() {
            0 => Some(Health::Healthy),
            1 | 2 => Some(Health::Unhealthy),
            _ => None,
        };
        let id = text(&s.str());
        let numa = s.next();
        let numa_count = (numa % 4) as usize;
        for _ in 0..numa_count {
            s.next();
        }
        let null_numa = numa & 0x80 != 0 && numa_count > 0;
        match (id, health) {
            (Some(id), Some(health)) if !id.is_empty() && seen.insert(id.clone()) && !null_numa => {
                devices.push((id, health));
            }
            _ => refused = true,
        }
    }
    let clean = flags & 1 == 0 && flags & 8 == 0 && !refused;
    Prediction { accepted: clean.then_some(devices), refused, allocate_at: s.pos }
}

/// The Allocate answer the host must return, or `None` if it must refuse
/// it (a contract violation or an error status).
fn predict_allocation(bytes: &[u8], at: usize) -> Option<Allocation> {
    let mut s = Script { bytes, pos: at };
    let mut answer = Allocation::default();
    let mut valid = true;
    let ops = s.next() % 8;
    for _ in 0..ops {
        match s.next() % 6 {
            kind @ (0 | 1) => {
                let (key, value) = (text(&s.str()), text(&s.str()));
                match (key, value) {
                    (Some(key), Some(value)) if !key.is_empty() => {
                        let map = if kind == 0 { &mut answer.envs } else { &mut answer.annotations };
                        map.insert(key, value);
                    }
                    _ => valid = false,
                }
            }
            2 => {
                let (container, host) = (text(&s.str()), text(&s.str()));
                let read_only = s.next() & 1 != 0;
                match (container, host) {
                    (Some(container_path), Some(host_path)) => {
                        answer.mounts.push(Mount { container_path, host_path, read_only })
                    }
                    _ => valid = false,
                }
            }
            3 => {
                let (container, host, permissions) = (text(&s.str()), text(&s.str()), text(&s.str()));
                match (container, host, permissions) {
                    (Some(container_path), Some(host_path), Some(permissions))
                        if !permissions.is_empty() && permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) =>
                    {
                        answer.device_specs.push(DeviceSpec { container_path, host_path, permissions });
                    }
                    _ => valid = false,
                }
            }
            4 => match text(&s.str()) {
                Some(name) if !name.is_empty() => answer.cdi_devices.push(name),
                _ => valid = false,
            },
            _ => {
                if text(&s.str()).is_none() {
                    valid = false;
                }
            }
        }
    }
    let ok = s.next().is_multiple_of(3);
    (valid && ok).then_some(answer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(NativeAbi::new, data);
}

impl Target for NativeAbi {
    fn name(&self) -> &'static str {
        "native-abi"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![
            // Two healthy devices; allocate adds an env and a device spec.
            vec![
                0, 2, 0, 0, 3, b'g', b'-', b'0', 0, 1, 3, b'g', b'-', b'1', 1, 7, 2, 0, 1, b'K', 1, b'V', 3, 1, b'/',
                1, b'/', 2, b'r', b'w', 0,
            ],
            // A non-UTF-8 ID.
            vec![0, 1, 0, 0, 2, 0xff, 0xfe, 0],
        ]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let prediction = predict(data);
        let expected_allocation = predict_allocation(data, prediction.allocate_at);
        let expected_preferred = predict_preferred(data, prediction.allocate_at);
        let config = format!("{{\"script\":\"{}\"}}", hex(data));
        let backend: Arc<dyn Backend> = devhost::native::load(&self.module, None, config)
            .map_err(|error| format!("the fixture did not load: {error}"))?;
        self.runtime.block_on(async {
            let cancel = CancellationToken::new();
            let started = BackendHandle::start("fuzz", backend, Duration::from_secs(2), cancel.clone()).await;
            let handle = match started {
                Err(error) if prediction.accepted.is_some() => {
                    return Err(format!("a valid device list was refused: {error}"));
                }
                Err(_) => return Ok(()),
                Ok(_) if prediction.refused => return Err("a device list breaking the contract was accepted".into()),
                Ok(handle) => handle,
            };
            let result = check_started(&handle, &prediction, expected_allocation, expected_preferred).await;
            handle.shutdown().await;
            cancel.cancel();
            result
        })
    }
}

async fn check_started(
    handle: &BackendHandle,
    prediction: &Prediction,
    expected: Option<Allocation>,
    expected_preferred: Option<Option<Vec<String>>>,
) -> Result<(), String> {
    let Some((spec, state)) = handle.resources().first() else {
        return Err("a started backend without resources".into());
    };
    if let Some(devices) = &prediction.accepted {
        let snapshot = state.snapshot();
        let seen: Vec<(String, Health)> = snapshot.devices.iter().map(|d| (d.id.clone(), d.health)).collect();
        if &seen != devices {
            return Err(format!("published {devices:?}, the host holds {seen:?}"));
        }
    }
    let answer = handle.allocate(&spec.name, vec![]).await;
    let allocated = match (answer, expected) {
        (Ok(got), Some(want)) if got != want => {
            return Err(format!("allocate answered {got:?}, the backend sent {want:?}"));
        }
        (Ok(got), None) => return Err(format!("allocate broke the contract or failed, yet the host answered {got:?}")),
        (Err(error), Some(want)) => return Err(format!("a valid allocate answer {want:?} was refused: {error}")),
        (Ok(_), Some(_)) => true,
        (Err(_), None) => false,
    };
    let request =
        devhost::backend::PreferredRequest { available: vec!["a".into(), "b".into()], must_include: vec![], size: 1 };
    let answer = handle.preferred_allocation(&spec.name, request).await;
    // After a refused Allocate the backend may be re-initialising (a fault
    // or garbage does that), so its preferred answer is judged only when
    // the Allocate went through.
    if !allocated {
        return Ok(());
    }
    // The host passes the backend's answer on as sent, or refuses it; the
    // server (not this target) then checks it against the request.
    match (answer, expected_preferred) {
        (Ok(got), Some(want)) if got != want => Err(format!("preferred answered {got:?}, the backend sent {want:?}")),
        (Ok(got), None) => Err(format!("a preferred answer breaking the contract or failing was passed on: {got:?}")),
        (Err(error), Some(want)) => Err(format!("a valid preferred answer {want:?} was refused: {error}")),
        _ => Ok(()),
    }
}

/// What `preferred` of the fixture answers, read from the script as the
/// fixture reads it (from the allocate part): `Some(Some(ids))` for
/// `DEVHOST_OK`, `Some(None)` for `DEVHOST_USE_DEFAULT`, `None` when the
/// host must refuse it (an ID that is not UTF-8 or NULL with a length, or
/// `DEVHOST_ERROR` / `DEVHOST_FAULT`).
fn predict_preferred(bytes: &[u8], at: usize) -> Option<Option<Vec<String>>> {
    let mut s = Script { bytes, pos: at };
    let count = s.next() % 5;
    let ids: Option<Vec<String>> = (0..count).map(|_| text(&s.str())).collect();
    let ids = ids?;
    match s.next() % 4 {
        0 => Some(Some(ids)),
        3 => Some(None),
        _ => None,
    }
}
