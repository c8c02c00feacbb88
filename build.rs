//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and
//! tonic's prost generator. Generated code and the descriptor set go to
//! `OUT_DIR`; nothing is written into the source tree.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/deviceplugin/v1beta1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let pod_resources = "proto/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed={pod_resources}");

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

    // The kubelet's PodResources API: devhost is its client; the fake
    // kubelet serves it.
    let descriptors = protox::compile([pod_resources], ["proto"])?;
    std::fs::write(out_dir.join("podresources_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
