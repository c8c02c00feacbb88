//! Reading one ResourceClaim from the API server, bounded: the whole
//! answer (headers and body) within [`READ_DEADLINE`], at most
//! [`MAX_CLAIM_BYTES`] of it, and never a body in a log line or an error.
//! kube-rs's `Api::get` bounds neither (its read timeout restarts at every
//! byte, so a server dripping one byte a second holds a prepare for ever)
//! and logs a body it cannot parse whole.

use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::core::{Request, Resource};

/// The whole read of one claim, headers and body.
pub const READ_DEADLINE: Duration = Duration::from_secs(20);
/// The largest claim devhost reads: the API server refuses objects over
/// 1.5 MiB (etcd's request limit) and requests over 3 MiB.
pub const MAX_CLAIM_BYTES: usize = 3 << 20;
/// The most characters of an API server's error message an error repeats.
/// Its messages name what was refused and why, the missing permission
/// included (a refused status write's is about 350 characters): they are
/// kept whole, unlike a client's input, which is cut much shorter.
pub const API_MESSAGE_LIMIT: usize = 1024;

/// The `message` of the API server's error answer `body` (a `Status`),
/// quoted and bounded; `None` if it is not one.
pub fn api_server_message(body: &[u8]) -> Option<String> {
    let status = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    status["message"].as_str().map(|message| crate::server::status::echo_within(message, API_MESSAGE_LIMIT))
}

/// `namespace/name`, as the API server has it; the error says why not,
/// without the body.
pub async fn claim(client: &kube::Client, namespace: &str, name: &str) -> Result<ResourceClaim, String> {
    match tokio::time::timeout(READ_DEADLINE, read(client, namespace, name)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "cannot read the ResourceClaim: the API server did not answer in full within {READ_DEADLINE:?}"
        )),
    }
}

async fn read(client: &kube::Client, namespace: &str, name: &str) -> Result<ResourceClaim, String> {
    let request = Request::new(ResourceClaim::url_path(&(), Some(namespace)))
        .get(name, &Default::default())
        .map_err(|error| format!("cannot build the ResourceClaim request: {error}"))?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|error| format!("cannot read the ResourceClaim: {error}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| format!("cannot read the ResourceClaim: {error}"))?;
        if let Some(data) = frame.data_ref() {
            if text.len() + data.len() > MAX_CLAIM_BYTES {
                return Err(format!("the API server's answer for the ResourceClaim is over {MAX_CLAIM_BYTES} bytes"));
            }
            text.extend_from_slice(data);
        }
    }
    if status == http::StatusCode::NOT_FOUND {
        return Err("no such ResourceClaim on the API server".into());
    }
    if !status.is_success() {
        let message = api_server_message(&text);
        return Err(format!(
            "cannot read the ResourceClaim: the API server answered {status}{}",
            message.map(|message| format!(": {message}")).unwrap_or_default()
        ));
    }
    serde_json::from_slice(&text)
        .map_err(|error| format!("the API server's answer is not a ResourceClaim ({} bytes): {error}", text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_server_refusal_is_quoted_whole_up_to_its_limit() {
        // The real kube-apiserver's answer to a status write without the
        // resourceclaims/driver right (1.37): what is missing is at its end.
        let message = "ResourceClaim.resource.k8s.io \"c\" is invalid: status.devices: Forbidden: changing \
             status.devices requires resource=\"resourceclaims/driver\", verb=\"[arbitrary-node:update]\" \
             permission: resourceclaims.resource.k8s.io \"gpu.example.com\" is forbidden: User \
             \"system:serviceaccount:devhost:devhost\" cannot arbitrary-node:update resource \
             \"resourceclaims/driver\" in API group \"resource.k8s.io\" in the namespace \"default\"";
        let body = serde_json::json!({"kind": "Status", "status": "Failure", "message": message, "code": 422});
        let quoted = api_server_message(body.to_string().as_bytes()).expect("a Status");
        assert_eq!(quoted, format!("{message:?}"));
        assert!(quoted.contains("arbitrary-node:update resource \\\"resourceclaims/driver\\\""), "{quoted}");

        let long = "x".repeat(5000);
        let quoted = api_server_message(serde_json::json!({"message": long}).to_string().as_bytes()).expect("a Status");
        assert!(quoted.ends_with("… (5000 bytes in all)"), "{quoted}");
        assert_eq!(quoted.chars().filter(|c| *c == 'x').count(), API_MESSAGE_LIMIT);
        assert_eq!(api_server_message(b"<html>bad gateway</html>"), None);
    }
}
