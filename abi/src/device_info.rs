//! The rules for what a device says about itself (ABI 1.1): typed
//! attributes and capacities. They are DRA's rules for a `ResourceSlice`
//! device (devhost's `docs/dra-api.md` §4, the API server's validation), so
//! that whatever a backend publishes can later be published to the API
//! server unchanged. devhost checks every published list with [`check`];
//! a backend's own tests can call it (or
//! [`crate::sdk::testing::assert_valid_device`]) to know the host will
//! accept what it publishes. The rules: at most 32 attributes and capacities together, names
//! qualified as `domain/identifier` (or a bare identifier), strings and
//! versions of at most 64 bytes, versions in semver 2.0, capacities as
//! Kubernetes quantities.

pub use crate::quantity::check_quantity;

use crate::model::{AttributeValue, Device};

/// Attributes and capacities together, per device.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// The identifier part of a qualified name (a C identifier).
pub const MAX_IDENTIFIER: usize = 32;
/// The domain part of a qualified name (a DNS subdomain).
pub const MAX_DOMAIN: usize = 63;
/// A `string` or `version` attribute's value, in bytes.
pub const MAX_VALUE: usize = 64;

/// Checks a device's attributes and capacities; the error names the first
/// broken rule, the name and the value.
pub fn check(device: &Device) -> Result<(), String> {
    let count = device.attributes.len() + device.capacities.len();
    if count > MAX_ATTRIBUTES_AND_CAPACITIES {
        return Err(format!(
            "{} attributes and {} capacities: at most {MAX_ATTRIBUTES_AND_CAPACITIES} together",
            device.attributes.len(),
            device.capacities.len()
        ));
    }
    for (name, value) in &device.attributes {
        check_name(name).map_err(|why| format!("attribute {name:?}: {why}"))?;
        check_value(value).map_err(|why| format!("attribute {name:?}: {why}"))?;
    }
    for (name, quantity) in &device.capacities {
        check_name(name).map_err(|why| format!("capacity {name:?}: {why}"))?;
        check_quantity(quantity).map_err(|why| format!("capacity {name:?}: {why}"))?;
    }
    // ABI 1.2: a shared device's request policies fit its capacities.
    // What it consumes is checked against its resource's counter sets
    // (`partitions::check_consumes`), which only its resource knows.
    crate::partitions::check_shared(device)
}

/// `identifier` or `domain/identifier`.
pub fn check_name(name: &str) -> Result<(), String> {
    let (domain, identifier) = match name.split_once('/') {
        Some((domain, identifier)) => (Some(domain), identifier),
        None => (None, name),
    };
    if identifier.is_empty() || identifier.len() > MAX_IDENTIFIER {
        return Err(format!("the name after the domain must be 1 to {MAX_IDENTIFIER} characters"));
    }
    let mut chars = identifier.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{identifier:?} is not a C identifier (a letter, then letters, digits and '_')"));
    }
    if let Some(domain) = domain {
        check_domain(domain)?;
    }
    Ok(())
}

/// A DNS subdomain of at most [`MAX_DOMAIN`] characters: dot-separated
/// labels of lowercase letters, digits and '-', not starting or ending
/// with '-'.
fn check_domain(domain: &str) -> Result<(), String> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if domain.is_empty() || domain.len() > MAX_DOMAIN || !domain.split('.').all(label_ok) {
        return Err(format!(
            "domain {domain:?} is not a DNS subdomain of at most {MAX_DOMAIN} characters (lowercase letters, digits, '-' and '.')"
        ));
    }
    Ok(())
}

fn check_value(value: &AttributeValue) -> Result<(), String> {
    match value {
        AttributeValue::Int(_) | AttributeValue::Bool(_) => Ok(()),
        AttributeValue::String(text) if text.len() > MAX_VALUE => {
            Err(format!("string value is {} bytes, at most {MAX_VALUE}", text.len()))
        }
        AttributeValue::String(_) => Ok(()),
        AttributeValue::Version(text) if text.len() > MAX_VALUE => {
            Err(format!("version value is {} bytes, at most {MAX_VALUE}", text.len()))
        }
        AttributeValue::Version(text) => semver::Version::parse(text)
            .map(drop)
            .map_err(|error| format!("version {text:?} is not a semantic version (semver 2.0): {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Health;

    fn device() -> Device {
        Device::new("gpu-0", Health::Healthy)
    }

    #[test]
    fn names_follow_dras_qualified_name_rule() {
        for good in ["model", "gpu.nvidia.com/memory_gb", "resource.kubernetes.io/pcieRoot", "a1", &"x".repeat(32)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1model",
            "model-name",
            "Example.com/model",
            "example.com/",
            "/model",
            "-a.com/x",
            &"x".repeat(33),
            &format!("{}/x", "a".repeat(64)),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for good in ["80Gi", "1500m", "2e3", "0.5", "+1", "-2k", "1E-2", ".5", "5."] {
            assert_eq!(check_quantity(good), Ok(()), "{good}");
        }
        for bad in ["", "Gi", "80GB", "1.2.3", "e3", "1e", "ten", "80 Gi", "1Ki2"] {
            assert!(check_quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn values_versions_and_the_count_are_bounded() {
        let ok = device()
            .with_attribute("driverVersion", AttributeValue::Version("550.54.15".into()))
            .with_attribute("model", AttributeValue::String("x".repeat(64)))
            .with_capacity("memory", "80Gi");
        assert_eq!(check(&ok), Ok(()));

        let long = device().with_attribute("model", AttributeValue::String("x".repeat(65)));
        assert_eq!(check(&long).expect_err("65 bytes"), "attribute \"model\": string value is 65 bytes, at most 64");
        let version = device().with_attribute("cuda", AttributeValue::Version("12.4".into()));
        assert!(
            check(&version)
                .expect_err("not semver")
                .starts_with("attribute \"cuda\": version \"12.4\" is not a semantic version")
        );
        let quantity = device().with_capacity("memory", "80GB");
        assert!(
            check(&quantity)
                .expect_err("not a quantity")
                .starts_with("capacity \"memory\": \"80GB\" is not a Kubernetes quantity")
        );

        let mut many = device();
        for i in 0..20 {
            many = many.with_attribute(format!("a{i}"), AttributeValue::Int(i));
        }
        for i in 0..12 {
            many = many.with_capacity(format!("c{i}"), "1");
        }
        assert_eq!(check(&many), Ok(()));
        let many = many.with_capacity("c12", "1");
        assert_eq!(check(&many).expect_err("33 in all"), "20 attributes and 13 capacities: at most 32 together");
    }
}
