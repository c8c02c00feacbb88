//! Sandboxed workers (issue 27) through the real `devhost` binary: a native
//! module that attacks the machine from its worker process reaches nothing
//! beyond that worker.
//!
//! Each test runs three backends: a static one (`example.com/good`), a
//! well-behaved native one in its own worker (`pid_report.c`, with the
//! default sandbox) and `hostile_worker.c` with ONE attack chosen by its
//! `[config] attack`. devhost is started by `setsid`, leading its own
//! session and process group as under systemd (the harness's `Devhost`
//! starts it in the test's own group, where a worker's `kill(0, …)` would
//! reach the test itself). While the attack runs, a load task calls
//! Allocate on both neighbours every ~3 ms; the tests then prove:
//!
//! * devhost survives: alive, not stopped, and SIGTERM still exits 0 within
//!   10 s; the neighbours answered every Allocate (p99 printed), registered
//!   once, and the native neighbour's worker is the same process throughout;
//! * each worker is confined before the attack: the process that runs the
//!   module has `NoNewPrivs: 1`, `Seccomp: 2`, no capability (effective,
//!   permitted, ambient), lives in a PID namespace of its own whose PID 1
//!   devhost started and which leads the worker's own session and group,
//!   and sits (with that PID 1) in its own memory and pids cgroup with the
//!   limits of its file; the `worker started` line says what was applied
//!   (`sandbox=`);
//! * the attack is reported precisely: a signal to the parent, the group or
//!   everyone hits nothing outside the worker; a crash of a worker with a
//!   forked child is noticed at once and takes the child along; a leak ends
//!   in the OOM killer, logged as "out of memory" with the limit; threads
//!   stop at `pids_max`; unshare, mount, ptrace and clone(CLONE_NEWPID) are
//!   refused with EPERM;
//! * after devhost exits, no process whose command line names the test's
//!   backends is left, nor a cgroup named after them.
//!
//! Safety: every hostile backend file spells out the sandbox keys, so a
//! devhost that does not know them refuses the file and never runs the
//! attack; and the fixture itself refuses `kill(-1)` and `ptrace(1)` unless
//! it is PID 1 of a namespace, and any signal that would reach this test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{Missing, Node, WAIT, devhost_binary, skip, static_backend};
use crate::native_loader::compile_c;
use crate::procs::{all_processes, process};

/// The static neighbour.
const STATIC: &str = "example.com/good";
/// The native neighbour (`pid_report.c`, in its own worker).
const NEIGHBOUR: &str = "fixture.example.com/pid-report";
/// The hostile module's resource.
const HOSTILE: &str = "fixture.example.com/hostile-worker";
/// Deadline of the native backends' calls: a death noticed only at a
/// deadline would take this long.
const CALL_TIMEOUT_MS: u64 = 10_000;
/// How soon a death must be noticed: far below the deadline, generous for
/// a loaded 2-core machine.
const DETECTION_BOUND: Duration = Duration::from_secs(2);
/// SIGTERM must end devhost within this.
const STOP_BOUND: Duration = Duration::from_secs(10);
/// How long leftovers may take to go after devhost exits.
const LEFTOVER_BOUND: Duration = Duration::from_secs(5);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn healthy(devices: &[Device]) -> bool {
    !devices.is_empty() && devices.iter().all(|d| d.health == "Healthy")
}

/// How the hostile backend is set up.
struct Attack {
    /// `[config] attack` of `hostile_worker.c`.
    name: &'static str,
    memory_mb: u64,
    pids_max: u64,
    /// More `[config]` lines.
    config: String,
}

impl Attack {
    fn new(name: &'static str) -> Self {
        Attack { name, memory_mb: 256, pids_max: 256, config: String::new() }
    }
}

/// `devhost run` started by `setsid`: the leader of its own session and
/// process group, as systemd starts a service. Killed on drop.
struct SessionDevhost {
    child: Option<Child>,
    pid: i32,
    log: PathBuf,
}

impl SessionDevhost {
    fn start(node: &Node) -> SessionDevhost {
        std::fs::write(node.config_file(), "call_timeout_ms = 2000\nmetrics_address = \"127.0.0.1:0\"\n")
            .expect("write host config");
        let log = node.dir.path().join("devhost.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        // This test's process is no group leader, so setsid(1) calls
        // setsid() and execs devhost in the same process (no fork): the
        // child's pid is devhost's.
        let child = Command::new("setsid")
            .arg(devhost_binary())
            .arg("run")
            .arg("--config")
            .arg(node.config_file())
            .arg("--plugin-dir")
            .arg(node.plugin_dir())
            .env("RUST_LOG", "devhost=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn setsid devhost");
        let pid = child.id() as i32;
        let devhost = SessionDevhost { child: Some(child), pid, log };
        // Until the exec, /proc shows `setsid`.
        let deadline = Instant::now() + WAIT;
        loop {
            let started = process(pid).is_some_and(|p| p.args.get(1).is_some_and(|a| a == "run"));
            if started {
                break;
            }
            assert!(Instant::now() < deadline, "devhost never started under setsid: {:?}", process(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        let me = process(pid).expect("devhost's /proc entry");
        assert_eq!((me.pgrp, me.session), (pid, pid), "devhost leads its own session and process group");
        devhost
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM; returns how devhost exited and how long it took.
    async fn stop(&mut self) -> (Option<ExitStatus>, Duration) {
        let asked = Instant::now();
        kill(Pid::from_raw(self.pid), Signal::SIGTERM).expect("SIGTERM to devhost");
        let mut child = self.child.take().expect("running");
        while asked.elapsed() < WAIT {
            if let Some(status) = child.try_wait().expect("wait for devhost") {
                return (Some(status), asked.elapsed());
            }
            // Not a blocking wait: the fake kubelet runs on this runtime.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, asked.elapsed())
    }
}

impl Drop for SessionDevhost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Kills, on drop, whatever a failing test left behind: every process
/// whose command line names one of its backends (names unique to the test).
struct Reaper(Vec<String>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in named(&self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// One node running devhost (in its own session) with the three backends.
struct Bed {
    // Dropped in this order: devhost, then leftovers, then the node's files.
    devhost: SessionDevhost,
    _reaper: Reaper,
    kubelet: Arc<FakeKubelet>,
    node: Node,
    attack: &'static str,
    /// The hostile backend's name, unique to this test: `hostile-<attack>-<pid>`.
    backend: String,
    /// The native neighbour's name: `neighbour-<attack>-<pid>`.
    neighbour: String,
    memory_mb: u64,
    pids_max: u64,
}

impl Bed {
    /// Starts devhost with the neighbours and the hostile backend; returns
    /// once all three resources are registered and all-Healthy. `None`
    /// (a recorded skip) where the machine cannot sandbox.
    async fn start(attack: Attack) -> Option<Bed> {
        if !is_root() {
            skip(Missing::Machine, "sandboxed workers need root (cgroups, namespaces)");
            return None;
        }
        if Command::new("setsid").arg("--version").output().is_err() {
            skip(Missing::Setup, "setsid (util-linux) is not installed");
            return None;
        }
        let node = Node::new();
        let modules = node.dir.path().join("modules");
        std::fs::create_dir_all(&modules).expect("modules dir");
        let fixtures = repo().join("tests/fixtures/native");
        let hostile = compile_c(&fixtures.join("hostile_worker.c"), &modules);
        let pid_report = compile_c(&fixtures.join("pid_report.c"), &modules);
        let me = std::process::id();
        let backend = format!("hostile-{}-{me}", attack.name);
        let neighbour = format!("neighbour-{}-{me}", attack.name);
        let reaper = Reaper(vec![backend.clone(), neighbour.clone()]);
        node.backend("static", &static_backend(&[(STATIC, &["g-0", "g-1"])], None));
        // The neighbour takes every sandbox default.
        node.backend(
            &neighbour,
            &format!(
                "[backend]\nmodule = {:?}\ncall_timeout_ms = {CALL_TIMEOUT_MS}\n",
                pid_report.display().to_string()
            ),
        );
        // Every sandbox key spelled out: a devhost without the sandbox
        // refuses the file instead of running the attack unconfined.
        node.backend(
            &backend,
            &format!(
                "[backend]\nmodule = {:?}\ncall_timeout_ms = {CALL_TIMEOUT_MS}\nisolation = \"process\"\n\
                 memory_mb = {}\npids_max = {}\ncapabilities = []\nseccomp = true\nunsandboxed = \"refuse\"\n\
                 [config]\nattack = {:?}\nguard_pid = {me}\n{}\n",
                hostile.display().to_string(),
                attack.memory_mb,
                attack.pids_max,
                attack.name,
                attack.config
            ),
        );
        let kubelet = Arc::new(FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet"));
        let devhost = SessionDevhost::start(&node);
        for resource in [STATIC, NEIGHBOUR, HOSTILE] {
            if let Err(error) = kubelet.wait_for_registrations(resource, 1, WAIT).await {
                panic!(
                    "{}: {resource} did not register: {error}; the log ends:\n{}",
                    attack.name,
                    tail(&devhost.log())
                );
            }
            kubelet
                .wait_for_devices(resource, WAIT, healthy)
                .await
                .unwrap_or_else(|e| panic!("{}: {resource} is not all Healthy: {e}", attack.name));
        }
        Some(Bed {
            devhost,
            _reaper: reaper,
            kubelet,
            node,
            attack: attack.name,
            backend,
            neighbour,
            memory_mb: attack.memory_mb,
            pids_max: attack.pids_max,
        })
    }

    /// The `worker started; module loaded` lines of `backend`, in order.
    fn start_lines(&self, backend: &str) -> Vec<String> {
        start_lines(&self.devhost.log(), backend)
    }

    /// `backend`'s latest worker: the process its `worker started` line
    /// names, and the process in its tree that runs the module.
    fn worker(&self, backend: &str) -> Worker {
        let lines = self.start_lines(backend);
        let line = lines.last().unwrap_or_else(|| panic!("{}: no worker started for {backend}", self.attack));
        let started: i32 = field(line, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{}: no pid= in {line:?}", self.attack));
        let process =
            process(started).unwrap_or_else(|| panic!("{}: worker {started} of {backend} is not running", self.attack));
        assert_eq!(
            process.args,
            ["devhost", "__worker", backend],
            "{}: pid {started} is {backend}'s worker",
            self.attack
        );
        let module = module_process(started, backend)
            .unwrap_or_else(|| panic!("{}: no process of worker {started} holds the socket to devhost", self.attack));
        Worker { started, module, init: namespace_init(module) }
    }

    /// The log lines the hostile module wrote (`hostile <attack>: …`).
    fn module_lines(&self) -> Vec<String> {
        let prefix = format!("hostile {}: ", self.attack);
        let backend = format!("backend={}", self.backend);
        let suffix = format!(" {backend}");
        self.devhost
            .log()
            .lines()
            .filter(|l| l.contains(&backend))
            .filter_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
            // devhost appends the fields after the module's text.
            .map(|text| text.strip_suffix(&suffix).unwrap_or(text).to_owned())
            .collect()
    }

    /// Waits until the module logged a line containing `part`.
    async fn wait_for_module_line(&self, part: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.module_lines().into_iter().find(|l| l.contains(part)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the module never logged {part:?}; it logged {:?}; the log ends:\n{}",
                self.attack,
                self.module_lines(),
                tail(&self.devhost.log())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the hostile backend was re-initialised after its first
    /// fault (in a new worker) and its devices are Healthy again.
    async fn wait_reinitialised(&self) {
        let marker =
            format!("backend re-initialised; its devices report their own health again backend={}", self.backend);
        let deadline = Instant::now() + WAIT;
        while !self.devhost.log().lines().any(|l| l.ends_with(&marker)) {
            assert!(
                Instant::now() < deadline,
                "{}: never re-initialised; the log ends:\n{}",
                self.attack,
                tail(&self.devhost.log())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kubelet
            .wait_for_devices(HOSTILE, WAIT, healthy)
            .await
            .unwrap_or_else(|e| panic!("{}: the backend never served again: {e}", self.attack));
    }

    /// `backend faulted` lines of the hostile backend.
    fn faults(&self) -> Vec<String> {
        faults(&self.devhost.log(), &self.backend)
    }

    /// Asserts the sandbox of `worker`, of `backend`, and prints it.
    fn assert_sandboxed(&self, backend: &str, worker: Worker, memory_mb: u64, pids_max: u64) {
        let case = self.attack;
        let line = self.start_lines(backend).pop().expect("a start line");
        let sandbox = field(&line, "sandbox");
        let seen = confinement(worker.module);
        eprintln!("{case}: {backend} {worker:?}: sandbox={sandbox:?}; the module's process: {seen:?}");
        if let Some(init) = worker.init.filter(|&init| init != worker.module) {
            // Runs devhost's code only (it reaps); printed, not asserted.
            eprintln!("{case}: {backend}: its namespace's init {init}: {:?}", confinement(init));
        }
        assert!(sandbox.as_deref().is_some_and(|s| !s.is_empty()), "{case}: no sandbox= in {line:?}");
        assert_confined(case, backend, &seen);
        // Its own PID namespace, whose PID 1 devhost started.
        let namespace = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        assert_ne!(
            namespace(worker.module),
            namespace(self.devhost.pid),
            "{case}: {backend} has its own PID namespace"
        );
        let init = worker.init.unwrap_or_else(|| panic!("{case}: {backend}: no PID 1 above {worker:?}"));
        let init_process = process(init).expect("/proc of the namespace's init");
        assert_eq!(init_process.ppid, self.devhost.pid, "{case}: {backend}: devhost started its namespace's PID 1");
        // Its own session and group, led by that PID 1.
        let module = process(worker.module).expect("/proc of the module's process");
        assert_eq!(
            (init_process.session, init_process.pgrp, module.session, module.pgrp),
            (init, init, init, init),
            "{case}: {backend}'s worker leads its own session and group"
        );
        let devhost = cgroups(self.devhost.pid);
        for controller in ["memory", "pids"] {
            let (mine, theirs) = (seen.cgroups.get(controller), devhost.get(controller));
            assert!(mine.is_some(), "{case}: {backend} is in no {controller} cgroup: {:?}", seen.cgroups);
            assert_ne!(mine, theirs, "{case}: {backend} has its own {controller} cgroup, not devhost's");
        }
        assert_eq!(cgroups(init), seen.cgroups, "{case}: {backend}: the whole worker is in its cgroups");
        let limit = cgroup_file(&seen.cgroups, "memory", &["memory.limit_in_bytes", "memory.max"]);
        assert_eq!(
            limit.as_deref(),
            Some((memory_mb * 1024 * 1024).to_string().as_str()),
            "{case}: {backend}'s memory limit is memory_mb = {memory_mb}"
        );
        let pids = cgroup_file(&seen.cgroups, "pids", &["pids.max"]);
        assert_eq!(pids.as_deref(), Some(pids_max.to_string().as_str()), "{case}: {backend}'s pids.max");
    }

    /// The checks every test makes before its attack: both workers are
    /// sandboxed. Returns (hostile worker, neighbour worker).
    fn check_workers(&self) -> (Worker, Worker) {
        let (hostile, neighbour) = (self.worker(&self.backend), self.worker(&self.neighbour));
        self.assert_sandboxed(&self.backend, hostile, self.memory_mb, self.pids_max);
        // The neighbour's file sets no sandbox key: the defaults.
        self.assert_sandboxed(&self.neighbour, neighbour, 256, 256);
        (hostile, neighbour)
    }

    /// devhost is alive and not stopped.
    fn assert_devhost_alive(&self) {
        let me = process(self.devhost.pid);
        assert!(
            me.as_ref().is_some_and(|p| !matches!(p.state, 'Z' | 'X' | 'T' | 't')),
            "{}: devhost is {me:?}; the log ends:\n{}",
            self.attack,
            tail(&self.devhost.log())
        );
    }

    /// Stops devhost with SIGTERM (exit 0 within 10 s) and asserts that no
    /// process naming this test's backends is left within 5 s.
    async fn stop(mut self) {
        let case = self.attack;
        self.assert_devhost_alive();
        let (status, took) = self.devhost.stop().await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{case}: devhost exited with {status:?} after SIGTERM; the log ends:\n{}",
            tail(&self.devhost.log())
        );
        assert!(took < STOP_BOUND, "{case}: devhost took {took:?} to stop");
        let names = [self.backend.clone(), self.neighbour.clone()];
        let deadline = Instant::now() + LEFTOVER_BOUND;
        loop {
            let left = named(&names);
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{case}: processes outlived devhost by 5 s: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Nor a cgroup: a devhost restarted by systemd would pile them up.
        loop {
            let left = leftover_cgroups(&names);
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{case}: cgroups outlived devhost by 5 s: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{case}: SIGTERM → exit 0 in {} ms; no process or cgroup of its backends left", took.as_millis());
        assert_eq!(self.node.sockets(), ["kubelet.sock"], "{case}: devhost removed its sockets");
    }
}

/// One worker: the process its `worker started` line names, the one that
/// runs the module (the same, or one below it that holds the socket), and
/// the PID 1 of the module's namespace (the module's process or an
/// ancestor: a namespace init that only reaps), if one was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Worker {
    started: i32,
    module: i32,
    init: Option<i32>,
}

/// The PID 1 of `pid`'s PID namespace, as this test sees it: `pid` or its
/// nearest ancestor in the same namespace whose `NSpid:` ends in 1.
fn namespace_init(pid: i32) -> Option<i32> {
    let namespace = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let own = namespace(pid)?;
    let mut at = pid;
    while at > 1 && namespace(at).as_ref() == Some(&own) {
        if confinement_of(at).is_some_and(|c| c.namespace_pid.as_deref() == Some("1")) {
            return Some(at);
        }
        at = process(at)?.ppid;
    }
    None
}

/// The process that runs `backend`'s module, in the tree of the worker
/// `started`: the first, nearest first, that holds a socket at descriptor
/// 3 (the channel to devhost; a namespace init that only reaps holds none).
fn module_process(started: i32, backend: &str) -> Option<i32> {
    let everyone = all_processes();
    let mut queue = std::collections::VecDeque::from([started]);
    while let Some(pid) = queue.pop_front() {
        let holds_socket = std::fs::read_link(format!("/proc/{pid}/fd/3"))
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let is_worker =
            everyone.iter().any(|p| p.pid == pid && p.state != 'Z' && p.args == ["devhost", "__worker", backend]);
        if holds_socket && is_worker {
            return Some(pid);
        }
        queue.extend(everyone.iter().filter(|p| p.ppid == pid).map(|p| p.pid));
    }
    None
}

/// What the hostile Allocate did to its worker.
async fn hostile_allocate(bed: &Bed) -> Result<devhost::proto::v1beta1::AllocateResponse, String> {
    let answer = tokio::time::timeout(WAIT, bed.kubelet.allocate(HOSTILE, &["hw-0"])).await;
    let answer = answer.unwrap_or_else(|_| panic!("{}: the hostile Allocate got no answer in {WAIT:?}", bed.attack));
    answer.map_err(|error| match error.status() {
        Some(status) => status.message().to_owned(),
        None => error.to_string(),
    })
}

/// A signal attack hit nothing outside the worker: either the call was
/// answered and the worker is the same live process (a PID 1 ignores the
/// signals it sends itself), or the worker alone died of it and the call
/// says so precisely; either way the backend serves again.
async fn assert_only_the_worker_was_hit(bed: &Bed, worker: Worker, answer: Result<(), String>, signal: &str) {
    let case = bed.attack;
    match answer {
        Ok(()) => {
            assert!(
                process(worker.module).is_some_and(|p| !matches!(p.state, 'Z' | 'X' | 'T' | 't')),
                "{case}: the worker answered, yet is now {:?}",
                process(worker.module)
            );
            assert_eq!(bed.worker(&bed.backend), worker, "{case}: still the same worker");
            eprintln!("{case}: the worker answered and lives on ({worker:?})");
        }
        Err(message) => {
            let expected = format!("backend {:?}: worker killed by {signal} during allocate", bed.backend);
            assert_eq!(message, expected, "{case}: the failed Allocate says how the worker died");
            bed.wait_reinitialised().await;
            assert_ne!(bed.worker(&bed.backend), worker, "{case}: served again by a new worker");
            eprintln!("{case}: the worker alone died: {message}");
        }
    }
}

/// `NoNewPrivs`, `Seccomp`, capabilities, `NSpid` and cgroups of a process.
#[derive(Debug, Default)]
struct Confinement {
    no_new_privs: Option<String>,
    seccomp: Option<String>,
    cap_eff: Option<String>,
    cap_prm: Option<String>,
    cap_amb: Option<String>,
    /// The last `NSpid:` entry: its pid in its own namespace.
    namespace_pid: Option<String>,
    /// Controller → path, from /proc/<pid>/cgroup (`""` for cgroup v2).
    cgroups: std::collections::BTreeMap<String, String>,
}

fn confinement(pid: i32) -> Confinement {
    confinement_of(pid).unwrap_or_else(|| panic!("no /proc/{pid}/status (the worker is gone)"))
}

fn confinement_of(pid: i32) -> Option<Confinement> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':'))).map(|v| v.trim().to_owned())
    };
    Some(Confinement {
        no_new_privs: value("NoNewPrivs"),
        seccomp: value("Seccomp"),
        cap_eff: value("CapEff"),
        cap_prm: value("CapPrm"),
        cap_amb: value("CapAmb"),
        namespace_pid: value("NSpid").and_then(|v| v.split_whitespace().last().map(str::to_owned)),
        cgroups: cgroups(pid),
    })
}

/// No new privileges, a seccomp filter, no capability.
fn assert_confined(case: &str, who: &str, seen: &Confinement) {
    let none = Some("0000000000000000");
    assert_eq!(seen.no_new_privs.as_deref(), Some("1"), "{case}: {who}: NoNewPrivs");
    assert_eq!(seen.seccomp.as_deref(), Some("2"), "{case}: {who}: Seccomp (2: a filter)");
    assert_eq!(seen.cap_eff.as_deref(), none, "{case}: {who}: CapEff");
    // Effective 0 with permitted left would let the module raise them again.
    assert_eq!(seen.cap_prm.as_deref(), none, "{case}: {who}: CapPrm");
    assert_eq!(seen.cap_amb.as_deref(), none, "{case}: {who}: CapAmb");
}

/// Controller → cgroup path of `pid` (`memory`, `pids`, …; v2's single
/// hierarchy under both names).
fn cgroups(pid: i32) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut map = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if controllers.is_empty() {
            map.entry("memory".to_owned()).or_insert_with(|| format!("v2:{path}"));
            map.entry("pids".to_owned()).or_insert_with(|| format!("v2:{path}"));
        }
        for controller in controllers.split(',').filter(|c| !c.is_empty()) {
            map.insert(controller.to_owned(), path.to_owned());
        }
    }
    map
}

/// The first of `files` that exists in `controller`'s cgroup, trimmed.
fn cgroup_file(
    cgroups: &std::collections::BTreeMap<String, String>,
    controller: &str,
    files: &[&str],
) -> Option<String> {
    let dir = cgroup_dir(controller, cgroups.get(controller)?)?;
    files.iter().find_map(|file| std::fs::read_to_string(dir.join(file)).ok()).map(|v| v.trim().to_owned())
}

/// Where a cgroup of /proc/<pid>/cgroup (`/a/b`, or `v2:/a/b`) is in this
/// process's mounts: below the mount of its hierarchy, less the mount's root.
fn cgroup_dir(controller: &str, path: &str) -> Option<PathBuf> {
    let (v2, path) = path.strip_prefix("v2:").map_or((false, path), |p| (true, p));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // `id parent dev root mountpoint options - fstype source super-options`
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        let mut right = right.split_whitespace();
        let (fstype, super_options) = (right.next()?, right.nth(1).unwrap_or(""));
        let fits = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && super_options.split(',').any(|o| o == controller)
        };
        let (root, mountpoint) = (*fields.get(3)?, *fields.get(4)?);
        let below = if root == "/" { path } else { path.strip_prefix(root)? };
        fits.then(|| PathBuf::from(format!("{mountpoint}/{}", below.trim_start_matches('/'))))
    })
}

/// Cgroup directories (in any mounted hierarchy, 6 levels deep at most)
/// whose name contains one of `names`.
fn leftover_cgroups(names: &[String]) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, names: &[String], found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if names.iter().any(|n| name.contains(n.as_str())) {
                found.push(entry.path());
            } else if depth > 0 {
                walk(&entry.path(), depth - 1, names, found);
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if matches!(right.split_whitespace().next(), Some("cgroup" | "cgroup2"))
            && let Some(mountpoint) = left.split_whitespace().nth(4)
        {
            walk(Path::new(mountpoint), 6, names, &mut found);
        }
    }
    found
}

/// Live (not zombie) processes, other than this one, whose command line
/// contains one of `names`.
fn named(names: &[String]) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_processes()
        .into_iter()
        .filter(|p| p.pid != me && p.state != 'Z' && p.state != 'X')
        .map(|p| (p.pid, p.args.join(" ")))
        .filter(|(_, line)| names.iter().any(|name| line.contains(name.as_str())))
        .collect()
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1)) == Some("0")
}

/// The `worker started; module loaded` lines of `backend` in `log`.
fn start_lines(log: &str, backend: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("worker started; module loaded") && field(l, "backend").as_deref() == Some(backend))
        .map(str::to_owned)
        .collect()
}

/// The `backend faulted` lines of `backend` in `log`.
fn faults(log: &str, backend: &str) -> Vec<String> {
    let marker = format!("backend faulted; its devices are now Unhealthy backend={backend} ");
    log.lines().filter(|l| l.contains(&marker)).map(str::to_owned).collect()
}

/// `key=value` or `key="value"` of a log line. An unquoted value (a
/// `Display` field such as `sandbox=own PID namespace and session, …`)
/// runs up to the next ` name=`, or to the end of the line.
fn field(line: &str, key: &str) -> Option<String> {
    let marker = format!(" {key}=");
    let rest = &line[line.find(&marker)? + marker.len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => return Some(value),
                c => value.push(c),
            }
        }
        return Some(value);
    }
    let next_field = rest.match_indices(' ').map(|(at, _)| at).find(|&at| {
        let word: String = rest[at + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        !word.is_empty() && rest[at + 1 + word.len()..].starts_with('=')
    });
    Some(rest[..next_field.unwrap_or(rest.len())].to_owned())
}

/// Seconds since midnight UTC of a log line (`2026-12-01T00:26:10.541204Z …`).
fn log_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.strip_suffix('Z')?.split_once('T')?.1;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// `b - a` in seconds for two times of day, across midnight.
fn day_diff(a: f64, b: f64) -> f64 {
    let d = b - a;
    if d < -43_200.0 { d + 86_400.0 } else { d }
}

/// The last lines of a log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// What the neighbours went through while the attack ran.
#[derive(Debug, Default)]
struct LoadReport {
    /// Allocates answered: static, native.
    answered: [usize; 2],
    failures: Vec<String>,
    latencies: Vec<Duration>,
}

/// Allocate on both neighbours in a loop, counted.
struct Load {
    stop: CancellationToken,
    task: JoinHandle<LoadReport>,
    started: Instant,
}

impl Load {
    fn start(kubelet: &Arc<FakeKubelet>) -> Load {
        let stop = CancellationToken::new();
        let (kubelet, token) = (kubelet.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut report = LoadReport::default();
            while !token.is_cancelled() {
                for (i, (resource, id)) in [(STATIC, "g-0"), (NEIGHBOUR, "pid-0")].into_iter().enumerate() {
                    let sent = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(5), kubelet.allocate(resource, &[id])).await {
                        Ok(Ok(_)) => report.answered[i] += 1,
                        Ok(Err(error)) => report.failures.push(format!("{resource}: {error}")),
                        Err(_) => report.failures.push(format!("{resource}: no answer within 5 s")),
                    }
                    report.latencies.push(sent.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            report
        });
        Load { stop, task, started: Instant::now() }
    }

    /// Stops the load; asserts the neighbours lost nothing.
    async fn finish(self, bed: &Bed) {
        self.stop.cancel();
        let mut report = self.task.await.expect("the load task");
        report.latencies.sort();
        let p99 = report
            .latencies
            .get((report.latencies.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default();
        let case = bed.attack;
        eprintln!(
            "{case}: neighbours answered {} + {} Allocates in {} ms, {} failed, p99 {:.1} ms, slowest {:.1} ms",
            report.answered[0],
            report.answered[1],
            self.started.elapsed().as_millis(),
            report.failures.len(),
            p99.as_secs_f64() * 1000.0,
            report.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
        );
        assert!(report.failures.is_empty(), "{case}: the neighbours' calls failed: {:?}", report.failures);
        assert!(report.answered.iter().all(|&n| n > 0), "{case}: the load ran: {:?}", report.answered);
        for resource in [STATIC, NEIGHBOUR] {
            assert_eq!(bed.kubelet.registration_count(resource), 1, "{case}: {resource} registered once");
            assert!(bed.kubelet.connected(resource), "{case}: {resource}'s stream is still open");
            let devices = bed.kubelet.devices(resource).unwrap_or_default();
            assert!(healthy(&devices), "{case}: {resource} is all Healthy: {devices:?}");
        }
    }
}

/// The signal attacks: the Allocate runs it; nothing outside the worker is
/// hit. Returns the bed (still running) for attack-specific checks.
async fn signal_attack(name: &'static str, first_step: &str, last_step: &str) -> Option<(Bed, Worker, Worker)> {
    let bed = Bed::start(Attack::new(name)).await?;
    let (hostile, neighbour) = bed.check_workers();
    let load = Load::start(&bed.kubelet);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = hostile_allocate(&bed).await.map(drop);
    eprintln!("{name}: the hostile Allocate: {answer:?}");
    // Logged before the signal is sent; the last step only by a worker
    // that lived through its own signal.
    let mut steps = vec![bed.wait_for_module_line(first_step).await];
    if answer.is_ok() {
        steps.push(bed.wait_for_module_line(last_step).await);
    }
    eprintln!("{name}: the module logged {:?}", bed.module_lines());
    for line in &steps {
        assert!(!line.contains("refused by the fixture"), "{name}: the attack did not run: {line}");
    }
    assert_only_the_worker_was_hit(&bed, hostile, answer, "SIGKILL").await;
    bed.assert_devhost_alive();
    load.finish(&bed).await;
    assert_eq!(bed.worker(&bed.neighbour), neighbour, "{name}: the neighbour's worker is the same process");
    Some((bed, hostile, neighbour))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killing_its_parent_does_not_reach_devhost() {
    let Some((bed, _, _)) = signal_attack("kill-parent", "getppid() = ", ", SIGSTOP) ").await else { return };
    // devhost is outside the worker's PID namespace: the module's parent
    // is its namespace's init (1), or invisible (0).
    let lines = bed.module_lines();
    assert!(
        lines.iter().any(|l| l == "getppid() = 0" || l == "getppid() = 1"),
        "kill-parent: devhost is invisible to the worker: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains(", SIGSTOP) = ")), "kill-parent: SIGSTOP was tried: {lines:?}");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killing_its_process_group_does_not_reach_devhost() {
    let Some((bed, _, _)) = signal_attack("kill-group", "getpid() = ", "kill(0, SIGKILL) ").await else { return };
    // The group is the worker's own: PID 1 of its namespace leads it.
    let lines = bed.module_lines();
    assert!(
        lines.iter().any(|l| l.starts_with("getpid() = ") && l.ends_with(", getpgrp() = 1")),
        "kill-group: the worker's namespace init leads its group: {lines:?}"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killing_every_process_reaches_none_outside_it() {
    // A process of this test's, as a canary for "every process".
    let mut canary = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
    let outcome = signal_attack("kill-all", "kill(-1, SIGKILL) ", "kill(-1, SIGKILL) ").await;
    let canary_status = canary.try_wait().expect("the canary's status");
    let _ = canary.kill();
    let _ = canary.wait();
    let Some((bed, _, _)) = outcome else { return };
    assert!(canary_status.is_none(), "kill-all: a process outside devhost was killed: {canary_status:?}");
    let lines = bed.module_lines();
    assert!(lines.iter().any(|l| l.starts_with("kill(-1, SIGKILL) = ")), "kill-all: the attack ran: {lines:?}");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_takes_the_child_it_forked_along_and_is_noticed_at_once() {
    // Long enough to look at the worker and its child before it crashes.
    let delay_ms = 2000;
    let mut attack = Attack::new("fork-then-segv");
    attack.config = format!("crash_after_ms = {delay_ms}");
    let Some(bed) = Bed::start(attack).await else { return };
    let case = bed.attack;
    let load = Load::start(&bed.kubelet);

    // A live worker and its child, with the faults logged before it: its
    // own fault is the next one (a new worker starts after the last fault).
    let deadline = Instant::now() + WAIT;
    let (worker, started_at, child, faults_before) = loop {
        // One snapshot: the worker's start line and the faults before it.
        let log = bed.devhost.log();
        let faults_before = faults(&log, &bed.backend).len();
        let line = start_lines(&log, &bed.backend).pop().expect("a worker started");
        let started: i32 = field(&line, "pid").and_then(|p| p.parse().ok()).expect("pid=");
        if let Some(module) = module_process(started, &bed.backend) {
            let child = all_processes().into_iter().find(|p| p.ppid == module && p.state != 'Z').map(|p| p.pid);
            if let Some(child) = child
                && process(module).is_some_and(|p| p.state != 'Z')
            {
                break (
                    Worker { started, module, init: namespace_init(module) },
                    log_time(&line).expect("a time"),
                    child,
                    faults_before,
                );
            }
        }
        assert!(Instant::now() < deadline, "{case}: never saw a live worker with its forked child");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let child_process = process(child).expect("the forked child");
    eprintln!("{case}: {worker:?}, the module's forked child {child_process:?}");
    assert_eq!(child_process.args, ["devhost", "__worker", bed.backend.as_str()], "{case}: the child is the fork");
    bed.assert_sandboxed(&bed.backend, worker, bed.memory_mb, bed.pids_max);
    // Inherited by what the module forks.
    assert_confined(case, "the forked child", &confinement(child));

    // The crash: noticed at once although the child holds a copy of the
    // worker's socket, because the namespace ends with its PID 1.
    let deadline = Instant::now() + WAIT;
    let fault = loop {
        if let Some(fault) = bed.faults().get(faults_before).cloned() {
            break fault;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: {worker:?}'s crash was never reported (child {child} is {:?}); the log ends:\n{}",
            process(child),
            tail(&bed.devhost.log())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let noticed_at = SystemTime::now();
    let expected = format!("error=backend {:?}: worker killed by SIGSEGV while idle", bed.backend);
    assert!(fault.ends_with(&expected), "{case}: the fault names the signal: {fault}");
    let detection = day_diff(started_at + delay_ms as f64 / 1000.0, log_time(&fault).expect("a time"));
    eprintln!(
        "{case}: the crash reported at most {:.0} ms after it was due (deadline {CALL_TIMEOUT_MS} ms)",
        detection * 1000.0
    );
    assert!(detection < DETECTION_BOUND.as_secs_f64(), "{case}: the crash took {detection:.3} s to notice");
    let gone = |pid: i32| process(pid).is_none_or(|p| p.state == 'Z');
    while !(gone(child) && gone(worker.module) && gone(worker.started) && worker.init.is_none_or(gone)) {
        let waited = SystemTime::now().duration_since(noticed_at).unwrap_or_default();
        assert!(
            waited < DETECTION_BOUND,
            "{case}: after the crash, the worker is {:?} / {:?} and its child {:?}",
            process(worker.started),
            process(worker.module),
            process(child)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let since_epoch = noticed_at.duration_since(UNIX_EPOCH).unwrap_or_default();
    eprintln!("{case}: {worker:?} and child {child} gone (noticed at {:.3})", since_epoch.as_secs_f64());
    load.finish(&bed).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_worker_is_ended_by_its_memory_limit_and_reported() {
    let mut attack = Attack::new("leak");
    attack.memory_mb = 64;
    let Some(bed) = Bed::start(attack).await else { return };
    let case = bed.attack;
    let (hostile, neighbour) = bed.check_workers();
    let load = Load::start(&bed.kubelet);
    let answer = hostile_allocate(&bed).await;
    assert!(answer.is_ok(), "{case}: the Allocate starts the leak and returns: {answer:?}");
    let deadline = Instant::now() + WAIT;
    let fault = loop {
        if let Some(fault) = bed.faults().first().cloned() {
            break fault;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the leak was never stopped; the module logged {:?}; the log ends:\n{}",
            bed.module_lines(),
            tail(&bed.devhost.log())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("{case}: {fault}");
    assert!(fault.contains("out of memory"), "{case}: the fault says out of memory: {fault}");
    assert!(fault.contains("64 MiB") || fault.contains("64MiB"), "{case}: the fault names the 64 MiB limit: {fault}");
    let lines = bed.module_lines();
    assert!(!lines.iter().any(|l| l.contains("nobody stopped it")), "{case}: the leak ran to its cap: {lines:?}");
    for pid in [Some(hostile.started), Some(hostile.module), hostile.init].into_iter().flatten() {
        assert!(process(pid).is_none_or(|p| p.state == 'Z'), "{case}: the leaking worker {hostile:?} is gone");
    }
    bed.wait_reinitialised().await;
    assert_ne!(bed.worker(&bed.backend), hostile, "{case}: served again by a new worker");
    load.finish(&bed).await;
    assert_eq!(bed.worker(&bed.neighbour), neighbour, "{case}: the neighbour's worker is the same process");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starting_ten_thousand_threads_stops_at_pids_max() {
    let mut attack = Attack::new("threads");
    attack.pids_max = 64;
    let Some(bed) = Bed::start(attack).await else { return };
    let case = bed.attack;
    let (hostile, neighbour) = bed.check_workers();
    let load = Load::start(&bed.kubelet);
    let answer = hostile_allocate(&bed).await.unwrap_or_else(|e| panic!("{case}: the Allocate failed: {e}"));
    let started: usize = answer.container_responses[0]
        .envs
        .get("FIXTURE_THREADS_STARTED")
        .and_then(|n| n.parse().ok())
        .expect("FIXTURE_THREADS_STARTED");
    let line = bed.wait_for_module_line("started ").await;
    let threads = std::fs::read_to_string(format!("/proc/{}/status", hostile.module))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse::<usize>().ok()))
        .unwrap_or_else(|| panic!("{case}: the worker {hostile:?} is gone"));
    let pids_current = cgroup_file(&cgroups(hostile.module), "pids", &["pids.current"]);
    eprintln!("{case}: {line}; the worker runs {threads} threads; pids.current {pids_current:?}");
    assert!(started >= 1, "{case}: the attack ran: {line}");
    assert!(started <= 64, "{case}: {started} threads started beyond pids_max = 64");
    assert!(threads <= 64, "{case}: the worker runs {threads} threads, beyond pids_max = 64");
    assert!(line.ends_with("EAGAIN"), "{case}: pthread_create was refused for want of pids: {line}");
    load.finish(&bed).await;
    assert_eq!(bed.worker(&bed.neighbour), neighbour, "{case}: the neighbour's worker is the same process");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_trying_to_escape_its_sandbox_is_refused_with_eperm() {
    let scratch_dir = tempfile::Builder::new().prefix("devhost-escape-").tempdir().expect("scratch dir");
    let scratch = scratch_dir.path().display().to_string();
    let mut attack = Attack::new("escape");
    attack.config = format!("scratch = {scratch:?}");
    let Some(bed) = Bed::start(attack).await else { return };
    let case = bed.attack;
    let (hostile, neighbour) = bed.check_workers();
    let load = Load::start(&bed.kubelet);
    let answer = hostile_allocate(&bed).await;
    let last = bed.wait_for_module_line("clone(CLONE_NEWPID) = ").await;
    let lines = bed.module_lines();
    eprintln!("{case}: the Allocate: {:?}; the module logged {lines:?}", answer.as_ref().map(drop));
    assert!(answer.is_ok(), "{case}: the refused attempts do not crash the worker: {answer:?}");
    for attempt in
        ["unshare(CLONE_NEWNS) = ", "mount(tmpfs on ", "ptrace(PTRACE_ATTACH, 1) = ", "clone(CLONE_NEWPID) = "]
    {
        let line = lines
            .iter()
            .find(|l| l.starts_with(attempt))
            .unwrap_or_else(|| panic!("{case}: {attempt:?} was not tried: {lines:?}"));
        assert!(line.ends_with("= -1 EPERM"), "{case}: refused with EPERM: {line}");
    }
    assert!(last.ends_with("= -1 EPERM"), "{case}: {last}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&scratch), "{case}: something is mounted on {scratch}");
    assert_eq!(bed.worker(&bed.backend), hostile, "{case}: the same worker serves on");
    load.finish(&bed).await;
    assert_eq!(bed.worker(&bed.neighbour), neighbour, "{case}: the neighbour's worker is the same process");
    bed.stop().await;
}

/// `unsandboxed = "always"` is the operator's explicit choice, and said
/// wherever an operator looks: the backend serves from a plain worker
/// (no PID namespace: its process is devhost's own child, not below an
/// init), `/readyz` stays 200 but warns, and `devhost_worker_sandbox` is 0
/// for each protection it lacks, 1 for the sandboxed neighbour's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_run_unsandboxed_on_request_is_said_in_readyz_and_metrics() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = crate::native_loader::rust_module("devhost_example_native_rust", &modules);
    let file = |resource: &str, extra: &str| {
        format!(
            "[backend]\nmodule = {:?}\n{extra}[config]\nresource = {resource:?}\nflip_interval_ms = 3600000\n",
            module.display().to_string()
        )
    };
    node.backend("plain", &file("example.com/plain", "unsandboxed = \"always\"\n"));
    node.backend("boxed", &file("example.com/boxed", ""));
    std::fs::write(node.config_file(), "metrics_address = \"127.0.0.1:0\"\n").expect("host config");
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet");
    let devhost = node.start_devhost();
    for resource in ["example.com/plain", "example.com/boxed"] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.expect("registered");
        kubelet.allocate(resource, &["rust-0"]).await.expect("serves");
    }
    devhost.wait_until_ready().await;
    let address = devhost.metrics_address().await;
    let (status, readyz) = crate::harness::http_get(&address, "/readyz").await;
    assert_eq!(status, 200, "{readyz}");
    assert!(
        readyz.contains("warning: backend plain's worker runs without part of its sandbox: no cgroup")
            && readyz.contains("no PID namespace"),
        "{readyz}"
    );
    assert!(!readyz.contains("backend boxed"), "{readyz}");
    let (_, metrics) = crate::harness::http_get(&address, "/metrics").await;
    for (backend, value) in [("plain", 0), ("boxed", 1)] {
        for protection in ["pid_namespace", "cgroup", "lockdown"] {
            let series = format!("devhost_worker_sandbox{{backend=\"{backend}\",protection=\"{protection}\"}} {value}");
            assert!(metrics.lines().any(|line| line == series), "no {series:?} in:\n{metrics}");
        }
    }
    let log = devhost.log();
    assert!(log.contains("worker runs without part of its sandbox"), "logged:\n{log}");
}
