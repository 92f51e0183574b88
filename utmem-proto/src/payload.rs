//! The small structured payloads: HELLO, NEW_POOL, COPY and STATS.
//! Each has an explicit little-endian layout and a checked decoder.

use crate::error::DecodeError;
use crate::header::MAX_CONTROL_PAYLOAD;
use crate::types::{Key, PoolUuid};

/// Capability: the host implements COPY.
pub const CAP_COPY: u64 = 1 << 0;
/// Capability: the host implements shared pools.
pub const CAP_SHARED: u64 = 1 << 1;
/// Capability: the host implements ephemeral pools.
pub const CAP_EPHEMERAL: u64 = 1 << 2;
/// Capability: this connection may MAP the identity's value arena (a local Unix
/// socket that can pass file descriptors).
pub const CAP_MAP: u64 = 1 << 3;
/// Capability: this connection may open shared-memory channels (CHANNEL).
pub const CAP_CHANNEL: u64 = 1 << 4;
/// The host answers DEVICE (guest device regions, see [`crate::device`]).
pub const CAP_DEVICE: u64 = 1 << 5;
/// Capability: the host keeps durable pools (it runs with a data directory).
pub const CAP_DURABLE: u64 = 1 << 8;

// The arena's layout lives in `crate::arena`; these paths stay for existing users.
pub use crate::arena::{ARENA_ALIGN, ARENA_HEADER_LEN};

/// NEW_POOL flag: the host may drop values of this pool to make room.
pub const POOL_EPHEMERAL: u16 = 1 << 0;
/// NEW_POOL flag: the pool is shared, named by a uuid (payload = 16 bytes).
pub const POOL_SHARED: u16 = 1 << 1;
/// NEW_POOL flag: the pool's values survive a restart of the host (its data directory).
pub const POOL_DURABLE: u16 = 1 << 2;

fn bad(what: &'static str, why: &'static str) -> DecodeError {
    DecodeError::BadPayload { what, why }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// HELLO request payload (16 bytes): the versions the client speaks and what it can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloRequest {
    /// Oldest version the client speaks.
    pub min_version: u8,
    /// Newest version the client speaks.
    pub max_version: u8,
    /// Capabilities the client would use.
    pub capabilities: u64,
}

impl HelloRequest {
    /// Wire size.
    pub const LEN: usize = 16;

    /// Wire bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.min_version;
        b[1] = self.max_version;
        b[8..16].copy_from_slice(&self.capabilities.to_le_bytes());
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("HELLO", "length is not 16"));
        }
        if b[0] > b[1] {
            return Err(bad("HELLO", "min_version is above max_version"));
        }
        Ok(HelloRequest {
            min_version: b[0],
            max_version: b[1],
            capabilities: u64_at(b, 8),
        })
    }
}

/// HELLO reply payload: the chosen version and the host's limits for this caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Version both sides speak from now on.
    pub version: u8,
    /// Capabilities of the host.
    pub capabilities: u64,
    /// Largest value a PUT may carry.
    pub max_value: u64,
    /// The caller identity's quota in bytes.
    pub quota: u64,
    /// The name the host knows the caller by (e.g. `cid:3`, `uid:1000`, a listener name).
    pub identity: String,
}

impl HelloReply {
    const FIXED: usize = 34;

    /// Wire bytes; the identity is cut to what fits in a control payload.
    pub fn encode(&self) -> Vec<u8> {
        let max_name = usize::try_from(MAX_CONTROL_PAYLOAD).unwrap_or(usize::MAX) - Self::FIXED;
        let mut name = self.identity.as_bytes();
        if name.len() > max_name {
            name = &name[..max_name];
        }
        let mut b = Vec::with_capacity(Self::FIXED + name.len());
        b.push(self.version);
        b.extend_from_slice(&[0u8; 7]);
        b.extend_from_slice(&self.capabilities.to_le_bytes());
        b.extend_from_slice(&self.max_value.to_le_bytes());
        b.extend_from_slice(&self.quota.to_le_bytes());
        // Fits: max_name < 1024.
        b.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_le_bytes());
        b.extend_from_slice(name);
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < Self::FIXED {
            return Err(bad("HELLO reply", "shorter than 34 bytes"));
        }
        let name_len = usize::from(u16::from_le_bytes([b[32], b[33]]));
        if b.len() != Self::FIXED + name_len {
            return Err(bad("HELLO reply", "identity length does not match"));
        }
        let identity = std::str::from_utf8(&b[Self::FIXED..])
            .map_err(|_| bad("HELLO reply", "identity is not UTF-8"))?
            .to_owned();
        Ok(HelloReply {
            version: b[0],
            capabilities: u64_at(b, 8),
            max_value: u64_at(b, 16),
            quota: u64_at(b, 24),
            identity,
        })
    }
}

/// How a NEW_POOL request names its pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// A private pool of the caller's identity, by name (1 to 255 bytes of UTF-8).
    Private(String),
    /// A shared pool, by uuid; only identities the host grants may open it.
    Shared(PoolUuid),
}

/// A NEW_POOL request: header flags plus payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewPool {
    /// Name or uuid.
    pub kind: PoolKind,
    /// Whether the host may drop values to make room.
    pub ephemeral: bool,
    /// Whether its values survive a restart of the host (never together with `ephemeral`).
    pub durable: bool,
}

impl NewPool {
    /// Longest private pool name.
    pub const MAX_NAME: usize = 255;

    /// Header flags and payload bytes.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut flags = 0;
        if self.ephemeral {
            flags |= POOL_EPHEMERAL;
        }
        if self.durable {
            flags |= POOL_DURABLE;
        }
        let payload = match &self.kind {
            PoolKind::Private(name) => name.as_bytes().to_vec(),
            PoolKind::Shared(uuid) => {
                flags |= POOL_SHARED;
                uuid.0.to_vec()
            }
        };
        (flags, payload)
    }

    /// Parses header flags and payload.
    pub fn decode(flags: u16, b: &[u8]) -> Result<Self, DecodeError> {
        if flags & !(POOL_EPHEMERAL | POOL_SHARED | POOL_DURABLE) != 0 {
            return Err(bad("NEW_POOL", "unknown flag bits"));
        }
        let ephemeral = flags & POOL_EPHEMERAL != 0;
        let durable = flags & POOL_DURABLE != 0;
        if ephemeral && durable {
            return Err(bad("NEW_POOL", "a pool is not both ephemeral and durable"));
        }
        let kind = if flags & POOL_SHARED != 0 {
            let uuid: [u8; 16] = b
                .try_into()
                .map_err(|_| bad("NEW_POOL", "a shared pool uuid is 16 bytes"))?;
            PoolKind::Shared(PoolUuid(uuid))
        } else {
            if b.is_empty() || b.len() > Self::MAX_NAME {
                return Err(bad("NEW_POOL", "a pool name is 1 to 255 bytes"));
            }
            let name =
                std::str::from_utf8(b).map_err(|_| bad("NEW_POOL", "pool name is not UTF-8"))?;
            PoolKind::Private(name.to_owned())
        };
        Ok(NewPool {
            kind,
            ephemeral,
            durable,
        })
    }
}

/// COPY payload (12 bytes): the destination key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTarget(pub Key);

impl CopyTarget {
    /// Wire size.
    pub const LEN: usize = 12;

    /// Wire bytes: object id then index.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.0.oid.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.0.index.0.to_le_bytes());
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("COPY", "length is not 12"));
        }
        Ok(CopyTarget(Key::new(
            u64_at(b, 0),
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        )))
    }
}

/// PUT reply payload on a mapped connection when the value went into the arena
/// (16 bytes): where its header is and the stamp it carries while the value lives.
/// How a reader uses it (stamp check, reader word) is described in [`crate::arena`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Byte offset of the value's header in the arena.
    pub offset: u64,
    /// Nonzero, unique per value stored in any arena of this host's lifetime.
    pub stamp: u64,
}

impl Placement {
    /// Wire size.
    pub const LEN: usize = 16;

    /// Wire bytes: offset then stamp.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.stamp.to_le_bytes());
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("PUT reply", "length is not 16"));
        }
        let p = Placement {
            offset: u64_at(b, 0),
            stamp: u64_at(b, 8),
        };
        if p.stamp == 0 || !p.offset.is_multiple_of(ARENA_ALIGN) {
            return Err(bad("PUT reply", "zero stamp or unaligned offset"));
        }
        Ok(p)
    }
}

/// MAP reply payload (8 bytes): the arena's length; its memfd and the reader word's
/// memfd come as SCM_RIGHTS, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapReply {
    /// Bytes to map (the memfd's size; it never shrinks).
    pub len: u64,
}

impl MapReply {
    /// Wire size.
    pub const LEN: usize = 8;

    /// Wire bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.len.to_le_bytes()
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("MAP reply", "length is not 8"));
        }
        Ok(MapReply { len: u64_at(b, 0) })
    }
}

/// CHANNEL reply payload (8 bytes): the region's length; its memfd, the *submit*
/// eventfd and the *complete* eventfd come as SCM_RIGHTS, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelReply {
    /// Bytes to map.
    pub len: u64,
}

impl ChannelReply {
    /// Wire size.
    pub const LEN: usize = 8;

    /// Wire bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.len.to_le_bytes()
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("CHANNEL reply", "length is not 8"));
        }
        Ok(ChannelReply { len: u64_at(b, 0) })
    }
}

/// DEVICE reply payload (16 bytes): the instance and length of the guest device region
/// that serves the caller's identity now (its header must say the same, or the
/// device in the guest is from an earlier host run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceReply {
    /// The region header's `instance`.
    pub instance: u64,
    /// The region's length.
    pub len: u64,
}

impl DeviceReply {
    /// Wire size.
    pub const LEN: usize = 16;

    /// Wire bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.instance.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("DEVICE reply", "length is not 16"));
        }
        Ok(DeviceReply {
            instance: u64_at(b, 0),
            len: u64_at(b, 8),
        })
    }
}

/// STATS reply payload: counters of one identity (ten u64, 80 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentityStats {
    /// Open pools.
    pub pools: u64,
    /// Values held.
    pub values: u64,
    /// Value bytes held.
    pub bytes: u64,
    /// Quota in bytes.
    pub quota: u64,
    /// PUT requests that stored a value.
    pub puts: u64,
    /// GET requests.
    pub gets: u64,
    /// GETs that found a value.
    pub hits: u64,
    /// GETs that found none.
    pub misses: u64,
    /// Values dropped from ephemeral pools to make room.
    pub evictions: u64,
    /// PUTs and COPYs refused for lack of space.
    pub refusals: u64,
}

impl IdentityStats {
    /// Wire size.
    pub const LEN: usize = 80;

    fn fields(&self) -> [u64; 10] {
        [
            self.pools,
            self.values,
            self.bytes,
            self.quota,
            self.puts,
            self.gets,
            self.hits,
            self.misses,
            self.evictions,
            self.refusals,
        ]
    }

    /// Wire bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        for (i, v) in self.fields().into_iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != Self::LEN {
            return Err(bad("STATS reply", "length is not 80"));
        }
        let f = |i: usize| u64_at(b, i * 8);
        Ok(IdentityStats {
            pools: f(0),
            values: f(1),
            bytes: f(2),
            quota: f(3),
            puts: f(4),
            gets: f(5),
            hits: f(6),
            misses: f(7),
            evictions: f(8),
            refusals: f(9),
        })
    }
}
