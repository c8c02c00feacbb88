//! Accept loops that survive running out of descriptors. `accept` fails at
//! once, again and again, while the process is at its descriptor limit
//! (`EMFILE`) or the system is (`ENFILE`), and the pending connection stays
//! queued: a loop that retries at once spins at 100 % CPU and starves
//! everything else. These loops wait instead, doubling the pause up to a
//! second, say so once per episode (with the descriptor count), count it,
//! and say when they accept again.

use std::io;
use std::time::Duration;

use futures_util::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{UnixListener, UnixStream};

use super::authority::Rewritten;

/// First pause after an accept error.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between tries.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Whether `error` means the process or the system ran out of a resource
/// (descriptors, socket buffers, memory), as opposed to one bad connection.
fn out_of_resources(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// The back-off state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// Counts the refused tries (the caller's metric).
    refused_total: Counter,
    /// Which listener, for the log (a socket's name, an address).
    listener: String,
    pause: Duration,
    /// Refused tries in the current episode.
    refused: u64,
}

impl AcceptBackoff {
    /// Back-off for the listener called `listener`, counting each refused
    /// try in `refused_total`.
    pub fn new(listener: impl Into<String>, refused_total: Counter) -> Self {
        AcceptBackoff { refused_total, listener: listener.into(), pause: FIRST_PAUSE, refused: 0 }
    }

    /// A connection was accepted: an episode of errors, if any, is over.
    pub fn accepted(&mut self) {
        if self.refused > 0 {
            tracing::info!(listener = %self.listener, refused = self.refused, "accepting connections again");
        }
        self.pause = FIRST_PAUSE;
        self.refused = 0;
    }

    /// Handles an accept error: out of resources, wait (longer each time);
    /// anything else concerns one connection, so go on at once.
    pub async fn failed(&mut self, error: &io::Error) {
        if !out_of_resources(error) {
            tracing::debug!(listener = %self.listener, %error, "a connection could not be accepted");
            return;
        }
        self.refused_total.inc();
        if self.refused == 0 {
            let (open, limit) = descriptor_use();
            tracing::warn!(
                listener = %self.listener,
                %error,
                open_descriptors = open,
                descriptor_limit = limit,
                "cannot accept connections: out of descriptors; retrying with back-off up to {MAX_PAUSE:?}"
            );
        }
        self.refused += 1;
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

/// The connections of a gRPC server's Unix socket, with [`AcceptBackoff`],
/// each one's `:authority` made acceptable to the server
/// ([`Rewritten::server`]). Every gRPC socket devhost serves takes its
/// connections from here.
pub fn unix_incoming(
    listener: UnixListener,
    name: String,
    refused_total: Counter,
) -> impl Stream<Item = io::Result<Rewritten<UnixStream>>> {
    futures_util::stream::unfold(
        (listener, AcceptBackoff::new(name, refused_total)),
        |(listener, mut backoff)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        backoff.accepted();
                        return Some((Ok(Rewritten::server(stream)), (listener, backoff)));
                    }
                    Err(error) => backoff.failed(&error).await,
                }
            }
        },
    )
}

/// Descriptors this process has open, and its soft limit (`None` where
/// unknown).
pub fn descriptor_use() -> (Option<u64>, Option<u64>) {
    let open = std::fs::read_dir("/proc/self/fd").ok().map(|entries| entries.count() as u64);
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft);
    (open, limit)
}

/// Raises the soft descriptor limit to the hard one (what a busy node needs
/// and what the operator allowed), logging the change. Returns the limit in
/// force.
pub fn raise_descriptor_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the soft descriptor limit to the hard limit");
            Some(hard)
        }
        Err(error) => {
            tracing::warn!(soft, hard, %error, "cannot raise the soft descriptor limit");
            Some(soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_exhaustion_backs_off() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(out_of_resources(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM] {
            assert!(!out_of_resources(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_doubles_up_to_a_second_and_resets_on_success() {
        let refused = Counter::default();
        let mut backoff = AcceptBackoff::new("test", refused.clone());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut pauses = Vec::new();
        for _ in 0..9 {
            let started = tokio::time::Instant::now();
            backoff.failed(&emfile).await;
            pauses.push(started.elapsed().as_millis());
        }
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.accepted();
        let started = tokio::time::Instant::now();
        backoff.failed(&emfile).await;
        assert_eq!(started.elapsed().as_millis(), 10);
        let started = tokio::time::Instant::now();
        backoff.failed(&io::Error::from_raw_os_error(libc::ECONNABORTED)).await;
        assert_eq!(started.elapsed().as_millis(), 0, "one bad connection does not pause");
        assert_eq!(refused.get(), 10, "each try refused for lack of descriptors is counted, the bad connection not");
    }
}
