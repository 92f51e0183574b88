//! Client round trips over a Unix socket, beside their floors.
//!
//! - `roundtrip_64B`: a 64-byte GET at 1 in flight vs a plain 64-byte Unix-socket
//!   ping-pong (target: p50 within 1.5×).
//! - `pipelined_4KiB`: GETs of 4 KiB at 1 and 64 in flight (target: ≥ 3× ops/s at 64).
//! - `mapped_read`: reading a placed value in the mapped arena (what UTMEM.GET does over
//!   a local socket) beside a socket GET of the same value and a memcpy of its size.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use utmem_benches::{echo_pair, LocalHost};
use utmem_client::proto::Key;
use utmem_client::{Client, Options, Request, Response};

fn roundtrip(c: &mut Criterion) {
    let host = LocalHost::start(1 << 30);
    let client = Client::connect(&host.spec(), Options::default()).expect("connect");
    let pool = client.open("bench").expect("pool");
    client
        .put(pool, Key::new(1, 0), Bytes::from(vec![1u8; 64]))
        .expect("put");
    let (_dir, mut echo) = echo_pair(64);
    let mut g = c.benchmark_group("roundtrip_64B");
    g.bench_function("unix_pingpong", |b| {
        let mut buf = [7u8; 64];
        b.iter(|| {
            echo.write_all(&buf).expect("write");
            echo.read_exact(&mut buf).expect("read");
        })
    });
    g.bench_function("utmem_get_1_inflight", |b| {
        b.iter(|| client.get(pool, Key::new(1, 0)).expect("get"))
    });
    g.finish();
}

fn pipelined(c: &mut Criterion) {
    let host = LocalHost::start(1 << 30);
    let client = Client::connect(&host.spec(), Options::default()).expect("connect");
    let pool = client.open("bench").expect("pool");
    for k in 0..256 {
        client
            .put(pool, Key::new(k, 0), Bytes::from(vec![2u8; 4096]))
            .expect("put");
    }
    let mut g = c.benchmark_group("pipelined_4KiB");
    g.throughput(Throughput::Elements(1));
    for inflight in [1u64, 64] {
        g.bench_with_input(BenchmarkId::from_parameter(inflight), &inflight, |b, &n| {
            b.iter_custom(|iters| run_closed_loop(&client, pool, iters, n))
        });
    }
    g.finish();
}

fn run_closed_loop(client: &Client, pool: utmem_client::Pool, ops: u64, inflight: u64) -> Duration {
    let (tx, rx) = mpsc::channel();
    let submit = |i: u64| {
        let tx = tx.clone();
        client.submit(
            Request::Get {
                pool,
                key: Key::new(i % 256, 0),
            },
            move |r| {
                let _ = tx.send(r.is_ok());
            },
        );
    };
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < ops.min(inflight) {
        submit(sent);
        sent += 1;
    }
    for _ in 0..ops {
        assert!(rx.recv().expect("completion"), "request failed");
        if sent < ops {
            submit(sent);
            sent += 1;
        }
    }
    t0.elapsed()
}

fn mapped_read(c: &mut Criterion) {
    let host = LocalHost::start(1 << 30);
    let client = Client::connect(
        &host.spec(),
        Options {
            map: true,
            ..Options::default()
        },
    )
    .expect("connect");
    let pool = client.open("bench").expect("pool");
    let mut g = c.benchmark_group("mapped_read");
    for size in [4096usize, 65536] {
        let value = Bytes::from(vec![3u8; size]);
        let Ok(Response::Placed(at)) = client.call(Request::Put {
            pool,
            key: Key::new(size as u64, 0),
            value: value.clone(),
        }) else {
            panic!("the value was not placed in the arena");
        };
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("in_place", size), &size, |b, &n| {
            // The entry, stamp checks and exit around a read of one byte.
            b.iter(|| {
                client
                    .with_mapped(at, n, |v| {
                        let mut last = [0u8; 1];
                        v.offset(n - 1).map(|s| s.copy_to(&mut last[..])).ok();
                        last[0]
                    })
                    .expect("mapped")
            })
        });
        let mut out = Vec::with_capacity(size);
        g.bench_with_input(BenchmarkId::new("copy_out", size), &size, |b, &n| {
            b.iter(|| assert!(client.read_mapped(at, n, &mut out)))
        });
        g.bench_with_input(BenchmarkId::new("socket_get", size), &size, |b, _| {
            b.iter(|| client.get(pool, Key::new(size as u64, 0)).expect("get"))
        });
        let mut dst = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter(|| dst.copy_from_slice(&value))
        });
    }
    g.finish();
}

criterion_group!(benches, roundtrip, pipelined, mapped_read);
criterion_main!(benches);
