//! `devhost::resource_name::validate` against a literal transcription of
//! the kubelet's rule (API_FACTS §3): `IsExtendedResourceName(name) =
//! !IsNativeResource(name) && !HasPrefix(name, "requests.") &&
//! IsQualifiedName("requests." + name)`. devhost derives its checks from
//! that rule (a 244-character domain, and so on); this reference does not
//! derive anything, so the two must agree on every string.

use arbitrary::Unstructured;

use crate::Target;

/// The target.
pub struct ResourceName;

/// Pieces names are built from: the edges of every rule.
const PIECES: &[&str] = &[
    "a",
    "z",
    "0",
    "9",
    "A",
    "Z",
    "-",
    "_",
    ".",
    "/",
    "example",
    "com",
    "kubernetes.io/",
    "kubernetes.io",
    "requests.",
    "requests",
    "x.",
    ".x",
    "--",
    "é",
    " ",
    "\0",
    "//",
];

/// One input, for libFuzzer (`fuzz/libfuzzer/`): panics on a broken
/// invariant.
pub fn run(data: &[u8]) {
    crate::fuzz_input(|| Ok(ResourceName), data);
}

impl Target for ResourceName {
    fn name(&self) -> &'static str {
        "resource-name"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        ["example.com/gpu", "a/b", "kubernetes.io/x", "requests.a/b", "A.com/x", "a.com/-x", "a.com/x.y_Z-1"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    }

    fn dictionary(&self) -> &'static [&'static str] {
        PIECES
    }

    fn run(&mut self, data: &[u8]) -> Result<(), String> {
        for name in candidates(data) {
            let devhost = devhost::resource_name::validate(&name);
            let kubelet = is_extended_resource_name(&name);
            if devhost.is_ok() != kubelet {
                return Err(format!("{name:?}: devhost says {devhost:?}, the kubelet's rule says valid = {kubelet}"));
            }
            if let Err(error) = devhost
                && !error.to_string().contains(&format!("{name:?}"))
            {
                return Err(format!("{name:?}: the error {error} does not name the resource"));
            }
        }
        Ok(())
    }
}

/// The input as text, and a name built from it piece by piece (with long
/// runs to reach the 63, 244 and 253 character limits).
fn candidates(data: &[u8]) -> Vec<String> {
    let mut out = vec![String::from_utf8_lossy(data).into_owned()];
    let mut u = Unstructured::new(data);
    let mut built = String::new();
    // An exhausted input yields the lower bound forever: stop when empty.
    while !u.is_empty() {
        let Ok(choice) = u.int_in_range(0..=PIECES.len() + 1) else { break };
        match choice {
            n if n < PIECES.len() => built.push_str(PIECES[n]),
            n if n == PIECES.len() => {
                let run = u.int_in_range(1..=260usize).unwrap_or(1);
                let c = *u.choose(&['a', 'b', '0', 'Z', '-']).unwrap_or(&'a');
                built.extend(std::iter::repeat_n(c, run));
            }
            _ => built.push(u.arbitrary::<char>().unwrap_or('x')),
        }
    }
    out.push(built);
    out
}

/// `IsExtendedResourceName`, as written in `pkg/apis/core/v1/helper`.
pub(crate) fn is_extended_resource_name(name: &str) -> bool {
    !is_native_resource(name) && !name.starts_with("requests.") && is_qualified_name(&format!("requests.{name}"))
}

fn is_native_resource(name: &str) -> bool {
    !name.contains('/') || name.contains("kubernetes.io/")
}

/// `IsQualifiedName` (= `IsLabelKey`): an optional DNS-1123 subdomain
/// prefix and `/`, then a name of at most 63 characters.
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
    !name.is_empty() && name.len() <= 63 && matches_qualified_name(name)
}

/// `len <= 253` and `^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`,
/// matched by a state machine over the characters.
fn is_dns1123_subdomain(value: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        /// At the start of a label: a letter or digit must follow.
        LabelStart,
        /// After a letter or digit: anything allowed, the end too.
        AfterAlnum,
        /// After '-': a letter, digit or '-' must follow.
        AfterDash,
    }
    if value.len() > 253 {
        return false;
    }
    let mut state = State::LabelStart;
    for c in value.chars() {
        let alnum = c.is_ascii_lowercase() || c.is_ascii_digit();
        state = match (state, c) {
            (_, _) if alnum => State::AfterAlnum,
            (State::AfterAlnum | State::AfterDash, '-') => State::AfterDash,
            (State::AfterAlnum, '.') => State::LabelStart,
            _ => return false,
        };
    }
    state == State::AfterAlnum
}

/// `^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`
fn matches_qualified_name(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    let alnum = |c: char| c.is_ascii_alphanumeric();
    match chars.as_slice() {
        [] => false,
        [only] => alnum(*only),
        [first, middle @ .., last] => {
            alnum(*first) && alnum(*last) && middle.iter().all(|c| alnum(*c) || matches!(c, '-' | '_' | '.'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_knows_the_facts() {
        for valid in ["example.com/gpu", "a/b", "vendor.example.org/Shared_GPU.v2", "x1.y-2.z/N"] {
            assert!(is_extended_resource_name(valid), "{valid}");
        }
        for invalid in [
            "gpu",
            "kubernetes.io/gpu",
            "xkubernetes.io/gpu",
            "requests.a/b",
            "a/b/c",
            "A.com/x",
            "a-.com/x",
            "a..com/x",
            "-a.com/x",
            "a.com/-x",
            "a.com/",
        ] {
            assert!(!is_extended_resource_name(invalid), "{invalid}");
        }
        assert!(is_extended_resource_name(&format!("{}/x", "a".repeat(244))));
        assert!(!is_extended_resource_name(&format!("{}/x", "a".repeat(245))));
    }
}
