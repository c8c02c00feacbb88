//! Dialling a gRPC server on a Unix socket: devhost dialling the kubelet,
//! and the fakes dialling devhost the way the real kubelet does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::authority::Rewritten;

/// Connects a gRPC channel to the socket at `path`, with `:authority`
/// `localhost` as the kubelet's device manager and DRA client send it,
/// giving up after `timeout`.
pub async fn connect(path: &Path, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    endpoint(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Like [`connect`], but every request carries `authority` as its
/// `:authority`, byte for byte, whether or not it is a valid URI authority:
/// what a client that is not the device manager sends (the plugin watcher's
/// grpc-go sends the percent-encoded socket path, see [`plugin_watcher_authority`]).
pub async fn connect_as(path: &Path, timeout: Duration, authority: &[u8]) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    let authority = authority.to_vec();
    endpoint(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            let authority = authority.clone();
            async move { UnixStream::connect(path).await.map(|stream| TokioIo::new(Rewritten::client(stream, authority))) }
        }))
        .await
}

/// The `:authority` grpc-go sends when dialled with a bare socket path and
/// no `WithAuthority` (the kubelet's plugin watcher), as gRPC C-core does
/// for a `unix:` target: the path with every byte outside RFC 3986's
/// unreserved set, sub-delimiters and `:`, `[`, `]`, `@` percent-encoded, so
/// `/var/lib/x.sock` is `%2Fvar%2Flib%2Fx.sock`.
pub fn plugin_watcher_authority(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut encoded = Vec::new();
    for &byte in path.as_os_str().as_bytes() {
        let kept = byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]@".contains(&byte);
        if kept {
            encoded.push(byte);
        } else {
            encoded.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
    }
    encoded
}

/// The URI tonic requires; its authority is what [`connect`] sends, the
/// connectors ignore the rest.
fn endpoint(timeout: Duration) -> Endpoint {
    Endpoint::from_static("http://localhost").connect_timeout(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_watcher_authority_is_the_percent_encoded_path() {
        let path = Path::new("/var/lib/kubelet/plugins_registry/gpu.example.com-0a1b2c3d-reg.sock");
        assert_eq!(
            plugin_watcher_authority(path),
            b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.example.com-0a1b2c3d-reg.sock"
        );
        assert_eq!(plugin_watcher_authority(Path::new("/a b%/c")), b"%2Fa%20b%25%2Fc");
    }
}
