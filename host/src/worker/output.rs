//! A worker's stdout and stderr: whatever the module (or a library it
//! loads) prints. It is data, not devhost's log: each line becomes the
//! `output` field of a devhost record (`backend output`), so with the JSON
//! log format a module's bytes are a string inside devhost's own record and
//! can never pass for one of devhost's lines. Lines are cut at 1 KiB and
//! rate-limited per worker (both streams together, [`log_limit::OUTPUT`]);
//! what is over the limit is read and dropped, counted in
//! `devhost_backend_output_dropped_total` and summarised at most once per
//! 10 s (`backend output dropped`).
//!
//! Each stream is read on its own thread, blocking, until end of file (the
//! worker and anything it forked have closed it). A thread rather than a
//! task on the runtime because the module decides how much there is to
//! read: a module writing for ever keeps its reader busy for ever, and that
//! belongs on a thread the kernel schedules fairly, not on the runtime
//! threads that answer every resource's gRPC calls. Blocking reads also need
//! no non-blocking conversion of the pipes. The reader never stops reading
//! while the worker lives, so a module never stalls on a full pipe, and it
//! keeps at most 1 KiB of a line, so devhost never buffers a flood.

use std::io::Read;
use std::process::{ChildStderr, ChildStdout};
use std::sync::Arc;

use crate::log_limit::{self, LineLimiter};

/// Bytes read at once.
const CHUNK: usize = 64 * 1024;

/// One worker's output, as both of its readers log it.
struct Output {
    backend: String,
    pid: u32,
    limiter: LineLimiter,
}

/// Starts reading a worker's stdout and stderr (each on a thread of its
/// own, which ends at end of file). A stream whose reader cannot start is
/// closed: the module's writes to it then fail (`EPIPE`; the worker ignores
/// `SIGPIPE`, as every Rust program does) rather than block.
pub(super) fn start(backend: &str, pid: u32, stdout: Option<ChildStdout>, stderr: Option<ChildStderr>) {
    let limiter = LineLimiter::new(log_limit::OUTPUT, crate::telemetry::global().backend_output_dropped(backend));
    let output = Arc::new(Output { backend: backend.to_owned(), pid, limiter });
    if let Some(stdout) = stdout {
        read_on_thread(output.clone(), "stdout", stdout);
    }
    if let Some(stderr) = stderr {
        read_on_thread(output, "stderr", stderr);
    }
}

fn read_on_thread(output: Arc<Output>, stream: &'static str, source: impl Read + Send + 'static) {
    let reader = output.clone();
    let started = std::thread::Builder::new()
        // Small: the reader keeps one chunk on the heap and formats one
        // log record at a time.
        .stack_size(256 * 1024)
        .name(format!("devhost-{stream}"))
        .spawn(move || reader.read(stream, source));
    if let Err(error) = started {
        tracing::warn!(backend = %output.backend, pid = output.pid, stream, %error,
            "cannot start a thread to read the worker's output; its output is discarded");
    }
}

impl Output {
    /// Reads `source` to its end, logging (or dropping) each line.
    fn read(&self, stream: &'static str, mut source: impl Read) {
        let mut chunk = vec![0; CHUNK];
        let max = self.limiter.policy().max_line;
        // The start of the line being read, and its whole length so far.
        let mut head: Vec<u8> = Vec::with_capacity(max);
        let mut total = 0;
        loop {
            let read = match source.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::debug!(backend = %self.backend, pid = self.pid, stream, %error,
                        "cannot read the worker's output; stopped reading it");
                    break;
                }
            };
            let mut rest = &chunk[..read];
            loop {
                let (part, end) = match rest.iter().position(|&b| b == b'\n') {
                    Some(at) => (&rest[..at], Some(at + 1)),
                    None => (rest, None),
                };
                let room = max.saturating_sub(head.len());
                head.extend_from_slice(&part[..part.len().min(room)]);
                total += part.len();
                let Some(end) = end else { break };
                self.line(stream, &head, total);
                head.clear();
                total = 0;
                rest = &rest[end..];
            }
        }
        if total > 0 {
            self.line(stream, &head, total);
        }
        if let Some(dropped) = self.limiter.flush() {
            self.dropped(dropped);
        }
    }

    /// One line of `stream`: `head` is its start (at most the line limit),
    /// `total` its length.
    fn line(&self, stream: &'static str, head: &[u8], total: usize) {
        let verdict = self.limiter.check();
        if let Some(dropped) = verdict.summary {
            self.dropped(dropped);
        }
        if verdict.admit {
            // `\r\n` endings: the `\r` is part of the line ending, not data.
            let (head, total) = match head.strip_suffix(b"\r") {
                Some(shorter) if total == head.len() => (shorter, total - 1),
                _ => (head, total),
            };
            let line = log_limit::cut(head, total, self.limiter.policy().max_line);
            tracing::info!(backend = %self.backend, pid = self.pid, stream, output = %line, "backend output");
        }
    }

    fn dropped(&self, dropped: u64) {
        tracing::warn!(backend = %self.backend, pid = self.pid, dropped,
            "backend output dropped (over the limit of {} lines a second)", log_limit::OUTPUT.per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn output(policy: log_limit::Policy) -> (Output, Counter) {
        let counter = Counter::default();
        let limiter = LineLimiter::new(policy, counter.clone());
        (Output { backend: "test".into(), pid: 1, limiter }, counter)
    }

    /// A source that hands out its bytes in reads of `step` bytes, so that
    /// lines straddle reads.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_flood_is_read_to_its_end_and_counted() {
        // No burst and no refill: every line is dropped, and every one
        // is counted, however the reads split them.
        let policy = log_limit::Policy { burst: 0, per_second: 0, ..log_limit::OUTPUT };
        let (output, counter) = output(policy);
        let mut bytes = Vec::new();
        for i in 0..10_000 {
            bytes.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        bytes.extend_from_slice(&vec![b'x'; 3 * CHUNK]);
        bytes.extend_from_slice(b"\nno newline at the end");
        output.read("stdout", Trickle { bytes, at: 0, step: 997 });
        assert_eq!(counter.get(), 10_002);
    }
}
