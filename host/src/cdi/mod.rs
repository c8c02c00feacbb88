//! CDI (Container Device Interface): the spec files devhost writes and the
//! CDI names its answers carry. The rule every path follows: **every CDI
//! name devhost hands out resolves, in exactly one spec, to edits the
//! plain answer also describes** — what a container runtime injects for the
//! names plus what the answer's plain fields say is exactly the backend's
//! answer.
//!
//! * Device plugin, `cdi = true` ([`resource`], [`answer`]): one spec per
//!   resource (kind = the resource name), one entry per device carrying
//!   that device's own edits: its device nodes and mounts. Environment
//!   variables describe the allocation (`IDS=a,b`), and CDI keeps only the
//!   last device's value of a variable, so they always travel in the
//!   answer's plain fields. Allocate names a device only if the entry the
//!   runtime will load for it is devhost's and gives what the answer says;
//!   the answer's plain fields carry the rest.
//! * DRA ([`claim`]): one spec per prepared claim, one CDI device per
//!   request carrying that request's whole answer.
//! * A backend's own names (`cdi_kind`, the NVIDIA backend's): passed on
//!   only where a spec defines them ([`answer::keep_resolvable`]); a
//!   static backend's `cdi_kind` whose names no spec defines is refused
//!   at load ([`check_static_kinds`]).
//! * A vendor spec naming a device devhost would name: devhost steps
//!   aside ([`resource`]).
//! * Two instances (a rolling update): the newer writes ([`owners`]).
//!
//! What the runtime will resolve is read the way the CDI library reads
//! the directories ([`registry`]).

pub mod answer;
pub mod claim;
mod names;
pub mod owners;
pub mod registry;
pub mod resource;
pub mod spec;

use std::path::PathBuf;
use std::sync::Arc;

pub use claim::{remove_claim_spec, write_claim_spec};
pub use names::{check_names, claim_device_id, claim_device_name, claim_spec_path, device_name, spec_path};
pub use owners::OWNER_ANNOTATION;
pub use spec::CDI_VERSION;

use crate::config::{BackendSource, ConfigError, LoadedBackends};

/// What the paths that write specs or hand out CDI names share.
#[derive(Debug)]
pub struct Host {
    /// Where devhost writes its specs.
    pub dir: PathBuf,
    /// What the runtime sees in its CDI directories.
    pub registry: Arc<registry::Registry>,
    /// This process, for instances sharing `dir`.
    pub instance: Arc<owners::Instance>,
}

impl Host {
    /// devhost's CDI side: specs in `dir`, the runtime reading `spec_dirs`
    /// (lowest priority first), this process being `instance`.
    pub fn new(dir: PathBuf, spec_dirs: Vec<PathBuf>, instance: &str) -> Arc<Self> {
        Arc::new(Host { dir, registry: registry::Registry::new(spec_dirs), instance: owners::Instance::new(instance) })
    }

    /// Says loudly (once, at start) if the CDI directory is writable by
    /// every user: anyone on the node could then drop a spec the runtime
    /// applies to containers.
    pub fn check_dir(&self) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(&self.dir)
            && metadata.permissions().mode() & 0o002 != 0
        {
            tracing::error!(
                dir = %self.dir.display(),
                mode = format!("{:o}", metadata.permissions().mode() & 0o7777),
                "the CDI directory is writable by every user: anyone on the node can give containers devices and mounts through a spec there; make it 0755 (chmod o-w)"
            );
        }
    }

    /// Gives up this instance's liveness lock (at exit).
    pub fn withdraw(&self) {
        self.instance.withdraw(&self.dir);
    }
}

/// Refuses each static backend whose `cdi_kind` names devices no spec the
/// runtime loads defines (a runtime would refuse every container given
/// them), moving it from `loaded.backends` to `loaded.errors` with a
/// message naming the file, the key and the first unresolvable name.
pub fn check_static_kinds(loaded: &mut LoadedBackends, view: &registry::View, spec_dirs: &[PathBuf]) {
    let dirs = spec_dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut refused = Vec::new();
    loaded.backends.retain(|backend| {
        let BackendSource::Static(config) = &backend.source else { return true };
        for resource in &config.resources {
            let Some(kind) = &resource.cdi_kind else { continue };
            let names: Vec<String> = resource.devices.iter().map(|d| device_name(kind, &d.device.id)).collect();
            if let Some((name, why)) = registry::unresolvable(view, names.iter()).into_iter().next() {
                refused.push(ConfigError {
                    file: backend.file.clone(),
                    location: resource.cdi_kind_location,
                    message: format!(
                        "cdi_kind = {kind:?} of resource {:?}: {name} does not resolve in the CDI directories ({dirs}): {why}; \
                         a container runtime would refuse every container given it (install the vendor's CDI spec, \
                         or remove cdi_kind; cdi = true under [resources] makes devhost write a spec itself)",
                        resource.spec.name
                    ),
                });
                return false;
            }
        }
        true
    });
    loaded.errors.extend(refused);
}
