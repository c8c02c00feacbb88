//! One cgroup per worker process (issue 27): a memory limit and a pids limit
//! the kernel enforces on the worker and everything it forks, an OOM kill
//! that can be told from any other SIGKILL, and a way to kill and remove the
//! whole group when the worker is replaced.
//!
//! Workers' cgroups live under devhost's own cgroup, found from
//! `/proc/self/cgroup` and `/proc/self/mountinfo` ([`Hierarchy::own`]), in a
//! `devhost-workers` directory: on cgroup v1 one directory per controller
//! (memory and pids), on cgroup v2 one directory. Each is named
//! `devhost-worker-<backend>-<pid>-<n>`, unique per process and call.
//!
//! This module owns the cgroup file system side only: it does not spawn,
//! reap or time workers (that is [`super`]). Every call blocks on file
//! system writes; [`WorkerCgroup::remove`] may sleep for a second or two
//! while the kernel finishes killing, so async callers run it on a blocking
//! thread.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directory, inside devhost's own cgroup, that holds the workers' cgroups.
pub const WORKERS_DIR: &str = "devhost-workers";
/// On cgroup v2, the leaf devhost's own processes move to, so that its
/// cgroup may enable controllers for its children ("no internal processes").
pub const LEAF_DIR: &str = "devhost";

/// How long [`WorkerCgroup::remove`] keeps killing before it gives up.
const KILL_PATIENCE: Duration = Duration::from_secs(2);
/// How long it retries `rmdir` while the kernel finishes the exits.
const RMDIR_PATIENCE: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(10);
const MIB: u64 = 1024 * 1024;

/// Numbers the cgroups this process creates.
static NEXT: AtomicU64 = AtomicU64::new(0);
/// Serialises the v2 preparation of devhost's own cgroup (moving its
/// processes, enabling controllers), which concurrent `create`s would race on.
static PREPARE_V2: Mutex<()> = Mutex::new(());

/// Limits of one worker's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory the worker's processes may use together, in bytes (no swap).
    pub memory_bytes: u64,
    /// How many processes and threads the worker's cgroup may hold.
    pub pids: u64,
}

/// The cgroup(s) that stand for devhost's own: the workers' cgroups are
/// created below them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1: devhost's directory in the memory and in the pids hierarchy.
    V1 {
        /// devhost's cgroup directory of the memory controller.
        memory: PathBuf,
        /// devhost's cgroup directory of the pids controller.
        pids: PathBuf,
    },
    /// cgroup v2: devhost's cgroup directory.
    V2(PathBuf),
}

impl Hierarchy {
    /// devhost's own cgroup(s) on this machine, or why none can be used (no
    /// cgroup file system mounted, a controller missing, devhost's cgroup
    /// outside the mounted part of the hierarchy, ...).
    pub fn own() -> Result<Hierarchy, String> {
        let cgroup = read_proc("/proc/self/cgroup")?;
        let mountinfo = read_proc("/proc/self/mountinfo")?;
        let hierarchy = locate(&cgroup, &mountinfo)?;
        let hierarchy = match hierarchy {
            // Once devhost has moved itself into its `devhost` leaf, that is
            // what /proc/self/cgroup names; its cgroup is still the parent.
            Hierarchy::V2(dir) => Hierarchy::V2(match dir.parent() {
                Some(parent)
                    if dir.file_name().is_some_and(|name| name == LEAF_DIR) && parent.join(WORKERS_DIR).is_dir() =>
                {
                    parent.to_path_buf()
                }
                _ => dir,
            }),
            v1 => v1,
        };
        for (what, dir) in hierarchy.dirs() {
            if !dir.is_dir() {
                return Err(format!(
                    "devhost's {what}cgroup {} (from /proc/self/cgroup and /proc/self/mountinfo) is not a directory",
                    dir.display()
                ));
            }
        }
        Ok(hierarchy)
    }

    /// The directories, each with the words that name it in messages.
    fn dirs(&self) -> Vec<(&'static str, &Path)> {
        match self {
            Hierarchy::V1 { memory, pids } => vec![("memory ", memory.as_path()), ("pids ", pids.as_path())],
            Hierarchy::V2(dir) => vec![("", dir.as_path())],
        }
    }
}

/// One directory of a worker's cgroup.
#[derive(Debug)]
struct Dir {
    /// "memory " or "pids " on v1, "" on v2: for messages.
    what: &'static str,
    path: PathBuf,
    /// The path as the cgroup file system's own root sees it, for logs.
    shown: String,
}

/// One worker's cgroup (v1: one directory per controller, memory and pids;
/// v2: one directory). Dropping it leaves the cgroup in place: call
/// [`WorkerCgroup::remove`].
#[derive(Debug)]
pub struct WorkerCgroup {
    v2: bool,
    /// v1: memory, then pids; v2: the one directory.
    dirs: Vec<Dir>,
    limits: Limits,
}

impl WorkerCgroup {
    /// Creates a fresh cgroup for a worker of `backend` under devhost's own
    /// cgroup ([`Hierarchy::own`]) and sets the limits.
    pub fn create(backend: &str, limits: &Limits) -> Result<WorkerCgroup, String> {
        Self::create_in(&Hierarchy::own()?, backend, limits)
    }

    /// Same, under an explicit hierarchy: the directory (or, on v1,
    /// directories) that stand for devhost's own cgroup. Files are written,
    /// not required to exist, except `cgroup.controllers` on v2, which says
    /// whether the controllers can be had at all.
    pub fn create_in(hierarchy: &Hierarchy, backend: &str, limits: &Limits) -> Result<WorkerCgroup, String> {
        if limits.memory_bytes == 0 || limits.pids == 0 {
            return Err(format!(
                "a worker's cgroup needs a memory and a pids limit above 0 (got memory {} bytes, pids {})",
                limits.memory_bytes, limits.pids
            ));
        }
        let parents = match hierarchy {
            Hierarchy::V1 { memory, pids } => {
                vec![
                    ("memory ", ensure_dir(&memory.join(WORKERS_DIR))?),
                    ("pids ", ensure_dir(&pids.join(WORKERS_DIR))?),
                ]
            }
            Hierarchy::V2(own) => {
                prepare_v2(own)?;
                let parent = ensure_dir(&own.join(WORKERS_DIR))?;
                enable_controllers(&parent)?;
                vec![("", parent)]
            }
        };
        for (_, parent) in &parents {
            remove_stale(parent);
        }
        let cgroup = WorkerCgroup {
            v2: matches!(hierarchy, Hierarchy::V2(_)),
            dirs: make_dirs(&parents, backend)?,
            limits: *limits,
        };
        match cgroup.set_limits() {
            Ok(()) => Ok(cgroup),
            Err(error) => {
                // Nothing has joined yet: removing cannot kill anything of ours.
                let _ = cgroup.remove();
                Err(error)
            }
        }
    }

    fn set_limits(&self) -> Result<(), String> {
        let memory = self.limits.memory_bytes.to_string();
        let pids = self.limits.pids.to_string();
        if self.v2 {
            let dir = &self.dirs[0].path;
            write_value(&dir.join("memory.max"), &memory, "the worker's memory limit")?;
            write_value(&dir.join("pids.max"), &pids, "the worker's pids limit")?;
            // Without this the limit only moves the excess to swap.
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write_value(&swap, "0", "the worker's swap limit")?;
            }
            // An OOM kill takes the whole worker, not one process of it:
            // half a worker is of no use. Best effort: absent before Linux 4.19.
            let group = dir.join("memory.oom.group");
            if group.exists() {
                let _ = write_value(&group, "1", "the worker's OOM group");
            }
        } else {
            let memory_dir = &self.dirs[0].path;
            write_value(&memory_dir.join("memory.limit_in_bytes"), &memory, "the worker's memory limit")?;
            // Present only with swap accounting; the memory limit alone
            // still holds without it, so errors here are not fatal.
            let memsw = memory_dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                let _ = write_value(&memsw, &memory, "the worker's memory+swap limit");
            }
            write_value(&self.dirs[1].path.join("pids.max"), &pids, "the worker's pids limit")?;
        }
        Ok(())
    }

    /// Moves process `pid` (as seen from devhost's PID namespace) into the
    /// cgroup: every directory's `cgroup.procs`.
    pub fn join(&self, pid: u32) -> Result<(), String> {
        for dir in &self.dirs {
            let procs = dir.path.join("cgroup.procs");
            append_line(&procs, &pid.to_string()).map_err(|e| {
                format!(
                    "cannot move process {pid} into the worker's {}cgroup {}: {}",
                    dir.what,
                    procs.display(),
                    os(&e)
                )
            })?;
        }
        Ok(())
    }

    /// The cgroup's `cgroup.procs` files, open for writing: a process
    /// that writes `0` to each joins the cgroup. A new worker does so
    /// between fork and exec, so that nothing it runs or forks is ever
    /// outside its limits.
    pub fn joiner(&self) -> Result<Vec<std::fs::File>, String> {
        self.dirs
            .iter()
            .map(|dir| {
                let procs = dir.path.join("cgroup.procs");
                std::fs::OpenOptions::new().append(true).open(&procs).map_err(|e| {
                    format!("cannot open the worker's {}cgroup {} to join it: {}", dir.what, procs.display(), os(&e))
                })
            })
            .collect()
    }

    /// How many times the kernel's OOM killer killed a process of this
    /// cgroup (v1: `oom_kill` of `memory.oom_control`; v2: `oom_kill` of
    /// `memory.events`). 0 if unknown.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        fs::read_to_string(self.dirs[0].path.join(file)).ok().and_then(|text| keyed(&text, "oom_kill")).unwrap_or(0)
    }

    /// Peak memory of the cgroup, or the current use where the kernel keeps
    /// no peak (v1: `memory.max_usage_in_bytes`, `memory.usage_in_bytes`;
    /// v2: `memory.peak`, `memory.current`), in bytes, if readable.
    pub fn memory_peak(&self) -> Option<u64> {
        let files: [&str; 2] = if self.v2 {
            ["memory.peak", "memory.current"]
        } else {
            ["memory.max_usage_in_bytes", "memory.usage_in_bytes"]
        };
        files.iter().find_map(|file| fs::read_to_string(self.dirs[0].path.join(file)).ok()?.trim().parse().ok())
    }

    /// One line for logs and `devhost list`, e.g. `cgroup v1
    /// memory:/x/devhost-workers/devhost-worker-gpu-7-0 (memory 256 MiB),
    /// pids:/devhost-workers/devhost-worker-gpu-7-0 (pids 256)`.
    pub fn describe(&self) -> String {
        let memory = size(self.limits.memory_bytes);
        let pids = self.limits.pids;
        if self.v2 {
            format!("cgroup v2 {} (memory {memory}, pids {pids})", self.dirs[0].shown)
        } else {
            format!(
                "cgroup v1 memory:{} (memory {memory}), pids:{} (pids {pids})",
                self.dirs[0].shown, self.dirs[1].shown
            )
        }
    }

    /// The limits the cgroup was created with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The cgroup's directories (v1: memory, then pids; v2: one).
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|dir| dir.path.as_path()).collect()
    }

    /// Kills every process still in the cgroup, sub-cgroups a worker may
    /// have made included (v2: `cgroup.kill` when present; then SIGKILL to
    /// each pid of `cgroup.procs`, repeated until none is left), then
    /// removes the directories, retrying `rmdir` briefly while the kernel
    /// finishes the exits. Never panics; says what stays, if anything does.
    /// devhost's own process is never killed, even if it is listed.
    pub fn remove(self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.v2 {
            let kill_file = self.dirs[0].path.join("cgroup.kill");
            if kill_file.exists() {
                // The SIGKILL loop below stands in where this fails.
                let _ = write_value(&kill_file, "1", "the worker's cgroup.kill");
            }
        }
        let me = std::process::id();
        let deadline = Instant::now() + KILL_PATIENCE;
        let left = loop {
            let left: Vec<u32> = self.members().into_iter().filter(|&pid| pid != me && pid != 0).collect();
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            for &pid in &left {
                if let Ok(raw) = i32::try_from(pid) {
                    // ESRCH: it exited between the read and the kill.
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
            std::thread::sleep(POLL);
        };
        let still = if left.is_empty() {
            String::new()
        } else {
            format!(
                " (processes {} still in it after SIGKILL)",
                left.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            )
        };
        for dir in &self.dirs {
            // Children before parents: rmdir needs an empty cgroup.
            for path in tree(&dir.path).iter().rev() {
                if let Err(e) = rmdir_patiently(path) {
                    problems.push(format!(
                        "cannot remove the worker's {}cgroup {}: {}{still}",
                        dir.what,
                        path.display(),
                        os(&e)
                    ));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// Every pid in the cgroup's directories and their sub-cgroups.
    fn members(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs
            .iter()
            .flat_map(|dir| tree(&dir.path))
            .flat_map(|path| read_pids(&path.join("cgroup.procs")).unwrap_or_default())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

/// Makes the cgroup v2 directory `own` able to have children with the
/// memory and pids controllers: checks it is offered them, moves its
/// processes into a leaf if it has any, enables the controllers.
fn prepare_v2(own: &Path) -> Result<(), String> {
    let _serial = PREPARE_V2.lock().unwrap_or_else(PoisonError::into_inner);
    let controllers_file = own.join("cgroup.controllers");
    let controllers = fs::read_to_string(&controllers_file).map_err(|e| {
        format!(
            "cannot read {}: {} (devhost's cgroup {} is not a cgroup v2 directory?)",
            controllers_file.display(),
            os(&e),
            own.display()
        )
    })?;
    for controller in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == controller) {
            return Err(format!(
                "devhost's cgroup {} does not offer the {controller} controller (its cgroup.controllers lists \"{}\"): \
                 enable it in the parent cgroup's cgroup.subtree_control",
                own.display(),
                controllers.trim()
            ));
        }
    }
    let missing = missing_controllers(own);
    if missing.is_empty() {
        return Ok(());
    }
    // The root cgroup (the only one without cgroup.type) may hold processes
    // and enable controllers at once; every other must hand its processes
    // to a leaf first.
    let is_root = !own.join("cgroup.type").exists();
    let subtree = own.join("cgroup.subtree_control");
    let enable = missing.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    let mut tries = 0;
    loop {
        if !is_root {
            move_processes(own, &own.join(LEAF_DIR))?;
        }
        match write_raw(&subtree, &enable) {
            Ok(()) => return Ok(()),
            // A process (a thread of ours spawning) arrived after the move.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && !is_root && tries < 3 => tries += 1,
            Err(e) => {
                return Err(format!(
                    "cannot enable {} for the children of devhost's cgroup: cannot write \"{enable}\" to {}: {}",
                    missing.join(" and "),
                    subtree.display(),
                    os(&e)
                ));
            }
        }
    }
}

/// Enables memory and pids in `dir/cgroup.subtree_control` where they are not.
fn enable_controllers(dir: &Path) -> Result<(), String> {
    let missing = missing_controllers(dir);
    if missing.is_empty() {
        return Ok(());
    }
    let enable = missing.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    write_value(&dir.join("cgroup.subtree_control"), &enable, "the controllers of the workers' cgroups")
}

/// Which of memory and pids `dir/cgroup.subtree_control` lacks (both if it
/// cannot be read).
fn missing_controllers(dir: &Path) -> Vec<&'static str> {
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    ["memory", "pids"]
        .into_iter()
        .filter(|controller| !enabled.split_whitespace().any(|c| c.trim_start_matches('+') == *controller))
        .collect()
}

/// Moves every process of cgroup `from` into the leaf `to` (created if absent).
fn move_processes(from: &Path, to: &Path) -> Result<(), String> {
    ensure_dir(to)?;
    let procs = from.join("cgroup.procs");
    let pids = read_pids(&procs).map_err(|e| format!("cannot read {}: {}", procs.display(), os(&e)))?;
    let target = to.join("cgroup.procs");
    for pid in pids {
        match append_line(&target, &pid.to_string()) {
            // It exited since the read: nothing to move.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                return Err(format!(
                    "cannot move devhost's process {pid} out of its cgroup {} into the leaf {} (needed before \
                     cgroup v2 lets it enable controllers for workers): {}",
                    from.display(),
                    target.display(),
                    os(&e)
                ));
            }
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Creates one fresh `devhost-worker-<backend>-<pid>-<n>` directory in each
/// parent (the same name in all), skipping names a previous devhost with
/// the same pid left behind.
fn make_dirs(parents: &[(&'static str, PathBuf)], backend: &str) -> Result<Vec<Dir>, String> {
    let base = format!("devhost-worker-{}-{}", sanitize(backend), std::process::id());
    for _ in 0..1000 {
        let name = format!("{base}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut made: Vec<Dir> = Vec::new();
        let mut taken = false;
        for (what, parent) in parents {
            let path = parent.join(&name);
            match fs::create_dir(&path) {
                Ok(()) => made.push(Dir { what, shown: shown(&path), path }),
                Err(e) => {
                    for dir in &made {
                        let _ = fs::remove_dir(&dir.path);
                    }
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        taken = true;
                        break;
                    }
                    return Err(format!("cannot create the worker's {what}cgroup {}: {}", path.display(), os(&e)));
                }
            }
        }
        if !taken {
            return Ok(made);
        }
    }
    Err(format!("cannot create a worker's cgroup: every name {base}-<n> tried in {} is taken", parents[0].1.display()))
}

/// Removes the empty cgroups that the workers of a devhost no longer
/// running left in `parent` (one killed before it could remove them), so
/// that they do not pile up across restarts. Only `rmdir`: a cgroup that
/// still holds processes or sub-cgroups stays. Whether a devhost runs is
/// told by the pid in the name, in devhost's PID namespace. Returns how
/// many it removed.
fn remove_stale(parent: &Path) -> usize {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir(parent) else { return 0 };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("devhost-worker-")) else { return false };
            // <backend>-<pid>-<n>; the backend may itself hold dashes.
            let mut parts = rest.rsplitn(3, '-');
            let (Some(n), Some(pid), Some(_backend)) = (parts.next(), parts.next(), parts.next()) else { return false };
            let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else { return false };
            pid != me && !Path::new(&format!("/proc/{pid}")).exists() && fs::remove_dir(entry.path()).is_ok()
        })
        .count()
}

/// Creates `dir` unless it is there.
fn ensure_dir(dir: &Path) -> Result<PathBuf, String> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(dir.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(dir.to_path_buf()),
        Err(e) => Err(format!("cannot create the cgroup {}: {}", dir.display(), os(&e))),
    }
}

/// Keeps a backend's name to characters safe in a directory name.
fn sanitize(backend: &str) -> String {
    let name: String = backend
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .take(64)
        .collect();
    if name.is_empty() { "_".to_owned() } else { name }
}

/// `dir` and every directory below it, parents before children.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut next = 0;
    while next < all.len() {
        if let Ok(entries) = fs::read_dir(&all[next]) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    all.push(entry.path());
                }
            }
        }
        next += 1;
    }
    all
}

/// `rmdir`, retried for a moment while the cgroup still counts a process
/// that is exiting (or, on v1, memory still being uncharged).
fn rmdir_patiently(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + RMDIR_PATIENCE;
    loop {
        match fs::remove_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
            result => return result,
        }
    }
}

/// Writes `value` as the whole content of `path`, creating it if absent
/// (the kernel provides it on a real cgroup file system).
fn write_value(path: &Path, value: &str, what: &str) -> Result<(), String> {
    write_raw(path, value)
        .map_err(|e| format!("cannot set {what}: cannot write \"{value}\" to {}: {}", path.display(), os(&e)))
}

fn write_raw(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new().write(true).create(true).truncate(true).open(path)?.write_all(value.as_bytes())
}

/// One write of `line` to `path`: `cgroup.procs` takes one pid per write.
/// Appending keeps every pid in a plain file too.
fn append_line(path: &Path, line: &str) -> io::Result<()> {
    OpenOptions::new().append(true).create(true).open(path)?.write_all(format!("{line}\n").as_bytes())
}

fn read_pids(path: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_to_string(path)?.lines().filter_map(|line| line.trim().parse().ok()).collect())
}

/// The number after `key` in a `key value` per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(char::is_whitespace)?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

fn read_proc(path: &str) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {}", os(&e)))
}

/// The OS's words for an error, without Rust's "(os error N)".
fn os(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

fn size(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

/// One line of /proc/self/mountinfo that is a cgroup file system.
struct Mount {
    /// The cgroup the mount shows at its mount point.
    root: String,
    point: PathBuf,
    v2: bool,
    /// Super-block options: the controllers of a v1 hierarchy.
    options: Vec<String>,
}

fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = *fields.get(dash + 1)?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(fields.get(3)?).to_string_lossy().into_owned(),
                point: PathBuf::from(unescape(fields.get(4)?)),
                v2: fstype == "cgroup2",
                options: fields.get(dash + 3).map(|o| o.split(',').map(str::to_owned).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> std::ffi::OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Where the cgroup `path` lies under `mount`, if the mount shows it.
fn under_mount(mount: &Mount, path: &str) -> Option<PathBuf> {
    if path.split('/').any(|part| part == "..") {
        // Outside our cgroup namespace: no mount shows it.
        return None;
    }
    let relative = if mount.root == "/" {
        path.trim_start_matches('/')
    } else if path == mount.root {
        ""
    } else {
        path.strip_prefix(mount.root.as_str())?.strip_prefix('/')?
    };
    Some(if relative.is_empty() { mount.point.clone() } else { mount.point.join(relative) })
}

/// devhost's cgroup(s) from the text of /proc/self/cgroup and
/// /proc/self/mountinfo: v1 when memory and pids are both v1 controllers,
/// v2 when neither is.
fn locate(cgroup: &str, mountinfo: &str) -> Result<Hierarchy, String> {
    let mounts = cgroup_mounts(mountinfo);
    // (hierarchy id, controllers, path)
    let lines: Vec<(&str, Vec<&str>, &str)> = cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((id, controllers.split(',').filter(|c| !c.is_empty()).collect(), path))
        })
        .collect();
    let v1 = |controller: &str| -> Option<Result<PathBuf, String>> {
        let (_, _, path) = lines.iter().find(|(id, cs, _)| *id != "0" && cs.contains(&controller))?;
        let candidates: Vec<&Mount> =
            mounts.iter().filter(|m| !m.v2 && m.options.iter().any(|o| o == controller)).collect();
        if candidates.is_empty() {
            return Some(Err(format!(
                "devhost's {controller} cgroup {path} (cgroup v1) is not reachable: no cgroup file system with the \
                 {controller} controller is mounted (see /proc/self/mountinfo)"
            )));
        }
        Some(candidates.iter().find_map(|m| under_mount(m, path)).ok_or_else(|| {
            format!(
                "devhost's {controller} cgroup {path} (cgroup v1) lies outside what its mount at {} shows (cgroup {})",
                candidates[0].point.display(),
                candidates[0].root
            )
        }))
    };
    match (v1("memory"), v1("pids")) {
        (Some(memory), Some(pids)) => Ok(Hierarchy::V1 { memory: memory?, pids: pids? }),
        (None, None) => {
            let Some((_, _, path)) = lines.iter().find(|(id, cs, _)| *id == "0" && cs.is_empty()) else {
                return Err("devhost is in no usable cgroup: /proc/self/cgroup lists neither the memory and pids \
                            controllers of cgroup v1 nor a cgroup v2 hierarchy"
                    .to_owned());
            };
            let candidates: Vec<&Mount> = mounts.iter().filter(|m| m.v2).collect();
            if candidates.is_empty() {
                return Err(format!(
                    "devhost's cgroup {path} (cgroup v2) is not reachable: no cgroup2 file system is mounted (see \
                     /proc/self/mountinfo)"
                ));
            }
            candidates.iter().find_map(|m| under_mount(m, path)).map(Hierarchy::V2).ok_or_else(|| {
                format!(
                    "devhost's cgroup {path} (cgroup v2) lies outside what its mount at {} shows (cgroup {})",
                    candidates[0].point.display(),
                    candidates[0].root
                )
            })
        }
        (memory, _) => {
            let (on_v1, not) = if memory.is_some() { ("memory", "pids") } else { ("pids", "memory") };
            Err(format!(
                "the {on_v1} controller is on cgroup v1 but {not} is not: devhost needs both on the same cgroup version"
            ))
        }
    }
}

/// `path` as its cgroup file system's root sees it, or as it is if it lies
/// on none (a test's directory).
fn shown(path: &Path) -> String {
    fs::read_to_string("/proc/self/mountinfo").map_or_else(|_| path.display().to_string(), |m| shown_in(&m, path))
}

fn shown_in(mountinfo: &str, path: &Path) -> String {
    cgroup_mounts(mountinfo)
        .iter()
        .filter_map(|m| Some((m.point.components().count(), m, path.strip_prefix(&m.point).ok()?)))
        .max_by_key(|(depth, _, _)| *depth)
        .map_or_else(
            || path.display().to_string(),
            |(_, m, relative)| Path::new(&m.root).join(relative).display().to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, ExitStatus, Stdio};

    const LIMITS: Limits = Limits { memory_bytes: 64 * MIB, pids: 16 };

    /// This machine's /proc/self/cgroup and mountinfo (cgroup v1, pids at /).
    const V1_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n4:memory:/process_api/43ed\n1:cpu:/\n0::/\n";
    const V1_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    #[test]
    fn locates_v1_controllers_from_proc_files() {
        assert_eq!(
            locate(V1_CGROUP, V1_MOUNTINFO),
            Ok(Hierarchy::V1 {
                memory: PathBuf::from("/sys/fs/cgroup/memory/process_api/43ed"),
                pids: PathBuf::from("/sys/fs/cgroup/pids"),
            })
        );
    }

    #[test]
    fn locates_v2_through_a_mount_root_and_escapes() {
        // A container that sees only part of the hierarchy, at a path with a space.
        let mountinfo = "50 40 0:30 /kubepods/pod1 /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            locate("0::/kubepods/pod1/c1\n", mountinfo),
            Ok(Hierarchy::V2(PathBuf::from("/sys/fs/my cgroup/c1")))
        );
        assert_eq!(locate("0::/kubepods/pod1\n", mountinfo), Ok(Hierarchy::V2(PathBuf::from("/sys/fs/my cgroup"))));
        let outside = locate("0::/other\n", mountinfo).expect_err("outside the mount");
        assert!(outside.contains("/other") && outside.contains("lies outside"), "{outside}");
        let above_namespace = locate("0::/../sibling\n", "50 40 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert!(above_namespace.is_err(), "{above_namespace:?}");
    }

    #[test]
    fn says_why_no_cgroup_can_be_used() {
        let unmounted = locate(V1_CGROUP, "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n").expect_err("unmounted");
        assert!(unmounted.contains("memory") && unmounted.contains("not reachable"), "{unmounted}");
        let no_v2_mount = locate("0::/x\n", "").expect_err("no cgroup2");
        assert!(no_v2_mount.contains("no cgroup2 file system is mounted"), "{no_v2_mount}");
        let mixed = locate("4:memory:/\n0::/\n", V1_MOUNTINFO).expect_err("mixed");
        assert!(mixed.contains("memory controller is on cgroup v1 but pids is not"), "{mixed}");
        assert!(locate("", V1_MOUNTINFO).expect_err("nothing").contains("no usable cgroup"));
    }

    #[test]
    fn shows_paths_as_the_cgroup_root_sees_them() {
        let path = Path::new("/sys/fs/cgroup/memory/process_api/43ed/devhost-workers/w");
        assert_eq!(shown_in(V1_MOUNTINFO, path), "/process_api/43ed/devhost-workers/w");
        assert_eq!(shown_in(V1_MOUNTINFO, Path::new("/tmp/x/w")), "/tmp/x/w");
    }

    fn fake_v1() -> (tempfile::TempDir, Hierarchy) {
        let root = tempfile::tempdir().expect("tempdir");
        let (memory, pids) = (root.path().join("memory/x"), root.path().join("pids"));
        fs::create_dir_all(&memory).expect("memory dir");
        fs::create_dir_all(&pids).expect("pids dir");
        (root, Hierarchy::V1 { memory, pids })
    }

    #[test]
    fn v1_fake_gets_limits_members_and_unique_names() {
        let (_root, hierarchy) = fake_v1();
        let Hierarchy::V1 { memory, pids } = &hierarchy else { unreachable!() };
        let first = WorkerCgroup::create_in(&hierarchy, "gpu/evil name", &LIMITS).expect("create");
        let second = WorkerCgroup::create_in(&hierarchy, "gpu/evil name", &LIMITS).expect("create again");
        let [mem_dir, pids_dir] = first.paths()[..] else { panic!("v1 has two directories") };
        assert_eq!(mem_dir.parent(), Some(memory.join(WORKERS_DIR).as_path()));
        assert_eq!(pids_dir.parent(), Some(pids.join(WORKERS_DIR).as_path()));
        let name = mem_dir.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(name.starts_with(&format!("devhost-worker-gpu_evil_name-{}-", std::process::id())), "{name}");
        assert_eq!(pids_dir.file_name(), mem_dir.file_name());
        assert_ne!(second.paths(), first.paths());

        assert_eq!(read(&mem_dir.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(read(&pids_dir.join("pids.max")), "16");
        // Not present (no swap accounting): not invented either.
        assert!(!mem_dir.join("memory.memsw.limit_in_bytes").exists());

        first.join(4242).expect("join");
        first.join(4343).expect("join");
        for dir in [mem_dir, pids_dir] {
            assert_eq!(read(&dir.join("cgroup.procs")), "4242\n4343\n");
        }

        assert_eq!(first.oom_kills(), 0);
        fs::write(mem_dir.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").expect("write");
        assert_eq!(first.oom_kills(), 3);
        assert_eq!(first.memory_peak(), None);
        fs::write(mem_dir.join("memory.usage_in_bytes"), "1000\n").expect("write");
        assert_eq!(first.memory_peak(), Some(1000));
        fs::write(mem_dir.join("memory.max_usage_in_bytes"), "5000\n").expect("write");
        assert_eq!(first.memory_peak(), Some(5000));

        let line = first.describe();
        assert!(line.starts_with("cgroup v1 memory:"), "{line}");
        assert!(line.contains(&format!("{} (memory 64 MiB), pids:", mem_dir.display())), "{line}");
        assert!(line.ends_with(&format!("{} (pids 16)", pids_dir.display())), "{line}");
    }

    fn fake_v2(procs: &str, with_type: bool) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let own = root.path().join("own");
        fs::create_dir(&own).expect("own dir");
        fs::write(own.join("cgroup.controllers"), "cpu io memory pids\n").expect("controllers");
        fs::write(own.join("cgroup.subtree_control"), "\n").expect("subtree_control");
        fs::write(own.join("cgroup.procs"), procs).expect("procs");
        if with_type {
            fs::write(own.join("cgroup.type"), "domain\n").expect("type");
        }
        (root, own)
    }

    #[test]
    fn v2_fake_moves_devhost_to_a_leaf_and_enables_controllers() {
        let (_root, own) = fake_v2("4242\n4343\n", true);
        let hierarchy = Hierarchy::V2(own.clone());
        let cgroup = WorkerCgroup::create_in(&hierarchy, "npu", &LIMITS).expect("create");
        assert_eq!(read(&own.join(LEAF_DIR).join("cgroup.procs")), "4242\n4343\n");
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+memory +pids");
        let parent = own.join(WORKERS_DIR);
        assert_eq!(read(&parent.join("cgroup.subtree_control")), "+memory +pids");
        let [dir] = cgroup.paths()[..] else { panic!("v2 has one directory") };
        assert_eq!(dir.parent(), Some(parent.as_path()));
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("pids.max")), "16");
        assert!(!dir.join("memory.swap.max").exists());

        // Controllers now on: a second worker moves nothing again.
        let second = WorkerCgroup::create_in(&hierarchy, "npu", &LIMITS).expect("second");
        assert_eq!(read(&own.join(LEAF_DIR).join("cgroup.procs")), "4242\n4343\n");

        second.join(7).expect("join");
        assert_eq!(read(&second.paths()[0].join("cgroup.procs")), "7\n");
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
            .expect("events");
        assert_eq!(cgroup.oom_kills(), 2);
        fs::write(dir.join("memory.current"), "300\n").expect("current");
        assert_eq!(cgroup.memory_peak(), Some(300));
        assert_eq!(cgroup.describe(), format!("cgroup v2 {} (memory 64 MiB, pids 16)", dir.display()));
    }

    #[test]
    fn v2_fake_root_cgroup_keeps_its_processes() {
        // The root cgroup has no cgroup.type and may hold processes and
        // enable controllers at once.
        let (_root, own) = fake_v2("1\n", false);
        WorkerCgroup::create_in(&Hierarchy::V2(own.clone()), "npu", &LIMITS).expect("create");
        assert!(!own.join(LEAF_DIR).exists());
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+memory +pids");
    }

    #[test]
    fn v2_fake_without_a_controller_says_which() {
        let (_root, own) = fake_v2("", true);
        fs::write(own.join("cgroup.controllers"), "cpu io pids\n").expect("controllers");
        let error = WorkerCgroup::create_in(&Hierarchy::V2(own.clone()), "npu", &LIMITS).expect_err("no memory");
        assert!(error.contains(&own.display().to_string()), "{error}");
        assert!(error.contains("does not offer the memory controller"), "{error}");
        assert!(error.contains("\"cpu io pids\""), "{error}");
        assert!(!own.join(WORKERS_DIR).exists());
    }

    #[test]
    fn stale_cgroups_of_dead_devhosts_are_removed() {
        let (_root, hierarchy) = fake_v1();
        let Hierarchy::V1 { memory, .. } = &hierarchy else { unreachable!() };
        let mut gone = Command::new("true").spawn().expect("spawn true");
        let dead = gone.id();
        gone.wait().expect("wait");
        let parent = memory.join(WORKERS_DIR);
        let me = std::process::id();
        let dead_dir = parent.join(format!("devhost-worker-a-b-{dead}-3"));
        let busy_dir = parent.join(format!("devhost-worker-a-{dead}-4"));
        let ours = parent.join(format!("devhost-worker-a-{me}-999999"));
        let foreign = parent.join("something-else-1-2");
        for dir in [&dead_dir, &busy_dir, &ours, &foreign] {
            fs::create_dir_all(dir).expect("dir");
        }
        // Stands for a process still in it: rmdir refuses.
        fs::write(busy_dir.join("cgroup.procs"), "1\n").expect("procs");
        WorkerCgroup::create_in(&hierarchy, "a", &LIMITS).expect("create");
        assert!(!dead_dir.exists(), "the dead devhost's empty cgroup stayed");
        assert!(busy_dir.exists() && ours.exists() && foreign.exists());
    }

    #[test]
    fn creation_errors_name_the_path_and_the_os_error() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = root.path().join("not-a-dir");
        fs::write(&file, "").expect("file");
        let hierarchy = Hierarchy::V1 { memory: file.clone(), pids: root.path().to_path_buf() };
        let error = WorkerCgroup::create_in(&hierarchy, "gpu", &LIMITS).expect_err("file as cgroup");
        assert_eq!(error, format!("cannot create the cgroup {}/{WORKERS_DIR}: Not a directory", file.display()));
        let zero = WorkerCgroup::create_in(&hierarchy, "gpu", &Limits { memory_bytes: 0, pids: 1 });
        assert!(zero.expect_err("zero").contains("above 0"));
    }

    /// A child killed when the test ends early.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn remove_kills_listed_processes_and_reports_what_stays() {
        // A fake cgroup's directory never empties: remove must kill the
        // process it lists, never devhost itself, and say what is left.
        let (_root, own) = fake_v2("", true);
        let cgroup = WorkerCgroup::create_in(&Hierarchy::V2(own), "npu", &LIMITS).expect("create");
        let mut sleeper = Reaped(Command::new("sleep").arg("30").spawn().expect("spawn sleep"));
        cgroup.join(sleeper.0.id()).expect("join");
        cgroup.join(std::process::id()).expect("join self");
        let dir = cgroup.paths()[0].to_path_buf();
        let error = cgroup.remove().expect_err("a fake directory holds files");
        assert!(
            error.starts_with(&format!("cannot remove the worker's cgroup {}: Directory not empty", dir.display()))
        );
        // The fake file still lists the sleeper; devhost itself is never a target.
        assert!(error.ends_with(&format!("(processes {} still in it after SIGKILL)", sleeper.0.id())), "{error}");
        let status = wait_within(&mut sleeper.0, Duration::from_secs(10)).expect("sleep killed");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    /// devhost's real cgroups, when the tests may create cgroups there
    /// without moving processes around (on v2 only where controllers are
    /// already enabled).
    fn writable_own() -> Option<Hierarchy> {
        let hierarchy = match Hierarchy::own() {
            Ok(hierarchy) => hierarchy,
            Err(why) => {
                eprintln!("skipped: no usable cgroup: {why}");
                return None;
            }
        };
        if let Hierarchy::V2(own) = &hierarchy
            && !missing_controllers(own).is_empty()
        {
            eprintln!("skipped: {} does not enable memory and pids for children yet", own.display());
            return None;
        }
        for (_, dir) in hierarchy.dirs() {
            let probe =
                dir.join(format!("devhost-probe-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
            if let Err(e) = fs::create_dir(&probe) {
                eprintln!("skipped: cgroup {} is not writable: {}", dir.display(), os(&e));
                return None;
            }
            let _ = fs::remove_dir(&probe);
        }
        Some(hierarchy)
    }

    /// Removes the cgroup if a test fails before it does.
    struct Removed(Option<WorkerCgroup>);

    impl Drop for Removed {
        fn drop(&mut self) {
            if let Some(cgroup) = self.0.take() {
                let _ = cgroup.remove();
            }
        }
    }

    fn pids_events_max(dir: &Path) -> Option<u64> {
        keyed(&fs::read_to_string(dir.join("pids.events")).ok()?, "max")
    }

    fn gone_or_zombie(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
    }

    #[test]
    fn real_cgroup_limits_forks_and_removal_kills_everything() {
        let Some(hierarchy) = writable_own() else { return };
        let cgroup = WorkerCgroup::create_in(&hierarchy, "pids-test", &LIMITS).expect("create");
        eprintln!("{}", cgroup.describe());
        let mut guard = Removed(Some(cgroup));
        let cgroup = guard.0.as_ref().expect("cgroup");
        let dirs: Vec<PathBuf> = cgroup.paths().iter().map(|p| p.to_path_buf()).collect();
        let pids_dir = dirs.last().expect("a pids directory").clone();
        if !cgroup.v2 {
            assert_eq!(read(&dirs[0].join("memory.limit_in_bytes")).trim(), "67108864");
        }
        assert_eq!(read(&pids_dir.join("pids.max")).trim(), "16");

        let mut sleeper = Reaped(Command::new("sleep").arg("30").spawn().expect("spawn sleep"));
        cgroup.join(sleeper.0.id()).expect("join sleep");
        for dir in &dirs {
            assert!(
                read_pids(&dir.join("cgroup.procs")).expect("procs").contains(&sleeper.0.id()),
                "{}",
                dir.display()
            );
        }

        // The shell waits for a line so that it forks only once inside.
        let mut shell = Reaped(
            Command::new("sh")
                .args(["-c", "read go; for i in $(seq 40); do sleep 30 & done; wait"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sh"),
        );
        cgroup.join(shell.0.id()).expect("join sh");
        shell.0.stdin.take().expect("stdin").write_all(b"go\n").expect("go");
        // The loop is over when a fork was refused (v1 and v2 both count
        // refusals in pids.events) or the shell gave up and exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let refused = pids_events_max(&pids_dir).is_some_and(|max| max >= 1);
            if refused || Instant::now() >= deadline || matches!(shell.0.try_wait(), Ok(Some(_))) {
                break refused;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let members = read_pids(&pids_dir.join("cgroup.procs")).expect("procs");
        assert!(refused, "no fork refused within 10 s; {} processes in {}", members.len(), pids_dir.display());
        assert!(members.len() <= 16, "{} processes in a cgroup limited to 16", members.len());

        let cgroup = guard.0.take().expect("cgroup");
        cgroup.remove().expect("remove");
        for dir in &dirs {
            assert!(!dir.exists(), "{} still there", dir.display());
        }
        let status = wait_within(&mut sleeper.0, Duration::from_secs(10)).expect("sleep ended");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(wait_within(&mut shell.0, Duration::from_secs(10)).is_some(), "sh still running");
        let mut stderr = String::new();
        let _ = shell.0.stderr.take().expect("stderr").read_to_string(&mut stderr);
        eprintln!("the shell said: {}", stderr.trim());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !members.iter().all(|&pid| gone_or_zombie(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let alive: Vec<u32> = members.into_iter().filter(|&pid| !gone_or_zombie(pid)).collect();
        assert!(alive.is_empty(), "processes {alive:?} survived remove()");
    }

    #[test]
    fn real_cgroup_oom_kill_is_counted() {
        let Some(hierarchy) = writable_own() else { return };
        if !Command::new("python3").args(["-c", "pass"]).status().is_ok_and(|s| s.success()) {
            eprintln!("skipped: no python3 to allocate memory with");
            return;
        }
        let cgroup = WorkerCgroup::create_in(&hierarchy, "oom-test", &LIMITS).expect("create");
        let guard = Removed(Some(cgroup));
        let cgroup = guard.0.as_ref().expect("cgroup");
        let mut child = Reaped(
            Command::new("sh")
                .args(["-c", "read go; exec python3 -c 'x = bytearray(200 * 1024 * 1024); import time; time.sleep(5)'"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        cgroup.join(child.0.id()).expect("join");
        child.0.stdin.take().expect("stdin").write_all(b"go\n").expect("go");
        let status = wait_within(&mut child.0, Duration::from_secs(30)).expect("python ended within 30 s");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        assert!(cgroup.oom_kills() >= 1, "oom_kills() = {}", cgroup.oom_kills());
        let peak = cgroup.memory_peak().expect("peak");
        assert!(peak <= 64 * MIB + MIB, "peak {peak} above the limit");
        drop(guard);
    }
}
