//! The kubelet's device plugin API (`v1beta1`), generated at build time from
//! `proto/deviceplugin/v1beta1/api.proto`, plus the API's constants.
//!
//! Generated types stay at the edge: the servers and clients use them, the
//! backend contract (`crate::backend`) has its own domain types.

/// Generated messages, clients and servers of package `v1beta1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
    pub use super::list::{ListAndWatchResponse, encode_device};
}

mod list;

/// The kubelet's PodResources API (package `v1`), generated from
/// `proto/podresources/v1/api.proto`; facts in `docs/pod-resources-api.md`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod podresources {
    include!(concat!(env!("OUT_DIR"), "/podresources/v1.rs"));
}

/// The compiled `FileDescriptorSet` of the PodResources proto.
pub const POD_RESOURCES_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/podresources_descriptor.bin"));

/// The kubelet's DRA APIs (`docs/dra-api.md`): `DRAPlugin` in its `v1` and
/// `v1beta1` packages, `DRAResourceHealth` v1, and the plugin watcher's
/// `pluginregistration` through which a DRA driver registers.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod dra {
    /// `k8s.io.kubelet.pkg.apis.dra.v1`.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/dra_v1/k8s.io.kubelet.pkg.apis.dra.v1.rs"));
    }
    /// `k8s.io.kubelet.pkg.apis.dra.v1beta1`: the same contract for
    /// kubelets 1.32 and 1.33.
    pub mod v1beta1 {
        include!(concat!(env!("OUT_DIR"), "/dra_v1beta1/k8s.io.kubelet.pkg.apis.dra.v1beta1.rs"));
    }
    /// `DRAResourceHealth`, package `v1` (kubelets from 1.37 open it when
    /// the plugin lists it).
    pub mod health {
        include!(concat!(env!("OUT_DIR"), "/dra_health/v1.rs"));

        /// `DRAResourceHealth`, package `v1alpha1` (a 1.36 kubelet opens it
        /// on every DRA plugin): the service only, over `v1`'s messages,
        /// which are the same on the wire.
        pub mod v1alpha1 {
            include!(concat!(env!("OUT_DIR"), "/dra_health_v1alpha1/v1alpha1.rs"));
        }
    }
    /// The plugin watcher's `pluginregistration` package.
    pub mod pluginregistration {
        include!(concat!(env!("OUT_DIR"), "/pluginregistration/pluginregistration.rs"));
    }

    /// The compiled descriptor sets, for wire-contract tests.
    pub const V1_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dra_v1_descriptor.bin"));
    /// See [`V1_DESCRIPTOR_SET`].
    pub const V1BETA1_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dra_v1beta1_descriptor.bin"));
    /// See [`V1_DESCRIPTOR_SET`].
    pub const HEALTH_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dra_health_descriptor.bin"));
    /// See [`V1_DESCRIPTOR_SET`].
    pub const PLUGIN_REGISTRATION_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pluginregistration_descriptor.bin"));
}
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
