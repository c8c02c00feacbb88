//! Asks the kubelet who holds what on an interval and publishes each
//! answer, following the socket across kubelet restarts.
//!
//! The answer is peer-sized (every pod on the node, every device ID), so
//! the follower runs on a thread of its own with its own runtime: decoding
//! and indexing a huge answer never takes a thread the device-plugin and
//! DRA servers answer on. It also paces itself by what an answer cost: the
//! next call waits at least [`PACE`] times as long as the last one took.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::PodResourcesClient;
use super::{Assignments, AssignmentsWatch, PodResourcesSettings};
use crate::sockets::FileIdentity;
use crate::telemetry;

/// The longest wait between two calls while the kubelet rate-limits us.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A call taking `t` is followed by a wait of at least `PACE × t`: the
/// follower uses at most about a tenth of a CPU, whatever the answer.
const PACE: u32 = 10;

/// Starts following the PodResources API; the receiver sees `None` until
/// the first answer and whenever the API cannot be read. With no socket
/// configured nothing is started and the receiver stays `None`.
pub fn follow(settings: &PodResourcesSettings, shutdown: CancellationToken) -> AssignmentsWatch {
    let (sender, receiver) = watch::channel(None);
    let Some(socket) = settings.socket.clone() else {
        tracing::info!(
            "the PodResources client is off: devices are never released, devhost_devices_in_use is not reported"
        );
        return receiver;
    };
    let settings = settings.clone();
    let follower = async move {
        let mut client = PodResourcesClient::new(&socket, settings.timeout);
        let mut identity = FileIdentity::of(&socket);
        let mut untrusted_until: Option<Instant> = None;
        // Whether the last call answered; `None` before the first.
        let mut up: Option<bool> = None;
        let mut answered = false;
        let mut wait = settings.interval;
        loop {
            let now_identity = FileIdentity::of(&socket);
            if now_identity != identity {
                client.reset();
                // A new socket after the API had answered is a restarted
                // kubelet (the grace starts when it is back, however long
                // it was away).
                if now_identity.is_some() && answered {
                    untrusted_until = Some(Instant::now() + settings.restart_grace);
                    tracing::info!(socket = %socket.display(), grace = ?settings.restart_grace, "the kubelet's PodResources socket was replaced (a kubelet restart): no device counts as released until the grace has passed");
                }
                identity = now_identity;
            }
            let asked = Instant::now();
            let answer = client.holdings().await;
            let took = asked.elapsed();
            match answer {
                Ok(holdings) => {
                    if up != Some(true) {
                        tracing::info!(socket = %socket.display(), "the kubelet's PodResources API answers: devhost follows which containers hold its devices");
                    }
                    up = Some(true);
                    answered = true;
                    wait = settings.interval;
                    let trusted = untrusted_until.is_none_or(|until| Instant::now() >= until);
                    let assignments = Assignments { holdings, trusted };
                    sender.send_if_modified(|current| {
                        let changed = current.as_deref() != Some(&assignments);
                        if changed {
                            *current = Some(Arc::new(assignments));
                        }
                        changed
                    });
                }
                Err(error) if error.is_rate_limited() => {
                    // The last answer still stands; ask less often.
                    wait = (wait * 2).min(MAX_BACKOFF);
                    tracing::warn!(%error, retry_in = ?wait, "rate-limited by the kubelet; asking less often");
                }
                Err(error) => {
                    if up != Some(false) {
                        tracing::warn!(%error, "who holds which device is unknown until the kubelet's PodResources API answers: nothing is released meanwhile, and serving is unaffected");
                    }
                    up = Some(false);
                    wait = settings.interval;
                    sender.send_if_modified(|current| current.take().is_some());
                }
            }
            telemetry::global().pod_resources_up(up == Some(true));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait.max((took * PACE).min(MAX_BACKOFF))) => {}
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let started = runtime.and_then(|runtime| {
        std::thread::Builder::new().name("pod-resources".into()).spawn(move || runtime.block_on(follower))
    });
    if let Err(error) = started {
        tracing::error!(%error, "cannot start the PodResources client's thread: devices are never released, devhost_devices_in_use is not reported");
    }
    receiver
}
