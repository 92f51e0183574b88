//! The utmem guest↔host contract, without any I/O.
//!
//! A guest (the Redis module through `utmem-client`) talks to the host daemon
//! (`utmem-hostd`) with length-prefixed binary frames: a fixed 40-byte request
//! header, optionally followed by a payload, answered by a fixed 24-byte reply
//! header, optionally followed by a payload. Many requests may be in flight on
//! one connection; replies carry the request id. All integers are little-endian.
//!
//! This crate owns the layout ([`header`]), the operations and statuses
//! ([`op`]), the key and pool types ([`types`]), the small structured payloads
//! ([`payload`]) and streaming decoders that check every length against the
//! negotiated [`Limits`] before anything is allocated ([`codec`]). The two
//! shared-memory layouts are here too, with the volatile accessors both sides use:
//! the value arena ([`arena`]) and the request channel ([`channel`]).

pub mod arena;
pub mod channel;
pub mod codec;
pub mod device;
pub mod error;
pub mod header;
pub mod op;
pub mod payload;
pub mod queue;
pub mod types;

pub use arena::{extent_len, ArenaMem, ReaderWordMem, ARENA_ALIGN, ARENA_HEADER_LEN};
pub use codec::{decode_reply, decode_request, encode_reply, encode_request, Reply, Request};
pub use error::DecodeError;
pub use header::{
    Limits, ReplyHeader, RequestHeader, DEFAULT_MAX_VALUE, DEFAULT_VSOCK_PORT, MAGIC,
    MAX_CONTROL_PAYLOAD, MIN_MAX_VALUE, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, VERSION,
};
pub use op::{Op, Status};
pub use payload::{
    ChannelReply, CopyTarget, DeviceReply, HelloReply, HelloRequest, IdentityStats, MapReply,
    NewPool, Placement, PoolKind, CAP_CHANNEL, CAP_COPY, CAP_DEVICE, CAP_DURABLE, CAP_EPHEMERAL,
    CAP_MAP, CAP_SHARED, POOL_DURABLE, POOL_EPHEMERAL, POOL_SHARED,
};
pub use queue::OutQueue;
pub use types::{Index, Key, ObjectId, PoolId, PoolUuid, RequestId};
