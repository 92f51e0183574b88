//! The pipeline: requests turned into frames, queued under one lock and written by
//! whoever finds no write in progress (one writev for everything queued), the
//! in-flight bookkeeping, and the timeouts.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use utmem_proto::{CopyTarget, Key, Op, OutQueue, PoolId, RequestHeader, RequestId};
use utmem_sys as sys;

use super::pools::{PoolState, REOPEN_EVERY};
use super::{fail_all, Completion, Inner, State};
use crate::error::ClientError;
use crate::request::{Pool, Request};
use crate::transport::Stream;

pub(super) struct Item {
    pub(super) op: Op,
    pub(super) flags: u16,
    pub(super) pool: Option<Pool>,
    pub(super) key: Key,
    pub(super) payload: Bytes,
    pub(super) deadline: Instant,
    /// A NEW_POOL that (re-)opens this registered slot.
    pub(super) opens: Option<usize>,
    pub(super) done: Completion,
}

pub(super) struct Pending {
    pub(super) op: Op,
    /// Payload bytes of the request (a PUT's value length).
    pub(super) len: u64,
    pub(super) gen: u64,
    pub(super) deadline: Instant,
    /// The slot and the host id the request went out with.
    pub(super) pool: Option<(usize, PoolId)>,
    pub(super) opens: Option<usize>,
    /// Sent through the connection's channel (else over the socket).
    pub(super) via_channel: bool,
    pub(super) done: Completion,
}

pub(super) fn item(req: Request, deadline: Instant, done: Completion) -> Item {
    let pool = req.pool();
    let op = req.op();
    let (key, payload) = match req {
        Request::Put { key, value, .. } => (key, value),
        Request::Get { key, .. } | Request::Flush { key, .. } => (key, Bytes::new()),
        Request::FlushObject { oid, .. } => (
            Key {
                oid,
                ..Key::default()
            },
            Bytes::new(),
        ),
        Request::Copy { src, dst, .. } => (src, Bytes::copy_from_slice(&CopyTarget(dst).encode())),
        Request::DestroyPool(_) | Request::Stats | Request::Ping => (Key::default(), Bytes::new()),
    };
    Item {
        op,
        flags: 0,
        pool,
        key,
        payload,
        deadline,
        opens: None,
        done,
    }
}

impl Inner {
    /// Queues frames (under one lock, so they leave in one writev) and writes if
    /// nobody else is writing. With no connection, the requests wait for the one
    /// being made (starting it if need be).
    pub(super) fn send_many(self: &Arc<Self>, items: Vec<Item>) {
        let mut st = self.lock();
        if st.conn.is_none() {
            match self.start_connect(&mut st) {
                Ok(()) => st.waiting.extend(items),
                Err(e) => {
                    drop(st);
                    fail_all(items.into_iter().map(|i| i.done).collect(), &e);
                }
            }
            return;
        }
        let refused = self.queue(&mut st, items);
        if !refused.is_empty() {
            drop(st);
            for (done, e) in refused {
                done(Err(e));
            }
            st = self.lock();
        }
        if st.writing {
            return; // the writer in progress takes it with its next writev
        }
        st.writing = true;
        // Write until the queue is empty, always on the connection that is current now:
        // a reconnect while we wrote may have queued requests for the new one.
        loop {
            let Some(live) = st.conn.as_ref() else {
                st.writing = false;
                return;
            };
            if st.outq.is_empty() {
                st.writing = false;
                return;
            }
            let (wgen, stream) = (live.gen, Arc::clone(&live.stream));
            let mut q = std::mem::take(&mut st.outq);
            drop(st);
            let res = write_queue(&stream, &mut q);
            st = self.lock();
            if let Err(e) = res {
                st.writing = false;
                let failed = self.disconnect(&mut st, wgen);
                drop(st);
                fail_all(failed, &self.unreachable(format!("write failed: {e}")));
                return;
            }
            if st.outq.is_empty() {
                st.outq = q; // keep the allocation
            }
        }
    }

    /// Encodes requests for the current connection; those whose pool is being opened
    /// wait; returns those refused before sending.
    fn queue(&self, st: &mut State, items: Vec<Item>) -> Vec<(Completion, ClientError)> {
        let mut refused = Vec::new();
        let Some(live) = st.conn.clone() else {
            return refused;
        };
        let (gen, limits) = (live.gen, live.limits);
        let now = Instant::now();
        let mut items = std::collections::VecDeque::from(items);
        while let Some(it) = items.pop_front() {
            if it.payload.len() as u64 > limits.request_payload(it.op) {
                let e = ClientError::Invalid(format!(
                    "{} bytes is over the host's limit of {} for {:?}",
                    it.payload.len(),
                    limits.request_payload(it.op),
                    it.op
                ));
                refused.push((it.done, e));
                continue;
            }
            if it.deadline <= now {
                refused.push((it.done, ClientError::Timeout(self.timeout())));
                continue;
            }
            let id = st.next_id;
            let pool = match (it.opens, it.pool) {
                (Some(i), _) => {
                    st.pools[i].state = PoolState::Opening(id);
                    None
                }
                (None, None) => None,
                (None, Some(Pool(i))) => match st.pools.get(i).map(|slot| slot.state) {
                    Some(PoolState::Open(server)) => Some((i, server)),
                    Some(PoolState::Opening(_)) => {
                        st.waiting.push(it);
                        continue;
                    }
                    // Registered but not open here (its NEW_POOL was refused or timed
                    // out): try again, at most once a second, and let the request wait.
                    Some(PoolState::Closed)
                        if st.pools[i].registered
                            && st.pools[i]
                                .tried
                                .is_none_or(|t| t.elapsed() >= REOPEN_EVERY) =>
                    {
                        st.pools[i].state = PoolState::Opening(0);
                        let open = self.open_item_locked(st, i, Box::new(|_| {}));
                        items.push_front(open);
                        st.waiting.push(it);
                        continue;
                    }
                    Some(PoolState::Closed) => {
                        let e = self.unreachable("the pool is not open on this connection");
                        refused.push((it.done, e));
                        continue;
                    }
                    None => {
                        let e = ClientError::Invalid(format!("pool handle {i} was never opened"));
                        refused.push((it.done, e));
                        continue;
                    }
                },
            };
            // The channel or the socket, in order: a request waits while the other
            // path has requests in flight (or requests before it wait).
            let sock_inflight = st.inflight.len() - st.chan_inflight;
            let chan = live.channel.as_ref().filter(|_| live.routes);
            let eligible = chan.is_some()
                && it.opens.is_none()
                && matches!(
                    it.op,
                    Op::Put | Op::Flush | Op::FlushObject | Op::Copy | Op::Ping
                );
            let via_channel = if !st.after.is_empty() {
                st.after.push(it);
                continue;
            } else if eligible && sock_inflight == 0 && {
                let dst = if it.op == Op::Copy {
                    CopyTarget::decode(&it.payload).map_or(Key::default(), |t| t.0)
                } else {
                    Key::default()
                };
                let payload: &[u8] = if it.op == Op::Put { &it.payload } else { &[] };
                let server = pool.map_or(PoolId(0), |(_, server)| server);
                // False when the ring or staging is full, or the value too large.
                chan.is_some_and(|ch| ch.submit_request(id, it.op, server, it.key, dst, payload))
            } {
                true
            } else if st.chan_inflight > 0 {
                // Over the socket, but only after what is in the channel.
                st.after.push(it);
                continue;
            } else {
                false
            };
            st.next_id += 1;
            let len = it.payload.len() as u64;
            if via_channel {
                st.chan_inflight += 1;
            } else {
                let h = RequestHeader {
                    flags: it.flags,
                    pool: pool.map_or(PoolId(0), |(_, server)| server),
                    key: it.key,
                    len,
                    ..RequestHeader::new(it.op, RequestId(id))
                };
                st.outq.push_copy(&h.encode());
                if !it.payload.is_empty() {
                    st.outq.push_payload(it.payload);
                }
            }
            st.inflight.insert(
                id,
                Pending {
                    op: it.op,
                    len,
                    gen,
                    deadline: it.deadline,
                    pool,
                    opens: it.opens,
                    via_channel,
                    done: it.done,
                },
            );
        }
        if let Some(ch) = live.channel.as_ref().filter(|_| live.routes) {
            ch.kick();
        }
        refused
    }

    pub(super) fn expire(self: &Arc<Self>) {
        let now = Instant::now();
        let (expired, refused) = {
            let mut st = self.lock();
            let expired: Vec<(u64, Pending)> =
                st.inflight.extract_if(|_, p| p.deadline <= now).collect();
            st.chan_inflight -= expired.iter().filter(|(_, p)| p.via_channel).count();
            (expired, self.requeue_after(&mut st))
        };
        self.after_requeue(refused);
        for (id, p) in expired {
            self.settle(id, p, Err(ClientError::Timeout(self.timeout())));
        }
    }

    /// Queues the requests that waited for one path to drain, if it has: under the
    /// same lock that saw it drain, so they go before anything submitted after them.
    /// The caller then runs [`Inner::after_requeue`] without the lock.
    pub(super) fn requeue_after(&self, st: &mut State) -> Vec<(Completion, ClientError)> {
        let sock = st.inflight.len() - st.chan_inflight;
        if st.after.is_empty() || (st.chan_inflight > 0 && sock > 0) {
            return Vec::new();
        }
        let after = std::mem::take(&mut st.after);
        self.queue(st, after)
    }

    /// Fails what [`Inner::requeue_after`] refused and writes what it queued.
    pub(super) fn after_requeue(self: &Arc<Self>, refused: Vec<(Completion, ClientError)>) {
        for (done, e) in refused {
            done(Err(e));
        }
        if !self.lock().outq.is_empty() {
            self.send_many(Vec::new());
        }
    }
}

pub(super) fn write_queue(stream: &Stream, q: &mut OutQueue) -> io::Result<()> {
    let fd = stream.as_fd();
    while !q.is_empty() {
        if q.write_with(1024, |iov| sys::writev(fd, iov))? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}
