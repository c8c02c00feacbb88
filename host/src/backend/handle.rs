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
//!
//! One death is one fault: faults are counted per *generation* (one
//! incarnation of the backend, from one `init` to the next re-init), so
//! the calls and threads that all see the same crash cause one fault and
//! one re-initialisation, and a late fault of an old generation never
//! restarts the new one. The back-off doubles per consecutive fault,
//! whatever call saw it, until the backend has served for
//! [`STABLE_PERIOD`].

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
/// How long a re-initialised backend must serve without a fault for its
/// next fault to start the back-off over at [`FIRST_BACKOFF`]; a fault
/// sooner is consecutive and doubles it. Equal to [`MAX_BACKOFF`]: a
/// backend that faults only after serving this long is restarted at most
/// about once a minute, no more often than the capped back-off would, so
/// the reset never lets a flapping backend restart faster than the cap,
/// while a fault within a minute of a re-init (a `poll` that hangs, a crash
/// on the first call) is almost surely the same fault coming back.
const STABLE_PERIOD: Duration = MAX_BACKOFF;
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
    /// Which generation serves and whether its fault is being handled.
    generation: std::sync::Mutex<Generation>,
    /// Wakes the supervisor when a generation faults.
    faulted: Notify,
    faults: FaultHook,
}

/// One incarnation of a backend, from its `init` until its re-init.
#[derive(Debug, Default)]
struct Generation {
    /// Bumped when a re-initialisation starts, once the old incarnation is
    /// shut down: the faults of calls and publishers of older generations
    /// are stale from then on.
    number: u64,
    /// This generation has faulted and the supervisor is re-initialising
    /// it (or waiting its back-off): its further faults are the same one.
    faulted: bool,
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

    /// The hook for the publisher of `generation`.
    fn into_fn(self, generation: u64) -> Arc<dyn Fn(BackgroundFault) + Send + Sync> {
        Arc::new(move |fault: BackgroundFault| {
            if let Some(handle) = self.0.get().and_then(std::sync::Weak::upgrade) {
                let (backend, operation, message) = (handle.name.clone(), fault.operation, fault.message);
                let error = match fault.kind {
                    FaultKind::InvalidData => CallError::Invalid { backend, operation, message },
                    FaultKind::Panicked => CallError::Panicked { backend, operation, message },
                    FaultKind::Crashed => CallError::Crashed { backend, operation, cause: message },
                };
                handle.fault_of(generation, &error);
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
        publisher.on_fault(faults.clone().into_fn(0));
        let specs = init(&name, &runner, &slots, timeout, publisher.clone()).await?;
        check_resources(&name, &specs)?;
        let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
        let states = publisher.seal(&names);
        for (spec, state) in specs.iter().zip(&states) {
            state.declare_counter_sets(spec.counter_sets.clone()).map_err(|error| StartError::Resources {
                backend: name.clone(),
                message: format!("published a device its resource's counter sets do not allow: {error}"),
            })?;
        }
        let handle = Arc::new(BackendHandle {
            name,
            runner,
            timeout,
            slots,
            resources: specs.into_iter().zip(states).collect(),
            generation: std::sync::Mutex::default(),
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

    /// What the sandbox of the backend's worker is; `None` in process.
    pub fn sandbox(&self) -> Option<String> {
        match &self.runner {
            Runner::Worker(worker) => worker.sandbox(),
            Runner::InProcess { .. } => None,
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
        self.allocate_shared(resource, ids, Vec::new()).await
    }

    /// [`allocate`](Self::allocate) with what a DRA claim consumes of the
    /// shared devices among `ids` ([`Backend::allocate_shared`]). A native
    /// module in a worker gets the shares too (its ABI 1.2
    /// `allocate_shared`, where it has one); a WASM backend is asked a
    /// plain `allocate`: its WIT carries no capacity yet.
    pub async fn allocate_shared(
        &self,
        resource: &str,
        ids: Vec<String>,
        shares: Vec<(String, crate::model::Share)>,
    ) -> Result<Allocation, CallError> {
        let operation = "allocate";
        let generation = self.generation();
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => {
                let resource = resource.to_owned();
                self.in_process(operation, backend, move |b| b.allocate_shared(&resource, &ids, &shares)).await
            }
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.allocate(resource, ids, shares).await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, generation, result)
    }

    /// Answers `GetPreferredAllocation`, or `None` for the default policy.
    pub async fn preferred_allocation(
        &self,
        resource: &str,
        request: PreferredRequest,
    ) -> Result<Option<Vec<String>>, CallError> {
        let operation = "preferred_allocation";
        let generation = self.generation();
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
        self.settle(operation, generation, result)
    }

    /// Runs `PreStartContainer`.
    pub async fn pre_start(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let operation = "pre_start";
        let generation = self.generation();
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
        self.settle(operation, generation, result)
    }

    /// Frees devices no container holds any more (ABI 1.1 `release`).
    pub async fn release(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let operation = "release";
        let generation = self.generation();
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
        self.settle(operation, generation, result)
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
        let generation = self.generation();
        let result = match &self.runner {
            Runner::InProcess { backend, .. } => self.in_process(operation, backend, |b| b.poll()).await,
            Runner::Worker(worker) => match self.slot(operation) {
                Ok(_slot) => worker.poll().await,
                Err(error) => Err(error),
            },
        };
        self.settle(operation, generation, result)
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

    /// The generation serving now; a call notes it before it starts, so
    /// that its fault is charged to the incarnation it ran in.
    fn generation(&self) -> u64 {
        lock(&self.generation).number
    }

    /// Counts an error and turns a fault of `generation` into Unhealthy
    /// devices.
    fn settle<T>(
        &self,
        operation: &'static str,
        generation: u64,
        result: Result<T, CallError>,
    ) -> Result<T, CallError> {
        match &result {
            Err(error) if error.is_fault() => self.fault_of(generation, error),
            Err(error) => crate::telemetry::global().backend_error(&self.name, operation, error.kind()),
            Ok(_) => {}
        }
        result
    }

    /// Counts the fault and, if it is the first of the generation serving
    /// now, marks every device of this backend Unhealthy with `error` as
    /// the reason and wakes the supervisor to re-initialise it.
    pub fn report_fault(&self, error: &CallError) {
        self.fault_of(self.generation(), error);
    }

    /// [`report_fault`](Self::report_fault) for a fault seen by a call or
    /// thread of `generation`. Every failed call is counted
    /// (`devhost_backend_call_errors_total`), but one generation faults
    /// once: the calls in flight when a worker dies all fail, and are one
    /// fault. A fault of an older generation (a call that ended after the
    /// re-init began, an old publisher) is stale and faults nothing.
    fn fault_of(&self, generation: u64, error: &CallError) {
        crate::telemetry::global().backend_error(&self.name, error.operation(), error.kind());
        let mut current = lock(&self.generation);
        if current.number != generation || current.faulted {
            drop(current);
            tracing::debug!(backend = %self.name, %error, "fault of a generation already being replaced; not handled again");
            return;
        }
        current.faulted = true;
        tracing::error!(backend = %self.name, %error, "backend faulted; its devices are now Unhealthy");
        // Marked under the lock, so the supervisor's clearing of a
        // successful re-init can never land after this mark.
        for (_, state) in &self.resources {
            state.set_fault(Some(error.to_string()));
        }
        drop(current);
        self.faulted.notify_one();
    }

    /// Whether the generation serving now has faulted (a re-init is due).
    fn fault_pending(&self) -> bool {
        lock(&self.generation).faulted
    }

    /// Starts a new generation: from now on faults of the old one are
    /// stale. Returns its number.
    fn next_generation(&self) -> u64 {
        let mut current = lock(&self.generation);
        current.number += 1;
        current.faulted = false;
        current.number
    }

    /// After `generation` initialised: lifts the Unhealthy mark unless it
    /// faulted already. Returns whether it did.
    fn recovered(&self, generation: u64) -> bool {
        let current = lock(&self.generation);
        if current.number != generation || current.faulted {
            return false;
        }
        for (_, state) in &self.resources {
            state.set_fault(None);
        }
        true
    }

    /// A re-initialisation failed: the generation serving (none, really)
    /// still needs one.
    fn still_faulted(&self) {
        lock(&self.generation).faulted = true;
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

/// The waits between one backend's re-initialisations: [`FIRST_BACKOFF`],
/// doubling per consecutive attempt up to [`MAX_BACKOFF`], and back to the
/// first once the backend has served for [`STABLE_PERIOD`]. A successful
/// re-init does not start it over: a backend that faults again right after
/// each one is a backend that keeps failing.
#[derive(Debug)]
struct Backoff {
    /// The wait before the next attempt (unless the backend was stable).
    next: Duration,
    /// Attempts since the back-off last started over.
    attempts: u32,
    /// Since when the backend has served, if it does (from its start or its
    /// last successful re-init); `None` while attempts are under way.
    serving_since: Option<tokio::time::Instant>,
}

impl Backoff {
    fn new(started: tokio::time::Instant) -> Self {
        Backoff { next: FIRST_BACKOFF, attempts: 0, serving_since: Some(started) }
    }

    /// The wait before the attempt due to a fault seen at `now`, and how
    /// many attempts in a row it makes.
    fn wait(&mut self, now: tokio::time::Instant) -> (Duration, u32) {
        if self.serving_since.take().is_some_and(|since| now.saturating_duration_since(since) >= STABLE_PERIOD) {
            self.next = FIRST_BACKOFF;
            self.attempts = 0;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        self.attempts += 1;
        (wait, self.attempts)
    }

    /// The backend serves again, from `now`.
    fn recovered(&mut self, now: tokio::time::Instant) {
        self.serving_since = Some(now);
    }
}

/// Re-initialises the backend after each fault, waiting its [`Backoff`]
/// first, until it succeeds; then lifts the Unhealthy mark.
async fn supervise(handle: Arc<BackendHandle>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(tokio::time::Instant::now());
    loop {
        // A wake-up with no fault pending (left by a fault that turned out
        // stale or a duplicate) only checks again.
        while !handle.fault_pending() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = handle.faulted.notified() => {}
            }
        }
        let (wait, attempt) = backoff.wait(tokio::time::Instant::now());
        tracing::info!(backend = %handle.name, backoff = ?wait, attempt, "re-initialising backend after its back-off");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match reinit(&handle).await {
            Ok(generation) => {
                backoff.recovered(tokio::time::Instant::now());
                crate::telemetry::global().backend_restarted(&handle.name);
                handle.announce();
                if handle.recovered(generation) {
                    tracing::info!(backend = %handle.name, "backend re-initialised; its devices report their own health again");
                } else {
                    tracing::warn!(backend = %handle.name, "backend re-initialised, but it faulted again already");
                }
            }
            Err(error) => {
                handle.still_faulted();
                tracing::warn!(backend = %handle.name, %error, retry_in = ?backoff.next, "re-initialising backend failed");
            }
        }
    }
}

/// Shuts the old generation down and initialises a new one; returns its
/// number.
async fn reinit(handle: &BackendHandle) -> Result<u64, StartError> {
    shutdown(&handle.name, &handle.runner, &handle.slots, handle.timeout).await?;
    // Only now: the calls still in flight in the old generation (failing
    // as it is shut down) are charged to it, not to the new one.
    let generation = handle.next_generation();
    let states: Vec<Arc<ResourceState>> = handle.resources.iter().map(|(_, state)| state.clone()).collect();
    let publisher = Publisher::for_states(&states);
    publisher.on_fault(handle.faults.clone().into_fn(generation));
    let specs = init(&handle.name, &handle.runner, &handle.slots, handle.timeout, publisher).await?;
    let expected: Vec<&ResourceSpec> = handle.resources.iter().map(|(spec, _)| spec).collect();
    if specs.iter().collect::<Vec<_>>() != expected {
        return Err(StartError::Resources {
            backend: handle.name.clone(),
            message: "re-initialised with different resources than at start; restart devhost to change them".into(),
        });
    }
    Ok(generation)
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
        devhost_abi::partitions::check_counter_sets(&spec.counter_sets).map_err(|why| StartError::Resources {
            backend: backend.to_owned(),
            message: format!("resource {:?}: {why}", spec.name),
        })?;
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
    // The name is copied only into an error: an answer allocates nothing here.
    let backend = || backend_name.to_owned();
    match result {
        Err(message) => Err(CallError::Panicked { backend: backend(), operation, message }),
        Ok(Err(error)) if error.fault => {
            Err(CallError::Invalid { backend: backend(), operation, message: error.message })
        }
        Ok(Err(error)) => Err(CallError::Failed { backend: backend(), operation, message: error.message }),
        Ok(Ok(value)) => Ok(value),
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
                counter_sets: Vec::new(),
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
                counter_sets: Vec::new(),
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

    #[test]
    fn backoff_doubles_per_consecutive_fault_and_starts_over_after_a_stable_period() {
        let start = tokio::time::Instant::now();
        let mut backoff = Backoff::new(start);
        let mut now = start + Duration::from_secs(1);
        let mut waits = Vec::new();
        // Each attempt succeeds and the backend faults again 5 s later:
        // consecutive, although every re-init succeeded.
        for _ in 0..10 {
            let (wait, _) = backoff.wait(now);
            waits.push(wait.as_millis());
            now += wait;
            backoff.recovered(now);
            now += Duration::from_secs(5);
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);
        // Failed attempts (no recovery between them) double too.
        let (wait, attempt) = backoff.wait(now);
        assert_eq!((wait, attempt), (MAX_BACKOFF, 11));
        // Served a stable period since its last re-init: starts over.
        backoff.recovered(now);
        now += STABLE_PERIOD;
        assert_eq!(backoff.wait(now), (FIRST_BACKOFF, 1));
        // Just short of it: consecutive.
        backoff.recovered(now);
        now += STABLE_PERIOD - Duration::from_millis(1);
        assert_eq!(backoff.wait(now), (Duration::from_secs(1), 2));
    }

    /// Paused time: the supervisor's sleeps are exact, and the test sees
    /// each re-initialisation within its 10 ms polling.
    #[tokio::test(start_paused = true)]
    async fn a_backend_that_faults_right_after_each_reinit_waits_longer_each_time() {
        let keeper = Arc::new(Keeper::default());
        let handle = BackendHandle::start("keeper", keeper.clone(), Duration::from_secs(5), CancellationToken::new())
            .await
            .expect("starts");
        let state = handle.resources()[0].1.clone();
        let mut waited = Vec::new();
        // 0.5 s to 8 s: each within `eventually`'s 10 s.
        for _ in 0..5 {
            let faulted = tokio::time::Instant::now();
            handle.allocate("t.io/x", vec!["garbage".into()]).await.expect_err("invalid data");
            assert!(state.snapshot().fault.is_some(), "faulted");
            eventually(|| state.snapshot().fault.is_none()).await;
            waited.push(faulted.elapsed());
        }
        // The old supervisor started over after every successful re-init:
        // 0.5 s each time, for ever.
        for (i, wait) in waited.iter().enumerate() {
            let backoff = FIRST_BACKOFF * 2u32.pow(i as u32);
            assert!(
                *wait >= backoff && *wait < backoff + Duration::from_millis(100),
                "re-init #{} came {wait:?} after its fault, expected {backoff:?} (all: {waited:?})",
                i + 1
            );
        }
        assert_eq!(keeper.inits.load(std::sync::atomic::Ordering::SeqCst), 6, "one re-init per fault");
        // Served a stable period: the next fault waits the first back-off.
        tokio::time::sleep(STABLE_PERIOD).await;
        let faulted = tokio::time::Instant::now();
        handle.allocate("t.io/x", vec!["garbage".into()]).await.expect_err("invalid data");
        eventually(|| state.snapshot().fault.is_none()).await;
        let wait = faulted.elapsed();
        assert!(wait >= FIRST_BACKOFF && wait < FIRST_BACKOFF * 2, "started over: {wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_generation_faults_once_and_its_stale_faults_fault_nothing() {
        let keeper = Arc::new(Keeper::default());
        let handle = BackendHandle::start("keeper", keeper.clone(), Duration::from_secs(5), CancellationToken::new())
            .await
            .expect("starts");
        let state = handle.resources()[0].1.clone();
        let old_publisher = keeper.publisher.lock().expect("lock").clone().expect("kept at init");
        // Three calls see the same broken generation (as the calls in
        // flight when a worker dies all fail): one fault, one re-init.
        for _ in 0..3 {
            handle.allocate("t.io/x", vec!["garbage".into()]).await.expect_err("invalid data");
        }
        eventually(|| state.snapshot().fault.is_none()).await;
        // Long past any back-off: no second re-init replaced the first.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(keeper.inits.load(std::sync::atomic::Ordering::SeqCst), 2, "re-initialised once");
        // A thread of the old generation reports a fault late: stale.
        let refused = old_publisher.publish("t.io/x", vec![Device::healthy("")]);
        assert!(matches!(refused, Err(crate::device_state::PublishError::EmptyId { .. })), "{refused:?}");
        assert_eq!(state.snapshot().fault, None, "the new generation keeps serving");
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(keeper.inits.load(std::sync::atomic::Ordering::SeqCst), 2, "no re-init for a stale fault");
        // The new generation's own fault still counts.
        let publisher = keeper.publisher.lock().expect("lock").clone().expect("kept at re-init");
        let _ = publisher.publish("t.io/x", vec![Device::healthy("")]);
        assert!(state.snapshot().fault.is_some(), "its own fault marks the devices");
        eventually(|| state.snapshot().fault.is_none()).await;
        assert_eq!(keeper.inits.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
