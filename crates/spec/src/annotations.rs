//! Layer annotation keys and the typed file metadata they carry.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Relative POSIX path of the file a layer holds.
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
/// JSON-encoded [`FileMetadata`] of the file a layer holds.
pub const ANNOTATION_FILE_METADATA: &str = "org.cncf.model.file.metadata+json";
/// `"true"` when the layer's kind was guessed and not checked.
pub const ANNOTATION_MEDIATYPE_UNTESTED: &str = "org.cncf.model.file.mediatype.untested";
/// Legacy (<= v0.0.6) key for [`ANNOTATION_FILEPATH`] (written only with the `cnai` spelling).
pub const LEGACY_ANNOTATION_FILEPATH: &str = "org.cnai.model.filepath";
/// Legacy (<= v0.0.6) key for [`ANNOTATION_FILE_METADATA`] (written only with the `cnai`
/// spelling).
pub const LEGACY_ANNOTATION_FILE_METADATA: &str = "org.cnai.model.file.metadata+json";
/// Legacy (<= v0.0.6) key for [`ANNOTATION_MEDIATYPE_UNTESTED`] (written only with the `cnai`
/// spelling).
pub const LEGACY_ANNOTATION_MEDIATYPE_UNTESTED: &str = "org.cnai.model.file.mediatype.untested";
/// OCI title: the file name oras writes a layer to.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// OCI creation time (manifest level).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// OCI image-layout tag name of an index entry.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Manifest annotation: digest of the chunk-digest index blob (sha256 of each fixed-size chunk of
/// each raw layer), which lets lazy readers verify every chunk they serve.
pub const ANNOTATION_CHUNK_INDEX_DIGEST: &str = "dev.modelpack.chunk-index.digest";
/// Manifest annotation: size of the chunk-digest index blob.
pub const ANNOTATION_CHUNK_INDEX_SIZE: &str = "dev.modelpack.chunk-index.size";
/// Chunk size of the chunk-digest indexes we write.
pub const CHUNK_INDEX_CHUNK_SIZE: u64 = 2 * 1024 * 1024;

/// tar type flag of a regular file, as modctl writes it (the number 0, not ASCII `'0'`).
pub const TYPEFLAG_REGULAR: u8 = 0;
/// tar type flag of a symbolic link.
pub const TYPEFLAG_SYMLINK: u8 = 2;
/// tar type flag of a directory.
pub const TYPEFLAG_DIR: u8 = 5;

/// The file attributes a layer records (`org.cncf.model.file.metadata+json`). Fields this
/// version does not know are ignored, as the spec's Go types do, so a newer writer's metadata
/// still reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMetadata {
    /// File name (last path component).
    pub name: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Size in bytes.
    pub size: i64,
    /// Last modification time, RFC 3339.
    #[serde(with = "crate::time::serde_rfc3339")]
    pub mtime: DateTime<FixedOffset>,
    /// tar-style type flag ([`TYPEFLAG_REGULAR`], [`TYPEFLAG_SYMLINK`], [`TYPEFLAG_DIR`]).
    pub typeflag: u8,
}

impl FileMetadata {
    /// Parses the annotation value.
    pub fn from_annotation(value: &str) -> Result<FileMetadata> {
        let meta: FileMetadata = serde_json::from_str(value).map_err(|source| Error::Json {
            what: "file metadata annotation",
            source,
        })?;
        if meta.size < 0 {
            return Err(Error::Invalid {
                what: "file metadata annotation",
                reason: format!("negative size {}", meta.size),
            });
        }
        Ok(meta)
    }

    /// The annotation value: compact JSON.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let meta = FileMetadata {
            name: "model.safetensors".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 42,
            mtime: DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z").expect("date"),
            typeflag: TYPEFLAG_REGULAR,
        };
        let text = meta.to_annotation();
        assert_eq!(
            text,
            r#"{"name":"model.safetensors","mode":420,"uid":0,"gid":0,"size":42,"mtime":"2025-01-02T03:04:05Z","typeflag":0}"#
        );
        assert_eq!(FileMetadata::from_annotation(&text).expect("parses"), meta);
    }

    #[test]
    fn refuses_bad() {
        assert!(FileMetadata::from_annotation("{}").is_err());
        assert!(
            FileMetadata::from_annotation(
                r#"{"name":"a","mode":1,"uid":0,"gid":0,"size":-1,"mtime":"2025-01-02T03:04:05Z","typeflag":0}"#
            )
            .is_err()
        );
    }
}
