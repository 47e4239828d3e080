//! The extract crate's one error type.

use modelpack_spec::Digest;
use modelpack_store::PathIoError;

/// What went wrong extracting a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// An entry that would write outside the target or is not allowed in a model.
    #[error("layer {layer}: refusing {path:?}: {reason}")]
    Refused {
        /// The layer's digest.
        layer: Digest,
        /// The entry's path as the layer has it.
        path: String,
        /// Why.
        reason: String,
    },
    /// A layer whose bytes do not match its digest.
    #[error("layer {expected}: content does not match its digest (got {actual})")]
    DigestMismatch {
        /// The digest the manifest names.
        expected: Digest,
        /// The digest of the bytes read.
        actual: Digest,
    },
    /// A layer that is not the size the manifest says.
    #[error("layer {digest}: {message}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// What is wrong.
        message: String,
    },
    /// A bad `--pattern`.
    #[error("pattern {pattern:?}: {message}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// The extraction was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A store error.
    #[error(transparent)]
    Store(#[from] modelpack_store::Error),
}

/// Result with the extract crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
