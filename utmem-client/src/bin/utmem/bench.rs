//! `utmem bench`: a closed-loop load with a fixed number of requests in flight.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_client::proto::Key;
use utmem_client::{Client, ClientError, Pool, Request};

/// Options of `utmem bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Value size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Requests to time (after the keys are filled).
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Requests kept in flight (at least 1).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    inflight: u64,
    /// Fraction of PUTs, 0 to 1 (the rest are GETs).
    #[arg(long, default_value_t = 0.0, value_parser = ratio)]
    put_ratio: f64,
    /// Distinct keys used (filled with PUTs before timing starts; at least 1).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
}

/// A fraction within 0..=1 (clap reports a bad one as a usage error naming the option).
fn ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not within 0..1"))
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct BenchResult {
    ops: u64,
    elapsed: Duration,
    lat_us: Vec<u64>,
}

impl BenchResult {
    /// The `permille`-th latency (500 = p50), from the sorted samples.
    fn pct(&self, permille: usize) -> u64 {
        let n = self.lat_us.len();
        if n == 0 {
            return 0;
        }
        self.lat_us[((n - 1) * permille / 1000).min(n - 1)]
    }

    /// `<N> ops/s p50=<µs>us p99=<µs>us`, the one line scripts read.
    pub fn summary(&self) -> String {
        let rate = self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{:.0} ops/s p50={}us p99={}us",
            rate,
            self.pct(500),
            self.pct(990)
        )
    }
}

/// Runs the load; progress goes to stderr once a second.
pub fn run(client: &Client, pool: Pool, a: &BenchArgs) -> Result<BenchResult, ClientError> {
    if a.inflight == 0 || a.keys == 0 || !(0.0..=1.0).contains(&a.put_ratio) {
        return Err(ClientError::Invalid(
            "--inflight and --keys must be positive, --put-ratio within 0..1".into(),
        ));
    }
    let value = Bytes::from(vec![0x5au8; a.size]);
    let key = |i: u64| Key::new(i % a.keys, 0);
    eprintln!("bench: filling {} keys of {} bytes", a.keys, a.size);
    for i in 0..a.keys {
        client.put(pool, key(i), value.clone())?;
    }
    eprintln!(
        "bench: {} ops, {} in flight, {} bytes, put ratio {}",
        a.ops, a.inflight, a.size, a.put_ratio
    );
    type Done = (Instant, Result<utmem_client::Response, ClientError>);
    let (tx, rx) = mpsc::channel::<Done>();
    let mut lat_us = Vec::with_capacity(usize::try_from(a.ops).unwrap_or(0));
    let (mut sent, mut done) = (0u64, 0u64);
    // A deterministic PUT/GET mix: request i is a PUT when its slot in a 1000-cycle falls
    // below the ratio.
    // put_ratio was checked to be within 0..=1, so this is 0..=1000.
    #[allow(clippy::cast_possible_truncation)]
    let put_permille = (a.put_ratio * 1000.0).round() as u64;
    let is_put = |i: u64| ((i * 7919) % 1000) < put_permille;
    let start = Instant::now();
    let mut last_report = start;
    let submit = |i: u64| {
        let req = if is_put(i) {
            Request::Put {
                pool,
                key: key(i),
                value: value.clone(),
            }
        } else {
            Request::Get { pool, key: key(i) }
        };
        let t = Instant::now();
        let tx = tx.clone();
        client.submit(req, move |r| {
            let _ = tx.send((t, r));
        });
    };
    while sent < a.ops.min(a.inflight) {
        submit(sent);
        sent += 1;
    }
    while done < a.ops {
        let (t, r) = rx
            .recv()
            .map_err(|_| ClientError::Protocol("completion channel closed".into()))?;
        r?;
        lat_us.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        done += 1;
        if sent < a.ops {
            submit(sent);
            sent += 1;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let rate = done as f64 / start.elapsed().as_secs_f64();
            eprintln!("bench: {done}/{} done, {rate:.0} ops/s", a.ops);
        }
    }
    let elapsed = start.elapsed();
    lat_us.sort_unstable();
    Ok(BenchResult {
        ops: a.ops,
        elapsed,
        lat_us,
    })
}
