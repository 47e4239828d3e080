//! Building ModelPack artifacts from a directory, with or without a Modelfile.
//!
//! - [`Modelfile`] parses and prints Modelfiles;
//! - [`plan_auto`] / [`plan_from_modelfile`] decide which file becomes which layer;
//! - [`build`] packs every planned file into the store in parallel, in one read pass per file,
//!   then writes the config and the manifest and returns the manifest's descriptor.
//!
//! **Invariant:** every layer blob's digest is computed over exactly the bytes written (or linked)
//! into the store; same inputs and `SOURCE_DATE_EPOCH` give the same manifest digest.
//!
//! ```no_run
//! use modelpack_build::{BuildOptions, LayerPlacement, Metadata, build};
//! use modelpack_spec::Encoding;
//!
//! let store = modelpack_store::Store::open("/tmp/store".as_ref()).unwrap();
//! let opts = BuildOptions {
//!     context: "./my-model".as_ref(),
//!     modelfile: None,
//!     excludes: &[],
//!     encoding: Encoding::Raw,
//!     created: None,
//!     source_date_epoch: None,
//!     metadata: Metadata::default(),
//!     placement: LayerPlacement::Copy,
//!     concurrency: 2,
//!     spelling: Default::default(),
//! };
//! let out = build(&store, &opts, &|_| {}).unwrap();
//! println!("{}", out.manifest.digest());
//! ```
#![deny(missing_docs, missing_debug_implementations)]

mod error;
mod modelfile;
mod pack;
mod plan;

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::{DateTime, FixedOffset};
use modelpack_spec::annotations::{
    ANNOTATION_CHUNK_INDEX_DIGEST, ANNOTATION_CHUNK_INDEX_SIZE, ANNOTATION_CREATED,
    CHUNK_INDEX_CHUNK_SIZE,
};
use modelpack_spec::media_type::MEDIA_TYPE_OCI_MANIFEST;
use modelpack_spec::oci_spec::image::Descriptor;
use modelpack_spec::{
    Digest, Encoding, Model, ModelConfig, ModelDescriptor, ModelFs, ModelFsType, ModelManifest,
    NameSpelling,
};
use modelpack_store::Store;

pub use error::{Error, Result};
pub use modelfile::{Metadata, Modelfile, Selector};
pub use pack::{
    AttrPolicy, LayerPlacement, PackedLayer, Placement, ZSTD_FRAME_SIZE, copy_and_hash, pack_file,
};
pub use plan::{
    PlannedFile, Source, UNKNOWN_WEIGHT_THRESHOLD, classify, classify_name, exclude_set,
    infer_metadata, modelfile_for, plan_auto, plan_from_modelfile,
};

/// What to build and how.
#[derive(Debug, Clone)]
pub struct BuildOptions<'a> {
    /// The folder holding the model's files.
    pub context: &'a Path,
    /// The Modelfile, if one selects the files; without it every file is classified.
    pub modelfile: Option<&'a Modelfile>,
    /// Globs of paths to leave out.
    pub excludes: &'a [String],
    /// Layer encoding: `Raw` (default), `Tar`, `TarGzip` or `TarZstd`.
    pub encoding: Encoding,
    /// `descriptor.createdAt`, or `None` to leave it out.
    pub created: Option<DateTime<FixedOffset>>,
    /// `SOURCE_DATE_EPOCH`: clamps file times and zeroes owners for reproducible builds.
    pub source_date_epoch: Option<DateTime<FixedOffset>>,
    /// Metadata from the command line; wins over the Modelfile and over guesses.
    pub metadata: Metadata,
    /// Where raw files' bytes go: copied, linked, or left in place.
    pub placement: LayerPlacement,
    /// Files packed at once.
    pub concurrency: usize,
    /// The spelling of the ModelPack names written (`cncf` unless a registry needs `cnai`).
    pub spelling: NameSpelling,
}

/// Something that happened during a build, for progress display.
#[derive(Debug, Clone)]
pub enum BuildEvent<'a> {
    /// The plan is made.
    Planned {
        /// Files to pack.
        files: usize,
        /// Bytes to read.
        bytes: u64,
    },
    /// Bytes of a file were read.
    Progress(u64),
    /// A file became a layer.
    Packed(&'a PlannedFile, &'a PackedLayer),
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// Descriptor of the manifest (in the store, not yet named).
    pub manifest: Descriptor,
    /// The manifest, typed.
    pub model_manifest: ModelManifest,
    /// The config written.
    pub config: Model,
    /// Layers in manifest order.
    pub layers: Vec<PackedLayer>,
}

/// Plans, packs and writes config and manifest. The caller names the manifest with
/// [`Store::tag`], holding a [`modelpack_store::GcGuard`] across both.
pub fn build(
    store: &Store,
    opts: &BuildOptions<'_>,
    on_event: &(dyn Fn(BuildEvent<'_>) + Sync),
) -> Result<BuildOutput> {
    let excludes = exclude_set(opts.excludes)?;
    let mut files = match opts.modelfile {
        Some(mf) => plan_from_modelfile(opts.context, mf, &excludes)?,
        None => plan_auto(opts.context, &excludes)?,
    };
    files.sort_by(|a, b| (a.kind, &a.path).cmp(&(b.kind, &b.path)));
    let guessed = if opts.modelfile.is_some() {
        Metadata {
            name: infer_metadata(opts.context, &[]).name,
            ..Metadata::default()
        }
    } else {
        infer_metadata(opts.context, &files)
    };
    let metadata = opts
        .metadata
        .clone()
        .or(opts
            .modelfile
            .map(|m| m.metadata.clone())
            .unwrap_or_default())
        .or(guessed);

    let sizes: Vec<u64> = files
        .iter()
        .map(|f| {
            std::fs::symlink_metadata(&f.abs)
                .map(|m| if m.is_file() { m.len() } else { 0 })
                .unwrap_or(0)
        })
        .collect();
    on_event(BuildEvent::Planned {
        files: files.len(),
        bytes: sizes.iter().sum(),
    });

    let policy = AttrPolicy {
        clamp_mtime: opts.source_date_epoch,
        zero_owner: opts.source_date_epoch.is_some(),
    };
    // Largest first, so the workers finish together.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<PackedLayer>>>> =
        Mutex::new((0..files.len()).map(|_| None).collect());
    let progress = |n: u64| on_event(BuildEvent::Progress(n));
    std::thread::scope(|scope| {
        for _ in 0..opts.concurrency.clamp(1, 64) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(&idx) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let file = &files[idx];
                    let result = pack_file(
                        store,
                        file,
                        opts.encoding,
                        &policy,
                        opts.placement,
                        &progress,
                    );
                    match &result {
                        Ok(layer) => on_event(BuildEvent::Packed(file, layer)),
                        Err(_) => failed.store(true, Ordering::Relaxed),
                    }
                    if let Ok(mut slots) = results.lock() {
                        slots[idx] = Some(result);
                    }
                }
            });
        }
    });
    let mut layers = Vec::with_capacity(files.len());
    let slots = results.into_inner().unwrap_or_default();
    // Report the first failure in manifest order.
    for slot in slots {
        match slot {
            Some(Ok(layer)) => layers.push(layer),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if layers.len() != files.len() {
        return Err(Error::NoFiles(opts.context.to_owned()));
    }
    for layer in &mut layers {
        layer.descriptor = opts.spelling.respell(&layer.descriptor)?;
    }

    let config = Model {
        descriptor: ModelDescriptor {
            created_at: opts.created,
            name: metadata.name.clone().filter(|n| !n.is_empty()),
            family: metadata.family.clone(),
            ..ModelDescriptor::default()
        },
        modelfs: ModelFs {
            fs_type: ModelFsType::Layers,
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        config: ModelConfig {
            architecture: metadata.arch.clone(),
            format: metadata.format.clone(),
            param_size: metadata.param_size.clone(),
            precision: metadata.precision.clone(),
            quantization: metadata.quantization.clone(),
            capabilities: None,
        },
    };
    let config_bytes = config.to_vec();
    let config_digest = store.put_bytes(&config_bytes)?;
    let mut index = modelpack_spec::ChunkIndex::new(CHUNK_INDEX_CHUNK_SIZE);
    for layer in layers.iter().filter(|l| !l.chunks.is_empty()) {
        index.layers.insert(
            layer
                .descriptor
                .digest()
                .to_string()
                .parse::<modelpack_spec::Digest>()?,
            layer.chunks.clone(),
        );
    }
    let mut annotations = serde_json::Map::new();
    if !index.layers.is_empty() {
        let bytes = index.to_vec();
        let digest = store.put_bytes(&bytes)?;
        annotations.insert(
            ANNOTATION_CHUNK_INDEX_DIGEST.into(),
            digest.to_string().into(),
        );
        annotations.insert(
            ANNOTATION_CHUNK_INDEX_SIZE.into(),
            bytes.len().to_string().into(),
        );
    }
    if let Some(created) = opts.created {
        annotations.insert(
            ANNOTATION_CREATED.into(),
            modelpack_spec::time::format_rfc3339(&created).into(),
        );
    }
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": opts.spelling.artifact_type(),
        "config": modelpack_spec::descriptor(
            opts.spelling.config_media_type(),
            &config_digest,
            config_bytes.len() as u64,
            None,
        )?,
        "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
    });
    if !annotations.is_empty() {
        manifest["annotations"] = serde_json::Value::Object(annotations);
    }
    let manifest_bytes = modelpack_spec::to_canonical_json(&manifest);
    let model_manifest = ModelManifest::from_slice(&manifest_bytes).map_err(|report| {
        Error::Spec(modelpack_spec::Error::Invalid {
            what: "built manifest",
            reason: report.error_summary(),
        })
    })?;
    let manifest_digest: Digest = store.put_bytes(&manifest_bytes)?;
    let mut descriptor = modelpack_spec::descriptor(
        MEDIA_TYPE_OCI_MANIFEST,
        &manifest_digest,
        manifest_bytes.len() as u64,
        None,
    )?;
    descriptor.set_artifact_type(Some(opts.spelling.artifact_type().into()));
    Ok(BuildOutput {
        manifest: descriptor,
        model_manifest,
        config,
        layers,
    })
}
