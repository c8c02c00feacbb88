//! [`NativeBackend`]: a loaded, negotiated native module adapted to the
//! host's [`Backend`] trait. Each `init` creates a fresh backend instance
//! with its own [`HostContext`]; `shutdown` closes that context at once (so
//! nothing the old instance publishes lands) and calls the backend's
//! `shutdown` when the last call still using the instance returns, so a hung
//! call never races the backend freeing its instance.
//!
//! A backend call's status becomes the trait's answer: `DEVHOST_ERROR` a
//! [`BackendError`] with the backend's message, `DEVHOST_FAULT` a panic in
//! this adapter (re-raised with `resume_unwind`, so no panic hook runs),
//! which the [`handle`](crate::backend::handle) catches and treats as a
//! fault; invalid data or an unknown status a fault [`BackendError`]
//! (`BackendError::fault`) naming what was wrong. Deadlines
//! and fault handling are the handle's job, not this module's.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use devhost_abi::ffi::*;

use super::callbacks::{CallSink, Collected, HOST_API, HostContext, Phase};
use crate::backend::{Allocation, Backend, BackendError, PreferredRequest, Publisher, ResourceSpec};
use devhost_abi::model::Share;

/// `DevhostInitFn` without its NULL.
type InitFn = unsafe extern "C" fn(*const DevhostInitArgs, *mut DevhostCall, *mut *mut c_void) -> i32;
/// `DevhostDevicesCallFn` without its NULL.
type DevicesFn = unsafe extern "C" fn(*mut c_void, *mut DevhostCall, DevhostStr, *const DevhostStr, usize) -> i32;
/// `DevhostPreferredFn` without its NULL.
type PreferredFn =
    unsafe extern "C" fn(*mut c_void, *mut DevhostCall, DevhostStr, *const DevhostPreferredRequest) -> i32;
/// `DevhostAllocateSharedFn` without its NULL.
type AllocateSharedFn = unsafe extern "C" fn(
    *mut c_void,
    *mut DevhostCall,
    DevhostStr,
    *const DevhostStr,
    usize,
    *const DevhostShare,
    usize,
) -> i32;
/// `DevhostPollFn` without its NULL.
type PollFn = unsafe extern "C" fn(*mut c_void, *mut DevhostCall) -> i32;
/// `DevhostShutdownFn` without its NULL.
type ShutdownFn = unsafe extern "C" fn(*mut c_void);

/// The backend's functions, checked non-NULL where ABI 1.0 requires them.
#[derive(Clone, Copy)]
pub(super) struct BackendFns {
    pub init: InitFn,
    pub allocate: DevicesFn,
    pub preferred_allocation: Option<PreferredFn>,
    pub pre_start: Option<DevicesFn>,
    pub shutdown: ShutdownFn,
    /// ABI 1.1; `None` from a 1.0 backend.
    pub release: Option<DevicesFn>,
    /// ABI 1.1; `None` from a 1.0 backend.
    pub poll: Option<PollFn>,
    /// ABI 1.2; `None` from a 1.0 or 1.1 backend (which is asked a plain
    /// `allocate`, without the shares).
    pub allocate_shared: Option<AllocateSharedFn>,
}

/// A native module behind the host's `Backend` trait.
pub(super) struct NativeBackend {
    module: PathBuf,
    fns: BackendFns,
    config_json: String,
    current: Mutex<Option<Arc<Instance>>>,
}

/// One live backend instance.
struct Instance {
    ptr: *mut c_void,
    ctx: &'static HostContext,
    shutdown: ShutdownFn,
}

// SAFETY: the ABI requires a backend instance to accept calls from any
// thread (several at once for allocate, preferred_allocation and pre_start);
// the pointer is only ever passed back to the backend.
unsafe impl Send for Instance {}
// SAFETY: as for `Send`.
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        self.ctx.close();
        // SAFETY: the last reference to this instance is gone, so no call on
        // it is in flight; `ptr` came from this backend's `init`, and this is
        // its only `shutdown`.
        unsafe { (self.shutdown)(self.ptr) }
    }
}

/// How a backend call ended, when not well.
enum Failure {
    Error(String),
    /// Data or a status that breaks the contract.
    Invalid(String),
    Fault(String),
}

impl Failure {
    /// The trait's answer; a fault is re-raised as a panic.
    fn raise(self) -> BackendError {
        match self {
            Failure::Error(message) => BackendError::new(message),
            Failure::Invalid(message) => BackendError::fault(message),
            Failure::Fault(message) => std::panic::resume_unwind(Box::new(message)),
        }
    }
}

fn settle(status: i32, collected: &mut Collected, extra: &[i32]) -> Result<(), Failure> {
    if let Some(invalid) = collected.invalid.take() {
        return Err(Failure::Invalid(invalid));
    }
    let mut message = || collected.error.take();
    match status {
        DEVHOST_OK => Ok(()),
        status if extra.contains(&status) => Ok(()),
        DEVHOST_ERROR => Err(Failure::Error(message().unwrap_or_else(|| "failed without a message".to_owned()))),
        DEVHOST_FAULT => {
            Err(Failure::Fault(message().unwrap_or_else(|| "reported a fault without a message".to_owned())))
        }
        other => Err(Failure::Invalid(format!(
            "returned unknown status {other} (expected DEVHOST_OK, DEVHOST_ERROR or DEVHOST_FAULT)"
        ))),
    }
}

impl NativeBackend {
    pub(super) fn new(module: PathBuf, fns: BackendFns, config_json: String) -> Self {
        NativeBackend { module, fns, config_json, current: Mutex::new(None) }
    }

    /// A resource that asks for `release` needs the function.
    fn check_release(&self, resources: &[ResourceSpec]) -> Result<(), Failure> {
        match resources.iter().find(|spec| spec.release_required) {
            Some(spec) if self.fns.release.is_none() => Err(Failure::Invalid(format!(
                "resource {:?} asks for release (DEVHOST_RESOURCE_RELEASE) but DevhostBackendApi.release is NULL",
                spec.name
            ))),
            _ => Ok(()),
        }
    }

    fn current(&self) -> Result<Arc<Instance>, BackendError> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        current.ok_or_else(|| BackendError::new("not initialised (no successful init since the last shutdown)"))
    }

    /// Runs `allocate` or `pre_start` with borrowed device IDs.
    fn devices_call(
        &self,
        f: DevicesFn,
        phase: Phase,
        resource: &str,
        device_ids: &[String],
    ) -> Result<Collected, BackendError> {
        let instance = self.current()?;
        let sink = CallSink::with_devices(phase, device_ids);
        let ids: Vec<DevhostStr> = device_ids.iter().map(|id| DevhostStr::new(id)).collect();
        // SAFETY: `instance.ptr` is live (we hold a reference); the sink, the
        // resource and the IDs outlive the call, as the ABI requires.
        let status = unsafe { f(instance.ptr, sink.as_ptr(), DevhostStr::new(resource), ids.as_ptr(), ids.len()) };
        let mut collected = sink.into_inner();
        settle(status, &mut collected, &[]).map_err(Failure::raise)?;
        Ok(collected)
    }
}

impl Backend for NativeBackend {
    fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        let ctx = HostContext::open(self.module.display().to_string(), publisher);
        let sink = CallSink::new(Phase::Init);
        let args = DevhostInitArgs {
            struct_size: size_of_u32::<DevhostInitArgs>(),
            abi_version: DEVHOST_ABI_VERSION,
            host_api: &HOST_API,
            host: ctx.as_ptr(),
            config_json: DevhostStr::new(&self.config_json),
        };
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `args`, the sink and the out-pointer outlive the call; the
        // context and the host table live for the rest of the process.
        let status = unsafe { (self.fns.init)(&args, sink.as_ptr(), &mut ptr) };
        let publish_error = ctx.end_init();
        let mut collected = sink.into_inner();
        let outcome = match (settle(status, &mut collected, &[]), publish_error) {
            (Ok(()), Some(message)) => Err(Failure::Error(message)),
            // The backend's own words, and why devhost refused its list.
            (Err(Failure::Error(said)), Some(message)) => {
                Err(Failure::Error(format!("{said} (devhost refused its device list: {message})")))
            }
            (outcome, _) => outcome,
        };
        let outcome = outcome.and_then(|()| self.check_release(&collected.resources));
        let instance = Instance { ptr, ctx, shutdown: self.fns.shutdown };
        if let Err(failure) = outcome {
            if status == DEVHOST_OK {
                // The backend thinks it started; stop what it started.
                drop(instance);
            } else {
                // A failed init leaves nothing to shut down (ABI rule).
                ctx.close();
                std::mem::forget(instance);
            }
            return Err(failure.raise());
        }
        let previous = self.current.lock().unwrap_or_else(PoisonError::into_inner).replace(Arc::new(instance));
        drop(previous);
        Ok(collected.resources)
    }

    fn allocate(&self, resource: &str, device_ids: &[String]) -> Result<Allocation, BackendError> {
        let collected = self.devices_call(self.fns.allocate, Phase::Allocate, resource, device_ids)?;
        Ok(collected.allocation)
    }

    /// ABI 1.2: the module's `allocate_shared` with the shares, when it has
    /// one and there are shares; otherwise its `allocate`, without them.
    fn allocate_shared(
        &self,
        resource: &str,
        device_ids: &[String],
        shares: &[(String, Share)],
    ) -> Result<Allocation, BackendError> {
        let Some(f) = self.fns.allocate_shared.filter(|_| !shares.is_empty()) else {
            return self.allocate(resource, device_ids);
        };
        let instance = self.current()?;
        let sink = CallSink::with_devices(Phase::AllocateShared, device_ids);
        let ids: Vec<DevhostStr> = device_ids.iter().map(|id| DevhostStr::new(id)).collect();
        // Each share's consumed amounts first: the shares point into them.
        let consumed: Vec<Vec<DevhostCapacity>> = shares
            .iter()
            .map(|(_, share)| {
                share
                    .consumed
                    .iter()
                    .map(|(name, quantity)| DevhostCapacity {
                        struct_size: size_of_u32::<DevhostCapacity>(),
                        reserved: 0,
                        name: DevhostStr::new(name),
                        quantity: DevhostStr::new(quantity),
                    })
                    .collect()
            })
            .collect();
        let raw: Vec<DevhostShare> = shares
            .iter()
            .zip(&consumed)
            .map(|((id, share), consumed)| DevhostShare {
                struct_size: size_of_u32::<DevhostShare>(),
                reserved: 0,
                device_id: DevhostStr::new(id),
                share_id: share.share_id.as_deref().map_or(DevhostStr::EMPTY, DevhostStr::new),
                consumed: consumed.as_ptr(),
                consumed_len: consumed.len(),
            })
            .collect();
        // SAFETY: `instance.ptr` is live (we hold a reference); the sink,
        // the resource, the IDs, the shares and everything they point to
        // outlive the call, as the ABI requires.
        let status = unsafe {
            f(instance.ptr, sink.as_ptr(), DevhostStr::new(resource), ids.as_ptr(), ids.len(), raw.as_ptr(), raw.len())
        };
        let mut collected = sink.into_inner();
        settle(status, &mut collected, &[]).map_err(Failure::raise)?;
        Ok(collected.allocation)
    }

    fn preferred_allocation(
        &self,
        resource: &str,
        request: &PreferredRequest,
    ) -> Result<Option<Vec<String>>, BackendError> {
        let Some(f) = self.fns.preferred_allocation else { return Ok(None) };
        let instance = self.current()?;
        let sink = CallSink::new(Phase::PreferredAllocation);
        let available: Vec<DevhostStr> = request.available.iter().map(|id| DevhostStr::new(id)).collect();
        let must_include: Vec<DevhostStr> = request.must_include.iter().map(|id| DevhostStr::new(id)).collect();
        let raw = DevhostPreferredRequest {
            struct_size: size_of_u32::<DevhostPreferredRequest>(),
            reserved: 0,
            available: available.as_ptr(),
            available_len: available.len(),
            must_include: must_include.as_ptr(),
            must_include_len: must_include.len(),
            size: request.size,
        };
        // SAFETY: `instance.ptr` is live; the request, its lists and the sink
        // outlive the call.
        let status = unsafe { f(instance.ptr, sink.as_ptr(), DevhostStr::new(resource), &raw) };
        let mut collected = sink.into_inner();
        settle(status, &mut collected, &[DEVHOST_USE_DEFAULT]).map_err(Failure::raise)?;
        Ok((status == DEVHOST_OK).then_some(collected.device_ids))
    }

    fn pre_start(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        let Some(f) = self.fns.pre_start else { return Ok(()) };
        self.devices_call(f, Phase::PreStart, resource, device_ids).map(drop)
    }

    fn release(&self, resource: &str, device_ids: &[String]) -> Result<(), BackendError> {
        let Some(f) = self.fns.release else { return Ok(()) };
        self.devices_call(f, Phase::Release, resource, device_ids).map(drop)
    }

    fn polls(&self) -> bool {
        self.fns.poll.is_some()
    }

    fn poll(&self) -> Result<(), BackendError> {
        let Some(f) = self.fns.poll else { return Ok(()) };
        let instance = self.current()?;
        let sink = CallSink::new(Phase::Poll);
        // SAFETY: `instance.ptr` is live (we hold a reference); the sink
        // outlives the call.
        let status = unsafe { f(instance.ptr, sink.as_ptr()) };
        let mut collected = sink.into_inner();
        settle(status, &mut collected, &[]).map_err(Failure::raise)
    }

    fn shutdown(&self) {
        let instance = self.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(instance) = instance {
            // Refuse its publishes now, even if a hung call delays its end.
            instance.ctx.close();
            drop(instance);
        }
    }
}
