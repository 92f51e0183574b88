//! An I/O thread: one `mio` poll serving many sessions. The acceptor hands it new
//! connections through a channel and a waker; every [`TICK`] it checks the
//! sessions' timeouts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::channel::Service;
use super::session::{Drive, Session, SessionError, Timeouts};
use crate::store::{Identity, Store};

const WAKER: Token = Token(usize::MAX);
/// How often timeouts are checked.
const TICK: Duration = Duration::from_millis(250);

/// A connection for a worker to serve.
#[derive(Debug)]
pub(crate) struct NewConn {
    pub(crate) fd: OwnedFd,
    pub(crate) ident: Arc<Identity>,
    pub(crate) can_map: bool,
    /// The identity's connection cap, if this connection is over it.
    pub(crate) refused: Option<usize>,
}

/// The acceptor's end of a worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    tx: Sender<NewConn>,
    waker: Arc<Waker>,
    /// Connections it serves now.
    pub(crate) load: Arc<AtomicUsize>,
}

impl WorkerHandle {
    /// Hands `c` to the worker.
    pub(crate) fn give(&self, c: NewConn) {
        self.load.fetch_add(1, Relaxed);
        if self.tx.send(c).is_err() {
            self.load.fetch_sub(1, Relaxed);
            tracing::error!("an I/O thread is gone; connection dropped");
            return;
        }
        if let Err(e) = self.waker.wake() {
            tracing::error!("cannot wake an I/O thread: {e}");
        }
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<NewConn>,
    store: Arc<Store>,
    timeouts: Timeouts,
    service: Option<Arc<Service>>,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    /// Sessions with work left that needs no event.
    ready: Vec<usize>,
    load: Arc<AtomicUsize>,
}

/// Starts an I/O thread.
pub(crate) fn spawn(
    n: usize,
    store: Arc<Store>,
    timeouts: Timeouts,
    service: Option<Arc<Service>>,
) -> std::io::Result<WorkerHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel();
    let load = Arc::new(AtomicUsize::new(0));
    let mut w = Worker {
        poll,
        rx,
        store,
        timeouts,
        service,
        sessions: Vec::new(),
        free: Vec::new(),
        ready: Vec::new(),
        load: Arc::clone(&load),
    };
    thread::Builder::new()
        .name(format!("utmem-io-{n}"))
        .spawn(move || w.run())?;
    Ok(WorkerHandle { tx, waker, load })
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        loop {
            let timeout = if self.ready.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("I/O thread poll failed: {e}");
                    thread::sleep(TICK);
                }
                continue;
            }
            let mut todo = std::mem::take(&mut self.ready);
            for ev in events.iter() {
                if ev.token() == WAKER {
                    self.adopt(&mut todo);
                } else {
                    todo.push(ev.token().0);
                }
            }
            todo.sort_unstable();
            todo.dedup();
            for i in todo {
                self.drive(i);
            }
            let now = Instant::now();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                self.tick(now);
            }
        }
    }

    fn adopt(&mut self, todo: &mut Vec<usize>) {
        while let Ok(c) = self.rx.try_recv() {
            let i = self.free.pop().unwrap_or_else(|| {
                self.sessions.push(None);
                self.sessions.len() - 1
            });
            let raw = c.fd.as_raw_fd();
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&raw),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::error!("cannot watch a connection: {e}");
                match c.refused {
                    None => c.ident.disconnected(),
                    Some(_) => c.ident.refusal_done(),
                }
                self.free.push(i);
                self.load.fetch_sub(1, Relaxed);
                continue;
            }
            if c.refused.is_none() {
                tracing::debug!(identity = %c.ident.name(), "connected");
            }
            let s = Session::new(
                c.fd,
                Arc::clone(&self.store),
                c.ident,
                c.can_map,
                self.timeouts,
                c.refused,
                self.service.clone(),
            );
            self.sessions[i] = Some(s);
            todo.push(i);
        }
    }

    fn drive(&mut self, i: usize) {
        let Some(s) = self.sessions.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        match s.drive() {
            Drive::Wait => {}
            Drive::More => self.ready.push(i),
            Drive::Done => self.end(i),
        }
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.sessions.len() {
            let over = match self.sessions[i].as_mut() {
                Some(s) => !s.tick(now),
                None => false,
            };
            if over {
                self.end(i);
            }
        }
    }

    fn end(&mut self, i: usize) {
        let Some(mut s) = self.sessions.get_mut(i).and_then(Option::take) else {
            return;
        };
        let raw = s.fd().as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        self.free.push(i);
        self.load.fetch_sub(1, Relaxed);
        let result = s.take_result();
        let ident = Arc::clone(s.identity());
        let refused = s.is_refused();
        drop(s);
        if refused {
            ident.refusal_done();
            return;
        }
        ident.disconnected();
        let name = ident.name();
        match result {
            Ok(()) => tracing::debug!(identity = %name, "disconnected"),
            Err(SessionError::Io(e)) => tracing::info!(identity = %name, "connection lost: {e}"),
            Err(e) => tracing::warn!(identity = %name, "closing connection: {e}"),
        }
    }
}
