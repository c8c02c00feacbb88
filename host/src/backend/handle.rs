//! Running a backend safely. Every call has a deadline; a panic, a missed
//! deadline, invalid data or a crashed worker marks only this backend's
//! devices Unhealthy and re-initialises it with exponential back-off. Other
//! backends never notice.
//!
//! Each backend is a bulkhead: it may have at most
//! [`MAX_CALLS_IN_FLIGHT`] calls running at once. An in-process backend's
//! call runs on a blocking thread that keeps its slot until the call really
//! returns, even after its deadline, so a backend whose calls hang uses up
//! its own slots (further calls are refused at once as busy) and never the
//! threads another backend needs. A backend in a worker process
//! ([`crate::worker`]) is killed when a call misses its deadline, which ends
//! the call and frees its slot.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub use super::call_error::CallError;
use super::{Allocation, Backend, PreferredRequest, ResourceSpec};
use crate::device_state::{BackgroundFault, FaultKind, Publisher, ResourceState};
use crate::resource_name::{self, ResourceNameError};
use crate::worker::WorkerBackend;

/// First back-off before re-initialising a faulted backend.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest back-off between re-initialisations.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Calls one backend may have running at once; more are refused at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Why a backend could not start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartError {
    /// `init` failed.
    #[error(transparent)]
    Init(#[from] CallError),
    /// `init` declared an invalid resource name.
    #[error("backend {backend:?} declared an invalid resource: {source}")]
    ResourceName {
        /// Backend name.
        backend: String,
        /// The rule it broke.
        source: ResourceNameError,
    },
    /// `init` declared the same resource twice, or none.
    #[error("backend {backend:?}: {message}")]
    Resources {
        /// Backend name.
        backend: String,
        /// What was wrong.
        message: String,
    },
}

/// Where a backend's code runs.
#[derive(Clone)]
pub enum Runner {
    /// In devhost's own process (built-in, WASM, or a native module with
    /// `isolation = "none"`, whose `sha256` is that of the code loaded).
    InProcess {
        /// The backend.
        backend: Arc<dyn Backend>,
        /// For a native module: the SHA-256 of the bytes loaded.
        sha256: Option<String>,
    },
    /// A native module in its own worker process.
    Worker(Arc<WorkerBackend>),
}

impl<B: Backend> From<Arc<B>> for Runner {
    fn from(backend: Arc<B>) -> Self {
        Runner::InProcess { backend, sha256: None }
    }
}

impl From<Arc<dyn Backend>> for Runner {
    fn from(backend: Arc<dyn Backend>) -> Self {
        Runner::InProcess { backend, sha256: None }
    }
}

impl From<Arc<WorkerBackend>> for Runner {
    fn from(worker: Arc<WorkerBackend>) -> Self {
        Runner::Worker(worker)
    }
}

/// A started backend, shared by the servers of its resources.
pub struct BackendHandle {
    name: String,
    runner: Runner,
    timeout: Duration,
    slots: Arc<Semaphore>,
    resources: Vec<(ResourceSpec, Arc<ResourceState>)>,
    faulted: Notify,
    faults: FaultHook,
}

/// Turns a fault on the backend's own thread (a refused device list, a
/// failed poll, a worker that died while idle) into a fault of the
/// backend, as if a call had failed. Holds the handle weakly: the handle
/// owns the publisher.
#[derive(Clone, Default)]
struct FaultHook(Arc<std::sync::OnceLock<std::sync::Weak<BackendHandle>>>);

impl FaultHook {
    fn attach(&self, handle: &Arc<BackendHandle>) {
        let _ = self.0.set(Arc::downgrade(handle));
    }

    fn into_fn(self) -> Arc<dyn Fn(BackgroundFault) + Send + Sync> {
        Arc::new(move |fault: BackgroundFault| {
            if let Some(handle) = self.0.get().and_then(std::sync::Weak::upgrade) {
                let (backend, operation, message) = (handle.name.clone(), fault.operation, fault.message);
                let error = match fault.kind {
                    FaultKind::InvalidData => CallError::Invalid { backend, operation, message },
                    FaultKind::Panicked => CallError::Panicked { backend, operation, message },
                    FaultKind::Crashed => CallError::Crashed { backend, operation, cause: message },
                };
                handle.report_fault(&error);
            }
        })
    }
}

impl std::fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendHandle").field("name", &self.name).field("timeout", &self.timeout).finish()
    }
}

impl BackendHandle {
    /// Initialises the backend (with the deadline `timeout`), checks the
    /// resources it declares, and starts its supervisor, which re-initialises
    /// it after faults until `cancel` fires.
    pub async fn start(
        name: impl Into<String>,
        runner: impl Into<Runner>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let name = name.into();
        let runner = runner.into();
        let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
        let publisher = Publisher::default();
        let faults = FaultHook::default();
        publisher.on_fault(faults.clone().into_fn());
        let specs = init(&name, &runner, &slots, timeout, publisher.clone()).await?;
        check_resources(&name, &specs)?;
        let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
        let states = publisher.seal(&names);
        let handle = Arc::new(BackendHandle {
            name,
            runner,
            timeout,
            slots,
            resources: specs.into_iter().zip(states).collect(),
            faulted: Notify::new(),
            faults: faults.clone(),
        });
        faults.attach(&handle);
        tokio::spawn(supervise(handle.clone(), cancel));
        Ok(handle)
    }

    /// The backend's name (its config file's stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resources it serves, with their live state.
    pub fn resources(&self) -> &[(ResourceSpec, Arc<ResourceState>)] {
        &self.resources
    }

    /// The SHA-256 of the module code running now, for a native module in
    /// a worker process.
    pub fn running_sha256(&self) -> Option<String> {
        match &self.runner {
            Runner::Worker(worker) => worker.running_sha256(),
            Runner::InProcess { sha256, .. } => sha256.clone(),
        }
    }

    /// Where the backend's code runs: `process` (a worker) or `none`.
    pub fn isolation(&self) -> &'static str {
        match &self.runner {
            Runner::Worker(_) => "process",
            Runner::InProcess { .. } => "none",
        }
    }

    /// Publishes which module code runs now (`devhost_backend_info`).
    pub fn announce(&self) {
        if let Some(sha256) = self.running_sha256() {
            crate::telemetry::global().backend_loaded(&self.name, self.isolation(), &sha256);
        }
    }

    /// Answers an `Allocate` for one container.
    pub async fn allocate(&self, resource: &str, ids: Vec<String>) -> Result<Allocation, CallError> {
        let operation = "allocate";
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => {
                let resource = resource.to_owned();
                self.in_process(operation, backend, move |b| b.allocate(&resource, &ids)).await
            }
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.allocate(resource, ids).await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, result)
    }

    /// Answers `GetPreferredAllocation`, or `None` for the default policy.
    pub async fn preferred_allocation(
        &self,
        resource: &str,
        request: PreferredRequest,
    ) -> Result<Option<Vec<String>>, CallError> {
        let operation = "preferred_allocation";
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => {
                let resource = resource.to_owned();
                self.in_process(operation, backend, move |b| b.preferred_allocation(&resource, &request)).await
            }
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.preferred_allocation(resource, &request).await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, result)
    }

    /// Runs `PreStartContainer`.
    pub async fn pre_start(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let operation = "pre_start";
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => {
                let resource = resource.to_owned();
                self.in_process(operation, backend, move |b| b.pre_start(&resource, &ids)).await
            }
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.pre_start(resource, ids).await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, result)
    }

    /// Frees devices no container holds any more (ABI 1.1 `release`).
    pub async fn release(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let operation = "release";
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => {
                let resource = resource.to_owned();
                self.in_process(operation, backend, move |b| b.release(&resource, &ids)).await
            }
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.release(resource, ids).await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, result)
    }

    /// Whether the backend wants [`poll`](Self::poll) called (a native
    /// module with ABI 1.1's `poll`).
    pub fn polls(&self) -> bool {
        match &self.runner {
            Runner::InProcess { backend, .. } => backend.polls(),
            Runner::Worker(worker) => worker.polls(),
        }
    }

    /// Asks the backend to re-check its devices and publish what changed
    /// (ABI 1.1 `poll`), with the deadline; a fault re-initialises it.
    pub async fn poll(&self) -> Result<(), CallError> {
        let operation = "poll";
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => self.in_process(operation, backend, |b| b.poll()).await,
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.poll().await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, result)
    }

    /// Calls [`poll`](Self::poll) every `interval` until `cancel` fires or
    /// the handle is dropped, if the backend [`polls`](Self::polls). One
    /// poll at a time: a slow poll delays the next, it never piles up.
    /// While the backend is faulted (being re-initialised) polls fail
    /// quietly and the loop carries on.
    pub fn start_polling(self: &Arc<Self>, interval: Duration, cancel: CancellationToken) {
        if !self.polls() {
            return;
        }
        let handle = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let Some(handle) = handle.upgrade() else { return };
                if let Err(error) = handle.poll().await
                    && !error.is_fault()
                {
                    tracing::debug!(backend = %handle.name, %error, "poll declined");
                }
            }
        });
    }

    /// A call slot, or `Unavailable` when every slot is taken.
    fn slot(&self, operation: &'static str) -> Result<OwnedSemaphorePermit, CallError> {
        take_slot(&self.name, operation, &self.slots)
    }

    async fn in_process<T, F>(&self, operation: &'static str, backend: &Arc<dyn Backend>, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, super::BackendError> + Send + 'static,
    {
        if backend.answers_at_once() {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(backend.as_ref()))).map_err(panic_message);
            return outcome(&self.name, operation, result);
        }
        let slot = self.slot(operation)?;
        run_blocking(&self.name, operation, self.timeout, backend.clone(), slot, f).await
    }

    /// Counts an error and turns a fault into Unhealthy devices.
    fn settle<T>(&self, operation: &'static str, result: Result<T, CallError>) -> Result<T, CallError> {
        match &result {
            Err(error) if error.is_fault() => self.report_fault(error),
            Err(error) => crate::telemetry::global().backend_error(&self.name, operation, error.kind()),
            Ok(_) => {}
        }
        result
    }

    /// Counts the fault, marks every device of this backend Unhealthy with
    /// `error` as the reason, and wakes the supervisor to re-initialise it.
    pub fn report_fault(&self, error: &CallError) {
        crate::telemetry::global().backend_error(&self.name, error.operation(), error.kind());
        tracing::error!(backend = %self.name, %error, "backend faulted; its devices are now Unhealthy");
        for (_, state) in &self.resources {
            state.set_fault(Some(error.to_string()));
        }
        self.faulted.notify_one();
    }

    /// Calls the backend's `shutdown` (with the deadline) and reports how
    /// it went. A backend whose every call slot is held by a hung call is
    /// abandoned at once rather than waited for.
    pub async fn try_shutdown(&self) -> Result<(), CallError> {
        shutdown(&self.name, &self.runner, &self.slots, self.timeout).await
    }

    /// Like [`try_shutdown`](Self::try_shutdown), logging a failure: the
    /// backend is then abandoned (its worker killed, or its hung thread
    /// left behind) and devhost carries on.
    pub async fn shutdown(&self) {
        if let Err(error) = self.try_shutdown().await {
            tracing::warn!(backend = %self.name, %error, "backend did not shut down cleanly; abandoned");
        }
    }
}

/// Re-initialises the backend after each fault, with exponential back-off,
/// until it succeeds; then lifts the Unhealthy mark.
async fn supervise(handle: Arc<BackendHandle>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = handle.faulted.notified() => {}
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            match reinit(&handle).await {
                Ok(()) => {
                    tracing::info!(backend = %handle.name, "backend re-initialised; its devices report their own health again");
                    crate::telemetry::global().backend_restarted(&handle.name);
                    handle.announce();
                    for (_, state) in &handle.resources {
                        state.set_fault(None);
                    }
                    break;
                }
                Err(error) => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    tracing::warn!(backend = %handle.name, %error, retry_in = ?backoff, "re-initialising backend failed");
                }
            }
        }
    }
}

async fn reinit(handle: &BackendHandle) -> Result<(), StartError> {
    shutdown(&handle.name, &handle.runner, &handle.slots, handle.timeout).await?;
    let states: Vec<Arc<ResourceState>> = handle.resources.iter().map(|(_, state)| state.clone()).collect();
    let publisher = Publisher::for_states(&states);
    publisher.on_fault(handle.faults.clone().into_fn());
    let specs = init(&handle.name, &handle.runner, &handle.slots, handle.timeout, publisher).await?;
    let expected: Vec<&ResourceSpec> = handle.resources.iter().map(|(spec, _)| spec).collect();
    if specs.iter().collect::<Vec<_>>() != expected {
        return Err(StartError::Resources {
            backend: handle.name.clone(),
            message: "re-initialised with different resources than at start; restart devhost to change them".into(),
        });
    }
    Ok(())
}

async fn init(
    name: &str,
    runner: &Runner,
    slots: &Arc<Semaphore>,
    timeout: Duration,
    publisher: Publisher,
) -> Result<Vec<ResourceSpec>, CallError> {
    let slot = take_slot(name, "init", slots)?;
    match runner {
        Runner::InProcess { backend, .. } => {
            run_blocking(name, "init", timeout, backend.clone(), slot, move |b| b.init(publisher)).await
        }
        Runner::Worker(worker) => worker.init(publisher).await,
    }
}

async fn shutdown(name: &str, runner: &Runner, slots: &Arc<Semaphore>, timeout: Duration) -> Result<(), CallError> {
    match runner {
        // A worker is stopped (and killed if it must be) whatever its
        // slots say: that ends its hung calls too.
        Runner::Worker(worker) => worker.shutdown().await,
        Runner::InProcess { backend, .. } => {
            let slot = take_slot(name, "shutdown", slots)?;
            run_blocking(name, "shutdown", timeout, backend.clone(), slot, |b| {
                b.shutdown();
                Ok(())
            })
            .await
        }
    }
}

fn take_slot(name: &str, operation: &'static str, slots: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, CallError> {
    slots.clone().try_acquire_owned().map_err(|_| CallError::Unavailable {
        backend: name.to_owned(),
        operation,
        reason: format!("{MAX_CALLS_IN_FLIGHT} calls are already in flight (its calls hang or it is overloaded)"),
    })
}

fn check_resources(backend: &str, specs: &[ResourceSpec]) -> Result<(), StartError> {
    if specs.is_empty() {
        return Err(StartError::Resources { backend: backend.to_owned(), message: "declared no resources".into() });
    }
    for (i, spec) in specs.iter().enumerate() {
        resource_name::validate(&spec.name)
            .map_err(|source| StartError::ResourceName { backend: backend.to_owned(), source })?;
        if specs[..i].iter().any(|earlier| earlier.name == spec.name) {
            return Err(StartError::Resources {
                backend: backend.to_owned(),
                message: format!("declared resource {:?} twice", spec.name),
            });
        }
    }
    Ok(())
}

/// Runs `f` on the blocking pool with a deadline, turning a panic into
/// [`CallError::Panicked`]. A call that misses its deadline keeps its
/// thread (a blocked FFI call cannot be cancelled) and its `slot` until it
/// returns, so one backend's hung calls are bounded by its own slots.
async fn run_blocking<T, F>(
    backend_name: &str,
    operation: &'static str,
    timeout: Duration,
    backend: Arc<dyn Backend>,
    slot: OwnedSemaphorePermit,
    f: F,
) -> Result<T, CallError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Backend) -> Result<T, super::BackendError> + Send + 'static,
{
    let backend_name = backend_name.to_owned();
    let task = tokio::task::spawn_blocking(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(backend.as_ref()))).map_err(panic_message);
        drop(slot);
        result
    });
    match tokio::time::timeout(timeout, task).await {
        Err(_) => Err(CallError::TimedOut { backend: backend_name, operation, timeout }),
        Ok(Err(join_error)) => {
            Err(CallError::Panicked { backend: backend_name, operation, message: join_error.to_string() })
        }
        Ok(Ok(result)) => outcome(&backend_name, operation, result),
    }
}

/// What a finished in-process call means: its value, a panic (`Err` of
/// the outer result), a refusal or a fault.
fn outcome<T>(
    backend_name: &str,
    operation: &'static str,
    result: Result<Result<T, super::BackendError>, String>,
) -> Result<T, CallError> {
    let backend = backend_name.to_owned();
    match result {
        Err(message) => Err(CallError::Panicked { backend, operation, message }),
        Ok(Err(error)) if error.fault => Err(CallError::Invalid { backend, operation, message: error.message }),
        Ok(Err(error)) => Err(CallError::Failed { backend, operation, message: error.message }),
        Ok(Ok(value)) => Ok(value),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn every_kind_is_listed() {
        let (backend, operation) = (String::new(), "allocate");
        let errors = [
            CallError::Failed { backend: backend.clone(), operation, message: String::new() },
            CallError::Panicked { backend: backend.clone(), operation, message: String::new() },
            CallError::TimedOut { backend: backend.clone(), operation, timeout: Duration::ZERO },
            CallError::Invalid { backend: backend.clone(), operation, message: String::new() },
            CallError::Crashed { backend: backend.clone(), operation, cause: String::new() },
            CallError::Unavailable { backend, operation, reason: String::new() },
        ];
        let kinds: Vec<&str> = errors.iter().map(CallError::kind).collect();
        assert_eq!(kinds, CallError::KINDS);
    }
    use crate::backend::{Allocation, BackendError, Device};

    /// Publishes one healthy device at init and keeps its publisher, so the
    /// test can publish from "its own thread" later.
    #[derive(Default)]
    struct Keeper {
        publisher: Mutex<Option<Publisher>>,
        inits: std::sync::atomic::AtomicUsize,
    }

    impl Backend for Keeper {
        fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
            self.inits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            publisher.publish("t.io/x", vec![Device::healthy("x0")]).map_err(|e| BackendError::new(e.to_string()))?;
            *self.publisher.lock().expect("lock") = Some(publisher);
            Ok(vec![ResourceSpec {
                name: "t.io/x".into(),
                pre_start_required: false,
                preferred_allocation: false,
                release_required: false,
            }])
        }

        fn allocate(&self, _: &str, ids: &[String]) -> Result<Allocation, BackendError> {
            match ids.first().map(String::as_str) {
                Some("busy") => Err(BackendError::new("device busy")),
                Some("garbage") => Err(BackendError::fault("returned a mount without a path")),
                _ => Ok(Allocation::default()),
            }
        }
    }

    async fn eventually(mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "condition never held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Its allocate blocks until the test opens the gate.
    struct Wedged {
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Backend for Wedged {
        fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
            publisher.publish("t.io/w", vec![Device::healthy("w0")]).map_err(|e| BackendError::new(e.to_string()))?;
            Ok(vec![ResourceSpec {
                name: "t.io/w".into(),
                pre_start_required: false,
                preferred_allocation: false,
                release_required: false,
            }])
        }

        fn allocate(&self, _: &str, _: &[String]) -> Result<Allocation, BackendError> {
            let (open, changed) = &*self.gate;
            let mut open = open.lock().expect("lock");
            while !*open {
                open = changed.wait(open).expect("wait");
            }
            Ok(Allocation::default())
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hung_calls_use_up_only_their_own_backends_slots() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let wedged = Arc::new(Wedged { gate: gate.clone() });
        let cancel = CancellationToken::new();
        let hung =
            BackendHandle::start("wedged", wedged, Duration::from_millis(20), cancel.clone()).await.expect("starts");
        let keeper =
            BackendHandle::start("keeper", Arc::new(Keeper::default()), Duration::from_secs(5), cancel.clone())
                .await
                .expect("starts");
        for _ in 0..MAX_CALLS_IN_FLIGHT {
            let error = hung.allocate("t.io/w", vec!["w0".into()]).await.expect_err("hangs past its deadline");
            assert_eq!(error.kind(), "timed_out", "{error}");
        }
        // Every slot is held by a thread still stuck in the backend: the
        // next call is refused at once, without taking another thread.
        let refused = hung.allocate("t.io/w", vec!["w0".into()]).await.expect_err("no slot left");
        assert_eq!(
            refused.to_string(),
            format!(
                "backend \"wedged\": allocate refused: {MAX_CALLS_IN_FLIGHT} calls are already in flight (its calls hang or it is overloaded)"
            )
        );
        assert!(!refused.is_fault(), "busy is not a fault");
        // Its neighbour is untouched, for many calls in a row.
        for _ in 0..200 {
            keeper.allocate("t.io/x", vec!["x0".into()]).await.expect("the neighbour answers");
        }
        // Released, the stuck calls return and their slots come back.
        *gate.0.lock().expect("lock") = true;
        gate.1.notify_all();
        eventually(|| hung.slots.available_permits() == MAX_CALLS_IN_FLIGHT).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_declined_request_is_not_a_fault_but_invalid_data_is() {
        let keeper = Arc::new(Keeper::default());
        let handle = BackendHandle::start("keeper", keeper.clone(), Duration::from_secs(5), CancellationToken::new())
            .await
            .expect("starts");
        let state = handle.resources()[0].1.clone();
        let busy = handle.allocate("t.io/x", vec!["busy".into()]).await.expect_err("declined");
        assert!(!busy.is_fault());
        assert_eq!(state.snapshot().fault, None, "declining a request leaves the devices healthy");
        let garbage = handle.allocate("t.io/x", vec!["garbage".into()]).await.expect_err("fault");
        assert_eq!(
            garbage.to_string(),
            "backend \"keeper\": allocate returned invalid data: returned a mount without a path"
        );
        assert_eq!(state.snapshot().advertised()[0].health, "Unhealthy");
        eventually(|| state.snapshot().fault.is_none()).await;
        assert_eq!(keeper.inits.load(std::sync::atomic::Ordering::SeqCst), 2, "re-initialised once");
    }

    #[tokio::test]
    async fn an_invalid_list_published_from_a_backend_thread_is_a_fault() {
        let keeper = Arc::new(Keeper::default());
        let handle = BackendHandle::start("keeper", keeper.clone(), Duration::from_secs(5), CancellationToken::new())
            .await
            .expect("starts");
        let state = handle.resources()[0].1.clone();
        let publisher = keeper.publisher.lock().expect("lock").clone().expect("kept at init");
        let refused =
            std::thread::spawn(move || publisher.publish("t.io/x", vec![Device::healthy("")])).join().expect("thread");
        assert!(matches!(refused, Err(crate::device_state::PublishError::EmptyId { .. })));
        let fault = state.snapshot().fault.clone().expect("faulted");
        assert_eq!(
            fault,
            "backend \"keeper\": publish returned invalid data: resource \"t.io/x\": device #0 has an empty ID"
        );
        assert_eq!(state.snapshot().devices, vec![Device::healthy("x0")], "the last good list is kept");
        eventually(|| state.snapshot().fault.is_none()).await;
    }
}
