//! Shared pieces of the end-to-end tests: a temporary node (plugin dir and
//! config dir) and the real `devhost` binary running as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why a test (or part of one) did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Hardware or a privilege this machine does not have (a device node,
    /// root, a NIC): an honest skip, listed in the summary.
    Machine,
    /// Something the project's own setup provides (a built component, a
    /// compiler): `scripts/test` fails the run if this happens.
    Setup,
}

/// Records a skip so that `scripts/test` can list it (the test harness
/// captures stderr, so a printed skip alone looks like a pass): one line
/// in `target/test-skips/`, named after the test.
pub fn skip(missing: Missing, reason: &str) {
    let test = std::thread::current().name().unwrap_or("unnamed").to_owned();
    let kind = match missing {
        Missing::Machine => "machine",
        Missing::Setup => "setup",
    };
    eprintln!("SKIP ({kind}): {test}: {reason}");
    let dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from).join("test-skips");
    if std::fs::create_dir_all(&dir).is_ok() {
        let file = dir.join(format!("{}.txt", test.replace("::", "__")));
        let line = format!("{kind}\t{test}\t{reason}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
}

/// Generous: CI machines are small and shared.
pub const WAIT: Duration = Duration::from_secs(30);

/// A temporary node: `plugin/` for sockets, `config/` with `backends.d/`.
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("devhost-e2e-").tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("config/backends.d")).expect("config dir");
        std::fs::create_dir_all(dir.path().join("plugin")).expect("plugin dir");
        Node { dir }
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugin")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("config/devhost.toml")
    }

    pub fn backends_dir(&self) -> PathBuf {
        self.dir.path().join("config/backends.d")
    }

    /// Writes `backends.d/<name>.toml` and returns its path.
    pub fn backend(&self, name: &str, text: &str) -> PathBuf {
        let path = self.backends_dir().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write backend file");
        path
    }

    /// Starts `devhost run` on this node.
    pub fn start_devhost(&self) -> Devhost {
        self.write_host_config();
        Devhost::start(&self.config_file(), &self.plugin_dir(), &self.dir.path().join("devhost.log"))
    }

    /// Starts a second `devhost run` on this node (the new pod of a rolling
    /// update), logging to `log` in the node's directory.
    pub fn start_another_devhost(&self, log: &str) -> Devhost {
        self.write_host_config();
        Devhost::start(&self.config_file(), &self.plugin_dir(), &self.dir.path().join(log))
    }

    /// Starts `devhost run` on this node with at most `limit` open
    /// descriptors (soft and hard, so devhost cannot raise it).
    pub fn start_devhost_with_descriptors(&self, limit: u64) -> Devhost {
        self.write_host_config();
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(devhost_binary());
        Devhost::spawn(command, &self.config_file(), &self.plugin_dir(), &self.dir.path().join("devhost.log"))
    }

    fn write_host_config(&self) {
        if !self.config_file().exists() {
            std::fs::write(self.config_file(), "call_timeout_ms = 2000\nmetrics_address = \"127.0.0.1:0\"\n")
                .expect("write host config");
        }
    }

    /// The socket files in the plugin directory, by name.
    pub fn sockets(&self) -> Vec<String> {
        use std::os::unix::fs::FileTypeExt;
        let mut names: Vec<String> = std::fs::read_dir(self.plugin_dir())
            .expect("read plugin dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// The `devhost` binary the tests run: this build's, or the one
/// `DEVHOST_E2E_BIN` names (to show that a test fails on an older build).
pub fn devhost_binary() -> PathBuf {
    std::env::var_os("DEVHOST_E2E_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_devhost")), PathBuf::from)
}

/// A static backend with one resource and the given devices (`id` or
/// `id@numa`), each device healthy while `<state>/<id>.ok` exists when a
/// state dir is given.
pub fn static_backend(resources: &[(&str, &[&str])], state: Option<&Path>) -> String {
    let mut text = String::from("[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 20\n");
    for (name, devices) in resources {
        text += &format!(
            "[[config.resource]]\nname = \"{name}\"\npreferred_allocation = true\npre_start = true\nenv = {{ IDS = \"{{ids}}\" }}\n"
        );
        for device in *devices {
            let (id, numa) = device.split_once('@').map_or((*device, None), |(id, n)| (id, Some(n)));
            text += &format!("[[config.resource.device]]\nid = \"{id}\"\n");
            if let Some(numa) = numa {
                text += &format!("numa = [{numa}]\n");
            }
            if let Some(state) = state {
                text += &format!("health_path = {:?}\n", state.join(format!("{id}.ok")));
            }
            text += &format!(
                "device_spec = [{{ host_path = \"/dev/null\", container_path = \"/dev/{id}\", permissions = \"rw\" }}]\n"
            );
        }
    }
    text
}

/// The real `devhost` binary as a child process; killed on drop.
pub struct Devhost {
    child: Option<Child>,
    log: PathBuf,
}

impl Devhost {
    pub fn start(config: &Path, plugin_dir: &Path, log: &Path) -> Self {
        Self::spawn(Command::new(devhost_binary()), config, plugin_dir, log)
    }

    /// Runs `devhost run` through `command` (devhost itself, or a program
    /// that execs it with the arguments that follow).
    fn spawn(mut command: Command, config: &Path, plugin_dir: &Path, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("log file");
        let child = command
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--plugin-dir")
            .arg(plugin_dir)
            .env("RUST_LOG", "devhost=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn devhost");
        Devhost { child: Some(child), log: log.to_owned() }
    }

    /// Everything devhost logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "devhost never logged {needle:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGHUP and waits until devhost has reconciled `backends.d`
    /// for it (alone or with other causes that queued up meanwhile).
    pub async fn reload(&self) {
        let reconciled = |log: &str| {
            log.lines().filter(|l| l.contains("backends reconciled cause=") && l.contains("SIGHUP")).count()
        };
        let before = reconciled(&self.log());
        self.signal(Signal::SIGHUP);
        let deadline = Instant::now() + WAIT;
        while reconciled(&self.log()) == before {
            assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of the metrics endpoint, from the log.
    pub async fn metrics_address(&self) -> String {
        let marker = "serving /metrics, /healthz and /readyz address=";
        self.wait_for_log(marker).await;
        let log = self.log();
        let start = log.find(marker).expect("marker") + marker.len();
        log[start..].split_whitespace().next().expect("an address").to_owned()
    }

    /// Waits until `/readyz` answers 200: every backend file has been tried
    /// and every resource of every started backend is registered. A
    /// resource that should not exist would have registered by then.
    pub async fn wait_until_ready(&self) {
        let address = self.metrics_address().await;
        let deadline = Instant::now() + WAIT;
        while http_get(&address, "/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "devhost never became ready; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal devhost");
    }

    /// devhost's process ID.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Sends `signal` and waits for the exit.
    pub async fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        kill(self.pid(), signal).expect("signal devhost");
        let mut child = self.child.take().expect("running");
        let status = wait_for_exit(&mut child).await;
        status.unwrap_or_else(|| panic!("devhost did not exit after {signal}; log:\n{}", self.log()))
    }
}

/// Waits up to [`WAIT`] for `child` to exit, without blocking the test's
/// runtime: a blocking `wait` would freeze the fake kubelet in this process,
/// which then never answers the HTTP/2 ping of devhost's graceful shutdown
/// (devhost would wait out its whole grace period).
pub async fn wait_for_exit(child: &mut std::process::Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A minimal HTTP/1.0 GET, enough for the metrics endpoint: status and body.
pub async fn http_get(address: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect to the metrics endpoint");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

impl Drop for Devhost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Proves that a ListAndWatch stream stayed quiet, without a fixed window
/// a loaded machine could miss: makes `id` Unhealthy (removes
/// `<state>/<id>.ok`, so its static backend needs a state dir) and requires
/// the very next message to be the one showing that change. Anything sent
/// before it (a re-sent list, a restart's list) would arrive first.
pub async fn assert_quiet_until_health_change(
    stream: &mut tonic::Streaming<devhost::proto::v1beta1::ListAndWatchResponse>,
    state: &Path,
    id: &str,
) {
    use tokio_stream::StreamExt;
    std::fs::remove_file(state.join(format!("{id}.ok"))).expect("make the device unhealthy");
    let next = tokio::time::timeout(WAIT, stream.next()).await;
    let Ok(Some(Ok(list))) = next else { panic!("the stream ended or stayed silent: {next:?}") };
    let health: Vec<(&str, &str)> = list.devices.iter().map(|d| (d.id.as_str(), d.health.as_str())).collect();
    assert!(
        health.iter().any(|&(d, h)| d == id && h == "Unhealthy")
            && health.iter().filter(|&&(d, _)| d != id).all(|&(_, h)| h == "Healthy"),
        "the next message must be the health change alone, but it was {health:?}"
    );
}

/// A state dir for [`static_backend`] with every one of `ids` Healthy.
pub fn healthy_state(dir: &Path, ids: &[&str]) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    for id in ids {
        std::fs::write(state.join(format!("{id}.ok")), "").expect("health file");
    }
    state
}
