//! The worker process: devhost re-executed as `devhost __worker <backend>`.
//! It loads one native module exactly as an in-process devhost would
//! ([`crate::native`], with the same checks) and serves the protocol of
//! [`super::protocol`] on the socket devhost handed it, until devhost closes
//! the socket (or dies: the kernel then kills the worker).
//!
//! Calls run on a small pool of threads that grows to the number of calls
//! in flight (bounded by devhost's per-backend limit), so one slow call
//! does not hold up another, as in-process. The threads take turns reading
//! the socket, and the thread that read a request answers it: no hand-off
//! between threads on a call's path. Device lists the backend
//! publishes are validated here with the host's own rules (so the module
//! gets the same status codes as in-process) and forwarded; so are log
//! lines and faults on the backend's own threads.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::protocol::{
    Answer, Call, Confine, Empty, Failure, FailureKind, Fault, LogLine, PROTOCOL_VERSION, PreferredAnswer, Publish,
    Reply, Request, Resources, frame_into, read_frame, read_frame_into, release_large,
};
use crate::backend::{Backend, BackendError};
use crate::device_state::{FaultKind, Publisher};

/// The writing half of the socket, shared by every thread that answers,
/// with the buffer frames are encoded into.
#[derive(Clone)]
struct Sender(Arc<Mutex<(UnixStream, Vec<u8>)>>);

impl Sender {
    fn new(stream: UnixStream) -> Self {
        Sender(Arc::new(Mutex::new((stream, Vec::new()))))
    }

    fn send(&self, id: u64, answer: Answer) {
        let reply = Reply { id, answer: Some(answer) };
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (stream, buffer) = &mut *guard;
        frame_into(&reply, buffer);
        // A failed write means devhost is gone; the read loop ends too.
        let _ = stream.write_all(buffer);
        release_large(buffer);
        // The reply is freed after the lock is let go.
        drop(guard);
    }

    fn event(&self, answer: Answer) {
        self.send(0, answer);
    }
}

/// Runs the worker; the exit code is for devhost's log only.
pub fn main() -> ExitCode {
    super::sys::split_off_namespace_init();
    super::sys::default_fault_signals();
    // The process name (`comm`) was `exe`, from `/proc/self/exe`.
    let _ = nix::sys::prctl::set_name(c"devhost-worker");
    let stream = match super::sys::take_socket() {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("devhost worker: {error}");
            return ExitCode::from(2);
        }
    };
    let Ok(writer) = stream.try_clone() else { return ExitCode::FAILURE };
    let sender = Sender::new(writer);
    forward_logs(sender.clone());
    match serve(stream, &sender) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("worker stopped: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(mut stream: UnixStream, sender: &Sender) -> std::io::Result<()> {
    // The worker locks itself down before it reads the module's name, so
    // that none of the module's code (its constructors included) runs
    // with more than the backend's file grants.
    let Some(first) = read_frame::<Request>(&mut stream)? else { return Ok(()) };
    let Some(Call::Confine(confine)) = first.call else {
        let message = format!("the first request must confine the worker (worker protocol {PROTOCOL_VERSION})");
        sender.send(first.id, failure(FailureKind::Protocol, message));
        return Ok(());
    };
    match confine_self(&confine) {
        Ok(summary) => sender.send(first.id, Answer::Confined(summary)),
        Err(message) => {
            sender.send(first.id, failure(FailureKind::Sandbox, message));
            return Ok(());
        }
    }
    let Some(second) = read_frame::<Request>(&mut stream)? else { return Ok(()) };
    let Some(Call::Load(load)) = second.call else {
        sender.send(second.id, failure(FailureKind::Protocol, "the second request must load a module".into()));
        return Ok(());
    };
    if load.protocol != PROTOCOL_VERSION {
        let message = format!("devhost speaks worker protocol {}, this worker {PROTOCOL_VERSION}", load.protocol);
        sender.send(second.id, failure(FailureKind::Protocol, message));
        return Ok(());
    }
    let module = std::path::PathBuf::from(&load.module);
    let backend = match crate::native::load_with_digest(&module, load.sha256.as_deref(), load.config_json) {
        Ok((backend, sha256)) => {
            sender.send(second.id, Answer::Loaded(sha256));
            backend
        }
        Err(error) => {
            sender.send(second.id, failure(FailureKind::Load, error.to_string()));
            return Ok(());
        }
    };
    // devhost closing the socket (after `shutdown`, or to stop us) ends
    // the worker.
    Pool::serve(backend, sender.clone(), stream)
}

/// Applies `confine` to this process; what was applied, or why not. Where
/// the operator allowed running unsandboxed, a refusal is said in the
/// summary instead.
fn confine_self(confine: &Confine) -> Result<String, String> {
    if confine.disabled {
        return Ok(format!("{} (unsandboxed = \"always\")", super::NOT_LOCKED_DOWN));
    }
    let capabilities = confine
        .capabilities
        .iter()
        .map(|name| super::lockdown::parse_capability(name))
        .collect::<Result<Vec<_>, _>>()?;
    let lockdown =
        super::lockdown::Lockdown { capabilities, uid: confine.uid, gid: confine.gid, seccomp: confine.seccomp };
    match super::lockdown::apply(&lockdown) {
        Ok(applied) => Ok(applied.summary),
        Err(error) if confine.allow_unsandboxed => Ok(format!("{} ({error})", super::NOT_LOCKED_DOWN)),
        Err(error) => Err(error),
    }
}

fn failure(kind: FailureKind, message: String) -> Answer {
    Answer::Failed(Failure { kind: kind as i32, message })
}

/// Answers one request on a pool thread.
fn answer(backend: &dyn Backend, sender: &Sender, call: Call) -> Answer {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match call {
        Call::Init(_) => {
            let publisher = Publisher::default();
            let forward = sender.clone();
            publisher.forward(Arc::new(move |resource, devices| {
                let devices = devices.iter().map(Into::into).collect();
                forward.event(Answer::Publish(Publish { resource: resource.to_owned(), devices }));
            }));
            let faults = sender.clone();
            publisher.on_fault(Arc::new(move |fault| {
                let (operation, message) = (fault.operation.to_owned(), fault.message);
                // Only invalid lists reach here: a backend's own thread
                // cannot panic into the publisher.
                debug_assert_eq!(fault.kind, FaultKind::InvalidData);
                faults.event(Answer::Fault(Fault { operation, message }));
            }));
            backend.init(publisher.clone()).map(|specs| {
                let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
                let states = publisher.seal(&names);
                // ABI 1.2: what a device published later consumes is checked
                // here too, so the module gets DEVHOST_E_INVALID as it would
                // in devhost's process. A device published during init that
                // breaks them is devhost's to refuse (it checks the same
                // sets, after checking the sets themselves).
                for (spec, state) in specs.iter().zip(&states) {
                    let _ = state.declare_counter_sets(spec.counter_sets.clone());
                }
                Answer::Resources(Resources {
                    resources: specs.iter().map(Into::into).collect(),
                    polls: backend.polls(),
                })
            })
        }
        Call::Allocate(call) => {
            // ABI 1.2: with shares, the module's allocate_shared (where it
            // has one); without, its allocate, as always.
            let shares: Vec<(String, crate::model::Share)> = call.shares.into_iter().map(Into::into).collect();
            backend.allocate_shared(&call.resource, &call.ids, &shares).map(|a| Answer::Allocation(a.into()))
        }
        Call::Preferred(call) => backend
            .preferred_allocation(&call.resource, &call.request())
            .map(|ids| Answer::Preferred(PreferredAnswer { answered: ids.is_some(), ids: ids.unwrap_or_default() })),
        Call::PreStart(call) => backend.pre_start(&call.resource, &call.ids).map(|()| Answer::Done(Empty {})),
        Call::Release(call) => backend.release(&call.resource, &call.ids).map(|()| Answer::Done(Empty {})),
        Call::Poll(_) => backend.poll().map(|()| Answer::Done(Empty {})),
        Call::Shutdown(_) => {
            backend.shutdown();
            Ok(Answer::Done(Empty {}))
        }
        Call::Load(_) => Err(BackendError::new("the module is already loaded")),
        Call::Confine(_) => Err(BackendError::new("the worker is already confined")),
    }));
    match outcome {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) if error.fault => failure(FailureKind::Invalid, error.message),
        Ok(Err(error)) => failure(FailureKind::Declined, error.message),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-string payload".to_owned());
            failure(FailureKind::Panicked, message)
        }
    }
}

/// Threads that answer requests, leader/follower style: one thread at a
/// time reads the socket; having read a request it lets the next thread
/// read, and answers the request itself. A thread is added whenever none
/// is left to read, so calls in flight never wait for each other.
struct Pool {
    backend: Arc<dyn Backend>,
    sender: Sender,
    /// The socket, with the buffer a request's frame is read into.
    reader: Mutex<(UnixStream, Vec<u8>)>,
    /// Threads not running a call (reading, or waiting to read).
    idle: AtomicUsize,
    /// Where the thread that meets the end of the stream says so.
    ended: Mutex<std::sync::mpsc::Sender<std::io::Result<()>>>,
}

impl Pool {
    /// Serves requests until the stream ends; returns how it ended.
    fn serve(backend: Arc<dyn Backend>, sender: Sender, stream: UnixStream) -> std::io::Result<()> {
        let (ended, end) = std::sync::mpsc::channel();
        let pool = Arc::new(Pool {
            backend,
            sender,
            reader: Mutex::new((stream, Vec::new())),
            idle: AtomicUsize::new(0),
            ended: Mutex::new(ended),
        });
        pool.add_thread();
        // Every pool thread holds a sender, so this waits for an end.
        end.recv().unwrap_or(Ok(()))
    }

    fn add_thread(self: &Arc<Self>) {
        self.idle.fetch_add(1, Ordering::SeqCst);
        let pool = self.clone();
        if let Err(error) = std::thread::Builder::new().name("devhost-call".into()).spawn(move || pool.work()) {
            self.idle.fetch_sub(1, Ordering::SeqCst);
            self.end(Err(error));
        }
    }

    fn end(&self, how: std::io::Result<()>) {
        let _ = self.ended.lock().unwrap_or_else(PoisonError::into_inner).send(how);
    }

    fn work(self: Arc<Self>) {
        loop {
            let read = {
                let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
                let (stream, body) = &mut *reader;
                read_frame_into::<Request>(stream, body)
            };
            let request = match read {
                Ok(Some(request)) => request,
                Ok(None) => return self.end(Ok(())),
                Err(error) => return self.end(Err(error)),
            };
            // The last idle thread is about to be busy: start the next
            // reader before answering.
            if self.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.add_thread();
            }
            let answer = match request.call {
                Some(call) => answer(self.backend.as_ref(), &self.sender, call),
                None => failure(FailureKind::Protocol, "empty request".into()),
            };
            self.sender.send(request.id, answer);
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Sends every log event of this process (the module's, through the host
/// callback, and the loader's) to devhost, which logs it under the
/// backend's name.
fn forward_logs(sender: Sender) {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(LogForwarder(sender));
    let _ = tracing::subscriber::set_global_default(subscriber);
}

struct LogForwarder(Sender);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogForwarder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => 0,
            tracing::Level::WARN => 1,
            tracing::Level::INFO => 2,
            _ => 3,
        };
        let mut text = TextVisitor::default();
        event.record(&mut text);
        self.0.event(Answer::Log(LogLine { level, text: text.finish() }));
    }
}

/// The event's message, then its other fields as `key=value`.
#[derive(Default)]
struct TextVisitor {
    message: String,
    fields: Vec<String>,
}

impl TextVisitor {
    fn finish(self) -> String {
        if self.fields.is_empty() { self.message } else { format!("{} {}", self.message, self.fields.join(" ")) }
    }
}

impl tracing::field::Visit for TextVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else if field.name() != "backend" {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else if field.name() != "backend" {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }
}
