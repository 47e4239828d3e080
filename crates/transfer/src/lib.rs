//! One copy engine between content targets: a registry repository, the local store, and OCI
//! layout folders (which are stores too).
//!
//! - [`pull`]: registry -> store: manifest, then blobs in parallel, each one stream that is split
//!   onto parallel Range GETs when the link is slow; every blob verified before it is renamed
//!   into place; interrupted downloads resume;
//! - [`push`]: store -> registry: blobs the registry lacks (HEAD first), streamed from disk, then
//!   the manifest;
//! - [`copy_remote`]: registry -> registry, mounting blobs across repositories of the same
//!   registry so no blob bytes move;
//! - [`copy_local`]: store -> store (an OCI layout folder on either side);
//! - [`Artifact`]: a ModelPack artifact loaded and validated from the store or a registry;
//! - [`attach`]: an artifact referring to another (OCI `subject`), with the tag-schema fallback;
//! - [`pull_to_folder`]: registry -> plain folder (`pull -o`, `fetch`): the same blob engine
//!   into a scratch store, then the extractor links the verified files into place.
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use modelpack_registry::{FetchedManifest, Repository};
use modelpack_spec::media_type::{MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_MANIFEST};
use modelpack_spec::oci_spec::image::Descriptor;
use modelpack_spec::{Digest, Reference};
use modelpack_store::Store;
use tokio::sync::Semaphore;

pub use artifact::Artifact;
pub use download::{Fetched, fetch_blob};
pub use error::{Error, Result};
pub use folder::{FolderOutcome, pull_to_folder};
pub use referrer::attach;

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

/// Receives progress events.
pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// How to move content.
#[derive(Clone)]
pub struct TransferOptions {
    /// Blobs (and Range requests) in flight at once.
    pub concurrency: usize,
    /// Connections in flight at once, across blobs.
    pub connections: Arc<Semaphore>,
    /// Upload in PATCH chunks of this size instead of one PUT.
    pub chunk_size: Option<u64>,
    /// Progress callback.
    pub progress: Progress,
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
    /// `concurrency` blobs and connections, no progress.
    pub fn new(concurrency: usize) -> TransferOptions {
        let concurrency = concurrency.clamp(1, 64);
        TransferOptions {
            concurrency,
            connections: Arc::new(Semaphore::new(concurrency)),
            chunk_size: None,
            progress: Arc::new(|_| {}),
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
    let annotations = &doc["annotations"];
    if let (Some(digest), Some(size)) = (
        annotations[modelpack_spec::annotations::ANNOTATION_CHUNK_INDEX_DIGEST].as_str(),
        annotations[modelpack_spec::annotations::ANNOTATION_CHUNK_INDEX_SIZE]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok()),
    ) && size <= modelpack_spec::MAX_DOCUMENT_SIZE as u64
    {
        out.push(BlobRef {
            digest: digest.parse()?,
            size,
            media_type: modelpack_spec::media_type::MEDIA_TYPE_CHUNK_INDEX.to_owned(),
        });
    }
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

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// The manifest as fetched.
    pub manifest: FetchedManifest,
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// Blob bytes in the artifact.
    pub total_bytes: u64,
}

/// Resolves `reference` in `repo` and brings the artifact into `store` (not named yet: the
/// caller tags it, holding a GC guard).
pub async fn pull(
    repo: &Repository,
    reference: &Reference,
    store: &Store,
    opts: &TransferOptions,
) -> Result<PullOutcome> {
    let manifest = repo.get_manifest(&reference.tag_or_digest()).await?;
    let blobs = manifest_blobs(&manifest.bytes)?;
    let total_bytes: u64 = blobs.iter().map(|b| b.size).sum();
    (opts.progress)(Event::Total { bytes: total_bytes });
    futures_util::stream::iter(blobs.iter().map(|b| fetch_blob(repo, store, b, opts)))
        .buffer_unordered(opts.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    store.put_bytes(&manifest.bytes)?;
    let descriptor = manifest_descriptor(&manifest.bytes)?;
    Ok(PullOutcome {
        manifest,
        descriptor,
        total_bytes,
    })
}

/// Pushes the manifest `digest` from `store` (with every blob it references) to `repo`, under
/// `tag` (or by digest).
pub async fn push(
    store: &Store,
    digest: &Digest,
    repo: &Repository,
    tag: Option<&str>,
    opts: &TransferOptions,
) -> Result<Digest> {
    push_with_sources(store, digest, &HashMap::new(), repo, tag, opts).await
}

/// Like [`push`], with some blobs read from files outside the store (a build pushed straight to
/// the registry leaves raw files in place). The registry checks each blob's digest on upload,
/// so a file changed since it was hashed is refused, not published.
pub async fn push_with_sources(
    store: &Store,
    digest: &Digest,
    sources: &HashMap<Digest, PathBuf>,
    repo: &Repository,
    tag: Option<&str>,
    opts: &TransferOptions,
) -> Result<Digest> {
    let manifest = store.read_blob(digest, modelpack_spec::MAX_DOCUMENT_SIZE as u64)?;
    let blobs = manifest_blobs(&manifest)?;
    (opts.progress)(Event::Total {
        bytes: blobs.iter().map(|b| b.size).sum(),
    });
    futures_util::stream::iter(
        blobs
            .iter()
            .map(|b| push_blob(store, sources.get(&b.digest), repo, b, opts)),
    )
    .buffer_unordered(opts.concurrency)
    .try_collect::<Vec<_>>()
    .await?;
    let reference = tag.map_or_else(|| digest.to_string(), str::to_owned);
    let pushed = repo
        .put_manifest(
            &reference,
            &manifest_media_type(&manifest),
            Bytes::from(manifest),
        )
        .await?;
    Ok(pushed)
}

async fn push_blob(
    store: &Store,
    source: Option<&PathBuf>,
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
) -> Result<()> {
    let _permit = opts.connections.acquire().await;
    if repo.blob_exists(&blob.digest).await?.is_some() {
        (opts.progress)(Event::BlobSkipped {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        return Ok(());
    }
    let path = match source {
        Some(path) => path.clone(),
        None if store.has_blob(&blob.digest) => store.blob_path(&blob.digest),
        None => return Err(modelpack_store::Error::BlobNotFound(blob.digest.clone()).into()),
    };
    (opts.progress)(Event::BlobStarted {
        digest: blob.digest.clone(),
        size: blob.size,
    });
    let progress = opts.progress.clone();
    let digest = blob.digest.clone();
    match opts.chunk_size {
        Some(chunk) if blob.size > chunk => {
            repo.push_blob_chunked(&blob.digest, &path, blob.size, chunk, &move |n| {
                progress(Event::Bytes {
                    digest: digest.clone(),
                    bytes: n,
                });
            })
            .await?;
        }
        _ => {
            repo.push_blob_file(&blob.digest, &path, blob.size).await?;
            (opts.progress)(Event::Bytes {
                digest: blob.digest.clone(),
                bytes: blob.size,
            });
        }
    }
    (opts.progress)(Event::BlobDone {
        digest: blob.digest.clone(),
    });
    Ok(())
}

/// Copies `reference` from `src` to `dst` under `dst_tag`. Within one registry blobs are mounted
/// (no bytes move); across registries they pass through a temporary layout inside `scratch`.
/// The manifest bytes, and so its digest, are kept.
pub async fn copy_remote(
    src: &Repository,
    reference: &Reference,
    dst: &Repository,
    dst_tag: Option<&str>,
    scratch: &Store,
    opts: &TransferOptions,
) -> Result<Digest> {
    let manifest = src.get_manifest(&reference.tag_or_digest()).await?;
    let blobs = manifest_blobs(&manifest.bytes)?;
    (opts.progress)(Event::Total {
        bytes: blobs.iter().map(|b| b.size).sum(),
    });
    let same_registry = src.registry() == dst.registry();
    futures_util::stream::iter(blobs.iter().map(|b| async move {
        if dst.blob_exists(&b.digest).await?.is_some() {
            (opts.progress)(Event::BlobSkipped {
                digest: b.digest.clone(),
                size: b.size,
            });
            return Ok(());
        }
        if same_registry && dst.mount_blob(&b.digest, src.name()).await? {
            (opts.progress)(Event::BlobSkipped {
                digest: b.digest.clone(),
                size: b.size,
            });
            return Ok(());
        }
        fetch_blob(src, scratch, b, opts).await?;
        push_blob(scratch, None, dst, b, opts).await
    }))
    .buffer_unordered(opts.concurrency)
    .try_collect::<Vec<()>>()
    .await?;
    let tag = dst_tag.map_or_else(|| manifest.digest.to_string(), str::to_owned);
    let digest = dst
        .put_manifest(
            &tag,
            &manifest_media_type(&manifest.bytes),
            manifest.bytes.clone(),
        )
        .await?;
    Ok(digest)
}

/// Copies the manifest `digest` and its blobs from one store (or layout) to another, linking
/// blob files where the file system allows.
pub fn copy_local(src: &Store, digest: &Digest, dst: &Store) -> Result<Descriptor> {
    let manifest = src.read_blob(digest, modelpack_spec::MAX_DOCUMENT_SIZE as u64)?;
    for blob in manifest_blobs(&manifest)? {
        if dst.has_blob(&blob.digest) {
            continue;
        }
        let from = src.blob_path(&blob.digest);
        if dst.link_blob(&from, &blob.digest).is_err() {
            let mut ingest = dst.ingest()?;
            let mut reader = std::fs::File::open(&from)
                .map_err(error::io(format!("opening {}", from.display())))?;
            let path = ingest.path().to_owned();
            std::io::copy(&mut reader, ingest.file())
                .map_err(error::io(format!("writing {}", path.display())))?;
            ingest.commit_verified(&blob.digest)?;
        }
    }
    dst.put_bytes(&manifest)?;
    manifest_descriptor(&manifest)
}
