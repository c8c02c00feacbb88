//! `devhost kubelet --dir DIR`: the fake kubelet as a command, so that a
//! vendor can watch a backend live (`devhost run` in one terminal, this in
//! another). It serves `kubelet.sock` in DIR, prints each registration and
//! every ListAndWatch update as it arrives (text, or one JSON object per
//! line with `--json`), and reads commands on stdin: `allocate RESOURCE
//! ID…`, `preferred RESOURCE SIZE ID…`, `prestart RESOURCE ID…`, `quit`.
//! With `--kubelet-version` it also runs the plugin watcher of that kubelet
//! version on DIR's parent (the kubelet root): DRA drivers
//! register there, and it opens the health stream that version opens,
//! printing registrations, refusals, health messages and stream errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::fake_kubelet::{FakeKubelet, FakePluginWatcher, KubeletVersion};
use crate::proto::v1beta1;

/// How often the kubelet's records are looked at for news.
const POLL: Duration = Duration::from_millis(10);

/// Runs until stdin ends, `quit`, or Ctrl-C.
pub async fn run(dir: &Path, version: Option<KubeletVersion>, json_lines: bool) -> ExitCode {
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("devhost kubelet: cannot create {}: {error}", dir.display());
        return ExitCode::FAILURE;
    }
    let kubelet = match FakeKubelet::start(dir).await {
        Ok(kubelet) => kubelet,
        Err(error) => {
            eprintln!("devhost kubelet: {error}");
            return ExitCode::FAILURE;
        }
    };
    let out = Printer { json: json_lines, started: Instant::now() };
    let root = dir.parent().unwrap_or(dir);
    let watcher = match version {
        None => None,
        Some(version) => match FakePluginWatcher::start(root, version).await {
            Ok(watcher) => {
                out.event(
                    "watching",
                    json!({"registry": root.join("plugins_registry").display().to_string(),
                           "kubelet_version": version.to_string()}),
                    &format!(
                        "plugin watcher of a {version} kubelet on {} (DRA drivers register here)",
                        root.join("plugins_registry").display()
                    ),
                );
                Some(watcher)
            }
            Err(error) => {
                eprintln!("devhost kubelet: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut dra = DraSeen::default();
    out.event(
        "listening",
        json!({"socket": kubelet.socket_path().display().to_string()}),
        &format!(
            "fake kubelet on {}; start devhost with --plugin-dir {} (commands: allocate RESOURCE ID…, preferred RESOURCE SIZE ID…, prestart RESOURCE ID…, quit)",
            kubelet.socket_path().display(),
            dir.display()
        ),
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let (mut registrations, mut lists) = (0, BTreeMap::<String, usize>::new());
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => break,
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if line.trim() == "quit" {
                        break;
                    }
                    command(&kubelet, &out, &line).await;
                }
                // stdin closed: keep watching until Ctrl-C.
                Ok(None) | Err(_) => std::future::pending::<()>().await,
            },
        }
        let all = kubelet.registrations();
        for request in all.iter().skip(registrations) {
            out.event(
                "registered",
                json!({"resource": request.resource_name, "endpoint": request.endpoint, "version": request.version}),
                &format!("{} registered on {} (API {})", request.resource_name, request.endpoint, request.version),
            );
            lists.entry(request.resource_name.clone()).or_insert(0);
        }
        registrations = all.len();
        if let Some(watcher) = &watcher {
            dra.report(watcher, &out);
        }
        for (resource, seen) in &mut lists {
            let count = kubelet.device_list_count(resource);
            for devices in kubelet.device_lists_since(resource, *seen) {
                out.event(
                    "devices",
                    json!({"resource": resource, "devices": device_json(&devices)}),
                    &device_text(resource, &devices),
                );
            }
            *seen = count;
        }
    }
    if let Some(watcher) = &watcher {
        watcher.stop();
    }
    kubelet.stop().await;
    ExitCode::SUCCESS
}

/// What of the plugin watcher's records has been printed.
#[derive(Default)]
struct DraSeen {
    drivers: Vec<String>,
    refusals: usize,
    health_errors: usize,
    health: BTreeMap<String, usize>,
}

impl DraSeen {
    fn report(&mut self, watcher: &FakePluginWatcher, out: &Printer) {
        for registration in watcher.drivers() {
            if self.drivers.contains(&registration.driver) {
                continue;
            }
            let health = registration.health.map_or_else(|| "none".to_owned(), |api| format!("{api:?}"));
            out.event(
                "dra_registered",
                json!({"driver": registration.driver, "endpoint": registration.endpoint.display().to_string(),
                       "service": registration.service, "health": health}),
                &format!(
                    "DRA driver {} registered: {} on {}, health stream {health}",
                    registration.driver,
                    registration.service,
                    registration.endpoint.display()
                ),
            );
            self.drivers.push(registration.driver);
        }
        let refusals = watcher.refusals();
        for refusal in refusals.iter().skip(self.refusals) {
            out.event("dra_refused", json!({"reason": refusal}), &format!("DRA registration refused: {refusal}"));
        }
        self.refusals = refusals.len();
        let errors = watcher.health_errors();
        for error in errors.iter().skip(self.health_errors) {
            out.event("health_error", json!({"error": error}), &format!("health stream error: {error}"));
        }
        self.health_errors = errors.len();
        for driver in &self.drivers {
            let messages = watcher.health_messages(driver);
            let seen = self.health.entry(driver.clone()).or_insert(0);
            for message in messages.iter().skip(*seen) {
                let devices: Vec<serde_json::Value> = message
                    .devices
                    .iter()
                    .map(|d| {
                        let name = d.device.as_ref().map_or("", |id| id.device_name.as_str());
                        json!({"device": name, "health": d.health().as_str_name(), "message": d.message})
                    })
                    .collect();
                let text: Vec<String> = devices.iter().map(|d| format!("{} {}", d["device"], d["health"])).collect();
                out.event(
                    "health",
                    json!({"driver": driver, "devices": devices}),
                    &format!("{driver} health: {}", text.join(", ")),
                );
            }
            *seen = messages.len();
        }
    }
}

/// Prints events as text lines or JSON objects.
struct Printer {
    json: bool,
    started: Instant,
}

impl Printer {
    fn event(&self, kind: &str, mut fields: serde_json::Value, text: &str) {
        let at = self.started.elapsed().as_secs_f64();
        if self.json {
            fields["event"] = json!(kind);
            fields["at_s"] = json!((at * 1000.0).round() / 1000.0);
            println!("{fields}");
        } else {
            println!("[{at:>8.3}s] {text}");
        }
    }
}

fn device_json(devices: &[v1beta1::Device]) -> serde_json::Value {
    devices
        .iter()
        .map(|d| {
            let numa: Vec<i64> = d.topology.iter().flat_map(|t| t.nodes.iter().map(|n| n.id)).collect();
            json!({"id": d.id, "health": d.health, "numa": numa})
        })
        .collect()
}

fn device_text(resource: &str, devices: &[v1beta1::Device]) -> String {
    let list: Vec<String> = devices.iter().map(|d| format!("{} {}", d.id, d.health)).collect();
    format!("{resource}: {}", list.join(", "))
}

/// One command line from stdin.
async fn command(kubelet: &FakeKubelet, out: &Printer, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        [] => return,
        ["allocate", resource, ids @ ..] if !ids.is_empty() => kubelet.allocate(resource, ids).await.map(|answer| {
            let containers: Vec<serde_json::Value> = answer
                .container_responses
                .iter()
                .map(|c| {
                    json!({
                        "envs": c.envs,
                        "mounts": c.mounts.iter().map(|m| json!({"container_path": m.container_path, "host_path": m.host_path, "read_only": m.read_only})).collect::<Vec<_>>(),
                        "devices": c.devices.iter().map(|d| json!({"container_path": d.container_path, "host_path": d.host_path, "permissions": d.permissions})).collect::<Vec<_>>(),
                        "annotations": c.annotations,
                        "cdi_devices": c.cdi_devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let text = format!("Allocate {resource} {}: {}", ids.join(" "), serde_json::Value::from(containers.clone()));
            (json!({"resource": resource, "containers": containers}), text)
        }),
        ["preferred", resource, size, available @ ..] => match size.parse::<i32>() {
            Ok(size) => kubelet.preferred_allocation(resource, available, &[], size).await.map(|answer| {
                let ids: Vec<String> = answer.container_responses.iter().flat_map(|c| c.device_i_ds.clone()).collect();
                (json!({"resource": resource, "preferred": ids}), format!("GetPreferredAllocation {resource}: {}", ids.join(" ")))
            }),
            Err(_) => {
                out.event("error", json!({"message": format!("{size:?} is not a size")}), &format!("{size:?} is not a size"));
                return;
            }
        },
        ["prestart", resource, ids @ ..] if !ids.is_empty() => kubelet
            .pre_start(resource, ids)
            .await
            .map(|_| (json!({"resource": resource, "prestart": "ok"}), format!("PreStartContainer {resource} {}: ok", ids.join(" ")))),
        _ => {
            let message = "commands: allocate RESOURCE ID…, preferred RESOURCE SIZE ID…, prestart RESOURCE ID…, quit";
            out.event("error", json!({"message": message}), message);
            return;
        }
    };
    match result {
        Ok((fields, text)) => out.event("answer", fields, &text),
        Err(error) => out.event("error", json!({"message": error.to_string()}), &format!("refused: {error}")),
    }
}
