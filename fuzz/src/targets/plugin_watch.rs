//! The plugin-directory watch (`host/src/registration/watch.rs`), through
//! its public API only: `PluginDirWatcher::start` and `subscribe`. Each
//! input is a sequence of file operations in a fresh, watched directory:
//! files, Unix sockets (what the kubelet and devhost create), directories,
//! symlinks and hard links created and removed, files rewritten and
//! chmod-ed, names renamed within the directory, into it and out of it,
//! and the directory itself removed and created again (which the watch
//! must follow). A second receiver subscribes part-way through.
//!
//! Invariants: nothing panics; every operation that adds or removes a name
//! in the directory by creating or deleting it wakes every receiver
//! subscribed before it (within 2 s; a lagged receiver counts as woken),
//! however many operations came before, also after the directory was
//! replaced; replacing the directory wakes them too; no receiver sees the
//! channel closed while the watcher lives; dropping the watcher closes
//! every receiver. Known finding F4 (checked only with
//! `DEVHOST_FUZZ_STRICT=1`): a name that appears or disappears through a
//! rename (into, out of or within the directory) wakes the receivers too.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use devhost::registration::PluginDirWatcher;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::Target;

/// How long an expected wake-up may take.
const WAKE: Duration = Duration::from_secs(2);

/// The target: a runtime and a scratch directory.
pub struct PluginWatch {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    serial: u64,
}

impl PluginWatch {
    /// Starts the runtime and creates the scratch directory.
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-watch-").tempdir().map_err(|e| e.to_string())?;
        Ok(PluginWatch { runtime, dir, serial: 0 })
    }
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(PluginWatch::new, data);
}

/// Names in the plugin directory: the kubelet's socket, devhost's, others.
const NAMES: &[&str] = &["kubelet.sock", "devhost-example.com_gpu-1.sock", "x", "y", ".hidden"];

/// One file operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    CreateFile(usize),
    CreateSocket(usize),
    Mkdir(usize),
    Symlink(usize),
    Hardlink(usize, usize),
    Remove(usize),
    Rewrite(usize),
    Chmod(usize),
    Rename(usize, usize),
    MoveOut(usize),
    MoveIn(usize),
    /// The directory removed (with what is in it) and created again.
    ReplaceDir,
}

impl Op {
    fn arbitrary(u: &mut Unstructured<'_>) -> arbitrary::Result<Op> {
        let mut name = || u.int_in_range(0..=NAMES.len() - 1);
        let (a, b) = (name()?, name()?);
        if crate::rarely(u, 16) {
            return Ok(Op::ReplaceDir);
        }
        Ok(match u.int_in_range(0..=10u8)? {
            0 => Op::CreateFile(a),
            1 => Op::CreateSocket(a),
            2 => Op::Mkdir(a),
            3 => Op::Symlink(a),
            4 => Op::Hardlink(a, b),
            5 => Op::Remove(a),
            6 => Op::Rewrite(a),
            7 => Op::Chmod(a),
            8 => Op::Rename(a, b),
            9 => Op::MoveOut(a),
            _ => Op::MoveIn(a),
        })
    }

    /// Whether a change of names this operation makes comes from a rename.
    fn renames(self) -> bool {
        matches!(self, Op::Rename(..) | Op::MoveOut(_) | Op::MoveIn(_))
    }

    /// Performs it in `dir` (with `outside` as the place to move to and
    /// from); failures (a name taken, a name missing) are part of the game.
    fn apply(self, dir: &Path, outside: &Path) {
        let path = |i: usize| dir.join(NAMES[i]);
        let _ = match self {
            Op::CreateFile(a) => std::fs::write(path(a), b"x"),
            Op::CreateSocket(a) => std::os::unix::net::UnixListener::bind(path(a)).map(drop),
            Op::Mkdir(a) => std::fs::create_dir(path(a)),
            Op::Symlink(a) => std::os::unix::fs::symlink("/nonexistent", path(a)),
            Op::Hardlink(a, b) => std::fs::hard_link(path(a), path(b)),
            Op::Remove(a) => std::fs::remove_file(path(a)).or_else(|_| std::fs::remove_dir(path(a))),
            Op::Rewrite(a) => std::fs::OpenOptions::new()
                .write(true)
                .open(path(a))
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"more")),
            Op::Chmod(a) => std::fs::set_permissions(path(a), std::fs::Permissions::from_mode(0o600)),
            Op::Rename(a, b) => std::fs::rename(path(a), path(b)),
            Op::MoveOut(a) => std::fs::rename(path(a), outside.join(NAMES[a])),
            Op::MoveIn(a) => std::fs::write(outside.join("incoming"), b"x")
                .and_then(|()| std::fs::rename(outside.join("incoming"), path(a))),
            Op::ReplaceDir => std::fs::remove_dir_all(dir).and_then(|()| std::fs::create_dir(dir)),
        };
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Empties the receiver's queue; `Err` if it is closed.
fn drain(receiver: &mut Receiver<()>) -> Result<(), String> {
    loop {
        match receiver.try_recv() {
            Ok(()) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Closed) => return Err("a receiver was closed while the watcher lives".into()),
        }
    }
}

/// Waits for a wake-up.
async fn woken(receiver: &mut Receiver<()>) -> Result<(), String> {
    match tokio::time::timeout(WAKE, receiver.recv()).await {
        Ok(Ok(()) | Err(RecvError::Lagged(_))) => Ok(()),
        Ok(Err(RecvError::Closed)) => Err("a receiver was closed while the watcher lives".into()),
        Err(_) => Err(format!("no wake-up within {WAKE:?}")),
    }
}

impl Target for PluginWatch {
    fn name(&self) -> &'static str {
        "plugin-watch"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        // A kubelet restart: sockets created, then all removed, then a new
        // kubelet.sock.
        vec![vec![3, 0, 0, 1, 1, 1, 1, 1, 5, 0, 0, 5, 1, 1, 0, 0, 1], vec![2, 2, 0, 8, 2, 3, 9, 0, 0, 10]]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        self.serial += 1;
        let base = self.dir.path().join(self.serial.to_string());
        let (dir, outside) = (base.join("plugins"), base.join("outside"));
        for d in [&dir, &outside] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let late = u.int_in_range(0..=8usize).unwrap_or(0);
        let mut ops = Vec::new();
        while ops.len() < 24
            && let Ok(op) = Op::arbitrary(&mut u)
        {
            ops.push(op);
        }
        let result = self.runtime.block_on(watch(&dir, &outside, &ops, late));
        let _ = std::fs::remove_dir_all(&base);
        result
    }
}

/// Waits until no wake-up has come for 50 ms (the watch has settled).
async fn quiet(receiver: &mut Receiver<()>) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_millis(50), receiver.recv()).await {
            Ok(Ok(()) | Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => return Err("a receiver was closed while the watcher lives".into()),
            Err(_) => return Ok(()),
        }
    }
}

async fn watch(dir: &Path, outside: &Path, ops: &[Op], late: usize) -> Result<(), String> {
    let watcher = PluginDirWatcher::start(dir).map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let mut receivers = vec![watcher.subscribe()];
    for (index, op) in ops.iter().enumerate() {
        if index == late {
            receivers.push(watcher.subscribe());
        }
        for receiver in &mut receivers {
            drain(receiver)?;
        }
        let before = names(dir);
        op.apply(dir, outside);
        let after = names(dir);
        if matches!(op, Op::ReplaceDir) {
            // The removal and the new directory each wake the receivers;
            // let the watch move to the new directory before going on.
            for receiver in &mut receivers {
                woken(receiver).await.map_err(|error| format!("the directory was replaced (op #{index}): {error}"))?;
                quiet(receiver).await?;
            }
            continue;
        }
        if before == after || (op.renames() && !crate::strict("F4")) {
            continue;
        }
        for receiver in &mut receivers {
            woken(receiver).await.map_err(|error| {
                let finding = if op.renames() { "F4: " } else { "" };
                format!("{finding}{op:?} (op #{index}) changed {before:?} to {after:?}: {error}")
            })?;
        }
    }
    drop(watcher);
    for receiver in &mut receivers {
        loop {
            match tokio::time::timeout(WAKE, receiver.recv()).await {
                Ok(Ok(()) | Err(RecvError::Lagged(_))) => {}
                Ok(Err(RecvError::Closed)) => break,
                Err(_) => return Err(format!("a receiver was still open {WAKE:?} after the watcher was dropped")),
            }
        }
    }
    Ok(())
}
