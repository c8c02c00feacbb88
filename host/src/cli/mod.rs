//! The command line: `devhost run` (the daemon) and `devhost demo`.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or a host config
//! that cannot be read (the message says which file, line and column).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{HostConfig, LogFormat, Overrides};

mod deviceclass;
mod inspect;
mod kubelet;
mod log;
mod new_backend;

use self::log::{LogGuard, init_logging};

/// devhost: one Kubernetes device-plugin daemon for every accelerator on a node.
#[derive(Debug, Parser)]
#[command(name = "devhost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: serve every backend in the config's backends.d/.
    Run {
        /// The host config file (devhost.toml); it names its backends.d/.
        #[arg(long, short)]
        config: PathBuf,
        /// The kubelet's device plugin directory (overrides the file).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// The kubelet's registration socket (overrides the file; default
        /// <plugin-dir>/kubelet.sock).
        #[arg(long)]
        kubelet_socket: Option<PathBuf>,
    },
    /// Show devhost at work without a cluster: a demo backend and a fake
    /// kubelet in one process, then exit.
    Demo {
        /// Tour this config directory's backends instead of the built-in
        /// demo backend (e.g. examples/config-generic).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve the demo backend's GPUs through Dynamic Resource
        /// Allocation, with a fake API server, beside a GPU published as
        /// partitions and a NIC that claims share.
        #[arg(long, conflicts_with = "config")]
        dra: bool,
    },
    /// The fake kubelet, to watch a backend live: serves kubelet.sock in
    /// DIR, prints every registration and device list as it arrives, and
    /// takes commands on stdin (allocate, preferred, prestart, quit).
    Kubelet {
        /// The plugin directory to serve (give devhost the same one with
        /// --plugin-dir).
        #[arg(long)]
        dir: PathBuf,
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
        /// Also run the plugin watcher of this kubelet version (1.32 to
        /// 1.37) on DIR's parent, for DRA drivers: which DRA services it
        /// takes and which health stream it opens. Off unless given (it
        /// registers every driver it finds there).
        #[arg(long)]
        kubelet_version: Option<crate::fake_kubelet::KubeletVersion>,
    },
    /// Start every configured backend, show the devices it sees, stop it.
    /// No kubelet needed. Exit 1 if a backend fails.
    List {
        /// A devhost.toml, or a config directory.
        #[arg(long, short, default_value = "/etc/devhost")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The vendor conformance check: run one backend with a private fake
    /// kubelet and check registration, device IDs, health updates, Allocate
    /// on every device, the preferred-allocation contract and deadlines.
    /// Exit 0 if every check passes, 1 otherwise.
    Check {
        /// A backend file (backends.d/<name>.toml) or a module (.so, .wasm).
        target: PathBuf,
        /// Deadline of each call into the backend, in milliseconds, unless
        /// the backend file sets its own.
        #[arg(long, default_value_t = 5000)]
        call_timeout_ms: u64,
        /// How long to watch each resource's health, in seconds; every
        /// change is listed with its time.
        #[arg(long, value_name = "SECONDS", default_value_t = crate::conformance::DEFAULT_WATCH.as_secs())]
        watch: u64,
    },
    /// Write a minimal backend project (code, build file, a backends.d
    /// file, a README) outside devhost's tree; it builds as it is and
    /// passes `devhost check`.
    NewBackend {
        /// The project's name: lower-case letters, digits and '-'.
        name: String,
        /// Its language.
        #[arg(long, value_enum)]
        lang: new_backend::Lang,
        /// Where to create the NAME directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Ask a running devhost's probe port (`probe_address`): exit 0 if
    /// `/healthz` (live) or `/readyz` (ready) answers 200, 1 otherwise. The
    /// shipped DaemonSet's exec probes.
    Probe {
        /// Which endpoint.
        #[arg(value_enum)]
        which: crate::telemetry::http::Probe,
        /// The host config file that names the probe port.
        #[arg(long, short, default_value = "/etc/devhost/devhost.toml")]
        config: PathBuf,
        /// The probe port's address (instead of the config file's).
        #[arg(long)]
        address: Option<std::net::SocketAddr>,
    },
    /// Print a DRA DeviceClass (YAML) for each resource a backends.d file
    /// or directory serves with api = "dra": named after its driver,
    /// selecting the driver's devices, with spec.extendedResourceName set
    /// to the resource's name, so pods asking for it in resources.limits
    /// get DRA devices. Exit 1 if a file is refused.
    #[command(name = "deviceclass")]
    DeviceClass {
        /// A backends.d file, or a backends.d directory.
        path: PathBuf,
        /// The resource.k8s.io version to write.
        #[arg(long, default_value = deviceclass::DEFAULT_API_VERSION,
              value_parser = clap::builder::PossibleValuesParser::new(deviceclass::API_VERSIONS))]
        api_version: String,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config directory (or devhost.toml) without starting
    /// anything: every error with file, line and column; exit 1 if any.
    Check {
        /// A config directory or a devhost.toml.
        path: PathBuf,
    },
}

/// Parses the arguments, runs the command, and returns its exit code.
pub fn main() -> ExitCode {
    // A worker process (devhost re-executed to run one native backend):
    // before anything else, so it starts with nothing but its socket.
    if std::env::args_os().nth(1).is_some_and(|arg| arg == crate::worker::WORKER_SUBCOMMAND) {
        return crate::worker::child::main();
    }
    let cli = Cli::parse();
    // Run by the kubelet every few seconds: no async runtime to start.
    if let Command::Probe { which, config, address } = &cli.command {
        return crate::telemetry::http::probe_command(*which, config, *address);
    }
    // Reads files only: no runtime either.
    if let Command::DeviceClass { path, api_version } = &cli.command {
        return deviceclass::run(path, api_version);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("devhost: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Holds the log writer's thread; dropped last, it lets the writer
    // write what is queued, unless the writer is stuck (see `LogGuard`).
    let mut _log: Option<LogGuard> = None;
    let code = match cli.command {
        Command::Run { config, plugin_dir, kubelet_socket } => {
            let overrides = Overrides { plugin_dir, kubelet_socket };
            let config = match HostConfig::load(&config, &overrides) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("devhost: {error}");
                    return ExitCode::from(2);
                }
            };
            _log = init_logging(config.log_format, &config.log_level);
            runtime.block_on(run(config))
        }
        Command::Demo { config, dra } => {
            _log = init_logging(LogFormat::Text, "warn");
            runtime.block_on(crate::demo::run(config.as_deref(), dra))
        }
        Command::List { config, json } => {
            _log = init_logging(LogFormat::Text, "warn");
            runtime.block_on(inspect::list(&config, json))
        }
        Command::Config { command: ConfigCommand::Check { path } } => inspect::config_check(&path),
        Command::Probe { .. } | Command::DeviceClass { .. } => unreachable!("answered before the runtime starts"),
        Command::Kubelet { dir, json, kubelet_version } => {
            _log = init_logging(LogFormat::Text, "warn");
            runtime.block_on(kubelet::run(&dir, kubelet_version, json))
        }
        Command::NewBackend { name, lang, dir } => match new_backend::write(&name, lang, &dir) {
            Ok(root) => {
                println!("wrote {}; its README says how to build and check it", root.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("devhost new-backend: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Check { target, call_timeout_ms, watch } => {
            _log = init_logging(LogFormat::Text, "error");
            let (timeout, watch) =
                (std::time::Duration::from_millis(call_timeout_ms), std::time::Duration::from_secs(watch));
            let report = runtime.block_on(crate::conformance::run(&target, timeout, watch));
            crate::conformance::print(&report);
            if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    };
    // A backend call stuck in native code (isolation = "none") holds a
    // blocking thread that cannot be cancelled; do not wait for it.
    runtime.shutdown_timeout(ABANDON_AFTER);
    code
}

/// How long exit waits for blocking threads still inside a backend.
const ABANDON_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

async fn run(config: HostConfig) -> ExitCode {
    // Every resource socket, stream, worker and module holds descriptors:
    // take what the operator allows rather than the 1,024 of a default
    // soft limit.
    let descriptor_limit = crate::sockets::accept::raise_descriptor_limit();
    // Files and directories devhost creates (CDI specs and their lock
    // files, the CDI directory, checkpoints) get the modes it means,
    // whatever umask it was started with: under umask 000 every local user
    // could otherwise drop a CDI spec the runtime applies to containers.
    let inherited = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    if inherited.bits() & 0o022 != 0o022 {
        tracing::info!(inherited = format!("{:03o}", inherited.bits()), "umask set to 022");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        plugin_dir = %config.plugin_dir.display(),
        kubelet_socket = %config.kubelet_socket.display(),
        backends_dir = %config.backends_dir.display(),
        descriptor_limit,
        "devhost starting"
    );
    let shutdown = CancellationToken::new();
    if let Err(error) = stop_on_signals(shutdown.clone()) {
        tracing::error!(%error, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    if let Some(address) = config.metrics_address {
        match crate::telemetry::http::serve(address, shutdown.clone()).await {
            Ok(bound) => tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz"),
            // Devices matter more than metrics: keep serving the kubelet.
            Err(error) => tracing::error!(%address, %error, "cannot serve metrics and probes; continuing without them"),
        }
    }
    if let Some(address) = config.probe_address {
        match crate::telemetry::http::serve_probes(address, shutdown.clone()).await {
            Ok(bound) => tracing::info!(address = %bound, "serving the probes /healthz and /readyz"),
            Err(error) => {
                // Another devhost holds it (a rolling update in one network
                // namespace): take it over when that one stops, or the
                // liveness probe would find no listener then.
                tracing::error!(%address, %error, "cannot serve the probe port yet; trying again every 2 s");
                tokio::spawn(retry_probe_port(address, shutdown.clone()));
            }
        }
    }
    match crate::daemon::run(&config, shutdown).await {
        Ok(()) => {
            tracing::info!("devhost stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "devhost failed");
            ExitCode::FAILURE
        }
    }
}

/// How often a probe port held by someone else is tried again.
const PROBE_PORT_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds the probe port once it is free (until `shutdown`).
async fn retry_probe_port(address: std::net::SocketAddr, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_PORT_RETRY) => {}
        }
        if let Ok(bound) = crate::telemetry::http::serve_probes(address, shutdown.clone()).await {
            tracing::info!(address = %bound, "serving the probes /healthz and /readyz (the port was free again)");
            return;
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
fn stop_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping: closing streams and removing sockets");
        shutdown.cancel();
    });
    Ok(())
}
