//! The wire contracts of `proto/deviceplugin/v1beta1/api.proto`, checked
//! against the project's API facts, `docs/device-plugin-api.md` §1 (1.1
//! file options, 1.2 services and RPCs, 1.3 messages), and of
//! `proto/podresources/v1/api.proto`, checked against
//! `docs/pod-resources-api.md` §2. The expected contracts are transcribed
//! below as tables, so a change on either side fails here. Every mismatch
//! is reported at once.

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// A field's wire type as API_FACTS writes it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    Bool,
    String,
    Int32,
    Int64,
    UInt64,
    /// A message of the contract's package.
    Msg(&'static str),
    /// `map<string, string>`: a repeated nested entry message, key=1 and
    /// value=2, both strings.
    StringMap,
    /// `map<string, M>`: as `StringMap`, with a message of the package as
    /// the value.
    MsgMap(&'static str),
    /// An enum of the package.
    Enum(&'static str),
}

/// Label column: `repeated` or singular.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Card {
    Singular,
    Repeated,
}

use Card::{Repeated, Singular};

struct Field(i32, &'static str, Ty, Card);

/// One proto file's contract.
struct Contract {
    package: &'static str,
    descriptors: &'static [u8],
    go_package: &'static str,
    messages: &'static [(&'static str, &'static [Field])],
    services: &'static [(&'static str, &'static [Rpc])],
    /// Enum name and its values (name, number), in order.
    enums: &'static [(&'static str, &'static [(&'static str, i32)])],
}

const DEVICE_PLUGIN: Contract = Contract {
    package: "v1beta1",
    descriptors: devhost::proto::FILE_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1",
    messages: MESSAGES,
    services: SERVICES,
    enums: &[],
};

const POD_RESOURCES: Contract = Contract {
    package: "v1",
    descriptors: devhost::proto::POD_RESOURCES_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/podresources/v1",
    messages: POD_RESOURCES_MESSAGES,
    services: POD_RESOURCES_SERVICES,
    enums: &[],
};

const DRA_V1: Contract = Contract {
    package: "k8s.io.kubelet.pkg.apis.dra.v1",
    descriptors: devhost::proto::dra::V1_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/dra/v1",
    messages: DRA_MESSAGES,
    services: DRA_SERVICES,
    enums: &[],
};

const DRA_V1BETA1: Contract = Contract {
    package: "k8s.io.kubelet.pkg.apis.dra.v1beta1",
    descriptors: devhost::proto::dra::V1BETA1_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/dra/v1beta1",
    messages: DRA_MESSAGES,
    services: DRA_SERVICES,
    enums: &[],
};

/// `docs/dra-api.md` §1 (ours in .proto order: the facts list no order).
const DRA_MESSAGES: &[(&str, &[Field])] = &[
    ("NodePrepareResourcesRequest", &[Field(1, "claims", Ty::Msg("Claim"), Repeated)]),
    ("NodePrepareResourcesResponse", &[Field(1, "claims", Ty::MsgMap("NodePrepareResourceResponse"), Repeated)]),
    (
        "NodePrepareResourceResponse",
        &[Field(1, "devices", Ty::Msg("Device"), Repeated), Field(2, "error", Ty::String, Singular)],
    ),
    (
        "Device",
        &[
            Field(1, "request_names", Ty::String, Repeated),
            Field(2, "pool_name", Ty::String, Singular),
            Field(3, "device_name", Ty::String, Singular),
            Field(4, "cdi_device_ids", Ty::String, Repeated),
        ],
    ),
    ("NodeUnprepareResourcesRequest", &[Field(1, "claims", Ty::Msg("Claim"), Repeated)]),
    ("NodeUnprepareResourcesResponse", &[Field(1, "claims", Ty::MsgMap("NodeUnprepareResourceResponse"), Repeated)]),
    ("NodeUnprepareResourceResponse", &[Field(1, "error", Ty::String, Singular)]),
    (
        "Claim",
        &[
            Field(1, "namespace", Ty::String, Singular),
            Field(2, "uid", Ty::String, Singular),
            Field(3, "name", Ty::String, Singular),
        ],
    ),
];

const DRA_SERVICES: &[(&str, &[Rpc])] = &[(
    "DRAPlugin",
    &[
        ("NodePrepareResources", "NodePrepareResourcesRequest", "NodePrepareResourcesResponse", false),
        ("NodeUnprepareResources", "NodeUnprepareResourcesRequest", "NodeUnprepareResourcesResponse", false),
    ],
)];

/// `docs/dra-api.md` §3.
const DRA_HEALTH: Contract = Contract {
    package: "v1",
    descriptors: devhost::proto::dra::HEALTH_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/dra-health/v1",
    messages: &[
        ("NodeWatchResourcesRequest", &[]),
        ("NodeWatchResourcesResponse", &[Field(1, "devices", Ty::Msg("DeviceHealth"), Repeated)]),
        (
            "DeviceHealth",
            &[
                Field(1, "device", Ty::Msg("DeviceIdentifier"), Singular),
                Field(2, "health", Ty::Enum("HealthStatus"), Singular),
                Field(3, "last_updated_time", Ty::Int64, Singular),
                Field(4, "health_check_timeout_seconds", Ty::Int64, Singular),
                Field(5, "message", Ty::String, Singular),
            ],
        ),
        (
            "DeviceIdentifier",
            &[Field(1, "pool_name", Ty::String, Singular), Field(2, "device_name", Ty::String, Singular)],
        ),
    ],
    services: &[(
        "DRAResourceHealth",
        &[("NodeWatchResources", "NodeWatchResourcesRequest", "NodeWatchResourcesResponse", true)],
    )],
    enums: &[("HealthStatus", &[("UNKNOWN", 0), ("HEALTHY", 1), ("UNHEALTHY", 2)])],
};

/// `docs/device-plugin-api.md` §1.6.
const PLUGIN_REGISTRATION: Contract = Contract {
    package: "pluginregistration",
    descriptors: devhost::proto::dra::PLUGIN_REGISTRATION_DESCRIPTOR_SET,
    go_package: "k8s.io/kubelet/pkg/apis/pluginregistration/v1",
    messages: &[
        (
            "PluginInfo",
            &[
                Field(1, "type", Ty::String, Singular),
                Field(2, "name", Ty::String, Singular),
                Field(3, "endpoint", Ty::String, Singular),
                Field(4, "supported_versions", Ty::String, Repeated),
            ],
        ),
        (
            "RegistrationStatus",
            &[Field(1, "plugin_registered", Ty::Bool, Singular), Field(2, "error", Ty::String, Singular)],
        ),
        ("RegistrationStatusResponse", &[]),
        ("InfoRequest", &[]),
    ],
    services: &[(
        "Registration",
        &[
            ("GetInfo", "InfoRequest", "PluginInfo", false),
            ("NotifyRegistrationStatus", "RegistrationStatus", "RegistrationStatusResponse", false),
        ],
    )],
    enums: &[],
};

/// `docs/pod-resources-api.md` §2.2, in .proto declaration order (ours:
/// the facts list upstream's order, which the wire does not depend on).
const POD_RESOURCES_MESSAGES: &[(&str, &[Field])] = &[
    ("AllocatableResourcesRequest", &[]),
    (
        "AllocatableResourcesResponse",
        &[
            Field(1, "devices", Ty::Msg("ContainerDevices"), Repeated),
            Field(2, "cpu_ids", Ty::Int64, Repeated),
            Field(3, "memory", Ty::Msg("ContainerMemory"), Repeated),
        ],
    ),
    ("ListPodResourcesRequest", &[]),
    ("ListPodResourcesResponse", &[Field(1, "pod_resources", Ty::Msg("PodResources"), Repeated)]),
    (
        "PodResources",
        &[
            Field(1, "name", Ty::String, Singular),
            Field(2, "namespace", Ty::String, Singular),
            Field(3, "containers", Ty::Msg("ContainerResources"), Repeated),
        ],
    ),
    (
        "ContainerResources",
        &[
            Field(1, "name", Ty::String, Singular),
            Field(2, "devices", Ty::Msg("ContainerDevices"), Repeated),
            Field(3, "cpu_ids", Ty::Int64, Repeated),
            Field(4, "memory", Ty::Msg("ContainerMemory"), Repeated),
            Field(5, "dynamic_resources", Ty::Msg("DynamicResource"), Repeated),
        ],
    ),
    (
        "ContainerMemory",
        &[
            Field(1, "memory_type", Ty::String, Singular),
            Field(2, "size", Ty::UInt64, Singular),
            Field(3, "topology", Ty::Msg("TopologyInfo"), Singular),
        ],
    ),
    (
        "ContainerDevices",
        &[
            Field(1, "resource_name", Ty::String, Singular),
            Field(2, "device_ids", Ty::String, Repeated),
            Field(3, "topology", Ty::Msg("TopologyInfo"), Singular),
        ],
    ),
    ("TopologyInfo", &[Field(1, "nodes", Ty::Msg("NUMANode"), Repeated)]),
    ("NUMANode", &[Field(1, "ID", Ty::Int64, Singular)]),
    (
        "DynamicResource",
        &[
            Field(2, "claim_name", Ty::String, Singular),
            Field(3, "claim_namespace", Ty::String, Singular),
            Field(4, "claim_resources", Ty::Msg("ClaimResource"), Repeated),
        ],
    ),
    (
        "ClaimResource",
        &[
            Field(1, "cdi_devices", Ty::Msg("CDIDevice"), Repeated),
            Field(2, "driver_name", Ty::String, Singular),
            Field(3, "pool_name", Ty::String, Singular),
            Field(4, "device_name", Ty::String, Singular),
        ],
    ),
    ("CDIDevice", &[Field(1, "name", Ty::String, Singular)]),
    (
        "GetPodResourcesRequest",
        &[Field(1, "pod_name", Ty::String, Singular), Field(2, "pod_namespace", Ty::String, Singular)],
    ),
    ("GetPodResourcesResponse", &[Field(1, "pod_resources", Ty::Msg("PodResources"), Singular)]),
];

/// `docs/pod-resources-api.md` §2.1: every RPC unary.
const POD_RESOURCES_SERVICES: &[(&str, &[Rpc])] = &[(
    "PodResourcesLister",
    &[
        ("List", "ListPodResourcesRequest", "ListPodResourcesResponse", false),
        ("GetAllocatableResources", "AllocatableResourcesRequest", "AllocatableResourcesResponse", false),
        ("Get", "GetPodResourcesRequest", "GetPodResourcesResponse", false),
    ],
)];

/// §1.3, in .proto declaration order.
const MESSAGES: &[(&str, &[Field])] = &[
    (
        "DevicePluginOptions",
        &[
            Field(1, "pre_start_required", Ty::Bool, Singular),
            Field(2, "get_preferred_allocation_available", Ty::Bool, Singular),
        ],
    ),
    (
        "RegisterRequest",
        &[
            Field(1, "version", Ty::String, Singular),
            Field(2, "endpoint", Ty::String, Singular),
            Field(3, "resource_name", Ty::String, Singular),
            Field(4, "options", Ty::Msg("DevicePluginOptions"), Singular),
        ],
    ),
    ("Empty", &[]),
    ("ListAndWatchResponse", &[Field(1, "devices", Ty::Msg("Device"), Repeated)]),
    ("TopologyInfo", &[Field(1, "nodes", Ty::Msg("NUMANode"), Repeated)]),
    ("NUMANode", &[Field(1, "ID", Ty::Int64, Singular)]),
    (
        "Device",
        &[
            Field(1, "ID", Ty::String, Singular),
            Field(2, "health", Ty::String, Singular),
            Field(3, "topology", Ty::Msg("TopologyInfo"), Singular),
        ],
    ),
    ("PreStartContainerRequest", &[Field(1, "devices_ids", Ty::String, Repeated)]),
    ("PreStartContainerResponse", &[]),
    (
        "PreferredAllocationRequest",
        &[Field(1, "container_requests", Ty::Msg("ContainerPreferredAllocationRequest"), Repeated)],
    ),
    (
        "ContainerPreferredAllocationRequest",
        &[
            Field(1, "available_deviceIDs", Ty::String, Repeated),
            Field(2, "must_include_deviceIDs", Ty::String, Repeated),
            Field(3, "allocation_size", Ty::Int32, Singular),
        ],
    ),
    (
        "PreferredAllocationResponse",
        &[Field(1, "container_responses", Ty::Msg("ContainerPreferredAllocationResponse"), Repeated)],
    ),
    ("ContainerPreferredAllocationResponse", &[Field(1, "deviceIDs", Ty::String, Repeated)]),
    ("AllocateRequest", &[Field(1, "container_requests", Ty::Msg("ContainerAllocateRequest"), Repeated)]),
    ("ContainerAllocateRequest", &[Field(1, "devices_ids", Ty::String, Repeated)]),
    ("CDIDevice", &[Field(1, "name", Ty::String, Singular)]),
    ("AllocateResponse", &[Field(1, "container_responses", Ty::Msg("ContainerAllocateResponse"), Repeated)]),
    (
        "ContainerAllocateResponse",
        &[
            Field(1, "envs", Ty::StringMap, Repeated),
            Field(2, "mounts", Ty::Msg("Mount"), Repeated),
            Field(3, "devices", Ty::Msg("DeviceSpec"), Repeated),
            Field(4, "annotations", Ty::StringMap, Repeated),
            Field(5, "cdi_devices", Ty::Msg("CDIDevice"), Repeated),
        ],
    ),
    (
        "Mount",
        &[
            Field(1, "container_path", Ty::String, Singular),
            Field(2, "host_path", Ty::String, Singular),
            Field(3, "read_only", Ty::Bool, Singular),
        ],
    ),
    (
        "DeviceSpec",
        &[
            Field(1, "container_path", Ty::String, Singular),
            Field(2, "host_path", Ty::String, Singular),
            Field(3, "permissions", Ty::String, Singular),
        ],
    ),
];

/// RPC name, request, response, server-streaming.
type Rpc = (&'static str, &'static str, &'static str, bool);

/// §1.2, RPCs in .proto order.
const SERVICES: &[(&str, &[Rpc])] = &[
    ("Registration", &[("Register", "RegisterRequest", "Empty", false)]),
    (
        "DevicePlugin",
        &[
            ("GetDevicePluginOptions", "Empty", "DevicePluginOptions", false),
            ("ListAndWatch", "Empty", "ListAndWatchResponse", true),
            ("GetPreferredAllocation", "PreferredAllocationRequest", "PreferredAllocationResponse", false),
            ("Allocate", "AllocateRequest", "AllocateResponse", false),
            ("PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse", false),
        ],
    ),
];

fn decode(contract: &Contract) -> FileDescriptorProto {
    let set = FileDescriptorSet::decode(contract.descriptors).expect("the descriptor set decodes");
    assert_eq!(set.file.len(), 1, "the descriptor set must hold exactly the one api.proto (no imports)");
    set.file.into_iter().next().expect("one file")
}

fn qualified(contract: &Contract, name: &str) -> String {
    format!(".{}.{name}", contract.package)
}

#[test]
fn file_level_contract_matches_api_facts_1_1() {
    check_file(&DEVICE_PLUGIN);
}

#[test]
fn services_match_api_facts_1_2() {
    check_services(&DEVICE_PLUGIN);
}

#[test]
fn messages_match_api_facts_1_3() {
    check_messages(&DEVICE_PLUGIN);
}

#[test]
fn pod_resources_contract_matches_its_facts() {
    check_all(&POD_RESOURCES);
}

#[test]
fn dra_plugin_contract_matches_its_facts_in_both_packages() {
    check_all(&DRA_V1);
    check_all(&DRA_V1BETA1);
}

#[test]
fn dra_health_contract_matches_its_facts() {
    check_all(&DRA_HEALTH);
}

#[test]
fn plugin_registration_contract_matches_its_facts() {
    check_all(&PLUGIN_REGISTRATION);
}

fn check_all(contract: &Contract) {
    check_file(contract);
    check_services(contract);
    check_messages(contract);
}

fn check_file(contract: &Contract) {
    let file = decode(contract);
    assert_eq!(file.syntax(), "proto3");
    assert_eq!(file.package(), contract.package, "package decides the method paths");
    assert!(file.dependency.is_empty(), "api.proto must import nothing, found {:?}", file.dependency);
    let options = file.options.clone().unwrap_or_default();
    assert_eq!(options.go_package(), contract.go_package);
    let only_go_package = prost_types::FileOptions { go_package: options.go_package.clone(), ..Default::default() };
    assert_eq!(options, only_go_package, "no file options besides go_package");
    assert!(file.extension.is_empty(), "no extensions");
    let enums: Vec<(&str, Vec<(&str, i32)>)> =
        file.enum_type.iter().map(|e| (e.name(), e.value.iter().map(|v| (v.name(), v.number())).collect())).collect();
    let expected: Vec<(&str, Vec<(&str, i32)>)> =
        contract.enums.iter().map(|(name, values)| (*name, values.to_vec())).collect();
    assert_eq!(enums, expected, "{}: enums and their values", contract.package);
}

fn check_services(contract: &Contract) {
    let file = decode(contract);
    let mut errors = Vec::new();
    let names: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
    let expected: Vec<&str> = contract.services.iter().map(|(s, _)| *s).collect();
    if names.len() != expected.len() || expected.iter().any(|e| !names.contains(e)) {
        errors.push(format!("services: expected {expected:?}, found {names:?}"));
    }
    for (service, rpcs) in contract.services {
        let Some(found) = file.service.iter().find(|s| s.name() == *service) else {
            continue;
        };
        let found_names: Vec<&str> = found.method.iter().map(|m| m.name()).collect();
        let expected_names: Vec<&str> = rpcs.iter().map(|r| r.0).collect();
        if found_names != expected_names {
            errors.push(format!("{service}: RPCs expected {expected_names:?} in order, found {found_names:?}"));
        }
        for (rpc, input, output, streaming) in rpcs.iter() {
            let Some(m) = found.method.iter().find(|m| m.name() == *rpc) else {
                continue;
            };
            let path = format!("/{}.{service}/{rpc}", contract.package);
            let (input, output) = (qualified(contract, input), qualified(contract, output));
            if m.input_type() != input {
                errors.push(format!("{path}: request {:?}, expected {input:?}", m.input_type()));
            }
            if m.output_type() != output {
                errors.push(format!("{path}: response {:?}, expected {output:?}", m.output_type()));
            }
            if m.client_streaming() {
                errors.push(format!("{path}: must not be client-streaming"));
            }
            if m.server_streaming() != *streaming {
                errors.push(format!("{path}: server-streaming is {}, expected {streaming}", m.server_streaming()));
            }
        }
    }
    assert!(errors.is_empty(), "service contract drift:\n{}", errors.join("\n"));
}

fn check_messages(contract: &Contract) {
    let file = decode(contract);
    let mut errors = Vec::new();
    let found: Vec<&str> = file.message_type.iter().map(|m| m.name()).collect();
    let expected: Vec<&str> = contract.messages.iter().map(|(m, _)| *m).collect();
    if found != expected {
        errors.push(format!("messages: expected {expected:?} in order, found {found:?}"));
    }
    for (name, fields) in contract.messages {
        match file.message_type.iter().find(|m| m.name() == *name) {
            Some(message) => check_message(contract, message, fields, &mut errors),
            None => errors.push(format!("{name}: missing")),
        }
    }
    assert!(errors.is_empty(), "message contract drift:\n{}", errors.join("\n"));
}

fn check_message(contract: &Contract, message: &DescriptorProto, expected: &[Field], errors: &mut Vec<String>) {
    let name = message.name();
    if !message.oneof_decl.is_empty() || !message.enum_type.is_empty() {
        errors.push(format!("{name}: unexpected oneofs or enums"));
    }
    let found: Vec<(i32, &str)> = message.field.iter().map(|f| (f.number(), f.name())).collect();
    let wanted: Vec<(i32, &str)> = expected.iter().map(|f| (f.0, f.1)).collect();
    if found != wanted {
        errors.push(format!("{name}: fields (number, name) expected {wanted:?}, found {found:?}"));
    }
    let mut map_entries = Vec::new();
    for Field(number, field_name, ty, card) in expected {
        let Some(field) = message.field.iter().find(|f| f.number() == *number) else {
            continue;
        };
        let at = format!("{name}.{field_name} = {number}");
        let label = match card {
            Card::Singular => Label::Optional,
            Card::Repeated => Label::Repeated,
        };
        if field.label() != label {
            errors.push(format!("{at}: label {:?}, expected {label:?}", field.label()));
        }
        if field.proto3_optional() || field.oneof_index.is_some() {
            errors.push(format!("{at}: must be implicit-presence, not `optional` or in a oneof"));
        }
        match ty {
            Ty::MsgMap(value) => {
                let entry = format!("{}Entry", camel(field_name));
                map_entries.push(entry.clone());
                check_type(field, Type::Message, &qualified(contract, &format!("{name}.{entry}")), &at, errors);
                match message.nested_type.iter().find(|n| n.name() == entry) {
                    Some(nested) => check_map_entry(contract, nested, Some(value), &at, errors),
                    None => errors.push(format!("{at}: map entry message {entry} missing")),
                }
            }
            Ty::Enum(target) => check_type(field, Type::Enum, &qualified(contract, target), &at, errors),
            Ty::StringMap => {
                let entry = format!("{}Entry", camel(field_name));
                map_entries.push(entry.clone());
                check_type(field, Type::Message, &qualified(contract, &format!("{name}.{entry}")), &at, errors);
                match message.nested_type.iter().find(|n| n.name() == entry) {
                    Some(nested) => check_map_entry(contract, nested, None, &at, errors),
                    None => errors.push(format!("{at}: map entry message {entry} missing")),
                }
            }
            Ty::Msg(target) => check_type(field, Type::Message, &qualified(contract, target), &at, errors),
            Ty::Bool => check_type(field, Type::Bool, "", &at, errors),
            Ty::String => check_type(field, Type::String, "", &at, errors),
            Ty::Int32 => check_type(field, Type::Int32, "", &at, errors),
            Ty::Int64 => check_type(field, Type::Int64, "", &at, errors),
            Ty::UInt64 => check_type(field, Type::Uint64, "", &at, errors),
        }
    }
    let nested: Vec<&str> = message.nested_type.iter().map(|n| n.name()).collect();
    if nested != map_entries {
        errors.push(format!("{name}: nested messages expected {map_entries:?} (map entries only), found {nested:?}"));
    }
}

fn check_type(field: &FieldDescriptorProto, ty: Type, type_name: &str, at: &str, errors: &mut Vec<String>) {
    if field.r#type() != ty {
        errors.push(format!("{at}: type {:?}, expected {ty:?}", field.r#type()));
    }
    if field.type_name() != type_name {
        errors.push(format!("{at}: type name {:?}, expected {type_name:?}", field.type_name()));
    }
}

/// `map<string, V>`: an entry message marked `map_entry`, with
/// `string key = 1` and `V value = 2` (a string, or the message `value`).
fn check_map_entry(
    contract: &Contract,
    entry: &DescriptorProto,
    value: Option<&str>,
    at: &str,
    errors: &mut Vec<String>,
) {
    if !entry.options.as_ref().is_some_and(|o| o.map_entry()) {
        errors.push(format!("{at}: {} is not marked map_entry", entry.name()));
    }
    let found: Vec<(i32, &str, Type, Label, &str)> =
        entry.field.iter().map(|f| (f.number(), f.name(), f.r#type(), f.label(), f.type_name())).collect();
    let value_type = value.map(|v| qualified(contract, v)).unwrap_or_default();
    let kind = if value.is_some() { Type::Message } else { Type::String };
    let wanted =
        vec![(1, "key", Type::String, Label::Optional, ""), (2, "value", kind, Label::Optional, value_type.as_str())];
    if found != wanted {
        errors.push(format!("{at}: map entry fields expected {wanted:?}, found {found:?}"));
    }
}

/// protoc's map entry naming: `cdi_devices` -> `CdiDevices`.
fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}
