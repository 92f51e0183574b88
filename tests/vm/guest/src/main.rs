//! `utmem-vmtest`: runs inside a guest VM (tests/vm/run.sh) and checks utmem over
//! real AF_VSOCK: the client's blocking and pipelined APIs, isolation from the
//! other guest, shared-pool grants, the quota, and redis-server with the module.
//! Prints `vmtest-result: N passed, M failed` last (the guest init adds its own checks and
//! prints the closing `vmtest:` line); exits non-zero on any failure.
//!
//! Usage: `utmem-vmtest <spec> <identity> <role> [redis-port]`, where role `filler`
//! fills its quota and role `keeper` checks its own values meanwhile.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_client::proto::{Key, PoolKind, PoolUuid, Status};
use utmem_client::{Client, ClientError, Options, Request, Response};

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9).wrapping_add(seed) as u8)
        .collect::<Vec<u8>>()
        .into()
}

struct Run {
    passed: u32,
    failed: u32,
}

impl Run {
    fn check(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("vmtest: ok   {name}");
            }
            Err(e) => {
                self.failed += 1;
                println!("vmtest: FAIL {name}: {e}");
            }
        }
    }
}

fn e<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn blocking(c: &Client) -> Result<(), String> {
    let pool = c.open("vmtest").map_err(e)?;
    let sizes = [0usize, 1, 64, 4095, 4096, 65536, 1 << 20];
    for (i, n) in sizes.iter().enumerate() {
        c.put(pool, Key::new(i as u64, 0), pattern(i as u64, *n))
            .map_err(e)?;
    }
    for (i, n) in sizes.iter().enumerate() {
        let v = c.get(pool, Key::new(i as u64, 0)).map_err(e)?;
        if v != Some(pattern(i as u64, *n)) {
            return Err(format!("size {n}: wrong or missing value"));
        }
    }
    c.destroy_pool(pool).map_err(e)
}

/// 1,000 × 64 KiB PUTs then GETs, 64 in flight, content-checked.
fn pipelined(c: &Client) -> Result<(), String> {
    let pool = c.open("vmtest-pipe").map_err(e)?;
    for phase in 0..2 {
        let (tx, rx) = mpsc::channel::<(u64, Result<Response, ClientError>)>();
        let mut sent = 0u64;
        let mut done = 0u64;
        let submit = |i: u64| {
            let tx = tx.clone();
            let req = if phase == 0 {
                Request::Put {
                    pool,
                    key: Key::new(i, 0),
                    value: pattern(i, 64 << 10),
                }
            } else {
                Request::Get {
                    pool,
                    key: Key::new(i, 0),
                }
            };
            c.submit(req, move |r| {
                let _ = tx.send((i, r));
            });
        };
        while sent < 64 {
            submit(sent);
            sent += 1;
        }
        while done < 1000 {
            let (i, r) = rx.recv_timeout(Duration::from_secs(60)).map_err(e)?;
            match (phase, r) {
                (0, Ok(Response::Done)) => {}
                (1, Ok(Response::Value(v))) if v == pattern(i, 64 << 10) => {}
                (_, other) => return Err(format!("request {i}: {other:?}")),
            }
            done += 1;
            if sent < 1000 {
                submit(sent);
                sent += 1;
            }
        }
    }
    c.destroy_pool(pool).map_err(e)
}

/// Both guests open "default" and write key 4242 with their own name; each must only
/// ever see its own value there.
fn isolation(c: &Client, me: &str) -> Result<(), String> {
    let pool = c.open("default").map_err(e)?;
    let key = Key::new(4242, 0);
    if let Some(v) = c.get(pool, key).map_err(e)? {
        return Err(format!(
            "a fresh pool already held {:?}",
            String::from_utf8_lossy(&v)
        ));
    }
    c.put(pool, key, Bytes::from(me.to_owned())).map_err(e)?;
    std::thread::sleep(Duration::from_secs(2)); // the other guest writes its own meanwhile
    match c.get(pool, key).map_err(e)? {
        Some(v) if v == me.as_bytes() => {}
        other => return Err(format!("saw {other:?} instead of our own value")),
    }
    c.flush(pool, key).map_err(e)
}

fn shared_denied(c: &Client) -> Result<(), String> {
    let u = uuid::Uuid::parse_str("5ec0a1d0-0000-4000-8000-000000000001").map_err(e)?;
    match c.open_pool(PoolKind::Shared(PoolUuid(*u.as_bytes())), false) {
        Err(ClientError::Refused {
            status: Status::Denied,
            ..
        }) => Ok(()),
        other => Err(format!("expected DENIED, got {other:?}")),
    }
}

/// `filler` writes until NO_SPACE; `keeper` keeps 16 MiB of its own values intact meanwhile.
fn quota(c: &Client, role: &str) -> Result<(), String> {
    let pool = c.open("quota").map_err(e)?;
    let quota = c.stats().map_err(e)?.quota;
    if role == "filler" {
        for i in 0.. {
            match c.put(pool, Key::new(i, 0), pattern(i, 1 << 20)) {
                Ok(()) => {}
                Err(ClientError::Refused {
                    status: Status::NoSpace,
                    ..
                }) => {
                    let s = c.stats().map_err(e)?;
                    println!("vmtest: filled {} of quota {}", s.bytes, s.quota);
                    // Give the space back for the Redis checks.
                    c.destroy_pool(pool).map_err(e)?;
                    return (s.bytes <= quota).then_some(()).ok_or("over quota".into());
                }
                Err(x) => return Err(e(x)),
            }
        }
        Err("never refused".into())
    } else {
        for i in 0..16 {
            c.put(pool, Key::new(i, 0), pattern(i + 7, 1 << 20))
                .map_err(e)?;
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            for i in 0..16 {
                if c.get(pool, Key::new(i, 0)).map_err(e)? != Some(pattern(i + 7, 1 << 20)) {
                    return Err(format!("value {i} changed"));
                }
            }
        }
        c.destroy_pool(pool).map_err(e)
    }
}

fn redis_checks(port: u16) -> Result<(), String> {
    let cl = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(e)?;
    let mut c = cl
        .get_connection_with_timeout(Duration::from_secs(10))
        .map_err(e)?;
    for i in 0..20u64 {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{i}"))
            .arg(pattern(i, 20_000).to_vec())
            .query(&mut c)
            .map_err(e)?;
    }
    let info: String = redis::cmd("INFO").arg("utmem").query(&mut c).map_err(e)?;
    if !info.contains("utmem_offloaded_values:20") {
        return Err(format!("not offloaded: {info}"));
    }
    let _: () = redis::cmd("DEBUG").arg("RELOAD").query(&mut c).map_err(e)?;
    for i in 0..20u64 {
        let v: Vec<u8> = redis::cmd("UTMEM.GET")
            .arg(format!("k{i}"))
            .query(&mut c)
            .map_err(e)?;
        if v != pattern(i, 20_000) {
            return Err(format!("k{i} differs after DEBUG RELOAD"));
        }
    }
    for i in 0..20u64 {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("k{i}"))
            .query(&mut c)
            .map_err(e)?;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: utmem-vmtest <spec> <identity> <filler|keeper> [redis-port ...]");
        std::process::exit(2);
    }
    let (spec, me, role) = (&args[1], &args[2], &args[3]);
    let mut run = Run {
        passed: 0,
        failed: 0,
    };
    let opts = Options {
        timeout: Duration::from_secs(60),
        ..Options::default()
    };
    match Client::connect(spec, opts) {
        Err(x) => run.check("connect", Err(e(x))),
        Ok(c) => {
            let who = c.hello().map(|h| h.identity).unwrap_or_default();
            run.check(
                "hello identity",
                (who == *me).then_some(()).ok_or(format!("identity {who}")),
            );
            run.check("blocking 0 B..1 MiB", blocking(&c));
            run.check("pipelined 1000 x 64 KiB", pipelined(&c));
            run.check("isolation from the other guest", isolation(&c, me));
            run.check("shared pool not granted: DENIED", shared_denied(&c));
            run.check(&format!("quota ({role})"), quota(&c, role));
        }
    }
    for port in &args[4..] {
        let r = port.parse().map_err(e).and_then(redis_checks);
        run.check(&format!("redis-server with the module (port {port})"), r);
    }
    println!(
        "vmtest-result: {} passed, {} failed",
        run.passed, run.failed
    );
    std::process::exit(i32::from(run.failed > 0));
}
