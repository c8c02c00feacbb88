//! GPU health: a state machine per GPU ([`HealthTracker`]) and the loop
//! that feeds it ([`monitor`]) on the backend's own thread.
//!
//! * A critical XID (per [`XidPolicy`]) makes a GPU Unhealthy; an ignored
//!   one is logged and changes nothing.
//! * Every `interval` every GPU is probed through NVML. A Healthy GPU whose
//!   probe fails becomes Unhealthy. An Unhealthy GPU becomes Healthy again
//!   when a probe succeeds at least `interval` after its last critical XID
//!   (so a GPU that keeps raising XIDs stays out).
//! * A failure to wait for events probes every GPU at once.
//!
//! Each transition is logged with its reason and published as the whole
//! device list.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use devhost_abi::sdk::{Device, Health, LogLevel};

use crate::model::{Event, EventSource, Gpu, GpuSource};
use crate::xid::{XidPolicy, describe};

/// The longest single wait for events, so that shutdown is prompt.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// Where device lists and log lines go: the host, or a recorder in tests.
pub use devhost_abi::sdk::HostApi as Sink;

/// A change of one GPU's health, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The GPU's UUID.
    pub uuid: String,
    /// The new health.
    pub health: Health,
    /// Why, for the log.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Healthy,
    Unhealthy { reason: String, last_fault: Instant },
}

/// The health of every GPU, driven by XIDs and probes.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    policy: XidPolicy,
    quiet: Duration,
    states: Vec<(String, State)>,
}

impl HealthTracker {
    /// All `uuids` Healthy.
    pub fn new(uuids: impl IntoIterator<Item = String>, policy: XidPolicy, quiet: Duration) -> Self {
        HealthTracker { policy, quiet, states: uuids.into_iter().map(|u| (u, State::Healthy)).collect() }
    }

    fn state(&mut self, uuid: &str) -> Option<&mut State> {
        self.states.iter_mut().find(|(u, _)| u == uuid).map(|(_, s)| s)
    }

    /// The current health of a GPU (`Unhealthy` for an unknown one).
    pub fn health(&self, uuid: &str) -> Health {
        match self.states.iter().find(|(u, _)| u == uuid) {
            Some((_, State::Healthy)) => Health::Healthy,
            _ => Health::Unhealthy,
        }
    }

    /// Whether the policy makes this XID critical.
    pub fn is_critical(&self, xid: Option<u64>) -> bool {
        self.policy.is_critical(xid)
    }

    /// A critical-XID event on `uuid`. Returns the transition, if any; an
    /// ignored XID, an unknown GPU, or a GPU already Unhealthy (whose quiet
    /// period starts again) give none.
    pub fn on_xid(&mut self, uuid: &str, xid: Option<u64>, now: Instant) -> Option<Transition> {
        if !self.policy.is_critical(xid) {
            return None;
        }
        let reason = describe(xid);
        let state = self.state(uuid)?;
        let was_healthy = *state == State::Healthy;
        *state = State::Unhealthy { reason: reason.clone(), last_fault: now };
        was_healthy.then(|| Transition { uuid: uuid.to_owned(), health: Health::Unhealthy, reason })
    }

    /// A probe result for `uuid`.
    pub fn on_probe(&mut self, uuid: &str, result: Result<(), String>, now: Instant) -> Option<Transition> {
        let quiet = self.quiet;
        let state = self.state(uuid)?;
        match (&*state, result) {
            (State::Healthy, Ok(())) => None,
            (State::Healthy, Err(error)) => {
                let reason = format!("NVML probe failed: {error}");
                *state = State::Unhealthy { reason: reason.clone(), last_fault: now };
                Some(Transition { uuid: uuid.to_owned(), health: Health::Unhealthy, reason })
            }
            (State::Unhealthy { reason, last_fault }, Ok(()))
                if now.saturating_duration_since(*last_fault) >= quiet =>
            {
                let reason = format!("NVML reports it usable again (it was Unhealthy: {reason})");
                *state = State::Healthy;
                Some(Transition { uuid: uuid.to_owned(), health: Health::Healthy, reason })
            }
            (State::Unhealthy { .. }, Ok(())) => None,
            (State::Unhealthy { last_fault, .. }, Err(error)) => {
                // Still broken: keep the fault time, record the latest reason.
                let last_fault = *last_fault;
                *state = State::Unhealthy { reason: format!("NVML probe failed: {error}"), last_fault };
                None
            }
        }
    }

    /// The device list for `gpus` in their current health.
    pub fn devices(&self, gpus: &[Gpu]) -> Vec<Device> {
        gpus.iter().map(|gpu| crate::attributes::device(gpu, self.health(&gpu.uuid))).collect()
    }
}

/// What the monitor needs besides its event source.
pub struct Monitor<'a> {
    /// Probes GPUs.
    pub source: &'a dyn GpuSource,
    /// Receives device lists and log lines.
    pub sink: &'a dyn Sink,
    /// The resource the GPUs are published as.
    pub resource: &'a str,
    /// The GPUs, in published order.
    pub gpus: &'a [Gpu],
    /// What is published for each GPU (its MIG partitions, if any): they
    /// share their GPU's health.
    pub layout: &'a crate::mig::Layout,
    /// Their health.
    pub tracker: HealthTracker,
    /// How often every GPU is probed.
    pub interval: Duration,
}

fn log_transition(sink: &dyn Sink, gpus: &[Gpu], t: &Transition) {
    let index = gpus.iter().find(|g| g.uuid == t.uuid).map_or(String::new(), |g| format!(" (index {})", g.index));
    let (level, state) = match t.health {
        Health::Healthy => (LogLevel::Info, "Healthy"),
        Health::Unhealthy => (LogLevel::Warn, "Unhealthy"),
    };
    sink.log(level, &format!("GPU {}{index} is now {state}: {}", t.uuid, t.reason));
}

/// Watches `events` and probes GPUs until `stop` receives or disconnects,
/// publishing the device list after every transition.
pub fn monitor(mut m: Monitor<'_>, events: &mut dyn EventSource, stop: &Receiver<()>) {
    let mut next_probe = Instant::now() + m.interval;
    loop {
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return;
        }
        let timeout = next_probe.saturating_duration_since(Instant::now()).min(MAX_WAIT);
        let mut changed = false;
        let mut probe_all = false;
        match events.wait(timeout) {
            Event::Xid { uuid, xid } => {
                if !m.tracker.is_critical(xid) {
                    m.sink
                        .log(LogLevel::Info, &format!("GPU {uuid}: ignoring {} (an application error)", describe(xid)));
                } else if let Some(t) = m.tracker.on_xid(&uuid, xid, Instant::now()) {
                    log_transition(m.sink, m.gpus, &t);
                    changed = true;
                } else {
                    m.sink.log(LogLevel::Warn, &format!("GPU {uuid}: {} while Unhealthy", describe(xid)));
                }
            }
            Event::Timeout => {}
            Event::Failed(error) => {
                m.sink.log(LogLevel::Warn, &format!("waiting for NVML events failed: {error}; probing every GPU"));
                probe_all = true;
                // Do not spin if the failure repeats at once.
                if !matches!(stop.recv_timeout(timeout.max(Duration::from_millis(50))), Err(RecvTimeoutError::Timeout))
                {
                    return;
                }
            }
        }
        let now = Instant::now();
        if probe_all || now >= next_probe {
            for gpu in m.gpus {
                if let Some(t) = m.tracker.on_probe(&gpu.uuid, m.source.probe(&gpu.uuid), now) {
                    log_transition(m.sink, m.gpus, &t);
                    changed = true;
                }
            }
            next_probe = now + m.interval;
        }
        let devices = || m.layout.devices(m.gpus, |uuid| m.tracker.health(uuid));
        if changed && let Err(error) = m.sink.publish(m.resource, &devices()) {
            m.sink.log(LogLevel::Error, &format!("publishing the GPUs' health failed: {error}"));
        }
    }
}

#[cfg(test)]
mod tests;
