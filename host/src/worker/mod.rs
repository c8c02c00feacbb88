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
use protocol::{Answer, Call, Confine, DevicesCall, Empty, FailureKind, Load, PreferredCall, Reply, Request};

pub mod cgroup;
pub mod child;
#[allow(unsafe_code)]
pub mod lockdown;
mod output;
pub mod protocol;
#[allow(unsafe_code)]
mod sys;

/// The hidden subcommand that turns the devhost binary into a worker.
pub const WORKER_SUBCOMMAND: &str = "__worker";

/// How a worker's summary of its confinement begins when the kernel
/// refused it and the backend's file allowed running without.
pub(crate) const NOT_LOCKED_DOWN: &str = "NOT locked down";

/// Loading a module (and spawning its worker) may take longer than a call.
const MIN_LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker gets to exit after its socket is closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long a stopping worker, once killed, may take to be reaped and its
/// cgroup removed.
const REAP_PATIENCE: Duration = Duration::from_secs(4);

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

/// What a worker loads, and the sandbox it runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// The backend's name (its file's stem).
    pub backend: String,
    /// The backend's file (named in errors about its sandbox keys).
    pub file: PathBuf,
    /// The module file.
    pub module: PathBuf,
    /// Optional SHA-256 pin.
    pub sha256: Option<String>,
    /// The backend's `[config]` as JSON.
    pub config_json: String,
    /// The sandbox the worker runs in.
    pub sandbox: crate::config::WorkerSandbox,
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

    /// What the current worker's sandbox is (for `devhost list`).
    pub fn sandbox(&self) -> Option<String> {
        let current = lock(&self.current).clone().or_else(|| lock(&self.prepared).clone());
        current.and_then(|worker| worker.sandbox.get().cloned())
    }

    /// The current worker's process ID (for tests and `devhost list`).
    /// (In a PID namespace, the worker proper, not its namespace's init.)
    pub fn pid(&self) -> Option<u32> {
        lock(&self.current).as_ref().map(|worker| worker.serving_pid())
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

    /// `allocate` in the current worker, with what a DRA claim consumes of
    /// the shared devices among `ids` (ABI 1.2; empty for a plain
    /// `allocate`). The device statuses the worker sends back are checked
    /// again here (each of one of `ids`, within the API server's limits):
    /// the worker checked them, but a module that writes frames itself
    /// could send anything.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: Vec<String>,
        shares: Vec<(String, crate::model::Share)>,
    ) -> Result<Allocation, CallError> {
        let worker = self.current("allocate")?;
        let shares = shares.iter().map(Into::into).collect();
        let call = Call::Allocate(DevicesCall { resource: resource.to_owned(), ids: ids.clone(), shares });
        match worker.request("allocate", call, self.spec.timeout).await {
            Ok(Answer::Allocation(allocation)) => {
                let allocation: Allocation = allocation.into();
                for (id, status) in &allocation.device_status {
                    let why = if ids.contains(id) {
                        devhost_abi::partitions::check_device_status(status).err()
                    } else {
                        Some(format!("not one of the call's {ids:?}"))
                    };
                    if let Some(why) = why {
                        return Err(CallError::Invalid {
                            backend: self.spec.backend.clone(),
                            operation: "allocate",
                            message: format!("the status of device {id:?}: {why}"),
                        });
                    }
                }
                Ok(allocation)
            }
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
        let call = Call::PreStart(DevicesCall { resource: resource.to_owned(), ids, shares: Vec::new() });
        self.done("pre_start", call).await
    }

    /// `release` (ABI 1.1) in the current worker.
    pub async fn release(&self, resource: &str, ids: Vec<String>) -> Result<(), CallError> {
        let call = Call::Release(DevicesCall { resource: resource.to_owned(), ids, shares: Vec::new() });
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
    /// Its cgroup, until it is reaped; `None` where the kernel refused one
    /// and the operator allowed running without.
    cgroup: Mutex<Option<cgroup::WorkerCgroup>>,
    /// Where its namespace's init writes how the worker itself ended.
    status: Mutex<Option<std::fs::File>>,
    /// Set once it is reaped and its cgroup removed.
    reaped: tokio::sync::watch::Sender<bool>,
    /// The cgroup's memory limit, for the cause of an OOM kill.
    memory_mb: u64,
    /// What its sandbox is, for the log and `devhost list`.
    sandbox: OnceLock<String>,
    /// Of the bytes the worker loaded; set once loaded.
    sha256: OnceLock<String>,
    /// `None` once reaped.
    child: Mutex<Option<Child>>,
    /// Devhost's end of the socket (`None` once closed), with the buffer
    /// requests are encoded into.
    writer: tokio::sync::Mutex<(Option<OwnedWriteHalf>, Vec<u8>)>,
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
    /// Spawns a worker in its sandbox and loads the module; the error is
    /// the loader's message, or which part of the sandbox the kernel
    /// refused (or why the worker could not start).
    async fn start(spec: &WorkerSpec) -> Result<Arc<Worker>, String> {
        let sandbox = &spec.sandbox;
        let mut missing = Vec::new();
        let refused = |what: String| -> String {
            format!(
                "{what}; the worker was not started (set unsandboxed = \"allow\" in {} to run it without)",
                spec.file.display()
            )
        };
        let limits = cgroup::Limits { memory_bytes: sandbox.memory_mb << 20, pids: sandbox.pids_max };
        let backend = spec.backend.clone();
        let created = if sandbox.disabled {
            Err("unsandboxed = \"always\"".to_owned())
        } else {
            tokio::task::spawn_blocking(move || cgroup::WorkerCgroup::create(&backend, &limits))
                .await
                .unwrap_or_else(|error| Err(format!("creating the worker's cgroup did not finish: {error}")))
        };
        let mut cgroup = match created {
            Ok(cgroup) => Some(cgroup),
            Err(error) if sandbox.allow_unsandboxed => {
                missing.push(format!("no cgroup, so no memory or pids limit ({error})"));
                None
            }
            Err(error) => return Err(refused(error)),
        };
        let (host, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|error| format!("cannot create the worker's socket: {error}"))?;
        let mut command = Command::new(executable());
        // `ps` shows `devhost __worker <backend>`, not `/proc/self/exe …`.
        command.arg0("devhost").arg(WORKER_SUBCOMMAND).arg(&spec.backend).stdin(Stdio::null());
        // The module's stdout and stderr are data for devhost's log, never
        // raw lines in it ([`output`]).
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (status, status_writer) =
            sys::status_pipe().map_err(|error| format!("cannot create the worker's status pipe: {error}"))?;
        let joiner = match cgroup.as_ref().map(cgroup::WorkerCgroup::joiner).transpose() {
            Ok(joiner) => joiner.unwrap_or_default(),
            Err(error) if sandbox.allow_unsandboxed => {
                missing.push(format!("not in its cgroup, so no memory or pids limit ({error})"));
                cgroup = None;
                Vec::new()
            }
            Err(error) => return Err(refused(error)),
        };
        sys::prepare_child(&mut command, &theirs, &status_writer, &joiner);
        let (mut child, namespace) = spawn(command, !sandbox.disabled)
            .await
            .map_err(|error| format!("cannot start a worker process (in its cgroup): {error}"))?;
        drop(joiner);
        drop(theirs);
        drop(status_writer);
        let pid = child.id();
        output::start(&spec.backend, pid, child.stdout.take(), child.stderr.take());
        let mut child = Some(child);
        let mut give_up = |why: String| {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            why
        };
        let namespaced = match namespace {
            Ok(()) => true,
            Err(error) if sandbox.allow_unsandboxed => {
                missing.push(format!("no PID namespace ({error})"));
                false
            }
            Err(error) => return Err(refused(give_up(error))),
        };
        let Some(child) = child else { unreachable!("the child is only taken to give up") };
        host.set_nonblocking(true).map_err(|error| format!("cannot use the worker's socket: {error}"))?;
        let stream = tokio::net::UnixStream::from_std(host)
            .map_err(|error| format!("cannot use the worker's socket: {error}"))?;
        let (reader, writer) = stream.into_split();
        let worker = Arc::new(Worker {
            backend: spec.backend.clone(),
            pid,
            cgroup: Mutex::new(cgroup),
            status: Mutex::new(Some(status)),
            reaped: tokio::sync::watch::Sender::new(false),
            memory_mb: sandbox.memory_mb,
            sandbox: OnceLock::new(),
            sha256: OnceLock::new(),
            child: Mutex::new(Some(child)),
            writer: tokio::sync::Mutex::new((Some(writer), Vec::new())),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            publisher: Mutex::new(None),
            stopping: AtomicBool::new(false),
            kill_reason: Mutex::new(None),
        });
        tokio::spawn(worker.clone().read_loop(reader));
        let timeout = spec.timeout.max(MIN_LOAD_TIMEOUT);
        let confine = Confine {
            capabilities: sandbox.capabilities.clone(),
            uid: sandbox.uid,
            gid: sandbox.gid,
            seccomp: sandbox.seccomp,
            allow_unsandboxed: sandbox.allow_unsandboxed,
            disabled: sandbox.disabled,
        };
        let confined = match worker.request("confine", Call::Confine(confine), timeout).await {
            Ok(Answer::Confined(summary)) => summary,
            Ok(Answer::Failed(failure)) => {
                worker.kill("it could not be confined");
                return Err(refused(failure.message));
            }
            other => {
                worker.kill("it could not be confined");
                return Err(worker.unexpected("confine", other).to_string());
            }
        };
        let locked_down = !confined.starts_with(NOT_LOCKED_DOWN);
        if !locked_down {
            missing.push(confined.clone());
        }
        let in_cgroup = lock(&worker.cgroup).is_some();
        crate::telemetry::global().worker_sandbox(
            &spec.backend,
            &[("pid_namespace", namespaced), ("cgroup", in_cgroup), ("lockdown", locked_down)],
            &missing,
        );
        let description = worker.describe_sandbox(namespaced, if locked_down { &confined } else { "" }, &missing);
        let _ = worker.sandbox.set(description.clone());
        if !missing.is_empty() {
            tracing::warn!(backend = %spec.backend, pid, missing = %missing.join("; "), "worker runs without part of its sandbox (unsandboxed = \"allow\")");
        }
        let load = Load {
            protocol: protocol::PROTOCOL_VERSION,
            backend: spec.backend.clone(),
            module: spec.module.display().to_string(),
            sha256: spec.sha256.clone(),
            config_json: spec.config_json.clone(),
        };
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
        let (init, pid) = (pid, worker.serving_pid());
        tracing::info!(backend = %spec.backend, pid, init, sha256, module = %spec.module.display(), sandbox = %description, "worker started; module loaded");
        let _ = worker.sha256.set(sha256);
        Ok(worker)
    }

    /// The process serving the protocol: in a PID namespace the init's
    /// child (the init only waits), else the process devhost started.
    fn serving_pid(&self) -> u32 {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .ok()
            .and_then(|children| children.split_whitespace().next()?.parse().ok())
            .unwrap_or(self.pid)
    }

    /// One line saying what the worker's sandbox is.
    fn describe_sandbox(&self, namespaced: bool, confined: &str, missing: &[String]) -> String {
        let mut parts = Vec::new();
        if namespaced {
            parts.push("own PID namespace and session".to_owned());
        }
        if let Some(cgroup) = lock(&self.cgroup).as_ref() {
            parts.push(cgroup.describe());
        }
        if !confined.is_empty() {
            parts.push(confined.to_owned());
        }
        if !missing.is_empty() {
            parts.push(format!("MISSING: {}", missing.join("; ")));
        }
        parts.join(", ")
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
        let request = Request { id, call: Some(call) };
        let exchange = async {
            {
                let mut writer = self.writer.lock().await;
                let (half, buffer) = &mut *writer;
                if let Some(half) = half.as_mut() {
                    protocol::frame_into(&request, buffer);
                    // A failed write means the worker is gone: its read
                    // loop answers every waiter with how it died.
                    let _ = half.write_all(buffer).await;
                    protocol::release_large(buffer);
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
                Ok(FailureKind::Declined | FailureKind::Load | FailureKind::Sandbox) => {
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
    /// Waits until it is reaped and its cgroup removed (bounded), so that
    /// devhost stopping leaves nothing of it behind.
    async fn close(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(mut writer) = self.writer.lock().await.0.take() {
            let _ = writer.shutdown().await;
        }
        let mut reaped = self.reaped.subscribe();
        if tokio::time::timeout(EXIT_GRACE, reaped.wait_for(|reaped| *reaped)).await.is_err() {
            self.kill("did not exit after its shutdown");
            // Killed: the read loop reaps it and empties its cgroup (that
            // takes at most a few seconds, see `WorkerCgroup::remove`).
            let _ = tokio::time::timeout(REAP_PATIENCE, reaped.wait_for(|reaped| *reaped)).await;
        }
    }

    /// Reads answers and events until the worker's end closes, then reaps
    /// it and tells every waiter (or, if none, the backend) how it died.
    /// A worker that breaks the protocol (a frame that is empty, does not
    /// decode, carries no answer, answers a request never sent or is an
    /// unasked answer) is killed at its first such frame, with that as the
    /// reason: the module writes to its socket itself, and a flood of junk
    /// would otherwise cost devhost a CPU for nothing.
    async fn read_loop(self: Arc<Self>, reader: OwnedReadHalf) {
        // Most frames arrive whole in one read; the body buffer is kept.
        let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
        let mut body = Vec::new();
        let broken = loop {
            match read_reply(&mut reader, &mut body).await {
                Ok(Some(reply)) if reply.id >= self.next_id.load(Ordering::Relaxed) => {
                    let message = format!("answered request {}, which devhost never sent", reply.id);
                    break Some(std::io::Error::new(std::io::ErrorKind::InvalidData, message));
                }
                Ok(Some(reply)) => self.dispatch(reply),
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        // Killed now rather than left to exit: it may never close its end.
        // A worker devhost was stopping anyway is no fault of the backend.
        let killed_for_breaking = broken.is_some_and(|error| {
            let unasked = !self.stopping.load(Ordering::SeqCst);
            if error.kind() == std::io::ErrorKind::InvalidData {
                self.kill(&format!("killed for breaking the worker protocol: it {error}"));
            } else {
                self.kill(&format!("killed after reading its socket failed: {error}"));
            }
            unasked
        });
        // The calls in flight now are the ones it died in; later calls are
        // refused while it is reaped.
        let waiting = {
            let mut pending = lock(&self.pending);
            pending.ended = true;
            std::mem::take(&mut pending.waiting)
        };
        let worker = self.clone();
        let cause = tokio::task::spawn_blocking(move || worker.reap())
            .await
            .unwrap_or_else(|error| format!("could not be reaped: {error}"));
        lock(&self.pending).died = Some(cause.clone());
        self.reaped.send_replace(true);
        let idle = waiting.is_empty();
        for (_, waiter) in waiting {
            let _ = waiter.send(Err(cause.clone()));
        }
        if idle && (killed_for_breaking || !self.stopping.load(Ordering::SeqCst)) {
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
                // Limited here too: a hostile module can write frames
                // itself, past the limit at the source.
                let limiter = crate::log_limit::api_log(&self.backend);
                let verdict = limiter.check();
                if let Some(dropped) = verdict.summary {
                    tracing::warn!(backend = %self.backend, dropped, "{}", crate::log_limit::LOG_DROPPED);
                }
                if !verdict.admit {
                    return;
                }
                if let Some(dropped) = crate::log_limit::forwarded_dropped(&line.text) {
                    limiter.count_forwarded(dropped, std::time::Instant::now());
                }
                let max = limiter.policy().max_line;
                let (backend, text) =
                    (&self.backend, crate::log_limit::cut(line.text.as_bytes(), line.text.len(), max));
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

    /// How the worker proper ended, as its namespace's init saw it; `None`
    /// where it had no init (no namespace) or the init was killed first.
    fn worker_status(&self) -> Option<ExitStatus> {
        use std::io::Read;
        let mut status = lock(&self.status).take()?;
        let mut text = String::new();
        // The init has exited (it was reaped): the pipe holds all there is.
        status.read_to_string(&mut text).ok()?;
        text.trim().parse().ok().map(ExitStatus::from_raw)
    }

    /// Waits for the process to end and says how it ended (see
    /// [`wait_for_exit`](Self::wait_for_exit)), then kills whatever is
    /// left in its cgroup and removes it.
    fn reap(&self) -> String {
        let cause = self.wait_for_exit();
        let cgroup = lock(&self.cgroup).take();
        if let Some(cgroup) = cgroup
            && let Err(error) = cgroup.remove()
        {
            tracing::warn!(backend = %self.backend, pid = self.pid, %error, "the ended worker's cgroup could not be removed");
        }
        cause
    }

    /// Waits for the process to end (its socket closed, so it is exiting)
    /// and says how it ended. One that closed its socket but lives on is
    /// killed after a grace period.
    fn wait_for_exit(&self) -> String {
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
        let status = self.worker_status().unwrap_or(status);
        let oom_kills = lock(&self.cgroup).as_ref().map_or(0, cgroup::WorkerCgroup::oom_kills);
        if oom_kills > 0 && status.signal() == Some(libc::SIGKILL) {
            crate::telemetry::global().worker_oom_killed(&self.backend);
            return format!("out of memory: killed by the kernel at its cgroup's limit of {} MiB", self.memory_mb);
        }
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("killed by {}", signal_name(signal)),
            (None, None) => format!("ended ({status})"),
        }
    }
}

/// What devhost reads from a worker's socket at once.
const READ_BUFFER: usize = 16 * 1024;

/// Reads one reply, its body into `body` (kept between replies). `Ok(None)`
/// at the end of the stream; an error of kind `InvalidData` says what rule
/// of the protocol the frame broke, as in "(it) sent an empty frame":
/// every frame carries an answer, and one with ID 0 (not an answer to a
/// request) only an event (a device list, a fault, a log line).
async fn read_reply(
    reader: &mut tokio::io::BufReader<OwnedReadHalf>,
    body: &mut Vec<u8>,
) -> std::io::Result<Option<Reply>> {
    let broken = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidData, message);
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
    let len = protocol::frame_len(prefix).map_err(|error| broken(format!("sent an oversized frame: {error}")))?;
    if len == 0 {
        return Err(broken("sent an empty frame (a zero length prefix; every frame carries an answer)".to_owned()));
    }
    body.resize(len, 0);
    let read = reader.read_exact(body).await;
    let decoded = read.map(|_| prost::Message::decode(body.as_slice()));
    protocol::release_large(body);
    let reply: Reply = match decoded {
        Ok(decoded) => {
            decoded.map_err(|error| broken(format!("sent a frame that does not decode ({len} bytes): {error}")))?
        }
        Err(error) if ended(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    match &reply.answer {
        None => Err(broken(format!("sent a frame without an answer ({len} bytes)"))),
        Some(Answer::Publish(_) | Answer::Fault(_) | Answer::Log(_)) => Ok(Some(reply)),
        Some(other) if reply.id == 0 => Err(broken(format!("sent an unasked {}", answer_name(other)))),
        Some(_) => Ok(Some(reply)),
    }
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
        Answer::Confined(_) => "confinement summary",
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
/// runtime's threads come and go. That thread also gives each worker a
/// PID namespace of its own (a namespace for children is a property of
/// the thread that forks). Returns the child, and whether it got its
/// namespace (or why not).
async fn spawn(command: Command, pid_namespace: bool) -> std::io::Result<(Child, Result<(), String>)> {
    type Spawned = std::io::Result<(Child, Result<(), String>)>;
    type Job = (Command, bool, oneshot::Sender<Spawned>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let started = std::thread::Builder::new().name("devhost-spawner".into()).spawn(move || {
            sys::remember_own_pid_namespace();
            for (mut command, pid_namespace, reply) in receiver {
                let namespace = if pid_namespace {
                    sys::new_pid_namespace_for_children()
                } else {
                    Err("unsandboxed = \"always\"".to_owned())
                };
                let spawned = command.spawn();
                if namespace.is_ok()
                    && let Err(error) = sys::own_pid_namespace_for_children()
                {
                    // Every later worker would fail to start: say so once, loudly.
                    tracing::error!(%error, "the worker spawner cannot return to devhost's PID namespace");
                }
                let _ = reply.send(spawned.map(|child| (child, namespace)));
            }
        });
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the worker spawner thread");
        }
        Mutex::new(sender)
    });
    let (reply, answer) = oneshot::channel();
    lock(spawner)
        .send((command, pid_namespace, reply))
        .map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?;
    answer.await.map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?
}
