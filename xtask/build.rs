//! Generates the CRI clients the e2e drives (`RuntimeService`, `ImageService`) from
//! `proto/cri/runtime/v1/api.proto`, our own subset of the Kubernetes CRI API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri/runtime/v1/api.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(&["proto/cri/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
