//! Running a backend safely: every call goes to a blocking thread with a
//! deadline, a panic is caught, and a fault (panic, missed deadline, invalid
//! data) marks only this backend's devices Unhealthy and re-initialises it
//! with exponential back-off. Other backends never notice.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Backend, ResourceSpec};
use crate::device_state::{BackgroundFault, Publisher, ResourceState};
use crate::resource_name::{self, ResourceNameError};

/// First back-off before re-initialising a faulted backend.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest back-off between re-initialisations.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
}

impl CallError {
    /// A short label for metrics: `failed`, `panicked`, `timed_out`, `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Failed { .. } => "failed",
            CallError::Panicked { .. } => "panicked",
            CallError::TimedOut { .. } => "timed_out",
            CallError::Invalid { .. } => "invalid",
        }
    }

    /// Whether this error means the backend itself is broken (as opposed to
    /// declining one request).
    pub fn is_fault(&self) -> bool {
        !matches!(self, CallError::Failed { .. })
    }
}

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

/// A started backend, shared by the servers of its resources.
pub struct BackendHandle {
    name: String,
    backend: Arc<dyn Backend>,
    timeout: Duration,
    resources: Vec<(ResourceSpec, Arc<ResourceState>)>,
    faulted: Notify,
    faults: FaultHook,
}

/// Turns a fault on the backend's own thread (a refused device list, a
/// failed poll) into a fault of the backend, as if a call had failed.
/// Holds the handle weakly: the handle owns the publisher.
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
                let error = if fault.invalid_data {
                    CallError::Invalid { backend, operation, message }
                } else {
                    CallError::Panicked { backend, operation, message }
                };
                crate::telemetry::global().backend_error(&handle.name, operation, error.kind());
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
    /// Initialises `backend` (with the deadline `timeout`), checks the
    /// resources it declares, and starts its supervisor, which re-initialises
    /// it after faults until `cancel` fires.
    pub async fn start(
        name: impl Into<String>,
        backend: Arc<dyn Backend>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let name = name.into();
        let publisher = Publisher::default();
        let faults = FaultHook::default();
        publisher.on_fault(faults.clone().into_fn());
        let init_publisher = publisher.clone();
        let specs = run_blocking(&name, "init", timeout, backend.clone(), move |b| b.init(init_publisher)).await?;
        check_resources(&name, &specs)?;
        let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
        let states = publisher.seal(&names);
        let handle = Arc::new(BackendHandle {
            name,
            backend,
            timeout,
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

    /// Runs one call with the deadline. A fault marks the backend's devices
    /// Unhealthy and schedules a re-initialisation.
    pub async fn call<T, F>(&self, operation: &'static str, f: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, super::BackendError> + Send + 'static,
    {
        let result = run_blocking(&self.name, operation, self.timeout, self.backend.clone(), f).await;
        if let Err(error) = &result {
            crate::telemetry::global().backend_error(&self.name, operation, error.kind());
            if error.is_fault() {
                self.report_fault(error);
            }
        }
        result
    }

    /// Marks every device of this backend Unhealthy with `error` as the
    /// reason, and wakes the supervisor to re-initialise it.
    pub fn report_fault(&self, error: &CallError) {
        tracing::error!(backend = %self.name, %error, "backend faulted; its devices are now Unhealthy");
        for (_, state) in &self.resources {
            state.set_fault(Some(error.to_string()));
        }
        self.faulted.notify_one();
    }

    /// Calls the backend's `shutdown` (with the deadline).
    pub async fn shutdown(&self) {
        if let Err(error) = self
            .call("shutdown", |b| {
                b.shutdown();
                Ok(())
            })
            .await
        {
            tracing::warn!(backend = %self.name, %error, "backend shutdown failed");
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
    let timeout = handle.timeout;
    run_blocking(&handle.name, "shutdown", timeout, handle.backend.clone(), |b| {
        b.shutdown();
        Ok(())
    })
    .await?;
    let states: Vec<Arc<ResourceState>> = handle.resources.iter().map(|(_, state)| state.clone()).collect();
    let publisher = Publisher::for_states(&states);
    publisher.on_fault(handle.faults.clone().into_fn());
    let specs = run_blocking(&handle.name, "init", timeout, handle.backend.clone(), move |b| b.init(publisher)).await?;
    let expected: Vec<&ResourceSpec> = handle.resources.iter().map(|(spec, _)| spec).collect();
    if specs.iter().collect::<Vec<_>>() != expected {
        return Err(StartError::Resources {
            backend: handle.name.clone(),
            message: "re-initialised with different resources than at start; restart devhost to change them".into(),
        });
    }
    Ok(())
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
/// [`CallError::Panicked`]. A call that misses its deadline keeps its thread
/// (a blocked FFI call cannot be cancelled) but no longer holds anyone up.
async fn run_blocking<T, F>(
    backend_name: &str,
    operation: &'static str,
    timeout: Duration,
    backend: Arc<dyn Backend>,
    f: F,
) -> Result<T, CallError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Backend) -> Result<T, super::BackendError> + Send + 'static,
{
    let backend_name = backend_name.to_owned();
    let task = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| f(backend.as_ref()))).map_err(panic_message)
    });
    match tokio::time::timeout(timeout, task).await {
        Err(_) => Err(CallError::TimedOut { backend: backend_name, operation, timeout }),
        Ok(Err(join_error)) => {
            Err(CallError::Panicked { backend: backend_name, operation, message: join_error.to_string() })
        }
        Ok(Ok(Err(message))) => Err(CallError::Panicked { backend: backend_name, operation, message }),
        Ok(Ok(Ok(Err(error)))) if error.fault => {
            Err(CallError::Invalid { backend: backend_name, operation, message: error.message })
        }
        Ok(Ok(Ok(Err(error)))) => Err(CallError::Failed { backend: backend_name, operation, message: error.message }),
        Ok(Ok(Ok(Ok(value)))) => Ok(value),
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
            Ok(vec![ResourceSpec { name: "t.io/x".into(), pre_start_required: false, preferred_allocation: false }])
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

    #[tokio::test]
    async fn a_declined_request_is_not_a_fault_but_invalid_data_is() {
        let keeper = Arc::new(Keeper::default());
        let handle = BackendHandle::start("keeper", keeper.clone(), Duration::from_secs(5), CancellationToken::new())
            .await
            .expect("starts");
        let state = handle.resources()[0].1.clone();
        let busy = handle.call("allocate", |b| b.allocate("t.io/x", &["busy".into()])).await.expect_err("declined");
        assert!(!busy.is_fault());
        assert_eq!(state.snapshot().fault, None, "declining a request leaves the devices healthy");
        let garbage = handle.call("allocate", |b| b.allocate("t.io/x", &["garbage".into()])).await.expect_err("fault");
        assert_eq!(
            garbage.to_string(),
            "backend \"keeper\": allocate returned invalid data: returned a mount without a path"
        );
        assert_eq!(state.snapshot().response.devices[0].health, "Unhealthy");
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
