//! Extended resource name rules, exactly as the kubelet's `Register` applies
//! them (`IsExtendedResourceName`): one `/`, no `kubernetes.io/`, no
//! `requests.` prefix, a lower-case DNS subdomain as domain (at most 244
//! characters, so that `requests.<domain>` fits 253) and a 1–63 character
//! qualified name part.
//!
//! Used by config validation (so a bad name is caught with file:line:column
//! before anything starts) and by the fake kubelet (so tests see the
//! kubelet's own refusal).

use thiserror::Error;

/// Why a resource name is not a valid extended resource name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResourceNameError {
    /// No `/` (the kubelet treats such a name as a native resource).
    #[error("resource name {0:?} must have the form <domain>/<name>, for example example.com/gpu")]
    MissingSlash(String),
    /// More than one `/`.
    #[error("resource name {0:?} must contain exactly one '/'")]
    TooManySlashes(String),
    /// Contains `kubernetes.io/`, which is reserved for native resources.
    #[error("resource name {0:?} must not contain \"kubernetes.io/\" (reserved for native resources)")]
    ReservedDomain(String),
    /// Starts with `requests.`.
    #[error("resource name {0:?} must not start with \"requests.\"")]
    RequestsPrefix(String),
    /// The domain is not a lower-case DNS subdomain of at most 244 characters.
    #[error(
        "domain {domain:?} of resource name {name:?} must be a lower-case DNS subdomain of at most 244 characters ([a-z0-9] labels separated by '.', '-' only inside a label)"
    )]
    BadDomain {
        /// The whole name.
        name: String,
        /// Its domain part.
        domain: String,
    },
    /// The name part is empty, too long or has bad characters.
    #[error(
        "name part {part:?} of resource name {name:?} must be 1-63 characters of [A-Za-z0-9], '-', '_' or '.', starting and ending with a letter or digit"
    )]
    BadName {
        /// The whole name.
        name: String,
        /// Its name part.
        part: String,
    },
}

/// Longest domain: 253 (DNS subdomain) minus `requests.`.
const MAX_DOMAIN_LEN: usize = 253 - "requests.".len();
const MAX_NAME_LEN: usize = 63;

/// Checks `name` against the kubelet's extended resource name rules.
pub fn validate(name: &str) -> Result<(), ResourceNameError> {
    let owned = || name.to_owned();
    if name.contains("kubernetes.io/") {
        return Err(ResourceNameError::ReservedDomain(owned()));
    }
    if name.starts_with("requests.") {
        return Err(ResourceNameError::RequestsPrefix(owned()));
    }
    let Some((domain, part)) = name.split_once('/') else {
        return Err(ResourceNameError::MissingSlash(owned()));
    };
    if part.contains('/') {
        return Err(ResourceNameError::TooManySlashes(owned()));
    }
    if domain.len() > MAX_DOMAIN_LEN || !is_dns_subdomain(domain) {
        return Err(ResourceNameError::BadDomain { name: owned(), domain: domain.to_owned() });
    }
    if part.is_empty() || part.len() > MAX_NAME_LEN || !is_qualified_name_part(part) {
        return Err(ResourceNameError::BadName { name: owned(), part: part.to_owned() });
    }
    Ok(())
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
fn is_dns_subdomain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.split('.').all(|label| {
            let bytes = label.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            match (bytes.first(), bytes.last()) {
                (Some(first), Some(last)) => {
                    alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
                }
                _ => false,
            }
        })
}

/// `^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`
fn is_qualified_name_part(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "example.com/gpu",
            "nvidia.com/gpu",
            "a/b",
            "vendor.example.org/Shared_GPU.v2",
            "intel.com/sriov-net-a",
            "x1.y-2.z/N",
        ] {
            assert_eq!(validate(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_native_and_reserved_names() {
        assert!(matches!(validate("gpu"), Err(ResourceNameError::MissingSlash(_))));
        assert!(matches!(validate("kubernetes.io/gpu"), Err(ResourceNameError::ReservedDomain(_))));
        assert!(matches!(validate("foo.kubernetes.io/gpu"), Err(ResourceNameError::ReservedDomain(_))));
        assert!(matches!(validate("xkubernetes.io/gpu"), Err(ResourceNameError::ReservedDomain(_))));
        assert!(matches!(validate("requests.example.com/gpu"), Err(ResourceNameError::RequestsPrefix(_))));
        assert!(matches!(validate("a/b/c"), Err(ResourceNameError::TooManySlashes(_))));
    }

    #[test]
    fn domain_must_be_lower_case_subdomain() {
        for bad in ["Example.com/gpu", "/gpu", "-a.com/gpu", "a-.com/gpu", "a..com/gpu", "a_b.com/gpu"] {
            assert!(matches!(validate(bad), Err(ResourceNameError::BadDomain { .. })), "{bad}");
        }
        let longest = "a".repeat(244);
        assert_eq!(validate(&format!("{longest}/x")), Ok(()));
        let too_long = "a".repeat(245);
        assert!(matches!(validate(&format!("{too_long}/x")), Err(ResourceNameError::BadDomain { .. })));
    }

    #[test]
    fn name_part_rules() {
        assert_eq!(validate(&format!("a.com/{}", "n".repeat(63))), Ok(()));
        for bad in ["a.com/", "a.com/-x", "a.com/x-", "a.com/x y", "a.com/x=y"] {
            assert!(matches!(validate(bad), Err(ResourceNameError::BadName { .. })), "{bad}");
        }
        assert!(matches!(validate(&format!("a.com/{}", "n".repeat(64))), Err(ResourceNameError::BadName { .. })));
    }
}
