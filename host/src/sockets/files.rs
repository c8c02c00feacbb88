//! devhost's sockets in the plugin directory: their names, binding them with
//! mode 0600, removing stale ones, and telling "my socket" from a new file at
//! the same path.
//!
//! Names are `devhost-<sanitised resource>-<instance>.sock`: unique per
//! process instance, because kubelets from 1.37 tell plugin instances apart
//! by socket path (a rolling upgrade must not collide with the old pod).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Longest socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Prefix of every socket devhost creates.
const PREFIX: &str = "devhost-";

/// The identity of a file, to notice it was replaced: device, inode and
/// change time (inode numbers are reused at once on some file systems).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdentity {
    /// The identity of the file at `path`, if there is one.
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(FileIdentity { dev: meta.dev(), ino: meta.ino(), ctime: meta.ctime(), ctime_nsec: meta.ctime_nsec() })
    }
}

/// A short ID unique to this process instance, for socket names.
pub fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; mixing in the pid and the
    // time keeps IDs apart even in pid-1 containers started together.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    format!("{:08x}", hasher.finish() as u32)
}

/// The socket file name for `resource`: `devhost-<sanitised>-<instance>.sock`,
/// shortened (with a hash to stay unique) if the path would be too long.
pub fn socket_name(plugin_dir: &Path, resource: &str, instance: &str) -> String {
    let sanitised = sanitise(resource);
    let name = format!("{PREFIX}{sanitised}-{instance}.sock");
    let room = MAX_SOCKET_PATH.saturating_sub(plugin_dir.as_os_str().len() + 1);
    if name.len() <= room {
        return name;
    }
    let hash = fnv1a(resource.as_bytes());
    let fixed = PREFIX.len() + 1 + 8 + 1 + instance.len() + ".sock".len();
    let keep = room.saturating_sub(fixed).min(sanitised.len());
    format!("{PREFIX}{}-{hash:08x}-{instance}.sock", &sanitised[..keep])
}

/// The part of a socket name derived from the resource (`/` becomes `_`).
pub fn sanitise(resource: &str) -> String {
    resource.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| (hash ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Binds `path` with mode 0600, removing whatever file is there first.
pub fn bind(path: &Path) -> io::Result<(UnixListener, FileIdentity)> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "removed stale socket"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let identity = FileIdentity::of(path)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "socket vanished right after bind"))?;
    Ok((listener, identity))
}

/// Removes sockets of earlier devhost instances for `resource` that nobody
/// listens on any more (a crashed devhost, or one killed with SIGKILL).
/// Sockets another live instance still serves are left alone.
pub fn remove_stale(plugin_dir: &Path, resource: &str) -> Vec<PathBuf> {
    let prefix = format!("{PREFIX}{}-", sanitise(resource));
    remove_refusing(plugin_dir, |name| name.starts_with(&prefix) && name.ends_with(".sock"))
}

/// Removes the sockets in `dir` whose names `matches` accepts and that
/// refuse connections (nobody listens: their process is gone).
pub fn remove_refusing(dir: &Path, matches: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(&matches))
        .filter(|path| {
            matches!(std::os::unix::net::UnixStream::connect(path),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
        })
        .filter(|path| std::fs::remove_file(path).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_and_fit_sun_path() {
        let dir = Path::new("/var/lib/kubelet/device-plugins");
        assert_eq!(socket_name(dir, "example.com/gpu", "abcd1234"), "devhost-example.com_gpu-abcd1234.sock");
        let long = format!("{}/{}", "a".repeat(200), "b".repeat(63));
        let name = socket_name(dir, &long, "abcd1234");
        assert!(dir.join(&name).as_os_str().len() <= MAX_SOCKET_PATH, "{name}");
        assert!(name.starts_with("devhost-aaa") && name.ends_with("-abcd1234.sock"), "{name}");
        assert_ne!(name, socket_name(dir, &format!("{}/{}", "a".repeat(200), "c".repeat(63)), "abcd1234"));
    }

    #[test]
    fn instance_ids_differ() {
        assert_ne!(instance_id(), instance_id());
    }

    #[tokio::test]
    async fn bind_sets_0600_and_stale_removal_spares_live_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join(socket_name(dir.path(), "a.io/x", "live0000"));
        let (_listener, identity) = bind(&live).expect("bind");
        let mode = std::fs::metadata(&live).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(FileIdentity::of(&live), Some(identity));

        let dead = dir.path().join(socket_name(dir.path(), "a.io/x", "dead0000"));
        drop(bind(&dead).expect("bind"));
        let other = dir.path().join(socket_name(dir.path(), "a.io/y", "dead0000"));
        drop(bind(&other).expect("bind"));
        assert_eq!(remove_stale(dir.path(), "a.io/x"), vec![dead]);
        assert!(live.exists() && other.exists());
    }
}
