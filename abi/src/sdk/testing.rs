//! Testing a backend without devhost: [`Recorder`] stands in for the host,
//! keeping every list the backend publishes and every line it logs.

use std::sync::{Mutex, PoisonError};

use super::{Device, HostApi, LogLevel, PublishError};

/// Panics, naming the broken rule, if devhost would refuse `device`'s
/// attributes or capacities (DRA's rules, [`crate::device_info::check`]).
pub fn assert_valid_device(device: &Device) {
    if let Err(why) = crate::device_info::check(device) {
        panic!("devhost would refuse device {:?}: {why}", device.id);
    }
}

/// A [`HostApi`] that records instead of sending anything anywhere.
#[derive(Debug, Default)]
pub struct Recorder {
    published: Mutex<Vec<(String, Vec<Device>)>>,
    logs: Mutex<Vec<(LogLevel, String)>>,
}

impl Recorder {
    /// Every published list, oldest first, with its resource.
    pub fn published(&self) -> Vec<(String, Vec<Device>)> {
        self.published.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The latest list published for `resource`.
    pub fn latest(&self, resource: &str) -> Option<Vec<Device>> {
        let published = self.published.lock().unwrap_or_else(PoisonError::into_inner);
        published.iter().rev().find(|(r, _)| r == resource).map(|(_, devices)| devices.clone())
    }

    /// Every logged line, oldest first.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every logged message, oldest first.
    pub fn messages(&self) -> Vec<String> {
        self.logs().into_iter().map(|(_, message)| message).collect()
    }
}

impl HostApi for Recorder {
    fn publish(&self, resource: &str, devices: &[Device]) -> Result<(), PublishError> {
        self.published.lock().unwrap_or_else(PoisonError::into_inner).push((resource.to_owned(), devices.to_vec()));
        Ok(())
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner).push((level, message.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Health;

    #[test]
    fn records_lists_and_logs_in_order() {
        let recorder = Recorder::default();
        recorder.publish("a.io/x", &[Device::new("0", Health::Healthy)]).expect("recorded");
        recorder.publish("a.io/y", &[]).expect("recorded");
        recorder.publish("a.io/x", &[Device::new("0", Health::Unhealthy)]).expect("recorded");
        recorder.log(LogLevel::Warn, "careful");
        assert_eq!(recorder.published().len(), 3);
        assert_eq!(recorder.latest("a.io/x"), Some(vec![Device::new("0", Health::Unhealthy)]));
        assert_eq!(recorder.latest("a.io/z"), None);
        assert_eq!(recorder.logs(), [(LogLevel::Warn, "careful".to_owned())]);
    }
}
