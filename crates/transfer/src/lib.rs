//! One copy engine between content targets: a registry repository ([`Remote`]), the local
//! store and OCI layout folders ([`Store`]), and plain folders ([`Folder`]).
//!
//! - [`copy`]: the one walk between any [`Source`] and [`Destination`]; `pull` (registry ->
//!   store), `pull -o`/`fetch` (registry -> folder), `push` and `build --push` (store ->
//!   registry), `copy` (any two) are this walk;
//! - [`fetch_blob`]: registry -> store for one blob: one stream that is split onto parallel
//!   Range GETs when the link is slow, verified before it is renamed into place, resumed after
//!   an interruption (the lazy filesystem's whole-blob path uses it too);
//! - [`Artifact`]: a ModelPack artifact loaded and validated from the store or a registry;
//! - [`attach`]: an artifact referring to another (OCI `subject`), with the tag-schema fallback.
//!
//! Progress goes to a callback as [`Event`]s; the CLI renders them.
//!
//! **Invariant:** the store only ever gains blobs whose digest matched; the destination gets a
//! manifest only after every blob it references is there.
#![deny(missing_docs, missing_debug_implementations)]

mod artifact;
mod download;
mod error;
mod folder;
mod referrer;
mod target;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use modelpack_spec::Digest;
use modelpack_spec::media_type::{MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_MANIFEST};
use modelpack_spec::oci_spec::image::Descriptor;
use tokio::sync::Semaphore;

pub use artifact::Artifact;
pub use download::{Fetched, fetch_blob};
pub use error::{Error, Result};
pub use folder::Folder;
pub use referrer::{CHUNK_INDEX_FILE_NAME, attach};
pub use target::{
    Copied, Destination, Exists, Fetch, Manifest, Push, Remote, Resolve, Source, Tag, WithFiles,
    copy,
};

/// A progress event.
#[derive(Debug, Clone)]
pub enum Event {
    /// The bytes a transfer will move at most.
    Total {
        /// Sum of blob sizes.
        bytes: u64,
    },
    /// A blob started moving.
    BlobStarted {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// Bytes of a blob moved.
    Bytes {
        /// The blob.
        digest: Digest,
        /// How many.
        bytes: u64,
    },
    /// Bytes already present from an interrupted transfer.
    Resumed {
        /// The blob.
        digest: Digest,
        /// How many.
        bytes: u64,
    },
    /// A blob the destination already had (or mounted from another repository).
    BlobSkipped {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// A blob finished.
    BlobDone {
        /// The blob.
        digest: Digest,
    },
}

/// Blobs up to this size are small: fetched whole in one request into memory, verified and
/// written to the store as one file (no partial file, no saved progress, no hashing thread),
/// and [`SMALL_PER_CONNECTION`] times as many of them are in flight as of larger blobs. A
/// model of thousands of small files is bound by requests, not bytes: by the round trip on a
/// remote registry, by the registry's per-request work on a near one.
pub const SMALL_BLOB: u64 = 1 << 20;

/// Requests for small blobs in flight per connection given to larger ones (at most 64 in all).
pub const SMALL_PER_CONNECTION: usize = 8;

/// Receives progress events.
pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// How to move content.
#[derive(Clone)]
pub struct TransferOptions {
    /// Blobs (and Range requests) in flight at once.
    pub concurrency: usize,
    /// Connections in flight at once, across blobs (downloads of small blobs take
    /// `small_requests` instead).
    pub connections: Arc<Semaphore>,
    /// Small blobs ([`SMALL_BLOB`]) in flight at once: [`SMALL_PER_CONNECTION`] per connection,
    /// at most 64.
    pub small_concurrency: usize,
    /// Requests for small blobs in flight at once, across blobs (`small_concurrency` permits).
    pub small_requests: Arc<Semaphore>,
    /// Upload in PATCH chunks of this size instead of one PUT.
    pub chunk_size: Option<u64>,
    /// Progress callback.
    pub progress: Progress,
    /// Set (by Ctrl-C) to stop a [`copy`] where it is; downloads keep their saved progress.
    pub cancel: Option<&'static AtomicBool>,
}

impl std::fmt::Debug for TransferOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferOptions")
            .field("concurrency", &self.concurrency)
            .field("chunk_size", &self.chunk_size)
            .finish()
    }
}

impl TransferOptions {
    /// `concurrency` blobs and connections (and [`SMALL_PER_CONNECTION`] times as many small
    /// blobs), no progress.
    pub fn new(concurrency: usize) -> TransferOptions {
        let concurrency = concurrency.clamp(1, 64);
        let small_concurrency = (concurrency * SMALL_PER_CONNECTION).min(64);
        TransferOptions {
            concurrency,
            connections: Arc::new(Semaphore::new(concurrency)),
            small_concurrency,
            small_requests: Arc::new(Semaphore::new(small_concurrency)),
            chunk_size: None,
            progress: Arc::new(|_| {}),
            cancel: None,
        }
    }
}

/// A blob a manifest references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// The config and layers of an image manifest (any artifact, not only models).
pub fn manifest_blobs(manifest: &[u8]) -> Result<Vec<BlobRef>> {
    let doc: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| Error::Unsupported(format!("manifest is not JSON: {e}")))?;
    if doc.get("manifests").is_some() {
        return Err(Error::Unsupported(
            "image indexes (multi-platform images) are not supported; name one manifest by digest"
                .into(),
        ));
    }
    let mut out = Vec::new();
    let config = doc.get("config").into_iter();
    let layers = doc["layers"].as_array().into_iter().flatten();
    for d in config.chain(layers) {
        let digest: Digest = d["digest"]
            .as_str()
            .ok_or_else(|| Error::Unsupported("descriptor without digest".into()))?
            .parse()?;
        if !digest.is_sha256() {
            return Err(Error::Unsupported(format!(
                "{digest}: only sha256 digests are supported"
            )));
        }
        let size = d["size"].as_u64().ok_or_else(|| {
            Error::Unsupported(format!("{digest}: descriptor without a valid size"))
        })?;
        out.push(BlobRef {
            digest,
            size,
            media_type: d["mediaType"].as_str().unwrap_or_default().to_owned(),
        });
    }
    // The chunk-digest index our builds pin in the manifest travels with it.
    out.extend(referrer::pinned_chunk_index(manifest));
    // A blob listed twice moves once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|b| seen.insert(b.digest.clone()));
    Ok(out)
}

fn manifest_media_type(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
        .filter(|m| m == MEDIA_TYPE_OCI_MANIFEST || m == MEDIA_TYPE_DOCKER_MANIFEST)
        .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_owned())
}

/// The descriptor of a manifest as an index entry or a subject.
pub fn manifest_descriptor(bytes: &[u8]) -> Result<Descriptor> {
    let digest = Digest::sha256_of(bytes);
    let mut d = modelpack_spec::descriptor(
        &manifest_media_type(bytes),
        &digest,
        bytes.len() as u64,
        None,
    )?;
    if let Some(t) = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["artifactType"].as_str().map(str::to_owned))
    {
        d.set_artifact_type(Some(t.as_str().into()));
    }
    Ok(d)
}
