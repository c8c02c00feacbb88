//! Bulkheads through the real `devhost` binary: a native module that
//! segfaults, aborts, exits, overflows its stack or hangs costs only its own
//! backend anything, because it runs in its own worker process.
//!
//! Every test runs three backends side by side: a static backend
//! (`example.com/good`), the well-behaved Rust example (`example.com/native-rust`,
//! itself in a worker) and ONE hostile fixture of `tests/fixtures/native/`
//! compiled here. While the hostile one misbehaves, a load task calls
//! Allocate on the two neighbours in a loop and counts; the tests then prove:
//!
//! * the neighbours answered every call, their device lists at the fake
//!   kubelet never left all-Healthy (a watcher sees every list, and the
//!   number of ListAndWatch messages did not change: a flicker would add
//!   some), and they registered exactly once (devhost never restarted);
//! * a crash is noticed at once (end of stream on the worker's socket), not
//!   at the call deadline: crash tests use `call_timeout_ms = 10000` and
//!   assert the Unhealthy list reaches the kubelet well within 2 s (the
//!   measured figure is printed: run with `--nocapture`);
//! * the failed call carries how the worker died (`worker killed by SIGSEGV
//!   during allocate`, `... while idle`, `exited with status 0 ...`), the
//!   devices go Unhealthy and come back Healthy from a NEW worker process;
//! * a hanging module (deadline 200 ms) gets its worker killed: 1,000 calls
//!   all end promptly, devhost's thread count stays bounded, at most one
//!   worker per backend lives, none is left a zombie, and SIGTERM still
//!   exits 0 promptly;
//! * the worker is a separate process, child of devhost, with few open
//!   descriptors and a parent-death signal (SIGKILL), so killing devhost
//!   with SIGKILL leaves no worker behind; `isolation = "none"` opts out.
//!
//! Were the module run inside devhost, the crash tests would kill devhost
//! itself: the neighbours' calls would fail, their streams would end and the
//! failed call would not name the signal.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{Devhost, Node, WAIT, static_backend};
use crate::native_loader::{compile_c, rust_module};
use crate::procs::{Process, children, process};

/// The static neighbour.
const STATIC: &str = "example.com/good";
/// The well-behaved native neighbour (the Rust example, in its own worker).
const RUST: &str = "example.com/native-rust";
/// Deadline of the crash tests: a detection that waited for it would take 10 s.
const CRASH_TIMEOUT_MS: u64 = 10_000;
/// Deadline of the hang tests.
const HANG_TIMEOUT_MS: u64 = 200;
/// How soon a crash must reach the kubelet as Unhealthy: far below the
/// 10 s deadline, generous for a loaded 2-core machine.
const DETECTION_BOUND: Duration = Duration::from_secs(2);
/// A call that is refused or killed at its deadline ends well within this.
const CALL_BOUND: Duration = Duration::from_secs(3);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn healthy(devices: &[Device]) -> bool {
    !devices.is_empty() && devices.iter().all(|d| d.health == "Healthy")
}

fn unhealthy(devices: &[Device]) -> bool {
    !devices.is_empty() && devices.iter().all(|d| d.health == "Unhealthy")
}

fn render(devices: &[Device]) -> String {
    let items: Vec<String> = devices.iter().map(|d| format!("{} {}", d.id, d.health)).collect();
    format!("[{}]", items.join(", "))
}

/// The hostile backend of a test: its fixture and how it is configured.
struct Hostile {
    /// The C file in `tests/fixtures/native/`.
    fixture: &'static str,
    /// `call_timeout_ms` of its backend file.
    timeout_ms: u64,
    /// More `[backend]` lines (e.g. `isolation = "none"`).
    backend_extra: &'static str,
    /// Its `[config]` table.
    config: String,
}

impl Hostile {
    fn new(fixture: &'static str, timeout_ms: u64) -> Self {
        Hostile { fixture, timeout_ms, backend_extra: "", config: String::new() }
    }

    /// The backend's name (its file's stem): `segv_allocate.c` → `segv-allocate`.
    fn name(&self) -> String {
        self.fixture.trim_end_matches(".c").replace('_', "-")
    }

    fn resource(&self) -> String {
        format!("fixture.example.com/{}", self.name())
    }
}

/// One node running devhost with the three backends, and the fake kubelet.
struct Bed {
    node: Node,
    kubelet: Arc<FakeKubelet>,
    devhost: Devhost,
    /// devhost's process ID.
    pid: i32,
    backend: String,
    resource: String,
    /// When devhost was started.
    started: Instant,
}

impl Bed {
    /// Starts devhost with the static and Rust neighbours and `hostile`;
    /// returns once both neighbours are registered with all-Healthy lists.
    async fn start(hostile: Hostile) -> Bed {
        let node = Node::new();
        let modules = node.dir.path().join("modules");
        std::fs::create_dir_all(&modules).expect("modules dir");
        let rust = rust_module("devhost_example_native_rust", &modules);
        let module = compile_c(&repo().join("tests/fixtures/native").join(hostile.fixture), &modules);
        node.backend("static", &static_backend(&[(STATIC, &["g-0", "g-1"])], None));
        node.backend(
            "native-rust",
            &format!(
                "[backend]\nmodule = {:?}\ncall_timeout_ms = {CRASH_TIMEOUT_MS}\n[config]\nflip_interval_ms = 3600000\n",
                rust.display().to_string()
            ),
        );
        node.backend(
            &hostile.name(),
            &format!(
                "[backend]\nmodule = {:?}\ncall_timeout_ms = {}\n{}[config]\n{}\n",
                module.display().to_string(),
                hostile.timeout_ms,
                hostile.backend_extra,
                hostile.config
            ),
        );
        let kubelet = Arc::new(FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet"));
        let started = Instant::now();
        let devhost = node.start_devhost();
        let pid = devhost.pid().as_raw();
        for resource in [STATIC, RUST] {
            kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("the neighbour registers");
            kubelet
                .wait_for_devices(resource, WAIT, healthy)
                .await
                .unwrap_or_else(|e| panic!("{resource} is not all Healthy: {e}"));
        }
        Bed { node, kubelet, devhost, pid, backend: hostile.name(), resource: hostile.resource(), started }
    }

    async fn wait_healthy(&self, what: &str) {
        self.kubelet
            .wait_for_devices(&self.resource, WAIT, healthy)
            .await
            .unwrap_or_else(|e| panic!("{}: {what}: {e}\nlog:\n{}", self.backend, self.devhost.log()));
    }

    /// The PIDs of the live worker processes of `backend`.
    /// (The process serving the protocol: in its PID namespace the child
    /// of the namespace's init, which is devhost's child.)
    fn workers(&self, backend: &str) -> Vec<i32> {
        let is_worker =
            |child: &Process| child.state != 'Z' && child.args.get(1..3) == Some(&["__worker".into(), backend.into()]);
        children(self.pid)
            .into_iter()
            .filter(is_worker)
            .map(|init| children(init.pid).into_iter().find(is_worker).map_or(init.pid, |worker| worker.pid))
            .collect()
    }

    /// The one worker process of `backend`.
    fn worker(&self, backend: &str) -> i32 {
        let workers = self.workers(backend);
        assert_eq!(workers.len(), 1, "one worker process for {backend}: {workers:?}");
        workers[0]
    }

    /// The time of day and `pid=` of every `worker started` line of
    /// `backend` in the log, in order.
    fn logged_workers(&self, backend: &str) -> Vec<(f64, i32)> {
        let marker = format!("worker started; module loaded backend={backend} pid=");
        self.devhost
            .log()
            .lines()
            .filter_map(|line| {
                let at = line.find(&marker)? + marker.len();
                let pid = line[at..].split_whitespace().next()?.parse().ok()?;
                Some((log_time(line)?, pid))
            })
            .collect()
    }

    /// Stops devhost with SIGTERM and asserts it exits 0 within 10 s.
    async fn stop(mut self) {
        let asked = Instant::now();
        let status = self.devhost.stop_with(Signal::SIGTERM).await;
        let took = asked.elapsed();
        assert!(
            status.success(),
            "{}: devhost exited with {status} after SIGTERM; log:\n{}",
            self.backend,
            self.devhost.log()
        );
        assert!(took < Duration::from_secs(10), "{}: devhost took {took:?} to stop", self.backend);
        assert_eq!(self.node.sockets(), ["kubelet.sock"], "{}: devhost removed its sockets", self.backend);
        eprintln!("{}: SIGTERM → exit 0 in {} ms", self.backend, took.as_millis());
    }
}

/// What the open descriptors of `pid` point to, by descriptor number.
fn open_files(pid: i32) -> Vec<String> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the worker's /proc/<pid>/fd")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(entry.path()).ok()?.display().to_string()))
        })
        .collect();
    fds.sort();
    fds.into_iter().map(|(_, target)| target).collect()
}

/// `Threads:` of /proc/<pid>/status.
fn thread_count(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("devhost's /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads: line")
}

/// Seconds since midnight UTC of a log line (`2026-12-01T00:26:10.541204Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let time = stamp.split_once('T')?.1;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds since midnight UTC of `at`, on the clock of devhost's log.
fn day_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64() % 86_400.0
}

/// `b - a` in seconds for two times of day, across midnight.
fn day_diff(a: f64, b: f64) -> f64 {
    let d = b - a;
    if d < -43_200.0 { d + 86_400.0 } else { d }
}

/// The last lines of a log, for failure messages.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Spawns a watcher that returns when `resource`'s list at the kubelet
/// first satisfies `pred`, with the monotonic and the wall-clock time.
async fn watch_for(
    kubelet: &Arc<FakeKubelet>,
    resource: &str,
    pred: fn(&[Device]) -> bool,
) -> JoinHandle<(Instant, SystemTime)> {
    let (kubelet, resource) = (kubelet.clone(), resource.to_owned());
    let watcher = tokio::spawn(async move {
        kubelet.wait_for_devices(&resource, WAIT, pred).await.unwrap_or_else(|e| panic!("{resource}: {e}"));
        (Instant::now(), SystemTime::now())
    });
    // Let it subscribe before anything happens.
    tokio::time::sleep(Duration::from_millis(20)).await;
    watcher
}

/// What the neighbours went through while the hostile backend misbehaved.
#[derive(Debug, Default)]
struct LoadReport {
    /// Allocates answered, per neighbour.
    answered: [usize; 2],
    failures: Vec<String>,
    /// Device lists at the kubelet that were not all-Healthy.
    sightings: Vec<String>,
    slowest: Duration,
}

/// The load on the neighbours and the watch on their device lists.
struct Neighbours {
    stop: CancellationToken,
    load: JoinHandle<LoadReport>,
    watchers: Vec<JoinHandle<Vec<String>>>,
    messages: [usize; 2],
    started: Instant,
}

impl Neighbours {
    /// Starts calling Allocate on both neighbours in a loop (every ~3 ms)
    /// and watching every device list the kubelet receives for them.
    fn start(kubelet: &Arc<FakeKubelet>) -> Neighbours {
        let stop = CancellationToken::new();
        let messages = [kubelet.list_and_watch_messages(STATIC), kubelet.list_and_watch_messages(RUST)];
        let watchers = [STATIC, RUST]
            .into_iter()
            .map(|resource| {
                let (kubelet, stop) = (kubelet.clone(), stop.clone());
                tokio::spawn(async move {
                    let seen = Mutex::new(Vec::new());
                    let record = |devices: &[Device]| {
                        if !healthy(devices) {
                            seen.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!("{resource}: {}", render(devices)));
                        }
                        false
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = kubelet.wait_for_devices(resource, Duration::from_secs(3600), record) => {}
                    }
                    seen.into_inner().unwrap_or_else(PoisonError::into_inner)
                })
            })
            .collect();
        let load = {
            let (kubelet, stop) = (kubelet.clone(), stop.clone());
            tokio::spawn(async move {
                let mut report = LoadReport::default();
                while !stop.is_cancelled() {
                    for (i, (resource, id)) in [(STATIC, "g-0"), (RUST, "rust-0")].into_iter().enumerate() {
                        let sent = Instant::now();
                        match tokio::time::timeout(Duration::from_secs(5), kubelet.allocate(resource, &[id])).await {
                            Ok(Ok(_)) => report.answered[i] += 1,
                            Ok(Err(error)) => report.failures.push(format!("{resource}: {error}")),
                            Err(_) => report.failures.push(format!("{resource}: no answer within 5 s")),
                        }
                        report.slowest = report.slowest.max(sent.elapsed());
                        match kubelet.devices(resource) {
                            Some(devices) if healthy(&devices) => {}
                            other => report.sightings.push(format!("{resource}: {other:?}")),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                report
            })
        };
        Neighbours { stop, load, watchers, messages, started: Instant::now() }
    }

    /// Stops the load and asserts the neighbours never noticed a thing.
    async fn finish(self, bed: &Bed) -> LoadReport {
        self.stop.cancel();
        let report = self.load.await.expect("the load task");
        let mut sightings = report.sightings.clone();
        for watcher in self.watchers {
            sightings.extend(watcher.await.expect("a watcher"));
        }
        let case = &bed.backend;
        eprintln!(
            "{case}: neighbours answered {} + {} Allocates in {} ms, 0 failures expected ({} seen), slowest {} ms",
            report.answered[0],
            report.answered[1],
            self.started.elapsed().as_millis(),
            report.failures.len(),
            report.slowest.as_millis()
        );
        assert!(report.failures.is_empty(), "{case}: the neighbours' calls failed: {:?}", report.failures);
        assert!(report.answered.iter().all(|&n| n > 0), "{case}: the load ran: {:?}", report.answered);
        assert!(sightings.is_empty(), "{case}: a neighbour's list left all-Healthy: {sightings:?}");
        let kubelet = &bed.kubelet;
        for (i, resource) in [STATIC, RUST].into_iter().enumerate() {
            assert_eq!(kubelet.registration_count(resource), 1, "{case}: {resource} registered once");
            assert!(kubelet.connected(resource), "{case}: {resource}'s stream is still open");
            assert_eq!(
                kubelet.list_and_watch_messages(resource),
                self.messages[i],
                "{case}: {resource} got no new device list (no flicker)"
            );
        }
        report
    }
}

/// An Allocate on the hostile backend crashes its worker: the call fails at
/// once with how it died, the devices go Unhealthy at the kubelet long
/// before the 10 s deadline, and a new worker brings them back.
async fn crash_in_allocate(fixture: &'static str, id: &str, cause: &str) {
    let bed = Bed::start(Hostile::new(fixture, CRASH_TIMEOUT_MS)).await;
    let (backend, resource) = (bed.backend.clone(), bed.resource.clone());
    bed.wait_healthy("initially").await;
    let first_worker = bed.worker(&backend);
    let neighbours = Neighbours::start(&bed.kubelet);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let watcher = watch_for(&bed.kubelet, &resource, unhealthy).await;
    let sent = Instant::now();
    let error = bed.kubelet.allocate(&resource, &[id]).await.expect_err("the Allocate crashes the worker");
    let answered = sent.elapsed();
    let (unhealthy_at, _) = watcher.await.expect("the watcher");
    let detection = unhealthy_at - sent;
    eprintln!(
        "{backend}: Allocate failed after {} ms; Unhealthy at the kubelet {} ms after the Allocate was sent (deadline {CRASH_TIMEOUT_MS} ms)",
        answered.as_millis(),
        detection.as_millis()
    );
    let status = error.status().unwrap_or_else(|| panic!("{backend}: an RPC status, not {error}"));
    let expected = format!("backend {backend:?}: worker {cause} during allocate");
    assert_eq!(
        status.message(),
        expected,
        "{backend}: the failed Allocate says how the worker died; the log ends:\n{}",
        log_tail(&bed.devhost.log())
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{backend}");
    assert!(answered < DETECTION_BOUND, "{backend}: the Allocate failed only after {answered:?}");
    assert!(detection < DETECTION_BOUND, "{backend}: Unhealthy reached the kubelet only after {detection:?}");
    bed.devhost
        .wait_for_log(&format!("backend faulted; its devices are now Unhealthy backend={backend} error={expected}"))
        .await;

    bed.wait_healthy("Healthy again after the restart").await;
    bed.devhost
        .wait_for_log(&format!("backend re-initialised; its devices report their own health again backend={backend}"))
        .await;
    let second_worker = bed.worker(&backend);
    assert_ne!(first_worker, second_worker, "{backend}: re-initialised in a new worker process");
    assert!(process(first_worker).is_none(), "{backend}: the crashed worker {first_worker} was reaped");
    // Counted where operators look: one crashed allocate, one restart.
    let (_, metrics) = crate::harness::http_get(&bed.devhost.metrics_address().await, "/metrics").await;
    for series in [
        format!("devhost_backend_call_errors_total{{backend=\"{backend}\",operation=\"allocate\",kind=\"crashed\"}} 1"),
        format!("devhost_backend_restarts_total{{backend=\"{backend}\"}} 1"),
        format!("devhost_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(metrics.lines().any(|line| line == series), "{backend}: no {series:?} in:\n{metrics}");
    }
    neighbours.finish(&bed).await;
    bed.stop().await;
}

/// A thread of the hostile backend kills its worker with no call in
/// flight, `delay_ms` after init: the devices go Unhealthy at once and come
/// back from a new worker.
async fn crash_while_idle(fixture: &'static str, key: &str, cause: &str) {
    // Long enough that the test is watching before the first crash.
    let delay_ms = 1000;
    let mut hostile = Hostile::new(fixture, CRASH_TIMEOUT_MS);
    hostile.config = format!("{key} = {delay_ms}");
    let bed = Bed::start(hostile).await;
    let (backend, resource) = (bed.backend.clone(), bed.resource.clone());
    let fault = format!("backend faulted; its devices are now Unhealthy backend={backend} ");
    let mut watcher = watch_for(&bed.kubelet, &resource, unhealthy).await;
    if bed.devhost.log().contains(&fault) {
        // It crashed before the watch began (a slow start): time the next crash.
        watcher.abort();
        bed.wait_healthy("Healthy after the first restart").await;
        watcher = watch_for(&bed.kubelet, &resource, unhealthy).await;
    }
    let neighbours = Neighbours::start(&bed.kubelet);
    let (_, seen_at) = watcher.await.expect("the watcher");

    // The crash is due `delay_ms` after init, which came after the log's
    // `worker started` line of the worker that crashed: the latest one
    // started at least `delay_ms` before the Unhealthy list arrived.
    let seen = day_seconds(seen_at);
    let delay = delay_ms as f64 / 1000.0;
    let started = bed.logged_workers(&backend);
    let (start, first_worker) = *started
        .iter()
        .rev()
        .find(|(at, _)| day_diff(*at + delay, seen) >= 0.0)
        .unwrap_or_else(|| panic!("{backend}: no worker started {delay_ms} ms before the crash: {started:?}"));
    let detection = day_diff(start + delay, seen);
    eprintln!(
        "{backend}: Unhealthy at the kubelet at most {:.0} ms after the crash was due ({key} = {delay_ms}, deadline {CRASH_TIMEOUT_MS} ms)",
        detection * 1000.0
    );
    assert!(detection < DETECTION_BOUND.as_secs_f64(), "{backend}: Unhealthy only {detection:.3} s after the crash");
    let expected = format!("backend {backend:?}: worker {cause} while idle");
    bed.devhost
        .wait_for_log(&format!("backend faulted; its devices are now Unhealthy backend={backend} error={expected}"))
        .await;

    bed.wait_healthy("Healthy again after the restart").await;
    bed.devhost
        .wait_for_log(&format!("backend re-initialised; its devices report their own health again backend={backend}"))
        .await;
    let later: Vec<i32> = bed.logged_workers(&backend).into_iter().map(|(_, pid)| pid).collect();
    assert!(
        later.last().is_some_and(|&pid| pid != first_worker),
        "{backend}: re-initialised in a new worker, not {first_worker}: {later:?}"
    );
    neighbours.finish(&bed).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segv_in_init_never_starts_the_backend_while_neighbours_serve() {
    let bed = Bed::start(Hostile::new("segv_init.c", CRASH_TIMEOUT_MS)).await;
    let backend = bed.backend.clone();
    let neighbours = Neighbours::start(&bed.kubelet);
    let expected = format!("backend {backend:?}: worker killed by SIGSEGV during init");
    bed.devhost.wait_for_log(&expected).await;
    let log = bed.devhost.log();
    let loaded = log
        .lines()
        .find(|l| l.contains(&format!("worker started; module loaded backend={backend} ")))
        .and_then(log_time)
        .expect("the worker loaded the module");
    let failed_line = log
        .lines()
        .find(|l| l.contains("backend did not start") && l.contains(&format!("backend={backend} ")))
        .unwrap_or_else(|| panic!("{backend}: no `backend did not start` line; log:\n{log}"));
    assert!(failed_line.contains(&format!("error={expected}")), "{backend}: {failed_line}");
    let detection = day_diff(loaded, log_time(failed_line).expect("a time"));
    eprintln!(
        "{backend}: init's crash reported {:.0} ms after the worker loaded the module (deadline {CRASH_TIMEOUT_MS} ms); devhost up to then: {} ms",
        detection * 1000.0,
        bed.started.elapsed().as_millis()
    );
    assert!(detection < DETECTION_BOUND.as_secs_f64(), "{backend}: the crash in init took {detection:.3} s to notice");
    // Keep the load on until the retry (after its back-off) crashed too:
    // the backend had a second chance to register.
    let deadline = Instant::now() + WAIT;
    while bed.devhost.log().matches(&expected).count() < 2 {
        assert!(Instant::now() < deadline, "{backend}: init was never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bed.kubelet.registration_count(&bed.resource), 0, "{backend}: never registered");
    assert!(bed.workers(&backend).is_empty(), "{backend}: no worker left: {:?}", bed.workers(&backend));
    assert!(children(bed.pid).iter().all(|c| c.state != 'Z'), "{backend}: no zombie: {:?}", children(bed.pid));
    neighbours.finish(&bed).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segv_in_allocate_fails_that_call_and_only_that_backend() {
    crash_in_allocate("segv_allocate.c", "sa-0", "killed by SIGSEGV").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segv_on_a_backend_thread_while_idle_is_noticed_at_once() {
    crash_while_idle("segv_thread.c", "crash_after_ms", "killed by SIGSEGV").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_in_allocate_fails_that_call_and_only_that_backend() {
    crash_in_allocate("abort_allocate.c", "aa-0", "killed by SIGABRT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_a_backend_thread_is_a_crash_too() {
    crash_while_idle("exit_thread.c", "exit_after_ms", "exited with status 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_overflow_in_allocate_fails_that_call_and_only_that_backend() {
    crash_in_allocate("stack_overflow.c", "so-0", "killed by SIGSEGV").await;
}

/// How the calls of a storm ended.
#[derive(Debug, Default)]
struct Storm {
    calls: usize,
    answered: usize,
    /// Reached the worker and missed the deadline (the worker was killed).
    timed_out: usize,
    /// Ended when a sibling call's deadline killed the worker.
    killed: usize,
    /// Refused at once: the worker had died and was not yet replaced.
    refused_dead: usize,
    /// Refused at once: the worker was being restarted.
    refused_restarting: usize,
    /// Refused at once: every call slot taken.
    refused_busy: usize,
    /// Anything else, with how many times.
    other: std::collections::BTreeMap<String, usize>,
    slowest: Duration,
}

/// `tasks` tasks each call Allocate on the hostile resource `per_task`
/// times, pausing `pause` between calls; every call must end within
/// [`CALL_BOUND`].
async fn storm(bed: &Bed, id: &str, tasks: usize, per_task: usize, pause: Duration) -> Storm {
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (kubelet, resource, id) = (bed.kubelet.clone(), bed.resource.clone(), id.to_owned());
        handles.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..per_task {
                let sent = Instant::now();
                let outcome = tokio::time::timeout(CALL_BOUND, kubelet.allocate(&resource, &[&id])).await;
                outcomes.push((sent.elapsed(), outcome));
                tokio::time::sleep(pause).await;
            }
            outcomes
        }));
    }
    let backend = &bed.backend;
    let timed_out = format!("backend {backend:?}: allocate did not return within its {HANG_TIMEOUT_MS}ms deadline");
    let killed = format!(
        "backend {backend:?}: worker killed after allocate missed its {HANG_TIMEOUT_MS}ms deadline during allocate"
    );
    let refused = format!("backend {backend:?}: allocate refused: ");
    let mut storm = Storm::default();
    for handle in handles {
        for (took, outcome) in handle.await.expect("a storm task") {
            storm.calls += 1;
            storm.slowest = storm.slowest.max(took);
            let message = match outcome {
                Err(_) => format!("no answer within {CALL_BOUND:?}"),
                Ok(Ok(_)) => {
                    storm.answered += 1;
                    continue;
                }
                Ok(Err(error)) => match error.status() {
                    Some(status) => format!("{:?}: {}", status.code(), status.message()),
                    None => error.to_string(),
                },
            };
            let (code, text) = message.split_once(": ").unwrap_or(("", &message));
            let reason = text.strip_prefix(&refused).filter(|_| code == "Unavailable");
            if code == "DeadlineExceeded" && text == timed_out {
                storm.timed_out += 1;
            } else if code == "Unavailable" && text == killed {
                storm.killed += 1;
            } else if reason == Some("its worker is not running (being restarted after a fault)") {
                storm.refused_restarting += 1;
            } else if reason
                .is_some_and(|r| r.starts_with("its worker ") && r.ends_with("; a new one is being started"))
            {
                storm.refused_dead += 1;
            } else if reason.is_some_and(|r| r.contains("calls are already in flight")) {
                storm.refused_busy += 1;
            } else {
                *storm.other.entry(message).or_default() += 1;
            }
        }
    }
    storm
}

/// Waits (up to 3 s) until `backend` has at most one worker and devhost no
/// zombie child; returns the worker count.
async fn settled_workers(bed: &Bed, backend: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let workers = bed.workers(backend);
        let zombies: Vec<i32> = children(bed.pid).iter().filter(|c| c.state == 'Z').map(|c| c.pid).collect();
        if workers.len() <= 1 && zombies.is_empty() {
            return workers.len();
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: workers {workers:?} (at most 1 expected), zombie children {zombies:?}: {:?}",
            children(bed.pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_into_a_module_that_hangs_for_ever_cost_nothing_lasting() {
    let bed = Bed::start(Hostile::new("hang_forever.c", HANG_TIMEOUT_MS)).await;
    let backend = bed.backend.clone();
    bed.wait_healthy("initially").await;
    let threads_before = thread_count(bed.pid);
    let neighbours = Neighbours::start(&bed.kubelet);
    let began = Instant::now();
    let storm = storm(&bed, "hf-0", 4, 250, Duration::from_millis(3)).await;
    let took = began.elapsed();
    eprintln!("{backend}: 1000 Allocates in {} ms: {storm:?}", took.as_millis());
    neighbours.finish(&bed).await;
    assert_eq!(storm.calls, 1000, "{backend}");
    assert!(storm.other.is_empty(), "{backend}: calls that ended otherwise: {:?}", storm.other);
    assert_eq!(storm.answered, 0, "{backend}: a call into a module that never returns cannot succeed");
    assert!(storm.slowest < CALL_BOUND, "{backend}: a call took {:?}", storm.slowest);
    assert!(storm.timed_out > 0, "{backend}: some calls reached the worker and missed the deadline");
    assert!(
        storm.refused_dead + storm.refused_restarting > 0,
        "{backend}: calls while the worker restarts are refused at once"
    );

    // The last worker killed, a new one comes up: exactly one, no zombie.
    bed.wait_healthy("Healthy again after the storm").await;
    assert_eq!(settled_workers(&bed, &backend).await, 1, "{backend}: one live worker");
    let threads = thread_count(bed.pid);
    eprintln!(
        "{backend}: devhost threads: {threads_before} before, {threads} after 1000 hung calls; 1 worker, no zombie"
    );
    // In-process, each hung call would hold a thread for good (64 at least).
    assert!(threads < threads_before + 32, "{backend}: devhost threads grew from {threads_before} to {threads}");
    assert!(threads < 100, "{backend}: devhost runs {threads} threads");
    assert_eq!(bed.workers("native-rust").len(), 1, "{backend}: the neighbour's worker is untouched");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_wedged_on_its_own_lock_is_replaced_by_a_fresh_worker() {
    let bed = Bed::start(Hostile::new("hang_locked.c", HANG_TIMEOUT_MS)).await;
    let backend = bed.backend.clone();
    bed.wait_healthy("initially").await;
    let first_worker = bed.worker(&backend);
    let neighbours = Neighbours::start(&bed.kubelet);
    let storm = storm(&bed, "hl-0", 2, 25, Duration::from_millis(20)).await;
    eprintln!("{backend}: 50 Allocates: {storm:?}");
    assert!(storm.other.is_empty(), "{backend}: calls that ended otherwise: {:?}", storm.other);
    assert_eq!(storm.answered, 0, "{backend}");
    assert!(storm.slowest < CALL_BOUND, "{backend}: a call took {:?}", storm.slowest);
    assert!(storm.timed_out > 0, "{backend}: some calls reached the worker and missed the deadline");

    // The wedged lock died with its worker: a new one inits fine.
    bed.wait_healthy("Healthy again in a fresh worker").await;
    bed.devhost
        .wait_for_log(&format!("backend re-initialised; its devices report their own health again backend={backend}"))
        .await;
    assert_eq!(settled_workers(&bed, &backend).await, 1, "{backend}");
    let worker = bed.worker(&backend);
    assert_ne!(worker, first_worker, "{backend}: a new worker process");
    neighbours.finish(&bed).await;

    // SIGTERM while an Allocate holds the lock: shutdown would hang in the
    // module, so devhost must kill the worker and still exit 0.
    let wedged = {
        let (kubelet, resource) = (bed.kubelet.clone(), bed.resource.clone());
        tokio::spawn(async move { kubelet.allocate(&resource, &["hl-1"]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    bed.stop().await;
    let wedged = wedged.await.expect("the wedged call's task");
    eprintln!("{backend}: the Allocate wedged at SIGTERM ended with {:?}", wedged.map(|_| "an answer"));
    assert!(process(worker).is_none_or(|p| p.state == 'Z'), "the wedged worker {worker} is gone");
}

/// The envs `FIXTURE_*` of an Allocate on the pid-report fixture.
async fn pid_report(bed: &Bed) -> (i32, i32, usize, i32) {
    let answer = bed.kubelet.allocate(&bed.resource, &["pid-0"]).await.expect("pid-report answers");
    let envs = &answer.container_responses[0].envs;
    let number = |key: &str| -> i64 {
        envs.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{key} in {envs:?}"))
    };
    (
        number("FIXTURE_PID") as i32,
        number("FIXTURE_PPID") as i32,
        number("FIXTURE_OPEN_FDS") as usize,
        number("FIXTURE_PDEATHSIG") as i32,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_module_runs_in_a_child_process_unless_isolation_is_none() {
    let bed = Bed::start(Hostile::new("pid_report.c", CRASH_TIMEOUT_MS)).await;
    bed.wait_healthy("initially").await;
    let (pid, ppid, fds, pdeathsig) = pid_report(&bed).await;
    eprintln!(
        "pid-report (process): devhost {}, worker {pid}, its parent {ppid}, {fds} open fds, parent-death signal {pdeathsig}",
        bed.pid
    );
    // Issue 27: the module runs in a PID namespace of its own, as PID 2
    // below the namespace's init (PID 1, devhost's child, which only waits
    // and carries the parent-death signal: when it dies, the kernel ends
    // the whole namespace; killing_devhost_with_sigkill_leaves_no_worker_behind
    // checks that end to end).
    assert_eq!((pid, ppid), (2, 1), "the module's own view: PID 2 of its namespace, below its init");
    let host_pid = bed.worker("pid-report");
    let worker = process(host_pid).expect("the worker's /proc entry");
    let init = process(worker.ppid).expect("the namespace init's /proc entry");
    assert_eq!(init.ppid, bed.pid, "the namespace's init is devhost's child");
    assert_eq!(worker.args, ["devhost", "__worker", "pid-report"], "ps shows what the worker is");
    assert_eq!(init.args, ["devhost", "__worker", "pid-report"], "ps shows what the init is");
    let comm = std::fs::read_to_string(format!("/proc/{host_pid}/comm")).expect("the worker's comm");
    assert_eq!(comm.trim_end(), "devhost-worker", "top and ps -e name the worker");
    assert_eq!(pdeathsig, 0, "the worker proper relies on its namespace's init to die with devhost");
    let pid = host_pid;
    // stdin (/dev/null), stdout and stderr (pipes devhost reads into its
    // log, issue 27), the socket to devhost (twice: a reader and a writer)
    // and the module's verified bytes (a memfd); nothing of devhost's
    // (listeners, plugin sockets, the config).
    let open = open_files(pid);
    eprintln!("pid-report (process): the worker's descriptors: {open:?}");
    assert!(fds <= 6, "the worker inherits no stray descriptors: {fds} open: {open:?}");
    assert_eq!(open.len(), fds, "the fixture counted what /proc shows: {open:?}");
    let sockets: std::collections::BTreeSet<&String> = open.iter().filter(|t| t.starts_with("socket:")).collect();
    assert_eq!(sockets.len(), 1, "one socket, to devhost: {open:?}");
    for target in &open {
        assert!(
            target == "/dev/null"
                || target.starts_with("pipe:")
                || target.starts_with("socket:")
                || target.starts_with("/memfd:devhost:"),
            "the worker holds {target:?}: {open:?}"
        );
    }
    bed.kubelet.allocate(STATIC, &["g-0"]).await.expect("the static neighbour answers");
    bed.kubelet.allocate(RUST, &["rust-0"]).await.expect("the native neighbour answers");
    bed.stop().await;

    let mut hostile = Hostile::new("pid_report.c", CRASH_TIMEOUT_MS);
    hostile.backend_extra = "isolation = \"none\"\n";
    let bed = Bed::start(hostile).await;
    bed.wait_healthy("initially").await;
    let (pid, ppid, fds, _) = pid_report(&bed).await;
    eprintln!(
        "pid-report (isolation = \"none\"): devhost {}, module's process {pid}, its parent {ppid}, {fds} open fds",
        bed.pid
    );
    assert_eq!(pid, bed.pid, "isolation = \"none\" runs the module inside devhost");
    assert!(bed.workers("pid-report").is_empty(), "no worker for an in-process module");
    assert_eq!(bed.workers("native-rust").len(), 1, "the neighbour keeps its own worker");
    bed.kubelet.allocate(STATIC, &["g-0"]).await.expect("the static neighbour answers");
    bed.kubelet.allocate(RUST, &["rust-0"]).await.expect("the native neighbour answers");
    bed.stop().await;
}

/// Kills a stopped process left behind by a failing test.
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if process(pid).is_some_and(|p| p.args.get(1).is_some_and(|a| a == "__worker")) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_devhost_with_sigkill_leaves_no_worker_behind() {
    let mut bed = Bed::start(Hostile::new("pid_report.c", CRASH_TIMEOUT_MS)).await;
    bed.wait_healthy("initially").await;
    let worker = bed.worker("pid-report");
    let init = process(worker).expect("the worker").ppid;
    assert_eq!(process(init).expect("its init").ppid, bed.pid, "the worker's namespace init is devhost's child");
    let neighbour = bed.worker("native-rust");
    let neighbour_init = process(neighbour).expect("the neighbour").ppid;
    let _reaper = Reaper(vec![worker, init, neighbour, neighbour_init]);
    // Stopped, the worker cannot notice its socket closing and exit on its
    // own: only its init's parent-death signal (SIGKILL), which ends the
    // init's whole PID namespace, can end it.
    kill(Pid::from_raw(worker), Signal::SIGSTOP).expect("stop the worker");
    let status = bed.devhost.stop_with(Signal::SIGKILL).await;
    assert!(!status.success(), "devhost was killed: {status}");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(5);
    loop {
        // Gone, or a zombie until init reaps it; either way no longer devhost's.
        let left: Vec<Process> = [worker, init, neighbour, neighbour_init]
            .into_iter()
            .filter_map(process)
            .filter(|p| p.state != 'Z' && p.args.get(1).is_some_and(|a| a == "__worker"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "workers outlived devhost by 5 s: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "pid-report: workers {worker} (stopped) and {neighbour} gone {} ms after devhost's SIGKILL",
        killed.elapsed().as_millis()
    );
}
