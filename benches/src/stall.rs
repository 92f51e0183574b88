//! `utmem-bench stall`: how responsive Redis stays while utmem-hostd is stuck
//! (SIGSTOP) and clients wait in UTMEM.GET: PING latency from another client,
//! against the same measurement with the host running.

use std::time::{Duration, Instant};

use serde::Serialize;
use utmem_testkit::{pattern, Daemon, Redis};

/// PING latency with the host running and with it stopped.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Clients blocked in UTMEM.GET during the stall.
    pub waiting_clients: usize,
    /// PINGs per measurement.
    pub pings: usize,
    /// p50 / p99 µs with the host running.
    pub running_us: (u64, u64),
    /// p50 / p99 µs with the host stopped.
    pub stopped_us: (u64, u64),
}

fn pings(c: &mut redis::Connection, n: usize) -> anyhow::Result<(u64, u64)> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let _: String = redis::cmd("PING").query(c)?;
        lat.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    lat.sort_unstable();
    Ok((lat[n / 2], lat[(n - 1) * 99 / 100]))
}

/// Runs the measurement.
pub fn run(waiting_clients: usize, n: usize) -> anyhow::Result<Report> {
    let daemon = Daemon::start(&[]);
    let redis = Redis::start(
        &[
            "transport",
            &daemon.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "30000",
            // Over the socket: a mapped read would not wait for the stopped host at all.
            "mapped-read-max",
            "0",
        ],
        &[],
    );
    let mut c = redis.conn();
    let _: () = redis::cmd("UTMEM.SET")
        .arg("big")
        .arg(pattern(1, 64 << 10))
        .query(&mut c)?;
    while redis.info("utmem", "utmem_pending") != "0" {
        std::thread::sleep(Duration::from_millis(10));
    }
    pings(&mut c, 200)?; // warm-up
    let running_us = pings(&mut c, n)?;
    eprintln!("stall: host stopped, {waiting_clients} clients blocked in UTMEM.GET");
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let waiters: Vec<_> = (0..waiting_clients)
        .map(|_| {
            let mut w = redis.conn();
            std::thread::spawn(move || {
                let _: redis::RedisResult<Vec<u8>> =
                    redis::cmd("UTMEM.GET").arg("big").query(&mut w);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let stopped_us = pings(&mut c, n);
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    for w in waiters {
        let _ = w.join();
    }
    Ok(Report {
        waiting_clients,
        pings: n,
        running_us,
        stopped_us: stopped_us?,
    })
}
