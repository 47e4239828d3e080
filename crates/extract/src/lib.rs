//! Restoring a model's file tree from its layers: raw and tar layers of every encoding, paths,
//! modes and modification times, refusing any path that would leave the target before writing
//! anything.
//!
//! [`extract`] works in three steps: plan (read every tar layer's headers, check every path,
//! link and type), stage (stream each layer into a hidden folder inside the target, verifying
//! each layer's digest as it streams), and commit (rename each staged file into place). A failure
//! before the commit leaves the target as it was.
//!
//! **Invariant:** nothing is written outside `target`, and no byte reaches `target` from a layer
//! whose digest did not verify.
//!
//! ```no_run
//! use modelpack_extract::{ExtractOptions, StoreSource, extract};
//! use modelpack_spec::{Digest, ModelManifest};
//!
//! let store = modelpack_store::Store::open("/tmp/store".as_ref()).unwrap();
//! let descriptor = store.resolve(&"llama:8b".parse().unwrap()).unwrap();
//! let digest: Digest = descriptor.digest().as_ref().parse().unwrap();
//! let manifest = ModelManifest::from_slice(&store.read_blob(&digest, 4 << 20).unwrap()).unwrap();
//! let report = extract(&manifest, &StoreSource(&store), "./out".as_ref(), &ExtractOptions::default()).unwrap();
//! println!("{} files written, {} already identical", report.written, report.skipped);
//! ```
#![deny(missing_docs, missing_debug_implementations)]

mod error;
mod plan;
mod stage;

use std::io::Read;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use modelpack_spec::{Digest, Encoding};
use modelpack_store::Store;

pub use error::{Error, Result};
pub use plan::{
    EntryPlan, ExtractPlan, Patterns, PlannedEntry, plan, plan_files, plan_layers, plan_tar_layer,
};
pub use stage::extract_planned;

/// A layer blob to read: what the extractor needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Its digest, verified while it streams.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// How it is encoded.
    pub encoding: Encoding,
}

/// Where layer bytes come from (the local store, or a registry stream).
pub trait LayerSource: Sync {
    /// Opens the layer's blob from its first byte. The reader yields the blob as stored
    /// (compressed for compressed layers); the extractor verifies its digest.
    fn open_layer(&self, layer: &LayerBlob) -> Result<Box<dyn Read + Send + '_>>;

    /// The layer's uncompressed tar as a seekable reader, when the source can read it at any
    /// offset (a lazy mount); planning then reads only the headers and seeks over the data.
    /// The default is `None`: planning streams the layer.
    fn open_tar_seekable(&self, _layer: &LayerBlob) -> Result<Option<Box<dyn ReadSeek + '_>>> {
        Ok(None)
    }

    /// A local file holding exactly this raw layer's bytes, already verified, that the
    /// extractor may hard-link into place instead of copying: the source gives the file up (it
    /// must not be shared with anything that outlives the extraction, such as a store blob).
    /// The default is `None`: the layer is copied and verified as it streams.
    fn verified_file(&self, _layer: &LayerBlob) -> Option<std::path::PathBuf> {
        None
    }
}

/// A reader that can also seek.
pub trait ReadSeek: Read + std::io::Seek + Send {}

impl<T: Read + std::io::Seek + Send> ReadSeek for T {}

/// Layers read from the local store.
#[derive(Debug, Clone, Copy)]
pub struct StoreSource<'a>(pub &'a Store);

impl LayerSource for StoreSource<'_> {
    fn open_layer(&self, layer: &LayerBlob) -> Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(self.0.open_blob(&layer.digest)?))
    }
}

/// What to extract.
#[derive(Debug, Default)]
pub struct ExtractOptions<'a> {
    /// Only paths matching one of these globs (`*` stays within a folder, `**` crosses them);
    /// empty means everything.
    pub patterns: &'a [String],
    /// Set to stop early (Ctrl-C); the target is left as it was.
    pub cancel: Option<&'a AtomicBool>,
}

/// What [`extract`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractReport {
    /// Files (and links) written.
    pub written: usize,
    /// Files left alone because they were already identical.
    pub skipped: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// Plans, stages and commits the model's tree into `target` (created if missing).
pub fn extract(
    manifest: &modelpack_spec::ModelManifest,
    source: &dyn LayerSource,
    target: &Path,
    opts: &ExtractOptions<'_>,
) -> Result<ExtractReport> {
    let plan = plan(manifest, source, opts.patterns)?;
    extract_planned(source, &plan, target, opts.cancel)
}
