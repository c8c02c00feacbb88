//! What a `NodePrepareResources` claim and its `ResourceClaim` may hold,
//! checked by Kubernetes' own rules before devhost acts on them (issue 26,
//! items 6 and 10; `docs/dra-api.md` §1).
//!
//! The kubelet's claim names the object devhost reads: its namespace and
//! name become segments of the request path (kube-rs formats them into
//! the URL as they are), so anything but a DNS name could point the read
//! at another object (`../../../api/v1/nodes`). Its UID names the CDI spec
//! file and the CDI devices. A claim that breaks a rule is refused before
//! any request, naming the field and never repeating more of its value
//! than [`echo`](crate::server::status::echo) does.
//!
//! The allocation read back is bounded as `resource.k8s.io/v1` bounds it
//! (`k8s.io/api` v0.37 `resource/v1/types.go`): at most
//! [`MAX_RESULTS`] results, each naming a request (a DNS label, or
//! `<request>/<subrequest>`), a pool (at most 253 characters) and a device
//! (a DNS label). A claim beyond them never came from a real API server;
//! it is refused before the backend is called or anything is written.

use std::borrow::Cow;

use k8s_openapi::api::resource::v1::DeviceRequestAllocationResult;

use crate::dra::names::is_dns_label;
use crate::proto::dra::v1;
use crate::server::status::{ECHO_LIMIT, echo};

/// The longest namespace: a DNS-1123 label (`validation.DNS1123LabelMaxLength`).
pub const MAX_NAMESPACE: usize = 63;
/// The longest object name: a DNS-1123 subdomain
/// (`validation.DNS1123SubdomainMaxLength`).
pub const MAX_NAME: usize = 253;
/// The longest claim UID devhost accepts (the API server's are 36-character
/// UUIDs).
pub const MAX_UID: usize = 128;
/// The most `status.allocation.devices.results` of a claim
/// (`AllocationResultsMaxSize`).
pub const MAX_RESULTS: usize = 32;
/// The longest pool name of a result (`PoolNameMaxLength`).
pub const MAX_POOL: usize = 253;
/// The longest request name of a result: `<request>/<subrequest>`, two DNS
/// labels.
pub const MAX_REQUEST: usize = 2 * 63 + 1;

/// `text` as an error message shows it: as it is when it is short and
/// plain, else quoted and cut by [`echo`].
pub fn shown(text: &str) -> Cow<'_, str> {
    if text.chars().count() <= ECHO_LIMIT && text.chars().all(|c| c.is_ascii_graphic()) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(echo(text))
    }
}

/// `claim <namespace>/<name> (<uid>)`, each part cut by [`shown`].
pub fn claim_label(claim: &v1::Claim) -> String {
    format!("claim {}/{} ({})", shown(&claim.namespace), shown(&claim.name), shown(&claim.uid))
}

/// Whether `name` is a DNS-1123 subdomain as Kubernetes checks object
/// names (`IsDNS1123Subdomain`): at most 253 characters, dot-separated
/// runs of lower-case letters, digits and `-` that start and end with a
/// letter or digit (a run may be longer than 63: generated claim names are).
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= MAX_NAME
        && name.split('.').all(|part| {
            let bytes = part.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// Why `text` is no DNS name of at most `max` characters (`what`: "a
/// DNS-1123 label", say), without repeating it.
fn not_dns(field: &str, text: &str, max: usize, what: &str) -> String {
    if text.is_empty() {
        format!("its {field} is empty")
    } else if text.len() > max {
        format!("its {field} is {} bytes long; {what} has at most {max}", text.len())
    } else {
        format!(
            "its {field} is not {what} (lower-case letters, digits and '-', starting and ending with one of the first two)"
        )
    }
}

/// Checks the kubelet's claim: namespace a DNS-1123 label, name a DNS-1123
/// subdomain, UID non-empty, at most [`MAX_UID`] printable ASCII
/// characters without `/`.
pub fn check_claim(claim: &v1::Claim) -> Result<(), String> {
    if !is_dns_label(&claim.namespace) {
        return Err(not_dns("namespace", &claim.namespace, MAX_NAMESPACE, "a DNS-1123 label"));
    }
    if !is_dns_subdomain(&claim.name) {
        return Err(not_dns("name", &claim.name, MAX_NAME, "a DNS-1123 subdomain"));
    }
    let uid = &claim.uid;
    if uid.is_empty() {
        return Err("its UID is empty".to_owned());
    }
    if uid.chars().count() > MAX_UID {
        return Err(format!("its UID is {} characters long; at most {MAX_UID} are accepted", uid.chars().count()));
    }
    if !uid.chars().all(|c| c.is_ascii_graphic() && c != '/') {
        return Err("its UID holds a character other than printable ASCII, or a '/'".to_owned());
    }
    Ok(())
}

/// Checks the claim's allocation results: at most [`MAX_RESULTS`] in all,
/// and each of `driver`'s naming its request, pool and device as the API
/// allows.
pub fn check_results(results: &[DeviceRequestAllocationResult], driver: &str) -> Result<(), String> {
    if results.len() > MAX_RESULTS {
        let own = results.iter().filter(|result| result.driver == driver).count();
        return Err(format!(
            "its allocation holds {} device results ({own} of driver {driver}); resource.k8s.io/v1 allows at most \
             {MAX_RESULTS} (AllocationResultsMaxSize)",
            results.len()
        ));
    }
    for (index, result) in results.iter().enumerate().filter(|(_, result)| result.driver == driver) {
        let request_ok = result.request.len() <= MAX_REQUEST && {
            let mut parts = result.request.splitn(2, '/');
            parts.all(is_dns_label)
        };
        if !request_ok {
            return Err(format!(
                "its allocation result {index} names a request of {} bytes that is no DNS-1123 label (or \
                 <request>/<subrequest> of two, at most {MAX_REQUEST} bytes)",
                result.request.len()
            ));
        }
        if result.pool.is_empty() || result.pool.len() > MAX_POOL {
            return Err(format!(
                "its allocation result {index} names a pool of {} bytes; a pool name has 1 to {MAX_POOL}",
                result.pool.len()
            ));
        }
        if !is_dns_label(&result.device) {
            return Err(format!(
                "its allocation result {index} names a device of {} bytes that is no DNS-1123 label (at most 63 \
                 lower-case letters, digits and '-')",
                result.device.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(namespace: &str, name: &str, uid: &str) -> v1::Claim {
        v1::Claim { namespace: namespace.into(), name: name.into(), uid: uid.into() }
    }

    fn result(request: &str, pool: &str, device: &str) -> DeviceRequestAllocationResult {
        DeviceRequestAllocationResult {
            request: request.into(),
            driver: "gpu.example.com".into(),
            pool: pool.into(),
            device: device.into(),
            ..Default::default()
        }
    }

    #[test]
    fn claims_are_checked_by_kubernetes_rules_and_never_echoed_whole() {
        assert_eq!(check_claim(&claim("ml", "one", "4f0c1e2a-1b2d-4e6f-9a7b-3c4d5e6f7a8b")), Ok(()));
        let generated = format!("{}.x", "a".repeat(100));
        assert_eq!(check_claim(&claim("ml", &generated, "u")), Ok(()), "a long run in a subdomain is allowed");
        assert_eq!(check_claim(&claim(&"a".repeat(63), &"b".repeat(253), &"c".repeat(128))), Ok(()));
        for (bad, field) in [
            (claim("../../../api/v1/nodes", "one", "u"), "namespace"),
            (claim("", "one", "u"), "namespace"),
            (claim(&"a".repeat(64), "one", "u"), "namespace"),
            (claim("ML", "one", "u"), "namespace"),
            (claim("ml", "../nodes", "u"), "name"),
            (claim("ml", "a/b", "u"), "name"),
            (claim("ml", "a..b", "u"), "name"),
            (claim("ml", &"b".repeat(254), "u"), "name"),
            (claim("ml", "one", ""), "UID"),
            (claim("ml", "one", "a/b"), "UID"),
            (claim("ml", "one", "a b"), "UID"),
            (claim("ml", "one", "a\nb"), "UID"),
            (claim("ml", "one", &"c".repeat(129)), "UID"),
        ] {
            let error = check_claim(&bad).expect_err(&format!("{bad:?} accepted"));
            assert!(error.starts_with(&format!("its {field} ")), "{error}");
        }
        let huge = claim(&"n".repeat(10_000), &"m".repeat(10_000), &"u".repeat(10_000));
        assert!(check_claim(&huge).expect_err("refused").len() < 200);
        let label = claim_label(&huge);
        assert!(label.len() < 3 * 200 && label.contains("… (10000 bytes in all)"), "{label}");
        assert_eq!(claim_label(&claim("ml", "one", "uid-1")), "claim ml/one (uid-1)");
    }

    #[test]
    fn allocations_are_bounded_as_the_api_bounds_them() {
        let ok: Vec<_> = (0..MAX_RESULTS).map(|i| result(&format!("r{i}"), "node-a", "gpu-0")).collect();
        assert_eq!(check_results(&ok, "gpu.example.com"), Ok(()));
        let mut too_many = ok.clone();
        too_many.push(DeviceRequestAllocationResult { driver: "nic.example.com".into(), ..result("n", "p", "d") });
        let error = check_results(&too_many, "gpu.example.com").expect_err("33 results");
        assert!(error.contains("33 device results (32 of driver gpu.example.com)") && error.contains("at most 32"));
        let sub = format!("{}/{}", "a".repeat(63), "b".repeat(63));
        assert_eq!(check_results(&[result(&sub, &"p".repeat(253), &"d".repeat(63))], "gpu.example.com"), Ok(()));
        for bad in [
            result(&"a".repeat(64), "node-a", "gpu-0"),
            result("a/b/c", "node-a", "gpu-0"),
            result("", "node-a", "gpu-0"),
            result("gpus", &"p".repeat(254), "gpu-0"),
            result("gpus", "", "gpu-0"),
            result("gpus", "node-a", &"d".repeat(64)),
            result("gpus", "node-a", "x/../y"),
        ] {
            let error = check_results(std::slice::from_ref(&bad), "gpu.example.com").expect_err("refused");
            assert!(error.starts_with("its allocation result 0 names a "), "{error}");
        }
        let theirs = DeviceRequestAllocationResult { driver: "nic.example.com".into(), ..result("", "", "") };
        assert_eq!(check_results(&[theirs], "gpu.example.com"), Ok(()), "another driver's results are its own");
    }
}
