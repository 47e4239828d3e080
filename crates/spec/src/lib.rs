//! The ModelPack specification as Rust types, with no I/O.
//!
//! - [`LayerMediaType`] (kind x encoding) and the artifact/config media types in [`media_type`];
//! - [`Model`], the config blob, strict on unknown fields;
//! - [`FileMetadata`] and the annotation keys in [`annotations`];
//! - [`validate_config`], [`validate_manifest`] and [`validate_artifact`], which report every
//!   problem with its JSON path and agree with the upstream schema on its test vectors;
//! - checked values: [`Digest`], [`LayerPath`], [`Reference`];
//! - [`ModelManifest`], a validated manifest with typed layers;
//! - [`zstd_seek`], the seek table that keeps our zstd layers randomly readable.
//!
//! ```
//! use modelpack_spec::{Encoding, LayerKind, LayerMediaType};
//!
//! let mt: LayerMediaType = "application/vnd.cncf.model.weight.v1.raw".parse().unwrap();
//! assert_eq!(mt, LayerMediaType::new(LayerKind::Weight, Encoding::Raw));
//! assert!(modelpack_spec::validate_config(b"{}").errors().count() > 0);
//! ```
#![deny(missing_docs, missing_debug_implementations)]

pub mod annotations;
mod chunk_index;
mod config;
mod digest;
mod error;
pub mod labels;
mod manifest;
pub mod media_type;
mod path;
mod reference;
pub mod time;
mod validate;
pub mod zstd_seek;

pub use annotations::FileMetadata;
pub use chunk_index::{ChunkHasher, ChunkIndex};
pub use config::{
    Modality, Model, ModelCapabilities, ModelConfig, ModelDescriptor, ModelFs, ModelFsType,
};
pub use digest::Digest;
pub use error::{Error, Result};
pub use manifest::{
    ModelLayer, ModelManifest, descriptor, is_model_manifest, to_canonical_json, unnamed_layer_path,
};
pub use media_type::{Encoding, LayerKind, LayerMediaType, NameSpelling};
pub use path::{LayerPath, link_stays_inside};
pub use reference::{DEFAULT_REGISTRY, DEFAULT_TAG, Reference};
pub use validate::{
    DocumentKind, MAX_DOCUMENT_SIZE, PRECISIONS, Problem, Report, Severity, detect_kind,
    parse_document, validate_artifact, validate_config, validate_config_value, validate_manifest,
    validate_manifest_value,
};

/// Re-exported because its types appear in this crate's API.
pub use oci_spec;

/// The sha256 digest of zero bytes.
pub const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
