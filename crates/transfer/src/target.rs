//! Content targets and the one walk that copies an artifact between any two of them.
//!
//! A place that holds artifacts does some of a few small things, each a trait:
//!
//! | role | registry ([`Remote`]) | store / OCI layout ([`Store`]) | plain folder ([`Folder`](crate::Folder)) |
//! | --- | --- | --- | --- |
//! | [`Resolve`] a reference to a manifest | GET manifest | `index.json` | - |
//! | [`Fetch`] a verified blob into a store | adaptive Range GETs, resumable | link or copy | - |
//! | [`Exists`]: holds (or needs not) a blob | HEAD | blob file | file already identical |
//! | [`Push`] a blob from a verified file | upload (or cross-repo mount) | link or copy | into its scratch store |
//! | [`Tag`] a manifest | PUT manifest | `index.json` entry | write the files |
//!
//! A byte range of a blob is fetched with [`modelpack_registry::Repository::blob_stream`]; the
//! lazy filesystem is its one caller (a store's blobs are plain files, read in place).
//!
//! [`copy`] walks a manifest from a [`Source`] to a [`Destination`]: resolve, ask which blobs
//! the destination lacks, move each (mount, link, or fetch into the destination's landing store
//! and push from there), then tag. `pull`, `pull -o`, `fetch`, `copy`, `push` and `build --push`
//! are this walk between different targets.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use modelpack_registry::Repository;
use modelpack_spec::media_type::MEDIA_TYPE_CHUNK_INDEX;
use modelpack_spec::{Digest, MAX_DOCUMENT_SIZE};
use modelpack_store::Store;

use crate::error::{self, Error, Result};
use crate::{BlobRef, Event, SMALL_BLOB, TransferOptions, manifest_blobs, manifest_descriptor};

/// A manifest found by a reference: its exact bytes, digest and media type.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The exact bytes.
    pub bytes: Bytes,
    /// Their sha256.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
}

impl Manifest {
    /// A manifest from its bytes (media type from the document, OCI when it names none).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Manifest {
        let bytes = bytes.into();
        Manifest {
            digest: Digest::sha256_of(&bytes),
            media_type: crate::manifest_media_type(&bytes),
            bytes,
        }
    }
}

/// Finds a manifest by tag, name or digest.
pub trait Resolve: Sync {
    /// The manifest `reference` names here.
    fn resolve(&self, reference: &str) -> impl Future<Output = Result<Manifest>> + Send;
}

/// Brings a blob's verified bytes into a local store.
pub trait Fetch: Sync {
    /// The verified file that already holds the blob here, if any (no bytes need to move).
    fn local_file(&self, blob: &BlobRef) -> Option<PathBuf>;
    /// Makes `blob` present in `into`, checking its digest.
    fn fetch(
        &self,
        blob: &BlobRef,
        into: &Store,
        opts: &TransferOptions,
    ) -> impl Future<Output = Result<()>> + Send;
    /// The registry repository behind this source, for mounting blobs across repositories.
    fn repository(&self) -> Option<&Repository> {
        None
    }
}

/// Says whether a destination holds a blob already.
pub trait Exists: Sync {
    /// True when `blob` need not move.
    fn exists(&self, blob: &BlobRef) -> impl Future<Output = Result<bool>> + Send;
}

/// Takes blobs whose verified bytes sit in a local file.
pub trait Push: Sync {
    /// Called once with the manifest before any blob moves; returns the blobs this destination
    /// wants of `blobs` (all of them unless it keeps only some, as a folder does).
    fn begin(
        &self,
        manifest: &Manifest,
        blobs: Vec<BlobRef>,
    ) -> impl Future<Output = Result<Vec<BlobRef>>> + Send {
        let _ = manifest;
        async move { Ok(blobs) }
    }
    /// A store blobs are fetched into before [`Push::push`] takes them from there: the
    /// destination itself when it is a store.
    fn landing(&self) -> Option<&Store>;
    /// Takes `blob` from `file`.
    fn push(
        &self,
        blob: &BlobRef,
        file: &Path,
        opts: &TransferOptions,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Makes `blob` present without moving bytes (a mount from `from` in the same registry);
    /// false when that cannot be done here.
    fn mount(
        &self,
        blob: &BlobRef,
        from: &Repository,
    ) -> impl Future<Output = Result<bool>> + Send {
        let _ = (blob, from);
        async { Ok(false) }
    }
}

/// Names a manifest whose blobs are all present.
pub trait Tag: Sync {
    /// Stores `manifest` under `tag` (by digest when `None`) and returns the digest it got.
    fn tag(
        &self,
        manifest: &Manifest,
        tag: Option<&str>,
    ) -> impl Future<Output = Result<Digest>> + Send;
}

/// Where an artifact is copied from.
pub trait Source: Resolve + Fetch {}
impl<T: Resolve + Fetch> Source for T {}

/// Where an artifact is copied to.
pub trait Destination: Exists + Push + Tag {}
impl<T: Exists + Push + Tag> Destination for T {}

/// What [`copy`] did.
#[derive(Debug, Clone)]
pub struct Copied {
    /// The manifest as the source resolved it.
    pub manifest: Manifest,
    /// The digest the destination tagged.
    pub digest: Digest,
    /// Bytes of the blobs the destination wanted.
    pub total_bytes: u64,
}

/// Copies the artifact `reference` names in `src` to `dst` under `tag` (by digest when
/// `None`). The destination gets its manifest only after every blob it wants is there; a
/// cancel ([`TransferOptions::cancel`]) stops the blob moves where they are.
pub async fn copy<S: Source, D: Destination>(
    src: &S,
    reference: &str,
    dst: &D,
    tag: Option<&str>,
    opts: &TransferOptions,
) -> Result<Copied> {
    let manifest = src.resolve(reference).await?;
    let blobs = dst
        .begin(&manifest, manifest_blobs(&manifest.bytes)?)
        .await?;
    let total_bytes = blobs.iter().map(|b| b.size).sum();
    (opts.progress)(Event::Total { bytes: total_bytes });
    // Small blobs run in a wider window of their own (see [`SMALL_BLOB`]).
    let (small, large): (Vec<&BlobRef>, Vec<&BlobRef>) =
        blobs.iter().partition(|b| b.size <= SMALL_BLOB);
    let moving = |list: Vec<_>, width| {
        futures_util::stream::iter(list.into_iter().map(|b| copy_blob(src, dst, b, opts)))
            .buffer_unordered(width)
            .try_collect::<Vec<()>>()
    };
    let moves = futures_util::future::try_join(
        moving(large, opts.concurrency),
        moving(small, opts.small_concurrency),
    );
    match opts.cancel {
        Some(flag) => tokio::select! {
            moved = moves => drop(moved?),
            () = raised(flag) => return Err(Error::Cancelled),
        },
        None => drop(moves.await?),
    };
    let digest = dst.tag(&manifest, tag).await?;
    Ok(Copied {
        manifest,
        digest,
        total_bytes,
    })
}

/// Returns once `flag` is set.
async fn raised(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn skipped(opts: &TransferOptions, blob: &BlobRef) {
    (opts.progress)(Event::BlobSkipped {
        digest: blob.digest.clone(),
        size: blob.size,
    });
}

/// Moves one blob (see [`move_blob`]). The chunk index a manifest pins is optional: the source
/// may have lost it (a registry's garbage collection deletes a blob only an annotation names),
/// and readers fall back to whole-blob verification without it.
async fn copy_blob<S: Source, D: Destination>(
    src: &S,
    dst: &D,
    blob: &BlobRef,
    opts: &TransferOptions,
) -> Result<()> {
    match move_blob(src, dst, blob, opts).await {
        Err(e) if blob.media_type == MEDIA_TYPE_CHUNK_INDEX && e.is_not_found() => {
            tracing::warn!(digest = %blob.digest, "the chunk index the manifest pins is gone; copied without it (lazy reads verify whole layers)");
            skipped(opts, blob);
            Ok(())
        }
        moved => moved,
    }
}

/// Moves one blob: nothing when the destination has it, a mount within one registry, a push
/// from the source's own file, or a fetch into the destination's landing store and a push from
/// there.
async fn move_blob<S: Source, D: Destination>(
    src: &S,
    dst: &D,
    blob: &BlobRef,
    opts: &TransferOptions,
) -> Result<()> {
    if dst.exists(blob).await? {
        skipped(opts, blob);
        return Ok(());
    }
    if let Some(repo) = src.repository()
        && dst.mount(blob, repo).await?
    {
        skipped(opts, blob);
        return Ok(());
    }
    if let Some(file) = src.local_file(blob) {
        return dst.push(blob, &file, opts).await;
    }
    let Some(landing) = dst.landing() else {
        return Err(match src.repository() {
            None => modelpack_store::Error::BlobNotFound(blob.digest.clone()).into(),
            Some(_) => Error::Unsupported(format!(
                "{}: no local store to pass the blob through",
                blob.digest
            )),
        });
    };
    src.fetch(blob, landing, opts).await?;
    dst.push(blob, &landing.blob_path(&blob.digest), opts).await
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unsupported(format!("worker thread failed: {e}")))?
}

/// A registry repository as a content target. Blobs bound for it from another registry pass
/// through `staging`, a store the caller provides.
#[derive(Debug)]
pub struct Remote<'a> {
    repo: &'a Repository,
    staging: Option<&'a Store>,
    /// Set by [`Push::begin`] when the repository holds no tag: small blobs
    /// ([`SMALL_BLOB`]) then go up without a HEAD first. Such a repository almost never has
    /// them (blobs are linked per repository), and the question would be a third of the
    /// requests of a model of many small files. Larger blobs are always asked about: an
    /// interrupted push of a big weight is resumed by the answer.
    fresh: AtomicBool,
}

impl<'a> Remote<'a> {
    /// The repository `repo`.
    pub fn new(repo: &'a Repository) -> Remote<'a> {
        Remote {
            repo,
            staging: None,
            fresh: AtomicBool::new(false),
        }
    }

    /// Passes blobs from another registry through `store` on their way here.
    pub fn staging(mut self, store: &'a Store) -> Remote<'a> {
        self.staging = Some(store);
        self
    }
}

impl Resolve for Remote<'_> {
    async fn resolve(&self, reference: &str) -> Result<Manifest> {
        let fetched = self.repo.get_manifest(reference).await?;
        Ok(Manifest {
            media_type: crate::manifest_media_type(&fetched.bytes),
            bytes: fetched.bytes,
            digest: fetched.digest,
        })
    }
}

impl Fetch for Remote<'_> {
    fn local_file(&self, _blob: &BlobRef) -> Option<PathBuf> {
        None
    }

    async fn fetch(&self, blob: &BlobRef, into: &Store, opts: &TransferOptions) -> Result<()> {
        crate::fetch_blob(self.repo, into, blob, opts)
            .await
            .map(|_| ())
    }

    fn repository(&self) -> Option<&Repository> {
        Some(self.repo)
    }
}

impl Exists for Remote<'_> {
    async fn exists(&self, blob: &BlobRef) -> Result<bool> {
        if blob.size <= SMALL_BLOB && self.fresh.load(Ordering::Relaxed) {
            return Ok(false);
        }
        Ok(self.repo.blob_exists(&blob.digest).await?.is_some())
    }
}

impl Push for Remote<'_> {
    /// Nothing moves when the registry has the manifest already (as `oras copy` decides): a
    /// registry holds a manifest only with its blobs. Asked of the host uploads go to. The
    /// chunk index a manifest pins is not one of its blobs to the registry (its garbage
    /// collection may have taken it): it is still checked, and pushed when missing. A
    /// repository without tags is marked fresh: its small blobs go up without a HEAD first.
    async fn begin(&self, manifest: &Manifest, blobs: Vec<BlobRef>) -> Result<Vec<BlobRef>> {
        // Decided afresh for each artifact this destination takes.
        self.fresh.store(false, Ordering::Relaxed);
        match self.repo.manifest_exists(&manifest.digest).await {
            Ok(true) => {
                let pinned = crate::referrer::pinned_chunk_index(&manifest.bytes);
                Ok(blobs
                    .into_iter()
                    .filter(|b| pinned.as_ref().is_some_and(|p| p.digest == b.digest))
                    .collect())
            }
            Ok(false) => {
                match self.repo.holds_tags().await {
                    Ok(held) => self.fresh.store(!held, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot list the repository's tags; checking each blob");
                    }
                }
                Ok(blobs)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell whether the registry has the manifest; checking each blob");
                Ok(blobs)
            }
        }
    }

    fn landing(&self) -> Option<&Store> {
        self.staging
    }

    async fn push(&self, blob: &BlobRef, file: &Path, opts: &TransferOptions) -> Result<()> {
        let _permit = opts.connections.acquire().await;
        (opts.progress)(Event::BlobStarted {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        let progress = opts.progress.clone();
        let digest = blob.digest.clone();
        match opts.chunk_size {
            Some(chunk) if blob.size > chunk => {
                self.repo
                    .push_blob_chunked(&blob.digest, file, blob.size, chunk, &move |n| {
                        progress(Event::Bytes {
                            digest: digest.clone(),
                            bytes: n,
                        });
                    })
                    .await?;
            }
            _ => {
                self.repo
                    .push_blob_file(&blob.digest, file, blob.size)
                    .await?;
                progress(Event::Bytes {
                    digest,
                    bytes: blob.size,
                });
            }
        }
        (opts.progress)(Event::BlobDone {
            digest: blob.digest.clone(),
        });
        Ok(())
    }

    async fn mount(&self, blob: &BlobRef, from: &Repository) -> Result<bool> {
        if from.registry() != self.repo.registry() || from.name() == self.repo.name() {
            return Ok(false);
        }
        Ok(self.repo.mount_blob(&blob.digest, from.name()).await?)
    }
}

impl Tag for Remote<'_> {
    async fn tag(&self, manifest: &Manifest, tag: Option<&str>) -> Result<Digest> {
        let reference = tag.map_or_else(|| manifest.digest.to_string(), str::to_owned);
        let digest = self
            .repo
            .put_manifest(&reference, &manifest.media_type, manifest.bytes.clone())
            .await?;
        if let Err(e) = crate::referrer::keep_chunk_index(self.repo, &manifest.bytes).await {
            tracing::warn!(error = %e, "the chunk index was not attached as a referrer; the registry's garbage collection may delete it");
        }
        Ok(digest)
    }
}

/// The local store (or an OCI layout folder, which is one) resolves names and digests.
impl Resolve for Store {
    async fn resolve(&self, reference: &str) -> Result<Manifest> {
        let store = self.clone();
        let reference = reference.to_owned();
        blocking(move || {
            let digest: Digest = match reference.parse::<Digest>() {
                Ok(d) if store.has_blob(&d) => d,
                _ => store.resolve_name(&reference)?.digest().as_ref().parse()?,
            };
            let bytes = store.read_blob(&digest, MAX_DOCUMENT_SIZE as u64)?;
            Ok(Manifest::from_bytes(bytes))
        })
        .await
    }
}

/// Puts the verified file `file` into `store` as `blob`: a hard link where the file system
/// allows, else a copy checked against the digest.
pub(crate) fn store_file(store: &Store, blob: &BlobRef, file: &Path) -> Result<()> {
    if store.has_blob(&blob.digest) || store.link_blob(file, &blob.digest).is_ok() {
        return Ok(());
    }
    let mut ingest = store.ingest()?;
    let mut reader =
        std::fs::File::open(file).map_err(error::io(format!("opening {}", file.display())))?;
    let path = ingest.path().to_owned();
    std::io::copy(&mut reader, ingest.file())
        .map_err(error::io(format!("writing {}", path.display())))?;
    ingest.commit_verified(&blob.digest)?;
    Ok(())
}

impl Fetch for Store {
    fn local_file(&self, blob: &BlobRef) -> Option<PathBuf> {
        self.has_blob(&blob.digest)
            .then(|| self.blob_path(&blob.digest))
    }

    async fn fetch(&self, blob: &BlobRef, into: &Store, _opts: &TransferOptions) -> Result<()> {
        let file = self
            .local_file(blob)
            .ok_or_else(|| modelpack_store::Error::BlobNotFound(blob.digest.clone()))?;
        let (into, blob) = (into.clone(), blob.clone());
        blocking(move || store_file(&into, &blob, &file)).await
    }
}

impl Exists for Store {
    async fn exists(&self, blob: &BlobRef) -> Result<bool> {
        Ok(self.has_blob(&blob.digest))
    }
}

impl Push for Store {
    fn landing(&self) -> Option<&Store> {
        Some(self)
    }

    async fn push(&self, blob: &BlobRef, file: &Path, _opts: &TransferOptions) -> Result<()> {
        let (store, blob, file) = (self.clone(), blob.clone(), file.to_owned());
        blocking(move || store_file(&store, &blob, &file)).await
    }
}

impl Tag for Store {
    async fn tag(&self, manifest: &Manifest, tag: Option<&str>) -> Result<Digest> {
        let (store, bytes, tag) = (self.clone(), manifest.bytes.clone(), tag.map(str::to_owned));
        blocking(move || {
            let digest = store.put_bytes(&bytes)?;
            if let Some(name) = tag {
                store.tag_name(&name, &manifest_descriptor(&bytes)?)?;
            }
            Ok(digest)
        })
        .await
    }
}

/// A store with some blobs read from files outside it (a build pushed straight to a registry
/// leaves raw files where they are). The receiving registry checks each blob's digest on
/// upload, so a file changed since it was hashed is refused, not published.
#[derive(Debug, Clone, Copy)]
pub struct WithFiles<'a> {
    store: &'a Store,
    files: &'a HashMap<Digest, PathBuf>,
}

impl<'a> WithFiles<'a> {
    /// `store`, with the blobs `files` names read from those files.
    pub fn new(store: &'a Store, files: &'a HashMap<Digest, PathBuf>) -> WithFiles<'a> {
        WithFiles { store, files }
    }
}

impl Resolve for WithFiles<'_> {
    async fn resolve(&self, reference: &str) -> Result<Manifest> {
        Resolve::resolve(self.store, reference).await
    }
}

impl Fetch for WithFiles<'_> {
    fn local_file(&self, blob: &BlobRef) -> Option<PathBuf> {
        self.files
            .get(&blob.digest)
            .cloned()
            .or_else(|| self.store.local_file(blob))
    }

    async fn fetch(&self, blob: &BlobRef, into: &Store, opts: &TransferOptions) -> Result<()> {
        match self.files.get(&blob.digest) {
            Some(file) => {
                let (into, blob, file) = (into.clone(), blob.clone(), file.clone());
                blocking(move || store_file(&into, &blob, &file)).await
            }
            None => self.store.fetch(blob, into, opts).await,
        }
    }
}
