//! The operator commands that need no kubelet: `devhost config check` and
//! `devhost list`.

use std::path::Path;
use std::process::Command;

use crate::harness::{Node, static_backend};

fn devhost(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_devhost")).args(args).output().expect("run devhost");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config").display().to_string()
}

#[test]
fn config_check_accepts_the_example_and_names_every_problem_elsewhere() {
    let (code, text) = devhost(&["config", "check", &examples()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("static: example.com/accelerator, example.com/fuse"), "{text}");
    assert!(text.contains("1 backend file(s) valid, 0 refused"), "{text}");

    let node = Node::new();
    node.backend("good", &static_backend(&[("example.com/good", &["g"])], None));
    let bad = node.backend("bad", &static_backend(&[("example.com/Bad/x", &["b"])], None));
    let config_dir = node.dir.path().join("config").display().to_string();
    let (code, text) = devhost(&["config", "check", &config_dir]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "error: {}:6:8: resource name \"example.com/Bad/x\" must contain exactly one '/'",
            bad.display()
        )),
        "{text}"
    );
    assert!(text.contains("1 backend file(s) valid, 1 refused"), "{text}");
}

#[test]
fn list_shows_what_each_backend_sees_without_a_kubelet() {
    let (code, text) = devhost(&["list", "--config", &examples(), "--json"]);
    assert_eq!(code, 0, "{text}");
    let listed: serde_json::Value = serde_json::from_str(&text).expect("JSON output");
    let resources = &listed[0]["resources"];
    assert_eq!(resources[0]["name"], "example.com/accelerator");
    // Attributes and capacities as the example file types them, in the
    // shape a DRA ResourceSlice gives them ({"<kind>": value}).
    assert_eq!(
        resources[0]["devices"][0],
        serde_json::json!({
            "id": "acc-0",
            "health": "Healthy",
            "numa_nodes": [0],
            "attributes": {
                "example.com/model": {"string": "acc-9000"},
                "example.com/driverVersion": {"version": "2.1.0"},
                "example.com/lanes": {"int": 16},
            },
            "capacities": {"example.com/memory": "16Gi"},
        })
    );
    assert_eq!(resources[0]["devices"][1], serde_json::json!({"id": "acc-1", "health": "Healthy", "numa_nodes": [0]}));
    assert_eq!(resources[0]["preferred_allocation"], true);
    assert_eq!(resources[1]["name"], "example.com/fuse");

    let (code, text) = devhost(&["list", "--config", &examples()]);
    assert_eq!(code, 0, "{text}");
    let row = text.lines().find(|line| line.contains("acc-1")).expect("a row for acc-1");
    assert!(row.starts_with("example") && row.contains("example.com/accelerator") && row.contains("Healthy"), "{row}");
    let lines: Vec<&str> = text.lines().collect();
    let acc0 = lines.iter().position(|line| line.contains("acc-0")).expect("a row for acc-0");
    assert!(lines[acc0 + 1].trim_start().starts_with("example.com/driverVersion=2.1.0 "), "{text}");
    assert!(lines[acc0 + 1].ends_with(" example.com/memory=16Gi"), "{text}");
}

#[test]
fn list_names_where_a_module_runs_and_the_sha256_of_the_code_loaded() {
    use sha2::Digest;
    let node = Node::new();
    let module = crate::native_loader::compile_c(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/native-c/example.c"),
        node.dir.path(),
    );
    let expected: String =
        sha2::Sha256::digest(std::fs::read(&module).expect("read module")).iter().map(|b| format!("{b:02x}")).collect();
    let file = |isolation: &str| {
        format!("[backend]\nmodule = {:?}\nisolation = \"{isolation}\"\n", module.display().to_string())
    };
    node.backend("in-worker", &file("process"));
    let config_dir = node.dir.path().join("config").display().to_string();
    let (code, text) = devhost(&["list", "--config", &config_dir, "--json"]);
    assert_eq!(code, 0, "{text}");
    let listed: serde_json::Value = serde_json::from_str(&text).expect("JSON output");
    assert_eq!(listed[0]["isolation"], "process", "{text}");
    assert_eq!(listed[0]["sha256"], expected.as_str(), "{text}");
    assert_eq!(listed[0]["resources"][0]["name"], "example.com/native-c", "{text}");

    std::fs::remove_file(node.backends_dir().join("in-worker.toml")).expect("remove");
    node.backend("in-process", &file("none"));
    let (code, text) = devhost(&["list", "--config", &config_dir]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("in-process       module sha256 {expected} (isolation: none)")), "{text}");
}

#[test]
fn the_demo_shows_registration_health_change_and_allocate_then_exits_cleanly() {
    let (code, text) = devhost(&["demo"]);
    assert_eq!(code, 0, "{text}");
    for expected in [
        "example.com/gpu      socket devhost-example.com_gpu-",
        ", pre-start: yes, suggests devices: yes",
        "   gpu-1    Unhealthy  NUMA node 1",
        "   devhost suggests: gpu-0",
        "   environment  EXAMPLE_VISIBLE_DEVICES=gpu-0",
        "   CDI device   example.com/gpu=gpu-0 ",
        "   InvalidArgument: resource \"example.com/gpu\" has no device \"gpu-9\"",
        "0 socket(s) left in the plugin",
    ] {
        assert!(text.contains(expected), "the demo lacks {expected:?}:\n{text}");
    }
    // Plain words, not Rust: no Debug structs, no config dump.
    for rust in ["DevicePluginOptions {", "[(\"", "[[config.resource]]"] {
        assert!(!text.contains(rust), "the demo prints {rust:?}:\n{text}");
    }
    // Every command it suggests names files that exist in the repository.
    assert!(text.contains("devhost demo --config examples/config "), "{text}");
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/devhost.toml").is_file());
}

/// One run of `devhost demo --dra`, shared by the tests that read it (the
/// demo takes seconds; its output does not depend on who reads it).
fn dra_demo() -> &'static (i32, String) {
    static RUN: std::sync::OnceLock<(i32, String)> = std::sync::OnceLock::new();
    RUN.get_or_init(|| devhost(&["demo", "--dra"]))
}

/// The lines of `text` from the one starting with `from` up to the one
/// starting with `to` (or the end), each with its newline.
fn section<'a>(text: &'a str, from: &str, to: &str) -> &'a str {
    let start = text.find(&format!("\n{from}")).unwrap_or_else(|| panic!("no {from:?} in:\n{text}"));
    let rest = &text[start + 1..];
    rest.find(&format!("\n{to}")).map_or(rest, |end| &rest[..=end])
}

/// `devhost demo --dra`: the plugin watcher's registration, the slice with
/// the demo GPUs' attributes, a claim prepared into a CDI spec, a health
/// change on the stream and in the slice, unprepare; in plain words.
#[test]
fn the_dra_demo_tours_registration_slices_a_claim_and_health() {
    let (code, text) = dra_demo();
    assert_eq!(*code, 0, "{text}");
    for expected in [
        "the kubelet chose v1.DRAPlugin",
        "drivers sliced-gpu.example.com and nic.example.com registered the same way",
        "example.com/license registered on kubelet.sock as a device plugin",
        "pool demo-node generation 1",
        "   gpu-0    driverVersion=1.2.0 model=demo-9000 memory=16Gi",
        "request \"gpu\": device gpu-0 → CDI k8s.gpu.example.com/claim=4f2c9a1e-demo-gpu",
        "      environment  EXAMPLE_VISIBLE_DEVICES=gpu-0",
        "      device node  /dev/null, seen in the container as /dev/example-gpu0",
        "health stream: gpu-1 Unhealthy",
        "pool demo-node generation 2",
        "claim training-gpu unprepared; its CDI spec is removed",
    ] {
        assert!(text.contains(expected), "the DRA demo lacks {expected:?}:\n{text}");
    }
    let after_change = section(text, "6. A health change", "7. Unprepare").split("generation 2").nth(1);
    assert!(after_change.is_some_and(|slice| !slice.contains("gpu-1 ")), "gpu-1 left the slice: {text}");
    assert!(text.contains("examples/dra/"), "{text}");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dra").is_dir());
}

/// `devhost demo --dra` (issue 28): a GPU published as overlapping
/// partitions of one counter set, a claim given one half and what its
/// container gets; a NIC two claims share, each container with its own
/// bandwidth, unprepared one at a time. The demo says it plays the
/// scheduler.
#[test]
fn the_dra_demo_shows_a_partition_and_a_shared_device() {
    let (code, text) = dra_demo();
    assert_eq!(*code, 0, "{text}");
    assert!(text.contains("There is no scheduler either"), "{text}");

    let partitions = section(text, "4. A GPU in partitions", "5. ");
    let lines: Vec<&str> = partitions.lines().collect();
    // The counter set is published in a slice of its own, before the one
    // with the partitions.
    let counters = lines.iter().position(|l| *l == "   sharedCounters gpu-2: memory=40Gi slices=8");
    let counters = counters.unwrap_or_else(|| panic!("no counter set:\n{partitions}"));
    assert!(lines[counters - 1].starts_with("   ResourceSlice demo-node-sliced-gpu.example.com-"), "{partitions}");
    assert!(lines[counters + 1].starts_with("   ResourceSlice demo-node-sliced-gpu.example.com-"), "{partitions}");
    for expected in [
        "   gpu-2        profile=whole memory=40Gi consumesCounters gpu-2: memory=40Gi slices=8",
        "   gpu-2-half-0 profile=half memory=20Gi consumesCounters gpu-2: memory=20Gi slices=4",
        "   gpu-2-half-1 profile=half memory=20Gi consumesCounters gpu-2: memory=20Gi slices=4",
        "The demo, as the scheduler, gives claim inference-half gpu-2-half-1.",
        "      gpu-2-half-0 still fits",
        "      gpu-2        no longer fits",
        "request \"gpu\": device gpu-2-half-1 → CDI k8s.sliced-gpu.example.com/claim=7d3e5b2a-demo-gpu",
        "      environment  EXAMPLE_PARTITION=gpu-2-half-1",
        "      environment  EXAMPLE_PARTITION_MEMORY=20Gi",
        "      device node  /dev/null, seen in the container as /dev/example-gpu2",
    ] {
        assert!(
            lines.contains(&expected.trim_end()) || partitions.contains(expected),
            "no {expected:?}:\n{partitions}"
        );
    }

    let shared = section(text, "5. A shared NIC", "6. ");
    for expected in [
        "   nic-0    bandwidth=25G allowMultipleAllocations\n",
        "requestPolicy bandwidth: default 1G, 1G to 25G in steps of 1G\n",
        "The demo, as the scheduler, allocates nic-0 twice, 10G to claim web and 5G to claim batch",
        "   claim web unprepared; its CDI spec is removed\n",
        "   claim batch's share is untouched: its CDI spec still gives EXAMPLE_NIC_BANDWIDTH=5G",
    ] {
        assert!(shared.contains(expected), "no {expected:?}:\n{shared}");
    }
    // Each claim's container gets the one NIC and its own amount.
    let web = section(shared, "   claim web: request", "   claim batch: request");
    assert!(web.contains("device nic-0 → CDI k8s.nic.example.com/claim=c3a7e1d2-demo-net"), "{shared}");
    assert!(web.contains("      environment  EXAMPLE_NIC=nic-0\n"), "{shared}");
    assert!(web.contains("      environment  EXAMPLE_NIC_BANDWIDTH=10G\n"), "{shared}");
    let batch = section(shared, "   claim batch: request", "   claim web unprepared");
    assert!(batch.contains("device nic-0 → CDI k8s.nic.example.com/claim=e8b4f6a9-demo-net"), "{shared}");
    assert!(batch.contains("      environment  EXAMPLE_NIC=nic-0\n"), "{shared}");
    assert!(batch.contains("      environment  EXAMPLE_NIC_BANDWIDTH=5G\n"), "{shared}");

    let unprepared = section(text, "7. Unprepare", "8. ");
    for claim in ["training-gpu", "inference-half", "batch"] {
        assert!(unprepared.contains(&format!("   claim {claim} unprepared; its CDI spec is removed")), "{unprepared}");
    }
}

/// The DRA demo's second backend file is the documented example of
/// partitions and sharing: it passes `devhost config check` as it is.
#[test]
fn the_dra_demo_file_is_a_valid_backend_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::create_dir(dir.path().join("backends.d")).expect("backends.d");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("host/src/demo/dra.toml");
    std::fs::copy(&file, dir.path().join("backends.d/demo-dra.toml")).expect("copy the demo's file");
    let (code, text) = devhost(&["config", "check", &dir.path().display().to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("(static: example.com/sliced-gpu, example.com/nic)"), "{text}");
}

/// The tour the demo suggests next, as typed (from the repository root).
#[test]
fn the_suggested_tour_of_the_example_config_runs() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let (code, text) = devhost(&["demo", "--config", &example.display().to_string()]);
    assert_eq!(code, 0, "{text}");
    for resource in ["example.com/accelerator", "example.com/fuse"] {
        assert!(text.contains(&format!("{resource}: registered on ")), "{text}");
    }
    assert!(text.contains("devhost stopped; 0 socket(s) left."), "{text}");
}

/// The generic example as documented, from the repository, without root:
/// its file names the installed library, which is not there; the demo
/// takes the one this build made (issue 14 item 5).
#[test]
fn the_demo_tours_the_generic_example_config() {
    if !Path::new("/dev/fuse").exists() {
        crate::harness::skip(crate::harness::Missing::Machine, "/dev/fuse is missing on this machine");
        return;
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config-generic");
    let (code, text) = devhost(&["demo", "--config", &example.display().to_string()]);
    assert_eq!(code, 0, "{text}");
    let built = Path::new(env!("CARGO_BIN_EXE_devhost")).with_file_name("libdevhost_generic.so");
    assert!(
        text.contains(&format!(
            "/usr/lib/devhost/backends/libdevhost_generic.so is not installed; using {} from this build",
            built.display()
        )),
        "{text}"
    );
    assert!(text.contains("devhost.example.com/fuse: registered"), "{text}");
    assert!(text.contains("device node  /dev/fuse, seen in the container as /dev/fuse (rwm)"), "{text}");
    assert!(text.contains("null::1  Healthy"), "replicas from [resources]: {text}");
    assert!(text.contains("devhost stopped; 0 socket(s) left."), "{text}");
}

/// Issue 12 item 10 and 13: configuration that used to be accepted but was
/// wrong is refused with the file, line and column; what cannot be checked
/// without starting a module is said.
#[test]
fn config_check_refuses_what_used_to_pass_silently() {
    let node = Node::new();
    let host = node.config_file();
    std::fs::write(&host, "[log]\nlevel = \"inof\"\n").expect("host config");
    let config_dir = node.dir.path().join("config").display().to_string();
    let (code, text) = devhost(&["config", "check", &config_dir]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "error: {}:2:9: log level \"inof\" is not a level: use one of off, error, warn, info, debug, trace",
            host.display()
        )),
        "{text}"
    );
    std::fs::write(&host, "[log]\nlevel = \"devhost=debug,info\"\n").expect("host config");

    let misnamed = node.backend(
        "misnamed",
        &format!(
            "{}\n[resources.\"example.com/other\"]\ncdi = true\n",
            static_backend(&[("example.com/gpu", &["g"])], None)
        ),
    );
    let missing = node.backend("missing", "[backend]\nmodule = \"/nonexistent/libgpu.so\"\n");
    let widened =
        node.backend("widened", "[backend]\nmodule = \"/nonexistent/x.wasm\"\n[sandbox]\nread = [\"/tmp/..\"]\n");
    let module = node.dir.path().join("libreal.so");
    std::fs::write(&module, "not checked by config check").expect("module file");
    node.backend(
        "unchecked",
        &format!(
            "[backend]\nmodule = {:?}\n[resources.\"example.com/fpga\"]\ncdi = true\n",
            module.display().to_string()
        ),
    );
    let huge = node.backend("huge", &format!("# {}\n", "x".repeat(4 << 20)));
    // Where the misnamed table's name starts: the line of its header, the
    // column after `[resources.`.
    let misnamed_text = std::fs::read_to_string(&misnamed).expect("read back");
    let misnamed_line = 1 + misnamed_text.lines().position(|l| l.starts_with("[resources.")).expect("the table");
    let (code, text) = devhost(&["config", "check", &config_dir]);
    assert_eq!(code, 1, "{text}");
    for expected in [
        format!(
            "error: {}:{misnamed_line}:{}: [resources.\"example.com/other\"] names no resource of this backend (it declares: example.com/gpu)",
            misnamed.display(),
            "[resources.".len() + 1
        ),
        format!("error: {}:2:10: module /nonexistent/libgpu.so does not exist", missing.display()),
        format!("error: {}:4:9: read: \"/tmp/..\" must be a normalised path (no `.`, `..` or `//`)", widened.display()),
        format!("error: {}: the file is larger than 4 MiB; a config file this large is refused", huge.display()),
        format!(
            "unchecked: {}: [resources.\"example.com/fpga\"] (a module's resources are known only once it starts",
            node.backends_dir().join("unchecked.toml").display()
        ),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
}

/// `devhost kubelet` (issue 14 item 1): beside `devhost run`, it shows the
/// registration and the device lists as they arrive (JSON lines here) and
/// answers commands typed on its stdin with the plugin's answers.
#[test]
fn devhost_kubelet_shows_a_running_devhost_live_and_allocates_on_request() {
    use std::io::{BufRead, Write};
    let node = Node::new();
    let state = crate::harness::healthy_state(node.dir.path(), &["gpu-0", "gpu-1"]);
    node.backend("gpu", &static_backend(&[("example.com/gpu", &["gpu-0", "gpu-1"])], Some(&state)));
    let mut kubelet = Command::new(env!("CARGO_BIN_EXE_devhost"))
        .args(["kubelet", "--json", "--dir"])
        .arg(node.plugin_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start devhost kubelet");
    let mut input = kubelet.stdin.take().expect("stdin");
    let (lines, events) = std::sync::mpsc::channel::<serde_json::Value>();
    let output = kubelet.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines().map_while(Result::ok) {
            let _ = lines.send(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
        }
    });
    let next = |kind: &str, matches: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let deadline = std::time::Instant::now() + crate::harness::WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = events.recv_timeout(left).unwrap_or_else(|_| panic!("no {kind:?} event"));
            if event["event"] == kind && matches(&event) {
                return event;
            }
        }
    };
    next("listening", &|_| true);
    let _devhost = node.start_devhost();
    let registered = next("registered", &|e| e["resource"] == "example.com/gpu");
    assert_eq!(registered["version"], "v1beta1");
    next("devices", &|e| {
        e["devices"].as_array().is_some_and(|d| d.len() == 2 && d.iter().all(|d| d["health"] == "Healthy"))
    });
    std::fs::remove_file(state.join("gpu-1.ok")).expect("make gpu-1 unhealthy");
    next("devices", &|e| e["devices"][1]["health"] == "Unhealthy");

    writeln!(input, "allocate example.com/gpu gpu-0").expect("write a command");
    let answer = next("answer", &|_| true);
    assert_eq!(answer["containers"][0]["envs"]["IDS"], "gpu-0", "{answer}");
    writeln!(input, "allocate example.com/gpu gpu-9").expect("write a command");
    let refused = next("error", &|_| true);
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("InvalidArgument")), "{refused}");
    writeln!(input, "quit").expect("write quit");
    let status = kubelet.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// `devhost kubelet --kubelet-version` (issue 24, item 4): the plugin
/// watcher of that kubelet version registers devhost's DRA driver and opens
/// the health stream that version opens (1.36: v1alpha1, on every plugin),
/// and shows the health it receives, with no stream error.
#[tokio::test(flavor = "multi_thread")]
async fn devhost_kubelet_models_the_kubelet_version_it_is_given() {
    use std::io::BufRead;
    let node = Node::new();
    let text =
        static_backend(&[("example.com/gpu", &["gpu-0"])], None) + "[resources.\"example.com/gpu\"]\napi = \"dra\"\n";
    node.backend("gpu", &text);
    let server = devhost::fake_apiserver::FakeApiServer::start().await.expect("API server");
    server.add_node("node-a");
    let root = node.dir.path();
    let kubeconfig = root.join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
    let host = format!(
        "metrics_address = \"\"\ncdi_dir = {:?}\n[dra]\nnode_name = \"node-a\"\nkubeconfig = {kubeconfig:?}\nkubelet_root = {root:?}\n",
        root.join("cdi")
    );
    std::fs::write(node.config_file(), host).expect("host config");
    /// Killed however the test ends (a panic included).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut kubelet = Killed(
        Command::new(env!("CARGO_BIN_EXE_devhost"))
            .args(["kubelet", "--json", "--kubelet-version", "1.36", "--dir"])
            .arg(node.plugin_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start devhost kubelet"),
    );
    let (lines, mut events) = tokio::sync::mpsc::unbounded_channel::<String>();
    let output = kubelet.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let devhost = node.start_devhost();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::harness::WAIT;
    while !seen.iter().any(|e: &serde_json::Value| e["event"] == "health") {
        let line = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no health event; saw {seen:?}; devhost's log:\n{}", devhost.log()))
            .expect("still running");
        seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
    }
    let event = |kind: &str| {
        seen.iter().find(|e| e["event"] == kind).cloned().unwrap_or_else(|| panic!("no {kind} in {seen:?}"))
    };
    assert_eq!(event("watching")["kubelet_version"], "1.36");
    let registered = event("dra_registered");
    assert_eq!(
        (registered["driver"].as_str(), registered["health"].as_str()),
        (Some("gpu.example.com"), Some("V1alpha1"))
    );
    assert_eq!(event("health")["devices"][0]["health"], "HEALTHY");
    assert!(!seen.iter().any(|e| e["event"] == "health_error"), "{seen:?}");
}

/// Every `devhost …` command in a fenced block of the README and the
/// guides names a subcommand and flags this devhost has: each is run with
/// `--help` appended, which clap answers only after accepting what comes
/// before it (a renamed flag or subcommand fails here).
#[test]
fn every_devhost_command_in_the_docs_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut commands = Vec::new();
    for doc in ["README.md", "docs/vendor-guide.md", "docs/operator-guide.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("read the doc");
        let mut fenced = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("```") {
                fenced = !fenced;
                continue;
            }
            let line = line.strip_prefix("$ ").unwrap_or(line);
            let line = line.strip_prefix("cargo run -- ").map_or(line.to_owned(), |rest| format!("devhost {rest}"));
            if fenced && line.starts_with("devhost ") {
                let command = line.split(" #").next().unwrap_or(&line).trim().to_owned();
                commands.push((doc, command));
            }
        }
    }
    assert!(commands.len() >= 5, "the docs' commands were not found: {commands:?}");
    for (doc, command) in &commands {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let output = Command::new(env!("CARGO_BIN_EXE_devhost")).args(&args).arg("--help").output().expect("run");
        assert!(
            output.status.success(),
            "{doc}: `{command}` is not a command this devhost knows:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
