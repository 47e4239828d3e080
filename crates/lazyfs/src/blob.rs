//! One layer blob read lazily: aligned chunks (2 MiB in our index) fetched by Range, verified against the
//! chunk-digest index, cached on disk, shared by concurrent readers; or, without an index, the
//! whole blob fetched and verified once before any byte is served.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use modelpack_registry::Repository;
use modelpack_spec::Digest;
use modelpack_store::Store;
use modelpack_transfer::{BlobRef, TransferOptions};
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

use crate::background::Background;
use crate::error::Error;
use crate::{Counters, Verify};

/// A blob served lazily.
pub(crate) struct LazyBlob {
    pub digest: Digest,
    pub size: u64,
    ctx: Arc<BlobContext>,
    cache_path: PathBuf,
    map_path: PathBuf,
    chunks: Option<Vec<Digest>>,
    /// The chunk digests come from an unpinned referrer: verify the whole blob once complete.
    check_whole: bool,
    present: Mutex<Vec<bool>>,
    inflight: Mutex<HashMap<u64, Arc<tokio::sync::Notify>>>,
    whole: OnceCell<()>,
    /// `Verify::Background`: the whole-blob check is running or done (reset after a transient
    /// failure, so the next read starts it again).
    background: Arc<std::sync::atomic::AtomicBool>,
    /// `Verify::Background`: the whole blob did not match its digest; nothing more is served.
    poisoned: Arc<std::sync::atomic::AtomicBool>,
    /// Called once when `poisoned` is set, before the failure is counted: the mount drops the
    /// blob's files from the page cache.
    on_poison: Arc<std::sync::OnceLock<PoisonHook>>,
    /// Reads of this blob between their start and their reply to the kernel.
    serving: Arc<AtomicU64>,
    cache_file: OnceCell<std::fs::File>,
    pub fetched: AtomicU64,
}

/// What every lazy blob of one mount shares: where bytes come from and go, how they are checked,
/// the mount's counters and its background tasks.
pub(crate) struct BlobContext {
    /// The repository blobs are fetched from.
    pub repo: Repository,
    /// The store whole blobs are fetched into (and served from when present).
    pub store: Store,
    /// Where chunk caches and their maps live.
    pub cache_dir: PathBuf,
    /// The chunk size of the index (or the default when there is none).
    pub chunk_size: u64,
    /// The verification policy for blobs without chunk digests.
    pub verify: Verify,
    /// The mount's counters.
    pub counters: Arc<Counters>,
    /// Options for whole-blob fetches.
    pub transfer: TransferOptions,
    /// The mount's background tasks (cancelled at unmount).
    pub tasks: Background,
}

/// A read in progress; see [`LazyBlob::serving`].
pub(crate) struct ServingGuard(Arc<AtomicU64>);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a mount does when a blob fails background verification.
pub(crate) type PoisonHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for LazyBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyBlob")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish()
    }
}

impl LazyBlob {
    /// A blob of `size` bytes; `chunks` are its chunk digests from the index, if any;
    /// `check_whole` asks for a whole-blob check once every chunk is in (chunk digests from an
    /// unpinned referrer).
    pub(crate) fn new(
        digest: Digest,
        size: u64,
        chunks: Option<Vec<Digest>>,
        check_whole: bool,
        ctx: Arc<BlobContext>,
    ) -> LazyBlob {
        let (cache_dir, chunk_size) = (&ctx.cache_dir, ctx.chunk_size);
        let stem = format!("{}-{}", digest.algorithm(), digest.encoded());
        let n = size.div_ceil(chunk_size) as usize;
        let map_path = cache_dir.join(format!("{stem}.chunks"));
        // Chunks verified by an earlier mount stay valid: the map only ever records verified ones.
        let present = match std::fs::read(&map_path) {
            Ok(bytes) if bytes.len() == n && chunks.is_some() => {
                bytes.iter().map(|&b| b == 1).collect()
            }
            _ => vec![false; n],
        };
        LazyBlob {
            cache_path: cache_dir.join(format!("{stem}.data")),
            map_path,
            digest,
            size,
            chunks,
            check_whole,
            present: Mutex::new(present),
            inflight: Mutex::new(HashMap::new()),
            whole: OnceCell::new(),
            background: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            poisoned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            on_poison: Arc::new(std::sync::OnceLock::new()),
            serving: Arc::new(AtomicU64::new(0)),
            cache_file: OnceCell::new(),
            fetched: AtomicU64::new(0),
            ctx,
        }
    }

    /// The mount's background tasks, for work on this blob that nobody waits for.
    pub(crate) fn tasks(&self) -> &Background {
        &self.ctx.tasks
    }

    /// Fraction of the blob available without the network, 0.0 to 1.0.
    pub(crate) fn local_fraction(&self) -> f64 {
        if self.size == 0 || self.ctx.store.has_blob(&self.digest) {
            return 1.0;
        }
        let present = self
            .present
            .lock()
            .map(|p| p.iter().filter(|&&b| b).count())
            .unwrap_or(0);
        let n = self.size.div_ceil(self.ctx.chunk_size).max(1);
        present as f64 / n as f64
    }

    async fn cache_file(&self) -> Result<&std::fs::File, Error> {
        self.cache_file
            .get_or_try_init(|| async {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&self.cache_path)
                    .map_err(|e| {
                        Error::Read(format!("cache file {}: {e}", self.cache_path.display()))
                    })?;
                if file.metadata().map(|m| m.len()).unwrap_or(0) != self.size {
                    file.set_len(self.size)
                        .map_err(|e| Error::Read(e.to_string()))?;
                }
                Ok(file)
            })
            .await
    }

    /// Reads `len` bytes at `offset`, every one of them verified.
    pub(crate) async fn read(&self, offset: u64, len: u64) -> Result<Bytes, Error> {
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        // A blob pulled into the store is complete and verified: serve it with no network.
        if self.ctx.store.has_blob(&self.digest) {
            self.ctx.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return pread(
                &self.ctx.store.blob_path(&self.digest),
                offset,
                end - offset,
            );
        }
        if self.chunks.is_none() && self.ctx.verify == Verify::Background {
            if self.poisoned.load(Ordering::SeqCst) {
                return Err(Error::Read(format!(
                    "blob {} did not match its digest (background verification)",
                    self.digest
                )));
            }
            self.start_background_check();
        }
        match (&self.chunks, self.ctx.verify) {
            (Some(_), _) | (None, Verify::None | Verify::Background) => {
                let first = offset / self.ctx.chunk_size;
                let last = (end - 1) / self.ctx.chunk_size;
                let mut hit = true;
                for i in first..=last {
                    hit &= self.ensure_chunk(i).await?;
                }
                if hit {
                    self.ctx.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                let file = self.cache_file().await?;
                let mut buf = vec![0u8; (end - offset) as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| Error::Read(format!("cache read: {e}")))?;
                Ok(Bytes::from(buf))
            }
            (None, Verify::Full) => {
                self.whole
                    .get_or_try_init(|| async {
                        let blob = BlobRef {
                            digest: self.digest.clone(),
                            size: self.size,
                            media_type: String::new(),
                        };
                        modelpack_transfer::fetch_blob(
                            &self.ctx.repo,
                            &self.ctx.store,
                            &blob,
                            &self.ctx.transfer,
                        )
                        .await
                        .map(drop)
                        .map_err(|e| Error::Read(e.to_string()))
                    })
                    .await?;
                pread(
                    &self.ctx.store.blob_path(&self.digest),
                    offset,
                    end - offset,
                )
            }
        }
    }

    /// `Verify::Background`: fetches the whole blob into the store once, verified by the
    /// transfer engine (reads then come from there); a mismatch poisons the blob.
    fn start_background_check(&self) {
        if self
            .background
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let repo = self.ctx.repo.clone();
        let store = self.ctx.store.clone();
        let transfer = self.ctx.transfer.clone();
        let poisoned = self.poisoned.clone();
        let on_poison = self.on_poison.clone();
        let serving = self.serving.clone();
        let started = self.background.clone();
        let counters = self.ctx.counters.clone();
        let blob = BlobRef {
            digest: self.digest.clone(),
            size: self.size,
            media_type: String::new(),
        };
        self.ctx.tasks.spawn(async move {
            match modelpack_transfer::fetch_blob(&repo, &store, &blob, &transfer).await {
                Ok(_) => tracing::debug!(blob = %blob.digest, "verified whole in the background"),
                Err(e) if e.is_digest_mismatch() => {
                    poisoned.store(true, Ordering::SeqCst);
                    // Reads that passed the check before it failed may still be replying: once
                    // they have, drop the pages they (and earlier reads) left in the page cache.
                    while serving.load(Ordering::SeqCst) > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                    // Off the async workers: the kernel may wait for a read one of them serves.
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some(hook) = on_poison.get() {
                            hook();
                        }
                    })
                    .await;
                    counters.verify_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %blob.digest, error = %e, "background verification failed: the blob is not served any more");
                }
                Err(e) => {
                    tracing::warn!(blob = %blob.digest, error = %e, "background verification interrupted; the next read retries it");
                    started.store(false, Ordering::SeqCst);
                }
            }
        });
    }

    fn is_present(&self, i: u64) -> bool {
        self.present.lock().map(|p| p[i as usize]).unwrap_or(false)
    }

    /// Makes chunk `i` present; true when it already was. Readers of a chunk another task is
    /// fetching wait for that fetch instead of starting their own.
    pub(crate) async fn ensure_chunk(&self, i: u64) -> Result<bool, Error> {
        let mut waited = false;
        loop {
            if self.is_present(i) {
                return Ok(!waited);
            }
            let waiting = {
                let mut inflight = self
                    .inflight
                    .lock()
                    .map_err(|_| Error::Read("lock poisoned".into()))?;
                match inflight.get(&i) {
                    Some(n) => Some(n.clone()),
                    None => {
                        inflight.insert(i, Arc::new(tokio::sync::Notify::new()));
                        None
                    }
                }
            };
            let Some(notify) = waiting else {
                return self.fetch_run(i, 1).await.map(|()| false);
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_present(i)
                && self
                    .inflight
                    .lock()
                    .map(|m| m.contains_key(&i))
                    .unwrap_or(false)
            {
                notified.await;
            }
            waited = true;
        }
    }

    /// The first chunk in `from..to` that is neither here nor being fetched.
    pub(crate) fn first_uncovered(&self, from: u64, to: u64) -> Option<u64> {
        // Same lock order as `prefetch`: inflight, then present.
        let inflight = self.inflight.lock().ok()?;
        let present = self.present.lock().ok()?;
        (from..to).find(|&i| !present[i as usize] && !inflight.contains_key(&i))
    }

    /// Starts fetching up to `count` chunks from `first` that are neither present nor being
    /// fetched, as one ranged GET per contiguous run (readahead).
    pub(crate) async fn prefetch(&self, first: u64, count: u64) {
        let last = (first + count).min(self.chunk_count());
        let mut i = first;
        while i < last {
            let claimed = {
                let Ok(mut inflight) = self.inflight.lock() else {
                    return;
                };
                let mut n = 0;
                while i + n < last && !self.is_present(i + n) && !inflight.contains_key(&(i + n)) {
                    inflight.insert(i + n, Arc::new(tokio::sync::Notify::new()));
                    n += 1;
                }
                n
            };
            if claimed == 0 {
                i += 1;
                continue;
            }
            let _ = self.fetch_run(i, claimed).await;
            i += claimed;
        }
    }

    /// Fetches chunks `first..first+count` (already claimed in `inflight`) in one ranged GET,
    /// verifying and caching each chunk as it completes, then releases and wakes their waiters.
    async fn fetch_run(&self, first: u64, count: u64) -> Result<(), Error> {
        let result = self.fetch_run_inner(first, count).await;
        // Chunks a failed run did not bring: their readers wake, find them missing and fetch
        // them themselves.
        (first..first + count).for_each(|i| self.release(i));
        result
    }

    /// Ends the claim on chunk `i` and wakes whoever waits for it.
    fn release(&self, i: u64) {
        if let Ok(mut inflight) = self.inflight.lock()
            && let Some(n) = inflight.remove(&i)
        {
            n.notify_waiters();
        }
    }

    async fn fetch_run_inner(&self, first: u64, count: u64) -> Result<(), Error> {
        self.cache_file().await?;
        let start = first * self.ctx.chunk_size;
        let end = ((first + count) * self.ctx.chunk_size).min(self.size);
        let started = std::time::Instant::now();
        let mut body = self
            .ctx
            .repo
            .blob_stream(&self.digest, Some(start..end))
            .await
            .map_err(|e| Error::Read(e.to_string()))?;
        let mut chunk_index = first;
        let mut buf = Vec::with_capacity(self.ctx.chunk_size as usize);
        let mut pos = start;
        while pos < end {
            let Some(piece) = body
                .next_chunk()
                .await
                .map_err(|e| Error::Read(e.to_string()))?
            else {
                break;
            };
            let mut piece = &piece[..];
            while !piece.is_empty() && pos < end {
                let chunk_end = ((chunk_index + 1) * self.ctx.chunk_size).min(self.size);
                let want = (chunk_end - pos) as usize - buf.len().min((chunk_end - pos) as usize);
                let take = want.min(piece.len()).min((end - pos) as usize - buf.len());
                buf.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                let chunk_start = chunk_index * self.ctx.chunk_size;
                if chunk_start + buf.len() as u64 == chunk_end {
                    self.store_chunk(chunk_index, &buf)?;
                    // Its readers go on now, not when the whole run is in.
                    self.release(chunk_index);
                    buf.clear();
                    chunk_index += 1;
                    pos = chunk_end;
                }
            }
        }
        self.ctx.counters.record_fetch(started.elapsed());
        if pos < end {
            return Err(Error::Read(format!(
                "blob {}: range {start}..{end} ended early at {pos}",
                self.digest
            )));
        }
        Ok(())
    }

    /// Verifies one fetched chunk and writes it to the cache.
    fn store_chunk(&self, i: u64, buf: &[u8]) -> Result<(), Error> {
        let start = i * self.ctx.chunk_size;
        self.ctx
            .counters
            .fetched_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.fetched.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Some(chunks) = &self.chunks {
            let actual = Digest::from_sha256(Sha256::digest(buf).into());
            let expected = chunks
                .get(i as usize)
                .ok_or_else(|| Error::Read(format!("chunk index has no chunk {i}")))?;
            if &actual != expected {
                self.ctx
                    .counters
                    .verify_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(blob = %self.digest, chunk = i, %expected, %actual, "chunk failed verification; not served, not cached");
                return Err(Error::Read(format!(
                    "blob {} chunk {i}: digest mismatch",
                    self.digest
                )));
            }
        }
        let file = self
            .cache_file
            .get()
            .ok_or_else(|| Error::Read("cache file not open".into()))?;
        file.write_all_at(buf, start)
            .map_err(|e| Error::Read(format!("cache write: {e}")))?;
        let (snapshot, complete) = {
            let mut present = self
                .present
                .lock()
                .map_err(|_| Error::Read("lock poisoned".into()))?;
            present[i as usize] = true;
            let done = present.iter().filter(|&&b| b).count();
            let complete = done == present.len();
            // Saved every 16 chunks and when complete; a crash only costs refetching.
            let snapshot = (self.chunks.is_some() && (done % 16 == 0 || complete))
                .then(|| present.iter().map(|&b| u8::from(b)).collect::<Vec<u8>>());
            (snapshot, complete)
        };
        if complete && self.check_whole && !tokio::task::block_in_place(|| self.whole_matches(file))
        {
            return Err(Error::Read(format!(
                "blob {}: chunks matched the referrer index but the whole blob does not match its digest",
                self.digest
            )));
        }
        // Record verified chunks only: a later mount trusts this map.
        if let Some(snapshot) = snapshot {
            let tmp = self.map_path.with_extension(format!("chunks.{i}.tmp"));
            if std::fs::write(&tmp, &snapshot).is_ok() {
                let _ = std::fs::rename(&tmp, &self.map_path);
            }
        }
        Ok(())
    }

    /// Hashes the complete cached blob; on a mismatch forgets every chunk and logs it.
    fn whole_matches(&self, file: &std::fs::File) -> bool {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < self.size {
            let n = (self.size - pos).min(buf.len() as u64) as usize;
            if file.read_exact_at(&mut buf[..n], pos).is_err() {
                return false;
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        if Digest::from_sha256(hasher.finalize().into()) == self.digest {
            return true;
        }
        self.ctx
            .counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(blob = %self.digest, "whole-blob check failed: the referrer index does not describe this blob; cache dropped");
        if let Ok(mut present) = self.present.lock() {
            present.iter_mut().for_each(|p| *p = false);
        }
        let _ = std::fs::remove_file(&self.map_path);
        false
    }

    /// The local file holding the whole blob, when every byte of it is here and verified: the
    /// store's copy, or the chunk cache once every chunk is (with a chunk index; a referrer
    /// index's blob was also checked whole as its last chunk arrived).
    pub(crate) fn complete_file(&self) -> Option<PathBuf> {
        if self.ctx.store.has_blob(&self.digest) {
            return Some(self.ctx.store.blob_path(&self.digest));
        }
        let complete =
            self.chunks.is_some() && self.present.lock().is_ok_and(|p| p.iter().all(|&b| b));
        complete.then(|| self.cache_path.clone())
    }

    /// True once background verification found the blob does not match its digest: nothing of
    /// it may be served again, not even from the page cache.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// True when reads are served before the whole blob is verified (`Verify::Background` and
    /// no chunk index), so the blob may be poisoned later.
    pub(crate) fn verifies_in_background(&self) -> bool {
        self.chunks.is_none() && self.ctx.verify == Verify::Background
    }

    /// Counts a read as in progress until the guard is dropped (after its reply).
    pub(crate) fn serving(&self) -> ServingGuard {
        self.serving.fetch_add(1, Ordering::SeqCst);
        ServingGuard(self.serving.clone())
    }

    /// Sets what to do when the blob is poisoned (once; later calls are ignored).
    pub(crate) fn on_poison(&self, hook: PoisonHook) {
        let _ = self.on_poison.set(hook);
    }

    /// Number of chunks.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.ctx.chunk_size)
    }

    /// Chunk size.
    pub(crate) fn chunk_size(&self) -> u64 {
        self.ctx.chunk_size
    }
}

fn pread(path: &std::path::Path, offset: u64, len: u64) -> Result<Bytes, Error> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::Read(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::Read(format!("{}: {e}", path.display())))?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    //! Chunk fetching, verification and sharing against a loopback server that serves the blob
    //! honestly, corrupts it, or cuts it short (no FUSE, no registry).

    use modelpack_registry::{Client, ClientOptions};
    use modelpack_testkit::blob_server::{Answer, BlobServer};

    use super::*;

    const CHUNK: u64 = 1 << 20;

    struct Fixture {
        data: Arc<Vec<u8>>,
        server: BlobServer,
        blob: Arc<LazyBlob>,
        counters: Arc<Counters>,
        _dir: tempfile::TempDir,
    }

    fn fixture(size: usize, script: Vec<Answer>) -> Fixture {
        let data = Arc::new(modelpack_testkit::data::pseudo_random(size, 0xb10b));
        let server = BlobServer::start(data.clone(), script);
        let dir = tempfile::tempdir().expect("tempdir");
        let client = Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::new()
        })
        .expect("client");
        let reference = server.reference().parse().expect("reference");
        let counters = Arc::new(Counters::default());
        let ctx = Arc::new(BlobContext {
            repo: Repository::new(&client, &reference),
            store: Store::open(&dir.path().join("store")).expect("store"),
            cache_dir: dir.path().to_owned(),
            chunk_size: CHUNK,
            verify: Verify::Full,
            counters: counters.clone(),
            transfer: TransferOptions::new(2),
            tasks: Background::default(),
        });
        let chunks = data.chunks(CHUNK as usize).map(Digest::sha256_of).collect();
        let blob = Arc::new(LazyBlob::new(
            Digest::sha256_of(&data),
            data.len() as u64,
            Some(chunks),
            false,
            ctx,
        ));
        Fixture {
            data,
            server,
            blob,
            counters,
            _dir: dir,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_fetches_only_its_chunks_and_then_serves_them_locally() {
        let f = fixture(8 << 20, vec![]);
        let got = f.blob.read(3 << 20, 100_000).await.expect("read");
        assert_eq!(&got[..], &f.data[3 << 20..(3 << 20) + 100_000]);
        assert_eq!(f.counters.fetched_bytes.load(Ordering::Relaxed), CHUNK);
        let requests = f.server.requests();
        let again = f.blob.read((3 << 20) + 10, 1000).await.expect("read again");
        assert_eq!(&again[..], &f.data[(3 << 20) + 10..(3 << 20) + 1010]);
        assert_eq!(
            f.server.requests(),
            requests,
            "a cached chunk was fetched again"
        );
        // A read across a chunk boundary, up to the last byte.
        let tail = f.blob.read((8 << 20) - 5000, 5000).await.expect("tail");
        assert_eq!(&tail[..], &f.data[(8 << 20) - 5000..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_chunk_is_refused_not_cached_and_a_clean_retry_succeeds() {
        let f = fixture(
            4 << 20,
            vec![Answer::FlipAt((1 << 20) + 77), Answer::Honest],
        );
        let err = f
            .blob
            .read(1 << 20, 4096)
            .await
            .expect_err("corrupt bytes were served");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert_eq!(f.counters.verify_failures.load(Ordering::Relaxed), 1);
        let got = f.blob.read(1 << 20, 4096).await.expect("retry");
        assert_eq!(&got[..], &f.data[1 << 20..(1 << 20) + 4096]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_body_is_resumed_within_the_read() {
        let f = fixture(4 << 20, vec![Answer::CutAfter(300_000), Answer::Honest]);
        let got = f.blob.read(0, 2 << 20).await.expect("read");
        assert!(got[..] == f.data[..2 << 20]);
        assert_eq!(f.counters.verify_failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_one_chunk_cause_one_fetch() {
        let f = fixture(2 << 20, vec![]);
        let readers: Vec<_> = (0..8u64)
            .map(|i| {
                let blob = f.blob.clone();
                tokio::spawn(async move { blob.read(i * 1000, 1000).await })
            })
            .collect();
        for (i, r) in readers.into_iter().enumerate() {
            let got = r.await.expect("join").expect("read");
            assert_eq!(&got[..], &f.data[i * 1000..(i + 1) * 1000]);
        }
        assert_eq!(f.server.requests(), 1, "one chunk, several fetches");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_that_is_gone_fails_the_read_without_serving_anything() {
        let f = fixture(2 << 20, vec![]);
        // Nothing listens there any more: every attempt is refused.
        drop(f.server);
        let err = tokio::time::timeout(std::time::Duration::from_secs(150), f.blob.read(0, 10))
            .await
            .expect("the read gives up in time");
        assert!(err.is_err());
        assert_eq!(f.counters.fetched_bytes.load(Ordering::Relaxed), 0);
    }
}
