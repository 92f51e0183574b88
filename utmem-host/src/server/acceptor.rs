//! The accept thread: every listener in one `mio` poll. It tells who a client is,
//! applies the per-identity connection cap and hands the connection to the least
//! loaded I/O thread.
//!
//! When accept fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
//! ENOMEM) the pending connections stay in the kernel's backlog and the thread
//! backs off (10 ms, doubling to 1 s) instead of retrying at once; it logs when it
//! starts backing off and when it accepts again, not every failure.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::listener::{self, Listener};
use super::worker::{NewConn, WorkerHandle};
use crate::store::Store;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Connections over an identity's cap that may wait for their DENIED reply at once;
/// beyond that they are closed without one.
const MAX_PENDING_REFUSALS: usize = 16;

struct Acceptor {
    listeners: Vec<Listener>,
    store: Arc<Store>,
    workers: Vec<WorkerHandle>,
    max_connections: usize,
    /// Set while accept is failing for lack of resources.
    backoff: Option<Backoff>,
    /// Refusals since the last one logged.
    refused_unlogged: u64,
    refused_logged_at: Option<Instant>,
}

struct Backoff {
    until: Instant,
    delay: Duration,
    since: Instant,
    failures: u64,
}

/// Starts the accept thread for `listeners`.
pub(crate) fn spawn(
    listeners: Vec<Listener>,
    store: Arc<Store>,
    workers: Vec<WorkerHandle>,
    max_connections: usize,
) -> io::Result<thread::JoinHandle<()>> {
    let poll = Poll::new()?;
    for (i, l) in listeners.iter().enumerate() {
        let raw = match l {
            Listener::Unix { sock, .. } => {
                sock.set_nonblocking(true)?;
                sock.as_raw_fd()
            }
            Listener::Vsock { sock, .. } => {
                sock.set_nonblocking(true)?;
                sock.as_raw_fd()
            }
        };
        poll.registry()
            .register(&mut SourceFd(&raw), Token(i), Interest::READABLE)?;
    }
    let mut a = Acceptor {
        listeners,
        store,
        workers,
        max_connections,
        backoff: None,
        refused_unlogged: 0,
        refused_logged_at: None,
    };
    thread::Builder::new()
        .name("utmem-accept".into())
        .spawn(move || a.run(poll))
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl Acceptor {
    fn run(&mut self, mut poll: Poll) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .backoff
                .as_ref()
                .map(|b| b.until.saturating_duration_since(Instant::now()));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("accept poll failed: {e}");
                    thread::sleep(BACKOFF_MAX);
                }
                continue;
            }
            if self
                .backoff
                .as_ref()
                .is_some_and(|b| Instant::now() < b.until)
            {
                // Still backing off: the backlog keeps the connections meanwhile.
                continue;
            }
            // Edge-triggered: accept on every listener until it would block (after a
            // back-off, every listener may have connections waiting).
            let mut failed = false;
            for i in 0..self.listeners.len() {
                failed |= self.accept_all(i);
            }
            if !failed {
                self.recovered();
            }
        }
    }

    /// Accepts until the listener would block; true if accept failed instead.
    fn accept_all(&mut self, i: usize) -> bool {
        loop {
            let accepted = match &self.listeners[i] {
                Listener::Unix { sock, name, .. } => sock.accept().map(|(conn, _)| {
                    let ident = match name {
                        Some(n) => Ok(n.clone()),
                        None => listener::unix_peer_identity(&conn),
                    };
                    // Only a plain local socket (identity = peer uid) may map the arena: a
                    // named listener is a VMM's hybrid vsock, where descriptors cannot travel.
                    let can_map = name.is_none();
                    let nb = conn.set_nonblocking(true);
                    (OwnedFd::from(conn), ident, can_map, nb)
                }),
                Listener::Vsock { sock, .. } => sock.accept().map(|(conn, addr)| {
                    let nb = conn.set_nonblocking(true);
                    // SAFETY: into_raw_fd gives up ownership of a valid open descriptor,
                    // which the OwnedFd takes over (closing it on drop).
                    let fd = unsafe { OwnedFd::from_raw_fd(conn.into_raw_fd()) };
                    (fd, Ok(listener::vsock_peer_identity(&addr)), false, nb)
                }),
            };
            match accepted {
                Ok((fd, ident, can_map, nb)) => {
                    if let Err(e) = nb {
                        tracing::warn!("cannot make a connection non-blocking, closing: {e}");
                        continue;
                    }
                    match ident {
                        Ok(name) => self.dispatch(fd, &name, can_map),
                        Err(e) => tracing::warn!("cannot read peer credentials, closing: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.back_off(&e, i);
                    return true;
                }
            }
        }
    }

    fn back_off(&mut self, e: &io::Error, i: usize) {
        let now = Instant::now();
        match &mut self.backoff {
            Some(b) => {
                b.failures += 1;
                b.delay = (b.delay * 2).min(BACKOFF_MAX);
                b.until = now + b.delay;
            }
            None => {
                let what = self.listeners[i].describe();
                if out_of_resources(e) {
                    tracing::error!(
                        listener = %what,
                        "accept failed: {e}; backing off until connections close \
                         (raise the descriptor limit, or lower --max-connections)"
                    );
                } else {
                    tracing::warn!(listener = %what, "accept failed: {e}; backing off");
                }
                self.backoff = Some(Backoff {
                    until: now + BACKOFF_MIN,
                    delay: BACKOFF_MIN,
                    since: now,
                    failures: 1,
                });
            }
        }
    }

    fn recovered(&mut self) {
        if let Some(b) = self.backoff.take() {
            tracing::info!(
                failures = b.failures,
                "accepting connections again after {} ms",
                b.since.elapsed().as_millis()
            );
        }
    }

    fn dispatch(&mut self, fd: OwnedFd, name: &str, can_map: bool) {
        let ident = self.store.identity(name);
        let refused = if ident.try_connect(self.max_connections) {
            None
        } else {
            self.log_refusal(name);
            if !ident.try_refuse(MAX_PENDING_REFUSALS) {
                return; // closed at once
            }
            Some(self.max_connections)
        };
        let Some(w) = self.workers.iter().min_by_key(|w| w.load.load(Relaxed)) else {
            return;
        };
        w.give(NewConn {
            fd,
            ident,
            can_map,
            refused,
        });
    }

    /// At most one line a second, with the count of refusals since the last.
    fn log_refusal(&mut self, name: &str) {
        self.refused_unlogged += 1;
        let now = Instant::now();
        if self
            .refused_logged_at
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        tracing::warn!(
            identity = %name,
            max_connections = self.max_connections,
            refused = self.refused_unlogged,
            "connection refused (DENIED): the identity has as many connections as it may"
        );
        self.refused_unlogged = 0;
        self.refused_logged_at = Some(now);
    }
}
