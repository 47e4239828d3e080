//! A plain folder as a content target (`pull -o`, `fetch`): the blobs the folder needs go
//! through the same walk as a pull into the store (adaptive ranges, saved progress, every byte
//! verified), into a scratch store that the next run resumes from; then the extractor writes
//! the files, linking each verified raw blob into place instead of copying it, and the scratch
//! store goes.
//!
//! **Invariant:** the folder gets nothing before every blob it needs verified and every path
//! was checked; a failure leaves it as it was (the scratch store keeps what was downloaded, so
//! running the same pull again continues it; `prune` removes a scratch store nobody holds).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use modelpack_extract::{EntryPlan, ExtractReport, LayerBlob, LayerSource, Patterns};
use modelpack_spec::annotations::ANNOTATION_TITLE;
use modelpack_spec::oci_spec::image::ImageManifest;
use modelpack_spec::{Digest, Encoding, LayerPath, ModelManifest};
use modelpack_store::{ScratchStore, Store};

use crate::error::{Error, Result};
use crate::target::{Copied, Exists, Manifest, Push, Tag, blocking, store_file};
use crate::{BlobRef, TransferOptions};

/// The files of an artifact: a ModelPack model by its layers' paths, any other artifact by its
/// layers' OCI titles (as `oras pull` does).
#[derive(Clone)]
pub(crate) enum Files {
    Model(Box<ModelManifest>),
    Titled(Vec<(LayerPath, LayerBlob)>),
}

impl Files {
    pub(crate) fn of(manifest: &[u8]) -> Result<Files> {
        let report = match ModelManifest::from_slice(manifest) {
            Ok(m) => return Ok(Files::Model(Box::new(m))),
            Err(report) => report,
        };
        let doc: serde_json::Value = serde_json::from_slice(manifest)
            .map_err(|e| Error::Unsupported(format!("manifest is not JSON: {e}")))?;
        let says_model = serde_json::from_value::<ImageManifest>(doc.clone())
            .is_ok_and(|m| modelpack_spec::is_model_manifest(&m));
        let layers = doc["layers"].as_array().map_or(&[][..], Vec::as_slice);
        let all_titled = !layers.is_empty()
            && layers
                .iter()
                .all(|l| l["annotations"][ANNOTATION_TITLE].is_string());
        if says_model {
            // What `oras push --artifact-type <the ModelPack type>` makes: plain layers with
            // titles. Their files are still reachable by title, as for any oras artifact.
            if !all_titled {
                return Err(Error::Unsupported(format!(
                    "a ModelPack artifact that fails validation: {}",
                    report.error_summary()
                )));
            }
            tracing::warn!(
                problems = %report.error_summary(),
                "not a valid ModelPack artifact; writing its layers by their OCI titles"
            );
        }
        let mut files = Vec::new();
        for layer in doc["layers"].as_array().into_iter().flatten() {
            let Some(title) = layer["annotations"][ANNOTATION_TITLE].as_str() else {
                continue;
            };
            let digest: Digest = layer["digest"].as_str().unwrap_or_default().parse()?;
            let size = layer["size"]
                .as_u64()
                .ok_or_else(|| Error::Unsupported(format!("layer {digest} has no size")))?;
            files.push((
                LayerPath::new(title)?,
                LayerBlob {
                    digest,
                    size,
                    encoding: Encoding::Raw,
                },
            ));
        }
        if files.is_empty() {
            return Err(Error::Unsupported(
                "no layers with file names (org.opencontainers.image.title)".into(),
            ));
        }
        Ok(Files::Titled(files))
    }

    /// Every layer as (path it restores to, blob).
    pub(crate) fn layers(&self) -> Vec<(LayerPath, LayerBlob)> {
        match self {
            Files::Model(m) => m
                .layers()
                .iter()
                .map(|l| {
                    (
                        l.path.clone(),
                        LayerBlob {
                            digest: l.digest.clone(),
                            size: l.size(),
                            encoding: l.media_type.encoding,
                        },
                    )
                })
                .collect(),
            Files::Titled(files) => files.clone(),
        }
    }
}

/// A plain folder as a destination: an artifact's files (a ModelPack model by its layers'
/// paths, any other artifact by its layers' OCI titles), those the patterns select.
///
/// Blobs the folder needs are taken from `store` when it holds them, else they land in a
/// scratch store inside it (`scratch/pull-<digest>`, locked, resumable); [`Tag::tag`] then
/// plans and writes the files, linking each verified raw blob into place. Raw files already
/// identical in the folder are neither fetched nor written. Call [`Folder::finish`] with the
/// walk's result: it removes the scratch store, or keeps it after a registry failure or a
/// cancel so the next run continues.
pub struct Folder<'a> {
    store: &'a Store,
    dir: &'a Path,
    patterns: &'a [String],
    cancel: Option<&'static AtomicBool>,
    plan: OnceLock<FolderPlan>,
    report: Mutex<Option<ExtractReport>>,
}

/// What [`Folder::begin`](Push::begin) decided from the manifest.
struct FolderPlan {
    files: Files,
    /// Raw files the folder already holds byte for byte.
    identical: HashSet<LayerPath>,
    scratch: ScratchStore,
}

impl std::fmt::Debug for Folder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Folder")
            .field("dir", &self.dir)
            .field("patterns", &self.patterns)
            .finish()
    }
}

impl<'a> Folder<'a> {
    /// The folder `dir` (created if missing), receiving the files `patterns` select (all when
    /// empty), with blobs `store` holds read from it and the others passing through a scratch
    /// store inside it.
    pub fn new(
        store: &'a Store,
        dir: &'a Path,
        patterns: &'a [String],
        cancel: Option<&'static AtomicBool>,
    ) -> Folder<'a> {
        Folder {
            store,
            dir,
            patterns,
            cancel,
            plan: OnceLock::new(),
            report: Mutex::new(None),
        }
    }

    fn plan(&self) -> Result<&FolderPlan> {
        self.plan
            .get()
            .ok_or_else(|| Error::Unsupported("folder used before its manifest was known".into()))
    }

    /// Ends a walk into this folder: on success returns what was written and removes the
    /// scratch store; after a registry failure or a cancel keeps it for the next run; after
    /// anything else (a refused path, a full disk) removes it, since it is of no use.
    pub fn finish(self, walked: Result<Copied>) -> Result<(Copied, ExtractReport)> {
        let report = self.report.lock().ok().and_then(|mut r| r.take());
        let scratch = self.plan.into_inner().map(|p| p.scratch);
        match (walked, report) {
            (Ok(copied), Some(report)) => {
                if let Some(scratch) = scratch {
                    scratch.remove()?;
                }
                Ok((copied, report))
            }
            (Ok(_), None) => Err(Error::Unsupported(
                "the folder was never written".to_owned(),
            )),
            (
                Err(
                    e @ (Error::Registry(_)
                    | Error::Cancelled
                    | Error::Extract(modelpack_extract::Error::Cancelled)),
                ),
                _,
            ) => Err(e),
            (Err(e), _) => {
                if let Some(scratch) = scratch {
                    let _ = scratch.remove();
                }
                Err(e)
            }
        }
    }
}

/// True when `path` already holds exactly the blob's bytes (a re-run need not fetch it).
fn already_there(path: &Path, blob: &LayerBlob) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == blob.size)
        && modelpack_store::sha256_file(path).is_ok_and(|(d, _)| d == blob.digest)
}

impl Exists for Folder<'_> {
    async fn exists(&self, blob: &BlobRef) -> Result<bool> {
        // Blobs the store holds are read from it; the scratch store's own check (in the fetch)
        // covers what an earlier run brought.
        Ok(self.store.has_blob(&blob.digest))
    }
}

impl Push for Folder<'_> {
    async fn begin(&self, manifest: &Manifest, _blobs: Vec<BlobRef>) -> Result<Vec<BlobRef>> {
        let files = Files::of(&manifest.bytes)?;
        let selected = Patterns::new(self.patterns)?;
        // Tar layers are always needed: their entries are known only from their headers. Raw
        // files the folder already holds byte for byte are neither fetched nor written again
        // (and not hashed a second time by the extractor).
        let mut needed: Vec<BlobRef> = Vec::new();
        let mut identical = HashSet::new();
        for (path, blob) in files.layers() {
            let raw = blob.encoding == Encoding::Raw;
            if raw && !selected.matches(path.as_str()) {
                continue;
            }
            if raw && already_there(&self.dir.join(path.as_str()), &blob) {
                identical.insert(path);
                continue;
            }
            if !needed.iter().any(|b| b.digest == blob.digest) {
                needed.push(BlobRef {
                    digest: blob.digest,
                    size: blob.size,
                    media_type: String::new(),
                });
            }
        }
        let scratch = {
            let store = self.store.clone();
            let name = format!("pull-{}", manifest.digest.encoded());
            blocking(move || Ok(store.scratch(&name)?)).await?
        };
        self.plan
            .set(FolderPlan {
                files,
                identical,
                scratch,
            })
            .map_err(|_| Error::Unsupported("a folder takes one artifact".into()))?;
        Ok(needed)
    }

    fn landing(&self) -> Option<&Store> {
        self.plan.get().map(|p| p.scratch.store())
    }

    async fn push(&self, blob: &BlobRef, file: &Path, _opts: &TransferOptions) -> Result<()> {
        let scratch = self.plan()?.scratch.store().clone();
        let (blob, file) = (blob.clone(), file.to_owned());
        blocking(move || store_file(&scratch, &blob, &file)).await
    }
}

impl Tag for Folder<'_> {
    async fn tag(&self, manifest: &Manifest, _tag: Option<&str>) -> Result<Digest> {
        let plan = self.plan()?;
        let files = plan.files.clone();
        let (store, scratch) = (self.store.clone(), plan.scratch.store().clone());
        let (dir, patterns, cancel) = (self.dir.to_owned(), self.patterns.to_vec(), self.cancel);
        let identical = plan.identical.clone();
        let report = blocking(move || -> Result<ExtractReport> {
            let source = FolderSource {
                store: &store,
                scratch: &scratch,
            };
            let mut plan = match files {
                Files::Model(m) => modelpack_extract::plan(&m, &source, &patterns)?,
                Files::Titled(files) => modelpack_extract::plan_files(files, &patterns)?,
            };
            let mut skipped = 0;
            for entry in plan.entries.iter_mut().filter(|e| e.selected) {
                if matches!(entry.kind, EntryPlan::RawFile { .. })
                    && identical.contains(&entry.path)
                {
                    entry.selected = false;
                    skipped += 1;
                }
            }
            let mut report = modelpack_extract::extract_planned(&source, &plan, &dir, cancel)?;
            report.skipped += skipped;
            Ok(report)
        })
        .await?;
        if let Ok(mut slot) = self.report.lock() {
            *slot = Some(report);
        }
        Ok(manifest.digest.clone())
    }
}

/// Layer bytes for the extractor: the scratch store's blobs (given up for linking into place),
/// else the main store's (copied and verified as they stream).
struct FolderSource<'a> {
    store: &'a Store,
    scratch: &'a Store,
}

impl LayerSource for FolderSource<'_> {
    fn open_layer(
        &self,
        layer: &LayerBlob,
    ) -> modelpack_extract::Result<Box<dyn std::io::Read + Send + '_>> {
        let store = if self.scratch.has_blob(&layer.digest) {
            self.scratch
        } else {
            self.store
        };
        Ok(Box::new(store.open_blob(&layer.digest)?))
    }

    fn verified_file(&self, layer: &LayerBlob) -> Option<PathBuf> {
        self.scratch
            .has_blob(&layer.digest)
            .then(|| self.scratch.blob_path(&layer.digest))
    }
}
