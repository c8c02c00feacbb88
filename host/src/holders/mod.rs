//! Who holds which device, from the kubelet's PodResources API
//! (`docs/pod-resources-api.md`), and what devhost does with it: the
//! `devhost_devices_in_use` gauge, and `release` (ABI 1.1) for devices that
//! were held and no longer are.
//!
//! Parts: `client` asks the kubelet once; `follow` asks on an interval,
//! following the socket across kubelet restarts, and publishes each answer;
//! `release` is one task per resource that acts on the answers.
//!
//! The API is optional: while it is absent or failing, devhost serves
//! exactly as without it, and nothing is released (not knowing who holds a
//! device is not knowing that it is free).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub mod client;
mod follow;
pub mod release;

pub use follow::follow;

/// One container holding a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Holder {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name.
    pub container: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.pod, self.container)
    }
}

/// Per resource, per device ID as the kubelet knows it: who holds it.
pub type Holdings = BTreeMap<String, BTreeMap<String, Vec<Holder>>>;

/// One answer of the kubelet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignments {
    /// Who holds what.
    pub holdings: Holdings,
    /// Whether a device missing from this answer may be taken as free.
    /// False for a while after the kubelet restarted: until it has
    /// re-admitted its pods its answers can miss devices still in use.
    pub trusted: bool,
}

/// What the followers see: `None` while the API cannot be read.
pub type AssignmentsWatch = watch::Receiver<Option<Arc<Assignments>>>;

/// Where and how often to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodResourcesSettings {
    /// The kubelet's PodResources socket; `None` turns the client off.
    pub socket: Option<PathBuf>,
    /// Time between two `List` calls.
    pub interval: Duration,
    /// After the socket is replaced (a kubelet restart), answers are not
    /// trusted to free devices for this long.
    pub restart_grace: Duration,
    /// Deadline of one call.
    pub timeout: Duration,
}

/// One `List` a second: 1 % of the kubelet's rate limit (100 per second).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The kubelet re-admits its pods within seconds of a restart.
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(30);
/// Deadline of one `List`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for PodResourcesSettings {
    fn default() -> Self {
        PodResourcesSettings {
            socket: Some(PathBuf::from(crate::proto::DEFAULT_POD_RESOURCES_SOCKET)),
            interval: DEFAULT_INTERVAL,
            restart_grace: DEFAULT_RESTART_GRACE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}
