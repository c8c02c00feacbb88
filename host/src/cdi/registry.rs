//! What a container runtime sees in the CDI directories: every spec file
//! loaded with the CDI library's rules, so devhost can tell before it
//! hands out a name whether the runtime will resolve it, and to what.
//!
//! The rules, as the library (`tags.cncf.io/container-device-interface`,
//! `pkg/cdi`, which containerd and CRI-O use) applies them: the
//! directories are read lowest priority first (`/etc/cdi`, then
//! `/var/run/cdi`); only `.json` and `.yaml` files directly in a directory
//! count; a file that does not parse or validate defines nothing; a name
//! two files of the same directory define resolves from neither (a
//! conflict); one defined in a later directory too resolves from the later
//! one. Validation is approximated (kind, device names, a known
//! `cdiVersion`, at least one device); the library refuses a few more.
//!
//! Reading is bounded: regular files only (a FIFO would block the
//! reader), at most [`MAX_SPEC_BYTES`] each, and a file unchanged since
//! the last look (same size, mtime and inode) is not parsed again.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::names::check_names;
use super::spec::{self, ContainerEdits, Spec};

/// A spec file larger than this is not read (the largest vendor specs,
/// a node's worth of GPUs with their libraries, are a few hundred KiB).
pub const MAX_SPEC_BYTES: u64 = 8 << 20;

/// How old a view may be before a lookup reads the directories again.
const MAX_AGE: Duration = Duration::from_secs(1);

/// The CDI versions the library (v1.1) knows.
const KNOWN_VERSIONS: &[&str] = &["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"];

/// One device as the runtime resolves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The file that defines it.
    pub file: Arc<Path>,
    /// The device's own edits.
    pub edits: ContainerEdits,
    /// The spec's annotation `devhost.io/instance` on the device, if any.
    pub owner: Option<String>,
    /// Whether its spec has edits of its own (applied with any of its
    /// devices).
    pub spec_edits: bool,
}

/// What the runtime makes of one qualified name.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup<'a> {
    /// It resolves, from this file.
    Resolved(&'a Resolved),
    /// Two files of one directory define it: it resolves from neither.
    Conflict(&'a [Arc<Path>]),
    /// No loadable spec defines it.
    Unknown,
}

/// The CDI directories as the runtime would load them now.
#[derive(Debug, Default)]
pub struct View {
    resolved: HashMap<String, Resolved>,
    conflicts: HashMap<String, Vec<Arc<Path>>>,
    /// Every file that defines each name, whatever its priority.
    defined_by: HashMap<String, Vec<Arc<Path>>>,
    /// The files of each kind.
    kinds: HashMap<String, Vec<Arc<Path>>>,
    /// Files that define nothing, and why.
    refused: Vec<(Arc<Path>, String)>,
    /// Each file read, as it was (size, mtime, inode).
    identities: HashMap<PathBuf, Identity>,
}

/// A file's size, modification time and inode: a spec written again (by
/// a rename, as every CDI writer does) has another.
type Identity = (u64, i64, i64, u64);

fn identity(metadata: &std::fs::Metadata) -> Identity {
    (metadata.len(), metadata.mtime(), metadata.mtime_nsec(), metadata.ino())
}

impl View {
    /// What the runtime makes of `name` (`vendor/class=device`).
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        if let Some(files) = self.conflicts.get(name) {
            return Lookup::Conflict(files);
        }
        self.resolved.get(name).map_or(Lookup::Unknown, Lookup::Resolved)
    }

    /// Whether the runtime resolves `name`.
    pub fn resolves(&self, name: &str) -> bool {
        matches!(self.lookup(name), Lookup::Resolved(_))
    }

    /// The files other than `own` that define `name`.
    pub fn others_defining<'a>(&'a self, name: &str, own: &'a Path) -> impl Iterator<Item = &'a Arc<Path>> + 'a {
        self.defined_by.get(name).into_iter().flatten().filter(move |file| ***file != *own)
    }

    /// The files other than `own` whose kind is `kind`.
    pub fn others_of_kind<'a>(&'a self, kind: &str, own: &'a Path) -> impl Iterator<Item = &'a Arc<Path>> + 'a {
        self.kinds.get(kind).into_iter().flatten().filter(move |file| ***file != *own)
    }

    /// Spec files that define nothing, and why.
    pub fn refused(&self) -> &[(Arc<Path>, String)] {
        &self.refused
    }

    /// Whether `file` is as this view read it (one `stat`): a view older
    /// than a write of the file does not describe it.
    pub fn is_current(&self, file: &Path) -> bool {
        let now = std::fs::metadata(file).ok().filter(|metadata| metadata.is_file()).map(|m| identity(&m));
        now == self.identities.get(file).copied()
    }
}

/// A parsed file, kept while it does not change.
struct Cached {
    identity: Identity,
    spec: Result<Arc<Spec>, String>,
}

/// The CDI directories, read again when a view is older than a second.
pub struct Registry {
    dirs: Vec<PathBuf>,
    files: Mutex<HashMap<PathBuf, Cached>>,
    current: Mutex<(Arc<View>, Option<Instant>)>,
    /// One reader at a time; the others wait for its view.
    reading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dirs", &self.dirs).finish_non_exhaustive()
    }
}

impl Registry {
    /// The runtime's view of `dirs`, lowest priority first.
    pub fn new(dirs: Vec<PathBuf>) -> Arc<Self> {
        Arc::new(Registry {
            dirs,
            files: Mutex::new(HashMap::new()),
            current: Mutex::new((Arc::new(View::default()), None)),
            reading: tokio::sync::Mutex::new(()),
        })
    }

    /// The directories, lowest priority first.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The view, read again (off the async threads) if older than a second.
    pub async fn current(self: &Arc<Self>) -> Arc<View> {
        if let Some(view) = self.fresh(MAX_AGE) {
            return view;
        }
        self.reload(MAX_AGE).await
    }

    /// The view as the directories are now (after devhost wrote a spec).
    pub async fn now(self: &Arc<Self>) -> Arc<View> {
        self.reload(Duration::ZERO).await
    }

    /// Reads the directories on this thread (for commands that serve
    /// nothing, and for tests).
    pub fn load_blocking(&self) -> Arc<View> {
        let view = Arc::new(self.read());
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = (view.clone(), Some(Instant::now()));
        view
    }

    fn fresh(&self, max_age: Duration) -> Option<Arc<View>> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.1.filter(|at| at.elapsed() < max_age).map(|_| current.0.clone())
    }

    async fn reload(self: &Arc<Self>, max_age: Duration) -> Arc<View> {
        let asked = Instant::now();
        let _reading = self.reading.lock().await;
        // Someone else read them while this one waited.
        {
            let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current.1.is_some_and(|at| at >= asked || (!max_age.is_zero() && at.elapsed() < max_age)) {
                return current.0.clone();
            }
        }
        let registry = self.clone();
        match tokio::task::spawn_blocking(move || registry.load_blocking()).await {
            Ok(view) => view,
            Err(_) => self.current.lock().unwrap_or_else(PoisonError::into_inner).0.clone(),
        }
    }

    /// Reads every directory, reusing the parse of unchanged files.
    fn read(&self) -> View {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen: HashMap<PathBuf, Cached> = HashMap::new();
        let mut view = View::default();
        for dir in &self.dirs {
            // Within one directory the library's walk goes in name order.
            let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(entries) => entries.filter_map(Result::ok).map(|entry| entry.path()).collect(),
                Err(_) => continue,
            };
            paths.sort();
            let mut this_dir: HashMap<String, Arc<Path>> = HashMap::new();
            for path in paths {
                if !path.extension().is_some_and(|ext| ext == "json" || ext == "yaml") {
                    continue;
                }
                let Ok(metadata) = std::fs::metadata(&path) else { continue };
                if metadata.is_dir() {
                    continue;
                }
                let identity = identity(&metadata);
                let spec = match files.remove(&path) {
                    Some(cached) if cached.identity == identity => cached.spec,
                    _ => load(&path, &metadata).map(Arc::new),
                };
                let file: Arc<Path> = Arc::from(path.as_path());
                match &spec {
                    Ok(spec) => view.add(spec, &file, &mut this_dir),
                    Err(why) => view.refused.push((file.clone(), why.clone())),
                }
                if metadata.is_file() {
                    view.identities.insert(path.clone(), identity);
                }
                seen.insert(path, Cached { identity, spec });
            }
        }
        for name in view.conflicts.keys() {
            view.resolved.remove(name);
        }
        *files = seen;
        view
    }
}

impl View {
    /// Adds the devices of `spec` (from `file`), in a directory of higher
    /// priority than any added before `this_dir` started.
    fn add(&mut self, spec: &Spec, file: &Arc<Path>, this_dir: &mut HashMap<String, Arc<Path>>) {
        self.kinds.entry(spec.kind.clone()).or_default().push(file.clone());
        let spec_edits = !spec.container_edits.is_empty();
        for device in &spec.devices {
            let name = format!("{}={}", spec.kind, device.name);
            self.defined_by.entry(name.clone()).or_default().push(file.clone());
            if let Some(other) = this_dir.get(&name) {
                self.conflicts.entry(name).or_insert_with(|| vec![other.clone()]).push(file.clone());
                continue;
            }
            // A later directory's definition replaces an earlier one's; a
            // conflict stays one (the library drops conflicting names last).
            this_dir.insert(name.clone(), file.clone());
            let owner = device.annotations.get(super::OWNER_ANNOTATION).cloned();
            self.resolved.insert(
                name,
                Resolved { file: file.clone(), edits: device.container_edits.clone(), owner, spec_edits },
            );
        }
    }
}

/// Reads and checks one spec file.
fn load(path: &Path, metadata: &std::fs::Metadata) -> Result<Spec, String> {
    if !metadata.is_file() {
        return Err("not a regular file".into());
    }
    if metadata.len() > MAX_SPEC_BYTES {
        return Err(format!("{} bytes, more than the {MAX_SPEC_BYTES} devhost reads", metadata.len()));
    }
    let text = read_bounded(path)?;
    let spec = spec::parse(path, &text)?;
    if !KNOWN_VERSIONS.contains(&spec.cdi_version.as_str()) {
        return Err(format!("cdiVersion {:?} is not one the CDI library knows", spec.cdi_version));
    }
    if spec.devices.is_empty() {
        return Err("no devices".into());
    }
    check_names(&spec.kind, None)?;
    for device in &spec.devices {
        check_names(&spec.kind, Some(&device.name))?;
    }
    Ok(spec)
}

/// The file's bytes: a regular file only, opened without blocking (it may
/// have become a FIFO since it was looked at), up to the cap.
pub(super) fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    crate::untrusted_file::read(path, MAX_SPEC_BYTES).map_err(|error| error.to_string())
}

/// The files that define each of `names` in `view`, for messages.
pub fn describe_files(files: &[Arc<Path>]) -> String {
    files.iter().map(|file| format!("{:?}", file.display().to_string())).collect::<Vec<_>>().join(", ")
}

/// Why the runtime would not resolve a name `lookup` found so; `None` if
/// it would.
pub fn why_unresolvable(lookup: &Lookup<'_>) -> Option<String> {
    match lookup {
        Lookup::Resolved(_) => None,
        Lookup::Conflict(files) => Some(format!("conflicting definitions in {}", describe_files(files))),
        Lookup::Unknown => Some("no CDI spec defines it".to_owned()),
    }
}

/// Groups `names` by the reason the runtime would not resolve them.
pub fn unresolvable<'a>(view: &View, names: impl IntoIterator<Item = &'a String>) -> BTreeMap<&'a str, String> {
    names.into_iter().filter_map(|name| Some((name.as_str(), why_unresolvable(&view.lookup(name))?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, kind: &str, devices: &[&str]) {
        let devices: Vec<String> =
            devices.iter().map(|d| format!(r#"{{"name": "{d}", "containerEdits": {{"env": ["D={d}"]}}}}"#)).collect();
        let text = format!(r#"{{"cdiVersion": "0.6.0", "kind": "{kind}", "devices": [{}]}}"#, devices.join(","));
        std::fs::write(dir.join(file), text).expect("write spec");
    }

    #[test]
    fn the_library_rules_for_conflicts_and_priorities_hold() {
        let low = tempfile::tempdir().expect("dir");
        let high = tempfile::tempdir().expect("dir");
        write(low.path(), "a.json", "a.io/dev", &["one", "two"]);
        write(low.path(), "b.json", "a.io/dev", &["two", "three"]);
        write(high.path(), "c.json", "a.io/dev", &["three", "two"]);
        std::fs::write(low.path().join("notes.txt"), "not a spec").expect("write");
        std::fs::write(low.path().join("broken.json"), "{").expect("write");
        let registry = Registry::new(vec![low.path().into(), high.path().into()]);
        let view = registry.load_blocking();
        let file_of = |name: &str| match view.lookup(name) {
            Lookup::Resolved(resolved) => Some(resolved.file.to_path_buf()),
            _ => None,
        };
        assert_eq!(file_of("a.io/dev=one"), Some(low.path().join("a.json")));
        assert!(
            matches!(view.lookup("a.io/dev=two"), Lookup::Conflict(files) if files.len() == 2),
            "a conflict stays one even where a later directory defines the name"
        );
        assert_eq!(file_of("a.io/dev=three"), Some(high.path().join("c.json")), "a later directory wins");
        assert_eq!(view.lookup("a.io/dev=four"), Lookup::Unknown);
        assert_eq!(view.refused().len(), 1, "{:?}", view.refused());
        let a = low.path().join("a.json");
        assert_eq!(view.others_defining("a.io/dev=two", &a).count(), 2);
        assert_eq!(view.others_of_kind("a.io/dev", &a).count(), 2);
    }

    #[test]
    fn a_fifo_or_an_oversized_file_is_not_read() {
        let dir = tempfile::tempdir().expect("dir");
        nix::unistd::mkfifo(&dir.path().join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        std::fs::File::create(dir.path().join("huge.json"))
            .and_then(|file| file.set_len(MAX_SPEC_BYTES + 1))
            .expect("huge");
        write(dir.path(), "ok.json", "a.io/dev", &["one"]);
        let view = Registry::new(vec![dir.path().into()]).load_blocking();
        assert!(view.resolves("a.io/dev=one"));
        assert_eq!(view.refused().len(), 2, "{:?}", view.refused());
    }

    #[test]
    fn an_unchanged_file_is_not_parsed_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), "a.json", "a.io/dev", &["one"]);
        let registry = Registry::new(vec![dir.path().into()]);
        assert!(registry.load_blocking().resolves("a.io/dev=one"));
        write(dir.path(), "a.json", "a.io/dev", &["one", "two"]);
        assert!(registry.load_blocking().resolves("a.io/dev=two"));
    }
}
