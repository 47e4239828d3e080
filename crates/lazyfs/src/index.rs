//! Creating a chunk-digest index for an artifact built elsewhere, attached to it as an OCI
//! referrer (`modelpack index REF`), and finding one when a manifest pins none.

use std::collections::HashMap;

use bytes::Bytes;
use modelpack_registry::Repository;
use modelpack_spec::annotations::{ANNOTATION_TITLE, CHUNK_INDEX_CHUNK_SIZE};
use modelpack_spec::media_type::MEDIA_TYPE_CHUNK_INDEX;
use modelpack_spec::{ChunkHasher, ChunkIndex, Digest, Encoding, ModelManifest};
use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// Streams every raw, tar and tar+zstd layer once, hashing it whole and per chunk; refuses a layer whose bytes do
/// not match its digest; pushes the index and a referrer manifest whose subject is the model.
/// Returns the referrer manifest's digest.
pub async fn create_index(repo: &Repository, reference: &str) -> Result<Digest, Error> {
    let (fetched, manifest) = model_manifest(repo, reference).await?;
    let mut index = ChunkIndex::new(CHUNK_INDEX_CHUNK_SIZE);
    for layer in manifest.layers() {
        // Raw, tar and (seekable) tar+zstd layers can be read lazily; gzip cannot.
        if layer.media_type.encoding == Encoding::TarGzip
            || layer.size() == 0
            || index.layers.contains_key(&layer.digest)
        {
            continue;
        }
        let mut body = repo
            .blob_stream_sized(&layer.digest, layer.size(), Some(0..layer.size()))
            .await?;
        let mut whole = Sha256::new();
        let mut chunks = ChunkHasher::new(CHUNK_INDEX_CHUNK_SIZE);
        let mut total = 0u64;
        while let Some(piece) = body.next_chunk().await? {
            whole.update(&piece);
            chunks.update(&piece);
            total += piece.len() as u64;
        }
        let chunks = chunks.finish();
        let actual = Digest::from_sha256(whole.finalize().into());
        if actual != layer.digest || total != layer.size() {
            return Err(Error::Invalid(format!(
                "layer {}: the registry sent bytes hashing to {actual}; no index made",
                layer.digest
            )));
        }
        index.layers.insert(layer.digest.clone(), chunks);
    }
    let bytes = Bytes::from(index.to_vec());
    let index_digest = Digest::sha256_of(&bytes);
    if repo.blob_exists(&index_digest).await?.is_none() {
        repo.push_blob_bytes(&index_digest, bytes.clone()).await?;
    }
    let layer = modelpack_spec::descriptor(
        MEDIA_TYPE_CHUNK_INDEX,
        &index_digest,
        bytes.len() as u64,
        Some(HashMap::from([(
            ANNOTATION_TITLE.to_owned(),
            "chunk-index.json".to_owned(),
        )])),
    )?;
    let referrer_digest =
        modelpack_transfer::attach(repo, &fetched, MEDIA_TYPE_CHUNK_INDEX, vec![layer]).await?;
    Ok(referrer_digest)
}

/// The manifest `reference` names in `repo`, as fetched and as a validated model manifest.
pub(crate) async fn model_manifest(
    repo: &Repository,
    reference: &str,
) -> Result<(modelpack_registry::FetchedManifest, ModelManifest), Error> {
    let fetched = repo.get_manifest(reference).await?;
    let manifest = ModelManifest::from_slice(&fetched.bytes).map_err(|report| {
        Error::Invalid(format!(
            "not a valid ModelPack manifest: {}",
            report.error_summary()
        ))
    })?;
    Ok((fetched, manifest))
}

/// The chunk index attached to `manifest_digest` as a referrer, if any (only the one with the
/// digest `pinned`, when given).
pub(crate) async fn find_referrer_index(
    repo: &Repository,
    manifest_digest: &Digest,
    pinned: Option<&Digest>,
) -> Option<ChunkIndex> {
    let referrers = repo
        .referrers(manifest_digest, Some(MEDIA_TYPE_CHUNK_INDEX))
        .await
        .ok()?;
    for referrer in referrers {
        let Ok(m) = repo.get_manifest(referrer.digest().as_ref()).await else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&m.bytes) else {
            continue;
        };
        let Some(digest) = doc["layers"][0]["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
        else {
            continue;
        };
        if pinned.is_some_and(|p| *p != digest) {
            continue;
        }
        let Ok(bytes) = repo
            .read_blob_capped(&digest, modelpack_spec::MAX_DOCUMENT_SIZE)
            .await
        else {
            continue;
        };
        if let Ok(index) = ChunkIndex::from_slice(&bytes) {
            return Some(index);
        }
    }
    None
}
