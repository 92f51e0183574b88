//! The pipelined client.
//!
//! Any number of threads submit requests; each request gets a fresh id and a
//! completion callback. Whoever submits while no write is in progress becomes
//! the writer: it takes everything queued and writes it with one writev, and
//! goes on while others keep queueing, so requests submitted during a write are
//! coalesced into the next one. A reader thread per connection reads replies,
//! matches them by id and runs the callbacks; it also expires requests whose
//! time is up. When the connection breaks, every request in flight on it fails
//! with [`ClientError::Unreachable`]; the next request starts a reconnection
//! (exponential backoff between failed attempts) on a thread of its own, which
//! says HELLO and re-opens the pools by name; requests submitted meanwhile wait
//! for it. No lock is held across a handshake: [`Client::is_connected`],
//! [`Client::hello`] and mapped reads never wait for a host that hangs.
//!
//! A pool handle names a pool by its name: when the host answers UNKNOWN_POOL
//! for a pool the client had open (the operator dropped the identity, or the pool
//! was destroyed), that request fails and the client re-opens the pool on the
//! same connection; requests for it wait until the new id is known.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Buf, Bytes, BytesMut};
use utmem_proto::{
    CopyTarget, HelloReply, HelloRequest, IdentityStats, Key, Limits, NewPool, ObjectId, Op,
    OutQueue, Placement, PoolId, PoolKind, ReplyHeader, RequestHeader, RequestId, Status, CAP_COPY,
    CAP_MAP, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, VERSION,
};
use utmem_sys as sys;
use vm_memory::VolatileSlice;

use crate::error::ClientError;
use crate::mapped::Mapped;
use crate::request::{Pool, Request, Response};
use crate::spec::Spec;
use crate::transport::{from_spec, Stream, Transport};

/// GET payloads at least this long are read into their own buffer.
const OWN_BUFFER_AT: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// How often a registered pool that is not open on the live connection is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Client settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a request may wait for its answer (also bounds each step of connecting).
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
    deadline: Instant,
    /// A NEW_POOL that (re-)opens this registered slot.
    opens: Option<usize>,
    done: Completion,
}

struct Pending {
    op: Op,
    /// Payload bytes of the request (a PUT's value length).
    len: u64,
    gen: u64,
    deadline: Instant,
    /// The slot and the host id the request went out with.
    pool: Option<(usize, PoolId)>,
    opens: Option<usize>,
    done: Completion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolState {
    /// Not open on the current connection (or there is none).
    Closed,
    /// A NEW_POOL (this request id) is on its way; requests for the pool wait.
    Opening(u64),
    /// The host's id on the current connection.
    Open(PoolId),
}

struct PoolSlot {
    req: NewPool,
    state: PoolState,
    /// Empty the pool the first time it is opened (a fresh start).
    reset: bool,
    /// Handed out: re-opened on every connection. False for a slot whose first open
    /// has not succeeded (a refused `open_pool` registers nothing).
    registered: bool,
    /// When a NEW_POOL for it last went out on a live connection.
    tried: Option<Instant>,
}

/// One connection, as readers see it.
struct Live {
    gen: u64,
    stream: Arc<Stream>,
    limits: Limits,
    /// The arena mapping of this connection (goes with it).
    mapped: Option<Mapped>,
}

#[derive(Default)]
struct State {
    conn: Option<Arc<Live>>,
    gen: u64,
    next_id: u64,
    inflight: HashMap<u64, Pending>,
    outq: OutQueue,
    writing: bool,
    pools: Vec<PoolSlot>,
    /// Requests waiting for the connection being made, or for their pool to open.
    waiting: Vec<Item>,
    /// A handshake is running (on a thread of its own, or in `Client::connect`).
    connecting: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

struct Inner {
    transport: Box<dyn Transport>,
    opts: Options,
    /// Request bookkeeping; never held across a system call that may wait for the host.
    state: Mutex<State>,
    closed: AtomicBool,
    /// The current connection, for readers that must not take `state`.
    live: ArcSwapOption<Live>,
    /// What the host said in its last HELLO.
    hello: ArcSwapOption<HelloReply>,
    /// The request timeout in ms (`Options::timeout`, changed by `Client::set_timeout`).
    timeout_ms: AtomicU64,
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
        self.0.closed.store(true, Ordering::SeqCst);
        let mut st = self.0.lock();
        if let Some(live) = st.conn.take() {
            live.stream.shutdown();
        }
        self.0.live.store(None);
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
        let client = Self::start(transport, opts);
        client.inner().lock().connecting = true;
        client.inner().connect_attempt().map(|()| client)
    }

    /// Like [`Client::connect`], but returns at once: the client connects on a thread
    /// of its own (requests submitted meanwhile wait for it), and a host that is down
    /// now is not an error. Only a bad spec fails.
    pub fn connect_lazy(spec: &str, opts: Options) -> Result<Client, ClientError> {
        let spec: Spec = spec.parse()?;
        let client = Self::start(from_spec(&spec)?, opts);
        let inner = client.inner();
        let started = {
            let mut st = inner.lock();
            inner.start_connect(&mut st)
        };
        if let Err(e) = started {
            tracing::warn!("{e}; will retry when used");
        }
        Ok(client)
    }

    fn start(transport: Box<dyn Transport>, opts: Options) -> Client {
        let inner = Arc::new(Inner {
            transport,
            opts,
            state: Mutex::new(State {
                next_id: 1,
                backoff: opts.min_backoff,
                ..State::default()
            }),
            closed: AtomicBool::new(false),
            live: ArcSwapOption::empty(),
            hello: ArcSwapOption::empty(),
            timeout_ms: AtomicU64::new(duration_ms(opts.timeout)),
        });
        Client {
            handle: Arc::new(Handle(inner)),
        }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.0
    }

    /// Changes the request timeout for requests submitted from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner()
            .timeout_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.inner().timeout()
    }

    /// The transport, as a spec string.
    pub fn target(&self) -> String {
        self.inner().transport.describe()
    }

    /// What the host said in its last HELLO (identity, quota, limits). Never waits.
    pub fn hello(&self) -> Option<HelloReply> {
        self.inner().hello.load().as_deref().cloned()
    }

    /// Copies the value PUT placed at `p` (`len` bytes) from the mapped arena into
    /// `out` (reusing its allocation), without a round trip. False if there is no
    /// mapping (not asked for, not a local socket, disconnected) or the value is not
    /// there any more: then ask with a GET. Never waits.
    pub fn read_mapped(&self, p: Placement, len: usize, out: &mut Vec<u8>) -> bool {
        let live = self.inner().live.load();
        live.as_ref()
            .and_then(|l| l.mapped.as_ref())
            .is_some_and(|m| m.read_into(p, len, out))
    }

    /// Runs `f` on the value PUT placed at `p` (`len` bytes) in the mapped arena, as
    /// volatile memory the host may change (copy it out with
    /// [`VolatileSlice::copy_to`]); the slice is valid only inside `f`. `None` if there
    /// is no mapping or the value is not there, and also if the value's stamp changed
    /// by the time `f` returned: whatever `f` made of the bytes must then not be used.
    /// Keep `f` short: the host keeps the space while it runs. Never waits.
    pub fn with_mapped<R>(
        &self,
        p: Placement,
        len: usize,
        f: impl FnOnce(VolatileSlice<'_>) -> R,
    ) -> Option<R> {
        let live = self.inner().live.load();
        live.as_ref()?.mapped.as_ref()?.with_value(p, len, f)
    }

    /// Whether values can be read from a mapped arena right now. Never waits.
    pub fn is_mapped(&self) -> bool {
        self.inner()
            .live
            .load()
            .as_ref()
            .is_some_and(|l| l.mapped.is_some())
    }

    /// Whether a connection is up right now. Never waits (not even for a handshake
    /// in progress).
    pub fn is_connected(&self) -> bool {
        self.inner().live.load().is_some()
    }

    /// `Ok` if connected; otherwise starts a connection attempt on a thread of its own
    /// (unless one is running or the backoff says to wait) and says why there is no
    /// connection now. Never waits: for a thread that must not block (Redis's).
    pub fn check_connected(&self) -> Result<(), ClientError> {
        if self.is_connected() {
            return Ok(());
        }
        let inner = self.inner();
        let mut st = inner.lock();
        if st.conn.is_some() {
            return Ok(());
        }
        inner.start_connect(&mut st)?;
        Err(inner.unreachable(if st.last_error.is_empty() {
            "connecting".to_owned()
        } else {
            format!("connecting again after: {}", st.last_error)
        }))
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
        let deadline = Instant::now() + self.inner().timeout();
        let items = reqs
            .into_iter()
            .map(|(req, done)| item(req, deadline, done))
            .collect();
        self.inner().send_many(items);
    }

    fn wait(
        &self,
        rx: mpsc::Receiver<Result<Response, ClientError>>,
    ) -> Result<Response, ClientError> {
        let t = self.inner().timeout();
        // The reader thread enforces the timeout once a request is sent; a handshake
        // has its own socket timeouts. This margin only guards against a bug.
        rx.recv_timeout(t * 3 + Duration::from_secs(1))
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

fn item(req: Request, deadline: Instant, done: Completion) -> Item {
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

fn lock_state(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a handshake brings back, to be installed under the state lock.
struct Handshake {
    stream: Stream,
    limits: Limits,
    hello: HelloReply,
    mapped: Option<Mapped>,
    /// Slot index → the host's id (`None`: refused on this connection).
    pools: Vec<(usize, Option<PoolId>)>,
    /// Slots below this index were looked at.
    seen: usize,
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    /// The request timeout now.
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
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

    /// A NEW_POOL request that opens slot `i`.
    fn open_item(&self, i: usize, done: Completion) -> Item {
        let mut st = self.lock();
        self.open_item_locked(&mut st, i, done)
    }

    fn open_item_locked(&self, st: &mut State, i: usize, done: Completion) -> Item {
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

    /// Starts a handshake on a thread of its own, unless one is running (then the
    /// caller's requests wait for it) or the backoff says to wait (an error).
    fn start_connect(self: &Arc<Self>, st: &mut State) -> Result<(), ClientError> {
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
    fn connect_attempt(self: &Arc<Self>) -> Result<(), ClientError> {
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
        // (The reader thread sets its own receive timeout.)
        let mut h = Handshake {
            stream,
            limits,
            hello,
            mapped,
            pools: Vec::new(),
            seen: 0,
        };
        self.open_pools(&mut h)?;
        Ok(h)
    }

    /// Opens the registered pools the handshake has not looked at yet (those registered
    /// while it runs too: until none is new), on its socket, without the state lock.
    fn open_pools(&self, h: &mut Handshake) -> Result<(), ClientError> {
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
        });
        self.hello.store(Some(Arc::new(h.hello)));
        self.live.store(Some(Arc::clone(&live)));
        st.conn = Some(live);
        Ok(())
    }

    /// Queues frames (under one lock, so they leave in one writev) and writes if
    /// nobody else is writing. With no connection, the requests wait for the one
    /// being made (starting it if need be).
    fn send_many(self: &Arc<Self>, items: Vec<Item>) {
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
        let Some(live) = st.conn.as_ref() else {
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
            st.next_id += 1;
            let h = RequestHeader {
                flags: it.flags,
                pool: pool.map_or(PoolId(0), |(_, server)| server),
                key: it.key,
                len: it.payload.len() as u64,
                ..RequestHeader::new(it.op, RequestId(id))
            };
            st.outq.push_copy(&h.encode());
            if !it.payload.is_empty() {
                st.outq.push_payload(it.payload);
            }
            st.inflight.insert(
                id,
                Pending {
                    op: it.op,
                    len: h.len,
                    gen,
                    deadline: it.deadline,
                    pool,
                    opens: it.opens,
                    done: it.done,
                },
            );
        }
        refused
    }

    /// Drops connection `gen` if it is the current one; returns the requests to fail
    /// (those in flight on it, and those waiting for one of its pools to open).
    fn disconnect(&self, st: &mut State, gen: u64) -> Vec<Completion> {
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
        let mut failed: Vec<Completion> = st
            .inflight
            .extract_if(|_, p| p.gen == gen)
            .map(|(_, p)| p.done)
            .collect();
        failed.extend(std::mem::take(&mut st.waiting).into_iter().map(|i| i.done));
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

    /// Runs a request's completion, after the pool bookkeeping its outcome calls for:
    /// a NEW_POOL opens its slot (or closes it), and UNKNOWN_POOL for an open pool
    /// starts re-opening it.
    fn settle(self: &Arc<Self>, id: u64, p: Pending, r: Result<Response, ClientError>) {
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

    fn expire(self: &Arc<Self>) {
        let now = Instant::now();
        let expired: Vec<(u64, Pending)> = {
            let mut st = self.lock();
            st.inflight.extract_if(|_, p| p.deadline <= now).collect()
        };
        for (id, p) in expired {
            self.settle(id, p, Err(ClientError::Timeout(self.timeout())));
        }
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
