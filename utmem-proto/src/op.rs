//! Operations and reply statuses.

use crate::error::DecodeError;

/// An operation a guest may ask of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Version and capability negotiation; the reply states the host's limits.
    Hello = 1,
    /// Open (or create) a pool by name or shared uuid; the reply carries its id.
    NewPool = 2,
    /// Drop a pool and all its values. Idempotent.
    DestroyPool = 3,
    /// Store the payload under the key, replacing any older value.
    Put = 4,
    /// Fetch the value under the key.
    Get = 5,
    /// Drop one key. Idempotent.
    Flush = 6,
    /// Drop every index of one object. Idempotent.
    FlushObject = 7,
    /// Copy the value under the header's key to the key in the payload, inside the host.
    Copy = 8,
    /// Counters of the caller's own identity.
    Stats = 9,
    /// No effect; measures a round trip.
    Ping = 10,
    /// Map the identity's value arena read-only (local Unix sockets only): the reply
    /// carries a [`crate::MapReply`] and, as SCM_RIGHTS, the arena's memfd and the
    /// connection's reader word (a one-page memfd, mapped read-write; see
    /// [`crate::arena`]).
    Map = 11,
    /// Open a shared-memory channel (local Unix sockets only): the reply carries a
    /// [`crate::ChannelReply`] and, as SCM_RIGHTS, the region's memfd, the *submit*
    /// eventfd and the *complete* eventfd (see [`crate::channel`]).
    Channel = 12,
    /// Which guest device region serves the caller's identity now: the reply carries
    /// a [`crate::DeviceReply`], or MISS when none does (see [`crate::device`]).
    Device = 13,
}

impl Op {
    /// Every op, in wire order.
    pub const ALL: [Op; 13] = [
        Op::Hello,
        Op::NewPool,
        Op::DestroyPool,
        Op::Put,
        Op::Get,
        Op::Flush,
        Op::FlushObject,
        Op::Copy,
        Op::Stats,
        Op::Ping,
        Op::Map,
        Op::Channel,
        Op::Device,
    ];
}

impl TryFrom<u8> for Op {
    type Error = DecodeError;

    fn try_from(b: u8) -> Result<Self, DecodeError> {
        Op::ALL
            .into_iter()
            .find(|op| *op as u8 == b)
            .ok_or(DecodeError::UnknownOp(b))
    }
}

/// The outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Done; a GET reply carries the value.
    Ok = 0,
    /// No value under that key (never stored, flushed, or evicted from an ephemeral pool).
    Miss = 1,
    /// The value does not fit in the identity's quota or the host's capacity; nothing changed.
    NoSpace = 2,
    /// The value is over the negotiated maximum value size.
    TooLarge = 3,
    /// The request is well-formed but makes no sense (bad pool name, bad payload).
    BadRequest = 4,
    /// The pool id is not open in this identity (never opened, or destroyed).
    UnknownPool = 5,
    /// The caller may not do this (e.g. open a shared pool it is not granted).
    Denied = 6,
    /// The protocol version is not supported.
    Version = 7,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::Miss,
        Status::NoSpace,
        Status::TooLarge,
        Status::BadRequest,
        Status::UnknownPool,
        Status::Denied,
        Status::Version,
    ];

    /// The upper-case name used in logs and error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Miss => "MISS",
            Status::NoSpace => "NO_SPACE",
            Status::TooLarge => "TOO_LARGE",
            Status::BadRequest => "BAD_REQUEST",
            Status::UnknownPool => "UNKNOWN_POOL",
            Status::Denied => "DENIED",
            Status::Version => "VERSION",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u8> for Status {
    type Error = DecodeError;

    fn try_from(b: u8) -> Result<Self, DecodeError> {
        Status::ALL
            .into_iter()
            .find(|s| *s as u8 == b)
            .ok_or(DecodeError::UnknownStatus(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_bytes_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::try_from(op as u8), Ok(op));
        }
        assert_eq!(Op::try_from(0), Err(DecodeError::UnknownOp(0)));
        assert_eq!(Op::try_from(0xff), Err(DecodeError::UnknownOp(0xff)));
    }

    #[test]
    fn status_bytes_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::try_from(s as u8), Ok(s));
        }
        assert_eq!(Status::try_from(8), Err(DecodeError::UnknownStatus(8)));
    }
}
