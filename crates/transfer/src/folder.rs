//! Registry -> plain folder (`pull -o`, `fetch`): the blobs the folder needs go through the same
//! engine as a pull into the store (adaptive ranges, saved progress, every byte verified), into
//! a scratch store that the next run resumes from; then the extractor writes the files, linking
//! each verified raw blob into place instead of copying it, and the scratch store goes.
//!
//! **Invariant:** the folder gets nothing before every blob it needs verified and every path
//! was checked; a failure leaves it as it was (the scratch store keeps what was downloaded, so
//! running the same pull again continues it; `prune` removes a scratch store nobody holds).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use futures_util::{StreamExt as _, TryStreamExt as _};
use modelpack_extract::{EntryPlan, ExtractReport, LayerBlob, LayerSource, Patterns};
use modelpack_registry::Repository;
use modelpack_spec::annotations::ANNOTATION_TITLE;
use modelpack_spec::oci_spec::image::ImageManifest;
use modelpack_spec::{Digest, Encoding, LayerPath, ModelManifest, Reference};
use modelpack_store::Store;

use crate::error::{Error, Result};
use crate::{BlobRef, Event, TransferOptions, fetch_blob};

/// What a pull into a folder did.
#[derive(Debug, Clone)]
pub struct FolderOutcome {
    /// The manifest's digest.
    pub digest: Digest,
    /// Files written and left alone.
    pub report: ExtractReport,
    /// Bytes of the blobs the folder needed.
    pub total_bytes: u64,
}

/// The files of an artifact: a ModelPack model by its layers' paths, any other artifact by its
/// layers' OCI titles (as `oras pull` does).
enum Files {
    Model(Box<ModelManifest>),
    Titled(Vec<(LayerPath, LayerBlob)>),
}

impl Files {
    fn of(manifest: &[u8]) -> Result<Files> {
        let report = match ModelManifest::from_slice(manifest) {
            Ok(m) => return Ok(Files::Model(Box::new(m))),
            Err(report) => report,
        };
        let doc: serde_json::Value = serde_json::from_slice(manifest)
            .map_err(|e| Error::Unsupported(format!("manifest is not JSON: {e}")))?;
        if serde_json::from_value::<ImageManifest>(doc.clone())
            .is_ok_and(|m| modelpack_spec::is_model_manifest(&m))
        {
            return Err(Error::Unsupported(format!(
                "a ModelPack artifact that fails validation: {}",
                report.error_summary()
            )));
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
    fn layers(&self) -> Vec<(LayerPath, LayerBlob)> {
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

/// True when `path` already holds exactly the blob's bytes (a re-run need not fetch it).
fn already_there(path: &Path, blob: &LayerBlob) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == blob.size)
        && modelpack_store::sha256_file(path).is_ok_and(|(d, _)| d == blob.digest)
}

/// Returns once `flag` is set.
async fn raised(flag: &AtomicBool) {
    while !flag.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

/// Resolves `reference` in `repo` and writes the artifact's files (those `patterns` select; all
/// when empty) into `dir`, created if missing. Blobs `store` already holds are read from it;
/// the others are fetched into a scratch store inside it, which is removed once the files are
/// in place (and kept after a registry failure or a cancel, so the next run continues).
pub async fn pull_to_folder(
    repo: &Repository,
    reference: &Reference,
    store: &Store,
    dir: &Path,
    patterns: &[String],
    opts: &TransferOptions,
    cancel: Option<&'static AtomicBool>,
) -> Result<FolderOutcome> {
    let manifest = repo.get_manifest(&reference.tag_or_digest()).await?;
    let files = Files::of(&manifest.bytes)?;
    let selected = Patterns::new(patterns)?;
    // Tar layers are always needed: their entries are known only from their headers. Raw files
    // the folder already holds byte for byte are neither fetched nor written again (and not
    // hashed a second time by the extractor).
    let mut needed: Vec<BlobRef> = Vec::new();
    let mut identical: HashSet<LayerPath> = HashSet::new();
    for (path, blob) in files.layers() {
        let raw = blob.encoding == Encoding::Raw;
        if raw && !selected.matches(path.as_str()) {
            continue;
        }
        if raw && already_there(&dir.join(path.as_str()), &blob) {
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
    let total_bytes = needed.iter().map(|b| b.size).sum();
    (opts.progress)(Event::Total { bytes: total_bytes });
    let scratch = {
        let store = store.clone();
        let name = format!("pull-{}", manifest.digest.encoded());
        tokio::task::spawn_blocking(move || store.scratch(&name))
            .await
            .map_err(|e| Error::Unsupported(format!("worker thread failed: {e}")))??
    };
    let download = futures_util::stream::iter(needed.iter().map(|b| {
        let scratch = scratch.store();
        async move {
            if store.has_blob(&b.digest) {
                (opts.progress)(Event::BlobSkipped {
                    digest: b.digest.clone(),
                    size: b.size,
                });
                return Ok(());
            }
            fetch_blob(repo, scratch, b, opts).await.map(|_| ())
        }
    }))
    .buffer_unordered(opts.concurrency)
    .try_collect::<Vec<()>>();
    // Ctrl-C stops the downloads where they are (their progress is saved for the next run).
    let fetched = match cancel {
        Some(flag) => tokio::select! {
            done = download => done,
            () = raised(flag) => Err(Error::Cancelled),
        },
        None => download.await,
    };
    let result = match fetched {
        Err(e) => Err(e),
        Ok(_) => {
            let (store, scratch_store, dir) =
                (store.clone(), scratch.store().clone(), dir.to_owned());
            let patterns = patterns.to_vec();
            tokio::task::spawn_blocking(move || -> Result<ExtractReport> {
                let source = FolderSource {
                    store: &store,
                    scratch: &scratch_store,
                };
                let mut plan = match &files {
                    Files::Model(m) => modelpack_extract::plan(m, &source, &patterns)?,
                    Files::Titled(files) => {
                        modelpack_extract::plan_files(files.clone(), &patterns)?
                    }
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
            .await
            .map_err(|e| Error::Unsupported(format!("worker thread failed: {e}")))?
        }
    };
    match result {
        Ok(report) => {
            scratch.remove()?;
            Ok(FolderOutcome {
                digest: manifest.digest,
                report,
                total_bytes,
            })
        }
        // What was downloaded stays for the next run when the registry or the user stopped
        // this one; after anything else (a refused path, a full disk) it is of no use.
        Err(
            e @ (Error::Registry(_)
            | Error::Cancelled
            | Error::Extract(modelpack_extract::Error::Cancelled)),
        ) => Err(e),
        Err(e) => {
            let _ = scratch.remove();
            Err(e)
        }
    }
}
