//! Who writes a resource's spec file when two devhost instances serve the
//! resource (the old and the new pod of a rolling update), and which of
//! them removes it.
//!
//! * Each instance is named by its instance ID and its start time; the
//!   spec says who wrote it (`devhost.io/writer`, `devhost.io/started`),
//!   and each device entry whose instance put it there
//!   (`devhost.io/instance`). The instance that started later is newer:
//!   it writes the file, and an older one that finds it written by a newer
//!   one stops writing (the kubelet talks to the instance that registered
//!   last, which is the newer one).
//! * Each instance holds an exclusive `flock` on a file of its own in the
//!   CDI directory (`.devhost-instance-<ID>.lock`) while it runs; the kernel
//!   drops it when the process dies, so another instance tells a live
//!   writer from a dead one by trying that lock.
//! * Each instance holds a shared `flock` on a lock file beside the spec
//!   while it serves the resource; the one that stops last, the only one
//!   that can take it exclusively, removes the spec.
//!
//! Lock files are hidden and not `.json`/`.yaml`: CDI ignores them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

/// The spec annotation naming the instance that wrote the file.
pub const WRITER_ANNOTATION: &str = "devhost.io/writer";
/// The spec annotation with the writer's start (nanoseconds since 1970).
pub const STARTED_ANNOTATION: &str = "devhost.io/started";
/// The device annotation naming the instance whose device it is.
pub const OWNER_ANNOTATION: &str = "devhost.io/instance";

/// This devhost process, as the instances sharing a CDI directory know it.
#[derive(Debug)]
pub struct Instance {
    /// The process's instance ID (its sockets' suffix).
    pub id: String,
    /// When it started, in nanoseconds since 1970.
    pub started: u128,
    /// The liveness lock, taken at the first spec this instance writes.
    lock: Mutex<Option<Flock<std::fs::File>>>,
}

impl Instance {
    /// This process, started now.
    pub fn new(id: &str) -> Arc<Self> {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Arc::new(Instance { id: id.to_owned(), started, lock: Mutex::new(None) })
    }

    /// Holds this instance's liveness lock in `dir` (once; later calls
    /// do nothing). An error means other instances will think it dead.
    pub fn announce(&self, dir: &Path) -> std::io::Result<()> {
        let mut lock = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if lock.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(liveness_path(dir, &self.id))?;
        *lock = Some(Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| errno)?);
        Ok(())
    }

    /// Drops the liveness lock and its file (at exit).
    pub fn withdraw(&self, dir: &Path) {
        if self.lock.lock().unwrap_or_else(PoisonError::into_inner).take().is_some() {
            let _ = std::fs::remove_file(liveness_path(dir, &self.id));
        }
    }

    /// Whether a spec written by `writer`, started at `started`, is newer
    /// than this instance's (later start; the ID breaks a tie).
    pub fn is_older_than(&self, writer: &str, started: u128) -> bool {
        (started, writer) > (self.started, self.id.as_str())
    }
}

/// The liveness lock file of instance `id` in `dir`.
fn liveness_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!(".devhost-instance-{}.lock", crate::sockets::files::sanitise(id)))
}

/// Whether instance `id` still runs: it holds its liveness lock. A lock
/// file nobody holds is that of a killed instance: removed.
pub fn is_alive(dir: &Path, id: &str) -> bool {
    let path = liveness_path(dir, id);
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_held_by_nobody) => {
            let _ = std::fs::remove_file(&path);
            false
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => true,
        // Cannot tell: count it alive, so its devices stay resolvable.
        Err(_) => true,
    }
}

/// The lock file beside `spec` (hidden, not `.json`: CDI ignores it),
/// cut with a hash if the spec's own name is already as long as the
/// kernel allows.
fn share_path(spec: &Path) -> PathBuf {
    let name = spec.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.trim_end_matches(".json");
    spec.with_file_name(super::names::fitted_name(".", stem, ".lock", &name))
}

/// This instance's share in a spec file: a shared lock on its lock file.
pub struct Share(Flock<std::fs::File>);

impl Share {
    /// Takes a shared lock, waiting while another instance holds it
    /// exclusively (it is removing the spec).
    pub async fn take(spec: &Path) -> std::io::Result<Share> {
        let lock = share_path(spec);
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = lock.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock)?;
            Flock::lock(file, FlockArg::LockShared).map(Share).map_err(|(_, errno)| errno.into())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Whether this instance is the last one holding the spec (then it
    /// holds the lock exclusively until dropped).
    pub fn last(&self) -> bool {
        self.0.relock(FlockArg::LockExclusiveNonblock).is_ok()
    }

    /// The lock file, for messages.
    pub fn path_for(spec: &Path) -> PathBuf {
        share_path(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_instance_is_told_from_a_dead_one() {
        let dir = tempfile::tempdir().expect("dir");
        let me = Instance::new("a");
        assert!(!is_alive(dir.path(), "a"), "not announced yet");
        me.announce(dir.path()).expect("announce");
        assert!(is_alive(dir.path(), "a"));
        me.withdraw(dir.path());
        assert!(!is_alive(dir.path(), "a"));
        // A killed instance leaves its file: unlocked, so dead, and cleaned.
        std::fs::write(liveness_path(dir.path(), "b"), "").expect("stale lock file");
        assert!(!is_alive(dir.path(), "b"));
        assert!(!liveness_path(dir.path(), "b").exists());
    }

    #[test]
    fn the_lock_beside_a_spec_of_the_longest_name_fits_too() {
        for resource in [
            format!("{}.io/x{}", "d".repeat(120), "n".repeat(117)),
            format!("{}.io/x{}", "d".repeat(200), "n".repeat(60)),
        ] {
            let spec = super::super::names::spec_path(Path::new("/x"), &resource);
            let lock = share_path(&spec);
            let name = lock.file_name().expect("a name").len();
            assert!(name <= 255, "{name} bytes: {}", lock.display());
            assert!(lock.file_name().expect("a name").to_string_lossy().starts_with('.'));
        }
    }

    #[test]
    fn the_later_start_is_newer() {
        let me = Instance::new("m");
        assert!(me.is_older_than("x", me.started + 1));
        assert!(!me.is_older_than("x", me.started - 1));
        assert!(me.is_older_than("n", me.started), "a tie goes by ID");
        assert!(!me.is_older_than("m", me.started), "not older than itself");
    }
}
