//! The pipelined client.
//!
//! Any number of threads submit requests; each request gets a fresh id and a
//! completion callback. Whoever submits while no write is in progress becomes
//! the writer: it takes everything queued and writes it with one writev, and
//! goes on while others keep queueing, so requests submitted during a write are
//! coalesced into the next one. A reader thread per connection reads replies,
//! matches them by id and runs the callbacks; it also expires requests whose
//! time is up. When the connection breaks, every request in flight on it fails
//! with [`ClientError::Unreachable`]; the next request reconnects (with
//! exponential backoff between failed attempts), says HELLO and re-opens the
//! pools by name before anything else is sent.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use utmem_proto::{
    CopyTarget, HelloReply, HelloRequest, IdentityStats, Key, Limits, NewPool, ObjectId, Op,
    OutQueue, Placement, PoolId, PoolKind, ReplyHeader, RequestHeader, RequestId, Status, CAP_COPY,
    CAP_MAP, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, VERSION,
};
use utmem_sys as sys;

use crate::error::ClientError;
use crate::mapped::Mapped;
use crate::request::{Pool, Request, Response};
use crate::spec::Spec;
use crate::transport::{from_spec, Stream, Transport};

/// GET payloads at least this long are read into their own buffer.
const OWN_BUFFER_AT: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;

/// Client settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a request may wait for its answer (also bounds connecting).
    pub timeout: Duration,
    /// First wait after a failed connection attempt; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest wait between connection attempts.
    pub max_backoff: Duration,
    /// Map the host's value arena when the transport allows it (a local Unix
    /// socket): PUTs then answer [`Response::Placed`] and [`Client::read_mapped`]
    /// reads values without a round trip.
    pub map: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            map: false,
        }
    }
}

/// The completion of one request.
pub type Completion = Box<dyn FnOnce(Result<Response, ClientError>) + Send>;

struct Item {
    op: Op,
    flags: u16,
    pool: Option<Pool>,
    key: Key,
    payload: Bytes,
    done: Completion,
}

struct Pending {
    op: Op,
    /// Payload bytes of the request (a PUT's value length).
    len: u64,
    gen: u64,
    deadline: Instant,
    done: Completion,
}

struct PoolSlot {
    req: NewPool,
    /// The host's id on the current connection; `None` until opened on it.
    server: Option<PoolId>,
    /// Empty the pool the first time it is opened (a fresh start).
    reset: bool,
}

struct Live {
    gen: u64,
    stream: Arc<Stream>,
    limits: Limits,
}

#[derive(Default)]
struct State {
    conn: Option<Live>,
    gen: u64,
    next_id: u64,
    inflight: HashMap<u64, Pending>,
    outq: OutQueue,
    writing: bool,
    pools: Vec<PoolSlot>,
    hello: Option<HelloReply>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

struct Inner {
    transport: Box<dyn Transport>,
    opts: Options,
    state: Mutex<State>,
    closed: AtomicBool,
    /// The arena mapping of the current connection (dropped with the connection).
    mapped: RwLock<Option<Mapped>>,
}

/// A connection to utmem-hostd, shared by any number of threads (clone it).
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Closes the connection when the last clone of the client goes.
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        let mut st = self.0.lock();
        if let Some(live) = st.conn.take() {
            live.stream.shutdown();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.handle.0.transport.describe())
            .finish()
    }
}

impl Client {
    /// Connects to the host named by `spec` (`unix:/path`, `vsock:PORT`, `vsock:CID:PORT`,
    /// `auto`) and says HELLO. Fails if the host cannot be reached now.
    pub fn connect(spec: &str, opts: Options) -> Result<Client, ClientError> {
        let spec: Spec = spec.parse()?;
        Self::with_transport(from_spec(&spec)?, opts)
    }

    /// Like [`Client::connect`] with an explicit transport.
    pub fn with_transport(
        transport: Box<dyn Transport>,
        opts: Options,
    ) -> Result<Client, ClientError> {
        let (client, first) = Self::start(transport, opts);
        first.map(|()| client)
    }

    /// Like [`Client::connect`], but a host that is down now is not an error: the
    /// client connects when it is first used. Only a bad spec fails.
    pub fn connect_lazy(spec: &str, opts: Options) -> Result<Client, ClientError> {
        let spec: Spec = spec.parse()?;
        let (client, first) = Self::start(from_spec(&spec)?, opts);
        if let Err(e) = first {
            tracing::warn!("{e}; will retry when used");
        }
        Ok(client)
    }

    fn start(transport: Box<dyn Transport>, opts: Options) -> (Client, Result<(), ClientError>) {
        let inner = Arc::new(Inner {
            transport,
            opts,
            state: Mutex::new(State {
                next_id: 1,
                backoff: opts.min_backoff,
                ..State::default()
            }),
            closed: AtomicBool::new(false),
            mapped: RwLock::new(None),
        });
        let first = {
            let mut st = inner.lock();
            inner.ensure_connected(&mut st)
        };
        let client = Client {
            handle: Arc::new(Handle(inner)),
        };
        (client, first)
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.0
    }

    /// The transport, as a spec string.
    pub fn target(&self) -> String {
        self.inner().transport.describe()
    }

    /// What the host said in its last HELLO (identity, quota, limits).
    pub fn hello(&self) -> Option<HelloReply> {
        self.inner().lock().hello.clone()
    }

    /// Copies the value PUT placed at `p` (`len` bytes) from the mapped arena into
    /// `out`, without a round trip. False if there is no mapping (not asked for,
    /// not a local socket, disconnected) or the value is not there any more: then
    /// ask with a GET.
    pub fn read_mapped(&self, p: Placement, len: usize, out: &mut Vec<u8>) -> bool {
        self.inner()
            .mapped()
            .as_ref()
            .is_some_and(|m| m.read_into(p, len, out))
    }

    /// Runs `f` on the value PUT placed at `p` (`len` bytes) in place in the mapped
    /// arena, without a copy or a round trip; `None` if there is no mapping or the value
    /// is not there any more. Keep `f` short: the host keeps the space while it runs.
    pub fn with_mapped<R>(
        &self,
        p: Placement,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        self.inner().mapped().as_ref()?.with_value(p, len, f)
    }

    /// Whether values can be read from a mapped arena right now.
    pub fn is_mapped(&self) -> bool {
        self.inner().mapped().is_some()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner().lock().conn.is_some()
    }

    /// Opens (or re-attaches to) a pool. The handle survives reconnects. A refusal
    /// (e.g. DENIED for a shared pool that is not granted) is an error and registers
    /// nothing.
    pub fn open_pool(&self, kind: PoolKind, ephemeral: bool) -> Result<Pool, ClientError> {
        let req = NewPool { kind, ephemeral };
        let inner = self.inner();
        let known = |inner: &Arc<Inner>| {
            let st = inner.lock();
            st.pools
                .iter()
                .position(|p| p.req == req)
                .map(|i| (i, st.pools[i].server.is_some()))
        };
        if let Some((i, true)) = known(inner) {
            return Ok(Pool(i));
        }
        // Connecting (if needed) opens every registered pool.
        self.ping()?;
        if let Some((i, true)) = known(inner) {
            return Ok(Pool(i));
        }
        let (gen, id) = self.new_pool_now(&req)?;
        let mut st = inner.lock();
        if st.conn.as_ref().map(|l| l.gen) != gen {
            return Err(inner.unreachable("connection lost while opening the pool"));
        }
        if let Some(i) = st.pools.iter().position(|p| p.req == req) {
            st.pools[i].server = Some(id);
            return Ok(Pool(i));
        }
        st.pools.push(PoolSlot {
            req,
            server: Some(id),
            reset: false,
        });
        Ok(Pool(st.pools.len() - 1))
    }

    /// NEW_POOL on the live connection: the connection generation it went out on and the id.
    fn new_pool_now(&self, req: &NewPool) -> Result<(Option<u64>, PoolId), ClientError> {
        let (flags, payload) = req.encode();
        let (tx, rx) = mpsc::sync_channel(1);
        let gen = self.inner().send_many(vec![Item {
            op: Op::NewPool,
            flags,
            pool: None,
            key: Key::default(),
            payload: Bytes::from(payload),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        }]);
        match self.wait(rx)? {
            Response::Value(b) if b.len() == 4 => {
                Ok((gen, PoolId(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))))
            }
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
        let req = NewPool { kind, ephemeral };
        let inner = self.inner();
        let i = {
            let mut st = inner.lock();
            if let Some(i) = st.pools.iter().position(|p| p.req == req) {
                return Pool(i);
            }
            st.pools.push(PoolSlot {
                req: req.clone(),
                server: None,
                reset,
            });
            if st.conn.is_none() {
                return Pool(st.pools.len() - 1);
            }
            st.pools.len() - 1
        };
        // Connected: open it now, with ordinary requests on the live connection.
        let mut result = self.new_pool_now(&req);
        if reset {
            if let Ok((gen, id)) = result {
                let destroyed = {
                    let mut st = inner.lock();
                    st.pools[i].server = Some(id);
                    drop(st);
                    self.destroy_pool(Pool(i))
                };
                result = destroyed
                    .and_then(|()| self.new_pool_now(&req))
                    .map(|(g, id)| (if g == gen { g } else { None }, id));
            }
        }
        let mut st = inner.lock();
        match result {
            // Only if no reconnect happened meanwhile (a reconnect opened it itself).
            Ok((Some(gen), id)) if st.conn.as_ref().map(|l| l.gen) == Some(gen) => {
                st.pools[i].server = Some(id);
                st.pools[i].reset = false;
            }
            Ok(_) => {}
            Err(e) => {
                st.pools[i].server = None;
                tracing::warn!("cannot open pool {:?} now: {e}", req.kind);
            }
        }
        Pool(i)
    }

    /// Opens a private persistent pool by name.
    pub fn open(&self, name: &str) -> Result<Pool, ClientError> {
        self.open_pool(PoolKind::Private(name.to_owned()), false)
    }

    /// Submits a request without waiting; `done` runs once with its outcome, on the
    /// client's reader thread (or on this thread if it fails before being sent).
    /// It must not block for long: it holds up every other reply.
    pub fn submit(
        &self,
        req: Request,
        done: impl FnOnce(Result<Response, ClientError>) + Send + 'static,
    ) {
        self.submit_many(vec![(req, Box::new(done) as Completion)]);
    }

    /// Submits several requests at once: they are queued under one lock and leave
    /// in one vectored write (the way an I/O thread hands over what it collected).
    pub fn submit_many(&self, reqs: Vec<(Request, Completion)>) {
        let items = reqs
            .into_iter()
            .map(|(req, done)| item(req, done))
            .collect();
        self.inner().send_many(items);
    }

    fn wait(
        &self,
        rx: mpsc::Receiver<Result<Response, ClientError>>,
    ) -> Result<Response, ClientError> {
        let t = self.inner().opts.timeout;
        // The reader thread enforces the timeout; this margin only guards against a bug.
        rx.recv_timeout(t * 2 + Duration::from_secs(1))
            .unwrap_or(Err(ClientError::Timeout(t)))
    }

    /// Submits and waits.
    pub fn call(&self, req: Request) -> Result<Response, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(req, move |r| {
            let _ = tx.send(r);
        });
        self.wait(rx)
    }

    /// Stores `value` under `key`.
    pub fn put(&self, pool: Pool, key: Key, value: Bytes) -> Result<(), ClientError> {
        self.call(Request::Put { pool, key, value }).map(|_| ())
    }

    /// The value under `key`, or `None`.
    pub fn get(&self, pool: Pool, key: Key) -> Result<Option<Bytes>, ClientError> {
        match self.call(Request::Get { pool, key })? {
            Response::Value(v) => Ok(Some(v)),
            _ => Ok(None),
        }
    }

    /// Drops one key (not an error if absent).
    pub fn flush(&self, pool: Pool, key: Key) -> Result<(), ClientError> {
        self.call(Request::Flush { pool, key }).map(|_| ())
    }

    /// Drops every index of an object.
    pub fn flush_object(&self, pool: Pool, oid: ObjectId) -> Result<(), ClientError> {
        self.call(Request::FlushObject { pool, oid }).map(|_| ())
    }

    /// Copies `src` to `dst` inside the host. `Ok(false)` if `src` does not exist.
    pub fn copy(&self, pool: Pool, src: Key, dst: Key) -> Result<bool, ClientError> {
        match self.call(Request::Copy { pool, src, dst }) {
            Ok(_) => Ok(true),
            Err(ClientError::Refused {
                status: Status::Miss,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drops a pool and its values.
    pub fn destroy_pool(&self, pool: Pool) -> Result<(), ClientError> {
        self.call(Request::DestroyPool(pool)).map(|_| ())
    }

    /// Counters of this client's identity.
    pub fn stats(&self) -> Result<IdentityStats, ClientError> {
        match self.call(Request::Stats)? {
            Response::Stats(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("STATS answered {other:?}"))),
        }
    }

    /// One round trip.
    pub fn ping(&self) -> Result<(), ClientError> {
        self.call(Request::Ping).map(|_| ())
    }
}

fn item(req: Request, done: Completion) -> Item {
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
        done,
    }
}

fn lock_state(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn mapped(&self) -> RwLockReadGuard<'_, Option<Mapped>> {
        self.mapped.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock_state(&self.state)
    }

    fn unreachable(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Unreachable {
            target: self.transport.describe(),
            reason: reason.into(),
        }
    }

    /// Queues frames (under one lock, so they leave in one writev) and writes if
    /// nobody else is writing. Returns the connection generation they went out on,
    /// or `None` if they failed before being sent.
    fn send_many(self: &Arc<Self>, items: Vec<Item>) -> Option<u64> {
        let mut st = self.lock();
        if let Err(e) = self.ensure_connected(&mut st) {
            drop(st);
            fail_all(items.into_iter().map(|i| i.done).collect(), &e);
            return None;
        }
        // ensure_connected succeeded, so there is a connection.
        let live = st.conn.as_ref()?;
        let (gen, limits) = (live.gen, live.limits);
        let mut refused: Vec<(Completion, ClientError)> = Vec::new();
        let deadline = Instant::now() + self.opts.timeout;
        for Item {
            op,
            flags,
            pool,
            key,
            payload,
            done,
        } in items
        {
            if payload.len() as u64 > limits.request_payload(op) {
                let e = ClientError::Invalid(format!(
                    "{} bytes is over the host's limit of {} for {op:?}",
                    payload.len(),
                    limits.request_payload(op)
                ));
                refused.push((done, e));
                continue;
            }
            let server_pool = match pool {
                None => PoolId(0),
                Some(Pool(i)) => match st.pools.get(i).map(|slot| slot.server) {
                    Some(Some(id)) => id,
                    Some(None) => {
                        let e = self.unreachable("the pool is not open on this connection");
                        refused.push((done, e));
                        continue;
                    }
                    None => {
                        let e = ClientError::Invalid(format!("pool handle {i} was never opened"));
                        refused.push((done, e));
                        continue;
                    }
                },
            };
            let id = st.next_id;
            st.next_id += 1;
            let h = RequestHeader {
                flags,
                pool: server_pool,
                key,
                len: payload.len() as u64,
                ..RequestHeader::new(op, RequestId(id))
            };
            st.outq.push_copy(&h.encode());
            if !payload.is_empty() {
                st.outq.push_payload(payload);
            }
            st.inflight.insert(
                id,
                Pending {
                    op,
                    len: h.len,
                    gen,
                    deadline,
                    done,
                },
            );
        }
        if !refused.is_empty() {
            drop(st);
            for (done, e) in refused {
                done(Err(e));
            }
            st = self.lock();
        }
        if st.writing {
            return Some(gen); // the writer in progress takes it with its next writev
        }
        st.writing = true;
        // Write until the queue is empty, always on the connection that is current now:
        // a reconnect while we wrote may have queued requests for the new one.
        loop {
            let Some(live) = st.conn.as_ref() else {
                st.writing = false;
                return Some(gen);
            };
            if st.outq.is_empty() {
                st.writing = false;
                return Some(gen);
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
                return Some(gen);
            }
            if st.outq.is_empty() {
                st.outq = q; // keep the allocation
            }
        }
    }

    /// Drops connection `gen` if it is the current one; returns its requests to fail.
    fn disconnect(&self, st: &mut State, gen: u64) -> Vec<Completion> {
        if st.conn.as_ref().map(|l| l.gen) != Some(gen) {
            return Vec::new();
        }
        if let Some(live) = st.conn.take() {
            live.stream.shutdown();
        }
        *self.mapped.write().unwrap_or_else(PoisonError::into_inner) = None;
        st.outq = OutQueue::new();
        st.inflight
            .extract_if(|_, p| p.gen == gen)
            .map(|(_, p)| p.done)
            .collect()
    }

    fn ensure_connected(self: &Arc<Self>, st: &mut State) -> Result<(), ClientError> {
        if st.conn.is_some() {
            return Ok(());
        }
        if self.closed.load(Ordering::Relaxed) {
            return Err(self.unreachable("client closed"));
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
        match self.handshake(st) {
            Ok(()) => {
                st.retry_at = None;
                st.backoff = self.opts.min_backoff;
                Ok(())
            }
            Err(e) => {
                st.last_error = e.to_string();
                st.retry_at = Some(now + st.backoff);
                st.backoff = (st.backoff * 2).min(self.opts.max_backoff);
                Err(e)
            }
        }
    }

    /// Connects, says HELLO, re-opens the pools, starts the reader.
    fn handshake(self: &Arc<Self>, st: &mut State) -> Result<(), ClientError> {
        let t = self.opts.timeout;
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
        for slot in st.pools.iter_mut() {
            let (flags, name) = slot.req.encode();
            let open = || -> Result<PoolId, ClientError> {
                let (h, p) = call_sync(&stream, &limits, Op::NewPool, flags, PoolId(0), &name)
                    .map_err(io_err)?;
                if h.status != Status::Ok || p.len() != 4 {
                    return Err(ClientError::Refused {
                        op: Op::NewPool,
                        status: h.status,
                    });
                }
                Ok(PoolId(u32::from_le_bytes([p[0], p[1], p[2], p[3]])))
            };
            let mut id = match open() {
                Ok(id) => id,
                // One refused pool (e.g. a grant revoked) must not keep the rest offline.
                Err(e @ ClientError::Refused { .. }) => {
                    tracing::warn!("pool {:?} not reopened: {e}", slot.req.kind);
                    slot.server = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if slot.reset {
                call_sync(&stream, &limits, Op::DestroyPool, 0, id, &[]).map_err(io_err)?;
                id = open()?;
            }
            slot.server = Some(id);
            slot.reset = false;
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
        *self.mapped.write().unwrap_or_else(PoisonError::into_inner) = mapped;
        stream.set_read_timeout(None).map_err(io_err)?;
        let reader = stream.try_clone().map_err(io_err)?;
        st.gen += 1;
        let gen = st.gen;
        let me = Arc::clone(self);
        thread::Builder::new()
            .name("utmem-reader".into())
            .spawn(move || me.read_loop(reader, gen, limits))
            .map_err(|e| self.unreachable(format!("cannot start the reader thread: {e}")))?;
        tracing::debug!(target = %self.transport.describe(), identity = %hello.identity, "connected");
        st.hello = Some(hello);
        st.conn = Some(Live {
            gen,
            stream: Arc::new(stream),
            limits,
        });
        Ok(())
    }

    fn read_loop(self: Arc<Self>, stream: Stream, gen: u64, limits: Limits) {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let tick =
            (self.opts.timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
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

    fn complete(&self, h: ReplyHeader, payload: Bytes) {
        let Some(p) = self.lock().inflight.remove(&h.id.0) else {
            return; // the request timed out earlier; its late answer is dropped
        };
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
                        if let Some(m) = self.mapped().as_ref() {
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
        (p.done)(r);
    }

    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<Completion> = {
            let mut st = self.lock();
            st.inflight
                .extract_if(|_, p| p.deadline <= now)
                .map(|(_, p)| p.done)
                .collect()
        };
        fail_all(expired, &ClientError::Timeout(self.opts.timeout));
    }
}

fn fail_all(done: Vec<Completion>, e: &ClientError) {
    for d in done {
        d(Err(e.clone()));
    }
}

fn write_queue(stream: &Stream, q: &mut OutQueue) -> io::Result<()> {
    let fd = stream.as_fd();
    while !q.is_empty() {
        if q.write_with(1024, |iov| sys::writev(fd, iov))? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
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
fn call_sync(
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
