//! The one place where host errors become gRPC statuses for the kubelet.

use tonic::Status;

use crate::backend::handle::CallError;

/// A request the host refuses before asking the backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A device ID the resource does not have.
    #[error("resource {resource:?} has no device {id:?}")]
    UnknownDevice {
        /// The resource.
        resource: String,
        /// The ID that was asked for.
        id: String,
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
