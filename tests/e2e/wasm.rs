//! WASM backends through the real `devhost` binary (issue 4): the example
//! component loaded from `backends.d/`, polled for health, answering
//! Allocate and GetPreferredAllocation; hostile components and files
//! stopped or refused with their exact errors (`tests/fixtures/wasm/`)
//! while the good backend beside them serves.

use std::path::{Path, PathBuf};

use devhost::fake_kubelet::FakeKubelet;

use crate::harness::{Node, WAIT};

const EXAMPLE: &str = "example.com/wasm-rust";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A component `scripts/test` built (release, `wasm32-wasip2`), copied into `dir`.
pub(crate) fn component(name: &str, dir: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let built = target.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(
        built.is_file(),
        "{} is missing: run scripts/test (it builds the WASM components with \
         `cargo build --release --target wasm32-wasip2`)",
        built.display()
    );
    let copy = dir.join(format!("{name}.wasm"));
    std::fs::copy(&built, &copy).expect("copy the component");
    copy
}

/// Assembles one `.wat` fixture into `dir`.
pub(crate) fn wat_fixture(name: &str, dir: &Path) -> PathBuf {
    let source = repo().join("tests/fixtures/wasm").join(format!("{name}.wat"));
    let bytes = wat::parse_file(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let out = dir.join(format!("{name}.wasm"));
    std::fs::write(&out, bytes).expect("write the fixture");
    out
}

pub(crate) fn wasm_file(module: &Path, cache: &Path, sandbox: &str, config: &str) -> String {
    format!(
        "[backend]\nmodule = {:?}\ncall_timeout_ms = 2000\n[sandbox]\ncache_dir = {:?}\n{sandbox}\n[config]\n{config}\n",
        module.display().to_string(),
        cache.display().to_string(),
    )
}

#[tokio::test]
async fn the_example_component_serves_through_the_binary() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    let health = node.dir.path().join("health");
    std::fs::create_dir_all(&modules).expect("modules dir");
    std::fs::create_dir_all(&health).expect("health dir");
    let module = component("devhost_example_wasm_rust", &modules);
    let sandbox = format!("read = [{:?}]\npoll_interval_ms = 50", health.display().to_string());
    let config = format!("devices = 2\nhealth_dir = {:?}", health.display().to_string());
    let cdi_dir = crate::cdi_oracle::vendor_cdi(&node, "example.com/wasm", &["wasm-0", "wasm-1"]);
    node.backend("wasm-rust", &wasm_file(&module, &node.dir.path().join("cache"), &sandbox, &config));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    let registration = kubelet.wait_for_registrations(EXAMPLE, 1, WAIT).await.expect("registered");
    assert_eq!(registration.options.map(|o| o.get_preferred_allocation_available), Some(true));
    devhost.wait_for_log("serving 2 devices").await;

    // Health read through the read-only grant, seen at the next poll.
    kubelet
        .wait_for_devices(EXAMPLE, WAIT, |d| d.len() == 2 && d.iter().all(|d| d.health == "Healthy"))
        .await
        .expect("two healthy devices");
    std::fs::write(health.join("wasm-1.unhealthy"), "").expect("flag");
    kubelet
        .wait_for_devices(EXAMPLE, WAIT, |d| d.iter().any(|d| d.id == "wasm-1" && d.health == "Unhealthy"))
        .await
        .expect("wasm-1 goes Unhealthy");
    std::fs::remove_file(health.join("wasm-1.unhealthy")).expect("unflag");
    kubelet
        .wait_for_devices(EXAMPLE, WAIT, |d| d.iter().all(|d| d.health == "Healthy"))
        .await
        .expect("wasm-1 healthy again");

    let answer = kubelet.allocate(EXAMPLE, &["wasm-0", "wasm-1"]).await.expect("allocate");
    let container = &answer.container_responses[0];
    assert_eq!(container.envs.get("EXAMPLE_WASM_DEVICES").map(String::as_str), Some("wasm-0,wasm-1"));
    assert_eq!(container.annotations.get("example.com/wasm-devices").map(String::as_str), Some("wasm-0,wasm-1"));
    let specs: Vec<(&str, &str, &str)> = container
        .devices
        .iter()
        .map(|d| (d.container_path.as_str(), d.host_path.as_str(), d.permissions.as_str()))
        .collect();
    assert_eq!(specs, [("/dev/example-wasm-0", "/dev/null", "rw"), ("/dev/example-wasm-1", "/dev/null", "rw")]);
    let cdi: Vec<&str> = container.cdi_devices.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cdi, ["example.com/wasm=wasm-0", "example.com/wasm=wasm-1"], "the vendor's spec defines them");
    let want = crate::cdi_oracle::with_vendor_nodes(
        crate::cdi_oracle::Container::from_plain(container),
        &["wasm-0", "wasm-1"],
    );
    crate::cdi_oracle::assert_gives("the example component's answer", container, &[&cdi_dir], &want);

    let preferred = kubelet.preferred_allocation(EXAMPLE, &["wasm-1", "wasm-0"], &[], 1).await.expect("preferred");
    assert_eq!(preferred.container_responses[0].device_i_ds, ["wasm-0"], "the component's own policy");
    let preferred = kubelet.preferred_allocation(EXAMPLE, &["wasm-0", "wasm-1"], &["wasm-1"], 1).await.expect("must");
    assert_eq!(preferred.container_responses[0].device_i_ds, ["wasm-1"], "must_include first");
}

#[tokio::test]
async fn hostile_components_are_stopped_or_refused_while_the_good_one_serves() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    let granted = node.dir.path().join("granted");
    std::fs::create_dir_all(&modules).expect("modules dir");
    std::fs::create_dir_all(&granted).expect("granted dir");
    std::fs::write(granted.join("secret.txt"), "visible\n").expect("granted file");
    let outside = node.dir.path().join("outside.txt");
    std::fs::write(&outside, "not for the component\n").expect("a file outside the grant");
    let cache = node.dir.path().join("cache");
    let good = component("devhost_example_wasm_rust", &modules);
    let hostile = component("devhost_fixture_wasm_hostile", &modules);
    let core = wat_fixture("core-module", &modules);
    let wrong = wat_fixture("wrong-version", &modules);
    let other = wat_fixture("other-world", &modules);
    let grant = format!("read = [{:?}]\nmemory_mb = 16", granted.display().to_string());
    let hostile_file = |mode: &str, path: &Path| {
        let config = format!(
            "resource = \"hostile.example.com/{mode}\"\nmode = {mode:?}\npath = {:?}",
            path.display().to_string()
        );
        wasm_file(&hostile, &cache, &grant, &config)
    };
    node.backend("loop", &hostile_file("loop", Path::new("")));
    node.backend("bomb", &hostile_file("memory-bomb", Path::new("")));
    node.backend("trap", &hostile_file("trap", Path::new("")));
    node.backend("poll-trap", &hostile_file("poll-trap", Path::new("")));
    node.backend("read-denied", &hostile_file("read", &outside));
    node.backend("read-granted", &hostile_file("read", &granted.join("secret.txt")).replace("/read\"", "/read-ok\""));
    for (name, module) in [("core", &core), ("wrong-version", &wrong), ("other-world", &other)] {
        node.backend(name, &wasm_file(module, &cache, "", ""));
    }
    node.backend("zz-good", &wasm_file(&good, &cache, "poll_interval_ms = 50", ""));
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();

    // Refused before instantiation, each saying why.
    let m = |path: &Path| path.display().to_string();
    for expected in [
        format!(
            "{}: is a core WebAssembly module, not a component; a WASM backend must be a component of the world \
             devhost:backend/backend@1.x (build it for wasm32-wasip2)",
            m(&core)
        ),
        format!(
            "{}: implements devhost:backend@2.0.0, but this devhost supports devhost:backend@1.x (unsupported major version 2)",
            m(&wrong)
        ),
        format!(
            "{}: is a component of another world: it exports [wasi:cli/run@0.2.0], but a devhost backend exports \
             devhost:backend/api@1.x",
            m(&other)
        ),
    ] {
        devhost.wait_for_log(&expected).await;
    }
    kubelet.wait_for_registrations(EXAMPLE, 1, WAIT).await.expect("the good component serves");

    // Faults in allocate: each stopped, with its reason, and only its own
    // devices go Unhealthy.
    for (resource, expected) in [
        (
            "hostile.example.com/loop",
            // The epoch interruption at 80 % of the deadline, or, on a
            // machine too loaded to run the epoch ticker in time, the
            // host's own deadline: either stops the call.
            &[
                "backend \"loop\": allocate panicked: allocate was interrupted at its epoch deadline (1.6s, 80% of call_timeout_ms 2000)",
                "backend \"loop\": allocate did not return within its 2s deadline",
            ][..],
        ),
        (
            "hostile.example.com/memory-bomb",
            &[
                "backend \"bomb\": allocate panicked: allocate exceeded its memory cap of 16 MiB (it asked to grow its memory to 17 MiB)",
            ],
        ),
        (
            "hostile.example.com/trap",
            &[
                // A Rust panic traps; what it printed says why and where.
                "backend \"trap\": allocate panicked: allocate trapped: wasm trap: wasm `unreachable` instruction executed; its stderr: thread '<unnamed>' (1) panicked at tests/fixtures/wasm/hostile/src/lib.rs:86:23: | deliberate trap in allocate",
            ],
        ),
    ] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
        let status = kubelet.allocate(resource, &["h0"]).await.expect_err("faults");
        let status = status.status().expect("an RPC status");
        assert!(expected.contains(&status.message()), "{resource}: {:?} is none of {expected:?}", status.message());
        kubelet
            .wait_for_devices(resource, WAIT, |d| d.iter().all(|d| d.health == "Unhealthy"))
            .await
            .expect("its devices go Unhealthy");
        kubelet.allocate(EXAMPLE, &["wasm-0"]).await.expect("the good component keeps answering");
        kubelet
            .wait_for_devices(resource, WAIT, |d| d.iter().all(|d| d.health == "Healthy"))
            .await
            .expect("instantiated afresh, healthy again");
    }

    // A trap while the host polls it, with no call in flight: its devices go
    // Unhealthy at once and it is instantiated afresh (and traps again).
    let resource = "hostile.example.com/poll-trap";
    kubelet
        .wait_for_devices(resource, WAIT, |d| !d.is_empty() && d.iter().all(|d| d.health == "Unhealthy"))
        .await
        .expect("a trap while polled marks its devices Unhealthy");
    devhost
        .wait_for_log("backend \"poll-trap\": list-devices panicked: list-devices trapped: wasm trap: wasm `unreachable` instruction executed; its stderr: thread '<unnamed>' (1) panicked at tests/fixtures/wasm/hostile/src/lib.rs:49:13: | deliberate trap while polled")
        .await;
    devhost.wait_for_log("backend re-initialised; its devices report their own health again backend=poll-trap").await;
    kubelet.allocate(EXAMPLE, &["wasm-0"]).await.expect("the good component keeps answering");

    // Reads: denied outside the grant (a declined request, not a fault),
    // allowed inside it.
    kubelet.wait_for_registrations("hostile.example.com/read", 1, WAIT).await.expect("registered");
    let status = kubelet.allocate("hostile.example.com/read", &["h0"]).await.expect_err("denied");
    let status = status.status().expect("status");
    assert_eq!(
        status.message(),
        format!(
            "backend \"read-denied\": allocate failed: cannot read {}: No such file or directory (os error 44)",
            outside.display()
        ),
        "a file that exists on the host is invisible outside the grant"
    );
    kubelet.wait_for_registrations("hostile.example.com/read-ok", 1, WAIT).await.expect("registered");
    let answer = kubelet.allocate("hostile.example.com/read-ok", &["h0"]).await.expect("granted read");
    assert_eq!(answer.container_responses[0].envs.get("CONTENT").map(String::as_str), Some("visible"));
    assert_eq!(kubelet.devices(EXAMPLE).map(|d| d.iter().all(|d| d.health == "Healthy")), Some(true));
}
