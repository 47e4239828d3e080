//! The spec crate's one error type.

/// What went wrong parsing or checking a ModelPack value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A media type that is not one of the ModelPack layer types.
    #[error("unknown ModelPack layer media type {0:?}")]
    UnknownMediaType(String),
    /// A digest that does not follow the OCI digest grammar.
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        /// The text that was given.
        digest: String,
        /// Why it is not a digest.
        reason: &'static str,
    },
    /// A file path that is not a safe relative POSIX path.
    #[error("unsafe file path {path:?}: {reason}")]
    UnsafePath {
        /// The path that was given.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A reference that cannot be parsed.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference that was given.
        reference: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A JSON document that does not parse into the expected type.
    #[error("invalid {what}: {source}")]
    Json {
        /// What was being parsed.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A document or annotation that parsed but breaks a ModelPack rule.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being checked.
        what: &'static str,
        /// The broken rule.
        reason: String,
    },
    /// A zstd seek table that is malformed.
    #[error("invalid zstd seek table: {0}")]
    SeekTable(&'static str),
}

/// Result with the spec crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
