//! `devhost demo`: the daemon with a `static` demo backend and the fake
//! kubelet in one process, in a temporary directory. It prints what a
//! newcomer needs to see (registration, the device list, a health change
//! arriving over ListAndWatch, an Allocate answer) and exits 0.

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{HostConfig, Overrides};
use crate::fake_kubelet::FakeKubelet;
use crate::proto::v1beta1;

const DEMO_BACKEND: &str = include_str!("demo.toml");
const GPU: &str = "example.com/gpu";
const LICENSE: &str = "example.com/license";
const WAIT: Duration = Duration::from_secs(20);

/// Runs the demo; any failure is printed and gives exit code 1. With a
/// config directory, the tour runs over its backends instead of the
/// built-in demo backend.
pub async fn run(config: Option<&std::path::Path>) -> ExitCode {
    let result = match config {
        Some(dir) => tour(dir).await,
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

async fn demo() -> anyhow::Result<()> {
    let root = tempfile::Builder::new().prefix("devhost-demo-").tempdir()?;
    let plugin_dir = root.path().join("device-plugins");
    let config_dir = root.path().join("config");
    let state_dir = root.path().join("state");
    for dir in [&plugin_dir, &config_dir.join("backends.d"), &state_dir] {
        std::fs::create_dir_all(dir)?;
    }
    for device in ["gpu-0", "gpu-1"] {
        std::fs::write(state_dir.join(format!("{device}.ok")), "")?;
    }
    let backend_file = config_dir.join("backends.d/demo.toml");
    let backend_text = DEMO_BACKEND.replace("@STATE@", &state_dir.display().to_string());
    std::fs::write(&backend_file, &backend_text)?;

    println!("devhost demo: a fake kubelet and devhost in one process, under {}\n", root.path().display());
    println!("backend config ({}):\n{}", backend_file.display(), indent(backend_text.trim_end()));

    let kubelet = FakeKubelet::start(&plugin_dir).await?;
    let config =
        HostConfig::defaults(&config_dir, &Overrides { plugin_dir: Some(plugin_dir.clone()), kubelet_socket: None });
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { crate::daemon::run(&config, shutdown).await }
    });

    println!("1. registration (devhost serves first, then calls Register on kubelet.sock):");
    for resource in [GPU, LICENSE] {
        let request = kubelet.wait_for_registrations(resource, 1, WAIT).await?;
        println!(
            "   Register{{version: {:?}, endpoint: {:?}, resource_name: {:?}, options: {:?}}}",
            request.version,
            request.endpoint,
            request.resource_name,
            kubelet.options(resource).unwrap_or_default()
        );
    }

    println!("\n2. device list, first ListAndWatch message for {GPU}:");
    let devices = kubelet.wait_for_devices(GPU, WAIT, |devices| devices.len() == 2).await?;
    print_devices(&devices);

    println!("\n3. health change: removing {} makes gpu-1 Unhealthy", state_dir.join("gpu-1.ok").display());
    std::fs::remove_file(state_dir.join("gpu-1.ok"))?;
    let devices =
        kubelet.wait_for_devices(GPU, WAIT, |d| d.iter().any(|d| d.id == "gpu-1" && d.health == "Unhealthy")).await?;
    print_devices(&devices);

    println!("\n4. GetPreferredAllocation(available: [gpu-0, gpu-1], size: 1):");
    let preferred = kubelet.preferred_allocation(GPU, &["gpu-0", "gpu-1"], &[], 1).await?;
    for container in &preferred.container_responses {
        println!("   preferred: {:?}", container.device_i_ds);
    }

    println!("\n5. Allocate([gpu-0]) answer:");
    let answer = kubelet.allocate(GPU, &["gpu-0"]).await?;
    for container in &answer.container_responses {
        print_allocation(container);
    }
    kubelet.pre_start(GPU, &["gpu-0"]).await?;
    println!("   PreStartContainer([gpu-0]): ok");

    println!("\n6. Allocate([gpu-9]) for a device that does not exist:");
    match kubelet.allocate(GPU, &["gpu-9"]).await {
        Ok(_) => anyhow::bail!("devhost accepted an unknown device ID"),
        Err(error) => println!("   refused: {error}"),
    }

    shutdown.cancel();
    daemon.await??;
    kubelet.stop().await;
    let left = std::fs::read_dir(&plugin_dir)?.count();
    println!("\n7. shutdown: devhost stopped; {left} socket(s) left in the plugin directory.");
    anyhow::ensure!(left == 0, "sockets left behind in {}", plugin_dir.display());
    println!(
        "\nNext: `devhost run --config examples/config/devhost.toml --plugin-dir <dir>` serves the example config."
    );
    Ok(())
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
    let loaded = crate::config::load_backends(&config.backends_dir, config.call_timeout);
    for error in &loaded.errors {
        println!("refused: {error}");
    }
    println!("devhost demo over {}: a fake kubelet in {}\n", config.backends_dir.display(), plugin_dir.display());
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

fn print_devices(devices: &[v1beta1::Device]) {
    for device in devices {
        let numa: Vec<i64> = device.topology.iter().flat_map(|t| t.nodes.iter().map(|n| n.id)).collect();
        println!("   {:<8} {:<10} numa={numa:?}", device.id, device.health);
    }
}

fn print_allocation(container: &v1beta1::ContainerAllocateResponse) {
    let mut envs: Vec<_> = container.envs.iter().collect();
    envs.sort();
    println!("   envs:        {envs:?}");
    for spec in &container.devices {
        println!("   device:      {} -> {} ({})", spec.host_path, spec.container_path, spec.permissions);
    }
    for mount in &container.mounts {
        println!("   mount:       {} -> {} (read_only: {})", mount.host_path, mount.container_path, mount.read_only);
    }
    let mut annotations: Vec<_> = container.annotations.iter().collect();
    annotations.sort();
    println!("   annotations: {annotations:?}");
    let cdi: Vec<&str> = container.cdi_devices.iter().map(|c| c.name.as_str()).collect();
    println!("   cdi_devices: {cdi:?}");
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("   | {line}\n")).collect()
}
