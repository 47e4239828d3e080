//! Attaching an artifact to another as an OCI referrer (`subject`), as `oras attach` does: the
//! empty config, the referrer manifest, and the tag-schema fallback for registries without the
//! referrers API. The chunk index a model pins travels as such a referrer too, so registry
//! garbage collection keeps it.

use std::collections::HashMap;

use bytes::Bytes;
use modelpack_registry::{FetchedManifest, Repository};
use modelpack_spec::Digest;
use modelpack_spec::annotations::{
    ANNOTATION_CHUNK_INDEX_DIGEST, ANNOTATION_CHUNK_INDEX_SIZE, ANNOTATION_TITLE,
};
use modelpack_spec::media_type::{
    MEDIA_TYPE_CHUNK_INDEX, MEDIA_TYPE_OCI_EMPTY, MEDIA_TYPE_OCI_MANIFEST,
};
use modelpack_spec::oci_spec::image::Descriptor;

use crate::error::Result;
use crate::{BlobRef, manifest_descriptor};

/// Pushes a manifest of `artifact_type` whose layers are `layers` (their blobs must already be
/// in `repo`) and whose subject is `subject`; registries without the referrers API learn of it
/// through the tag schema. Returns the referrer manifest's digest.
pub async fn attach(
    repo: &Repository,
    subject: &FetchedManifest,
    artifact_type: &str,
    layers: Vec<Descriptor>,
) -> Result<Digest> {
    attach_to(repo, &subject.bytes, artifact_type, layers).await
}

/// [`attach`] to the manifest `subject` (its exact bytes). The referrer manifest's bytes depend
/// only on its content, so attaching the same thing again gives the same digest.
async fn attach_to(
    repo: &Repository,
    subject: &[u8],
    artifact_type: &str,
    layers: Vec<Descriptor>,
) -> Result<Digest> {
    let empty = Bytes::from_static(b"{}");
    let empty_digest = Digest::sha256_of(&empty);
    if repo.blob_exists(&empty_digest).await?.is_none() {
        repo.push_blob_bytes(&empty_digest, empty.clone()).await?;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": modelpack_spec::descriptor(MEDIA_TYPE_OCI_EMPTY, &empty_digest, empty.len() as u64, None)?,
        "layers": layers,
        "subject": manifest_descriptor(subject)?,
    });
    let bytes = Bytes::from(modelpack_spec::to_canonical_json(&manifest));
    let digest = Digest::sha256_of(&bytes);
    let subject_digest = Digest::sha256_of(subject);
    repo.put_manifest(digest.as_str(), MEDIA_TYPE_OCI_MANIFEST, bytes.clone())
        .await?;
    if !repo.supports_referrers(&subject_digest).await? {
        repo.add_referrer_to_fallback(&subject_digest, manifest_descriptor(&bytes)?)
            .await?;
    }
    Ok(digest)
}

/// The chunk-digest index a manifest pins in its annotations, as a blob reference.
pub(crate) fn pinned_chunk_index(manifest: &[u8]) -> Option<BlobRef> {
    let doc: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let annotations = &doc["annotations"];
    let digest = annotations[ANNOTATION_CHUNK_INDEX_DIGEST]
        .as_str()?
        .parse()
        .ok()?;
    let size = annotations[ANNOTATION_CHUNK_INDEX_SIZE]
        .as_str()?
        .parse::<u64>()
        .ok()
        .filter(|s| *s <= modelpack_spec::MAX_DOCUMENT_SIZE as u64)?;
    Some(BlobRef {
        digest,
        size,
        media_type: MEDIA_TYPE_CHUNK_INDEX.to_owned(),
    })
}

/// Attaches the chunk index `manifest` pins (already in `repo`) as a referrer of it, unless it
/// is attached already. A manifest annotation alone does not make a registry keep a blob: its
/// garbage collector deletes what no manifest references. A referrer manifest whose layer is
/// the index references it, so the index survives; its digest stays pinned by the annotation.
pub(crate) async fn keep_chunk_index(repo: &Repository, manifest: &[u8]) -> Result<()> {
    let Some(index) = pinned_chunk_index(manifest) else {
        return Ok(());
    };
    if repo.blob_exists(&index.digest).await?.is_none() {
        return Ok(());
    }
    let subject = Digest::sha256_of(manifest);
    let attached = repo
        .referrers(&subject, Some(MEDIA_TYPE_CHUNK_INDEX))
        .await
        .unwrap_or_default();
    for referrer in attached {
        let Ok(m) = repo.get_manifest(referrer.digest().as_ref()).await else {
            continue;
        };
        let layer_digest = serde_json::from_slice::<serde_json::Value>(&m.bytes)
            .ok()
            .and_then(|doc| doc["layers"][0]["digest"].as_str().map(str::to_owned));
        if layer_digest.as_deref() == Some(index.digest.as_str()) {
            return Ok(());
        }
    }
    let layer = modelpack_spec::descriptor(
        MEDIA_TYPE_CHUNK_INDEX,
        &index.digest,
        index.size,
        Some(HashMap::from([(
            ANNOTATION_TITLE.to_owned(),
            CHUNK_INDEX_FILE_NAME.to_owned(),
        )])),
    )?;
    attach_to(repo, manifest, MEDIA_TYPE_CHUNK_INDEX, vec![layer]).await?;
    Ok(())
}

/// The file name a chunk index referrer gives its layer.
pub const CHUNK_INDEX_FILE_NAME: &str = "chunk-index.json";
