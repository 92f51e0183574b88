//! A redis-benchmark-like load: N connections, one request in flight on each,
//! random keys, fixed value size, latency per request. One thread, one epoll
//! loop (mio), like redis-benchmark itself.
//!
//! Why not redis-benchmark: its custom commands take the value from argv, and
//! Linux caps one argument at 128 KiB, so `UTMEM.SET key <1 MiB>` cannot be
//! driven by it. Using one generator for both plain and utmem commands keeps
//! the comparison fair.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<set> key value`
    Set,
    /// `<get> key`
    Get,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Server address.
    pub addr: SocketAddr,
    /// Command name (SET, GET, UTMEM.SET, UTMEM.GET).
    pub command: String,
    /// Set or get.
    pub kind: Kind,
    /// Connections.
    pub clients: usize,
    /// Requests in all.
    pub requests: u64,
    /// Keys are `key:<0..keyspace>`.
    pub keyspace: u64,
    /// Value size for sets.
    pub size: usize,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests answered.
    pub done: u64,
    /// Error replies.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latencies in µs, sorted.
    pub lat_us: Vec<u32>,
}

impl Outcome {
    /// Requests per second.
    pub fn ops(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Percentile (permille) latency in µs.
    pub fn pct(&self, permille: usize) -> u32 {
        let n = self.lat_us.len();
        if n == 0 {
            return 0;
        }
        self.lat_us[((n - 1) * permille / 1000).min(n - 1)]
    }
}

struct Conn {
    sock: TcpStream,
    head: Vec<u8>,
    sent: usize,
    started: Instant,
    rbuf: Vec<u8>,
    busy: bool,
}

/// Encodes the part of a request before the value (or all of a GET).
fn head(command: &str, kind: Kind, key: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let key = format!("key:{key}");
    let argc = if kind == Kind::Set { 3 } else { 2 };
    out.extend_from_slice(
        format!(
            "*{argc}\r\n${}\r\n{command}\r\n${}\r\n{key}\r\n",
            command.len(),
            key.len()
        )
        .as_bytes(),
    );
    if kind == Kind::Set {
        out.extend_from_slice(format!("${size}\r\n").as_bytes());
    }
}

/// Length of the first complete RESP reply in `b` (simple, error, integer or bulk),
/// and whether it is an error.
fn reply_len(b: &[u8]) -> Option<(usize, bool)> {
    let line = b.windows(2).position(|w| w == b"\r\n")? + 2;
    match b.first()? {
        b'$' => {
            let n: i64 = std::str::from_utf8(&b[1..line - 2]).ok()?.parse().ok()?;
            if n < 0 {
                return Some((line, false));
            }
            let total = line + usize::try_from(n).ok()? + 2;
            (b.len() >= total).then_some((total, false))
        }
        b'-' => Some((line, true)),
        _ => Some((line, false)),
    }
}

/// A small xorshift so key choice costs nothing.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the load; `stop` is polled so Ctrl-C ends it early.
pub fn run(spec: &Spec, value: &[u8], stop: &dyn Fn() -> bool) -> io::Result<Outcome> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(spec.clients);
    for i in 0..spec.clients {
        let std_sock = std::net::TcpStream::connect(spec.addr)?;
        std_sock.set_nodelay(true)?;
        std_sock.set_nonblocking(true)?;
        let mut sock = TcpStream::from_std(std_sock);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        conns.push(Conn {
            sock,
            head: Vec::with_capacity(128),
            sent: 0,
            started: Instant::now(),
            rbuf: Vec::with_capacity(64 * 1024),
            busy: false,
        });
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut issued = 0u64;
    let mut out = Outcome {
        done: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        lat_us: Vec::with_capacity(usize::try_from(spec.requests).unwrap_or(0)),
    };
    let tail: &[u8] = if spec.kind == Kind::Set { b"\r\n" } else { b"" };
    let body: &[u8] = if spec.kind == Kind::Set { value } else { b"" };
    let mut events = Events::with_capacity(1024);
    let mut chunk = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let issue = |c: &mut Conn, rng: &mut Rng, issued: &mut u64| {
        head(
            &spec.command,
            spec.kind,
            rng.next() % spec.keyspace,
            spec.size,
            &mut c.head,
        );
        c.sent = 0;
        c.busy = true;
        c.started = Instant::now();
        *issued += 1;
    };
    for c in conns.iter_mut() {
        if issued < spec.requests {
            issue(c, &mut rng, &mut issued);
        }
    }
    while out.done < spec.requests && !stop() {
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            // Write, read, parse; a reply issues the next request, which is written at once.
            loop {
                let total = c.head.len() + body.len() + tail.len();
                while c.busy && c.sent < total {
                    let mut parts: Vec<IoSlice<'_>> = Vec::with_capacity(3);
                    let mut skip = c.sent;
                    for p in [&c.head[..], body, tail] {
                        if skip >= p.len() {
                            skip -= p.len();
                        } else {
                            parts.push(IoSlice::new(&p[skip..]));
                            skip = 0;
                        }
                    }
                    match c.sock.write_vectored(&parts) {
                        Ok(n) => c.sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                loop {
                    match c.sock.read(&mut chunk) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => c.rbuf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                let mut issued_now = false;
                while let Some((len, err)) = reply_len(&c.rbuf) {
                    c.rbuf.drain(..len);
                    out.done += 1;
                    out.errors += u64::from(err);
                    let us = c.started.elapsed().as_micros();
                    out.lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    c.busy = false;
                    if issued < spec.requests {
                        issue(c, &mut rng, &mut issued);
                        issued_now = true;
                    }
                }
                if !issued_now {
                    break;
                }
            }
        }
    }
    out.elapsed = t0.elapsed();
    out.lat_us.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_framed() {
        assert_eq!(reply_len(b"+OK\r\n"), Some((5, false)));
        assert_eq!(reply_len(b"-ERR x\r\n+OK"), Some((8, true)));
        assert_eq!(reply_len(b"$-1\r\n"), Some((5, false)));
        assert_eq!(reply_len(b"$3\r\nabc\r\n"), Some((9, false)));
        assert_eq!(reply_len(b"$3\r\nab"), None);
        assert_eq!(reply_len(b"+O"), None);
        let mut h = Vec::new();
        head("SET", Kind::Set, 7, 3, &mut h);
        assert_eq!(h, b"*3\r\n$3\r\nSET\r\n$5\r\nkey:7\r\n$3\r\n");
    }
}
