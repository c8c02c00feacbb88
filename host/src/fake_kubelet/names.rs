//! The kubelet's rule for a device plugin's resource name, transcribed here
//! on its own from the kubelet's source (API facts §3: `Register` refuses a
//! name unless `IsExtendedResourceName` holds), and deliberately not
//! shared with devhost's `resource_name` module: the fake kubelet is the
//! oracle the end-to-end tests judge devhost by, so a bug in devhost's rule
//! must not be a bug in the oracle too. Both are checked against the same
//! table of cases from Kubernetes' own tests (see the tests below).

/// `IsExtendedResourceName`: not native, not `requests.`-prefixed, and a
/// qualified name once `requests.` is put in front (as resource quota does).
pub(super) fn is_extended_resource_name(name: &str) -> bool {
    !is_native_resource(name) && !name.starts_with("requests.") && is_qualified_name(&format!("requests.{name}"))
}

/// `IsNativeResource`: no `/`, or `kubernetes.io/` anywhere in it.
fn is_native_resource(name: &str) -> bool {
    !name.contains('/') || name.contains("kubernetes.io/")
}

/// `IsQualifiedName`: `[prefix/]name`, the prefix a DNS-1123 subdomain, the
/// name at most 63 characters of `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn is_qualified_name(value: &str) -> bool {
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() || !is_dns1123_subdomain(prefix) {
                return false;
            }
            *name
        }
        _ => return false,
    };
    let bytes = name.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
}

/// At most 253 characters of `[a-z0-9]([-a-z0-9]*[a-z0-9])?` labels joined
/// by dots.
fn is_dns1123_subdomain(value: &str) -> bool {
    let label = |label: &str| {
        let bytes = label.as_bytes();
        let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        bytes.first().is_some_and(edge) && bytes.last().is_some_and(edge) && bytes.iter().all(|b| edge(b) || *b == b'-')
    };
    value.len() <= 253 && value.split('.').all(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases: Kubernetes' own `TestIsExtendedResourceName` tables (the
    /// core v1 helper's and the kubelet metrics collector's copy: `a/b`,
    /// `foo`, `kubernetes.io/resource-foo`,
    /// `pod.alpha.kubernetes.io/opaque-int-resource-foo`,
    /// `requests.foobar`, `c/d/`, the empty name), then the limits API facts
    /// §3 derives from `IsQualifiedName` (lengths, case, `kubernetes.io/`
    /// anywhere), then the names devhost's examples use. Listed in
    /// `docs/resource-names.md`.
    pub(crate) const CASES: &[(&str, bool)] = &[
        ("a/b", true),
        ("foo", false),
        ("kubernetes.io/resource-foo", false),
        ("pod.alpha.kubernetes.io/opaque-int-resource-foo", false),
        ("requests.foobar", false),
        ("c/d/", false),
        ("", false),
        ("example.com/gpu", true),
        ("nvidia.com/gpu", true),
        ("example.com/GPU_x.y-z", true),
        ("Example.com/gpu", false),
        ("example.com/", false),
        ("/gpu", false),
        ("example.com/gpu/0", false),
        ("xkubernetes.io/x", false),
        ("foo.kubernetes.io/x", false),
        ("requests.example.com/x", false),
        ("example.com/-gpu", false),
        ("example.com/gpu-", false),
        ("exa_mple.com/gpu", false),
        ("example..com/gpu", false),
        ("-example.com/gpu", false),
    ];

    #[test]
    fn the_transcription_agrees_with_kubernetes_cases() {
        for (name, expected) in CASES {
            assert_eq!(is_extended_resource_name(name), *expected, "{name:?}");
        }
    }

    #[test]
    fn lengths_at_the_limits() {
        let name63 = "n".repeat(63);
        assert!(is_extended_resource_name(&format!("example.com/{name63}")));
        assert!(!is_extended_resource_name(&format!("example.com/{name63}n")));
        // 253 − len("requests.") = 244 characters of domain.
        let domain = |len: usize| {
            let mut d = "a.".repeat(len / 2);
            d.truncate(len - 1);
            d + "a"
        };
        assert_eq!(domain(244).len(), 244);
        assert!(is_extended_resource_name(&format!("{}/x", domain(244))));
        assert!(!is_extended_resource_name(&format!("{}/x", domain(245))));
    }

    #[test]
    fn devhost_agrees_with_the_transcription_on_every_case() {
        for (name, expected) in CASES {
            assert_eq!(crate::resource_name::validate(name).is_ok(), *expected, "devhost's rule on {name:?}");
        }
    }
}
