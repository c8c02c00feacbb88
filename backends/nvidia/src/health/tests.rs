//! The health state machine with synthetic time, and the monitor loop on a
//! real thread with a fake NVML and a recording sink.

use std::sync::Arc;
use std::sync::mpsc;

use super::*;
use crate::fakes::{Fake, Lists, Recorder, gpu, wait_until};

fn tracker(quiet_ms: u64) -> HealthTracker {
    HealthTracker::new(["GPU-a".to_owned(), "GPU-b".to_owned()], XidPolicy::default(), Duration::from_millis(quiet_ms))
}

#[test]
fn critical_xid_then_quiet_probe_returns_the_gpu_to_healthy() {
    let mut t = tracker(1000);
    let t0 = Instant::now();
    let down = t.on_xid("GPU-a", Some(48), t0).expect("a transition");
    assert_eq!(
        down,
        Transition { uuid: "GPU-a".into(), health: Health::Unhealthy, reason: "XID 48 (double-bit ECC error)".into() }
    );
    assert_eq!((t.health("GPU-a"), t.health("GPU-b")), (Health::Unhealthy, Health::Healthy));
    // Usable, but too soon after the XID.
    assert_eq!(t.on_probe("GPU-a", Ok(()), t0 + Duration::from_millis(500)), None);
    // A second XID while Unhealthy restarts the quiet period.
    assert_eq!(t.on_xid("GPU-a", Some(79), t0 + Duration::from_millis(600)), None);
    assert_eq!(t.on_probe("GPU-a", Ok(()), t0 + Duration::from_millis(1200)), None);
    // Still broken after the quiet period: stays Unhealthy.
    assert_eq!(t.on_probe("GPU-a", Err("GPU is lost".into()), t0 + Duration::from_millis(1700)), None);
    let up = t.on_probe("GPU-a", Ok(()), t0 + Duration::from_millis(1700)).expect("recovered");
    assert_eq!(up.health, Health::Healthy);
    assert_eq!(up.reason, "NVML reports it usable again (it was Unhealthy: NVML probe failed: GPU is lost)");
    assert_eq!(t.health("GPU-a"), Health::Healthy);
}

#[test]
fn ignored_xids_and_unknown_gpus_change_nothing() {
    let mut t = tracker(0);
    let now = Instant::now();
    assert_eq!(t.on_xid("GPU-a", Some(13), now), None);
    assert_eq!(t.on_xid("GPU-zzz", Some(79), now), None);
    assert_eq!(t.health("GPU-a"), Health::Healthy);
    assert_eq!(t.health("GPU-zzz"), Health::Unhealthy, "unknown GPUs are never Healthy");
    let down = t.on_xid("GPU-b", None, now).expect("an unidentified XID is critical");
    assert_eq!(down.reason, "an XID NVML could not identify");
}

#[test]
fn a_failed_probe_takes_a_healthy_gpu_out() {
    let mut t = tracker(0);
    let now = Instant::now();
    assert_eq!(t.on_probe("GPU-b", Ok(()), now), None);
    let down = t.on_probe("GPU-b", Err("GPU is lost".into()), now).expect("a transition");
    assert_eq!((down.health, down.reason.as_str()), (Health::Unhealthy, "NVML probe failed: GPU is lost"));
    assert!(t.on_probe("GPU-b", Ok(()), now).is_some(), "quiet period 0: back at once");
}

#[test]
fn devices_carry_health_and_numa() {
    let mut t = tracker(1000);
    t.on_xid("GPU-b", Some(79), Instant::now());
    let gpus = [gpu("GPU-a", 0, Some(1)), gpu("GPU-b", 1, None)];
    let devices = t.devices(&gpus);
    assert_eq!((devices[0].health, devices[0].numa_nodes.as_slice()), (Health::Healthy, &[1][..]));
    assert_eq!((devices[1].health, devices[1].numa_nodes.as_slice()), (Health::Unhealthy, &[][..]));
}

#[test]
fn the_monitor_publishes_each_transition_and_recovers_a_gpu() {
    let fake = Arc::new(Fake::default());
    let sink = Arc::new(Recorder::default());
    let gpus = vec![gpu("GPU-a", 0, Some(0)), gpu("GPU-b", 1, Some(0))];
    let (stop, stopped) = mpsc::channel();
    let thread = {
        let (fake, sink, gpus) = (fake.clone(), sink.clone(), gpus.clone());
        std::thread::spawn(move || {
            let interval = Duration::from_millis(30);
            let tracker = HealthTracker::new(gpus.iter().map(|g| g.uuid.clone()), XidPolicy::default(), interval);
            let layout = crate::mig::Layout::default();
            let (resource, gpus) = ("nvidia.com/gpu", &gpus[..]);
            let m = Monitor { source: &*fake, sink: &*sink, resource, gpus, layout: &layout, tracker, interval };
            let (mut events, _) = fake.events(&[]).expect("events");
            monitor(m, &mut *events, &stopped);
        })
    };
    let push = |event: Event| fake.events.lock().expect("queue").push_back(event);
    let published = || sink.lists();
    let logs = || sink.messages();

    // An application error: logged, nothing published.
    push(Event::Xid { uuid: "GPU-a".into(), xid: Some(31) });
    wait_until("the ignored XID is logged", || logs().iter().any(|l| l.contains("ignoring XID 31")));
    assert!(published().is_empty());

    // A critical XID while NVML says the GPU is lost: Unhealthy, and it
    // stays so over several probes.
    fake.broken.lock().expect("broken").push("GPU-b".into());
    push(Event::Xid { uuid: "GPU-b".into(), xid: Some(79) });
    wait_until("GPU-b goes Unhealthy", || published().len() == 1);
    assert_eq!(published()[0], [("GPU-a".into(), Health::Healthy), ("GPU-b".into(), Health::Unhealthy)]);
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(published().len(), 1, "no publish while nothing changes");

    // NVML reports it usable: Healthy again at the next probe.
    fake.broken.lock().expect("broken").clear();
    wait_until("GPU-b recovers", || published().len() == 2);
    assert_eq!(published()[1], [("GPU-a".into(), Health::Healthy), ("GPU-b".into(), Health::Healthy)]);
    let logs = logs();
    // The XID made it Unhealthy, or (on a loaded machine) a probe that saw
    // the broken GPU came first and the XID found it Unhealthy already.
    let by_xid = logs.contains(&"GPU GPU-b (index 1) is now Unhealthy: XID 79 (GPU has fallen off the bus)".to_owned());
    let probe_first = logs.contains(&"GPU GPU-b (index 1) is now Unhealthy: NVML probe failed: GPU is lost".to_owned())
        && logs.contains(&"GPU GPU-b: XID 79 (GPU has fallen off the bus) while Unhealthy".to_owned());
    assert!(by_xid || probe_first, "{logs:?}");
    assert!(
        logs.contains(&"GPU GPU-b (index 1) is now Healthy: NVML reports it usable again (it was Unhealthy: NVML probe failed: GPU is lost)".to_owned()),
        "{logs:?}"
    );

    // A failed wait probes at once.
    fake.broken.lock().expect("broken").push("GPU-a".into());
    push(Event::Failed("GPU is lost".into()));
    wait_until("GPU-a goes Unhealthy", || published().len() == 3);
    assert_eq!(published()[2][0], ("GPU-a".into(), Health::Unhealthy));

    stop.send(()).expect("stop");
    thread.join().expect("the monitor stops");
}
