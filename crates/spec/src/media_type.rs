//! Media types of ModelPack artifacts: the 20 layer types as (kind x encoding), plus the
//! artifact type and the config media type, parsed from and printed to their exact strings.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// `artifactType` of a ModelPack manifest.
pub const ARTIFACT_TYPE_MODEL_MANIFEST: &str = "application/vnd.cncf.model.manifest.v1+json";
/// Media type of the ModelPack model config blob.
pub const MEDIA_TYPE_MODEL_CONFIG: &str = "application/vnd.cncf.model.config.v1+json";
/// Legacy (<= v0.0.6) artifact type: read, and written only when asked ([`NameSpelling::Cnai`]).
pub const LEGACY_ARTIFACT_TYPE_MODEL_MANIFEST: &str = "application/vnd.cnai.model.manifest.v1+json";
/// Legacy (<= v0.0.6) config media type: read, and written only when asked
/// ([`NameSpelling::Cnai`]).
pub const LEGACY_MEDIA_TYPE_MODEL_CONFIG: &str = "application/vnd.cnai.model.config.v1+json";
/// Media type of the chunk-digest index blob that pins per-chunk digests of a layer.
pub const MEDIA_TYPE_CHUNK_INDEX: &str = "application/vnd.modelpack.chunk-index.v1+json";

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI empty descriptor media type (`{}` config of plain artifacts).
pub const MEDIA_TYPE_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// OCI tar layer media type (what `oras push` gives a plain file without a type).
pub const MEDIA_TYPE_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker manifest list media type, accepted on read.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest media type, accepted on read.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const PREFIX: &str = "application/vnd.cncf.model.";
const LEGACY_PREFIX: &str = "application/vnd.cnai.model.";

/// True when `media_type` is the ModelPack config media type, current or legacy.
pub fn is_model_config(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_MODEL_CONFIG || media_type == LEGACY_MEDIA_TYPE_MODEL_CONFIG
}

/// True when `artifact_type` is the ModelPack manifest artifact type, current or legacy.
pub fn is_model_artifact(artifact_type: &str) -> bool {
    artifact_type == ARTIFACT_TYPE_MODEL_MANIFEST
        || artifact_type == LEGACY_ARTIFACT_TYPE_MODEL_MANIFEST
}

/// What a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    /// Configuration of the weights (config.json, tokenizer files, ...).
    WeightConfig,
    /// Model weights.
    Weight,
    /// Code (scripts, modelling code).
    Code,
    /// Documentation (README, LICENSE, ...).
    Doc,
    /// Data sets used during the model's lifecycle.
    Dataset,
}

impl LayerKind {
    /// Every kind, in the order layers are grouped in a manifest.
    pub const ALL: [LayerKind; 5] = [
        LayerKind::WeightConfig,
        LayerKind::Weight,
        LayerKind::Code,
        LayerKind::Doc,
        LayerKind::Dataset,
    ];

    /// The kind's segment in a media type (`weight.config`).
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::WeightConfig => "weight.config",
            LayerKind::Weight => "weight",
            LayerKind::Code => "code",
            LayerKind::Doc => "doc",
            LayerKind::Dataset => "dataset",
        }
    }

    /// The Modelfile directive that selects this kind.
    pub fn directive(self) -> &'static str {
        match self {
            LayerKind::WeightConfig => "CONFIG",
            LayerKind::Weight => "MODEL",
            LayerKind::Code => "CODE",
            LayerKind::Doc => "DOC",
            LayerKind::Dataset => "DATASET",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a layer's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The file's bytes, as they are.
    Raw,
    /// An uncompressed tar archive.
    Tar,
    /// A gzip-compressed tar archive.
    TarGzip,
    /// A zstd-compressed tar archive.
    TarZstd,
}

impl Encoding {
    /// Every encoding.
    pub const ALL: [Encoding; 4] = [
        Encoding::Raw,
        Encoding::Tar,
        Encoding::TarGzip,
        Encoding::TarZstd,
    ];

    /// The encoding's suffix in a media type (`tar+gzip`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Tar => "tar",
            Encoding::TarGzip => "tar+gzip",
            Encoding::TarZstd => "tar+zstd",
        }
    }

    /// True for the three tar encodings.
    pub fn is_tar(self) -> bool {
        !matches!(self, Encoding::Raw)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ModelPack layer media type: `application/vnd.cncf.model.<kind>.v1.<encoding>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerMediaType {
    /// What the layer holds.
    pub kind: LayerKind,
    /// How its bytes are encoded.
    pub encoding: Encoding,
    legacy: bool,
}

impl LayerMediaType {
    /// The media type for `kind` in `encoding`, with the current prefix.
    pub fn new(kind: LayerKind, encoding: Encoding) -> Self {
        LayerMediaType {
            kind,
            encoding,
            legacy: false,
        }
    }

    /// True when it was read with the legacy `vnd.cnai` prefix.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// Every one of the 20 layer media types.
    pub fn all() -> impl Iterator<Item = LayerMediaType> {
        LayerKind::ALL.into_iter().flat_map(|kind| {
            Encoding::ALL
                .into_iter()
                .map(move |encoding| LayerMediaType::new(kind, encoding))
        })
    }
}

/// Which spelling of the ModelPack names a writer uses: the spec's `cncf` names (the default),
/// or the legacy `cnai` ones that modctl writes again for registries keyed on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameSpelling {
    /// `application/vnd.cncf.model.*` and `org.cncf.model.*`.
    #[default]
    Cncf,
    /// `application/vnd.cnai.model.*` and `org.cnai.model.*`.
    Cnai,
}

impl NameSpelling {
    /// The manifest's `artifactType`.
    pub fn artifact_type(self) -> &'static str {
        match self {
            NameSpelling::Cncf => ARTIFACT_TYPE_MODEL_MANIFEST,
            NameSpelling::Cnai => LEGACY_ARTIFACT_TYPE_MODEL_MANIFEST,
        }
    }

    /// The config's media type.
    pub fn config_media_type(self) -> &'static str {
        match self {
            NameSpelling::Cncf => MEDIA_TYPE_MODEL_CONFIG,
            NameSpelling::Cnai => LEGACY_MEDIA_TYPE_MODEL_CONFIG,
        }
    }

    /// A layer's media type.
    pub fn layer_media_type(self, media_type: LayerMediaType) -> String {
        let prefix = match self {
            NameSpelling::Cncf => PREFIX,
            NameSpelling::Cnai => LEGACY_PREFIX,
        };
        format!("{prefix}{}.v1.{}", media_type.kind, media_type.encoding)
    }

    /// The layer annotation keys: file path, file metadata, untested.
    pub fn annotation_keys(self) -> [&'static str; 3] {
        use crate::annotations as a;
        match self {
            NameSpelling::Cncf => [
                a::ANNOTATION_FILEPATH,
                a::ANNOTATION_FILE_METADATA,
                a::ANNOTATION_MEDIATYPE_UNTESTED,
            ],
            NameSpelling::Cnai => [
                a::LEGACY_ANNOTATION_FILEPATH,
                a::LEGACY_ANNOTATION_FILE_METADATA,
                a::LEGACY_ANNOTATION_MEDIATYPE_UNTESTED,
            ],
        }
    }
}

impl NameSpelling {
    /// `descriptor` (a layer written with the `cncf` names) with this spelling's media type and
    /// annotation keys.
    pub fn respell(
        self,
        descriptor: &oci_spec::image::Descriptor,
    ) -> Result<oci_spec::image::Descriptor> {
        let mut out = descriptor.clone();
        if self == NameSpelling::Cncf {
            return Ok(out);
        }
        let media_type: LayerMediaType = descriptor.media_type().as_ref().parse()?;
        out.set_media_type(oci_spec::image::MediaType::from(
            self.layer_media_type(media_type).as_str(),
        ));
        if let Some(annotations) = descriptor.annotations() {
            let from = NameSpelling::Cncf.annotation_keys();
            let to = self.annotation_keys();
            let renamed = annotations
                .iter()
                .map(|(k, v)| {
                    let key = from
                        .iter()
                        .position(|f| f == k)
                        .map_or(k.as_str(), |i| to[i]);
                    (key.to_owned(), v.clone())
                })
                .collect();
            out.set_annotations(Some(renamed));
        }
        Ok(out)
    }
}

impl FromStr for NameSpelling {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cncf" => Ok(NameSpelling::Cncf),
            "cnai" => Ok(NameSpelling::Cnai),
            other => Err(Error::Invalid {
                what: "media type prefix",
                reason: format!("{other:?} is neither cncf nor cnai"),
            }),
        }
    }
}

impl fmt::Display for LayerMediaType {
    /// Always prints the current (`vnd.cncf`) prefix, never the legacy one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}.v1.{}", self.kind, self.encoding)
    }
}

impl FromStr for LayerMediaType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (rest, legacy) = if let Some(rest) = s.strip_prefix(PREFIX) {
            (rest, false)
        } else if let Some(rest) = s.strip_prefix(LEGACY_PREFIX) {
            (rest, true)
        } else {
            return Err(Error::UnknownMediaType(s.to_owned()));
        };
        let (kind, encoding) = rest
            .split_once(".v1.")
            .ok_or_else(|| Error::UnknownMediaType(s.to_owned()))?;
        let kind = LayerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| Error::UnknownMediaType(s.to_owned()))?;
        let encoding = Encoding::ALL
            .into_iter()
            .find(|e| e.as_str() == encoding)
            .ok_or_else(|| Error::UnknownMediaType(s.to_owned()))?;
        Ok(LayerMediaType {
            kind,
            encoding,
            legacy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_types_round_trip() {
        let all: Vec<_> = LayerMediaType::all().collect();
        assert_eq!(all.len(), 20);
        for mt in all {
            let text = mt.to_string();
            assert!(text.starts_with("application/vnd.cncf.model."), "{text}");
            assert_eq!(text.parse::<LayerMediaType>().ok(), Some(mt));
        }
    }

    #[test]
    fn exact_strings() {
        let mt = LayerMediaType::new(LayerKind::WeightConfig, Encoding::TarZstd);
        assert_eq!(
            mt.to_string(),
            "application/vnd.cncf.model.weight.config.v1.tar+zstd"
        );
        let mt = LayerMediaType::new(LayerKind::Weight, Encoding::Raw);
        assert_eq!(mt.to_string(), "application/vnd.cncf.model.weight.v1.raw");
    }

    #[test]
    fn legacy_read_never_written() {
        let mt: LayerMediaType = "application/vnd.cnai.model.doc.v1.tar+gzip"
            .parse()
            .expect("legacy media type parses");
        assert!(mt.is_legacy());
        assert_eq!(mt.kind, LayerKind::Doc);
        assert_eq!(mt.encoding, Encoding::TarGzip);
        assert_eq!(mt.to_string(), "application/vnd.cncf.model.doc.v1.tar+gzip");
    }

    #[test]
    fn rejects_unknown() {
        for bad in [
            "application/vnd.cncf.model.unknown.v1.raw",
            "application/vnd.cncf.model.weight.v2.raw",
            "application/vnd.cncf.model.weight.v1.zip",
            "application/octet-stream",
            "",
        ] {
            assert!(bad.parse::<LayerMediaType>().is_err(), "{bad}");
        }
    }
}
