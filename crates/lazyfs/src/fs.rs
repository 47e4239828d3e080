//! Mounting: the tree built from the manifest, and the FUSE operations over it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU32;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuse3::raw::MountHandle;
use fuse3::raw::prelude::*;
use fuse3::{Errno, FileType, Inode, Result as FuseResult, SetAttr, Timestamp};
use futures_util::stream::{self, Stream};
use modelpack_spec::annotations::{ANNOTATION_CHUNK_INDEX_DIGEST, ANNOTATION_CHUNK_INDEX_SIZE};
use modelpack_spec::{ChunkIndex, Digest, Encoding, ModelManifest};
use modelpack_transfer::{BlobRef, Event, TransferOptions};
use serde_json::json;

use crate::blob::LazyBlob;
use crate::layer::{Frames, LazyFile, TarReader};
use crate::tree::{Content, Kind, ROOT, Tree};
use crate::{Counters, MountOptions, STATUS_FILE};

const TTL: Duration = Duration::from_secs(3600);
/// `FOPEN_DIRECT_IO` from the FUSE ABI.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `FOPEN_KEEP_CACHE` from the FUSE ABI: the content is immutable, keep the page cache.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// Chunks fetched ahead of a sequential reader, as runs of [`READAHEAD_RUN`] chunks (one ranged
/// GET each, in parallel).
const READAHEAD_CHUNKS: u64 = 32;
const READAHEAD_RUN: u64 = 16;

/// A mounted model: wait for it, unmount it, read its status.
#[derive(Debug)]
pub struct MountedModel {
    handle: MountHandle,
    fs: ModelFs,
}

impl MountedModel {
    /// The status as JSON (also readable as the hidden file `.modelpack-status`).
    pub fn status(&self) -> serde_json::Value {
        self.fs.status()
    }

    /// Bytes of file content the mount serves.
    pub fn content_size(&self) -> u64 {
        self.fs
            .tree
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, Kind::File(Content::Lazy(_) | Content::Local(_))))
            .map(|n| n.size)
            .sum()
    }

    /// The mount's live counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.fs.counters.clone()
    }

    /// Unmounts and waits until the kernel let go.
    pub async fn unmount(self) -> std::io::Result<()> {
        self.handle.unmount().await
    }

    /// Serves until `shutdown` completes (then unmounts) or something else unmounts it.
    pub async fn serve_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::select! {
            done = &mut self.handle => done,
            () = shutdown => self.handle.unmount().await,
        }
    }
}

/// The FUSE file system.
#[derive(Clone)]
struct ModelFs {
    tree: Arc<Tree>,
    counters: Arc<Counters>,
    blobs: Arc<Vec<Arc<LazyBlob>>>,
    last_read: Arc<Mutex<HashMap<u64, u64>>>,
    reference: Arc<String>,
    /// The status as read by the reader in progress: taken at offset 0, so one read of the
    /// file sees one consistent document.
    status_snapshot: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for ModelFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFs")
            .field("reference", &self.reference)
            .finish()
    }
}

fn errno(e: i32) -> Errno {
    Errno::from(e)
}

fn timestamp(t: chrono_like::Secs) -> Timestamp {
    Timestamp::new(t.0, t.1)
}

/// Seconds and nanoseconds, kept apart from any date crate.
mod chrono_like {
    /// (seconds, nanoseconds) since the epoch.
    #[derive(Debug, Clone, Copy)]
    pub struct Secs(pub i64, pub u32);
}

impl ModelFs {
    fn attr(&self, ino: u64) -> FuseResult<FileAttr> {
        let node = self.tree.get(ino).ok_or_else(|| errno(libc::ENOENT))?;
        let size = match &node.kind {
            Kind::File(Content::Status) => self.status_bytes().len() as u64,
            _ => node.size,
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            kind: node.file_type(),
            perm: node.mode,
            nlink: if matches!(node.kind, Kind::Dir(_)) {
                2
            } else {
                1
            },
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: 4096,
        })
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let fetches = c.fetches.load(Ordering::Relaxed);
        let files: Vec<serde_json::Value> = self
            .tree
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                Kind::File(Content::Lazy(file)) => Some(json!({
                    "path": n.path,
                    "size": n.size,
                    "local": (file.blob.local_fraction() * 1000.0).round() / 10.0,
                    "fetched": file.blob.fetched.load(Ordering::Relaxed),
                })),
                Kind::File(Content::Local(_)) => {
                    Some(json!({"path": n.path, "size": n.size, "local": 100.0}))
                }
                _ => None,
            })
            .collect();
        json!({
            "reference": *self.reference,
            "fetchedBytes": c.fetched_bytes.load(Ordering::Relaxed),
            "servedBytes": c.served_bytes.load(Ordering::Relaxed),
            "cacheHits": c.cache_hits.load(Ordering::Relaxed),
            "fetches": fetches,
            "meanFetchMillis": if fetches == 0 { 0.0 } else { c.fetch_micros.load(Ordering::Relaxed) as f64 / fetches as f64 / 1000.0 },
            "verifyFailures": c.verify_failures.load(Ordering::Relaxed),
            "files": files,
        })
    }

    fn status_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.status()).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Starts fetching ahead of a sequential reader of `file` (at file `offset`).
    fn readahead(&self, ino: u64, file: &LazyFile, offset: u64, len: u64) {
        let sequential = {
            let Ok(mut last) = self.last_read.lock() else {
                return;
            };
            let was = last.insert(ino, offset + len);
            offset == 0 || was == Some(offset)
        };
        if !sequential {
            return;
        }
        let blob = &file.blob;
        let next = file.blob_offset(offset + len) / blob.chunk_size();
        let mut run = next;
        while run < (next + READAHEAD_CHUNKS).min(blob.chunk_count()) {
            let blob = blob.clone();
            tokio::spawn(async move { blob.prefetch(run, READAHEAD_RUN).await });
            run += READAHEAD_RUN;
        }
    }
}

impl Filesystem for ModelFs {
    async fn init(&self, _req: Request) -> FuseResult<ReplyInit> {
        Ok(ReplyInit {
            max_write: NonZeroU32::new(128 * 1024).unwrap_or(NonZeroU32::MIN),
        })
    }

    async fn destroy(&self, _req: Request) {}

    async fn lookup(&self, _req: Request, parent: Inode, name: &OsStr) -> FuseResult<ReplyEntry> {
        let node = self.tree.get(parent).ok_or_else(|| errno(libc::ENOENT))?;
        let Kind::Dir(children) = &node.kind else {
            return Err(errno(libc::ENOTDIR));
        };
        let ino = *children.get(name).ok_or_else(|| errno(libc::ENOENT))?;
        Ok(ReplyEntry {
            ttl: TTL,
            attr: self.attr(ino)?,
            generation: 0,
        })
    }

    async fn getattr(
        &self,
        _req: Request,
        inode: Inode,
        _fh: Option<u64>,
        _flags: u32,
    ) -> FuseResult<ReplyAttr> {
        Ok(ReplyAttr {
            ttl: TTL,
            attr: self.attr(inode)?,
        })
    }

    async fn setattr(
        &self,
        _req: Request,
        _inode: Inode,
        _fh: Option<u64>,
        _set: SetAttr,
    ) -> FuseResult<ReplyAttr> {
        Err(errno(libc::EROFS))
    }

    async fn readlink(&self, _req: Request, inode: Inode) -> FuseResult<ReplyData> {
        match &self
            .tree
            .get(inode)
            .ok_or_else(|| errno(libc::ENOENT))?
            .kind
        {
            Kind::Symlink(target) => Ok(ReplyData {
                data: Bytes::from(target.clone().into_bytes()),
            }),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    async fn open(&self, _req: Request, inode: Inode, flags: u32) -> FuseResult<ReplyOpen> {
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(errno(libc::EROFS));
        }
        match &self
            .tree
            .get(inode)
            .ok_or_else(|| errno(libc::ENOENT))?
            .kind
        {
            Kind::File(Content::Status) => Ok(ReplyOpen {
                fh: 0,
                flags: FOPEN_DIRECT_IO,
            }),
            Kind::File(_) => Ok(ReplyOpen {
                fh: 0,
                flags: FOPEN_KEEP_CACHE,
            }),
            Kind::Dir(_) => Err(errno(libc::EISDIR)),
            Kind::Symlink(_) => Err(errno(libc::ELOOP)),
        }
    }

    async fn read(
        &self,
        _req: Request,
        inode: Inode,
        _fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<ReplyData> {
        let node = self.tree.get(inode).ok_or_else(|| errno(libc::ENOENT))?;
        let Kind::File(content) = &node.kind else {
            return Err(errno(libc::EISDIR));
        };
        let data = match content {
            Content::Status => {
                let Ok(mut snapshot) = self.status_snapshot.lock() else {
                    return Err(errno(libc::EIO));
                };
                if offset == 0 || snapshot.is_empty() {
                    *snapshot = self.status_bytes();
                }
                let bytes = &*snapshot;
                let start = (offset as usize).min(bytes.len());
                let end = (start + size as usize).min(bytes.len());
                Bytes::copy_from_slice(&bytes[start..end])
            }
            Content::Local(path) => {
                let end = (offset + u64::from(size)).min(node.size);
                if offset >= end {
                    Bytes::new()
                } else {
                    let file = std::fs::File::open(path).map_err(|_| errno(libc::EIO))?;
                    let mut buf = vec![0u8; (end - offset) as usize];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(|_| errno(libc::EIO))?;
                    Bytes::from(buf)
                }
            }
            Content::Lazy(file) => {
                self.readahead(inode, file, offset, u64::from(size));
                file.read(offset, u64::from(size), node.size).await.map_err(|e| {
                    tracing::warn!(path = %node.path, offset, size, error = %e.0, "read failed");
                    errno(libc::EIO)
                })?
            }
        };
        self.counters
            .served_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(ReplyData { data })
    }

    async fn write(
        &self,
        _req: Request,
        _inode: Inode,
        _fh: u64,
        _offset: u64,
        _data: &[u8],
        _wf: u32,
        _flags: u32,
    ) -> FuseResult<ReplyWrite> {
        Err(errno(libc::EROFS))
    }

    async fn mkdir(
        &self,
        _req: Request,
        _parent: Inode,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
    ) -> FuseResult<ReplyEntry> {
        Err(errno(libc::EROFS))
    }

    async fn unlink(&self, _req: Request, _parent: Inode, _name: &OsStr) -> FuseResult<()> {
        Err(errno(libc::EROFS))
    }

    async fn rmdir(&self, _req: Request, _parent: Inode, _name: &OsStr) -> FuseResult<()> {
        Err(errno(libc::EROFS))
    }

    async fn create(
        &self,
        _req: Request,
        _parent: Inode,
        _name: &OsStr,
        _mode: u32,
        _flags: u32,
    ) -> FuseResult<ReplyCreated> {
        Err(errno(libc::EROFS))
    }

    async fn rename(
        &self,
        _req: Request,
        _p: Inode,
        _n: &OsStr,
        _np: Inode,
        _nn: &OsStr,
    ) -> FuseResult<()> {
        Err(errno(libc::EROFS))
    }

    async fn statfs(&self, _req: Request, _inode: Inode) -> FuseResult<ReplyStatFs> {
        let total: u64 = self.tree.nodes.iter().map(|n| n.size).sum();
        Ok(ReplyStatFs {
            blocks: total.div_ceil(4096),
            bfree: 0,
            bavail: 0,
            files: self.tree.nodes.len() as u64,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    async fn opendir(&self, _req: Request, inode: Inode, _flags: u32) -> FuseResult<ReplyOpen> {
        match self.tree.get(inode).map(|n| &n.kind) {
            Some(Kind::Dir(_)) => Ok(ReplyOpen { fh: 0, flags: 0 }),
            Some(_) => Err(errno(libc::ENOTDIR)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    async fn access(&self, _req: Request, _inode: Inode, mask: u32) -> FuseResult<()> {
        if mask as i32 & libc::W_OK != 0 {
            return Err(errno(libc::EROFS));
        }
        Ok(())
    }

    async fn readdir<'a>(
        &'a self,
        _req: Request,
        parent: Inode,
        _fh: u64,
        offset: i64,
    ) -> FuseResult<ReplyDirectory<impl Stream<Item = FuseResult<DirectoryEntry>> + Send + 'a>>
    {
        let entries = self.dir_entries(parent)?;
        let items: Vec<FuseResult<DirectoryEntry>> = entries
            .into_iter()
            .enumerate()
            .skip(offset.max(0) as usize)
            .map(|(i, (name, ino, kind))| {
                Ok(DirectoryEntry {
                    inode: ino,
                    kind,
                    name,
                    offset: i as i64 + 1,
                })
            })
            .collect();
        Ok(ReplyDirectory {
            entries: stream::iter(items),
        })
    }

    async fn readdirplus<'a>(
        &'a self,
        _req: Request,
        parent: Inode,
        _fh: u64,
        offset: u64,
        _lock_owner: u64,
    ) -> FuseResult<
        ReplyDirectoryPlus<impl Stream<Item = FuseResult<DirectoryEntryPlus>> + Send + 'a>,
    > {
        let entries = self.dir_entries(parent)?;
        let mut items = Vec::new();
        for (i, (name, ino, kind)) in entries.into_iter().enumerate().skip(offset as usize) {
            items.push(Ok(DirectoryEntryPlus {
                inode: ino,
                generation: 0,
                kind,
                name,
                offset: i as i64 + 1,
                attr: self.attr(ino)?,
                entry_ttl: TTL,
                attr_ttl: TTL,
            }));
        }
        Ok(ReplyDirectoryPlus {
            entries: stream::iter(items),
        })
    }
}

impl ModelFs {
    fn dir_entries(&self, ino: u64) -> FuseResult<Vec<(OsString, u64, FileType)>> {
        let node = self.tree.get(ino).ok_or_else(|| errno(libc::ENOENT))?;
        let Kind::Dir(children) = &node.kind else {
            return Err(errno(libc::ENOTDIR));
        };
        let mut out = vec![
            (OsString::from("."), ino, FileType::Directory),
            (OsString::from(".."), node.parent, FileType::Directory),
        ];
        for (name, &child) in children {
            if ino == ROOT && name == STATUS_FILE {
                continue; // hidden: readable by name, not listed
            }
            let kind = self
                .tree
                .get(child)
                .map_or(FileType::RegularFile, |n| n.file_type());
            out.push((name.clone(), child, kind));
        }
        Ok(out)
    }
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] modelpack_registry::Error),
    /// Fetching a blob failed.
    #[error(transparent)]
    Transfer(#[from] modelpack_transfer::Error),
    /// Unpacking a tar layer failed.
    #[error(transparent)]
    Extract(#[from] modelpack_extract::Error),
    /// The artifact is not a valid ModelPack artifact.
    #[error("{0}")]
    Invalid(String),
    /// A spec-level problem.
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
    /// The FUSE mount itself failed.
    #[error("mounting at {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn mtime_of(meta: Option<&modelpack_spec::FileMetadata>) -> Option<Timestamp> {
    meta.map(|m| {
        timestamp(chrono_like::Secs(
            m.mtime.timestamp(),
            m.mtime.timestamp_subsec_nanos(),
        ))
    })
}

#[allow(unsafe_code)]
fn ids() -> (u32, u32) {
    // SAFETY: getuid and getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Raises the mount's block-device readahead so the kernel asks for large reads (measured:
/// FUSE cold reads need `read_ahead_kb` >= 1 MiB to approach local-disk speed).
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let dev = meta.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let _ = std::fs::write(
            format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
            "4096",
        );
    }
}

/// Mounts the artifact `opts` names at `dir` and serves it until unmounted.
pub async fn mount(opts: MountOptions, dir: &Path) -> Result<MountedModel, MountError> {
    let repo = &opts.repository;
    let fetched = repo.get_manifest(&opts.reference).await?;
    let manifest = ModelManifest::from_slice(&fetched.bytes).map_err(|report| {
        MountError::Invalid(format!(
            "not a valid ModelPack manifest: {}",
            report.error_summary()
        ))
    })?;
    let counters = Arc::new(Counters::default());
    let mut transfer = TransferOptions::new(4);
    {
        let counters = counters.clone();
        transfer.progress = Arc::new(move |event| {
            if let Event::Bytes { bytes, .. } = event {
                counters.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        });
    }
    // Private: cached model bytes are readable only by the mount's owner.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&opts.cache_dir)
        .map_err(|source| MountError::Mount {
            path: opts.cache_dir.clone(),
            source,
        })?;

    // The chunk-digest index, if the artifact carries one.
    let annotations = manifest
        .manifest()
        .annotations()
        .clone()
        .unwrap_or_default();
    let index = match (
        annotations
            .get(ANNOTATION_CHUNK_INDEX_DIGEST)
            .and_then(|d| d.parse::<Digest>().ok()),
        annotations
            .get(ANNOTATION_CHUNK_INDEX_SIZE)
            .and_then(|s| s.parse::<u64>().ok()),
    ) {
        (Some(digest), Some(size)) if size <= modelpack_spec::MAX_DOCUMENT_SIZE as u64 => {
            let blob = BlobRef {
                digest: digest.clone(),
                size,
                media_type: String::new(),
            };
            modelpack_transfer::fetch_blob(repo, &opts.store, &blob, &transfer).await?;
            let bytes = opts
                .store
                .read_blob(&digest, size)
                .map_err(|e| MountError::Invalid(format!("chunk index: {e}")))?;
            Some(ChunkIndex::from_slice(&bytes).map_err(|e| MountError::Invalid(e.to_string()))?)
        }
        _ => crate::index::find_referrer_index(repo, &fetched.digest).await,
    };
    let index_is_pinned = annotations.contains_key(ANNOTATION_CHUNK_INDEX_DIGEST);
    let wanted = |digest: &Digest| opts.layers.as_ref().is_none_or(|l| l.contains(digest));
    if let Some(layers) = &opts.layers
        && let Some(missing) = layers
            .iter()
            .find(|d| !manifest.layers().iter().any(|l| &l.digest == *d))
    {
        return Err(MountError::Invalid(format!(
            "layer {missing} is not in manifest {}",
            fetched.digest
        )));
    }

    let (uid, gid) = ids();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(Timestamp::new(0, 0), |d| {
            Timestamp::new(d.as_secs() as i64, d.subsec_nanos())
        });
    let mut tree = Tree::new(uid, gid, now);
    let mut blobs: HashMap<Digest, Arc<LazyBlob>> = HashMap::new();
    let chunks_of = |layer: &modelpack_spec::ModelLayer| {
        index.as_ref().and_then(|i| {
            i.layers
                .get(&layer.digest)
                .filter(|c| i.covers(c, layer.size()))
                .cloned()
        })
    };
    let new_blob = |layer: &modelpack_spec::ModelLayer| {
        let chunk_size = index
            .as_ref()
            .map_or(modelpack_spec::annotations::CHUNK_INDEX_CHUNK_SIZE, |i| {
                i.chunk_size
            });
        Arc::new(LazyBlob::new(
            layer.digest.clone(),
            layer.size(),
            repo.clone(),
            opts.store.clone(),
            &opts.cache_dir,
            chunk_size,
            chunks_of(layer),
            opts.verify,
            !index_is_pinned,
            counters.clone(),
            transfer.clone(),
        ))
    };
    for layer in manifest.layers() {
        if layer.media_type.encoding != Encoding::Raw || !wanted(&layer.digest) {
            continue;
        }
        let blob = blobs
            .entry(layer.digest.clone())
            .or_insert_with(|| new_blob(layer))
            .clone();
        let meta = layer.metadata.as_ref();
        let mode = meta.map_or(0o644, |m| (m.mode & 0o777) as u16);
        if !tree.add(
            layer.path.as_str(),
            Kind::File(Content::Lazy(LazyFile::raw(blob))),
            layer.size(),
            mode,
            meta.map(|m| m.uid),
            meta.map(|m| m.gid),
            mtime_of(meta),
        ) {
            return Err(MountError::Invalid(format!(
                "path {} clashes with another entry",
                layer.path
            )));
        }
    }

    // Tar layers. Plain tar and seekable tar+zstd layers whose chunks the index covers (or any,
    // with --verify none) are read lazily: their headers are read through verified chunks and
    // their files served as ranges. Other tar layers are fetched, verified and unpacked into the
    // cache, then served from there.
    let tar_layers: Vec<&modelpack_spec::ModelLayer> = manifest
        .layers()
        .iter()
        .filter(|l| l.media_type.encoding != Encoding::Raw && wanted(&l.digest))
        .collect();
    let mut lazy_layers: HashMap<Digest, (Arc<LazyBlob>, Option<Arc<Frames>>)> = HashMap::new();
    for layer in &tar_layers {
        let can_verify = chunks_of(layer).is_some() || opts.verify == crate::Verify::None;
        if !can_verify || lazy_layers.contains_key(&layer.digest) {
            continue;
        }
        let blob = new_blob(layer);
        let frames = match layer.media_type.encoding {
            Encoding::Tar => None,
            Encoding::TarZstd => match Frames::load(&blob).await {
                Ok(Some(frames)) => Some(Arc::new(frames)),
                Ok(None) => continue,
                Err(e) => return Err(MountError::Invalid(e.0)),
            },
            _ => continue,
        };
        lazy_layers.insert(layer.digest.clone(), (blob, frames));
    }
    for layer in tar_layers
        .iter()
        .filter(|l| !lazy_layers.contains_key(&l.digest))
    {
        let blob = BlobRef {
            digest: layer.digest.clone(),
            size: layer.size(),
            media_type: String::new(),
        };
        modelpack_transfer::fetch_blob(repo, &opts.store, &blob, &transfer).await?;
    }
    if !tar_layers.is_empty() {
        let source = MountSource {
            store: opts.store.clone(),
            lazy: lazy_layers.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let plan_manifest = manifest.clone();
        let tar_wanted: Vec<Digest> = tar_layers.iter().map(|l| l.digest.clone()).collect();
        let plan = tokio::task::spawn_blocking(move || {
            modelpack_extract::plan_layers(&plan_manifest, &source, &[], &|d| {
                tar_wanted.contains(d)
            })
        })
        .await
        .map_err(|e| MountError::Invalid(format!("planning the tar layers: {e}")))??;
        let lazy_of = |entry: &modelpack_extract::PlannedEntry| {
            lazy_layers.get(&plan.layers[entry.layer].digest).cloned()
        };
        // Unpack only what is not read lazily.
        let mut unpack = plan.clone();
        for entry in &mut unpack.entries {
            if matches!(entry.kind, modelpack_extract::EntryPlan::RawFile { .. })
                || lazy_of(entry).is_some()
            {
                entry.selected = false;
            }
        }
        let trees = match &opts.layers {
            None => opts.cache_dir.join("trees").join(fetched.digest.encoded()),
            Some(layers) => {
                let mut key = String::new();
                for d in layers {
                    key.push_str(d.as_str());
                }
                let key = modelpack_spec::Digest::sha256_of(key.as_bytes());
                opts.cache_dir.join("trees").join(format!(
                    "{}-{}",
                    fetched.digest.encoded(),
                    &key.encoded()[..16]
                ))
            }
        };
        if unpack.selected().next().is_some() {
            let source = modelpack_extract::StoreSource(&opts.store);
            modelpack_extract::extract_planned(&source, &unpack, &trees, None)?;
        }
        // Where each file of a lazy layer starts, for its hard links.
        let mut starts: HashMap<(usize, &str), (u64, u64)> = HashMap::new();
        for entry in plan.entries.iter() {
            if let modelpack_extract::EntryPlan::TarFile { size, offset } = entry.kind {
                starts.insert((entry.layer, entry.path.as_str()), (offset, size));
            }
        }
        for entry in plan.entries.iter().filter(|e| e.selected) {
            let path = entry.path.as_str();
            let mtime = entry
                .mtime
                .map(|t| Timestamp::new(t.unix_seconds(), t.nanoseconds()));
            let mode = entry.mode as u16;
            let lazy = lazy_of(entry);
            let file = |start: u64, size: u64, local: &str| match &lazy {
                Some((blob, frames)) => (
                    Content::Lazy(LazyFile {
                        blob: blob.clone(),
                        start,
                        frames: frames.clone(),
                    }),
                    size,
                ),
                None => (Content::Local(trees.join(local)), size),
            };
            let ok = match &entry.kind {
                modelpack_extract::EntryPlan::Dir => {
                    tree.set_dir_attrs(path, mode, mtime);
                    true
                }
                modelpack_extract::EntryPlan::TarFile { size, offset } => {
                    let (content, size) = file(*offset, *size, path);
                    tree.add(path, Kind::File(content), size, mode, None, None, mtime)
                }
                modelpack_extract::EntryPlan::HardLink { target } => {
                    let (content, size) = match (&lazy, starts.get(&(entry.layer, target.as_str())))
                    {
                        (Some(_), Some(&(offset, size))) => file(offset, size, target.as_str()),
                        _ => {
                            let size = std::fs::metadata(trees.join(target.as_str()))
                                .map_or(0, |m| m.len());
                            (Content::Local(trees.join(target.as_str())), size)
                        }
                    };
                    tree.add(path, Kind::File(content), size, mode, None, None, mtime)
                }
                modelpack_extract::EntryPlan::Symlink { target } => tree.add(
                    path,
                    Kind::Symlink(target.clone()),
                    target.len() as u64,
                    0o777,
                    None,
                    None,
                    mtime,
                ),
                modelpack_extract::EntryPlan::RawFile { .. } => true,
            };
            if !ok {
                return Err(MountError::Invalid(format!(
                    "path {path} clashes with another entry"
                )));
            }
        }
        for (blob, _) in lazy_layers.into_values() {
            blobs.entry(blob.digest.clone()).or_insert(blob);
        }
    }
    if opts.status_file {
        tree.add(
            STATUS_FILE,
            Kind::File(Content::Status),
            0,
            0o444,
            None,
            None,
            None,
        );
    }

    let fs = ModelFs {
        tree: Arc::new(tree),
        counters,
        blobs: Arc::new(blobs.into_values().collect()),
        last_read: Arc::new(Mutex::new(HashMap::new())),
        reference: Arc::new(opts.reference.clone()),
        status_snapshot: Arc::new(Mutex::new(Vec::new())),
    };
    let mut mount_options = fuse3::MountOptions::default();
    mount_options
        .fs_name("modelpack")
        .read_only(true)
        .allow_other(opts.allow_other)
        .default_permissions(true)
        .force_readdir_plus(true);
    let session = Session::new(mount_options);
    let handle = if ids().0 == 0 {
        session.mount(fs.clone(), dir).await
    } else {
        session.mount_with_unprivileged(fs.clone(), dir).await
    }
    .map_err(|source| MountError::Mount {
        path: dir.to_owned(),
        source,
    })?;
    // Off the async workers: a stat of the mount point waits for the FUSE INIT reply, which the
    // session task just spawned (possibly onto this very worker) has to send.
    let mount_point = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || raise_readahead(&mount_point)).await;
    if opts.prefetch {
        // Smallest first (configs and tokenizers before weights), one run of chunks at a time:
        // one connection in the background, so on-demand reads keep the rest of the link.
        let mut order: Vec<Arc<LazyBlob>> = fs.blobs.iter().cloned().collect();
        order.sort_by_key(|b| b.size);
        tokio::spawn(async move {
            for blob in order {
                let mut i = 0;
                while i < blob.chunk_count() {
                    blob.prefetch(i, READAHEAD_RUN).await;
                    i += READAHEAD_RUN;
                }
            }
        });
    }
    Ok(MountedModel { handle, fs })
}

/// Where the tar planner reads layers from during a mount: lazily read layers through their
/// [`LazyBlob`] (headers only, the data sought over), the others from the store.
struct MountSource {
    store: modelpack_store::Store,
    lazy: HashMap<Digest, (Arc<LazyBlob>, Option<Arc<Frames>>)>,
    runtime: tokio::runtime::Handle,
}

impl modelpack_extract::LayerSource for MountSource {
    fn open_layer(
        &self,
        layer: &modelpack_extract::LayerBlob,
    ) -> modelpack_extract::Result<Box<dyn std::io::Read + Send + '_>> {
        Ok(Box::new(self.store.open_blob(&layer.digest)?))
    }

    fn open_tar_seekable(
        &self,
        layer: &modelpack_extract::LayerBlob,
    ) -> modelpack_extract::Result<Option<Box<dyn modelpack_extract::ReadSeek + '_>>> {
        Ok(self.lazy.get(&layer.digest).map(|(blob, frames)| {
            Box::new(TarReader::new(
                blob.clone(),
                frames.clone(),
                self.runtime.clone(),
            )) as Box<dyn modelpack_extract::ReadSeek>
        }))
    }
}
