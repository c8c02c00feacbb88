//! Watches the plugin directory with inotify (through `notify`) and fans
//! the events out. Receivers treat an event only as a reason to look: they
//! compare file identities themselves, so a missed, duplicated or stale
//! event cannot make them act wrongly.
//!
//! An inotify watch belongs to a directory's inode: a plugin directory that
//! is deleted and created again (a re-mounted volume, a reinstalled node
//! agent) would silently stop producing events. So the parent is watched
//! too, and a thread re-establishes the watch when the directory comes
//! back, or when a periodic look finds it is a different directory now.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::broadcast;

use crate::sockets::FileIdentity;

/// How often the directory's identity is checked, in case an event about
/// the directory itself was missed.
const LOOK_EVERY: Duration = Duration::from_secs(5);

type SharedWatcher = Arc<Mutex<notify::RecommendedWatcher>>;

/// A running watch of one directory.
pub struct PluginDirWatcher {
    /// Dropping it ends the events and with them the re-watching thread.
    _watcher: SharedWatcher,
    events: broadcast::Sender<()>,
}

impl std::fmt::Debug for PluginDirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDirWatcher").finish_non_exhaustive()
    }
}

impl PluginDirWatcher {
    /// Starts watching `dir` (which must exist) and its parent.
    pub fn start(dir: &Path) -> Result<Self, notify::Error> {
        let (events, _) = broadcast::channel(64);
        let (raw, raw_events) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiving thread is gone only when devhost stops watching.
            let _ = raw.send(event);
        })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        if let Some(parent) = dir.parent()
            && let Err(error) = watcher.watch(parent, RecursiveMode::NonRecursive)
        {
            tracing::warn!(dir = %parent.display(), %error, "cannot watch the plugin directory's parent; a re-created plugin directory is noticed within {LOOK_EVERY:?}");
        }
        let watcher = Arc::new(Mutex::new(watcher));
        let follow = Follow {
            dir: dir.to_owned(),
            identity: FileIdentity::of(dir),
            watcher: Arc::downgrade(&watcher),
            events: events.clone(),
        };
        std::thread::Builder::new()
            .name("devhost-plugin-dir".into())
            .spawn(move || follow.run(&raw_events))
            .map_err(|error| notify::Error::generic(&format!("cannot start the watch thread: {error}")))?;
        Ok(PluginDirWatcher { _watcher: watcher, events })
    }

    /// A receiver woken by every creation or removal in the directory.
    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.events.subscribe()
    }
}

/// The thread that turns raw events into wake-ups and keeps the watch on
/// the directory that is there now.
struct Follow {
    dir: PathBuf,
    /// The directory the watch is on.
    identity: Option<FileIdentity>,
    watcher: Weak<Mutex<notify::RecommendedWatcher>>,
    events: broadcast::Sender<()>,
}

impl Follow {
    fn run(mut self, raw: &Receiver<notify::Result<notify::Event>>) {
        loop {
            match raw.recv_timeout(LOOK_EVERY) {
                Ok(Ok(event)) => self.handle(&event),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "plugin directory watch error; periodic checks continue");
                    self.wake();
                }
                Err(RecvTimeoutError::Timeout) => self.look(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn handle(&mut self, event: &notify::Event) {
        // Creations and removals are what a kubelet restart does; a rename
        // into, out of or within the directory makes and unmakes names too.
        let renamed = matches!(event.kind, notify::EventKind::Modify(notify::event::ModifyKind::Name(_)));
        if !(event.kind.is_create() || event.kind.is_remove() || renamed) {
            return;
        }
        let about_dir = event.paths.contains(&self.dir);
        let inside = event.paths.iter().any(|path| path.parent() == Some(self.dir.as_path()));
        if !about_dir && !inside {
            // Something else in the parent directory.
            return;
        }
        tracing::debug!(paths = ?event.paths, kind = ?event.kind, "plugin directory changed");
        if about_dir {
            self.look();
        }
        self.wake();
    }

    /// Re-watches the directory if it is not the one watched (created anew,
    /// or gone: then says so once).
    fn look(&mut self) {
        let now = FileIdentity::of(&self.dir);
        if now == self.identity {
            return;
        }
        let Some(watcher) = self.watcher.upgrade() else { return };
        if now.is_none() {
            tracing::warn!(dir = %self.dir.display(), "the plugin directory was removed; waiting for it to come back");
            self.identity = None;
            return;
        }
        let watched =
            watcher.lock().unwrap_or_else(PoisonError::into_inner).watch(&self.dir, RecursiveMode::NonRecursive);
        match watched {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "the plugin directory was re-created; watching it again");
                self.identity = now;
                self.wake();
            }
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot watch the re-created plugin directory; retrying")
            }
        }
    }

    fn wake(&self) {
        // No receivers is fine: nobody is waiting right now.
        let _ = self.events.send(());
    }
}
