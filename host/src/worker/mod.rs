//! Native backends in their own worker processes: the bulkhead that keeps a
//! segfault, `abort()`, `exit()`, stack overflow or endless call in one
//! vendor's module from costing any other backend anything.
//!
//! The worker is the devhost binary itself, re-executed as
//! `devhost __worker <backend>` ([`child`]), so there is nothing else to
//! ship. devhost talks to it over a `socketpair` ([`protocol`]). Each
//! `init` starts a fresh worker; `shutdown` stops it. Rules:
//!
//! * the worker dies with devhost (`PR_SET_PDEATHSIG`, set from a thread
//!   that lives as long as devhost, since the kernel ties it to the
//!   spawning *thread*), inherits no descriptor but its socket, and is
//!   always reaped;
//! * a worker that dies is noticed at once (end of stream on its socket):
//!   calls in flight fail with the signal or exit status, and if none was
//!   in flight the backend is faulted as "worker … while idle";
//! * a call that misses its deadline kills the worker (SIGKILL), so a hang
//!   never holds a thread or a slot for longer than the deadline.

use std::collections::HashMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::backend::call_error::CallError;
use crate::backend::{Allocation, PreferredRequest, ResourceSpec};
use crate::device_state::{BackgroundFault, FaultKind, Publisher};
use protocol::{Answer, Call, DevicesCall, Empty, FailureKind, Load, PreferredCall, Reply, Request};

pub mod child;
pub mod protocol;
#[allow(unsafe_code)]
mod sys;

/// The hidden subcommand that turns the devhost binary into a worker.
pub const WORKER_SUBCOMMAND: &str = "__worker";

/// Loading a module (and spawning its worker) may take longer than a call.
const MIN_LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker gets to exit after its socket is closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

static EXECUTABLE: OnceLock<PathBuf> = OnceLock::new();

/// Sets the executable that runs workers, for programs other than devhost
/// that embed this library (benchmarks). It must call
/// [`child::main`] when its first argument is [`WORKER_SUBCOMMAND`].
/// devhost itself re-executes `/proc/self/exe`.
pub fn set_executable(path: PathBuf) {
    let _ = EXECUTABLE.set(path);
}

fn executable() -> PathBuf {
    EXECUTABLE.get().cloned().unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// What a worker loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// The backend's name (its file's stem).
    pub backend: String,
    /// The module file.
    pub module: PathBuf,
    /// Optional SHA-256 pin.
    pub sha256: Option<String>,
    /// The backend's `[config]` as JSON.
    pub config_json: String,
    /// Address-space limit of the worker in MiB.
    pub memory_mb: Option<u64>,
    /// Deadline of one call.
    pub timeout: Duration,
}

/// A native backend run in worker processes, one at a time.
pub struct WorkerBackend {
    spec: WorkerSpec,
    /// Spawned and loaded ahead of the first `init` (by [`prepare`](Self::prepare)).
    prepared: Mutex<Option<Arc<Worker>>>,
    /// The worker serving calls since the last successful `init`.
    current: Mutex<Option<Arc<Worker>>>,
    /// The module has ABI 1.1's `poll` (known after `init`).
    polls: AtomicBool,
}

impl std::fmt::Debug for WorkerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBackend").field("spec", &self.spec).finish()
    }
}

impl WorkerBackend {
    /// Starts a worker and loads the module in it, so that a module that
    /// cannot load is refused now, with the loader's own message.
    pub async fn prepare(spec: WorkerSpec) -> Result<Arc<Self>, String> {
        let worker = Worker::start(&spec).await?;
        Ok(Arc::new(WorkerBackend {
            spec,
            prepared: Mutex::new(Some(worker)),
            current: Mutex::new(None),
            polls: AtomicBool::new(false),
        }))
    }

    /// The SHA-256 of the module the current worker loaded.
    pub fn running_sha256(&self) -> Option<String> {
        let current = lock(&self.current).clone().or_else(|| lock(&self.prepared).clone());
        current.and_then(|worker| worker.sha256.get().cloned())
    }

    /// The current worker's process ID (for tests and `devhost list`).
    pub fn pid(&self) -> Option<u32> {
        lock(&self.current).as_ref().map(|worker| worker.pid)
    }

    /// `init` in a fresh worker (or the prepared one).
    pub async fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, CallError> {
        let prepared = lock(&self.prepared).take();
        let worker = match prepared {
            Some(worker) => worker,
            None => Worker::start(&self.spec).await.map_err(|message| CallError::Failed {
                backend: self.spec.backend.clone(),
                operation: "init",
                message,
            })?,
        };
        *lock(&worker.publisher) = Some(publisher);
        match worker.request("init", Call::Init(Empty {}), self.spec.timeout).await {
            Ok(Answer::Resources(resources)) => {
                let previous = lock(&self.current).replace(worker);
                if let Some(previous) = previous {
                    previous.kill("replaced by a new worker");
                }
                self.polls.store(resources.polls, Ordering::SeqCst);
                Ok(resources.resources.into_iter().map(Into::into).collect())
            }
            other => {
                worker.kill("init did not succeed");
                Err(worker.unexpected("init", other))
            }
        }
    }

    /// `allocate` in the current worker.
    pub async fn allocate(&self, resource: &str, ids: Vec<String>) -> Result<Allocation, CallError> {
        let worker = self.current("allocate")?;
        let call = Call::Allocate(DevicesCall { resource: resource.to_owned(), ids });
        match worker.request("allocate", call, self.spec.timeout).await {
            Ok(Answer::Allocation(allocation)) => Ok(allocation.into()),
            other => Err(worker.unexpected("allocate", other)),
        }
    }

    /// `preferred_allocation` in the current worker.
    pub async fn preferred_allocation(
        &self,
        resource: &str,
        request: &PreferredRequest,
    ) -> Result<Option<Vec<String>>, CallError> {
        let worker = self.current("preferred_allocation")?;
        let call = Call::Preferred(PreferredCall::new(resource, request));
        match worker.request("preferred_allocation", call, self.spec.timeout).await {
            Ok(Answer::Preferred(answer)) => Ok(answer.answered.then_some(answer.ids)),
            other => Err(worker.unexpected("preferred_allocation", other)),
        }
    }

    /// `pre_start` in the current worker.
    pub async fn pre_start(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let call = Call::PreStart(DevicesCall { resource: resource.to_owned(), ids });
        self.done("pre_start", call).await
    }

    /// `release` (ABI 1.1) in the current worker.
    pub async fn release(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let call = Call::Release(DevicesCall { resource: resource.to_owned(), ids });
        self.done("release", call).await
    }

    /// Whether the module has ABI 1.1's `poll`.
    pub fn polls(&self) -> bool {
        self.polls.load(Ordering::SeqCst)
    }

    /// `poll` (ABI 1.1) in the current worker.
    pub async fn poll(&self) -> Result<(), CallError> {
        self.done("poll", Call::Poll(Empty {})).await
    }

    /// A call answered with nothing but success.
    async fn done(&self, operation: &'static str, call: Call) -> Result<(), CallError> {
        let worker = self.current(operation)?;
        match worker.request(operation, call, self.spec.timeout).await {
            Ok(Answer::Done(_)) => Ok(()),
            other => Err(worker.unexpected(operation, other)),
        }
    }

    /// Stops the current worker: `shutdown` with the deadline, then the
    /// socket is closed and the worker exits (or is killed if it does not
    /// within a grace period). A worker that is already dead is just
    /// reaped. Nothing it publishes from now on lands.
    pub async fn shutdown(&self) -> Result<(), CallError> {
        if let Some(prepared) = lock(&self.prepared).take() {
            prepared.kill("stopped before init");
        }
        let Some(worker) = lock(&self.current).take() else { return Ok(()) };
        // Killed by devhost (a missed deadline) or dead already: nothing
        // to ask it; it is reaped by its read loop.
        let gone = worker.stopping.swap(true, Ordering::SeqCst) || worker.is_dead();
        lock(&worker.publisher).take();
        let result = if gone {
            Ok(())
        } else {
            match worker.request("shutdown", Call::Shutdown(Empty {}), self.spec.timeout).await {
                Ok(Answer::Done(_)) => Ok(()),
                other => Err(worker.unexpected("shutdown", other)),
            }
        };
        worker.close().await;
        result
    }

    fn current(&self, operation: &'static str) -> Result<Arc<Worker>, CallError> {
        lock(&self.current).clone().ok_or_else(|| CallError::Unavailable {
            backend: self.spec.backend.clone(),
            operation,
            reason: "its worker is not running (being restarted after a fault)".to_owned(),
        })
    }
}

impl Drop for WorkerBackend {
    fn drop(&mut self) {
        for worker in [lock(&self.prepared).take(), lock(&self.current).take()].into_iter().flatten() {
            worker.kill("its backend was dropped");
        }
    }
}

/// Waiters for answers, by request id; whether the worker's stream has
/// ended, and once it is reaped, how it died.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Result<Answer, String>>>,
    ended: bool,
    died: Option<String>,
}

/// One worker process and the host's end of its socket.
struct Worker {
    backend: String,
    pid: u32,
    /// Of the bytes the worker loaded; set once loaded.
    sha256: OnceLock<String>,
    /// `None` once reaped.
    child: Mutex<Option<Child>>,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// Where its device lists, faults and (via the handle) deaths go.
    publisher: Mutex<Option<Publisher>>,
    /// devhost is stopping it: its death is no fault.
    stopping: AtomicBool,
    /// Why devhost killed it, if it did.
    kill_reason: Mutex<Option<String>>,
}

impl Worker {
    /// Spawns a worker and loads the module; the error is the loader's
    /// message (or why the worker could not start).
    async fn start(spec: &WorkerSpec) -> Result<Arc<Worker>, String> {
        let (host, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|error| format!("cannot create the worker's socket: {error}"))?;
        let mut command = Command::new(executable());
        // `ps` shows `devhost __worker <backend>`, not `/proc/self/exe …`.
        command.arg0("devhost").arg(WORKER_SUBCOMMAND).arg(&spec.backend).stdin(Stdio::null());
        // The module's stdout goes to devhost's stderr (the log), never to
        // devhost's stdout.
        if let Ok(stderr) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
            command.stdout(stderr);
        }
        sys::prepare_child(&mut command, &theirs);
        let child = spawn(command).await.map_err(|error| format!("cannot start a worker process: {error}"))?;
        drop(theirs);
        let pid = child.id();
        host.set_nonblocking(true).map_err(|error| format!("cannot use the worker's socket: {error}"))?;
        let stream = tokio::net::UnixStream::from_std(host)
            .map_err(|error| format!("cannot use the worker's socket: {error}"))?;
        let (reader, writer) = stream.into_split();
        let worker = Arc::new(Worker {
            backend: spec.backend.clone(),
            pid,
            sha256: OnceLock::new(),
            child: Mutex::new(Some(child)),
            writer: tokio::sync::Mutex::new(Some(writer)),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            publisher: Mutex::new(None),
            stopping: AtomicBool::new(false),
            kill_reason: Mutex::new(None),
        });
        tokio::spawn(worker.clone().read_loop(reader));
        let load = Load {
            protocol: protocol::PROTOCOL_VERSION,
            backend: spec.backend.clone(),
            module: spec.module.display().to_string(),
            sha256: spec.sha256.clone(),
            config_json: spec.config_json.clone(),
            memory_mb: spec.memory_mb.unwrap_or(0),
        };
        let timeout = spec.timeout.max(MIN_LOAD_TIMEOUT);
        let sha256 = match worker.request("load", Call::Load(load), timeout).await {
            Ok(Answer::Loaded(sha256)) => sha256,
            Ok(Answer::Failed(failure)) => {
                worker.kill("the module did not load");
                return Err(failure.message);
            }
            other => {
                worker.kill("the module did not load");
                return Err(worker.unexpected("load", other).to_string());
            }
        };
        tracing::info!(backend = %spec.backend, pid, sha256, module = %spec.module.display(), "worker started; module loaded");
        let _ = worker.sha256.set(sha256);
        Ok(worker)
    }

    /// Sends one request and waits for its answer, with a deadline. A miss
    /// kills the worker.
    async fn request(&self, operation: &'static str, call: Call, timeout: Duration) -> Result<Answer, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.ended {
                // Reported by the calls it died in (or as idle), not by
                // calls that came after.
                let cause = pending.died.as_deref().unwrap_or("has ended");
                return Err(CallError::Unavailable {
                    backend: self.backend.clone(),
                    operation,
                    reason: format!("its worker {cause}; a new one is being started"),
                });
            }
            pending.waiting.insert(id, sender);
        }
        let frame = protocol::frame(&Request { id, call: Some(call) });
        let exchange = async {
            {
                let mut writer = self.writer.lock().await;
                if let Some(writer) = writer.as_mut() {
                    // A failed write means the worker is gone: its read
                    // loop answers every waiter with how it died.
                    let _ = writer.write_all(&frame).await;
                }
            }
            receiver.await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(cause))) => Err(self.crashed(operation, cause)),
            Ok(Err(_)) => Err(self.crashed(operation, "closed its connection".to_owned())),
            Err(_) => {
                lock(&self.pending).waiting.remove(&id);
                self.kill(&format!("killed after {operation} missed its {timeout:?} deadline"));
                Err(CallError::TimedOut { backend: self.backend.clone(), operation, timeout })
            }
        }
    }

    fn crashed(&self, operation: &'static str, cause: String) -> CallError {
        CallError::Crashed { backend: self.backend.clone(), operation, cause }
    }

    /// The error for an answer that is not the one `operation` expects.
    fn unexpected(&self, operation: &'static str, answer: Result<Answer, CallError>) -> CallError {
        let backend = self.backend.clone();
        match answer {
            Err(error) => error,
            Ok(Answer::Failed(failure)) => match FailureKind::try_from(failure.kind) {
                Ok(FailureKind::Declined | FailureKind::Load) => {
                    CallError::Failed { backend, operation, message: failure.message }
                }
                Ok(FailureKind::Panicked) => CallError::Panicked { backend, operation, message: failure.message },
                Ok(FailureKind::Invalid | FailureKind::Protocol) | Err(_) => {
                    CallError::Invalid { backend, operation, message: failure.message }
                }
            },
            Ok(other) => CallError::Invalid {
                backend,
                operation,
                message: format!("the worker answered {operation} with {}", answer_name(&other)),
            },
        }
    }

    fn is_dead(&self) -> bool {
        lock(&self.pending).ended
    }

    /// Kills the worker now (SIGKILL); its read loop reaps it.
    fn kill(&self, reason: &str) {
        self.stopping.store(true, Ordering::SeqCst);
        lock(&self.kill_reason).get_or_insert_with(|| reason.to_owned());
        if let Some(child) = lock(&self.child).as_mut() {
            // Refused only if it was reaped already (then it is gone).
            let _ = child.kill();
        }
    }

    /// Closes devhost's end: the worker exits; one that does not within
    /// the grace period is killed.
    async fn close(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(mut writer) = self.writer.lock().await.take() {
            let _ = writer.shutdown().await;
        }
        let worker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_GRACE).await;
            if lock(&worker.child).is_some() {
                worker.kill("did not exit after its shutdown");
            }
        });
    }

    /// Reads answers and events until the worker's end closes, then reaps
    /// it and tells every waiter (or, if none, the backend) how it died.
    async fn read_loop(self: Arc<Self>, mut reader: OwnedReadHalf) {
        let ended = loop {
            match read_reply(&mut reader).await {
                Ok(Some(reply)) => self.dispatch(reply),
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        // The calls in flight now are the ones it died in; later calls are
        // refused while it is reaped.
        let waiting = {
            let mut pending = lock(&self.pending);
            pending.ended = true;
            std::mem::take(&mut pending.waiting)
        };
        let worker = self.clone();
        let mut cause = tokio::task::spawn_blocking(move || worker.reap())
            .await
            .unwrap_or_else(|error| format!("could not be reaped: {error}"));
        if let Some(error) = ended {
            cause = format!("{cause} (after a broken frame: {error})");
        }
        lock(&self.pending).died = Some(cause.clone());
        let idle = waiting.is_empty();
        for (_, waiter) in waiting {
            let _ = waiter.send(Err(cause.clone()));
        }
        if idle && !self.stopping.load(Ordering::SeqCst) {
            let publisher = lock(&self.publisher).clone();
            if let Some(publisher) = publisher {
                publisher.report_fault(BackgroundFault { operation: "idle", message: cause, kind: FaultKind::Crashed });
            }
        } else {
            tracing::debug!(backend = %self.backend, pid = self.pid, "worker ended: {cause}");
        }
    }

    fn dispatch(&self, reply: Reply) {
        let Some(answer) = reply.answer else { return };
        if reply.id != 0 {
            if let Some(waiter) = lock(&self.pending).waiting.remove(&reply.id) {
                let _ = waiter.send(Ok(answer));
            }
            return;
        }
        let publisher = lock(&self.publisher).clone();
        match answer {
            Answer::Publish(publish) => {
                if let Some(publisher) = publisher {
                    match publish.devices.into_iter().map(crate::model::Device::try_from).collect::<Result<Vec<_>, _>>()
                    {
                        // A refused list is reported as a fault by the publisher.
                        Ok(devices) => drop(publisher.publish(&publish.resource, devices)),
                        Err(message) => publisher.report_fault(BackgroundFault {
                            operation: "publish",
                            message: format!("resource {:?}: {message}", publish.resource),
                            kind: FaultKind::InvalidData,
                        }),
                    }
                }
            }
            Answer::Fault(fault) => {
                if let Some(publisher) = publisher {
                    publisher.report_fault(BackgroundFault {
                        operation: "publish",
                        message: fault.message,
                        kind: FaultKind::InvalidData,
                    });
                }
            }
            Answer::Log(line) => {
                let (backend, text) = (&self.backend, line.text);
                match line.level {
                    0 => tracing::error!(backend = %backend, "{text}"),
                    1 => tracing::warn!(backend = %backend, "{text}"),
                    2 => tracing::info!(backend = %backend, "{text}"),
                    _ => tracing::debug!(backend = %backend, "{text}"),
                }
            }
            other => tracing::warn!(backend = %self.backend, "worker sent an unasked {}; ignored", answer_name(&other)),
        }
    }

    /// Waits for the process to end (its socket closed, so it is exiting)
    /// and says how it ended. One that closed its socket but lives on is
    /// killed after a grace period.
    fn reap(&self) -> String {
        let started = std::time::Instant::now();
        loop {
            let status = {
                let mut child = lock(&self.child);
                let Some(process) = child.as_mut() else { return "was reaped already".to_owned() };
                match process.try_wait() {
                    Ok(Some(status)) => {
                        child.take();
                        Some(status)
                    }
                    Ok(None) if started.elapsed() > EXIT_GRACE => {
                        let _ = process.kill();
                        let status = process.wait().ok();
                        child.take();
                        return match status {
                            Some(status) => format!("closed its connection, then was {}", self.describe(status)),
                            None => "closed its connection and was killed".to_owned(),
                        };
                    }
                    Ok(None) => None,
                    Err(error) => {
                        child.take();
                        return format!("could not be waited for: {error}");
                    }
                }
            };
            if let Some(status) = status {
                return self.describe(status);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn describe(&self, status: ExitStatus) -> String {
        if let Some(reason) = lock(&self.kill_reason).clone() {
            return reason;
        }
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("killed by {}", signal_name(signal)),
            (None, None) => format!("ended ({status})"),
        }
    }
}

async fn read_reply(reader: &mut OwnedReadHalf) -> std::io::Result<Option<Reply>> {
    let mut prefix = [0; 4];
    // A worker that dies with requests unread in its socket resets the
    // connection: that is an end like any other, not a broken frame.
    let ended = |error: &std::io::Error| {
        matches!(error.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset)
    };
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(error) if ended(&error) => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut body = vec![0; protocol::frame_len(prefix)?];
    match reader.read_exact(&mut body).await {
        Ok(_) => {}
        Err(error) if ended(&error) => return Ok(None),
        Err(error) => return Err(error),
    }
    prost::Message::decode(body.as_slice())
        .map(Some)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

fn answer_name(answer: &Answer) -> &'static str {
    match answer {
        Answer::Loaded(_) => "load result",
        Answer::Failed(_) => "failure",
        Answer::Resources(_) => "resource list",
        Answer::Allocation(_) => "allocation",
        Answer::Preferred(_) => "preferred allocation",
        Answer::Done(_) => "completion",
        Answer::Publish(_) => "device list",
        Answer::Log(_) => "log line",
        Answer::Fault(_) => "fault",
    }
}

/// `SIGSEGV` for 11, etc.
fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Spawns `command` from one thread that lives as long as devhost: the
/// kernel sends `PR_SET_PDEATHSIG` when the spawning *thread* ends, and a
/// runtime's threads come and go.
async fn spawn(command: Command) -> std::io::Result<Child> {
    type Job = (Command, oneshot::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let started = std::thread::Builder::new().name("devhost-spawner".into()).spawn(move || {
            for (mut command, reply) in receiver {
                let _ = reply.send(command.spawn());
            }
        });
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the worker spawner thread");
        }
        Mutex::new(sender)
    });
    let (reply, answer) = oneshot::channel();
    lock(spawner).send((command, reply)).map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?;
    answer.await.map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?
}
