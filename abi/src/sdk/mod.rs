//! The Rust SDK: a vendor implements [`Backend`] in plain Rust types and
//! calls [`export_backend!`](crate::export_backend) once; the macro's shims
//! (in the private `shim` module, the only `unsafe` code of the SDK) speak
//! the C ABI, copy every string, and turn a panic into `DEVHOST_FAULT` with
//! its message instead of an abort.
//!
//! Nothing in this module mentions an FFI type, so the same `impl Backend`
//! is exported through either transport: built for `wasm32` the macro
//! exports a WASM component of the world `devhost:backend/backend@1.2.0`
//! instead (see the `wasm` module and `abi/README.md`, "WASM backends").

use std::fmt;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
#[allow(unsafe_code)]
pub mod shim;

#[cfg(not(target_arch = "wasm32"))]
pub use shim::Host;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

#[cfg(target_arch = "wasm32")]
pub use wasm::Host;

pub mod testing;

/// What a backend's own code needs from devhost: publishing device lists
/// and writing log lines. [`Host`] implements it; write background threads
/// and helpers against this trait and they can be unit-tested with
/// [`testing::Recorder`], without devhost.
pub trait HostApi: Send + Sync {
    /// Replaces the whole device list of `resource`.
    fn publish(&self, resource: &str, devices: &[Device]) -> Result<(), PublishError>;
    /// Writes one line to devhost's log, tagged with the backend.
    fn log(&self, level: LogLevel, message: &str);
}

impl HostApi for Host {
    fn publish(&self, resource: &str, devices: &[Device]) -> Result<(), PublishError> {
        Host::publish(self, resource, devices)
    }

    fn log(&self, level: LogLevel, message: &str) {
        Host::log(self, level, message);
    }
}

pub use crate::model::{
    Allocation, AttributeValue, CounterConsumption, CounterSet, Device, DeviceSpec, DeviceStatus, Health, Mount,
    PreferredRequest, RequestPolicy, Resource, Share, SharedDevice, ValidRequests,
};

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something is wrong but the backend carries on.
    Warn,
    /// Normal operation worth recording.
    Info,
    /// Detail for debugging.
    Debug,
}

/// An error a backend reports from a call; the host passes its message on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error { message: message.into() }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error { message }
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

/// Why the host refused a published device list; the host's log has the
/// precise reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// The list broke the contract (empty, duplicate or non-UTF-8 ID, ...).
    Invalid,
    /// The backend instance was shut down.
    Closed,
    /// Any other host status code.
    Other(i32),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Invalid => f.write_str("the host refused the device list as invalid (its log says why)"),
            PublishError::Closed => f.write_str("the host no longer accepts device lists: the backend was shut down"),
            PublishError::Other(code) => write!(f, "the host refused the device list with status {code}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Parses the backend's `[config]` table (JSON) into `T`; an absent table
/// reads as `{}`.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &str) -> Result<T, Error> {
    let config = if config.trim().is_empty() { "{}" } else { config };
    serde_json::from_str(config).map_err(|error| Error::new(format!("invalid [config] table: {error}")))
}

/// A native devhost backend, written in plain Rust.
///
/// The host may call `allocate`, `preferred_allocation` and `pre_start`
/// concurrently from several threads; `init` and `shutdown` are never
/// concurrent with any other call on the same instance.
pub trait Backend: Sized + Send + Sync + 'static {
    /// Starts an instance from the `[config]` table (JSON; see
    /// [`parse_config`]). Returns the instance and the resources it serves.
    /// Device lists go through `host`, now or later from any thread, until
    /// [`Backend::shutdown`] returns.
    fn init(config: &str, host: Host) -> Result<(Self, Vec<Resource>), Error>;

    /// Answers an `Allocate` for one container. Every ID is a device of
    /// `resource`.
    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, Error>;

    /// [`allocate`](Self::allocate) for a DRA claim that shares devices
    /// (ABI 1.2, consumable capacity: devices published
    /// [`shared`](crate::model::Device::shared)): `shares` holds, for each
    /// shared device of the call, its ID and what this claim consumes of
    /// it, in the order of `device_ids`. By default the shares are ignored
    /// and [`allocate`](Self::allocate) answers.
    fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, crate::model::Share)],
    ) -> Result<Allocation, Error> {
        let _ = shares;
        self.allocate(resource, device_ids)
    }

    /// Answers `GetPreferredAllocation`, or `None` for the host's default.
    fn preferred_allocation(&self, resource: &str, request: &PreferredRequest) -> Result<Option<Vec<String>>, Error> {
        let _ = (resource, request);
        Ok(None)
    }

    /// Prepares devices before a container starts.
    fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), Error> {
        let _ = (resource, device_ids);
        Ok(())
    }

    /// Frees devices for the next tenant (ABI 1.1): scrub memory, reset a
    /// function. Called only for resources declared
    /// [`with_release`](Resource::with_release), once no container holds
    /// these devices any more; until it returns `Ok`, they are advertised
    /// Unhealthy, so the kubelet cannot hand out a half-scrubbed device.
    fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), Error> {
        let _ = (resource, device_ids);
        Ok(())
    }

    /// Re-checks the devices and publishes what changed. devhost calls it
    /// on an interval, on both packagings alike (ABI 1.1): natively every
    /// `poll_interval_ms` of the backend file's `[backend]` table (default
    /// 1000), in a component right before each device-list poll. Write
    /// health monitoring here once instead of on a thread of your own
    /// (a component cannot start threads). Never concurrent with itself.
    fn poll(&self) {}

    /// Stops the instance: background threads end, nothing is published
    /// after this returns.
    fn shutdown(self) {}
}

/// Exports a [`Backend`] implementation as the shared library's
/// `devhost_backend_entry` symbol. Use it once, in a `cdylib` crate.
///
/// Built for `wasm32` (`wasm32-wasip2`), the same line exports the
/// implementation as a WASM component instead.
///
/// ```ignore
/// devhost_abi::export_backend!(MyBackend);
/// ```
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        /// The devhost native backend entry point (ABI v1).
        ///
        /// # Safety
        ///
        /// Called by the devhost host with its callback table, per the ABI.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn devhost_backend_entry(
            host: *const $crate::ffi::DevhostHostApi,
        ) -> *const $crate::ffi::DevhostBackendApi {
            static TABLE: $crate::ffi::DevhostBackendApi = $crate::sdk::shim::table::<$backend>();
            // SAFETY: the host passes its callback table (or NULL), as the
            // ABI says; `entry` checks it before reading past its header.
            unsafe { $crate::sdk::shim::entry(host, &TABLE) }
        }
    };
}

/// Exports a [`Backend`] implementation as a WASM component of the world
/// `devhost:backend/backend@1.2.0`. Use it once, in a `cdylib` crate built
/// for `wasm32-wasip2`.
///
/// ```ignore
/// devhost_abi::export_backend!(MyBackend);
/// ```
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        static __DEVHOST_BACKEND: $crate::sdk::wasm::Instance<$backend> = $crate::sdk::wasm::Instance::new();

        #[doc(hidden)]
        pub struct __DevhostComponent;

        impl $crate::sdk::wasm::bindings::exports::devhost::backend::api::Guest for __DevhostComponent {
            fn init(
                config_json: ::std::string::String,
            ) -> ::std::result::Result<
                ::std::vec::Vec<$crate::sdk::wasm::bindings::devhost::backend::types::Resource>,
                ::std::string::String,
            > {
                __DEVHOST_BACKEND.init(&config_json)
            }

            fn list_devices() -> ::std::vec::Vec<$crate::sdk::wasm::bindings::devhost::backend::types::DeviceList> {
                __DEVHOST_BACKEND.list_devices()
            }

            fn allocate(
                resource: ::std::string::String,
                device_ids: ::std::vec::Vec<::std::string::String>,
            ) -> ::std::result::Result<
                $crate::sdk::wasm::bindings::devhost::backend::types::Allocation,
                ::std::string::String,
            > {
                __DEVHOST_BACKEND.allocate(&resource, &device_ids)
            }

            fn preferred_allocation(
                resource: ::std::string::String,
                request: $crate::sdk::wasm::bindings::devhost::backend::types::PreferredRequest,
            ) -> ::std::result::Result<
                ::std::option::Option<::std::vec::Vec<::std::string::String>>,
                ::std::string::String,
            > {
                __DEVHOST_BACKEND.preferred_allocation(&resource, request)
            }

            fn pre_start(
                resource: ::std::string::String,
                device_ids: ::std::vec::Vec<::std::string::String>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __DEVHOST_BACKEND.pre_start(&resource, &device_ids)
            }

            fn shutdown() {
                __DEVHOST_BACKEND.shutdown()
            }

            fn release(
                resource: ::std::string::String,
                device_ids: ::std::vec::Vec<::std::string::String>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                __DEVHOST_BACKEND.release(&resource, &device_ids)
            }

            fn allocate_shared(
                resource: ::std::string::String,
                device_ids: ::std::vec::Vec<::std::string::String>,
                shares: ::std::vec::Vec<$crate::sdk::wasm::bindings::devhost::backend::types::Share>,
            ) -> ::std::result::Result<
                $crate::sdk::wasm::bindings::devhost::backend::types::Allocation,
                ::std::string::String,
            > {
                __DEVHOST_BACKEND.allocate_shared(&resource, &device_ids, shares)
            }
        }

        $crate::sdk::wasm::bindings::__devhost_export_component!(__DevhostComponent with_types_in $crate::sdk::wasm::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Config {
        devices: usize,
    }

    #[test]
    fn config_parses_and_errors_say_which_table() {
        assert_eq!(parse_config::<Config>(r#"{"devices": 3}"#), Ok(Config { devices: 3 }));
        let error = parse_config::<Config>("").expect_err("devices is required");
        assert_eq!(error.message(), "invalid [config] table: missing field `devices` at line 1 column 2");
    }
}
