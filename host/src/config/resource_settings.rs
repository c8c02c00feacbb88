//! `[resources."<name>"]` in a backend file: host-side settings of one of
//! the backend's resources, for any kind of backend: `replicas` (share each
//! device between N containers), `replica_policy` (`spread` or `pack`),
//! `cdi` (write a CDI spec and answer Allocate with CDI names), and `api`
//! (`"device-plugin"`, the default, or `"dra"`, with an optional `driver`
//! name).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use crate::model::{ReplicaPolicy, ResourceSettings, Sharing};
use crate::resource_name;

/// Most replicas of one device: beyond this the advertised list grows
/// large for no real use.
pub const MAX_REPLICAS: u64 = 1024;

/// The raw table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResourceSettings {
    replicas: Option<Spanned<u64>>,
    replica_policy: Option<ReplicaPolicy>,
    #[serde(default)]
    cdi: bool,
    api: Option<Api>,
    driver: Option<Spanned<String>>,
}

/// Which Kubernetes API serves the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Api {
    DevicePlugin,
    Dra,
}

/// Validates every `[resources."<name>"]` table of `file`.
pub(super) fn parse(
    file: &Path,
    source: &str,
    raw: BTreeMap<Spanned<String>, Spanned<RawResourceSettings>>,
) -> Result<BTreeMap<String, ResourceSettings>, ConfigError> {
    let mut settings = BTreeMap::new();
    for (name, table) in raw {
        resource_name::validate(name.get_ref())
            .map_err(|error| ConfigError::at(file, source, name.span(), error.to_string()))?;
        let table = table.into_inner();
        let replicas = match &table.replicas {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > MAX_REPLICAS => {
                return Err(ConfigError::at(
                    file,
                    source,
                    n.span(),
                    format!("replicas must be between 1 and {MAX_REPLICAS}, not {}", n.get_ref()),
                ));
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(1),
            None => 1,
        };
        if table.cdi {
            crate::cdi::check_names(name.get_ref(), None)
                .map_err(|message| ConfigError::at(file, source, name.span(), message))?;
        }
        let dra_driver = match (table.api, table.driver) {
            (Some(Api::Dra), Some(driver)) => {
                if !crate::dra::names::is_dns_subdomain(driver.get_ref()) {
                    let message = format!(
                        "driver {:?} is not a DNS subdomain (lower-case letters, digits, '-' and '.', e.g. \"gpu.example.com\")",
                        driver.get_ref()
                    );
                    return Err(ConfigError::at(file, source, driver.span(), message));
                }
                Some(driver.into_inner())
            }
            (Some(Api::Dra), None) => Some(crate::dra::names::default_driver(name.get_ref()).ok_or_else(|| {
                let message = format!(
                    "resource {:?} gives no DNS-subdomain driver name (<name>.<domain>): set driver = \"…\"",
                    name.get_ref()
                );
                ConfigError::at(file, source, name.span(), message)
            })?),
            (_, Some(driver)) => {
                return Err(ConfigError::at(file, source, driver.span(), "driver needs api = \"dra\""));
            }
            (_, None) => None,
        };
        if dra_driver.is_some() {
            // DRA shares and names devices through claims and per-claim CDI
            // specs: these device-plugin settings would silently do nothing.
            if let Some(n) = table.replicas.as_ref().filter(|n| *n.get_ref() != 1) {
                let message = "replicas applies to the device plugin API; with api = \"dra\" a claim shares a device";
                return Err(ConfigError::at(file, source, n.span(), message));
            }
            if table.cdi {
                let message =
                    "cdi = true applies to the device plugin API; with api = \"dra\" every claim gets a CDI spec";
                return Err(ConfigError::at(file, source, name.span(), message));
            }
        }
        let sharing = Sharing { replicas, policy: table.replica_policy.unwrap_or_default() };
        settings.insert(name.into_inner(), ResourceSettings { sharing, cdi: table.cdi, dra_driver });
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::parse_backend;

    const FILE: &str = "/etc/devhost/backends.d/gpu.toml";

    fn parse(settings: &str) -> Result<BTreeMap<String, ResourceSettings>, ConfigError> {
        let source = format!("[backend]\nmodule = \"libgpu.so\"\n{settings}");
        parse_backend(Path::new(FILE), &source, Duration::from_secs(1)).map(|config| config.resources)
    }

    #[test]
    fn settings_default_to_unshared_without_cdi() {
        let settings = parse("[resources.\"a.io/gpu\"]\ncdi = true\n").expect("valid");
        let gpu = &settings["a.io/gpu"];
        assert_eq!(gpu, &ResourceSettings { sharing: Sharing::default(), cdi: true, dra_driver: None });
        let settings = parse("[resources.\"a.io/gpu\"]\nreplicas = 4\nreplica_policy = \"pack\"\n").expect("valid");
        assert_eq!(settings["a.io/gpu"].sharing, Sharing { replicas: 4, policy: ReplicaPolicy::Pack });
    }

    #[test]
    fn a_resource_is_served_through_dra_with_a_driver_name() {
        let settings = parse("[resources.\"example.com/gpu\"]\napi = \"dra\"\n").expect("valid");
        assert_eq!(settings["example.com/gpu"].dra_driver.as_deref(), Some("gpu.example.com"), "derived");
        let settings =
            parse("[resources.\"example.com/gpu\"]\napi = \"dra\"\ndriver = \"gpu.acme.io\"\n").expect("valid");
        assert_eq!(settings["example.com/gpu"].dra_driver.as_deref(), Some("gpu.acme.io"));
        let settings = parse("[resources.\"example.com/gpu\"]\napi = \"device-plugin\"\n").expect("valid");
        assert_eq!(settings["example.com/gpu"].dra_driver, None);
    }

    #[test]
    fn bad_settings_are_located() {
        let cases = [
            ("[resources.\"a.io/gpu\"]\nreplicas = 0\n", "4:12: replicas must be between 1 and 1024, not 0"),
            ("[resources.\"a.io/gpu\"]\nreplicas = 5000\n", "4:12: replicas must be between 1 and 1024"),
            ("[resources.\"gpu\"]\nreplicas = 2\n", "3:12: resource name \"gpu\" must have the form"),
            ("[resources.\"a.io/gpu\"]\nshare = 2\n", "4:1: unknown field `share`"),
            ("[resources.\"a.io/gpu\"]\nreplica_policy = \"even\"\n", "4:18: unknown variant `even`"),
            ("[resources.\"1a.io/gpu\"]\ncdi = true\n", "3:12: resource \"1a.io/gpu\" cannot be a CDI kind"),
            ("[resources.\"a.io/gpu\"]\napi = \"csi\"\n", "4:7: unknown variant `csi`"),
            ("[resources.\"a.io/gpu\"]\ndriver = \"gpu.a.io\"\n", "4:10: driver needs api = \"dra\""),
            (
                "[resources.\"a.io/gpu\"]\napi = \"dra\"\ndriver = \"GPU\"\n",
                "5:10: driver \"GPU\" is not a DNS subdomain",
            ),
            (
                "[resources.\"a.io/my_gpu\"]\napi = \"dra\"\n",
                "3:12: resource \"a.io/my_gpu\" gives no DNS-subdomain driver",
            ),
            (
                "[resources.\"a.io/gpu\"]\napi = \"dra\"\nreplicas = 2\n",
                "5:12: replicas applies to the device plugin API",
            ),
            (
                "[resources.\"a.io/gpu\"]\napi = \"dra\"\ncdi = true\n",
                "3:12: cdi = true applies to the device plugin API",
            ),
        ];
        for (settings, expected) in cases {
            let error = parse(settings).expect_err(expected).to_string();
            assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
        }
    }
}
