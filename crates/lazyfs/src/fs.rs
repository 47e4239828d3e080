//! Mounting: the tree built from the manifest, and the FUSE operations over it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use modelpack_registry::Repository;
use modelpack_spec::annotations::{ANNOTATION_CHUNK_INDEX_DIGEST, ANNOTATION_CHUNK_INDEX_SIZE};
use modelpack_spec::{ChunkIndex, Digest, Encoding, ModelManifest};
use modelpack_transfer::{BlobRef, Event, TransferOptions};
use serde_json::json;

use crate::background::Background;
use crate::blob::{BlobContext, LazyBlob};
use crate::cache::CacheBudget;
use crate::error::Error;
use crate::handover::{Handover, SessionState};
use crate::layer::{DeferredLayer, Frames, LazyFile, TarReader};
use crate::readahead::{self, Ahead, Stream};
use crate::tree::{Attrs, Content, Kind, ROOT, Tree, time};
use crate::{Counters, MountOptions, STATUS_FILE};

const TTL: Duration = Duration::from_secs(3600);
/// File handles: how a file was opened (see [`OpenState`]).
const FH_CACHED: u64 = 1;
const FH_PASSTHROUGH: u64 = 2;
/// A passthrough open of a complete chunk-cache file, which stays pinned (never evicted) until
/// the handle is released.
const FH_PASSTHROUGH_PINNED: u64 = 3;

/// A mounted model: wait for it, unmount it, read its status.
pub struct MountedModel {
    session: Option<fuser::BackgroundSession>,
    fs: ModelFs,
    /// A duplicate of the connection's `/dev/fuse` descriptor and its state, for a
    /// [`crate::Holder`] to keep across a restart.
    connection: Option<(OwnedFd, SessionState)>,
    /// Where an adopted connection is mounted: fuser did not mount it, so it cannot unmount it.
    adopted_at: Option<PathBuf>,
}

impl std::fmt::Debug for MountedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedModel")
            .field("reference", &self.fs.reference)
            .finish_non_exhaustive()
    }
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
            .filter(|n| {
                matches!(
                    n.kind,
                    Kind::File(Content::Lazy(_) | Content::Local(_) | Content::Deferred(_))
                )
            })
            .map(|n| n.size)
            .sum()
    }

    /// Why the chunk index the manifest pins is not used, if it is not (layers are then verified
    /// whole before they are served).
    pub fn index_warning(&self) -> Option<String> {
        (*self.fs.index_warning).clone()
    }

    /// The mount's live counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.fs.counters.clone()
    }

    /// Unmounts, waits until the kernel let go, and stops the mount's background work
    /// (readahead, prefetch, background verification): no request is sent after this returns.
    pub async fn unmount(mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            self.fs.tasks.shutdown().await;
            return Ok(());
        };
        if let Some(dir) = self.adopted_at.take() {
            // The session ends once the kernel ends the connection, at unmount.
            match rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
                Err(e) => {
                    self.session = Some(session);
                    self.adopted_at = Some(dir);
                    return Err(e.into());
                }
            }
        }
        let result = tokio::task::spawn_blocking(move || end_session(session))
            .await
            .map_err(std::io::Error::other);
        if let Some(path) = self.fs.opens_file.lock().ok().and_then(|mut p| p.take()) {
            let _ = std::fs::remove_file(path);
        }
        self.fs.tasks.shutdown().await;
        self.fs.release_pins();
        result?
    }

    /// The connection's `/dev/fuse` descriptor and what its INIT negotiated: what a
    /// [`crate::Holder`] keeps so that a successor can adopt the mount
    /// ([`crate::MountOptions::adopt`]).
    pub fn connection(&self) -> Option<(BorrowedFd<'_>, SessionState)> {
        self.connection
            .as_ref()
            .map(|(fd, state)| (fd.as_fd(), *state))
    }

    /// Abandons the mount without unmounting, for a successor to adopt its connection from a
    /// [`crate::Holder`]; only right before the process exits. Nothing of it is dropped: a
    /// dropped session unmounts, and a dropped read in flight answers EIO. Requests in flight
    /// stay unanswered, and the successor has the kernel send them again.
    pub fn leave(self) {
        std::mem::forget(self);
    }

    /// Serves until `shutdown` completes (then unmounts) or something else unmounts it.
    pub async fn serve_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return self.unmount().await,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let ended = self.session.as_ref().is_none_or(|s| s.guard.is_finished());
                    if ended {
                        // Unmounted from outside (`umount`, `fusermount3 -u`), or the session
                        // failed (then this unmounts and reports why).
                        return self.unmount().await;
                    }
                }
            }
        }
    }
}

/// Unmounts `session` and joins its thread. The session is always unmounted here rather than
/// dropped: dropping it runs fuser's own unmount, which after an unmount from outside fails
/// with EINVAL and logs `Unmount failed: Invalid argument`. EINVAL (or ENOENT) from umount(2)
/// means the folder is no longer a mount point (someone else unmounted it), so it counts as
/// success; any other failure is returned, once, to the caller.
fn end_session(session: fuser::BackgroundSession) -> std::io::Result<()> {
    match session.umount_and_join() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        other => other,
    }
}

/// How an inode is open right now. The kernel refuses to mix page-cache opens and passthrough
/// opens of one inode, so passthrough is used only when no page-cache open is outstanding, and
/// while a passthrough open is, later opens share its backing file.
///
/// A successor that adopts the connection inherits the kernel's view: the open state is saved
/// (`ModelFs::opens_file`) at every open and release while passthrough is on, and loaded at
/// adoption, so the successor keeps using the predecessor's backing file for an inode the kernel
/// holds in passthrough mode, and no passthrough for one it holds in page-cache mode (the kernel
/// answers either mistake with EIO).
#[derive(Default)]
struct OpenState {
    cached: u32,
    /// The backing file, its raw id (what a successor needs), and the handles open on it.
    passthrough: Option<(Arc<BackingId>, u32, u32)>,
    /// A predecessor's backing file (raw id) and its handles still open: wrapped at the next
    /// passthrough open (the kernel takes no other backing file for the inode); if none comes,
    /// it stays registered until the connection ends.
    inherited: Option<(u32, u32)>,
    /// Passthrough handles that pin the blob's cache file (released at unmount if the kernel
    /// never released them).
    pinned: u32,
}

impl OpenState {
    fn idle(&self) -> bool {
        self.cached == 0 && self.passthrough.is_none() && self.inherited.is_none()
    }
}

/// One inode's saved open state: `[ino, cached, raw backing id, passthrough handles, pinned]`.
type SavedOpen = [u64; 5];

/// The FUSE file system.
#[derive(Clone)]
struct ModelFs {
    tree: Arc<Tree>,
    counters: Arc<Counters>,
    blobs: Arc<Vec<Arc<LazyBlob>>>,
    /// Each inode's sequential reader, for readahead.
    streams: Arc<Mutex<HashMap<u64, Stream>>>,
    reference: Arc<String>,
    /// Why the pinned chunk index is not used, if it is not (shown in the status).
    index_warning: Arc<Option<String>>,
    /// The status as read by the reader in progress: taken at offset 0, so one read of the
    /// file sees one consistent document.
    status_snapshot: Arc<Mutex<Vec<u8>>>,
    /// Where async reads run.
    runtime: tokio::runtime::Handle,
    /// Kernel passthrough for complete files: wanted (root only), then as negotiated.
    passthrough: Arc<AtomicBool>,
    opens: Arc<Mutex<HashMap<u64, OpenState>>>,
    /// Readahead, prefetch and background verification: cancelled at unmount.
    tasks: Background,
    /// The cache folder's accountant (for the status).
    cache: Arc<CacheBudget>,
    /// What the kernel offered at INIT (ABI minor, capabilities, largest readahead): recorded
    /// so that a successor can adopt the connection.
    offered: Arc<Mutex<Option<(u32, u64, u32)>>>,
    /// Where the open state is saved for a successor (see [`OpenState`]); set once the mount's
    /// device is known.
    opens_file: Arc<Mutex<Option<PathBuf>>>,
}

impl ModelFs {
    fn attr(&self, ino: u64) -> Result<FileAttr, Error> {
        let node = self.tree.get(ino).ok_or(Error::NotFound)?;
        let size = match &node.kind {
            Kind::File(Content::Status) => self.status_bytes().len() as u64,
            _ => node.size,
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
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
            flags: 0,
        })
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let fetches = c.fetches.load(Ordering::Relaxed);
        // Open handles per inode: page-cache opens and kernel-passthrough opens.
        let opens: HashMap<u64, (u32, u32)> = self
            .opens
            .lock()
            .map(|o| {
                o.iter()
                    .map(|(ino, s)| {
                        let passthrough = s.passthrough.as_ref().map_or(0, |p| p.2)
                            + s.inherited.map_or(0, |p| p.1);
                        (*ino, (s.cached, passthrough))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let files: Vec<serde_json::Value> = self
            .tree
            .iter()
            .filter_map(|(ino, n)| {
                let (cached, passthrough) = opens.get(&ino).copied().unwrap_or((0, 0));
                let mut file = self.file_status(n)?;
                file["openCached"] = cached.into();
                file["openPassthrough"] = passthrough.into();
                Some(file)
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
            "refetches": c.refetches.load(Ordering::Relaxed),
            "cache": self.cache_status(),
            "passthrough": self.passthrough.load(Ordering::Relaxed),
            "chunkIndexWarning": *self.index_warning,
            "mirrorFallbacks": modelpack_registry::mirror_fallbacks(),
            "files": files,
        })
    }

    /// The cache folder's numbers (shared by every mount using the folder).
    fn cache_status(&self) -> serde_json::Value {
        let stats = self.cache.stats();
        json!({
            "maxBytes": stats.max_bytes,
            "bytes": stats.bytes,
            "evictions": stats.evictions,
            "evictedBytes": stats.evicted_bytes,
            "refetches": stats.refetches,
        })
    }

    /// One file's line of the status (`None` for folders, links and the status file).
    fn file_status(&self, n: &crate::tree::Node) -> Option<serde_json::Value> {
        match &n.kind {
            Kind::File(Content::Lazy(file)) => Some(json!({
                "path": n.path,
                "size": n.size,
                "local": (file.blob.local_fraction() * 1000.0).round() / 10.0,
                "fetched": file.blob.fetched.load(Ordering::Relaxed),
            })),
            Kind::File(Content::Local(_)) => {
                Some(json!({"path": n.path, "size": n.size, "local": 100.0}))
            }
            Kind::File(Content::Deferred(d)) => Some(json!({
                "path": n.path,
                "size": n.size,
                "local": if d.ready().is_some() { 100.0 } else { 0.0 },
            })),
            _ => None,
        }
    }

    fn status_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.status()).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Records a read of `len` bytes at `offset` of `file` in `ino`'s stream; the chunks to
    /// keep fetched ahead of its reader, `None` until the reader has shown it reads in sequence.
    fn stream_read(&self, ino: u64, file: &LazyFile, offset: u64, len: u64) -> Option<Ahead> {
        let last_byte = offset.saturating_add(len.max(1) - 1);
        let last = file.blob_offset(last_byte) / file.blob.chunk_size();
        let mut streams = self.streams.lock().ok()?;
        let stream = Stream::after(streams.get(&ino).copied(), offset, len, last);
        streams.insert(ino, stream);
        stream.ahead()
    }

    /// The local file holding exactly `node`'s bytes, when they are all here and verified: a
    /// file unpacked from a tar layer, or a complete raw layer (in the store or the cache). A
    /// chunk-cache file comes pinned (nothing of it evicted), with the blob to unpin it.
    fn complete_file(
        &self,
        content: &Content,
        size: u64,
    ) -> Option<(PathBuf, Option<Arc<LazyBlob>>)> {
        match content {
            Content::Local(path) => Some((path.clone(), None)),
            Content::Deferred(d) => d.ready().map(|p| (p, None)),
            Content::Lazy(file)
                if file.frames.is_none() && file.start == 0 && file.blob.size == size =>
            {
                let (path, pinned) = file.blob.pin_complete_file()?;
                Some((path, pinned.then(|| file.blob.clone())))
            }
            _ => None,
        }
    }

    /// Opens `ino` in kernel passthrough to `path` if no page-cache open of it is outstanding;
    /// `false` when it must be opened through the page cache instead.
    fn open_passthrough(&self, ino: u64, path: &Path, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let mut opens = self.opens.lock().ok()?;
        let state = opens.entry(ino).or_default();
        if let Some((id, _, count)) = &mut state.passthrough {
            *count += 1;
            return Some(id.clone());
        }
        if let Some((raw, count)) = state.inherited.take() {
            // SAFETY: `raw` is a backing id the predecessor registered on this very connection
            // and never closed; from here the wrapper owns it (closed with its last handle).
            #[allow(unsafe_code)]
            let id = Arc::new(unsafe { reply.wrap_backing(raw) });
            state.passthrough = Some((id.clone(), raw, count + 1));
            return Some(id);
        }
        if state.cached > 0 {
            return None;
        }
        let file = std::fs::File::open(path).ok()?;
        match reply.open_backing(&file) {
            Ok(id) => {
                let raw = id.into_raw();
                // SAFETY: `raw` was registered on this connection just now and is owned by
                // nothing else; the wrapper closes it with its last handle.
                #[allow(unsafe_code)]
                let id = Arc::new(unsafe { reply.wrap_backing(raw) });
                state.passthrough = Some((id.clone(), raw, 1));
                Some(id)
            }
            Err(e) => {
                // Not permitted or not possible here (a backing file on a stacked file system):
                // page-cache reads from now on.
                tracing::debug!(error = %e, "kernel passthrough unavailable; reads go through the page cache");
                self.passthrough.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Saves the open state for a successor (only while passthrough is on: page-cache opens
    /// alone need nothing). Written before the reply, so an open the kernel saw is saved; one
    /// saved but never answered (the process died in between) is sent again by the kernel and
    /// counted twice, which only keeps its backing file and pin until the connection ends.
    fn save_opens(&self) {
        if !self.passthrough.load(Ordering::Relaxed) {
            return;
        }
        let Some(path) = self.opens_file.lock().ok().and_then(|p| p.clone()) else {
            return;
        };
        let saved: Vec<SavedOpen> = match self.opens.lock() {
            Ok(opens) => opens
                .iter()
                .map(|(ino, s)| {
                    let (raw, count) = match (&s.passthrough, s.inherited) {
                        (Some((_, raw, count)), _) => (*raw, *count),
                        (None, Some((raw, count))) => (raw, count),
                        (None, None) => (0, 0),
                    };
                    [
                        *ino,
                        u64::from(s.cached),
                        u64::from(raw),
                        u64::from(count),
                        u64::from(s.pinned),
                    ]
                })
                .collect(),
            Err(_) => return,
        };
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the open files for a successor");
        }
    }

    /// Where the open state of the connection mounted with device `dev` is saved.
    fn opens_path(&self, dev: (u32, u32)) -> PathBuf {
        self.cache
            .dir()
            .join(format!(".opens-{}-{}.json", dev.0, dev.1))
    }

    /// Takes over the open state a predecessor saved at `path` (see [`OpenState`]): its
    /// page-cache opens, its backing files, and its pins of complete cache files.
    fn load_opens(&self, path: &Path) {
        let saved: Vec<SavedOpen> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => return,
        };
        let Ok(mut opens) = self.opens.lock() else {
            return;
        };
        for [ino, cached, raw, count, pinned] in saved {
            if self.tree.get(ino).is_none() {
                continue;
            }
            let state = opens.entry(ino).or_default();
            state.cached = u32::try_from(cached).unwrap_or(u32::MAX);
            if count > 0
                && let Ok(raw) = u32::try_from(raw)
            {
                state.inherited = Some((raw, u32::try_from(count).unwrap_or(u32::MAX)));
            }
            // The predecessor's pins of complete cache files: held again, or eviction could
            // punch holes under the kernel's passthrough reads.
            if let Some(node) = self.tree.get(ino)
                && let Kind::File(content) = &node.kind
            {
                for _ in 0..pinned {
                    if let Some((_, Some(_))) = self.complete_file(content, node.size) {
                        state.pinned += 1;
                    }
                }
            }
        }
        opens.retain(|_, s| !s.idle() || s.pinned > 0);
    }

    /// Ends one passthrough pin of `ino`'s blob.
    fn unpin(&self, ino: u64) {
        if let Some(node) = self.tree.get(ino)
            && let Kind::File(Content::Lazy(file)) = &node.kind
        {
            file.blob.unpin();
        }
    }

    /// Ends the pins of passthrough handles the kernel never released (a lazily detached mount):
    /// the blobs' cache state outlives the mount (it is shared), so they must not stay pinned.
    fn release_pins(&self) {
        let pinned: Vec<(u64, u32)> = match self.opens.lock() {
            Ok(mut opens) => opens
                .iter_mut()
                .map(|(ino, s)| (*ino, std::mem::take(&mut s.pinned)))
                .collect(),
            Err(_) => return,
        };
        for (ino, count) in pinned {
            (0..count).for_each(|_| self.unpin(ino));
        }
    }

    /// The entries of folder `ino` after the first `offset`, each with the offset of the entry
    /// after it (what the kernel hands back to go on listing).
    fn dir_entries(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<impl Iterator<Item = (u64, OsString, u64, FileType)>, Error> {
        let node = self.tree.get(ino).ok_or(Error::NotFound)?;
        let Kind::Dir(children) = &node.kind else {
            return Err(Error::NotDir);
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
        Ok(out
            .into_iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (name, child, kind))| (i as u64 + 1, name, child, kind)))
    }
}

/// Keeps `ahead` filled for a sequential reader of `blob`: the runs of [`Ahead::runs`], each
/// one ranged GET in the background, and at the full window a stream
/// ([`LazyBlob::stream_ahead`]).
fn keep_ahead(blob: &Arc<LazyBlob>, ahead: Ahead) {
    // A reader at the full window: one stream. Beside a slow one (a slow or distant link), runs
    // over the rest of the window, past what the stream holds: a second connection where one
    // is slow, and no more fetched ahead than without a stream.
    let ahead = if ahead.window >= readahead::MAX_WINDOW {
        if blob.stream_ahead(ahead.from, ahead.from + readahead::STREAM_AHEAD) {
            return;
        }
        Ahead {
            from: ahead.from + readahead::STREAM_AHEAD,
            window: ahead.window - readahead::STREAM_AHEAD,
        }
    } else {
        ahead
    };
    let runs = ahead.runs(blob.chunk_count(), |from, to| {
        blob.first_uncovered(from, to)
    });
    for (first, count) in runs {
        tracing::debug!(first, count, window = ahead.window, "readahead run");
        let task = blob.clone();
        blob.tasks()
            .spawn(async move { task.prefetch(first, count).await });
    }
}

/// Answers a read with `data`, counted as served.
fn reply_served(reply: ReplyData, counters: &Counters, data: &[u8]) {
    counters
        .served_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    reply.data(data);
}

/// Answers a read of `size` bytes at `offset` of the file at `path`: its bytes, counted as
/// served, or its error, logged.
fn answer_read(
    reply: ReplyData,
    counters: &Counters,
    read: Result<impl AsRef<[u8]>, Error>,
    path: &str,
    offset: u64,
    size: u64,
) {
    match read {
        Ok(data) => reply_served(reply, counters, data.as_ref()),
        Err(e) => {
            tracing::warn!(%path, offset, size, error = %e, "read failed");
            reply.error(e.errno());
        }
    }
}

/// Reads `len` bytes at `offset` of a local file (an entry unpacked from a tar layer).
fn read_local(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

impl Filesystem for ModelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let max_readahead = config.set_max_readahead(u32::MAX).err().unwrap_or(u32::MAX);
        if let Ok(mut offered) = self.offered.lock() {
            *offered = Some((
                config.kernel_abi().1,
                config.capabilities().bits(),
                max_readahead,
            ));
        }
        // readdirplus always: `ls -l` costs one round trip per folder.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config
            .set_max_readahead(4 << 20)
            .or_else(|max| config.set_max_readahead(max));
        if self.passthrough.load(Ordering::Relaxed) {
            let offered = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH);
            let on = offered
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough.store(on, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(node) = self.tree.get(parent.0) else {
            return reply.error(Error::NotFound.errno());
        };
        let Kind::Dir(children) = &node.kind else {
            return reply.error(Error::NotDir.errno());
        };
        let Some(&ino) = children.get(name) else {
            return reply.error(Error::NotFound.errno());
        };
        match self.attr(ino) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.get(ino.0).map(|n| &n.kind) {
            Some(Kind::Symlink(target)) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Error::WrongKind.errno()),
            None => reply.error(Error::NotFound.errno()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Error::ReadOnly.errno());
        }
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Error::NotFound.errno());
        };
        match &node.kind {
            Kind::File(Content::Status) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            Kind::File(Content::Lazy(file)) if file.blob.is_poisoned() => {
                // Bytes of it may still sit in the page cache from reads served before the
                // background check failed; a new open must not reach them.
                tracing::warn!(path = %node.path, "open refused: the layer failed background verification");
                reply.error(Error::Read("failed background verification".into()).errno());
            }
            Kind::File(content) => {
                // A complete, verified file goes straight to its local copy (kernel
                // passthrough, as fast as a local file); anything else through FUSE reads, with
                // the page cache kept (the content never changes).
                if self.passthrough.load(Ordering::Relaxed)
                    && let Some((path, pinned)) = self.complete_file(content, node.size)
                {
                    if let Some(id) = self.open_passthrough(ino.0, &path, &reply) {
                        let fh = if pinned.is_some() {
                            if let Ok(mut opens) = self.opens.lock() {
                                opens.entry(ino.0).or_default().pinned += 1;
                            }
                            FH_PASSTHROUGH_PINNED
                        } else {
                            FH_PASSTHROUGH
                        };
                        self.save_opens();
                        return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                    }
                    if let Some(blob) = pinned {
                        blob.unpin();
                    }
                }
                if let Ok(mut opens) = self.opens.lock() {
                    opens.entry(ino.0).or_default().cached += 1;
                }
                self.save_opens();
                reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Kind::Dir(_) => reply.error(Error::IsDir.errno()),
            Kind::Symlink(_) => reply.error(Error::Symlink.errno()),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut opens) = self.opens.lock()
            && let Some(state) = opens.get_mut(&ino.0)
        {
            match fh.0 {
                FH_CACHED => state.cached = state.cached.saturating_sub(1),
                FH_PASSTHROUGH | FH_PASSTHROUGH_PINNED => {
                    if fh.0 == FH_PASSTHROUGH_PINNED && state.pinned > 0 {
                        state.pinned -= 1;
                        self.unpin(ino.0);
                    }
                    if let Some((_, _, count)) = &mut state.passthrough {
                        *count -= 1;
                        if *count == 0 {
                            state.passthrough = None;
                        }
                    } else if let Some((_, count)) = &mut state.inherited {
                        *count -= 1;
                        if *count == 0 {
                            state.inherited = None;
                        }
                    }
                }
                _ => {}
            }
            if state.idle() {
                opens.remove(&ino.0);
            }
        }
        self.save_opens();
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = ino.0;
        let Some(node) = self.tree.get(ino) else {
            return reply.error(Error::NotFound.errno());
        };
        let len = u64::from(size);
        match &node.kind {
            Kind::File(Content::Status) => {
                let Ok(mut snapshot) = self.status_snapshot.lock() else {
                    return reply.error(Error::Read("status lock poisoned".into()).errno());
                };
                if offset == 0 || snapshot.is_empty() {
                    *snapshot = self.status_bytes();
                }
                let bytes = &*snapshot;
                let start = (offset as usize).min(bytes.len());
                let end = (start + size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Kind::File(Content::Local(path)) => {
                let end = (offset + len).min(node.size);
                if offset >= end {
                    return reply.data(&[]);
                }
                let path = path.clone();
                let counters = self.counters.clone();
                self.runtime.spawn_blocking(move || {
                    match read_local(&path, offset, end - offset) {
                        Ok(buf) => reply_served(reply, &counters, &buf),
                        Err(e) => reply.error(Error::Read(e.to_string()).errno()),
                    }
                });
            }
            Kind::File(Content::Deferred(deferred)) => {
                let deferred = deferred.clone();
                let counters = self.counters.clone();
                let size = node.size;
                let path = node.path.clone();
                self.runtime.spawn(async move {
                    let end = (offset + len).min(size);
                    let read = match deferred.local().await {
                        Ok(_) if offset >= end => Ok(Vec::new()),
                        Ok(local) => read_local(&local, offset, end - offset)
                            .map_err(|e| Error::Read(e.to_string())),
                        Err(e) => Err(e),
                    };
                    answer_read(reply, &counters, read, &path, offset, len);
                });
            }
            Kind::File(Content::Lazy(file)) => {
                let ahead = self.stream_read(ino, file, offset, len);
                let tree = self.tree.clone();
                let counters = self.counters.clone();
                self.runtime.spawn(async move {
                    let Some(node) = tree.get(ino) else {
                        return reply.error(Error::NotFound.errno());
                    };
                    let Kind::File(Content::Lazy(file)) = &node.kind else {
                        return reply.error(Error::WrongKind.errno());
                    };
                    // Only a blob that can still fail its check needs its replies counted.
                    let _serving = file
                        .blob
                        .verifies_in_background()
                        .then(|| file.blob.serving());
                    let read = file.read(offset, len, node.size).await;
                    // Readahead starts once this read's own chunks are in, so the first bytes
                    // do not share the link and the CPU with it.
                    if let Some(ahead) = ahead
                        && !file.blob.reads_whole_blob()
                    {
                        keep_ahead(&file.blob, ahead);
                    }
                    answer_read(reply, &counters, read, &node.path, offset, len);
                });
            }
            Kind::Dir(_) => reply.error(Error::IsDir.errno()),
            Kind::Symlink(_) => reply.error(Error::WrongKind.errno()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Error::NoAttribute.errno());
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Error::ReadOnly.errno());
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Error::ReadOnly.errno());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Error::ReadOnly.errno());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.tree.nodes.iter().map(|n| n.size).sum();
        reply.statfs(
            total.div_ceil(4096),
            0,
            0,
            self.tree.nodes.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.get(ino.0).map(|n| &n.kind) {
            Some(Kind::Dir(_)) => reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR),
            Some(_) => reply.error(Error::NotDir.errno()),
            None => reply.error(Error::NotFound.errno()),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Error::ReadOnly.errno());
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e.errno()),
        };
        for (next, name, child, kind) in entries {
            if reply.add(INodeNo(child), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e.errno()),
        };
        for (next, name, child, _) in entries {
            let attr = match self.attr(child) {
                Ok(a) => a,
                Err(e) => return reply.error(e.errno()),
            };
            if reply.add(INodeNo(child), next, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }
}

/// A file's attributes as its layer records them (mode 0644, the mount's owner and start time
/// where it records none).
fn recorded(size: u64, meta: Option<&modelpack_spec::FileMetadata>) -> Attrs {
    match meta {
        None => Attrs::new(size, 0o644),
        Some(m) => Attrs {
            size,
            mode: (m.mode & 0o777) as u16,
            uid: Some(m.uid),
            gid: Some(m.gid),
            mtime: Some(time(m.mtime.timestamp(), m.mtime.timestamp_subsec_nanos())),
        },
    }
}

fn ids() -> (u32, u32) {
    (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )
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

/// What a mount needs to know about an artifact before it serves anything: its manifest and
/// its chunk-digest index. Resolve once and mount many times: the snapshotter mounts every layer
/// of one model from one resolve.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The manifest's digest.
    pub digest: Digest,
    /// The manifest, validated.
    pub manifest: ModelManifest,
    /// The chunk-digest index, pinned by the manifest or found among its referrers.
    pub index: Option<ChunkIndex>,
    /// True when the manifest pins the index (its digest vouches for the chunk digests).
    pub index_is_pinned: bool,
    /// Why the index the manifest pins is not used (gone, unreadable, corrupt): the mount then
    /// verifies whole layers, and says so in its status.
    pub index_warning: Option<String>,
}

/// Fetches and validates the manifest `reference` names in `repo`, and its chunk index (a
/// pinned index lands in `store`; a referrer index is read and checked).
pub async fn resolve(
    repo: &Repository,
    reference: &str,
    store: &modelpack_store::Store,
) -> Result<Resolved, Error> {
    resolve_counted(repo, reference, store, &TransferOptions::new(4)).await
}

/// The manifest `reference` names: a manifest named by digest is immutable, so a copy kept in
/// `store` serves (a remount or an adoption while the registry is away); one fetched by digest
/// is kept there.
async fn kept_manifest(
    repo: &Repository,
    reference: &str,
    store: &modelpack_store::Store,
) -> Result<(modelpack_registry::FetchedManifest, ModelManifest), Error> {
    let digest = reference.parse::<Digest>().ok();
    if let Some(digest) = &digest
        && store.has_blob(digest)
        && let Ok(bytes) = store.read_blob(digest, modelpack_spec::MAX_DOCUMENT_SIZE as u64)
        && let Ok(manifest) = ModelManifest::from_slice(&bytes)
    {
        let fetched = modelpack_registry::FetchedManifest {
            bytes: bytes.into(),
            media_type: modelpack_spec::media_type::MEDIA_TYPE_OCI_MANIFEST.to_owned(),
            digest: digest.clone(),
        };
        return Ok((fetched, manifest));
    }
    let (fetched, manifest) = crate::index::model_manifest(repo, reference).await?;
    if digest.is_some()
        && let Err(e) = store.put_bytes(&fetched.bytes)
    {
        tracing::debug!(error = %e, "the manifest is not kept in the store");
    }
    Ok((fetched, manifest))
}

async fn resolve_counted(
    repo: &Repository,
    reference: &str,
    store: &modelpack_store::Store,
    transfer: &TransferOptions,
) -> Result<Resolved, Error> {
    let (fetched, manifest) = kept_manifest(repo, reference, store).await?;
    let annotations = manifest
        .manifest()
        .annotations()
        .clone()
        .unwrap_or_default();
    let pinned = match (
        annotations
            .get(ANNOTATION_CHUNK_INDEX_DIGEST)
            .and_then(|d| d.parse::<Digest>().ok()),
        annotations
            .get(ANNOTATION_CHUNK_INDEX_SIZE)
            .and_then(|s| s.parse::<u64>().ok()),
    ) {
        (Some(digest), Some(size)) if size <= modelpack_spec::MAX_DOCUMENT_SIZE as u64 => {
            Some(BlobRef {
                digest,
                size,
                media_type: String::new(),
            })
        }
        _ => None,
    };
    let (index, index_is_pinned, index_warning) = match pinned {
        None => (
            crate::index::find_referrer_index(repo, &fetched.digest, None).await,
            false,
            None,
        ),
        Some(blob) => match pinned_index(repo, store, &blob, transfer).await {
            Ok(index) => (Some(index), true, None),
            // A registry that is down or refuses us fails the mount as before; only an index
            // that is gone or wrong is worked around.
            Err(e) if !index_is_lost(&e) => return Err(e),
            Err(e) => {
                // A missing or bad index never fails a mount: the same index attached as a
                // referrer still serves (its digest is checked against the pin), else whole
                // layers are verified before they are served.
                let referrer =
                    crate::index::find_referrer_index(repo, &fetched.digest, Some(&blob.digest))
                        .await;
                let warning = format!(
                    "the chunk index {} is unusable ({e}); {}",
                    blob.digest,
                    if referrer.is_some() {
                        "using the copy attached as a referrer"
                    } else {
                        "layers are verified whole before they are served"
                    }
                );
                tracing::warn!("{warning}");
                let pinned = referrer.is_some();
                (referrer, pinned, Some(warning))
            }
        },
    };
    Ok(Resolved {
        digest: fetched.digest,
        manifest,
        index,
        index_is_pinned,
        index_warning,
    })
}

/// True when a pinned index failed because it is gone, corrupt or unreadable (not because the
/// registry is unreachable or refuses access).
fn index_is_lost(e: &Error) -> bool {
    match e {
        Error::Transfer(t) => t.is_not_found() || t.is_digest_mismatch(),
        Error::Registry(r) => r.is_not_found(),
        Error::Invalid(_) => true,
        _ => false,
    }
}

/// The chunk index `blob` (pinned by the manifest), fetched into `store` and checked.
async fn pinned_index(
    repo: &Repository,
    store: &modelpack_store::Store,
    blob: &BlobRef,
    transfer: &TransferOptions,
) -> Result<ChunkIndex, Error> {
    modelpack_transfer::fetch_blob(repo, store, blob, transfer).await?;
    let bytes = store
        .read_blob(&blob.digest, blob.size)
        .map_err(|e| Error::Invalid(format!("chunk index: {e}")))?;
    ChunkIndex::from_slice(&bytes).map_err(|e| Error::Invalid(format!("chunk index: {e}")))
}

/// Tar layers read in place: their blob and, for seekable zstd, their frames.
type LazyLayers = HashMap<Digest, (Arc<LazyBlob>, Option<Arc<Frames>>)>;

/// Builds the inode tree a mount serves from a resolved artifact: raw layers as lazy files, tar
/// layers read in place, shown from their annotations, or unpacked into the cache.
struct TreeBuilder<'a> {
    opts: &'a MountOptions,
    resolved: &'a Resolved,
    ctx: Arc<BlobContext>,
    tree: Tree,
    blobs: HashMap<Digest, Arc<LazyBlob>>,
}

impl<'a> TreeBuilder<'a> {
    fn new(opts: &'a MountOptions, resolved: &'a Resolved, ctx: Arc<BlobContext>) -> Self {
        let (uid, gid) = ids();
        TreeBuilder {
            opts,
            resolved,
            ctx,
            // An adopted connection's tree shows the times its predecessor's showed.
            tree: Tree::new(
                uid,
                gid,
                opts.adopt
                    .as_ref()
                    .map(|h| h.state.created_ns)
                    .filter(|&ns| ns > 0)
                    .map_or_else(SystemTime::now, |ns| {
                        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
                    }),
            ),
            blobs: HashMap::new(),
        }
    }

    /// Adds an entry to the tree; an error when its path clashes with another entry.
    fn add(&mut self, path: &str, kind: Kind, attrs: Attrs) -> Result<(), Error> {
        if self.tree.add(path, kind, attrs) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "path {path} clashes with another entry"
            )))
        }
    }

    /// The layer's chunk digests, if the index covers it.
    fn chunks_of(&self, layer: &modelpack_spec::ModelLayer) -> Option<Vec<Digest>> {
        self.resolved.index.as_ref().and_then(|i| {
            i.layers
                .get(&layer.digest)
                .filter(|c| i.covers(c, layer.size()))
                .cloned()
        })
    }

    fn new_blob(&self, layer: &modelpack_spec::ModelLayer) -> Arc<LazyBlob> {
        let chunks = self.chunks_of(layer);
        // Chunk digests from an unpinned referrer vouch for nothing on their own: the whole
        // blob is checked once complete. Without chunk digests the verify policy decides.
        let check_whole = chunks.is_some() && !self.resolved.index_is_pinned;
        Arc::new(LazyBlob::new(
            layer.digest.clone(),
            layer.size(),
            chunks,
            check_whole,
            self.ctx.clone(),
        ))
    }

    /// Raw layers: one lazy file each.
    fn add_raw_layers(&mut self) -> Result<(), Error> {
        let (opts, manifest) = (self.opts, &self.resolved.manifest);
        let wanted = |digest: &Digest| opts.layers.as_ref().is_none_or(|l| l.contains(digest));
        for layer in manifest.layers() {
            if layer.media_type.encoding != Encoding::Raw || !wanted(&layer.digest) {
                continue;
            }
            if layer.is_unnamed_file() {
                tracing::warn!(digest = %layer.digest, path = %layer.path, "a raw layer names no file; it is served under its digest");
            }
            let blob = match self.blobs.get(&layer.digest) {
                Some(b) => b.clone(),
                None => {
                    let b = self.new_blob(layer);
                    self.blobs.insert(layer.digest.clone(), b.clone());
                    b
                }
            };
            self.add(
                layer.path.as_str(),
                Kind::File(Content::Lazy(LazyFile::raw(blob))),
                recorded(layer.size(), layer.metadata.as_ref()),
            )?;
        }

        Ok(())
    }

    /// Tar layers: read in place where the index covers them, shown from their annotations and
    /// unpacked on first read where those describe one file, unpacked into the cache otherwise.
    async fn add_tar_layers(&mut self) -> Result<(), Error> {
        let opts = self.opts;
        let wanted = |digest: &Digest| opts.layers.as_ref().is_none_or(|l| l.contains(digest));
        let tar_layers: Vec<&'a modelpack_spec::ModelLayer> = self
            .resolved
            .manifest
            .layers()
            .iter()
            .filter(|l| l.media_type.encoding != Encoding::Raw && wanted(&l.digest))
            .collect();
        let lazy_layers = self.lazy_tar_layers(&tar_layers).await?;
        let trees = self.trees_dir();
        let deferred = self.add_deferred_layers(&tar_layers, &lazy_layers, &trees)?;
        let planned: Vec<&modelpack_spec::ModelLayer> = tar_layers
            .into_iter()
            .filter(|l| !deferred.contains(&l.digest))
            .collect();
        self.add_planned_tar_layers(&planned, lazy_layers, &trees)
            .await
    }

    /// Plain tar and seekable tar+zstd layers whose chunks the index covers (or any, with
    /// `--verify none`): read in place, their headers through verified chunks.
    async fn lazy_tar_layers(
        &self,
        tar_layers: &[&modelpack_spec::ModelLayer],
    ) -> Result<LazyLayers, Error> {
        let mut lazy_layers: HashMap<Digest, (Arc<LazyBlob>, Option<Arc<Frames>>)> = HashMap::new();
        for layer in tar_layers {
            let can_verify =
                self.chunks_of(layer).is_some() || self.ctx.verify == crate::Verify::None;
            if !can_verify || lazy_layers.contains_key(&layer.digest) {
                continue;
            }
            let blob = self.new_blob(layer);
            let frames = match layer.media_type.encoding {
                Encoding::Tar => None,
                Encoding::TarZstd => match Frames::load(&blob).await {
                    Ok(Some(frames)) => Some(Arc::new(frames)),
                    Ok(None) => continue,
                    Err(e) => return Err(Error::Invalid(e.to_string())),
                },
                _ => continue,
            };
            lazy_layers.insert(layer.digest.clone(), (blob, frames));
        }
        Ok(lazy_layers)
    }

    /// Where tar layers unpack in the cache (per manifest, and per layer selection).
    fn trees_dir(&self) -> PathBuf {
        let (opts, manifest_digest) = (self.opts, &self.resolved.digest);
        match &opts.layers {
            None => opts.cache_dir.join("trees").join(manifest_digest.encoded()),
            Some(layers) => {
                let mut key = String::new();
                for d in layers {
                    key.push_str(d.as_str());
                }
                let key = modelpack_spec::Digest::sha256_of(key.as_bytes());
                opts.cache_dir.join("trees").join(format!(
                    "{}-{}",
                    manifest_digest.encoded(),
                    &key.encoded()[..16]
                ))
            }
        }
    }

    /// Layers that cannot be read in place but whose annotations describe their one regular
    /// file: shown from the annotations now, fetched and unpacked on first read. Returns their
    /// digests.
    fn add_deferred_layers(
        &mut self,
        tar_layers: &[&modelpack_spec::ModelLayer],
        lazy_layers: &LazyLayers,
        trees: &Path,
    ) -> Result<Vec<Digest>, Error> {
        let mut deferred: Vec<Digest> = Vec::new();
        // A layer without a name is planned from its tar headers instead.
        for layer in tar_layers
            .iter()
            .filter(|l| l.named && !lazy_layers.contains_key(&l.digest))
        {
            let Some(meta) = layer.metadata.as_ref().filter(|m| {
                m.typeflag == modelpack_spec::annotations::TYPEFLAG_REGULAR && m.size >= 0
            }) else {
                continue;
            };
            if deferred.contains(&layer.digest) {
                continue;
            }
            let file = Arc::new(DeferredLayer::new(
                BlobRef {
                    digest: layer.digest.clone(),
                    size: layer.size(),
                    media_type: String::new(),
                },
                layer.media_type.encoding,
                layer.path.clone(),
                meta.size as u64,
                trees.join("deferred").join(layer.digest.encoded()),
                self.ctx.clone(),
            ));
            self.add(
                layer.path.as_str(),
                Kind::File(Content::Deferred(file)),
                recorded(meta.size as u64, Some(meta)),
            )?;
            deferred.push(layer.digest.clone());
        }
        Ok(deferred)
    }

    /// The other tar layers: planned by `extract` (headers read lazily where the layer is read
    /// in place, from the fetched blob otherwise), unpacked into the cache where not lazy, and
    /// every entry added to the tree.
    async fn add_planned_tar_layers(
        &mut self,
        tar_layers: &[&modelpack_spec::ModelLayer],
        lazy_layers: LazyLayers,
        trees: &Path,
    ) -> Result<(), Error> {
        let opts = self.opts;
        let manifest = &self.resolved.manifest;
        let (repo, transfer) = (&opts.repository, self.ctx.transfer.clone());
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
            .map_err(|e| Error::Invalid(format!("planning the tar layers: {e}")))??;
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
            if unpack.selected().next().is_some() {
                let source = modelpack_extract::StoreSource(&opts.store);
                modelpack_extract::extract_planned(&source, &unpack, trees, None)?;
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
                let mtime = entry.mtime.map(|t| time(t.unix_seconds(), t.nanoseconds()));
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
                match &entry.kind {
                    modelpack_extract::EntryPlan::Dir => self.tree.set_dir_attrs(path, mode, mtime),
                    modelpack_extract::EntryPlan::TarFile { size, offset } => {
                        let (content, size) = file(*offset, *size, path);
                        self.add(path, Kind::File(content), Attrs::new(size, mode).at(mtime))?;
                    }
                    modelpack_extract::EntryPlan::HardLink { target } => {
                        let (content, size) =
                            match (&lazy, starts.get(&(entry.layer, target.as_str()))) {
                                (Some(_), Some(&(offset, size))) => {
                                    file(offset, size, target.as_str())
                                }
                                _ => {
                                    let size = std::fs::metadata(trees.join(target.as_str()))
                                        .map_or(0, |m| m.len());
                                    (Content::Local(trees.join(target.as_str())), size)
                                }
                            };
                        self.add(path, Kind::File(content), Attrs::new(size, mode).at(mtime))?;
                    }
                    modelpack_extract::EntryPlan::Symlink { target } => self.add(
                        path,
                        Kind::Symlink(target.clone()),
                        Attrs::new(target.len() as u64, 0o777).at(mtime),
                    )?,
                    modelpack_extract::EntryPlan::RawFile { .. } => {}
                }
            }
            for (blob, _) in lazy_layers.into_values() {
                self.blobs.entry(blob.digest.clone()).or_insert(blob);
            }
        }
        Ok(())
    }

    /// The status file, if asked for.
    fn add_status_file(&mut self) {
        if self.opts.status_file {
            self.tree.add(
                STATUS_FILE,
                Kind::File(Content::Status),
                Attrs::new(0, 0o444),
            );
        }
    }
}

/// Mounts the artifact `opts` names at `dir` and serves it until unmounted.
pub async fn mount(opts: MountOptions, dir: &Path) -> Result<MountedModel, Error> {
    let repo = &opts.repository;
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
        .map_err(|source| Error::Mount {
            path: opts.cache_dir.clone(),
            source,
        })?;
    let resolved = match &opts.resolved {
        Some(r) => r.clone(),
        None => Arc::new(resolve_counted(repo, &opts.reference, &opts.store, &transfer).await?),
    };
    if let Some(layers) = &opts.layers
        && let Some(missing) = layers
            .iter()
            .find(|d| !resolved.manifest.layers().iter().any(|l| &l.digest == *d))
    {
        return Err(Error::Invalid(format!(
            "layer {missing} is not in manifest {}",
            resolved.digest
        )));
    }

    let cache = match &opts.cache {
        Some(cache) if cache.dir() != opts.cache_dir => {
            return Err(Error::Cache {
                path: opts.cache_dir.clone(),
                message: format!("the cache budget given is for {}", cache.dir().display()),
            });
        }
        Some(cache) => cache.clone(),
        None => CacheBudget::open(&opts.cache_dir, None)?,
    };
    let tasks = Background::default();
    let ctx = Arc::new(BlobContext {
        repo: repo.clone(),
        store: opts.store.clone(),
        cache: cache.clone(),
        chunk_size: resolved
            .index
            .as_ref()
            .map_or(modelpack_spec::annotations::CHUNK_INDEX_CHUNK_SIZE, |i| {
                i.chunk_size
            }),
        // A manifest that pins an index it cannot deliver gets no weaker check than a whole
        // layer: the `--verify` policy is for artifacts that never had an index.
        verify: if resolved.index.is_none() && resolved.index_warning.is_some() {
            crate::Verify::Full
        } else {
            opts.verify
        },
        counters: counters.clone(),
        transfer: transfer.clone(),
        tasks: tasks.clone(),
    });
    let mut builder = TreeBuilder::new(&opts, &resolved, ctx);
    builder.add_raw_layers()?;
    builder.add_tar_layers().await?;
    builder.add_status_file();
    let TreeBuilder { tree, blobs, .. } = builder;
    let fs = ModelFs {
        tree: Arc::new(tree),
        counters,
        blobs: Arc::new(blobs.into_values().collect()),
        streams: Arc::new(Mutex::new(HashMap::new())),
        reference: Arc::new(opts.reference.clone()),
        index_warning: Arc::new(resolved.index_warning.clone()),
        status_snapshot: Arc::new(Mutex::new(Vec::new())),
        runtime: tokio::runtime::Handle::current(),
        // Kernel passthrough needs CAP_SYS_ADMIN; `init` keeps it only if the kernel offers it.
        passthrough: Arc::new(AtomicBool::new(ids().0 == 0)),
        opens: Arc::new(Mutex::new(HashMap::new())),
        tasks,
        cache,
        offered: Arc::new(Mutex::new(None)),
        opens_file: Arc::new(Mutex::new(None)),
    };
    serve(fs, dir, &opts).await
}

/// Small files (one chunk each) the background prefetch fetches at once: the window `pull`
/// keeps for small blobs at its default 8 connections
/// ([`modelpack_transfer::SMALL_PER_CONNECTION`] per connection).
const SMALL_PREFETCH_IN_FLIGHT: usize = 8 * modelpack_transfer::SMALL_PER_CONNECTION;

/// Mounts `fs` at `dir` and starts what runs beside it: the prefetch of small (or all) files
/// and the page-cache invalidation of blobs that fail background verification.
async fn serve(fs: ModelFs, dir: &Path, opts: &MountOptions) -> Result<MountedModel, Error> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("modelpack".into()),
        fuser::MountOption::Subtype("modelpack".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    // Mounting runs the INIT handshake before it returns: off the async workers.
    let started = {
        let fs = fs.clone();
        let dir = dir.to_owned();
        let adopt = opts.adopt.clone();
        let for_successor = opts.for_successor;
        tokio::task::spawn_blocking(move || {
            start_session(fs, &dir, config, adopt.as_deref(), for_successor)
        })
        .await
    };
    let mount_error = |source| Error::Mount {
        path: dir.to_owned(),
        source,
    };
    let (session, connection) = started
        .map_err(|e| mount_error(std::io::Error::other(e)))?
        .map_err(mount_error)?;
    if opts.adopt.is_none() {
        // Off the async workers: a stat of the mount point waits for the FUSE INIT reply,
        // which the session thread just started has to send.
        let mount_point = dir.to_owned();
        let _ = tokio::task::spawn_blocking(move || raise_readahead(&mount_point)).await;
    }
    // Smallest first (configs and tokenizers before weights). Blobs of one chunk cost a request
    // each, not bandwidth: several go at once (a tree of thousands of small files is bound by
    // requests in flight). Larger ones follow one run of chunks at a time, one connection in
    // the background, so on-demand reads keep the rest of the link.
    let mut order: Vec<Arc<LazyBlob>> = fs
        .blobs
        .iter()
        .filter(|b| opts.prefetch || b.size <= opts.prefetch_small)
        .cloned()
        .collect();
    if !order.is_empty() {
        order.sort_by_key(|b| b.size);
        let single_chunk = order.partition_point(|b| b.chunk_count() <= 1);
        let larger = order.split_off(single_chunk);
        fs.tasks.spawn(async move {
            use futures_util::StreamExt as _;
            futures_util::stream::iter(order)
                .for_each_concurrent(SMALL_PREFETCH_IN_FLIGHT, |blob| async move {
                    blob.prefetch(0, 1).await;
                })
                .await;
            for blob in larger {
                // A blob read only once fetched whole is prefetched whole, in one call (a failed
                // fetch is not asked again per run of chunks).
                let run = if blob.reads_whole_blob() {
                    blob.chunk_count().max(1)
                } else {
                    readahead::RUN
                };
                let mut i = 0;
                while i < blob.chunk_count() {
                    blob.prefetch(i, run).await;
                    i += run;
                }
            }
        });
    }
    // `--verify background` serves bytes before the blob is checked; when the check fails,
    // pages of it already in the page cache must not be served again, to open handles either.
    let notifier = session.notifier();
    for blob in fs.blobs.iter().filter(|b| b.verifies_in_background()) {
        let inodes: Vec<u64> = fs
            .tree
            .iter()
            .filter(|(_, n)| {
                matches!(&n.kind, Kind::File(Content::Lazy(f)) if Arc::ptr_eq(&f.blob, blob))
            })
            .map(|(ino, _)| ino)
            .collect();
        let notifier = notifier.clone();
        blob.on_poison(Box::new(move || {
            for &ino in &inodes {
                if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                    tracing::warn!(ino, error = %e, "page cache invalidation failed");
                }
            }
        }));
    }
    Ok(MountedModel {
        session: Some(session),
        fs,
        connection,
        adopted_at: opts.adopt.as_ref().map(|_| dir.to_owned()),
    })
}

/// Starts the FUSE session of `fs` at `dir`: a new mount, or the connection `adopt` hands over
/// (which must be the one mounted at `dir`). Returns it with a duplicate of its descriptor and
/// state, for a holder to keep (none when the state cannot be told). With `for_successor`, a
/// new connection's open-file state is saved for the one that adopts it (an adopted one's
/// always is).
fn start_session(
    fs: ModelFs,
    dir: &Path,
    config: fuser::Config,
    adopt: Option<&Handover>,
    for_successor: bool,
) -> std::io::Result<(fuser::BackgroundSession, Option<(OwnedFd, SessionState)>)> {
    let shared = fs.clone();
    let mounted_at = || {
        std::path::absolute(dir)
            .ok()
            .and_then(|d| crate::mountinfo::at(&d))
    };
    let session = match adopt {
        Some(handover) => {
            let mounted = mounted_at();
            let serves_it = mounted
                .as_ref()
                .is_some_and(|m| m.dev == handover.state.dev && m.fs_type.starts_with("fuse"));
            if !serves_it {
                return Err(std::io::Error::other(format!(
                    "the connection to adopt is not the one mounted at {} (found {:?})",
                    dir.display(),
                    mounted.map(|m| (m.dev, m.fs_type))
                )));
            }
            let tree = tree_fingerprint(&shared.tree);
            if handover.state.tree != 0 && handover.state.tree != tree {
                return Err(std::io::Error::other(format!(
                    "the tree built now differs from the one the connection at {} served \
                     (fingerprint {tree:x}, not {:x}): the kernel's inode numbers would name \
                     other files",
                    dir.display(),
                    handover.state.tree
                )));
            }
            let path = shared.opens_path(handover.state.dev);
            shared.load_opens(&path);
            if let Ok(mut file) = shared.opens_file.lock() {
                *file = Some(path);
            }
            let session = crate::handover::adopt(fs, handover, config)?;
            // Before the session reads anything: a request it has read already would be sent
            // again and served twice.
            if let Err(e) = crate::handover::resend_unanswered(session.as_fd()) {
                tracing::warn!(error = %e, "the kernel cannot resend unanswered FUSE requests (Linux < 6.9?); reads the previous server took may hang");
            }
            session
        }
        None => fuser::Session::new(fs, dir, &config)?,
    };
    let fd = session.as_fd().try_clone_to_owned()?;
    let state = shared
        .offered
        .lock()
        .ok()
        .and_then(|o| *o)
        .zip(mounted_at())
        .map(
            |((abi_minor, capabilities, max_readahead), m)| SessionState {
                dev: m.dev,
                abi_minor,
                capabilities,
                max_readahead,
                created_ns: created_ns(&shared),
                tree: tree_fingerprint(&shared.tree),
            },
        );
    if adopt.is_none()
        && let Some(state) = &state
    {
        // A new connection: whatever an earlier one with this device number saved is stale.
        let path = shared.opens_path(state.dev);
        let _ = std::fs::remove_file(&path);
        if for_successor && let Ok(mut file) = shared.opens_file.lock() {
            *file = Some(path);
        }
    }
    let session = session.spawn()?;
    Ok((session, state.map(|s| (fd, s))))
}

/// A fingerprint of what the kernel may cache of `tree`: each inode's number, path, kind and
/// size, in inode order.
fn tree_fingerprint(tree: &Tree) -> u64 {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for (ino, node) in tree.iter() {
        hasher.update(ino.to_le_bytes());
        hasher.update(node.path.as_bytes());
        hasher.update([0, node.file_type() as u8]);
        hasher.update(node.size.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first).max(1)
}

/// The time `fs`'s tree gives entries that record none (its root's), in nanoseconds.
fn created_ns(fs: &ModelFs) -> u64 {
    fs.tree
        .get(ROOT)
        .and_then(|root| root.mtime.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
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

#[cfg(test)]
mod tests {
    //! The tree a mount serves, planned from a manifest and an index alone (no FUSE, no network).

    use modelpack_registry::{Client, ClientOptions};
    use modelpack_spec::annotations::{ANNOTATION_FILE_METADATA, ANNOTATION_FILEPATH};
    use modelpack_spec::media_type::{
        ARTIFACT_TYPE_MODEL_MANIFEST, MEDIA_TYPE_MODEL_CONFIG, MEDIA_TYPE_OCI_MANIFEST,
    };
    use modelpack_spec::{Encoding, LayerKind, LayerMediaType};

    use super::*;
    use crate::tree::Node;

    fn layer(kind: LayerKind, path: &str, body: &[u8], mode: Option<u32>) -> serde_json::Value {
        let mut annotations = serde_json::json!({ ANNOTATION_FILEPATH: path });
        if let Some(mode) = mode {
            annotations[ANNOTATION_FILE_METADATA] = serde_json::Value::String(
                serde_json::json!({
                    "name": path, "mode": mode, "uid": 1000, "gid": 1000, "size": body.len(),
                    "mtime": "2025-01-02T03:04:05Z", "typeflag": 48
                })
                .to_string(),
            );
        }
        serde_json::json!({
            "mediaType": LayerMediaType::new(kind, Encoding::Raw).to_string(),
            "digest": Digest::sha256_of(body).to_string(),
            "size": body.len(),
            "annotations": annotations,
        })
    }

    fn resolved(layers: Vec<serde_json::Value>) -> Resolved {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE_MODEL_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_MODEL_CONFIG,
                "digest": Digest::sha256_of(b"{}").to_string(),
                "size": 2,
            },
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        Resolved {
            digest: Digest::sha256_of(&bytes),
            manifest: ModelManifest::from_slice(&bytes).expect("a valid manifest"),
            index: None,
            index_is_pinned: false,
            index_warning: None,
        }
    }

    fn options(dir: &Path) -> MountOptions {
        let client = Client::new(ClientOptions::new()).expect("client");
        let reference = "registry.invalid/test/model:v1".parse().expect("reference");
        MountOptions::new(
            Repository::new(&client, &reference),
            "v1",
            modelpack_store::Store::open(&dir.join("store")).expect("store"),
            dir.join("cache"),
        )
    }

    fn context(opts: &MountOptions) -> Arc<BlobContext> {
        Arc::new(BlobContext {
            repo: opts.repository.clone(),
            store: opts.store.clone(),
            cache: CacheBudget::open(&opts.cache_dir, None).expect("cache"),
            chunk_size: 2 << 20,
            verify: opts.verify,
            counters: Arc::new(Counters::default()),
            transfer: TransferOptions::new(1),
            tasks: Background::default(),
        })
    }

    fn find<'t>(tree: &'t Tree, path: &str) -> &'t Node {
        tree.iter()
            .map(|(_, n)| n)
            .find(|n| n.path == path)
            .unwrap_or_else(|| panic!("{path} is not in the tree"))
    }

    #[test]
    fn raw_layers_become_files_with_their_recorded_attributes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path());
        let weight = vec![7u8; 3000];
        let r = resolved(vec![
            layer(LayerKind::WeightConfig, "config.json", b"{}", Some(0o600)),
            layer(
                LayerKind::Weight,
                "weights/model.safetensors",
                &weight,
                None,
            ),
        ]);
        let mut builder = TreeBuilder::new(&opts, &r, context(&opts));
        builder.add_raw_layers().expect("planned");
        builder.add_status_file();
        let config = find(&builder.tree, "config.json");
        assert_eq!((config.size, config.mode), (2, 0o600));
        assert_eq!((config.uid, config.gid), (1000, 1000));
        let weights = find(&builder.tree, "weights/model.safetensors");
        assert_eq!((weights.size, weights.mode), (3000, 0o644));
        assert!(matches!(find(&builder.tree, "weights").kind, Kind::Dir(_)));
        assert!(matches!(
            find(&builder.tree, STATUS_FILE).kind,
            Kind::File(Content::Status)
        ));
        assert_eq!(builder.blobs.len(), 2);
    }

    /// A tar layer (no annotations) holding `files`, as a manifest layer; its blob goes into
    /// `store` when given.
    fn tar_layer(
        folder: &str,
        files: &[(&str, &[u8])],
        store: Option<&modelpack_store::Store>,
    ) -> serde_json::Value {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o640);
            header.set_mtime(1_700_000_000);
            builder
                .append_data(&mut header, path, *body)
                .expect("tar entry");
        }
        let blob = builder.into_inner().expect("tar");
        if let Some(store) = store {
            store.put_bytes(&blob).expect("blob into the store");
        }
        serde_json::json!({
            "mediaType": LayerMediaType::new(LayerKind::Weight, Encoding::Tar).to_string(),
            "digest": Digest::sha256_of(&blob).to_string(),
            "size": blob.len(),
            "annotations": { ANNOTATION_FILEPATH: folder },
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tar_layer_without_an_index_is_planned_from_its_headers_and_unpacked_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path());
        let r = resolved(vec![
            layer(LayerKind::WeightConfig, "config.json", b"{}", None),
            tar_layer(
                "shards",
                &[
                    ("shards/a.bin", b"first shard"),
                    ("shards/b.bin", b"second"),
                ],
                Some(&opts.store),
            ),
        ]);
        let mut builder = TreeBuilder::new(&opts, &r, context(&opts));
        builder.add_raw_layers().expect("raw layers");
        // The blob is in the store already: nothing is fetched (the registry does not exist).
        builder.add_tar_layers().await.expect("tar layers");
        for (path, body) in [
            ("shards/a.bin", &b"first shard"[..]),
            ("shards/b.bin", b"second"),
        ] {
            let node = find(&builder.tree, path);
            assert_eq!((node.size, node.mode), (body.len() as u64, 0o640));
            let Kind::File(Content::Local(local)) = &node.kind else {
                panic!("{path} is not served from the unpacked tree");
            };
            assert_eq!(std::fs::read(local).expect("unpacked file"), body);
        }
        assert!(matches!(find(&builder.tree, "shards").kind, Kind::Dir(_)));
        find(&builder.tree, "config.json");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tar_layer_described_by_its_annotations_is_shown_before_any_byte_is_fetched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path());
        let body = b"one file in a tar";
        let mut described = tar_layer("model.gguf", &[("model.gguf", body)], None);
        described["annotations"] = serde_json::json!({
            ANNOTATION_FILEPATH: "model.gguf",
            ANNOTATION_FILE_METADATA: serde_json::json!({
                "name": "model.gguf", "mode": 0o600, "uid": 0, "gid": 0, "size": body.len(),
                "mtime": "2025-01-02T03:04:05Z", "typeflag": 0
            })
            .to_string(),
        });
        let r = resolved(vec![described]);
        let mut builder = TreeBuilder::new(&opts, &r, context(&opts));
        // The blob is nowhere: planning must not need it.
        builder.add_tar_layers().await.expect("tar layers");
        let node = find(&builder.tree, "model.gguf");
        assert_eq!((node.size, node.mode), (body.len() as u64, 0o600));
        assert!(matches!(node.kind, Kind::File(Content::Deferred(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tar_entry_that_clashes_with_a_raw_layer_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path());
        let r = resolved(vec![
            layer(LayerKind::Doc, "README.md", b"# m", None),
            tar_layer(
                "README.md/inner",
                &[("README.md/inner", b"x")],
                Some(&opts.store),
            ),
        ]);
        let mut builder = TreeBuilder::new(&opts, &r, context(&opts));
        builder.add_raw_layers().expect("raw layers");
        let err = builder
            .add_tar_layers()
            .await
            .expect_err("a tar entry under a raw file");
        assert!(err.to_string().contains("clashes"), "{err}");
    }

    #[test]
    fn a_layer_filter_serves_only_its_layers_and_a_file_under_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = options(dir.path());
        let r = resolved(vec![
            layer(LayerKind::WeightConfig, "config.json", b"{}", None),
            layer(LayerKind::Doc, "README.md", b"# m", None),
        ]);
        opts.layers = Some(vec![Digest::sha256_of(b"# m")]);
        let mut builder = TreeBuilder::new(&opts, &r, context(&opts));
        builder.add_raw_layers().expect("planned");
        assert!(builder.tree.iter().all(|(_, n)| n.path != "config.json"));
        find(&builder.tree, "README.md");

        let clash = resolved(vec![
            layer(LayerKind::Doc, "a", b"file", None),
            layer(LayerKind::Doc, "a/b", b"under a file", None),
        ]);
        let opts = options(dir.path());
        let mut builder = TreeBuilder::new(&opts, &clash, context(&opts));
        let err = builder.add_raw_layers().expect_err("a file under a file");
        assert!(err.to_string().contains("clashes"), "{err}");
    }
}
