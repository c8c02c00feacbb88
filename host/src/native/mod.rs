//! Native backends: shared libraries speaking the C ABI v1 of `devhost-abi`.
//!
//! [`load`] checks the module file and its directories and copies the
//! checked bytes into a sealed memfd ([`checks`]), loads that copy with
//! `libloading` (and never unloads it), finds `devhost_backend_entry`,
//! negotiates the ABI version and checks the backend's table, then returns
//! the module adapted to the host's [`Backend`] trait ([`adapter`]). The
//! host's callbacks live in [`callbacks`], the copying and checking of
//! backend data in [`read`].
//! Deadlines, fault marking and re-initialisation are the
//! [`handle`](crate::backend::handle)'s job; nothing here spawns threads.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use devhost_abi::ffi::*;
use thiserror::Error;

use crate::backend::Backend;

mod adapter;
mod callbacks;
mod checks;
mod read;

/// Why a native module could not be loaded. Each message names the module
/// path and says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AbiError {
    /// The module file does not exist.
    #[error("native backend {}: no such file (expected the path of a shared library)", module.display())]
    NotFound {
        /// The module path.
        module: PathBuf,
    },
    /// The module file could not be opened or read.
    #[error("native backend {}: cannot read it: {message}", module.display())]
    Io {
        /// The module path.
        module: PathBuf,
        /// The operating system's error.
        message: String,
    },
    /// The path is a directory, socket, device, ...
    #[error("native backend {}: not a regular file (expected a shared library file)", module.display())]
    NotRegularFile {
        /// The module path.
        module: PathBuf,
    },
    /// Group or others may write the file.
    #[error(
        "native backend {}: mode {mode:04o} lets group or others write it (expected no group/other write permission, e.g. 0755)",
        module.display()
    )]
    Writable {
        /// The module path.
        module: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// The file belongs to someone other than root or devhost's user.
    #[error("native backend {}: owned by uid {owner} (expected root or devhost's own uid {euid})", module.display())]
    Owner {
        /// The module path.
        module: PathBuf,
        /// The file's owner.
        owner: u32,
        /// devhost's effective uid.
        euid: u32,
    },
    /// A symbolic link on the module's path belongs to someone other than
    /// root or devhost's user: in a sticky directory (like `/tmp`) its
    /// owner can point it at another file.
    #[error(
        "native backend {}: {} is a symbolic link owned by uid {owner} (expected root or devhost's own uid {euid}: its owner can re-point it)",
        module.display(),
        link.display()
    )]
    LinkOwner {
        /// The module path.
        module: PathBuf,
        /// The link, on the module's path as configured.
        link: PathBuf,
        /// The link's owner.
        owner: u32,
        /// devhost's effective uid.
        euid: u32,
    },
    /// A directory on the module's canonical path belongs to someone other
    /// than root or devhost's user: they could replace the module.
    #[error(
        "native backend {}: module directory {} is owned by uid {owner} (expected root or devhost's own uid {euid})",
        module.display(),
        directory.display()
    )]
    DirectoryOwner {
        /// The module path.
        module: PathBuf,
        /// The directory, on the module's canonical path.
        directory: PathBuf,
        /// The directory's owner.
        owner: u32,
        /// devhost's effective uid.
        euid: u32,
    },
    /// Group or others may write a directory on the module's canonical path
    /// (and it is not a sticky directory owned by root): they could replace
    /// the module.
    #[error(
        "native backend {}: module directory {} is writable by group or others (mode {mode:04o}; expected no group/other write permission, e.g. 0755, or a sticky directory owned by root like /tmp)",
        module.display(),
        directory.display()
    )]
    DirectoryWritable {
        /// The module path.
        module: PathBuf,
        /// The directory, on the module's canonical path.
        directory: PathBuf,
        /// The directory's permission bits.
        mode: u32,
    },
    /// The sealed in-memory copy the module is loaded from could not be
    /// made (devhost never falls back to loading the path itself).
    #[error("native backend {}: cannot make the sealed in-memory copy it is loaded from: {message}", module.display())]
    Memfd {
        /// The module path.
        module: PathBuf,
        /// The step that failed and the operating system's error.
        message: String,
    },
    /// The configured pin is not a SHA-256 in hex.
    #[error("native backend {}: sha256 pin {pin:?} is not 64 hexadecimal digits", module.display())]
    BadPin {
        /// The module path.
        module: PathBuf,
        /// The pin as configured.
        pin: String,
    },
    /// The file's SHA-256 differs from the pin.
    #[error("native backend {}: sha256 is {actual}, but the config pins {expected}", module.display())]
    ChecksumMismatch {
        /// The module path.
        module: PathBuf,
        /// The configured pin (lower case).
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The file is not an ELF object.
    #[error(
        "native backend {}: not an ELF shared library (starts with bytes [{found}], expected [7f 45 4c 46])",
        module.display()
    )]
    NotElf {
        /// The module path.
        module: PathBuf,
        /// Its first bytes in hex.
        found: String,
    },
    /// The dynamic loader refused the file.
    #[error("native backend {}: the dynamic loader refused it: {message}", module.display())]
    Load {
        /// The module path.
        module: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The entry symbol is missing.
    #[error(
        "native backend {}: no symbol `{DEVHOST_BACKEND_ENTRY_SYMBOL}` (expected a backend built against devhost_backend.h or with devhost_abi::export_backend!)",
        module.display()
    )]
    MissingEntry {
        /// The module path.
        module: PathBuf,
    },
    /// The entry point returned NULL.
    #[error(
        "native backend {}: its entry point refused devhost's backend ABI {host} (returned NULL; its log may say why)",
        module.display()
    )]
    Refused {
        /// The module path.
        module: PathBuf,
        /// The host's version, `major.minor`.
        host: String,
    },
    /// The backend speaks another major version.
    #[error(
        "native backend {}: implements backend ABI {backend}, but this devhost implements ABI {host} (expected major {major})",
        module.display()
    )]
    MajorMismatch {
        /// The module path.
        module: PathBuf,
        /// The backend's version, `major.minor`.
        backend: String,
        /// The host's version, `major.minor`.
        host: String,
        /// The major the host accepts.
        major: u32,
    },
    /// A struct is smaller than the ABI requires.
    #[error("native backend {}: {name}.struct_size is {size} bytes, expected at least {minimum} (ABI 1.0)", module.display())]
    StructTooSmall {
        /// The module path.
        module: PathBuf,
        /// The C type name.
        name: &'static str,
        /// The size it declares.
        size: u32,
        /// The size ABI 1.0 defines, the smallest any 1.x host accepts.
        minimum: u32,
    },
    /// A required function pointer is NULL.
    #[error("native backend {}: DevhostBackendApi.{name} is NULL (required by ABI {host})", module.display())]
    MissingFunction {
        /// The module path.
        module: PathBuf,
        /// The field name.
        name: &'static str,
        /// The host's version, `major.minor`.
        host: String,
    },
}

/// `major.minor` of a packed version.
fn show(version: u32) -> String {
    format!("{}.{}", version_major(version), version_minor(version))
}

/// Loads the native backend `module`, checking the file and its directories
/// first (and its SHA-256 against `sha256`, if pinned), and adapts it to the
/// host's [`Backend`] trait. `config_json` is the backend's `[config]` table
/// as a JSON object, handed to every `init`. The library stays loaded for
/// the life of the process, even when this fails after loading it.
pub fn load(module: &Path, sha256: Option<&str>, config_json: String) -> Result<Arc<dyn Backend>, AbiError> {
    load_with_digest(module, sha256, config_json).map(|(backend, _)| backend)
}

/// [`load`], also returning the lower-case hex SHA-256 of the code actually
/// loaded: the bytes that were checked, copied into a sealed memfd and
/// loaded from there, whatever happens to the file afterwards.
pub fn load_with_digest(
    module: &Path,
    sha256: Option<&str>,
    config_json: String,
) -> Result<(Arc<dyn Backend>, String), AbiError> {
    let checked = checks::check_module(module, sha256)?;
    let library = open_image(module, checked.image, &checked.sha256)?;
    let symbol = format!("{DEVHOST_BACKEND_ENTRY_SYMBOL}\0");
    // SAFETY: the symbol has the ABI's entry type (it is what the name
    // promises); the library is never unloaded, so the pointer stays valid.
    let entry = unsafe { library.get::<DevhostBackendEntry>(symbol.as_bytes()) }
        .map_err(|_| AbiError::MissingEntry { module: module.to_owned() })?;
    let entry: DevhostBackendEntry = *entry;
    // SAFETY: the entry point takes the static host table, per the ABI.
    let table = unsafe { entry(&callbacks::HOST_API) };
    // SAFETY: a non-NULL table is static in the module, per the ABI.
    let fns = unsafe { negotiate(module, table)? };
    tracing::info!(backend = %module.display(), sha256 = %checked.sha256, "loaded native backend");
    Ok((Arc::new(adapter::NativeBackend::new(module.to_owned(), fns, config_json)), checked.sha256))
}

/// The libraries loaded so far, by the SHA-256 of their bytes. Loading the
/// same bytes again reuses the library, as loading one file twice always
/// did (so reloads and repeated loads do not pile up copies); different
/// bytes load anew, even from the same path.
static LOADED: Mutex<BTreeMap<String, &'static libloading::Library>> = Mutex::new(BTreeMap::new());

/// Loads the sealed `image` of `module`, whose bytes have the SHA-256
/// `sha256`, through `/proc/self/fd`, for good.
fn open_image(module: &Path, image: OwnedFd, sha256: &str) -> Result<&'static libloading::Library, AbiError> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // Held while loading, so that the same bytes are never loaded twice.
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(library) = loaded.get(sha256) {
        return Ok(library);
    }
    let path = format!("/proc/self/fd/{}", image.as_raw_fd());
    // SAFETY: loading runs the module's initialisers. The image holds
    // exactly the bytes that passed the checks (owned by root or us, in
    // directories only root or we can change, not writable by others,
    // pinned if configured) and is sealed against writes: running its code
    // is what the operator asked for.
    match unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) } {
        Ok(library) => {
            // The descriptor stays open for the life of the process: glibc
            // hands back an already loaded object whose name matches, so no
            // later load may reuse this `/proc/self/fd/N` name.
            let _ = image.into_raw_fd();
            // Never unloaded: its symbols and threads borrow it for good.
            let library: &'static libloading::Library = Box::leak(Box::new(libloading::Library::from(library)));
            loaded.insert(sha256.to_owned(), library);
            Ok(library)
        }
        Err(error) if std::fs::metadata(&path).is_err() => Err(AbiError::Memfd {
            module: module.to_owned(),
            message: format!("the loader cannot open it as {path} (is /proc mounted?): {error}"),
        }),
        Err(error) => {
            // The loader names what it opened; name the module instead.
            let message = error.to_string().replace(&format!("{path}:"), &format!("{}:", module.display()));
            Err(AbiError::Load { module: module.to_owned(), message })
        }
    }
}

/// Checks the backend's table: version first (its first 8 bytes are the
/// same in every major), then size, then required functions.
///
/// # Safety
///
/// `table` is NULL or points to at least its `struct_size` readable bytes.
unsafe fn negotiate(module: &Path, table: *const DevhostBackendApi) -> Result<adapter::BackendFns, AbiError> {
    let host = show(DEVHOST_ABI_VERSION);
    if table.is_null() {
        return Err(AbiError::Refused { module: module.to_owned(), host });
    }
    let header = table.cast::<u32>();
    // SAFETY: every major starts the table with `u32 struct_size, u32
    // abi_version`, readable per the caller's contract (read unaligned: a
    // hostile module need not align it).
    let (size, version) = unsafe { (header.read_unaligned(), header.add(1).read_unaligned()) };
    if version_major(version) != DEVHOST_ABI_VERSION_MAJOR {
        return Err(AbiError::MajorMismatch {
            module: module.to_owned(),
            backend: show(version),
            host,
            major: DEVHOST_ABI_VERSION_MAJOR,
        });
    }
    let minimum = DEVHOST_BACKEND_API_SIZE_1_0;
    if size < minimum {
        return Err(AbiError::StructTooSmall { module: module.to_owned(), name: "DevhostBackendApi", size, minimum });
    }
    // SAFETY: the size covers at least the 1.0 table; what it covers is
    // copied (unaligned: a hostile module need not align it), and the
    // functions a later minor added read as NULL from an older backend.
    let api = unsafe { read::read_struct_from(table, "DevhostBackendApi", minimum as usize) }
        .map_err(|message| AbiError::Load { module: module.to_owned(), message })?;
    let missing = |name| AbiError::MissingFunction { module: module.to_owned(), name, host: host.clone() };
    Ok(adapter::BackendFns {
        init: api.init.ok_or_else(|| missing("init"))?,
        allocate: api.allocate.ok_or_else(|| missing("allocate"))?,
        preferred_allocation: api.preferred_allocation,
        pre_start: api.pre_start,
        shutdown: api.shutdown.ok_or_else(|| missing("shutdown"))?,
        release: api.release,
        poll: api.poll,
        allocate_shared: api.allocate_shared,
    })
}
