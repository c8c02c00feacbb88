//! One question to the kubelet's PodResources API: which containers hold
//! which devices (`v1.PodResourcesLister/List`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tonic::transport::Channel;

use super::{Holder, Holdings};
use crate::proto::POD_RESOURCES_MAX_MESSAGE_BYTES;
use crate::proto::podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::proto::podresources::{ListPodResourcesRequest, ListPodResourcesResponse};

/// Why the kubelet could not say who holds what.
#[derive(Debug, Error)]
pub enum PodResourcesError {
    /// Nothing listens on the socket (no kubelet, an older or locked-down
    /// one, or the directory is not mounted).
    #[error("cannot connect to the kubelet's PodResources API at {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// There is no socket file (no kubelet, or the directory is not
    /// mounted): not dialled, which costs far more than looking.
    #[error("the kubelet's PodResources API is not there: no socket at {}", socket.display())]
    Absent {
        /// The socket.
        socket: PathBuf,
    },
    /// The kubelet answered with an error.
    #[error("the kubelet's PodResources API at {} refused List: {} ({:?})", socket.display(), status.message(), status.code())]
    Call {
        /// The socket.
        socket: PathBuf,
        /// The answer.
        status: tonic::Status,
    },
    /// No answer within the deadline.
    #[error("the kubelet's PodResources API at {} did not answer List within {after:?}", socket.display())]
    TimedOut {
        /// The socket.
        socket: PathBuf,
        /// The deadline.
        after: Duration,
    },
}

impl PodResourcesError {
    /// The kubelet's rate limit refused the call: ask less often.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, PodResourcesError::Call { status, .. } if status.code() == tonic::Code::ResourceExhausted)
    }
}

/// A connection to the PodResources socket, made on first use and again
/// after [`PodResourcesClient::reset`].
#[derive(Debug)]
pub struct PodResourcesClient {
    socket: PathBuf,
    timeout: Duration,
    client: Option<PodResourcesListerClient<Channel>>,
}

impl PodResourcesClient {
    /// A client for `socket`; each call ends after `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        PodResourcesClient { socket: socket.to_owned(), timeout, client: None }
    }

    /// Drops the connection: the next call dials the socket afresh (a
    /// restarted kubelet listens on a new socket at the same path).
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// Who holds which device now.
    pub async fn holdings(&mut self) -> Result<Holdings, PodResourcesError> {
        let socket = self.socket.clone();
        let answer = tokio::time::timeout(self.timeout, self.list()).await;
        let answer = answer.map_err(|_| PodResourcesError::TimedOut { socket, after: self.timeout });
        match answer.and_then(|answer| answer) {
            Ok(answer) => Ok(holdings(answer)),
            Err(error) => {
                self.reset();
                Err(error)
            }
        }
    }

    async fn list(&mut self) -> Result<ListPodResourcesResponse, PodResourcesError> {
        let client = match &mut self.client {
            Some(client) => client,
            None => {
                if std::fs::symlink_metadata(&self.socket).is_err() {
                    return Err(PodResourcesError::Absent { socket: self.socket.clone() });
                }
                let channel = crate::sockets::client::connect(&self.socket, self.timeout)
                    .await
                    .map_err(|source| PodResourcesError::Connect { socket: self.socket.clone(), source })?;
                self.client.insert(
                    PodResourcesListerClient::new(channel).max_decoding_message_size(POD_RESOURCES_MAX_MESSAGE_BYTES),
                )
            }
        };
        let answer = client.list(ListPodResourcesRequest {}).await;
        answer
            .map(tonic::Response::into_inner)
            .map_err(|status| PodResourcesError::Call { socket: self.socket.clone(), status })
    }
}

/// Asks once (for `devhost list`).
pub async fn holdings_once(socket: &Path, timeout: Duration) -> Result<Holdings, PodResourcesError> {
    PodResourcesClient::new(socket, timeout).holdings().await
}

/// Turns a `List` answer into holdings. The kubelet sends one entry per
/// device and NUMA node, in no stable order, possibly several IDs in one
/// entry (older kubelets): every holder is kept once, sorted.
fn holdings(answer: ListPodResourcesResponse) -> Holdings {
    let mut holdings = Holdings::new();
    for pod in answer.pod_resources {
        for container in pod.containers {
            for devices in container.devices {
                let resource = holdings.entry(devices.resource_name).or_default();
                for id in devices.device_ids {
                    resource.entry(id).or_default().push(Holder {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                    });
                }
            }
        }
    }
    for holders in holdings.values_mut().flat_map(|devices| devices.values_mut()) {
        holders.sort();
        holders.dedup();
    }
    holdings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::podresources::{ContainerDevices, ContainerResources, NumaNode, PodResources, TopologyInfo};

    fn devices(resource: &str, ids: &[&str], numa: Option<i64>) -> ContainerDevices {
        ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            topology: numa.map(|id| TopologyInfo { nodes: vec![NumaNode { id }] }),
        }
    }

    #[test]
    fn one_holder_per_container_whatever_the_entries() {
        let container = |name: &str, devices: Vec<ContainerDevices>| ContainerResources {
            name: name.into(),
            devices,
            ..Default::default()
        };
        let answer = ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "train".into(),
                    namespace: "ml".into(),
                    containers: vec![
                        // A device on two NUMA nodes appears twice; an old
                        // kubelet groups IDs.
                        container(
                            "main",
                            vec![
                                devices("example.com/gpu", &["gpu-0"], Some(0)),
                                devices("example.com/gpu", &["gpu-0"], Some(1)),
                            ],
                        ),
                        container("side", vec![devices("example.com/gpu", &["gpu-1", "gpu-2"], None)]),
                        container("idle", vec![]),
                    ],
                },
                PodResources {
                    name: "nic".into(),
                    namespace: "net".into(),
                    containers: vec![container("c", vec![devices("example.com/vf", &["vf-3"], None)])],
                },
            ],
        };
        let holdings = holdings(answer);
        let gpus = &holdings["example.com/gpu"];
        let holder = |pod: &str, container: &str, ns: &str| Holder {
            namespace: ns.into(),
            pod: pod.into(),
            container: container.into(),
        };
        assert_eq!(gpus["gpu-0"], vec![holder("train", "main", "ml")]);
        assert_eq!(gpus["gpu-2"], vec![holder("train", "side", "ml")]);
        assert_eq!(gpus.len(), 3);
        assert_eq!(holdings["example.com/vf"]["vf-3"][0].to_string(), "net/nic/c");
    }

    /// Against the fake kubelet's endpoint (a real socket): holders come
    /// back, a burst beyond the kubelet's rate limit is told apart, and a
    /// replaced socket is followed after `reset`.
    #[tokio::test]
    async fn asks_the_kubelet_and_knows_its_rate_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("pod-resources/kubelet.sock");
        let kubelet = crate::fake_kubelet::FakePodResources::start(&socket).await.expect("fake");
        kubelet.assign_on_numa("ns", "pod", "c", "example.com/gpu", &["gpu-0"], &[0, 1]);
        let mut client = PodResourcesClient::new(&socket, Duration::from_secs(5));
        let holdings = client.holdings().await.expect("an answer");
        assert_eq!(holdings["example.com/gpu"]["gpu-0"].len(), 1, "one holder, though listed per NUMA node");
        let mut limited = None;
        for _ in 0..20 {
            if let Err(error) = client.holdings().await {
                limited = Some(error);
                break;
            }
        }
        let limited = limited.expect("a burst of 20 exceeds the kubelet's 10");
        assert!(limited.is_rate_limited(), "{limited}");
        assert!(limited.to_string().contains("rejected by rate limit"), "{limited}");

        kubelet.restart().await.expect("restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.reset();
        assert!(client.holdings().await.is_ok(), "the new socket answers");
        kubelet.stop().await;
        // The open connection dies with the kubelet; the next call dials.
        client.holdings().await.expect_err("the kubelet went away");
        // Its socket is gone: said so, without dialling.
        let error = client.holdings().await.expect_err("no kubelet");
        assert!(matches!(error, PodResourcesError::Absent { .. }), "{error}");
        assert!(error.to_string().starts_with("the kubelet's PodResources API is not there: no socket at"), "{error}");
        // A socket file nothing listens on (a dead kubelet's) is dialled.
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
        let error = client.holdings().await.expect_err("nothing listens");
        assert!(error.to_string().starts_with("cannot connect to the kubelet's PodResources API at"), "{error}");
    }
}
