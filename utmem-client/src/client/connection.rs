//! The connection: the handshake (HELLO, MAP, CHANNEL) on a socket nobody else
//! reads yet, reconnection with backoff, installing a connection, and its reader
//! thread, which matches replies to requests by id.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use utmem_proto::{
    DeviceReply, HelloReply, HelloRequest, IdentityStats, Limits, Op, OutQueue, Placement, PoolId,
    ReplyHeader, RequestHeader, RequestId, Status, CAP_CHANNEL, CAP_COPY, CAP_DEVICE, CAP_MAP,
    REPLY_HEADER_LEN, REQUEST_HEADER_LEN, VERSION,
};
use utmem_sys as sys;

use super::pipeline::Pending;
use super::pools::PoolState;
use super::{fail_all, ChannelUse, Completion, Inner, Live, State};
use crate::channel::Channel;
use crate::device::Device;
use crate::error::ClientError;
use crate::mapped::Mapped;
use crate::request::Response;
use crate::transport::Stream;

/// GET payloads at least this long are read into their own buffer.
const OWN_BUFFER_AT: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;

/// What a handshake brings back, to be installed under the state lock.
pub(super) struct Handshake {
    pub(super) stream: Stream,
    pub(super) limits: Limits,
    pub(super) hello: HelloReply,
    pub(super) mapped: Option<Mapped>,
    pub(super) channel: Option<Channel>,
    /// Slot index → the host's id (`None`: refused on this connection).
    pub(super) pools: Vec<(usize, Option<PoolId>)>,
    /// Slots below this index were looked at.
    pub(super) seen: usize,
}

impl Inner {
    /// Starts a handshake on a thread of its own, unless one is running (then the
    /// caller's requests wait for it) or the backoff says to wait (an error).
    pub(super) fn start_connect(self: &Arc<Self>, st: &mut State) -> Result<(), ClientError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.unreachable("client closed"));
        }
        if st.connecting {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(at) = st.retry_at {
            if now < at {
                return Err(self.unreachable(format!(
                    "{} (next attempt in {} ms)",
                    st.last_error,
                    (at - now).as_millis()
                )));
            }
        }
        let me = Arc::clone(self);
        thread::Builder::new()
            .name("utmem-connect".into())
            .spawn(move || {
                let _ = me.connect_attempt();
            })
            .map_err(|e| self.unreachable(format!("cannot start a connecting thread: {e}")))?;
        st.connecting = true;
        Ok(())
    }

    /// One handshake (the caller set `connecting`), then its outcome for the requests
    /// that waited for it.
    pub(super) fn connect_attempt(self: &Arc<Self>) -> Result<(), ClientError> {
        let mut made = self.handshake();
        let mut st = self.lock();
        // Pools registered since the handshake looked are opened before it is installed.
        while matches!(&made, Ok(h) if st.pools.len() != h.seen) {
            drop(st);
            made = made.and_then(|mut h| self.open_pools(&mut h).map(|()| h));
            st = self.lock();
        }
        st.connecting = false;
        let made = made.and_then(|h| {
            if self.closed.load(Ordering::SeqCst) {
                h.stream.shutdown();
                return Err(self.unreachable("client closed"));
            }
            self.install(&mut st, h)
        });
        let waiting = std::mem::take(&mut st.waiting);
        match made {
            Ok(()) => {
                st.retry_at = None;
                st.backoff = self.opts.min_backoff;
                drop(st);
                if !waiting.is_empty() {
                    self.send_many(waiting);
                }
                Ok(())
            }
            Err(e) => {
                st.last_error = e.to_string();
                st.retry_at = Some(Instant::now() + st.backoff);
                st.backoff = (st.backoff * 2).min(self.opts.max_backoff);
                drop(st);
                fail_all(waiting.into_iter().map(|i| i.done).collect(), &e);
                Err(e)
            }
        }
    }

    /// Connects, says HELLO, opens the registered pools and maps the arena, holding no
    /// lock while it waits for the host.
    fn handshake(&self) -> Result<Handshake, ClientError> {
        let t = self.timeout();
        let stream = self
            .transport
            .connect()
            .map_err(|e| self.unreachable(format!("connect: {e}")))?;
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(t),
            _ => self.unreachable(format!("handshake: {e}")),
        };
        stream.set_read_timeout(Some(t)).map_err(io_err)?;
        // Longer than the request timeout, so requests time out before the socket does.
        stream.set_write_timeout(Some(t * 2)).map_err(io_err)?;
        let hello = HelloRequest {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: CAP_COPY,
        };
        let mut limits = Limits::default();
        let (h, payload) = call_sync(&stream, &limits, Op::Hello, 0, PoolId(0), &hello.encode())
            .map_err(io_err)?;
        if h.status != Status::Ok {
            return Err(ClientError::Refused {
                op: Op::Hello,
                status: h.status,
            });
        }
        let hello =
            HelloReply::decode(&payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
        limits.max_value = hello.max_value;
        if let Some(path) = self.transport.device() {
            let (mapped, channel) = self.device_plane(path, &stream, &limits, &hello);
            let mut h = Handshake {
                stream,
                limits,
                hello,
                mapped,
                channel,
                pools: Vec::new(),
                seen: 0,
            };
            self.open_pools(&mut h)?;
            return Ok(h);
        }
        let mapped = match &stream {
            Stream::Unix(s) if self.opts.map && hello.capabilities & CAP_MAP != 0 => {
                match Mapped::open(s, &limits) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!("values will be read over the socket: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let channel = match &stream {
            Stream::Unix(s)
                if self.opts.channel != ChannelUse::Off
                    && hello.capabilities & CAP_CHANNEL != 0 =>
            {
                match Channel::open(s, &limits) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("requests will go over the socket: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        // (The reader thread sets its own receive timeout.)
        let mut h = Handshake {
            stream,
            limits,
            hello,
            mapped,
            channel,
            pools: Vec::new(),
            seen: 0,
        };
        self.open_pools(&mut h)?;
        Ok(h)
    }

    /// The guest device's arena mapping and channel for this connection's identity,
    /// if the host serves the device now (DEVICE on the socket names the region's
    /// instance); otherwise none, logged, and everything goes over the socket.
    fn device_plane(
        &self,
        path: &std::path::Path,
        stream: &Stream,
        limits: &Limits,
        hello: &HelloReply,
    ) -> (Option<Mapped>, Option<Channel>) {
        let t = self.timeout();
        let fall_back = |why: String| {
            tracing::warn!(
                "{}: {why}; using {} only",
                path.display(),
                self.transport.describe()
            );
            (None, None)
        };
        if hello.capabilities & CAP_DEVICE == 0 {
            return fall_back("the host does not offer the device".into());
        }
        let served = match call_sync(stream, limits, Op::Device, 0, PoolId(0), &[]) {
            Ok((h, p)) if h.status == Status::Ok => match DeviceReply::decode(&p) {
                Ok(d) => d,
                Err(e) => return fall_back(format!("bad DEVICE reply: {e}")),
            },
            Ok((h, _)) => {
                return fall_back(format!(
                    "the host serves no device for this VM ({})",
                    h.status
                ))
            }
            Err(e) => return fall_back(format!("DEVICE: {e} (timeout {t:?})")),
        };
        let dev = match Device::open(path) {
            Ok(d) => d,
            Err(e) => return fall_back(e.to_string()),
        };
        if dev.instance() != served.instance || dev.region_len() != served.len {
            return fall_back(
                "its region is from an earlier host run (QEMU's ivshmem cannot reconnect; restart the VM to use it again)"
                    .into(),
            );
        }
        let mapped = if self.opts.map {
            match dev.mapped() {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(
                        "{}: values will be read over the socket: {e}",
                        path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let channel = if self.opts.channel == ChannelUse::Off {
            None
        } else {
            match dev.channel() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("{}: requests will go over the socket: {e}", path.display());
                    None
                }
            }
        };
        tracing::info!(
            device = %path.display(),
            slot = dev.slot(),
            mapped = mapped.is_some(),
            channel = channel.is_some(),
            "using the guest device"
        );
        (mapped, channel)
    }

    /// Makes a finished handshake the current connection and starts its reader.
    fn install(self: &Arc<Self>, st: &mut State, h: Handshake) -> Result<(), ClientError> {
        let reader = h
            .stream
            .try_clone()
            .map_err(|e| self.unreachable(format!("handshake: {e}")))?;
        let gen = st.gen + 1;
        let me = Arc::clone(self);
        let limits = h.limits;
        thread::Builder::new()
            .name("utmem-reader".into())
            .spawn(move || me.read_loop(reader, gen, limits))
            .map_err(|e| self.unreachable(format!("cannot start the reader thread: {e}")))?;
        st.gen = gen;
        for slot in st.pools.iter_mut() {
            slot.state = PoolState::Closed;
        }
        for (i, id) in h.pools {
            if let Some(id) = id {
                st.pools[i].state = PoolState::Open(id);
                st.pools[i].reset = false;
            }
        }
        tracing::debug!(target = %self.transport.describe(), identity = %h.hello.identity, "connected");
        let live = Arc::new(Live {
            gen,
            stream: Arc::new(h.stream),
            limits: h.limits,
            mapped: h.mapped,
            routes: h.channel.is_some() && self.opts.channel == ChannelUse::Requests,
            channel: h.channel.map(Arc::new),
        });
        self.hello.store(Some(Arc::new(h.hello)));
        self.live.store(Some(Arc::clone(&live)));
        st.chan_inflight = 0;
        st.conn = Some(Arc::clone(&live));
        if let Some(ch) = live.channel.clone().filter(|_| live.routes) {
            let me = Arc::clone(self);
            if let Err(e) = thread::Builder::new()
                .name("utmem-chan".into())
                .spawn(move || me.channel_loop(&ch, gen))
            {
                // Without it nothing would complete: requests take the socket.
                tracing::warn!("cannot start the channel thread ({e}); using the socket");
                st.conn = Some(Arc::new(Live {
                    gen,
                    stream: Arc::clone(&live.stream),
                    limits: live.limits,
                    mapped: None,
                    channel: None,
                    routes: false,
                }));
            }
        }
        Ok(())
    }

    /// Finishes the requests a connection's channel completes, until the connection
    /// is gone. Sleeps on the channel's *complete* eventfd (asking the host for a kick)
    /// while requests are in flight, and a reader tick otherwise.
    fn channel_loop(self: Arc<Self>, ch: &Channel, gen: u64) {
        let tick =
            (self.timeout() / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
        loop {
            if self.closed.load(Ordering::SeqCst)
                || self.live.load().as_ref().map(|l| l.gen) != Some(gen)
            {
                return;
            }
            let mut done = Vec::new();
            ch.drain(|c| done.push(c));
            if !done.is_empty() {
                self.channel_done(gen, done);
                continue;
            }
            if ch.is_dead() {
                let failed = {
                    let mut st = self.lock();
                    self.disconnect(&mut st, gen)
                };
                fail_all(failed, &self.unreachable("the host ended the channel"));
                return;
            }
            if ch.arm() {
                continue;
            }
            let mut p = libc::pollfd {
                fd: ch.complete_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(tick.as_millis()).unwrap_or(100);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, ms) };
            ch.clear_wakeup();
        }
    }

    fn channel_done(self: &Arc<Self>, gen: u64, done: Vec<crate::channel::Completion>) {
        let mut finished = Vec::with_capacity(done.len());
        let refused = {
            let mut st = self.lock();
            for c in done {
                if let Some(p) = st.inflight.remove(&c.id) {
                    st.chan_inflight -= 1;
                    finished.push((c, p));
                }
            }
            self.requeue_after(&mut st)
        };
        self.after_requeue(refused);
        for (c, p) in finished {
            let r = match (c.status, p.op) {
                // A placement means something only to a client that maps the arena.
                (Status::Ok, Op::Put) if c.arg1 != 0 && self.is_mapped_now() => {
                    let at = Placement {
                        offset: c.arg0,
                        stamp: c.arg1,
                    };
                    if let Some(m) = self.live.load().as_ref().and_then(|l| l.mapped.as_ref()) {
                        m.populate(at, p.len);
                    }
                    Ok(Response::Placed(at))
                }
                (Status::Ok, _) => Ok(Response::Done),
                (status, op) => Err(ClientError::Refused { op, status }),
            };
            debug_assert_eq!(p.gen, gen);
            self.settle(c.id, p, r);
        }
    }

    fn is_mapped_now(&self) -> bool {
        self.live
            .load()
            .as_ref()
            .is_some_and(|l| l.mapped.is_some())
    }

    /// Drops connection `gen` if it is the current one; returns the requests to fail
    /// (those in flight on it, and those waiting for one of its pools to open).
    pub(super) fn disconnect(&self, st: &mut State, gen: u64) -> Vec<Completion> {
        if st.conn.as_ref().map(|l| l.gen) != Some(gen) {
            return Vec::new();
        }
        if let Some(live) = st.conn.take() {
            live.stream.shutdown();
        }
        // A reader inside a mapped value keeps the mapping until it is done.
        self.live.store(None);
        for slot in st.pools.iter_mut() {
            slot.state = PoolState::Closed;
        }
        st.outq = OutQueue::new();
        let gone: Vec<Pending> = st
            .inflight
            .extract_if(|_, p| p.gen == gen)
            .map(|(_, p)| p)
            .collect();
        st.chan_inflight -= gone.iter().filter(|p| p.via_channel).count();
        let mut failed: Vec<Completion> = gone.into_iter().map(|p| p.done).collect();
        failed.extend(std::mem::take(&mut st.waiting).into_iter().map(|i| i.done));
        failed.extend(std::mem::take(&mut st.after).into_iter().map(|i| i.done));
        failed
    }

    fn read_loop(self: Arc<Self>, stream: Stream, gen: u64, limits: Limits) {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let tick =
            (self.timeout() / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let mut next_scan = Instant::now() + tick;
        if let Err(e) = stream.set_read_timeout(Some(tick)) {
            tracing::warn!("cannot set the reader's tick: {e}");
        }
        let err = loop {
            if Instant::now() >= next_scan {
                self.expire();
                next_scan = Instant::now() + tick;
            }
            match read_reply(&stream, &mut rbuf, &limits) {
                Ok(Some((h, payload))) => self.complete(h, payload),
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        let mut st = self.lock();
        let failed = self.disconnect(&mut st, gen);
        drop(st);
        if !failed.is_empty() {
            tracing::warn!(target = %self.transport.describe(), "connection lost: {err}");
        }
        let e = match err {
            ReadError::Io(e) => self.unreachable(format!("connection lost: {e}")),
            ReadError::Protocol(m) => ClientError::Protocol(m),
        };
        fail_all(failed, &e);
    }

    fn complete(self: &Arc<Self>, h: ReplyHeader, payload: Bytes) {
        let (p, refused) = {
            let mut st = self.lock();
            let Some(p) = st.inflight.remove(&h.id.0) else {
                return; // the request timed out earlier; its late answer is dropped
            };
            let refused = self.requeue_after(&mut st);
            (p, refused)
        };
        self.after_requeue(refused);
        let r = if h.op != p.op {
            Err(ClientError::Protocol(format!(
                "reply {} is for {:?}, request was {:?}",
                h.id.0, h.op, p.op
            )))
        } else {
            match (h.status, h.op) {
                (Status::Ok, Op::Get | Op::NewPool) => Ok(Response::Value(payload)),
                (Status::Ok, Op::Put) if !payload.is_empty() => match Placement::decode(&payload) {
                    Ok(at) => {
                        // Map its pages here, off the caller's thread, so that reading
                        // it later takes no page faults.
                        if let Some(m) = self.live.load().as_ref().and_then(|l| l.mapped.as_ref()) {
                            m.populate(at, p.len);
                        }
                        Ok(Response::Placed(at))
                    }
                    Err(e) => Err(ClientError::Protocol(e.to_string())),
                },
                (Status::Ok, Op::Stats) => IdentityStats::decode(&payload)
                    .map(Response::Stats)
                    .map_err(|e| ClientError::Protocol(e.to_string())),
                (Status::Ok, _) => Ok(Response::Done),
                (Status::Miss, Op::Get) => Ok(Response::Missing),
                (status, op) => Err(ClientError::Refused { op, status }),
            }
        };
        self.settle(h.id.0, p, r);
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(io::Error),
    #[error("{0}")]
    Protocol(String),
}

/// Reads until one reply is whole, or `tick` passes with nothing to read (`Ok(None)`).
fn read_reply(
    stream: &Stream,
    rbuf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<(ReplyHeader, Bytes)>, ReadError> {
    let fd = stream.as_fd();
    // The socket has a receive timeout of one tick: a read that times out means
    // "nothing yet" while waiting for a header, and "keep going" inside a frame.
    let timed_out = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    while rbuf.len() < REPLY_HEADER_LEN {
        match sys::read_spare(fd, rbuf, READ_CHUNK) {
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) if timed_out(&e) => return Ok(None),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let mut hb = [0u8; REPLY_HEADER_LEN];
    hb.copy_from_slice(&rbuf[..REPLY_HEADER_LEN]);
    let h = ReplyHeader::decode(&hb, limits).map_err(|e| ReadError::Protocol(e.to_string()))?;
    let len = usize::try_from(h.len).map_err(|_| ReadError::Protocol("length".into()))?;
    rbuf.advance(REPLY_HEADER_LEN);
    let payload = if len >= OWN_BUFFER_AT {
        let mut v = BytesMut::with_capacity(len);
        let have = len.min(rbuf.len());
        v.extend_from_slice(&rbuf[..have]);
        rbuf.advance(have);
        while v.len() < len {
            let want = len - v.len();
            match sys::read_spare(fd, &mut v, want) {
                Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        v.freeze()
    } else {
        while rbuf.len() < len {
            match sys::read_spare(fd, rbuf, READ_CHUNK) {
                Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let p = Bytes::copy_from_slice(&rbuf[..len]);
        rbuf.advance(len);
        p
    };
    Ok(Some((h, payload)))
}

/// One request and its reply on a socket nobody else reads yet (the handshake).
pub(super) fn call_sync(
    stream: &Stream,
    limits: &Limits,
    op: Op,
    flags: u16,
    pool: PoolId,
    payload: &[u8],
) -> io::Result<(ReplyHeader, Bytes)> {
    let h = RequestHeader {
        flags,
        pool,
        len: payload.len() as u64,
        ..RequestHeader::new(op, RequestId(0))
    };
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
    let mut w = StreamIo(stream);
    w.write_all(&out)?;
    let mut hb = [0u8; REPLY_HEADER_LEN];
    w.read_exact(&mut hb)?;
    let r = ReplyHeader::decode(&hb, limits)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut p = vec![0u8; usize::try_from(r.len).unwrap_or(0)];
    w.read_exact(&mut p)?;
    if r.op != op {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "reply to another op",
        ));
    }
    Ok((r, Bytes::from(p)))
}

struct StreamIo<'a>(&'a Stream);

impl Read for StreamIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0 {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Vsock(s) => (&*s).read(buf),
        }
    }
}

impl Write for StreamIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0 {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Vsock(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
