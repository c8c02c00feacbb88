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

#[test]
fn attributes_and_capacities_are_typed_and_checked_where_written() {
    let with = |text: &str| TWO_GPUS.replace("numa = [0]", &format!("numa = [0]\n{text}"));
    let config = parse(&with(
        "attributes = { model = \"A100\", \"example.com/lanes\" = 16, mig = false, driver = { version = \"550.54.15\" } }\ncapacities = { memory = \"80Gi\" }",
    ))
    .expect("valid");
    let device = &config.resources[0].devices[0].device;
    let expected: BTreeMap<String, AttributeValue> = [
        ("model", AttributeValue::String("A100".into())),
        ("example.com/lanes", AttributeValue::Int(16)),
        ("mig", AttributeValue::Bool(false)),
        ("driver", AttributeValue::Version("550.54.15".into())),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    assert_eq!(device.attributes, expected);
    assert_eq!(device.capacities["memory"], "80Gi");

    for (text, expected) in [
        (
            "attributes = { \"bad-name\" = 1 }",
            "15:14: device \"gpu-0\": attribute \"bad-name\": \"bad-name\" is not a C identifier",
        ),
        (
            "attributes = { v = { version = \"1.2\" } }",
            "15:14: device \"gpu-0\": attribute \"v\": version \"1.2\" is not a semantic version",
        ),
        (
            "capacities = { memory = \"80GB\" }",
            "15:14: device \"gpu-0\": capacity \"memory\": \"80GB\" is not a Kubernetes quantity",
        ),
    ] {
        let error = parse(&with(text)).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}

/// A GPU with one counter set and three overlapping partitions (lines
/// count from 1; the `consumes` of `gpu-0-half-1` is on line 18).
const PARTITIONED: &str = r#"[backend]
kind = "static"

[[config.resource]]
name = "example.com/gpu"

[[config.resource.counter_set]]
name = "gpu-0"
counters = { memory = "40Gi", slices = "8" }

[[config.resource.device]]
id = "gpu-0"
consumes = [{ counter_set = "gpu-0", counters = { memory = "40Gi", slices = "8" } }]

[[config.resource.device]]
id = "gpu-0-half-1"
consumes = [
  { counter_set = "gpu-0", counters = { memory = "20Gi", slices = "4" } },
]

[[config.resource.device]]
id = "plain"
"#;

#[test]
fn counter_sets_and_consumptions_are_read_into_the_model() {
    let config = parse(PARTITIONED).expect("valid");
    let resource = &config.resources[0];
    let counter_sets = &resource.spec.counter_sets;
    assert_eq!(counter_sets.len(), 1);
    assert_eq!(counter_sets[0].name, "gpu-0");
    assert_eq!(counter_sets[0].counters["memory"], "40Gi");
    assert_eq!(counter_sets[0].counters["slices"], "8");
    let consumed_by =
        |id: &str| &resource.devices.iter().find(|device| device.device.id == id).expect("the device").device.consumes;
    let half = consumed_by("gpu-0-half-1");
    assert_eq!(half.len(), 1);
    assert_eq!(half[0].counter_set, "gpu-0");
    assert_eq!(half[0].counters["memory"], "20Gi");
    assert!(consumed_by("plain").is_empty());
    // A file without any stays as it was.
    let plain = &parse(TWO_GPUS).expect("valid").resources[0];
    assert!(plain.spec.counter_sets.is_empty());
    assert!(plain.devices.iter().all(|device| device.device.consumes.is_empty()));
}

#[test]
fn partition_errors_point_at_what_is_wrong() {
    let many_sets = format!(
        "consumes = [{}]",
        (0..3)
            .map(|i| format!("{{ counter_set = \"s{i}\", counters = {{ c = \"1\" }} }}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let many_counters = (0..33).map(|i| format!("c{i} = \"1\"")).collect::<Vec<_>>().join(", ");
    let cases = [
        (
            PARTITIONED.replace("counter_set = \"gpu-0\", counters = { memory = \"20Gi\"", "counter_set = \"gpu-9\", counters = { memory = \"20Gi\""),
            "18:19: device \"gpu-0-half-1\" consumes from unknown counter set \"gpu-9\" (this resource declares: [\"gpu-0\"])",
        ),
        (
            PARTITIONED.replace("memory = \"20Gi\", slices", "memory = \"20Gi\", engines"),
            "18:68: device \"gpu-0-half-1\" consumes unknown counter \"engines\" of set \"gpu-0\"",
        ),
        (
            PARTITIONED.replace("memory = \"20Gi\"", "memory = \"20GB\""),
            "18:50: device \"gpu-0-half-1\", counter \"memory\": \"20GB\" is not a Kubernetes quantity",
        ),
        (
            PARTITIONED.replace("counters = { memory = \"40Gi\", slices = \"8\" }\n\n", "counters = { memory = \"40 Gi\", slices = \"8\" }\n\n"),
            "9:23: counter set \"gpu-0\", counter \"memory\": \"40 Gi\" is not a Kubernetes quantity",
        ),
        (PARTITIONED.replace("name = \"gpu-0\"", "name = \"GPU_0\""), "8:8: counter set name \"GPU_0\" must be a DNS label"),
        (
            PARTITIONED.replace("counters = { memory = \"40Gi\", slices = \"8\" }\n\n", &format!("counters = {{ {many_counters} }}\n\n")),
            "9:12: counter set \"gpu-0\" has 33 counters; a counter set may have at most 32",
        ),
        (
            PARTITIONED.replace("id = \"plain\"", &format!("id = \"plain\"\n{many_sets}")),
            "23:12: device \"plain\" consumes from 3 counter sets; a device may consume from at most 2",
        ),
        (
            PARTITIONED.replace("id = \"plain\"", "id = \"plain\"\nconsumes = [{ counter_set = \"gpu-0\", counters = { memory = \"1\" } }, { counter_set = \"gpu-0\", counters = { slices = \"1\" } }]"),
            "23:85: device \"plain\" names counter set \"gpu-0\" twice",
        ),
        (
            PARTITIONED.replace("id = \"plain\"", "id = \"plain\"\nconsumes = [{ counter_set = \"gpu-0\" }]"),
            "23:13: missing field `counters`",
        ),
    ];
    for (source, expected) in cases {
        let error = parse(&source).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}

/// A NIC that claims share (line 8: `capacities`), and one allocated whole.
const SHARED_NIC: &str = r#"[backend]
kind = "static"
[[config.resource]]
name = "example.com/nic"
[[config.resource.device]]
id = "nic-0"
shared = true
capacities = { bandwidth = { value = "10G", request_policy = { default = "1G", valid_range = { min = "1G", step = "1G" } } }, queues = { value = "8", request_policy = { default = "1", valid_values = ["1", "2", "4"] } }, lanes = "4" }
[[config.resource.device]]
id = "nic-1"
capacities = { bandwidth = "10G" }
"#;

#[test]
fn shared_devices_and_request_policies_are_read_into_the_model() {
    let config = parse(SHARED_NIC).expect("valid");
    let resource = &config.resources[0];
    let nic = &resource.devices[0];
    // The capacities are the device's, policy or not.
    let capacities: Vec<(&str, &str)> =
        nic.device.capacities.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    assert_eq!(capacities, [("bandwidth", "10G"), ("lanes", "4"), ("queues", "8")]);
    let shared = nic.device.shared.as_ref().expect("nic-0 is shared");
    assert_eq!(
        shared.request_policies["bandwidth"],
        RequestPolicy {
            default: Some("1G".into()),
            valid: Some(ValidRequests::Range { min: "1G".into(), max: None, step: Some("1G".into()) }),
        }
    );
    assert_eq!(
        shared.request_policies["queues"].valid,
        Some(ValidRequests::Values(vec!["1".into(), "2".into(), "4".into()]))
    );
    assert!(!shared.request_policies.contains_key("lanes"), "a capacity without a policy is consumed freely");
    assert_eq!(resource.devices[1].device.shared, None);
}

#[test]
fn request_policy_errors_point_at_the_capacities() {
    let cases = [
        (
            SHARED_NIC.replace("shared = true\n", ""),
            "7:14: device \"nic-0\": capacity \"bandwidth\" has a request_policy, which only a device with `shared = true` may have",
        ),
        (
            SHARED_NIC.replace("default = \"1G\", ", ""),
            "8:14: device \"nic-0\", capacity \"bandwidth\": request_policy: a default is required with valid_range",
        ),
        (
            SHARED_NIC.replace("default = \"1G\"", "default = \"1500M\""),
            "8:14: device \"nic-0\", capacity \"bandwidth\": request_policy: default \"1500M\" is not min \"1G\" plus a whole number of steps \"1G\"",
        ),
        (
            SHARED_NIC.replace("min = \"1G\", step = \"1G\"", "min = \"2G\""),
            "8:14: device \"nic-0\", capacity \"bandwidth\": request_policy: default \"1G\" is less than min \"2G\"",
        ),
        (
            SHARED_NIC.replace("[\"1\", \"2\", \"4\"]", "[\"4\", \"1\"]"),
            "8:14: device \"nic-0\", capacity \"queues\": request_policy: valid_values must ascend: \"1\" comes after \"4\"",
        ),
        (
            SHARED_NIC.replace("[\"1\", \"2\", \"4\"]", "[\"1\", \"16\"]"),
            "8:14: device \"nic-0\", capacity \"queues\": request_policy: valid value \"16\" is more than the capacity \"8\"",
        ),
        (
            SHARED_NIC.replace(
                "valid_values = [\"1\", \"2\", \"4\"]",
                "valid_values = [\"1\"], valid_range = { min = \"1\" }",
            ),
            "8:14: device \"nic-0\", capacity \"queues\": request_policy: give valid_range or valid_values, not both",
        ),
        (
            SHARED_NIC
                .replace("id = \"nic-1\"", "id = \"nic-1\"\nshared = true")
                .replace("capacities = { bandwidth = \"10G\" }\n", ""),
            "11:10: device \"nic-1\" is shared but declares no capacities",
        ),
    ];
    for (source, expected) in cases {
        let error = parse(&source).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}

/// A NIC with a DRA device status (line 7: `network`).
const NIC_WITH_NETWORK: &str = r#"[backend]
kind = "static"
[[config.resource]]
name = "example.com/nic"
[[config.resource.device]]
id = "nic-0"
network = { interface_name = "eth1", hardware_address = "02:00:00:00:00:05", ips = ["10.0.0.5/24", "2001:db8::5/64"] }
[[config.resource.device]]
id = "nic-1"
"#;

#[test]
fn a_device_s_network_status_is_read_and_checked_where_written() {
    let config = parse(NIC_WITH_NETWORK).expect("valid");
    let devices = &config.resources[0].devices;
    let status = devices[0].allocation.device_status.get("nic-0").expect("nic-0 has a status");
    assert_eq!(status.interface_name.as_deref(), Some("eth1"));
    assert_eq!(status.hardware_address.as_deref(), Some("02:00:00:00:00:05"));
    assert_eq!(status.ips, ["10.0.0.5/24", "2001:db8::5/64"]);
    assert!(devices[1].allocation.device_status.is_empty(), "nic-1 declares none");
    let cases = [
        (
            NIC_WITH_NETWORK.replace("\"10.0.0.5/24\"", "\"10.0.0.5\""),
            "7:11: device \"nic-0\": network: ips: \"10.0.0.5\"",
        ),
        (
            NIC_WITH_NETWORK.replace("2001:db8::5/64", "2001:DB8::5/64"),
            "7:11: device \"nic-0\": network: ips: \"2001:DB8::5/64\" is not in canonical form",
        ),
        (
            NIC_WITH_NETWORK.replace("\"eth1\"", &format!("{:?}", "e".repeat(257))),
            "7:11: device \"nic-0\": network: interface_name is 257 bytes",
        ),
        (NIC_WITH_NETWORK.replace("ips = [", "mtu = 9000, ips = ["), "7:78: unknown field `mtu`"),
    ];
    for (source, expected) in cases {
        let error = parse(&source).expect_err(expected).to_string();
        assert!(error.starts_with(&format!("{FILE}:{expected}")), "expected {expected:?}, got {error:?}");
    }
}
