//! The log of one account's durable pools: append-only segment files of
//! checksummed records ([`super::record`]), a base file that compaction writes,
//! group commit for `fsync always`, and the data-directory layout.
//!
//! Files in an account's directory: `seg-<n>.log` (records appended in order; one
//! is active), `base-<k>.log` (every live value as of segment `k`: replaces
//! `base-*` and `seg-*` up to `k`), `*.tmp` (a compaction that did not finish).
//!
//! Ordering: a record is written under its pool's lock, after the change was
//! checked and before the in-memory pool changes, so the order of records in the
//! files is the order of the changes, per pool. A PUT's record is in the file (the
//! page cache) before the PUT is answered under every policy, so `kill -9` loses
//! nothing answered; with `fsync always` the reply also waits for `fdatasync`
//! ([`wait_durable`]), shared by every PUT written meanwhile (group commit).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use utmem_proto::{Key, PoolKind};

use super::lock;
use super::pool::Pool;
use super::record::{self, Kind};

/// When a durable pool's records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Each change is answered after its record was `fdatasync`ed (group commit).
    Always,
    /// A background thread syncs every this long; a machine crash loses at most that.
    Every(Duration),
    /// The kernel writes back when it likes; a machine crash may lose anything recent.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    /// `always`, `never`, or an interval such as `10ms` or `1s`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(FsyncPolicy::Every(d)),
                _ => Err(format!(
                    "bad fsync policy {s:?}: expected always, never or an interval such as 10ms"
                )),
            },
        }
    }
}

/// Dead bytes below this never trigger a compaction.
pub const COMPACT_FLOOR: u64 = 64 << 20;

#[derive(Debug)]
struct LogState {
    file: Arc<File>,
    /// Number of the active segment.
    seg: u64,
    /// Bytes ever appended (the position a sync must reach).
    pos: u64,
    seq: u64,
    /// Bytes in all files of the log.
    file_bytes: u64,
    /// Bytes of the records of live values.
    live_bytes: u64,
    /// `pos` when the running (or last) compaction switched segments.
    rotated_at: u64,
    /// The segment before the active one, until it was synced after the switch.
    retired: Option<Arc<File>>,
    /// Bytes in the active segment.
    seg_len: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    synced: u64,
    syncing: bool,
}

/// One account's log.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    policy: FsyncPolicy,
    floor: u64,
    state: Mutex<LogState>,
    sync: Mutex<SyncState>,
    synced_cv: Condvar,
    /// Signalled (with `state`) when a compaction ends.
    compacted_cv: Condvar,
    compacting: AtomicBool,
    /// Its identity was dropped: nothing more is written, the directory is gone.
    dead: AtomicBool,
}

thread_local! {
    /// Logs this thread wrote to under `fsync always`, and the position each must reach
    /// before the replies of those writes go out.
    static PENDING: RefCell<Vec<(Arc<Journal>, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Waits until every record this thread wrote under `fsync always` is on disk.
/// Sessions call it before they send replies, so one sync covers a batch.
pub fn wait_durable() {
    let todo = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (j, pos) in todo {
        if let Err(e) = j.sync_to(pos) {
            tracing::error!(dir = %j.dir.display(), "fdatasync of a durable log failed: {e}");
        }
    }
}

/// `seg-<n>.log` / `base-<n>.log`.
pub fn file_name(prefix: &str, n: u64) -> String {
    format!("{prefix}-{n:016x}.log")
}

/// Numbers of the `prefix-*.log` files in `dir`, ascending.
pub fn numbered(dir: &Path, prefix: &str) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(prefix))
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        else {
            continue;
        };
        v.push(n);
    }
    v.sort_unstable();
    Ok(v)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_segment(dir: &Path, n: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(dir.join(file_name("seg", n)))?;
    sync_dir(dir)?;
    Ok(f)
}

/// The directory of an account: its name with anything but `[A-Za-z0-9._-]`
/// written as `%XX`, so every name maps to one safe file name and back.
pub fn dir_name(identity: &str) -> String {
    let mut s = String::from("id-");
    for b in identity.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The account name of a directory made by [`dir_name`].
pub fn identity_of(dir: &str) -> Option<String> {
    let rest = dir.strip_prefix("id-")?.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'%' {
            let hex = std::str::from_utf8(rest.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(rest[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Appends `head` then `value`: one `writev` in the common case.
fn write_record(f: &File, head: &[u8], value: &[u8]) -> io::Result<()> {
    let mut w = f;
    let n = loop {
        match w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(value)]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    if n < head.len() {
        w.write_all(&head[n..])?;
        w.write_all(value)
    } else {
        w.write_all(&value[n - head.len()..])
    }
}

impl Journal {
    /// A log in `dir` whose next segment is `next_seg`; `file_bytes` and `live_bytes`
    /// describe what recovery found there.
    pub fn open(
        dir: PathBuf,
        policy: FsyncPolicy,
        floor: u64,
        next_seg: u64,
        file_bytes: u64,
        live_bytes: u64,
    ) -> io::Result<Journal> {
        std::fs::create_dir_all(&dir)?;
        let file = create_segment(&dir, next_seg)?;
        Ok(Journal {
            dir,
            policy,
            floor,
            state: Mutex::new(LogState {
                file: Arc::new(file),
                seg: next_seg,
                pos: 0,
                seq: 0,
                file_bytes,
                live_bytes,
                rotated_at: 0,
                retired: None,
                seg_len: 0,
            }),
            compacted_cv: Condvar::new(),
            sync: Mutex::new(SyncState::default()),
            synced_cv: Condvar::new(),
            compacting: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (bytes in its files, bytes of live records).
    pub fn sizes(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.file_bytes, st.live_bytes)
    }

    /// Appends one record; `dead` is what it makes obsolete (the record of the value
    /// it replaces or drops). On error nothing was appended (a partial record is
    /// cut off again) and the caller must not make the change.
    pub fn append(
        self: &Arc<Self>,
        kind: Kind,
        pool: &PoolKind,
        key: Key,
        value: &[u8],
        dead: u64,
    ) -> io::Result<()> {
        if self.dead.load(Relaxed) {
            return Ok(());
        }
        let mut st = lock(&self.state);
        let head = record::encode(kind, pool, key, value, st.seq);
        let len = (head.len() + value.len()) as u64;
        if let Err(e) = write_record(&st.file, &head, value) {
            // Cut off whatever part of the record made it, so the next one follows a
            // whole record.
            if let Ok(m) = st.file.metadata() {
                let _ = st.file.set_len(m.len().min(st.seg_len));
            }
            return Err(e);
        }
        st.seg_len += len;
        st.pos += len;
        st.seq += 1;
        st.file_bytes += len;
        if kind == Kind::Put {
            st.live_bytes += len;
        }
        st.live_bytes = st.live_bytes.saturating_sub(dead);
        let pos = st.pos;
        drop(st);
        if self.policy == FsyncPolicy::Always {
            PENDING.with(|p| {
                let mut p = p.borrow_mut();
                match p.iter_mut().find(|(j, _)| Arc::ptr_eq(j, self)) {
                    Some(e) => e.1 = e.1.max(pos),
                    None => p.push((Arc::clone(self), pos)),
                }
            });
        }
        Ok(())
    }

    /// Back-pressure: while a compaction runs and more than the live bytes (or the
    /// floor) were appended since it started, writers wait for it, so the files stay
    /// bounded even when the disk is slower than the writers. Call without a pool lock
    /// (the compaction takes them).
    pub fn throttle(&self) {
        let mut st = lock(&self.state);
        while self.compacting.load(Relaxed)
            && st.pos.saturating_sub(st.rotated_at) > st.live_bytes.max(self.floor)
        {
            st = self
                .compacted_cv
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether a compaction is running.
    pub fn is_compacting(&self) -> bool {
        self.compacting.load(Relaxed)
    }

    /// Whether dead records outweigh live ones (and the floor).
    pub fn needs_compaction(&self) -> bool {
        let st = lock(&self.state);
        let dead = st.file_bytes.saturating_sub(st.live_bytes);
        dead > self.floor && dead > st.live_bytes
    }

    /// Syncs until position `pos` is on disk; concurrent callers share one sync.
    pub fn sync_to(&self, pos: u64) -> io::Result<()> {
        let mut s = lock(&self.sync);
        loop {
            if s.synced >= pos {
                return Ok(());
            }
            if !s.syncing {
                break;
            }
            s = self
                .synced_cv
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        s.syncing = true;
        drop(s);
        let (file, retired, end) = {
            let st = lock(&self.state);
            (Arc::clone(&st.file), st.retired.clone(), st.pos)
        };
        let r = match retired {
            Some(old) => old.sync_data(),
            None => Ok(()),
        }
        .and_then(|()| file.sync_data());
        let mut s = lock(&self.sync);
        s.syncing = false;
        if r.is_ok() {
            s.synced = s.synced.max(end);
        }
        self.synced_cv.notify_all();
        r
    }

    /// Syncs whatever was written (the interval policy's thread).
    pub fn sync_all_written(&self) -> io::Result<()> {
        let pos = lock(&self.state).pos;
        self.sync_to(pos)
    }

    /// Marks it dropped and deletes its directory.
    pub fn delete(&self) -> io::Result<()> {
        self.dead.store(true, Relaxed);
        let _st = lock(&self.state);
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Starts a compaction on its own thread unless one runs; `pools` gives, once the
    /// new segment is active, the account's durable pools.
    pub fn compact_in_background(
        self: &Arc<Self>,
        pools: impl FnOnce() -> Vec<Arc<Pool>> + Send + 'static,
    ) {
        if self.compacting.swap(true, Relaxed) {
            return;
        }
        let j = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("utmem-compact".into())
            .spawn(move || {
                if let Err(e) = j.compact(pools) {
                    tracing::error!(dir = %j.dir.display(), "compaction failed: {e}");
                }
                let _st = lock(&j.state);
                j.compacting.store(false, Relaxed);
                j.compacted_cv.notify_all();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a compaction thread: {e}");
            self.compacting.store(false, Relaxed);
        }
    }

    /// Rewrites the live values into `base-<k>.log`, `k` the segment that was active,
    /// and deletes what it replaces. Appends go on into a new segment meanwhile.
    pub fn compact(&self, pools: impl FnOnce() -> Vec<Arc<Pool>>) -> io::Result<()> {
        // 1. A new segment takes the appends; everything before it is in memory.
        // Only this thread changes `seg`, so the next file can be made before the
        // lock is taken: appends wait for nothing but the swap.
        let k = lock(&self.state).seg;
        let next = Arc::new(create_segment(&self.dir, k + 1)?);
        let (old, pos_at) = {
            let mut st = lock(&self.state);
            if self.dead.load(Relaxed) {
                return Ok(());
            }
            let old = std::mem::replace(&mut st.file, next);
            st.retired = Some(Arc::clone(&old));
            st.seg = k + 1;
            st.seg_len = 0;
            st.rotated_at = st.pos;
            (old, st.pos)
        };
        // The old segment reaches the disk before the base may replace anything;
        // until then a group commit syncs it too (`retired`).
        old.sync_data()?;
        {
            let mut st = lock(&self.state);
            if st.retired.as_ref().is_some_and(|r| Arc::ptr_eq(r, &old)) {
                st.retired = None;
            }
        }
        // 2. Every live value, from memory, into the base file.
        let tmp = self.dir.join(format!("{}.tmp", file_name("base", k)));
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut written = 0u64;
        let mut seq = 0;
        for pool in pools() {
            let values: Vec<(Key, Bytes)> = {
                let inner = pool.lock();
                if inner.destroyed {
                    continue;
                }
                inner.values().map(|(k, v)| (*k, v.clone())).collect()
            };
            for (key, v) in values {
                let head = record::encode(Kind::Put, pool.kind(), key, &v, seq);
                w.write_all(&head)?;
                w.write_all(&v)?;
                written += (head.len() + v.len()) as u64;
                seq += 1;
            }
        }
        let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
        drop(f);
        if self.dead.load(Relaxed) {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        // 3. The base replaces everything up to segment k, atomically.
        std::fs::rename(&tmp, self.dir.join(file_name("base", k)))?;
        sync_dir(&self.dir)?;
        for n in numbered(&self.dir, "base")?.into_iter().filter(|n| *n < k) {
            std::fs::remove_file(self.dir.join(file_name("base", n)))?;
        }
        for n in numbered(&self.dir, "seg")?.into_iter().filter(|n| *n <= k) {
            std::fs::remove_file(self.dir.join(file_name("seg", n)))?;
        }
        let mut st = lock(&self.state);
        st.file_bytes = written + (st.pos - pos_at);
        tracing::info!(dir = %self.dir.display(), bytes = st.file_bytes, "durable log compacted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_round_trip() {
        for n in ["uid:0", "cid:3", "vm-1", "shared:1234-ab", "a/b", "%", "é"] {
            let d = dir_name(n);
            assert!(d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)));
            assert_eq!(identity_of(&d).as_deref(), Some(n));
        }
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!(
            "10ms".parse(),
            Ok(FsyncPolicy::Every(Duration::from_millis(10)))
        );
        assert!("0ms".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }
}
