//! A component's stdout and stderr: never the daemon's own, but lines in
//! its log, tagged with the backend and the stream. A line longer than
//! [`MAX_LINE`] is cut into pieces so that a chatty guest cannot grow the
//! buffer without bound.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged as one.
const MAX_LINE: usize = 4096;

/// Lines of stderr kept for the next fault's message.
const RECENT_LINES: usize = 4;

/// A WASI output stream that logs each line.
#[derive(Clone)]
pub(crate) struct LogStream {
    backend: Arc<str>,
    stream: &'static str,
    /// For stderr: the last lines written, so that a trap's message can
    /// carry what the component said before it (a Rust panic's message).
    recent: Option<Recent>,
}

/// The last [`RECENT_LINES`] lines a component wrote to stderr.
#[derive(Clone, Default)]
pub(crate) struct Recent(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<String>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets what was written so far (at the start of a call).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// What was written since the last [`Recent::clear`], lines joined
    /// with ` | `, or `None`.
    pub(crate) fn text(&self) -> Option<String> {
        let lines = self.lock();
        (!lines.is_empty()).then(|| lines.iter().map(String::as_str).collect::<Vec<_>>().join(" | "))
    }

    fn push(&self, line: &str) {
        // Rust's hint after a panic message says nothing about the fault.
        if line.starts_with("note: run with `RUST_BACKTRACE") {
            return;
        }
        let mut lines = self.lock();
        if lines.len() == RECENT_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }
}

impl LogStream {
    /// A stream whose lines are only logged (stdout).
    pub(crate) fn new(backend: Arc<str>, stream: &'static str) -> Self {
        LogStream { backend, stream, recent: None }
    }

    /// A stream whose lines are logged and the last few kept in `recent`
    /// (stderr).
    pub(crate) fn keeping(backend: Arc<str>, stream: &'static str, recent: Recent) -> Self {
        LogStream { backend, stream, recent: Some(recent) }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter { to: self.clone(), line: Vec::new() })
    }
}

struct LineWriter {
    to: LogStream,
    line: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        tracing::info!(backend = %self.to.backend, stream = self.to.stream, "{text}");
        if let Some(recent) = &self.to.recent {
            recent.push(text);
        }
        self.line.clear();
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        for &byte in bytes {
            if byte == b'\n' {
                self.emit();
            } else {
                self.line.push(byte);
                if self.line.len() >= MAX_LINE {
                    self.emit();
                }
            }
        }
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.emit();
        Poll::Ready(Ok(()))
    }
}
