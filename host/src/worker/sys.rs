//! The few system calls behind worker processes, fenced here: handing the
//! socket to the child at a fixed descriptor, tying the child's life to
//! devhost's (`PR_SET_PDEATHSIG`), a session of its own, closing every
//! other descriptor, and its own PID namespace.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The descriptor a worker finds its socket at.
pub const WORKER_FD: RawFd = 3;
/// The descriptor through which the worker's namespace init tells devhost
/// how the worker ended (see [`split_off_namespace_init`]).
pub const STATUS_FD: RawFd = 4;

/// Arranges for `command`'s child to get `socket` as descriptor
/// [`WORKER_FD`] (and no other descriptor of devhost's beyond stdio), to
/// lead a session (and process group) of its own, so that `kill(0, …)` from
/// a module reaches only its own worker, to be killed when devhost dies,
/// and to exit at once if devhost died already.
///
/// `cgroup` are open `cgroup.procs` files: the child writes `0` to each,
/// joining its cgroup before it runs anything (a failed write fails the
/// spawn).
pub fn prepare_child(command: &mut Command, socket: &UnixStream, status: &OwnedFd, cgroup: &[std::fs::File]) {
    let fd = socket.as_raw_fd();
    let status = status.as_raw_fd();
    // At most the two of cgroup v1 (memory, pids); no allocation in the child.
    let mut joins = [-1 as RawFd; 2];
    for (slot, file) in joins.iter_mut().zip(cgroup) {
        *slot = file.as_raw_fd();
    }
    let devhost = devhost_pidfd();
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (write, dup2, fcntl, setsid,
    // prctl, poll, syscall, _exit); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            for join in joins.into_iter().filter(|&fd| fd >= 0) {
                if libc::write(join, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // dup2 clears FD_CLOEXEC on the new descriptor; if the socket
            // already is fd 3, clear it by hand.
            if fd == WORKER_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, WORKER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // (Both descriptors come from devhost's pipe and socketpair,
            // made after stdio, so neither is 3 or 4 by accident except the
            // socket, handled above.)
            if libc::dup2(status, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Every descriptor above these closes at exec, whatever
            // some in-process library forgot (Linux 5.11+; older kernels
            // rely on the worker closing strays at start).
            libc::syscall(libc::SYS_close_range, STATUS_FD + 1, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // devhost died between fork and prctl: nobody will kill us.
            // (Its pidfd turns readable when it has exited; `getppid` says
            // nothing here, being 0 from inside a PID namespace.)
            if let Some(devhost) = devhost {
                let mut poll = libc::pollfd { fd: devhost, events: libc::POLLIN, revents: 0 };
                if libc::poll(&mut poll, 1, 0) != 0 {
                    libc::_exit(1);
                }
            }
            Ok(())
        });
    }
}

/// A pidfd of devhost itself (readable once devhost has exited), opened
/// once; `None` where the kernel has no `pidfd_open` (before 5.3).
fn devhost_pidfd() -> Option<RawFd> {
    static PIDFD: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    PIDFD
        .get_or_init(|| {
            // SAFETY: pidfd_open takes a pid and flags and returns a new
            // descriptor (close-on-exec), or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
            // SAFETY: a descriptor the kernel just returned, owned by no one else.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        })
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// Makes the calling thread's next child the first process (PID 1) of a
/// new PID namespace. Only the spawner thread calls it, and calls
/// [`own_pid_namespace_for_children`] after each spawn. Needs
/// `CAP_SYS_ADMIN`.
pub fn new_pid_namespace_for_children() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(|errno| {
        format!("cannot give the worker a PID namespace of its own (unshare CLONE_NEWPID): {}", errno.desc())
    })
}

/// Puts the calling thread's children back in devhost's own PID namespace
/// (a thread may start only one process in a namespace it unshared, and
/// cannot unshare again until it is back).
pub fn own_pid_namespace_for_children() -> Result<(), String> {
    static OWN: std::sync::OnceLock<Result<std::fs::File, String>> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        std::fs::File::open("/proc/self/ns/pid").map_err(|error| format!("cannot open /proc/self/ns/pid: {error}"))
    });
    let own = own.as_ref().map_err(Clone::clone)?;
    nix::sched::setns(own, nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|errno| format!("cannot return to devhost's PID namespace (setns): {}", errno.desc()))
}

/// Opens devhost's own PID namespace now, before any unshare, so that
/// [`own_pid_namespace_for_children`] can always find it.
pub fn remember_own_pid_namespace() {
    // Nothing to give back: opening it is what is wanted.
    let _ = own_pid_namespace_for_children();
}

/// In a worker that is PID 1 of its own namespace: forks, and returns in
/// the child, which is the worker proper (PID 2), with ordinary signal
/// semantics. (The kernel ignores a signal sent to a namespace's PID 1
/// from inside it unless PID 1 handles it: as PID 1 a module's `abort()`
/// or `raise(SIGSEGV)` would not end it as the signal it is.) The parent
/// stays as the namespace's init: it reaps whatever the worker leaves
/// behind until the worker ends, writes the worker's wait status to
/// [`STATUS_FD`] for devhost, and exits, at which the kernel ends every
/// process left in the namespace. Elsewhere (no namespace) it does nothing.
pub fn split_off_namespace_init() {
    if std::process::id() != 1 {
        // SAFETY: closing a descriptor number this process does not use
        // (devhost hands one over only to namespace inits) is harmless.
        unsafe { libc::close(STATUS_FD) };
        return;
    }
    // SAFETY: called first thing in the worker, single-threaded: the
    // child is a full copy that carries on as the worker.
    let worker = unsafe { libc::fork() };
    if worker <= 0 {
        // The worker proper (or, if fork failed, PID 1 serving on its own).
        // SAFETY: as above; only the init writes the status.
        unsafe { libc::close(STATUS_FD) };
        return;
    }
    // SAFETY: the init holds nothing else: without the socket, the
    // worker's end of the channel closes the moment the worker dies.
    unsafe { libc::close(WORKER_FD) };
    // The init runs only this loop: it needs no privilege at all. (Were
    // that refused, it would still run only devhost's own code.)
    let _ = super::lockdown::apply(&super::lockdown::Lockdown::default());
    let status = loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our integer.
        let ended = unsafe { libc::waitpid(-1, &mut status, 0) };
        if ended == worker {
            break Some(status);
        }
        if ended < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break None;
        }
    };
    if let Some(status) = status {
        let text = status.to_string();
        // SAFETY: writes our buffer to the status descriptor; a failed
        // write leaves devhost with the init's own status.
        unsafe { libc::write(STATUS_FD, text.as_ptr().cast(), text.len()) };
    }
    // SAFETY: ends the init (and with it the namespace) at once.
    unsafe { libc::_exit(0) }
}

/// A pipe for [`STATUS_FD`]: devhost's read end and the worker's write
/// end, both close-on-exec (the write end is moved to [`STATUS_FD`] in the
/// child).
pub fn status_pipe() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    Ok((std::fs::File::from(read), write))
}

/// In the worker: the socket devhost handed over at [`WORKER_FD`], after
/// closing any other descriptor above stdio that slipped through.
pub fn take_socket() -> std::io::Result<UnixStream> {
    close_strays();
    // SAFETY: fstat writes into the zeroed struct; any fd number is safe.
    let is_socket = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(WORKER_FD, &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        return Err(std::io::Error::other(format!(
            "descriptor {WORKER_FD} is not a socket: this command is run by devhost itself, not by hand"
        )));
    }
    // SAFETY: fd 3 is an open socket (checked above) that nothing else in
    // this process owns; from here on the stream owns it.
    let stream = unsafe { UnixStream::from_raw_fd(WORKER_FD) };
    set_cloexec(WORKER_FD)?;
    Ok(stream)
}

fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an open descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) >= 0
    };
    if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Closes every descriptor above [`WORKER_FD`].
fn close_strays() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<RawFd> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse().ok()))
        .filter(|&fd| fd > WORKER_FD)
        .collect();
    // The directory's own descriptor was in the list and is closed now.
    for fd in fds {
        // SAFETY: at worker start nothing in this process owns descriptors
        // above 3 (the runtime has not started): closing them is ours to do.
        // One that is already closed (the directory's) fails harmlessly.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) >= 0 {
                drop(OwnedFd::from_raw_fd(fd));
            }
        }
    }
}

/// Gives SIGSEGV and SIGBUS back to the kernel's default action. Rust's
/// runtime installs handlers that turn a stack overflow on its threads into
/// `abort()` (SIGABRT); a module's stack overflow must show as the SIGSEGV
/// it is, not as a module calling `abort()`.
pub fn default_fault_signals() {
    for signal in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: setting a standard signal to SIG_DFL has no preconditions;
        // nothing in this process relies on these handlers.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
}
