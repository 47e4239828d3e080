//! The control API (`proto/modelpack/snapshotter/v1/control.proto`): status, mounts and the
//! cache's garbage collection.

use std::sync::atomic::Ordering;

use modelpack_proto::control::control_server::Control;
use modelpack_proto::control::{
    GcRequest, GcResponse, ListMountsRequest, ListMountsResponse, MountInfo, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::service::{MountState, Service};

/// Rows for every remote snapshot, with counters.
pub fn mount_rows(service: &Service) -> Vec<MountInfo> {
    service.with_remote(|remote| {
        remote
            .iter()
            .map(|(name, m)| {
                let mut row = MountInfo {
                    name: name.clone(),
                    reference: m.layer.reference.clone(),
                    manifest_digest: m.layer.manifest_digest.to_string(),
                    layer_digest: m.layer.layer_digest.to_string(),
                    path: m.layer.path.clone(),
                    mountpoint: m.mountpoint.display().to_string(),
                    ..MountInfo::default()
                };
                match &m.state {
                    MountState::Mounted { model, counters } => {
                        row.state = "mounted".into();
                        row.size = model.content_size();
                        row.fetched_bytes = counters.fetched_bytes.load(Ordering::Relaxed);
                        row.served_bytes = counters.served_bytes.load(Ordering::Relaxed);
                        row.fetches = counters.fetches.load(Ordering::Relaxed);
                        row.fetch_micros = counters.fetch_micros.load(Ordering::Relaxed);
                        row.warning = model.warning().unwrap_or_default();
                    }
                    MountState::Failed(e) => {
                        row.state = "failed".into();
                        row.error = e.clone();
                    }
                }
                row
            })
            .collect()
    })
}

#[tonic::async_trait]
impl Control for Service {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let rows = mount_rows(self);
        let cache = self.cache_stats().unwrap_or_default();
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            root: self.settings().root.display().to_string(),
            uptime_seconds: self.uptime().as_secs(),
            snapshots: self.snapshot_count().await as u64,
            mounted: rows.iter().filter(|r| r.state == "mounted").count() as u64,
            failed: rows.iter().filter(|r| r.state == "failed").count() as u64,
            fetched_bytes: rows.iter().map(|r| r.fetched_bytes).sum(),
            served_bytes: rows.iter().map(|r| r.served_bytes).sum(),
            cache_bytes: cache.bytes,
            cache_max_bytes: cache.max_bytes.unwrap_or(0),
            cache_evictions: cache.evictions,
            cache_evicted_bytes: cache.evicted_bytes,
            cache_refetches: cache.refetches,
            mirror_fallbacks: modelpack_registry::mirror_fallbacks(),
        }))
    }

    async fn list_mounts(
        &self,
        _request: Request<ListMountsRequest>,
    ) -> Result<Response<ListMountsResponse>, Status> {
        Ok(Response::new(ListMountsResponse {
            mounts: mount_rows(self),
        }))
    }

    async fn gc(&self, _request: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let report = self.gc_cache().await;
        Ok(Response::new(GcResponse {
            blobs: report.blobs,
            trees: report.trees,
            bytes_freed: report.bytes,
            cache_bytes: self.cache_stats().unwrap_or_default().bytes,
        }))
    }
}
