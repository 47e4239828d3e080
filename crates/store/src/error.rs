//! The store's one error type.

use std::io;
use std::path::PathBuf;

use modelpack_spec::Digest;

/// What went wrong in the local store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a path of the store.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
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

/// Attaches a path to an I/O error.
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
