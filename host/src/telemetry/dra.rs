//! The metrics of resources served through DRA, one series per driver,
//! and which drivers the kubelet has not registered (for `/readyz`).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriverLabel {
    driver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    driver: String,
    /// `silent` (no kubelet called the registration socket in time) or
    /// `refused` (the kubelet refused the driver).
    problem: &'static str,
}

/// Where a served driver stands with the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Registration {
    /// Served; the kubelet has not answered yet.
    Waiting,
    Registered,
    /// No kubelet called the registration socket (this path) in time.
    Silent(String),
    /// The kubelet refused it, for this reason.
    Refused(String),
}

/// `devhost_dra_*`.
#[derive(Debug)]
pub struct DraMetrics {
    registered: Family<DriverLabel, Gauge>,
    claims_prepared: Family<DriverLabel, Gauge>,
    prepare_errors: Family<DriverLabel, Counter>,
    slice_writes: Family<DriverLabel, Counter>,
    slices_up: Family<DriverLabel, Gauge>,
    registration_problems: Family<ProblemLabels, Counter>,
    /// Drivers served now, and where each stands with the kubelet.
    serving: Mutex<BTreeMap<String, Registration>>,
}

impl DraMetrics {
    /// The metrics, registered in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let metrics = DraMetrics {
            registered: Family::default(),
            claims_prepared: Family::default(),
            prepare_errors: Family::default(),
            slice_writes: Family::default(),
            slices_up: Family::default(),
            registration_problems: Family::default(),
            serving: Mutex::default(),
        };
        registry.register(
            "dra_registered",
            "1 while the kubelet has the DRA driver registered through its plugin watcher",
            metrics.registered.clone(),
        );
        registry.register(
            "dra_claims_prepared",
            "Claims the DRA driver has prepared on this node (its checkpoint)",
            metrics.claims_prepared.clone(),
        );
        registry.register(
            "dra_prepare_errors",
            "Claims NodePrepareResources answered with an error",
            metrics.prepare_errors.clone(),
        );
        registry.register(
            "dra_slice_writes",
            "ResourceSlice creates, replaces and deletes that succeeded",
            metrics.slice_writes.clone(),
        );
        registry.register(
            "dra_registration_problems",
            "Times no kubelet called the DRA registration socket within 30 s of it being served (problem=silent), or the kubelet refused the driver (problem=refused)",
            metrics.registration_problems.clone(),
        );
        registry.register(
            "dra_slices_up",
            "1 while the driver's ResourceSlices are in step with its devices, 0 while publishing fails",
            metrics.slices_up.clone(),
        );
        metrics
    }

    fn label(driver: &str) -> DriverLabel {
        DriverLabel { driver: driver.to_owned() }
    }

    fn serving(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Registration>> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `driver` is served from now on (not registered yet).
    pub fn serve(&self, driver: &str) {
        self.serving().insert(driver.to_owned(), Registration::Waiting);
        self.registered.get_or_create(&Self::label(driver)).set(0);
    }

    /// Whether the kubelet has `driver` registered (`false`: it is served
    /// again and waits for the kubelet).
    pub fn registered(&self, driver: &str, registered: bool) {
        if let Some(known) = self.serving().get_mut(driver) {
            *known = if registered { Registration::Registered } else { Registration::Waiting };
        }
        self.registered.get_or_create(&Self::label(driver)).set(i64::from(registered));
    }

    /// The kubelet refused `driver`, saying `reason`.
    pub fn refused(&self, driver: &str, reason: &str) {
        if let Some(known) = self.serving().get_mut(driver) {
            *known = Registration::Refused(reason.to_owned());
        }
        self.registered.get_or_create(&Self::label(driver)).set(0);
        self.problem(driver, "refused");
    }

    /// No kubelet called `driver`'s registration socket `socket` in time
    /// (counted once a socket; ignored once the kubelet has answered).
    pub fn silent(&self, driver: &str, socket: &str) {
        if let Some(known @ Registration::Waiting) = self.serving().get_mut(driver) {
            *known = Registration::Silent(socket.to_owned());
            self.problem(driver, "silent");
        }
    }

    fn problem(&self, driver: &str, problem: &'static str) {
        self.registration_problems.get_or_create(&ProblemLabels { driver: driver.to_owned(), problem }).inc();
    }

    /// The drivers served but not registered with the kubelet, each as
    /// `/readyz` says it: with why, where devhost knows.
    pub fn unregistered(&self) -> Vec<String> {
        self.serving()
            .iter()
            .filter_map(|(driver, registration)| match registration {
                Registration::Registered => None,
                Registration::Waiting => Some(format!("DRA driver {driver}")),
                Registration::Silent(socket) => Some(format!(
                    "DRA driver {driver} (no kubelet has called its registration socket {socket}: is [dra] kubelet_root the kubelet's root directory?)"
                )),
                Registration::Refused(reason) => Some(format!("DRA driver {driver} (refused by the kubelet: {reason})")),
            })
            .collect()
    }

    /// How many claims `driver` has prepared.
    pub fn claims_prepared(&self, driver: &str, count: usize) {
        self.claims_prepared.get_or_create(&Self::label(driver)).set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A claim `driver` could not prepare.
    pub fn prepare_failed(&self, driver: &str) {
        self.prepare_errors.get_or_create(&Self::label(driver)).inc();
    }

    /// A publishing round of `driver` ended: `writes` more writes, and
    /// whether it succeeded.
    pub fn published(&self, driver: &str, writes: u64, ok: bool) {
        let label = Self::label(driver);
        self.slice_writes.get_or_create(&label).inc_by(writes);
        self.slices_up.get_or_create(&label).set(i64::from(ok));
    }

    /// `driver` is no longer served: its gauges go (counters stay, as
    /// Prometheus expects of counters).
    pub fn forget(&self, driver: &str) {
        self.serving().remove(driver);
        let label = Self::label(driver);
        self.registered.remove(&label);
        self.claims_prepared.remove(&label);
        self.slices_up.remove(&label);
    }
}
