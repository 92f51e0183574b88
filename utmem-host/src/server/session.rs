//! One guest connection as a non-blocking state machine: reads pipelined
//! requests, applies them to the store in the order sent, and queues replies that
//! go out with vectored writes whenever the socket takes them.
//!
//! A PUT's charge is reserved when its header arrives: a PUT that does not fit is
//! answered NO_SPACE at once and its payload is read and dropped as it comes, never
//! held. A payload of at least [`OWN_BUFFER_AT`] bytes is read into its own
//! exactly-sized buffer (allocated fallibly) or, for a connection that mapped the
//! arena, straight into the arena; smaller ones are copied once out of the read
//! buffer, so a stored small value never pins a whole read buffer.
//!
//! Bounds: while [`MAX_QUEUED`] bytes of replies wait, no further request is read;
//! a peer that stalls in the middle of a frame (read timeout) or stops taking
//! replies (write timeout) is dropped. A frame that does not decode (bad magic,
//! unknown op, a length over the limit) ends the session once the replies to the
//! requests before it are sent.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use utmem_proto::{
    encode_reply, ChannelReply, CopyTarget, DecodeError, HelloReply, HelloRequest, Limits,
    MapReply, NewPool, Op, OutQueue, ReplyHeader, RequestHeader, Status, CAP_CHANNEL, CAP_COPY,
    CAP_DEVICE, CAP_DURABLE, CAP_EPHEMERAL, CAP_MAP, CAP_SHARED, REQUEST_HEADER_LEN, VERSION,
};

use super::channel::{self, ChannelHandle, Service};
use crate::store::{Arena, ArenaBuf, Identity, Pool, ReaderWord, Reservation, Store};
use utmem_sys as sys;

/// Payloads at least this long get their own buffer, filled straight from the socket.
pub const OWN_BUFFER_AT: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// No request is read while this many bytes of replies wait to be written.
pub const MAX_QUEUED: usize = 4 << 20;
/// Bytes read by one [`Session::drive`] before it lets other connections run.
const DRIVE_BUDGET: usize = 4 << 20;

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a frame that does not decode.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// The peer closed in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// No byte of the frame in progress arrived for the read timeout.
    #[error("no byte of the frame in progress for {0:?} (read timeout)")]
    ReadTimeout(Duration),
    /// The peer took no reply bytes for the write timeout.
    #[error("the peer took no reply bytes for {0:?} (write timeout)")]
    WriteTimeout(Duration),
    /// Its reader word stayed odd while released arena space piled up.
    #[error("its reader word stayed odd while released arena space piled up past the cap")]
    ReaderStuck,
    /// The identity already had as many connections as it may.
    #[error("refused: the identity has {0} connections open, the most it may (--max-connections)")]
    TooManyConnections(usize),
}

/// Timeouts of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A peer in the middle of a frame that sends nothing for this long is dropped.
    pub read: Duration,
    /// A peer that takes no reply bytes for this long, while replies wait, is dropped.
    pub write: Duration,
}

/// What the caller should do after [`Session::drive`].
#[derive(Debug, PartialEq, Eq)]
pub enum Drive {
    /// Wait for the socket (readable or writable).
    Wait,
    /// Work is left that needs no event: drive it again soon.
    More,
    /// The session is over: close it.
    Done,
}

/// Where a PUT payload that arrives in pieces goes.
#[derive(Debug)]
enum Dest {
    Arena(ArenaBuf),
    Own(BytesMut),
}

/// A PUT whose payload is arriving.
#[derive(Debug)]
struct Incoming {
    h: RequestHeader,
    pool: Arc<Pool>,
    res: Reservation,
    dst: Dest,
    got: usize,
    len: usize,
}

#[derive(Debug)]
enum ReadState {
    /// Between frames, or a frame short enough to wait for in the read buffer.
    Frame,
    /// A large PUT's payload.
    Payload(Box<Incoming>),
    /// Payload bytes to read and drop (their request was already answered).
    Skip(u64),
}

/// A guest connection bound to an identity.
#[derive(Debug)]
pub struct Session {
    fd: OwnedFd,
    store: Arc<Store>,
    ident: Arc<Identity>,
    limits: Limits,
    timeouts: Timeouts,
    rbuf: BytesMut,
    out: OutQueue,
    state: ReadState,
    /// Whether the peer can receive the arena's descriptor (a local Unix socket).
    can_map: bool,
    /// The arena this connection mapped: its PUTs of private pools go there.
    arena: Option<Arc<Arena>>,
    /// The client's reader word for that arena.
    reader: Option<Arc<ReaderWord>>,
    /// A MAP or CHANNEL reply to send, with its descriptors, after the queued replies.
    fd_reply: Option<(Bytes, Vec<OwnedFd>)>,
    /// The channel service (`None`: this daemon offers no channels).
    service: Option<Arc<Service>>,
    /// Channels this connection opened; they end with it.
    channels: Vec<ChannelHandle>,
    /// Over its identity's connection cap: answer the first request DENIED, then close.
    refused: Option<usize>,
    /// Set when the session is to end: the queued replies go out first.
    closing: Option<Result<(), SessionError>>,
    last_read: Instant,
    last_write: Instant,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Session {
    /// A session for `ident` on the non-blocking socket `fd`; `can_map` if the peer is
    /// a local process that may map the identity's arena (descriptors can be passed to
    /// it). `refused` carries the connection cap if the identity is over it.
    pub fn new(
        fd: OwnedFd,
        store: Arc<Store>,
        ident: Arc<Identity>,
        can_map: bool,
        timeouts: Timeouts,
        refused: Option<usize>,
        service: Option<Arc<Service>>,
    ) -> Self {
        let now = Instant::now();
        Session {
            fd,
            limits: Limits {
                max_value: store.max_value(),
            },
            store,
            ident,
            timeouts,
            rbuf: BytesMut::new(),
            out: OutQueue::new(),
            state: ReadState::Frame,
            can_map,
            arena: None,
            reader: None,
            fd_reply: None,
            service,
            channels: Vec::new(),
            refused,
            closing: None,
            last_read: now,
            last_write: now,
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The identity this session serves (it changes if the operator dropped the old one).
    pub fn identity(&self) -> &Arc<Identity> {
        &self.ident
    }

    /// Whether it was refused (over the connection cap): it never counted as connected.
    pub fn is_refused(&self) -> bool {
        self.refused.is_some()
    }

    /// How it ended, once [`Drive::Done`].
    pub fn take_result(&mut self) -> Result<(), SessionError> {
        self.closing.take().unwrap_or(Ok(()))
    }

    fn close(&mut self, why: Result<(), SessionError>) {
        if self.closing.is_none() {
            self.closing = Some(why);
        }
    }

    fn paused(&self) -> bool {
        self.out.len() >= MAX_QUEUED || self.fd_reply.is_some()
    }

    fn mid_frame(&self) -> bool {
        !matches!(self.state, ReadState::Frame) || !self.rbuf.is_empty() || self.refused.is_some()
    }

    /// Checks the timeouts and the reader word; false if the session must end now
    /// (without waiting for its replies to drain).
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.reader.as_ref().is_some_and(|r| r.is_revoked()) {
            self.closing = Some(Err(SessionError::ReaderStuck));
            return false;
        }
        let writing = !self.out.is_empty() || self.fd_reply.is_some();
        if writing && now.duration_since(self.last_write) >= self.timeouts.write {
            self.closing = Some(Err(SessionError::WriteTimeout(self.timeouts.write)));
            return false;
        }
        if self.paused() || self.closing.is_some() {
            // Not reading is our choice then, not the peer's stall.
            self.last_read = now;
        } else if self.mid_frame() && now.duration_since(self.last_read) >= self.timeouts.read {
            self.closing = Some(Err(SessionError::ReadTimeout(self.timeouts.read)));
            return false;
        }
        true
    }

    /// Does what the socket allows: reads and serves requests, and writes the queued
    /// replies whenever reading stops (nothing more to read, too many replies queued,
    /// the budget spent, or the session closing), so replies go out in batches.
    pub fn drive(&mut self) -> Drive {
        let mut budget = DRIVE_BUDGET;
        loop {
            if self.closing.is_some() || self.paused() || budget == 0 {
                if let Err(e) = self.flush() {
                    self.closing = Some(Err(e.into()));
                    return Drive::Done;
                }
                let drained = self.out.is_empty() && self.fd_reply.is_none();
                if self.closing.is_some() {
                    return if drained { Drive::Done } else { Drive::Wait };
                }
                if self.paused() {
                    return Drive::Wait;
                }
                if budget == 0 {
                    return Drive::More;
                }
            }
            match self.step(&mut budget) {
                Ok(true) => {}
                Ok(false) => {
                    if self.closing.is_some() {
                        continue;
                    }
                    // The socket has nothing more now: push out what is queued.
                    return match self.flush() {
                        Ok(()) => Drive::Wait,
                        Err(e) => {
                            self.closing = Some(Err(e.into()));
                            Drive::Done
                        }
                    };
                }
                Err(e) => self.close(Err(e)),
            }
        }
    }

    /// Reads up to a chunk into the read buffer. `Ok(false)`: nothing to read now
    /// (would block) or end of stream (then the session is closing).
    fn fill(&mut self, budget: &mut usize) -> Result<bool, SessionError> {
        match sys::read_spare(self.fd.as_fd(), &mut self.rbuf, READ_CHUNK) {
            Ok(0) => {
                let r = if self.mid_frame() && self.refused.is_none() {
                    Err(SessionError::Truncated(self.rbuf.len()))
                } else {
                    Ok(())
                };
                self.close(r);
                Ok(false)
            }
            Ok(n) => {
                self.last_read = Instant::now();
                *budget = budget.saturating_sub(n);
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// One step of reading; `Ok(false)` when it must wait for the socket.
    fn step(&mut self, budget: &mut usize) -> Result<bool, SessionError> {
        match &mut self.state {
            ReadState::Frame => self.frame(budget),
            ReadState::Skip(n) => {
                let take = usize::try_from(*n)
                    .unwrap_or(usize::MAX)
                    .min(self.rbuf.len());
                self.rbuf.advance(take);
                *n -= take as u64;
                if *n == 0 {
                    self.state = ReadState::Frame;
                    return Ok(true);
                }
                self.fill(budget)
            }
            ReadState::Payload(inc) => {
                let want = inc.len - inc.got;
                if want > 0 && !self.rbuf.is_empty() {
                    let n = want.min(self.rbuf.len());
                    match &mut inc.dst {
                        Dest::Arena(buf) => {
                            buf.bytes_mut()[inc.got..inc.got + n].copy_from_slice(&self.rbuf[..n])
                        }
                        Dest::Own(v) => v.extend_from_slice(&self.rbuf[..n]),
                    }
                    self.rbuf.advance(n);
                    inc.got += n;
                    return Ok(true);
                }
                if want > 0 {
                    let fd = self.fd.as_fd();
                    let r = match &mut inc.dst {
                        Dest::Arena(buf) => {
                            nix::unistd::read(fd.as_raw_fd(), &mut buf.bytes_mut()[inc.got..])
                                .map_err(io::Error::from)
                        }
                        Dest::Own(v) => sys::read_spare(fd, v, want),
                    };
                    match r {
                        Ok(0) => return Err(SessionError::Truncated(REQUEST_HEADER_LEN + inc.got)),
                        Ok(n) => {
                            inc.got += n;
                            *budget = budget.saturating_sub(n);
                            self.last_read = Instant::now();
                            return Ok(true);
                        }
                        Err(e) if would_block(&e) => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                        Err(e) => return Err(e.into()),
                    }
                }
                let ReadState::Payload(inc) = std::mem::replace(&mut self.state, ReadState::Frame)
                else {
                    unreachable!("matched above")
                };
                self.finish_put(*inc);
                Ok(true)
            }
        }
    }

    /// Between frames: decodes the next header and serves what it can.
    fn frame(&mut self, budget: &mut usize) -> Result<bool, SessionError> {
        if self.rbuf.len() < REQUEST_HEADER_LEN {
            return self.fill(budget);
        }
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        hb.copy_from_slice(&self.rbuf[..REQUEST_HEADER_LEN]);
        let h = RequestHeader::decode(&hb, &self.limits)?;
        if let Some(max) = self.refused {
            self.status(&h, Status::Denied);
            self.close(Err(SessionError::TooManyConnections(max)));
            return Ok(true);
        }
        let len = usize::try_from(h.len).map_err(|_| DecodeError::TooLong {
            op: h.op,
            len: h.len,
            limit: self.limits.max_value,
        })?;
        if h.op == Op::Put && len >= OWN_BUFFER_AT {
            self.rbuf.advance(REQUEST_HEADER_LEN);
            self.start_put(h, len);
            return Ok(true);
        }
        // A short frame (at most OWN_BUFFER_AT + header): wait until it is all here.
        if self.rbuf.len() < REQUEST_HEADER_LEN + len {
            return self.fill(budget);
        }
        self.rbuf.advance(REQUEST_HEADER_LEN);
        let payload = self.rbuf.split_to(len);
        self.handle(h, &payload);
        Ok(true)
    }

    /// The pool a keyed request names, if it is open in this identity.
    fn pool_of(&self, h: &RequestHeader) -> Option<Arc<Pool>> {
        self.ident.pool(h.pool)
    }

    /// The arena a PUT's payload goes to: this connection mapped one and the pool is
    /// a private pool of its own identity.
    fn arena_for(&self, pool: &Arc<Pool>) -> Option<Arc<Arena>> {
        let arena = self.arena.as_ref()?;
        Arc::ptr_eq(&pool.account, &self.ident).then(|| Arc::clone(arena))
    }

    /// A large PUT's header arrived: reserve its charge and a destination, or answer
    /// at once and drop the payload as it comes.
    fn start_put(&mut self, h: RequestHeader, len: usize) {
        let skip = |s: &mut Self, status| {
            s.status(&h, status);
            s.state = ReadState::Skip(h.len);
        };
        if h.version != VERSION {
            return skip(self, Status::Version);
        }
        let Some(pool) = self.pool_of(&h) else {
            return skip(self, Status::UnknownPool);
        };
        let res = match self.store.reserve_put(&self.ident, &pool, h.key, h.len) {
            Ok(r) => r,
            Err(s) => return skip(self, s),
        };
        let dst = match self.arena_for(&pool).and_then(|a| a.alloc(len)) {
            Some(buf) => Dest::Arena(buf),
            None => {
                let mut v: Vec<u8> = Vec::new();
                if let Err(e) = v.try_reserve_exact(len) {
                    tracing::warn!(identity = %self.ident.name(), len, "PUT refused: {e}");
                    return skip(self, Status::NoSpace);
                }
                // Unique, so the BytesMut takes the allocation over without a copy.
                Dest::Own(BytesMut::from(Bytes::from(v)))
            }
        };
        self.state = ReadState::Payload(Box::new(Incoming {
            h,
            pool,
            res,
            dst,
            got: 0,
            len,
        }));
    }

    fn finish_put(&mut self, inc: Incoming) {
        let Incoming {
            h, pool, res, dst, ..
        } = inc;
        let (value, placed) = match dst {
            Dest::Arena(buf) => {
                let (v, p) = buf.publish();
                (v, Some(p))
            }
            Dest::Own(v) => (v.freeze(), None),
        };
        let status = self.store.commit_put(&self.ident, &pool, h.key, value, res);
        self.put_reply(&h, status, placed);
    }

    fn put_reply(
        &mut self,
        h: &RequestHeader,
        status: Status,
        placed: Option<utmem_proto::Placement>,
    ) {
        match (status, placed) {
            (Status::Ok, Some(p)) => self.reply(h, Status::Ok, Bytes::copy_from_slice(&p.encode())),
            (s, _) => self.status(h, s),
        }
    }

    /// A small PUT, whole in the read buffer.
    fn small_put(&mut self, h: &RequestHeader, pool: Arc<Pool>, payload: &[u8]) {
        let res = match self
            .store
            .reserve_put(&self.ident, &pool, h.key, payload.len() as u64)
        {
            Ok(r) => r,
            Err(s) => return self.status(h, s),
        };
        let (value, placed) = match self.arena_for(&pool).and_then(|a| a.alloc(payload.len())) {
            Some(mut buf) => {
                buf.bytes_mut().copy_from_slice(payload);
                let (v, p) = buf.publish();
                (v, Some(p))
            }
            None => (Bytes::copy_from_slice(payload), None),
        };
        let status = self.store.commit_put(&self.ident, &pool, h.key, value, res);
        self.put_reply(h, status, placed);
    }

    /// Writes what the socket takes: the queued replies, then the MAP reply with the
    /// arena's descriptors.
    fn flush(&mut self) -> io::Result<()> {
        // `fsync always`: the replies of durable changes go out once their records are
        // on disk (one wait per batch, shared with other threads: group commit).
        crate::store::wait_durable();
        let fd = self.fd.as_fd();
        while !self.out.is_empty() {
            match self.out.write_with(1024, |iov| sys::writev(fd, iov)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => self.last_write = Instant::now(),
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let Some((reply, fds)) = self.fd_reply.take() else {
            return Ok(());
        };
        let pass: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        match sys::send_with_fds(fd, &reply, &pass) {
            Ok(n) => {
                // The descriptors went with the first byte; the rest is plain bytes.
                self.last_write = Instant::now();
                if n < reply.len() {
                    self.out.push_copy(&reply[n..]);
                    return self.flush();
                }
                Ok(())
            }
            Err(e) if would_block(&e) => {
                self.fd_reply = Some((reply, fds));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn reply(&mut self, h: &RequestHeader, status: Status, payload: Bytes) {
        if self.out.is_empty() {
            self.last_write = Instant::now();
        }
        let mut r = ReplyHeader::new(h.op, h.id, status);
        r.len = payload.len() as u64;
        self.out.push_copy(&r.encode());
        if !payload.is_empty() {
            self.out.push_payload(payload);
        }
    }

    fn status(&mut self, h: &RequestHeader, status: Status) {
        self.reply(h, status, Bytes::new());
    }

    fn handle(&mut self, h: RequestHeader, payload: &[u8]) {
        if h.op == Op::Hello {
            return self.hello(&h, payload);
        }
        if h.version != VERSION {
            return self.status(&h, Status::Version);
        }
        let store = Arc::clone(&self.store);
        match h.op {
            Op::Hello => {}
            Op::Ping => self.status(&h, Status::Ok),
            Op::Map => self.map(&h),
            Op::Channel => self.channel(&h),
            Op::Device => match store.device(self.ident.name()) {
                Some(d) => self.reply(&h, Status::Ok, Bytes::copy_from_slice(&d.encode())),
                None => self.status(&h, Status::Miss),
            },
            Op::Stats => {
                let s = store.stats(&self.ident).encode();
                self.reply(&h, Status::Ok, Bytes::copy_from_slice(&s));
            }
            Op::NewPool => match NewPool::decode(h.flags, payload) {
                Err(_) => self.status(&h, Status::BadRequest),
                Ok(req) => {
                    if self.ident.is_dropped() {
                        // The operator dropped this identity: start over as a fresh one.
                        self.ident.disconnected();
                        self.ident = store.identity(self.ident.name());
                        self.ident.connected();
                    }
                    match store.open_pool(&self.ident, &req) {
                        Ok(id) => {
                            self.reply(&h, Status::Ok, Bytes::copy_from_slice(&id.0.to_le_bytes()))
                        }
                        Err(s) => self.status(&h, s),
                    }
                }
            },
            Op::DestroyPool => {
                store.destroy_pool(&self.ident, h.pool);
                self.status(&h, Status::Ok);
            }
            Op::Put | Op::Get | Op::Flush | Op::FlushObject | Op::Copy => {
                let Some(pool) = self.pool_of(&h) else {
                    return self.status(&h, Status::UnknownPool);
                };
                let ident = &self.ident;
                let status = match h.op {
                    Op::Put => return self.small_put(&h, pool, payload),
                    Op::Get => match store.get(ident, &pool, h.key) {
                        Ok(v) => return self.reply(&h, Status::Ok, v),
                        Err(s) => s,
                    },
                    Op::Flush => store.flush(&pool, h.key),
                    Op::FlushObject => store.flush_object(&pool, h.key.oid),
                    _ => match CopyTarget::decode(payload) {
                        Ok(dst) => store.copy(ident, &pool, h.key, dst.0),
                        Err(_) => Status::BadRequest,
                    },
                };
                self.status(&h, status);
            }
        }
    }

    fn map(&mut self, h: &RequestHeader) {
        if !self.can_map {
            return self.status(h, Status::Denied);
        }
        if self.reader.is_some() {
            // Once per connection: each MAP would cost the host a descriptor and a page.
            return self.status(h, Status::BadRequest);
        }
        let made = self
            .store
            .arena(&self.ident)
            .and_then(|a| a.new_reader().map(|r| (a, r)));
        let (arena, reader) = match made {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(identity = %self.ident.name(), "cannot make the value arena: {e}");
                return self.status(h, Status::NoSpace);
            }
        };
        let mut bytes = BytesMut::new();
        let r = ReplyHeader::new(h.op, h.id, Status::Ok);
        encode_reply(&r, &MapReply { len: arena.len() }.encode(), &mut bytes);
        let fds = match (
            arena.fd().try_clone_to_owned(),
            reader.fd().try_clone_to_owned(),
        ) {
            (Ok(a), Ok(r)) => vec![a, r],
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(identity = %self.ident.name(), "cannot pass the value arena: {e}");
                return self.status(h, Status::NoSpace);
            }
        };
        self.reader = Some(reader);
        self.arena = Some(arena);
        if self.out.is_empty() {
            self.last_write = Instant::now();
        }
        self.fd_reply = Some((bytes.freeze(), fds));
    }

    /// CHANNEL: a shared-memory channel for this identity, served by the service
    /// threads until this connection ends.
    fn channel(&mut self, h: &RequestHeader) {
        let Some(service) = self.service.clone().filter(|_| self.can_map) else {
            return self.status(h, Status::Denied);
        };
        if self.channels.len() >= channel::MAX_PER_CONNECTION {
            return self.status(h, Status::Denied);
        }
        let (handle, fds) = match service.open(&self.store, &self.ident) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(identity = %self.ident.name(), "cannot make a channel: {e}");
                return self.status(h, Status::NoSpace);
            }
        };
        let mut bytes = BytesMut::new();
        let r = ReplyHeader::new(h.op, h.id, Status::Ok);
        encode_reply(&r, &ChannelReply { len: fds.len }.encode(), &mut bytes);
        self.channels.push(handle);
        if self.out.is_empty() {
            self.last_write = Instant::now();
        }
        self.fd_reply = Some((bytes.freeze(), vec![fds.region, fds.submit, fds.complete]));
    }

    fn hello(&mut self, h: &RequestHeader, payload: &[u8]) {
        let status = match HelloRequest::decode(payload) {
            Err(_) => Status::BadRequest,
            Ok(req) if !(req.min_version..=req.max_version).contains(&VERSION) => Status::Version,
            Ok(_) => {
                let r = HelloReply {
                    version: VERSION,
                    capabilities: CAP_COPY
                        | CAP_DEVICE
                        | CAP_SHARED
                        | CAP_EPHEMERAL
                        | if self.can_map { CAP_MAP } else { 0 }
                        | if self.can_map && self.service.is_some() {
                            CAP_CHANNEL
                        } else {
                            0
                        }
                        | if self.store.is_durable() {
                            CAP_DURABLE
                        } else {
                            0
                        },
                    max_value: self.limits.max_value,
                    quota: self.ident.quota(),
                    identity: self.ident.name().to_owned(),
                };
                return self.reply(h, Status::Ok, Bytes::from(r.encode()));
            }
        };
        self.status(h, status);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.close();
        }
    }
}
