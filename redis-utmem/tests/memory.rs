//! 10,000 offloaded 16 KiB values leave Redis `used_memory` (minus its empty-server
//! baseline) under 3% of what the same data takes with plain SET.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::time::{Duration, Instant};

use utmem_testkit::{pattern, Daemon, Redis};

fn used(r: &Redis) -> i64 {
    r.info("memory", "used_memory")
        .parse()
        .expect("used_memory")
}

fn fill(r: &Redis, cmd: &str) -> i64 {
    let mut c = r.conn();
    let base = used(r);
    let v = pattern(1, 16 << 10);
    for batch in 0..100 {
        let mut p = redis::pipe();
        for i in 0..100 {
            p.cmd(cmd)
                .arg(format!("key:{}", batch * 100 + i))
                .arg(&v)
                .ignore();
        }
        let _: () = p.query(&mut c).expect("fill");
    }
    let t0 = Instant::now();
    while r.info("utmem", "utmem_pending") != "0" && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // At rest: the module gives argument strings back to Redis from its cron (10 Hz).
    std::thread::sleep(Duration::from_millis(300));
    used(r) - base
}

#[test]
fn offloaded_values_take_under_3_percent_of_plain() {
    let d = Daemon::start(&[]);
    let plain = Redis::start(&["transport", &d.spec()], &[]);
    let ours = Redis::start(&["transport", &d.spec()], &[]);
    let p = fill(&plain, "SET");
    let u = fill(&ours, "UTMEM.SET");
    let ratio = u as f64 / p as f64;
    eprintln!(
        "used_memory above baseline: plain {p} B, utmem {u} B, ratio {:.2}%",
        ratio * 100.0
    );
    assert!(p > 160_000_000, "plain holds the data: {p}");
    assert!(ratio < 0.03, "utmem/plain = {ratio:.4}");
    assert_eq!(d.pool_usage(&ours.pool()), (10_000, 10_000 * (16 << 10)));
}
