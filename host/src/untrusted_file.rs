//! Reading a file whose path an operator or another process controls (a
//! CDI spec, a DRA checkpoint): only a regular file, opened without
//! blocking (a FIFO planted at the path would block the reader until a
//! writer came), read up to a cap (`/dev/zero`, or a 75 MB file, must not
//! take devhost's memory). Callers run it off the async runtime threads.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed (`NotFound` among them).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A FIFO, a device, a socket or a directory.
    #[error("not a regular file (devhost reads only regular files here)")]
    NotRegular,
    /// Larger than the caller's cap.
    #[error("larger than the {cap} bytes devhost reads here")]
    TooLarge {
        /// The cap, in bytes.
        cap: u64,
    },
}

impl ReadError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(error) if error.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The bytes of the regular file at `path`, at most `cap` of them.
pub fn read(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(ReadError::NotRegular);
    }
    if metadata.len() > cap {
        return Err(ReadError::TooLarge { cap });
    }
    let mut text = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // The file may grow after the look at its size.
    file.take(cap + 1).read_to_end(&mut text)?;
    if text.len() as u64 > cap {
        return Err(ReadError::TooLarge { cap });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_up_to_the_cap_are_read() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        assert!(matches!(read(&fifo, 10), Err(ReadError::NotRegular)), "a FIFO is refused, not waited on");
        assert!(matches!(read(Path::new("/dev/zero"), 10), Err(ReadError::NotRegular)));
        assert!(matches!(read(dir.path(), 10), Err(ReadError::NotRegular) | Err(ReadError::Io(_))));
        let file = dir.path().join("f");
        std::fs::write(&file, "12345").expect("write");
        assert_eq!(read(&file, 5).expect("read"), b"12345");
        assert!(matches!(read(&file, 4), Err(ReadError::TooLarge { cap: 4 })));
        assert!(read(&dir.path().join("missing"), 4).is_err_and(|error| error.is_not_found()));
    }
}
