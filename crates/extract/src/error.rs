//! The extract crate's one error type.

use std::io;
use std::path::PathBuf;

use modelpack_spec::Digest;

/// What went wrong extracting a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
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

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}
