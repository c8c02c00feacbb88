//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and
//! tonic's prost generator. Generated code and the descriptor sets go to
//! `OUT_DIR`; nothing is written into the source tree.

use std::path::PathBuf;

/// The kubelet APIs besides the device plugin API, each compiled alone
/// into `OUT_DIR/<name>/` with its descriptor set `OUT_DIR/<name>_descriptor.bin`
/// (several are `package v1`, so each needs its own directory).
const APIS: [(&str, &str); 5] = [
    // Who holds which device: devhost is a client, the fake kubelet serves it.
    ("podresources", "proto/podresources/v1/api.proto"),
    // DRA: devhost serves these, the fake kubelet calls them.
    ("dra_v1", "proto/dra/v1/api.proto"),
    ("dra_v1beta1", "proto/dra/v1beta1/api.proto"),
    ("dra_health", "proto/dra-health/v1/api.proto"),
    ("pluginregistration", "proto/pluginregistration/v1/api.proto"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/deviceplugin/v1beta1/api.proto";
    println!("cargo:rerun-if-changed={proto}");

    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("deviceplugin_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;

    // `ListAndWatchResponse` is written by hand (`host/src/proto/list.rs`)
    // so that a device list is encoded once and shared by every stream.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".v1beta1.ListAndWatchResponse", "crate::proto::v1beta1::ListAndWatchResponse")
        .compile_fds(descriptors)?;

    for (name, proto) in APIS {
        println!("cargo:rerun-if-changed={proto}");
        let descriptors = protox::compile([proto], ["proto"])?;
        std::fs::write(out_dir.join(format!("{name}_descriptor.bin")), prost::Message::encode_to_vec(&descriptors))?;
        let generated = out_dir.join(name);
        std::fs::create_dir_all(&generated)?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .out_dir(generated)
            .compile_fds(descriptors)?;
    }

    // DRAResourceHealth v1alpha1 (what a 1.36 kubelet opens): a service over
    // v1's messages, which are generated once, with v1.
    let proto = "proto/dra-health/v1alpha1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let generated = out_dir.join("dra_health_v1alpha1");
    std::fs::create_dir_all(&generated)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(generated)
        .extern_path(".v1", "crate::proto::dra::health")
        .compile_fds(descriptors)?;
    Ok(())
}
