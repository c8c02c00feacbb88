//! The kubelet's PodResources API (`v1.PodResourcesLister`), written from
//! `docs/pod-resources-api.md` for tests: a real gRPC server on a real
//! socket that reports the pods a test says are running.
//!
//! What it reproduces of the kubelet: the socket is bound under a temporary
//! name and renamed into place (so a restart is a new inode at the same
//! path, §1); `List` reports only the pods present now, one
//! `ContainerDevices` entry per device and NUMA node with one ID each and
//! no topology for a device without NUMA nodes, in an order that changes
//! between calls (§4); one token bucket of 100 calls a second with a burst
//! of 10 for every RPC, answering `ResourceExhausted` "rejected by rate
//! limit" beyond it (§4); `Get` of an unknown pod is `Unknown` "pod <name>
//! in namespace <ns> not found" (§3). It does not model allocatable
//! resources (`GetAllocatableResources` answers empty), CPUs, memory or DRA.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::FakeKubeletError;
use crate::proto::podresources::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use crate::proto::podresources::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices, ContainerResources,
    GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest, ListPodResourcesResponse, NumaNode,
    PodResources, TopologyInfo,
};

/// The kubelet's rate limit (`DefaultQPS`, `DefaultBurstTokens`).
const QPS: f64 = 100.0;
const BURST: f64 = 10.0;

/// One device a container holds.
#[derive(Debug, Clone)]
struct Held {
    resource: String,
    id: String,
    numa_nodes: Vec<i64>,
}

#[derive(Debug, Clone)]
struct Pod {
    namespace: String,
    name: String,
    /// Container name and what it holds, in the order containers were added.
    containers: Vec<(String, Vec<Held>)>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct State {
    pods: Mutex<Vec<Pod>>,
    bucket: Mutex<Bucket>,
    delay: Mutex<Duration>,
    calls: AtomicU64,
}

/// A fake PodResources endpoint.
pub struct FakePodResources {
    socket: PathBuf,
    state: Arc<State>,
    serving: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl FakePodResources {
    /// Serves on `socket` (its directory is created, mode 0750, like the
    /// kubelet's).
    pub async fn start(socket: &Path) -> Result<FakePodResources, FakeKubeletError> {
        let fake = FakePodResources {
            socket: socket.to_owned(),
            state: Arc::new(State {
                pods: Mutex::default(),
                bucket: Mutex::new(Bucket { tokens: BURST, at: Instant::now() }),
                delay: Mutex::default(),
                calls: AtomicU64::new(0),
            }),
            serving: Mutex::default(),
        };
        fake.serve()?;
        Ok(fake)
    }

    fn serve(&self) -> Result<(), FakeKubeletError> {
        let dir = self.socket.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|source| FakeKubeletError::CreateDir { dir: dir.to_owned(), source })?;
        let bind = |source| FakeKubeletError::Bind { path: self.socket.clone(), source };
        // Bound elsewhere and renamed into place: a new inode every start.
        let temporary = dir.join(format!(".kubelet-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let listener = UnixListener::bind(&temporary).map_err(bind)?;
        std::fs::rename(&temporary, &self.socket).map_err(bind)?;
        let token = CancellationToken::new();
        let service = PodResourcesListerServer::new(Service { state: self.state.clone() });
        let shutdown = token.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    crate::sockets::unix_incoming(listener, "pod-resources".to_owned(), Default::default()),
                    shutdown,
                )
                .await;
        });
        *self.serving.lock().unwrap_or_else(PoisonError::into_inner) = Some((token, server));
        Ok(())
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Container `container` of pod `namespace/pod` holds `ids` of
    /// `resource` (no NUMA nodes). Adds the pod or container as needed.
    pub fn assign(&self, namespace: &str, pod: &str, container: &str, resource: &str, ids: &[&str]) {
        self.assign_on_numa(namespace, pod, container, resource, ids, &[]);
    }

    /// As [`FakePodResources::assign`], each device on `numa_nodes`.
    pub fn assign_on_numa(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        resource: &str,
        ids: &[&str],
        numa_nodes: &[i64],
    ) {
        let mut pods = self.state.pods.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match pods.iter().position(|p| p.namespace == namespace && p.name == pod) {
            Some(index) => index,
            None => {
                pods.push(Pod { namespace: namespace.into(), name: pod.into(), containers: Vec::new() });
                pods.len() - 1
            }
        };
        let containers = &mut pods[index].containers;
        let held =
            ids.iter().map(|id| Held { resource: resource.into(), id: (*id).into(), numa_nodes: numa_nodes.to_vec() });
        match containers.iter_mut().find(|(name, _)| name == container) {
            Some((_, devices)) => devices.extend(held),
            None => containers.push((container.into(), held.collect())),
        }
    }

    /// The pod is gone (deleted, or terminated and no longer active).
    pub fn remove_pod(&self, namespace: &str, pod: &str) {
        self.state
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| !(p.namespace == namespace && p.name == pod));
    }

    /// Every call waits this long before answering (a slow kubelet).
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// `List` calls answered so far (rate-limited ones not counted).
    pub fn list_calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Stops serving and removes the socket (a kubelet that is down).
    pub async fn stop(&self) {
        let serving = self.serving.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some((token, server)) = serving {
            token.cancel();
            // Open connections would keep the server alive: cut them.
            server.abort();
            let _ = server.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Stops and serves again on a new socket at the same path (a kubelet
    /// restart), with the same pods.
    pub async fn restart(&self) -> Result<(), FakeKubeletError> {
        self.stop().await;
        self.serve()
    }
}

impl Drop for FakePodResources {
    fn drop(&mut self) {
        if let Some((token, server)) = self.serving.lock().unwrap_or_else(PoisonError::into_inner).take() {
            token.cancel();
            server.abort();
        }
    }
}

struct Service {
    state: Arc<State>,
}

impl Service {
    /// The rate limit, then the configured delay.
    async fn admit(&self) -> Result<(), Status> {
        {
            let mut bucket = self.state.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * QPS).min(BURST);
            bucket.at = now;
            if bucket.tokens < 1.0 {
                return Err(Status::resource_exhausted("rejected by rate limit"));
            }
            bucket.tokens -= 1.0;
        }
        let delay = *self.state.delay.lock().unwrap_or_else(PoisonError::into_inner);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn pods(&self) -> Vec<Pod> {
        self.state.pods.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// One pod as the kubelet reports it: an entry per device and NUMA node.
fn report(pod: &Pod, reverse: bool) -> PodResources {
    let containers = pod
        .containers
        .iter()
        .map(|(name, held)| {
            let mut devices: Vec<ContainerDevices> = Vec::new();
            for device in held {
                let entry = |topology| ContainerDevices {
                    resource_name: device.resource.clone(),
                    device_ids: vec![device.id.clone()],
                    topology,
                };
                if device.numa_nodes.is_empty() {
                    devices.push(entry(None));
                }
                for &id in &device.numa_nodes {
                    devices.push(entry(Some(TopologyInfo { nodes: vec![NumaNode { id }] })));
                }
            }
            // Go map order: not stable between calls.
            if reverse {
                devices.reverse();
            }
            ContainerResources { name: name.clone(), devices, ..Default::default() }
        })
        .collect();
    PodResources { name: pod.name.clone(), namespace: pod.namespace.clone(), containers }
}

#[tonic::async_trait]
impl PodResourcesLister for Service {
    async fn list(&self, _: Request<ListPodResourcesRequest>) -> Result<Response<ListPodResourcesResponse>, Status> {
        self.admit().await?;
        let call = self.state.calls.fetch_add(1, Ordering::SeqCst);
        let pod_resources = self.pods().iter().map(|pod| report(pod, call % 2 == 1)).collect();
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        self.admit().await?;
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(&self, request: Request<GetPodResourcesRequest>) -> Result<Response<GetPodResourcesResponse>, Status> {
        self.admit().await?;
        let request = request.into_inner();
        let pods = self.pods();
        let pod = pods.iter().find(|p| p.name == request.pod_name && p.namespace == request.pod_namespace);
        match pod {
            Some(pod) => Ok(Response::new(GetPodResourcesResponse { pod_resources: Some(report(pod, false)) })),
            None => Err(Status::unknown(format!(
                "pod {} in namespace {} not found",
                request.pod_name, request.pod_namespace
            ))),
        }
    }
}
