//! The checks a module file passes before it is loaded: it exists, is a
//! regular file, is not writable by group or others, belongs to root or to
//! devhost's own user, starts like an ELF object, and matches its `sha256`
//! pin when one is configured. Loading is not done here.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::AbiError;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// Runs every check on `module`.
pub(super) fn check_file(module: &Path, sha256: Option<&str>) -> Result<(), AbiError> {
    let pin = sha256.map(|pin| parse_pin(module, pin)).transpose()?;
    let io = |error: std::io::Error| AbiError::Io { module: module.to_owned(), message: error.to_string() };
    let mut file = File::open(module).map_err(|error| match error.kind() {
        ErrorKind::NotFound => AbiError::NotFound { module: module.to_owned() },
        _ => io(error),
    })?;
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
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(4);
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(io)?;
        if read == 0 {
            break;
        }
        let want = 4usize.saturating_sub(head.len()).min(read);
        head.extend_from_slice(&buffer[..want]);
        hasher.update(&buffer[..read]);
    }
    if head != ELF_MAGIC {
        let found: Vec<String> = head.iter().map(|byte| format!("{byte:02x}")).collect();
        return Err(AbiError::NotElf { module: module.to_owned(), found: found.join(" ") });
    }
    if let Some(expected) = pin {
        let actual: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        if actual != expected {
            return Err(AbiError::ChecksumMismatch { module: module.to_owned(), expected, actual });
        }
    }
    Ok(())
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
    use super::*;

    #[test]
    fn pins_must_be_sha256_hex() {
        let module = Path::new("/m.so");
        assert_eq!(parse_pin(module, &"AB".repeat(32)), Ok("ab".repeat(32)));
        let error = parse_pin(module, "abc").expect_err("too short");
        assert_eq!(error.to_string(), "native backend /m.so: sha256 pin \"abc\" is not 64 hexadecimal digits");
    }
}
