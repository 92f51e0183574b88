//! Decoding errors. Any of them means the peer is broken or hostile: the
//! connection is closed, nothing is allocated for the offending frame.

use crate::op::Op;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first four bytes are not the utmem magic.
    #[error("bad magic {0:#010x} (not a utmem frame)")]
    BadMagic(u32),
    /// The op byte names no known operation.
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    /// The status byte of a reply names no known status.
    #[error("unknown status {0:#04x}")]
    UnknownStatus(u8),
    /// The payload length is over what this op may carry under the negotiated limits.
    #[error("payload length {len} is over the limit {limit} for {op:?}")]
    TooLong {
        /// Operation of the frame.
        op: Op,
        /// Length the header announced.
        len: u64,
        /// Largest length allowed for this op.
        limit: u64,
    },
    /// A structured payload has the wrong size or content.
    #[error("malformed {what} payload: {why}")]
    BadPayload {
        /// Which payload.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}
