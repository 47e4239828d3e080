//! A Kubernetes CSI node plugin that gives pods ModelPack models as read-only volumes, served
//! lazily by the same lazy file system as `modelpack mount` and the containerd snapshotter.
//!
//! - [`server::Plugin`] implements CSI's Identity and Node services (no controller: inline
//!   ephemeral volumes and static PersistentVolumes need none);
//! - [`node::Volumes`] publishes a volume: it resolves the model's tag once to a digest, mounts
//!   the model lazily once per digest on the node (`modelpack_lazyfs::mount`), binds that mount
//!   read-only at kubelet's target path, and counts the volumes using each model; bytes arrive
//!   on first read, verified chunk by chunk, into one node-wide cache;
//! - [`volume::check_publish`] checks a request once, [`error::Error`] maps every failure to
//!   one status code, [`secrets`] reads a `.dockerconfigjson` secret;
//! - [`client`] speaks CSI over the plugin's socket (`modelpack-csi call`);
//! - [`metrics`] serves Prometheus text.
//!
//! ```no_run
//! # async fn run(config: modelpack_csi::node::NodeConfig) -> Result<(), modelpack_csi::error::Error> {
//! let volumes = std::sync::Arc::new(modelpack_csi::node::Volumes::open(config)?);
//! let plugin = modelpack_csi::server::Plugin::new(volumes);
//! # let _ = plugin; Ok(()) }
//! ```
#![deny(missing_docs, missing_debug_implementations)]

pub mod client;
pub mod error;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod secrets;
pub mod server;
pub mod volume;

/// The CSI v1 messages and services (our subset of the specification's `csi.proto`).
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("csi.v1");

    /// Written by hand (the derived one is skipped in `build.rs`): the secrets' values never
    /// show, only their keys.
    impl std::fmt::Debug for NodePublishVolumeRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut secret_keys: Vec<&String> = self.secrets.keys().collect();
            secret_keys.sort();
            f.debug_struct("NodePublishVolumeRequest")
                .field("volume_id", &self.volume_id)
                .field("publish_context", &self.publish_context)
                .field("staging_target_path", &self.staging_target_path)
                .field("target_path", &self.target_path)
                .field("volume_capability", &self.volume_capability)
                .field("readonly", &self.readonly)
                .field("secrets", &format_args!("<redacted: {secret_keys:?}>"))
                .field("volume_context", &self.volume_context)
                .finish()
        }
    }
}
