//! The plugin's one error type and its one mapping to the gRPC status codes the CSI
//! specification asks for (kubelet retries every failure; the code tells an operator why).

use modelpack_lazyfs::Error as MountError;

/// Why a CSI call failed. Messages never hold credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for what this plugin never does (a writable or block
    /// volume, a bad reference): `INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model or the volume does not exist: `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// The target path already serves another volume: `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// The registry refused the credentials: `PERMISSION_DENIED`.
    #[error("{0}")]
    PermissionDenied(String),
    /// The registry cannot be reached now: `UNAVAILABLE` (kubelet tries again).
    #[error("{0}")]
    Unavailable(String),
    /// Mounting or bookkeeping on the node failed: `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Classifies a failure to resolve or mount `reference`.
    pub fn resolving(reference: &str, error: &MountError) -> Error {
        let message = format!("model {reference}: {error}");
        let registry = match error {
            MountError::Registry(e) => Some(e),
            MountError::Transfer(e) => return classify_transfer(message, e),
            _ => None,
        };
        match registry {
            Some(e) => classify_registry(message, e),
            None => match error {
                MountError::Spec(_) | MountError::Invalid(_) => Error::InvalidArgument(message),
                _ => Error::Internal(message),
            },
        }
    }
}

fn classify_transfer(message: String, error: &modelpack_transfer::Error) -> Error {
    match error {
        modelpack_transfer::Error::Registry(e) => classify_registry(message, e),
        e if e.is_not_found() => Error::NotFound(message),
        _ => Error::Unavailable(message),
    }
}

fn classify_registry(message: String, error: &modelpack_registry::Error) -> Error {
    if error.is_not_found() {
        Error::NotFound(message)
    } else if error.is_unauthorized() {
        Error::PermissionDenied(message)
    } else if matches!(error.status(), Some(400..=499)) && !error.is_retryable() {
        // The registry understood and said no (a malformed name, a manifest that is not ours).
        Error::InvalidArgument(message)
    } else {
        // Connection refused, timeouts, 5xx, retries given up: the registry is down for now.
        Error::Unavailable(message)
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> tonic::Status {
        let code = match &error {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Internal(_) => tonic::Code::Internal,
        };
        tonic::Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_status_code() {
        let cases = [
            (
                Error::InvalidArgument("a".into()),
                tonic::Code::InvalidArgument,
            ),
            (Error::NotFound("b".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("c".into()), tonic::Code::AlreadyExists),
            (
                Error::PermissionDenied("d".into()),
                tonic::Code::PermissionDenied,
            ),
            (Error::Unavailable("e".into()), tonic::Code::Unavailable),
            (Error::Internal("f".into()), tonic::Code::Internal),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn an_invalid_artifact_is_an_invalid_argument() {
        let e = Error::resolving("r/m:1", &MountError::Invalid("not a model".into()));
        assert!(matches!(e, Error::InvalidArgument(ref m) if m == "model r/m:1: not a model"));
    }
}
