//! The store's one error type.

use std::io;
use std::path::{Path, PathBuf};

use modelpack_spec::Digest;

/// What went wrong in the local store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a path of the store.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// No blob with that digest.
    #[error("blob {0} is not in the store")]
    BlobNotFound(Digest),
    /// No artifact under that name.
    #[error("{0} is not in the store")]
    RefNotFound(String),
    /// Bytes whose digest is not the one they were stored under.
    #[error("digest mismatch for {path}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Where the bytes are.
        path: PathBuf,
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// A blob larger than the caller allows in memory.
    #[error("blob {digest} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A store file that is not what the OCI layout says it should be.
    #[error("corrupt store file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A spec-level problem (bad digest, bad reference, bad manifest).
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
}

impl Error {
    /// True when the thing asked for is not in the store.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::BlobNotFound(_) | Error::RefNotFound(_))
    }

    /// True when stored bytes did not match their digest.
    pub fn is_digest_mismatch(&self) -> bool {
        matches!(self, Error::DigestMismatch { .. })
    }
}

/// Result with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An I/O error with the path it happened on, as [`IoContext::at`] makes it: the `Io` variant
/// of the store's, the build's and the extract crate's errors.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct PathIoError {
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Attaches a path to an I/O error.
pub trait IoContext<T> {
    /// The error, if any, as a [`PathIoError`] naming `path`.
    fn at(self, path: &Path) -> Result<T, PathIoError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, PathIoError> {
        self.map_err(|source| PathIoError {
            path: path.to_owned(),
            source,
        })
    }
}
