//! The transfer crate's one error type: which side failed, and what.

/// What went wrong moving content.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] modelpack_registry::Error),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] modelpack_store::Error),
    /// Writing files into a folder failed (or was refused).
    #[error(transparent)]
    Extract(#[from] modelpack_extract::Error),
    /// A spec-level problem.
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
    /// Downloaded bytes did not match the digest the manifest names.
    #[error("blob {digest}: downloaded bytes hash to {actual}; nothing was stored")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// What the bytes hashed to.
        actual: String,
    },
    /// Downloaded size differs from the descriptor's.
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// Size in the descriptor.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// Local file I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something the engine does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// Cancelled (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// True when the content is not where it was looked for (a registry's 404, a blob the
    /// store lacks).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Registry(e) => e.is_not_found(),
            Error::Store(e) => e.is_not_found(),
            _ => false,
        }
    }

    /// True when bytes failed verification.
    pub fn is_digest_mismatch(&self) -> bool {
        matches!(
            self,
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. }
        )
    }
}

/// Result with the transfer crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
