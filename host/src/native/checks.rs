//! The checks a module passes before it is loaded, and the sealed copy that
//! is loaded. Every directory on the module's canonical path must belong to
//! root or to devhost's own user and must not let group or others write it
//! (unless it is sticky and root's, like `/tmp`), so nobody else can swap
//! the file or a directory on its way. A symbolic link on the path as
//! configured is followed only if root or devhost's user owns it and its
//! directory passes the same checks: otherwise whoever controls the link
//! chooses the module. The file is then opened once, and
//! everything else is checked on that descriptor: a regular file, not
//! writable by group or others, owned by root or devhost's own user. Its
//! bytes are read once, copied into a sealed `memfd` (the image, immutable
//! from then on) and hashed on the way; they must start like an ELF object
//! and match the `sha256` pin when one is configured. The caller loads the
//! image, never the path: what was checked is byte for byte what runs, and
//! every load is a new inode, so a module replaced on disk really loads anew.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::AbiError;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// A module that passed every check.
#[derive(Debug)]
pub(super) struct Checked {
    /// A sealed memfd holding exactly the bytes that were checked.
    pub(super) image: OwnedFd,
    /// SHA-256 of those bytes, lower-case hex.
    pub(super) sha256: String,
}

/// Runs every check on `module` and returns its sealed image.
pub(super) fn check_module(module: &Path, sha256: Option<&str>) -> Result<Checked, AbiError> {
    let pin = sha256.map(|pin| parse_pin(module, pin)).transpose()?;
    let io = |error: std::io::Error| AbiError::Io { module: module.to_owned(), message: error.to_string() };
    let open_error = |error: std::io::Error| match error.kind() {
        ErrorKind::NotFound => AbiError::NotFound { module: module.to_owned() },
        _ => io(error),
    };
    // What the kernel follows to reach the file; each directory on it is
    // checked, and the file is opened through it.
    check_links(module)?;
    let canonical = std::fs::canonicalize(module).map_err(open_error)?;
    check_directories(module, &canonical)?;
    // The canonical path has no symlinks, and its directories are trusted:
    // a symlink in its last component now is a race lost, not a module.
    // O_NONBLOCK so that a FIFO is refused below instead of blocking here.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&canonical)
        .map_err(open_error)?;
    let metadata = file.metadata().map_err(io)?;
    if !metadata.is_file() {
        return Err(AbiError::NotRegularFile { module: module.to_owned() });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(AbiError::Writable { module: module.to_owned(), mode });
    }
    let euid = effective_uid();
    if metadata.uid() != 0 && metadata.uid() != euid {
        return Err(AbiError::Owner { module: module.to_owned(), owner: metadata.uid(), euid });
    }

    let image = create_memfd(module, &canonical)?;
    let mut copier = Copier { image, hasher: Sha256::new(), head: Vec::with_capacity(4), failed_writing: false };
    if let Err(error) = std::io::copy(&mut file, &mut copier) {
        // Either reading the module failed, or writing the copy did.
        return Err(if copier.failed_writing { memfd_error(module, "writing the copy", &error) } else { io(error) });
    }
    let Copier { image, hasher, head, .. } = copier;
    if head != ELF_MAGIC {
        let found: Vec<String> = head.iter().map(|byte| format!("{byte:02x}")).collect();
        return Err(AbiError::NotElf { module: module.to_owned(), found: found.join(" ") });
    }
    let actual: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    if let Some(expected) = pin
        && actual != expected
    {
        return Err(AbiError::ChecksumMismatch { module: module.to_owned(), expected, actual });
    }
    seal(&image).map_err(|error| memfd_error(module, "sealing the copy", &error))?;
    Ok(Checked { image: OwnedFd::from(image), sha256: actual })
}

/// Checks every symbolic link on `module`'s path as configured (each
/// prefix of it that is a link): owned by root or devhost's own user, in a
/// directory that passes [`check_directories`].
fn check_links(module: &Path) -> Result<(), AbiError> {
    let euid = effective_uid();
    let absolute = std::path::absolute(module)
        .map_err(|error| AbiError::Io { module: module.to_owned(), message: error.to_string() })?;
    let prefixes: Vec<&Path> = absolute.ancestors().collect();
    for prefix in prefixes.into_iter().rev() {
        let Ok(metadata) = std::fs::symlink_metadata(prefix) else { continue };
        if !metadata.file_type().is_symlink() {
            continue;
        }
        if metadata.uid() != 0 && metadata.uid() != euid {
            return Err(AbiError::LinkOwner {
                module: module.to_owned(),
                link: prefix.to_owned(),
                owner: metadata.uid(),
                euid,
            });
        }
        if let (Some(parent), Some(name)) = (prefix.parent(), prefix.file_name())
            && let Ok(parent) = std::fs::canonicalize(parent)
        {
            check_directories(module, &parent.join(name))?;
        }
    }
    Ok(())
}

/// Checks every directory from the parent of `canonical` (the module's
/// canonical path) up to `/`: owned by root or devhost's own user, and not
/// writable by group or others unless sticky and owned by root.
fn check_directories(module: &Path, canonical: &Path) -> Result<(), AbiError> {
    let euid = effective_uid();
    for directory in canonical.ancestors().skip(1) {
        let metadata = std::fs::symlink_metadata(directory).map_err(|error| AbiError::Io {
            module: module.to_owned(),
            message: format!("{}: {error}", directory.display()),
        })?;
        let owner = metadata.uid();
        if owner != 0 && owner != euid {
            return Err(AbiError::DirectoryOwner {
                module: module.to_owned(),
                directory: directory.to_owned(),
                owner,
                euid,
            });
        }
        let mode = metadata.mode() & 0o7777;
        let sticky_root = mode & 0o1000 != 0 && owner == 0;
        if mode & 0o022 != 0 && !sticky_root {
            return Err(AbiError::DirectoryWritable {
                module: module.to_owned(),
                directory: directory.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// Copies the module into the image, hashing it and keeping its first bytes.
struct Copier {
    image: File,
    hasher: Sha256,
    head: Vec<u8>,
    failed_writing: bool,
}

impl Write for Copier {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        let written = self.image.write(buffer).inspect_err(|_| self.failed_writing = true)?;
        let want = 4usize.saturating_sub(self.head.len()).min(written);
        self.head.extend_from_slice(&buffer[..want]);
        self.hasher.update(&buffer[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn memfd_error(module: &Path, step: &str, error: &std::io::Error) -> AbiError {
    AbiError::Memfd { module: module.to_owned(), message: format!("{step}: {error}") }
}

/// A new, empty, sealable memfd named after the module (the name shows in
/// `/proc/<pid>/maps`).
fn create_memfd(module: &Path, canonical: &Path) -> Result<File, AbiError> {
    let base = canonical.file_name().map_or(&b""[..], |name| name.as_bytes());
    let mut name = b"devhost:".to_vec();
    name.extend_from_slice(&base[..base.len().min(200)]);
    // A path component has no NUL byte.
    let name = CString::new(name).unwrap_or_default();
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // MFD_EXEC (Linux 6.3) keeps the image executable where
    // vm.memfd_noexec would seal it non-executable; older kernels reject
    // the unknown flag with EINVAL.
    let fd = memfd_create(&name, flags | libc::MFD_EXEC)
        .or_else(|error| match error.raw_os_error() {
            Some(libc::EINVAL) => memfd_create(&name, flags),
            _ => Err(error),
        })
        .map_err(|error| {
            let hint = match error.raw_os_error() {
                Some(libc::ENOSYS) => {
                    "; devhost loads only the checked copy of a module, never its path, and needs memfd_create (Linux 3.17 or newer)"
                }
                _ => "",
            };
            AbiError::Memfd { module: module.to_owned(), message: format!("memfd_create: {error}{hint}") }
        })?;
    Ok(File::from(fd))
}

fn memfd_create(name: &CString, flags: libc::c_uint) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other
    // preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, so it is open and
    // owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Seals the image: no more writes, no resizing, no more seals.
///
/// `F_SEAL_WRITE` fails with `EBUSY` while the kernel still holds extra
/// references to pages just written (they can sit in a per-CPU batch for
/// a moment; seen on Linux 6.18 with other processes starting alongside):
/// tried again for up to about 200 ms before that is an error.
fn seal(image: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    let mut tries = 0;
    loop {
        // SAFETY: the descriptor is open (borrowed from `image`); F_ADD_SEALS
        // takes an int argument and touches no memory of ours.
        if unsafe { libc::fcntl(image.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        tries += 1;
        if error.raw_os_error() != Some(libc::EBUSY) || tries >= 20 {
            return Err(error);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The pin in lower case, if it is 64 hex digits.
fn parse_pin(module: &Path, pin: &str) -> Result<String, AbiError> {
    if pin.len() == 64 && pin.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        Ok(pin.to_ascii_lowercase())
    } else {
        Err(AbiError::BadPin { module: module.to_owned(), pin: pin.to_owned() })
    }
}

fn effective_uid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn pins_must_be_sha256_hex() {
        let module = Path::new("/m.so");
        assert_eq!(parse_pin(module, &"AB".repeat(32)), Ok("ab".repeat(32)));
        let error = parse_pin(module, "abc").expect_err("too short");
        assert_eq!(error.to_string(), "native backend /m.so: sha256 pin \"abc\" is not 64 hexadecimal digits");
    }

    /// A fresh directory (in a root- or self-owned 0755 parent) with `mode`,
    /// and the canonical path of a module inside it.
    fn module_dir(mode: u32) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let base = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let dir = std::fs::canonicalize(base.path()).expect("canonical").join("modules");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let module = dir.join("lib.so");
        (base, dir, module)
    }

    fn is_root() -> bool {
        if effective_uid() == 0 {
            return true;
        }
        eprintln!("SKIP: needs root to own a directory by root or hand it to another uid");
        false
    }

    #[test]
    fn a_directory_writable_by_others_is_refused() {
        let (_base, dir, module) = module_dir(0o777);
        let error = check_directories(&module, &module).expect_err("a world-writable directory");
        assert_eq!(
            error.to_string(),
            format!(
                "native backend {}: module directory {} is writable by group or others (mode 0777; expected no group/other write permission, e.g. 0755, or a sticky directory owned by root like /tmp)",
                module.display(),
                dir.display()
            )
        );
        let (_base, dir, module) = module_dir(0o775);
        let error = check_directories(&module, &module).expect_err("a group-writable directory");
        assert_eq!(error, AbiError::DirectoryWritable { module: module.clone(), directory: dir, mode: 0o775 });
        let (_base, _dir, module) = module_dir(0o755);
        assert_eq!(check_directories(&module, &module), Ok(()));
    }

    #[test]
    fn a_link_another_uid_owns_is_refused_and_ours_is_followed() {
        if !is_root() {
            return;
        }
        let (_base, dir, module) = module_dir(0o755);
        std::fs::write(&module, b"\x7fELF").expect("module");
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let link = dir.join("link.so");
        std::os::unix::fs::symlink(&module, &link).expect("symlink");
        assert_eq!(check_links(&link), Ok(()), "root's link in a trusted directory");
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).expect("lchown");
        let error = check_links(&link).expect_err("nobody's link");
        assert_eq!(error, AbiError::LinkOwner { module: link.clone(), link: link.clone(), owner: 65534, euid: 0 });
        assert!(error.to_string().contains("its owner can re-point it"), "{error}");
        // A link of ours in a directory others can write is no better.
        let (_other, open_dir, _) = module_dir(0o777);
        let open_link = open_dir.join("link.so");
        std::os::unix::fs::symlink(&module, &open_link).expect("symlink");
        assert!(matches!(check_links(&open_link), Err(AbiError::DirectoryWritable { .. })));
    }

    #[test]
    fn a_sticky_directory_is_accepted_only_when_root_owns_it() {
        if !is_root() {
            return;
        }
        let (_base, dir, module) = module_dir(0o1777);
        assert_eq!(check_directories(&module, &module), Ok(()), "a sticky root-owned directory like /tmp");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        let error = check_directories(&module, &module).expect_err("sticky, but owned by another uid");
        assert_eq!(error, AbiError::DirectoryOwner { module, directory: dir, owner: 65534, euid: 0 });
    }

    #[test]
    fn a_directory_owned_by_another_uid_is_refused_up_the_chain() {
        if !is_root() {
            return;
        }
        let (_base, dir, module) = module_dir(0o755);
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        let error = check_directories(&module, &module).expect_err("a directory owned by nobody");
        assert_eq!(
            error.to_string(),
            format!(
                "native backend {}: module directory {} is owned by uid 65534 (expected root or devhost's own uid 0)",
                module.display(),
                dir.display()
            )
        );
        // A trusted directory below an untrusted one is no better.
        let nested = dir.join("deeper");
        std::fs::create_dir(&nested).expect("mkdir");
        let module = nested.join("lib.so");
        let error = check_directories(&module, &module).expect_err("an untrusted grandparent");
        assert_eq!(error, AbiError::DirectoryOwner { module, directory: dir, owner: 65534, euid: 0 });
    }
}
