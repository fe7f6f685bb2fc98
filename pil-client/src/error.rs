//! What a call to a node can fail with, and what the caller should do about it.

use crate::profile::ProfileError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid node address {address:?}: {message}")]
    Address { address: String, message: String },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    /// An access token or DPoP proof could not be made.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The node answered with an error status. Not a `source`: its text is the
    /// status's own, said once.
    #[error("{}: {}{}", code_name(.0.code()), .0.message(), what_to_do(.0.code()))]
    Status(tonic::Status),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status(status)
    }
}

/// What a node's refusal means for the program that made the call: the node's error
/// kinds, as the integration guide lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is wrong (the message names the field): fix it, do not retry.
    Invalid,
    /// Certificate, token, proof or the node's address: fix them.
    Unauthenticated,
    /// Known and not allowed (role, rules, another organization's pointers).
    Denied,
    /// A limit (message size, the node's capacity): send less, or retry shortly.
    Overloaded,
    /// The node is unreachable, stopping or cannot record: retry later.
    Unavailable,
    /// No answer in time: retry, or allow more time.
    TimedOut,
    /// Anything else the node answered (see the message).
    Other,
}

impl ClientError {
    /// The kind of refusal, when the node answered with one.
    pub fn refusal(&self) -> Option<Refusal> {
        let ClientError::Status(status) = self else {
            return None;
        };
        Some(match status.code() {
            tonic::Code::InvalidArgument => Refusal::Invalid,
            tonic::Code::Unauthenticated => Refusal::Unauthenticated,
            tonic::Code::PermissionDenied => Refusal::Denied,
            tonic::Code::ResourceExhausted => Refusal::Overloaded,
            tonic::Code::Unavailable => Refusal::Unavailable,
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Refusal::TimedOut,
            _ => Refusal::Other,
        })
    }

    /// Whether the same call may succeed later unchanged (with a fresh DPoP proof).
    pub fn retryable(&self) -> bool {
        matches!(
            self.refusal(),
            Some(Refusal::Overloaded | Refusal::Unavailable | Refusal::TimedOut)
        ) || matches!(self, ClientError::Connect { .. })
    }
}

/// What the user can do about a status the node's message does not already say.
fn what_to_do(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unavailable => " (the node is unreachable or busy: retry later)",
        tonic::Code::DeadlineExceeded => " (no answer in time: retry, or allow more time)",
        tonic::Code::Unauthenticated => {
            " (check the profile's certificate and the access token it sends)"
        }
        _ => "",
    }
}

/// `InvalidArgument` → `invalid argument`: the gRPC code as a person reads it.
pub fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_to_do_once() {
        let e = ClientError::from(tonic::Status::invalid_argument("patient: is required"));
        assert_eq!(e.refusal(), Some(Refusal::Invalid));
        assert!(!e.retryable());
        assert_eq!(e.to_string(), "invalid argument: patient: is required");
        let e = ClientError::from(tonic::Status::unavailable("the node is shutting down"));
        assert_eq!(e.refusal(), Some(Refusal::Unavailable));
        assert!(e.retryable());
        assert!(
            std::error::Error::source(&e).is_none(),
            "said once, not again as a source"
        );
        let e = ClientError::from(tonic::Status::permission_denied("refused"));
        assert_eq!(e.refusal(), Some(Refusal::Denied));
        assert!(!e.retryable());
    }
}
