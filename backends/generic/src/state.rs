//! Hot-plug bookkeeping: the devices each resource lists, fed by scans.
//! A device seen in a scan is Healthy; one that vanished is kept Unhealthy
//! (a pod may still hold it, and devhost gets no "released" signal from the
//! kubelet) until it has been gone for the removal grace, then dropped. It
//! comes back Healthy, with the same ID, if it reappears. A device keeps
//! the attributes it was last seen with.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devhost_abi::sdk::{AttributeValue, Device, Health};

/// One device a scan found, described.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// Its paths (pattern-side, sorted).
    pub paths: Vec<PathBuf>,
    /// Its attributes, valid by DRA's rules.
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// One listed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// Its paths, as last seen.
    pub paths: Vec<PathBuf>,
    /// Its attributes, as last seen.
    pub attributes: BTreeMap<String, AttributeValue>,
    /// When a scan first missed it; `None` while present.
    pub missing_since: Option<Instant>,
}

/// The listed devices of one resource.
#[derive(Debug, Default, Clone)]
pub struct Listed {
    devices: BTreeMap<String, Tracked>,
}

impl Listed {
    /// Applies one scan at `now`; returns whether the published list (IDs,
    /// health, attributes) changed.
    pub fn update(&mut self, found: BTreeMap<String, Present>, now: Instant, grace: Duration) -> bool {
        let before = self.devices();
        for (id, tracked) in &mut self.devices {
            if !found.contains_key(id) && tracked.missing_since.is_none() {
                tracked.missing_since = Some(now);
            }
        }
        self.devices.retain(|_, t| t.missing_since.is_none_or(|since| now.duration_since(since) < grace));
        for (id, present) in found {
            let Present { paths, attributes } = present;
            self.devices.insert(id, Tracked { paths, attributes, missing_since: None });
        }
        before != self.devices()
    }

    /// The device list as published.
    pub fn devices(&self) -> Vec<Device> {
        self.devices
            .iter()
            .map(|(id, t)| {
                let health = if t.missing_since.is_none() { Health::Healthy } else { Health::Unhealthy };
                let mut device = Device::new(id.clone(), health);
                device.attributes = t.attributes.clone();
                device
            })
            .collect()
    }

    /// One device by ID.
    pub fn get(&self, id: &str) -> Option<&Tracked> {
        self.devices.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(ids: &[&str]) -> BTreeMap<String, Present> {
        let present = |id: &str| Present { paths: vec![PathBuf::from(format!("/dev/{id}"))], ..Present::default() };
        ids.iter().map(|id| (id.to_string(), present(id))).collect()
    }

    fn health(listed: &Listed) -> Vec<(String, Health)> {
        listed.devices().into_iter().map(|d| (d.id, d.health)).collect()
    }

    #[test]
    fn vanished_devices_go_unhealthy_then_are_dropped_after_the_grace() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut listed = Listed::default();
        assert!(listed.update(found(&["a", "b"]), t0, grace));
        assert!(!listed.update(found(&["a", "b"]), t0 + Duration::from_secs(1), grace), "no change, no publish");
        assert!(listed.update(found(&["a"]), t0 + Duration::from_secs(2), grace));
        assert_eq!(health(&listed), [("a".into(), Health::Healthy), ("b".into(), Health::Unhealthy)]);
        assert!(!listed.update(found(&["a"]), t0 + Duration::from_secs(11), grace), "still within the grace");
        assert!(listed.update(found(&["a"]), t0 + Duration::from_secs(12), grace), "dropped");
        assert_eq!(health(&listed), [("a".into(), Health::Healthy)]);
    }

    #[test]
    fn a_device_that_comes_back_is_healthy_under_the_same_id() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut listed = Listed::default();
        listed.update(found(&["a"]), t0, grace);
        listed.update(found(&[]), t0 + Duration::from_secs(1), grace);
        assert_eq!(health(&listed), [("a".into(), Health::Unhealthy)]);
        assert!(listed.get("a").is_some_and(|t| t.missing_since.is_some()));
        assert!(listed.update(found(&["a"]), t0 + Duration::from_secs(2), grace));
        assert_eq!(health(&listed), [("a".into(), Health::Healthy)]);
    }

    #[test]
    fn changed_attributes_are_a_change_to_publish() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut listed = Listed::default();
        listed.update(found(&["a"]), t0, grace);
        let mut described = found(&["a"]);
        if let Some(a) = described.get_mut("a") {
            a.attributes.insert("x.io/serial".into(), AttributeValue::String("A1".into()));
        }
        assert!(listed.update(described.clone(), t0, grace), "same ID and health, new attribute");
        assert!(!listed.update(described, t0, grace));
        assert_eq!(listed.devices()[0].attributes.get("x.io/serial"), Some(&AttributeValue::String("A1".into())));
    }
}
