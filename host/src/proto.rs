//! The kubelet's device plugin API (`v1beta1`), generated at build time from
//! `proto/deviceplugin/v1beta1/api.proto`, plus the API's constants.
//!
//! Generated types stay at the edge: the servers and clients use them, the
//! backend contract (`crate::backend`) has its own domain types.

/// Generated messages, clients and servers of package `v1beta1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
    pub use super::list::ListAndWatchResponse;
}

mod list;

/// The kubelet's PodResources API (package `v1`), generated from
/// `proto/podresources/v1/api.proto`; facts in `docs/pod-resources-api.md`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod podresources {
    tonic::include_proto!("v1");
}

/// The compiled `FileDescriptorSet` of the PodResources proto.
pub const POD_RESOURCES_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/podresources_descriptor.bin"));
/// The kubelet's PodResources socket under its default root directory.
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// The receive limit for PodResources answers: a `List` on a big node can
/// exceed gRPC's 4 MiB default (upstream's own clients use 16 MiB).
pub const POD_RESOURCES_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The compiled `FileDescriptorSet` of the proto, for wire-contract tests.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/deviceplugin_descriptor.bin"));

/// The only API version the kubelet accepts in `RegisterRequest.version`.
pub const API_VERSION: &str = "v1beta1";
/// Health string of a usable device (compared exactly by the kubelet).
pub const HEALTHY: &str = "Healthy";
/// Health string of an unusable device.
pub const UNHEALTHY: &str = "Unhealthy";
/// The kubelet's registration socket, inside the plugin directory.
pub const KUBELET_SOCKET_NAME: &str = "kubelet.sock";
/// The kubelet's hard-coded device plugin directory.
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// grpc-go's default receive limit, which the kubelet never raises: every
/// message devhost sends must be smaller than this.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// The kubelet's deadline for `PreStartContainer`, in seconds.
pub const PRE_START_TIMEOUT_SECS: u64 = 30;
