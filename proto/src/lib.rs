//! gRPC definitions for the modelpack snapshotter:
//!
//! - [`control`]: our own control API (`modelpack.snapshotter.v1.Control`);
//! - [`snapshots`]: the server half of containerd's `containerd.services.snapshots.v1.Snapshots`,
//!   generated over `containerd-client`'s message types (see this crate's README for why).
#![deny(missing_docs, missing_debug_implementations)]

/// The control API: status and mounts with fetch progress.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod control {
    tonic::include_proto!("modelpack.snapshotter.v1");
}

/// containerd's Snapshots service, server side; messages re-exported from `containerd-client`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod snapshots {
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.snapshots.v1.Snapshots.rs"
    ));
    pub use containerd_client::services::v1::snapshots::*;
}

pub use containerd_client;

/// `google.protobuf.Empty`, as prost maps it.
pub type Empty = ();
