//! Durable pools in the store: the data directory, one log per account
//! ([`super::journal`]), recovery at start ([`super::recovery`]) and the thread
//! that syncs the logs under an interval policy. Values stay in memory as for any
//! pool (reads never touch the disk); the logs only make them survive a restart.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use utmem_proto::{PoolKind, Status};

use super::identity::Identity;
use super::journal::{dir_name, identity_of, FsyncPolicy, Journal, COMPACT_FLOOR};
use super::pool::Pool;
use super::record::record_len;
use super::recovery::recover;
use super::{lock, Store};

/// How durable pools are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableOptions {
    /// The data directory (one sub-directory per account).
    pub dir: PathBuf,
    /// When records reach the disk.
    pub fsync: FsyncPolicy,
    /// Dead log bytes below this never trigger a compaction.
    pub compact_floor: u64,
}

impl DurableOptions {
    /// `dir` with `fsync` and the default compaction floor.
    pub fn new(dir: impl Into<PathBuf>, fsync: FsyncPolicy) -> Self {
        DurableOptions {
            dir: dir.into(),
            fsync,
            compact_floor: COMPACT_FLOOR,
        }
    }
}

/// What recovery found at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Accounts with durable data.
    pub identities: u64,
    /// Pools recreated.
    pub pools: u64,
    /// Values loaded.
    pub values: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes of damaged records skipped or cut off.
    pub damaged_bytes: u64,
    /// Keys dropped because their record was damaged.
    pub dropped_keys: u64,
    /// How long it took.
    pub elapsed: Duration,
}

#[derive(Debug)]
pub(crate) struct Durability {
    opts: DurableOptions,
    journals: Arc<Mutex<Vec<Weak<Journal>>>>,
}

impl Store {
    /// Whether the store keeps durable pools (it has a data directory).
    pub fn is_durable(&self) -> bool {
        self.durable.get().is_some()
    }

    /// Turns durable pools on: loads every account's values from `opts.dir` (made if
    /// missing) and starts the sync thread of an interval policy. Call once, before
    /// serving anyone.
    pub fn open_data_dir(&self, opts: DurableOptions) -> std::io::Result<RecoveryReport> {
        let t0 = Instant::now();
        if !opts.dir.exists() {
            // The logs are the guests' data: nobody else reads or writes them.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&opts.dir)?;
        }
        let d = Durability {
            opts: opts.clone(),
            journals: Arc::new(Mutex::new(Vec::new())),
        };
        if self.durable.set(d).is_err() {
            return Err(std::io::Error::other("the data directory is already open"));
        }
        let mut report = RecoveryReport::default();
        let mut dirs: Vec<(String, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&opts.dir)? {
            let e = e?;
            if !e.file_type()?.is_dir() {
                continue;
            }
            match e.file_name().to_str().and_then(identity_of) {
                Some(name) => dirs.push((name, e.path())),
                None => tracing::warn!(path = %e.path().display(),
                    "not an account directory of utmem-hostd; left alone"),
            }
        }
        dirs.sort();
        for (name, path) in dirs {
            self.recover_account(&name, &path, &mut report)?;
        }
        if let FsyncPolicy::Every(every) = opts.fsync {
            self.start_sync_thread(every)?;
        }
        report.elapsed = t0.elapsed();
        Ok(report)
    }

    fn recover_account(
        &self,
        name: &str,
        path: &Path,
        report: &mut RecoveryReport,
    ) -> std::io::Result<()> {
        let r = recover(path, self.max_value)?;
        report.damaged_bytes += r.damaged_bytes;
        report.dropped_keys += r.dropped_keys;
        let ident = self.identity(name);
        let mut live = 0;
        for (kind, values) in &r.pools {
            for v in values.values() {
                live += record_len(kind, v.len() as u64);
            }
        }
        let d = self
            .durable
            .get()
            .ok_or_else(|| std::io::Error::other("no data dir"))?;
        let journal = Arc::new(Journal::open(
            path.to_owned(),
            d.opts.fsync,
            d.opts.compact_floor,
            r.next_seg,
            r.file_bytes,
            live,
        )?);
        lock(&d.journals).push(Arc::downgrade(&journal));
        *lock(&ident.journal) = Some(Arc::clone(&journal));
        report.identities += 1;
        for (kind, values) in r.pools {
            let pool = Arc::new(Pool::new(
                kind.clone(),
                false,
                Some(Arc::clone(&journal)),
                Arc::clone(&ident),
            ));
            Self::register(&ident, &pool).map_err(|s| {
                std::io::Error::other(format!("cannot recreate pool {kind:?} of {name}: {s:?}"))
            })?;
            if let PoolKind::Shared(uuid) = &kind {
                lock(&self.shared).insert(*uuid, Arc::clone(&pool));
            }
            let mut inner = pool.lock();
            for (key, value) in values {
                let len = value.len() as u64;
                // Acknowledged values come back even over a lowered quota: the
                // account's PUTs are refused until it is under again.
                ident
                    .charged
                    .fetch_add(self.charge_of(len), std::sync::atomic::Ordering::Relaxed);
                self.charged
                    .fetch_add(self.charge_of(len), std::sync::atomic::Ordering::Relaxed);
                self.used
                    .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                ident
                    .used
                    .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                ident
                    .values
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                inner.insert(key, value);
                report.values += 1;
                report.bytes += len;
            }
            report.pools += 1;
        }
        tracing::info!(identity = %name, records = r.records, damaged_bytes = r.damaged_bytes,
            "durable pools recovered");
        Ok(())
    }

    /// The log a new pool of `acct` uses: `None` unless `durable`.
    pub(crate) fn journal_if(
        &self,
        durable: bool,
        acct: &Identity,
    ) -> Result<Option<Arc<Journal>>, Status> {
        if !durable {
            return Ok(None);
        }
        let Some(d) = self.durable.get() else {
            return Err(Status::BadRequest);
        };
        let mut slot = lock(&acct.journal);
        if let Some(j) = slot.as_ref() {
            return Ok(Some(Arc::clone(j)));
        }
        let dir = d.opts.dir.join(dir_name(&acct.name));
        match Journal::open(dir, d.opts.fsync, d.opts.compact_floor, 0, 0, 0) {
            Ok(j) => {
                let j = Arc::new(j);
                lock(&d.journals).push(Arc::downgrade(&j));
                *slot = Some(Arc::clone(&j));
                Ok(Some(j))
            }
            Err(e) => {
                tracing::error!(identity = %acct.name, "cannot make a durable log: {e}");
                Err(Status::NoSpace)
            }
        }
    }

    /// Compacts `acct`'s log in the background.
    pub(crate) fn compact_later(&self, j: &Arc<Journal>, acct: &Arc<Identity>) {
        let acct = Arc::clone(acct);
        j.compact_in_background(move || {
            acct.open_pools()
                .into_iter()
                .map(|(_, p)| p)
                .filter(|p| p.is_durable() && Arc::ptr_eq(&p.account, &acct))
                .collect()
        });
    }

    /// Whether a compaction runs in the background now (tests wait for none before
    /// they open the same directory again).
    pub fn compacting(&self) -> bool {
        self.durable.get().is_some_and(|d| {
            lock(&d.journals)
                .iter()
                .filter_map(Weak::upgrade)
                .any(|j| j.is_compacting())
        })
    }

    /// (log file bytes, live record bytes) of an account's durable data.
    pub fn durable_sizes(&self, ident: &Identity) -> Option<(u64, u64)> {
        lock(&ident.journal).as_ref().map(|j| j.sizes())
    }

    fn start_sync_thread(&self, every: Duration) -> std::io::Result<()> {
        let Some(d) = self.durable.get() else {
            return Ok(());
        };
        let list = Arc::clone(&d.journals);
        std::thread::Builder::new()
            .name("utmem-fsync".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let live: Vec<Arc<Journal>> = {
                    let mut l = lock(&list);
                    l.retain(|w| w.strong_count() > 0);
                    l.iter().filter_map(Weak::upgrade).collect()
                };
                for j in live {
                    if let Err(e) = j.sync_all_written() {
                        tracing::error!(dir = %j.dir().display(), "fdatasync failed: {e}");
                    }
                }
            })?;
        Ok(())
    }
}
