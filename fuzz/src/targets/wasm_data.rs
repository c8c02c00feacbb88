//! The checks on data a running WASM component returns
//! (`host/src/wasm/v1.rs`: `init`, `list-devices`, `allocate`,
//! `preferred-allocation`, `pre-start`; the lists through the
//! `Publisher` of `host/src/device_state.rs`; a preferred answer through
//! the server's `check_preferred`), through the public API only
//! (`devhost::wasm::load` and the `Backend` trait).
//!
//! The component is built here once: a core module in WAT (below) made a
//! component of devhost's world with `wit-component`. Its `init` hex-decodes
//! its config JSON string into linear memory (an "image") and every export
//! returns the pointer the image's header names for it, so the canonical-ABI
//! answer of each call — strings, lists, records, variants, every pointer
//! and length — is the input's. Most images are well formed (written here
//! from typed answers); some are corrupted on purpose (non-UTF-8 strings,
//! unknown discriminants, pointers and lengths out of bounds or misaligned,
//! input-chosen bytes patched in).
//!
//! Invariants, for a well-formed image: `init` declares exactly the
//! resources answered, or declines with the component's message; a list
//! for an undeclared resource, an empty or repeated device ID fails `init`
//! as a fault; accepted lists reach the device states exactly; `allocate`
//! answers exactly (envs and annotations by key) or declines, and a
//! repeated env name or annotation key is a fault; `preferred-allocation`
//! answers exactly (`none` = the host's policy), a size over 32 bits is
//! declined without calling the component; `pre-start` answers exactly;
//! whatever `check_preferred` accepts keeps the kubelet's contract (a
//! reference written here). For a corrupted image: nothing crashes or
//! panics; a refusal is a fault naming the call; after a trap the instance
//! refuses every call until the next `init`.
//!
//! Known findings, checked only with `DEVHOST_FUZZ_STRICT=1` (see
//! `fuzz/README.md`): F5, an allocation breaking the contract the native
//! adapter enforces (an empty env name or annotation key, device-node
//! permissions other than `r`/`w`/`m`, an empty CDI name) is refused as
//! from a native module; F6, `check_preferred` accepts every answer that
//! keeps the kubelet's contract, also when `available` repeats an ID or
//! more must-include IDs are available than `allocation_size`.

use std::collections::{BTreeMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Result as AResult, Unstructured};
use devhost::backend::{Allocation, Backend, BackendError, Device, DeviceSpec, Health, Mount, PreferredRequest};
use devhost::backend::{Publisher, ResourceSpec};
use devhost::wasm::{SandboxConfig, WasmModule};

use crate::Target;

/// Where `init` decodes the image, and how large it may be.
const IMG: u32 = 0x1_0000;
const IMG_MAX: usize = 0x1_0000;

/// The core module: a bump allocator, the hex-decoding `init`, and every
/// other export returning the pointer in its header slot.
const CORE: &str = r#"
(module
  (memory (export "memory") 8)
  (global $heap (mut i32) (i32.const 0x20000))
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                                            (i32.const 16)))
                    (i32.const -1))
          (then unreachable))))
    (if (local.get $old_size)
      (then (memory.copy (local.get $ptr) (local.get $old)
              (select (local.get $old_size) (local.get $size) (i32.lt_u (local.get $old_size) (local.get $size))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))
  (func $nib (param $c i32) (result i32)
    (if (result i32) (i32.le_u (local.get $c) (i32.const 57))
      (then (i32.sub (local.get $c) (i32.const 48)))
      (else (i32.sub (local.get $c) (i32.const 87)))))
  (func (export "devhost:backend/api@1.0.0#init") (param $p i32) (param $n i32) (result i32)
    (local $i i32)
    (local.set $n (i32.shr_u (local.get $n) (i32.const 1)))
    (if (i32.gt_u (local.get $n) (i32.const 0x10000)) (then unreachable))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store8 (i32.add (i32.const 0x10000) (local.get $i))
          (i32.or
            (i32.shl (call $nib (i32.load8_u (i32.add (local.get $p) (i32.shl (local.get $i) (i32.const 1)))))
                     (i32.const 4))
            (call $nib (i32.load8_u (i32.add (local.get $p)
                                             (i32.add (i32.shl (local.get $i) (i32.const 1)) (i32.const 1)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.load (i32.const 0x10000)))
  (func (export "devhost:backend/api@1.0.0#list-devices") (result i32)
    (i32.load (i32.const 0x10004)))
  (func (export "devhost:backend/api@1.0.0#allocate") (param i32 i32 i32 i32) (result i32)
    (i32.load (i32.const 0x10008)))
  (func (export "devhost:backend/api@1.0.0#preferred-allocation") (param i32 i32 i32 i32 i32 i32 i32) (result i32)
    (i32.load (i32.const 0x1000c)))
  (func (export "devhost:backend/api@1.0.0#pre-start") (param i32 i32 i32 i32) (result i32)
    (i32.load (i32.const 0x10010)))
  (func (export "devhost:backend/api@1.0.0#shutdown"))
)
"#;

/// Builds the component from [`CORE`] and devhost's WIT.
fn component() -> Result<Vec<u8>, String> {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../abi/wit/devhost-backend-1.0.0");
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(&wit).map_err(|e| format!("{}: {e:#}", wit.display()))?;
    let world = resolve.select_world(&[package], Some("backend")).map_err(|e| format!("{e:#}"))?;
    let mut module = wat::parse_str(CORE).map_err(|e| format!("the core module: {e}"))?;
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)
        .map_err(|e| format!("{e:#}"))?;
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("cannot encode the component: {e:#}"))
}

/// The target: the component file and a compilation cache, so that loading
/// it with a new config (each `init` step) costs no compilation.
pub struct WasmData {
    dir: tempfile::TempDir,
    /// The backend of the current `init` step.
    backend: Option<Arc<dyn Backend>>,
}

impl WasmData {
    /// Builds the component and loads it once (filling the cache).
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-wasm-data-").tempdir().map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("data.wasm"), component()?).map_err(|e| e.to_string())?;
        let target = WasmData { dir, backend: None };
        target.load(String::new())?;
        Ok(target)
    }

    /// The component with `config` as its config JSON (what `init` gets).
    fn load(&self, config_json: String) -> Result<Arc<dyn Backend>, String> {
        let module = WasmModule {
            name: "fuzz".into(),
            path: self.dir.path().join("data.wasm"),
            sha256: None,
            config_json,
            // No polling during an input: only `init` lists devices.
            sandbox: SandboxConfig {
                memory_bytes: 16 << 20,
                poll_interval: Duration::from_secs(3600),
                cache_dir: Some(self.dir.path().join("cache")),
                ..SandboxConfig::default()
            },
            call_timeout: Duration::from_secs(5),
        };
        devhost::wasm::load(module).map_err(|e| format!("the component did not load: {e}"))
    }
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(WasmData::new, data);
}

// ---------------------------------------------------------------------
// What the component answers.

/// A string as the component returns it (bytes, maybe not UTF-8).
type Str = Vec<u8>;

const WORDS: &[&str] = &["", "gpu-0", "gpu-1", "example.com/gpu", "fuzz.example.com/w", "/dev/null", "rw", "x", "K"];
const RESOURCES: &[&str] = &["example.com/gpu", "fuzz.example.com/w"];

fn text(u: &mut Unstructured<'_>) -> AResult<Str> {
    Ok(match u.int_in_range(0..=9u8)? {
        0..=6 => (*u.choose(WORDS)?).as_bytes().to_vec(),
        7 | 8 => u.arbitrary::<String>()?.into_bytes(),
        _ => u.arbitrary::<Vec<u8>>()?,
    })
}

fn texts(u: &mut Unstructured<'_>, most: usize) -> AResult<Vec<Str>> {
    (0..u.int_in_range(0..=most)?).map(|_| text(u)).collect()
}

#[derive(Debug, Clone)]
struct WDevice {
    id: Str,
    /// 0 healthy, 1 unhealthy, anything else is no case of the enum.
    health: u8,
    numa: Vec<i64>,
}

#[derive(Debug, Clone, Default)]
struct WAllocation {
    envs: Vec<(Str, Str)>,
    mounts: Vec<(Str, Str, u8)>,
    device_specs: Vec<(Str, Str, Str)>,
    annotations: Vec<(Str, Str)>,
    cdi_devices: Vec<Str>,
}

/// Every answer of one instance.
#[derive(Debug, Clone)]
struct Answers {
    init: Result<Vec<(Str, u8, u8)>, Str>,
    lists: Vec<(Str, Vec<WDevice>)>,
    allocate: Result<WAllocation, Str>,
    preferred: Result<Option<Vec<Str>>, Str>,
    pre_start: Result<(), Str>,
}

fn resource(u: &mut Unstructured<'_>) -> AResult<Str> {
    if u.ratio(4, 5)? { Ok((*u.choose(RESOURCES)?).as_bytes().to_vec()) } else { text(u) }
}

fn result<T>(
    u: &mut Unstructured<'_>,
    ok: impl FnOnce(&mut Unstructured<'_>) -> AResult<T>,
) -> AResult<Result<T, Str>> {
    Ok(if crate::rarely(u, 6) { Err(text(u)?) } else { Ok(ok(u)?) })
}

fn bool_byte(u: &mut Unstructured<'_>) -> AResult<u8> {
    Ok(if crate::rarely(u, 30) { u.arbitrary()? } else { u8::from(u.arbitrary::<bool>()?) })
}

impl Answers {
    fn arbitrary(u: &mut Unstructured<'_>) -> AResult<Answers> {
        let init = result(u, |u| {
            (0..u.int_in_range(0..=2)?).map(|_| Ok((resource(u)?, bool_byte(u)?, bool_byte(u)?))).collect()
        })?;
        let lists = (0..u.int_in_range(0..=2)?)
            .map(|_| {
                let devices = (0..u.int_in_range(0..=4)?)
                    .map(|_| {
                        Ok(WDevice {
                            id: if u.ratio(3, 4)? {
                                format!("gpu-{}", u.int_in_range(0..=5)?).into_bytes()
                            } else {
                                text(u)?
                            },
                            health: if crate::rarely(u, 30) { u.arbitrary()? } else { u.int_in_range(0..=1)? },
                            numa: u.arbitrary::<Vec<i64>>()?.into_iter().take(3).collect(),
                        })
                    })
                    .collect::<AResult<_>>()?;
                Ok((resource(u)?, devices))
            })
            .collect::<AResult<_>>()?;
        let allocate = result(u, |u| {
            let pairs = |u: &mut Unstructured<'_>| -> AResult<Vec<(Str, Str)>> {
                (0..u.int_in_range(0..=2)?).map(|_| Ok((text(u)?, text(u)?))).collect()
            };
            Ok(WAllocation {
                envs: pairs(u)?,
                mounts: (0..u.int_in_range(0..=2)?)
                    .map(|_| Ok((text(u)?, text(u)?, bool_byte(u)?)))
                    .collect::<AResult<_>>()?,
                device_specs: (0..u.int_in_range(0..=2)?)
                    .map(|_| {
                        let permissions = if u.ratio(3, 4)? {
                            (*u.choose(&["rw", "r", "rwm", "", "q"])?).as_bytes().to_vec()
                        } else {
                            text(u)?
                        };
                        Ok((text(u)?, text(u)?, permissions))
                    })
                    .collect::<AResult<_>>()?,
                annotations: pairs(u)?,
                cdi_devices: texts(u, 2)?,
            })
        })?;
        let preferred = result(u, |u| Ok(if crate::rarely(u, 3) { None } else { Some(texts(u, 4)?) }))?;
        let pre_start = result(u, |_| Ok(()))?;
        Ok(Answers { init, lists, allocate, preferred, pre_start })
    }

    /// Whether every string is UTF-8 and every enum and bool in range.
    fn well_formed(&self) -> bool {
        let utf8 = |s: &Str| std::str::from_utf8(s).is_ok();
        let init = match &self.init {
            Ok(resources) => resources.iter().all(|(name, a, b)| utf8(name) && *a <= 1 && *b <= 1),
            Err(message) => utf8(message),
        };
        let lists =
            self.lists.iter().all(|(r, devices)| utf8(r) && devices.iter().all(|d| utf8(&d.id) && d.health <= 1));
        let allocate = match &self.allocate {
            Ok(a) => {
                a.envs.iter().chain(&a.annotations).all(|(k, v)| utf8(k) && utf8(v))
                    && a.mounts.iter().all(|(c, h, ro)| utf8(c) && utf8(h) && *ro <= 1)
                    && a.device_specs.iter().all(|(c, h, p)| utf8(c) && utf8(h) && utf8(p))
                    && a.cdi_devices.iter().all(utf8)
            }
            Err(message) => utf8(message),
        };
        let preferred = match &self.preferred {
            Ok(ids) => ids.iter().flatten().all(utf8),
            Err(message) => utf8(message),
        };
        let pre_start = self.pre_start.as_ref().err().is_none_or(utf8);
        init && lists && allocate && preferred && pre_start
    }
}

// ---------------------------------------------------------------------
// The image: the answers in the canonical ABI's memory layout.

/// Lays out values at absolute addresses from [`IMG`].
struct Image {
    bytes: Vec<u8>,
}

impl Image {
    fn alloc(&mut self, size: usize, align: usize) -> u32 {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at + size, 0);
        IMG + at as u32
    }

    fn put(&mut self, addr: u32, bytes: &[u8]) {
        let at = (addr - IMG) as usize;
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn u32(&mut self, addr: u32, value: u32) {
        self.put(addr, &value.to_le_bytes());
    }

    /// A string's `(ptr, len)` written at `at`.
    fn string(&mut self, at: u32, s: &[u8]) {
        let ptr = self.alloc(s.len(), 1);
        self.put(ptr, s);
        self.u32(at, ptr);
        self.u32(at + 4, s.len() as u32);
    }

    /// A list of `count` elements of `size` bytes (aligned to `align`):
    /// `(ptr, len)` written at `at`; returns the first element's address.
    fn list(&mut self, at: u32, count: usize, size: usize, align: usize) -> u32 {
        let ptr = self.alloc(count * size, align);
        self.u32(at, ptr);
        self.u32(at + 4, count as u32);
        ptr
    }

    /// A `result<_, string>`-shaped value: the discriminant, then (for an
    /// error) the message at `payload`.
    fn result_err(&mut self, at: u32, payload: u32, message: &[u8]) {
        self.put(at, &[1]);
        self.string(at + payload, message);
    }

    fn build(answers: &Answers) -> Image {
        let mut image = Image { bytes: Vec::new() };
        let header = image.alloc(20, 4);
        // init: result<list<resource>, string>, 12 bytes.
        let init = image.alloc(12, 4);
        match &answers.init {
            Ok(resources) => {
                let first = image.list(init + 4, resources.len(), 12, 4);
                for (i, (name, pre_start, preferred)) in resources.iter().enumerate() {
                    let at = first + 12 * i as u32;
                    image.string(at, name);
                    image.put(at + 8, &[*pre_start, *preferred]);
                }
            }
            Err(message) => image.result_err(init, 4, message),
        }
        // list-devices: list<device-list> behind a pointer to (ptr, len).
        let lists = image.alloc(8, 4);
        let first = image.list(lists, answers.lists.len(), 16, 4);
        for (i, (resource, devices)) in answers.lists.iter().enumerate() {
            let at = first + 16 * i as u32;
            image.string(at, resource);
            let first = image.list(at + 8, devices.len(), 20, 4);
            for (j, device) in devices.iter().enumerate() {
                let at = first + 20 * j as u32;
                image.string(at, &device.id);
                image.put(at + 8, &[device.health]);
                let numa = image.list(at + 12, device.numa.len(), 8, 8);
                for (k, node) in device.numa.iter().enumerate() {
                    image.put(numa + 8 * k as u32, &node.to_le_bytes());
                }
            }
        }
        // allocate: result<allocation, string>, 44 bytes.
        let allocate = image.alloc(44, 4);
        match &answers.allocate {
            Ok(a) => {
                let pairs = |image: &mut Image, at: u32, pairs: &[(Str, Str)]| {
                    let first = image.list(at, pairs.len(), 16, 4);
                    for (i, (k, v)) in pairs.iter().enumerate() {
                        image.string(first + 16 * i as u32, k);
                        image.string(first + 16 * i as u32 + 8, v);
                    }
                };
                pairs(&mut image, allocate + 4, &a.envs);
                let first = image.list(allocate + 12, a.mounts.len(), 20, 4);
                for (i, (c, h, ro)) in a.mounts.iter().enumerate() {
                    let at = first + 20 * i as u32;
                    image.string(at, c);
                    image.string(at + 8, h);
                    image.put(at + 16, &[*ro]);
                }
                let first = image.list(allocate + 20, a.device_specs.len(), 24, 4);
                for (i, (c, h, p)) in a.device_specs.iter().enumerate() {
                    let at = first + 24 * i as u32;
                    image.string(at, c);
                    image.string(at + 8, h);
                    image.string(at + 16, p);
                }
                pairs(&mut image, allocate + 28, &a.annotations);
                let first = image.list(allocate + 36, a.cdi_devices.len(), 8, 4);
                for (i, name) in a.cdi_devices.iter().enumerate() {
                    image.string(first + 8 * i as u32, name);
                }
            }
            Err(message) => image.result_err(allocate, 4, message),
        }
        // preferred: result<option<list<string>>, string>, 16 bytes.
        let preferred = image.alloc(16, 4);
        match &answers.preferred {
            Ok(None) => {}
            Ok(Some(ids)) => {
                image.put(preferred + 4, &[1]);
                let first = image.list(preferred + 8, ids.len(), 8, 4);
                for (i, id) in ids.iter().enumerate() {
                    image.string(first + 8 * i as u32, id);
                }
            }
            Err(message) => image.result_err(preferred, 4, message),
        }
        // pre-start: result<_, string>, 12 bytes.
        let pre_start = image.alloc(12, 4);
        if let Err(message) = &answers.pre_start {
            image.result_err(pre_start, 4, message);
        }
        for (slot, addr) in [init, lists, allocate, preferred, pre_start].into_iter().enumerate() {
            image.u32(header + 4 * slot as u32, addr);
        }
        image
    }

    /// Input-chosen damage: bytes patched anywhere, or a header slot
    /// pointing elsewhere. Returns whether anything changed.
    fn corrupt(&mut self, u: &mut Unstructured<'_>) -> bool {
        let mut changed = false;
        for _ in 0..u.int_in_range(0..=3).unwrap_or(0) {
            if self.bytes.is_empty() {
                break;
            }
            let at = u.int_in_range(0..=self.bytes.len() - 1).unwrap_or(0);
            let value = match u.int_in_range(0..=3u8).unwrap_or(0) {
                0 => u32::MAX,
                1 => 0x7fff_fff0,
                2 => u.arbitrary().unwrap_or(0),
                _ => u32::from(u.arbitrary::<u8>().unwrap_or(0xff)),
            };
            let end = (at + 4).min(self.bytes.len());
            let old = self.bytes[at..end].to_vec();
            self.bytes[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            changed |= old != self.bytes[at..end];
        }
        changed
    }

    fn config(&self) -> String {
        self.bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

// ---------------------------------------------------------------------
// The calls, and what must come of them.

/// One step of an input.
#[derive(Debug, Clone)]
enum Step {
    /// Load the component with new answers (and maybe damage), and init.
    Init,
    /// `init` again on the same backend: a fresh instance, same answers.
    Reinit,
    Allocate,
    Preferred(PreferredRequest),
    PreStart,
    Shutdown,
}

/// How a call ended.
#[derive(Debug, PartialEq)]
enum Outcome<T> {
    Ok(T),
    Declined(String),
    /// A `BackendError::fault`.
    Fault(String),
    /// A trap or refusal unwound with this message.
    Unwind(String),
}

fn observed<T>(result: std::thread::Result<Result<T, BackendError>>) -> Outcome<T> {
    match result {
        Ok(Ok(value)) => Outcome::Ok(value),
        Ok(Err(error)) if error.fault => Outcome::Fault(error.message),
        Ok(Err(error)) => Outcome::Declined(error.message),
        Err(panic) => Outcome::Unwind(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default(),
        ),
    }
}

fn utf8(s: &Str) -> String {
    String::from_utf8_lossy(s).into_owned()
}

fn health(byte: u8) -> Health {
    if byte == 0 { Health::Healthy } else { Health::Unhealthy }
}

/// The model's allocation, or the fault it is.
/// The component's allocation as devhost would pass it on (a repeated key:
/// the last value), with the refusal devhost names for each repeated key.
fn allocation(a: &WAllocation) -> (Allocation, Vec<String>) {
    let mut repeated = Vec::new();
    let mut unique = |pairs: &[(Str, Str)], what: &str| -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if map.insert(utf8(k), utf8(v)).is_some() {
                repeated.push(format!("allocate returned the {what} {:?} twice", utf8(k)));
            }
        }
        map
    };
    let envs = unique(&a.envs, "environment variable");
    let annotations = unique(&a.annotations, "annotation");
    let allocation = Allocation {
        envs,
        mounts: a
            .mounts
            .iter()
            .map(|(c, h, ro)| Mount { container_path: utf8(c), host_path: utf8(h), read_only: *ro != 0 })
            .collect(),
        device_specs: a
            .device_specs
            .iter()
            .map(|(c, h, p)| DeviceSpec { container_path: utf8(c), host_path: utf8(h), permissions: utf8(p) })
            .collect(),
        annotations,
        cdi_devices: a.cdi_devices.iter().map(utf8).collect(),
        // World 1.0.0 has no device status: always empty.
        device_status: BTreeMap::new(),
    };
    (allocation, repeated)
}

/// What the native adapter refuses in an allocation (F5).
fn native_refuses(a: &Allocation) -> Option<String> {
    if a.envs.keys().any(String::is_empty) {
        return Some("an empty env name".into());
    }
    if a.annotations.keys().any(String::is_empty) {
        return Some("an empty annotation key".into());
    }
    if let Some(d) =
        a.device_specs.iter().find(|d| d.permissions.is_empty() || !d.permissions.chars().all(|c| "rwm".contains(c)))
    {
        return Some(format!("device-node permissions {:?}", d.permissions));
    }
    if a.cdi_devices.iter().any(String::is_empty) {
        return Some("an empty CDI name".into());
    }
    None
}

/// The kubelet's contract for a preferred answer, written here.
fn preferred_keeps_contract(request: &PreferredRequest, ids: &[String]) -> bool {
    let available: HashSet<&str> = request.available.iter().map(String::as_str).collect();
    let mut chosen = HashSet::new();
    if !ids.iter().all(|id| available.contains(id.as_str()) && chosen.insert(id.as_str())) {
        return false;
    }
    let must: HashSet<&str> =
        request.must_include.iter().map(String::as_str).filter(|id| available.contains(id)).collect();
    let must_ok = if must.len() <= request.size { must.is_subset(&chosen) } else { chosen.is_subset(&must) };
    must_ok && ids.len() == request.size.min(available.len())
}

/// The operations a refusal may name.
const OPERATIONS: &[&str] = &["instantiation", "init", "list-devices", "allocate", "preferred-allocation", "pre-start"];

impl Target for WasmData {
    fn name(&self) -> &'static str {
        "wasm-data"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![vec![0; 32], vec![1, 2, 0, 1, 1, 0, 1, 4, 3, 0, 1, 0, 2, 0, 9, 9, 3, 2, 1, 0, 5, 4, 3, 2, 1, 0, 0, 1]]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        let mut steps = vec![Step::Init];
        while steps.len() < 8
            && let Ok(kind) = u.int_in_range(0..=7u8)
        {
            steps.push(match kind {
                0 => Step::Init,
                7 => Step::Reinit,
                1 | 2 => Step::Allocate,
                3 | 4 => {
                    let ids = |u: &mut Unstructured<'_>| -> Vec<String> {
                        (0..u.int_in_range(0..=4).unwrap_or(0))
                            .map(|_| format!("gpu-{}", u.int_in_range(0..=4).unwrap_or(0)))
                            .collect()
                    };
                    let size = if crate::rarely(&mut u, 20) { usize::MAX } else { u.int_in_range(0..=4).unwrap_or(1) };
                    Step::Preferred(PreferredRequest { available: ids(&mut u), must_include: ids(&mut u), size })
                }
                5 => Step::PreStart,
                _ => Step::Shutdown,
            });
        }
        let result = self.drive(&mut u, &steps);
        if let Some(backend) = self.backend.take() {
            backend.shutdown();
        }
        result
    }
}

impl WasmData {
    fn drive(&mut self, u: &mut Unstructured<'_>, steps: &[Step]) -> Result<(), String> {
        // The answers of the live instance, and whether they can be trusted
        // to decode (a well-formed, undamaged image).
        let mut live: Option<(Answers, bool)> = None;
        let mut loaded: Option<(Answers, bool)> = None;
        let mut broken = false;
        for (index, step) in steps.iter().enumerate() {
            let context = |what: String| format!("step #{index} {step:?}: {what}");
            match step {
                Step::Init | Step::Reinit => {
                    if matches!(step, Step::Init) || loaded.is_none() {
                        let answers = Answers::arbitrary(u).unwrap_or(Answers {
                            init: Ok(vec![]),
                            lists: vec![],
                            allocate: Err(vec![]),
                            preferred: Ok(None),
                            pre_start: Ok(()),
                        });
                        let mut image = Image::build(&answers);
                        let damaged = crate::rarely(u, 8) && image.corrupt(u);
                        if image.bytes.len() > IMG_MAX {
                            continue;
                        }
                        let clean = answers.well_formed() && !damaged;
                        if let Some(previous) = self.backend.take() {
                            previous.shutdown();
                        }
                        // The config JSON is just the image in hex: the component
                        // decodes every character of it.
                        self.backend = Some(self.load(image.config())?);
                        loaded = Some((answers, clean));
                    }
                    let (Some(backend), Some((answers, clean))) = (&self.backend, &loaded) else { continue };
                    let publisher = Publisher::default();
                    let got = observed(catch_unwind(AssertUnwindSafe(|| backend.init(publisher.clone()))));
                    broken = matches!(got, Outcome::Unwind(_));
                    if *clean {
                        check_init(answers, &publisher, got).map_err(context)?;
                    } else {
                        lenient(&got).map_err(context)?;
                    }
                    live = loaded.clone();
                }
                Step::Shutdown => {
                    if let Some(backend) = &self.backend {
                        backend.shutdown();
                    }
                    live = None;
                    broken = false;
                }
                _ if live.is_none() => {
                    let got = self.call(step);
                    if !matches!(&got, Outcome::Unwind(m) if m.contains("not initialised"))
                        && !preferred_too_large(step, &got)
                    {
                        return Err(context(format!("on no instance: {got:?}")));
                    }
                }
                _ => {
                    let Some((answers, clean)) = &live else { continue };
                    let got = self.call(step);
                    if preferred_too_large(step, &got) {
                        continue;
                    }
                    if broken {
                        if !matches!(&got, Outcome::Unwind(m) if m.contains("is broken since an earlier fault")) {
                            return Err(context(format!("a broken instance answered {got:?}")));
                        }
                        continue;
                    }
                    broken = matches!(got, Outcome::Unwind(_));
                    if *clean {
                        check_call(step, answers, got).map_err(context)?;
                    } else {
                        lenient(&got).map_err(context)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs a call, answer mapped to one type for comparison.
    fn call(&self, step: &Step) -> Outcome<Answer> {
        let Some(backend) = &self.backend else { return Outcome::Unwind("not initialised".into()) };
        let resource = "example.com/gpu";
        let result = catch_unwind(AssertUnwindSafe(|| match step {
            Step::Allocate => backend.allocate(resource, &["gpu-0".to_owned()]).map(Answer::Allocation),
            Step::Preferred(request) => backend.preferred_allocation(resource, request).map(Answer::Preferred),
            Step::PreStart => backend.pre_start(resource, &["gpu-0".to_owned()]).map(|()| Answer::Done),
            Step::Init | Step::Reinit | Step::Shutdown => Ok(Answer::Done),
        }));
        observed(result)
    }
}

/// A call's answer, whatever the call.
#[derive(Debug, PartialEq)]
enum Answer {
    Allocation(Allocation),
    Preferred(Option<Vec<String>>),
    Done,
}

/// A size over 32 bits is declined before the component is called.
fn preferred_too_large(step: &Step, got: &Outcome<Answer>) -> bool {
    matches!(step, Step::Preferred(r) if u32::try_from(r.size).is_err())
        && matches!(got, Outcome::Declined(m) if m == "size does not fit in 32 bits")
}

/// For a damaged image: a refusal names the call.
fn lenient<T: std::fmt::Debug>(got: &Outcome<T>) -> Result<(), String> {
    match got {
        Outcome::Unwind(message) if !OPERATIONS.iter().any(|op| message.starts_with(op)) => {
            Err(format!("an unwind that names no call: {message:?}"))
        }
        _ => Ok(()),
    }
}

fn check_init(answers: &Answers, publisher: &Publisher, got: Outcome<Vec<ResourceSpec>>) -> Result<(), String> {
    let resources = match &answers.init {
        Err(message) => {
            let want = Outcome::Declined(utf8(message));
            return if got == want { Ok(()) } else { Err(format!("init ended {got:?}, expected {want:?}")) };
        }
        Ok(resources) => resources,
    };
    let specs: Vec<ResourceSpec> = resources
        .iter()
        .map(|(name, a, b)| ResourceSpec {
            name: utf8(name),
            pre_start_required: *a != 0,
            preferred_allocation: *b != 0,
            release_required: false,
            counter_sets: Vec::new(),
        })
        .collect();
    // The lists, in order: an undeclared resource, an empty or repeated
    // ID makes init fail as a fault; otherwise the last list per resource
    // stands.
    let mut want_lists: BTreeMap<String, Vec<Device>> = BTreeMap::new();
    let mut fault = None;
    if let Some((resource, _)) = answers.lists.iter().find(|(r, _)| !specs.iter().any(|s| s.name == utf8(r))) {
        fault = Some(format!("list-devices returned a list for {:?}", utf8(resource)));
    }
    for (resource, devices) in &answers.lists {
        if fault.is_some() {
            break;
        }
        let mut seen = HashSet::new();
        if devices.iter().any(|d| d.id.is_empty() || !seen.insert(d.id.clone())) {
            fault = Some(format!("resource {:?}", utf8(resource)));
            break;
        }
        let devices = devices
            .iter()
            .map(|d| Device::new(utf8(&d.id), health(d.health)).with_numa_nodes(d.numa.clone()))
            .collect();
        want_lists.insert(utf8(resource), devices);
    }
    match (got, fault) {
        (Outcome::Fault(message), Some(start)) if message.starts_with(&start) => Ok(()),
        (Outcome::Ok(got), None) if got == specs => {
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            for (name, state) in names.iter().zip(publisher.seal(&names)) {
                let want = want_lists.get(name).cloned().unwrap_or_default();
                if state.snapshot().devices != want {
                    return Err(format!(
                        "{name:?} holds {:?}, the component listed {want:?}",
                        state.snapshot().devices
                    ));
                }
            }
            Ok(())
        }
        (got, fault) => Err(format!("init ended {got:?}; expected {specs:?} with the fault {fault:?}")),
    }
}

fn check_call(step: &Step, answers: &Answers, got: Outcome<Answer>) -> Result<(), String> {
    let want = match step {
        Step::Allocate => match &answers.allocate {
            Err(message) => Outcome::Declined(utf8(message)),
            Ok(a) => {
                // An answer may break several rules; devhost must refuse it
                // for one of them (which one it checks first is its own
                // business).
                let (allocation, repeated) = allocation(a);
                if crate::strict("F5")
                    && let Some(what) = native_refuses(&allocation)
                {
                    return match got {
                        Outcome::Fault(_) => Ok(()),
                        got => Err(format!("F5: an allocation with {what} was not refused: {got:?}")),
                    };
                }
                if !repeated.is_empty() {
                    return match got {
                        Outcome::Fault(message) if repeated.contains(&message) => Ok(()),
                        got => Err(format!("ended {got:?}, expected a fault naming one of {repeated:?}")),
                    };
                }
                Outcome::Ok(Answer::Allocation(allocation))
            }
        },
        Step::Preferred(request) => match &answers.preferred {
            Err(message) => Outcome::Declined(utf8(message)),
            Ok(ids) => {
                let ids: Option<Vec<String>> = ids.as_ref().map(|ids| ids.iter().map(utf8).collect());
                if let Some(ids) = &ids {
                    let accepted = devhost::server::service::check_preferred(request, ids);
                    let keeps = preferred_keeps_contract(request, ids);
                    if accepted.is_ok() && !keeps {
                        return Err(format!(
                            "check_preferred accepted {ids:?} for {request:?}, which breaks the contract"
                        ));
                    }
                    if crate::strict("F6") && keeps && accepted.is_err() {
                        return Err(format!(
                            "F6: check_preferred refused {ids:?} for {request:?}, which keeps the contract: {accepted:?}"
                        ));
                    }
                }
                Outcome::Ok(Answer::Preferred(ids))
            }
        },
        Step::PreStart => match &answers.pre_start {
            Err(message) => Outcome::Declined(utf8(message)),
            Ok(()) => Outcome::Ok(Answer::Done),
        },
        Step::Init | Step::Reinit | Step::Shutdown => return Ok(()),
    };
    if got == want { Ok(()) } else { Err(format!("ended {got:?}, expected {want:?}")) }
}
