//! The benchmarks still run: `devhost-bench` on a twentieth of its calls
//! (`DEVHOST_BENCH_SMOKE=1`) against the devhost binary of this build. Its
//! figures mean nothing (a debug build, a shared CI machine) and nothing
//! here looks at them; it fails only if a benchmark cannot run to the end.

use std::process::Command;

#[test]
fn the_benchmarks_run() {
    let output = Command::new(env!("CARGO_BIN_EXE_devhost-bench"))
        .args(["floor", "allocate", "instructions", "health", "start", "restart", "isolation", "dra"])
        .env("DEVHOST_BENCH_SMOKE", "1")
        // The debug devhost beside this test's binary, not a release one.
        .env("DEVHOST_BIN", bin_dir().join("devhost"))
        .output()
        .expect("run devhost-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "devhost-bench failed:\n{stderr}");
    let table = String::from_utf8_lossy(&output.stdout);
    for row in [
        "floor: bare tonic Allocate",
        "Allocate, static",
        // Under valgrind where installed: floor and static only, few calls.
        "instructions per Allocate",
        "kubelet restart",
        "process start",
        "isolation: Allocate through the kubelet client, sandboxed vs unsandboxed worker",
        "DRA NodePrepareResources, 8 claims a call",
        "DRA: API-server writes while one device flaps",
    ] {
        assert!(table.contains(row), "no {row:?} row in:\n{table}");
    }
}

/// `target/<profile>`, where Cargo put this build's binaries.
fn bin_dir() -> std::path::PathBuf {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_devhost-bench"));
    exe.parent().expect("the binary's directory").to_owned()
}
