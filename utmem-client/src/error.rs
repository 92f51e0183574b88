//! The one error type of the client.

use std::time::Duration;

use utmem_proto::{Op, Status};

/// What went wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The host cannot be reached, or the connection broke with the request in flight.
    #[error("utmem host unreachable at {target}: {reason}")]
    Unreachable {
        /// The transport, e.g. `unix:/run/utmem.sock`.
        target: String,
        /// What failed.
        reason: String,
    },
    /// The host answered with a status other than OK (or MISS for a GET).
    #[error("utmem host refused {op:?}: {status}")]
    Refused {
        /// The request's op.
        op: Op,
        /// The host's answer.
        status: Status,
    },
    /// The host sent something that does not follow utmem-proto.
    #[error("utmem protocol error: {0}")]
    Protocol(String),
    /// No answer within the configured time.
    #[error("utmem request timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// A transport spec that does not parse.
    #[error("bad transport {spec:?}: expected unix:/path, vsock:PORT, vsock:CID:PORT, device:/dev/utmem or auto")]
    BadSpec {
        /// What was given.
        spec: String,
    },
    /// A request the client itself rejects before sending (e.g. a value over the host's limit).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// True for errors that say the host is away (worth a retry later).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}
