//! Instructions per `Allocate` call, counted by valgrind's callgrind in
//! the serving process alone (devhost, its worker, or the floor server):
//! unlike the wall clock, the count does not move with the machine's load.
//!
//! Method: the server runs under `valgrind --tool=callgrind`. After a
//! warm-up its counters are zeroed (`vgdb --pid=<pid> zero`), `SHORT` calls
//! are made, its counts dumped (`vgdb … dump`); zeroed again, `LONG` calls,
//! dumped again. Per call = (long − short) / (`LONG` − `SHORT`): whatever a
//! window costs besides its calls (the zero and dump requests themselves)
//! cancels out. `perf stat -e instructions` is not used: this VM has no
//! hardware counters (`<not supported>`). callgrind counts user-space
//! instructions only: the kernel's share (socket system calls, wake-ups)
//! is not in these figures. The dumps are kept in
//! `target/bench/callgrind/` for `callgrind_annotate --inclusive=yes`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::AllocateResponse;
use devhost::proto::v1beta1::device_plugin_client::DevicePluginClient;
use tonic::transport::Channel;

use super::{Node, Table, allocate_request, children, native_module, smoke, target_dir, wasm_module};

/// Calls in the short and the long window, and the warm-up before them.
fn windows() -> (usize, usize, usize) {
    if smoke() { (5, 15, 5) } else { (100, 1_100, 100) }
}

/// How long a server under valgrind may take to start (it runs 20–100×
/// slower; a WASM component may be compiled under it).
const SLOW_START: Duration = Duration::from_secs(600);

/// valgrind runs and the dumps they write.
pub(crate) struct Callgrind {
    dir: PathBuf,
    /// Dumps requested so far, per process (callgrind numbers them).
    dumps: HashMap<u32, usize>,
}

impl Callgrind {
    /// `None` where valgrind is not installed.
    fn new() -> Result<Option<Self>> {
        let found = Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success());
        if !found {
            return Ok(None);
        }
        let dir = target_dir().join("bench/callgrind");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Some(Callgrind { dir, dumps: HashMap::new() }))
    }

    /// `program args…` under callgrind, children traced too (a worker is
    /// the devhost binary run again). Each process writes
    /// `<name>.<pid>[.<dump>]` and its valgrind log `<name>.<pid>.log`.
    fn command(&self, name: &str, program: &Path) -> Command {
        let mut command = Command::new("valgrind");
        command
            .arg("--tool=callgrind")
            .arg("--trace-children=yes")
            .arg(format!("--callgrind-out-file={}", self.dir.join(format!("{name}.%p")).display()))
            .arg(format!("--log-file={}", self.dir.join(format!("{name}.%p.log")).display()))
            .arg(program);
        command
    }

    /// Runs a callgrind monitor command (`zero`, `dump`) in `pid`.
    fn monitor(pid: u32, what: &str) -> Result<()> {
        let output = Command::new("vgdb")
            .arg(format!("--pid={pid}"))
            .arg(what)
            .stdin(Stdio::null())
            .output()
            .context("run vgdb (valgrind's gdbserver client)")?;
        ensure!(
            output.status.success(),
            "vgdb --pid={pid} {what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn zero(&self, pids: &[u32]) -> Result<()> {
        pids.iter().try_for_each(|&pid| Self::monitor(pid, "zero"))
    }

    /// Dumps each process's counts since its last zero; returns their
    /// instructions (`totals:`) and the dump files.
    fn dump(&mut self, name: &str, pids: &[u32]) -> Result<Vec<(u64, PathBuf)>> {
        let mut counts = Vec::new();
        for &pid in pids {
            Self::monitor(pid, "dump")?;
            let number = self.dumps.entry(pid).or_default();
            *number += 1;
            let file = self.dir.join(format!("{name}.{pid}.{number}"));
            let deadline = Instant::now() + Duration::from_secs(60);
            let totals = loop {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if let Some(line) = text.lines().find_map(|l| l.strip_prefix("totals:")) {
                    break line.split_whitespace().next().context("totals: with no count")?.parse::<u64>()?;
                }
                ensure!(Instant::now() < deadline, "callgrind never wrote {}", file.display());
                std::thread::sleep(Duration::from_millis(20));
            };
            counts.push((totals, file));
        }
        Ok(counts)
    }
}

/// What one row's calls cost, per call, in each process counted.
struct PerCall {
    /// Instructions per call, per process (in the order given).
    each: Vec<f64>,
    /// The long window's dumps (for `callgrind_annotate`).
    files: Vec<PathBuf>,
}

impl PerCall {
    fn total(&self) -> f64 {
        self.each.iter().sum()
    }
}

/// `SHORT` and `LONG` calls of `id`, each window zeroed and dumped in
/// `pids`, after a warm-up.
async fn per_call(
    callgrind: &mut Callgrind,
    name: &str,
    pids: &[u32],
    client: &mut DevicePluginClient<Channel>,
    id: &str,
) -> Result<PerCall> {
    let (short, long, warm_up) = windows();
    for _ in 0..warm_up {
        client.allocate(allocate_request(id)).await?;
    }
    let a = window(callgrind, name, pids, client, id, short).await?;
    let b = window(callgrind, name, pids, client, id, long).await?;
    let each = a.iter().zip(&b).map(|((a, _), (b, _))| (*b as f64 - *a as f64) / (long - short) as f64).collect();
    Ok(PerCall { each, files: b.into_iter().map(|(_, file)| file).collect() })
}

/// One counted window: zero, `calls` calls, dump.
async fn window(
    callgrind: &mut Callgrind,
    name: &str,
    pids: &[u32],
    client: &mut DevicePluginClient<Channel>,
    id: &str,
    calls: usize,
) -> Result<Vec<(u64, PathBuf)>> {
    callgrind.zero(pids)?;
    for _ in 0..calls {
        client.allocate(allocate_request(id)).await?;
    }
    callgrind.dump(name, pids)
}

fn kilo(instructions: f64) -> String {
    format!("{:.1} k", instructions / 1000.0)
}

/// The floor server under callgrind, answering `answer`; returns its
/// process and a client.
pub(crate) async fn floor_under(
    callgrind: Option<&Callgrind>,
    dir: &Path,
    answer: &AllocateResponse,
) -> Result<(Child, DevicePluginClient<Channel>)> {
    use prost::Message;
    let socket = dir.join("floor.sock");
    let answer_file = dir.join("answer.bin");
    std::fs::write(&answer_file, answer.encode_to_vec())?;
    let exe = std::env::current_exe()?;
    let mut command = match callgrind {
        Some(callgrind) => callgrind.command("floor", &exe),
        None => Command::new(&exe),
    };
    let mut child = command.arg("floor-server").arg(&socket).arg(&answer_file).stdin(Stdio::null()).spawn()?;
    let deadline = Instant::now() + if callgrind.is_some() { SLOW_START } else { super::WAIT };
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the floor server never made {}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let channel = devhost::sockets::client::connect(&socket, Duration::from_secs(60)).await?;
    Ok((child, DevicePluginClient::new(channel)))
}

/// One serving devhost's row: its resource, an ID, and which processes
/// count.
struct Row {
    what: &'static str,
    resource: &'static str,
    id: &'static str,
    /// Served by a worker of this backend: its process counts too.
    worker: Option<&'static str>,
    /// The wall-clock row (of `floor`/`allocate`) this one stands beside.
    beside: Option<&'static str>,
}

/// A devhost under callgrind serving `backends` (name, file), and its
/// figures for `rows`: instructions per call, and while idle per second.
async fn count_devhost(
    callgrind: &mut Callgrind,
    name: &str,
    as_devhost: bool,
    backends: &[(&str, String)],
    rows: &[Row],
) -> Result<(Vec<PerCall>, f64, AllocateResponse)> {
    let mut node = Node::new()?;
    // No PodResources polling, no module polls, no flips: nothing but the
    // calls runs while a window is counted.
    std::fs::write(
        node.dir.path().join("config/devhost.toml"),
        "call_timeout_ms = 60000\nmetrics_address = \"\"\n[pod_resources]\nsocket = \"\"\n",
    )?;
    for (file, text) in backends {
        node.backend(file, text)?;
    }
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let devhost_bin = super::devhost_bin()?;
    let command = if as_devhost {
        // This binary, serving as devhost (`AS_DEVHOST`): its workers are
        // the devhost binary by path, which valgrind follows.
        let mut command = callgrind.command(name, &std::env::current_exe()?);
        command.env(super::AS_DEVHOST, "1").env("DEVHOST_BIN", &devhost_bin);
        command
    } else {
        callgrind.command(name, &devhost_bin)
    };
    let pid = node.start_with(command)?;
    let started = Instant::now();
    for row in rows {
        kubelet
            .wait_for_devices(row.resource, SLOW_START, |d| !d.is_empty())
            .await
            .with_context(|| format!("devhost under callgrind, its log in {}", node.dir.path().display()))?;
    }
    eprintln!("bench: devhost under callgrind ({name}) serving in {:.1} s", started.elapsed().as_secs_f64());
    // What devhost does on its own while nobody calls.
    callgrind.zero(&[pid])?;
    let idle_for = Duration::from_secs(2);
    tokio::time::sleep(idle_for).await;
    let idle = callgrind.dump(name, &[pid])?[0].0 as f64 / idle_for.as_secs_f64();
    let mut figures = Vec::new();
    let mut answer = None;
    for row in rows {
        let mut client = kubelet.client(row.resource).await?;
        if answer.is_none() {
            answer = Some(client.allocate(allocate_request(row.id)).await?.into_inner());
        }
        let mut pids = vec![pid];
        if let Some(backend) = row.worker {
            let suffix = format!(" __worker {backend}");
            let worker = children(pid)?
                .into_iter()
                .find(|(_, cmdline)| cmdline.ends_with(&suffix))
                .with_context(|| format!("no worker of backend {backend} under devhost {pid}"))?;
            pids.push(worker.0);
        }
        figures.push(per_call(callgrind, name, &pids, &mut client, row.id).await?);
    }
    Ok((figures, idle, answer.context("no row")?))
}

/// `devhost-bench instructions`.
pub(crate) async fn instructions(table: &mut Table) -> Result<()> {
    let Some(mut callgrind) = Callgrind::new()? else {
        table.row("instructions per Allocate", "not measured", "valgrind is not installed");
        return Ok(());
    };
    let (short, long, warm_up) = windows();
    let method = format!(
        "callgrind, server process(es) only: ({long} calls − {short} calls) / {}, after {warm_up} warm-up{}",
        long - short,
        if smoke() { "; smoke run: floor and static only, few calls (figures mean nothing)" } else { "" }
    );
    let modules = tempfile::Builder::new().prefix("devhost-bench-modules-").tempdir()?;
    let native = native_module(modules.path())?;
    let native_file = |resource: &str, mode_keys: &str| {
        format!(
            "[backend]\nmodule = {:?}\npoll_interval_ms = 3600000\n{mode_keys}[config]\nresource = {resource:?}\ndevices = 2\nflip_interval_ms = 3600000\n",
            native.display().to_string()
        )
    };
    // The devhost binary: static, native in-process, WASM.
    let mut backends = vec![("static", super::static_file(1, 8, ""))];
    let mut rows =
        vec![Row { what: "static", resource: "bench.example.com/r0", id: "d-0", worker: None, beside: Some("static") }];
    let in_process = Row {
        what: "native (Rust example), in-process (isolation = \"none\")",
        resource: "bench.example.com/in-process",
        id: "rust-0",
        worker: None,
        // `isolation`'s in-process row.
        beside: Some("in-process"),
    };
    if !smoke() {
        backends.push(("in-process", native_file(in_process.resource, "isolation = \"none\"\n")));
        rows.push(Row { ..in_process });
        match wasm_module(modules.path()) {
            Some(module) => {
                // A component is polled by its own poller (`[sandbox]`).
                let text = super::wasm_file(&module, &modules.path().join("cache"), "bench.example.com/wasm").replacen(
                    "[sandbox]\n",
                    "[sandbox]\npoll_interval_ms = 3600000\n",
                    1,
                );
                backends.push(("wasm", text));
                rows.push(Row {
                    what: "WASM (Rust example component)",
                    resource: "bench.example.com/wasm",
                    id: "wasm-0",
                    worker: None,
                    beside: Some("wasm"),
                });
            }
            None => table.row("instructions per Allocate, WASM", "not measured", "component not built"),
        }
    }
    let (mut figures, idle, answer) = count_devhost(&mut callgrind, "devhost", false, &backends, &rows).await?;

    // The worker path: this binary serving as devhost (under callgrind
    // the devhost binary's workers would be `/proc/self/exe`, valgrind's
    // own tool), the same module in-process beside it for comparison.
    // callgrind cannot run under the worker's seccomp filter either (a
    // sandboxed worker exits during `confine`): it runs unsandboxed here;
    // the filter and namespaces are kernel work, not counted either way.
    let mut worker_rows = Vec::new();
    if !smoke() {
        let worker_backends = vec![
            ("in-process", native_file(in_process.resource, "isolation = \"none\"\n")),
            ("worker", native_file("bench.example.com/worker", "isolation = \"process\"\nunsandboxed = \"always\"\n")),
        ];
        worker_rows = vec![
            Row {
                what: "native (Rust example), in-process, devhost library in devhost-bench",
                beside: None,
                ..in_process
            },
            Row {
                what: "native (Rust example), in its worker process (unsandboxed), devhost library in devhost-bench",
                resource: "bench.example.com/worker",
                id: "rust-0",
                worker: Some("worker"),
                // `allocate`'s native row runs in a worker too (sandboxed).
                beside: Some("native"),
            },
        ];
        let (worker_figures, _, _) =
            count_devhost(&mut callgrind, "as-devhost", true, &worker_backends, &worker_rows).await?;
        figures.extend(worker_figures);
    }
    let all_rows: Vec<&Row> = rows.iter().chain(&worker_rows).collect();

    let floor_dir = tempfile::Builder::new().prefix("devhost-bench-floor-").tempdir()?;
    let (mut child, mut client) = floor_under(Some(&callgrind), floor_dir.path(), &answer).await?;
    let floor = per_call(&mut callgrind, "floor", &[child.id()], &mut client, "d-0").await;
    let _ = child.kill();
    let _ = child.wait();
    let floor = floor?;
    table.instructions.insert("floor", floor.total());

    let relative = |dir: &Path| dir.strip_prefix(target_dir()).map_or(dir.to_owned(), |p| Path::new("target").join(p));
    table.row(
        "instructions per Allocate: floor (bare tonic, the static row's answer)",
        kilo(floor.total()),
        format!(
            "{method}; the floor returns the static backend's answer for d-0 ({} bytes); profile: {}",
            prost::Message::encoded_len(&answer),
            relative(&floor.files[0]).display()
        ),
    );
    let mut local = None;
    for (row, counted) in all_rows.iter().zip(&figures) {
        let total = counted.total();
        let mut note = format!("**{:.2}× floor**", total / floor.total());
        if counted.each.len() > 1 {
            note += &format!(" (devhost {} + worker {})", kilo(counted.each[0]), kilo(counted.each[1]));
        }
        if row.resource == in_process.resource {
            local = Some(total);
        }
        if row.worker.is_some()
            && let Some(local) = local
        {
            note += &format!("; the worker path adds {} over in-process (both processes)", kilo(total - local));
        }
        note += &format!(
            "; profile: {}",
            counted.files.iter().map(|f| relative(f).display().to_string()).collect::<Vec<_>>().join(", ")
        );
        table.row(format!("instructions per Allocate: {}", row.what), kilo(total), note);
        if let Some(beside) = row.beside {
            table.instructions.insert(beside, total);
        }
    }
    table.row(
        "instructions: devhost idle (no calls), per second",
        kilo(idle),
        "counted over 2 s before the calls: what leaks into a window besides its calls",
    );
    Ok(())
}
