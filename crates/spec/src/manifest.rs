//! A ModelPack manifest read into typed layers, and the canonical bytes we write manifests as.

use std::collections::HashMap;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageManifest, MediaType};

use crate::annotations::{
    ANNOTATION_FILE_METADATA, ANNOTATION_FILEPATH, ANNOTATION_MEDIATYPE_UNTESTED, ANNOTATION_TITLE,
    FileMetadata, LEGACY_ANNOTATION_FILE_METADATA, LEGACY_ANNOTATION_FILEPATH,
    LEGACY_ANNOTATION_MEDIATYPE_UNTESTED,
};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::media_type::{LayerMediaType, is_model_artifact, is_model_config};
use crate::path::LayerPath;
use crate::validate::{self, Report};

/// One layer of a model, with its annotations checked and typed.
#[derive(Debug, Clone)]
pub struct ModelLayer {
    /// The OCI descriptor as the manifest has it.
    pub descriptor: Descriptor,
    /// Its digest, checked.
    pub digest: Digest,
    /// Its ModelPack media type.
    pub media_type: LayerMediaType,
    /// The file path it restores to (filepath annotation, legacy key, or OCI title).
    pub path: LayerPath,
    /// The file metadata annotation, when present.
    pub metadata: Option<FileMetadata>,
    /// True when the packager marked the kind as guessed.
    pub untested: bool,
}

impl ModelLayer {
    /// Size of the layer blob in bytes.
    pub fn size(&self) -> u64 {
        self.descriptor.size()
    }
}

/// A manifest that passed ModelPack validation, with typed layers.
#[derive(Debug, Clone)]
pub struct ModelManifest {
    manifest: ImageManifest,
    config_digest: Digest,
    layers: Vec<ModelLayer>,
}

fn get<'a>(
    annotations: Option<&'a HashMap<String, String>>,
    key: &str,
    legacy: &str,
) -> Option<&'a str> {
    let map = annotations?;
    map.get(key).or_else(|| map.get(legacy)).map(String::as_str)
}

/// True when the manifest says it is a ModelPack artifact (artifactType or config media type).
pub fn is_model_manifest(manifest: &ImageManifest) -> bool {
    manifest
        .artifact_type()
        .as_ref()
        .is_some_and(|t| is_model_artifact(t.as_ref()))
        || is_model_config(manifest.config().media_type().as_ref())
}

impl ModelManifest {
    /// Validates `bytes` as a ModelPack manifest and types its layers; the report's errors, if
    /// any, are the error.
    pub fn from_slice(bytes: &[u8]) -> Result<ModelManifest, Report> {
        let report = validate::validate_manifest(bytes);
        if !report.is_valid() {
            return Err(report);
        }
        let invalid = |message: String| {
            let mut r = Report::default();
            r.problems.push(validate::Problem {
                severity: validate::Severity::Error,
                path: "$".into(),
                message,
            });
            r
        };
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        Self::from_manifest(manifest).map_err(|e| invalid(e.to_string()))
    }

    /// Types the layers of an already parsed manifest.
    pub fn from_manifest(manifest: ImageManifest) -> Result<ModelManifest> {
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let sha256_only = |digest: &Digest| {
            if digest.is_sha256() {
                Ok(())
            } else {
                Err(Error::Invalid {
                    what: "descriptor",
                    reason: format!("{digest}: only sha256 digests can be verified here"),
                })
            }
        };
        sha256_only(&config_digest)?;
        let mut layers = Vec::with_capacity(manifest.layers().len());
        for descriptor in manifest.layers() {
            let annotations = descriptor.annotations().as_ref();
            let media_type: LayerMediaType = descriptor.media_type().as_ref().parse()?;
            let path_text = get(annotations, ANNOTATION_FILEPATH, LEGACY_ANNOTATION_FILEPATH)
                .or_else(|| get(annotations, ANNOTATION_TITLE, ANNOTATION_TITLE))
                .ok_or_else(|| Error::Invalid {
                    what: "layer",
                    reason: format!(
                        "layer {} has no {ANNOTATION_FILEPATH} or title annotation",
                        descriptor.digest()
                    ),
                })?;
            let metadata = get(
                annotations,
                ANNOTATION_FILE_METADATA,
                LEGACY_ANNOTATION_FILE_METADATA,
            )
            .map(FileMetadata::from_annotation)
            .transpose()?;
            let untested = get(
                annotations,
                ANNOTATION_MEDIATYPE_UNTESTED,
                LEGACY_ANNOTATION_MEDIATYPE_UNTESTED,
            ) == Some("true");
            let digest: Digest = descriptor.digest().to_string().parse()?;
            sha256_only(&digest)?;
            // A raw layer is the file itself: metadata naming another size is a lie.
            if let Some(meta) = &metadata
                && media_type.encoding == crate::Encoding::Raw
                && meta.typeflag == crate::annotations::TYPEFLAG_REGULAR
                && u64::try_from(meta.size).ok() != Some(descriptor.size())
            {
                return Err(Error::Invalid {
                    what: "layer",
                    reason: format!(
                        "layer {digest}: file metadata says {} bytes but the raw layer has {}",
                        meta.size,
                        descriptor.size()
                    ),
                });
            }
            layers.push(ModelLayer {
                digest,
                media_type,
                path: LayerPath::new(path_text)?,
                metadata,
                untested,
                descriptor: descriptor.clone(),
            });
        }
        Ok(ModelManifest {
            manifest,
            config_digest,
            layers,
        })
    }

    /// The OCI manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// Digest of the config blob.
    pub fn config_digest(&self) -> &Digest {
        &self.config_digest
    }

    /// The typed layers, in manifest order.
    pub fn layers(&self) -> &[ModelLayer] {
        &self.layers
    }
}

/// An OCI descriptor for content of `media_type` with `digest` and `size`.
pub fn descriptor(
    media_type: &str,
    digest: &Digest,
    size: u64,
    annotations: Option<HashMap<String, String>>,
) -> Result<Descriptor> {
    let oci_digest =
        oci_spec::image::Digest::from_str(digest.as_str()).map_err(|_| Error::InvalidDigest {
            digest: digest.to_string(),
            reason: "not accepted by the OCI descriptor type",
        })?;
    let mut d = Descriptor::new(MediaType::from(media_type), size, oci_digest);
    d.set_annotations(annotations);
    Ok(d)
}

/// The bytes we write a manifest as: compact JSON with object keys sorted, so the same manifest
/// always has the same digest (oci-spec keeps annotations in a `HashMap`).
pub fn to_canonical_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_vec(&v))
        .unwrap_or_default()
}
