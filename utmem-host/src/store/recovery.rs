//! Recovery of one account's durable pools from its directory: the newest base
//! file, then the segments after it in order. A torn tail (the last segment ends in
//! a record that is not whole) is cut off; a damaged record in the middle is
//! skipped up to the next good header; a record whose header is good but whose
//! value is not drops its key. Nothing unverified becomes a value.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use utmem_proto::{Key, ObjectId, PoolKind};
use utmem_sys::Mmap;

use super::journal::{file_name, numbered};
use super::record::{self, Kind, Read};

/// What recovery found in one directory.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live values by pool.
    pub pools: HashMap<PoolKind, BTreeMap<Key, Bytes>>,
    /// The number the next segment gets.
    pub next_seg: u64,
    /// Bytes left in the files.
    pub file_bytes: u64,
    /// Records read.
    pub records: u64,
    /// Bytes of damage skipped or cut off.
    pub damaged_bytes: u64,
    /// Keys dropped because their record's value was damaged.
    pub dropped_keys: u64,
}

impl Recovered {
    fn apply(&mut self, kind: Kind, pool: PoolKind, key: Key, value: Option<Bytes>) {
        match kind {
            Kind::Put => {
                let values = self.pools.entry(pool).or_default();
                match value {
                    Some(v) => {
                        values.insert(key, v);
                    }
                    None => {
                        values.remove(&key);
                        self.dropped_keys += 1;
                    }
                }
            }
            Kind::Flush => {
                if let Some(values) = self.pools.get_mut(&pool) {
                    values.remove(&key);
                }
            }
            Kind::FlushObject => {
                if let Some(values) = self.pools.get_mut(&pool) {
                    let oid = key.oid;
                    let lo = Key {
                        oid,
                        ..Key::default()
                    };
                    let hi = Key {
                        oid: ObjectId(oid.0),
                        index: utmem_proto::Index(u32::MAX),
                    };
                    let keys: Vec<Key> = values.range(lo..=hi).map(|(k, _)| *k).collect();
                    for k in keys {
                        values.remove(&k);
                    }
                }
            }
            Kind::DropPool => {
                self.pools.remove(&pool);
            }
        }
    }

    /// Replays one file; `last` if it is the newest segment (a torn tail is cut off).
    fn replay(&mut self, path: &Path, last: bool, max_value: u64) -> io::Result<()> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("log file larger than the address space"))?;
        if len == 0 {
            return Ok(());
        }
        let map = Arc::new(Mmap::new(file.as_fd(), len, false)?);
        advise(&map, libc::MADV_SEQUENTIAL);
        advise(&map, libc::MADV_WILLNEED);
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as `map`,
        // which outlives `b` (this function); the files of the data directory are
        // written only by this daemon, never in place (see FileSlice).
        let b = unsafe { std::slice::from_raw_parts(map.as_ptr(), len) };
        let mut at = 0;
        let mut good_end = 0;
        while at < len {
            match record::read(&b[at..], max_value) {
                Read::Good {
                    kind,
                    pool,
                    key,
                    value,
                    len: n,
                } => {
                    let v = if value.is_empty() {
                        Bytes::new()
                    } else {
                        // The value ends the record.
                        let off = at + n - value.len();
                        Bytes::from_owner(FileSlice {
                            map: Arc::clone(&map),
                            off,
                            len: value.len(),
                        })
                    };
                    self.apply(kind, pool, key, Some(v));
                    self.records += 1;
                    at += n;
                    good_end = at;
                }
                Read::BadValue {
                    kind,
                    pool,
                    key,
                    len: n,
                } => {
                    tracing::warn!(file = %path.display(), offset = at, %key,
                        "damaged value in a durable log: the key is dropped");
                    self.apply(kind, pool, key, None);
                    self.damaged_bytes += n as u64;
                    at += n;
                    good_end = at;
                }
                Read::Bad => match record::resync(b, at + 1, max_value) {
                    Some(next) => {
                        tracing::warn!(file = %path.display(), offset = at, skipped = next - at,
                            "damaged record header in a durable log: skipped to the next good one");
                        self.damaged_bytes += (next - at) as u64;
                        at = next;
                    }
                    None => break,
                },
            }
        }
        let kept = if good_end < len {
            let tail = (len - good_end) as u64;
            self.damaged_bytes += tail;
            if last {
                tracing::warn!(file = %path.display(), offset = good_end, bytes = tail,
                    "torn tail of a durable log cut off");
                // Values point below `good_end` only: the pages they use stay.
                file.set_len(good_end as u64)?;
                file.sync_all()?;
                good_end
            } else {
                tracing::warn!(file = %path.display(), offset = good_end, bytes = tail,
                    "unreadable end of a durable log segment skipped");
                len
            }
        } else {
            len
        };
        self.file_bytes += kept as u64;
        advise(&map, libc::MADV_NORMAL);
        Ok(())
    }
}

/// A value served straight from a log file's mapping (the page cache): recovery
/// copies nothing. Log files are never written in place (appends go to new
/// segments, compaction writes a new base and unlinks the old files), so the bytes
/// stay what their checksum said; an unlinked file's space comes back when its
/// last value goes.
struct FileSlice {
    map: Arc<Mmap>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for FileSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `off + len` was checked against the mapping's length when the record
        // was read, and the mapping lives as long as `self.map`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.off), self.len) }
    }
}

fn advise(map: &Mmap, advice: libc::c_int) {
    // SAFETY: the whole range of a live mapping; advice never changes its contents.
    let r = unsafe { libc::madvise(map.as_ptr().cast(), map.len(), advice) };
    if r != 0 {
        tracing::debug!("madvise: {}", std::io::Error::last_os_error());
    }
}

/// Reads an account's directory: removes what an unfinished compaction left and what
/// a finished one replaced, then replays the rest.
pub fn recover(dir: &Path, max_value: u64) -> io::Result<Recovered> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            std::fs::remove_file(&p)?;
        }
    }
    let bases = numbered(dir, "base")?;
    let base = bases.last().copied();
    for n in bases.iter().filter(|n| Some(**n) != base) {
        std::fs::remove_file(dir.join(file_name("base", *n)))?;
    }
    let mut segs = numbered(dir, "seg")?;
    if let Some(k) = base {
        for n in segs.iter().filter(|n| **n <= k) {
            std::fs::remove_file(dir.join(file_name("seg", *n)))?;
        }
        segs.retain(|n| *n > k);
    }
    let mut r = Recovered::default();
    if let Some(k) = base {
        r.replay(&dir.join(file_name("base", k)), false, max_value)?;
    }
    for (i, n) in segs.iter().enumerate() {
        r.replay(
            &dir.join(file_name("seg", *n)),
            i + 1 == segs.len(),
            max_value,
        )?;
    }
    r.pools.retain(|_, v| !v.is_empty());
    r.next_seg = segs.last().copied().or(base).map_or(0, |n| n + 1);
    Ok(r)
}
