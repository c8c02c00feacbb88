//! The host ↔ worker protocol (`host/src/worker/protocol.rs`): frames
//! (`frame`, `write_frame`, `frame_len`, `read_frame`), `Request` and
//! `Reply` through prost, and the conversions between the wire messages
//! and the backend model.
//!
//! Each input is one of:
//! * a stream of messages built from the input (any ids, every call and
//!   answer kind, arbitrary strings, sometimes one frame over the limit),
//!   written with `write_frame` and read back with `read_frame_into` (one
//!   body buffer kept across the frames, as both ends keep one), whole or
//!   cut at an input-chosen byte;
//! * raw bytes read as a stream of `Request` or `Reply` frames;
//! * model values through the wire types and back.
//!
//! Invariants: nothing panics; `frame` prefixes exactly the encoded length,
//! and `frame_into` into a buffer kept across frames gives the same bytes;
//! `frame_len` accepts exactly the lengths up to `MAX_FRAME` and returns
//! them unchanged; every frame written is read back equal and in order,
//! then a clean end; a frame over `MAX_FRAME` is refused (`InvalidData`,
//! naming the limit) before its body is read; a stream cut inside a body
//! is an error, never a message; whatever `read_frame` decodes from raw
//! bytes consumed exactly its prefix and body and survives re-encoding;
//! the model survives the wire (device, allocation, resource, preferred
//! request, and ABI 1.2's counter sets, consumptions, shared devices with
//! their request policies, shares and device statuses). Known finding F1 (checked only with `DEVHOST_FUZZ_STRICT=1`):
//! a stream that ends inside a length prefix (1–3 bytes) must be an error,
//! not a clean end.

use std::collections::BTreeMap;
use std::io::ErrorKind;

use arbitrary::{Result as AResult, Unstructured};
use devhost::backend::{Allocation, Device, DeviceSpec, Health, Mount, PreferredRequest, ResourceSpec};
use devhost::model::AttributeValue;
use devhost::worker::protocol::{
    Answer, Call, Confine, DevicesCall, Empty, Failure, FailureKind, Fault, Load, LogLine, MAX_FRAME, PreferredAnswer,
    PreferredCall, Publish, Reply, Request, Resources, WireAllocation, WireAttribute, WireAttributeValue,
    WireConsumption, WireCounterSet, WireDevice, WireDeviceSpec, WireDeviceStatus, WireMount, WireRange,
    WireRequestPolicy, WireResource, WireShare, WireShared, WireValidRequests, WireValues, frame, frame_into,
    frame_len, read_frame, read_frame_into, write_frame,
};
use devhost_abi::model::{CounterSet, DeviceStatus, RequestPolicy, Share, ValidRequests};
use prost::Message;

use crate::Target;

/// The target (stateless).
pub struct WorkerProtocol;

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(|| Ok(WorkerProtocol), data);
}

/// Strings worth using: IDs, resource names, empty, non-ASCII.
const WORDS: &[&str] = &["", "d0", "gpu-0", "example.com/gpu", "a::0", "/dev/null", "rw", "é", "\0", "x=y"];

impl Target for WorkerProtocol {
    fn name(&self) -> &'static str {
        "worker-protocol"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = vec![vec![0u8; 16], vec![1, 5, 0, 0, 0, 8, 1], vec![0x10; 40]];
        // Raw mode with a real Load request and a real Publish reply.
        let load = Request {
            id: 1,
            call: Some(Call::Load(Load {
                protocol: devhost::worker::protocol::PROTOCOL_VERSION,
                backend: "gpu".into(),
                module: "/usr/lib/devhost/gpu.so".into(),
                sha256: None,
                config_json: "{}".into(),
            })),
        };
        let mut raw = vec![1, 0];
        raw.extend(frame(&load));
        seeds.push(raw);
        let publish = Reply {
            id: 0,
            answer: Some(Answer::Publish(Publish {
                resource: "example.com/gpu".into(),
                devices: vec![WireDevice {
                    id: "g0".into(),
                    healthy: true,
                    numa_nodes: vec![0],
                    ..WireDevice::default()
                }],
            })),
        };
        let mut raw = vec![1, 1];
        raw.extend(frame(&publish));
        seeds.push(raw);
        seeds
    }

    fn dictionary(&self) -> &'static [&'static str] {
        &[
            "\0\0\0\0",
            "\x00\x00\x00\x01",
            "\x7f\x7f\x7f\x7f",
            "\x01\x00\x00\x01",
            "\x00\x00\x00\x01",
            "\x08\x01",
            "\x12",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        let mode = u.int_in_range(0..=3u8).unwrap_or(0);
        match mode {
            0 => structured(&mut u),
            1 => {
                let as_reply = u.arbitrary::<bool>().unwrap_or(false);
                let rest = u.take_rest();
                if as_reply { raw_stream::<Reply>(rest) } else { raw_stream::<Request>(rest) }
            }
            2 => model(&mut u),
            _ => lengths(&mut u),
        }
    }
}

fn string(u: &mut Unstructured<'_>) -> AResult<String> {
    if u.ratio(1, 2)? { Ok((*u.choose(WORDS)?).to_owned()) } else { u.arbitrary() }
}

fn strings(u: &mut Unstructured<'_>) -> AResult<Vec<String>> {
    (0..u.int_in_range(0..=4)?).map(|_| string(u)).collect()
}

fn pairs(u: &mut Unstructured<'_>) -> AResult<BTreeMap<String, String>> {
    (0..u.int_in_range(0..=3)?).map(|_| Ok((string(u)?, string(u)?))).collect()
}

fn wire_allocation(u: &mut Unstructured<'_>) -> AResult<WireAllocation> {
    Ok(WireAllocation {
        envs: pairs(u)?,
        mounts: (0..u.int_in_range(0..=2)?)
            .map(|_| Ok(WireMount { container_path: string(u)?, host_path: string(u)?, read_only: u.arbitrary()? }))
            .collect::<AResult<_>>()?,
        device_specs: (0..u.int_in_range(0..=2)?)
            .map(|_| Ok(WireDeviceSpec { container_path: string(u)?, host_path: string(u)?, permissions: string(u)? }))
            .collect::<AResult<_>>()?,
        annotations: pairs(u)?,
        cdi_devices: strings(u)?,
        device_status: (0..u.int_in_range(0..=2)?)
            .map(|_| {
                let status = WireDeviceStatus {
                    interface_name: optional(u)?,
                    hardware_address: optional(u)?,
                    ips: strings(u)?,
                    data: optional(u)?,
                };
                Ok((string(u)?, status))
            })
            .collect::<AResult<_>>()?,
    })
}

fn optional(u: &mut Unstructured<'_>) -> AResult<Option<String>> {
    u.arbitrary::<bool>()?.then(|| string(u)).transpose()
}

fn wire_shares(u: &mut Unstructured<'_>) -> AResult<Vec<WireShare>> {
    (0..u.int_in_range(0..=2)?)
        .map(|_| Ok(WireShare { device_id: string(u)?, share_id: optional(u)?, consumed: pairs(u)? }))
        .collect()
}

/// ABI 1.2's sharing of a device: request policies of every kind.
fn wire_shared(u: &mut Unstructured<'_>) -> AResult<Option<WireShared>> {
    if !u.arbitrary::<bool>()? {
        return Ok(None);
    }
    let request_policies = (0..u.int_in_range(0..=2)?)
        .map(|_| {
            let valid = match u.int_in_range(0..=2)? {
                0 => None,
                1 => {
                    Some(WireValidRequests::Range(WireRange { min: string(u)?, max: optional(u)?, step: optional(u)? }))
                }
                _ => Some(WireValidRequests::Values(WireValues { values: strings(u)? })),
            };
            Ok(WireRequestPolicy { capacity: string(u)?, default: optional(u)?, valid })
        })
        .collect::<AResult<_>>()?;
    Ok(Some(WireShared { request_policies }))
}

fn wire_device(u: &mut Unstructured<'_>) -> AResult<WireDevice> {
    let attributes = (0..u.int_in_range(0..=2)?)
        .map(|_| {
            let value = match u.int_in_range(0..=4)? {
                0 => None,
                1 => Some(WireAttributeValue::Int(u.arbitrary()?)),
                2 => Some(WireAttributeValue::Bool(u.arbitrary()?)),
                3 => Some(WireAttributeValue::String(string(u)?)),
                _ => Some(WireAttributeValue::Version(string(u)?)),
            };
            Ok(WireAttribute { name: string(u)?, value })
        })
        .collect::<AResult<_>>()?;
    Ok(WireDevice {
        id: string(u)?,
        healthy: u.arbitrary()?,
        numa_nodes: u.arbitrary()?,
        attributes,
        capacities: pairs(u)?.into_iter().collect(),
        consumes: (0..u.int_in_range(0..=2)?)
            .map(|_| Ok(WireConsumption { counter_set: string(u)?, counters: pairs(u)? }))
            .collect::<AResult<_>>()?,
        shared: wire_shared(u)?,
    })
}

fn request(u: &mut Unstructured<'_>) -> AResult<Request> {
    let call = match u.int_in_range(0..=7)? {
        0 => Call::Load(Load {
            protocol: u.arbitrary()?,
            backend: string(u)?,
            module: string(u)?,
            sha256: u.arbitrary::<bool>()?.then(|| string(u)).transpose()?,
            config_json: string(u)?,
        }),
        1 => Call::Init(Empty {}),
        2 => Call::Allocate(DevicesCall { resource: string(u)?, ids: strings(u)?, shares: wire_shares(u)? }),
        3 => Call::Preferred(PreferredCall {
            resource: string(u)?,
            available: strings(u)?,
            must_include: strings(u)?,
            size: u.arbitrary()?,
        }),
        4 => Call::PreStart(DevicesCall { resource: string(u)?, ids: strings(u)?, shares: Vec::new() }),
        5 => Call::Shutdown(Empty {}),
        6 => Call::Confine(Confine {
            capabilities: strings(u)?,
            uid: u.arbitrary()?,
            gid: u.arbitrary()?,
            seccomp: u.arbitrary()?,
            allow_unsandboxed: u.arbitrary()?,
            disabled: u.arbitrary()?,
        }),
        // No call at all: decodes as `call: None`.
        _ => return Ok(Request { id: u.arbitrary()?, call: None }),
    };
    Ok(Request { id: u.arbitrary()?, call: Some(call) })
}

fn reply(u: &mut Unstructured<'_>) -> AResult<Reply> {
    let answer = match u.int_in_range(0..=9)? {
        0 => Answer::Loaded(string(u)?),
        1 => Answer::Failed(Failure {
            // Any i32: prost keeps unknown enumeration values.
            kind: if u.arbitrary()? { u.int_in_range(0..=4)? } else { u.arbitrary()? },
            message: string(u)?,
        }),
        2 => Answer::Resources(Resources {
            resources: (0..u.int_in_range(0..=3)?)
                .map(|_| {
                    Ok(WireResource {
                        name: string(u)?,
                        pre_start_required: u.arbitrary()?,
                        preferred_allocation: u.arbitrary()?,
                        release_required: u.arbitrary()?,
                        counter_sets: (0..u.int_in_range(0..=2)?)
                            .map(|_| Ok(WireCounterSet { name: string(u)?, counters: pairs(u)? }))
                            .collect::<AResult<_>>()?,
                    })
                })
                .collect::<AResult<_>>()?,
            polls: u.arbitrary()?,
        }),
        3 => Answer::Allocation(wire_allocation(u)?),
        4 => Answer::Preferred(PreferredAnswer { answered: u.arbitrary()?, ids: strings(u)? }),
        5 => Answer::Done(Empty {}),
        6 => Answer::Publish(Publish {
            resource: string(u)?,
            devices: (0..u.int_in_range(0..=4)?).map(|_| wire_device(u)).collect::<AResult<_>>()?,
        }),
        7 => Answer::Log(LogLine { level: u.arbitrary()?, text: string(u)? }),
        8 => Answer::Fault(Fault { operation: string(u)?, message: string(u)? }),
        _ => return Ok(Reply { id: u.arbitrary()?, answer: None }),
    };
    Ok(Reply { id: u.arbitrary()?, answer: Some(answer) })
}

/// One message of either direction, or (rarely) a reply over the frame
/// limit.
enum Either {
    Request(Request),
    Reply(Reply),
}

impl Either {
    fn frame(&self) -> Vec<u8> {
        match self {
            Either::Request(m) => frame(m),
            Either::Reply(m) => frame(m),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Either::Request(m) => m.encoded_len(),
            Either::Reply(m) => m.encoded_len(),
        }
    }
}

/// Messages written with `write_frame` (and encoded with `frame_into` into
/// one buffer kept across them), read back with `read_frame_into` into one
/// body buffer kept across them, whole or cut.
fn structured(u: &mut Unstructured<'_>) -> Result<(), String> {
    let mut messages = Vec::new();
    for _ in 0..u.int_in_range(0..=6).unwrap_or(0) {
        let message = match u.int_in_range(0..=40).unwrap_or(0) {
            40 => {
                // Just over (or at) the limit: a log line of MAX_FRAME bytes.
                let extra = u.int_in_range(0..=8usize).unwrap_or(0);
                let text = "x".repeat(MAX_FRAME.saturating_sub(8) + extra);
                Either::Reply(Reply { id: 0, answer: Some(Answer::Log(LogLine { level: 2, text })) })
            }
            n if n % 2 == 0 => Either::Request(request(u).unwrap_or_default()),
            _ => Either::Reply(reply(u).unwrap_or_default()),
        };
        messages.push(message);
    }
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    let mut kept = Vec::new();
    for message in &messages {
        let len = message.encoded_len();
        let bytes = message.frame();
        match message {
            Either::Request(m) => frame_into(m, &mut kept),
            Either::Reply(m) => frame_into(m, &mut kept),
        }
        if kept != bytes {
            return Err(format!("frame_into() into a kept buffer differs from frame() for a {len}-byte message"));
        }
        if bytes.len() != 4 + len || bytes[..4] != (len as u32).to_le_bytes() {
            return Err(format!("frame() of a {len}-byte message has prefix {:02x?}", &bytes[..4]));
        }
        let before = stream.len();
        let written = match message {
            Either::Request(m) => write_frame(&mut stream, m),
            Either::Reply(m) => write_frame(&mut stream, m),
        };
        written.map_err(|e| format!("write_frame into a Vec failed: {e}"))?;
        if stream[before..] != bytes[..] {
            return Err("write_frame wrote other bytes than frame()".into());
        }
        ends.push(stream.len());
    }
    let cut = if crate::rarely(u, 3) { u.int_in_range(0..=stream.len()).unwrap_or(0) } else { stream.len() };
    let mut reader = &stream[..cut];
    let mut body = Vec::new();
    let mut start = 0;
    for (index, (message, end)) in messages.iter().zip(&ends).enumerate() {
        let len = message.encoded_len();
        let result = match message {
            Either::Request(_) => read_frame_into::<Request>(&mut reader, &mut body).map(|m| m.map(Either::Request)),
            Either::Reply(_) => read_frame_into::<Reply>(&mut reader, &mut body).map(|m| m.map(Either::Reply)),
        };
        let available = cut.saturating_sub(start);
        match result {
            _ if len > MAX_FRAME && available >= 4 => {
                return match result {
                    Err(e) if e.kind() == ErrorKind::InvalidData && e.to_string().contains("-byte limit") => Ok(()),
                    Err(e) => Err(format!("a {len}-byte frame was refused with the wrong error: {e}")),
                    Ok(_) => Err(format!("a {len}-byte frame (over MAX_FRAME) was read")),
                };
            }
            Ok(Some(got)) if *end <= cut => {
                let same = match (message, &got) {
                    (Either::Request(a), Either::Request(b)) => a == b,
                    (Either::Reply(a), Either::Reply(b)) => a == b,
                    _ => false,
                };
                if !same {
                    return Err(format!("message #{index} came back different"));
                }
            }
            Ok(Some(_)) => return Err(format!("a frame cut at byte {cut} of {end} was read as a message")),
            Ok(None) if available == 0 => return Ok(()),
            Ok(None) if available < 4 => {
                if crate::strict("F1") {
                    return Err(format!(
                        "F1: a stream ending {available} bytes into a length prefix reads as a clean end"
                    ));
                }
                return Ok(());
            }
            Ok(None) => return Err(format!("a clean end reported with {available} bytes of a frame left")),
            Err(_) if *end > cut => return Ok(()),
            Err(e) => return Err(format!("a whole {len}-byte frame was refused: {e}")),
        }
        start = *end;
    }
    match read_frame::<Reply>(&mut reader) {
        Ok(None) => Ok(()),
        other => Err(format!("after the last frame: {:?}", other.map(|m| m.is_some()))),
    }
}

/// Raw bytes as a stream of `M` frames.
fn raw_stream<M: Message + Default + PartialEq>(bytes: &[u8]) -> Result<(), String> {
    let mut reader = bytes;
    loop {
        let left = reader.len();
        let prefix: Option<[u8; 4]> = reader.get(..4).and_then(|p| p.try_into().ok());
        match read_frame::<M>(&mut reader) {
            Ok(Some(message)) => {
                let Some(prefix) = prefix else { return Err("a message from fewer than 4 bytes".into()) };
                let len = u32::from_le_bytes(prefix) as usize;
                if len > MAX_FRAME || left - reader.len() != 4 + len {
                    return Err(format!("read a message from a {len}-byte frame, consuming {}", left - reader.len()));
                }
                let again = frame(&message);
                let back: Option<M> = read_frame(&mut again.as_slice()).map_err(|e| format!("re-encoded: {e}"))?;
                if back.as_ref() != Some(&message) {
                    return Err("a decoded message does not survive re-encoding".into());
                }
            }
            Ok(None) if left == 0 => return Ok(()),
            Ok(None) if left < 4 => {
                if crate::strict("F1") {
                    return Err(format!("F1: {left} bytes of a length prefix read as a clean end of stream"));
                }
                return Ok(());
            }
            Ok(None) => return Err(format!("a clean end with {left} bytes left")),
            Err(error) => {
                let len = prefix.map_or(0, |p| u32::from_le_bytes(p) as usize);
                if len > MAX_FRAME && !(error.kind() == ErrorKind::InvalidData && error.to_string().contains("limit")) {
                    return Err(format!("a {len}-byte frame refused with {error}"));
                }
                return Ok(());
            }
        }
    }
}

/// `frame_len` on input-chosen prefixes, and on the edges of the limit.
fn lengths(u: &mut Unstructured<'_>) -> Result<(), String> {
    let chosen: u32 = u.arbitrary().unwrap_or(0);
    let limit = MAX_FRAME as u32;
    for len in [chosen, limit, limit + 1, limit - 1, 0, u32::MAX, chosen % (limit + 2)] {
        let result = frame_len(len.to_le_bytes());
        match result {
            Ok(n) if len <= limit && n == len as usize => {}
            Err(e) if len > limit && e.kind() == ErrorKind::InvalidData && e.to_string().contains(&len.to_string()) => {
            }
            other => return Err(format!("frame_len({len}) = {other:?}")),
        }
    }
    Ok(())
}

/// The model through the wire types and back.
fn model(u: &mut Unstructured<'_>) -> Result<(), String> {
    let device = Device::new(
        string(u).unwrap_or_default(),
        if u.arbitrary().unwrap_or(true) { Health::Healthy } else { Health::Unhealthy },
    )
    .with_numa_nodes(u.arbitrary().unwrap_or_default())
    .with_attribute(string(u).unwrap_or_default(), AttributeValue::Int(u.arbitrary().unwrap_or_default()))
    .with_attribute(string(u).unwrap_or_default(), AttributeValue::Version(string(u).unwrap_or_default()))
    .with_capacity(string(u).unwrap_or_default(), string(u).unwrap_or_default())
    .consuming(string(u).unwrap_or_default(), pairs(u).unwrap_or_default());
    // ABI 1.2: shared or not, with a policy of each kind.
    let device = if u.arbitrary().unwrap_or(false) {
        let range = ValidRequests::Range {
            min: string(u).unwrap_or_default(),
            max: optional(u).unwrap_or_default(),
            step: optional(u).unwrap_or_default(),
        };
        device
            .shared()
            .with_request_policy(string(u).unwrap_or_default(), RequestPolicy { default: None, valid: None })
            .with_request_policy(
                string(u).unwrap_or_default(),
                RequestPolicy { default: optional(u).unwrap_or_default(), valid: Some(range) },
            )
            .with_request_policy(
                string(u).unwrap_or_default(),
                RequestPolicy {
                    default: optional(u).unwrap_or_default(),
                    valid: Some(ValidRequests::Values(strings(u).unwrap_or_default())),
                },
            )
    } else {
        device
    };
    let wire = WireDevice::from(&device);
    let back = Device::try_from(decoded(&wire)?).map_err(|error| format!("{device:?} refused: {error}"))?;
    if back != device {
        return Err(format!("{device:?} came back as {back:?}"));
    }
    let allocation = Allocation {
        envs: pairs(u).unwrap_or_default(),
        mounts: vec![Mount {
            container_path: string(u).unwrap_or_default(),
            host_path: string(u).unwrap_or_default(),
            read_only: u.arbitrary().unwrap_or(false),
        }],
        device_specs: vec![DeviceSpec {
            container_path: string(u).unwrap_or_default(),
            host_path: string(u).unwrap_or_default(),
            permissions: string(u).unwrap_or_default(),
        }],
        annotations: pairs(u).unwrap_or_default(),
        cdi_devices: strings(u).unwrap_or_default(),
        device_status: [(
            string(u).unwrap_or_default(),
            DeviceStatus {
                interface_name: optional(u).unwrap_or_default(),
                hardware_address: optional(u).unwrap_or_default(),
                ips: strings(u).unwrap_or_default(),
                data: optional(u).unwrap_or_default(),
            },
        )]
        .into(),
    };
    let back = Allocation::from(decoded(&WireAllocation::from(allocation.clone()))?);
    if back != allocation {
        return Err(format!("{allocation:?} came back as {back:?}"));
    }
    let spec = ResourceSpec {
        name: string(u).unwrap_or_default(),
        pre_start_required: u.arbitrary().unwrap_or(false),
        preferred_allocation: u.arbitrary().unwrap_or(false),
        release_required: u.arbitrary().unwrap_or(false),
        counter_sets: vec![CounterSet::new(string(u).unwrap_or_default(), pairs(u).unwrap_or_default())],
    };
    let back = ResourceSpec::from(decoded(&WireResource::from(&spec))?);
    if back != spec {
        return Err(format!("{spec:?} came back as {back:?}"));
    }
    let request = PreferredRequest {
        available: strings(u).unwrap_or_default(),
        must_include: strings(u).unwrap_or_default(),
        size: u.arbitrary().unwrap_or(0),
    };
    let share = (
        string(u).unwrap_or_default(),
        Share { share_id: optional(u).unwrap_or_default(), consumed: pairs(u).unwrap_or_default() },
    );
    let back = <(String, Share)>::from(decoded(&WireShare::from(&share))?);
    if back != share {
        return Err(format!("{share:?} came back as {back:?}"));
    }
    let call = PreferredCall::new("r", &request);
    let back = decoded(&call)?.request();
    if back != request {
        return Err(format!("{request:?} came back as {back:?}"));
    }
    // A failure's kind: known values name a kind, others decode as unknown.
    let kind: i32 = u.arbitrary().unwrap_or(0);
    let failure = decoded(&Failure { kind, message: String::new() })?;
    if FailureKind::try_from(failure.kind).is_ok() != (0..=4).contains(&kind) {
        return Err(format!("failure kind {kind} decoded as {:?}", FailureKind::try_from(failure.kind)));
    }
    Ok(())
}

/// `message` encoded and decoded again.
fn decoded<M: Message + Default>(message: &M) -> Result<M, String> {
    M::decode(message.encode_to_vec().as_slice()).map_err(|e| format!("cannot decode what was encoded: {e}"))
}
