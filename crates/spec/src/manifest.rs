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
    /// The file path it restores to (filepath annotation, legacy key, or OCI title); for a layer
    /// without any of them, a name derived from its digest (see [`ModelLayer::named`]).
    pub path: LayerPath,
    /// False when the layer names no path (the spec makes the annotation optional): a tar layer's
    /// entries then carry their own names, and a raw layer's bytes are kept under
    /// [`unnamed_layer_path`].
    pub named: bool,
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

    /// True for a raw layer that names no path: its file gets [`unnamed_layer_path`], which
    /// readers say in a warning.
    pub fn is_unnamed_file(&self) -> bool {
        !self.named && self.media_type.encoding == crate::Encoding::Raw
    }
}

/// The path a layer without a name annotation is kept under: `sha256-<hex>` (its digest, with
/// the colon a file name should not carry).
pub fn unnamed_layer_path(digest: &Digest) -> Result<LayerPath> {
    LayerPath::new(&format!("{}-{}", digest.algorithm(), digest.encoded()))
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
                .or_else(|| get(annotations, ANNOTATION_TITLE, ANNOTATION_TITLE));
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
            let path = match path_text {
                Some(text) => LayerPath::new(text)?,
                None => unnamed_layer_path(&digest)?,
            };
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
                path,
                named: path_text.is_some(),
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

/// The bytes we write a manifest (or index, or any document) as: compact JSON in the field order
/// of the OCI Go types (`schemaVersion`, `mediaType`, `artifactType`, `config`, `layers`,
/// `subject`, `annotations`; inside descriptors `mediaType`, `digest`, `size`, ...), map keys
/// sorted and `<`, `>`, `&` escaped, exactly as Go's `encoding/json` writes them. So the same
/// manifest always has the same digest, and a tool that re-serialises it with Go's structs
/// before hashing (modctl's `inspect` does) gets that digest too.
pub fn to_canonical_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let Ok(value) = serde_json::to_value(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    write_ordered(&mut out, &value, Fields::Document);
    out
}

/// Which Go type an object is, for its field order.
#[derive(Clone, Copy)]
enum Fields {
    /// A manifest or index (the top level).
    Document,
    /// An OCI descriptor.
    Descriptor,
    /// An OCI platform.
    Platform,
    /// A map: keys sorted.
    Map,
}

impl Fields {
    /// The Go struct's fields in declaration order (keys not listed follow, sorted).
    fn order(self) -> &'static [&'static str] {
        match self {
            Fields::Document => &[
                "schemaVersion",
                "mediaType",
                "artifactType",
                "config",
                "manifests",
                "layers",
                "subject",
                "annotations",
            ],
            Fields::Descriptor => &[
                "mediaType",
                "digest",
                "size",
                "urls",
                "annotations",
                "data",
                "platform",
                "artifactType",
            ],
            Fields::Platform => &["architecture", "os", "os.version", "os.features", "variant"],
            Fields::Map => &[],
        }
    }

    /// The type of the value under `key` of an object of this type.
    fn child(self, key: &str) -> Fields {
        match (self, key) {
            (Fields::Document, "config" | "subject" | "layers" | "manifests") => Fields::Descriptor,
            (Fields::Descriptor, "platform") => Fields::Platform,
            _ => Fields::Map,
        }
    }
}

fn write_ordered(out: &mut Vec<u8>, value: &serde_json::Value, fields: Fields) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let order = fields.order();
            let rank = |k: &str| order.iter().position(|o| *o == k).unwrap_or(order.len());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_ordered(out, &map[key.as_str()], fields.child(key));
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_ordered(out, item, fields);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(out, s),
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// A JSON string as Go writes it: also `<`, `>`, `&`, U+2028 and U+2029 escaped.
fn write_string(out: &mut Vec<u8>, s: &str) {
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    for c in quoted.chars() {
        match c {
            '<' => out.extend_from_slice(b"\\u003c"),
            '>' => out.extend_from_slice(b"\\u003e"),
            '&' => out.extend_from_slice(b"\\u0026"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_written_in_the_oci_field_order_with_go_escaping() {
        let doc = serde_json::json!({
            "annotations": {"z": "1", "a": "<b> & c"},
            "layers": [{"size": 3, "annotations": {"k": "v"}, "digest": "sha256:x", "mediaType": "m"}],
            "config": {"digest": "sha256:c", "mediaType": "c", "size": 2},
            "artifactType": "t",
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "schemaVersion": 2,
            "subject": {"size": 1, "mediaType": "s", "digest": "sha256:s"},
        });
        let expected = concat!(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#,
            r#""artifactType":"t","config":{"mediaType":"c","digest":"sha256:c","size":2},"#,
            r#""layers":[{"mediaType":"m","digest":"sha256:x","size":3,"annotations":{"k":"v"}}],"#,
            r#""subject":{"mediaType":"s","digest":"sha256:s","size":1},"#,
            r#""annotations":{"a":"\u003cb\u003e \u0026 c","z":"1"}}"#
        );
        assert_eq!(
            String::from_utf8(to_canonical_json(&doc)).expect("utf-8"),
            expected
        );
        // Still JSON, with the same meaning.
        let back: serde_json::Value =
            serde_json::from_slice(&to_canonical_json(&doc)).expect("json");
        assert_eq!(back, doc);
    }
}
