//! The five `DevicePlugin` RPCs for one resource, answered from its device
//! state and its backend. IDs are checked against the current device list
//! before the backend sees them.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::preferred;
use super::status::{MAX_REQUEST_IDS, RequestError, echo};
use crate::backend::handle::{BackendHandle, CallError};
use crate::backend::{Allocation, PreferredRequest, ResourceSpec};
use crate::device_state::{MAX_STREAMS, ResourceState};
use crate::proto::v1beta1::{self, device_plugin_server::DevicePlugin};

/// Serves one resource.
#[derive(Debug, Clone)]
pub struct DevicePluginService {
    spec: ResourceSpec,
    state: Arc<ResourceState>,
    backend: Arc<BackendHandle>,
    /// Fires when this server generation stops: open streams end with it.
    stop: CancellationToken,
    /// Checks the CDI names of Allocate answers (and adds devhost's own
    /// with `cdi = true`); `None` passes them as the backend gives them.
    cdi: Option<Arc<crate::cdi::answer::Answers>>,
    /// The `Allocate` series of this resource, looked up at its first
    /// call (a series appears when first counted, as with `timed`).
    allocate_series: Arc<std::sync::OnceLock<crate::telemetry::RpcSeries>>,
}

impl DevicePluginService {
    /// A service for `spec`, whose devices are in `state`.
    pub fn new(
        spec: ResourceSpec,
        state: Arc<ResourceState>,
        backend: Arc<BackendHandle>,
        stop: CancellationToken,
    ) -> Self {
        DevicePluginService { spec, state, backend, stop, cdi: None, allocate_series: Arc::default() }
    }

    /// Passes Allocate answers through `cdi`: only CDI names that resolve,
    /// and with `cdi = true` devhost's names (`<resource>=<device>`) for
    /// the edits its spec carries, the rest in plain fields.
    pub fn with_cdi(mut self, cdi: Option<Arc<crate::cdi::answer::Answers>>) -> Self {
        self.cdi = cdi;
        self
    }

    /// The options the kubelet is told, here and in `Register`.
    pub fn options(spec: &ResourceSpec) -> v1beta1::DevicePluginOptions {
        v1beta1::DevicePluginOptions {
            pre_start_required: spec.pre_start_required,
            get_preferred_allocation_available: spec.preferred_allocation,
        }
    }

    /// Runs one RPC, counting it and its latency per resource and method.
    async fn timed<T>(&self, method: &str, rpc: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let started = Instant::now();
        let result = rpc.await;
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        crate::telemetry::global().rpc(&self.spec.name, method, code, started.elapsed());
        result
    }

    /// [`timed`](Self::timed) for `Allocate`, through series looked up
    /// once rather than by label strings on every call.
    async fn timed_allocate<T>(&self, rpc: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let started = Instant::now();
        let result = rpc.await;
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.allocate_series
            .get_or_init(|| crate::telemetry::global().rpc_series(&self.spec.name, "Allocate"))
            .record(code, started.elapsed());
        result
    }

    /// The real devices behind the IDs the kubelet sent (replica IDs when
    /// shared), each once, in request order; an unknown ID is refused.
    fn real_ids(&self, ids: &[String]) -> Result<Vec<String>, RequestError> {
        self.bounded("devicesIDs", ids.len())?;
        let snapshot = self.state.snapshot();
        let mut seen = HashSet::with_capacity(ids.len());
        let mut real: Vec<String> = Vec::with_capacity(ids.len());
        for id in ids {
            let device = snapshot
                .real_device(id)
                .ok_or_else(|| RequestError::UnknownDevice { resource: self.spec.name.clone(), id: id.clone() })?;
            if seen.insert(device.id.as_str()) {
                real.push(device.id.clone());
            }
        }
        Ok(real)
    }

    /// Refuses a list of the request longer than [`MAX_REQUEST_IDS`].
    fn bounded(&self, list: &'static str, count: usize) -> Result<(), RequestError> {
        if count > MAX_REQUEST_IDS {
            return Err(RequestError::TooLarge { resource: self.spec.name.clone(), list, count });
        }
        Ok(())
    }

    async fn preferred_for(
        &self,
        request: v1beta1::ContainerPreferredAllocationRequest,
    ) -> Result<Vec<String>, Status> {
        let size = usize::try_from(request.allocation_size).map_err(|_| RequestError::NegativeSize {
            resource: self.spec.name.clone(),
            size: request.allocation_size,
        })?;
        self.bounded("available_deviceIDs", request.available_device_i_ds.len())?;
        self.bounded("must_include_deviceIDs", request.must_include_device_i_ds.len())?;
        let question = PreferredRequest {
            available: request.available_device_i_ds,
            must_include: request.must_include_device_i_ds,
            size,
        };
        let snapshot = self.state.snapshot();
        if snapshot.sharing.replicas > 1 {
            // Backends know real devices, not replicas: the host chooses.
            return Ok(off_async_threads(question.available.len(), move || {
                preferred::choose_replicas(&snapshot, &question)
            })
            .await);
        }
        let resource = self.spec.name.clone();
        let asked = question.clone();
        let answer = self.backend.preferred_allocation(&resource, asked).await?;
        let checked = off_async_threads(question.available.len(), move || match answer {
            None => Ok(preferred::choose(&snapshot.devices, &question)),
            Some(ids) => match check_preferred(&question, &ids) {
                Ok(()) => Ok(ids),
                // The kubelet still gets a correct answer from the default
                // policy; the garbage is reported as a fault below.
                Err(message) => Err((message, preferred::choose(&snapshot.devices, &question))),
            },
        })
        .await;
        checked.or_else(|(message, ids)| {
            self.backend.report_fault(&CallError::Invalid {
                backend: self.backend.name().to_owned(),
                operation: "preferred_allocation",
                message,
            });
            Ok(ids)
        })
    }
}

/// Lists longer than this are worked on off the async threads, so a large
/// request never stalls another resource's calls.
const INLINE_IDS: usize = 1024;

/// Runs `work` (on `ids` IDs) inline when small, on the blocking pool when
/// large.
async fn off_async_threads<T: Send + 'static>(ids: usize, work: impl FnOnce() -> T + Send + 'static) -> T {
    if ids <= INLINE_IDS {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        // The work panicked: a bug in the host's own policy; keep its message.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The preferred-allocation contract: only available IDs, no repeats, every
/// must-include ID, and exactly `size` IDs (or every available one if fewer).
pub fn check_preferred(request: &PreferredRequest, ids: &[String]) -> Result<(), String> {
    let available: HashSet<&str> = request.available.iter().map(String::as_str).collect();
    if let Some(id) = ids.iter().find(|id| !available.contains(id.as_str())) {
        return Err(format!("chose {}, which is not among the available devices", echo(id)));
    }
    let mut chosen = HashSet::with_capacity(ids.len());
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| !chosen.insert(id.as_str())) {
        return Err(format!("chose {} twice (at position {i})", echo(id)));
    }
    // A must-include ID may be left out only for another must-include ID
    // (when more are required than the size allows).
    let required: HashSet<&str> =
        request.must_include.iter().map(String::as_str).filter(|id| available.contains(id)).collect();
    if let Some(id) =
        request.must_include.iter().find(|id| required.contains(id.as_str()) && !chosen.contains(id.as_str()))
        && chosen.iter().any(|id| !required.contains(id))
    {
        return Err(format!("left out {}, which must be included", echo(id)));
    }
    // `available` may repeat an ID: count each once.
    let expected = request.size.min(available.len());
    if ids.len() != expected {
        return Err(format!("chose {} devices where {expected} were asked for", ids.len()));
    }
    Ok(())
}

fn to_proto(allocation: Allocation) -> v1beta1::ContainerAllocateResponse {
    v1beta1::ContainerAllocateResponse {
        envs: allocation.envs.into_iter().collect(),
        mounts: allocation
            .mounts
            .into_iter()
            .map(|m| v1beta1::Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                read_only: m.read_only,
            })
            .collect(),
        devices: allocation
            .device_specs
            .into_iter()
            .map(|d| v1beta1::DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        annotations: allocation.annotations.into_iter().collect(),
        cdi_devices: allocation.cdi_devices.into_iter().map(|name| v1beta1::CdiDevice { name }).collect(),
    }
}

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<v1beta1::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for DevicePluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<v1beta1::Empty>,
    ) -> Result<Response<v1beta1::DevicePluginOptions>, Status> {
        self.timed("GetDevicePluginOptions", async { Ok(Response::new(Self::options(&self.spec))) }).await
    }

    type ListAndWatchStream = ListAndWatchStream;

    async fn list_and_watch(&self, _: Request<v1beta1::Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let Some(place) = self.state.open_stream() else {
            tracing::warn!(resource = %self.spec.name, "ListAndWatch refused: {MAX_STREAMS} streams are open already");
            return self
                .timed("ListAndWatch", async {
                    Err(Status::resource_exhausted(format!(
                        "resource {:?} already serves {MAX_STREAMS} ListAndWatch streams; close one first",
                        self.spec.name
                    )))
                })
                .await;
        };
        tracing::debug!(resource = %self.spec.name, "ListAndWatch stream opened");
        let open = (crate::telemetry::global().stream_opened(&self.spec.name), place);
        // WatchStream yields the current snapshot at once, then the latest
        // one after each change: bursts coalesce per stream.
        let stream = WatchStream::new(self.state.subscribe())
            .map(move |snapshot| {
                let _counted_while_open = &open;
                Ok(snapshot.message())
            })
            .take_until(self.stop.clone().cancelled_owned());
        self.timed("ListAndWatch", async { Ok(Response::new(Box::pin(stream) as Self::ListAndWatchStream)) }).await
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<v1beta1::PreferredAllocationRequest>,
    ) -> Result<Response<v1beta1::PreferredAllocationResponse>, Status> {
        self.timed("GetPreferredAllocation", async {
            let containers = request.into_inner().container_requests;
            self.bounded("container_requests", containers.len())?;
            let mut container_responses = Vec::new();
            for container in containers {
                let device_i_ds = self.preferred_for(container).await?;
                container_responses.push(v1beta1::ContainerPreferredAllocationResponse { device_i_ds });
            }
            Ok(Response::new(v1beta1::PreferredAllocationResponse { container_responses }))
        })
        .await
    }

    async fn allocate(
        &self,
        request: Request<v1beta1::AllocateRequest>,
    ) -> Result<Response<v1beta1::AllocateResponse>, Status> {
        self.timed_allocate(async {
            let containers = request.into_inner().container_requests;
            self.bounded("container_requests", containers.len())?;
            let mut container_responses = Vec::new();
            for container in containers {
                let ids = self.real_ids(&container.devices_ids)?;
                let resource = self.spec.name.clone();
                // A withheld device is not handed out even if the kubelet's
                // view lags: it is being scrubbed for its next tenant.
                let snapshot = self.state.snapshot();
                if let Some((id, why)) = ids.iter().find_map(|id| Some((id, snapshot.withheld.get(id)?))) {
                    return Err(Status::failed_precondition(format!(
                        "resource {resource:?}: device {id:?} cannot be handed out: {why}"
                    )));
                }
                // The IDs are kept for the CDI names only where there are any.
                let allocation = match &self.cdi {
                    Some(cdi) => {
                        let allocation = self.backend.allocate(&resource, ids.clone()).await?;
                        cdi.container(&ids, allocation).await
                    }
                    None => self.backend.allocate(&resource, ids).await?,
                };
                container_responses.push(to_proto(allocation));
            }
            Ok(Response::new(v1beta1::AllocateResponse { container_responses }))
        })
        .await
    }

    async fn pre_start_container(
        &self,
        request: Request<v1beta1::PreStartContainerRequest>,
    ) -> Result<Response<v1beta1::PreStartContainerResponse>, Status> {
        self.timed("PreStartContainer", async {
            let ids = self.real_ids(&request.into_inner().devices_ids)?;
            let resource = self.spec.name.clone();
            self.backend.pre_start(&resource, ids).await?;
            Ok(Response::new(v1beta1::PreStartContainerResponse {}))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(available: &[&str], must: &[&str], size: usize) -> PreferredRequest {
        let strings = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect();
        PreferredRequest { available: strings(available), must_include: strings(must), size }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn check_preferred_accepts_every_answer_that_keeps_the_contract() {
        // `available` repeating an ID counts it once.
        assert_eq!(check_preferred(&request(&["a", "a", "b"], &[], 3), &ids(&["a", "b"])), Ok(()));
        // More must-include IDs than the size: any of them will do.
        assert_eq!(check_preferred(&request(&["a", "b", "c"], &["a", "b"], 1), &ids(&["b"])), Ok(()));
        assert!(check_preferred(&request(&["a", "b", "c"], &["a", "b"], 1), &ids(&["c"])).is_err());
        assert!(check_preferred(&request(&["a", "b", "c"], &["a"], 2), &ids(&["b", "c"])).is_err());
        assert!(check_preferred(&request(&["a", "b"], &[], 1), &ids(&["a", "a"])).is_err());
    }
}
