//! The on-disk record of a durable pool's log (see `docs/store.md`).
//!
//! ```text
//! 0  magic     u32  "UTLR"
//! 4  kind      u8   1 PUT, 2 FLUSH, 3 FLUSH_OBJECT, 4 DROP_POOL
//! 5  shared    u8   0: the pool name is a private name, 1: a 16-byte uuid
//! 6  name_len  u16  1..=255
//! 8  oid       u64
//! 16 index     u32
//! 20 reserved  u32  0
//! 24 value_len u64  PUT only, else 0
//! 32 seq       u64  per-log record number (diagnostics)
//! 40 value_crc u32  crc32 of the value bytes
//! 44 head_crc  u32  crc32 of bytes 0..44 and of the pool name
//! 48 pool name, then the value
//! ```
//!
//! Everything little-endian. A header is trusted only when its magic, its checksum
//! (which covers the pool name too) and its lengths check out; the value only when
//! its own checksum does. A record whose header is good but whose value is not
//! still names its key, so recovery drops that key (a MISS, never wrong bytes).

use utmem_proto::{Key, PoolKind, PoolUuid};

/// First four bytes of every record.
pub const MAGIC: [u8; 4] = *b"UTLR";
/// Bytes before the pool name.
pub const HEADER_LEN: usize = 48;
/// Longest pool name (a private name; a uuid is 16 bytes).
const MAX_NAME: usize = 255;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stores a value.
    Put = 1,
    /// Drops one key.
    Flush = 2,
    /// Drops every index of an object.
    FlushObject = 3,
    /// Drops the whole pool.
    DropPool = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Put,
            2 => Kind::Flush,
            3 => Kind::FlushObject,
            4 => Kind::DropPool,
            _ => return None,
        })
    }
}

/// The pool name as stored: a private name's bytes or a uuid's.
pub fn pool_bytes(kind: &PoolKind) -> (u8, &[u8]) {
    match kind {
        PoolKind::Private(n) => (0, n.as_bytes()),
        PoolKind::Shared(u) => (1, &u.0),
    }
}

/// Header and pool name of a record (the value follows them on disk).
pub fn encode(kind: Kind, pool: &PoolKind, key: Key, value: &[u8], seq: u64) -> Vec<u8> {
    let (shared, name) = pool_bytes(pool);
    let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut h = Vec::with_capacity(HEADER_LEN + name.len());
    h.extend_from_slice(&MAGIC);
    h.push(kind as u8);
    h.push(shared);
    h.extend_from_slice(&name_len.to_le_bytes());
    h.extend_from_slice(&key.oid.0.to_le_bytes());
    h.extend_from_slice(&key.index.0.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&(value.len() as u64).to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(value).to_le_bytes());
    let mut c = crc32fast::Hasher::new();
    c.update(&h);
    c.update(name);
    h.extend_from_slice(&c.finalize().to_le_bytes());
    h.extend_from_slice(name);
    h
}

/// Bytes a record takes on disk.
pub fn record_len(pool: &PoolKind, value_len: u64) -> u64 {
    (HEADER_LEN + pool_bytes(pool).1.len()) as u64 + value_len
}

/// One record read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<'a> {
    /// A good record of `len` bytes.
    Good {
        /// What it does.
        kind: Kind,
        /// Its pool.
        pool: PoolKind,
        /// Its key.
        key: Key,
        /// Its value (PUT), else empty.
        value: &'a [u8],
        /// Bytes it takes.
        len: usize,
    },
    /// The header is good (it names the key) but the value is not.
    BadValue {
        /// What it did.
        kind: Kind,
        /// Its pool.
        pool: PoolKind,
        /// Its key.
        key: Key,
        /// Bytes it takes.
        len: usize,
    },
    /// No readable header here: a torn tail or a damaged header.
    Bad,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads the record at the start of `b`; values longer than `max_value` are damage.
pub fn read(b: &[u8], max_value: u64) -> Read<'_> {
    if b.len() < HEADER_LEN || b[..4] != MAGIC {
        return Read::Bad;
    }
    let name_len = usize::from(u16::from_le_bytes([b[6], b[7]]));
    let Some(kind) = Kind::from_u8(b[4]) else {
        return Read::Bad;
    };
    if name_len == 0 || name_len > MAX_NAME || b.len() < HEADER_LEN + name_len {
        return Read::Bad;
    }
    let name = &b[HEADER_LEN..HEADER_LEN + name_len];
    let mut c = crc32fast::Hasher::new();
    c.update(&b[..44]);
    c.update(name);
    if c.finalize() != u32_at(b, 44) {
        return Read::Bad;
    }
    let pool = match b[5] {
        0 => match std::str::from_utf8(name) {
            Ok(n) => PoolKind::Private(n.to_owned()),
            Err(_) => return Read::Bad,
        },
        1 => match <[u8; 16]>::try_from(name) {
            Ok(u) => PoolKind::Shared(PoolUuid(u)),
            Err(_) => return Read::Bad,
        },
        _ => return Read::Bad,
    };
    let key = Key::new(u64_at(b, 8), u32_at(b, 16));
    let value_len = u64_at(b, 24);
    if value_len > max_value || (kind != Kind::Put && value_len != 0) {
        return Read::Bad;
    }
    let start = HEADER_LEN + name_len;
    // A value running past the end is a torn tail: the header cannot be trusted either.
    let Some(len) = usize::try_from(value_len)
        .ok()
        .and_then(|v| start.checked_add(v))
        .filter(|end| *end <= b.len())
    else {
        return Read::Bad;
    };
    let value = &b[start..len];
    if crc32fast::hash(value) != u32_at(b, 40) {
        return Read::BadValue {
            kind,
            pool,
            key,
            len,
        };
    }
    Read::Good {
        kind,
        pool,
        key,
        value,
        len,
    }
}

/// The next offset after `from` where a record with a good header starts, if any.
pub fn resync(b: &[u8], from: usize, max_value: u64) -> Option<usize> {
    let mut at = from;
    while at < b.len() {
        let rel = b[at..].windows(4).position(|w| w == MAGIC)?;
        at += rel;
        if !matches!(read(&b[at..], max_value), Read::Bad) {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, v: &[u8]) -> Vec<u8> {
        let p = PoolKind::Private("p".into());
        let mut b = encode(kind, &p, Key::new(7, 1), v, 3);
        b.extend_from_slice(v);
        b
    }

    #[test]
    fn a_record_reads_back_and_every_flip_is_caught() {
        let b = rec(Kind::Put, b"hello world");
        assert_eq!(
            b.len() as u64,
            record_len(&PoolKind::Private("p".into()), 11)
        );
        match read(&b, 1 << 20) {
            Read::Good { value, len, .. } => {
                assert_eq!(value, b"hello world");
                assert_eq!(len, b.len());
            }
            r => panic!("{r:?}"),
        }
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                match read(&c, 1 << 20) {
                    Read::Good { value, .. } => panic!("flip {i}.{bit} read as {value:?}"),
                    Read::BadValue { key, .. } => {
                        assert!(i > HEADER_LEN, "header flip at {i} passed");
                        assert_eq!(key, Key::new(7, 1));
                    }
                    Read::Bad => {}
                }
            }
        }
        for n in 0..b.len() {
            assert_eq!(read(&b[..n], 1 << 20), Read::Bad, "torn at {n}");
        }
    }

    #[test]
    fn resync_skips_damage() {
        let mut b = rec(Kind::Put, b"one");
        let second = b.len();
        b.extend_from_slice(&rec(Kind::Flush, b""));
        b[2] ^= 0xff;
        assert_eq!(read(&b, 1 << 20), Read::Bad);
        assert_eq!(resync(&b, 1, 1 << 20), Some(second));
        assert_eq!(resync(&b, second + 1, 1 << 20), None);
    }
}
