//! Watches the plugin directory with inotify (through `notify`) and fans
//! the events out. Receivers treat an event only as a reason to look: they
//! compare file identities themselves, so a missed, duplicated or stale
//! event cannot make them act wrongly.

use std::path::Path;

use notify::{RecursiveMode, Watcher};
use tokio::sync::broadcast;

/// A running watch of one directory.
pub struct PluginDirWatcher {
    _watcher: notify::RecommendedWatcher,
    events: broadcast::Sender<()>,
}

impl std::fmt::Debug for PluginDirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDirWatcher").finish_non_exhaustive()
    }
}

impl PluginDirWatcher {
    /// Starts watching `dir` (which must exist).
    pub fn start(dir: &Path) -> Result<Self, notify::Error> {
        let (events, _) = broadcast::channel(64);
        let sender = events.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            match event {
                // Creations and removals are what a kubelet restart does.
                Ok(event) if event.kind.is_create() || event.kind.is_remove() => {
                    // No receivers is fine: nobody is waiting right now.
                    let _ = sender.send(());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "plugin directory watch error; periodic checks continue");
                    let _ = sender.send(());
                }
            }
        })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(PluginDirWatcher { _watcher: watcher, events })
    }

    /// A receiver woken by every creation or removal in the directory.
    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.events.subscribe()
    }
}
