//! The CDI names an answer carries, checked against what the runtime will
//! resolve: devhost's own names only where the entries on disk give the
//! container exactly what the backend's answer says (everything else of
//! the answer travels in its plain fields), and a backend's own names only
//! where a spec defines them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::Host;
use super::names::{device_name, spec_path};
use super::registry::{Lookup, View, why_unresolvable};
use super::spec::ContainerEdits;
use crate::model::Allocation;

/// The most distinct names a log-once set remembers (a backend inventing
/// names cannot grow it without bound; past it, nothing more is logged).
const MAX_REMEMBERED: usize = 256;

/// Remembers what was logged, to log each thing once.
#[derive(Debug, Default)]
pub struct LogOnce(Mutex<BTreeSet<String>>);

impl LogOnce {
    /// Whether `key` is new (and now remembered).
    pub fn first(&self, key: &str) -> bool {
        let mut said = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if said.len() >= MAX_REMEMBERED || said.contains(key) {
            return false;
        }
        said.insert(key.to_owned())
    }
}

/// What is said and counted of one resource's backend names left out of
/// its answers.
#[derive(Debug)]
pub struct DroppedNames {
    resource: String,
    said: LogOnce,
    counted: prometheus_client::metrics::counter::Counter,
}

impl DroppedNames {
    /// For the backend names of `resource`.
    pub fn new(resource: &str) -> Self {
        DroppedNames {
            resource: resource.to_owned(),
            said: LogOnce::default(),
            counted: crate::telemetry::global().cdi().names_dropped(resource),
        }
    }
}

/// Drops the names of `names` the runtime would not resolve in `view`,
/// logging each once and counting each name left out of an answer once
/// (in `dropped`). Runs on every answer: nothing is allocated or formatted
/// while every name resolves, and a reason is put in words only for the
/// log line.
pub fn keep_resolvable(view: &View, names: &mut Vec<String>, dropped: &DroppedNames) {
    let unresolved: Vec<(usize, Lookup<'_>)> = names
        .iter()
        .enumerate()
        .filter_map(|(index, name)| match view.lookup(name) {
            Lookup::Resolved(_) => None,
            unresolved => Some((index, unresolved)),
        })
        .collect();
    if unresolved.is_empty() {
        return;
    }
    // Each distinct name once, in n log n: a backend may answer a great
    // many names (nothing but the frame limit bounds them).
    let mut seen = BTreeSet::new();
    for (index, lookup) in &unresolved {
        let name = &names[*index];
        if !seen.insert(name.as_str()) {
            continue;
        }
        dropped.counted.inc();
        if dropped.said.first(name)
            && let Some(why) = why_unresolvable(lookup)
        {
            tracing::warn!(resource = %dropped.resource, cdi_device = %name, "the backend's CDI name is left out of the answer: {why} (a runtime would refuse the container)");
        }
    }
    // The indices are ascending: one pass over both.
    let mut dropped_indices = unresolved.iter().map(|(index, _)| *index).peekable();
    let mut index = 0;
    names.retain(|_| {
        let drop = dropped_indices.next_if_eq(&index).is_some();
        index += 1;
        !drop
    });
}

/// The CDI names in Allocate answers of one device-plugin resource.
#[derive(Debug)]
pub struct Answers {
    host: Arc<Host>,
    resource: String,
    /// devhost's spec of the resource, when it writes one (`cdi = true`).
    own: Option<PathBuf>,
    said: LogOnce,
    dropped: DroppedNames,
}

impl Answers {
    /// Answers for `resource`; `writes_spec`: devhost writes its spec
    /// (`cdi = true`) and names its devices.
    pub fn new(host: Arc<Host>, resource: &str, writes_spec: bool) -> Self {
        let own = writes_spec.then(|| spec_path(&host.dir, resource));
        Answers {
            host,
            resource: resource.to_owned(),
            own,
            said: LogOnce::default(),
            dropped: DroppedNames::new(resource),
        }
    }

    /// The answer for one container holding the real devices `ids`, from
    /// the backend's `allocation` for them.
    pub async fn container(&self, ids: &[String], mut allocation: Allocation) -> Allocation {
        let Some(own) = &self.own else {
            if !allocation.cdi_devices.is_empty() {
                let view = self.host.registry.current().await;
                keep_resolvable(&view, &mut allocation.cdi_devices, &self.dropped);
            }
            return allocation;
        };
        let mut view = self.host.registry.current().await;
        if !view.is_current(own) {
            // devhost's own spec changed within the last second (another
            // instance wrote it): answer from it as it is now.
            view = self.host.registry.now().await;
        }
        keep_resolvable(&view, &mut allocation.cdi_devices, &self.dropped);
        let mut given = Given::default();
        let mut names = Vec::new();
        for id in ids {
            let name = device_name(&self.resource, id);
            if let Lookup::Resolved(entry) = view.lookup(&name)
                && *entry.file == **own
                && !entry.spec_edits
            {
                given.add(&entry.edits);
                names.push(name);
            }
        }
        if names.is_empty() {
            return allocation;
        }
        match given.subtract_from(&mut allocation) {
            Ok(()) => {
                // A backend naming its devices as devhost does (the NVIDIA
                // backend's `nvidia.com/gpu=<UUID>`) would repeat a name.
                let own: BTreeSet<&String> = names.iter().collect();
                let theirs: Vec<String> = allocation.cdi_devices.drain(..).filter(|name| !own.contains(name)).collect();
                names.extend(theirs);
                allocation.cdi_devices = names;
            }
            Err(why) => {
                crate::telemetry::global().cdi().plain_answer(&self.resource);
                if self.said.first(&format!("plain: {why}")) {
                    tracing::warn!(resource = %self.resource, file = %own.display(), "answered without devhost's CDI names: the spec's entries would give the container {why}, which the backend's answer does not");
                }
            }
        }
        allocation
    }
}

/// What a set of CDI devices gives a container, merged as the runtime
/// merges it: a later device's variable, device node (by container path)
/// or mount (by container path) replaces an earlier one's.
#[derive(Debug, Default)]
struct Given {
    env: BTreeMap<String, String>,
    nodes: BTreeMap<String, (String, String)>,
    mounts: BTreeMap<String, (String, bool)>,
    other: bool,
}

impl Given {
    fn add(&mut self, edits: &ContainerEdits) {
        for entry in &edits.env {
            let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
            self.env.insert(name.to_owned(), value.to_owned());
        }
        for node in &edits.device_nodes {
            let host = if node.host_path.is_empty() { node.path.clone() } else { node.host_path.clone() };
            self.nodes.insert(node.path.clone(), (host, node.permissions.clone()));
        }
        for mount in &edits.mounts {
            self.mounts.insert(mount.container_path.clone(), (mount.host_path.clone(), mount.read_only()));
        }
        self.other |= edits.has_other() || edits.device_nodes.iter().any(|node| !node.other.is_empty());
    }

    /// Takes what these devices give out of `allocation`'s plain fields;
    /// the error names the first thing they give that the answer does not.
    fn subtract_from(&self, allocation: &mut Allocation) -> Result<(), String> {
        if self.other {
            return Err("edits beyond variables, device nodes and mounts".into());
        }
        for (name, value) in &self.env {
            if allocation.envs.get(name) != Some(value) {
                return Err(format!("{name}={value}"));
            }
        }
        for (path, (host, permissions)) in &self.nodes {
            let found = allocation.device_specs.iter().any(|spec| {
                spec.container_path == *path && spec.host_path == *host && spec.permissions == *permissions
            });
            if !found {
                return Err(format!("device node {path} ({host}, {permissions:?})"));
            }
        }
        for (path, (host, read_only)) in &self.mounts {
            let found = allocation.mounts.iter().any(|mount| {
                mount.container_path == *path && mount.host_path == *host && mount.read_only == *read_only
            });
            if !found {
                return Err(format!("mount {host} at {path}"));
            }
        }
        allocation.envs.retain(|name, _| !self.env.contains_key(name));
        allocation.device_specs.retain(|spec| !self.nodes.contains_key(&spec.container_path));
        allocation.mounts.retain(|mount| !self.mounts.contains_key(&mount.container_path));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdi::spec::{DeviceNode, SpecMount};
    use crate::model::{DeviceSpec, Mount};

    #[test]
    fn only_names_a_spec_defines_are_kept_in_order_and_each_dropped_one_is_said_once() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = r#"{"cdiVersion": "0.6.0", "kind": "a.io/dev", "devices": [
            {"name": "one", "containerEdits": {"env": ["D=1"]}},
            {"name": "two", "containerEdits": {"env": ["D=2"]}}]}"#;
        std::fs::write(dir.path().join("a.json"), spec).expect("write spec");
        let view = super::super::registry::Registry::new(vec![dir.path().into()]).load_blocking();
        let dropped = DroppedNames::new("a.io/r");
        let mut names: Vec<String> =
            ["a.io/dev=two", "a.io/dev=gone", "a.io/dev=one", "a.io/dev=gone", "b.io/x=y"].map(str::to_owned).into();
        keep_resolvable(&view, &mut names, &dropped);
        assert_eq!(names, ["a.io/dev=two", "a.io/dev=one"]);
        // Both dropped names were logged (and so are not new any more) and
        // counted once each, the repeated one too.
        assert!(!dropped.said.first("a.io/dev=gone") && !dropped.said.first("b.io/x=y"));
        assert_eq!(dropped.counted.get(), 2);
        // Many names, a few distinct ones repeated: each distinct dropped
        // name counted once, the resolving ones kept in order.
        let dropped_many = DroppedNames::new("a.io/many");
        let mut many: Vec<String> = (0..60_000)
            .map(|n| if n % 3 == 0 { "a.io/dev=one".to_owned() } else { format!("c.io/x={}", n % 7) })
            .collect();
        keep_resolvable(&view, &mut many, &dropped_many);
        assert_eq!(many.len(), 20_000);
        assert!(many.iter().all(|name| name == "a.io/dev=one"));
        assert_eq!(dropped_many.counted.get(), 7);
        let mut all_resolve = vec!["a.io/dev=one".to_owned()];
        keep_resolvable(&view, &mut all_resolve, &dropped);
        assert_eq!((all_resolve.as_slice(), dropped.counted.get()), (["a.io/dev=one".to_owned()].as_slice(), 2));
    }

    fn node(path: &str, host: &str) -> DeviceNode {
        DeviceNode { path: path.into(), host_path: host.into(), permissions: "rw".into(), ..DeviceNode::default() }
    }

    fn answer() -> Allocation {
        Allocation {
            envs: [("IDS".to_owned(), "a,b".to_owned())].into(),
            device_specs: vec![
                DeviceSpec { container_path: "/dev/a".into(), host_path: "/dev/null".into(), permissions: "rw".into() },
                DeviceSpec { container_path: "/dev/b".into(), host_path: "/dev/zero".into(), permissions: "rw".into() },
                DeviceSpec {
                    container_path: "/dev/ctl".into(),
                    host_path: "/dev/full".into(),
                    permissions: "rw".into(),
                },
            ],
            mounts: vec![Mount { container_path: "/opt".into(), host_path: "/usr".into(), read_only: true }],
            ..Allocation::default()
        }
    }

    #[test]
    fn what_the_entries_give_leaves_the_plain_fields_and_the_rest_stays() {
        let mut given = Given::default();
        given.add(&ContainerEdits { device_nodes: vec![node("/dev/a", "/dev/null")], ..ContainerEdits::default() });
        given.add(&ContainerEdits {
            device_nodes: vec![node("/dev/b", "/dev/zero")],
            mounts: vec![SpecMount {
                host_path: "/usr".into(),
                container_path: "/opt".into(),
                options: vec!["rbind".into(), "ro".into()],
                ..SpecMount::default()
            }],
            ..ContainerEdits::default()
        });
        let mut allocation = answer();
        assert_eq!(given.subtract_from(&mut allocation), Ok(()));
        assert_eq!(allocation.envs.len(), 1, "variables stay plain");
        assert_eq!(allocation.device_specs.len(), 1, "the node no entry gives stays plain");
        assert_eq!(allocation.device_specs[0].container_path, "/dev/ctl");
        assert!(allocation.mounts.is_empty());
    }

    #[test]
    fn an_entry_that_gives_what_the_answer_does_not_say_is_refused() {
        let mut given = Given::default();
        given.add(&ContainerEdits { env: vec!["IDS=a".into()], ..ContainerEdits::default() });
        assert_eq!(given.subtract_from(&mut answer()), Err("IDS=a".into()), "a per-device list");
        let mut given = Given::default();
        given.add(&ContainerEdits { device_nodes: vec![node("/dev/a", "/dev/zero")], ..ContainerEdits::default() });
        assert!(given.subtract_from(&mut answer()).is_err(), "another host device");
        let mut given = Given::default();
        given.add(&ContainerEdits { device_nodes: vec![node("/dev/a", "/dev/zero")], ..ContainerEdits::default() });
        given.add(&ContainerEdits { device_nodes: vec![node("/dev/a", "/dev/null")], ..ContainerEdits::default() });
        assert_eq!(given.subtract_from(&mut answer()), Ok(()), "the last device's node wins, as in the runtime");
    }

    #[test]
    fn log_once_forgets_nothing_and_stays_bounded() {
        let said = LogOnce::default();
        assert!(said.first("a"));
        assert!(!said.first("a"));
        for n in 0..1000 {
            said.first(&n.to_string());
        }
        assert!(said.0.lock().expect("lock").len() <= MAX_REMEMBERED);
    }
}
