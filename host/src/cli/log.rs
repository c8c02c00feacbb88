//! devhost's log: a subscriber writing through a bounded, lossy queue to a
//! writer thread on stderr, and the guard that lets that thread finish at
//! exit without ever holding the exit up (a stderr pipe nobody reads must
//! not keep a stopped devhost alive; issue 24, item 9).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::LogFormat;

/// Log lines buffered for the writer thread before new ones are dropped.
const LOG_LINES_IN_FLIGHT: usize = 8_192;

/// The kube-rs request log, off unless the filter names `kube_client`.
const KUBE_REQUEST_LOG: &str = "kube_client::client::builder=off";
/// kube-rs logs a whole answer body it cannot parse at WARN (lines of
/// hundreds of MB from a hostile API server); devhost reports the error
/// itself, without the body.
const KUBE_BODY_LOG: &str = "kube_client::client=error";

/// Logs to stderr; `RUST_LOG` overrides the configured level.
///
/// Logging must never stop the daemon: lines go through a bounded queue to
/// a writer thread, and are dropped (not waited for) when stderr is slow
/// or blocked (a full pipe); a closed stderr (`EPIPE`) is ignored rather
/// than reported on stderr, which would panic. Colours only on a terminal
/// (and never with `NO_COLOR`).
pub(super) fn init_logging(format: LogFormat, level: &str) -> Option<LogGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // kube-rs logs every failed API request at ERROR, 404s included;
    // devhost logs each failure itself with what it was doing, once.
    let named = std::env::var("RUST_LOG").unwrap_or_default().contains("kube_client") || level.contains("kube_client");
    let filter = [KUBE_REQUEST_LOG, KUBE_BODY_LOG].iter().fold(filter, |filter, directive| match directive.parse() {
        Ok(directive) if !named => filter.add_directive(directive),
        _ => filter,
    });
    let progress = Arc::new(LogProgress::default());
    let (queue, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // 8,192 lines in flight (not the default 128,000, which reserves
        // 4 MiB up front): far more than a healthy daemon logs between two
        // writes, and a log that cannot keep up drops lines either way.
        .buffered_lines_limit(LOG_LINES_IN_FLIGHT)
        .lossy(true)
        .thread_name("devhost-log")
        .finish(LogOutput { progress: progress.clone() });
    let dropped = queue.error_counter();
    let writer = LogQueue { queue, progress: progress.clone() };
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour)
        .log_internal_errors(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    match result {
        Ok(()) => Some(LogGuard { guard: Some(guard), progress, dropped }),
        Err(_) => None,
    }
}

/// How long one write to stderr may block before exit counts the log
/// writer as stuck (a pipe nobody reads): a healthy reader takes
/// microseconds.
const LOG_STALL: Duration = Duration::from_millis(200);
/// The longest exit waits for a writer that is still writing.
const LOG_FLUSH_BUDGET: Duration = Duration::from_secs(1);

/// The log writer thread as exit sees it: lines handed to its queue, lines
/// it has finished with, and the write it is inside.
struct LogProgress {
    epoch: Instant,
    /// Lines handed to the queue, dropped ones included.
    queued: AtomicU64,
    /// Lines the writer has finished with, written or failed.
    finished: AtomicU64,
    /// When the write in progress began (microseconds since `epoch`, plus
    /// one); 0 between writes.
    writing_since: AtomicU64,
}

impl Default for LogProgress {
    fn default() -> Self {
        LogProgress {
            epoch: Instant::now(),
            queued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            writing_since: AtomicU64::new(0),
        }
    }
}

impl LogProgress {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
    }

    /// How long the write in progress has been blocked, if one is.
    fn stuck_for(&self) -> Option<Duration> {
        match self.writing_since.load(Ordering::SeqCst) {
            0 => None,
            since => Some(Duration::from_micros(self.now().saturating_sub(since))),
        }
    }
}

/// What the subscriber writes to: the lossy queue, counting each line (one
/// event is one `write`; the queue takes it or counts it dropped).
#[derive(Clone)]
struct LogQueue {
    queue: tracing_appender::non_blocking::NonBlocking,
    progress: Arc<LogProgress>,
}

impl std::io::Write for LogQueue {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.progress.queued.fetch_add(1, Ordering::SeqCst);
        self.queue.write(line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.queue.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Stderr as the writer thread uses it: one whole line per `write`,
/// saying when it is inside one and when it is done.
struct LogOutput {
    progress: Arc<LogProgress>,
}

impl std::io::Write for LogOutput {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.progress.writing_since.store(self.progress.now(), Ordering::SeqCst);
        let written = std::io::stderr().write_all(line);
        self.progress.writing_since.store(0, Ordering::SeqCst);
        self.progress.finished.fetch_add(1, Ordering::SeqCst);
        written.map(|()| line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Holds the log writer thread. Dropped at exit, it waits (up to
/// [`LOG_FLUSH_BUDGET`]) until the writer has finished every queued line,
/// then stops it; but it does not wait for a writer stuck in one write for
/// [`LOG_STALL`] (stderr a pipe nobody reads): those lines cannot be
/// written. tracing-appender's own guard is dropped only once the writer
/// has nothing left: on a stuck writer it waits a fixed second, and when
/// the queue is full it says so with a `println!`, which blocks for ever
/// on a stdout that is the same stalled pipe (issue 24, item 9).
pub(super) struct LogGuard {
    guard: Option<tracing_appender::non_blocking::WorkerGuard>,
    progress: Arc<LogProgress>,
    dropped: tracing_appender::non_blocking::ErrorCounter,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let started = Instant::now();
        loop {
            let dropped = u64::try_from(self.dropped.dropped_lines()).unwrap_or(u64::MAX);
            let finished = self.progress.finished.load(Ordering::SeqCst).saturating_add(dropped);
            if finished >= self.progress.queued.load(Ordering::SeqCst) {
                // Nothing left: the writer takes the stop at once.
                drop(self.guard.take());
                return;
            }
            let stuck = self.progress.stuck_for().is_some_and(|blocked| blocked >= LOG_STALL);
            if stuck || started.elapsed() >= LOG_FLUSH_BUDGET {
                // Leave the writer where it is; exit ends it.
                std::mem::forget(self.guard.take());
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
