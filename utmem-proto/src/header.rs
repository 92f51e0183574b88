//! Fixed-size frame headers and the limits they are checked against.
//!
//! Request header, 40 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `UTMM` |
//! | 4 | 1 | version |
//! | 5 | 1 | op |
//! | 6 | 2 | flags (op-specific) |
//! | 8 | 8 | request id |
//! | 16 | 4 | pool id |
//! | 20 | 4 | key index |
//! | 24 | 8 | key object id |
//! | 32 | 8 | payload length |
//!
//! Reply header, 24 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `UTMM` |
//! | 4 | 1 | version |
//! | 5 | 1 | op of the request |
//! | 6 | 1 | status |
//! | 7 | 1 | reserved, zero |
//! | 8 | 8 | request id |
//! | 16 | 8 | payload length |

use crate::error::DecodeError;
use crate::op::{Op, Status};
use crate::types::{Key, PoolId, RequestId};

/// `UTMM` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"UTMM");
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 40;
/// Size of a reply header on the wire.
pub const REPLY_HEADER_LEN: usize = 24;
/// The vsock port `utmem-hostd` listens on unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 7719;
/// The smallest maximum value size a host may announce: Redis's own bulk limit.
pub const MIN_MAX_VALUE: u64 = 512 << 20;
/// The maximum value size a host announces unless configured otherwise.
pub const DEFAULT_MAX_VALUE: u64 = MIN_MAX_VALUE;
/// Largest payload of any op other than PUT requests and GET replies.
pub const MAX_CONTROL_PAYLOAD: u64 = 1024;

/// Lengths a decoder accepts; set by the HELLO negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value a PUT may carry and a GET may return.
    pub max_value: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value: DEFAULT_MAX_VALUE,
        }
    }
}

impl Limits {
    /// Largest payload a request of `op` may carry.
    pub fn request_payload(&self, op: Op) -> u64 {
        match op {
            Op::Put => self.max_value,
            Op::Hello | Op::NewPool => MAX_CONTROL_PAYLOAD,
            Op::Copy => crate::payload::CopyTarget::LEN as u64,
            Op::DestroyPool
            | Op::Get
            | Op::Flush
            | Op::FlushObject
            | Op::Stats
            | Op::Ping
            | Op::Map
            | Op::Channel
            | Op::Device => 0,
        }
    }

    /// Largest payload a reply to `op` may carry.
    pub fn reply_payload(&self, op: Op) -> u64 {
        match op {
            Op::Get => self.max_value,
            Op::Hello | Op::NewPool | Op::Stats => MAX_CONTROL_PAYLOAD,
            Op::Put => crate::payload::Placement::LEN as u64,
            Op::Map => crate::payload::MapReply::LEN as u64,
            Op::Channel => crate::payload::ChannelReply::LEN as u64,
            Op::Device => crate::payload::DeviceReply::LEN as u64,
            Op::DestroyPool | Op::Flush | Op::FlushObject | Op::Copy | Op::Ping => 0,
        }
    }
}

/// The header of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Protocol version the client speaks.
    pub version: u8,
    /// What to do.
    pub op: Op,
    /// Op-specific flags (pool kind for NEW_POOL).
    pub flags: u16,
    /// Echoed in the reply.
    pub id: RequestId,
    /// Pool the op works on (0 where unused).
    pub pool: PoolId,
    /// Key the op works on (zero where unused).
    pub key: Key,
    /// Payload bytes that follow the header.
    pub len: u64,
}

impl RequestHeader {
    /// A header for `op` with everything else zero and the current version.
    pub fn new(op: Op, id: RequestId) -> Self {
        RequestHeader {
            version: VERSION,
            op,
            flags: 0,
            id,
            pool: PoolId(0),
            key: Key::default(),
            len: 0,
        }
    }

    /// Wire bytes of this header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.version;
        b[5] = self.op as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.pool.0.to_le_bytes());
        b[20..24].copy_from_slice(&self.key.index.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.key.oid.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses and checks a header: magic, op, and the payload length against `limits`.
    /// The version is returned, not checked: the session decides what to do with it.
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN], limits: &Limits) -> Result<Self, DecodeError> {
        let magic = u32::from_le_bytes(arr(&b[0..4]));
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let op = Op::try_from(b[5])?;
        let len = u64::from_le_bytes(arr(&b[32..40]));
        let limit = limits.request_payload(op);
        if len > limit {
            return Err(DecodeError::TooLong { op, len, limit });
        }
        Ok(RequestHeader {
            version: b[4],
            op,
            flags: u16::from_le_bytes(arr(&b[6..8])),
            id: RequestId(u64::from_le_bytes(arr(&b[8..16]))),
            pool: PoolId(u32::from_le_bytes(arr(&b[16..20]))),
            key: Key::new(
                u64::from_le_bytes(arr(&b[24..32])),
                u32::from_le_bytes(arr(&b[20..24])),
            ),
            len,
        })
    }
}

/// The header of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    /// Protocol version of the host.
    pub version: u8,
    /// Op of the request this answers.
    pub op: Op,
    /// Outcome.
    pub status: Status,
    /// Id of the request this answers.
    pub id: RequestId,
    /// Payload bytes that follow the header.
    pub len: u64,
}

impl ReplyHeader {
    /// A reply to `op` with no payload.
    pub fn new(op: Op, id: RequestId, status: Status) -> Self {
        ReplyHeader {
            version: VERSION,
            op,
            status,
            id,
            len: 0,
        }
    }

    /// Wire bytes of this header.
    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.version;
        b[5] = self.op as u8;
        b[6] = self.status as u8;
        b[8..16].copy_from_slice(&self.id.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses and checks a reply header against `limits`.
    pub fn decode(b: &[u8; REPLY_HEADER_LEN], limits: &Limits) -> Result<Self, DecodeError> {
        let magic = u32::from_le_bytes(arr(&b[0..4]));
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let op = Op::try_from(b[5])?;
        let status = Status::try_from(b[6])?;
        let len = u64::from_le_bytes(arr(&b[16..24]));
        let limit = limits.reply_payload(op);
        if len > limit {
            return Err(DecodeError::TooLong { op, len, limit });
        }
        Ok(ReplyHeader {
            version: b[4],
            op,
            status,
            id: RequestId(u64::from_le_bytes(arr(&b[8..16]))),
            len,
        })
    }
}

/// Copies a slice whose length the caller guarantees into an array.
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_utmm() {
        assert_eq!(&MAGIC.to_le_bytes(), b"UTMM");
    }

    #[test]
    fn request_length_over_limit_is_rejected() {
        let mut h = RequestHeader::new(Op::Put, RequestId(1));
        h.len = 1 << 40;
        let err = RequestHeader::decode(&h.encode(), &Limits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::TooLong { len, .. } if len == 1 << 40));
        h.len = DEFAULT_MAX_VALUE;
        assert!(RequestHeader::decode(&h.encode(), &Limits::default()).is_ok());
    }

    #[test]
    fn control_ops_may_not_carry_values() {
        let mut h = RequestHeader::new(Op::Get, RequestId(1));
        h.len = 1;
        assert!(RequestHeader::decode(&h.encode(), &Limits::default()).is_err());
    }
}
