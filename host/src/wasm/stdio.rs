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

/// A WASI output stream that logs each line.
#[derive(Clone)]
pub(crate) struct LogStream {
    backend: Arc<str>,
    stream: &'static str,
}

impl LogStream {
    pub(crate) fn new(backend: Arc<str>, stream: &'static str) -> Self {
        LogStream { backend, stream }
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
        tracing::info!(backend = %self.to.backend, stream = self.to.stream, "{}", text.trim_end());
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
