//! A ModelPack artifact loaded and validated from where it lives (the store or a registry): its
//! manifest and config, each checked against its digest and against the spec.

use modelpack_registry::Repository;
use modelpack_spec::oci_spec::image::Descriptor;
use modelpack_spec::{Digest, MAX_DOCUMENT_SIZE, Model, ModelManifest, Reference};
use modelpack_store::Store;

use crate::error::{Error, Result};
use crate::manifest_descriptor;

/// A validated ModelPack artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The reference it was loaded by.
    pub reference: Reference,
    /// Its manifest's descriptor.
    pub descriptor: Descriptor,
    /// The manifest's exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The manifest, typed.
    pub manifest: ModelManifest,
    /// The config's exact bytes.
    pub config_bytes: Vec<u8>,
    /// The config, typed.
    pub config: Model,
}

fn validated(reference: &Reference, bytes: &[u8]) -> Result<ModelManifest> {
    ModelManifest::from_slice(bytes).map_err(|report| {
        Error::Unsupported(format!(
            "{} is not a valid ModelPack manifest: {}",
            reference.familiar(),
            report.error_summary()
        ))
    })
}

fn typed_config(reference: &Reference, bytes: &[u8]) -> Result<Model> {
    Model::from_slice(bytes)
        .map_err(|e| Error::Unsupported(format!("config of {}: {e}", reference.familiar())))
}

impl Artifact {
    /// Resolves `reference` in `store` and loads it.
    pub fn from_store(store: &Store, reference: &Reference) -> Result<Artifact> {
        let descriptor = store.resolve(reference)?;
        let digest: Digest = descriptor.digest().to_string().parse()?;
        let manifest_bytes = store.read_blob(&digest, MAX_DOCUMENT_SIZE as u64)?;
        let manifest = validated(reference, &manifest_bytes)?;
        let config_bytes = store.read_blob(manifest.config_digest(), MAX_DOCUMENT_SIZE as u64)?;
        Ok(Artifact {
            reference: reference.clone(),
            descriptor,
            config: typed_config(reference, &config_bytes)?,
            manifest_bytes,
            manifest,
            config_bytes,
        })
    }

    /// Fetches `reference`'s manifest and config from `repo`.
    pub async fn from_registry(repo: &Repository, reference: &Reference) -> Result<Artifact> {
        let fetched = repo.get_manifest(&reference.tag_or_digest()).await?;
        let manifest = validated(reference, &fetched.bytes)?;
        let config_bytes = repo
            .read_blob_capped(manifest.config_digest(), MAX_DOCUMENT_SIZE)
            .await?
            .to_vec();
        Ok(Artifact {
            reference: reference.clone(),
            descriptor: manifest_descriptor(&fetched.bytes)?,
            config: typed_config(reference, &config_bytes)?,
            manifest_bytes: fetched.bytes.to_vec(),
            manifest,
            config_bytes,
        })
    }
}
