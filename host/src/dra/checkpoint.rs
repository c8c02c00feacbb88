//! The claims a DRA driver has prepared, on disk, so that a prepare the
//! kubelet repeats after a kubelet or devhost restart returns the same
//! answer without calling the backend again, and an unprepare after a
//! restart still knows what to undo (`docs/dra-api.md` §1: both calls are
//! idempotent, and drivers keep a checkpoint).
//!
//! The file is JSON with a format version, replaced atomically (written
//! beside, flushed, renamed over, the directory flushed), so a crash
//! leaves the old file or the new one, never half of one. A file that
//! cannot be read is an error naming it and why; it is never silently
//! taken as "nothing prepared", which would prepare claims twice.
//!
//! Two devhost instances (the old and the new pod of a rolling update)
//! share the file: each batch holds [`CheckpointLock`] (an exclusive
//! `flock` on a lock file beside it) and reads the file afresh if it is
//! not the file this process last read or wrote, so neither overwrites
//! what the other recorded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format this devhost writes and reads.
pub const FORMAT: u32 = 1;

/// The largest checkpoint devhost reads (a node's prepared claims take a
/// few hundred KiB; a claim holds at most 32 results).
pub const MAX_BYTES: u64 = 16 << 20;

/// One device prepared for a claim, as the kubelet was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDevice {
    /// The claim's requests this device satisfies.
    pub requests: Vec<String>,
    /// Its pool (the node name).
    pub pool: String,
    /// Its DRA device name.
    pub device: String,
    /// The backend's ID of the device (what `release` is called with).
    pub id: String,
    /// The CDI devices the container gets.
    pub cdi_ids: Vec<String>,
    /// Allocated for administrative access (the allocation result's
    /// `adminAccess`): the claim watches the device beside its holder and
    /// does not hold it, so unpreparing it does not `release` it. Written
    /// only when true, and absent (false) in checkpoints written before
    /// devhost knew of it, so those load unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_access: bool,
}

/// One prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedClaim {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// What it was prepared with.
    pub devices: Vec<PreparedDevice>,
    /// The entries this driver writes into the claim's `status.devices`
    /// (`AllocatedDeviceStatus` objects, as JSON; `docs/dra-api.md` §6).
    /// Kept so that a prepare the kubelet repeats (after a failed write,
    /// or a restart before it) writes them again; the write leaves an
    /// unchanged status alone. Absent when there are none, and in
    /// checkpoints written before devhost knew of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<serde_json::Value>,
}

impl PreparedClaim {
    /// Whether the claim holds the device with backend ID `id`: it was
    /// prepared with it for ordinary (not administrative) access. What
    /// lists a device's holders asks this, so a monitoring pod's claim
    /// never shows a device as taken.
    pub fn holds(&self, id: &str) -> bool {
        self.devices.iter().any(|device| device.id == id && !device.admin_access)
    }

    /// The backend IDs `release` is called with when the claim is
    /// unprepared: the devices it holds, each once, in the order prepared.
    /// Empty for a claim of administrative access only (no `release`).
    pub fn to_release(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for device in self.devices.iter().filter(|device| !device.admin_access) {
            if !ids.contains(&device.id) {
                ids.push(device.id.clone());
            }
        }
        ids
    }
}

/// Every prepared claim, by claim UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Claim UID → what was prepared.
    pub claims: BTreeMap<String, PreparedClaim>,
}

/// The file's format number, read before the rest.
#[derive(Deserialize)]
struct Format {
    format: Option<u64>,
}

/// The file as written: the format number beside the checkpoint's fields.
#[derive(Serialize)]
struct FileRef<'a> {
    format: u32,
    #[serde(flatten)]
    checkpoint: &'a Checkpoint,
}

/// Why the checkpoint could not be read or written.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("DRA checkpoint {}: {action}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a checkpoint this devhost can read.
    #[error("DRA checkpoint {}: {why}; move it away only if no claim on this node is prepared", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// An exclusive hold on a checkpoint, across processes; released when
/// dropped (or when the process dies).
#[derive(Debug)]
pub struct CheckpointLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl CheckpointLock {
    /// The lock on `path` if it is free now, `None` if another process
    /// holds it; never waits. The lock file is opened non-blocking (a FIFO
    /// planted in its place fails instead of blocking the open) and locked
    /// with `LOCK_NB`, so this may run on an async thread: it costs a few
    /// system calls on local metadata, where [`Self::take`] costs a hop to
    /// a blocking thread.
    pub fn try_take(path: &Path) -> Result<Option<Self>, CheckpointError> {
        use std::os::unix::fs::OpenOptionsExt;
        let lock = PathBuf::from(format!("{}.lock", path.display()));
        let io = |action, source| CheckpointError::Io { path: lock.clone(), action, source };
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&lock)
        {
            Ok(file) => file,
            // No directory yet (the first batch): the slow path makes it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io("open", source)),
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Some(CheckpointLock(held))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(io("lock", errno.into())),
        }
    }

    /// Waits for the lock on `path` (the file `<path>.lock`). Blocks: call
    /// it off the async threads.
    pub fn take(path: &Path) -> Result<Self, CheckpointError> {
        let lock = PathBuf::from(format!("{}.lock", path.display()));
        let io = |action, source| CheckpointError::Io { path: lock.clone(), action, source };
        if let Some(dir) = lock.parent() {
            std::fs::create_dir_all(dir).map_err(|source| io("create its directory", source))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|source| io("open", source))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(CheckpointLock)
            .map_err(|(_, errno)| io("lock", errno.into()))
    }
}

impl Checkpoint {
    /// What unpreparing claim `uid` releases: the devices it holds
    /// ([`PreparedClaim::to_release`]) that no other prepared claim holds.
    /// A shared device (consumable capacity) is released when its last
    /// holder goes; releasing it earlier would scrub it under the others.
    pub fn to_release(&self, uid: &str) -> Vec<String> {
        let Some(claim) = self.claims.get(uid) else { return Vec::new() };
        let held_elsewhere = |id: &str| self.claims.iter().any(|(other, done)| other.as_str() != uid && done.holds(id));
        claim.to_release().into_iter().filter(|id| !held_elsewhere(id)).collect()
    }

    /// Reads `path`; a file that does not exist is an empty checkpoint.
    /// Only a regular file of at most [`MAX_BYTES`], opened without
    /// blocking; blocks on the disk: call it off the async threads.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let unreadable = |why: String| CheckpointError::Unreadable { path: path.to_owned(), why };
        let text = match crate::untrusted_file::read(path, MAX_BYTES) {
            Ok(text) => text,
            Err(error) if error.is_not_found() => return Ok(Checkpoint::default()),
            Err(crate::untrusted_file::ReadError::Io(source)) => {
                return Err(CheckpointError::Io { path: path.to_owned(), action: "read", source });
            }
            Err(error) => return Err(unreadable(error.to_string())),
        };
        let format: Format = serde_json::from_slice(&text).map_err(|error| unreadable(format!("not JSON: {error}")))?;
        match format.format {
            Some(format) if format == u64::from(FORMAT) => {}
            Some(format) => {
                return Err(unreadable(format!(
                    "format {format}, but this devhost reads format {FORMAT} (written by a newer devhost?)"
                )));
            }
            None => return Err(unreadable("no format number".to_owned())),
        }
        serde_json::from_slice(&text).map_err(|error| unreadable(error.to_string()))
    }

    /// Replaces `path` with this checkpoint, atomically.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |action, source| CheckpointError::Io { path: path.to_owned(), action, source };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|source| io("create its directory", source))?;
        // Compact: the file is rewritten at every batch, and read by
        // programs (a person can pretty-print it).
        let text = serde_json::to_vec(&FileRef { format: FORMAT, checkpoint: self })
            .map_err(|error| io("encode", std::io::Error::other(error)))?;
        let mut temporary =
            tempfile::NamedTempFile::new_in(dir).map_err(|source| io("create a temporary file", source))?;
        temporary.write_all(&text).map_err(|source| io("write", source))?;
        temporary.as_file().sync_all().map_err(|source| io("flush", source))?;
        temporary.persist(path).map_err(|error| io("rename into place", error.error))?;
        // The rename itself must survive a crash.
        std::fs::File::open(dir).and_then(|dir| dir.sync_all()).map_err(|source| io("flush its directory", source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> PreparedClaim {
        PreparedClaim {
            status: Vec::new(),
            namespace: "ml".into(),
            name: "gpu-claim".into(),
            devices: vec![PreparedDevice {
                requests: vec!["gpu".into()],
                pool: "node-a".into(),
                device: "gpu-0".into(),
                id: "gpu-0".into(),
                cdi_ids: vec!["k8s.gpu.example.com/claim=claim-uid-1-gpu".into()],
                admin_access: false,
            }],
        }
    }

    #[test]
    fn a_checkpoint_survives_a_round_trip_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dra/gpu.example.com/checkpoint.json");
        assert_eq!(Checkpoint::load(&path).expect("no file yet"), Checkpoint::default());
        let mut checkpoint = Checkpoint::default();
        checkpoint.claims.insert("uid-1".into(), claim());
        checkpoint.save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), checkpoint);
        checkpoint.claims.clear();
        checkpoint.save(&path).expect("save again");
        assert_eq!(Checkpoint::load(&path).expect("load"), Checkpoint::default());
        let files: Vec<_> = std::fs::read_dir(path.parent().expect("dir")).expect("list").collect();
        assert_eq!(files.len(), 1, "no temporary file left: {files:?}");
    }

    #[test]
    fn the_lock_is_taken_without_waiting_only_while_no_one_holds_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("checkpoint.json");
        // The first batch: no directory for the lock file yet is no error.
        let missing = dir.path().join("not-yet/checkpoint.json");
        assert!(CheckpointLock::try_take(&missing).expect("no directory yet").is_none());
        let held = CheckpointLock::take(&path).expect("lock");
        // Another open file description, as another devhost process has.
        assert!(CheckpointLock::try_take(&path).expect("try").is_none(), "taken while held");
        drop(held);
        let again = CheckpointLock::try_take(&path).expect("try").expect("free once let go");
        assert!(CheckpointLock::try_take(&path).expect("try").is_none(), "held by the fast path's lock");
        drop(again);
        // A FIFO in the lock file's place fails at once instead of blocking the open.
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&PathBuf::from(format!("{}.lock", fifo.display())), nix::sys::stat::Mode::S_IRWXU)
            .expect("mkfifo");
        let error = CheckpointLock::try_take(&fifo).expect_err("a FIFO with no reader");
        assert!(error.to_string().contains("fifo.json.lock: open"), "{error}");
    }

    #[test]
    fn an_unreadable_checkpoint_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("checkpoint.json");
        for (text, why) in [
            ("{\"format\": 1, \"claims\": {", "not JSON"),
            ("{\"claims\": {}}", "no format number"),
            ("{\"format\": 2, \"claims\": {}}", "format 2, but this devhost reads format 1"),
            ("{\"format\": 1, \"claims\": {\"u\": {\"name\": 1}}}", "invalid type"),
        ] {
            std::fs::write(&path, text).expect("write");
            let error = Checkpoint::load(&path).expect_err(text).to_string();
            assert!(error.starts_with(&format!("DRA checkpoint {}: ", path.display())), "{error}");
            assert!(error.contains(why), "{text}: {error}");
        }
    }
}

#[cfg(test)]
mod admin_access {
    use super::*;

    fn device(id: &str, admin_access: bool) -> PreparedDevice {
        PreparedDevice {
            requests: vec!["r".into()],
            pool: "node-a".into(),
            device: id.into(),
            id: id.into(),
            cdi_ids: vec![format!("k8s.gpu.example.com/claim=u-{id}")],
            admin_access,
        }
    }

    fn claim(devices: Vec<PreparedDevice>) -> PreparedClaim {
        PreparedClaim { namespace: "ml".into(), name: "c".into(), devices, status: Vec::new() }
    }

    #[test]
    fn an_admin_access_device_is_neither_held_nor_released() {
        let watcher = claim(vec![device("gpu-0", true)]);
        assert!(!watcher.holds("gpu-0"));
        assert!(watcher.to_release().is_empty(), "no release for a claim that only watches");
        let mixed = claim(vec![device("gpu-0", true), device("gpu-1", false), device("gpu-1", false)]);
        assert!(!mixed.holds("gpu-0") && mixed.holds("gpu-1"));
        assert_eq!(mixed.to_release(), ["gpu-1"], "each held device once");
        // The same device held by one request and watched by another is held.
        let both = claim(vec![device("gpu-0", true), device("gpu-0", false)]);
        assert!(both.holds("gpu-0"));
        assert_eq!(both.to_release(), ["gpu-0"]);
    }

    #[test]
    fn the_flag_survives_a_round_trip_and_is_written_only_when_set() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("checkpoint.json");
        let mut checkpoint = Checkpoint::default();
        checkpoint.claims.insert("uid-admin".into(), claim(vec![device("gpu-0", true)]));
        checkpoint.claims.insert("uid-plain".into(), claim(vec![device("gpu-0", false)]));
        checkpoint.save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), checkpoint);
        let text: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        assert_eq!(text["claims"]["uid-admin"]["devices"][0]["admin_access"], true);
        assert!(
            text["claims"]["uid-plain"]["devices"][0].get("admin_access").is_none(),
            "an ordinary claim is written as before: {text}"
        );
    }

    #[test]
    fn a_checkpoint_written_before_admin_access_loads_with_every_device_held() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("checkpoint.json");
        // The file as the devhost before this field wrote it.
        std::fs::write(
            &path,
            r#"{"format": 1, "claims": {"uid-1": {"namespace": "ml", "name": "c", "devices": [
                {"requests": ["r"], "pool": "node-a", "device": "gpu-0", "id": "gpu-0",
                 "cdi_ids": ["k8s.gpu.example.com/claim=uid-1-r"]}]}}}"#,
        )
        .expect("write");
        let loaded = Checkpoint::load(&path).expect("an old checkpoint loads");
        let claim = &loaded.claims["uid-1"];
        assert!(!claim.devices[0].admin_access);
        assert!(claim.holds("gpu-0"));
        assert_eq!(claim.to_release(), ["gpu-0"]);
    }
}

#[cfg(test)]
mod shared_devices {
    use super::*;

    fn claim(ids: &[&str]) -> PreparedClaim {
        let devices = ids
            .iter()
            .map(|id| PreparedDevice {
                requests: vec!["r".into()],
                pool: "node-a".into(),
                device: (*id).into(),
                id: (*id).into(),
                cdi_ids: Vec::new(),
                admin_access: false,
            })
            .collect();
        PreparedClaim { namespace: "ml".into(), name: "c".into(), devices, status: Vec::new() }
    }

    #[test]
    fn a_shared_device_is_released_with_its_last_holder() {
        let mut checkpoint = Checkpoint::default();
        checkpoint.claims.insert("a".into(), claim(&["nic-0", "nic-1"]));
        checkpoint.claims.insert("b".into(), claim(&["nic-0"]));
        assert_eq!(checkpoint.to_release("a"), ["nic-1"], "nic-0 is still b's");
        checkpoint.claims.remove("a");
        assert_eq!(checkpoint.to_release("b"), ["nic-0"], "the last holder releases it");
        assert!(checkpoint.to_release("gone").is_empty(), "a claim not prepared releases nothing");
    }
}
