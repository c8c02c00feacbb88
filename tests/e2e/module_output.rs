//! Module output is data, not devhost's log (issue 27), through the real
//! `devhost` binary with the JSON log format: a native module in its worker
//! that writes to stdout and stderr for ever, as fast as it can, with lines
//! forged in devhost's own JSON format, and calls the host's `log` callback
//! in a tight loop (`tests/fixtures/native/noisy_output.c`), next to a
//! static backend. For 5 s of that:
//!
//! * devhost's log grows by less than 2 MB (without the limits: hundreds of
//!   MB);
//! * every line of the log is a devhost record; no line starts with the
//!   forged text, which appears only as the `output` field of `backend
//!   output` records (and as the message of the module's limited `log`
//!   lines);
//! * `devhost_backend_output_dropped_total` and
//!   `devhost_backend_log_dropped_total` count what was dropped;
//! * the static neighbour answers every Allocate meanwhile, and devhost's
//!   CPU stays bounded (printed: run with `--nocapture`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devhost::fake_kubelet::FakeKubelet;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::{Node, WAIT, http_get, repo, static_backend};
use crate::native_loader::compile_c;

/// The static neighbour.
const STATIC: &str = "example.com/good";
/// The noisy module's backend (its file's stem) and resource.
const NOISY: &str = "noisy-output";
const NOISY_RESOURCE: &str = "fixture.example.com/noisy-output";
/// What the fixture forges: a line of devhost's JSON log.
const FORGED: &str = concat!(
    r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"#,
    r#""worker started; module loaded","backend":"c","sha256":"0000"}}"#
);
/// How long the module floods while devhost is watched.
const WINDOW: Duration = Duration::from_secs(5);
/// devhost's log may grow by less than this in the window: 200 lines of
/// burst plus 20 a second, for each limit, is a few hundred kB.
const LOG_GROWTH_BOUND: u64 = 2_000_000;
/// devhost's CPU over the window, in % of one core: generous, for a loaded
/// 2-core machine (the module itself spins two threads).
const CPU_BOUND: f64 = 150.0;
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 a second on
/// every Linux ABI devhost runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_output_and_log_flood_stay_data_and_bounded() {
    let node = Node::new();
    let modules = node.dir.path().join("modules");
    std::fs::create_dir_all(&modules).expect("modules dir");
    let module = compile_c(&repo().join("tests/fixtures/native/noisy_output.c"), &modules);
    std::fs::write(
        node.config_file(),
        "call_timeout_ms = 2000\nmetrics_address = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n",
    )
    .expect("write host config");
    node.backend("static", &static_backend(&[(STATIC, &["g-0", "g-1"])], None));
    node.backend(NOISY, &format!("[backend]\nmodule = {:?}\n", module.display().to_string()));
    let kubelet = Arc::new(FakeKubelet::start(&node.plugin_dir()).await.expect("kubelet"));
    let mut devhost = node.start_devhost();
    let log_path = node.dir.path().join("devhost.log");
    let pid = devhost.pid().as_raw();
    for resource in [STATIC, NOISY_RESOURCE] {
        kubelet.wait_for_registrations(resource, 1, WAIT).await.unwrap_or_else(|e| {
            panic!("{resource} does not register: {e}\nlog tail:\n{}", tail(&log_path));
        });
    }
    let address = metrics_address(&log_path).await;

    // The module floods from its init on; watch devhost for WINDOW.
    let (size_before, cpu_before, started) = (log_size(&log_path), cpu_ticks(pid), Instant::now());
    let (mut answered, mut failures, mut slowest) = (0_usize, Vec::new(), Duration::ZERO);
    while started.elapsed() < WINDOW {
        let asked = Instant::now();
        match kubelet.allocate(STATIC, &["g-0"]).await {
            Ok(_) => answered += 1,
            Err(error) => failures.push(error.to_string()),
        }
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (size_after, cpu_after, elapsed) = (log_size(&log_path), cpu_ticks(pid), started.elapsed());
    let growth = size_after - size_before;
    let cpu = (cpu_after - cpu_before) as f64 / TICKS_PER_SECOND / elapsed.as_secs_f64() * 100.0;
    let noisy = kubelet.allocate(NOISY_RESOURCE, &["no-0"]).await;
    let metrics = http_get(&address, "/metrics").await.1;
    let output_dropped = counter(&metrics, "devhost_backend_output_dropped_total", NOISY);
    let log_dropped = counter(&metrics, "devhost_backend_log_dropped_total", NOISY);
    eprintln!(
        "module output flood, {:.1} s: devhost's log grew {growth} bytes ({size_after} in all); devhost CPU {cpu:.0} % \
         of one core; output lines dropped {output_dropped:?}, log lines dropped {log_dropped:?}; the neighbour \
         answered {answered} Allocates (slowest {} ms), {} failed",
        elapsed.as_secs_f64(),
        slowest.as_millis(),
        failures.len()
    );

    assert!(
        growth < LOG_GROWTH_BOUND,
        "devhost's log grew {growth} bytes in {elapsed:?} (bound {LOG_GROWTH_BOUND}); log tail:\n{}",
        tail(&log_path)
    );
    // Every line is one of devhost's records: the forged text never starts
    // a line, and what the module wrote appears only inside a record.
    let log = std::fs::read_to_string(&log_path).expect("devhost's log");
    let (mut as_output, mut as_message, mut summaries) = (0, 0, 0);
    for (number, line) in log.lines().enumerate() {
        assert!(!line.starts_with(FORGED), "line {} is the module's forgery: {line}", number + 1);
        let record: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {} is not JSON ({e}): {line}", number + 1));
        assert!(
            record.get("timestamp").is_some() && record.get("target").is_some() && record.get("fields").is_some(),
            "line {} is not a devhost record: {line}",
            number + 1
        );
        let fields = &record["fields"];
        if fields["message"] == "backend output" && fields["output"] == FORGED {
            assert_eq!(fields["backend"], NOISY, "{line}");
            assert!(fields["stream"] == "stdout" || fields["stream"] == "stderr", "{line}");
            as_output += 1;
        } else if fields["message"] == FORGED {
            as_message += 1;
        } else if fields["message"].as_str().is_some_and(|m| m.starts_with("backend output dropped"))
            && fields["dropped"].as_u64().is_some_and(|n| n > 0)
        {
            summaries += 1;
        }
    }
    eprintln!(
        "module output flood: {as_output} forged lines logged as `output`, {as_message} as a `log` message, \
         {summaries} `backend output dropped` summaries"
    );
    assert!(as_output > 0, "the module's output was not logged as data at all; log tail:\n{}", tail(&log_path));
    assert!(as_message > 0, "the module's log lines were not logged at all; log tail:\n{}", tail(&log_path));
    assert!(summaries > 0, "no `backend output dropped` summary; log tail:\n{}", tail(&log_path));
    assert!(output_dropped.is_some_and(|n| n > 0.0), "output lines dropped: {output_dropped:?}\n{metrics}");
    assert!(log_dropped.is_some_and(|n| n > 0.0), "log lines dropped: {log_dropped:?}\n{metrics}");
    assert!(answered >= 10 && failures.is_empty(), "the neighbour answered {answered} Allocates; failed: {failures:?}");
    let noisy = noisy.unwrap_or_else(|e| panic!("the noisy module's own Allocate failed: {e}"));
    let envs = &noisy.container_responses[0].envs;
    assert_eq!(envs.get("NOISY_OUTPUT").map(String::as_str), Some("1"), "{envs:?}");
    assert!(cpu < CPU_BOUND, "devhost used {cpu:.0} % of one core while the module flooded (bound {CPU_BOUND} %)");

    let status = devhost.stop_with(Signal::SIGTERM).await;
    assert!(status.success(), "devhost exited with {status} after SIGTERM; log tail:\n{}", tail(&log_path));
}

fn log_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// User plus system CPU time of every thread of `pid`, in ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("devhost's /proc stat");
    // The command name is in parentheses and may hold spaces: split after it.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 2..].split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3).
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The value of `name{backend="<backend>"}` on /metrics.
fn counter(metrics: &str, name: &str, backend: &str) -> Option<f64> {
    let series = format!("{name}{{backend=\"{backend}\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
}

/// The metrics endpoint's address, from devhost's JSON log.
async fn metrics_address(log: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let address = text.lines().find_map(|line| {
            let record: Value = serde_json::from_str(line).ok()?;
            let fields = record.get("fields")?;
            (fields.get("message")? == "serving /metrics, /healthz and /readyz")
                .then(|| fields.get("address")?.as_str().map(str::to_owned))?
        });
        if let Some(address) = address {
            return address;
        }
        assert!(Instant::now() < deadline, "devhost never logged its metrics address; log tail:\n{}", tail(log));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last lines of the log (at most 8 kB of it), for failure messages.
fn tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else { return String::new() };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(size.saturating_sub(8192)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
