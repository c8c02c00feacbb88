//! The docs as a newcomer uses them (issue 14, done-when): every shell
//! command in a fenced block of the README and the two guides is either run
//! here, as written (with only the placeholder `DIR` filled in, and paths
//! that exist only in the pod mapped to the files the pod gets), or named
//! below with the test that covers it and why it cannot run here (a
//! cluster, docker, root). A command added to the docs without either
//! fails this test until someone decides which.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::repo;

/// The guides a newcomer follows.
const DOCS: [&str; 3] = ["README.md", "docs/operator-guide.md", "docs/vendor-guide.md"];

/// Commands that cannot run on a test machine, each with what covers it.
const ELSEWHERE: &[(&str, &str)] = &[
    (
        "cargo run -- demo",
        "cli.rs the_demo_shows_registration_health_change_and_allocate_then_exits_cleanly runs `devhost demo`, and the_demo_tours_the_generic_example_config the generic one, from the binary cargo builds",
    ),
    ("scripts/test", "is what CI runs (.ci/run)"),
    ("cargo build -p devhost-backend-generic", "scripts/test builds the whole workspace, this crate included"),
    (
        "devhost run --config /etc/devhost/devhost.toml",
        "needs root paths; deploy.rs checks that the image's ENTRYPOINT and this file agree, and harness.rs runs `devhost run --config` on every e2e node",
    ),
    (
        "/usr/bin/devhost run --config /etc/devhost/devhost.toml",
        "the image's ENTRYPOINT; deploy.rs checks the DaemonSet runs the ENTRYPOINT and mounts this file where it reads it",
    ),
    (
        "docker build",
        "no docker here; deploy.rs reads the Dockerfile (its ENTRYPOINT and where it installs the backends) and checks the manifests agree with it",
    ),
    ("docker push", "no registry here"),
    ("docker buildx build", "no docker here; deploy.rs checks the Dockerfile pins no platform"),
    (
        "kubectl create namespace devhost",
        "no cluster here; deploy.rs validates every rendered object against Kubernetes 1.29-1.37",
    ),
    (
        "kubectl label namespace devhost pod-security.kubernetes.io/enforce=privileged",
        "no cluster here; deploy.rs checks the kustomize namespace carries this label",
    ),
    (
        "helm install devhost deploy/helm/devhost -n devhost --set image.repository=registry.example.com/devhost",
        "no cluster here; deploy.rs renders the chart with Helm with exactly these values and validates the result",
    ),
    (
        "cargo build --release -p devhost-example-native-rust",
        "the benchmark's build: scripts/test builds the same crate in the debug profile (a release build would double CI's build time)",
    ),
    (
        "cargo build --release -p devhost --bin devhost",
        "the benchmark's build: scripts/test builds devhost in the debug profile",
    ),
    (
        "cargo build --release -p devhost-bench",
        "the benchmark's build: scripts/test builds devhost-bench in the debug profile",
    ),
    (
        "cargo build --release --target wasm32-wasip2 -p devhost-example-wasm-rust",
        "scripts/test runs this very build (with more components)",
    ),
    (
        "target/release/devhost-bench instructions",
        "bench/tests/smoke.rs runs it (part of `all`) on the debug build, on the floor and the static backend with 5/15 calls (its figures are the benchmark's job, not CI's)",
    ),
    (
        "target/release/devhost-bench all",
        "bench/tests/smoke.rs runs every benchmark on the debug build with a twentieth of the calls (timings are the benchmark's job, not CI's)",
    ),
    (
        "devhost check backends.d/acme.toml",
        "vendor_crate.rs new_backend_projects_build_as_written_and_pass_the_check runs it on the project `devhost new-backend` writes",
    ),
    (
        "devhost kubelet --dir /tmp/plugins",
        "cli.rs devhost_kubelet_shows_a_running_devhost_live_and_allocates_on_request runs both terminals' commands",
    ),
    (
        "devhost run --config DIR/devhost.toml --plugin-dir /tmp/plugins",
        "cli.rs devhost_kubelet_shows_a_running_devhost_live_and_allocates_on_request runs both terminals' commands",
    ),
];

/// The pod mounts `deploy/kubernetes/devhost.toml` and `backends.d/` as
/// `/etc/devhost`: a command run in the pod runs here on those files.
const POD_PREFIX: &str = "kubectl -n devhost exec ds/devhost -- ";

/// Every command of `text`'s `sh` blocks (and `$ ` lines of plain blocks),
/// continuation lines joined, comments dropped.
fn commands(text: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut fence: Option<String> = None;
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(language) = trimmed.strip_prefix("```") {
            fence = if fence.is_some() { None } else { Some(language.to_owned()) };
            continue;
        }
        let Some(language) = &fence else { continue };
        let command = match language.as_str() {
            "sh" | "bash" => trimmed,
            "" => match trimmed.strip_prefix("$ ") {
                Some(command) => command,
                None => continue,
            },
            _ => continue,
        };
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        let command = command.split(" #").next().unwrap_or(command).trim();
        match command.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(command);
                commands.push(pending.split_whitespace().collect::<Vec<_>>().join(" "));
                pending.clear();
            }
        }
    }
    commands
}

fn run(program: &Path, args: &[&str], dir: &Path) -> String {
    let output = Command::new(program).args(args).current_dir(dir).output().expect("run the command");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "`{} {}` failed in {}:\n{text}", program.display(), args.join(" "), dir.display());
    text
}

/// Runs one documented command here, if it can be; `false` if not.
fn run_here(command: &str, scratch: &Path) -> bool {
    let devhost = PathBuf::from(env!("CARGO_BIN_EXE_devhost"));
    let (command, dir) = match command.strip_prefix(POD_PREFIX) {
        Some(inside) => (inside.replace("/etc/devhost", "deploy/kubernetes"), repo().to_owned()),
        None => (command.replace("DIR", "examples/config"), repo().to_owned()),
    };
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["devhost", "config", "check", _] => {
            assert!(run(&devhost, &words[1..], &dir).contains("0 refused"), "{command}");
        }
        ["devhost", "list", ..] => {
            let text = run(&devhost, &words[1..], &dir);
            assert!(text.contains("Healthy"), "`{command}` shows no device:\n{text}");
            if words.contains(&"--json") {
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("`{command}`: {e}\n{text}"));
            }
        }
        ["devhost", "new-backend", name, ..] => {
            run(&devhost, &words[1..], scratch);
            assert!(scratch.join(name).join("README.md").is_file(), "`{command}` wrote no project");
        }
        ["cc", .., "acme.c"] => {
            // The guide's C backend: the complete example, saved as acme.c.
            std::fs::copy(repo().join("examples/native-c/example.c"), scratch.join("acme.c")).expect("acme.c");
            let include = repo().join("abi/include").display().to_string();
            let args: Vec<&str> =
                words[1..].iter().map(|w| if *w == "abi/include" { include.as_str() } else { w }).collect();
            run(Path::new("cc"), &args, scratch);
            assert!(scratch.join("libacme.so").is_file(), "`{command}` built nothing");
        }
        _ => return false,
    }
    true
}

#[test]
fn every_command_in_the_docs_is_run_here_or_accounted_for() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut ran = Vec::new();
    let mut unaccounted = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(repo().join(doc)).expect("read the doc");
        for command in commands(&text) {
            if ELSEWHERE.iter().any(|(known, _)| command == *known || command.starts_with(&format!("{known} "))) {
                continue;
            }
            if run_here(&command, scratch.path()) {
                ran.push(command);
            } else {
                unaccounted.push(format!("{doc}: {command}"));
            }
        }
    }
    assert!(
        unaccounted.is_empty(),
        "documented commands neither run here nor accounted for:\n{}",
        unaccounted.join("\n")
    );
    // The ones that must run here did (a broken extractor runs nothing).
    for expected in ["devhost new-backend acme --lang rust", "devhost list --config DIR --json", "cc -O2"] {
        let expected = expected.replace("DIR", "examples/config");
        assert!(
            ran.iter().any(|c| c.replace("DIR", "examples/config").starts_with(&expected)),
            "{expected} was not run: {ran:?}"
        );
    }
    assert!(ran.iter().any(|c| c.starts_with(POD_PREFIX)), "no in-pod command was run: {ran:?}");
}

#[test]
fn the_extractor_joins_continuations_and_drops_comments() {
    let text = "```sh\n# a comment\nhelm install x \\\n  --set a=b   # why\n```\n```\n$ devhost check f.toml\nPASS  out\n```\n```toml\nkey = 1\n```\n";
    assert_eq!(commands(text), ["helm install x --set a=b", "devhost check f.toml"]);
}
