//! The few system calls behind worker processes, fenced here: handing the
//! socket to the child at a fixed descriptor, tying the child's life to
//! devhost's (`PR_SET_PDEATHSIG`), closing every other descriptor, and the
//! address-space limit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The descriptor a worker finds its socket at.
pub const WORKER_FD: RawFd = 3;

/// Arranges for `command`'s child to get `socket` as descriptor
/// [`WORKER_FD`] (and no other descriptor of devhost's beyond stdio), to be
/// killed when devhost dies, and to exit at once if devhost died already.
pub fn prepare_child(command: &mut Command, socket: &UnixStream) {
    let fd = socket.as_raw_fd();
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (dup2, fcntl, prctl, getppid,
    // syscall, _exit); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
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
            // Every descriptor above the socket closes at exec, whatever
            // some in-process library forgot (Linux 5.11+; older kernels
            // rely on the worker closing strays at start).
            libc::syscall(libc::SYS_close_range, WORKER_FD + 1, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // devhost died between fork and prctl: nobody will kill us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
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

/// Limits this process's address space to `megabytes` MiB.
pub fn limit_address_space(megabytes: u64) -> std::io::Result<()> {
    let bytes = megabytes.saturating_mul(1024 * 1024);
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
