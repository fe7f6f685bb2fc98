//! The node's one error. Every refusal and failure a handler can meet is one of these;
//! it becomes a gRPC status in one place (`From<Error> for Status`) and the audit
//! record's outcome in another (`Error::code`, `Error::decision`), so the two can never
//! disagree. Codes are stable: operators grep logs and audit records for them.

use tonic::{Code, Status};

use crate::pointer::FieldError;

/// What went wrong with a request, as the caller and the audit log are told.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Who is asking could not be established (certificate, token, proof, address).
    #[error("{0}")]
    Unauthenticated(String),
    /// Who is asking is known and not allowed: a missing role, a write for another
    /// organization, the legal configuration's rules (named in the message).
    #[error("{0}")]
    Denied(String),
    /// The node is at a limit: retry shortly, or send less.
    #[error("{0}")]
    Overloaded(String),
    /// The node cannot answer now (shutting down, its audit log cannot record).
    #[error("{0}")]
    Unavailable(String),
    /// The node's state does not allow it now.
    #[error("{0}")]
    Precondition(String),
    /// Asked beyond what exists (a proof outside the log).
    #[error("{0}")]
    OutOfRange(String),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The node failed; the caller is told to see its log, which has the source.
    #[error("the node could not complete the request; see its log")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A status from the transport (a client stream's error), passed on as it came.
    #[error("{}", .0.message())]
    Wire(Status),
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::Unauthenticated(message.into())
    }

    pub fn denied(message: impl Into<String>) -> Self {
        Self::Denied(message.into())
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::Overloaded(message.into())
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(message.into())
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::Precondition(message.into())
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::OutOfRange(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    pub fn internal(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Internal(Box::new(source))
    }

    /// The stable code of this kind of error, as the audit record carries it.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "PIL-INVALID",
            Error::Unauthenticated(_) => "PIL-UNAUTHENTICATED",
            Error::Denied(_) => "PIL-DENIED",
            Error::Overloaded(_) => "PIL-OVERLOADED",
            Error::Unavailable(_) => "PIL-UNAVAILABLE",
            Error::Precondition(_) => "PIL-PRECONDITION",
            Error::OutOfRange(_) => "PIL-OUT-OF-RANGE",
            Error::NotFound(_) => "PIL-NOT-FOUND",
            Error::Internal(_) => "PIL-INTERNAL",
            Error::Wire(_) => "PIL-TRANSPORT",
        }
    }

    /// The decision an audit record states for this error, when no policy decided:
    /// a refused identity is unauthenticated, a refused role or peer a denial.
    pub fn decision(&self) -> Option<&'static str> {
        match self {
            Error::Unauthenticated(_) => Some("unauthenticated"),
            Error::Denied(_) => Some("denied"),
            Error::Wire(s) if s.code() == Code::Unauthenticated => Some("unauthenticated"),
            _ => None,
        }
    }

    /// The gRPC code this error is answered with.
    pub fn grpc_code(&self) -> Code {
        match self {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Denied(_) => Code::PermissionDenied,
            Error::Overloaded(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::NotFound(_) => Code::NotFound,
            Error::Internal(_) => Code::Internal,
            Error::Wire(s) => s.code(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Wire(status) => status,
            Error::Internal(source) => {
                tracing::error!(error = %source, "request failed");
                Status::internal("the node could not complete the request; see its log")
            }
            other => Status::new(other.grpc_code(), other.to_string()),
        }
    }
}

impl From<FieldError> for Error {
    fn from(e: FieldError) -> Self {
        Error::Invalid(e.to_string())
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Wire(status)
    }
}

/// The canonical gRPC name of a status code, as recorded.
pub fn status_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_code_and_a_distinct_stable_code() {
        let all = [
            Error::invalid("x"),
            Error::unauthenticated("x"),
            Error::denied("x"),
            Error::overloaded("x"),
            Error::unavailable("x"),
            Error::precondition("x"),
            Error::out_of_range("x"),
            Error::internal(std::io::Error::other("disk")),
            Error::Wire(Status::cancelled("x")),
        ];
        let mut codes: Vec<_> = all.iter().map(Error::code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for e in all {
            let (code, text) = (e.grpc_code(), e.to_string());
            let status = Status::from(e);
            assert_eq!(status.code(), code);
            if code != Code::Internal {
                assert_eq!(status.message(), text);
            } else {
                assert!(
                    !status.message().contains("disk"),
                    "the source stays in the log"
                );
            }
        }
    }
}
