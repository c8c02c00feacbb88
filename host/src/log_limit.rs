//! Rate limits on the lines a module puts into devhost's log: the host
//! callback `log` (in-process, at the source in a worker, and again in
//! devhost for what a worker forwards, since a hostile module can write
//! frames itself) and a worker's stdout and stderr (`worker::output`).
//!
//! Each source gets a token bucket ([`LineLimiter`]): a burst, then a steady
//! rate; what is over it is counted (a Prometheus counter) and dropped, and
//! a summary is due at most once per [`Policy::summary_every`] while
//! dropping. [`cut`] bounds one line and makes it safe to put inside a log
//! record. This module logs nothing itself: the callers know the fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How many lines a source may log, and how long each may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Lines that may come at once (the bucket's size).
    pub burst: u32,
    /// Lines per second in the long run (the refill rate).
    pub per_second: u32,
    /// Bytes of one line that are kept; the rest is cut.
    pub max_line: usize,
    /// The shortest time between two summaries of dropped lines.
    pub summary_every: Duration,
}

/// The host callback `log`: 200 at once, 20 a second, 4 KiB a line.
pub const API_LOG: Policy =
    Policy { burst: 200, per_second: 20, max_line: 4096, summary_every: Duration::from_secs(10) };

/// A worker's stdout and stderr together: 200 at once, 20 a second, 1 KiB a
/// line.
pub const OUTPUT: Policy =
    Policy { burst: 200, per_second: 20, max_line: 1024, summary_every: Duration::from_secs(10) };

/// The message of the summary of dropped `log` lines; with the count as
/// field `dropped`.
pub const LOG_DROPPED: &str = "backend log dropped";

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Log the line (otherwise it is dropped, and counted).
    pub admit: bool,
    /// Log a summary first: this many lines were dropped since the last.
    pub summary: Option<u64>,
}

/// A token bucket for one source of lines, with its dropped-lines counter.
/// Cheap enough to ask once per line (one uncontended lock).
#[derive(Debug)]
pub struct LineLimiter {
    policy: Policy,
    dropped: Counter,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Dropped since the last summary.
    unreported: u64,
    last_summary: Option<Instant>,
    /// When a summary forwarded by a worker was last counted.
    last_forwarded: Option<Instant>,
}

impl LineLimiter {
    /// A full bucket; lines it drops are added to `dropped`.
    pub fn new(policy: Policy, dropped: Counter) -> Self {
        let bucket = Bucket {
            tokens: f64::from(policy.burst),
            refilled: Instant::now(),
            unreported: 0,
            last_summary: None,
            last_forwarded: None,
        };
        LineLimiter { policy, dropped, state: Mutex::new(bucket) }
    }

    /// The policy it enforces.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Takes a token for one line, now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Takes a token for one line at `now` (never earlier than a previous
    /// call's `now`; a clock that goes back refills nothing).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut bucket = self.bucket();
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * f64::from(self.policy.per_second)).min(f64::from(self.policy.burst));
        bucket.refilled = bucket.refilled.max(now);
        let admit = bucket.tokens >= 1.0;
        if admit {
            bucket.tokens -= 1.0;
        } else {
            bucket.unreported += 1;
            self.dropped.inc();
        }
        // Due while dropping, and once more after a flood ends (on the
        // next line that gets through), at most once per period.
        let due = bucket.unreported > 0
            && bucket.last_summary.is_none_or(|last| now.saturating_duration_since(last) >= self.policy.summary_every);
        let summary = due.then(|| {
            bucket.last_summary = Some(now);
            std::mem::take(&mut bucket.unreported)
        });
        Verdict { admit, summary }
    }

    /// The lines dropped and not yet reported in a summary, reported now
    /// (whatever the period): for a source that has ended.
    pub fn flush(&self) -> Option<u64> {
        let mut bucket = self.bucket();
        (bucket.unreported > 0).then(|| {
            bucket.last_summary = Some(Instant::now());
            std::mem::take(&mut bucket.unreported)
        })
    }

    /// Counts `count` lines a worker says it dropped at the source (its
    /// summary, forwarded). The worker's word, like all it sends: taken at
    /// most once per summary period and at most `u32::MAX` at a time, so a
    /// module that forges summaries can only make its own counter grow,
    /// and not wrap it. Returns whether it was counted.
    pub fn count_forwarded(&self, count: u64, now: Instant) -> bool {
        let mut bucket = self.bucket();
        let due =
            bucket.last_forwarded.is_none_or(|last| now.saturating_duration_since(last) >= self.policy.summary_every);
        if due {
            bucket.last_forwarded = Some(now);
            self.dropped.inc_by(count.min(u64::from(u32::MAX)));
        }
        due
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The limiter of the host callback `log` for `backend` (in-process: the
/// module's path, which is what the callback knows; in devhost for a worker:
/// the backend's name). One per name for the life of the process, so a
/// module that is re-initialised or restarted does not get a fresh burst.
pub fn api_log(backend: &str) -> Arc<LineLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<LineLimiter>>>> = OnceLock::new();
    let mut limiters = LIMITERS.get_or_init(Mutex::default).lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(limiter) = limiters.get(backend) {
        return limiter.clone();
    }
    let limiter = Arc::new(LineLimiter::new(API_LOG, crate::telemetry::global().backend_log_dropped(backend)));
    limiters.insert(backend.to_owned(), limiter.clone());
    limiter
}

/// The count of a [`LOG_DROPPED`] summary as a worker forwards it (its log
/// forwarder writes the message, then the fields as `key=value`):
/// `backend log dropped dropped=12`.
pub fn forwarded_dropped(text: &str) -> Option<u64> {
    text.strip_prefix(LOG_DROPPED)?.strip_prefix(" dropped=")?.parse().ok()
}

/// One line of a module's, fit to be a string inside a log record: at most
/// `max` of its bytes (`head` is its start, `total` its whole length), cut
/// at a character boundary and saying so (`… (cut, 5000 bytes)`); invalid
/// UTF-8 replaced; control characters (a newline, an escape sequence)
/// written as escapes, so that even the plain-text log format never shows
/// a line the module made up.
pub fn cut(head: &[u8], total: usize, max: usize) -> String {
    let mut head = &head[..head.len().min(max)];
    let was_cut = total > head.len();
    if was_cut {
        // A character split by the cut is left out, not replaced.
        if let Err(error) = std::str::from_utf8(head)
            && error.error_len().is_none()
        {
            head = &head[..error.valid_up_to()];
        }
    }
    let text = String::from_utf8_lossy(head);
    let mut line = String::with_capacity(text.len() + 32);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            line.extend(c.escape_debug());
        } else {
            line.push(c);
        }
    }
    if was_cut {
        line.push_str(&format!("… (cut, {total} bytes)"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> LineLimiter {
        LineLimiter::new(API_LOG, Counter::default())
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limiter = limiter();
        let start = Instant::now();
        let passed = (0..1000).filter(|_| limiter.check_at(start).admit).count();
        assert_eq!(passed, 200);
        assert_eq!(limiter.dropped.get(), 800);
        // One second later: 20 more, not another burst.
        let later = start + Duration::from_secs(1);
        let passed = (0..1000).filter(|_| limiter.check_at(later).admit).count();
        assert_eq!(passed, 20);
        assert_eq!(limiter.dropped.get(), 1780);
        // A long pause refills the burst, no more.
        let much_later = later + Duration::from_secs(3600);
        let passed = (0..1000).filter(|_| limiter.check_at(much_later).admit).count();
        assert_eq!(passed, 200);
    }

    #[test]
    fn summaries_come_at_most_once_per_period_and_cover_every_drop() {
        let limiter = limiter();
        let start = Instant::now();
        let mut summaries = Vec::new();
        // 100 lines every 100 ms for 30 s: 30,000 lines.
        for tick in 0..300_u32 {
            let now = start + Duration::from_millis(100) * tick;
            for _ in 0..100 {
                let verdict = limiter.check_at(now);
                if let Some(count) = verdict.summary {
                    summaries.push((now - start, count));
                }
            }
        }
        assert!(summaries.len() <= 4, "{summaries:?}");
        for pair in summaries.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_secs(10), "{summaries:?}");
        }
        let reported: u64 = summaries.iter().map(|s| s.1).sum::<u64>() + limiter.flush().unwrap_or(0);
        assert_eq!(reported, limiter.dropped.get());
        assert!(limiter.dropped.get() > 29_000, "{}", limiter.dropped.get());
        assert_eq!(limiter.flush(), None);
    }

    #[test]
    fn the_end_of_a_flood_is_reported_by_the_next_line_that_passes() {
        let limiter = limiter();
        let start = Instant::now();
        for _ in 0..201 {
            limiter.check_at(start);
        }
        // The first drop is reported at once.
        assert_eq!(limiter.check_at(start).summary, None);
        let quiet = limiter.check_at(start + Duration::from_secs(11));
        assert_eq!(quiet, Verdict { admit: true, summary: Some(1) });
    }

    #[test]
    fn forwarded_summaries_count_once_per_period_and_never_wrap() {
        let limiter = limiter();
        let start = Instant::now();
        assert!(limiter.count_forwarded(u64::MAX, start));
        assert!(!limiter.count_forwarded(u64::MAX, start + Duration::from_secs(1)));
        assert_eq!(limiter.dropped.get(), u64::from(u32::MAX));
        assert_eq!(forwarded_dropped("backend log dropped dropped=12"), Some(12));
        assert_eq!(forwarded_dropped("backend log dropped dropped=12 x"), None);
        assert_eq!(forwarded_dropped("hello"), None);
    }

    #[test]
    fn cut_bounds_escapes_and_says_so() {
        assert_eq!(cut(b"plain", 5, 1024), "plain");
        let long = vec![b'x'; 5000];
        let line = cut(&long, 5000, 1024);
        assert_eq!(line, format!("{}… (cut, 5000 bytes)", "x".repeat(1024)));
        // A newline or ESC never reaches the log raw.
        assert_eq!(cut(b"a\nb\x1b[2Jc\td", 10, 1024), "a\\nb\\u{1b}[2Jc\td");
        assert_eq!(cut(b"bad \xff byte", 10, 1024), "bad \u{fffd} byte");
        // "é" is two bytes; a cut between them drops it.
        assert_eq!(cut("aé".as_bytes(), 3, 2), "a… (cut, 3 bytes)");
    }
}
