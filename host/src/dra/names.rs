//! Names on the DRA side: the driver name of a resource, and the DRA device
//! name of each device ID.
//!
//! A DRA device name must be a DNS label (at most 63 characters, lower-case
//! letters, digits and `-`, starting and ending with a letter or digit);
//! device-plugin IDs are free-form (`GPU-8a3f…`, `0000:3b:00.1`). The
//! mapping is deterministic and injective:
//!
//! * an ID that is already a DNS label, and does not start with `x-` or
//!   `h-`, is its own name (`gpu-0` → `gpu-0`);
//! * otherwise, if it fits, `x-` and the hex of its UTF-8 bytes
//!   (`GPU-0` → `x-4750552d30`), which decodes back without any table;
//! * otherwise (an ID over 30 bytes that is not a label) `h-` and the first
//!   40 hex digits of its SHA-256, which devhost maps back through the
//!   resource's device list.

use sha2::{Digest, Sha256};

/// The longest DNS label.
const MAX_LABEL: usize = 63;

/// Whether `name` is a DNS label (RFC 1123).
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `name` is a DNS subdomain (RFC 1123): dot-separated labels, at
/// most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// The DRA device name of the device-plugin ID `id` (never empty: devhost
/// refuses empty IDs at publish).
pub fn device_name(id: &str) -> String {
    if is_dns_label(id) && !id.starts_with("x-") && !id.starts_with("h-") {
        return id.to_owned();
    }
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    if 2 + hex.len() <= MAX_LABEL {
        return format!("x-{hex}");
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("h-{hex}")
}

/// The device ID a DRA device name stands for, if it can be told without
/// the device list (`None` for a hashed name: look it up in the list).
pub fn device_id(name: &str) -> Option<String> {
    if let Some(hex) = name.strip_prefix("x-") {
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect();
        return bytes.and_then(|bytes| String::from_utf8(bytes).ok());
    }
    if name.starts_with("h-") {
        return None;
    }
    Some(name.to_owned())
}

/// The default driver name of `resource`: `vendor.example.com/gpu` →
/// `gpu.vendor.example.com`, if that is a DNS subdomain.
pub fn default_driver(resource: &str) -> Option<String> {
    let (domain, name) = resource.split_once('/')?;
    let driver = format!("{}.{domain}", name.to_ascii_lowercase());
    is_dns_subdomain(&driver).then_some(driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_others_are_encoded_and_decode_back() {
        assert_eq!(device_name("gpu-0"), "gpu-0");
        assert_eq!(device_name("GPU-0"), "x-4750552d30");
        assert_eq!(device_id("x-4750552d30").as_deref(), Some("GPU-0"));
        for id in ["0000:3b:00.1", "x-1", "h-1", "-a", "a-", "ünïcode", "a.b"] {
            let name = device_name(id);
            assert!(is_dns_label(&name), "{id:?} → {name:?} is not a label");
            assert_eq!(device_id(&name).as_deref(), Some(id), "{id:?} → {name:?} does not decode");
        }
        let long = "GPU-8a3f0c5e-1b2d-4e6f-9a7b-3c4d5e6f7a8b";
        let name = device_name(long);
        assert!(name.starts_with("h-") && name.len() == 42 && is_dns_label(&name), "{name}");
        assert_eq!(device_id(&name), None, "hashed: looked up in the list");
        assert_ne!(device_name("GPU-8a3f0c5e-1b2d-4e6f-9a7b-3c4d5e6f7a8c"), name);
        assert_eq!(device_name(&"a".repeat(63)), "a".repeat(63));
        assert!(device_name(&"a".repeat(64)).starts_with("h-"));
    }

    #[test]
    fn drivers_derive_from_resource_names() {
        assert_eq!(default_driver("example.com/gpu").as_deref(), Some("gpu.example.com"));
        assert_eq!(default_driver("nvidia.com/GPU").as_deref(), Some("gpu.nvidia.com"));
        assert_eq!(default_driver("example.com/my_gpu"), None, "underscores are not DNS");
        assert!(is_dns_subdomain("gpu.example.com"));
        assert!(!is_dns_subdomain("gpu..example.com"));
        assert!(!is_dns_subdomain("Gpu.example.com"));
    }
}
