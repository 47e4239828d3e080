//! A read-only FUSE file system presenting a ModelPack artifact as its file tree, served from the
//! registry on demand.
//!
//! - [`mount`] builds the tree from the manifest (raw layers fetch zero blob bytes; plain tar and
//!   seekable tar+zstd layers read only their headers and seek table, through verified chunks;
//!   tar+gzip layers are fetched, verified and unpacked into the cache) and serves it until
//!   unmounted;
//! - reads map to aligned chunks (2 MiB in our index), fetched by Range, verified against the chunk-digest index
//!   our builds pin in the manifest, cached on disk and shared by concurrent readers; sequential
//!   readers trigger readahead; a blob already in the store is served from it;
//! - without an index the policy is explicit: [`Verify::Full`] (default) fetches and verifies the
//!   whole blob before serving any byte of it, [`Verify::Background`] serves chunks at once while
//!   the whole blob is verified behind them (and fails every read once it does not verify),
//!   [`Verify::None`] serves unverified chunks;
//! - the hidden file `.modelpack-status` counts bytes fetched and served, cache hits and fetch
//!   latency, per file;
//! - [`create_index`] makes a chunk index for an artifact built elsewhere and attaches it as an
//!   OCI referrer; `mount` finds it there when the manifest pins none. Such an index is only as
//!   trustworthy as write access to the repository, so each blob served through it is also
//!   verified whole once all its chunks are cached, and dropped from the cache on a mismatch.
//!
//! **Invariant:** with `Verify::Full`, no byte reaches a reader before the chunk (or blob) holding
//! it matched its digest; a mismatch is logged and the read fails with EIO.
#![deny(missing_docs, missing_debug_implementations)]

mod background;
mod blob;
mod cache;
mod chunkbuf;
mod error;
mod fs;
mod handover;
mod index;
mod layer;
mod readahead;
mod tree;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use modelpack_registry::Repository;
use modelpack_store::Store;

pub use cache::{CacheBudget, CacheStats, GcReport};
pub use error::{Error, MountError};
pub use fs::{MountedModel, Resolved, mount, resolve};
pub use handover::{
    HOLDER_IDLE_EXIT, Handover, HandoverError, Held, Holder, HolderProcess, SessionState,
    serve_holder,
};
pub use index::create_index;
/// The mount table, as this crate reads it.
pub use modelpack_mountinfo as mountinfo;

/// What to do when an artifact has no chunk-digest index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Fetch and verify a whole layer before serving any byte of it (safe; the default).
    Full,
    /// Serve chunks as fetched while the whole layer is fetched and verified in the background;
    /// once it verifies, reads come from the verified copy; if it does not, every later read of
    /// the layer fails (EIO) and the failure is logged. Bytes served before that were unverified.
    Background,
    /// Serve chunks as fetched, unverified (explicit opt-out).
    None,
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The repository the artifact lives in.
    pub repository: Repository,
    /// Tag or digest of the manifest.
    pub reference: String,
    /// The local store: complete blobs are served from it, whole-blob fetches land in it.
    pub store: Store,
    /// The chunk cache folder.
    pub cache_dir: PathBuf,
    /// The accountant of `cache_dir`, shared by every mount of the process that uses the folder
    /// (its cap, if any, bounds them together); `None`: the mount opens its own, unbounded.
    pub cache: Option<std::sync::Arc<CacheBudget>>,
    /// Policy without a chunk index.
    pub verify: Verify,
    /// Let other users read the mount.
    pub allow_other: bool,
    /// Fetch small files first, then everything, in the background.
    pub prefetch: bool,
    /// Fetch every layer of at most this many bytes in the background as soon as the model is
    /// mounted (configs, tokenizers: what a loader reads first), so their first read does not
    /// wait for the registry. 0: none.
    pub prefetch_small: u64,
    /// Serve only these layers (by digest); `None` serves the whole artifact. The containerd
    /// snapshotter mounts one layer per snapshot and lets overlayfs stack them.
    pub layers: Option<Vec<modelpack_spec::Digest>>,
    /// Show the hidden status file in the root.
    pub status_file: bool,
    /// The artifact already resolved (see [`resolve`]): the mount then fetches neither the
    /// manifest nor the index. `reference` must name the same manifest.
    pub resolved: Option<std::sync::Arc<Resolved>>,
    /// Adopt this FUSE connection, already mounted at the folder (a predecessor's, kept by a
    /// [`Holder`]), instead of mounting anew: its open files and waiting readers carry on. The
    /// tree must be built from the same options as the predecessor's, so inode numbers agree.
    pub adopt: Option<std::sync::Arc<Handover>>,
    /// The connection goes to a [`Holder`], for a successor to adopt: the open-file state it
    /// needs is saved at every open and release (a file write each; a mount no successor will
    /// adopt skips them).
    pub for_successor: bool,
}

impl MountOptions {
    /// Every layer, the status file shown, verification on, no prefetch.
    pub fn new(
        repository: Repository,
        reference: impl Into<String>,
        store: Store,
        cache_dir: PathBuf,
    ) -> MountOptions {
        MountOptions {
            repository,
            reference: reference.into(),
            store,
            cache_dir,
            cache: None,
            verify: Verify::Full,
            allow_other: false,
            prefetch: false,
            prefetch_small: 0,
            layers: None,
            status_file: true,
            resolved: None,
            adopt: None,
            for_successor: false,
        }
    }
}

/// Live counters of a mount.
#[derive(Debug, Default)]
pub struct Counters {
    /// Blob bytes fetched from the registry.
    pub fetched_bytes: AtomicU64,
    /// Bytes handed to readers.
    pub served_bytes: AtomicU64,
    /// Reads served without fetching.
    pub cache_hits: AtomicU64,
    /// Chunk fetches.
    pub fetches: AtomicU64,
    /// Total fetch latency, microseconds.
    pub fetch_micros: AtomicU64,
    /// Chunks that failed verification.
    pub verify_failures: AtomicU64,
    /// Chunks fetched again after the cache evicted them.
    pub refetches: AtomicU64,
}

impl Counters {
    fn record_fetch(&self, took: Duration) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.fetch_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Name of the hidden file in the mount's root that reads as the status JSON.
pub const STATUS_FILE: &str = ".modelpack-status";
