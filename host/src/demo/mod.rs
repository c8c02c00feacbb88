//! `devhost demo`: the daemon with a `static` demo backend and the fake
//! kubelet in one process, in a temporary directory. It tells, in plain
//! words, what a newcomer to device plugins needs to see (registration,
//! the device list, a health change arriving over ListAndWatch, a
//! preferred allocation, an Allocate answer) and exits 0.

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{HostConfig, Overrides};
use crate::fake_kubelet::FakeKubelet;
use crate::proto::v1beta1;

mod dra;

const DEMO_BACKEND: &str = include_str!("demo.toml");
const GPU: &str = "example.com/gpu";
const LICENSE: &str = "example.com/license";
const WAIT: Duration = Duration::from_secs(20);

/// Runs the demo; any failure is printed and gives exit code 1. With a
/// config directory, the tour runs over its backends instead of the
/// built-in demo backend; with `dra`, the demo backend's GPUs are served
/// through DRA, beside a GPU published as partitions and a shared NIC
/// (`dra.toml`).
pub async fn run(config: Option<&std::path::Path>, dra: bool) -> ExitCode {
    let result = match config {
        Some(dir) => tour(dir).await,
        None if dra => dra::demo().await,
        None => demo().await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A demo's temporary node: the kubelet's directories, a config directory
/// and the health files of gpu-0 and gpu-1 (both Healthy).
struct DemoNode {
    root: tempfile::TempDir,
    plugin_dir: std::path::PathBuf,
    config_dir: std::path::PathBuf,
    state_dir: std::path::PathBuf,
}

impl DemoNode {
    fn new(prefix: &str) -> anyhow::Result<DemoNode> {
        let root = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let plugin_dir = root.path().join("device-plugins");
        let config_dir = root.path().join("config");
        let state_dir = root.path().join("state");
        for dir in [&plugin_dir, &config_dir.join("backends.d"), &state_dir] {
            std::fs::create_dir_all(dir)?;
        }
        for device in ["gpu-0", "gpu-1"] {
            std::fs::write(state_dir.join(format!("{device}.ok")), "")?;
        }
        Ok(DemoNode { root, plugin_dir, config_dir, state_dir })
    }

    /// The demo backend's text, its health files in this node.
    fn backend_text(&self) -> String {
        DEMO_BACKEND.replace("@STATE@", &self.state_dir.display().to_string())
    }
}

async fn demo() -> anyhow::Result<()> {
    let node = DemoNode::new("devhost-demo-")?;
    let DemoNode { root, plugin_dir, config_dir, state_dir } = &node;
    let backend_file = config_dir.join("backends.d/demo.toml");
    // The GPUs' device nodes and mounts reach the container through a CDI
    // spec devhost writes (in the demo's own directory).
    std::fs::write(&backend_file, node.backend_text() + "\n[resources.\"example.com/gpu\"]\ncdi = true\n")?;

    println!("devhost demo: devhost and a fake kubelet in one process, under {}.", root.path().display());
    println!("Nothing here touches this machine's kubelet or devices.\n");
    println!("The backend is devhost's built-in `static` one, from one file ({}):", backend_file.display());
    println!("{GPU} (gpu-0 on NUMA node 0, gpu-1 on node 1) and {LICENSE} (two seats).");

    let kubelet = FakeKubelet::start(plugin_dir).await?;
    let mut config =
        HostConfig::defaults(config_dir, &Overrides { plugin_dir: Some(plugin_dir.clone()), kubelet_socket: None });
    // Not this machine's kubelet or CDI directories: the demo's pods are
    // imaginary.
    config.pod_resources.socket = None;
    config.cdi_dir = root.path().join("cdi");
    config.cdi_runtime_dirs = Vec::new();
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { crate::daemon::run(&config, shutdown).await }
    });

    step(
        1,
        "Registration",
        "a device plugin serves gRPC on a socket of its own, then tells the kubelet about it on kubelet.sock. \
         devhost does this once per resource:",
    );
    for resource in [GPU, LICENSE] {
        let request = kubelet.wait_for_registrations(resource, 1, WAIT).await?;
        let options = kubelet.options(resource).unwrap_or_default();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        println!(
            "   {resource:<20} socket {}, pre-start: {}, suggests devices: {}",
            request.endpoint,
            yes_no(options.pre_start_required),
            yes_no(options.get_preferred_allocation_available)
        );
    }

    step(
        2,
        "The device list",
        "the kubelet opens ListAndWatch and keeps it open. The first message lists every device and its \
         health; the node's capacity is the number of Healthy ones.",
    );
    let devices = kubelet.wait_for_devices(GPU, WAIT, |devices| devices.len() == 2).await?;
    print_devices(&devices);

    step(
        3,
        "A health change",
        "the demo removes gpu-1's health file. devhost sends the new list on the open stream at once, and the \
         kubelet gives gpu-1 to no new pod:",
    );
    std::fs::remove_file(state_dir.join("gpu-1.ok"))?;
    let devices =
        kubelet.wait_for_devices(GPU, WAIT, |d| d.iter().any(|d| d.id == "gpu-1" && d.health == "Unhealthy")).await?;
    print_devices(&devices);

    step(
        4,
        "A preferred allocation",
        "before it picks, the kubelet may ask which of the available devices the plugin would rather give \
         (here: one of gpu-0 and gpu-1):",
    );
    let preferred = kubelet.preferred_allocation(GPU, &["gpu-0", "gpu-1"], &[], 1).await?;
    for container in &preferred.container_responses {
        println!("   devhost suggests: {}", container.device_i_ds.join(", "));
    }

    step(
        5,
        "Allocate",
        "when a pod asking for example.com/gpu: 1 is admitted, the kubelet asks what its container needs \
         to use gpu-0:",
    );
    let answer = kubelet.allocate(GPU, &["gpu-0"]).await?;
    for container in &answer.container_responses {
        print_allocation(container);
    }
    kubelet.pre_start(GPU, &["gpu-0"]).await?;
    println!("   PreStartContainer(gpu-0): ok (called before the container starts, as the resource asked)");

    step(6, "A wrong request", "Allocate of gpu-9, which does not exist, is refused:");
    match kubelet.allocate(GPU, &["gpu-9"]).await {
        Ok(_) => anyhow::bail!("devhost accepted an unknown device ID"),
        Err(error) => println!(
            "   {}",
            error.status().map_or_else(|| error.to_string(), |s| format!("{:?}: {}", s.code(), s.message()))
        ),
    }

    shutdown.cancel();
    daemon.await??;
    kubelet.stop().await;
    let left = std::fs::read_dir(plugin_dir)?.count();
    step(
        7,
        "Shutdown",
        &format!("devhost stopped and removed its sockets: {left} socket(s) left in the plugin directory."),
    );
    anyhow::ensure!(left == 0, "sockets left behind in {}", plugin_dir.display());
    println!("\nNext (put `cargo run --` in front if devhost is not on your PATH, as in the quick start):");
    println!("   devhost demo --config examples/config          the same tour over the example config directory");
    println!(
        "   devhost demo --dra                             the GPUs through DRA, with partitions and a shared NIC"
    );
    println!("   devhost run --config examples/config/devhost.toml --plugin-dir /tmp/devhost-plugins");
    println!("                                                  devhost serving, as on a node (Ctrl-C stops it)");
    Ok(())
}

/// A numbered step of the tour: its title and what happens, wrapped.
fn step(number: u32, title: &str, what: &str) {
    println!("\n{number}. {title}");
    for line in wrap(what, 76) {
        println!("   {line}");
    }
}

/// `text` in lines of at most `width` characters, cut at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// The tour over a config directory's backends: each resource's
/// registration, device list and an Allocate of its first healthy device,
/// with a private fake kubelet; nothing touches the real kubelet.
async fn tour(dir: &std::path::Path) -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("devhost-demo-").tempdir()?;
    let plugin_dir = root.path().join("device-plugins");
    let mut config = HostConfig::from_path(dir)?;
    config.plugin_dir = plugin_dir.clone();
    config.kubelet_socket = plugin_dir.join(crate::proto::KUBELET_SOCKET_NAME);
    config.metrics_address = None;
    config.cdi_dir = root.path().join("cdi");
    let shown = config.backends_dir.clone();
    config.backends_dir = with_local_modules(&shown, &root.path().join("backends.d"))?;
    let loaded = crate::config::load_backends(&config.backends_dir, config.call_timeout);
    for error in &loaded.errors {
        println!("refused: {error}");
    }
    println!("devhost demo over {}: a fake kubelet in {}\n", shown.display(), plugin_dir.display());
    let kubelet = FakeKubelet::start(&plugin_dir).await?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { crate::daemon::run(&config, shutdown).await }
    });
    // Every backend that starts registers its resources; give them time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut resources: Vec<String> = kubelet.registrations().into_iter().map(|r| r.resource_name).collect();
    resources.sort();
    resources.dedup();
    anyhow::ensure!(!resources.is_empty(), "no backend in {} registered a resource", config.backends_dir.display());
    for resource in &resources {
        let request = kubelet.wait_for_registrations(resource, 1, WAIT).await?;
        println!("{resource}: registered on {}", request.endpoint);
        let devices = kubelet.wait_for_devices(resource, WAIT, |_| true).await?;
        print_devices(&devices);
        if let Some(device) = devices.iter().find(|d| d.health == crate::proto::HEALTHY) {
            println!("   Allocate([{}]):", device.id);
            for container in &kubelet.allocate(resource, &[device.id.as_str()]).await?.container_responses {
                print_allocation(container);
            }
        }
        println!();
    }
    shutdown.cancel();
    daemon.await??;
    kubelet.stop().await;
    println!("devhost stopped; {} socket(s) left.", std::fs::read_dir(&plugin_dir)?.count());
    Ok(())
}

/// A copy of `backends` in `copy` in which a module that is not where its
/// file says (an example config names the installed path, under
/// `/usr/lib/devhost/backends`) but that this build made (a library of the
/// same name beside the devhost binary, as `cargo build` leaves it) is
/// taken from the build instead, and said so. So an example config tours
/// from a fresh clone, without root and without copying files. Relative
/// module paths are made absolute (the copy lives elsewhere).
fn with_local_modules(backends: &std::path::Path, copy: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let built = std::env::current_exe()?.parent().map(std::path::Path::to_owned);
    std::fs::create_dir_all(copy)?;
    for entry in std::fs::read_dir(backends)? {
        let file = entry?.path();
        if file.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let mut text = std::fs::read_to_string(&file)?;
        let module = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|table| table.get("backend")?.get("module")?.as_str().map(std::path::PathBuf::from));
        if let Some(module) = module {
            let named = backends.join(&module);
            let local = built.as_ref().zip(module.file_name()).map(|(dir, name)| dir.join(name));
            let used = match local {
                Some(local) if !named.exists() && local.is_file() => {
                    println!(
                        "{}: {} is not installed; using {} from this build",
                        file.display(),
                        module.display(),
                        local.display()
                    );
                    local
                }
                _ => named,
            };
            text = text
                .replace(&format!("{:?}", module.display().to_string()), &format!("{:?}", used.display().to_string()));
            // A worker's sandbox (its own PID namespace and cgroup) needs
            // root; a tour as another user runs it without, and says so.
            let native = used.extension().is_none_or(|ext| ext != "wasm");
            if native && !nix::unistd::geteuid().is_root() && !text.contains("unsandboxed") {
                text = text.replacen("[backend]\n", "[backend]\nunsandboxed = \"allow\"\n", 1);
                println!(
                    "{}: not root, so its worker runs without the sandbox's namespace and cgroup (unsandboxed = \"allow\")",
                    file.display()
                );
            }
        }
        std::fs::write(copy.join(file.file_name().unwrap_or_default()), text)?;
    }
    Ok(copy.to_owned())
}

fn print_devices(devices: &[v1beta1::Device]) {
    for device in devices {
        let numa: Vec<String> = device.topology.iter().flat_map(|t| t.nodes.iter().map(|n| n.id.to_string())).collect();
        let place = if numa.is_empty() { String::new() } else { format!("NUMA node {}", numa.join(", ")) };
        println!("{}", format!("   {:<8} {:<10} {place}", device.id, device.health).trim_end());
    }
}

fn print_allocation(container: &v1beta1::ContainerAllocateResponse) {
    let mut envs: Vec<_> = container.envs.iter().collect();
    envs.sort();
    for (name, value) in envs {
        println!("   environment  {name}={value}");
    }
    for spec in &container.devices {
        println!(
            "   device node  {}, seen in the container as {} ({})",
            spec.host_path, spec.container_path, spec.permissions
        );
    }
    for mount in &container.mounts {
        let mode = if mount.read_only { "read-only" } else { "read-write" };
        println!("   mount        {}, at {} in the container ({mode})", mount.host_path, mount.container_path);
    }
    let mut annotations: Vec<_> = container.annotations.iter().collect();
    annotations.sort();
    for (key, value) in annotations {
        println!("   annotation   {key}={value}");
    }
    for cdi in &container.cdi_devices {
        println!("   CDI device   {} (the container runtime finds its edits in a CDI spec file)", cdi.name);
    }
}
