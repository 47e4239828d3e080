//! Files inside tar layers read lazily. A plain tar's file is a byte range of its blob; a
//! seekable tar+zstd's file is a byte range of the decompressed stream, served by decompressing
//! only the frames it overlaps. Either way the compressed bytes come through [`LazyBlob`], so
//! every chunk is verified before it is used. Also the seekable reader the tar planner walks a
//! layer's headers with, seeking over the file data instead of fetching it.

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use modelpack_spec::zstd_seek::{FOOTER_SIZE, SeekTable};

use crate::blob::{BlobContext, LazyBlob};
use crate::error::Error;

/// Decoded frames kept per layer (a sequential reader decodes each frame once).
const RECENT_FRAMES: usize = 4;

/// The frames of a seekable zstd layer, with their offsets precomputed.
pub(crate) struct Frames {
    /// (compressed offset, decompressed offset, compressed size, decompressed size) per frame.
    frames: Vec<(u64, u64, u64, u64)>,
    decompressed_size: u64,
    recent: Mutex<VecDeque<(usize, Bytes)>>,
}

impl Frames {
    /// Reads the seek table from the end of `blob` (two small verified reads). `None` when the
    /// blob is not a seekable zstd stream whose frames cover it exactly.
    pub(crate) async fn load(blob: &LazyBlob) -> Result<Option<Frames>, Error> {
        if blob.size < FOOTER_SIZE as u64 {
            return Ok(None);
        }
        let footer = blob
            .read(blob.size - FOOTER_SIZE as u64, FOOTER_SIZE as u64)
            .await?;
        let Ok(table_size) = SeekTable::table_size_from_footer(&footer) else {
            return Ok(None);
        };
        if table_size > blob.size || table_size > 64 << 20 {
            return Ok(None);
        }
        let bytes = blob.read(blob.size - table_size, table_size).await?;
        let Ok(table) = SeekTable::decode(&bytes) else {
            return Ok(None);
        };
        if table.compressed_size() + table_size != blob.size {
            return Ok(None);
        }
        let mut frames = Vec::with_capacity(table.frames.len());
        let (mut c, mut d) = (0u64, 0u64);
        for f in &table.frames {
            let (cs, ds) = (u64::from(f.compressed_size), u64::from(f.decompressed_size));
            frames.push((c, d, cs, ds));
            c += cs;
            d += ds;
        }
        Ok(Some(Frames {
            frames,
            decompressed_size: d,
            recent: Mutex::new(VecDeque::new()),
        }))
    }

    /// Size of the decompressed stream.
    pub(crate) fn decompressed_size(&self) -> u64 {
        self.decompressed_size
    }

    /// The frame holding decompressed byte `offset`.
    fn locate(&self, offset: u64) -> Option<usize> {
        let i = self.frames.partition_point(|f| f.1 <= offset);
        let i = i.checked_sub(1)?;
        let f = self.frames[i];
        (offset < f.1 + f.3).then_some(i)
    }

    /// Where in the blob the frame holding decompressed byte `offset` starts.
    pub(crate) fn compressed_offset(&self, offset: u64) -> u64 {
        self.locate(offset).map_or(0, |i| self.frames[i].0)
    }

    /// Frame `index`, decompressed (from the recent ones when it was just used).
    async fn frame(&self, blob: &LazyBlob, index: usize) -> Result<Bytes, Error> {
        if let Ok(recent) = self.recent.lock()
            && let Some((_, bytes)) = recent.iter().find(|(i, _)| *i == index)
        {
            return Ok(bytes.clone());
        }
        let (c, _, cs, ds) = self.frames[index];
        let compressed = blob.read(c, cs).await?;
        let digest = &blob.digest;
        // The table says how large the frame is: decompress at most that (no bomb). A frame is
        // 2 MiB in our builds, a millisecond or two of work.
        let decoded = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress(&compressed, ds as usize))
            .map_err(|e| Error::Read(format!("blob {digest} frame {index}: {e}")))?;
        if decoded.len() as u64 != ds {
            return Err(Error::Read(format!(
                "blob {digest} frame {index}: {} bytes, the seek table says {ds}",
                decoded.len()
            )));
        }
        let bytes = Bytes::from(decoded);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_FRAMES {
                recent.pop_front();
            }
            recent.push_back((index, bytes.clone()));
        }
        Ok(bytes)
    }

    /// Reads `len` decompressed bytes at `offset`.
    pub(crate) async fn read(
        &self,
        blob: &LazyBlob,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, Error> {
        let end = (offset + len).min(self.decompressed_size);
        let mut out = BytesMut::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let index = self
                .locate(pos)
                .ok_or_else(|| Error::Read(format!("offset {pos} is past the last frame")))?;
            let (_, d, _, ds) = self.frames[index];
            let frame = self.frame(blob, index).await?;
            let from = (pos - d) as usize;
            let to = (end.min(d + ds) - d) as usize;
            out.extend_from_slice(&frame[from..to]);
            pos = d + to as u64;
        }
        Ok(out.freeze())
    }
}

/// A file inside a layer blob read lazily.
pub(crate) struct LazyFile {
    /// The layer blob.
    pub blob: Arc<LazyBlob>,
    /// Where the file's bytes start: in the blob, or in the decompressed stream with `frames`.
    pub start: u64,
    /// The frames of a seekable zstd layer; `None` for raw and plain tar layers.
    pub frames: Option<Arc<Frames>>,
}

impl LazyFile {
    /// A whole raw layer.
    pub(crate) fn raw(blob: Arc<LazyBlob>) -> LazyFile {
        LazyFile {
            blob,
            start: 0,
            frames: None,
        }
    }

    /// Reads `len` bytes at `offset` of a file of `size` bytes, every one verified.
    pub(crate) async fn read(&self, offset: u64, len: u64, size: u64) -> Result<Bytes, Error> {
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(Bytes::new());
        }
        match &self.frames {
            None => self.blob.read(self.start + offset, len).await,
            Some(frames) => frames.read(&self.blob, self.start + offset, len).await,
        }
    }

    /// The blob offset holding the file's byte `offset` (where readahead should go).
    pub(crate) fn blob_offset(&self, offset: u64) -> u64 {
        match &self.frames {
            None => self.start + offset,
            Some(frames) => frames.compressed_offset(self.start + offset),
        }
    }
}

/// A blocking `Read + Seek` over a lazy layer's uncompressed tar, for the planner (run it on a
/// blocking thread: each read waits for the runtime).
pub(crate) struct TarReader {
    file: LazyFile,
    size: u64,
    pos: u64,
    runtime: tokio::runtime::Handle,
}

impl TarReader {
    /// Reads the whole layer (its blob, or its decompressed stream with `frames`).
    pub(crate) fn new(
        blob: Arc<LazyBlob>,
        frames: Option<Arc<Frames>>,
        runtime: tokio::runtime::Handle,
    ) -> TarReader {
        let size = frames.as_ref().map_or(blob.size, |f| f.decompressed_size());
        TarReader {
            file: LazyFile {
                blob,
                start: 0,
                frames,
            },
            size,
            pos: 0,
            runtime,
        }
    }
}

impl Read for TarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(64 << 10);
        let bytes = self
            .runtime
            .block_on(self.file.read(self.pos, want, self.size))
            .map_err(|e| io::Error::other(e.to_string()))?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.pos += bytes.len() as u64;
        Ok(bytes.len())
    }
}

impl Seek for TarReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let next = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        self.pos = next;
        Ok(next)
    }
}

/// A compressed tar layer that cannot be read in place (tar+gzip, or tar without a chunk index
/// under full verification) holding one regular file its annotations describe: the file is shown
/// from the annotations at mount, and the layer is fetched, verified and unpacked the first time
/// the file is read.
pub(crate) struct DeferredLayer {
    /// The layer blob.
    pub blob: modelpack_transfer::BlobRef,
    /// Its encoding.
    pub encoding: modelpack_spec::Encoding,
    /// The file the annotations name (and the only file the layer may hold).
    pub path: modelpack_spec::LayerPath,
    /// Its size per the annotations.
    pub size: u64,
    /// Where layers are unpacked.
    pub trees: PathBuf,
    /// Where the layer is fetched from and into.
    ctx: Arc<BlobContext>,
    unpacked: tokio::sync::OnceCell<PathBuf>,
}

impl DeferredLayer {
    /// The one file `path` of `size` bytes in the layer `blob`, unpacked under `trees` when
    /// first read.
    pub(crate) fn new(
        blob: modelpack_transfer::BlobRef,
        encoding: modelpack_spec::Encoding,
        path: modelpack_spec::LayerPath,
        size: u64,
        trees: PathBuf,
        ctx: Arc<BlobContext>,
    ) -> DeferredLayer {
        DeferredLayer {
            blob,
            encoding,
            path,
            size,
            trees,
            ctx,
            unpacked: tokio::sync::OnceCell::new(),
        }
    }

    /// The unpacked file, once a read has brought it here.
    pub(crate) fn ready(&self) -> Option<PathBuf> {
        self.unpacked.get().cloned()
    }

    /// The unpacked file: on the first call, fetches the layer (verified against its digest),
    /// checks it holds exactly the annotated file at the annotated size, and unpacks it with
    /// every rule of `extract`. Concurrent callers share one fetch.
    pub(crate) async fn local(&self) -> Result<PathBuf, Error> {
        self.unpacked
            .get_or_try_init(|| async {
                let ctx = &self.ctx;
                modelpack_transfer::fetch_blob(&ctx.repo, &ctx.store, &self.blob, &ctx.transfer)
                    .await
                    .map_err(|e| Error::Read(e.to_string()))?;
                let store = ctx.store.clone();
                let layer = modelpack_extract::LayerBlob {
                    digest: self.blob.digest.clone(),
                    size: self.blob.size,
                    encoding: self.encoding,
                };
                let (path, size, dir) = (self.path.clone(), self.size, self.trees.clone());
                tokio::task::spawn_blocking(move || unpack_one(&store, layer, &path, size, &dir))
                    .await
                    .map_err(|e| Error::Read(e.to_string()))?
            })
            .await
            .cloned()
    }
}

/// Unpacks a one-file tar layer from the store into `dir`, refusing anything but exactly
/// `path` at `size` bytes.
fn unpack_one(
    store: &modelpack_store::Store,
    layer: modelpack_extract::LayerBlob,
    path: &modelpack_spec::LayerPath,
    size: u64,
    dir: &std::path::Path,
) -> Result<PathBuf, Error> {
    let digest = layer.digest.clone();
    let source = modelpack_extract::StoreSource(store);
    let plan = modelpack_extract::plan_tar_layer(layer, Some(size), &source)
        .map_err(|e| Error::Read(e.to_string()))?;
    let files: Vec<_> = plan
        .entries
        .iter()
        .filter(|e| !matches!(e.kind, modelpack_extract::EntryPlan::Dir))
        .collect();
    let ok = files.len() == 1
        && files[0].path == *path
        && matches!(files[0].kind, modelpack_extract::EntryPlan::TarFile { size: s, .. } if s == size);
    if !ok {
        return Err(Error::Read(format!(
            "layer {digest} does not hold exactly {path} ({size} bytes) as its annotations say"
        )));
    }
    modelpack_extract::extract_planned(&source, &plan, dir, None)
        .map_err(|e| Error::Read(e.to_string()))?;
    Ok(dir.join(path.as_str()))
}
