//! The lazy filesystem's one error type, and the one place an error becomes the errno the
//! kernel (and so the reading program) sees.

use std::path::PathBuf;

use fuser::Errno;

/// Why a mount or a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] modelpack_registry::Error),
    /// Fetching a blob failed.
    #[error(transparent)]
    Transfer(#[from] modelpack_transfer::Error),
    /// Unpacking a tar layer failed.
    #[error(transparent)]
    Extract(#[from] modelpack_extract::Error),
    /// A spec-level problem.
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
    /// The artifact is not a valid ModelPack artifact.
    #[error("{0}")]
    Invalid(String),
    /// The FUSE mount itself failed.
    #[error("mounting at {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cache folder cannot be used.
    #[error("cache folder {path}: {message}")]
    Cache {
        /// The folder.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Bytes could not be served: a fetch, a verification or the local cache failed.
    #[error("{0}")]
    Read(String),
    /// No such entry.
    #[error("no such entry")]
    NotFound,
    /// A folder was expected.
    #[error("not a folder")]
    NotDir,
    /// A file was expected, and this is a folder.
    #[error("is a folder")]
    IsDir,
    /// The entry is a symbolic link (and is not followed here).
    #[error("is a symbolic link")]
    Symlink,
    /// The operation does not apply to this kind of entry.
    #[error("not valid for this entry")]
    WrongKind,
    /// The filesystem is read-only.
    #[error("read-only filesystem")]
    ReadOnly,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoAttribute,
}

/// The old name of [`Error`], for mount failures.
pub type MountError = Error;

impl Error {
    /// The errno a filesystem operation answers with: the kind of entry problems as the kernel
    /// names them, anything that failed while producing bytes as `EIO`.
    pub fn errno(&self) -> Errno {
        match self {
            Error::NotFound => Errno::ENOENT,
            Error::NotDir => Errno::ENOTDIR,
            Error::IsDir => Errno::EISDIR,
            Error::Symlink => Errno::from_i32(libc::ELOOP),
            Error::WrongKind => Errno::EINVAL,
            Error::ReadOnly => Errno::EROFS,
            Error::NoAttribute => Errno::NO_XATTR,
            Error::Registry(_)
            | Error::Transfer(_)
            | Error::Extract(_)
            | Error::Spec(_)
            | Error::Invalid(_)
            | Error::Mount { .. }
            | Error::Cache { .. }
            | Error::Read(_) => Errno::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_problems_keep_their_errno_and_failed_bytes_are_eio() {
        let cases = [
            (Error::NotFound, libc::ENOENT),
            (Error::NotDir, libc::ENOTDIR),
            (Error::IsDir, libc::EISDIR),
            (Error::Symlink, libc::ELOOP),
            (Error::WrongKind, libc::EINVAL),
            (Error::ReadOnly, libc::EROFS),
            (Error::NoAttribute, Errno::NO_XATTR.code()),
            (Error::Read("chunk 3: digest mismatch".into()), libc::EIO),
            (Error::Invalid("bad".into()), libc::EIO),
        ];
        for (error, code) in cases {
            assert_eq!(error.errno().code(), code, "{error}");
        }
    }
}
