//! CDI names and the files devhost keeps them in: `<kind>=<device>`, kinds
//! and device names as the CDI specification allows them, and one spec
//! file per resource or prepared claim.

use std::path::{Path, PathBuf};

use crate::sockets::files::sanitise;

/// The CDI name of a device of `resource`: `<resource>=<device>`.
pub fn device_name(resource: &str, device: &str) -> String {
    format!("{resource}={device}")
}

/// Whether `resource` can be a CDI kind and `device` a CDI device name
/// (vendor and class start with a letter; names use `A-Za-z0-9_-.:`).
/// A vendor or class of one character is refused too: the CDI library
/// (v1.1) panics on one while loading the spec, and then no CDI name on
/// the node resolves.
pub fn check_names(resource: &str, device: Option<&str>) -> Result<(), String> {
    let part = |text: &str, first_letter: bool, extra: &[u8]| {
        let bytes = text.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| if first_letter { b.is_ascii_alphabetic() } else { b.is_ascii_alphanumeric() });
        first_ok
            && (!first_letter || bytes.len() > 1)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || extra.contains(b))
    };
    let kind_ok =
        resource.split_once('/').is_some_and(|(vendor, class)| part(vendor, true, b"_-.") && part(class, true, b"_-."));
    if !kind_ok {
        return Err(format!("resource {resource:?} cannot be a CDI kind (vendor/class, each starting with a letter)"));
    }
    match device {
        Some(device) if !part(device, false, b"_-.:") => {
            Err(format!("device ID {device:?} cannot be a CDI device name (letters, digits, '_', '-', '.', ':')"))
        }
        _ => Ok(()),
    }
}

/// The longest file name the kernel accepts.
const MAX_FILE_NAME: usize = 255;

/// The spec file of `resource` in `dir`: `devhost-<resource, / as _>.json`.
/// A resource is served by one backend at a time, so the resource alone
/// names the file (instances of a rolling update share it, whichever
/// backend file serves it); sanitising is one-to-one on valid resource
/// names (`_` cannot occur in the domain). A name too long for the kernel
/// is cut, with a hash of the whole resource name to keep it unique.
pub fn spec_path(dir: &Path, resource: &str) -> PathBuf {
    dir.join(fitted_name("devhost-", &sanitise(resource), ".json", resource))
}

/// `<prefix><body><suffix>`, or, if that is longer than the kernel takes,
/// `<prefix><body cut>-<hash of whole>` + `<suffix>`: unique per `whole`
/// (the text the body came from), at most 255 bytes. `body` is ASCII.
pub fn fitted_name(prefix: &str, body: &str, suffix: &str, whole: &str) -> String {
    let name = format!("{prefix}{body}{suffix}");
    if name.len() <= MAX_FILE_NAME {
        return name;
    }
    let hash = whole.bytes().fold(0x811c_9dc5_u32, |hash, b| (hash ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let room = MAX_FILE_NAME - prefix.len() - suffix.len() - "-12345678".len();
    format!("{prefix}{}-{hash:08x}{suffix}", &body[..room.min(body.len())])
}

/// The CDI kind of a DRA driver's claim devices: `k8s.<driver>/claim`.
pub fn claim_kind(driver: &str) -> String {
    format!("k8s.{driver}/claim")
}

/// The CDI device of one request of a prepared claim: `<claim UID>-<request>`
/// (a subrequest's `/` becomes `_`, which CDI allows and DNS labels lack).
pub fn claim_device_name(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}-{}", request.replace('/', "_"))
}

/// The fully qualified CDI name of `device` of `driver`'s claims.
pub fn claim_device_id(driver: &str, device: &str) -> String {
    device_name(&claim_kind(driver), device)
}

/// The spec file of one prepared claim of `driver`:
/// `devhost-<driver>-claim-<claim UID>.json` (hashed when too long).
pub fn claim_spec_path(dir: &Path, driver: &str, claim_uid: &str) -> PathBuf {
    spec_path(dir, &format!("{driver}-claim-{claim_uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdi_names_follow_the_specification() {
        assert_eq!(check_names("example.com/gpu", Some("GPU-0:1_a.b")), Ok(()));
        assert!(check_names("1example.com/gpu", None).is_err(), "vendor starts with a letter");
        assert!(check_names("example.com/9gpu", None).is_err(), "class starts with a letter");
        assert!(check_names("example.com/gpu", Some("-x")).is_err());
        assert!(check_names("example.com/gpu", Some("a/b")).is_err());
        assert!(check_names("example.com/g", None).is_err(), "a one-letter class crashes the CDI library");
        assert!(check_names("e/gpu", None).is_err(), "so does a one-letter vendor");
        assert_eq!(check_names("example.com/gpu", Some("0")), Ok(()), "a one-letter device is fine");
        assert_eq!(device_name("example.com/gpu", "gpu-0"), "example.com/gpu=gpu-0");
        assert_eq!(
            spec_path(Path::new("/var/run/cdi"), "example.com/gpu"),
            Path::new("/var/run/cdi/devhost-example.com_gpu.json")
        );
        let long = format!("{}.example.com/{}", "d".repeat(240), "n".repeat(63));
        let other = format!("{}.example.com/{}m", "d".repeat(240), "n".repeat(62));
        let (a, b) = (spec_path(Path::new("/x"), &long), spec_path(Path::new("/x"), &other));
        let name = a.file_name().expect("a file name").len();
        assert!(name <= MAX_FILE_NAME, "{name}");
        assert_ne!(a, b, "cut names stay apart");
    }
}
