//! The chunk cache of one folder as one budget, shared by every mount of a process that uses the
//! folder (the snapshotter has one mount per layer and one folder; `modelpack mount` has one).
//!
//! Every chunk cached in the folder is accounted here; with a cap, chunks that no read is
//! serving, no fetch holds and no kernel-passthrough open points at are evicted least recently
//! used first when a new chunk would pass the cap: the chunk is cleared from its map (in memory,
//! then on disk), then its bytes are punched out of the sparse cache file. Evicted chunks are
//! fetched (and verified) again on demand. Every blob of one digest shares one [`ChunkState`], so
//! two mounts of one layer never disagree about what is on disk.
//!
//! A fetched chunk is verified, kept in memory for the reads waiting for it (a bounded amount
//! per process, see [`RECENT_LIMIT`]) and written to the data file with direct I/O, so the
//! bytes a reader reads sit once in memory (the mounted file's page cache), not twice; bytes read
//! back from the data file are dropped from its page cache once served.
//!
//! Layout: `<alg>-<hex>.data` (sparse: the verified chunks) with `<alg>-<hex>.chunks` (one byte
//! per chunk, 1 = verified and present; the name carries `-c<size>` for a chunk size other than
//! the default), `<alg>-<hex>.unverified.data` (chunks served unverified, never trusted by a later
//! mount, no map), `trees/` (tar layers unpacked at mount: outside the budget), `.lock` (held
//! shared by unbounded users, exclusively by a capped one: eviction needs the folder to itself).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use modelpack_spec::Digest;
use modelpack_spec::annotations::CHUNK_INDEX_CHUNK_SIZE;
use tokio::sync::Notify;

use crate::error::Error;

/// An entry of the LRU: (state id, chunk index).
type Key = (u64, u64);

/// What trying to evict one entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Gone from disk: its bytes are free.
    Evicted,
    /// In use (a read serving it, a fetch holding it, a passthrough open): kept.
    Pinned,
    /// Not cached any more: the entry is dropped, nothing is counted.
    Absent,
}

/// Least-recently-used bookkeeping of cached chunks (no files): O(entries) memory.
#[derive(Debug, Default)]
pub(crate) struct Lru {
    tick: u64,
    /// Last use -> entry, oldest first.
    order: BTreeMap<u64, Key>,
    /// Entry -> (last use, bytes).
    entries: HashMap<Key, (u64, u64)>,
    bytes: u64,
    /// Bytes of chunks being written (reserved, not yet entries).
    reserved: u64,
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Records `key` of `bytes` as used now (added, or moved to the back).
    pub(crate) fn insert(&mut self, key: Key, bytes: u64) {
        let tick = self.next_tick();
        if let Some((old, old_bytes)) = self.entries.insert(key, (tick, bytes)) {
            self.order.remove(&old);
            self.bytes -= old_bytes;
        }
        self.order.insert(tick, key);
        self.bytes += bytes;
    }

    /// Marks `key` as used now, if it is accounted.
    pub(crate) fn touch(&mut self, key: Key) {
        if !self.entries.contains_key(&key) {
            return;
        }
        let tick = self.next_tick();
        if let Some(entry) = self.entries.get_mut(&key) {
            self.order.remove(&entry.0);
            entry.0 = tick;
            self.order.insert(tick, key);
        }
    }

    /// Forgets `key`; its bytes.
    pub(crate) fn remove(&mut self, key: Key) -> Option<u64> {
        let (tick, bytes) = self.entries.remove(&key)?;
        self.order.remove(&tick);
        self.bytes -= bytes;
        Some(bytes)
    }

    /// Forgets every entry of state `id`; their bytes.
    fn remove_id(&mut self, id: u64) -> u64 {
        let keys: Vec<Key> = self.entries.keys().filter(|k| k.0 == id).copied().collect();
        keys.into_iter().filter_map(|k| self.remove(k)).sum()
    }

    /// Bytes accounted (entries and reservations).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes + self.reserved
    }

    /// Evicts oldest first, skipping pinned entries, until `incoming` more bytes fit under
    /// `max` or nothing more can go; then reserves `incoming`. Returns (entries, bytes) evicted.
    pub(crate) fn make_room(
        &mut self,
        max: u64,
        incoming: u64,
        mut evict: impl FnMut(Key) -> Outcome,
    ) -> (u64, u64) {
        let (mut count, mut freed) = (0, 0);
        let mut from = 0u64;
        while self.bytes() + incoming > max {
            let Some((&tick, &key)) = self.order.range(from..).next() else {
                break;
            };
            from = tick + 1;
            match evict(key) {
                Outcome::Evicted => {
                    if let Some(bytes) = self.remove(key) {
                        count += 1;
                        freed += bytes;
                    }
                }
                Outcome::Absent => {
                    self.remove(key);
                }
                Outcome::Pinned => {}
            }
        }
        self.reserved += incoming;
        (count, freed)
    }

    /// Turns `bytes` reserved into the entry `key`.
    pub(crate) fn commit(&mut self, key: Key, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
        self.insert(key, bytes);
    }

    /// Gives back `bytes` reserved for a chunk that was not stored.
    pub(crate) fn unreserve(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
    }
}

/// The cache's numbers, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The cap, if any.
    pub max_bytes: Option<u64>,
    /// Chunk bytes cached now.
    pub bytes: u64,
    /// Chunks evicted since the budget was opened.
    pub evictions: u64,
    /// Their bytes.
    pub evicted_bytes: u64,
    /// Chunks fetched again after they were evicted.
    pub refetches: u64,
}

/// What [`CacheBudget::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs whose cached chunks were removed.
    pub blobs: u64,
    /// Unpacked tar trees removed.
    pub trees: u64,
    /// Disk bytes freed.
    pub bytes: u64,
}

/// One cache folder's accountant; see the module documentation.
#[derive(Debug)]
pub struct CacheBudget {
    dir: PathBuf,
    max: Option<u64>,
    ledger: Mutex<Ledger>,
    bytes: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    refetches: AtomicU64,
    /// The folder's `.lock`, held (shared, or exclusive with a cap) while the budget lives.
    _lock: File,
}

#[derive(Debug, Default)]
struct Ledger {
    lru: Lru,
    next_id: u64,
    states: HashMap<u64, Arc<ChunkState>>,
    /// (verified, file stem) -> state id: the stem names the digest, the chunk size, the index
    /// that verified the chunks and, for a size other than the first one seen, the size.
    by_key: HashMap<(bool, String), u64>,
}

impl CacheBudget {
    /// Opens the cache folder `dir` (created, private) with an optional cap in bytes, and
    /// accounts the verified chunks earlier runs left there (oldest in the LRU). With a cap the
    /// folder's lock is taken exclusively (another process using the folder is an error), and
    /// what cannot be accounted is removed: caches without a map, unverified caches, chunks
    /// stored but never recorded.
    pub fn open(dir: &Path, max: Option<u64>) -> Result<Arc<CacheBudget>, Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        let fail = |message: String| Error::Cache {
            path: dir.to_owned(),
            message,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(e.to_string()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .map_err(|e| fail(format!("lock file: {e}")))?;
        let how = if max.is_some() {
            rustix::fs::FlockOperation::NonBlockingLockExclusive
        } else {
            rustix::fs::FlockOperation::NonBlockingLockShared
        };
        rustix::fs::flock(&lock, how).map_err(|_| {
            fail(if max.is_some() {
                "in use by another process; a capped cache needs its folder to itself (use another cache folder)".into()
            } else {
                "held by a process with a cache cap (use another cache folder)".into()
            })
        })?;
        let budget = Arc::new(CacheBudget {
            dir: dir.to_owned(),
            max,
            ledger: Mutex::new(Ledger::default()),
            bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            refetches: AtomicU64::new(0),
            _lock: lock,
        });
        budget.adopt_leftovers();
        Ok(budget)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cap, if any.
    pub fn max_bytes(&self) -> Option<u64> {
        self.max
    }

    /// The numbers now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            max_bytes: self.max,
            bytes: self.bytes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            refetches: self.refetches.load(Ordering::Relaxed),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        match self.ledger.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn sync_bytes(&self, ledger: &Ledger) {
        self.bytes.store(ledger.lru.bytes(), Ordering::Relaxed);
    }

    /// Accounts the verified chunks of caches earlier runs left (see [`CacheBudget::open`]).
    fn adopt_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let exclusive = self.max.is_some();
        let mut ledger = self.ledger();
        let mut seen = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.ends_with(".tmp") || name.ends_with(".unverified.data") {
                if exclusive {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(stem) = name
                .strip_suffix(".data")
                .or_else(|| name.strip_suffix(".chunks"))
            else {
                continue;
            };
            if !seen.insert(stem.to_owned()) {
                continue;
            }
            let adopted = parse_stem(stem).and_then(|parsed| {
                // Only files named by the index that verified them are trusted again.
                let index = parsed.index.as_deref()?;
                let size = std::fs::metadata(self.dir.join(format!("{stem}.data")))
                    .ok()?
                    .len();
                let state = self.state_locked(
                    &mut ledger,
                    &parsed.digest,
                    size,
                    parsed.chunk_size,
                    Some(index),
                );
                if state.data_path != self.dir.join(format!("{stem}.data")) {
                    return None;
                }
                let any = state.present_count() > 0;
                if exclusive {
                    state.punch_absent();
                }
                any.then_some(())
            });
            if adopted.is_none() && exclusive {
                for suffix in ["data", "chunks"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{stem}.{suffix}")));
                }
            }
        }
        self.sync_bytes(&ledger);
        drop(ledger);
        // A cap lower than what earlier runs left: down to it now, oldest first.
        drop(self.reserve(0));
    }

    /// The shared state of blob `digest` (`size` bytes in chunks of `chunk_size`), verified or
    /// not: created on first use (from the map on disk when verified), then shared.
    pub(crate) fn state(
        &self,
        digest: &Digest,
        size: u64,
        chunk_size: u64,
        index: Option<&Digest>,
    ) -> Arc<ChunkState> {
        let mut ledger = self.ledger();
        let tag = index.map(index_tag);
        let state = self.state_locked(&mut ledger, digest, size, chunk_size, tag.as_deref());
        self.sync_bytes(&ledger);
        state
    }

    /// The state of `digest`: verified against the index tagged `index` (see [`index_tag`]) or,
    /// without one, unverified.
    fn state_locked(
        &self,
        ledger: &mut Ledger,
        digest: &Digest,
        size: u64,
        chunk_size: u64,
        index: Option<&str>,
    ) -> Arc<ChunkState> {
        let verified = index.is_some();
        let mut stem = format!("{}-{}", digest.algorithm(), digest.encoded());
        if chunk_size != CHUNK_INDEX_CHUNK_SIZE {
            stem.push_str(&format!("-c{chunk_size}"));
        }
        // Chunks checked against one index vouch for nothing under another (another manifest
        // may claim the same layer digest with other chunk digests).
        if let Some(tag) = index {
            stem.push_str(&format!("-i{tag}"));
        }
        let found = |ledger: &Ledger, stem: &str| {
            ledger
                .by_key
                .get(&(verified, stem.to_owned()))
                .and_then(|id| ledger.states.get(id))
                .cloned()
        };
        match found(ledger, &stem) {
            Some(state) if state.size == size => return state,
            // A manifest declaring another size for the same digest gets files of its own.
            Some(_) => {
                stem.push_str(&format!("-s{size}"));
                if let Some(state) = found(ledger, &stem).filter(|s| s.size == size) {
                    return state;
                }
            }
            None => {}
        }
        let key = (verified, stem.clone());
        let id = ledger.next_id;
        ledger.next_id += 1;
        let n = size.div_ceil(chunk_size.max(1)) as usize;
        let (data_path, map_path) = if verified {
            (
                self.dir.join(format!("{stem}.data")),
                Some(self.dir.join(format!("{stem}.chunks"))),
            )
        } else {
            (self.dir.join(format!("{stem}.unverified.data")), None)
        };
        // Chunks verified by an earlier run stay valid: the map only ever records verified ones,
        // and only while their bytes are in the data file of the blob's size.
        let data_ok = std::fs::metadata(&data_path).is_ok_and(|m| m.len() == size);
        let present: Vec<bool> = match &map_path {
            Some(map) if data_ok => match std::fs::read(map) {
                Ok(bytes) if bytes.len() == n => bytes.iter().map(|&b| b == 1).collect(),
                _ => vec![false; n],
            },
            _ => vec![false; n],
        };
        let state = Arc::new(ChunkState {
            id,
            digest: digest.clone(),
            size,
            chunk_size: chunk_size.max(1),
            data_path,
            map_path,
            present: Mutex::new(present),
            inflight: Mutex::new(HashMap::new()),
            reading: Mutex::new(HashMap::new()),
            evicted: Mutex::new(HashSet::new()),
            pins: AtomicU64::new(0),
            map_lock: Mutex::new(()),
            write_turn: Mutex::new(()),
            direct: OnceLock::new(),
            recent: Mutex::new(Recent::default()),
            file: OnceLock::new(),
        });
        for i in state.present_chunks() {
            ledger.lru.insert((id, i), state.chunk_len(i));
        }
        ledger.states.insert(id, state.clone());
        ledger.by_key.insert(key, id);
        state
    }

    /// Makes room for a chunk of `bytes` (evicting when capped) and reserves it until the
    /// returned reservation is committed or dropped.
    pub(crate) fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let mut ledger = self.ledger();
        let max = self.max.unwrap_or(u64::MAX);
        let Ledger { lru, states, .. } = &mut *ledger;
        let (count, freed) = lru.make_room(max, bytes, |(id, chunk)| match states.get(&id) {
            Some(state) => state.try_evict(chunk),
            None => Outcome::Absent,
        });
        if count > 0 {
            self.evictions.fetch_add(count, Ordering::Relaxed);
            self.evicted_bytes.fetch_add(freed, Ordering::Relaxed);
            tracing::debug!(count, freed, "evicted cached chunks");
        }
        if lru.bytes() > max {
            tracing::debug!(
                bytes = lru.bytes(),
                max,
                "cache over its cap: every older chunk is in use"
            );
        }
        self.sync_bytes(&ledger);
        Reservation {
            budget: self,
            bytes,
            done: false,
        }
    }

    /// Marks chunks `first..=last` of `state` as used now.
    pub(crate) fn touch(&self, state: &ChunkState, first: u64, last: u64) {
        let mut ledger = self.ledger();
        for i in first..=last {
            ledger.lru.touch((state.id, i));
        }
    }

    /// Forgets every chunk of `state` (all of them were dropped at once).
    pub(crate) fn forget(&self, state: &ChunkState) {
        let mut ledger = self.ledger();
        ledger.lru.remove_id(state.id);
        self.sync_bytes(&ledger);
    }

    /// Counts a chunk fetched again after its eviction.
    pub(crate) fn note_refetch(&self) {
        self.refetches.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes the caches of blobs that `live_blob` does not keep and that no mount holds, and
    /// the unpacked trees (`trees/<manifest hex>...`) that `live_tree` does not keep (none at
    /// all when `live_tree` is `None`: a mount may be unpacking).
    pub fn gc(
        &self,
        live_blob: &dyn Fn(&Digest) -> bool,
        live_tree: Option<&dyn Fn(&str) -> bool>,
    ) -> GcReport {
        let mut report = GcReport::default();
        let mut ledger = self.ledger();
        // Blobs a mount holds (or that are live) keep their files.
        let mut kept: HashSet<String> = HashSet::new();
        let mut dropped = Vec::new();
        for (&id, state) in &ledger.states {
            if live_blob(&state.digest) || Arc::strong_count(state) > 1 {
                kept.insert(state.digest.encoded().to_owned());
            } else {
                dropped.push(id);
            }
        }
        let Ledger {
            lru,
            states,
            by_key,
            ..
        } = &mut *ledger;
        for id in dropped {
            lru.remove_id(id);
            states.remove(&id);
        }
        by_key.retain(|_, id| states.contains_key(id));
        let mut removed_stems = HashSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stem = name
                    .strip_suffix(".unverified.data")
                    .or_else(|| name.strip_suffix(".data"))
                    .or_else(|| name.strip_suffix(".chunks"));
                let Some(digest) = stem.and_then(parse_stem).map(|s| s.digest) else {
                    continue;
                };
                if kept.contains(digest.encoded()) || live_blob(&digest) {
                    continue;
                }
                let bytes = disk_usage(&entry.path());
                if std::fs::remove_file(entry.path()).is_ok() {
                    report.bytes += bytes;
                    removed_stems.insert(digest.encoded().to_owned());
                }
            }
        }
        report.blobs = removed_stems.len() as u64;
        if let Some(live_tree) = live_tree
            && let Ok(entries) = std::fs::read_dir(self.dir.join("trees"))
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if live_tree(&name) {
                    continue;
                }
                let bytes = disk_usage(&entry.path());
                if std::fs::remove_dir_all(entry.path()).is_ok() {
                    report.bytes += bytes;
                    report.trees += 1;
                }
            }
        }
        self.sync_bytes(&ledger);
        report
    }
}

/// Disk bytes (allocated blocks) under `path`.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// `<alg>-<hex>` or `<alg>-<hex>-c<chunk size>`: the digest and chunk size.
/// What a verified file stem names: `<alg>-<hex>[-c<chunk size>][-i<index tag>][-s<size>]`.
struct Stem {
    digest: Digest,
    chunk_size: u64,
    index: Option<String>,
}

fn parse_stem(stem: &str) -> Option<Stem> {
    let mut parts = stem.split('-');
    let (alg, hex) = (parts.next()?, parts.next()?);
    let mut parsed = Stem {
        digest: format!("{alg}:{hex}").parse().ok()?,
        chunk_size: CHUNK_INDEX_CHUNK_SIZE,
        index: None,
    };
    for part in parts {
        match part.split_at_checked(1)? {
            ("c", n) => parsed.chunk_size = n.parse().ok()?,
            ("i", tag) => parsed.index = Some(tag.to_owned()),
            ("s", n) => {
                n.parse::<u64>().ok()?;
            }
            _ => return None,
        }
    }
    Some(parsed)
}

/// A short identity of the chunk index that verified a blob's chunks (the first 16 hex digits
/// of its sha256), for the cache file names.
pub(crate) fn index_tag(index: &Digest) -> String {
    index.encoded().chars().take(16).collect()
}

/// Room made for one chunk; commit it once the chunk is stored, or drop it to give it back.
pub(crate) struct Reservation<'a> {
    budget: &'a CacheBudget,
    bytes: u64,
    done: bool,
}

impl Reservation<'_> {
    /// Accounts the stored chunk `chunk` of `state`.
    pub(crate) fn commit(mut self, state: &ChunkState, chunk: u64) {
        self.done = true;
        let mut ledger = self.budget.ledger();
        ledger.lru.commit((state.id, chunk), self.bytes);
        self.budget.sync_bytes(&ledger);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut ledger = self.budget.ledger();
            ledger.lru.unreserve(self.bytes);
            self.budget.sync_bytes(&ledger);
        }
    }
}

/// What is cached of one blob, shared by every [`crate::blob::LazyBlob`] of its digest in the
/// process: the sparse data file, the map of verified chunks, the fetches in flight and the
/// reads being served.
#[derive(Debug)]
pub(crate) struct ChunkState {
    id: u64,
    digest: Digest,
    size: u64,
    chunk_size: u64,
    pub(crate) data_path: PathBuf,
    /// The map of verified chunks (none for an unverified cache).
    map_path: Option<PathBuf>,
    pub(crate) present: Mutex<Vec<bool>>,
    /// Chunks claimed by a fetch (or an eviction): their readers wait for the notify.
    pub(crate) inflight: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Chunks a read is serving, with the number of such reads: never evicted.
    reading: Mutex<HashMap<u64, u32>>,
    /// Chunks evicted and not fetched again yet (refetches are counted).
    evicted: Mutex<HashSet<u64>>,
    /// While above zero nothing is evicted: a kernel-passthrough open points the kernel at the
    /// complete file, or the whole file is being hashed.
    pins: AtomicU64,
    /// Serialises map writes, so the last one written is the latest state.
    map_lock: Mutex<()>,
    /// Serialises writes through the page cache. Two fetches writing at once contend for the
    /// inode's write lock in the kernel, which spins while the holder copies: on a small
    /// machine that spinning took the CPU the registry, the hashing and the reader needed.
    /// Waiting here sleeps instead. (Direct writes sleep in the kernel while they wait.)
    write_turn: Mutex<()>,
    file: OnceLock<File>,
    /// The data file opened for direct I/O (`None`: the file system has none, e.g. tmpfs).
    direct: OnceLock<Option<File>>,
    /// Chunks written lately, in memory until reads have served them.
    recent: Mutex<Recent>,
}

/// Most chunks [`Recent`] holds per blob: what readahead keeps fetched ahead of one reader
/// (its window and a run in flight).
const RECENT_MAX: usize = (crate::readahead::MAX_WINDOW + crate::readahead::RUN) as usize;

/// Chunks are kept in [`Recent`] only while every chunk buffer of the process together
/// ([`crate::chunkbuf::live_bytes`]) stays under this; chunks that come when it is passed are
/// read back from the data file instead (the mount's memory stays flat however many blobs are
/// read at once).
const RECENT_LIMIT: usize = 48 << 20;

/// Chunks of one blob fetched and written lately, kept in memory until reads have served all of
/// their bytes (or newer chunks push them out): a reader that waited for a chunk is answered
/// from the bytes that were fetched, not by reading back what was just written.
#[derive(Debug, Default)]
struct Recent {
    /// (chunk, its bytes, bytes of it served so far), oldest first.
    chunks: std::collections::VecDeque<(u64, bytes::Bytes, u64)>,
}

impl Recent {
    /// Keeps chunk `i` while the process's chunk memory is under [`RECENT_LIMIT`].
    fn insert(&mut self, i: u64, bytes: bytes::Bytes) {
        self.chunks.retain(|(c, _, _)| *c != i);
        if crate::chunkbuf::live_bytes() <= RECENT_LIMIT {
            self.chunks.push_back((i, bytes, 0));
        }
        while self.chunks.len() > RECENT_MAX {
            self.chunks.pop_front();
        }
    }
}

/// Reads in progress over chunks `first..=last` of one blob: they are not evicted until the
/// guard is dropped.
pub(crate) struct ReadPin {
    state: Arc<ChunkState>,
    first: u64,
    last: u64,
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        if let Ok(mut reading) = self.state.reading.lock() {
            for i in self.first..=self.last {
                if let Some(n) = reading.get_mut(&i) {
                    *n -= 1;
                    if *n == 0 {
                        reading.remove(&i);
                    }
                }
            }
        }
    }
}

impl ChunkState {
    /// Bytes of chunk `i`.
    pub(crate) fn chunk_len(&self, i: u64) -> u64 {
        let start = i * self.chunk_size;
        (start + self.chunk_size)
            .min(self.size)
            .saturating_sub(start)
    }

    pub(crate) fn present_chunks(&self) -> Vec<u64> {
        self.present
            .lock()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .filter(|(_, b)| **b)
                    .map(|(i, _)| i as u64)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Chunks present.
    pub(crate) fn present_count(&self) -> usize {
        self.present
            .lock()
            .map(|p| p.iter().filter(|&&b| b).count())
            .unwrap_or(0)
    }

    /// The data file, opened (created at the blob's size) on first use.
    pub(crate) fn file(&self) -> Result<&File, Error> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        let path = &self.data_path;
        let file = modelpack_store::open_private(path)
            .map_err(|e| Error::Read(format!("cache file {}: {e}", path.display())))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) != self.size {
            file.set_len(self.size)
                .map_err(|e| Error::Read(format!("cache file {}: {e}", path.display())))?;
        }
        let _ = self.file.set(file);
        self.file
            .get()
            .ok_or_else(|| Error::Read("cache file not open".into()))
    }

    /// Writes verified chunk `i` to the data file: straight to disk when the file system allows
    /// it and the chunk is aligned ([`crate::chunkbuf::DIRECT_ALIGN`]; all but a blob's last
    /// chunk are), so the bytes do not take a second place in memory beside the mounted file's
    /// page cache, which holds what readers read. Otherwise through the page cache.
    pub(crate) fn write_chunk(&self, i: u64, bytes: &bytes::Bytes) -> Result<(), Error> {
        let start = i * self.chunk_size;
        let align = crate::chunkbuf::DIRECT_ALIGN;
        let aligned = start.is_multiple_of(align as u64)
            && bytes.len().is_multiple_of(align)
            && (bytes.as_ptr() as usize).is_multiple_of(align);
        let direct = if aligned { self.direct_file()? } else { None };
        let written = match direct {
            Some(direct) => match direct.write_all_at(bytes, start) {
                // A file system that takes O_DIRECT at open but not for this write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                other => Some(other),
            },
            None => None,
        };
        match written {
            Some(result) => result,
            None => {
                let _turn = self.write_turn.lock();
                self.file()?.write_all_at(bytes, start)
            }
        }
        .map_err(|e| Error::Read(format!("cache write: {e}")))
    }

    /// Keeps verified chunk `i` in memory until reads have served it (or newer chunks push it
    /// out): readers need not wait for it to be written.
    pub(crate) fn remember(&self, i: u64, bytes: bytes::Bytes) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(i, bytes);
        }
    }

    /// True when chunk `i` is in memory (see [`ChunkState::remember`]).
    pub(crate) fn has_recent(&self, i: u64) -> bool {
        self.recent
            .lock()
            .is_ok_and(|r| r.chunks.iter().any(|(c, _, _)| *c == i))
    }

    /// `offset..end` from chunks written lately, when every chunk it touches is still in memory
    /// (a range across two chunks is copied into one buffer: cheaper than waiting for both to
    /// reach the disk and reading them back); a chunk leaves memory once every byte of it has
    /// been served.
    pub(crate) fn recent(&self, offset: u64, end: u64) -> Option<bytes::Bytes> {
        if offset >= end {
            return None;
        }
        let (first, last) = (offset / self.chunk_size, (end - 1) / self.chunk_size);
        let mut recent = self.recent.lock().ok()?;
        // Where each touched chunk sits in `recent`, and which of its bytes the range takes.
        let mut parts = Vec::with_capacity((last - first + 1) as usize);
        for i in first..=last {
            let at = recent.chunks.iter().position(|(c, _, _)| *c == i)?;
            let start = i * self.chunk_size;
            let range = (offset.max(start) - start) as usize
                ..(end.min(start + self.chunk_size) - start) as usize;
            if range.end > recent.chunks[at].1.len() {
                return None;
            }
            parts.push((at, range));
        }
        let out = match parts.as_slice() {
            [(at, range)] => recent.chunks[*at].1.slice(range.clone()),
            _ => {
                let mut out = bytes::BytesMut::with_capacity((end - offset) as usize);
                for (at, range) in &parts {
                    out.extend_from_slice(&recent.chunks[*at].1[range.clone()]);
                }
                out.freeze()
            }
        };
        for (at, range) in &parts {
            recent.chunks[*at].2 += range.len() as u64;
        }
        recent
            .chunks
            .retain(|(_, bytes, served)| *served < bytes.len() as u64);
        Some(out)
    }

    /// The data file opened for direct writes, `None` where the file system has no direct I/O.
    fn direct_file(&self) -> Result<Option<&File>, Error> {
        if let Some(direct) = self.direct.get() {
            return Ok(direct.as_ref());
        }
        // Created at the blob's size first.
        self.file()?;
        use std::os::unix::fs::OpenOptionsExt as _;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.data_path)
            .ok();
        let _ = self.direct.set(direct);
        Ok(self.direct.get().and_then(Option::as_ref))
    }

    /// Drops the data file's clean pages wholly inside `start..end` from the page cache, once a
    /// read has served them: the kernel keeps them in the mounted file's page cache, and a second
    /// copy here would hold every byte read twice in memory (on a virtual machine that hands
    /// freed memory back to its host, it also makes a cold read touch twice as many fresh pages,
    /// each costly). The data file stays a disk cache: a later read of these bytes comes from
    /// disk, not the network.
    pub(crate) fn drop_pages(&self, start: u64, end: u64) {
        const PAGE: u64 = 4096;
        let (from, to) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
        if let (Some(file), Some(len)) = (
            self.file.get(),
            std::num::NonZeroU64::new(to.saturating_sub(from)),
        ) {
            let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
        }
    }

    /// Pins chunks `first..=last` for a read (before it makes them present).
    pub(crate) fn pin_reads(self: &Arc<Self>, first: u64, last: u64) -> ReadPin {
        if let Ok(mut reading) = self.reading.lock() {
            for i in first..=last {
                *reading.entry(i).or_default() += 1;
            }
        }
        ReadPin {
            state: self.clone(),
            first,
            last,
        }
    }

    /// When every chunk is present: pins the whole file (nothing is evicted until
    /// [`ChunkState::unpin`]) and returns true.
    pub(crate) fn pin_if_complete(&self) -> bool {
        let Ok(present) = self.present.lock() else {
            return false;
        };
        let complete = present.iter().all(|&b| b);
        if complete {
            self.pins.fetch_add(1, Ordering::SeqCst);
        }
        complete
    }

    /// Ends one pin.
    pub(crate) fn unpin(&self) {
        let _ = self
            .pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Records chunk `i` as present (its bytes written and verified). Returns whether it had
    /// been evicted before (a refetch) and whether the map is due to be saved.
    pub(crate) fn mark_present(&self, i: u64) -> Result<(bool, bool), Error> {
        let refetch = self
            .evicted
            .lock()
            .map(|mut e| e.remove(&i))
            .unwrap_or(false);
        let mut present = self
            .present
            .lock()
            .map_err(|_| Error::Read("lock poisoned".into()))?;
        present[i as usize] = true;
        let done = present.iter().filter(|&&b| b).count();
        let complete = done == present.len();
        // Saved every 16 chunks and when complete; a crash only costs refetching.
        Ok((refetch, done % 16 == 0 || complete))
    }

    /// True when every chunk is present (the blob is complete).
    #[cfg(test)]
    pub(crate) fn is_complete(&self) -> bool {
        self.present.lock().is_ok_and(|p| p.iter().all(|&b| b))
    }

    /// True when a chunk this cache holds differs from the same bytes of `verified` (the whole
    /// blob, checked against its digest); unreadable counts as different.
    pub(crate) fn differs_from(&self, verified: &Path) -> bool {
        use std::os::unix::fs::FileExt as _;
        let (Ok(ours), Ok(theirs)) = (File::open(&self.data_path), File::open(verified)) else {
            return true;
        };
        let mut a = vec![0u8; self.chunk_size as usize];
        let mut b = vec![0u8; self.chunk_size as usize];
        self.present_chunks().into_iter().any(|i| {
            let len = self.chunk_len(i) as usize;
            let at = i * self.chunk_size;
            ours.read_exact_at(&mut a[..len], at).is_err()
                || theirs.read_exact_at(&mut b[..len], at).is_err()
                || a[..len] != b[..len]
        })
    }

    /// Forgets every chunk (in memory and on disk).
    pub(crate) fn forget_all(&self) {
        if let Ok(mut present) = self.present.lock() {
            present.iter_mut().for_each(|p| *p = false);
        }
        if let Some(map) = &self.map_path {
            let _guard = self.map_lock.lock();
            let _ = std::fs::remove_file(map);
        }
    }

    /// Writes the map of verified chunks as it is now (atomically: temporary file, rename).
    /// `durable`: synced to disk before it replaces the old map (before an eviction punches
    /// bytes; a map that records fewer chunks than are cached needs no sync).
    pub(crate) fn write_map(&self, durable: bool) -> std::io::Result<()> {
        let Some(map) = &self.map_path else {
            return Ok(());
        };
        let _guard = self
            .map_lock
            .lock()
            .map_err(|_| std::io::Error::other("map lock poisoned"))?;
        let snapshot: Vec<u8> = self
            .present
            .lock()
            .map_err(|_| std::io::Error::other("chunk map lock poisoned"))?
            .iter()
            .map(|&b| u8::from(b))
            .collect();
        // Per process: two unbounded processes may share the folder.
        let tmp = map.with_extension(format!("chunks.{}.tmp", std::process::id()));
        let written = std::fs::write(&tmp, &snapshot)
            .and_then(|()| match durable {
                true => std::fs::File::open(&tmp)?.sync_all(),
                false => Ok(()),
            })
            .and_then(|()| std::fs::rename(&tmp, map));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Evicts chunk `i` unless something uses it: claims it (fetchers wait), clears it from the
    /// map in memory and on disk, punches its bytes out of the data file, releases it.
    pub(crate) fn try_evict(&self, i: u64) -> Outcome {
        let notify = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Outcome::Pinned;
            };
            if inflight.contains_key(&i) {
                return Outcome::Pinned;
            }
            let Ok(mut present) = self.present.lock() else {
                return Outcome::Pinned;
            };
            if !present.get(i as usize).copied().unwrap_or(false) {
                return Outcome::Absent;
            }
            if self.pins.load(Ordering::SeqCst) > 0 {
                return Outcome::Pinned;
            }
            let Ok(reading) = self.reading.lock() else {
                return Outcome::Pinned;
            };
            if reading.contains_key(&i) {
                return Outcome::Pinned;
            }
            present[i as usize] = false;
            let notify = Arc::new(Notify::new());
            inflight.insert(i, notify.clone());
            notify
        };
        // The map on disk first: it must never claim a chunk whose bytes are gone. When it cannot
        // be written, the chunk stays (and counts) rather than being punched under a stale map.
        if let Err(e) = self.write_map(true) {
            tracing::warn!(blob = %self.digest, chunk = i, error = %e, "cannot update the chunk map; the chunk is kept");
            if let Ok(mut present) = self.present.lock()
                && let Some(p) = present.get_mut(i as usize)
            {
                *p = true;
            }
            if let Ok(mut inflight) = self.inflight.lock() {
                inflight.remove(&i);
            }
            notify.notify_waiters();
            return Outcome::Pinned;
        }
        if let Err(e) = self.punch(i * self.chunk_size, self.chunk_len(i)) {
            tracing::warn!(blob = %self.digest, chunk = i, error = %e, "cannot punch an evicted chunk out of the cache file");
        }
        if let Ok(mut evicted) = self.evicted.lock() {
            evicted.insert(i);
        }
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.remove(&i);
        }
        notify.notify_waiters();
        Outcome::Evicted
    }

    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        use rustix::fs::FallocateFlags;
        let file = self.file().map_err(std::io::Error::other)?;
        rustix::fs::fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(std::io::Error::from)
    }

    /// Punches out every chunk the map does not record (stored by a run that ended before it
    /// saved its map): the disk then holds exactly what is accounted.
    fn punch_absent(&self) {
        let absent: Vec<u64> = match self.present.lock() {
            Ok(p) => (0..p.len() as u64).filter(|&i| !p[i as usize]).collect(),
            Err(_) => return,
        };
        if absent.is_empty() || std::fs::metadata(&self.data_path).is_err() {
            return;
        }
        for i in absent {
            let _ = self.punch(i * self.chunk_size, self.chunk_len(i));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The eviction policy without FUSE or a registry: LRU order, pinned entries skipped,
    //! accounting; then chunk states over real sparse files.

    use super::*;

    /// The identity of the index the test chunks are verified against.
    fn test_index() -> Digest {
        Digest::sha256_of(b"a chunk index")
    }

    #[test]
    fn the_least_recently_used_goes_first_and_a_touch_saves_an_entry() {
        let mut lru = Lru::default();
        for i in 0..4 {
            lru.insert((1, i), 10);
        }
        lru.touch((1, 0));
        assert_eq!(lru.bytes(), 40);
        let mut order = Vec::new();
        let (count, freed) = lru.make_room(40, 20, |k| {
            order.push(k);
            Outcome::Evicted
        });
        assert_eq!(order, [(1, 1), (1, 2)]);
        assert_eq!((count, freed), (2, 20));
        // 20 left plus the 20 reserved.
        assert_eq!(lru.bytes(), 40);
        lru.commit((2, 0), 20);
        assert_eq!(lru.bytes(), 40);
        let mut order = Vec::new();
        lru.make_room(40, 10, |k| {
            order.push(k);
            Outcome::Evicted
        });
        assert_eq!(order, [(1, 3)], "the touched entry outlived newer ones");
    }

    #[test]
    fn pinned_entries_are_skipped_and_absent_ones_forgotten_uncounted() {
        let mut lru = Lru::default();
        for i in 0..4 {
            lru.insert((7, i), 10);
        }
        let mut tried = Vec::new();
        let (count, freed) = lru.make_room(30, 10, |k| {
            tried.push(k.1);
            match k.1 {
                0 => Outcome::Pinned,
                1 => Outcome::Absent,
                _ => Outcome::Evicted,
            }
        });
        // 40 + 10 must come down to 30: chunk 0 is in use, chunk 1 was gone already (10 less,
        // not an eviction), chunk 2 goes.
        assert_eq!(tried, [0, 1, 2]);
        assert_eq!((count, freed), (1, 10));
        assert_eq!(lru.bytes(), 30);
        // Everything pinned: over the cap rather than stuck.
        let (count, _) = lru.make_room(10, 10, |_| Outcome::Pinned);
        assert_eq!(count, 0);
        assert_eq!(lru.bytes(), 40);
        lru.unreserve(10);
        lru.unreserve(10);
        assert_eq!(lru.bytes(), 20);
        assert_eq!(lru.remove_id(7), 20);
        assert_eq!(lru.bytes(), 0);
    }

    fn filled(budget: &CacheBudget, chunks: u64, chunk: u64) -> Arc<ChunkState> {
        let digest = Digest::sha256_of(&chunks.to_le_bytes());
        let state = budget.state(&digest, chunks * chunk, chunk, Some(&test_index()));
        for i in 0..chunks {
            let reservation = budget.reserve(chunk);
            let file = state.file().expect("file");
            std::os::unix::fs::FileExt::write_all_at(file, &vec![1u8; chunk as usize], i * chunk)
                .expect("write");
            state.mark_present(i).expect("mark");
            reservation.commit(&state, i);
        }
        state.write_map(false).expect("the chunk map");
        state
    }

    #[test]
    fn a_capped_budget_punches_the_oldest_unpinned_chunks_and_keeps_the_map_true() {
        const CHUNK: u64 = 64 << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = CacheBudget::open(dir.path(), Some(4 * CHUNK)).expect("budget");
        let a = filled(&budget, 3, CHUNK);
        // Chunk 0 of a is being read; the passthrough pin of b comes later.
        let pin = a.pin_reads(0, 0);
        let b = filled(&budget, 2, CHUNK);
        let stats = budget.stats();
        assert_eq!(stats.bytes, 4 * CHUNK);
        assert_eq!(stats.evictions, 1);
        // a's chunk 1 went (0 was pinned), then the map on disk says so.
        assert_eq!(*a.present.lock().expect("lock"), [true, false, true]);
        let map = std::fs::read(a.map_path.as_ref().expect("map")).expect("map");
        assert_eq!(map, [1, 0, 1]);
        use std::os::unix::fs::MetadataExt as _;
        let blocks = std::fs::metadata(&a.data_path).expect("data").blocks() * 512;
        assert!(
            blocks <= 2 * CHUNK,
            "{blocks} bytes allocated for two chunks"
        );
        drop(pin);
        // b complete and pinned by a passthrough open: a goes before any of b.
        assert!(b.pin_if_complete());
        drop(budget.reserve(2 * CHUNK));
        assert_eq!(*a.present.lock().expect("lock"), [false, false, false]);
        assert!(b.is_complete());
        b.unpin();
        // An evicted chunk stored again counts as a refetch.
        let (refetch, _) = a.mark_present(1).expect("mark");
        assert!(refetch);
    }

    #[test]
    fn a_range_across_chunks_in_memory_is_served_from_memory_and_each_chunk_goes_once_served() {
        const CHUNK: u64 = 64 << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = CacheBudget::open(dir.path(), None).expect("budget");
        // Three chunks, the last one short; each byte says where it is.
        let size = 3 * CHUNK - 100;
        let blob: Vec<u8> = (0..size).map(|b| (b % 251) as u8).collect();
        let state = budget.state(&Digest::sha256_of(&blob), size, CHUNK, None);
        for i in 0..2 {
            let (from, to) = ((i * CHUNK) as usize, ((i + 1) * CHUNK) as usize);
            state.remember(i, bytes::Bytes::copy_from_slice(&blob[from..to]));
        }
        // A range into a chunk not in memory: not served (its reader waits for the disk).
        assert!(state.recent(CHUNK, 2 * CHUNK + 10).is_none());
        // The kernel's readahead need not follow chunk boundaries.
        let across = state.recent(CHUNK / 2, CHUNK + 4096).expect("in memory");
        assert_eq!(
            &across[..],
            &blob[(CHUNK / 2) as usize..(CHUNK + 4096) as usize]
        );
        // The rest of chunk 0: all of it served, it leaves memory; chunk 1 stays.
        let rest = state.recent(0, CHUNK / 2).expect("in memory");
        assert_eq!(&rest[..], &blob[..(CHUNK / 2) as usize]);
        assert!(!state.has_recent(0));
        assert!(state.has_recent(1));
        // The last, short chunk: served to the blob's end, and then gone with chunk 1.
        let last = (2 * CHUNK) as usize;
        state.remember(2, bytes::Bytes::copy_from_slice(&blob[last..]));
        assert!(state.recent(size - 10, size + 10).is_none(), "past the end");
        let tail = state.recent(CHUNK + 4096, size).expect("in memory");
        assert_eq!(&tail[..], &blob[(CHUNK + 4096) as usize..]);
        assert!(!state.has_recent(1) && !state.has_recent(2));
    }

    #[test]
    fn one_state_per_digest_and_a_reopened_folder_accounts_what_it_finds() {
        const CHUNK: u64 = 64 << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let budget = CacheBudget::open(dir.path(), None).expect("budget");
            let state = filled(&budget, 3, CHUNK);
            let again = budget.state(&state.digest, 3 * CHUNK, CHUNK, Some(&test_index()));
            assert!(Arc::ptr_eq(&state, &again));
            let unverified = budget.state(&state.digest, 3 * CHUNK, CHUNK, None);
            assert!(!Arc::ptr_eq(&state, &unverified));
            assert_ne!(state.data_path, unverified.data_path);
            // A second unbounded user is fine; a capped one is refused while this one runs.
            assert!(CacheBudget::open(dir.path(), None).is_ok());
            assert!(CacheBudget::open(dir.path(), Some(1)).is_err());
        }
        // Left on disk: accounted again, down to a lower cap at once; leftovers removed.
        std::fs::write(dir.path().join("junk.chunks.tmp"), b"x").expect("tmp");
        let budget = CacheBudget::open(dir.path(), Some(2 * CHUNK)).expect("budget");
        assert_eq!(budget.stats().bytes, 2 * CHUNK);
        assert_eq!(budget.stats().evictions, 1);
        assert!(!dir.path().join("junk.chunks.tmp").exists());
        drop(budget);
        let budget = CacheBudget::open(dir.path(), Some(10 * CHUNK)).expect("budget");
        assert_eq!(budget.stats().bytes, 2 * CHUNK);
        // Nothing live, nothing held: gc removes it all.
        let report = budget.gc(&|_| false, Some(&|_| false));
        assert_eq!(report.blobs, 1);
        assert!(report.bytes >= 2 * CHUNK);
        assert_eq!(budget.stats().bytes, 0);
    }
}
