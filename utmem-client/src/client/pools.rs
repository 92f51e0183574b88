//! Pools: handles that name a pool and survive reconnects. Registration, NEW_POOL
//! on the live connection and during a handshake, re-opening a pool the host
//! forgot (UNKNOWN_POOL), and the host's id of a pool for channel requests.

use std::io;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_proto::{Key, NewPool, Op, PoolId, PoolKind, Status};

use super::connection::{call_sync, Handshake};
use super::pipeline::{Item, Pending};
use super::{Client, Completion, Inner, State};
use crate::error::ClientError;
use crate::request::{Pool, Response};

/// How often a registered pool that is not open on the live connection is tried again.
pub(super) const REOPEN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PoolState {
    /// Not open on the current connection (or there is none).
    Closed,
    /// A NEW_POOL (this request id) is on its way; requests for the pool wait.
    Opening(u64),
    /// The host's id on the current connection.
    Open(PoolId),
}

pub(super) struct PoolSlot {
    pub(super) req: NewPool,
    pub(super) state: PoolState,
    /// Empty the pool the first time it is opened (a fresh start).
    pub(super) reset: bool,
    /// Handed out: re-opened on every connection. False for a slot whose first open
    /// has not succeeded (a refused `open_pool` registers nothing).
    pub(super) registered: bool,
    /// When a NEW_POOL for it last went out on a live connection.
    pub(super) tried: Option<Instant>,
}

impl Client {
    /// The host's id of `pool` on the live connection (for channel requests), if open.
    pub fn pool_id(&self, pool: Pool) -> Option<PoolId> {
        let st = self.handle.0.lock();
        match st.pools.get(pool.0)?.state {
            PoolState::Open(id) => Some(id),
            _ => None,
        }
    }

    /// Opens (or re-attaches to) a pool. The handle survives reconnects. A refusal
    /// (e.g. DENIED for a shared pool that is not granted) is an error and registers
    /// nothing.
    pub fn open_pool(&self, kind: PoolKind, ephemeral: bool) -> Result<Pool, ClientError> {
        self.open_pool_with(NewPool {
            kind,
            ephemeral,
            durable: false,
        })
    }

    /// [`Client::open_pool`] with every NEW_POOL flag as given (e.g. a durable pool).
    pub fn open_pool_with(&self, req: NewPool) -> Result<Pool, ClientError> {
        let i = {
            let mut st = self.inner().lock();
            match st.pools.iter().position(|p| p.req == req) {
                Some(i) if st.pools[i].registered && st.conn.is_some() => {
                    if let PoolState::Open(_) = st.pools[i].state {
                        return Ok(Pool(i));
                    }
                    i
                }
                Some(i) => i,
                None => {
                    st.pools.push(PoolSlot {
                        req,
                        state: PoolState::Closed,
                        reset: false,
                        registered: false,
                        tried: None,
                    });
                    st.pools.len() - 1
                }
            }
        };
        self.open_slot(i).map(|()| Pool(i))
    }

    /// NEW_POOL for slot `i` (on the live connection, or the one being made), waiting
    /// for the answer; the slot is open when this returns `Ok`.
    fn open_slot(&self, i: usize) -> Result<(), ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let item = self.inner().open_item(
            i,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        self.inner().send_many(vec![item]);
        match self.wait(rx)? {
            Response::Value(b) if b.len() == 4 => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "NEW_POOL answered {other:?}"
            ))),
        }
    }

    /// Registers a pool, opening it now if the host is reachable and otherwise on the
    /// next connection; with `reset`, the host empties it the first time it is opened
    /// (a process that rebuilds its data from elsewhere at start). Never fails: a pool
    /// that cannot be opened makes the requests that use it fail.
    pub fn register_pool(&self, kind: PoolKind, ephemeral: bool, reset: bool) -> Pool {
        self.register(
            NewPool {
                kind,
                ephemeral,
                durable: false,
            },
            reset,
        )
    }

    /// [`Client::register_pool`] with every NEW_POOL flag as given (e.g. a durable pool).
    pub fn register(&self, req: NewPool, reset: bool) -> Pool {
        let inner = self.inner();
        let i = {
            let mut st = inner.lock();
            if let Some(i) = st.pools.iter().position(|p| p.req == req) {
                if st.pools[i].registered {
                    return Pool(i);
                }
                st.pools[i].registered = true;
                st.pools[i].reset = reset;
                i
            } else {
                st.pools.push(PoolSlot {
                    req: req.clone(),
                    state: PoolState::Closed,
                    reset,
                    registered: true,
                    tried: None,
                });
                st.pools.len() - 1
            }
        };
        // Not connected: the connection being made (or the next one) opens it.
        if !self.is_connected() {
            return Pool(i);
        }
        // Connected: open it now, with ordinary requests on the live connection.
        let mut result = self.open_slot(i);
        if reset && result.is_ok() {
            result = self.destroy_pool(Pool(i)).and_then(|()| self.open_slot(i));
        }
        match result {
            Ok(()) => inner.lock().pools[i].reset = false,
            Err(e) => tracing::warn!("cannot open pool {:?} now: {e}", req.kind),
        }
        Pool(i)
    }

    /// Opens a private persistent pool by name.
    pub fn open(&self, name: &str) -> Result<Pool, ClientError> {
        self.open_pool(PoolKind::Private(name.to_owned()), false)
    }
}

impl Inner {
    /// A NEW_POOL request that opens slot `i`.
    pub(super) fn open_item(&self, i: usize, done: Completion) -> Item {
        let mut st = self.lock();
        self.open_item_locked(&mut st, i, done)
    }

    pub(super) fn open_item_locked(&self, st: &mut State, i: usize, done: Completion) -> Item {
        st.pools[i].tried = Some(Instant::now());
        let (flags, payload) = st.pools[i].req.encode();
        Item {
            op: Op::NewPool,
            flags,
            pool: None,
            key: Key::default(),
            payload: Bytes::from(payload),
            deadline: Instant::now() + self.timeout(),
            opens: Some(i),
            done,
        }
    }

    /// Opens the registered pools the handshake has not looked at yet (those registered
    /// while it runs too: until none is new), on its socket, without the state lock.
    pub(super) fn open_pools(&self, h: &mut Handshake) -> Result<(), ClientError> {
        let t = self.timeout();
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(t),
            _ => self.unreachable(format!("handshake: {e}")),
        };
        let (stream, limits) = (&h.stream, &h.limits);
        // Pools registered while this runs are opened too: loop until none is new.
        loop {
            let todo: Vec<(usize, NewPool, bool)> = {
                let st = self.lock();
                if st.pools.len() == h.seen {
                    break;
                }
                let todo = st.pools[h.seen..]
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.registered)
                    .map(|(j, p)| (h.seen + j, p.req.clone(), p.reset))
                    .collect();
                h.seen = st.pools.len();
                todo
            };
            for (i, req, reset) in todo {
                let (flags, name) = req.encode();
                let open = || -> Result<PoolId, ClientError> {
                    let (r, p) = call_sync(stream, limits, Op::NewPool, flags, PoolId(0), &name)
                        .map_err(io_err)?;
                    if r.status != Status::Ok || p.len() != 4 {
                        return Err(ClientError::Refused {
                            op: Op::NewPool,
                            status: r.status,
                        });
                    }
                    Ok(PoolId(u32::from_le_bytes([p[0], p[1], p[2], p[3]])))
                };
                let mut id = match open() {
                    Ok(id) => id,
                    // One refused pool (e.g. a grant revoked) must not keep the rest offline.
                    Err(e @ ClientError::Refused { .. }) => {
                        tracing::warn!("pool {:?} not reopened: {e}", req.kind);
                        h.pools.push((i, None));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if reset {
                    call_sync(stream, limits, Op::DestroyPool, 0, id, &[]).map_err(io_err)?;
                    id = open()?;
                }
                h.pools.push((i, Some(id)));
            }
        }
        Ok(())
    }

    /// Runs a request's completion, after the pool bookkeeping its outcome calls for:
    /// a NEW_POOL opens its slot (or closes it), and UNKNOWN_POOL for an open pool
    /// starts re-opening it.
    pub(super) fn settle(self: &Arc<Self>, id: u64, p: Pending, r: Result<Response, ClientError>) {
        let mut redo = Vec::new();
        let mut reopen = None;
        if let Some(i) = p.opens {
            let mut st = self.lock();
            if st.pools[i].state == PoolState::Opening(id) {
                st.pools[i].state = match &r {
                    Ok(Response::Value(b)) if b.len() == 4 => {
                        st.pools[i].registered = true;
                        PoolState::Open(PoolId(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    }
                    _ => PoolState::Closed,
                };
                // Requests that waited for it go now (or fail, if it did not open).
                redo = std::mem::take(&mut st.waiting);
            }
        } else if let (
            Some((i, server)),
            Err(ClientError::Refused {
                status: Status::UnknownPool,
                ..
            }),
        ) = (p.pool, &r)
        {
            // The host forgot the pool (the operator dropped our identity, or it was
            // destroyed): open it again under the same handle, once.
            let mut st = self.lock();
            let current = st.conn.as_ref().map(|l| l.gen) == Some(p.gen);
            if current && st.pools[i].state == PoolState::Open(server) {
                // Requests for it wait from now on (request ids start at 1).
                st.pools[i].state = PoolState::Opening(0);
                drop(st);
                tracing::info!("pool {i} is unknown to the host; opening it again");
                reopen = Some(self.open_item(i, Box::new(|_| {})));
            }
        }
        (p.done)(r);
        if let Some(item) = reopen {
            redo.push(item);
        }
        if !redo.is_empty() {
            self.send_many(redo);
        }
    }
}
