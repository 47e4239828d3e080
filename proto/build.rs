//! Generates the control API from `modelpack/snapshotter/v1/control.proto` and the server side
//! of containerd's Snapshots service from the message types `containerd-client` already has.

use tonic_build::manual::{Builder, Method, Service};

/// containerd's Snapshots RPCs: (route, request, response, server streaming); the Rust method is
/// the route in snake case.
#[rustfmt::skip]
const SNAPSHOT_RPCS: &[(&str, &str, &str, bool)] = &[
    ("Prepare", "PrepareSnapshotRequest", "PrepareSnapshotResponse", false),
    ("View", "ViewSnapshotRequest", "ViewSnapshotResponse", false),
    ("Mounts", "MountsRequest", "MountsResponse", false),
    ("Commit", "CommitSnapshotRequest", "()", false),
    ("Remove", "RemoveSnapshotRequest", "()", false),
    ("Stat", "StatSnapshotRequest", "StatSnapshotResponse", false),
    ("Update", "UpdateSnapshotRequest", "UpdateSnapshotResponse", false),
    ("List", "ListSnapshotsRequest", "ListSnapshotsResponse", true),
    ("Usage", "UsageRequest", "UsageResponse", false),
    ("Cleanup", "CleanupRequest", "()", false),
];

/// `CamelCase` as `camel_case`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=modelpack/snapshotter/v1/control.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["modelpack/snapshotter/v1/control.proto"], &["."])?;

    let mut service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1");
    for &(route, input, output, streaming) in SNAPSHOT_RPCS {
        let path = |t: &str| {
            if t == "()" {
                "crate::Empty".to_owned()
            } else {
                format!("containerd_client::services::v1::snapshots::{t}")
            }
        };
        let mut method = Method::builder()
            .name(snake_case(route))
            .route_name(route)
            .input_type(path(input))
            .output_type(path(output))
            .codec_path("tonic_prost::ProstCodec");
        if streaming {
            method = method.server_streaming();
        }
        service = service.method(method.build());
    }
    Builder::new()
        .build_client(false)
        .compile(&[service.build()]);
    Ok(())
}
