//! Least privilege for a native backend's worker (issue 27): the worker
//! applies a [`Lockdown`] to itself right after exec, before it loads the
//! module, so even the module's constructors run locked down.
//!
//! What it does, in this order ([`apply`]):
//!
//! 1. `no_new_privs`: nothing the worker executes gains privileges (set-uid
//!    bits and file capabilities are ignored, and the kernel caps what an
//!    exec'd program may hold at the worker's own permitted set);
//! 2. the capability bounding set is cut to the capabilities the backend's
//!    file declares (none by default). This comes before the uid change
//!    because dropping needs `CAP_SETPCAP` in the effective set, which a
//!    change to a non-zero uid clears;
//! 3. supplementary groups, gid, then uid, when the file names them (with
//!    `PR_SET_KEEPCAPS` across the uid change when capabilities are kept);
//! 4. the ambient set is cleared; the effective and permitted sets become the
//!    kept set; the inheritable set is emptied (the kept capabilities are for
//!    the worker itself, not for programs it runs);
//! 5. the seccomp filter of [`REFUSED`], unless the operator turned it off.
//!
//! Not here: the PID namespace and cgroups of the worker (elsewhere in the
//! sandbox), and deciding what a backend may keep (its file, parsed with
//! [`parse_capability`]).

use std::collections::BTreeMap;

use caps::{CapSet, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// A Linux capability, as the `caps` crate names it (`Capability::CAP_SYS_ADMIN`).
pub use caps::Capability;

/// What a worker is allowed, from the backend's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockdown {
    /// Capabilities kept (effective, permitted, bounding), e.g.
    /// `CAP_SYS_ADMIN`; empty = none.
    pub capabilities: Vec<Capability>,
    /// The uid the worker switches to (real, effective and saved); `None`
    /// keeps devhost's.
    pub uid: Option<u32>,
    /// The gid the worker switches to (real, effective and saved); `None`
    /// keeps devhost's. Supplementary groups are dropped whenever a uid or a
    /// gid is given.
    pub gid: Option<u32>,
    /// Install the seccomp filter (true unless the operator turned it off).
    pub seccomp: bool,
}

impl Default for Lockdown {
    /// No capabilities, devhost's uid and gid, the seccomp filter on.
    fn default() -> Self {
        Lockdown { capabilities: Vec::new(), uid: None, gid: None, seccomp: true }
    }
}

/// What [`apply`] did, for the worker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One line, e.g. `no_new_privs, capabilities: none, seccomp: 45
    /// syscalls refused, uid 0 gid 0`.
    pub summary: String,
}

/// The syscalls the seccomp filter refuses (with `EPERM` unless said
/// otherwise), each with the reason, for docs and `devhost list`. A name the
/// architecture lacks (`iopl` and `ioperm` exist on x86_64 only) is skipped.
///
/// What stays allowed, and why:
///
/// * `kill`, `tkill`, `tgkill`, `rt_sigqueueinfo`, `pidfd_send_signal`:
///   `abort()`, `raise()`, `pthread_kill()` and a backend stopping its own
///   helper processes need them. The worker's PID namespace confines its
///   signals to itself and its children, and without `CAP_KILL` the kernel's
///   uid check applies besides;
/// * `fork`, `vfork`, and `clone` without a namespace flag (threads,
///   `posix_spawn`): vendor libraries start threads and helper tools; `execve`
///   stays too, since `no_new_privs` keeps an exec from gaining anything;
/// * `ioctl`, `open`, `mmap` and the rest of file and memory handling: talking
///   to device nodes is a backend's whole job;
/// * `prctl`, `setuid` and the like: nothing they do undoes `no_new_privs`,
///   and without capabilities they can only narrow.
///
/// Besides the list: a syscall of another architecture's ABI kills the worker
/// (the filter checks the architecture first; on x86_64 that is the i386
/// `int 0x80` ABI), and on x86_64 an x32 syscall (number with bit 30 set,
/// which the per-number rules would not match) fails with `ENOSYS`, as on a
/// kernel built without x32.
pub const REFUSED: &[(&str, &str)] = &[
    // Namespaces and the view of the filesystem.
    (
        "unshare",
        "creates namespaces; a new user namespace grants every capability inside it, the usual way around capability checks",
    ),
    ("setns", "joins other namespaces, e.g. the host's through /proc/<pid>/ns"),
    (
        "clone",
        "only with a CLONE_NEW* flag, which creates namespaces as unshare does; plain fork, vfork and threads stay allowed",
    ),
    (
        "clone3",
        "fails with ENOSYS, not EPERM: its flags sit behind a pointer the filter cannot read, and ENOSYS makes libc fall back to clone, where the flag check applies",
    ),
    (
        "mount",
        "changes the mount table; a backend that keeps CAP_SYS_ADMIN for its ioctls could still remount the host",
    ),
    ("umount2", "changes the mount table (can uncover what a mount hides)"),
    ("pivot_root", "swaps the root filesystem"),
    ("chroot", "changes the root directory; no use to a backend, and a step in known container escapes"),
    ("open_tree", "the file-descriptor mount API: the same powers as mount"),
    ("move_mount", "the file-descriptor mount API: the same powers as mount"),
    ("fsopen", "the file-descriptor mount API: the same powers as mount"),
    ("fsconfig", "the file-descriptor mount API: the same powers as mount"),
    ("fsmount", "the file-descriptor mount API: the same powers as mount"),
    ("fspick", "the file-descriptor mount API: the same powers as mount"),
    ("mount_setattr", "changes mount attributes, e.g. drops read-only or nosuid"),
    (
        "open_by_handle_at",
        "opens a file by handle, past path lookup and mount boundaries (the 'shocker' container escape)",
    ),
    // Other processes.
    ("ptrace", "reads and writes other processes' memory and registers"),
    ("process_vm_readv", "reads another process's memory"),
    ("process_vm_writev", "writes another process's memory"),
    ("pidfd_getfd", "copies a file descriptor out of another process"),
    // The kernel itself.
    ("kexec_load", "replaces the running kernel"),
    ("kexec_file_load", "replaces the running kernel"),
    ("reboot", "reboots or halts the node"),
    ("init_module", "loads kernel code; a backend uses the driver the node has"),
    ("finit_module", "loads kernel code; a backend uses the driver the node has"),
    ("delete_module", "unloads a driver that other workloads use"),
    ("bpf", "loads programs into the kernel, a large share of recent kernel exploits"),
    ("perf_event_open", "observes other processes and the kernel, and is a frequent source of kernel bugs"),
    ("userfaultfd", "lets user space stall the kernel's page faults, the standard tool for winning kernel races"),
    ("add_key", "the kernel keyrings are shared beyond the worker's namespaces; a backend keeps no keys there"),
    ("request_key", "the kernel keyrings are shared beyond the worker's namespaces; a backend keeps no keys there"),
    ("keyctl", "the kernel keyrings are shared beyond the worker's namespaces; a backend keeps no keys there"),
    // State of the whole node.
    ("swapon", "changes the node's swap"),
    ("swapoff", "changes the node's swap"),
    ("acct", "switches process accounting for the whole node"),
    ("quotactl", "changes filesystem quotas"),
    ("quotactl_fd", "changes filesystem quotas"),
    ("settimeofday", "sets the node's clock, which every workload shares"),
    ("clock_settime", "sets the node's clock, which every workload shares"),
    ("iopl", "raw I/O port access (x86), past every driver"),
    ("ioperm", "raw I/O port access (x86), past every driver"),
    (
        "personality",
        "except the query (0xffffffff) and PER_LINUX (0): other execution domains switch off address-space randomisation (ADDR_NO_RANDOMIZE) or make readable memory executable (READ_IMPLIES_EXEC)",
    ),
];

/// Parses a capability name as written in a backend file: `CAP_SYS_ADMIN`
/// or `sys_admin`, in any case.
pub fn parse_capability(name: &str) -> Result<Capability, String> {
    let trimmed = name.trim();
    let canonical = caps::to_canonical(trimmed);
    if trimmed.is_empty() || canonical == "CAP_" {
        return Err("empty capability name (expected a name such as CAP_SYS_ADMIN or sys_admin)".to_owned());
    }
    canonical.parse::<Capability>().map_err(|_| {
        format!("unknown capability {name:?} (expected a name such as CAP_SYS_ADMIN or sys_admin, see capabilities(7))")
    })
}

/// The canonical name (`CAP_SYS_ADMIN`).
pub fn capability_name(cap: Capability) -> String {
    cap.to_string()
}

/// Applies `lockdown` to the calling process, in the order of the module
/// documentation, and says what it applied; an error names the step that
/// failed and the OS error.
///
/// Precondition: the process is single-threaded. Capabilities,
/// `no_new_privs` and `PR_SET_KEEPCAPS` belong to a thread, so a thread
/// started earlier would keep everything; the worker calls this first
/// thing, and it refuses to run when `/proc/self/task` lists more than one
/// thread. (The seccomp filter itself is installed with `TSYNC`, for all
/// threads.)
///
/// Applying is one way: a second call can only narrow further. Nothing is
/// changed when a kept capability is missing, when the filter cannot be
/// built, or when threads are running; a failure later leaves the process
/// partly locked down, and the worker then exits.
pub fn apply(lockdown: &Lockdown) -> Result<Applied, String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|error| format!("worker lockdown: counting threads in /proc/self/task: {error}"))?
        .count();
    if threads > 1 {
        return Err(format!(
            "worker lockdown: {threads} threads are running; the lockdown must come before any thread starts, since capabilities belong to a thread"
        ));
    }
    let keep: CapsHashSet = lockdown.capabilities.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(|error| step("reading the permitted set", error))?;
    let mut missing: Vec<String> = keep.difference(&permitted).map(|cap| capability_name(*cap)).collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(format!(
            "worker lockdown: cannot keep {}: the worker does not hold it (devhost lacks it in its permitted set)",
            missing.join(", ")
        ));
    }
    // Built before anything changes, so an error here leaves the process
    // untouched.
    let filters = if lockdown.seccomp { Some(filters()?) } else { None };

    sys::set_no_new_privs().map_err(|error| step("setting no_new_privs", error))?;
    let bounding_dropped = drop_bounding(&keep)?;
    change_ids(lockdown, !keep.is_empty())?;
    caps::clear(None, CapSet::Ambient).map_err(|error| step("clearing the ambient set", error))?;
    // Effective first: the kernel wants effective within permitted at
    // every step.
    caps::set(None, CapSet::Effective, &keep).map_err(|error| step("setting the effective set", error))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|error| step("setting the permitted set", error))?;
    caps::clear(None, CapSet::Inheritable).map_err(|error| step("clearing the inheritable set", error))?;
    if lockdown.uid.is_some() && !keep.is_empty() {
        caps::securebits::set_keepcaps(false).map_err(|error| step("clearing PR_SET_KEEPCAPS", error))?;
    }
    let seccomp = match filters {
        Some(filters) => {
            for (name, program) in &filters.programs {
                seccompiler::apply_filter_all_threads(program)
                    .map_err(|error| format!("worker lockdown: installing the seccomp filter ({name}): {error}"))?;
            }
            format!("{} syscalls refused", filters.refused)
        }
        None => "off".to_owned(),
    };

    let mut kept: Vec<String> = keep.iter().map(|cap| capability_name(*cap)).collect();
    kept.sort();
    let capabilities = if kept.is_empty() { "none".to_owned() } else { kept.join(" ") };
    let bounding = if bounding_dropped { "" } else { " (bounding set left as it was: no CAP_SETPCAP to drop it)" };
    let (uid, gid) = sys::ids();
    Ok(Applied {
        summary: format!(
            "no_new_privs, capabilities: {capabilities}{bounding}, seccomp: {seccomp}, uid {uid} gid {gid}"
        ),
    })
}

fn step(what: &str, error: impl std::fmt::Display) -> String {
    format!("worker lockdown: {what}: {error}")
}

/// Drops every capability but `keep` from the bounding set, including ones
/// newer than the `caps` crate knows (up to the kernel's last). Returns
/// false, changing nothing, when the process lacks `CAP_SETPCAP`: an
/// unprivileged devhost cannot narrow the set, and with `no_new_privs` an
/// exec cannot use it anyway.
fn drop_bounding(keep: &CapsHashSet) -> Result<bool, String> {
    let keep_mask: u64 = keep.iter().fold(0, |mask, cap| mask | cap.bitmask());
    let can_drop = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(|error| step("reading the effective set", error))?;
    for index in 0..64u8 {
        let Some(held) = sys::bounding_has(index).map_err(|error| step("reading the bounding set", error))? else {
            break;
        };
        if !held || keep_mask & (1 << index) != 0 {
            continue;
        }
        if !can_drop {
            return Ok(false);
        }
        sys::bounding_drop(index)
            .map_err(|error| step(&format!("dropping {} from the bounding set", index_name(index)), error))?;
    }
    Ok(true)
}

fn index_name(index: u8) -> String {
    caps::all()
        .into_iter()
        .find(|cap| cap.index() == index)
        .map(capability_name)
        .unwrap_or_else(|| format!("capability {index}"))
}

fn change_ids(lockdown: &Lockdown, keep_caps: bool) -> Result<(), String> {
    if lockdown.uid.is_none() && lockdown.gid.is_none() {
        return Ok(());
    }
    // devhost's supplementary groups (root's `disk`, `video`, …) would
    // otherwise survive the change.
    sys::clear_groups().map_err(|error| step("clearing the supplementary groups", error))?;
    if let Some(gid) = lockdown.gid {
        sys::set_gid(gid).map_err(|error| step(&format!("switching to gid {gid}"), error))?;
    }
    if let Some(uid) = lockdown.uid {
        if keep_caps {
            // Without it, leaving uid 0 empties the permitted set.
            caps::securebits::set_keepcaps(true).map_err(|error| step("setting PR_SET_KEEPCAPS", error))?;
        }
        sys::set_uid(uid).map_err(|error| step(&format!("switching to uid {uid}"), error))?;
    }
    Ok(())
}

/// The compiled filters, in the order they are installed.
struct Filters {
    programs: Vec<(&'static str, BpfProgram)>,
    /// How many syscalls are refused (some only with certain arguments).
    refused: usize,
}

/// Namespace flags `clone` may not carry. `CLONE_NEWTIME` is missing on
/// purpose: in `clone` its bit is part of the exit signal, and the kernel
/// accepts it from `clone3` and `unshare` only (both refused whole).
const CLONE_NAMESPACES: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

fn filters() -> Result<Filters, String> {
    let arch = sys::target_arch()?;
    let compile = |what: &str, error: seccompiler::BackendError| {
        format!("worker lockdown: building the seccomp filter ({what}): {error}")
    };
    let condition = |op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, op, value).map_err(|error| compile("a condition", error))
    };
    let mut refuse: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (name, _) in REFUSED {
        let Some(number) = sys::syscall_number(name) else { continue };
        let rules = match *name {
            // A filter of its own: it answers ENOSYS.
            "clone3" => continue,
            // Any one namespace flag in the first argument (the rules of a
            // syscall match when any one does).
            "clone" => CLONE_NAMESPACES
                .iter()
                .map(|&flag| {
                    let flag = u64::from(flag.cast_unsigned());
                    SeccompRule::new(vec![condition(SeccompCmpOp::MaskedEq(flag), flag)?])
                        .map_err(|error| compile("clone", error))
                })
                .collect::<Result<Vec<_>, String>>()?,
            "personality" => vec![
                SeccompRule::new(vec![condition(SeccompCmpOp::Ne, 0)?, condition(SeccompCmpOp::Ne, 0xffff_ffff)?])
                    .map_err(|error| compile("personality", error))?,
            ],
            _ => Vec::new(),
        };
        refuse.insert(number, rules);
    }
    let errno = |code: libc::c_int| SeccompAction::Errno(code.cast_unsigned());
    let refused = refuse.len() + 1;
    let program = |what: &'static str, rules, action| -> Result<(&'static str, BpfProgram), String> {
        let filter =
            SeccompFilter::new(rules, SeccompAction::Allow, action, arch).map_err(|error| compile(what, error))?;
        Ok((what, BpfProgram::try_from(filter).map_err(|error| compile(what, error))?))
    };
    let clone3 = sys::syscall_number("clone3").ok_or_else(|| {
        format!("worker lockdown: building the seccomp filter: {} has no clone3", std::env::consts::ARCH)
    })?;
    let mut programs = vec![
        program("refused syscalls", refuse, errno(libc::EPERM))?,
        program("clone3", BTreeMap::from([(clone3, Vec::new())]), errno(libc::ENOSYS))?,
    ];
    programs.extend(sys::x32_guard().map(|guard| ("x32 syscalls", guard)));
    Ok(Filters { programs, refused })
}

/// The system calls behind the steps, each a thin wrapper.
mod sys {
    use std::io;

    use seccompiler::{BpfProgram, TargetArch};

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    pub(super) fn set_no_new_privs() -> io::Result<()> {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and
        // touches no memory of ours.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0 as libc::c_ulong, 0, 0) })
    }

    /// Whether capability `index` is in the bounding set; `None` past the
    /// kernel's last capability.
    pub(super) fn bounding_has(index: u8) -> io::Result<Option<bool>> {
        // SAFETY: PR_CAPBSET_READ takes an integer and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(index), 0, 0, 0) };
        match rc {
            -1 => {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EINVAL) { Ok(None) } else { Err(error) }
            }
            held => Ok(Some(held == 1)),
        }
    }

    pub(super) fn bounding_drop(index: u8) -> io::Result<()> {
        // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(index), 0, 0, 0) })
    }

    pub(super) fn clear_groups() -> io::Result<()> {
        // SAFETY: a count of 0 means the kernel reads nothing from the
        // (null) list.
        check(unsafe { libc::setgroups(0, std::ptr::null()) })
    }

    /// Real, effective and saved gid, so the old one cannot be taken back.
    pub(super) fn set_gid(gid: u32) -> io::Result<()> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresgid(gid, gid, gid) })
    }

    /// Real, effective and saved uid, so the old one cannot be taken back.
    pub(super) fn set_uid(uid: u32) -> io::Result<()> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresuid(uid, uid, uid) })
    }

    /// The effective uid and gid.
    pub(super) fn ids() -> (u32, u32) {
        // SAFETY: neither call has preconditions or can fail.
        unsafe { (libc::geteuid(), libc::getegid()) }
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub(super) fn target_arch() -> Result<TargetArch, String> {
        TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|error| format!("worker lockdown: building the seccomp filter: {error}"))
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub(super) fn target_arch() -> Result<TargetArch, String> {
        Err(format!(
            "worker lockdown: no seccomp filter for {} (only x86_64 and aarch64); turn the filter off for this backend",
            std::env::consts::ARCH
        ))
    }

    /// The number of a syscall of [`super::REFUSED`] on this architecture.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub(super) fn syscall_number(name: &str) -> Option<i64> {
        let number = match name {
            "unshare" => libc::SYS_unshare,
            "setns" => libc::SYS_setns,
            "clone" => libc::SYS_clone,
            "clone3" => libc::SYS_clone3,
            "mount" => libc::SYS_mount,
            "umount2" => libc::SYS_umount2,
            "pivot_root" => libc::SYS_pivot_root,
            "chroot" => libc::SYS_chroot,
            "open_tree" => libc::SYS_open_tree,
            "move_mount" => libc::SYS_move_mount,
            "fsopen" => libc::SYS_fsopen,
            "fsconfig" => libc::SYS_fsconfig,
            "fsmount" => libc::SYS_fsmount,
            "fspick" => libc::SYS_fspick,
            "mount_setattr" => libc::SYS_mount_setattr,
            "open_by_handle_at" => libc::SYS_open_by_handle_at,
            "ptrace" => libc::SYS_ptrace,
            "process_vm_readv" => libc::SYS_process_vm_readv,
            "process_vm_writev" => libc::SYS_process_vm_writev,
            "pidfd_getfd" => libc::SYS_pidfd_getfd,
            "kexec_load" => libc::SYS_kexec_load,
            "kexec_file_load" => libc::SYS_kexec_file_load,
            "reboot" => libc::SYS_reboot,
            "init_module" => libc::SYS_init_module,
            "finit_module" => libc::SYS_finit_module,
            "delete_module" => libc::SYS_delete_module,
            "bpf" => libc::SYS_bpf,
            "perf_event_open" => libc::SYS_perf_event_open,
            "userfaultfd" => libc::SYS_userfaultfd,
            "add_key" => libc::SYS_add_key,
            "request_key" => libc::SYS_request_key,
            "keyctl" => libc::SYS_keyctl,
            "swapon" => libc::SYS_swapon,
            "swapoff" => libc::SYS_swapoff,
            "acct" => libc::SYS_acct,
            "quotactl" => libc::SYS_quotactl,
            "quotactl_fd" => libc::SYS_quotactl_fd,
            "settimeofday" => libc::SYS_settimeofday,
            "clock_settime" => libc::SYS_clock_settime,
            #[cfg(target_arch = "x86_64")]
            "iopl" => libc::SYS_iopl,
            #[cfg(target_arch = "x86_64")]
            "ioperm" => libc::SYS_ioperm,
            "personality" => libc::SYS_personality,
            _ => return None,
        };
        Some(number)
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub(super) fn syscall_number(_name: &str) -> Option<i64> {
        None
    }

    /// On x86_64, a filter that answers ENOSYS to every x32 syscall (bit 30
    /// of the number set): the x32 ABI reports the x86_64 architecture, so
    /// the architecture check lets it through, and its numbers differ from
    /// those the other filters match. Hand-written, since seccompiler only
    /// matches exact numbers.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn x32_guard() -> Option<BpfProgram> {
        use seccompiler::sock_filter;
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        // `nr` is the first field of `struct seccomp_data`.
        const NR_OFFSET: u32 = 0;
        let instruction = |code: u32, jt: u8, jf: u8, k: u32| sock_filter { code: code as u16, jt, jf, k };
        Some(vec![
            instruction(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, NR_OFFSET),
            // nr >= X32_SYSCALL_BIT: the next instruction, else skip it.
            instruction(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, 0, 1, X32_SYSCALL_BIT),
            instruction(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS.cast_unsigned()),
            instruction(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ])
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn x32_guard() -> Option<BpfProgram> {
        None
    }
}

#[cfg(test)]
mod tests {
    //! Each lockdown is applied in a child process, never in the test
    //! process: the test binary re-executes itself with [`CHILD_ENV`] naming
    //! a scenario, and that (quiet) process forks a single-threaded child
    //! that applies the lockdown, probes what it may still do and prints
    //! `@probe:key=value` lines, which the test reads.

    use std::collections::BTreeMap;
    use std::io::Write;
    use std::process::Command;

    use super::*;

    const CHILD_ENV: &str = "DEVHOST_LOCKDOWN_CHILD";
    const CAP_NET_ADMIN_BIT: u64 = 1 << 12;
    const CAP_SYS_ADMIN_BIT: u64 = 1 << 21;

    fn is_root() -> bool {
        if sys::ids().0 == 0 {
            return true;
        }
        eprintln!("SKIP: needs root to hold capabilities and change uid");
        false
    }

    /// Runs `scenario` in a fresh process and returns what it printed.
    fn run_child(scenario: &str) -> BTreeMap<String, String> {
        let exe = std::env::current_exe().expect("the test binary");
        let path = module_path!();
        let name = format!("{}::child_entry", path.split_once("::").map_or(path, |(_, rest)| rest));
        let output = Command::new(exe)
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, scenario)
            .output()
            .expect("re-executing the test binary");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "scenario {scenario}: {}\n{stdout}\n{stderr}", output.status);
        let report: BTreeMap<String, String> = stdout
            .lines()
            // libtest's "test … ... " may precede the first line.
            .filter_map(|line| line.split_once("@probe:").map(|(_, rest)| rest))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        // A wrong test name runs no test and still succeeds.
        assert_eq!(report.get("done").map(String::as_str), Some("yes"), "scenario {scenario}:\n{stdout}\n{stderr}");
        report
    }

    fn get<'a>(report: &'a BTreeMap<String, String>, key: &str) -> &'a str {
        report.get(key).map(String::as_str).unwrap_or_else(|| panic!("no {key} in {report:#?}"))
    }

    fn hex(report: &BTreeMap<String, String>, key: &str) -> u64 {
        u64::from_str_radix(get(report, key), 16).unwrap_or_else(|_| panic!("{key} is not hex in {report:#?}"))
    }

    fn errno(code: libc::c_int) -> String {
        format!("errno {code}")
    }

    /// What every lockdown with the filter on refuses, and what it allows.
    fn assert_filtered(report: &BTreeMap<String, String>) {
        assert_eq!(get(report, "NoNewPrivs"), "1", "{report:#?}");
        assert_eq!(get(report, "Seccomp"), "2", "{report:#?}");
        let filters = if cfg!(target_arch = "x86_64") { 3 } else { 2 };
        assert_eq!(
            get(report, "Seccomp_filters").parse::<u32>().expect("a count"),
            get(report, "Seccomp_filters_before").parse::<u32>().expect("a count") + filters,
            "{report:#?}"
        );
        for probe in ["unshare_newns", "unshare_newuser", "mount", "clone_newpid", "clone_newuser", "keyctl"] {
            assert_eq!(get(report, probe), errno(libc::EPERM), "{probe}: {report:#?}");
        }
        assert_eq!(get(report, "personality_no_aslr"), errno(libc::EPERM), "{report:#?}");
        assert_eq!(get(report, "personality_query"), "ok", "{report:#?}");
        assert_eq!(get(report, "clone3"), errno(libc::ENOSYS), "{report:#?}");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(get(report, "x32_getpid"), errno(libc::ENOSYS), "{report:#?}");
        }
        assert_allowed(report);
    }

    /// What a locked-down worker still does: fork, threads, spawning a
    /// program (libc's clone3 fallback), opening files.
    fn assert_allowed(report: &BTreeMap<String, String>) {
        for probe in ["fork", "thread", "spawn", "dev_null"] {
            assert_eq!(get(report, probe), "ok", "{probe}: {report:#?}");
        }
    }

    #[test]
    fn no_capabilities_no_namespaces_and_plain_fork_still_works() {
        let report = run_child("none");
        assert!(get(&report, "applied").starts_with("no_new_privs, capabilities: none"), "{report:#?}");
        assert!(get(&report, "applied").contains("syscalls refused"), "{report:#?}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(hex(&report, set), 0, "{set}: {report:#?}");
        }
        if sys::ids().0 == 0 {
            assert_eq!(hex(&report, "CapBnd"), 0, "{report:#?}");
        }
        assert_filtered(&report);
    }

    #[test]
    fn a_kept_capability_stays_in_every_set_but_inheritable() {
        if !is_root() {
            return;
        }
        let report = run_child("net_admin");
        assert!(get(&report, "applied").contains("capabilities: CAP_NET_ADMIN,"), "{report:#?}");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(hex(&report, set), CAP_NET_ADMIN_BIT, "{set}: {report:#?}");
        }
        assert_eq!(hex(&report, "CapInh"), 0, "{report:#?}");
        assert_eq!(hex(&report, "CapAmb"), 0, "{report:#?}");
        assert_filtered(&report);
    }

    /// With CAP_SYS_ADMIN kept, only the filter stands between the worker
    /// and `mount` or `unshare`; the same probes without the filter show
    /// that they would otherwise get through.
    #[test]
    fn the_filter_refuses_mount_and_namespaces_even_with_cap_sys_admin() {
        if !is_root() {
            return;
        }
        let report = run_child("sys_admin");
        assert_eq!(hex(&report, "CapEff"), CAP_SYS_ADMIN_BIT, "{report:#?}");
        assert_filtered(&report);

        let open = run_child("sys_admin_no_seccomp");
        assert!(get(&open, "applied").contains("seccomp: off"), "{open:#?}");
        assert_eq!(get(&open, "NoNewPrivs"), "1", "{open:#?}");
        assert_eq!(get(&open, "Seccomp"), "0", "{open:#?}");
        assert_eq!(hex(&open, "CapEff"), CAP_SYS_ADMIN_BIT, "{open:#?}");
        // Past the permission check: /proc/self is no mount point.
        assert_eq!(get(&open, "mount"), errno(libc::EINVAL), "{open:#?}");
        assert_eq!(get(&open, "unshare_newns"), "ok", "{open:#?}");
        assert_eq!(get(&open, "clone_newpid"), "ok", "{open:#?}");
        assert_eq!(get(&open, "personality_no_aslr"), "ok", "{open:#?}");
        assert_eq!(get(&open, "clone_newuser"), "ok", "{open:#?}");
        assert_ne!(get(&open, "clone3"), errno(libc::ENOSYS), "{open:#?}");
        assert_allowed(&open);
    }

    #[test]
    fn a_uid_and_gid_replace_devhost_s_and_its_groups() {
        if !is_root() {
            return;
        }
        let report = run_child("nobody");
        assert_eq!(get(&report, "Uid"), "65534\t65534\t65534\t65534", "{report:#?}");
        assert_eq!(get(&report, "Gid"), "65534\t65534\t65534\t65534", "{report:#?}");
        assert_eq!(get(&report, "Groups"), "", "{report:#?}");
        assert!(get(&report, "applied").ends_with("uid 65534 gid 65534"), "{report:#?}");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(hex(&report, set), 0, "{set}: {report:#?}");
        }
        assert_filtered(&report);
    }

    #[test]
    fn a_kept_capability_survives_the_uid_change() {
        if !is_root() {
            return;
        }
        let report = run_child("nobody_net_admin");
        assert_eq!(get(&report, "Uid"), "65534\t65534\t65534\t65534", "{report:#?}");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(hex(&report, set), CAP_NET_ADMIN_BIT, "{set}: {report:#?}");
        }
        assert_eq!(get(&report, "keepcaps"), "0", "PR_SET_KEEPCAPS is reset: {report:#?}");
        assert_filtered(&report);
    }

    #[test]
    fn a_capability_already_given_up_cannot_be_kept() {
        let report = run_child("twice");
        assert_eq!(
            get(&report, "second"),
            "worker lockdown: cannot keep CAP_NET_ADMIN: the worker does not hold it (devhost lacks it in its permitted set)"
        );
    }

    #[test]
    fn a_second_thread_is_refused() {
        let report = run_child("threaded");
        let error = get(&report, "error");
        assert!(error.starts_with("worker lockdown: 2 threads are running"), "{report:#?}");
        // Nothing was changed.
        assert_eq!(get(&report, "NoNewPrivs"), "0", "{report:#?}");
    }

    #[test]
    fn capability_names_parse_in_either_spelling() {
        assert_eq!(parse_capability("CAP_SYS_ADMIN"), Ok(Capability::CAP_SYS_ADMIN));
        assert_eq!(parse_capability("sys_admin"), Ok(Capability::CAP_SYS_ADMIN));
        assert_eq!(parse_capability(" Net_Admin "), Ok(Capability::CAP_NET_ADMIN));
        assert_eq!(parse_capability("cap_perfmon"), Ok(Capability::CAP_PERFMON));
        assert_eq!(
            parse_capability("sys_admn"),
            Err("unknown capability \"sys_admn\" (expected a name such as CAP_SYS_ADMIN or sys_admin, see capabilities(7))"
                .to_owned())
        );
        assert!(parse_capability("").expect_err("empty").starts_with("empty capability name"));
        assert!(parse_capability("CAP_").expect_err("no name").starts_with("empty capability name"));
        for cap in caps::all() {
            let name = capability_name(cap);
            assert!(name.starts_with("CAP_"), "{name}");
            assert_eq!(parse_capability(&name), Ok(cap));
            assert_eq!(parse_capability(&name["CAP_".len()..].to_lowercase()), Ok(cap));
        }
        assert_eq!(capability_name(Capability::CAP_SYS_ADMIN), "CAP_SYS_ADMIN");
    }

    #[test]
    fn every_refused_syscall_is_known_here_and_the_filter_builds() {
        for (name, reason) in REFUSED {
            assert!(!reason.is_empty(), "{name}");
            let x86_only = matches!(*name, "iopl" | "ioperm");
            if cfg!(target_arch = "x86_64") || !x86_only {
                assert!(sys::syscall_number(name).is_some(), "{name} has no number on {}", std::env::consts::ARCH);
            }
        }
        let names: std::collections::HashSet<_> = REFUSED.iter().map(|(name, _)| name).collect();
        assert_eq!(names.len(), REFUSED.len(), "a syscall is listed twice");
        let filters = filters().expect("the filter builds");
        let expected = REFUSED.len() - if cfg!(target_arch = "x86_64") { 0 } else { 2 };
        assert_eq!(filters.refused, expected);
        assert!(filters.programs.iter().all(|(_, program)| !program.is_empty()));
        assert_eq!(Lockdown::default(), Lockdown { capabilities: vec![], uid: None, gid: None, seccomp: true });
    }

    /// The child side: does nothing unless [`CHILD_ENV`] is set.
    #[test]
    fn child_entry() {
        let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
        let _ = std::io::stdout().flush();
        // SAFETY: this process is the re-executed test binary; its only
        // other thread is libtest's main thread, blocked waiting for this
        // test, so no lock is held across the fork. The child ends with
        // `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io_error());
        if pid == 0 {
            let outcome = std::panic::catch_unwind(|| scenario_main(&scenario));
            let _ = std::io::stdout().flush();
            // SAFETY: ends the forked child without running the parent's
            // exit handlers twice.
            unsafe { libc::_exit(if outcome.is_ok() { 0 } else { 101 }) }
        }
        assert_eq!(wait(pid), 0, "scenario {scenario} failed in its child");
    }

    fn io_error() -> std::io::Error {
        std::io::Error::last_os_error()
    }

    /// Waits for `pid`; its exit code, or 128 + the signal.
    fn wait(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: `status` is a valid place for the kernel to write.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", io_error());
        if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
    }

    fn put(key: &str, value: impl std::fmt::Display) {
        println!("@probe:{key}={value}");
    }

    fn outcome(rc: libc::c_long) -> String {
        if rc == -1 { format!("errno {}", io_error().raw_os_error().unwrap_or(0)) } else { "ok".to_owned() }
    }

    fn status() -> BTreeMap<String, String> {
        let text = std::fs::read_to_string("/proc/thread-self/status").expect("/proc/thread-self/status");
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
            .collect()
    }

    fn scenario_main(scenario: &str) {
        let before = status();
        put("Seccomp_filters_before", before.get("Seccomp_filters").map_or("0", String::as_str));
        let nobody = (Some(65534), Some(65534));
        let (capabilities, (uid, gid), seccomp) = match scenario {
            "none" => (vec![], (None, None), true),
            "net_admin" => (vec![Capability::CAP_NET_ADMIN], (None, None), true),
            "sys_admin" => (vec![Capability::CAP_SYS_ADMIN], (None, None), true),
            "sys_admin_no_seccomp" => (vec![Capability::CAP_SYS_ADMIN], (None, None), false),
            "nobody" => (vec![], nobody, true),
            "nobody_net_admin" => (vec![Capability::CAP_NET_ADMIN], nobody, true),
            "twice" => {
                apply(&Lockdown { seccomp: false, ..Lockdown::default() }).expect("the first lockdown");
                let second = Lockdown { capabilities: vec![Capability::CAP_NET_ADMIN], ..Lockdown::default() };
                put("second", apply(&second).expect_err("keeping what was given up"));
                put("done", "yes");
                return;
            }
            "threaded" => {
                let (stop, wait) = std::sync::mpsc::channel::<()>();
                let thread = std::thread::spawn(move || wait.recv());
                put("error", apply(&Lockdown::default()).expect_err("a second thread"));
                drop(stop);
                let _ = thread.join();
                put("NoNewPrivs", &status()["NoNewPrivs"]);
                put("done", "yes");
                return;
            }
            other => panic!("unknown scenario {other}"),
        };
        let lockdown = Lockdown { capabilities, uid, gid, seccomp };
        match apply(&lockdown) {
            Ok(applied) => put("applied", applied.summary),
            Err(error) => panic!("apply: {error}"),
        }
        let after = status();
        for key in [
            "NoNewPrivs",
            "Seccomp",
            "Seccomp_filters",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "Uid",
            "Gid",
            "Groups",
        ] {
            put(key, after.get(key).map_or("", String::as_str));
        }
        probe();
        put("done", "yes");
    }

    /// Tries what the filter refuses and what it must allow. Each refused
    /// call is one that does no harm in this child if it gets through.
    fn probe() {
        // SAFETY (all calls below): integer arguments, or pointers to
        // NUL-terminated literals and null where the kernel accepts null.
        unsafe {
            // Remounting what is no mount point: EPERM without the right,
            // EINVAL with it; never a change.
            let mount = libc::mount(
                std::ptr::null(),
                c"/proc/self".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT,
                std::ptr::null(),
            );
            put("mount", outcome(mount.into()));
            for (key, flag) in [("clone_newpid", libc::CLONE_NEWPID), ("clone_newuser", libc::CLONE_NEWUSER)] {
                let flags = (flag | libc::SIGCHLD).cast_unsigned() as libc::c_ulong;
                // A null stack: the child runs on a copy of ours, like fork,
                // and leaves at once.
                let rc = libc::syscall(libc::SYS_clone, flags, 0 as libc::c_ulong, 0 as libc::c_ulong, 0, 0);
                if rc == 0 {
                    libc::_exit(0);
                }
                let result = outcome(rc);
                if rc > 0 {
                    wait(rc as libc::pid_t);
                }
                put(key, result);
            }
            // Last of the namespace probes: once through, the child is in
            // a new user namespace, where the others would fail anyway.
            put("unshare_newns", outcome(libc::unshare(libc::CLONE_NEWNS).into()));
            put("unshare_newuser", outcome(libc::unshare(libc::CLONE_NEWUSER).into()));
            // A null argument block: ENOSYS from the filter, EINVAL or
            // EFAULT from the kernel.
            put("clone3", outcome(libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0 as libc::size_t)));
            const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
            const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
            let keyctl = libc::syscall(libc::SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
            put("keyctl", outcome(keyctl));
            put("personality_query", outcome(libc::personality(0xffff_ffff).into()));
            const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
            put("personality_no_aslr", outcome(libc::personality(ADDR_NO_RANDOMIZE).into()));
            #[cfg(target_arch = "x86_64")]
            put("x32_getpid", outcome(libc::syscall(0x4000_0000 | libc::SYS_getpid)));

            let child = libc::fork();
            if child == 0 {
                libc::_exit(7);
            }
            put("fork", if child > 0 && wait(child) == 7 { "ok".to_owned() } else { outcome(child.into()) });
        }
        let thread = std::thread::spawn(|| 42).join();
        put("thread", if matches!(thread, Ok(42)) { "ok" } else { "failed" });
        let spawn = Command::new("/bin/true").status();
        put(
            "spawn",
            if matches!(spawn, Ok(status) if status.success()) { "ok".to_owned() } else { format!("{spawn:?}") },
        );
        let dev_null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .and_then(|mut file| file.write_all(b"x"));
        put("dev_null", if dev_null.is_ok() { "ok".to_owned() } else { format!("{dev_null:?}") });
        put(
            "keepcaps",
            caps::securebits::has_keepcaps().map_or_else(|error| error.to_string(), |kept| u8::from(kept).to_string()),
        );
    }
}
