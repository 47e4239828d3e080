//! Generates the control API from `modelpack/snapshotter/v1/control.proto` and the server side
//! of containerd's Snapshots service from the message types `containerd-client` already has.

use tonic_build::manual::{Builder, Method, Service};

/// containerd's Snapshots RPCs: (Rust method, route, request, response, server streaming).
const SNAPSHOT_RPCS: &[(&str, &str, &str, &str, bool)] = &[
    (
        "prepare",
        "Prepare",
        "PrepareSnapshotRequest",
        "PrepareSnapshotResponse",
        false,
    ),
    (
        "view",
        "View",
        "ViewSnapshotRequest",
        "ViewSnapshotResponse",
        false,
    ),
    ("mounts", "Mounts", "MountsRequest", "MountsResponse", false),
    ("commit", "Commit", "CommitSnapshotRequest", "()", false),
    ("remove", "Remove", "RemoveSnapshotRequest", "()", false),
    (
        "stat",
        "Stat",
        "StatSnapshotRequest",
        "StatSnapshotResponse",
        false,
    ),
    (
        "update",
        "Update",
        "UpdateSnapshotRequest",
        "UpdateSnapshotResponse",
        false,
    ),
    (
        "list",
        "List",
        "ListSnapshotsRequest",
        "ListSnapshotsResponse",
        true,
    ),
    ("usage", "Usage", "UsageRequest", "UsageResponse", false),
    ("cleanup", "Cleanup", "CleanupRequest", "()", false),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=modelpack/snapshotter/v1/control.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["modelpack/snapshotter/v1/control.proto"], &["."])?;

    let mut service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1");
    for &(name, route, input, output, streaming) in SNAPSHOT_RPCS {
        let path = |t: &str| {
            if t == "()" {
                "crate::Empty".to_owned()
            } else {
                format!("containerd_client::services::v1::snapshots::{t}")
            }
        };
        let mut method = Method::builder()
            .name(name)
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
