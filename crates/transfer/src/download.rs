//! Fetching one blob from a registry into the store: verified, resumable, and for large blobs as
//! parallel Range GETs written at their offsets while one thread hashes completed segments in
//! order.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use futures_util::StreamExt;
use modelpack_registry::Repository;
use modelpack_spec::Digest;
use modelpack_store::{Resumable, Store};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, io};
use crate::{BlobRef, Event, TransferOptions};

/// How a blob got into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// It was there already.
    Present,
    /// Downloaded (possibly continuing an earlier partial download).
    Downloaded,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unsupported(format!("worker thread failed: {e}")))?
}

/// Hashes `len` bytes of `file` from the start.
fn hash_prefix(file: &std::fs::File, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(())
}

fn mismatch(blob: &BlobRef, actual: Digest) -> Error {
    Error::DigestMismatch {
        digest: blob.digest.to_string(),
        actual: actual.to_string(),
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
    if blob.size >= opts.segment_threshold && opts.concurrency > 1 {
        fetch_segmented(repo, blob, opts, partial).await?;
    } else {
        fetch_single(repo, blob, opts, partial).await?;
    }
    (opts.progress)(Event::BlobDone {
        digest: blob.digest.clone(),
    });
    Ok(Fetched::Downloaded)
}

/// One stream, continuing from the partial prefix; mid-body failures resume from where they
/// stopped.
async fn fetch_single(
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
    partial: Resumable,
) -> Result<()> {
    let file = partial.file().try_clone().map_err(io("partial file"))?;
    let mut have = file.metadata().map_err(io("partial file"))?.len();
    if partial.load_state().is_some() || have > blob.size {
        // Left by a segmented download or too long: start over.
        file.set_len(0).map_err(io("partial file"))?;
        let _ = partial.save_state(b"");
        have = 0;
    }
    let mut hasher = Sha256::new();
    if have > 0 {
        let f = file.try_clone().map_err(io("partial file"))?;
        hasher = blocking(move || {
            hash_prefix(&f, have, &mut hasher).map_err(io("reading partial data"))?;
            Ok(hasher)
        })
        .await?;
        (opts.progress)(Event::Resumed {
            digest: blob.digest.clone(),
            bytes: have,
        });
    }
    let mut failures = 0u32;
    while have < blob.size {
        let _permit = opts.connections.acquire().await;
        let stream = repo
            .get_blob(&blob.digest, (have > 0).then_some(have..blob.size))
            .await?;
        let mut skip = have - stream.offset.min(have);
        let mut body = stream.response.bytes_stream();
        let mut failed = None;
        while let Some(chunk) = body.next().await {
            let mut chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if skip > 0 {
                let n = skip.min(chunk.len() as u64) as usize;
                let _ = chunk.split_to(n);
                skip -= n as u64;
                if chunk.is_empty() {
                    continue;
                }
            }
            if have + chunk.len() as u64 > blob.size {
                return Err(Error::SizeMismatch {
                    digest: blob.digest.to_string(),
                    expected: blob.size,
                    actual: have + chunk.len() as u64,
                });
            }
            file.write_all_at(&chunk, have)
                .map_err(io("writing partial data"))?;
            hasher.update(&chunk);
            have += chunk.len() as u64;
            (opts.progress)(Event::Bytes {
                digest: blob.digest.clone(),
                bytes: chunk.len() as u64,
            });
        }
        match failed {
            None if have < blob.size => {
                return Err(Error::SizeMismatch {
                    digest: blob.digest.to_string(),
                    expected: blob.size,
                    actual: have,
                });
            }
            None => {}
            Some(e) => {
                failures += 1;
                if failures >= repo.client().options().retry.attempts {
                    return Err(modelpack_registry::Error::Protocol(format!(
                        "blob {}: connection lost after {have} bytes: {e}",
                        blob.digest
                    ))
                    .into());
                }
                tracing::debug!(have, error = %e, "blob stream broke; resuming");
            }
        }
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if actual != blob.digest {
        partial.discard()?;
        return Err(mismatch(blob, actual));
    }
    partial.commit(&blob.digest)?;
    Ok(())
}

/// The saved progress of a segmented download: segment size and how many bytes from the start
/// of each segment are written.
fn encode_state(segment: u64, size: u64, filled: &[AtomicU64]) -> Vec<u8> {
    let filled: Vec<u64> = filled.iter().map(|f| f.load(Ordering::SeqCst)).collect();
    serde_json::to_vec(&serde_json::json!({"segment": segment, "size": size, "filled": filled}))
        .unwrap_or_default()
}

fn decode_state(bytes: &[u8], segment: u64, size: u64, n: usize) -> Option<Vec<u64>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v["segment"].as_u64()? != segment || v["size"].as_u64()? != size {
        return None;
    }
    let filled: Vec<u64> = v["filled"]
        .as_array()?
        .iter()
        .enumerate()
        .map(|(i, x)| x.as_u64().unwrap_or(0).min(segment_len(i, segment, size)))
        .collect();
    (filled.len() == n).then_some(filled)
}

fn segment_len(i: usize, segment: u64, size: u64) -> u64 {
    segment.min(size - i as u64 * segment)
}

/// Saves progress at most every this many bytes per segment.
const SAVE_EVERY: u64 = 4 << 20;

/// Parallel Range GETs of fixed segments into a preallocated file; a blocking thread hashes
/// segments in order as they complete; progress within each segment is saved as it goes, so a
/// killed download continues from the bytes it has.
async fn fetch_segmented(
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
    partial: Resumable,
) -> Result<()> {
    let segment = opts.segment_size.max(1 << 20);
    let n = blob.size.div_ceil(segment) as usize;
    let file = partial.file().try_clone().map_err(io("partial file"))?;
    let previous = partial
        .load_state()
        .and_then(|b| decode_state(&b, segment, blob.size, n));
    let filled: Arc<Vec<AtomicU64>> = Arc::new(match &previous {
        Some(f) => f.iter().map(|&x| AtomicU64::new(x)).collect(),
        None => {
            file.set_len(0).map_err(io("partial file"))?;
            file.set_len(blob.size).map_err(io("preallocating"))?;
            (0..n).map(|_| AtomicU64::new(0)).collect()
        }
    });
    let resumed: u64 = filled.iter().map(|f| f.load(Ordering::SeqCst)).sum();
    if resumed > 0 {
        (opts.progress)(Event::Resumed {
            digest: blob.digest.clone(),
            bytes: resumed,
        });
    }
    let partial = Arc::new(Mutex::new(Some(partial)));
    let save = {
        let partial = partial.clone();
        let filled = filled.clone();
        let size = blob.size;
        move || {
            if let Ok(guard) = partial.lock()
                && let Some(p) = guard.as_ref()
            {
                let _ = p.save_state(&encode_state(segment, size, &filled));
            }
        }
    };
    let complete =
        |i: usize| filled[i].load(Ordering::SeqCst) == segment_len(i, segment, blob.size);
    let (tx, rx) = mpsc::channel::<usize>();
    for i in 0..n {
        if complete(i) {
            let _ = tx.send(i);
        }
    }
    // The hasher: waits for segment 0, 1, 2, ... in order, reading each back from the file.
    let hasher = {
        let file = file.try_clone().map_err(io("partial file"))?;
        let size = blob.size;
        tokio::task::spawn_blocking(move || -> Option<Digest> {
            let mut hasher = Sha256::new();
            let mut ready = vec![false; n];
            let mut buf = vec![0u8; 1 << 20];
            for next in 0..n {
                while !ready[next] {
                    match rx.recv() {
                        Ok(i) => ready[i] = true,
                        Err(_) => return None,
                    }
                }
                let start = next as u64 * segment;
                let end = (start + segment).min(size);
                let mut pos = start;
                while pos < end {
                    let len = (end - pos).min(buf.len() as u64) as usize;
                    if file.read_exact_at(&mut buf[..len], pos).is_err() {
                        return None;
                    }
                    hasher.update(&buf[..len]);
                    pos += len as u64;
                }
            }
            Some(Digest::from_sha256(hasher.finalize().into()))
        })
    };
    let pending: Vec<usize> = (0..n).filter(|&i| !complete(i)).collect();
    let results = futures_util::stream::iter(pending.into_iter().map(|i| {
        let file = &file;
        let filled = &filled;
        let tx = tx.clone();
        let save = &save;
        async move {
            let start = i as u64 * segment;
            let end = start + segment_len(i, segment, blob.size);
            let mut last_saved = filled[i].load(Ordering::SeqCst);
            let on_written = |pos: u64| {
                let done = pos - start;
                filled[i].store(done, Ordering::SeqCst);
                if done - last_saved >= SAVE_EVERY {
                    last_saved = done;
                    save();
                }
            };
            let from = start + filled[i].load(Ordering::SeqCst);
            fetch_range(repo, blob, opts, file, from, end, on_written).await?;
            save();
            let _ = tx.send(i);
            Ok::<(), Error>(())
        }
    }))
    .buffer_unordered(opts.concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    drop(tx);
    let first_error = results.into_iter().find_map(Result::err);
    let digest = hasher
        .await
        .map_err(|e| Error::Unsupported(format!("hasher thread failed: {e}")))?;
    if let Some(e) = first_error {
        return Err(e);
    }
    let partial = partial
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .ok_or_else(|| Error::Unsupported("partial download lost".into()))?;
    let actual = digest.ok_or_else(|| Error::Unsupported("hashing the download failed".into()))?;
    if actual != blob.digest {
        partial.discard()?;
        return Err(mismatch(blob, actual));
    }
    partial.commit(&blob.digest)?;
    Ok(())
}

/// Fetches bytes `start..end` of the blob into `file` at their offsets, retrying from where a
/// broken stream stopped; `on_written` hears each new end position.
async fn fetch_range(
    repo: &Repository,
    blob: &BlobRef,
    opts: &TransferOptions,
    file: &std::fs::File,
    start: u64,
    end: u64,
    mut on_written: impl FnMut(u64),
) -> Result<()> {
    let mut pos = start;
    let mut failures = 0u32;
    while pos < end {
        let _permit = opts.connections.acquire().await;
        let stream = repo.get_blob(&blob.digest, Some(pos..end)).await?;
        // A server that ignores Range sends the whole blob from 0: skip to our position.
        let mut skip = pos - stream.offset.min(pos);
        let mut body = stream.response.bytes_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            let mut chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            };
            if skip > 0 {
                let k = skip.min(chunk.len() as u64) as usize;
                let _ = chunk.split_to(k);
                skip -= k as u64;
            }
            let room = (end - pos) as usize;
            if chunk.len() > room {
                chunk.truncate(room);
            }
            if chunk.is_empty() {
                if pos >= end {
                    break;
                }
                continue;
            }
            // Page-cache writes: short enough to do on the runtime thread.
            file.write_all_at(&chunk, pos)
                .map_err(io("writing partial data"))?;
            pos += chunk.len() as u64;
            on_written(pos);
            (opts.progress)(Event::Bytes {
                digest: blob.digest.clone(),
                bytes: chunk.len() as u64,
            });
            if pos >= end {
                break;
            }
        }
        if pos < end {
            failures += 1;
            let reason = broke.map_or_else(|| "stream ended early".to_owned(), |e| e.to_string());
            if failures >= repo.client().options().retry.attempts {
                return Err(modelpack_registry::Error::Protocol(format!(
                    "blob {}: bytes {pos}..{end} failed: {reason}",
                    blob.digest
                ))
                .into());
            }
            tracing::debug!(pos, end, %reason, "range broke; resuming");
        }
    }
    Ok(())
}
