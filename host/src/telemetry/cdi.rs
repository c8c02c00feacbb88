//! The metrics of CDI names: devices left to another spec that names them
//! too, names left out because they would not resolve, and answers given
//! without devhost's names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

/// `devhost_cdi_*`.
#[derive(Debug)]
pub struct CdiMetrics {
    clashing: Family<ResourceLabel, Gauge>,
    dropped: Family<ResourceLabel, Counter>,
    plain: Family<ResourceLabel, Counter>,
}

impl CdiMetrics {
    /// The metrics, registered in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let metrics = CdiMetrics { clashing: Family::default(), dropped: Family::default(), plain: Family::default() };
        registry.register(
            "cdi_clashing_devices",
            "Devices of a resource with cdi = true that another CDI spec names too: left out of devhost's spec and answered without a CDI name",
            metrics.clashing.clone(),
        );
        registry.register(
            "cdi_names_dropped",
            "A backend's CDI names left out of an answer because no CDI spec defines them (or two conflict)",
            metrics.dropped.clone(),
        );
        registry.register(
            "cdi_plain_answers",
            "Allocate answers of a resource with cdi = true given without devhost's CDI names, because the spec on disk did not match the backend's answer",
            metrics.plain.clone(),
        );
        metrics
    }

    fn label(resource: &str) -> ResourceLabel {
        ResourceLabel { resource: resource.to_owned() }
    }

    /// How many devices of `resource` another spec names too.
    pub fn clashing_devices(&self, resource: &str, count: usize) {
        self.clashing.get_or_create(&Self::label(resource)).set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The count of `resource`'s backend names left out of answers, to be
    /// counted on without looking the series up each time.
    pub fn names_dropped(&self, resource: &str) -> Counter {
        self.dropped.get_or_create(&Self::label(resource)).clone()
    }

    /// An answer for `resource` went without devhost's names.
    pub fn plain_answer(&self, resource: &str) {
        self.plain.get_or_create(&Self::label(resource)).inc();
    }
}
