//! Giving freed heap back to the system, fenced here: the one libc call
//! behind it.
//!
//! glibc's allocator keeps freed memory in its arenas. After devhost parses
//! a large `backends.d` file (10,000 devices: tens of MiB of TOML values,
//! all freed once the config is built), that memory would stay in the
//! process's RSS for its whole life without this.

/// Returns the free pages of every malloc arena to the system. A no-op
/// where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and may be called from any
    // thread at any time; it only releases memory the allocator owns and
    // no one uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
