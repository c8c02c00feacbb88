//! The one place where host errors become gRPC statuses for the kubelet.

use tonic::Status;

use crate::backend::handle::CallError;

/// The most characters of a client's input an error message repeats.
pub const ECHO_LIMIT: usize = 128;

/// The most device IDs one request may carry in any one list (a container's
/// `devicesIDs`, `available_deviceIDs`, `must_include_deviceIDs`) and the
/// most containers one request may carry. The kubelet sends at most the
/// devices a resource advertises; this leaves room for 10,000 devices
/// shared 13 ways.
pub const MAX_REQUEST_IDS: usize = 131_072;

/// `text` quoted for an error message, cut to [`ECHO_LIMIT`] characters (on
/// a character boundary) with its full length said, so a hostile 4 MB ID
/// never comes back whole in a status message.
pub fn echo(text: &str) -> String {
    echo_within(text, ECHO_LIMIT)
}

/// [`echo`], cut to `limit` characters.
pub fn echo_within(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes in all)", &text[..cut], text.len()),
    }
}

/// A request the host refuses before asking the backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A device ID the resource does not have.
    #[error("resource {resource:?} has no device {}", echo(id))]
    UnknownDevice {
        /// The resource.
        resource: String,
        /// The ID that was asked for.
        id: String,
    },
    /// A list in the request longer than [`MAX_REQUEST_IDS`].
    #[error("resource {resource:?}: {list} holds {count} entries; at most {MAX_REQUEST_IDS} are accepted")]
    TooLarge {
        /// The resource.
        resource: String,
        /// Which list, as the API names it.
        list: &'static str,
        /// How many it held.
        count: usize,
    },
    /// `allocation_size` below zero.
    #[error("resource {resource:?}: allocation_size must not be negative, got {size}")]
    NegativeSize {
        /// The resource.
        resource: String,
        /// The size asked for.
        size: i32,
    },
}

impl From<RequestError> for Status {
    fn from(error: RequestError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        let message = error.to_string();
        match error {
            CallError::Failed { .. } => Status::failed_precondition(message),
            CallError::TimedOut { .. } => Status::deadline_exceeded(message),
            CallError::Panicked { .. } | CallError::Invalid { .. } => Status::internal(message),
            CallError::Crashed { .. } | CallError::Unavailable { .. } => Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_input_on_a_character_boundary_and_says_how_long_it_was() {
        assert_eq!(echo("gpu-0"), "\"gpu-0\"");
        let exact = "x".repeat(ECHO_LIMIT);
        assert_eq!(echo(&exact), format!("{exact:?}"), "at the limit nothing is cut");
        let long = "é".repeat(4 * 1024 * 1024);
        let echoed = echo(&long);
        assert_eq!(echoed, format!("{:?}… ({} bytes in all)", "é".repeat(ECHO_LIMIT), long.len()));
        let message = RequestError::UnknownDevice { resource: "r".into(), id: long }.to_string();
        assert!(message.len() < 400, "{} bytes", message.len());
    }
}
