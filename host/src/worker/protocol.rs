//! The host ↔ worker protocol: length-prefixed protobuf frames over one
//! `socketpair`, carrying the backend model both ways.
//!
//! A frame is a little-endian `u32` byte count followed by that many bytes
//! of one message: [`Request`] from the host, [`Reply`] from the worker. A
//! reply carries the `id` of the request it answers; id 0 marks an event the
//! worker sends on its own (a device list published, a log line, a fault
//! seen on a backend thread). The first request is always [`Confine`] (the
//! worker locks itself down before any of the module's code runs), the
//! second [`Load`], which carries [`PROTOCOL_VERSION`]; a worker that
//! speaks another version says so and exits. Both ends are the same binary, so a mismatch means a
//! broken installation, not a normal upgrade path.
//!
//! The messages are plain `prost` structs (no `.proto` file): the protocol
//! is private to one binary and never seen by the kubelet.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use prost::Message;

use devhost_abi::model::{
    CounterConsumption, CounterSet, DeviceStatus, RequestPolicy, Share, SharedDevice, ValidRequests,
};

use crate::model::{Allocation, AttributeValue, Device, DeviceSpec, Health, Mount, PreferredRequest, ResourceSpec};

/// Version of this protocol; bumped on any incompatible change (3: ABI
/// 1.2's counter sets, consumptions, shared devices, shares and device
/// statuses, which an older worker would drop without a word).
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame either side accepts: a device list may be up to the
/// kubelet's 4 MiB message limit; leave room.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One call from the host.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    /// Non-zero; echoed in the reply.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// What to do.
    #[prost(oneof = "Call", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10")]
    pub call: Option<Call>,
}

/// The calls: the `Backend` trait, plus loading the module.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Call {
    /// Load the module (always the first request).
    #[prost(message, tag = "2")]
    Load(Load),
    /// `init`: answered with [`Answer::Resources`].
    #[prost(message, tag = "3")]
    Init(Empty),
    /// `allocate`: answered with [`Answer::Allocation`].
    #[prost(message, tag = "4")]
    Allocate(DevicesCall),
    /// `preferred_allocation`: answered with [`Answer::Preferred`].
    #[prost(message, tag = "5")]
    Preferred(PreferredCall),
    /// `pre_start`: answered with [`Answer::Done`].
    #[prost(message, tag = "6")]
    PreStart(DevicesCall),
    /// `shutdown`: answered with [`Answer::Done`]; the worker then waits
    /// for the host to close the socket, and exits.
    #[prost(message, tag = "7")]
    Shutdown(Empty),
    /// `release` (ABI 1.1): answered with [`Answer::Done`].
    #[prost(message, tag = "8")]
    Release(DevicesCall),
    /// `poll` (ABI 1.1): answered with [`Answer::Done`].
    #[prost(message, tag = "9")]
    Poll(Empty),
    /// Lock the worker down (always the first request): answered with
    /// [`Answer::Confined`], or [`Answer::Failed`] if part of it was
    /// refused and running without it was not allowed.
    #[prost(message, tag = "10")]
    Confine(Confine),
}

/// What the worker may keep (the backend file's sandbox keys).
#[derive(Clone, PartialEq, Message)]
pub struct Confine {
    /// Capabilities kept, canonical names (`CAP_SYS_ADMIN`).
    #[prost(string, repeated, tag = "1")]
    pub capabilities: Vec<String>,
    /// The user to run as, if not devhost's.
    #[prost(uint32, optional, tag = "2")]
    pub uid: Option<u32>,
    /// The group to run as, if not devhost's.
    #[prost(uint32, optional, tag = "3")]
    pub gid: Option<u32>,
    /// Install the seccomp filter.
    #[prost(bool, tag = "4")]
    pub seccomp: bool,
    /// Carry on with what the kernel allowed if part is refused.
    #[prost(bool, tag = "5")]
    pub allow_unsandboxed: bool,
    /// Apply nothing (`unsandboxed = "always"`).
    #[prost(bool, tag = "6")]
    pub disabled: bool,
}

/// No fields.
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

/// Which module to load, and how.
#[derive(Clone, PartialEq, Message)]
pub struct Load {
    /// [`PROTOCOL_VERSION`] of the host.
    #[prost(uint32, tag = "1")]
    pub protocol: u32,
    /// The backend's name, for log lines.
    #[prost(string, tag = "2")]
    pub backend: String,
    /// Path of the module file.
    #[prost(string, tag = "3")]
    pub module: String,
    /// Optional SHA-256 pin.
    #[prost(string, optional, tag = "4")]
    pub sha256: Option<String>,
    /// The backend's `[config]` as JSON.
    #[prost(string, tag = "5")]
    pub config_json: String,
}

/// `allocate` / `pre_start` / `release` arguments.
#[derive(Clone, PartialEq, Message)]
pub struct DevicesCall {
    /// The resource.
    #[prost(string, tag = "1")]
    pub resource: String,
    /// Device IDs.
    #[prost(string, repeated, tag = "2")]
    pub ids: Vec<String>,
    /// `allocate` only (ABI 1.2): what a DRA claim consumes of the shared
    /// devices among `ids`, in their order; the worker then calls the
    /// module's `allocate_shared`, where it has one.
    #[prost(message, repeated, tag = "3")]
    pub shares: Vec<WireShare>,
}

/// What one claim consumes of one shared device (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireShare {
    /// The shared device.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// The allocation's share ID, when it has one.
    #[prost(string, optional, tag = "2")]
    pub share_id: Option<String>,
    /// Capacity name → amount consumed.
    #[prost(btree_map = "string, string", tag = "3")]
    pub consumed: BTreeMap<String, String>,
}

/// `preferred_allocation` arguments.
#[derive(Clone, PartialEq, Message)]
pub struct PreferredCall {
    /// The resource.
    #[prost(string, tag = "1")]
    pub resource: String,
    /// Devices to choose from.
    #[prost(string, repeated, tag = "2")]
    pub available: Vec<String>,
    /// Devices the answer must contain.
    #[prost(string, repeated, tag = "3")]
    pub must_include: Vec<String>,
    /// How many to choose.
    #[prost(uint64, tag = "4")]
    pub size: u64,
}

/// One message from the worker: an answer (`id` > 0) or an event (`id` 0).
#[derive(Clone, PartialEq, Message)]
pub struct Reply {
    /// The request answered, or 0 for an event.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The answer or event.
    #[prost(oneof = "Answer", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub answer: Option<Answer>,
}

/// What the worker says.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Answer {
    /// The module is loaded; its SHA-256 (of the bytes actually loaded).
    #[prost(string, tag = "2")]
    Loaded(String),
    /// The call failed.
    #[prost(message, tag = "3")]
    Failed(Failure),
    /// `init` succeeded with these resources.
    #[prost(message, tag = "4")]
    Resources(Resources),
    /// `allocate` succeeded.
    #[prost(message, tag = "5")]
    Allocation(WireAllocation),
    /// `preferred_allocation` answered (`None` list: use the default).
    #[prost(message, tag = "6")]
    Preferred(PreferredAnswer),
    /// `pre_start` or `shutdown` returned.
    #[prost(message, tag = "7")]
    Done(Empty),
    /// Event: a device list the backend published (already validated).
    #[prost(message, tag = "8")]
    Publish(Publish),
    /// Event: a log line.
    #[prost(message, tag = "9")]
    Log(LogLine),
    /// Event: a fault on a backend thread (an invalid publish).
    #[prost(message, tag = "10")]
    Fault(Fault),
    /// The worker is locked down: what was applied (and, where allowed,
    /// what the kernel refused).
    #[prost(string, tag = "11")]
    Confined(String),
}

/// How a call failed.
#[derive(Clone, PartialEq, Message)]
pub struct Failure {
    /// See [`FailureKind`].
    #[prost(enumeration = "FailureKind", tag = "1")]
    pub kind: i32,
    /// The message, in the backend's or the loader's words.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Kinds of [`Failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FailureKind {
    /// The backend declined the request; not a fault.
    Declined = 0,
    /// The backend broke the contract (invalid data).
    Invalid = 1,
    /// The backend reported a fault (`DEVHOST_FAULT`) or panicked.
    Panicked = 2,
    /// The module could not be loaded (the loader's message).
    Load = 3,
    /// The request itself was not understood (protocol mismatch).
    Protocol = 4,
    /// The worker could not be confined as asked (and running without
    /// was not allowed).
    Sandbox = 5,
}

/// Resources declared by `init`.
#[derive(Clone, PartialEq, Message)]
pub struct Resources {
    /// In declaration order.
    #[prost(message, repeated, tag = "1")]
    pub resources: Vec<WireResource>,
    /// The module has ABI 1.1's `poll`: the host should call it.
    #[prost(bool, tag = "2")]
    pub polls: bool,
}

/// One declared resource.
#[derive(Clone, PartialEq, Message)]
pub struct WireResource {
    /// Resource name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Wants `pre_start`.
    #[prost(bool, tag = "2")]
    pub pre_start_required: bool,
    /// Answers `preferred_allocation`.
    #[prost(bool, tag = "3")]
    pub preferred_allocation: bool,
    /// Wants `release` (ABI 1.1).
    #[prost(bool, tag = "4")]
    pub release_required: bool,
    /// Counter sets its devices consume from (ABI 1.2).
    #[prost(message, repeated, tag = "5")]
    pub counter_sets: Vec<WireCounterSet>,
}

/// One counter set (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireCounterSet {
    /// Its name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Counter name → quantity.
    #[prost(btree_map = "string, string", tag = "2")]
    pub counters: BTreeMap<String, String>,
}

/// An allocation.
#[derive(Clone, PartialEq, Message)]
pub struct WireAllocation {
    /// Environment variables.
    #[prost(btree_map = "string, string", tag = "1")]
    pub envs: std::collections::BTreeMap<String, String>,
    /// Mounts.
    #[prost(message, repeated, tag = "2")]
    pub mounts: Vec<WireMount>,
    /// Device nodes.
    #[prost(message, repeated, tag = "3")]
    pub device_specs: Vec<WireDeviceSpec>,
    /// Annotations.
    #[prost(btree_map = "string, string", tag = "4")]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// CDI device names.
    #[prost(string, repeated, tag = "5")]
    pub cdi_devices: Vec<String>,
    /// Device ID → its status for the DRA claim (ABI 1.2).
    #[prost(btree_map = "string, message", tag = "6")]
    pub device_status: BTreeMap<String, WireDeviceStatus>,
}

/// A device status (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireDeviceStatus {
    /// The interface in the pod.
    #[prost(string, optional, tag = "1")]
    pub interface_name: Option<String>,
    /// Its hardware address.
    #[prost(string, optional, tag = "2")]
    pub hardware_address: Option<String>,
    /// Its addresses.
    #[prost(string, repeated, tag = "3")]
    pub ips: Vec<String>,
    /// Driver data, JSON object text.
    #[prost(string, optional, tag = "4")]
    pub data: Option<String>,
}

/// A mount.
#[derive(Clone, PartialEq, Message)]
pub struct WireMount {
    /// Container path.
    #[prost(string, tag = "1")]
    pub container_path: String,
    /// Host path.
    #[prost(string, tag = "2")]
    pub host_path: String,
    /// Read-only.
    #[prost(bool, tag = "3")]
    pub read_only: bool,
}

/// A device node.
#[derive(Clone, PartialEq, Message)]
pub struct WireDeviceSpec {
    /// Container path.
    #[prost(string, tag = "1")]
    pub container_path: String,
    /// Host path.
    #[prost(string, tag = "2")]
    pub host_path: String,
    /// cgroup permissions.
    #[prost(string, tag = "3")]
    pub permissions: String,
}

/// A preferred-allocation answer.
#[derive(Clone, PartialEq, Message)]
pub struct PreferredAnswer {
    /// False: the backend left the choice to the host's default policy.
    #[prost(bool, tag = "1")]
    pub answered: bool,
    /// The chosen IDs, when answered.
    #[prost(string, repeated, tag = "2")]
    pub ids: Vec<String>,
}

/// A published device list.
#[derive(Clone, PartialEq, Message)]
pub struct Publish {
    /// The resource.
    #[prost(string, tag = "1")]
    pub resource: String,
    /// Its devices.
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<WireDevice>,
}

/// One device.
#[derive(Clone, PartialEq, Message)]
pub struct WireDevice {
    /// ID.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Healthy.
    #[prost(bool, tag = "2")]
    pub healthy: bool,
    /// NUMA nodes.
    #[prost(int64, repeated, tag = "3")]
    pub numa_nodes: Vec<i64>,
    /// Typed attributes (ABI 1.1).
    #[prost(message, repeated, tag = "4")]
    pub attributes: Vec<WireAttribute>,
    /// Capacities (ABI 1.1): name → quantity.
    #[prost(btree_map = "string, string", tag = "5")]
    pub capacities: BTreeMap<String, String>,
    /// What it consumes of its resource's counter sets (ABI 1.2).
    #[prost(message, repeated, tag = "6")]
    pub consumes: Vec<WireConsumption>,
    /// Present when the device is shared (ABI 1.2).
    #[prost(message, optional, tag = "7")]
    pub shared: Option<WireShared>,
}

/// What a device consumes of one counter set (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireConsumption {
    /// The counter set.
    #[prost(string, tag = "1")]
    pub counter_set: String,
    /// Counter name → quantity.
    #[prost(btree_map = "string, string", tag = "2")]
    pub counters: BTreeMap<String, String>,
}

/// How a shared device is shared (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireShared {
    /// One per capacity at most.
    #[prost(message, repeated, tag = "1")]
    pub request_policies: Vec<WireRequestPolicy>,
}

/// A request policy for one capacity (ABI 1.2).
#[derive(Clone, PartialEq, Message)]
pub struct WireRequestPolicy {
    /// The capacity.
    #[prost(string, tag = "1")]
    pub capacity: String,
    /// The default amount.
    #[prost(string, optional, tag = "2")]
    pub default: Option<String>,
    /// The amounts allowed; none: any.
    #[prost(oneof = "WireValidRequests", tags = "3, 4")]
    pub valid: Option<WireValidRequests>,
}

/// The amounts a [`WireRequestPolicy`] allows.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WireValidRequests {
    /// A range.
    #[prost(message, tag = "3")]
    Range(WireRange),
    /// A list of amounts.
    #[prost(message, tag = "4")]
    Values(WireValues),
}

/// `min`, `max`, `step` of a range policy.
#[derive(Clone, PartialEq, Message)]
pub struct WireRange {
    /// The least.
    #[prost(string, tag = "1")]
    pub min: String,
    /// The most.
    #[prost(string, optional, tag = "2")]
    pub max: Option<String>,
    /// The step.
    #[prost(string, optional, tag = "3")]
    pub step: Option<String>,
}

/// The amounts of a values policy.
#[derive(Clone, PartialEq, Message)]
pub struct WireValues {
    /// Ascending.
    #[prost(string, repeated, tag = "1")]
    pub values: Vec<String>,
}

/// One typed attribute.
#[derive(Clone, PartialEq, Message)]
pub struct WireAttribute {
    /// Qualified name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The value; a missing one is a protocol error.
    #[prost(oneof = "WireAttributeValue", tags = "2, 3, 4, 5")]
    pub value: Option<WireAttributeValue>,
}

/// The value of a [`WireAttribute`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WireAttributeValue {
    /// `int`.
    #[prost(int64, tag = "2")]
    Int(i64),
    /// `bool`.
    #[prost(bool, tag = "3")]
    Bool(bool),
    /// `string`.
    #[prost(string, tag = "4")]
    String(String),
    /// `version`.
    #[prost(string, tag = "5")]
    Version(String),
}

/// A log line from the module or the worker.
#[derive(Clone, PartialEq, Message)]
pub struct LogLine {
    /// 0 error, 1 warn, 2 info, 3 debug.
    #[prost(uint32, tag = "1")]
    pub level: u32,
    /// The text.
    #[prost(string, tag = "2")]
    pub text: String,
}

/// A fault seen on a backend thread.
#[derive(Clone, PartialEq, Message)]
pub struct Fault {
    /// What the thread was doing (`publish`).
    #[prost(string, tag = "1")]
    pub operation: String,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Encodes `message` as one frame.
pub fn frame(message: &impl Message) -> Vec<u8> {
    let mut buffer = Vec::new();
    frame_into(message, &mut buffer);
    buffer
}

/// The most capacity a buffer kept between frames keeps: one large frame
/// (a long device list, or a hostile worker's 16 MiB) is let go as soon as
/// it has been used, not held until the next frame.
pub const KEPT_BUFFER: usize = 64 * 1024;

/// Lets `buffer` go if a large frame grew it past [`KEPT_BUFFER`]; for
/// each user of a kept buffer to call once a frame is written or decoded.
pub fn release_large(buffer: &mut Vec<u8>) {
    if buffer.capacity() > KEPT_BUFFER {
        *buffer = Vec::new();
    }
}

/// Replaces `buffer`'s contents with `message` as one frame. A buffer kept
/// between frames is allocated once; the message's length is computed
/// once (by `encode`), not again for the prefix, which is written after.
pub fn frame_into(message: &impl Message, buffer: &mut Vec<u8>) {
    buffer.clear();
    buffer.extend_from_slice(&[0; 4]);
    // Cannot fail: the buffer has room (Vec grows).
    let _ = message.encode(buffer);
    let len = u32::try_from(buffer.len() - 4).unwrap_or(u32::MAX);
    buffer[..4].copy_from_slice(&len.to_le_bytes());
}

/// Parses a frame's length prefix, refusing frames over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> std::io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(len)
}

/// Reads one frame (blocking). `Ok(None)` at a clean end of stream, that
/// is between frames; a stream that ends inside a frame, its length prefix
/// included, is an error.
pub fn read_frame<M: Message + Default>(reader: &mut impl Read) -> std::io::Result<Option<M>> {
    read_frame_into(reader, &mut Vec::new())
}

/// [`read_frame`], reading the frame's body into `body` (kept between
/// frames, so that it is allocated once).
pub fn read_frame_into<M: Message + Default>(reader: &mut impl Read, body: &mut Vec<u8>) -> std::io::Result<Option<M>> {
    let mut prefix = [0; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the stream ended {got} bytes into a frame's length prefix"),
                ));
            }
            Ok(read) => got += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    body.resize(frame_len(prefix)?, 0);
    let read = reader.read_exact(body);
    let decoded = read.and_then(|()| {
        M::decode(body.as_slice())
            .map(Some)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    });
    release_large(body);
    decoded
}

/// Writes one frame (blocking) in a single `write_all`.
pub fn write_frame(writer: &mut impl Write, message: &impl Message) -> std::io::Result<()> {
    writer.write_all(&frame(message))
}

impl From<&Device> for WireDevice {
    fn from(device: &Device) -> Self {
        let attributes = device
            .attributes
            .iter()
            .map(|(name, value)| WireAttribute {
                name: name.clone(),
                value: Some(match value {
                    AttributeValue::Int(n) => WireAttributeValue::Int(*n),
                    AttributeValue::Bool(b) => WireAttributeValue::Bool(*b),
                    AttributeValue::String(text) => WireAttributeValue::String(text.clone()),
                    AttributeValue::Version(text) => WireAttributeValue::Version(text.clone()),
                }),
            })
            .collect();
        let consumes = device
            .consumes
            .iter()
            .map(|c| WireConsumption { counter_set: c.counter_set.clone(), counters: c.counters.clone() })
            .collect();
        let shared = device.shared.as_ref().map(|shared| WireShared {
            request_policies: shared
                .request_policies
                .iter()
                .map(|(capacity, policy)| WireRequestPolicy {
                    capacity: capacity.clone(),
                    default: policy.default.clone(),
                    valid: policy.valid.as_ref().map(|valid| match valid {
                        ValidRequests::Range { min, max, step } => WireValidRequests::Range(WireRange {
                            min: min.clone(),
                            max: max.clone(),
                            step: step.clone(),
                        }),
                        ValidRequests::Values(values) => {
                            WireValidRequests::Values(WireValues { values: values.clone() })
                        }
                    }),
                })
                .collect(),
        });
        WireDevice {
            id: device.id.clone(),
            healthy: device.health == Health::Healthy,
            numa_nodes: device.numa_nodes.clone(),
            attributes,
            capacities: device.capacities.clone(),
            consumes,
            shared,
        }
    }
}

impl TryFrom<WireDevice> for Device {
    type Error = String;

    /// The device, or why the worker's message is malformed.
    fn try_from(wire: WireDevice) -> Result<Self, String> {
        let health = if wire.healthy { Health::Healthy } else { Health::Unhealthy };
        let mut device = Device::new(wire.id, health).with_numa_nodes(wire.numa_nodes);
        for attribute in wire.attributes {
            let value = match attribute.value {
                Some(WireAttributeValue::Int(n)) => AttributeValue::Int(n),
                Some(WireAttributeValue::Bool(b)) => AttributeValue::Bool(b),
                Some(WireAttributeValue::String(text)) => AttributeValue::String(text),
                Some(WireAttributeValue::Version(text)) => AttributeValue::Version(text),
                None => return Err(format!("device {:?}: attribute {:?} has no value", device.id, attribute.name)),
            };
            if device.attributes.insert(attribute.name.clone(), value).is_some() {
                return Err(format!("device {:?}: attribute {:?} appears twice", device.id, attribute.name));
            }
        }
        device.capacities = wire.capacities;
        device.consumes = wire
            .consumes
            .into_iter()
            .map(|c| CounterConsumption { counter_set: c.counter_set, counters: c.counters })
            .collect();
        if let Some(shared) = wire.shared {
            let mut policies = BTreeMap::new();
            for policy in shared.request_policies {
                let valid = policy.valid.map(|valid| match valid {
                    WireValidRequests::Range(range) => {
                        ValidRequests::Range { min: range.min, max: range.max, step: range.step }
                    }
                    WireValidRequests::Values(values) => ValidRequests::Values(values.values),
                });
                let capacity = policy.capacity;
                if policies.insert(capacity.clone(), RequestPolicy { default: policy.default, valid }).is_some() {
                    return Err(format!("device {:?}: request policy for {capacity:?} appears twice", device.id));
                }
            }
            device.shared = Some(SharedDevice { request_policies: policies });
        }
        Ok(device)
    }
}

impl From<&CounterSet> for WireCounterSet {
    fn from(set: &CounterSet) -> Self {
        WireCounterSet { name: set.name.clone(), counters: set.counters.clone() }
    }
}

impl From<WireCounterSet> for CounterSet {
    fn from(set: WireCounterSet) -> Self {
        CounterSet { name: set.name, counters: set.counters }
    }
}

impl From<&(String, Share)> for WireShare {
    fn from((device_id, share): &(String, Share)) -> Self {
        WireShare { device_id: device_id.clone(), share_id: share.share_id.clone(), consumed: share.consumed.clone() }
    }
}

impl From<WireShare> for (String, Share) {
    fn from(share: WireShare) -> Self {
        (share.device_id, Share { share_id: share.share_id, consumed: share.consumed })
    }
}

impl From<DeviceStatus> for WireDeviceStatus {
    fn from(status: DeviceStatus) -> Self {
        WireDeviceStatus {
            interface_name: status.interface_name,
            hardware_address: status.hardware_address,
            ips: status.ips,
            data: status.data,
        }
    }
}

impl From<WireDeviceStatus> for DeviceStatus {
    fn from(status: WireDeviceStatus) -> Self {
        DeviceStatus {
            interface_name: status.interface_name,
            hardware_address: status.hardware_address,
            ips: status.ips,
            data: status.data,
        }
    }
}

impl From<&ResourceSpec> for WireResource {
    fn from(spec: &ResourceSpec) -> Self {
        WireResource {
            name: spec.name.clone(),
            pre_start_required: spec.pre_start_required,
            preferred_allocation: spec.preferred_allocation,
            release_required: spec.release_required,
            counter_sets: spec.counter_sets.iter().map(Into::into).collect(),
        }
    }
}

impl From<WireResource> for ResourceSpec {
    fn from(spec: WireResource) -> Self {
        ResourceSpec {
            name: spec.name,
            pre_start_required: spec.pre_start_required,
            preferred_allocation: spec.preferred_allocation,
            release_required: spec.release_required,
            counter_sets: spec.counter_sets.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Allocation> for WireAllocation {
    fn from(allocation: Allocation) -> Self {
        WireAllocation {
            envs: allocation.envs,
            mounts: allocation
                .mounts
                .into_iter()
                .map(|m| WireMount { container_path: m.container_path, host_path: m.host_path, read_only: m.read_only })
                .collect(),
            device_specs: allocation
                .device_specs
                .into_iter()
                .map(|d| WireDeviceSpec {
                    container_path: d.container_path,
                    host_path: d.host_path,
                    permissions: d.permissions,
                })
                .collect(),
            annotations: allocation.annotations,
            cdi_devices: allocation.cdi_devices,
            device_status: allocation.device_status.into_iter().map(|(id, status)| (id, status.into())).collect(),
        }
    }
}

impl From<WireAllocation> for Allocation {
    fn from(allocation: WireAllocation) -> Self {
        Allocation {
            envs: allocation.envs,
            mounts: allocation
                .mounts
                .into_iter()
                .map(|m| Mount { container_path: m.container_path, host_path: m.host_path, read_only: m.read_only })
                .collect(),
            device_specs: allocation
                .device_specs
                .into_iter()
                .map(|d| DeviceSpec {
                    container_path: d.container_path,
                    host_path: d.host_path,
                    permissions: d.permissions,
                })
                .collect(),
            annotations: allocation.annotations,
            cdi_devices: allocation.cdi_devices,
            device_status: allocation.device_status.into_iter().map(|(id, status)| (id, status.into())).collect(),
        }
    }
}

impl PreferredCall {
    /// The call for `request` on `resource`.
    pub fn new(resource: &str, request: &PreferredRequest) -> Self {
        PreferredCall {
            resource: resource.to_owned(),
            available: request.available.clone(),
            must_include: request.must_include.clone(),
            size: request.size as u64,
        }
    }

    /// The request it carries.
    pub fn request(&self) -> PreferredRequest {
        PreferredRequest {
            available: self.available.clone(),
            must_include: self.must_include.clone(),
            size: usize::try_from(self.size).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_cut_inside_a_length_prefix_is_an_error_not_an_end() {
        let frame = frame(&Request { id: 7, call: Some(Call::Shutdown(Empty {})) });
        assert!(read_frame::<Request>(&mut &[][..]).expect("clean end").is_none());
        for cut in 1..4 {
            let error = read_frame::<Request>(&mut &frame[..cut]).expect_err("cut inside the prefix");
            assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{cut}: {error}");
        }
        let whole = read_frame::<Request>(&mut &frame[..]).expect("whole").expect("a request");
        assert_eq!(whole.id, 7);
    }

    #[test]
    fn frames_round_trip_and_oversized_frames_are_refused() {
        let request = Request {
            id: 7,
            call: Some(Call::Allocate(DevicesCall {
                resource: "a.io/x".into(),
                ids: vec!["d0".into(), "d1".into()],
                shares: vec![WireShare {
                    device_id: "d1".into(),
                    share_id: Some("u-1".into()),
                    consumed: BTreeMap::from([("bandwidth".into(), "2G".into())]),
                }],
            })),
        };
        let bytes = frame(&request);
        assert_eq!(u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize, bytes.len() - 4);
        let back: Request = read_frame(&mut bytes.as_slice()).expect("reads").expect("one frame");
        assert_eq!(back, request);
        assert_eq!(read_frame::<Request>(&mut [].as_slice()).expect("clean end"), None);
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let error = read_frame::<Request>(&mut huge.as_slice()).expect_err("too big");
        assert!(error.to_string().contains("over the 16777216-byte limit"), "{error}");
    }

    #[test]
    fn kept_buffers_frame_and_read_as_fresh_ones_and_let_a_large_frame_go() {
        let small = Request { id: 3, call: Some(Call::Shutdown(Empty {})) };
        let large = Request {
            id: 4,
            call: Some(Call::Release(DevicesCall {
                resource: "a.io/x".into(),
                ids: (0..20_000).map(|n| format!("device-{n}")).collect(),
                shares: Vec::new(),
            })),
        };
        assert!(frame(&large).len() > KEPT_BUFFER);
        let (mut out, mut body) = (Vec::new(), Vec::new());
        for request in [&small, &large, &small] {
            frame_into(request, &mut out);
            assert_eq!(out, frame(request), "a kept buffer holds exactly the frame");
            let back: Request = read_frame_into(&mut out.as_slice(), &mut body).expect("reads").expect("a frame");
            assert_eq!(&back, request);
            // The large frame is let go at once, not kept until the next.
            assert!(body.capacity() <= KEPT_BUFFER, "kept {} bytes", body.capacity());
            release_large(&mut out);
            assert!(out.capacity() <= KEPT_BUFFER, "kept {} bytes", out.capacity());
        }
        // A small frame's buffer is kept (not allocated again).
        let kept = body.as_ptr();
        let _: Option<Request> = read_frame_into(&mut frame(&small).as_slice(), &mut body).expect("reads");
        assert_eq!(body.as_ptr(), kept);
    }

    #[test]
    fn the_model_survives_the_wire() {
        let device = Device::new("g0", Health::Unhealthy).with_numa_nodes(vec![1, 3]);
        assert_eq!(Device::try_from(WireDevice::from(&device)), Ok(device.clone()));
        let described = device
            .with_attribute("model", AttributeValue::String("A100".into()))
            .with_attribute("cores", AttributeValue::Int(-7))
            .with_attribute("mig", AttributeValue::Bool(true))
            .with_attribute("driver", AttributeValue::Version("550.54.15".into()))
            .with_capacity("memory", "80Gi");
        assert_eq!(Device::try_from(WireDevice::from(&described)), Ok(described.clone()));
        let mut twice = WireDevice::from(&described);
        twice.attributes.push(twice.attributes[0].clone());
        assert_eq!(Device::try_from(twice), Err("device \"g0\": attribute \"cores\" appears twice".to_owned()));
        let mut allocation = Allocation::default();
        allocation.envs.insert("A".into(), "1".into());
        allocation.annotations.insert("k".into(), "v".into());
        allocation.mounts.push(Mount { container_path: "/c".into(), host_path: "/h".into(), read_only: true });
        allocation.device_specs.push(DeviceSpec {
            container_path: "/dev/c".into(),
            host_path: "/dev/h".into(),
            permissions: "rw".into(),
        });
        allocation.cdi_devices.push("a.io/x=g0".into());
        allocation.device_status.insert(
            "nic-0".into(),
            DeviceStatus {
                interface_name: Some("eth1".into()),
                hardware_address: None,
                ips: vec!["10.0.0.5/24".into()],
                data: Some("{}".into()),
            },
        );
        assert_eq!(Allocation::from(WireAllocation::from(allocation.clone())), allocation);
        // ABI 1.2: partitions, shared devices and what a claim consumes.
        let partition = Device::healthy("half").consuming("gpu-0", [("memory", "20Gi")]);
        assert_eq!(Device::try_from(WireDevice::from(&partition)), Ok(partition));
        let nic = Device::healthy("nic")
            .with_capacity("bandwidth", "10G")
            .with_capacity("queues", "8")
            .with_request_policy(
                "bandwidth",
                RequestPolicy {
                    default: Some("1G".into()),
                    valid: Some(ValidRequests::Range { min: "1G".into(), max: None, step: Some("1G".into()) }),
                },
            )
            .with_request_policy(
                "queues",
                RequestPolicy { default: Some("1".into()), valid: Some(ValidRequests::Values(vec!["1".into()])) },
            );
        assert_eq!(Device::try_from(WireDevice::from(&nic)), Ok(nic.clone()));
        let unshared = Device::healthy("nic").shared();
        assert_eq!(Device::try_from(WireDevice::from(&unshared)), Ok(unshared), "shared, without policies");
        let mut twice = WireDevice::from(&nic);
        let shared = twice.shared.as_mut().expect("shared");
        shared.request_policies.push(shared.request_policies[0].clone());
        assert_eq!(
            Device::try_from(twice),
            Err("device \"nic\": request policy for \"bandwidth\" appears twice".to_owned())
        );
        let spec = ResourceSpec::new("a.io/gpu").with_counter_set(CounterSet::new("gpu-0", [("memory", "40Gi")]));
        assert_eq!(ResourceSpec::from(WireResource::from(&spec)), spec);
        let share = (
            "nic".to_owned(),
            Share { share_id: Some("u".into()), consumed: BTreeMap::from([("bandwidth".into(), "2G".into())]) },
        );
        assert_eq!(<(String, Share)>::from(WireShare::from(&share)), share);
        let request = PreferredRequest { available: vec!["a".into()], must_include: vec![], size: 1 };
        assert_eq!(PreferredCall::new("r", &request).request(), request);
    }
}
