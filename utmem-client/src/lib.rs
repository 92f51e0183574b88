//! The guest side of utmem: transports to the host, a pipelined client, and
//! the `utmem` command-line tool.
//!
//! [`Client`] is shared by any number of threads. Its blocking calls
//! ([`Client::put`], [`Client::get`], …) and its pipelined API
//! ([`Client::submit`] with a completion) go through the same machinery: one
//! connection, many requests in flight, replies matched by id, requests queued
//! during a write coalesced into the next vectored write, timeouts per request,
//! and automatic reconnection that re-opens the pools. Values travel as
//! [`bytes::Bytes`]: a PUT is written from the caller's buffer, a GET hands back
//! the buffer the socket was read into.

pub mod channel;
pub mod client;
pub mod device;
pub mod error;
pub mod mapped;
pub mod request;
pub mod spec;
pub mod transport;

pub use channel::Channel;
pub use client::{ChannelUse, Client, Completion, Options};
pub use error::ClientError;
pub use mapped::{MapError, Mapped};
pub use request::{Pool, Request, Response};
pub use spec::{Spec, DEVICE_PATH, HOST_CID};
pub use transport::{Stream, Transport, UnixTransport, VsockTransport};
pub use utmem_proto as proto;
/// Mapped values are handed out as volatile memory ([`Client::with_mapped`]).
pub use vm_memory::VolatileSlice;
