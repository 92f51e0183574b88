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
//!
//! On a local Unix socket whose host offers a shared-memory channel, PUT, FLUSH,
//! FLUSH_OBJECT, COPY and PING go through the channel's rings instead
//! ([`ChannelUse::Requests`], the default): a completion thread per connection
//! finishes them, and a request waits while the other path has requests in flight,
//! so the stream keeps its order.
//!
//! # Files
//!
//! - `mod.rs` (here): [`Client`], [`Options`], the thin public API, and the state
//!   the parts share (`Inner`, `State`, `Live`).
//! - `connection.rs`: the handshake (HELLO, MAP, CHANNEL), reconnection with
//!   backoff, the reader thread and reply matching, the channel's completion thread.
//! - `pipeline.rs`: submission (to the channel or the socket, in order), the writer
//!   that coalesces queued frames, in-flight bookkeeping and timeouts.
//! - `pools.rs`: pool registration, NEW_POOL (on the live connection and during a
//!   handshake), re-opening on UNKNOWN_POOL, [`Client::pool_id`].

mod connection;
mod pipeline;
mod pools;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use utmem_proto::{HelloReply, IdentityStats, Key, Limits, ObjectId, OutQueue, Placement, Status};
use vm_memory::VolatileSlice;

use crate::channel::Channel;
use crate::error::ClientError;
use crate::mapped::Mapped;
use crate::request::{Pool, Request, Response};
use crate::spec::Spec;
use crate::transport::{from_spec, Stream, Transport};

use pipeline::{item, Item, Pending};
use pools::PoolSlot;

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
    /// What to do with a shared-memory channel when the host offers one (a local Unix
    /// socket with the arena mapped).
    pub channel: ChannelUse,
}

/// How a client uses a shared-memory channel (`docs/channel.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelUse {
    /// Everything over the socket.
    Off,
    /// PUT, FLUSH, FLUSH_OBJECT, COPY and PING of the API go through the channel (a
    /// submission to an awake host costs no system call; a completion thread per
    /// connection finishes them); the rest over the socket. Requests keep their order:
    /// one path waits while the other has requests in flight.
    Requests,
    /// The channel is opened and handed to the caller ([`Client::channel`]), which
    /// drives it itself (the Redis module, from Redis's main thread).
    Caller,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            map: false,
            channel: ChannelUse::Requests,
        }
    }
}

/// The completion of one request.
pub type Completion = Box<dyn FnOnce(Result<Response, ClientError>) + Send>;

/// One connection, as readers see it.
struct Live {
    gen: u64,
    stream: Arc<Stream>,
    limits: Limits,
    /// The arena mapping of this connection (goes with it).
    mapped: Option<Mapped>,
    /// Its shared-memory channel (ends with it).
    channel: Option<Arc<Channel>>,
    /// Whether the API's requests go through it ([`ChannelUse::Requests`]).
    routes: bool,
}

#[derive(Default)]
struct State {
    conn: Option<Arc<Live>>,
    gen: u64,
    next_id: u64,
    inflight: HashMap<u64, Pending>,
    /// Of those, sent through the channel.
    chan_inflight: usize,
    /// Requests waiting for the other path to drain (they keep their order).
    after: Vec<Item>,
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

    /// The live connection's shared-memory channel and the connection's generation
    /// (a new connection brings a new channel; the old one's requests then have no
    /// answer coming). Never waits.
    ///
    /// Only with [`ChannelUse::Caller`]: with [`ChannelUse::Requests`] the client
    /// drives the channel itself.
    pub fn channel(&self) -> Option<(Arc<Channel>, u64)> {
        let live = self.handle.0.live.load();
        let l = live.as_ref().filter(|l| !l.routes)?;
        Some((Arc::clone(l.channel.as_ref()?), l.gen))
    }

    /// Requests published in the live connection's channel so far (0 without one;
    /// counts wrap at 2^32).
    pub fn channel_requests(&self) -> u64 {
        let live = self.handle.0.live.load();
        live.as_ref()
            .and_then(|l| l.channel.as_ref())
            .map_or(0, |c| c.submitted())
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

fn lock_state(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
}

fn fail_all(done: Vec<Completion>, e: &ClientError) {
    for d in done {
        d(Err(e.clone()));
    }
}
