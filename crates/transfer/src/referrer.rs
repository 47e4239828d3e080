//! Attaching an artifact to another as an OCI referrer (`subject`), as `oras attach` does: the
//! empty config, the referrer manifest, and the tag-schema fallback for registries without the
//! referrers API.

use bytes::Bytes;
use modelpack_registry::{FetchedManifest, Repository};
use modelpack_spec::Digest;
use modelpack_spec::media_type::{MEDIA_TYPE_OCI_EMPTY, MEDIA_TYPE_OCI_MANIFEST};
use modelpack_spec::oci_spec::image::Descriptor;

use crate::error::Result;
use crate::manifest_descriptor;

/// Pushes a manifest of `artifact_type` whose layers are `layers` (their blobs must already be
/// in `repo`) and whose subject is `subject`; registries without the referrers API learn of it
/// through the tag schema. Returns the referrer manifest's digest.
pub async fn attach(
    repo: &Repository,
    subject: &FetchedManifest,
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
        "subject": manifest_descriptor(&subject.bytes)?,
    });
    let bytes = Bytes::from(modelpack_spec::to_canonical_json(&manifest));
    let digest = Digest::sha256_of(&bytes);
    repo.put_manifest(digest.as_str(), MEDIA_TYPE_OCI_MANIFEST, bytes.clone())
        .await?;
    if !repo.supports_referrers(&subject.digest).await? {
        repo.add_referrer_to_fallback(&subject.digest, manifest_descriptor(&bytes)?)
            .await?;
    }
    Ok(digest)
}
