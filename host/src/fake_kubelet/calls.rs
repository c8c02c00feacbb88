//! The kubelet's calls into a registered plugin besides registration:
//! `Allocate`, `GetPreferredAllocation` and `PreStartContainer` shaped as the
//! kubelet sends them (§2.10, §2.12), and a raw client. It does not decide
//! when the kubelet would call them (no allocation bookkeeping).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::Channel;

use super::registration::DIAL_TIMEOUT;
use super::{FakeKubelet, FakeKubeletError};
use crate::proto::v1beta1::device_plugin_client::DevicePluginClient;
use crate::proto::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest, ContainerPreferredAllocationRequest,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
};

/// The kubelet's `PreStartContainer` deadline (§2.12).
const PRE_START_TIMEOUT: Duration = Duration::from_secs(crate::proto::PRE_START_TIMEOUT_SECS);

impl FakeKubelet {
    /// A client on the plugin's socket (the endpoint of its latest
    /// registration), for raw calls. Uses the kubelet's own connection while
    /// it is open, otherwise dials the socket afresh.
    pub async fn client(&self, resource: &str) -> Result<DevicePluginClient<Channel>, FakeKubeletError> {
        let (socket, channel) = self.current_endpoint(resource)?;
        let channel = match channel {
            Some(channel) => channel,
            None => crate::sockets::client::connect(&socket, DIAL_TIMEOUT)
                .await
                .map_err(|source| FakeKubeletError::Dial { resource: resource.to_owned(), socket, source })?,
        };
        Ok(DevicePluginClient::new(channel))
    }

    /// Allocate as the kubelet sends it: exactly one
    /// ContainerAllocateRequest. Refused like the kubelet when the endpoint is
    /// stopped. The response is returned as received (the kubelet would
    /// reject one without container responses and use only the first).
    pub async fn allocate(&self, resource: &str, ids: &[&str]) -> Result<AllocateResponse, FakeKubeletError> {
        let request =
            AllocateRequest { container_requests: vec![ContainerAllocateRequest { devices_ids: strings(ids) }] };
        let mut client = self.live_client(resource)?;
        client
            .allocate(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| rpc_error(resource, "Allocate", status))
    }

    /// GetPreferredAllocation as the kubelet sends it: exactly one
    /// ContainerPreferredAllocationRequest. Does not check the plugin's
    /// `get_preferred_allocation_available` option (the kubelet would not call
    /// without it; see [`FakeKubelet::options`]).
    pub async fn preferred_allocation(
        &self,
        resource: &str,
        available: &[&str],
        must_include: &[&str],
        size: i32,
    ) -> Result<PreferredAllocationResponse, FakeKubeletError> {
        let request = PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: strings(available),
                must_include_device_i_ds: strings(must_include),
                allocation_size: size,
            }],
        };
        let mut client = self.live_client(resource)?;
        client
            .get_preferred_allocation(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| rpc_error(resource, "GetPreferredAllocation", status))
    }

    /// PreStartContainer as the kubelet sends it, with its 30 s deadline. Does
    /// not check the plugin's `pre_start_required` option.
    pub async fn pre_start(&self, resource: &str, ids: &[&str]) -> Result<PreStartContainerResponse, FakeKubeletError> {
        let mut request = tonic::Request::new(PreStartContainerRequest { devices_ids: strings(ids) });
        request.set_timeout(PRE_START_TIMEOUT);
        let mut client = self.live_client(resource)?;
        match tokio::time::timeout(PRE_START_TIMEOUT, client.pre_start_container(request)).await {
            Ok(result) => result
                .map(tonic::Response::into_inner)
                .map_err(|status| rpc_error(resource, "PreStartContainer", status)),
            Err(_) => Err(rpc_error(
                resource,
                "PreStartContainer",
                tonic::Status::deadline_exceeded(format!("no answer within {PRE_START_TIMEOUT:?}")),
            )),
        }
    }

    /// The socket and, while open, the kubelet's channel of the current
    /// connection.
    fn current_endpoint(&self, resource: &str) -> Result<(PathBuf, Option<Channel>), FakeKubeletError> {
        self.with_resource(resource, |r| r.current().map(|c| (c.socket.clone(), c.channel.clone())))
            .flatten()
            .ok_or_else(|| FakeKubeletError::NotRegistered { resource: resource.to_owned() })
    }

    /// The kubelet's open connection, or the kubelet's refusal (§2.5).
    fn live_client(&self, resource: &str) -> Result<DevicePluginClient<Channel>, FakeKubeletError> {
        match self.current_endpoint(resource)? {
            (_, Some(channel)) => Ok(DevicePluginClient::new(channel)),
            (socket, None) => Err(FakeKubeletError::EndpointStopped { resource: resource.to_owned(), socket }),
        }
    }
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

fn rpc_error(resource: &str, rpc: &'static str, status: tonic::Status) -> FakeKubeletError {
    FakeKubeletError::Rpc { resource: resource.to_owned(), rpc, status }
}
