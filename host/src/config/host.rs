//! `devhost.toml`: where the kubelet is, where backends are configured, how
//! to log. Every path has its production default here and nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::holders::PodResourcesSettings;
use crate::proto::{DEFAULT_PLUGIN_DIR, KUBELET_SOCKET_NAME};

/// Where container runtimes look for CDI specs written at run time.
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";
/// Where container runtimes read CDI specs by default, lowest priority
/// first (containerd's and CRI-O's default `cdi_spec_dirs`).
pub const DEFAULT_CDI_SPEC_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// Default deadline of one call into a backend.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated host settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The kubelet's device plugin directory; devhost's sockets go here.
    pub plugin_dir: PathBuf,
    /// The kubelet's registration socket.
    pub kubelet_socket: PathBuf,
    /// The directory of backend files (`*.toml`).
    pub backends_dir: PathBuf,
    /// Default deadline of one backend call.
    pub call_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`tracing` env-filter syntax), e.g. `info` or `devhost=debug`.
    pub log_level: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` turns
    /// the endpoint off.
    pub metrics_address: Option<SocketAddr>,
    /// Where only `/healthz` and `/readyz` are served, on connections of
    /// their own (`devhost probe` reads them there); `None` turns it off.
    /// Loopback by default: the shipped DaemonSet's exec probes run inside
    /// the pod, so no client outside it can crowd the probes out.
    pub probe_address: Option<SocketAddr>,
    /// Where CDI spec files are written for resources with `cdi = true`.
    pub cdi_dir: PathBuf,
    /// The directories the container runtime reads CDI specs from, lowest
    /// priority first (containerd's and CRI-O's `cdi_spec_dirs`); devhost
    /// reads them as the runtime will, to hand out only names that resolve.
    /// See [`HostConfig::cdi_spec_dirs`].
    pub cdi_runtime_dirs: Vec<PathBuf>,
    /// How devhost learns who holds which device (`[pod_resources]`).
    pub pod_resources: PodResourcesSettings,
    /// How resources with `api = "dra"` are served (`[dra]`).
    pub dra: DraSettings,
}

/// The host side of DRA: where the kubelet is, which node this is, how to
/// reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraSettings {
    /// The kubelet's root directory (`plugins_registry/` and `plugins/`
    /// are in it); by default the parent of the device plugin directory.
    pub kubelet_root: PathBuf,
    /// This node's name (the pool's name); by default `$NODE_NAME`.
    pub node_name: Option<String>,
    /// A kubeconfig file for the API server; `None`: the pod's in-cluster
    /// service account.
    pub kubeconfig: Option<PathBuf>,
    /// Whether the cluster has device taints (DeviceTaints, beta from
    /// 1.36): Unhealthy devices are then published with a `NoSchedule`
    /// taint, otherwise left out of the ResourceSlices.
    pub device_taints: bool,
}

/// Command-line values that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--plugin-dir`.
    pub plugin_dir: Option<PathBuf>,
    /// `--kubelet-socket`.
    pub kubelet_socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    plugin_dir: Option<PathBuf>,
    kubelet_socket: Option<PathBuf>,
    backends_dir: Option<PathBuf>,
    call_timeout_ms: Option<toml::Spanned<u64>>,
    metrics_address: Option<toml::Spanned<String>>,
    probe_address: Option<toml::Spanned<String>>,
    cdi_dir: Option<PathBuf>,
    cdi_spec_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    pod_resources: RawPodResources,
    #[serde(default)]
    dra: RawDra,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDra {
    kubelet_root: Option<PathBuf>,
    node_name: Option<String>,
    kubeconfig: Option<PathBuf>,
    device_taints: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPodResources {
    socket: Option<PathBuf>,
    interval_ms: Option<toml::Spanned<u64>>,
    restart_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<toml::Spanned<String>>,
}

/// The levels a log filter may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter: a level, or comma-separated directives, each a
/// level or `target=level` (a typo such as `inof` would otherwise be read
/// as a target name and silence every log line).
fn check_log_level(filter: &str) -> Result<(), String> {
    let is_level = |text: &str| LEVELS.contains(&text.to_ascii_lowercase().as_str());
    let is_target = |text: &str| {
        !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    for directive in filter.split(',') {
        let directive = directive.trim();
        let ok = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(format!(
                "log level {directive:?} is not a level: use one of {} or directives like \"devhost=debug,info\"",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

impl HostConfig {
    /// The CDI directories as the runtime reads them, lowest priority
    /// first: `cdi_spec_dirs`, then `cdi_dir` if they leave it out (devhost's
    /// names live there; a runtime that did not read it could resolve none).
    pub fn cdi_spec_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.cdi_runtime_dirs.clone();
        if !dirs.contains(&self.cdi_dir) {
            dirs.push(self.cdi_dir.clone());
        }
        dirs
    }

    /// Reads and validates `path`; relative paths in it are relative to the
    /// file's directory.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let source = super::backends::read_config_file(path)?;
        Self::parse(path, &source, overrides)
    }

    /// Resolves a config argument of the commands: a `devhost.toml`, or a
    /// directory holding one (or only a `backends.d/`, which then gets the
    /// default host settings).
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let overrides = Overrides::default();
        if !path.is_dir() {
            return Self::load(path, &overrides);
        }
        let file = path.join("devhost.toml");
        if file.exists() { Self::load(&file, &overrides) } else { Ok(Self::defaults(path, &overrides)) }
    }

    /// Validates the host config `source`, read from `path`.
    pub fn parse(path: &Path, source: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw: RawHost = toml::from_str(source).map_err(|error| ConfigError::from_toml(path, source, &error))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let call_timeout = match raw.call_timeout_ms {
            Some(ms) if *ms.get_ref() == 0 => {
                return Err(ConfigError::at(path, source, ms.span(), "call_timeout_ms must be at least 1"));
            }
            Some(ms) => Duration::from_millis(*ms.get_ref()),
            None => DEFAULT_CALL_TIMEOUT,
        };
        let address = |key: &str, value: Option<toml::Spanned<String>>, default: SocketAddr| match value {
            None => Ok(Some(default)),
            Some(address) if address.get_ref().is_empty() => Ok(None),
            Some(address) => address.get_ref().parse().map(Some).map_err(|error| {
                ConfigError::at(
                    path,
                    source,
                    address.span(),
                    format!("{key} must be an IP:port such as \"{default}\" (or \"\" to turn it off): {error}"),
                )
            }),
        };
        let metrics_address = address("metrics_address", raw.metrics_address, default_metrics_address())?;
        let probe_address = address("probe_address", raw.probe_address, default_probe_address())?;
        if let Some(level) = &raw.log.level {
            check_log_level(level.get_ref()).map_err(|message| ConfigError::at(path, source, level.span(), message))?;
        }
        let mut config =
            Self::resolve(base, raw.plugin_dir, raw.kubelet_socket, raw.backends_dir, call_timeout, raw.log, overrides);
        config.metrics_address = metrics_address;
        config.probe_address = probe_address;
        if let Some(dir) = raw.cdi_dir {
            config.cdi_dir = base.join(dir);
        }
        if let Some(dirs) = raw.cdi_spec_dirs {
            config.cdi_runtime_dirs = dirs.into_iter().map(|dir| base.join(dir)).collect();
        }
        let pod_resources = raw.pod_resources;
        if let Some(ms) = pod_resources.interval_ms {
            if *ms.get_ref() < 100 {
                let message = "pod_resources.interval_ms must be at least 100 (the kubelet allows 100 calls a second for every client together)";
                return Err(ConfigError::at(path, source, ms.span(), message));
            }
            config.pod_resources.interval = Duration::from_millis(*ms.get_ref());
        }
        if let Some(ms) = pod_resources.restart_grace_ms {
            config.pod_resources.restart_grace = Duration::from_millis(ms);
        }
        let dra = raw.dra;
        if let Some(root) = dra.kubelet_root {
            config.dra.kubelet_root = base.join(root);
        }
        if let Some(node) = dra.node_name.filter(|node| !node.is_empty()) {
            config.dra.node_name = Some(node);
        }
        config.dra.kubeconfig = dra.kubeconfig.map(|file| base.join(file));
        config.dra.device_taints = dra.device_taints.unwrap_or(false);
        config.pod_resources.socket = match pod_resources.socket {
            // `socket = ""` turns the client off.
            Some(socket) if socket.as_os_str().is_empty() => None,
            Some(socket) => Some(base.join(socket)),
            // The kubelet serves it under its root, like the plugin
            // directories: one root for all.
            None => Some(pod_resources_socket(&config.dra.kubelet_root)),
        };
        Ok(config)
    }

    /// The defaults, for a config directory `base` without a host file.
    pub fn defaults(base: &Path, overrides: &Overrides) -> Self {
        Self::resolve(base, None, None, None, DEFAULT_CALL_TIMEOUT, RawLog::default(), overrides)
    }

    fn resolve(
        base: &Path,
        plugin_dir: Option<PathBuf>,
        kubelet_socket: Option<PathBuf>,
        backends_dir: Option<PathBuf>,
        call_timeout: Duration,
        log: RawLog,
        overrides: &Overrides,
    ) -> Self {
        // Paths in the file are relative to the file; paths on the command
        // line are relative to where devhost was started.
        let from_cli = |path: &PathBuf| std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let plugin_dir = match (&overrides.plugin_dir, plugin_dir) {
            (Some(dir), _) => from_cli(dir),
            (None, Some(dir)) => base.join(dir),
            (None, None) => PathBuf::from(DEFAULT_PLUGIN_DIR),
        };
        // The kubelet socket follows the plugin dir unless named explicitly.
        let kubelet_socket = match (&overrides.kubelet_socket, kubelet_socket) {
            (Some(socket), _) => from_cli(socket),
            (None, Some(socket)) => plugin_dir.join(socket),
            (None, None) => plugin_dir.join(KUBELET_SOCKET_NAME),
        };
        let kubelet_root = plugin_dir.parent().map_or_else(|| PathBuf::from(DEFAULT_KUBELET_ROOT), Path::to_path_buf);
        HostConfig {
            backends_dir: base.join(backends_dir.unwrap_or_else(|| PathBuf::from("backends.d"))),
            kubelet_socket,
            call_timeout,
            log_format: log.format.unwrap_or_default(),
            log_level: log.level.map_or_else(|| "info".to_owned(), toml::Spanned::into_inner),
            metrics_address: Some(default_metrics_address()),
            probe_address: Some(default_probe_address()),
            cdi_dir: PathBuf::from(DEFAULT_CDI_DIR),
            cdi_runtime_dirs: DEFAULT_CDI_SPEC_DIRS.iter().map(PathBuf::from).collect(),
            pod_resources: PodResourcesSettings {
                socket: Some(pod_resources_socket(&kubelet_root)),
                ..PodResourcesSettings::default()
            },
            dra: DraSettings {
                kubelet_root,
                node_name: std::env::var("NODE_NAME").ok().filter(|node| !node.is_empty()),
                kubeconfig: None,
                device_taints: false,
            },
            plugin_dir,
        }
    }
}

/// The kubelet's root directory when nothing says otherwise.
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";

/// Where the kubelet rooted at `kubelet_root` serves PodResources.
pub fn pod_resources_socket(kubelet_root: &Path) -> PathBuf {
    kubelet_root.join("pod-resources").join("kubelet.sock")
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9477))
}

fn default_probe_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9478))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_levels_or_target_directives() {
        for good in ["info", "WARN", "off", "devhost=debug,info", "devhost::daemon=trace, warn"] {
            assert_eq!(check_log_level(good), Ok(()), "{good}");
        }
        for bad in ["inof", "", "devhost=", "=debug", "devhost=verbose", "info,,debug", "devhost debug"] {
            assert!(check_log_level(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn parse(source: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::parse(Path::new("/etc/devhost/devhost.toml"), source, &Overrides::default())
    }

    #[test]
    fn defaults_point_at_the_kubelet() {
        let config = parse("").expect("empty file is valid");
        assert_eq!(config.plugin_dir, Path::new("/var/lib/kubelet/device-plugins"));
        assert_eq!(config.kubelet_socket, Path::new("/var/lib/kubelet/device-plugins/kubelet.sock"));
        assert_eq!(config.backends_dir, Path::new("/etc/devhost/backends.d"));
        assert_eq!(config.call_timeout, DEFAULT_CALL_TIMEOUT);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.cdi_dir, Path::new("/var/run/cdi"));
        assert_eq!(config.cdi_spec_dirs(), [Path::new("/etc/cdi"), Path::new("/var/run/cdi")], "as runtimes read them");
        assert_eq!(config.metrics_address, Some(default_metrics_address()));
        assert_eq!(
            config.pod_resources.socket.as_deref(),
            Some(Path::new("/var/lib/kubelet/pod-resources/kubelet.sock"))
        );
        assert_eq!(config.pod_resources.interval, Duration::from_secs(1));
    }

    #[test]
    fn dra_settings_default_to_the_kubelet_root_and_can_be_set() {
        let config = parse("").expect("valid");
        assert_eq!(config.dra.kubelet_root, Path::new("/var/lib/kubelet"), "the device plugin directory's parent");
        assert_eq!((config.dra.kubeconfig.as_deref(), config.dra.device_taints), (None, false));
        let config = parse(
            "plugin_dir = \"/k/device-plugins\"\n[dra]\nnode_name = \"node-7\"\nkubeconfig = \"kc.yaml\"\ndevice_taints = true\n",
        )
        .expect("valid");
        assert_eq!(config.dra.kubelet_root, Path::new("/k"));
        assert_eq!(config.dra.node_name.as_deref(), Some("node-7"));
        assert_eq!(config.dra.kubeconfig.as_deref(), Some(Path::new("/etc/devhost/kc.yaml")));
        assert!(config.dra.device_taints);
        let config = parse("[dra]\nkubelet_root = \"/srv/kubelet\"\n").expect("valid");
        assert_eq!(config.dra.kubelet_root, Path::new("/srv/kubelet"));
        assert!(parse("[dra]\nnode = \"x\"\n").is_err(), "unknown keys are refused");
    }

    /// Issue 24: another kubelet root moves PodResources with it (it stayed
    /// at /var/lib/kubelet, and `release` never ran).
    #[test]
    fn the_pod_resources_socket_follows_the_kubelet_root() {
        let socket = |config: HostConfig| config.pod_resources.socket.expect("on");
        assert_eq!(
            socket(parse("plugin_dir = \"/k/device-plugins\"\n").expect("valid")),
            Path::new("/k/pod-resources/kubelet.sock")
        );
        assert_eq!(
            socket(parse("[dra]\nkubelet_root = \"/srv/kubelet\"\n").expect("valid")),
            Path::new("/srv/kubelet/pod-resources/kubelet.sock")
        );
        let overrides =
            Overrides { plugin_dir: Some(PathBuf::from("/node/kubelet/device-plugins")), kubelet_socket: None };
        let config = HostConfig::parse(Path::new("/etc/devhost/devhost.toml"), "", &overrides).expect("valid");
        assert_eq!(socket(config), Path::new("/node/kubelet/pod-resources/kubelet.sock"), "--plugin-dir");
        let config = HostConfig::defaults(Path::new("/etc/devhost"), &overrides);
        assert_eq!(socket(config), Path::new("/node/kubelet/pod-resources/kubelet.sock"), "no host file");
        let explicit = "plugin_dir = \"/k/device-plugins\"\n[pod_resources]\nsocket = \"/pr.sock\"\n";
        assert_eq!(socket(parse(explicit).expect("valid")), Path::new("/pr.sock"), "named: kept");
    }

    #[test]
    fn the_pod_resources_client_is_configurable_and_can_be_turned_off() {
        let config = parse("[pod_resources]\nsocket = \"pr/kubelet.sock\"\ninterval_ms = 250\nrestart_grace_ms = 0\n")
            .expect("valid");
        assert_eq!(config.pod_resources.socket.as_deref(), Some(Path::new("/etc/devhost/pr/kubelet.sock")));
        assert_eq!(config.pod_resources.interval, Duration::from_millis(250));
        assert_eq!(config.pod_resources.restart_grace, Duration::ZERO);
        assert_eq!(parse("[pod_resources]\nsocket = \"\"\n").expect("off").pod_resources.socket, None);
        let error = parse("[pod_resources]\ninterval_ms = 5\n").expect_err("too often");
        assert!(
            error
                .to_string()
                .starts_with("/etc/devhost/devhost.toml:2:15: pod_resources.interval_ms must be at least 100"),
            "{error}"
        );
    }

    #[test]
    fn overrides_win_and_the_socket_follows_the_plugin_dir() {
        let overrides = Overrides { plugin_dir: Some("/tmp/p".into()), kubelet_socket: None };
        let config = HostConfig::parse(
            Path::new("/c/devhost.toml"),
            "plugin_dir = \"/x\"\n[log]\nformat = \"json\"",
            &overrides,
        )
        .expect("valid");
        assert_eq!(config.plugin_dir, Path::new("/tmp/p"));
        assert_eq!(config.kubelet_socket, Path::new("/tmp/p/kubelet.sock"));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn command_line_paths_are_relative_to_the_working_directory() {
        let overrides = Overrides { plugin_dir: Some("run/plugins".into()), kubelet_socket: Some("k.sock".into()) };
        let config = HostConfig::parse(Path::new("/etc/devhost/devhost.toml"), "", &overrides).expect("valid");
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(config.plugin_dir, cwd.join("run/plugins"));
        assert_eq!(config.kubelet_socket, cwd.join("k.sock"));
        let config = HostConfig::parse(
            Path::new("/etc/devhost/devhost.toml"),
            "plugin_dir = \"p\"\nkubelet_socket = \"k.sock\"",
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(config.plugin_dir, Path::new("/etc/devhost/p"), "file paths: relative to the file");
        assert_eq!(config.kubelet_socket, Path::new("/etc/devhost/p/k.sock"), "the socket: inside the plugin dir");
    }

    #[test]
    fn unknown_keys_and_wrong_types_have_positions() {
        let error = parse("plugin_dir = \"/x\"\nplugins = 1\n").expect_err("unknown key");
        assert_eq!(error.location, Some((2, 1)), "{error}");
        assert!(error.message.contains("unknown field `plugins`"), "{error}");
        let error = parse("call_timeout_ms = \"soon\"\n").expect_err("wrong type");
        assert_eq!(error.location, Some((1, 19)), "{error}");
        let error = parse("metrics_address = \"localhost\"\n").expect_err("not an address");
        assert!(
            error.to_string().starts_with("/etc/devhost/devhost.toml:1:19: metrics_address must be an IP:port"),
            "{error}"
        );
        assert_eq!(parse("metrics_address = \"\"\n").expect("off").metrics_address, None);
        assert_eq!(parse("").expect("empty").probe_address, Some(default_probe_address()));
        assert_eq!(parse("probe_address = \"\"\n").expect("off").probe_address, None);
        let error = parse("probe_address = \"9478\"\n").expect_err("not an address");
        assert!(error.to_string().contains("probe_address must be an IP:port such as \"127.0.0.1:9478\""), "{error}");
        let error = parse("call_timeout_ms = 0\n").expect_err("zero");
        assert_eq!(error.to_string(), "/etc/devhost/devhost.toml:1:19: call_timeout_ms must be at least 1");
    }
}
