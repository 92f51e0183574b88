//! The module's counters (INFO utmem, UTMEM.STATS). Lock-free: updated from the
//! main thread, the I/O thread and the client's reader thread.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::LazyLock;

static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

/// The module's counters.
pub fn get() -> &'static Stats {
    &STATS
}

/// Current totals and monotonic counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Values living on the host now.
    pub offloaded_values: AtomicI64,
    /// Their bytes.
    pub offloaded_bytes: AtomicI64,
    /// utmem values whose bytes are kept in Redis now (host down or full).
    pub inline_values: AtomicI64,
    /// Values whose PUT is in flight now.
    pub pending: AtomicI64,
    /// Bytes of those.
    pub pending_bytes: AtomicI64,
    /// UTMEM.SETs below the threshold, stored as plain strings.
    pub inline_sets: AtomicU64,
    /// Values kept in Redis because the host was unreachable or did not answer in
    /// time (each value counted once, however often it is offered again).
    pub host_down_fallbacks: AtomicU64,
    /// Values kept in Redis because the host was full (each counted once).
    pub no_space_fallbacks: AtomicU64,
    /// utmem values known to be lost now: the host answered MISS for them, or the RDB
    /// they were loaded from could not include them.
    pub lost_values: AtomicI64,
    /// Reads answered `-UTMEMLOST`.
    pub lost_reads: AtomicU64,
    /// Values read straight from the mapped arena (no round trip).
    pub mapped_reads: AtomicU64,
    /// Mapped reads that found the value gone or moved and asked over the socket.
    pub mapped_fallbacks: AtomicU64,
    /// GETs whose checksum did not match.
    pub checksum_errors: AtomicU64,
    /// RECALLALL: keys brought back so far, and whether it runs.
    pub recalled: AtomicU64,
    /// 1 while UTMEM.RECALLALL runs.
    pub recall_running: AtomicI64,
    rtt: Histogram,
}

impl Stats {
    /// Records one host round trip.
    pub fn rtt_us(&self, us: u64) {
        self.rtt.record(us);
    }

    /// Round-trip percentiles in µs.
    pub fn rtt_percentile(&self, permille: u64) -> u64 {
        self.rtt.percentile(permille)
    }

    /// Adjusts a gauge.
    pub fn add(g: &AtomicI64, n: i64) {
        g.fetch_add(n, Relaxed);
    }

    /// Bumps a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

/// Log-linear histogram: 4 buckets per power of two, up to ~2^40 µs.
#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; 160],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Histogram {
    fn bucket(v: u64) -> usize {
        if v < 4 {
            return usize::try_from(v).unwrap_or(0);
        }
        let log = 63 - u64::from(v.leading_zeros()); // >= 2
        let sub = (v >> (log - 2)) & 3;
        usize::try_from(log * 4 + sub).unwrap_or(159).min(159)
    }

    fn lower_bound(b: usize) -> u64 {
        if b < 4 {
            return b as u64;
        }
        let log = (b / 4) as u64;
        let sub = (b % 4) as u64;
        (1 << log) | (sub << (log - 2))
    }

    fn record(&self, v: u64) {
        self.buckets[Self::bucket(v)].fetch_add(1, Relaxed);
    }

    fn percentile(&self, permille: u64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = (total * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::lower_bound(i);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_a_quarter_octave() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.percentile(500);
        assert!((384..=500).contains(&p50), "{p50}");
        let p99 = h.percentile(990);
        assert!((768..=990).contains(&p99), "{p99}");
        for v in [0u64, 1, 3, 4, 5, 7, 8, 100, 1 << 30] {
            let b = Histogram::bucket(v);
            assert!(Histogram::lower_bound(b) <= v, "{v}");
        }
    }
}
