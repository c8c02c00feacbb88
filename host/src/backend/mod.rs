//! The backend contract: the one trait every kind of backend (built-in,
//! native `.so`, WASM component) is adapted to, and the domain types it
//! speaks. Nothing above this module knows which kind a backend is, and
//! nothing here knows about gRPC.
//!
//! Calls are synchronous: the host runs them on a blocking thread with a
//! deadline (see [`handle`]), which suits FFI and wasmtime alike; only a
//! backend that [answers at once](Backend::answers_at_once) (the built-in
//! static one) is called inline. A backend
//! pushes device lists through the [`Publisher`] it is given at `init`, from
//! any thread, at any time until `shutdown`.

pub use crate::device_state::{PublishError, Publisher};

pub mod call_error;
pub mod handle;
pub mod static_backend;

pub use crate::model::{
    Allocation, AttributeValue, BackendError, Device, DeviceSpec, Health, Mount, PreferredRequest, ResourceSpec,
};

/// A source of devices for one or more resources.
///
/// Implementations must be thread-safe: the host may call `allocate` for
/// several resources at once. Every method may block; the host gives each
/// call a deadline and treats a miss as a fault.
pub trait Backend: Send + Sync + 'static {
    /// Starts the backend. It returns the resources it serves and publishes
    /// each resource's device list through `publisher` (during `init` or
    /// later, from any thread). A resource never published has no devices.
    fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError>;

    /// Answers an `Allocate` for one container. The host has already
    /// checked that every ID is a device of `resource`.
    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, BackendError>;

    /// [`allocate`](Self::allocate) for a DRA claim that shares devices
    /// (consumable capacity): `shares` holds, for each shared device of
    /// the call, its ID and what this claim consumes of it, in the order
    /// of `device_ids`. By default the shares are ignored: only the static
    /// backend reads them (modules get them with a later ABI/WIT version).
    fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, crate::model::Share)],
    ) -> Result<Allocation, BackendError> {
        let _ = shares;
        self.allocate(resource, device_ids)
    }

    /// Answers `GetPreferredAllocation` for one container, or `None` to let
    /// the host's default policy (fewest NUMA nodes) choose.
    fn preferred_allocation(
        &self,
        resource: &str,
        request: &PreferredRequest,
    ) -> Result<Option<Vec<String>>, BackendError> {
        let _ = (resource, request);
        Ok(None)
    }

    /// Prepares devices before a container starts (only for resources whose
    /// spec sets `pre_start_required`).
    fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        let _ = (resource, device_ids);
        Ok(())
    }

    /// Frees devices no container holds any more (ABI 1.1 `release`), for
    /// resources whose spec sets `release_required`.
    fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        let _ = (resource, device_ids);
        Ok(())
    }

    /// Whether the host should call [`poll`](Backend::poll) on the
    /// backend file's `poll_interval_ms` (a native module with ABI 1.1's
    /// `poll`). WASM components are polled by their own poller instead.
    fn polls(&self) -> bool {
        false
    }

    /// Re-checks the devices and publishes what changed (ABI 1.1 `poll`).
    fn poll(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Stops the backend: background threads end, nothing is published after.
    fn shutdown(&self) {}

    /// Whether `allocate`, `preferred_allocation` and `pre_start` are
    /// quick, bounded in-memory work that never blocks (devhost's own
    /// static backend). The host then runs them on the calling task, without
    /// the blocking-thread hop and the deadline timer that guard every
    /// other backend. Module backends (native, WASM) never say so.
    fn answers_at_once(&self) -> bool {
        false
    }
}
