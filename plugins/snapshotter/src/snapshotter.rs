//! The snapshotter as plain Rust: a trait with containerd's snapshot operations over plain
//! arguments, one error type with one mapping to gRPC statuses, and [`Server`], which serves any
//! implementation as containerd's Snapshots service (the shape of containerd's own Rust
//! snapshots crate). The service logic (`service.rs`) never sees a request or builds a status.

use std::collections::HashMap;
use std::sync::Arc;

use modelpack_proto::containerd_client::types::Mount;
use modelpack_proto::snapshots as pb;
use tonic::{Request, Response, Status};

/// Why a snapshot operation failed; each kind is one gRPC status code containerd acts on.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot (or its parent) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The key is taken (for a remote Prepare: the target now exists, which containerd
    /// expects).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request itself is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The snapshot is in the wrong state for the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something failed on this side (the disk, a worker).
    #[error("{0}")]
    Internal(String),
}

impl SnapshotError {
    /// `snapshot KEY does not exist`.
    pub fn missing(key: &str) -> SnapshotError {
        SnapshotError::NotFound(format!("snapshot {key} does not exist"))
    }

    /// An internal failure, with what was being done.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Internal(format!("{context}: {e}"))
    }
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        match e {
            SnapshotError::NotFound(m) => Status::not_found(m),
            SnapshotError::AlreadyExists(m) => Status::already_exists(m),
            SnapshotError::InvalidArgument(m) => Status::invalid_argument(m),
            SnapshotError::FailedPrecondition(m) => Status::failed_precondition(m),
            SnapshotError::Internal(m) => Status::internal(m),
        }
    }
}

/// Result of a snapshot operation.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// containerd's snapshot operations.
#[tonic::async_trait]
pub trait Snapshotter: Send + Sync + 'static {
    /// An active snapshot `key` on `parent` (empty: none); its mounts.
    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>>;
    /// A read-only view `key` of `parent`; its mounts.
    async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>>;
    /// The mounts of `key`.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// Commits the active snapshot `key` as `name`.
    async fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()>;
    /// Removes `key` (it must have no children).
    async fn remove(&self, key: &str) -> Result<()>;
    /// What `key` is.
    async fn stat(&self, key: &str) -> Result<pb::Info>;
    /// Updates the fields `paths` names (only labels) of `info.name`.
    async fn update(&self, info: pb::Info, paths: Vec<String>) -> Result<pb::Info>;
    /// Every snapshot that matches one of `filters` (all when empty).
    async fn list(&self, filters: Vec<String>) -> Result<Vec<pb::Info>>;
    /// Disk use of `key`: (bytes, inodes).
    async fn usage(&self, key: &str) -> Result<(i64, i64)>;
    /// Removes what no snapshot needs any more.
    async fn cleanup(&self) -> Result<()>;
}

/// Serves a [`Snapshotter`] as containerd's Snapshots gRPC service.
#[derive(Debug)]
pub struct Server<S>(Arc<S>);

impl<S> Server<S> {
    /// Serves `snapshotter`.
    pub fn new(snapshotter: Arc<S>) -> Server<S> {
        Server(snapshotter)
    }
}

#[tonic::async_trait]
impl<S: Snapshotter> pb::snapshots_server::Snapshots for Server<S> {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.0.prepare(&r.key, &r.parent, r.labels).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.0.view(&r.key, &r.parent, r.labels).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let mounts = self.0.mounts(&request.into_inner().key).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.0.commit(&r.name, &r.key, r.labels).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.0.remove(&request.into_inner().key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let info = self.0.stat(&request.into_inner().key).await?;
        Ok(Response::new(pb::StatSnapshotResponse { info: Some(info) }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| SnapshotError::InvalidArgument("update without snapshot info".into()))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.0.update(info, paths).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let infos = self.0.list(request.into_inner().filters).await?;
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let (size, inodes) = self.0.usage(&request.into_inner().key).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.0.cleanup().await?;
        Ok(Response::new(()))
    }
}
