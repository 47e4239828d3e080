//! Turning one planned file into one layer blob in the store: a single read pass that hashes
//! while it copies (or clones, or links), in raw or tar encoding, with gzip or seekable zstd.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use modelpack_spec::annotations::{
    ANNOTATION_FILE_METADATA, ANNOTATION_FILEPATH, ANNOTATION_MEDIATYPE_UNTESTED, ANNOTATION_TITLE,
    TYPEFLAG_REGULAR, TYPEFLAG_SYMLINK,
};
use modelpack_spec::oci_spec::image::Descriptor;
use modelpack_spec::zstd_seek::{SeekEntry, SeekTable};
use modelpack_spec::{Digest, Encoding, FileMetadata, LayerMediaType};
use modelpack_store::{Ingest, IoContext, LinkOutcome, Store};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::plan::{PlannedFile, Source};

/// Uncompressed bytes per independent zstd frame in our seekable zstd layers.
pub const ZSTD_FRAME_SIZE: usize = 2 * 1024 * 1024;
const ZSTD_LEVEL: i32 = 3;
/// Copy buffers hold whole chunks of the chunk-digest index (buffers are filled completely
/// except at the end of a file, so chunk boundaries fall on buffer boundaries).
const CHUNK: usize = modelpack_spec::annotations::CHUNK_INDEX_CHUNK_SIZE as usize;
const COPY_BUFFER: usize = 2 * CHUNK;
const COPY_BUFFERS: usize = 3;

/// How file attributes are recorded.
#[derive(Debug, Clone, Copy)]
pub struct AttrPolicy {
    /// Clamp modification times to this (from `SOURCE_DATE_EPOCH`).
    pub clamp_mtime: Option<DateTime<FixedOffset>>,
    /// Record uid and gid as 0 (reproducible builds).
    pub zero_owner: bool,
}

/// Where raw files' bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPlacement {
    /// Copied into the store while hashed.
    Copy,
    /// Reflinked or hard-linked into the store where the file system allows.
    Link,
    /// Hashed and left where they are (the caller pushes them from there).
    InPlace,
}

/// How bytes got into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Copied while hashed.
    Copied,
    /// Cloned copy-on-write (reflink), then hashed.
    Reflinked,
    /// Hard-linked after hashing.
    HardLinked,
    /// The blob was already in the store.
    AlreadyPresent,
    /// Hashed where it is and left there (for a build pushed straight to a registry).
    InPlace,
}

/// One layer written to the store.
#[derive(Debug, Clone)]
pub struct PackedLayer {
    /// The layer descriptor, with annotations.
    pub descriptor: Descriptor,
    /// Digest of the uncompressed content (raw bytes or tar).
    pub diff_id: Digest,
    /// How the bytes were placed.
    pub placement: Placement,
    /// Why `--link` fell back to a copy, if it did.
    pub link_fallback: Option<String>,
    /// Where the blob's bytes are when they were left in place instead of stored.
    pub source: Option<std::path::PathBuf>,
    /// sha256 of each chunk of the layer blob (2 MiB, the chunk-digest index's size).
    pub chunks: Vec<Digest>,
}

struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: DateTime<FixedOffset>,
}

fn attrs_of(path: &Path, policy: &AttrPolicy) -> Result<Attrs> {
    let meta = fs::symlink_metadata(path).at(path)?;
    let mtime_secs = meta.mtime();
    let mut mtime: DateTime<FixedOffset> = Utc
        .timestamp_opt(mtime_secs, 0)
        .single()
        .unwrap_or_default()
        .fixed_offset();
    if let Some(clamp) = policy.clamp_mtime
        && mtime > clamp
    {
        mtime = clamp;
    }
    let (uid, gid) = if policy.zero_owner {
        (0, 0)
    } else {
        (meta.uid(), meta.gid())
    };
    Ok(Attrs {
        mode: meta.mode() & 0o777,
        uid,
        gid,
        mtime,
    })
}

/// A writer that hashes and counts what passes through it.
/// Hashes what it writes, whole and per chunk of the chunk-digest index (so tar layers, of
/// any encoding, can be verified chunk by chunk when read lazily).
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
    chunks: modelpack_spec::ChunkHasher,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
            chunks: modelpack_spec::ChunkHasher::new(CHUNK as u64),
        }
    }

    fn finish(self) -> (W, Digest, u64, Vec<Digest>) {
        (
            self.inner,
            Digest::from_sha256(self.hasher.finalize().into()),
            self.count,
            self.chunks.finish(),
        )
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.chunks.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes zstd as independent frames of [`ZSTD_FRAME_SIZE`] uncompressed bytes, then a seek
/// table, so readers can decompress from any frame.
struct SeekableZstdWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    table: SeekTable,
    compressor: zstd::bulk::Compressor<'static>,
}

impl<W: Write> SeekableZstdWriter<W> {
    fn new(inner: W) -> io::Result<Self> {
        Ok(SeekableZstdWriter {
            inner,
            buf: Vec::with_capacity(ZSTD_FRAME_SIZE),
            table: SeekTable::default(),
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }

    fn flush_frame(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let frame = self.compressor.compress(&self.buf)?;
        self.inner.write_all(&frame)?;
        let too_big = |_| io::Error::other("zstd frame over 4 GiB");
        self.table.frames.push(SeekEntry {
            compressed_size: u32::try_from(frame.len()).map_err(too_big)?,
            decompressed_size: u32::try_from(self.buf.len()).map_err(too_big)?,
        });
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.flush_frame()?;
        self.inner.write_all(&self.table.encode())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SeekableZstdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = ZSTD_FRAME_SIZE - self.buf.len();
        let n = room.min(buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == ZSTD_FRAME_SIZE {
            self.flush_frame()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads `src` once, hashing each buffer while a second thread writes the previous one to `dst`.
/// Returns the digest and length of what was read (and written).
pub fn copy_and_hash(
    src: &mut impl Read,
    dst: &mut (impl Write + Send),
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(Digest, u64)> {
    copy_and_hash_chunked(src, dst, progress).map(|(d, n, _)| (d, n))
}

/// [`copy_and_hash`], also returning the sha256 of each 2 MiB chunk (computed on the writer
/// thread, in parallel with the whole-file hash) for the chunk-digest index.
pub fn copy_and_hash_chunked(
    src: &mut impl Read,
    dst: &mut (impl Write + Send),
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(Digest, u64, Vec<Digest>)> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(COPY_BUFFERS);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(COPY_BUFFERS);
    for _ in 0..COPY_BUFFERS {
        let _ = empty_tx.send(vec![0u8; COPY_BUFFER]);
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<Vec<Digest>> {
            let mut chunks = Vec::new();
            for (buf, n) in full_rx {
                chunks.extend(buf[..n].chunks(CHUNK).map(Digest::sha256_of));
                dst.write_all(&buf[..n])?;
                progress(n as u64);
                if empty_tx.send(buf).is_err() {
                    break;
                }
            }
            dst.flush()?;
            Ok(chunks)
        });
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let read_result = (|| -> io::Result<()> {
            while let Ok(mut buf) = empty_rx.recv() {
                let mut filled = 0;
                while filled < buf.len() {
                    match src.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..filled]);
                total += filled as u64;
                if full_tx.send((buf, filled)).is_err() {
                    // The writer failed; its error is reported below.
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let write_result = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        read_result?;
        let chunks = write_result?;
        Ok((Digest::from_sha256(hasher.finalize().into()), total, chunks))
    })
}

/// Hashes `src` whole and in 2 MiB chunks without writing it anywhere.
fn hash_chunked(
    src: &mut impl Read,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(Digest, u64, Vec<Digest>)> {
    copy_and_hash_chunked(src, &mut io::sink(), progress)
}

/// A reader that reports progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn annotations(
    file: &PlannedFile,
    attrs: &Attrs,
    size: u64,
    typeflag: u8,
) -> HashMap<String, String> {
    let meta = FileMetadata {
        name: file.path.file_name().to_owned(),
        mode: attrs.mode,
        uid: attrs.uid,
        gid: attrs.gid,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        mtime: attrs.mtime,
        typeflag,
    };
    HashMap::from([
        (
            ANNOTATION_FILEPATH.to_owned(),
            file.path.as_str().to_owned(),
        ),
        (ANNOTATION_TITLE.to_owned(), file.path.as_str().to_owned()),
        (ANNOTATION_FILE_METADATA.to_owned(), meta.to_annotation()),
        (
            ANNOTATION_MEDIATYPE_UNTESTED.to_owned(),
            file.untested.to_string(),
        ),
    ])
}

fn commit(ingest: Ingest, digest: &Digest) -> Result<Placement> {
    ingest.commit(digest)?;
    Ok(Placement::Copied)
}

/// Packs one file as one layer in `encoding` (a symlink always goes in a tar).
pub fn pack_file(
    store: &Store,
    file: &PlannedFile,
    encoding: Encoding,
    policy: &AttrPolicy,
    placement: LayerPlacement,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PackedLayer> {
    let link = placement == LayerPlacement::Link;
    let attrs = attrs_of(&file.abs, policy)?;
    let encoding = match (&file.source, encoding) {
        (Source::Symlink(_), Encoding::Raw) => Encoding::Tar,
        (_, e) => e,
    };
    let media_type = LayerMediaType::new(file.kind, encoding).to_string();
    let (typeflag, content_size) = match &file.source {
        Source::Symlink(_) => (TYPEFLAG_SYMLINK, 0),
        Source::File => (
            TYPEFLAG_REGULAR,
            fs::metadata(&file.abs).at(&file.abs)?.len(),
        ),
    };
    let mut link_fallback = None;
    let mut source = None;
    let chunks;
    let (digest, size, diff_id, placement, file_size) = if encoding == Encoding::Raw
        && placement == LayerPlacement::InPlace
    {
        let mut src = File::open(&file.abs).at(&file.abs)?;
        let (digest, size, digests) = hash_chunked(&mut src, progress).at(&file.abs)?;
        source = Some(file.abs.clone());
        chunks = digests;
        (digest.clone(), size, digest, Placement::InPlace, size)
    } else if encoding == Encoding::Raw {
        let mut placed = None;
        if link {
            match place_linked(store, file, progress) {
                Ok(done) => placed = Some(done),
                Err(reason) => link_fallback = Some(reason),
            }
        }
        let (digest, size, placement) = match placed {
            Some((digest, size, placement, digests)) => {
                chunks = digests;
                (digest, size, placement)
            }
            None => {
                let mut src = File::open(&file.abs).at(&file.abs)?;
                let mut ingest = store.ingest()?;
                let ingest_path = ingest.path().to_owned();
                let (digest, size, digests) =
                    copy_and_hash_chunked(&mut src, ingest.file(), progress).at(&ingest_path)?;
                chunks = digests;
                let placement = commit(ingest, &digest)?;
                (digest, size, placement)
            }
        };
        (digest.clone(), size, digest, placement, size)
    } else {
        let mut ingest = store.ingest()?;
        let ingest_path = ingest.path().to_owned();
        let out = HashWriter::new(ingest.file());
        let (diff_id, file_size, out) = match encoding {
            Encoding::Tar => {
                let (inner, diff_id, file_size) =
                    write_tar(file, &attrs, content_size, progress, out)?;
                (diff_id, file_size, inner)
            }
            Encoding::TarGzip => {
                let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
                let (gz, diff_id, file_size) = write_tar(file, &attrs, content_size, progress, gz)?;
                (diff_id, file_size, gz.finish().at(&ingest_path)?)
            }
            Encoding::TarZstd => {
                let zw = SeekableZstdWriter::new(out).at(&ingest_path)?;
                let (zw, diff_id, file_size) = write_tar(file, &attrs, content_size, progress, zw)?;
                (diff_id, file_size, zw.finish().at(&ingest_path)?)
            }
            Encoding::Raw => unreachable!("raw handled above"),
        };
        let (_, digest, size, blob_chunks) = out.finish();
        chunks = blob_chunks;
        let placement = commit(ingest, &digest)?;
        (digest, size, diff_id, placement, file_size)
    };
    let descriptor = modelpack_spec::descriptor(
        &media_type,
        &digest,
        size,
        Some(annotations(file, &attrs, file_size, typeflag)),
    )?;
    Ok(PackedLayer {
        descriptor,
        diff_id,
        placement,
        link_fallback,
        source,
        chunks,
    })
}

/// Places a raw file without copying: reflink, else hard link. `Err` says why neither worked.
fn place_linked(
    store: &Store,
    file: &PlannedFile,
    progress: &(dyn Fn(u64) + Sync),
) -> std::result::Result<(Digest, u64, Placement, Vec<Digest>), String> {
    if let Ok(Some(mut ingest)) = store.reflink_ingest(&file.abs) {
        let hashed = hash_chunked(&mut *ingest.file(), progress);
        if let Ok((digest, size, chunks)) = hashed
            && ingest.commit(&digest).is_ok()
        {
            return Ok((digest, size, Placement::Reflinked, chunks));
        }
    }
    let (digest, size, chunks) = File::open(&file.abs)
        .and_then(|mut f| hash_chunked(&mut f, progress))
        .map_err(|e| e.to_string())?;
    match store.link_blob(&file.abs, &digest) {
        Ok(LinkOutcome::AlreadyPresent) => Ok((digest, size, Placement::AlreadyPresent, chunks)),
        Ok(LinkOutcome::HardLinked) => Ok((digest, size, Placement::HardLinked, chunks)),
        Err(e) => Err(format!("cannot reflink or hard-link into the store ({e})")),
    }
}

/// Writes a one-entry tar of `file` to `out`; returns `out`, the tar's digest and the size of the
/// file's content.
fn write_tar<W: Write>(
    file: &PlannedFile,
    attrs: &Attrs,
    content_size: u64,
    progress: &(dyn Fn(u64) + Sync),
    out: W,
) -> Result<(W, Digest, u64)> {
    let mut builder = tar::Builder::new(HashWriter::new(out));
    builder.mode(tar::HeaderMode::Deterministic);
    let mut header = tar::Header::new_gnu();
    header.set_mode(attrs.mode);
    header.set_uid(u64::from(attrs.uid));
    header.set_gid(u64::from(attrs.gid));
    header.set_mtime(u64::try_from(attrs.mtime.timestamp()).unwrap_or(0));
    let path = file.path.as_str();
    match &file.source {
        Source::Symlink(target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder
                .append_link(&mut header, path, target)
                .at(&file.abs)?;
        }
        Source::File => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content_size);
            let src = File::open(&file.abs).at(&file.abs)?;
            let mut reader = Counting {
                inner: src.take(content_size),
                progress,
            };
            builder
                .append_data(&mut header, path, &mut reader)
                .at(&file.abs)?;
            if reader.inner.limit() != 0 {
                return Err(Error::Unsupported {
                    path: file.abs.clone(),
                    reason: "file shrank while it was being packed".into(),
                });
            }
        }
    }
    let hashed = builder.into_inner().at(&file.abs)?;
    let (out, diff_id, _, _) = hashed.finish();
    Ok((out, diff_id, content_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_hash_matches() {
        let data: Vec<u8> = (0..10_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        let (digest, n) = copy_and_hash(&mut data.as_slice(), &mut out, &|_| {}).expect("copy");
        assert_eq!(n, data.len() as u64);
        assert_eq!(out, data);
        assert_eq!(digest, Digest::sha256_of(&data));
    }

    #[test]
    fn seekable_zstd_decodes_with_plain_decoder() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i / 7 % 256) as u8).collect();
        let mut w = SeekableZstdWriter::new(Vec::new()).expect("writer");
        w.write_all(&data).expect("write");
        let out = w.finish().expect("finish");
        assert_eq!(zstd::decode_all(out.as_slice()).expect("decode"), data);
        let footer = &out[out.len() - modelpack_spec::zstd_seek::FOOTER_SIZE..];
        let table_len = SeekTable::table_size_from_footer(footer).expect("footer") as usize;
        let table = SeekTable::decode(&out[out.len() - table_len..]).expect("table");
        assert_eq!(table.frames.len(), 3);
        assert_eq!(table.decompressed_size(), data.len() as u64);
        let loc = table.locate(4_500_000).expect("frame");
        let start = loc.compressed_offset as usize;
        let frame = &out[start..start + loc.entry.compressed_size as usize];
        let part = zstd::decode_all(frame).expect("one frame");
        assert_eq!(part, data[loc.decompressed_offset as usize..][..part.len()]);
    }
}
