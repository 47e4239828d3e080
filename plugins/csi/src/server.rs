//! The CSI Identity and Node services over [`Volumes`]: requests are checked and turned into
//! plain calls here; statuses come from the one `From<Error>` mapping.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Volumes;
use crate::proto::{self, identity_server::Identity, node_server::Node};
use crate::volume::{check_publish, check_target};

/// `"N of M bytes (P%) cached on the node"`.
pub fn cache_progress(local: u64, total: u64) -> String {
    let percent = if total == 0 {
        100.0
    } else {
        local as f64 * 100.0 / total as f64
    };
    format!("{local} of {total} bytes ({percent:.1}%) cached on the node")
}

/// The driver name kubelet registers (the CSIDriver object's name).
pub const DRIVER_NAME: &str = "model.csi.modelpack.io";

/// The plugin: both services, sharing the node's [`Volumes`].
#[derive(Debug, Clone)]
pub struct Plugin {
    volumes: Arc<Volumes>,
}

impl Plugin {
    /// Serves `volumes`.
    pub fn new(volumes: Arc<Volumes>) -> Plugin {
        Plugin { volumes }
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _request: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        // No controller service: inline and static volumes need none.
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        Ok(Response::new(proto::ProbeResponse {
            ready: Some(proto::BoolValue { value: true }),
        }))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let publish = check_publish(request.get_ref())?;
        self.volumes.publish(publish).await?;
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let target = check_target(&request.target_path)?;
        self.volumes.unpublish(&request.volume_id, &target).await?;
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let request = request.into_inner();
        if request.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_path is required"));
        }
        let stats = self
            .volumes
            .volume_stats(&request.volume_id, &PathBuf::from(&request.volume_path))
            .await?;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // Bytes: `total` is the model, `used` what is cached on the node (verified),
        // `available` 0: the volume is read-only, nothing can be written to it (it must never
        // look like it is filling up). The cache's progress is in the condition's message.
        let progress = cache_progress(stats.local, stats.total);
        Ok(Response::new(proto::NodeGetVolumeStatsResponse {
            usage: vec![proto::VolumeUsage {
                available: 0,
                total: as_i64(stats.total),
                used: as_i64(stats.local),
                unit: proto::volume_usage::Unit::Bytes as i32,
            }],
            volume_condition: Some(proto::VolumeCondition {
                abnormal: stats.abnormal.is_some(),
                message: match stats.abnormal {
                    Some(why) => format!("{why} ({progress})"),
                    None => format!("serving ({progress})"),
                },
            }),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        use proto::node_service_capability::{Rpc, Type, rpc};
        let capability = |t: rpc::Type| proto::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities: vec![
                capability(rpc::Type::GetVolumeStats),
                capability(rpc::Type::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.volumes.config().node_id.clone(),
            max_volumes_per_node: 0,
        }))
    }
}
