//! How a call into a backend failed: one error type for every kind of
//! backend (in-process, worker process, WASM), shared by the handle that
//! runs calls and the worker that carries them, so neither depends on the
//! other for it.

use std::time::Duration;

use thiserror::Error;

/// How a call into a backend failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CallError {
    /// The backend answered with an error.
    #[error("backend {backend:?}: {operation} failed: {message}")]
    Failed {
        /// Backend name.
        backend: String,
        /// The call, e.g. `allocate`.
        operation: &'static str,
        /// The backend's message.
        message: String,
    },
    /// The backend panicked (or trapped).
    #[error("backend {backend:?}: {operation} panicked: {message}")]
    Panicked {
        /// Backend name.
        backend: String,
        /// The call.
        operation: &'static str,
        /// The panic message.
        message: String,
    },
    /// The backend did not answer within its deadline.
    #[error("backend {backend:?}: {operation} did not return within its {timeout:?} deadline")]
    TimedOut {
        /// Backend name.
        backend: String,
        /// The call.
        operation: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The backend answered with data that breaks the contract.
    #[error("backend {backend:?}: {operation} returned invalid data: {message}")]
    Invalid {
        /// Backend name.
        backend: String,
        /// The call.
        operation: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The backend's worker process died (a signal or an exit), during a
    /// call or while idle (`operation` is then `idle`).
    #[error("backend {backend:?}: worker {cause} {}", during(operation))]
    Crashed {
        /// Backend name.
        backend: String,
        /// The call in flight, or `idle`.
        operation: &'static str,
        /// How it died, e.g. `killed by SIGSEGV`.
        cause: String,
    },
    /// The backend is not running right now (its worker is being
    /// restarted after a fault); the call was not attempted.
    #[error("backend {backend:?}: {operation} refused: {reason}")]
    Unavailable {
        /// Backend name.
        backend: String,
        /// The call.
        operation: &'static str,
        /// Why.
        reason: String,
    },
}

fn during(operation: &str) -> String {
    if operation == "idle" { "while idle".to_owned() } else { format!("during {operation}") }
}

impl CallError {
    /// Every label [`CallError::kind`] gives.
    pub const KINDS: [&'static str; 6] = ["failed", "panicked", "timed_out", "invalid", "crashed", "unavailable"];

    /// The call that failed, e.g. `allocate` (`idle` for a crash between
    /// calls).
    pub fn operation(&self) -> &'static str {
        match self {
            CallError::Failed { operation, .. }
            | CallError::Panicked { operation, .. }
            | CallError::TimedOut { operation, .. }
            | CallError::Invalid { operation, .. }
            | CallError::Crashed { operation, .. }
            | CallError::Unavailable { operation, .. } => operation,
        }
    }

    /// A short label for metrics: `failed`, `panicked`, `timed_out`,
    /// `invalid`, `crashed`, `unavailable`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Failed { .. } => "failed",
            CallError::Panicked { .. } => "panicked",
            CallError::TimedOut { .. } => "timed_out",
            CallError::Invalid { .. } => "invalid",
            CallError::Crashed { .. } => "crashed",
            CallError::Unavailable { .. } => "unavailable",
        }
    }

    /// Whether this error means the backend itself is broken (as opposed to
    /// declining one request, or being busy).
    pub fn is_fault(&self) -> bool {
        !matches!(self, CallError::Failed { .. } | CallError::Unavailable { .. })
    }
}
