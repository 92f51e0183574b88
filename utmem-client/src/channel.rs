//! The client's side of a shared-memory channel (see `utmem_proto::channel`).
//!
//! A local client asks for a channel over its Unix connection (CHANNEL) and gets the
//! region's memfd and two eventfds. A request is then a copy of its payload into
//! staging and a descriptor in the submission ring: no system call, unless the host
//! said it is going to sleep, and then one kick per batch ([`Channel::kick`]).
//! Completions come back in submission order; [`Channel::drain`] hands them out and
//! gives their staging back.
//!
//! The channel lives as long as the connection that opened it: when that connection
//! ends (or the host marks the channel dead), requests still in it have no answer
//! coming, and the caller must treat them as failed (see [`Channel::is_dead`]).
//! Staging is used as a ring: payloads are placed one after the other and freed in
//! completion order.

// The staging length is at most 1 GiB: offsets fit every integer type used here.
#![allow(clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use utmem_proto::channel::{
    arm, wants_kick, ChannelMem, Cqe, Sqe, CLIENT_NEED_WAKEUP, HOST_DEAD, HOST_NEED_WAKEUP,
};
use utmem_proto::{ChannelReply, Key, Limits, Op, PoolId, RequestId, Status};
use utmem_sys as sys;

use crate::mapped::{check_sealed, request_fds, MapError};

/// Payloads start at multiples of this in staging.
const ALIGN: u64 = 64;

/// A shared-memory channel to the host. Any thread may use it (a small lock guards
/// the producer and consumer sides); its completions are for whoever drains them.
#[derive(Debug)]
pub struct Channel {
    mem: ChannelMem,
    bell: Bell,
    state: Mutex<State>,
    /// Largest payload one descriptor may carry.
    max_payload: u64,
}

#[derive(Debug)]
struct State {
    sq_tail: u32,
    cq_head: u32,
    next_id: u64,
    /// Staging: bytes handed out (`head`) and given back (`tail`), as running totals.
    head: u64,
    tail: u64,
    /// Requests in the ring, oldest first.
    inflight: VecDeque<InRing>,
    /// The host broke the channel's rules (completions out of order, bad status).
    broken: bool,
}

/// How the two sides wake each other.
#[derive(Debug)]
pub(crate) enum Bell {
    /// A local channel: the *submit* and *complete* eventfds.
    Eventfds {
        /// We kick it.
        submit: OwnedFd,
        /// The host kicks it.
        complete: OwnedFd,
    },
    /// A guest device: the doorbell ioctl, and the device file that becomes readable
    /// on the host's interrupt.
    Device(std::sync::Arc<crate::device::Device>),
}

/// A request in the ring: its id, the staging total to give back to once it
/// completes, and for a GET where its buffer is (offset, length).
type InRing = (u64, u64, Option<(u64, u64)>);

/// A completion handed out by [`Channel::drain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The id [`Channel::put`] (or another submit) returned.
    pub id: u64,
    /// Outcome.
    pub status: Status,
    /// PUT: placement offset; GET: value length.
    pub arg0: u64,
    /// PUT: placement stamp (zero: not in the arena).
    pub arg1: u64,
    /// GET: the value, copied out of staging (its length is `arg0`).
    pub value: Option<bytes::Bytes>,
}

impl Channel {
    /// Sends CHANNEL on a socket nobody else reads yet and maps what comes back, after
    /// checking that the region cannot shrink under us and that its header is sane.
    pub fn open(sock: &UnixStream, limits: &Limits) -> Result<Channel, MapError> {
        let (payload, fds) = request_fds(sock, Op::Channel, ChannelReply::LEN, limits)?;
        let reply = ChannelReply::decode(&payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let [region, submit, complete] = <[OwnedFd; 3]>::try_from(fds).map_err(|f| {
            io::Error::other(format!(
                "CHANNEL reply came with {} descriptors, not 3",
                f.len()
            ))
        })?;
        check_sealed(&region, reply.len, "channel")?;
        let file = File::from(region);
        let geo = ChannelMem::read_geometry(&file).map_err(io::Error::other)?;
        if geo.region_len() != reply.len {
            return Err(io::Error::other("CHANNEL reply and header disagree on the length").into());
        }
        let mem = ChannelMem::map(file, geo).map_err(io::Error::other)?;
        Ok(Channel::new(mem, Bell::Eventfds { submit, complete }, 0, 0))
    }

    /// A channel over `mem`, whose rings stand at `sq_tail` and `cq_head` (a device
    /// slot another process used before: see [`crate::device`]).
    pub(crate) fn new(mem: ChannelMem, bell: Bell, sq_tail: u32, cq_head: u32) -> Channel {
        Channel {
            max_payload: mem.geometry().staging_len / 2,
            mem,
            bell,
            state: Mutex::new(State {
                sq_tail,
                cq_head,
                next_id: 1,
                head: 0,
                tail: 0,
                inflight: VecDeque::new(),
                broken: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Largest value [`Channel::put`] takes in one descriptor; larger ones go over the
    /// socket.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// The host ended the channel, or broke its rules: nothing more will complete.
    pub fn is_dead(&self) -> bool {
        self.mem.host_flags().load(Ordering::Acquire) & HOST_DEAD != 0
            || matches!(&self.bell, Bell::Device(d) if !d.serving())
            || self.lock().broken
    }

    /// Requests submitted and not yet completed.
    pub fn inflight(&self) -> usize {
        self.lock().inflight.len()
    }

    /// The eventfd the host kicks when it completed requests and we asked for a kick.
    pub fn complete_fd(&self) -> BorrowedFd<'_> {
        match &self.bell {
            Bell::Eventfds { complete, .. } => complete.as_fd(),
            Bell::Device(d) => d.as_fd(),
        }
    }

    /// Staging room for `len` bytes: the offset, and the running total to give back on
    /// completion; `None` if staging is too full now.
    fn stage(st: &mut State, staging_len: u64, len: u64) -> Option<(u64, u64)> {
        let len = len.div_ceil(ALIGN) * ALIGN;
        let mut at = st.head % staging_len;
        let mut head = st.head;
        if at + len > staging_len {
            // Does not fit before the end: skip to the start (the gap is freed with it).
            head += staging_len - at;
            at = 0;
        }
        let end = head + len;
        if end - st.tail > staging_len {
            return None;
        }
        st.head = end;
        Some((at, end))
    }

    /// Submits one descriptor (with `payload` copied to staging); `None` if the ring or
    /// staging is full now or the payload is over [`Channel::max_payload`]. Visible to
    /// the host at once; the host is kicked by [`Channel::kick`].
    fn submit(&self, sqe: Sqe, payload: &[u8]) -> Option<u64> {
        self.submit_with(sqe, payload, 0, None)
    }

    /// Submits request `id` (the caller's own id space: ids must not repeat while in
    /// flight): `op` on `key` (and `dst` for COPY) with `payload`. False if it does not
    /// fit now. GET is not taken (its answer's size is not known in advance).
    pub fn submit_request(
        &self,
        id: u64,
        op: Op,
        pool: PoolId,
        key: Key,
        dst: Key,
        payload: &[u8],
    ) -> bool {
        if !matches!(
            op,
            Op::Put | Op::Flush | Op::FlushObject | Op::Copy | Op::Ping
        ) {
            return false;
        }
        let sqe = Sqe {
            op: op as u8,
            pool,
            key,
            dst,
            ..Sqe::default()
        };
        self.submit_with(sqe, payload, 0, Some(id)).is_some()
    }

    /// [`Channel::submit`], with `buffer` bytes of staging reserved for the answer (a
    /// GET) instead of a payload.
    fn submit_with(
        &self,
        mut sqe: Sqe,
        payload: &[u8],
        buffer: u64,
        id: Option<u64>,
    ) -> Option<u64> {
        let len = (payload.len() as u64).max(buffer);
        if len > self.max_payload {
            return None;
        }
        let mut st = self.lock();
        if st.broken {
            return None;
        }
        let mut sq = self.mem.sq_producer().at(st.sq_tail);
        if sq.room().ok()? == 0 {
            return None;
        }
        let geo = self.mem.geometry();
        let (at, end) = if len == 0 {
            (0, st.head)
        } else {
            let saved = st.head;
            let Some(s) = Self::stage(&mut st, geo.staging_len, len) else {
                st.head = saved;
                return None;
            };
            s
        };
        if !payload.is_empty() {
            self.mem.staging(at, len)?.copy_from(payload);
        }
        let id = id.unwrap_or_else(|| {
            st.next_id += 1;
            st.next_id - 1
        });
        sqe.id = RequestId(id);
        sqe.offset = at;
        sqe.len = len;
        sqe.total = payload.len() as u64;
        sq.push(&sqe.encode());
        sq.publish();
        st.sq_tail = sq.tail;
        st.inflight
            .push_back((id, end, (buffer > 0).then_some((at, buffer))));
        Some(id)
    }

    /// Submits a PUT of `value`; its id, or `None` if it does not fit now (see
    /// [`Channel::submit`]).
    pub fn put(&self, pool: PoolId, key: Key, value: &[u8]) -> Option<u64> {
        let sqe = Sqe {
            op: Op::Put as u8,
            pool,
            key,
            ..Sqe::default()
        };
        self.submit(sqe, value)
    }

    /// Submits a GET of `key` with room for a value of up to `max` bytes in staging; a
    /// longer value completes TOO_LARGE with its length in `arg0`.
    pub fn get(&self, pool: PoolId, key: Key, max: u64) -> Option<u64> {
        let sqe = Sqe {
            op: Op::Get as u8,
            pool,
            key,
            ..Sqe::default()
        };
        self.submit_with(sqe, &[], max.max(1), None)
    }

    /// Submits a FLUSH_OBJECT of every index of `oid`.
    pub fn flush_object(&self, pool: PoolId, oid: u64) -> Option<u64> {
        let sqe = Sqe {
            op: Op::FlushObject as u8,
            pool,
            key: Key::new(oid, 0),
            ..Sqe::default()
        };
        self.submit(sqe, &[])
    }

    /// Submits a COPY of `src` to `dst` inside the host.
    pub fn copy(&self, pool: PoolId, src: Key, dst: Key) -> Option<u64> {
        let sqe = Sqe {
            op: Op::Copy as u8,
            pool,
            key: src,
            dst,
            ..Sqe::default()
        };
        self.submit(sqe, &[])
    }

    /// Submits a FLUSH of `key`.
    pub fn flush(&self, pool: PoolId, key: Key) -> Option<u64> {
        let sqe = Sqe {
            op: Op::Flush as u8,
            pool,
            key,
            ..Sqe::default()
        };
        self.submit(sqe, &[])
    }

    /// Submits a PING.
    pub fn ping(&self) -> Option<u64> {
        let sqe = Sqe {
            op: Op::Ping as u8,
            ..Sqe::default()
        };
        self.submit(sqe, &[])
    }

    /// Requests published so far.
    pub fn submitted(&self) -> u64 {
        u64::from(self.lock().sq_tail)
    }

    /// Kicks the host if it said it is going to sleep (once per batch); true if it did.
    pub fn kick(&self) -> bool {
        if !wants_kick(self.mem.host_flags(), HOST_NEED_WAKEUP) {
            return false;
        }
        match &self.bell {
            Bell::Eventfds { submit, .. } => sys::eventfd_kick(submit.as_fd()),
            Bell::Device(d) => d.kick(),
        }
        true
    }

    /// Hands every completion that arrived to `f`, in submission order, and gives
    /// their staging back. A completion that does not match the oldest request breaks
    /// the channel (see [`Channel::is_dead`]).
    pub fn drain(&self, mut f: impl FnMut(Completion)) -> usize {
        let mut st = self.lock();
        if st.broken {
            return 0;
        }
        let mut cq = self.mem.cq_consumer().at(st.cq_head);
        let Ok(n) = cq.ready() else {
            st.broken = true;
            return 0;
        };
        let mut done = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let raw = cq.pop();
            let front = st.inflight.pop_front();
            match (Cqe::decode(&raw), front) {
                (Some(c), Some((id, end, buf))) if c.id.0 == id => {
                    // A GET's bytes are copied out before its staging can be reused.
                    let value = match (buf, c.status) {
                        (Some((at, cap)), Status::Ok) if c.arg0 <= cap => {
                            let mut v = vec![0u8; c.arg0 as usize];
                            match self.mem.staging(at, c.arg0) {
                                Some(vs) => {
                                    vs.copy_to(&mut v[..]);
                                    Some(bytes::Bytes::from(v))
                                }
                                None => None,
                            }
                        }
                        _ => None,
                    };
                    st.tail = end;
                    done.push(Completion {
                        id,
                        status: c.status,
                        arg0: c.arg0,
                        arg1: c.arg1,
                        value,
                    });
                }
                _ => {
                    st.broken = true;
                    break;
                }
            }
        }
        cq.release();
        st.cq_head = cq.head;
        drop(st);
        let k = done.len();
        for c in done {
            f(c);
        }
        k
    }

    /// Before sleeping with requests in flight: asks the host to kick
    /// [`Channel::complete_fd`]; true if completions are already there (then do not
    /// sleep: drain).
    pub fn arm(&self) -> bool {
        arm(self.mem.client_flags(), CLIENT_NEED_WAKEUP);
        let st = self.lock();
        self.mem
            .cq_consumer()
            .at(st.cq_head)
            .ready()
            .map_or(true, |n| n > 0)
    }

    /// Resets the *complete* eventfd after it woke us.
    pub fn clear_wakeup(&self) {
        match &self.bell {
            Bell::Eventfds { complete, .. } => sys::eventfd_drain(complete.as_fd()),
            Bell::Device(d) => d.clear(),
        }
    }

    /// Takes every request still in flight (the channel is dead): their ids.
    pub fn abandon(&self) -> Vec<u64> {
        let mut st = self.lock();
        st.broken = true;
        st.inflight.drain(..).map(|(id, _, _)| id).collect()
    }

    /// The whole region as volatile memory (tests that play a hostile client).
    #[doc(hidden)]
    pub fn region_for_tests(&self) -> &ChannelMem {
        &self.mem
    }
}
