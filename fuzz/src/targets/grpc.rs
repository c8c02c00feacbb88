//! The resource server's request handling over a real Unix socket: a
//! `DevicePluginService` on the static backend (eight devices on two NUMA
//! nodes), once plain and once shared three ways, answering arbitrary
//! `Allocate`, `GetPreferredAllocation` and `PreStartContainer` requests
//! and raw frames that are not valid protobuf.
//!
//! Invariants (from the README and API_FACTS §2.10–2.12): an unknown device
//! ID is `InvalidArgument`, known IDs are `Ok` with one answer per
//! container naming exactly the real devices asked for; a negative
//! `allocation_size` is `InvalidArgument`; a preferred answer holds only
//! available IDs, no repeats, every must-include ID that fits, and exactly
//! `allocation_size` IDs (plain resource, or all available if fewer); an
//! body its request type cannot decode is `Internal`, one that decodes is
//! judged as the same request sent typed and its answer decodes; an unknown
//! method is `Unimplemented`; after any request the server still answers.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use bytes::{Buf, BufMut};
use devhost::backend::handle::BackendHandle;
use devhost::backend::static_backend::StaticBackend;
use devhost::config::StaticConfig;
use devhost::model::{ReplicaPolicy, Sharing};
use devhost::proto::v1beta1::device_plugin_client::DevicePluginClient;
use devhost::proto::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest, ContainerPreferredAllocationRequest,
    DevicePluginOptions, Empty, PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};
use devhost::server::{DevicePluginService, ResourceServer};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::Target;

const PLAIN: &str = "fuzz.example.com/plain";
const SHARED: &str = "fuzz.example.com/shared";
const DEVICES: usize = 8;
const REPLICAS: usize = 3;

/// The target: two servers and a client on each.
pub struct Grpc {
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    clients: Vec<(bool, Channel)>,
    stop: CancellationToken,
    _servers: Vec<ResourceServer>,
}

impl Drop for Grpc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn static_config() -> String {
    let mut text = String::from("[backend]\nkind = \"static\"\n[config]\n");
    for name in [PLAIN, SHARED] {
        text += &format!(
            "[[config.resource]]\nname = \"{name}\"\npreferred_allocation = true\npre_start = true\nenv = {{ IDS = \"{{ids}}\" }}\n"
        );
        for i in 0..DEVICES {
            text += &format!("[[config.resource.device]]\nid = \"d-{i}\"\nnuma = [{}]\n", i % 2);
        }
    }
    text
}

impl Grpc {
    /// Starts both servers in a temp dir.
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new().prefix("devhost-fuzz-grpc-").tempdir().map_err(|e| e.to_string())?;
        let stop = CancellationToken::new();
        let (servers, clients) = runtime.block_on(start(dir.path(), &stop))?;
        Ok(Grpc { runtime, _dir: dir, clients, stop, _servers: servers })
    }
}

async fn start(dir: &Path, stop: &CancellationToken) -> Result<(Vec<ResourceServer>, Vec<(bool, Channel)>), String> {
    let config = StaticConfig::parse(Path::new("fuzz.toml"), &static_config()).map_err(|e| e.to_string())?;
    let backend = Arc::new(StaticBackend::new(config));
    let handle =
        BackendHandle::start("fuzz", backend, Duration::from_secs(2), stop.clone()).await.map_err(|e| e.to_string())?;
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for (spec, state) in handle.resources() {
        let shared = spec.name == SHARED;
        if shared {
            state
                .set_sharing(Sharing { replicas: REPLICAS, policy: ReplicaPolicy::Spread })
                .map_err(|e| e.to_string())?;
        }
        let service = DevicePluginService::new(spec.clone(), state.clone(), handle.clone(), stop.clone());
        let socket = dir.join(format!("{}.sock", if shared { "shared" } else { "plain" }));
        servers.push(ResourceServer::start(&socket, service, stop.clone()).map_err(|e| e.to_string())?);
        let channel =
            devhost::sockets::client::connect(&socket, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        clients.push((shared, channel));
    }
    Ok((servers, clients))
}

/// A device ID: known, a replica, or something else.
fn id(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0..=7)? {
        0..=2 => format!("d-{}", u.int_in_range(0..=DEVICES)?),
        3..=4 => format!("d-{}::{}", u.int_in_range(0..=DEVICES)?, u.int_in_range(0..=REPLICAS)?),
        5 => String::new(),
        6 => ["d-0::", "::0", "d-", "D-0", "d-00", "d-0 ", "d-0::0::0"][u.int_in_range(0..=6)?].to_owned(),
        _ => u.arbitrary::<String>()?,
    })
}

fn ids(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<String>> {
    (0..u.int_in_range(0..=6)?).map(|_| id(u)).collect()
}

/// An `allocation_size`: mostly small, sometimes negative or huge (this
/// once made the default policy reserve `i32::MAX` entries and abort).
fn size(u: &mut Unstructured<'_>) -> arbitrary::Result<i32> {
    Ok(match u.int_in_range(0..=4)? {
        0 => -u.int_in_range(1..=i32::MAX)?,
        4 => u.int_in_range(0..=i32::MAX)?,
        _ => u.int_in_range(0..=12)?,
    })
}

/// Whether `id` is a device the resource advertises.
fn known(shared: bool, id: &str) -> Option<String> {
    let (real, replica) = match id.split_once("::") {
        Some((real, replica)) if shared => (real, Some(replica)),
        _ => (id, None),
    };
    let device_ok = (0..DEVICES).any(|i| real == format!("d-{i}"));
    let replica_ok = match replica {
        None => !shared,
        Some(r) => (0..REPLICAS).any(|i| r == i.to_string()),
    };
    (device_ok && replica_ok).then(|| real.to_owned())
}

fn unique(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    out
}

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(Grpc::new, data);
}

impl Target for Grpc {
    fn name(&self) -> &'static str {
        "grpc"
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        let mut u = Unstructured::new(data);
        let Ok(which) = u.int_in_range(0..=self.clients.len() - 1) else { return Ok(()) };
        let (shared, channel) = self.clients[which].clone();
        let op = u.int_in_range(0..=3).unwrap_or(0);
        self.runtime.block_on(async move {
            let mut client = DevicePluginClient::new(channel.clone());
            match op {
                0 => allocate(&mut client, &mut u, shared).await?,
                1 => preferred(&mut client, &mut u, shared).await?,
                2 => pre_start(&mut client, &mut u, shared).await?,
                _ => raw(channel, &mut u, shared).await?,
            }
            client
                .get_device_plugin_options(Empty {})
                .await
                .map_err(|s| format!("the server stopped answering: {s}"))?;
            Ok(())
        })
    }
}

async fn allocate(
    client: &mut DevicePluginClient<Channel>,
    u: &mut Unstructured<'_>,
    shared: bool,
) -> Result<(), String> {
    let containers: Vec<Vec<String>> =
        (0..u.int_in_range(0..=3).unwrap_or(1)).map(|_| ids(u).unwrap_or_default()).collect();
    let request = AllocateRequest {
        container_requests: containers
            .iter()
            .map(|ids| ContainerAllocateRequest { devices_ids: ids.clone() })
            .collect(),
    };
    let result = client.allocate(request.clone()).await.map(tonic::Response::into_inner);
    judge_allocate(&request, shared, result)
}

/// Unknown IDs are `InvalidArgument`; otherwise one answer per container,
/// each naming exactly the real devices asked for.
fn judge_allocate(
    request: &AllocateRequest,
    shared: bool,
    result: Result<AllocateResponse, tonic::Status>,
) -> Result<(), String> {
    let containers: Vec<&Vec<String>> = request.container_requests.iter().map(|c| &c.devices_ids).collect();
    let all_known = containers.iter().copied().flatten().all(|id| known(shared, id).is_some());
    match result {
        Ok(answer) => {
            if !all_known {
                return Err(format!("{request:?}: an unknown ID was accepted: {answer:?}"));
            }
            if answer.container_responses.len() != containers.len() {
                return Err(format!("{request:?}: {} answers", answer.container_responses.len()));
            }
            for (ids, response) in containers.iter().zip(&answer.container_responses) {
                let real: Vec<String> = ids.iter().filter_map(|id| known(shared, id)).collect();
                let want = unique(&real).join(",");
                if response.envs.get("IDS") != Some(&want) {
                    return Err(format!("{request:?}: IDS = {:?}, expected {want:?}", response.envs.get("IDS")));
                }
            }
            Ok(())
        }
        Err(status) if status.code() == Code::InvalidArgument && !all_known => Ok(()),
        Err(status) => Err(format!("{request:?}: {status:?}")),
    }
}

async fn preferred(
    client: &mut DevicePluginClient<Channel>,
    u: &mut Unstructured<'_>,
    shared: bool,
) -> Result<(), String> {
    let containers: Vec<ContainerPreferredAllocationRequest> = (0..u.int_in_range(0..=2).unwrap_or(1))
        .map(|_| {
            let mut available = ids(u).unwrap_or_default();
            if u.arbitrary::<bool>().unwrap_or(false) {
                available.extend((0..DEVICES).map(|i| if shared { format!("d-{i}::0") } else { format!("d-{i}") }));
            }
            ContainerPreferredAllocationRequest {
                available_device_i_ds: available,
                must_include_device_i_ds: ids(u).unwrap_or_default(),
                allocation_size: size(u).unwrap_or(1),
            }
        })
        .collect();
    let request = PreferredAllocationRequest { container_requests: containers };
    let result = client.get_preferred_allocation(request.clone()).await.map(tonic::Response::into_inner);
    judge_preferred(&request, shared, result)
}

/// A negative size is `InvalidArgument`; otherwise one answer per
/// container, each keeping the preferred-allocation contract.
fn judge_preferred(
    request: &PreferredAllocationRequest,
    shared: bool,
    result: Result<PreferredAllocationResponse, tonic::Status>,
) -> Result<(), String> {
    let containers = &request.container_requests;
    let negative = containers.iter().any(|c| c.allocation_size < 0);
    match result {
        Ok(answer) => {
            if negative {
                return Err(format!("{request:?}: a negative size was accepted"));
            }
            if answer.container_responses.len() != containers.len() {
                return Err(format!("{request:?}: {} answers", answer.container_responses.len()));
            }
            for (asked, got) in containers.iter().zip(&answer.container_responses) {
                check_preferred(asked, &got.device_i_ds, shared).map_err(|e| format!("{asked:?}: {e}"))?;
            }
            Ok(())
        }
        Err(status) if status.code() == Code::InvalidArgument && negative => Ok(()),
        Err(status) => Err(format!("{request:?}: {status:?}")),
    }
}

fn check_preferred(asked: &ContainerPreferredAllocationRequest, got: &[String], shared: bool) -> Result<(), String> {
    let available: BTreeSet<&String> = asked.available_device_i_ds.iter().collect();
    let size = usize::try_from(asked.allocation_size).unwrap_or(0);
    if let Some(id) = got.iter().find(|id| !available.contains(id)) {
        return Err(format!("chose {id:?}, which is not available"));
    }
    if unique(got).len() != got.len() {
        return Err(format!("chose an ID twice: {got:?}"));
    }
    if got.len() > size {
        return Err(format!("chose {} IDs for a size of {size}", got.len()));
    }
    let must: Vec<String> =
        unique(&asked.must_include_device_i_ds).into_iter().filter(|id| available.contains(id)).collect();
    if must.len() <= size
        && let Some(id) = must.iter().find(|id| !got.contains(id))
    {
        return Err(format!("left out {id:?}, which must be included; got {got:?}"));
    }
    if !shared && got.len() != size.min(available.len()) {
        return Err(format!("chose {} IDs; expected {}", got.len(), size.min(available.len())));
    }
    Ok(())
}

async fn pre_start(
    client: &mut DevicePluginClient<Channel>,
    u: &mut Unstructured<'_>,
    shared: bool,
) -> Result<(), String> {
    let ids = ids(u).unwrap_or_default();
    let request = PreStartContainerRequest { devices_ids: ids };
    let result = client.pre_start_container(request.clone()).await.map(tonic::Response::into_inner);
    judge_pre_start(&request, shared, result)
}

/// Known IDs are `Ok`, unknown ones `InvalidArgument`.
fn judge_pre_start(
    request: &PreStartContainerRequest,
    shared: bool,
    result: Result<PreStartContainerResponse, tonic::Status>,
) -> Result<(), String> {
    let all_known = request.devices_ids.iter().all(|id| known(shared, id).is_some());
    match (result, all_known) {
        (Ok(_), true) => Ok(()),
        (Err(status), false) if status.code() == Code::InvalidArgument => Ok(()),
        (result, _) => Err(format!("{request:?}: {result:?}")),
    }
}

/// Raw bytes as the body of a call. A body that the method's request type
/// cannot decode (decided here by prost) must be `Internal`; one that
/// decodes must be judged exactly as the same request sent typed, and its
/// answer must decode as the method's response type. An unknown method is
/// `Unimplemented`.
async fn raw(channel: Channel, u: &mut Unstructured<'_>, shared: bool) -> Result<(), String> {
    let methods = ["Allocate", "GetPreferredAllocation", "PreStartContainer", "GetDevicePluginOptions", "Nope"];
    let method = methods[u.int_in_range(0..=methods.len() - 1).unwrap_or(0)];
    let body: Vec<u8> = u.arbitrary().unwrap_or_default();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let path = match method {
        "Allocate" => "/v1beta1.DevicePlugin/Allocate",
        "GetPreferredAllocation" => "/v1beta1.DevicePlugin/GetPreferredAllocation",
        "PreStartContainer" => "/v1beta1.DevicePlugin/PreStartContainer",
        "GetDevicePluginOptions" => "/v1beta1.DevicePlugin/GetDevicePluginOptions",
        _ => "/v1beta1.DevicePlugin/Nope",
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let reply = grpc.unary(tonic::Request::new(body.clone()), path, RawCodec).await.map(tonic::Response::into_inner);
    let context = |e: String| format!("{method} with {body:02x?}: {e}");
    match method {
        "Allocate" => match AllocateRequest::decode(body.as_slice()) {
            Ok(request) => judge_allocate(&request, shared, decoded(reply)?),
            Err(_) => undecodable(reply),
        },
        "GetPreferredAllocation" => match PreferredAllocationRequest::decode(body.as_slice()) {
            Ok(request) => judge_preferred(&request, shared, decoded(reply)?),
            Err(_) => undecodable(reply),
        },
        "PreStartContainer" => match PreStartContainerRequest::decode(body.as_slice()) {
            Ok(request) => judge_pre_start(&request, shared, decoded(reply)?),
            Err(_) => undecodable(reply),
        },
        "GetDevicePluginOptions" => match Empty::decode(body.as_slice()) {
            Ok(_) => decoded::<DevicePluginOptions>(reply)?.map(|_| ()).map_err(|status| format!("{status:?}")),
            Err(_) => undecodable(reply),
        },
        _ => match reply {
            Err(status) if status.code() == Code::Unimplemented => Ok(()),
            other => Err(format!("an unknown method answered {other:?}")),
        },
    }
    .map_err(context)
}

/// The answer to a body prost cannot decode: `Internal`, nothing else.
fn undecodable(reply: Result<Vec<u8>, tonic::Status>) -> Result<(), String> {
    match reply {
        Err(status) if status.code() == Code::Internal => Ok(()),
        other => Err(format!("an undecodable body was answered {other:?}; expected Internal")),
    }
}

/// A raw answer as the method's response type; an answer that does not
/// decode breaks the invariant.
fn decoded<T: Message + Default>(reply: Result<Vec<u8>, tonic::Status>) -> Result<Result<T, tonic::Status>, String> {
    match reply {
        Ok(bytes) => T::decode(bytes.as_slice()).map(Ok).map_err(|e| format!("the answer does not decode: {e}")),
        Err(status) => Ok(Err(status)),
    }
}

/// Sends and receives message bodies as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
