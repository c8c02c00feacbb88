//! Hot-plug bookkeeping: the devices each resource lists, fed by scans.
//! A device seen in a scan is Healthy; one that vanished is kept Unhealthy
//! (a pod may still hold it, and devhost gets no "released" signal from the
//! kubelet) until it has been gone for the removal grace, then dropped. It
//! comes back Healthy, with the same ID, if it reappears.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devhost_abi::sdk::{Device, Health};

/// One listed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// Its paths, as last seen.
    pub paths: Vec<PathBuf>,
    /// When a scan first missed it; `None` while present.
    pub missing_since: Option<Instant>,
}

/// The listed devices of one resource.
#[derive(Debug, Default, Clone)]
pub struct Listed {
    devices: BTreeMap<String, Tracked>,
}

impl Listed {
    /// Applies one scan at `now`; returns whether the list the kubelet sees
    /// (IDs and health) changed.
    pub fn update(&mut self, found: BTreeMap<String, Vec<PathBuf>>, now: Instant, grace: Duration) -> bool {
        let before = self.devices();
        for (id, tracked) in &mut self.devices {
            if !found.contains_key(id) && tracked.missing_since.is_none() {
                tracked.missing_since = Some(now);
            }
        }
        self.devices.retain(|_, t| t.missing_since.is_none_or(|since| now.duration_since(since) < grace));
        for (id, paths) in found {
            self.devices.insert(id, Tracked { paths, missing_since: None });
        }
        before != self.devices()
    }

    /// The device list as published.
    pub fn devices(&self) -> Vec<Device> {
        self.devices
            .iter()
            .map(|(id, t)| {
                Device::new(id.clone(), if t.missing_since.is_none() { Health::Healthy } else { Health::Unhealthy })
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

    fn found(ids: &[&str]) -> BTreeMap<String, Vec<PathBuf>> {
        ids.iter().map(|id| (id.to_string(), vec![PathBuf::from(format!("/dev/{id}"))])).collect()
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
}
