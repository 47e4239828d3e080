//! Generates the CSI messages, servers and clients from `proto/csi/v1/csi.proto` (our own subset
//! of the CSI specification). Messages also derive serde, so the `call` client can take and print
//! them as JSON. `NodePublishVolumeRequest` gets no derived `Debug`: it carries the secrets;
//! its `Debug` (in `src/lib.rs`) redacts them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi/v1/csi.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .skip_debug([".csi.v1.NodePublishVolumeRequest"])
        .compile_protos(&["proto/csi/v1/csi.proto"], &["proto"])?;
    Ok(())
}
