//! The model config blob (`application/vnd.cncf.model.config.v1+json`): typed, strict on unknown
//! fields, arrays never written as `null`, date-times in RFC 3339.
//!
//! Spec: <https://github.com/modelpack/model-spec/blob/d78bf3231b4f26196c4a955e1007ccc47e19a77c/docs/config.md>

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The whole config document. Keys are written in the order the reference Go types use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// General information about the model.
    pub descriptor: ModelDescriptor,
    /// The layers that make up the model's file system.
    pub modelfs: ModelFs,
    /// Technical metadata.
    pub config: ModelConfig,
}

/// `descriptor`: who made the model and what it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelDescriptor {
    /// Creation time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::serde_rfc3339_opt"
    )]
    pub created_at: Option<DateTime<FixedOffset>>,
    /// Contacts of the authors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authors: Option<Vec<String>>,
    /// Model lineage, e.g. `llama3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Model name (non-empty when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// URL of more documentation.
    #[serde(default, rename = "docURL", skip_serializing_if = "Option::is_none")]
    pub doc_url: Option<String>,
    /// URL of the source.
    #[serde(default, rename = "sourceURL", skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// URLs of the training data sets.
    #[serde(
        default,
        rename = "datasetsURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub datasets_url: Option<Vec<String>>,
    /// Model version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Source-control revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Distributing organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// SPDX license expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licenses: Option<Vec<String>>,
    /// Human-readable title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Human-readable description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `config`: architecture, format, size and precision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelConfig {
    /// e.g. `transformer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// e.g. `safetensors`, `gguf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Parameter count, e.g. `8b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_size: Option<String>,
    /// e.g. `bfloat16`, or several joined by commas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// e.g. `awq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// What the model can do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<ModelCapabilities>,
}

/// `config.capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelCapabilities {
    /// Input modalities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_types: Option<Vec<Modality>>,
    /// Output modalities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_types: Option<Vec<Modality>>,
    /// Knowledge cut-off time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::serde_rfc3339_opt"
    )]
    pub knowledge_cutoff: Option<DateTime<FixedOffset>>,
    /// Can reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<bool>,
    /// Can call tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_usage: Option<bool>,
    /// Is a reward model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<bool>,
    /// ISO 639-1 language codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub languages: Option<Vec<String>>,
}

/// A modality of input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Text.
    Text,
    /// Images.
    Image,
    /// Audio.
    Audio,
    /// Video.
    Video,
    /// Embedding vectors.
    Embedding,
    /// Anything else.
    Other,
}

/// `modelfs`: the layers' uncompressed digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub fs_type: ModelFsType,
    /// One digest per layer, in layer order: the raw bytes for `.raw` layers, the uncompressed tar
    /// otherwise.
    pub diff_ids: Vec<Digest>,
}

/// The only `modelfs.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelFsType {
    /// `layers`.
    #[serde(rename = "layers")]
    Layers,
}

impl Model {
    /// Validates and parses a config blob; every validation error is in the error's text.
    pub fn from_slice(bytes: &[u8]) -> Result<Model> {
        let report = crate::validate::validate_config(bytes);
        if !report.is_valid() {
            let reason = report
                .errors()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::Invalid {
                what: "model config",
                reason,
            });
        }
        serde_json::from_slice(bytes).map_err(|source| Error::Json {
            what: "model config",
            source,
        })
    }

    /// The config blob bytes: compact JSON, so the digest is stable.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_round_trip_has_no_nulls() {
        let model = Model {
            descriptor: ModelDescriptor {
                name: Some("m".into()),
                ..Default::default()
            },
            modelfs: ModelFs {
                fs_type: ModelFsType::Layers,
                diff_ids: vec![Digest::sha256_of(b"x")],
            },
            config: ModelConfig::default(),
        };
        let text = String::from_utf8(model.to_vec()).expect("utf8");
        assert!(!text.contains("null"), "{text}");
        assert!(text.starts_with(
            r#"{"descriptor":{"name":"m"},"modelfs":{"type":"layers","diffIds":["sha256:"#
        ));
        assert!(text.ends_with(r#""]},"config":{}}"#), "{text}");
        assert_eq!(Model::from_slice(text.as_bytes()).expect("parses"), model);
    }

    #[test]
    fn strict_on_unknown_fields() {
        let d = Digest::sha256_of(b"x");
        let doc = format!(
            r#"{{"descriptor":{{}},"config":{{"capabilities":{{"embedding":false}}}},"modelfs":{{"type":"layers","diffIds":["{d}"]}}}}"#
        );
        assert!(Model::from_slice(doc.as_bytes()).is_err());
    }
}
