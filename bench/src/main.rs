//! `devhost-bench`: devhost's figures through the real gRPC path over Unix
//! sockets, as the kubelet calls it (figures, not timed assertions).
//!
//! ```text
//! cargo build --release --bin devhost -p devhost-example-native-rust -p devhost-bench
//! cargo build --release --target wasm32-wasip2 -p devhost-example-wasm-rust
//! target/release/devhost-bench all        # or: floor allocate instructions health start restart idle scale isolation dra
//! ```
//!
//! The `devhost` binary runs as a child process (the one next to this
//! binary, or `$DEVHOST_BIN`), the project's fake kubelet in this process.
//! The floor is a bare tonic `DevicePlugin` server in a child process (this
//! binary, `floor-server`) answering `Allocate` with a constant, over the
//! same kind of socket. Results are printed as a Markdown table and written
//! to `target/bench/results.md`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devhost::backend::handle::BackendHandle;
use devhost::backend::{Allocation, Backend, BackendError, Device, Health, Publisher, ResourceSpec};
use devhost::fake_kubelet::FakeKubelet;
use devhost::proto::v1beta1::device_plugin_client::DevicePluginClient;
use devhost::proto::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use devhost::proto::v1beta1::{self, AllocateRequest, ContainerAllocateRequest, Empty};
use devhost::server::{DevicePluginService, ResourceServer};
use futures_util::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

mod dra;
mod instructions;

const WAIT: Duration = Duration::from_secs(60);

/// Set in the environment: this binary serves as `devhost` (see `main`).
const AS_DEVHOST: &str = "DEVHOST_BENCH_AS_DEVHOST";

/// `DEVHOST_BENCH_SMOKE=1`: every loop runs a twentieth of its calls (at
/// least two). For CI, which runs the benchmarks only to keep them working:
/// its figures mean nothing.
fn scaled(calls: usize) -> usize {
    if smoke() { (calls / 20).max(2) } else { calls }
}

/// Whether this is CI's short smoke run (`DEVHOST_BENCH_SMOKE=1`).
fn smoke() -> bool {
    static SMOKE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SMOKE.get_or_init(|| std::env::var_os("DEVHOST_BENCH_SMOKE").is_some_and(|v| v == "1"))
}

/// The machine's load average (`/proc/loadavg`: 1, 5 and 15 minutes),
/// printed beside wall-clock figures: they move with it.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = text.split_whitespace().take(3).collect();
    if load.len() == 3 { format!("load {}", load.join(" ")) } else { "load unknown".into() }
}
const SEQUENTIAL: usize = 2_000;
const CONCURRENT: usize = 64;
const PER_CALLER: usize = 100;

fn main() -> Result<()> {
    if std::env::var_os(AS_DEVHOST).is_some() {
        // Serve as `devhost` itself, its arguments as given (under
        // callgrind, where `/proc/self/exe` is valgrind's tool: a worker
        // must be started from the devhost binary by its path).
        devhost::worker::set_executable(devhost_bin()?);
        let code = devhost::cli::main();
        std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("floor-server") {
        let socket = args.get(1).context("floor-server needs a socket path")?;
        // The answer to give, encoded (`floor_child` writes it).
        let answer = match args.get(2) {
            Some(file) => v1beta1::AllocateResponse::decode(std::fs::read(file)?.as_slice())?,
            None => v1beta1::AllocateResponse::default(),
        };
        let container = answer.container_responses.into_iter().next().unwrap_or_default();
        return tokio::runtime::Runtime::new()?.block_on(floor_server(Path::new(socket), container));
    }
    let which: Vec<&str> = match args.first().map(String::as_str) {
        None | Some("all") => {
            // Instructions first: the latency rows print them beside.
            vec!["instructions", "floor", "allocate", "health", "start", "restart", "idle", "scale", "isolation", "dra"]
        }
        Some(_) => args.iter().map(String::as_str).collect(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut table = Table::default();
    for bench in which {
        eprintln!("bench: {bench}");
        runtime.block_on(async {
            match bench {
                "floor" => floor(&mut table).await,
                "allocate" => allocate(&mut table).await,
                "health" => health(&mut table).await,
                "start" => start(&mut table).await,
                "restart" => restart(&mut table).await,
                "idle" => idle(&mut table).await,
                "scale" => scale(&mut table).await,
                "isolation" => isolation(&mut table).await,
                "dra" => dra::dra(&mut table).await,
                "instructions" => instructions::instructions(&mut table).await,
                other => {
                    bail!(
                        "unknown benchmark {other}; known: floor allocate instructions health start restart idle scale isolation dra"
                    )
                }
            }
        })?;
    }
    let text = table.render();
    println!("{text}");
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.md"), &text)?;
    eprintln!("bench: written to {}", dir.join("results.md").display());
    Ok(())
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct Table {
    rows: Vec<[String; 3]>,
    /// Instructions per Allocate counted earlier in this run (`instructions`),
    /// by row: `floor`, `static`, `native` (in its worker), `in-process`
    /// (the same module), `wasm`.
    instructions: std::collections::BTreeMap<&'static str, f64>,
}

impl Table {
    /// `row`'s instructions per call, if this run counted them, for the
    /// notes beside its latency.
    fn instructions_note(&self, row: &str) -> String {
        self.instructions
            .get(row)
            .map(|n| format!("; {:.1} k instructions per call (callgrind, this run)", n / 1000.0))
            .unwrap_or_default()
    }

    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>, note: impl Into<String>) {
        let row = [what.into(), figure.into(), note.into()];
        eprintln!("bench: {} | {} | {}", row[0], row[1], row[2]);
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut text = String::from("| benchmark | figure | notes |\n|---|---|---|\n");
        for [what, figure, note] in &self.rows {
            text += &format!("| {what} | {figure} | {note} |\n");
        }
        text
    }
}

fn ms(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.0} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

/// `p50 / p99 / max`.
fn dist(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    format!("p50 {} / p99 {} / max {}", ms(at(0.5)), ms(at(0.99)), ms(sorted[sorted.len() - 1]))
}

// ---------------------------------------------------------------- setup

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from)
}

/// The directory this binary lives in (`target/<profile>`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("the binary's directory")?.to_owned())
}

fn devhost_bin() -> Result<PathBuf> {
    let path =
        std::env::var_os("DEVHOST_BIN").map_or_else(|| profile_dir().map(|d| d.join("devhost")), |p| Ok(p.into()))?;
    if !path.is_file() {
        bail!("{} is missing: cargo build --release --bin devhost", path.display());
    }
    Ok(path)
}

fn native_module(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let built = profile_dir()?.join("libdevhost_example_native_rust.so");
    if !built.is_file() {
        bail!("{} is missing: cargo build --release -p devhost-example-native-rust", built.display());
    }
    let copy = dir.join("libdevhost_example_native_rust.so");
    std::fs::copy(&built, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

fn wasm_module(dir: &Path) -> Option<PathBuf> {
    let built = target_dir().join("wasm32-wasip2/release/devhost_example_wasm_rust.wasm");
    let copy = dir.join("example.wasm");
    std::fs::copy(&built, &copy).ok()?;
    Some(copy)
}

/// A temporary node running the real `devhost` binary.
struct Node {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("devhost-bench-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("config/backends.d"))?;
        std::fs::create_dir_all(dir.path().join("plugin"))?;
        std::fs::write(dir.path().join("config/devhost.toml"), "call_timeout_ms = 5000\nmetrics_address = \"\"\n")?;
        Ok(Node { dir, child: None })
    }

    fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugin")
    }

    fn backend(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.dir.path().join(format!("config/backends.d/{name}.toml")), text)?;
        Ok(())
    }

    fn start(&mut self) -> Result<u32> {
        self.start_with(Command::new(devhost_bin()?))
    }

    /// Starts devhost as `command` (the binary, or a tool running it).
    fn start_with(&mut self, mut command: Command) -> Result<u32> {
        let log = std::fs::File::create(self.dir.path().join("devhost.log"))?;
        let child = command
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("config/devhost.toml"))
            .arg("--plugin-dir")
            .arg(self.plugin_dir())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A static backend file: `resources` resources of `devices` devices each.
fn static_file(resources: usize, devices: usize, extra: &str) -> String {
    let mut text = String::from("[backend]\nkind = \"static\"\n[config]\n");
    text += extra;
    for r in 0..resources {
        text += &format!(
            "[[config.resource]]\nname = \"bench.example.com/r{r}\"\nenv = {{ IDS = \"{{ids}}\" }}\npreferred_allocation = true\n"
        );
        for d in 0..devices {
            text += &format!(
                "[[config.resource.device]]\nid = \"d-{d}\"\nnuma = [{}]\ndevice_spec = [{{ host_path = \"/dev/null\", container_path = \"/dev/d-{d}\" }}]\n",
                d % 2
            );
        }
    }
    text
}

fn native_file(module: &Path, resource: &str, flip_ms: u64) -> String {
    format!(
        "[backend]\nmodule = {:?}\n[config]\nresource = {resource:?}\ndevices = 2\nflip_interval_ms = {flip_ms}\n",
        module.display().to_string()
    )
}

fn wasm_file(module: &Path, cache: &Path, resource: &str) -> String {
    format!(
        "[backend]\nmodule = {:?}\n[sandbox]\ncache_dir = {:?}\n[config]\nresource = {resource:?}\ndevices = 2\n",
        module.display().to_string(),
        cache.display().to_string()
    )
}

async fn all_registered(kubelet: &FakeKubelet, resources: &[String], count: usize) -> Result<()> {
    let waits = resources.iter().map(|r| kubelet.wait_for_registrations(r, count, WAIT));
    for result in futures_util::future::join_all(waits).await {
        result?;
    }
    Ok(())
}

fn allocate_request(id: &str) -> AllocateRequest {
    AllocateRequest { container_requests: vec![ContainerAllocateRequest { devices_ids: vec![id.to_owned()] }] }
}

/// Sequential and 64-caller Allocate latency on one connection (the
/// kubelet keeps one per plugin).
async fn allocate_latency(
    client: DevicePluginClient<Channel>,
    ids: &[String],
) -> Result<(Vec<Duration>, Vec<Duration>, f64)> {
    let mut sequential = Vec::with_capacity(scaled(SEQUENTIAL));
    let mut c = client.clone();
    for i in 0..scaled(SEQUENTIAL) + 100 {
        let started = Instant::now();
        c.allocate(allocate_request(&ids[i % ids.len()])).await?;
        if i >= 100 {
            sequential.push(started.elapsed());
        }
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|caller| {
            let mut c = client.clone();
            let ids = ids.to_vec();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(scaled(PER_CALLER));
                for i in 0..scaled(PER_CALLER) {
                    let t = Instant::now();
                    c.allocate(allocate_request(&ids[(caller + i) % ids.len()])).await?;
                    samples.push(t.elapsed());
                }
                Ok::<_, tonic::Status>(samples)
            })
        })
        .collect();
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.extend(task.await??);
    }
    let rate = concurrent.len() as f64 / started.elapsed().as_secs_f64();
    Ok((sequential, concurrent, rate))
}

// ---------------------------------------------------------------- floor

/// A bare tonic `DevicePlugin`: every container of an `Allocate` gets
/// `answer` (the static backend's answer, captured from devhost, so that
/// the floor sends what devhost sends).
#[derive(Debug, Default)]
struct Floor {
    answer: v1beta1::ContainerAllocateResponse,
}

#[tonic::async_trait]
impl DevicePlugin for Floor {
    async fn get_device_plugin_options(
        &self,
        _: tonic::Request<Empty>,
    ) -> Result<tonic::Response<v1beta1::DevicePluginOptions>, tonic::Status> {
        Ok(tonic::Response::new(v1beta1::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = futures_util::stream::Empty<Result<v1beta1::ListAndWatchResponse, tonic::Status>>;

    async fn list_and_watch(
        &self,
        _: tonic::Request<Empty>,
    ) -> Result<tonic::Response<Self::ListAndWatchStream>, tonic::Status> {
        Ok(tonic::Response::new(futures_util::stream::empty()))
    }

    async fn get_preferred_allocation(
        &self,
        _: tonic::Request<v1beta1::PreferredAllocationRequest>,
    ) -> Result<tonic::Response<v1beta1::PreferredAllocationResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1beta1::PreferredAllocationResponse::default()))
    }

    async fn allocate(
        &self,
        request: tonic::Request<AllocateRequest>,
    ) -> Result<tonic::Response<v1beta1::AllocateResponse>, tonic::Status> {
        let n = request.into_inner().container_requests.len();
        Ok(tonic::Response::new(v1beta1::AllocateResponse { container_responses: vec![self.answer.clone(); n] }))
    }

    async fn pre_start_container(
        &self,
        _: tonic::Request<v1beta1::PreStartContainerRequest>,
    ) -> Result<tonic::Response<v1beta1::PreStartContainerResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1beta1::PreStartContainerResponse {}))
    }
}

async fn floor_server(socket: &Path, answer: v1beta1::ContainerAllocateResponse) -> Result<()> {
    let listener = tokio::net::UnixListener::bind(socket)?;
    tonic::transport::Server::builder()
        .add_service(DevicePluginServer::new(Floor { answer }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

/// The static backend's answer for `d-0` of [`static_file`]'s resource,
/// from a devhost started for it: what the floor answers.
async fn static_answer() -> Result<v1beta1::AllocateResponse> {
    let mut node = Node::new()?;
    node.backend("static", &static_file(1, 8, ""))?;
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    node.start()?;
    kubelet.wait_for_devices("bench.example.com/r0", WAIT, |d| d.len() == 8).await?;
    let mut client = kubelet.client("bench.example.com/r0").await?;
    Ok(client.allocate(allocate_request("d-0")).await?.into_inner())
}

/// A floor server (a child process) answering `answer`, and its figures.
struct FloorRun {
    sequential: Vec<Duration>,
    concurrent: Vec<Duration>,
    rate: f64,
}

impl FloorRun {
    async fn measure(answer: &v1beta1::AllocateResponse) -> Result<FloorRun> {
        let dir = tempfile::tempdir()?;
        let (mut child, client) = instructions::floor_under(None, dir.path(), answer).await?;
        let result = allocate_latency(client, &["d-0".to_owned()]).await;
        let _ = child.kill();
        let _ = child.wait();
        let (sequential, concurrent, rate) = result?;
        Ok(FloorRun { sequential, concurrent, rate })
    }

    /// `this run's floor p50 …, ×ratio; load …` for a row of `samples`.
    fn beside(&self, samples: &[Duration]) -> String {
        let (floor, own) = (quantile(&self.sequential, 0.5), quantile(samples, 0.5));
        format!(
            "this run's floor p50 {} (**{:.2}×**); {}",
            ms(floor),
            own.as_secs_f64() / floor.as_secs_f64().max(1e-9),
            load_average()
        )
    }
}

async fn floor(table: &mut Table) -> Result<()> {
    let answer = static_answer().await?;
    let run = FloorRun::measure(&answer).await?;
    table.row(
        "floor: bare tonic Allocate round trip, sequential",
        dist(&run.sequential),
        format!(
            "separate process, same kind of Unix socket, answers the static row's answer ({} bytes); {}{}",
            answer.encoded_len(),
            load_average(),
            table.instructions_note("floor")
        ),
    );
    table.row(
        format!("floor: bare tonic Allocate, {CONCURRENT} concurrent callers"),
        dist(&run.concurrent),
        format!("{:.0} calls/s", run.rate),
    );
    Ok(())
}

// ---------------------------------------------------------------- allocate

async fn allocate(table: &mut Table) -> Result<()> {
    let mut node = Node::new()?;
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules)?;
    node.backend("static", &static_file(1, 8, ""))?;
    let native = native_module(&modules)?;
    node.backend("native", &native_file(&native, "bench.example.com/native", 3_600_000))?;
    // (row, resource, IDs, key of its instructions)
    let mut backends = vec![
        ("static", "bench.example.com/r0".to_owned(), (0..8).map(|d| format!("d-{d}")).collect::<Vec<_>>(), "static"),
        (
            "native (Rust example, C ABI)",
            "bench.example.com/native".to_owned(),
            vec!["rust-0".into(), "rust-1".into()],
            "native",
        ),
    ];
    match wasm_module(&modules) {
        Some(module) => {
            node.backend("wasm", &wasm_file(&module, &node.dir.path().join("cache"), "bench.example.com/wasm"))?;
            backends.push((
                "WASM (Rust example component)",
                "bench.example.com/wasm".to_owned(),
                vec!["wasm-0".into(), "wasm-1".into()],
                "wasm",
            ));
        }
        None => table.row("WASM Allocate", "not measured", "component not built"),
    }
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    node.start()?;
    let names: Vec<String> = backends.iter().map(|(_, r, _, _)| r.clone()).collect();
    all_registered(&kubelet, &names, 1).await?;
    // This run's floor, answering what the static backend answers.
    kubelet.wait_for_devices(&names[0], WAIT, |d| d.len() == 8).await?;
    let answer = kubelet.client(&names[0]).await?.allocate(allocate_request("d-0")).await?.into_inner();
    let floor = FloorRun::measure(&answer).await?;
    table.row(
        "Allocate: this run's floor (bare tonic, the static answer), sequential",
        dist(&floor.sequential),
        format!("{}; {CONCURRENT} concurrent callers: {:.0} calls/s", load_average(), floor.rate),
    );
    for (kind, resource, ids, key) in &backends {
        kubelet.wait_for_devices(resource, WAIT, |d| d.len() == ids.len()).await?;
        let client = kubelet.client(resource).await?;
        let (sequential, concurrent, rate) = allocate_latency(client, ids).await?;
        table.row(
            format!("Allocate, {kind}, sequential"),
            dist(&sequential),
            format!("{SEQUENTIAL} calls, 1 device each; {}{}", floor.beside(&sequential), table.instructions_note(key)),
        );
        table.row(
            format!("Allocate, {kind}, {CONCURRENT} concurrent callers"),
            dist(&concurrent),
            format!(
                "{} calls, {rate:.0} calls/s ({:.2}× this run's floor's {:.0}); {}",
                CONCURRENT * PER_CALLER,
                rate / floor.rate,
                floor.rate,
                load_average()
            ),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- health

/// A backend whose device list the benchmark publishes at will.
#[derive(Default)]
struct Manual {
    publisher: Mutex<Option<Publisher>>,
    /// How many devices it serves.
    count: usize,
}

impl Backend for Manual {
    fn init(&self, publisher: Publisher) -> Result<Vec<ResourceSpec>, BackendError> {
        publisher
            .publish("bench.example.com/manual", devices(self.count, Health::Healthy))
            .map_err(|e| BackendError::new(e.to_string()))?;
        *self.publisher.lock().map_err(|_| BackendError::new("poisoned"))? = Some(publisher);
        Ok(vec![ResourceSpec::new("bench.example.com/manual")])
    }

    fn allocate(&self, _: &str, _: &[String]) -> Result<Allocation, BackendError> {
        Ok(Allocation::default())
    }
}

/// `count` devices on two NUMA nodes, all Healthy but the last one.
fn devices(count: usize, last: Health) -> Vec<Device> {
    (0..count)
        .map(|i| {
            Device::new(format!("m-{i}"), if i + 1 == count { last } else { Health::Healthy })
                .with_numa_nodes(vec![i64::from(i % 2 == 1)])
        })
        .collect()
}

/// In-process: the daemon's own pieces (device state, resource server,
/// ListAndWatch over a Unix socket) with a backend of `count` devices that
/// publishes on demand; `changes` times the last device's health flips and
/// the time until the client has decoded the new list is sampled, and the
/// time devhost's `publish` took (its part: check, encode, hand-over).
async fn publish_to_stream(count: usize, changes: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let backend = Arc::new(Manual { count, ..Manual::default() });
    let handle = BackendHandle::start("manual", backend.clone(), Duration::from_secs(5), stop.clone()).await?;
    let (spec, state) = handle.resources()[0].clone();
    let service = DevicePluginService::new(spec, state, handle.clone(), stop.clone());
    let socket = dir.path().join("manual.sock");
    let server = ResourceServer::start(&socket, service, stop.clone())?;
    let mut client = DevicePluginClient::new(devhost::sockets::client::connect(&socket, Duration::from_secs(5)).await?);
    let mut stream = client.list_and_watch(Empty {}).await?.into_inner();
    stream.next().await.context("first list")??;
    let publisher =
        backend.publisher.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone().context("initialised")?;
    let (mut samples, mut publishing) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let health = if i % 2 == 0 { Health::Unhealthy } else { Health::Healthy };
        let list = devices(count, health);
        let started = Instant::now();
        publisher.publish("bench.example.com/manual", list)?;
        publishing.push(started.elapsed());
        let list = stream.next().await.context("stream ended")??;
        samples.push(started.elapsed());
        if list.devices[count - 1].health != health.as_str() {
            bail!("the stream showed {:?}, expected {}", list.devices[count - 1].health, health.as_str());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.cancel();
    server.stop().await;
    Ok((samples, publishing))
}

/// The kubelet side's own share of a list: decoding the encoded
/// `ListAndWatchResponse` of `count` devices, `times` times.
fn decode_list(count: usize, times: usize) -> Result<Vec<Duration>> {
    let list = devices(count, Health::Unhealthy);
    let advertised: Vec<v1beta1::Device> = list
        .iter()
        .map(|d| v1beta1::Device {
            id: d.id.clone(),
            health: d.health.as_str().to_owned(),
            topology: Some(v1beta1::TopologyInfo {
                nodes: d.numa_nodes.iter().map(|&id| v1beta1::NumaNode { id }).collect(),
            }),
        })
        .collect();
    let bytes = v1beta1::ListAndWatchResponse::new(advertised).encode_to_vec();
    let mut samples = Vec::with_capacity(times);
    for _ in 0..times {
        let started = Instant::now();
        let decoded = v1beta1::ListAndWatchResponse::decode(bytes.as_slice())?;
        samples.push(started.elapsed());
        if decoded.devices.len() != count {
            bail!("decoded {} devices, expected {count}", decoded.devices.len());
        }
    }
    Ok(samples)
}

async fn health(table: &mut Table) -> Result<()> {
    table.row(
        "health: backend publishes → kubelet side receives the new list",
        dist(&publish_to_stream(8, scaled(1_000)).await?.0),
        "8 devices, 1,000 changes; in-process devhost library, ListAndWatch over a Unix socket",
    );
    let (received, published) = publish_to_stream(10_000, scaled(100)).await?;
    table.row(
        "10,000 devices: one health change → kubelet side has the new list",
        dist(&received),
        "100 changes; the whole list is re-sent (the API has no deltas) and decoded",
    );
    table.row(
        "10,000 devices: of which devhost's publish (IDs checked, list encoded, old state freed)",
        dist(&published),
        "the same changes; the stream is woken before the old state is freed",
    );
    table.row(
        "10,000 devices: of which the kubelet side's decoding alone",
        dist(&decode_list(10_000, scaled(100))?),
        "the same list decoded from memory, no devhost and no socket",
    );

    // Through the binary: a static device's health_path removed → the
    // kubelet's stream shows it Unhealthy (includes the 1 ms polling).
    let mut node = Node::new()?;
    let state_dir = node.dir.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let flag = state_dir.join("d-0.ok");
    std::fs::write(&flag, "")?;
    let file = format!(
        "[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 1\n[[config.resource]]\nname = \"bench.example.com/h\"\n[[config.resource.device]]\nid = \"d-0\"\nhealth_path = {:?}\n",
        flag.display().to_string()
    );
    node.backend("h", &file)?;
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    node.start()?;
    kubelet.wait_for_registrations("bench.example.com/h", 1, WAIT).await?;
    let mut samples = Vec::new();
    for i in 0..scaled(200) {
        let healthy = i % 2 == 1;
        let started = Instant::now();
        if healthy {
            std::fs::write(&flag, "")?;
        } else {
            std::fs::remove_file(&flag)?;
        }
        let want = if healthy { "Healthy" } else { "Unhealthy" };
        kubelet.wait_for_devices("bench.example.com/h", WAIT, |d| d[0].health == want).await?;
        samples.push(started.elapsed());
    }
    table.row(
        "health: static health_path changed → kubelet side receives (devhost binary)",
        dist(&samples),
        "200 changes; includes the 1 ms health_interval_ms polling",
    );
    Ok(())
}

// ---------------------------------------------------------------- restart

/// Process start → every resource of `examples/config` registered with a
/// kubelet that is already running (the example's own backend file, in a
/// temporary node; metrics off).
async fn start(table: &mut Table) -> Result<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config/backends.d/example.toml");
    let text = std::fs::read_to_string(&example).with_context(|| example.display().to_string())?;
    let names: Vec<String> =
        text.lines().filter_map(|l| l.trim().strip_prefix("name = \"")?.split('"').next().map(str::to_owned)).collect();
    let mut samples = Vec::new();
    for _ in 0..scaled(STARTS) {
        let mut node = Node::new()?;
        node.backend("example", &text)?;
        let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
        let started = Instant::now();
        node.start()?;
        all_registered(&kubelet, &names, 1).await?;
        samples.push(started.elapsed());
    }
    table.row(
        format!("process start → every resource of examples/config registered ({})", names.join(", ")),
        dist(&samples),
        format!("{STARTS} starts, from spawning devhost"),
    );
    Ok(())
}

/// Kubelet restarts per resource count.
const RESTARTS: usize = 50;

async fn restart(table: &mut Table) -> Result<()> {
    for resources in [1, 10, 50] {
        let mut node = Node::new()?;
        node.backend("static", &static_file(resources, 2, ""))?;
        let names: Vec<String> = (0..resources).map(|r| format!("bench.example.com/r{r}")).collect();
        let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
        node.start()?;
        all_registered(&kubelet, &names, 1).await?;
        let mut samples = Vec::new();
        for round in 2..=scaled(RESTARTS) + 1 {
            kubelet.restart().await?;
            let started = Instant::now();
            all_registered(&kubelet, &names, round).await?;
            samples.push(started.elapsed());
        }
        table.row(
            format!("kubelet restart → all {resources} resource(s) registered again"),
            dist(&samples),
            format!("{RESTARTS} restarts, from the new kubelet.sock"),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- idle

/// The CPU time each of the process's threads has run so far, in
/// nanoseconds, by thread ID (each thread's `schedstat`: exact, where
/// `/proc/<pid>/stat` counts 10 ms ticks and cannot tell 0.05 % from 0 in a
/// 10 s sample).
fn cpu_ns(pid: u32) -> Result<std::collections::HashMap<String, u64>> {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        // A thread that ended meanwhile has no file any more: skip it.
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            let ns = stat.split_whitespace().next().context("schedstat")?.parse::<u64>()?;
            threads.insert(task.file_name().to_string_lossy().into_owned(), ns);
        }
    }
    Ok(threads)
}

/// The CPU time between two [`cpu_ns`] samples: every thread's growth, a
/// new thread's whole time. A thread that ended in between (tokio lets an
/// idle blocking thread go after 10 s) took its last moments with it: its
/// time is not counted (and not subtracted); how many there were is
/// returned beside.
fn cpu_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> (u64, usize) {
    let grown = after.iter().map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
    (grown, before.keys().filter(|tid| !after.contains_key(*tid)).count())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// RSS (MiB), CPU (%) and the threads that ended while sampled.
async fn idle_figures(pid: u32) -> Result<(f64, f64, usize)> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = cpu_ns(pid)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (used, ended) = cpu_between(&before, &cpu_ns(pid)?);
    let cpu = used as f64 / 1e9 / started.elapsed().as_secs_f64() * 100.0;
    Ok((rss_kib(pid)? as f64 / 1024.0, cpu, ended))
}

/// What [`idle_figures`] says of threads that ended while sampled.
fn ended_note(ended: usize) -> String {
    match ended {
        0 => String::new(),
        n => format!("; {n} thread(s) ended during the sample (their last moments are not counted)"),
    }
}

async fn idle(table: &mut Table) -> Result<()> {
    let mut node = Node::new()?;
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules)?;
    let native = native_module(&modules)?;
    let names: Vec<String> = (0..3).map(|i| format!("bench.example.com/native{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        node.backend(&format!("native{i}"), &native_file(&native, name, 10_000))?;
    }
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let pid = node.start()?;
    all_registered(&kubelet, &names, 1).await?;
    let (rss, cpu, ended) = idle_figures(pid).await?;
    table.row(
        "idle devhost, 3 native backends",
        format!("RSS {rss:.1} MiB, CPU {cpu:.3} %"),
        format!("registered, kubelet streams open; 10 s sample; each flips a device every 10 s{}", ended_note(ended)),
    );
    drop(node);

    let mut node = Node::new()?;
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules)?;
    let Some(module) = wasm_module(&modules) else {
        table.row("idle devhost, 1 WASM backend", "not measured", "component not built");
        return Ok(());
    };
    node.backend("wasm", &wasm_file(&module, &node.dir.path().join("cache"), "bench.example.com/wasm"))?;
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let pid = node.start()?;
    kubelet.wait_for_registrations("bench.example.com/wasm", 1, WAIT).await?;
    let (rss, cpu, ended) = idle_figures(pid).await?;
    table.row(
        "idle devhost, 1 WASM backend",
        format!("RSS {rss:.1} MiB, CPU {cpu:.3} %"),
        format!("registered; polled for devices every 1 s (default); 10 s sample{}", ended_note(ended)),
    );
    Ok(())
}

// ---------------------------------------------------------------- scale

async fn scale(table: &mut Table) -> Result<()> {
    const DEVICES: usize = 10_000;
    let mut node = Node::new()?;
    node.backend("big", &static_file(1, DEVICES, ""))?;
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let started = Instant::now();
    let pid = node.start()?;
    kubelet.wait_for_devices("bench.example.com/r0", WAIT, |d| d.len() == DEVICES).await?;
    let ready = started.elapsed();
    let mut client = kubelet.client("bench.example.com/r0").await?;
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let mut stream = client.list_and_watch(Empty {}).await?.into_inner();
        let list = stream.next().await.context("first list")??;
        times.push(t.elapsed());
        size = list.encoded_len();
    }
    table.row(
        format!("{DEVICES} devices: ListAndWatch first message"),
        dist(&times),
        format!("{:.0} KiB per message; start → full list at the kubelet {}", size as f64 / 1024.0, ms(ready)),
    );
    let ids: Vec<String> = (0..DEVICES).step_by(97).map(|d| format!("d-{d}")).collect();
    let mut samples = Vec::new();
    for i in 0..1_000 {
        let t = Instant::now();
        client.allocate(allocate_request(&ids[i % ids.len()])).await?;
        samples.push(t.elapsed());
    }
    table.row(
        format!("{DEVICES} devices: Allocate, sequential"),
        dist(&samples),
        format!("RSS {:.1} MiB", rss_kib(pid)? as f64 / 1024.0),
    );
    drop(node);

    let mut node = Node::new()?;
    node.backend("many", &static_file(50, 2, ""))?;
    let names: Vec<String> = (0..50).map(|r| format!("bench.example.com/r{r}")).collect();
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let started = Instant::now();
    let pid = node.start()?;
    all_registered(&kubelet, &names, 1).await?;
    let registered = started.elapsed();
    let mut clients = Vec::new();
    for name in &names {
        clients.push(kubelet.client(name).await?);
    }
    let mut samples = Vec::new();
    for i in 0..2_000 {
        let t = Instant::now();
        let n = clients.len();
        clients[i % n].allocate(allocate_request(&format!("d-{}", i % 2))).await?;
        samples.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    table.row(
        "50 resources in one process: Allocate, sequential, round-robin",
        dist(&samples),
        format!("start → all 50 registered {}; RSS {:.1} MiB", ms(registered), rss_kib(pid)? as f64 / 1024.0),
    );
    Ok(())
}

// ---------------------------------------------------------------- isolation

/// Calls per mode before measuring.
const WARM_UP: usize = 500;
/// Backend starts measured per mode.
const STARTS: usize = 20;
/// The order the three [`Mode`]s run in, round by round: every order once,
/// so that drift on a shared machine, and going first or last, hit each
/// mode alike.
const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2]];
/// Rounds of [`SEQUENTIAL`] calls per mode, one per order.
const ISOLATION_ROUNDS: usize = ORDERS.len();

/// How the Rust example module runs, compared in the isolation rows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// In a worker process in its sandbox: the default.
    Sandboxed = 0,
    /// In a worker process without its sandbox (`unsandboxed = "always"`):
    /// a worker as before sandboxes existed.
    Unsandboxed = 1,
    /// In devhost's own process (`isolation = "none"`).
    InProcess = 2,
}

impl Mode {
    /// Indexed by the discriminant, as [`ORDERS`] is.
    const ALL: [Mode; 3] = [Mode::Sandboxed, Mode::Unsandboxed, Mode::InProcess];

    /// Its name in backend names, resources and directories.
    fn name(self) -> &'static str {
        match self {
            Mode::Sandboxed => "sandboxed",
            Mode::Unsandboxed => "unsandboxed",
            Mode::InProcess => "in-process",
        }
    }

    /// The `[backend]` keys that choose it.
    fn keys(self) -> &'static str {
        match self {
            Mode::Sandboxed => "isolation = \"process\"\n",
            Mode::Unsandboxed => "isolation = \"process\"\nunsandboxed = \"always\"\n",
            Mode::InProcess => "isolation = \"none\"\n",
        }
    }

    /// Its words in the table.
    fn label(self) -> &'static str {
        match self {
            Mode::Sandboxed => "sandboxed worker",
            Mode::Unsandboxed => "unsandboxed worker (unsandboxed = \"always\")",
            Mode::InProcess => "in-process (isolation = \"none\")",
        }
    }
}

/// The `q` quantile of `samples` (nearest rank).
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A figure in µs, in ms from a millisecond up (backend starts).
fn fine(us: f64) -> String {
    if us.abs() < 1000.0 { format!("{us:.1} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

/// [`fine`], signed: a difference.
fn delta(us: f64) -> String {
    if us.abs() < 1000.0 { format!("{us:+.1} µs") } else { format!("{:+.2} ms", us / 1000.0) }
}

/// `p50 A vs B (+Δ), p99 …` for samples of two modes, `a` the more isolated.
fn versus(a: &[Duration], b: &[Duration]) -> String {
    let (a50, b50, a99, b99) =
        (us(quantile(a, 0.5)), us(quantile(b, 0.5)), us(quantile(a, 0.99)), us(quantile(b, 0.99)));
    format!(
        "p50 {} vs {} (**{}**); p99 {} vs {} ({})",
        fine(a50),
        fine(b50),
        delta(a50 - b50),
        fine(a99),
        fine(b99),
        delta(a99 - b99)
    )
}

/// The Rust example, run as `mode`, with a given resource name.
fn isolated_file(module: &Path, resource: &str, mode: Mode) -> String {
    format!(
        "[backend]\nmodule = {:?}\n{}[config]\nresource = {resource:?}\ndevices = 2\nflip_interval_ms = 3600000\n",
        module.display().to_string(),
        mode.keys()
    )
}

/// A copy of the Rust example module in its own directory `dir`.
fn module_copy(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    native_module(dir)
}

async fn sequential_allocates(
    client: &mut DevicePluginClient<Channel>,
    ids: &[String],
    calls: usize,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        client.allocate(allocate_request(&ids[i % ids.len()])).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// A process's memory in KiB: resident (all), resident anonymous (its own
/// heap and stacks), resident file-backed (mostly the binary and libraries,
/// shared with every other process that maps them); from `smaps_rollup`
/// when readable, its proportional share (`Pss`: shared pages divided among
/// their users) and its unique set (`Private_*`: what ending it frees).
struct Memory {
    rss: u64,
    anon: u64,
    file: u64,
    pss: Option<u64>,
    uss: Option<u64>,
}

/// The value after `name` (`"VmRSS:"`) on its line of a `/proc` file.
fn proc_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    Some(text.lines().find(|l| l.starts_with(name))?[name.len()..].trim())
}

impl Memory {
    fn of(pid: u32) -> Result<Self> {
        let kib =
            |text: &str, name: &str| -> Option<u64> { proc_field(text, name)?.split_whitespace().next()?.parse().ok() };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let status_field = |name: &str| kib(&status, name).with_context(|| format!("{name} of process {pid}"));
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Ok(Memory {
            rss: status_field("VmRSS:")?,
            anon: status_field("RssAnon:")?,
            file: status_field("RssFile:")?,
            pss: kib(&rollup, "Pss:"),
            uss: kib(&rollup, "Private_Clean:").zip(kib(&rollup, "Private_Dirty:")).map(|(c, d)| c + d),
        })
    }

    /// The sum of several processes' memory: meaningful for PSS and USS,
    /// which count a shared page once among its users; RSS counts it in each.
    fn together(parts: &[Memory]) -> Memory {
        let sum = |f: fn(&Memory) -> Option<u64>| parts.iter().map(f).sum::<Option<u64>>();
        Memory {
            rss: parts.iter().map(|m| m.rss).sum(),
            anon: parts.iter().map(|m| m.anon).sum(),
            file: parts.iter().map(|m| m.file).sum(),
            pss: sum(|m| m.pss),
            uss: sum(|m| m.uss),
        }
    }

    fn render(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let pss = self.pss.map(|pss| format!(", PSS {:.1} MiB", mib(pss))).unwrap_or_default();
        let uss = self.uss.map(|uss| format!(", private (USS) {:.1} MiB", mib(uss))).unwrap_or_default();
        format!(
            "RSS {:.1} MiB (anonymous {:.1} MiB, file-backed {:.1} MiB){pss}{uss}",
            mib(self.rss),
            mib(self.anon),
            mib(self.file)
        )
    }
}

/// What the kernel says of a worker's confinement (`/proc/<pid>/status`),
/// so that a row labelled sandboxed is known to be, and one labelled
/// unsandboxed known not to be: an error if `mode` does not match.
fn confinement(pid: u32, mode: Mode) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    // One space between values (NSpid's are tab-separated).
    let field = |name: &str| {
        proc_field(&status, name).map_or("?".to_owned(), |v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let (nspid, no_new_privs, seccomp, caps) =
        (field("NSpid:"), field("NoNewPrivs:"), field("Seccomp:"), field("CapEff:"));
    // A PID namespace of its own shows as two IDs, the inner one 1.
    let namespaced = nspid.split_whitespace().count() > 1;
    let confined = no_new_privs == "1" && seccomp == "2";
    let says = format!("NSpid {nspid}, NoNewPrivs {no_new_privs}, Seccomp {seccomp}, CapEff {caps}");
    match mode {
        Mode::Sandboxed if !(namespaced && confined) => bail!("the sandboxed worker {pid} is not sandboxed: {says}"),
        Mode::Unsandboxed if namespaced || seccomp != "0" => {
            bail!("the unsandboxed worker {pid} has part of a sandbox: {says}")
        }
        _ => Ok(says),
    }
}

/// The child processes of `pid`, with their command lines.
fn children(pid: u32) -> Result<Vec<(u32, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(child) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let parent = stat.rsplit_once(')').and_then(|(_, after)| after.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            found.push((child, String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_owned()));
        }
    }
    Ok(found)
}

/// The cost of process isolation and of the worker's sandbox, same module,
/// same code path, same devhost: the Rust example served three times by
/// one devhost, in a sandboxed worker, in an unsandboxed worker and
/// in-process, Allocate through the kubelet's client; the workers' memory;
/// and, in this process through the library, what starting a backend in
/// each costs and where an Allocate's time goes.
async fn isolation(table: &mut Table) -> Result<()> {
    let mut node = Node::new()?;
    let modules = node.dir.path().join("modules");
    let resources: Vec<String> = Mode::ALL.iter().map(|mode| format!("bench.example.com/{}", mode.name())).collect();
    for (mode, resource) in Mode::ALL.into_iter().zip(&resources) {
        let module = module_copy(&modules.join(mode.name()))?;
        node.backend(mode.name(), &isolated_file(&module, resource, mode))?;
    }
    let kubelet = FakeKubelet::start(&node.plugin_dir()).await?;
    let started = Instant::now();
    let pid = node.start()?;
    all_registered(&kubelet, &resources, 1).await?;
    let registered = started.elapsed();
    let ids: Vec<String> = vec!["rust-0".into(), "rust-1".into()];
    let mut clients = Vec::new();
    for resource in &resources {
        kubelet.wait_for_devices(resource, WAIT, |d| d.len() == ids.len()).await?;
        clients.push(kubelet.client(resource).await?);
    }
    let (warm_up, calls) = (scaled(WARM_UP), scaled(SEQUENTIAL));
    for client in &mut clients {
        sequential_allocates(client, &ids, warm_up).await?;
    }
    // This run's floor, answering what the module answers.
    let answer = clients[Mode::InProcess as usize].allocate(allocate_request(&ids[0])).await?.into_inner();
    let floor = FloorRun::measure(&answer).await?;
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let mut round_p50s = Vec::new();
    for order in ORDERS {
        let mut p50s = [Duration::ZERO; 3];
        for k in order {
            let round = sequential_allocates(&mut clients[k], &ids, calls).await?;
            p50s[k] = quantile(&round, 0.5);
            samples[k].extend(round);
        }
        round_p50s.push(p50s);
    }
    let (s, u, i) = (Mode::Sandboxed as usize, Mode::Unsandboxed as usize, Mode::InProcess as usize);
    for (a, b, what) in [
        (s, i, "sandboxed worker vs in-process"),
        (s, u, "sandboxed vs unsandboxed worker"),
        (u, i, "unsandboxed worker vs in-process"),
    ] {
        let per_round: Vec<String> = round_p50s.iter().map(|p| format!("{:+.1}", us(p[a]) - us(p[b]))).collect();
        table.row(
            format!("isolation: Allocate through the kubelet client, {what}"),
            versus(&samples[a], &samples[b]),
            format!(
                "same Rust example module (three copies), one devhost; {ISOLATION_ROUNDS} rounds (each order of the three modes once) × {calls} sequential calls each after {warm_up} warm-up; p50 Δ per round: {} µs",
                per_round.join(" / ")
            ),
        );
    }
    for mode in Mode::ALL {
        let taken = &samples[mode as usize];
        // callgrind cannot run a sandboxed worker (its seccomp filter):
        // the unsandboxed worker's count stands for it, the sandbox being
        // kernel work that callgrind would not count anyway.
        let counted = match mode {
            Mode::Sandboxed | Mode::Unsandboxed => table.instructions_note("native"),
            Mode::InProcess => table.instructions_note("in-process"),
        };
        let counted = match mode {
            Mode::Sandboxed if !counted.is_empty() => format!("{counted}, counted unsandboxed"),
            _ => counted,
        };
        table.row(
            format!("isolation: Allocate, {}", mode.label()),
            dist(taken),
            format!("{} calls; {}{counted}", taken.len(), floor.beside(taken)),
        );
    }

    // devhost's children: the unsandboxed worker, and the sandboxed
    // worker's PID 1, the init of its namespace, whose one child is the
    // worker proper (`sys::split_off_namespace_init`).
    let workers: Vec<(u32, String)> =
        children(pid)?.into_iter().filter(|(_, cmdline)| cmdline.contains(" __worker ")).collect();
    if workers.len() != 2 {
        bail!("expected two worker processes of devhost {pid}, found {workers:?}");
    }
    let worker_of =
        |mode: Mode| {
            let suffix = format!(" __worker {}", mode.name());
            workers.iter().find(|(_, cmdline)| cmdline.ends_with(&suffix)).cloned().with_context(|| {
                format!("no worker of backend {} among devhost {pid}'s children {workers:?}", mode.name())
            })
        };
    let (init, cmdline) = worker_of(Mode::Sandboxed)?;
    let [(proper, _)] = children(init)?.try_into().map_err(|found: Vec<(u32, String)>| {
        anyhow::anyhow!("expected one worker proper under the sandboxed worker's init {init}, found {found:?}")
    })?;
    let (proper_memory, init_memory) = (Memory::of(proper)?, Memory::of(init)?);
    table.row(
        format!("isolation: memory of one {} (Rust example), the worker proper", Mode::Sandboxed.label()),
        proper_memory.render(),
        format!(
            "`{cmdline}` (PID 2 of its namespace), after the Allocate runs; {}; file-backed pages are the devhost binary, shared",
            confinement(proper, Mode::Sandboxed)?
        ),
    );
    table.row(
        "isolation: memory of the sandboxed worker's namespace init",
        init_memory.render(),
        format!(
            "PID 1 of the worker's namespace, only reaping (forked before the module loaded: its pages are shared copy-on-write with the worker proper); {}",
            confinement(init, Mode::Sandboxed)?
        ),
    );
    table.row(
        format!("isolation: memory of one {} (Rust example), both processes", Mode::Sandboxed.label()),
        Memory::together(&[proper_memory, init_memory]).render(),
        "sums: PSS and private (USS) add up; RSS counts the pages they share twice",
    );
    let (worker, cmdline) = worker_of(Mode::Unsandboxed)?;
    table.row(
        format!("isolation: memory of one {} (Rust example)", Mode::Unsandboxed.label()),
        Memory::of(worker)?.render(),
        format!(
            "`{cmdline}`, one process, after the Allocate runs; {}; file-backed pages are the devhost binary, shared",
            confinement(worker, Mode::Unsandboxed)?
        ),
    );
    table.row(
        "isolation: memory of devhost itself (3 backends, one in-process)",
        Memory::of(pid)?.render(),
        format!("start → all three resources registered {}", ms(registered)),
    );
    drop(node);
    isolation_in_library(table).await
}

/// Starts and stops of one mode's backend in [`isolation_in_library`].
#[derive(Default)]
struct Starts {
    /// `loader::load`: for a worker, spawn, sandbox and load in it.
    loads: Vec<Duration>,
    /// `BackendHandle::start`: the module's `init`.
    inits: Vec<Duration>,
    shutdowns: Vec<Duration>,
    /// A worker's sandbox, as devhost describes it.
    sandbox: Option<String>,
}

/// Through the library in this process: backend start (spawn + sandbox +
/// load + init) in a sandboxed worker, an unsandboxed one and in-process,
/// the handle's own Allocate (no gRPC) in each, and the floor of a round
/// trip over a socketpair.
async fn isolation_in_library(table: &mut Table) -> Result<()> {
    use devhost::backend::handle::Runner;
    // This binary is not devhost: workers are the devhost binary.
    devhost::worker::set_executable(devhost_bin()?);
    let dir = tempfile::Builder::new().prefix("devhost-bench-").tempdir()?;
    let mut configs = Vec::new();
    for mode in Mode::ALL {
        let module = module_copy(&dir.path().join(mode.name()))?;
        let file = dir.path().join(format!("{}.toml", mode.name()));
        let resource = format!("bench.example.com/lib-{}", mode.name());
        let config = devhost::config::parse_backend(&file, &isolated_file(&module, &resource, mode), WAIT)?;
        configs.push((resource, config));
    }
    let mut starts: [Starts; 3] = Default::default();
    let mut kept: [Option<(Arc<BackendHandle>, CancellationToken)>; 3] = Default::default();
    let count = scaled(STARTS);
    for round in 0..=count {
        // The modes take turns, start by start, in each order in turn.
        for k in ORDERS[round % ORDERS.len()] {
            let (_, config) = &configs[k];
            let stop = CancellationToken::new();
            let started = Instant::now();
            let runner = devhost::loader::load(config).await.map_err(anyhow::Error::msg)?;
            let loaded = started.elapsed();
            if let Runner::Worker(worker) = &runner {
                starts[k].sandbox = worker.sandbox();
            }
            let handle = BackendHandle::start(&config.name, runner, Duration::from_secs(5), stop.clone()).await?;
            let initialised = started.elapsed() - loaded;
            if round == count {
                // The last ones stay up for the Allocate figures below.
                kept[k] = Some((handle, stop));
                continue;
            }
            let t = Instant::now();
            handle.shutdown().await;
            starts[k].shutdowns.push(t.elapsed());
            stop.cancel();
            // The first round pays for cold caches: not counted.
            if round > 0 {
                starts[k].loads.push(loaded);
                starts[k].inits.push(initialised);
            }
        }
    }
    let totals: Vec<Vec<Duration>> =
        starts.iter().map(|s| s.loads.iter().zip(&s.inits).map(|(l, i)| *l + *i).collect()).collect();
    for mode in Mode::ALL {
        let (k, what) = (mode as usize, mode.label());
        let load_what = match mode {
            Mode::Sandboxed => {
                "cgroup + spawn (exec) in a new PID namespace + join cgroup + confine (no_new_privs, capabilities, seccomp) + dlopen + checks in the worker (`loader::load`)"
            }
            Mode::Unsandboxed => "spawn (exec) + dlopen + checks in the worker (`loader::load`)",
            Mode::InProcess => "dlopen + checks",
        };
        let sandbox = starts[k].sandbox.as_ref().map(|s| format!("; sandbox: {s}")).unwrap_or_default();
        table.row(
            format!("isolation: backend start {what}, load + init"),
            dist(&totals[k]),
            format!("{} starts, taking turns with the other modes{sandbox}", totals[k].len()),
        );
        table.row(format!("isolation: backend start {what}, load part"), dist(&starts[k].loads), load_what);
        table.row(
            format!("isolation: backend start {what}, init part"),
            dist(&starts[k].inits),
            "`BackendHandle::start`",
        );
        table.row(
            format!("isolation: backend shutdown {what}"),
            dist(&starts[k].shutdowns),
            "`BackendHandle::shutdown`",
        );
    }
    let (s, u, i) = (Mode::Sandboxed as usize, Mode::Unsandboxed as usize, Mode::InProcess as usize);
    table.row(
        "isolation: backend start (load + init), sandboxed vs unsandboxed worker",
        versus(&totals[s], &totals[u]),
        "the sandbox's cost at start: the worker's cgroup, PID namespace and confinement",
    );
    table.row(
        "isolation: backend shutdown, sandboxed vs unsandboxed worker",
        versus(&starts[s].shutdowns, &starts[u].shutdowns),
        "a sandboxed worker's cgroup is emptied and removed as it ends",
    );
    // The handle's Allocate, no gRPC: the worker's protocol round trip vs
    // the in-process call on the blocking pool.
    let handles: Vec<(&str, &BackendHandle)> = configs
        .iter()
        .zip(&kept)
        .map(|((resource, _), kept)| Ok((resource.as_str(), &*kept.as_ref().context("a backend kept up")?.0)))
        .collect::<Result<_>>()?;
    let calls = scaled(SEQUENTIAL);
    let mut samples: [Vec<Duration>; 3] = Default::default();
    // The first round, in the first order, warms up.
    for (round, order) in std::iter::once(ORDERS[0]).chain(ORDERS).enumerate() {
        for k in order {
            let (resource, handle) = handles[k];
            for n in 0..if round == 0 { scaled(WARM_UP) } else { calls } {
                let started = Instant::now();
                handle.allocate(resource, vec![format!("rust-{}", n % 2)]).await?;
                if round > 0 {
                    samples[k].push(started.elapsed());
                }
            }
        }
    }
    for (a, b, what) in [(s, i, "sandboxed worker vs in-process"), (s, u, "sandboxed vs unsandboxed worker")] {
        table.row(
            format!("isolation: `BackendHandle::allocate` in this process (no gRPC), {what}"),
            versus(&samples[a], &samples[b]),
            format!("{ISOLATION_ROUNDS} rounds (each order of the three modes once) × {calls} calls; same module"),
        );
    }
    for (handle, stop) in kept.into_iter().flatten() {
        handle.shutdown().await;
        stop.cancel();
    }
    // Where a worker call's time goes: the floors of its hops. A worker
    // call wakes the worker's reading thread, which hands the request to a
    // pool thread, whose answer wakes devhost's reactor; in-process, a call
    // wakes a blocking-pool thread whose result wakes the caller.
    table.row(
        "isolation floor: one round trip over a socketpair between two threads, blocking reads",
        dist(&socketpair_round_trips(calls, Echo::Blocking)?),
        format!("{calls} round trips of a 200-byte frame: the caller and the echo thread each sleep and are woken"),
    );
    table.row(
        "isolation floor: the same, the reading thread handing each frame to a second thread (Condvar)",
        dist(&socketpair_round_trips(calls, Echo::HandOff)?),
        "the worker's structure (reader → pool thread → answer): one more wake-up per round trip",
    );
    table.row(
        "isolation floor: the same hand-off, devhost's side async (tokio socket, reader task, oneshot)",
        dist(&async_round_trips(calls).await?),
        "a worker call's round trip without protobuf, the module or the handle",
    );
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus >= 2 {
        table.row(
            "isolation floor: the same as the first, busy-polling reads",
            dist(&socketpair_round_trips(calls, Echo::Spin)?),
            "no thread sleeps: the system calls and copies alone; the difference to blocking is the cost of waking threads",
        );
    } else {
        table.row("isolation floor: busy-polling reads", "not measured", "this process may use only one CPU");
    }
    Ok(())
}

/// How the echo side of [`socketpair_round_trips`] answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// Blocking reads and writes on one thread.
    Blocking,
    /// Blocking reads; each frame handed over a `Mutex` + `Condvar` to a
    /// second thread, which writes it back.
    HandOff,
    /// Both sides poll non-blocking sockets instead of sleeping.
    Spin,
}

type Frame = [u8; 200];

/// Reads one frame; `false` at the end of the stream. Spins on a
/// non-blocking socket.
fn read_frame(stream: &mut std::os::unix::net::UnixStream, frame: &mut Frame) -> std::io::Result<bool> {
    use std::io::Read;
    let mut filled = 0;
    while filled < frame.len() {
        match stream.read(&mut frame[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

/// Starts the echo side on `theirs`; its threads end when the other end
/// closes.
fn spawn_echo(
    mut theirs: std::os::unix::net::UnixStream,
    echo: Echo,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    use std::io::Write;
    use std::sync::Condvar;
    theirs.set_nonblocking(echo == Echo::Spin)?;
    // For `HandOff`: the frame in hand (`Some(None)` at the end).
    let handed = Arc::new((Mutex::new(Option::<Option<Frame>>::None), Condvar::new()));
    let mut threads = Vec::new();
    if echo == Echo::HandOff {
        let (handed, mut stream) = (handed.clone(), theirs.try_clone()?);
        threads.push(std::thread::spawn(move || -> Result<()> {
            let (slot, ready) = &*handed;
            loop {
                let mut guard = slot.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                while guard.is_none() {
                    guard = ready.wait(guard).map_err(|_| anyhow::anyhow!("poisoned"))?;
                }
                let Some(frame) = guard.take().flatten() else { return Ok(()) };
                drop(guard);
                stream.write_all(&frame)?;
            }
        }));
    }
    threads.push(std::thread::spawn(move || -> Result<()> {
        let mut frame = [0u8; 200];
        let (slot, ready) = &*handed;
        let hand = |frame: Option<Frame>| -> Result<()> {
            *slot.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(frame);
            ready.notify_one();
            Ok(())
        };
        while read_frame(&mut theirs, &mut frame)? {
            if echo == Echo::HandOff {
                hand(Some(frame))?;
            } else {
                theirs.write_all(&frame)?;
            }
        }
        if echo == Echo::HandOff {
            hand(None)?;
        }
        Ok(())
    }));
    Ok(threads)
}

fn join_echo(threads: Vec<std::thread::JoinHandle<Result<()>>>) -> Result<()> {
    for thread in threads {
        thread.join().map_err(|_| anyhow::anyhow!("an echo thread panicked"))??;
    }
    Ok(())
}

/// Round trips of a 200-byte frame over a Unix socketpair to an echo.
fn socketpair_round_trips(count: usize, echo: Echo) -> Result<Vec<Duration>> {
    use std::io::Write;
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(echo == Echo::Spin)?;
    let threads = spawn_echo(theirs, echo)?;
    let mut frame = [7u8; 200];
    let mut samples = Vec::with_capacity(count);
    for i in 0..WARM_UP + count {
        let started = Instant::now();
        ours.write_all(&frame)?;
        if !read_frame(&mut ours, &mut frame)? {
            bail!("the echo closed its end");
        }
        if i >= WARM_UP {
            samples.push(started.elapsed());
        }
    }
    drop(ours);
    join_echo(threads).map(|()| samples)
}

/// The same round trip as devhost's side of a worker call makes it: the
/// frame written on an async socket, the answer read by a reader task and
/// handed to the caller through a oneshot; the echo hands each frame to a
/// second thread, as the worker does. No protobuf, no module.
async fn async_round_trips(count: usize) -> Result<Vec<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    type Waiter = Arc<Mutex<Option<tokio::sync::oneshot::Sender<Frame>>>>;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let threads = spawn_echo(theirs, Echo::HandOff)?;
    ours.set_nonblocking(true)?;
    let (mut reader, mut writer) = tokio::net::UnixStream::from_std(ours)?.into_split();
    let waiter: Waiter = Arc::default();
    let read_loop = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let mut frame = [0u8; 200];
            while reader.read_exact(&mut frame).await.is_ok() {
                if let Some(sender) = waiter.lock().ok().and_then(|mut w| w.take()) {
                    let _ = sender.send(frame);
                }
            }
        })
    };
    let frame = [7u8; 200];
    let mut samples = Vec::with_capacity(count);
    for i in 0..WARM_UP + count {
        let started = Instant::now();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        *waiter.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(sender);
        writer.write_all(&frame).await?;
        receiver.await?;
        if i >= WARM_UP {
            samples.push(started.elapsed());
        }
    }
    drop(writer);
    read_loop.await?;
    join_echo(threads)?;
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::cpu_between;

    #[test]
    fn cpu_between_samples_counts_growth_and_new_threads_and_never_subtracts_an_ended_one() {
        let sample = |pairs: &[(&str, u64)]| pairs.iter().map(|(tid, ns)| ((*tid).to_owned(), *ns)).collect();
        let before = sample(&[("1", 1_000), ("2", 50_000), ("3", 7)]);
        // Thread 2 (a blocking thread tokio let go) ended; 4 is new.
        let after = sample(&[("1", 1_500), ("3", 7), ("4", 300)]);
        assert_eq!(cpu_between(&before, &after), (500 + 300, 1));
    }
}
