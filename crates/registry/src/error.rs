//! The registry client's one error type.

use std::time::Duration;

/// What went wrong talking to a registry. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status; `code` is the distribution error code if any.
    #[error("{method} {url}: {status}{}", code.as_ref().map(|c| format!(" ({c}: {message})")).unwrap_or_default())]
    Status {
        /// HTTP method.
        method: String,
        /// URL without credentials or query secrets.
        url: String,
        /// HTTP status.
        status: u16,
        /// Distribution error code (`BLOB_UNKNOWN`, `DENIED`, ...).
        code: Option<String>,
        /// Its message.
        message: String,
    },
    /// Authentication was refused.
    #[error("authentication to {registry} failed: {reason}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// Why (never the secret).
        reason: String,
    },
    /// A connection or protocol error.
    #[error("{method} {url}: {}", describe(error))]
    Http {
        /// HTTP method.
        method: String,
        /// URL.
        url: String,
        /// The transport error (its cause is already in the message, so it is not chained).
        error: reqwest::Error,
    },
    /// Retries ran out or the deadline passed.
    #[error("{what}: gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        /// What was being done.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last error.
        last: Box<Error>,
    },
    /// A response that breaks the protocol (missing Location, bad JSON, wrong size).
    #[error("{0}")]
    Protocol(String),
    /// Bytes that did not match their digest.
    #[error("digest mismatch for {expected}: got {actual}")]
    DigestMismatch {
        /// The expected digest.
        expected: String,
        /// What the bytes hashed to.
        actual: String,
    },
    /// Reading credentials or local files.
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed registry hosts file (`hosts.toml`), or one naming files that cannot be used.
    #[error("hosts file {}: {reason}", path.display())]
    HostsFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    /// A spec-level problem (bad digest or reference).
    #[error(transparent)]
    Spec(#[from] modelpack_spec::Error),
}

impl Error {
    /// True for 404s and unknown-blob/manifest errors.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status == 404,
            Error::GaveUp { last, .. } => last.is_not_found(),
            _ => false,
        }
    }

    /// True when retrying may help: connection errors, 5xx, 429, timeouts.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Error::Http { error, .. } if is_certificate_error(error) => false,
            Error::Http { error, .. } => {
                error.is_connect()
                    || error.is_timeout()
                    || error.is_request()
                    || error.is_body()
                    || error.is_decode()
            }
            _ => false,
        }
    }

    /// True when the registry refused our credentials.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Error::Unauthorized { .. })
            || matches!(
                self,
                Error::Status {
                    status: 401 | 403,
                    ..
                }
            )
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            Error::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }
}

/// A transport error with its innermost cause (reqwest's own text names only the URL; the cause
/// says what happened, e.g. `invalid peer certificate: UnknownIssuer`).
fn describe(e: &reqwest::Error) -> String {
    let mut innermost: Option<String> = None;
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        innermost = Some(cause.to_string());
        next = cause.source();
    }
    let top = e.without_url_text();
    match innermost {
        Some(cause) if !top.contains(&cause) => format!("{top}: {cause}"),
        _ => top,
    }
}

/// True when the TLS handshake refused the server's certificate: retrying cannot help.
fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        if cause.to_string().contains("certificate") {
            return true;
        }
        next = cause.source();
    }
    false
}

/// reqwest's message without the URL it repeats (the variant names the URL already).
trait WithoutUrl {
    fn without_url_text(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_text(&self) -> String {
        let text = self.to_string();
        match text.find(" for url (") {
            Some(at) => text[..at].to_owned(),
            None => text,
        }
    }
}

/// Result with the registry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
