//! The build crate's one error type.

use std::path::PathBuf;

use modelpack_store::PathIoError;

/// What went wrong building an artifact.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file of the model.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// A Modelfile that does not parse.
    #[error("Modelfile line {line}: {message}")]
    Modelfile {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A glob that is malformed, escapes the context or matches nothing.
    #[error("pattern {pattern:?}: {message}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// A symbolic link whose target leaves the model directory.
    #[error("symlink {path} points outside the model directory ({target})")]
    SymlinkEscape {
        /// The link, relative to the context.
        path: String,
        /// Its target.
        target: String,
    },
    /// A file that cannot be part of a model (device, socket, FIFO, bad name).
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Nothing to package.
    #[error("no files to package in {0}")]
    NoFiles(PathBuf),
    /// A store error.
    #[error(transparent)]
    Store(#[from] modelpack_store::Error),
    /// A spec error.
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
}

/// Result with the build crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
