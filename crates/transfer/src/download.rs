//! Fetching one blob from a registry into the store: verified, resumable, and for large blobs as
//! parallel Range GETs written at their offsets while one thread hashes completed segments in
//! order.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use modelpack_registry::Repository;
use modelpack_spec::Digest;
use modelpack_store::{Resumable, Store};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, io};
use crate::target::blocking;
use crate::{BlobRef, Event, SMALL_BLOB, TransferOptions};

/// How a blob got into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// It was there already.
    Present,
    /// Downloaded (possibly continuing an earlier partial download).
    Downloaded,
}

fn mismatch(blob: &BlobRef, actual: Digest) -> Error {
    Error::DigestMismatch {
        digest: blob.digest.to_string(),
        actual: actual.to_string(),
    }
}

/// Hashes `bytes`, written at `offset`, when they continue the `hashed` prefix (bytes written
/// elsewhere are read back from the file once the prefix reaches them).
fn hash_written(hasher: &mut Sha256, hashed: &mut u64, offset: u64, bytes: &[u8]) {
    if offset == *hashed {
        hasher.update(bytes);
        *hashed += bytes.len() as u64;
    }
}

/// Gives a fresh partial file its blob's size with the disk blocks reserved up front: writes then
/// fill blocks already allocated instead of reserving each one as it arrives (on ext4 that
/// reservation was a third of a pull's cost of writing), and a disk without room for the blob
/// says so before the download rather than in its middle. A file system without `fallocate`
/// gets a sparse file of that size instead.
fn preallocate(file: &std::fs::File, blob: &BlobRef) -> Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, blob.size) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOSPC => Err(io(format!(
            "reserving {} bytes for blob {}",
            blob.size, blob.digest
        ))(e.into())),
        Err(_) => file.set_len(blob.size).map_err(io("preallocating")),
    }
}

/// Ensures `blob` is in `store`, fetching what is missing from `repo`.
pub async fn fetch_blob(
    repo: &Repository,
    store: &Store,
    blob: &BlobRef,
    opts: &TransferOptions,
) -> Result<Fetched> {
    if store.has_blob(&blob.digest) {
        (opts.progress)(Event::BlobSkipped {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        return Ok(Fetched::Present);
    }
    if blob.size <= SMALL_BLOB {
        (opts.progress)(Event::BlobStarted {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        fetch_small(repo, store, blob, opts).await?;
        (opts.progress)(Event::BlobDone {
            digest: blob.digest.clone(),
        });
        return Ok(Fetched::Downloaded);
    }
    let partial = {
        let store = store.clone();
        let digest = blob.digest.clone();
        blocking(move || Ok(store.resumable(&digest)?)).await?
    };
    if store.has_blob(&blob.digest) {
        // Another process finished it while we waited for the lock.
        drop(partial);
        (opts.progress)(Event::BlobSkipped {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        return Ok(Fetched::Present);
    }
    (opts.progress)(Event::BlobStarted {
        digest: blob.digest.clone(),
        size: blob.size,
    });
    let mut partial = partial;
    // Bytes that do not match: when a registry mirror served some, it is not asked for this
    // blob again and the fetch starts over from the next host (the partial data is gone).
    while let Err(e) = fetch_adaptive(repo, blob, opts, partial).await {
        if !(e.is_digest_mismatch() && repo.distrust(&blob.digest)) {
            return Err(e);
        }
        tracing::warn!(blob = %blob.digest, "a registry mirror served wrong bytes; fetching again from the next host");
        partial = {
            let store = store.clone();
            let digest = blob.digest.clone();
            blocking(move || Ok(store.resumable(&digest)?)).await?
        };
    }
    (opts.progress)(Event::BlobDone {
        digest: blob.digest.clone(),
    });
    Ok(Fetched::Downloaded)
}

/// Fetches a small blob whole (see [`SMALL_BLOB`]) into `store`; wrong bytes from a registry
/// mirror are fetched again from the next host.
async fn fetch_small(
    repo: &Repository,
    store: &Store,
    blob: &BlobRef,
    opts: &TransferOptions,
) -> Result<()> {
    loop {
        let bytes = {
            let _permit = opts.small_requests.acquire().await;
            let mut body = repo
                .blob_stream_sized(&blob.digest, blob.size, Some(0..blob.size))
                .await?;
            let mut out = Vec::with_capacity(blob.size as usize);
            while let Some(piece) = body.next_chunk().await? {
                out.extend_from_slice(&piece);
            }
            out
        };
        let failure = if bytes.len() as u64 != blob.size {
            Error::SizeMismatch {
                digest: blob.digest.to_string(),
                expected: blob.size,
                actual: bytes.len() as u64,
            }
        } else {
            let actual = Digest::sha256_of(&bytes);
            if actual == blob.digest {
                let store = store.clone();
                blocking(move || Ok(store.put_bytes(&bytes)?)).await?;
                (opts.progress)(Event::Bytes {
                    digest: blob.digest.clone(),
                    bytes: blob.size,
                });
                return Ok(());
            }
            mismatch(blob, actual)
        };
        if !repo.distrust(&blob.digest) {
            return Err(failure);
        }
        tracing::warn!(blob = %blob.digest, "a registry mirror served wrong bytes; fetching again from the next host");
    }
}

/// One worker's byte range: `[start, end)`, written up to `pos`. A split shrinks `end` and
/// gives the rest to a new span, so the spans always cover the blob exactly.
#[derive(Debug)]
struct Span {
    start: u64,
    pos: AtomicU64,
    end: AtomicU64,
}

impl Span {
    fn new(start: u64, pos: u64, end: u64) -> Arc<Span> {
        Arc::new(Span {
            start,
            pos: AtomicU64::new(pos),
            end: AtomicU64::new(end),
        })
    }

    fn remaining(&self) -> u64 {
        self.end
            .load(Ordering::SeqCst)
            .saturating_sub(self.pos.load(Ordering::SeqCst))
    }
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Smallest piece a span is split into.
const MIN_SPLIT: u64 = 8 << 20;
/// Split a span only when it would take longer than this at the current per-connection rate.
const SPLIT_WHEN_LONGER_THAN: f64 = 1.0;
/// A connection faster than this (bytes/s) is not split: it is already using the local disk and
/// CPU, and more streams only compete for them (measured on loopback).
const FAST_CONNECTION: f64 = 256.0 * 1024.0 * 1024.0;
/// Writes are gathered to this size before they reach the file.
const WRITE_BATCH: usize = 1 << 20;
/// Pieces at least this large are written as received, without gathering.
const DIRECT_WRITE: usize = 64 << 10;
/// Saves progress at most every this many bytes...
const SAVE_EVERY: u64 = 8 << 20;
/// ... and at most this often: on a fast link, a save every 8 MiB was a state file created and
/// renamed every few milliseconds (4% of a pull's CPU on loopback), for progress that a rerun
/// fetches again in a fraction of a second.
const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

fn encode_state(size: u64, spans: &[Arc<Span>]) -> Vec<u8> {
    let spans: Vec<[u64; 3]> = spans
        .iter()
        .map(|s| {
            [
                s.start,
                s.pos.load(Ordering::SeqCst),
                s.end.load(Ordering::SeqCst),
            ]
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"size": size, "spans": spans})).unwrap_or_default()
}

/// Spans from a saved state, if it is for this blob and covers it exactly.
fn decode_state(bytes: &[u8], size: u64) -> Option<Vec<Arc<Span>>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v["size"].as_u64()? != size {
        return None;
    }
    let mut spans: Vec<(u64, u64, u64)> = v["spans"]
        .as_array()?
        .iter()
        .map(|s| Some((s[0].as_u64()?, s[1].as_u64()?, s[2].as_u64()?)))
        .collect::<Option<_>>()?;
    spans.sort_unstable();
    let mut expect = 0;
    for &(start, pos, end) in &spans {
        if start != expect || end < start || end > size {
            return None;
        }
        expect = end;
        let _ = pos;
    }
    (expect == size).then(|| {
        spans
            .into_iter()
            .map(|(start, pos, end)| Span::new(start, pos.clamp(start, end), end))
            .collect()
    })
}

/// How far from 0 the blob is written without a gap.
fn frontier(spans: &[Arc<Span>]) -> u64 {
    let mut sorted: Vec<&Arc<Span>> = spans.iter().collect();
    sorted.sort_by_key(|s| s.start);
    let mut f = 0;
    for s in sorted {
        if s.start != f {
            break;
        }
        let end = s.end.load(Ordering::SeqCst);
        let pos = s.pos.load(Ordering::SeqCst).min(end);
        f = pos;
        if pos < end {
            break;
        }
    }
    f
}

/// Every blob: one stream first; while it runs, a span that would take more than a second is
/// split and the second half fetched on another connection (up to the concurrency), so slow or
/// far links fill with parallel Range GETs while a fast local link keeps one cheap stream. A
/// thread hashes the written prefix as it grows, reading it back from the page cache; progress is
/// saved so a killed download resumes from what it has.
async fn fetch_adaptive(
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
    partial: Resumable,
) -> Result<()> {
    let file = partial.file().try_clone().map_err(io("partial file"))?;
    let spans: Arc<Mutex<Vec<Arc<Span>>>> = Arc::new(Mutex::new(
        match partial
            .load_state()
            .and_then(|b| decode_state(&b, blob.size))
        {
            Some(spans) => spans,
            None => {
                // Truncating to zero only what an earlier attempt left: ext4 marks a file cut to
                // zero for block allocation at close (its replace-by-truncate safeguard), which
                // flushed the whole blob when the partial file was closed (0.2 s per GiB here).
                if file.metadata().map_err(io("partial file"))?.len() != 0 {
                    file.set_len(0).map_err(io("partial file"))?;
                }
                preallocate(&file, blob)?;
                vec![Span::new(0, 0, blob.size)]
            }
        },
    ));
    let snapshot =
        |spans: &Arc<Mutex<Vec<Arc<Span>>>>| spans.lock().map(|g| g.clone()).unwrap_or_default();
    let resumed: u64 = snapshot(&spans)
        .iter()
        .map(|s| s.pos.load(Ordering::SeqCst) - s.start)
        .sum();
    if resumed > 0 {
        (opts.progress)(Event::Resumed {
            digest: blob.digest.clone(),
            bytes: resumed,
        });
    }
    let partial = Arc::new(Mutex::new(Some(partial)));
    let unsaved = Arc::new(AtomicU64::new(0));
    // When progress was last saved, in milliseconds since `began`.
    let began = std::time::Instant::now();
    let saved_at = Arc::new(AtomicU64::new(0));
    let save: Arc<dyn Fn() + Send + Sync> = {
        let partial = partial.clone();
        let spans = spans.clone();
        let size = blob.size;
        Arc::new(move || {
            let current = spans.lock().map(|g| g.clone()).unwrap_or_default();
            if let Ok(guard) = partial.lock()
                && let Some(p) = guard.as_ref()
            {
                let _ = p.save_state(&encode_state(size, &current));
            }
        })
    };

    // The hasher follows the written prefix: bytes written exactly at the prefix's end arrive
    // through the channel and are hashed from memory; anything else is read back from the file
    // once the prefix reaches it.
    let failed = Arc::new(AtomicBool::new(false));
    // If this future is dropped (another blob of the same pull failed, Ctrl-C), the hasher thread
    // must stop too: a blocking thread that never ends would hold the runtime's shutdown forever.
    let _stop_hasher_on_drop = StopOnDrop(failed.clone());
    let (written_tx, mut written_rx) = tokio::sync::mpsc::channel::<(u64, bytes::Bytes)>(16);
    let hasher = {
        let file = file.try_clone().map_err(io("partial file"))?;
        let spans = spans.clone();
        let failed = failed.clone();
        let size = blob.size;
        tokio::task::spawn_blocking(move || -> Option<Digest> {
            let mut hasher = Sha256::new();
            let mut hashed = 0u64;
            // Only needed when written bytes must be read back; small blobs never get here.
            let mut buf = Vec::new();
            let mut open = true;
            while hashed < size {
                if open {
                    match written_rx.try_recv() {
                        Ok((offset, bytes)) => {
                            hash_written(&mut hasher, &mut hashed, offset, &bytes);
                            continue;
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                    }
                }
                let f = frontier(&spans.lock().map(|g| g.clone()).unwrap_or_default());
                if f <= hashed {
                    if failed.load(Ordering::SeqCst) {
                        return None;
                    }
                    if open {
                        match written_rx.blocking_recv() {
                            Some((offset, bytes)) => {
                                hash_written(&mut hasher, &mut hashed, offset, &bytes);
                            }
                            None => open = false,
                        }
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    continue;
                }
                if buf.is_empty() {
                    buf = vec![0u8; 1 << 20];
                }
                while hashed < f {
                    let len = (f - hashed).min(buf.len() as u64) as usize;
                    if file.read_exact_at(&mut buf[..len], hashed).is_err() {
                        return None;
                    }
                    hasher.update(&buf[..len]);
                    hashed += len as u64;
                }
            }
            Some(Digest::from_sha256(hasher.finalize().into()))
        })
    };

    // Each stream is a runtime task, polled by the worker thread that sees its socket ready;
    // polled from the caller's `block_on` instead, every read costs a wake-up across threads.
    // The set aborts what still runs when it is dropped (an error, Ctrl-C, another blob failed).
    let file = Arc::new(file);
    let worker = |span: Arc<Span>| {
        let file = file.clone();
        let unsaved = unsaved.clone();
        let saved_at = saved_at.clone();
        let save = save.clone();
        let written_tx = written_tx.clone();
        let (repo, blob, opts) = (repo.clone(), blob.clone(), opts.clone());
        async move {
            fetch_span(&repo, &blob, &opts, &file, &span, &written_tx, &|n| {
                let now = began.elapsed().as_millis() as u64;
                if unsaved.fetch_add(n, Ordering::SeqCst) + n >= SAVE_EVERY
                    && now.saturating_sub(saved_at.load(Ordering::SeqCst))
                        >= SAVE_INTERVAL.as_millis() as u64
                {
                    unsaved.store(0, Ordering::SeqCst);
                    saved_at.store(now, Ordering::SeqCst);
                    save();
                }
            })
            .await
        }
    };
    let mut running = tokio::task::JoinSet::new();
    for span in snapshot(&spans) {
        if span.remaining() > 0 {
            running.spawn(worker(span));
        }
    }
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut first_error = None;
    while !running.is_empty() {
        tokio::select! {
            done = running.join_next() => {
                let error = match done {
                    Some(Ok(Err(e))) => e,
                    Some(Err(joined)) => Error::Unsupported(format!("download task failed: {joined}")),
                    _ => continue,
                };
                failed.store(true, Ordering::SeqCst);
                first_error.get_or_insert(error);
                break;
            }
            _ = tick.tick() => {
                let elapsed = started.elapsed().as_secs_f64();
                let current = snapshot(&spans);
                let written: u64 = current.iter().map(|s| s.pos.load(Ordering::SeqCst) - s.start).sum::<u64>() - resumed;
                let active = running.len().max(1);
                let per_connection = written as f64 / elapsed.max(0.001) / active as f64;
                if elapsed < 0.2 || running.len() >= opts.concurrency || opts.connections.available_permits() == 0 {
                    continue;
                }
                // Split as often as there is room: a slow link reaches full width in one tick.
                let room = opts.concurrency.saturating_sub(running.len()).min(opts.connections.available_permits());
                for _ in 0..room {
                    let current = snapshot(&spans);
                    let Some(widest) = current.iter().max_by_key(|s| s.remaining()) else { break };
                    let remaining = widest.remaining();
                    if remaining < 2 * MIN_SPLIT
                        || (remaining as f64) < per_connection * SPLIT_WHEN_LONGER_THAN
                        || per_connection > FAST_CONNECTION
                    {
                        break;
                    }
                    let pos = widest.pos.load(Ordering::SeqCst);
                    let old_end = widest.end.load(Ordering::SeqCst);
                    let mid = (pos + (old_end - pos) / 2) & !((1 << 20) - 1);
                    if mid <= pos || mid >= old_end {
                        break;
                    }
                    // The old worker may write a little past `mid` before it sees the new end:
                    // the bytes are the blob's own, so the overlap is harmless.
                    widest.end.store(mid, Ordering::SeqCst);
                    let fresh = Span::new(mid, mid, old_end);
                    if let Ok(mut g) = spans.lock() {
                        g.push(fresh.clone());
                    }
                    tracing::debug!(digest = %blob.digest, mid, "split a slow range onto another connection");
                    running.spawn(worker(fresh));
                }
            }
        }
    }
    // After an error the other streams stop; wait until they have, so no write follows.
    running.shutdown().await;
    drop(written_tx);
    // No more writes: the hasher finishes what was written and stops there, so a download that
    // ended short can never leave it waiting.
    failed.store(true, Ordering::SeqCst);
    let reached = frontier(&snapshot(&spans));
    let digest = hasher
        .await
        .map_err(|e| Error::Unsupported(format!("hasher thread failed: {e}")))?;
    // Progress is worth keeping only for a download that did not end: a complete one is
    // committed or discarded below, and for small blobs the state file would be most of the
    // file-system work (on ext4, creating inodes where many were just deleted is slow).
    if first_error.is_some() || digest.is_none() {
        save();
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let partial = partial
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .ok_or_else(|| Error::Unsupported("partial download lost".into()))?;
    let actual = digest.ok_or_else(|| {
        Error::Registry(modelpack_registry::Error::Protocol(format!(
            "blob {}: the download stopped at byte {reached} of {}",
            blob.digest, blob.size
        )))
    })?;
    if actual != blob.digest {
        partial.discard()?;
        return Err(mismatch(blob, actual));
    }
    partial.commit(&blob.digest)?;
    Ok(())
}

/// Fetches a span into `file` at its offsets, following its (possibly shrinking) end; the
/// registry's [`modelpack_registry::BlobBody`] resumes a broken stream from where it stopped.
/// Writes are gathered into 1 MiB batches; each batch goes to the hasher after it is written.
async fn fetch_span(
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
    file: &std::fs::File,
    span: &Span,
    hasher: &tokio::sync::mpsc::Sender<(u64, bytes::Bytes)>,
    on_written: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let mut pos = span.pos.load(Ordering::SeqCst);
    let end = span.end.load(Ordering::SeqCst);
    if pos >= end {
        return Ok(());
    }
    let _permit = opts.connections.acquire().await;
    let mut body = repo
        .blob_stream_sized(&blob.digest, blob.size, Some(pos..end))
        .await?;
    let mut batch = bytes::BytesMut::with_capacity(WRITE_BATCH);
    loop {
        body.set_end(span.end.load(Ordering::SeqCst));
        let chunk = body.next_chunk().await?;
        let finished = chunk.is_none();
        let chunk = chunk.unwrap_or_default();
        // Large pieces (the HTTP stack hands over a few hundred KiB at a time on a fast link)
        // are written and hashed as they are, with no copy; small ones are gathered first.
        let data = if batch.is_empty() && chunk.len() >= DIRECT_WRITE {
            Some(chunk)
        } else {
            batch.extend_from_slice(&chunk);
            (!batch.is_empty() && (batch.len() >= WRITE_BATCH || finished))
                .then(|| batch.split().freeze())
        };
        if let Some(data) = data {
            // Page-cache writes of under a few MiB: short enough for the runtime thread.
            file.write_all_at(&data, pos)
                .map_err(io("writing partial data"))?;
            let n = data.len() as u64;
            let offset = pos;
            pos += n;
            span.pos.store(pos, Ordering::SeqCst);
            on_written(n);
            (opts.progress)(Event::Bytes {
                digest: blob.digest.clone(),
                bytes: n,
            });
            let _ = hasher.send((offset, data)).await;
        }
        if finished {
            return Ok(());
        }
    }
}
