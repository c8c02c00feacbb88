use std::path::Path;

use super::*;

const FILE: &str = "/etc/devhost/backends.d/demo.toml";

fn parse(source: &str) -> Result<StaticConfig, ConfigError> {
    StaticConfig::parse(Path::new(FILE), source)
}

/// Test fixture shared with the static backend's own tests (line numbers
/// below count the leading newline).
pub(crate) const TWO_GPUS: &str = concat!("\n", include_str!("two_gpus.toml"));

#[test]
fn semantic_errors_point_at_the_value() {
    let cases = [
        (
            TWO_GPUS.replace("example.com/gpu\"\npreferred", "Example.com/gpu\"\npreferred"),
            "6:8: domain \"Example.com\" of resource name \"Example.com/gpu\" must be a lower-case DNS subdomain",
        ),
        (TWO_GPUS.replace("id = \"gpu-1\"", "id = \"gpu-0\""), "20:6: device ID \"gpu-0\" appears twice"),
        (
            TWO_GPUS.replace("health = \"Unhealthy\"", "health = \"sick\""),
            "22:10: health must be \"Healthy\" or \"Unhealthy\"",
        ),
        (TWO_GPUS.replace("numa = [1]", "numa = [-1]"), "21:9: NUMA node IDs are 0 or more"),
        (
            TWO_GPUS.replace("permissions = \"rw\"", "permissions = \"rx\""),
            "16:87: permissions must be a combination of r, w and m",
        ),
        (
            TWO_GPUS.replace("container_path = \"/opt/gpu\"", "container_path = \"opt\""),
            "17:54: container_path must be absolute",
        ),
        (
            TWO_GPUS.replace("cdi_kind = \"example.com/gpu\"", "cdi_kind = \"gpu\""),
            "10:12: cdi_kind must be a CDI kind",
        ),
        (TWO_GPUS.replace("numa = [0]", "numa = [0]\ncolour = \"red\""), "15:1: unknown field `colour`"),
    ];
    for (source, expected) in cases {
        let error = parse(&source).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}

#[test]
fn duplicate_resource_in_one_file_is_refused() {
    let source = format!("{TWO_GPUS}\n[[config.resource]]\nname = \"example.com/gpu\"\n");
    let error = parse(&source).expect_err("duplicate").to_string();
    assert!(error.ends_with("resource \"example.com/gpu\" is declared twice in this file"), "{error}");
}
