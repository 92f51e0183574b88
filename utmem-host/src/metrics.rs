//! Prometheus metrics: the store's snapshot (what the admin `stats` shows) in the
//! text exposition format 0.0.4, served by a minimal HTTP/1.1 endpoint at `/metrics`.
//!
//! The endpoint has no authentication and names every identity (VM) and pool, so it
//! binds to loopback unless the operator explicitly allows another address.
//! One thread serves one scrape at a time; a scraper that stalls is dropped after
//! [`IO_TIMEOUT`].

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::store::{HostSnapshot, Store, SHARED_ACCOUNT_PREFIX};

/// How long a scraper may take to send its request or take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A non-loopback address without the operator's consent.
    #[error("--metrics {0}: not a loopback address; the metrics name every VM and pool and have no authentication (add --metrics-any-address to expose them anyway)")]
    NotLoopback(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// Binds the metrics endpoint; refuses a non-loopback address unless `any_address`.
pub fn bind(addr: SocketAddr, any_address: bool) -> Result<TcpListener, MetricsError> {
    if !any_address && !addr.ip().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves scrapes on `sock` forever.
pub fn spawn(sock: TcpListener, store: Arc<Store>) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("utmem-metrics".into())
        .spawn(move || {
            for conn in sock.incoming().flatten() {
                if let Err(e) = serve_one(conn, &store) {
                    tracing::debug!("metrics request failed: {e}");
                }
            }
        })
}

fn serve_one(conn: TcpStream, store: &Store) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new((&conn).take(16 << 10));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Headers are read and ignored: the answer is the same for everyone.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, target) = (words.next(), words.next());
    let path = target.map(|t| t.split_once('?').map_or(t, |(p, _)| p));
    let (status, ctype, body) = match (method, path) {
        (Some("GET" | "HEAD"), Some("/metrics")) => {
            ("200 OK", CONTENT_TYPE, render(&store.snapshot()))
        }
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut w = &conn;
    w.write_all(head.as_bytes())?;
    if method != Some("HEAD") {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: its header, then a sample per label set.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// An identity-level series: name, type, help, and the figure.
type IdentitySeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::store::IdentitySnapshot) -> u64,
);

/// A pool-level series.
type PoolSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::store::PoolSnapshot) -> u64,
);

/// The snapshot in the Prometheus text format.
///
/// Host-wide series have no labels; identity series carry `identity`; pool series
/// carry `identity` and `pool` (a private pool's name or a shared pool's uuid). A
/// shared pool is reported once, under its own account `shared:<uuid>`, whatever
/// identities have it open, so sums over `identity` count its bytes once; its
/// counters count the operations of every grantee.
pub fn render(s: &HostSnapshot) -> String {
    let mut out = String::new();
    let host: [(&str, &str, u64); 3] = [
        (
            "utmem_capacity_bytes",
            "Host-wide cap on charged bytes (--capacity).",
            s.capacity,
        ),
        ("utmem_used_bytes", "Value bytes held host-wide.", s.used),
        (
            "utmem_charged_bytes",
            "Bytes charged host-wide: values, per-value overhead, PUTs in flight.",
            s.charged,
        ),
    ];
    for (name, help, v) in host {
        Family::new(&mut out, name, "gauge", help).sample(name, &[], v);
    }
    let identity: [IdentitySeries; 10] = [
        (
            "utmem_identity_quota_bytes",
            "gauge",
            "Cap on the bytes charged to the identity.",
            |i| i.quota,
        ),
        (
            "utmem_identity_values",
            "gauge",
            "Values charged to the identity.",
            |i| i.values,
        ),
        (
            "utmem_identity_bytes",
            "gauge",
            "Value bytes the identity's pools hold.",
            |i| i.bytes,
        ),
        (
            "utmem_identity_charged_bytes",
            "gauge",
            "Bytes charged against the identity's quota: values, per-value overhead, PUTs in flight.",
            |i| i.charged,
        ),
        (
            "utmem_identity_connections",
            "gauge",
            "Connections the identity has open.",
            |i| i.connections,
        ),
        (
            "utmem_identity_pools",
            "gauge",
            "Pools the identity has open (shared ones included).",
            |i| i.pools.len() as u64,
        ),
        (
            "utmem_arena_size_bytes",
            "gauge",
            "Size of the identity's value arena that local clients map (0 until one does).",
            |i| i.arena_size,
        ),
        (
            "utmem_arena_used_bytes",
            "gauge",
            "Bytes of the identity's arena taken by values, their headers and space parked for readers.",
            |i| i.arena_used,
        ),
        (
            "utmem_durable_log_bytes",
            "gauge",
            "Bytes of the identity's durable-pool log files in the data directory.",
            |i| i.log_bytes,
        ),
        (
            "utmem_durable_log_live_bytes",
            "gauge",
            "Of those, bytes of records of live values (compaction reclaims the rest).",
            |i| i.log_live_bytes,
        ),
    ];
    for (name, kind, help, f) in identity {
        let mut fam = Family::new(&mut out, name, kind, help);
        for i in &s.identities {
            fam.sample(name, &[("identity", &i.name)], f(i));
        }
    }
    let pool: [PoolSeries; 9] = [
        (
            "utmem_pool_values",
            "gauge",
            "Values the pool holds.",
            |p| p.values,
        ),
        (
            "utmem_pool_bytes",
            "gauge",
            "Value bytes the pool holds.",
            |p| p.bytes,
        ),
        (
            "utmem_puts_total",
            "counter",
            "PUTs stored in the pool.",
            |p| p.counters.puts,
        ),
        (
            "utmem_gets_total",
            "counter",
            "GETs from the pool (hits and misses).",
            |p| p.counters.gets,
        ),
        (
            "utmem_hits_total",
            "counter",
            "GETs from the pool that found a value.",
            |p| p.counters.hits,
        ),
        (
            "utmem_misses_total",
            "counter",
            "GETs from the pool answered MISS.",
            |p| p.counters.misses,
        ),
        (
            "utmem_no_space_total",
            "counter",
            "PUTs to the pool answered NO_SPACE (quota or capacity).",
            |p| p.counters.no_space,
        ),
        (
            "utmem_too_large_total",
            "counter",
            "PUTs to the pool answered TOO_LARGE (over --max-value).",
            |p| p.counters.too_large,
        ),
        (
            "utmem_evictions_total",
            "counter",
            "Values evicted from the pool (ephemeral pools only).",
            |p| p.counters.evictions,
        ),
    ];
    for (name, kind, help, f) in pool {
        let mut fam = Family::new(&mut out, name, kind, help);
        for i in &s.identities {
            let is_account = i.name.starts_with(SHARED_ACCOUNT_PREFIX);
            for p in i.pools.iter().filter(|p| !p.shared || is_account) {
                fam.sample(name, &[("identity", &i.name), ("pool", &p.name)], f(p));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{IdentitySnapshot, PoolCounters, PoolSnapshot};

    fn pool(name: &str, shared: bool, bytes: u64) -> PoolSnapshot {
        PoolSnapshot {
            id: 1,
            name: name.into(),
            shared,
            ephemeral: false,
            durable: false,
            values: 1,
            bytes,
            counters: PoolCounters {
                puts: 3,
                ..PoolCounters::default()
            },
        }
    }

    fn ident(name: &str, pools: Vec<PoolSnapshot>) -> IdentitySnapshot {
        IdentitySnapshot {
            name: name.into(),
            quota: 100,
            values: 1,
            bytes: 10,
            charged: 138,
            connections: 1,
            puts: 3,
            gets: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
            refusals: 0,
            no_space: 0,
            arena_size: 0,
            arena_used: 0,
            log_bytes: 0,
            log_live_bytes: 0,
            pools,
        }
    }

    #[test]
    fn labels_are_escaped_and_shared_pools_counted_once() {
        let s = HostSnapshot {
            capacity: 1000,
            used: 20,
            charged: 276,
            identities: vec![
                ident("shared:u", vec![pool("u", true, 10)]),
                ident(
                    "vm\"1",
                    vec![pool("a\\b\nc", false, 10), pool("u", true, 10)],
                ),
            ],
        };
        let text = render(&s);
        assert!(text.contains("utmem_pool_bytes{identity=\"vm\\\"1\",pool=\"a\\\\b\\nc\"} 10\n"));
        assert!(text.contains("utmem_pool_bytes{identity=\"shared:u\",pool=\"u\"} 10\n"));
        assert_eq!(text.matches("pool=\"u\"").count(), 9, "{text}");
        assert!(text.contains("# TYPE utmem_puts_total counter\n"));
        assert!(text.contains("utmem_capacity_bytes 1000\n"));
    }
}
