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
    assert_eq!(resources[0]["devices"][0], serde_json::json!({"id": "acc-0", "health": "Healthy", "numa_nodes": [0]}));
    assert_eq!(resources[0]["preferred_allocation"], true);
    assert_eq!(resources[1]["name"], "example.com/fuse");

    let (code, text) = devhost(&["list", "--config", &examples()]);
    assert_eq!(code, 0, "{text}");
    let row = text.lines().find(|line| line.contains("acc-1")).expect("a row for acc-1");
    assert!(row.starts_with("example") && row.contains("example.com/accelerator") && row.contains("Healthy"), "{row}");
}
