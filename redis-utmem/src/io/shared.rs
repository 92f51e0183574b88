//! What every part of the module's host I/O shares: the client, the pool, fresh object
//! ids, whether the host answers, and the values to offer it again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use utmem_client::proto::{NewPool, PoolKind, CAP_DURABLE};
use utmem_client::{ChannelUse, Client, ClientError, Options, Pool};

use crate::slot::Slot;

/// False from a request that found the host unreachable or timed out until the next
/// request the host answers: while false, `on-host-down error` refuses at once.
pub(super) static HOST_ANSWERS: AtomicBool = AtomicBool::new(true);

/// Whether the host answered the last requests (as far as the module knows, without I/O).
pub fn host_answers() -> bool {
    HOST_ANSWERS.load(Relaxed) && connected()
}

pub(super) fn note_answer<T>(r: &Result<T, ClientError>) {
    match r {
        Ok(_) | Err(ClientError::Refused { .. }) => HOST_ANSWERS.store(true, Relaxed),
        Err(ClientError::Timeout(_) | ClientError::Unreachable { .. }) => {
            HOST_ANSWERS.store(false, Relaxed)
        }
        Err(_) => {}
    }
}

/// Process-wide state of the loaded module.
#[allow(missing_debug_implementations)] // holds the client
pub struct Shared {
    /// The connection to the host.
    pub client: Client,
    /// The module's persistent pool.
    pub pool: Pool,
    /// Its name.
    pub pool_name: String,
    /// Whether it is a durable pool (`durable yes`).
    pub durable: bool,
    /// The transport spec.
    pub spec: String,
    next_oid: AtomicU64,
    /// Values kept in Redis, to offer to the host again.
    pub(super) retry: Mutex<Vec<Weak<Slot>>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static CHILD: Mutex<Option<(u32, Client, Pool)>> = Mutex::new(None);

/// The module's state; `None` before OnLoad finished.
pub fn shared() -> Option<&'static Shared> {
    SHARED.get()
}

pub(super) fn in_parent() -> bool {
    !crate::raw::in_fork_child()
}

/// Connects (a host that is down now is retried later) and registers the pool, which
/// is emptied the first time it is opened: RDB and AOF are the source of truth.
///
/// A durable pool (`durable`) keeps its values across host restarts; a host that is
/// reachable now and keeps no durable pools is an error.
pub(super) fn init(
    spec: &str,
    pool_name: &str,
    timeout: Duration,
    durable: bool,
) -> Result<&'static Shared, String> {
    let client = Client::connect_lazy(
        spec,
        Options {
            timeout,
            map: true,
            channel: if crate::config::CHANNEL.load(Relaxed) {
                ChannelUse::Caller
            } else {
                ChannelUse::Off
            },
            ..Options::default()
        },
    )
    .map_err(|e| format!("option transport: {e}"))?;
    if durable {
        check_durable(&client, timeout)?;
    }
    let pool = client.register(pool_request(pool_name, durable), true);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
    let state = Shared {
        client,
        pool,
        pool_name: pool_name.to_owned(),
        durable,
        spec: spec.to_owned(),
        // Fresh object ids across restarts too, even if the pool could not be emptied.
        next_oid: AtomicU64::new(now_us),
        retry: Mutex::new(Vec::new()),
    };
    if SHARED.set(state).is_err() {
        return Err("the module is already loaded in this process".into());
    }
    shared().ok_or_else(|| "not initialised".to_owned())
}

/// NEW_POOL of the module's pool.
fn pool_request(name: &str, durable: bool) -> NewPool {
    NewPool {
        kind: PoolKind::Private(name.to_owned()),
        ephemeral: false,
        durable,
    }
}

/// `durable yes`: the host must offer durable pools. Waits (at most `timeout`, at
/// most 2 s) for the host's HELLO; a host that cannot be reached now is checked
/// when it can (its NEW_POOL refusal leaves values in Redis, logged).
fn check_durable(client: &Client, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let wait = timeout.min(Duration::from_secs(2));
    loop {
        if let Some(h) = client.hello() {
            if h.capabilities & CAP_DURABLE == 0 {
                return Err(format!(
                    "option durable: the host at {} keeps no durable pools \
                     (start utmem-hostd with --data-dir DIR), or load without `durable yes`",
                    client.target()
                ));
            }
            return Ok(());
        }
        if t0.elapsed() >= wait {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh object id.
pub fn next_oid() -> u64 {
    shared().map_or(0, |s| s.next_oid.fetch_add(1, Relaxed))
}

/// Whether the host is reachable right now, as far as the client knows.
pub fn connected() -> bool {
    shared().is_some_and(|s| s.client.is_connected())
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client to use from this process: the module's own in Redis, a fresh one
/// (its own connection, same identity and pool) in a fork child, whose copy of the
/// parent's client has no threads behind it.
pub(super) fn client_here() -> Option<(Client, Pool)> {
    let s = shared()?;
    if in_parent() {
        return Some((s.client.clone(), s.pool));
    }
    let pid = std::process::id();
    let mut child = lock(&CHILD);
    if let Some((p, c, pool)) = child.as_ref() {
        if *p == pid {
            return Some((c.clone(), *pool));
        }
    }
    // Reads over the socket only: a fork child lives for one save.
    let opts = Options {
        timeout: crate::config::timeout(),
        channel: ChannelUse::Off,
        ..Options::default()
    };
    let c = Client::connect_lazy(&s.spec, opts).ok()?;
    let pool = c.register(pool_request(&s.pool_name, s.durable), false);
    *child = Some((pid, c.clone(), pool));
    Some((c, pool))
}

/// Offers `slot` (kept in Redis) to the host again later.
pub fn remember_for_retry(slot: &Arc<Slot>) {
    if let Some(s) = shared() {
        lock(&s.retry).push(Arc::downgrade(slot));
    }
}

pub(super) fn micros(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}
