//! Replies that wait for the host: a command fills in what it knows, hands the
//! rest to the I/O thread, and the last completion sends the whole reply.
//!
//! How a command may wait depends on where it runs: an ordinary client is
//! blocked (Redis goes on serving everyone else); inside MULTI/EXEC or Lua the
//! command waits synchronously, bounded by `timeout-ms`; a command replicated
//! from a master or replayed from the AOF needs no reply at all.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis_module::{Context, ContextFlags, RedisResult, RedisValue};

use crate::raw::{write_reply, Blocked, Val};

/// Where the command runs, which decides how it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Block the client.
    Block,
    /// Wait on the main thread (MULTI/EXEC, Lua).
    Sync,
    /// Nobody reads the reply (replicated from a master, AOF load).
    Detached,
}

/// The mode for the command running in `ctx`.
pub fn mode(ctx: &Context) -> Mode {
    let f = ctx.get_flags();
    if f.intersects(ContextFlags::REPLICATED | ContextFlags::LOADING) {
        Mode::Detached
    } else if f.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING) {
        Mode::Sync
    } else {
        Mode::Block
    }
}

enum Sink {
    Blocked(Blocked),
    Sync(mpsc::SyncSender<Val>),
    Detached,
}

type Finish = Box<dyn FnOnce(Vec<Val>) -> Val + Send>;

struct Inner {
    parts: Vec<Option<Val>>,
    remaining: usize,
    sink: Option<Sink>,
    finish: Option<Finish>,
}

/// A reply assembled from parts, some of which arrive later.
#[derive(Clone)]
pub struct Gather(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gather")
    }
}

/// A command's reply in progress.
#[allow(missing_debug_implementations)] // holds a channel receiver
pub struct Pending {
    gather: Gather,
    rx: Option<mpsc::Receiver<Val>>,
    mode: Mode,
    now: Option<Val>,
}

impl Gather {
    /// Starts a reply of `parts` parts, `remaining` of which are still to come;
    /// `finish` turns the parts into the reply.
    pub fn start(
        ctx: &Context,
        parts: Vec<Option<Val>>,
        finish: impl FnOnce(Vec<Val>) -> Val + Send + 'static,
    ) -> Pending {
        let remaining = parts.iter().filter(|p| p.is_none()).count();
        let mode = mode(ctx);
        let finish: Finish = Box::new(finish);
        if remaining == 0 {
            let vals = parts.into_iter().map(|p| p.unwrap_or(Val::Null)).collect();
            return Pending {
                gather: Gather(Arc::new(Mutex::new(Inner {
                    parts: Vec::new(),
                    remaining: 0,
                    sink: None,
                    finish: None,
                }))),
                rx: None,
                mode,
                now: Some(finish(vals)),
            };
        }
        let (sink, rx) = match mode {
            Mode::Block => (Sink::Blocked(Blocked::block(ctx)), None),
            Mode::Sync => {
                let (tx, rx) = mpsc::sync_channel(1);
                (Sink::Sync(tx), Some(rx))
            }
            Mode::Detached => (Sink::Detached, None),
        };
        Pending {
            gather: Gather(Arc::new(Mutex::new(Inner {
                parts,
                remaining,
                sink: Some(sink),
                finish: Some(finish),
            }))),
            rx,
            mode,
            now: None,
        }
    }

    /// Part `i` arrived; the last one sends the reply.
    pub fn set(&self, i: usize, v: Val) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if g.parts.get(i).is_none_or(Option::is_some) {
            return;
        }
        g.parts[i] = Some(v);
        g.remaining -= 1;
        if g.remaining > 0 {
            return;
        }
        let parts = std::mem::take(&mut g.parts);
        let (Some(sink), Some(finish)) = (g.sink.take(), g.finish.take()) else {
            return;
        };
        drop(g);
        let vals = parts.into_iter().map(|p| p.unwrap_or(Val::Null)).collect();
        let reply = finish(vals);
        match sink {
            Sink::Blocked(b) => b.finish(&reply),
            Sink::Sync(tx) => {
                let _ = tx.send(reply);
            }
            Sink::Detached => {}
        }
    }
}

impl Pending {
    /// The handle the completions fill in.
    pub fn gather(&self) -> Gather {
        self.gather.clone()
    }

    /// Ends the command: replies now, or after waiting (Sync), or leaves the
    /// blocked client to the completions. `detached` is what a detached command replies.
    pub fn reply(self, ctx: &Context, timeout: Duration, detached: Val) -> RedisResult {
        if let Some(v) = self.now {
            write_reply(ctx, &v);
            return Ok(RedisValue::NoReply);
        }
        match self.mode {
            Mode::Block => Ok(RedisValue::NoReply),
            Mode::Detached => {
                write_reply(ctx, &detached);
                Ok(RedisValue::NoReply)
            }
            Mode::Sync => {
                let v = self
                    .rx
                    .and_then(|rx| rx.recv_timeout(timeout).ok())
                    .unwrap_or_else(|| {
                        Val::Err(format!(
                            "UTMEMDOWN no answer from the host within {timeout:?}"
                        ))
                    });
                write_reply(ctx, &v);
                Ok(RedisValue::NoReply)
            }
        }
    }
}
