//! One layer blob read lazily: aligned chunks (2 MiB in our index) fetched by Range, verified against the
//! chunk-digest index, cached on disk, shared by concurrent readers; or, without an index, the
//! whole blob fetched and verified once before any byte is served. What is cached of a blob
//! lives in its [`ChunkState`], shared through the cache folder's [`CacheBudget`] (which may
//! evict chunks no read is serving: they are fetched again on demand).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use modelpack_registry::Repository;
use modelpack_spec::Digest;
use modelpack_store::Store;
use modelpack_transfer::{BlobRef, TransferOptions};
use sha2::{Digest as _, Sha256};

use crate::chunkbuf::ChunkBuf;

use tokio::sync::OnceCell;

use crate::background::Background;
use crate::cache::{CacheBudget, ChunkState};
use crate::error::Error;
use crate::{Counters, Verify};

/// Drops the pages a blob's reads left in the page cache (the mount's hook), once the reads
/// still replying (counted in `serving`) have replied.
async fn drop_served_pages(serving: &AtomicU64, hook: Arc<std::sync::OnceLock<PoisonHook>>) {
    while serving.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Off the async workers: the kernel may wait for a read one of them serves.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(hook) = hook.get() {
            hook();
        }
    })
    .await;
}

/// Verified chunks of one fetch waiting to be written, at most: the fetch goes on receiving
/// while the disk catches up (with 4, a cold 1 GiB read took a quarter longer, waiting for it).
const WRITES_AHEAD: usize = 16;

/// Chunk bytes of the process waiting to be written, at most, in KiB: past it, fetches wait for
/// the disk (the network waits with them).
const WRITE_BUDGET_KIB: usize = 24 << 10;

/// The permits of [`WRITE_BUDGET_KIB`].
static WRITE_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WRITE_BUDGET_KIB);

/// The permits a chunk of `len` bytes waiting to be written takes (a chunk larger than the whole
/// budget takes all of it).
fn write_permits(len: usize) -> u32 {
    len.div_ceil(1024).clamp(1, WRITE_BUDGET_KIB) as u32
}

/// How a chunk that failed verification is reported (and recognised for a retry elsewhere).
const MISMATCH: &str = "digest mismatch";

/// True for the error of a chunk that failed verification (see [`MISMATCH`]).
fn is_mismatch(e: &Error) -> bool {
    matches!(e, Error::Read(m) if m.ends_with(MISMATCH))
}

/// A blob served lazily.
pub(crate) struct LazyBlob {
    pub digest: Digest,
    pub size: u64,
    ctx: Arc<BlobContext>,
    /// What is cached of it (shared with every other blob of this digest in the process).
    state: Arc<ChunkState>,
    chunks: Option<Vec<Digest>>,
    /// The chunk digests come from an unpinned referrer: verify the whole blob once complete.
    check_whole: bool,
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
    /// The readahead stream of a steady sequential reader.
    stream: StreamAhead,
    pub fetched: AtomicU64,
}

/// One long ranged GET that serves a steady sequential reader instead of one GET per run of
/// readahead: each ranged GET costs the registry a request's work (3-4 ms of CPU each on this
/// machine's loopback registry, 32 of them for a cold 1 GiB read in runs). The stream holds the
/// claims of the chunks up to [`crate::readahead::STREAM_AHEAD`] past its reader (so the
/// reader's own reads wait for it), grown by each read, and receives only what it holds.
struct StreamAhead {
    /// The stream's claims; the stream waits on it for them to grow.
    claims: tokio::sync::watch::Sender<Claims>,
    /// The stream wrote and released the chunks before this one.
    done: AtomicU64,
    /// How fast it receives, in bytes per second of not waiting for its reader (0 until it has
    /// [`RATE_AFTER_CHUNKS`] chunks).
    rate: AtomicU64,
}

/// What a blob's stream holds.
#[derive(Debug, Clone, Copy, Default)]
struct Claims {
    /// A stream is running.
    running: bool,
    /// It claimed the chunks from where it started up to this one.
    next: u64,
    /// Its claims reached a chunk that is here or fetched by another: it ends there.
    blocked: bool,
}

/// A stream waits this long for its reader to move on before it ends (and its connection
/// with it).
const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// A stream receiving at least this fast (bytes per second) serves its reader alone; a slower
/// one gets runs of readahead beside it, so a slow or distant link gets a second connection.
/// Well under what one loopback or LAN connection does even on a busy machine (a stream of the
/// debug build measured 230-940 MiB/s here while other tests ran).
const FAST_STREAM: u64 = 64 << 20;

/// A stream's rate is measured once it has received this many chunks.
const RATE_AFTER_CHUNKS: u64 = 8;

/// Ends a blob's stream when dropped (also when the mount cancels it): the chunks it claimed but
/// did not bring are released, so their readers fetch them.
struct StreamEnds(Arc<LazyBlob>);

impl Drop for StreamEnds {
    fn drop(&mut self) {
        let blob = &self.0;
        let done = blob.stream.done.load(Ordering::SeqCst);
        blob.stream.claims.send_modify(|c| {
            for i in done..c.next {
                blob.release(i);
            }
            *c = Claims::default();
        });
    }
}

/// What every lazy blob of one mount shares: where bytes come from and go, how they are checked,
/// the mount's counters and its background tasks.
pub(crate) struct BlobContext {
    /// The repository blobs are fetched from.
    pub repo: Repository,
    /// The store whole blobs are fetched into (and served from when present).
    pub store: Store,
    /// The cache folder's accountant: where chunk caches and their maps live, and what may be
    /// evicted.
    pub cache: Arc<CacheBudget>,
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
        // Chunks verified by an earlier mount stay valid (the map only ever records verified
        // ones); chunks served unverified live in a cache of their own that nothing trusts.
        let index = chunks.as_ref().map(|c| {
            let mut all = Vec::with_capacity(c.len() * 72);
            for d in c {
                all.extend_from_slice(d.as_str().as_bytes());
            }
            Digest::sha256_of(&all)
        });
        let state = ctx
            .cache
            .state(&digest, size, ctx.chunk_size, index.as_ref());
        LazyBlob {
            state,
            digest,
            size,
            chunks,
            check_whole,
            whole: OnceCell::new(),
            background: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            poisoned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            on_poison: Arc::new(std::sync::OnceLock::new()),
            serving: Arc::new(AtomicU64::new(0)),
            stream: StreamAhead {
                claims: tokio::sync::watch::Sender::new(Claims::default()),
                done: AtomicU64::new(0),
                rate: AtomicU64::new(0),
            },
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
        let present = self.state.present_count();
        let n = self.size.div_ceil(self.ctx.chunk_size).max(1);
        present as f64 / n as f64
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
                // Not evicted between being made present and being read.
                let _pin = self.state.pin_reads(first, last);
                let mut hit = true;
                for i in first..=last {
                    hit &= self.ensure_chunk(i, true).await?;
                }
                if hit {
                    self.ctx.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                self.ctx.cache.touch(&self.state, first, last);
                // Served from the bytes just fetched while every chunk it touches is in memory;
                // else from the data file, once every chunk is written there.
                if let Some(bytes) = self.state.recent(offset, end) {
                    return Ok(bytes);
                }
                for i in first..=last {
                    self.ensure_chunk(i, false).await?;
                }
                let file = self.state.file()?;
                let mut buf = vec![0u8; (end - offset) as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| Error::Read(format!("cache read: {e}")))?;
                // The kernel keeps what it is served; the data file's copy goes.
                self.state.drop_pages(offset, end);
                Ok(Bytes::from(buf))
            }
            (None, Verify::Full) => {
                self.fetch_whole().await?;
                pread(
                    &self.ctx.store.blob_path(&self.digest),
                    offset,
                    end - offset,
                )
            }
        }
    }

    /// `Verify::Full` without a chunk index: fetches the whole blob into the store once,
    /// verified by the transfer engine (reads then come from there).
    async fn fetch_whole(&self) -> Result<(), Error> {
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
            .await
            .copied()
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
        let state = self.state.clone();
        self.ctx.tasks.spawn(async move {
            match modelpack_transfer::fetch_blob(&repo, &store, &blob, &transfer).await {
                Ok(_) => {
                    // The check fetched the blob on its own (possibly from another host than the
                    // reads, after a mirror served wrong bytes): the bytes already served must
                    // be those bytes, or their pages are dropped (reads now come from the
                    // verified copy).
                    let verified = store.blob_path(&blob.digest);
                    let differs =
                        tokio::task::spawn_blocking(move || state.differs_from(&verified))
                            .await
                            .unwrap_or(true);
                    if differs {
                        drop_served_pages(&serving, on_poison).await;
                        counters.verify_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(blob = %blob.digest, "bytes served before the background check differ from the verified blob; their pages were dropped and reads now come from the verified copy");
                    } else {
                        tracing::debug!(blob = %blob.digest, "verified whole in the background");
                    }
                }
                Err(e) if e.is_digest_mismatch() => {
                    poisoned.store(true, Ordering::SeqCst);
                    drop_served_pages(&serving, on_poison).await;
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
        self.state
            .present
            .lock()
            .map(|p| p[i as usize])
            .unwrap_or(false)
    }

    /// Chunk `i` is present (`in_memory`: or verified and still in memory).
    fn available(&self, i: u64, in_memory: bool) -> bool {
        self.is_present(i) || (in_memory && self.state.has_recent(i))
    }

    /// Makes chunk `i` present (`in_memory`: or fetched, verified and still in memory, possibly
    /// not written yet); true when it already was. Readers of a chunk another task is fetching
    /// wait for that fetch instead of starting their own.
    pub(crate) async fn ensure_chunk(&self, i: u64, in_memory: bool) -> Result<bool, Error> {
        let mut waited = false;
        loop {
            if self.available(i, in_memory) {
                return Ok(!waited);
            }
            let waiting = {
                let mut inflight = self
                    .state
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
            // Checked again once registered: a wake (the chunk in memory) or a release between
            // the first look and now is not missed.
            if !self.available(i, in_memory)
                && self
                    .state
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
        let inflight = self.state.inflight.lock().ok()?;
        let present = self.state.present.lock().ok()?;
        (from..to).find(|&i| !present[i as usize] && !inflight.contains_key(&i))
    }

    /// Starts fetching up to `count` chunks from `first` that are neither present nor being
    /// fetched, as one ranged GET per contiguous run (readahead).
    pub(crate) async fn prefetch(&self, first: u64, count: u64) {
        // A blob read only once fetched whole: prefetching it is fetching it whole (chunks
        // fetched apart would be fetched twice, and could not be verified on their own).
        if self.reads_whole_blob() {
            if let Err(e) = self.fetch_whole().await {
                tracing::debug!(blob = %self.digest, error = %e, "prefetch of the whole blob failed");
            }
            return;
        }
        let last = (first + count).min(self.chunk_count());
        let mut i = first;
        while i < last {
            let claimed = {
                let Ok(mut inflight) = self.state.inflight.lock() else {
                    return;
                };
                self.claim(&mut inflight, i, last)
            };
            if claimed == 0 {
                i += 1;
                continue;
            }
            let _ = self.fetch_run(i, claimed).await;
            i += claimed;
        }
    }

    /// Claims chunks `from..to` for one fetch (held `inflight`, locked before `present` as
    /// everywhere), up to the first that is here or being fetched; returns how many it claimed.
    fn claim(
        &self,
        inflight: &mut std::collections::HashMap<u64, Arc<tokio::sync::Notify>>,
        from: u64,
        to: u64,
    ) -> u64 {
        let mut i = from;
        while i < to && !self.is_present(i) && !inflight.contains_key(&i) {
            inflight.insert(i, Arc::new(tokio::sync::Notify::new()));
            i += 1;
        }
        i - from
    }

    /// Serves a steady sequential reader from one stream (see [`StreamAhead`]): starts it at
    /// the first chunk from `from` that is neither here nor being fetched, or grows its claims
    /// up to chunk `until`. True when the stream is fast enough that no runs of readahead are
    /// needed beside it (a new stream counts as fast until its rate is measured).
    pub(crate) fn stream_ahead(self: &Arc<Self>, from: u64, until: u64) -> bool {
        let until = until.min(self.chunk_count());
        let mut started = None;
        self.stream.claims.send_if_modified(|c| {
            if !c.running {
                let Some(first) = self.first_uncovered(from, self.chunk_count()) else {
                    return false;
                };
                *c = Claims {
                    running: true,
                    next: first,
                    blocked: false,
                };
                started = Some(first);
            }
            let (before, was_blocked) = (c.next, c.blocked);
            if !c.blocked
                && c.next < until
                && let Ok(mut inflight) = self.state.inflight.lock()
            {
                c.next += self.claim(&mut inflight, c.next, until);
                c.blocked = c.next < until;
            }
            // A stream waiting for claims learns that they grew, or that they end here.
            started.is_some() || c.next != before || c.blocked != was_blocked
        });
        if let Some(first) = started {
            tracing::debug!(blob = %self.digest, first, until, "readahead stream starts");
            self.stream.done.store(first, Ordering::SeqCst);
            self.stream.rate.store(0, Ordering::SeqCst);
            let ends = StreamEnds(self.clone());
            self.tasks().spawn(async move {
                ends.0.run_stream(first).await;
                drop(ends);
            });
            return true;
        }
        let rate = self.stream.rate.load(Ordering::SeqCst);
        rate == 0 || rate >= FAST_STREAM
    }

    /// A stream from chunk `first` towards the end of the blob, receiving the chunks it holds.
    /// It ends where its claims were blocked, when its reader has not moved on for
    /// [`STREAM_IDLE`], or on an error (its [`StreamEnds`] releases what it did not bring).
    async fn run_stream(&self, first: u64) {
        let claims = self.stream.claims.subscribe();
        let result = self
            .fetch_chunks(first, self.chunk_count(), Some(claims))
            .await;
        let (done, rate) = (
            self.stream.done.load(Ordering::SeqCst),
            self.stream.rate.load(Ordering::SeqCst) >> 20,
        );
        match result {
            Ok(()) => {
                tracing::debug!(blob = %self.digest, first, done, rate_mib_s = rate, "readahead stream ended");
            }
            Err(e) => {
                // Wrong bytes from a registry mirror: it is not asked for this blob again.
                if is_mismatch(&e) {
                    self.ctx.repo.distrust(&self.digest);
                }
                tracing::debug!(blob = %self.digest, first, done, rate_mib_s = rate, error = %e, "readahead stream failed");
            }
        }
    }

    /// A stream's turn at chunk `i`: true once it holds the claim (its reader's reads grow the
    /// claims), false when its claims end before `i` or its reader has not moved on for
    /// [`STREAM_IDLE`].
    async fn stream_turn(i: u64, claims: &mut tokio::sync::watch::Receiver<Claims>) -> bool {
        tokio::time::timeout(STREAM_IDLE, claims.wait_for(|c| c.next > i || c.blocked))
            .await
            .is_ok_and(|r| r.is_ok_and(|c| c.next > i))
    }

    /// Fetches chunks `first..first+count` (already claimed in `inflight`) in one ranged GET,
    /// verifying and caching each chunk as it completes, then releases and wakes their waiters.
    async fn fetch_run(&self, first: u64, count: u64) -> Result<(), Error> {
        let mut result = self.fetch_run_inner(first, count).await;
        // Wrong bytes from a registry mirror: that mirror is not asked for this blob again, and
        // the rest of the run comes once more from the next host (the upstream last).
        if result.as_ref().is_err_and(is_mismatch)
            && self.ctx.repo.distrust(&self.digest)
            && let Some(retry) = (first..first + count).find(|&i| !self.is_present(i))
        {
            tracing::warn!(blob = %self.digest, chunk = retry, "a mirror served wrong bytes; fetching again from the next host");
            result = self.fetch_run_inner(retry, first + count - retry).await;
        }
        // Chunks a failed run did not bring: their readers wake, find them missing and fetch
        // them themselves.
        (first..first + count).for_each(|i| self.release(i));
        result
    }

    /// Ends the claim on chunk `i` and wakes whoever waits for it.
    fn release(&self, i: u64) {
        if let Ok(mut inflight) = self.state.inflight.lock()
            && let Some(n) = inflight.remove(&i)
        {
            n.notify_waiters();
        }
    }

    async fn fetch_run_inner(&self, first: u64, count: u64) -> Result<(), Error> {
        self.fetch_chunks(first, first + count, None).await
    }

    /// Fetches chunks `first..last` in one ranged GET, verifying and caching each as it
    /// completes and releasing it once written. They are claimed beforehand, or with `paced`
    /// one by one as the stream reaches them; a stream that may not take a chunk ends there,
    /// without an error.
    async fn fetch_chunks(
        &self,
        first: u64,
        last: u64,
        mut paced: Option<tokio::sync::watch::Receiver<Claims>>,
    ) -> Result<(), Error> {
        self.state.file()?;
        let start = first * self.ctx.chunk_size;
        let end = (last * self.ctx.chunk_size).min(self.size);
        let started = std::time::Instant::now();
        let streams = paced.is_some();
        let mut body = self
            .ctx
            .repo
            .blob_stream_sized(&self.digest, self.size, Some(start..end))
            .await
            .map_err(|e| Error::Read(e.to_string()))?;
        // Verified chunks go to the writer; the next ones arrive while they are written.
        type Received = (u64, Bytes, tokio::sync::SemaphorePermit<'static>);
        let (to_verify, mut to_check) = tokio::sync::mpsc::channel::<Received>(WRITES_AHEAD);
        let (to_writer, mut to_write) = tokio::sync::mpsc::channel::<Received>(WRITES_AHEAD);
        let receive = async move {
            let mut chunk_index = first;
            let mut buf = ChunkBuf::new(self.ctx.chunk_size as usize);
            let mut pos = start;
            // Time a stream spent waiting for its reader, not receiving.
            let mut waited = std::time::Duration::ZERO;
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
                    if buf.len() == 0
                        && let Some(claims) = paced.as_mut()
                    {
                        let turn = std::time::Instant::now();
                        let taken = Self::stream_turn(chunk_index, claims).await;
                        waited += turn.elapsed();
                        if !taken {
                            self.ctx
                                .counters
                                .record_fetch(started.elapsed().saturating_sub(waited));
                            return Ok(());
                        }
                    }
                    let chunk_end = ((chunk_index + 1) * self.ctx.chunk_size).min(self.size);
                    let want =
                        (chunk_end - pos) as usize - buf.len().min((chunk_end - pos) as usize);
                    let take = want.min(piece.len()).min((end - pos) as usize - buf.len());
                    buf.extend(&piece[..take]);
                    piece = &piece[take..];
                    let chunk_start = chunk_index * self.ctx.chunk_size;
                    if chunk_start + buf.len() as u64 == chunk_end {
                        let full = std::mem::replace(
                            &mut buf,
                            ChunkBuf::new(self.ctx.chunk_size as usize),
                        )
                        .freeze();
                        let permit = WRITE_BUDGET
                            .acquire_many(write_permits(full.len()))
                            .await
                            .map_err(|e| Error::Read(format!("cache write: {e}")))?;
                        if to_verify.send((chunk_index, full, permit)).await.is_err() {
                            // Verification or the writer stopped on an error; it says which.
                            return Ok(());
                        }
                        chunk_index += 1;
                        pos = chunk_end;
                        // Judged once the request's start no longer weighs on it.
                        if streams && pos - start >= RATE_AFTER_CHUNKS * self.ctx.chunk_size {
                            let busy = (started.elapsed().saturating_sub(waited))
                                .as_secs_f64()
                                .max(1e-6);
                            let rate = (pos - start) as f64 / busy;
                            self.stream.rate.store(rate as u64, Ordering::SeqCst);
                        }
                    }
                }
            }
            self.ctx
                .counters
                .record_fetch(started.elapsed().saturating_sub(waited));
            if pos < end {
                return Err(Error::Read(format!(
                    "blob {}: range {start}..{end} ended early at {pos}",
                    self.digest
                )));
            }
            Ok(())
        };
        // Chunks are hashed on a blocking thread while the next ones arrive, in order.
        let verify = async move {
            while let Some((i, full, permit)) = to_check.recv().await {
                let actual = match &self.chunks {
                    Some(_) => {
                        let bytes = full.clone();
                        let digest = tokio::task::spawn_blocking(move || {
                            Digest::from_sha256(Sha256::digest(&bytes).into())
                        })
                        .await
                        .map_err(|e| Error::Read(format!("chunk check: {e}")))?;
                        Some(digest)
                    }
                    None => None,
                };
                self.verify_chunk(i, full.len(), actual)?;
                // Its readers go on now, with the bytes in memory, while they are written; not
                // when the whole run is in.
                self.state.remember(i, full.clone());
                self.wake(i);
                if to_writer.send((i, full, permit)).await.is_err() {
                    // The writer stopped on an error; it says which.
                    break;
                }
            }
            Ok::<(), Error>(())
        };
        let write = async {
            while let Some((i, bytes, permit)) = to_write.recv().await {
                self.store_chunk(i, bytes).await?;
                drop(permit);
                // Readers that need it on disk go on now.
                self.release(i);
                if streams {
                    self.stream.done.store(i + 1, Ordering::SeqCst);
                }
            }
            Ok::<(), Error>(())
        };
        let (received, verified, wrote) = tokio::join!(receive, verify, write);
        wrote.and(verified).and(received)
    }

    /// Wakes the readers waiting for chunk `i` without ending the fetch's claim on it.
    fn wake(&self, i: u64) {
        if let Ok(inflight) = self.state.inflight.lock()
            && let Some(n) = inflight.get(&i)
        {
            n.notify_waiters();
        }
    }

    /// Checks fetched chunk `i` of `len` bytes, whose digest is `actual`, against its digest in
    /// the chunk index (when there is one).
    fn verify_chunk(&self, i: u64, len: usize, actual: Option<Digest>) -> Result<(), Error> {
        self.ctx
            .counters
            .fetched_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.fetched.fetch_add(len as u64, Ordering::Relaxed);
        if let (Some(chunks), Some(actual)) = (&self.chunks, actual) {
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
                    "blob {} chunk {i}: {MISMATCH}",
                    self.digest
                )));
            }
        }
        Ok(())
    }

    /// Writes one verified chunk to the cache and records it as present.
    async fn store_chunk(&self, i: u64, buf: Bytes) -> Result<(), Error> {
        let len = buf.len() as u64;
        // Room first (a capped cache evicts the least recently used chunks no read needs).
        let reservation = self.ctx.cache.reserve(len);
        let file = self.state.file()?;
        // A direct write waits for the disk: off the runtime's workers.
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.write_chunk(i, &buf))
            .await
            .map_err(|e| Error::Read(format!("cache write: {e}")))??;
        let (refetch, save) = self.state.mark_present(i)?;
        reservation.commit(&self.state, i);
        if refetch {
            self.ctx.cache.note_refetch();
            self.ctx.counters.refetches.fetch_add(1, Ordering::Relaxed);
        }
        // Pinned while it is hashed: nothing of it is evicted meanwhile.
        if self.check_whole && self.state.pin_if_complete() {
            let matches = tokio::task::block_in_place(|| self.whole_matches(file));
            self.state.unpin();
            if !matches {
                return Err(Error::Read(format!(
                    "blob {}: chunks matched the referrer index but the whole blob does not match its digest",
                    self.digest
                )));
            }
        }
        // Record verified chunks only: a later mount trusts this map.
        // A map that fails to save claims fewer chunks than are here: safe, they are fetched
        // again.
        if save && let Err(e) = self.state.write_map(false) {
            tracing::debug!(blob = %self.digest, error = %e, "cannot save the chunk map");
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
        self.state.forget_all();
        self.ctx.cache.forget(&self.state);
        false
    }

    /// The local file holding the whole blob, when every byte of it is here and verified: the
    /// store's copy, or the chunk cache once every chunk is (with a chunk index; a referrer
    /// index's blob was also checked whole as its last chunk arrived). The bool is true when the
    /// cache file was pinned for it (nothing evicted until [`LazyBlob::unpin`]): the kernel reads
    /// a passthrough file directly, so no chunk of it may go while it is open.
    pub(crate) fn pin_complete_file(&self) -> Option<(PathBuf, bool)> {
        if self.ctx.store.has_blob(&self.digest) {
            return Some((self.ctx.store.blob_path(&self.digest), false));
        }
        (self.chunks.is_some() && self.state.pin_if_complete())
            .then(|| (self.state.data_path.clone(), true))
    }

    /// Ends a pin of [`LazyBlob::pin_complete_file`].
    pub(crate) fn unpin(&self) {
        self.state.unpin();
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

    /// True when reads wait for the whole blob, fetched and verified at once (`Verify::Full`
    /// and no chunk index): readahead would fetch its bytes a second time.
    pub(crate) fn reads_whole_blob(&self) -> bool {
        self.chunks.is_none() && self.ctx.verify == Verify::Full
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
        fixture_capped(size, script, None)
    }

    fn fixture_capped(size: usize, script: Vec<Answer>, cap: Option<u64>) -> Fixture {
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
            cache: CacheBudget::open(&dir.path().join("cache"), cap).expect("cache"),
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
    async fn chunks_fetched_ahead_are_served_from_memory_once_and_are_on_disk() {
        let f = fixture(8 << 20, vec![]);
        // Readahead's shape: one run of every chunk, one request.
        f.blob.prefetch(0, 8).await;
        assert_eq!(f.server.requests(), 1);
        let on_disk = std::fs::read(&f.blob.state.data_path).expect("data file");
        assert!(
            on_disk == f.data[..],
            "the data file holds the verified bytes"
        );
        // A read across two chunks comes from the data file; whole chunks from memory, which
        // they leave once served.
        let across = f.blob.read(CHUNK * 2 - 10, 20).await.expect("across");
        assert_eq!(
            &across[..],
            &f.data[(CHUNK * 2 - 10) as usize..(CHUNK * 2 + 10) as usize]
        );
        for i in 0..8u64 {
            let got = f.blob.read(i * CHUNK, CHUNK).await.expect("read");
            let at = (i * CHUNK) as usize;
            assert!(got[..] == f.data[at..at + CHUNK as usize], "chunk {i}");
            assert!(!f.blob.state.has_recent(i), "chunk {i} stayed in memory");
        }
        assert_eq!(f.server.requests(), 1, "nothing was fetched again");
    }

    /// Reads the blob in order, one chunk at a time, as the mount does for a reader at the full
    /// window: each read grows the stream's claims to `ahead` chunks past it.
    async fn read_in_order(f: &Fixture, ahead: u64) {
        let count = f.blob.chunk_count();
        for i in 0..count {
            f.blob.stream_ahead(i, i + ahead);
            let got = f.blob.read(i * CHUNK, CHUNK).await.expect("read");
            let at = (i * CHUNK) as usize;
            assert!(got[..] == f.data[at..at + CHUNK as usize], "chunk {i}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sequential_reader_is_served_by_one_stream_that_stays_its_window_ahead() {
        let f = fixture(48 << 20, vec![]);
        f.blob.stream_ahead(0, 4);
        // The stream takes what it holds, and no more until the reader moves on.
        let fetched = || f.counters.fetched_bytes.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while fetched() < 4 * CHUNK && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(fetched(), 4 * CHUNK);
        read_in_order(&f, 4).await;
        assert_eq!(f.server.requests(), 1, "one ranged GET for the whole read");
        assert_eq!(f.counters.fetched_bytes.load(Ordering::Relaxed), 48 * CHUNK);
        // Reads are served from memory while their chunks are written: wait for the writes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while f.blob.state.present_count() < 48 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read(&f.blob.state.data_path).expect("data file"),
            f.data[..],
            "every chunk is cached"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ends_at_a_chunk_already_here_and_nothing_is_fetched_twice() {
        let f = fixture(32 << 20, vec![]);
        f.blob.prefetch(20, 1).await;
        read_in_order(&f, 4).await;
        // Chunk 20 once (before), every other chunk once: the stream stopped short of it.
        assert_eq!(f.counters.fetched_bytes.load(Ordering::Relaxed), 32 * CHUNK);
        assert!(f.server.requests() >= 3, "{}", f.server.requests());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_cut_short_is_resumed_and_a_corrupt_chunk_ends_it_unserved() {
        let f = fixture(16 << 20, vec![Answer::CutAfter(3 << 20), Answer::Honest]);
        read_in_order(&f, 4).await;
        assert_eq!(f.counters.verify_failures.load(Ordering::Relaxed), 0);
        let g = fixture(
            16 << 20,
            vec![Answer::FlipAt((5 << 20) + 9), Answer::Honest],
        );
        g.blob.stream_ahead(0, 16);
        // The chunk that failed is not served: its reader fetches it again.
        let got = g.blob.read(5 * CHUNK, CHUNK).await.expect("read");
        assert!(got[..] == g.data[5 << 20..6 << 20]);
        assert_eq!(g.counters.verify_failures.load(Ordering::Relaxed), 1);
        for i in 0..16u64 {
            let got = g.blob.read(i * CHUNK, CHUNK).await.expect("read");
            let at = (i * CHUNK) as usize;
            assert!(got[..] == g.data[at..at + CHUNK as usize], "chunk {i}");
        }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_capped_cache_evicts_old_chunks_and_fetches_them_again_with_the_right_bytes() {
        let f = fixture_capped(8 << 20, vec![], Some(3 * CHUNK));
        for pass in 0..2 {
            for i in 0..8u64 {
                let got = f.blob.read(i * CHUNK, CHUNK).await.expect("read");
                let at = (i * CHUNK) as usize;
                assert!(
                    got[..] == f.data[at..at + CHUNK as usize],
                    "pass {pass} chunk {i}"
                );
                assert!(f.blob.ctx.cache.stats().bytes <= 3 * CHUNK);
            }
        }
        let stats = f.blob.ctx.cache.stats();
        // Five evicted in the first pass, all eight in the second.
        assert_eq!(stats.evictions, 13, "{stats:?}");
        assert_eq!(stats.refetches, 8, "{stats:?}");
        assert_eq!(f.counters.refetches.load(Ordering::Relaxed), 8);
        assert_eq!(f.counters.fetched_bytes.load(Ordering::Relaxed), 16 * CHUNK);
        // The map on disk claims none of the evicted chunks (it is saved at each eviction).
        let map = std::fs::read(f.blob.state.data_path.with_extension("chunks")).expect("map");
        assert_eq!(map.len(), 8);
        assert_eq!(map[..5], [0, 0, 0, 0, 0]);
    }
}
