//! One guest connection: reads pipelined requests, applies them to the store in
//! the order sent, and writes replies in batches.
//!
//! Replies are queued while complete requests are buffered and written with one
//! writev before the session would block on a read, so a client with many
//! requests in flight gets its replies in few syscalls. A PUT payload of at
//! least [`OWN_BUFFER_AT`] bytes is read into its own exactly-sized buffer and
//! stored as is; smaller ones are copied once out of the read buffer, so a
//! stored small value never pins a whole read buffer.
//!
//! A frame that does not decode (bad magic, unknown op, a length over the
//! limit) ends the session: the caller logs it and closes the socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use utmem_proto::{
    encode_reply, CopyTarget, DecodeError, HelloReply, HelloRequest, Limits, MapReply, NewPool, Op,
    OutQueue, Placement, ReplyHeader, RequestHeader, Status, CAP_COPY, CAP_EPHEMERAL, CAP_MAP,
    CAP_SHARED, REQUEST_HEADER_LEN, VERSION,
};

use crate::store::{Arena, Identity, Pool, ReaderWord, Store};
use utmem_sys as sys;

/// Payloads at least this long get their own buffer, filled straight from the socket.
pub const OWN_BUFFER_AT: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// Replies queued beyond this are written before more requests are read.
const MAX_QUEUED: usize = 4 << 20;

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
}

/// A guest connection bound to an identity.
#[derive(Debug)]
pub struct Session<'a, S: AsFd> {
    stream: S,
    store: &'a Store,
    ident: Arc<Identity>,
    limits: Limits,
    rbuf: BytesMut,
    out: OutQueue,
    /// Whether the peer can receive the arena's descriptor (a local Unix socket).
    can_map: bool,
    /// The arena this connection mapped: its PUTs of private pools go there.
    arena: Option<Arc<Arena>>,
    /// The client's reader word for that arena.
    reader: Option<Arc<ReaderWord>>,
    /// A MAP reply to send, with the arena's descriptor, after the queued replies.
    map_reply: Option<Bytes>,
}

impl<'a, S: AsFd> Session<'a, S> {
    /// A session for `ident` on `stream`; `can_map` if the peer is a local process
    /// that may map the identity's arena (descriptors can be passed to it).
    pub fn new(stream: S, store: &'a Store, ident: Arc<Identity>, can_map: bool) -> Self {
        Session {
            stream,
            store,
            ident,
            limits: Limits {
                max_value: store.max_value(),
            },
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            out: OutQueue::new(),
            can_map,
            arena: None,
            reader: None,
            map_reply: None,
        }
    }

    /// Serves until the peer closes (`Ok`) or misbehaves (`Err`).
    pub fn run(&mut self) -> Result<(), SessionError> {
        loop {
            if self.rbuf.len() < REQUEST_HEADER_LEN {
                if !self.fill()? {
                    return match self.rbuf.len() {
                        0 => Ok(()),
                        n => Err(SessionError::Truncated(n)),
                    };
                }
                continue;
            }
            let mut h = [0u8; REQUEST_HEADER_LEN];
            h.copy_from_slice(&self.rbuf[..REQUEST_HEADER_LEN]);
            let header = RequestHeader::decode(&h, &self.limits)?;
            let len = usize::try_from(header.len).map_err(|_| DecodeError::TooLong {
                op: header.op,
                len: header.len,
                limit: self.limits.max_value,
            })?;
            // Looked up once, here: the PUT's destination decides where its payload goes.
            let pool = match header.op {
                Op::Put | Op::Get | Op::Flush | Op::FlushObject | Op::Copy => {
                    self.ident.pool(header.pool)
                }
                _ => None,
            };
            let arena = self.arena_for(&header, pool.as_ref());
            let mut placed = None;
            let payload = if let Some(mut buf) = arena.as_ref().and_then(|a| a.alloc(len)) {
                self.rbuf.advance(REQUEST_HEADER_LEN);
                self.read_into(buf.bytes_mut())?;
                let (bytes, p) = buf.publish();
                placed = Some(p);
                bytes
            } else if len >= OWN_BUFFER_AT {
                self.rbuf.advance(REQUEST_HEADER_LEN);
                self.read_own(len)?
            } else {
                while self.rbuf.len() < REQUEST_HEADER_LEN + len {
                    if !self.fill()? {
                        return Err(SessionError::Truncated(self.rbuf.len()));
                    }
                }
                self.rbuf.advance(REQUEST_HEADER_LEN);
                let p = Bytes::copy_from_slice(&self.rbuf[..len]);
                self.rbuf.advance(len);
                p
            };
            self.handle(header, payload, pool, placed);
            if let Some(reply) = self.map_reply.take() {
                self.send_map_reply(&reply)?;
            }
            if self.out.len() >= MAX_QUEUED {
                self.flush()?;
            }
        }
    }

    /// The arena a PUT's payload goes to: this connection mapped one and the pool is
    /// a private pool of its own identity.
    fn arena_for(&self, h: &RequestHeader, pool: Option<&Arc<Pool>>) -> Option<Arc<Arena>> {
        let arena = self.arena.as_ref()?;
        if h.op != Op::Put || h.version != VERSION {
            return None;
        }
        Arc::ptr_eq(&pool?.account, &self.ident).then(|| Arc::clone(arena))
    }

    /// Fills `dst` with the next payload bytes: what is buffered, then straight from the socket.
    fn read_into(&mut self, dst: &mut [u8]) -> Result<(), SessionError> {
        let have = dst.len().min(self.rbuf.len());
        dst[..have].copy_from_slice(&self.rbuf[..have]);
        self.rbuf.advance(have);
        let mut got = have;
        if got < dst.len() {
            self.flush()?;
        }
        while got < dst.len() {
            match nix::unistd::read(self.stream.as_fd().as_raw_fd(), &mut dst[got..]) {
                Ok(0) => return Err(SessionError::Truncated(REQUEST_HEADER_LEN + got)),
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(SessionError::Io(e.into())),
            }
        }
        Ok(())
    }

    /// Sends the queued replies, then the MAP reply with the arena's descriptor.
    fn send_map_reply(&mut self, reply: &[u8]) -> Result<(), SessionError> {
        self.flush()?;
        let (Some(arena), Some(reader)) = (self.arena.clone(), self.reader.clone()) else {
            return Ok(());
        };
        let fd = self.stream.as_fd();
        let mut sent = sys::send_with_fds(fd, reply, &[arena.fd(), reader.fd()])?;
        while sent < reply.len() {
            match sys::writev(fd, &[io::IoSlice::new(&reply[sent..])])? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                n => sent += n,
            }
        }
        Ok(())
    }

    /// Reads a payload of `len` bytes into a buffer of its own.
    fn read_own(&mut self, len: usize) -> Result<Bytes, SessionError> {
        let mut v = BytesMut::with_capacity(len);
        let have = len.min(self.rbuf.len());
        v.extend_from_slice(&self.rbuf[..have]);
        self.rbuf.advance(have);
        if v.len() < len {
            self.flush()?;
        }
        while v.len() < len {
            let want = len - v.len();
            if sys::read_spare(self.fd(), &mut v, want)? == 0 {
                return Err(SessionError::Truncated(REQUEST_HEADER_LEN + v.len()));
            }
        }
        Ok(v.freeze())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Writes queued replies, then reads more; false at end of stream.
    fn fill(&mut self) -> Result<bool, SessionError> {
        self.flush()?;
        let fd = self.stream.as_fd();
        Ok(sys::read_spare(fd, &mut self.rbuf, READ_CHUNK)? > 0)
    }

    fn flush(&mut self) -> io::Result<()> {
        let fd = self.stream.as_fd();
        while !self.out.is_empty() {
            if self.out.write_with(1024, |iov| sys::writev(fd, iov))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    fn reply(&mut self, h: &RequestHeader, status: Status, payload: Bytes) {
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

    fn handle(
        &mut self,
        h: RequestHeader,
        payload: Bytes,
        pool: Option<Arc<Pool>>,
        placed: Option<Placement>,
    ) {
        if h.op == Op::Hello {
            return self.hello(&h, &payload);
        }
        if h.version != VERSION {
            return self.status(&h, Status::Version);
        }
        let store = self.store;
        match h.op {
            Op::Hello => {}
            Op::Ping => self.status(&h, Status::Ok),
            Op::Map => self.map(&h),
            Op::Stats => {
                let s = store.stats(&self.ident).encode();
                self.reply(&h, Status::Ok, Bytes::copy_from_slice(&s));
            }
            Op::NewPool => match NewPool::decode(h.flags, &payload) {
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
                let Some(pool) = pool else {
                    return self.status(&h, Status::UnknownPool);
                };
                let ident = &self.ident;
                let status = match h.op {
                    Op::Put => match (store.put(ident, &pool, h.key, payload), placed) {
                        (Status::Ok, Some(p)) => {
                            return self.reply(&h, Status::Ok, Bytes::copy_from_slice(&p.encode()))
                        }
                        (s, _) => s,
                    },
                    Op::Get => match store.get(ident, &pool, h.key) {
                        Ok(v) => return self.reply(&h, Status::Ok, v),
                        Err(s) => s,
                    },
                    Op::Flush => store.flush(&pool, h.key),
                    Op::FlushObject => store.flush_object(&pool, h.key.oid),
                    _ => match CopyTarget::decode(&payload) {
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
        self.reader = Some(reader);
        self.arena = Some(arena);
        self.map_reply = Some(bytes.freeze());
    }

    fn hello(&mut self, h: &RequestHeader, payload: &[u8]) {
        let status = match HelloRequest::decode(payload) {
            Err(_) => Status::BadRequest,
            Ok(req) if !(req.min_version..=req.max_version).contains(&VERSION) => Status::Version,
            Ok(_) => {
                let r = HelloReply {
                    version: VERSION,
                    capabilities: CAP_COPY
                        | CAP_SHARED
                        | CAP_EPHEMERAL
                        | if self.can_map { CAP_MAP } else { 0 },
                    max_value: self.limits.max_value,
                    quota: self.ident.quota(),
                    identity: self.ident.name().to_owned(),
                };
                return self.reply(h, Status::Ok, Bytes::from(r.encode()));
            }
        };
        self.status(h, status);
    }

    /// The identity this session serves (it changes if the operator dropped the old one).
    pub fn identity(&self) -> &Arc<Identity> {
        &self.ident
    }
}

impl<S: AsFd> Drop for Session<'_, S> {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.close();
        }
    }
}
