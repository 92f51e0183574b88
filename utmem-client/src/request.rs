//! What a caller asks for and what it gets back.

use bytes::Bytes;
use utmem_proto::{IdentityStats, Key, ObjectId, Op, Placement};

/// A pool opened through this client. It stays valid across reconnects: the
/// client re-opens the pool by name on every new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool(pub(crate) usize);

/// A request for the pipelined API.
#[derive(Debug, Clone)]
pub enum Request {
    /// Store `value` under `key`. The bytes are sent from this buffer without a copy.
    Put {
        /// Pool.
        pool: Pool,
        /// Key.
        key: Key,
        /// Value.
        value: Bytes,
    },
    /// Fetch the value under `key`.
    Get {
        /// Pool.
        pool: Pool,
        /// Key.
        key: Key,
    },
    /// Drop one key.
    Flush {
        /// Pool.
        pool: Pool,
        /// Key.
        key: Key,
    },
    /// Drop every index of an object.
    FlushObject {
        /// Pool.
        pool: Pool,
        /// Object.
        oid: ObjectId,
    },
    /// Copy `src` to `dst` inside the host.
    Copy {
        /// Pool.
        pool: Pool,
        /// Source key.
        src: Key,
        /// Destination key.
        dst: Key,
    },
    /// Drop the pool and its values.
    DestroyPool(Pool),
    /// Counters of this client's identity.
    Stats,
    /// A round trip that does nothing.
    Ping,
}

impl Request {
    pub(crate) fn op(&self) -> Op {
        match self {
            Request::Put { .. } => Op::Put,
            Request::Get { .. } => Op::Get,
            Request::Flush { .. } => Op::Flush,
            Request::FlushObject { .. } => Op::FlushObject,
            Request::Copy { .. } => Op::Copy,
            Request::DestroyPool(_) => Op::DestroyPool,
            Request::Stats => Op::Stats,
            Request::Ping => Op::Ping,
        }
    }

    pub(crate) fn pool(&self) -> Option<Pool> {
        match self {
            Request::Put { pool, .. }
            | Request::Get { pool, .. }
            | Request::Flush { pool, .. }
            | Request::FlushObject { pool, .. }
            | Request::Copy { pool, .. }
            | Request::DestroyPool(pool) => Some(*pool),
            Request::Stats | Request::Ping => None,
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// PUT, FLUSH, FLUSH_OBJECT, COPY, DESTROY_POOL, PING succeeded.
    Done,
    /// PUT succeeded and the value is in the arena this client maps, here
    /// ([`crate::Client::read_mapped`] reads it without a round trip).
    Placed(Placement),
    /// GET found this value (the bytes as read off the socket, not copied again).
    Value(Bytes),
    /// GET found nothing (never stored, flushed, or dropped from an ephemeral pool).
    Missing,
    /// STATS.
    Stats(IdentityStats),
}
