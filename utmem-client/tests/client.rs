//! utmem-client against the real utmem-hostd over Unix sockets.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use utmem_client::proto::{Key, ObjectId, PoolKind, Status};
use utmem_client::{Client, ClientError, Options, Pool, Request, Response};
use utmem_testkit::Daemon;

fn spec(d: &Daemon) -> String {
    format!("unix:{}", d.sock.display())
}

fn value(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed) as u8)
        .collect::<Vec<u8>>()
        .into()
}

const SIZES: [usize; 12] = [
    0,
    1,
    7,
    64,
    1000,
    4095,
    4096,
    4097,
    16384,
    65536,
    300_000,
    1 << 20,
];

#[test]
fn blocking_calls_round_trip_every_size() {
    let d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), Options::default()).expect("connect");
    assert!(c.hello().expect("hello").identity.starts_with("uid:"));
    c.ping().expect("ping");
    let pool = c.open("blocking").expect("pool");
    assert_eq!(c.open("blocking").expect("same pool"), pool);
    for (i, n) in SIZES.iter().enumerate() {
        c.put(pool, Key::new(i as u64, 0), value(i as u64, *n))
            .expect("put");
    }
    for (i, n) in SIZES.iter().enumerate() {
        let got = c.get(pool, Key::new(i as u64, 0)).expect("get");
        assert_eq!(got, Some(value(i as u64, *n)), "size {n}");
    }
    assert_eq!(c.get(pool, Key::new(999, 0)).expect("get"), None);
    assert!(c.copy(pool, Key::new(3, 0), Key::new(50, 0)).expect("copy"));
    assert!(!c
        .copy(pool, Key::new(999, 0), Key::new(51, 0))
        .expect("copy of nothing"));
    assert_eq!(
        c.get(pool, Key::new(50, 0)).expect("get"),
        Some(value(3, 64))
    );
    c.flush(pool, Key::new(50, 0)).expect("flush");
    c.flush_object(pool, ObjectId(0)).expect("flush object");
    assert_eq!(c.get(pool, Key::new(0, 0)).expect("get"), None);
    let s = c.stats().expect("stats");
    assert_eq!(s.values, SIZES.len() as u64 - 1);
    c.destroy_pool(pool).expect("destroy");
    assert_eq!(
        c.get(pool, Key::new(1, 0)),
        Err(ClientError::Refused {
            op: utmem_client::proto::Op::Get,
            status: Status::UnknownPool
        })
    );
}

/// Keeps `inflight` requests going until `ops` completed; checks every GET's content.
fn pipelined(c: &Client, pool: Pool, inflight: usize, ops: usize, base: u64) {
    let (tx, rx) = mpsc::channel::<(u64, usize, bool, Result<Response, ClientError>)>();
    let submit = |i: usize| {
        let k = base + (i / 2) as u64;
        let len = SIZES[(i / 2) % SIZES.len()];
        let tx = tx.clone();
        let is_put = i.is_multiple_of(2);
        let req = if is_put {
            Request::Put {
                pool,
                key: Key::new(k, 0),
                value: value(k, len),
            }
        } else {
            Request::Get {
                pool,
                key: Key::new(k, 0),
            }
        };
        c.submit(req, move |r| {
            let _ = tx.send((k, len, is_put, r));
        });
    };
    let mut sent = 0;
    while sent < inflight.min(ops) {
        submit(sent);
        sent += 1;
    }
    for _ in 0..ops {
        let (k, len, is_put, r) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("completion");
        match (is_put, r) {
            (true, Ok(Response::Done)) => {}
            (false, Ok(Response::Value(v))) => assert!(v == value(k, len), "content of {k}"),
            other => panic!("unexpected completion for {k}: {other:?}"),
        }
        if sent < ops {
            submit(sent);
            sent += 1;
        }
    }
}

#[test]
fn pipelined_at_1_and_64_in_flight() {
    let d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), Options::default()).expect("connect");
    let pool = c.open("pipelined").expect("pool");
    // A PUT and the GET of the same key are in flight together: same-key order holds.
    pipelined(&c, pool, 1, 600, 0);
    pipelined(&c, pool, 64, 6000, 10_000);
    // Many threads share one client.
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            thread::spawn(move || pipelined(&c, pool, 16, 1200, 100_000 * (t + 1)))
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
}

#[test]
fn host_restart_fails_in_flight_requests_then_reconnects() {
    let mut d = Daemon::start(&[]);
    let opts = Options {
        timeout: Duration::from_secs(3),
        ..Options::default()
    };
    let c = Client::connect(&spec(&d), opts).expect("connect");
    let pool = c.open("restart").expect("pool");
    c.put(pool, Key::new(1, 0), value(1, 100_000)).expect("put");
    // Keep 64 large GETs in flight while the daemon dies.
    let (tx, rx) = mpsc::channel();
    for _ in 0..64 {
        let tx = tx.clone();
        c.submit(
            Request::Get {
                pool,
                key: Key::new(1, 0),
            },
            move |r| {
                let _ = tx.send(r);
            },
        );
    }
    d.kill();
    let mut failed = 0;
    for _ in 0..64 {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every request completes")
        {
            Ok(Response::Value(v)) => assert_eq!(v, value(1, 100_000)),
            Err(e) => {
                assert!(e.is_unreachable(), "in-flight request failed with {e}");
                failed += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    eprintln!("{failed} of 64 in-flight requests failed with the unreachable error");
    assert!(failed > 0, "the kill should catch requests in flight");
    // While the host is down: a clear unreachable error, quickly.
    let e = c.get(pool, Key::new(1, 0)).expect_err("host is down");
    assert!(e.is_unreachable(), "{e}");
    assert!(e.to_string().contains(&d.sock.display().to_string()), "{e}");
    d.restart();
    // The client reconnects by itself (backoff ≤ 1 s) and re-opens the pool.
    let t0 = Instant::now();
    loop {
        match c.put(pool, Key::new(2, 0), value(2, 5000)) {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_unreachable(), "{e}");
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "never reconnected: {e}"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert_eq!(
        c.get(pool, Key::new(2, 0)).expect("get"),
        Some(value(2, 5000))
    );
    // The host lost its memory: the old value is gone, not wrong.
    assert_eq!(c.get(pool, Key::new(1, 0)).expect("get"), None);
}

#[test]
fn stopped_host_times_out_and_nothing_hangs() {
    let d = Daemon::start(&[]);
    let timeout = Duration::from_millis(500);
    let opts = Options {
        timeout,
        ..Options::default()
    };
    let c = Client::connect(&spec(&d), opts).expect("connect");
    let pool = c.open("stopped").expect("pool");
    c.put(pool, Key::new(1, 0), value(1, 1000)).expect("put");
    d.signal(Signal::SIGSTOP);
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    for i in 0..32u64 {
        let tx = tx.clone();
        // Big PUTs fill the socket buffer, so the writer blocks too.
        let req = if i.is_multiple_of(2) {
            Request::Put {
                pool,
                key: Key::new(10 + i, 0),
                value: value(i, 1 << 20),
            }
        } else {
            Request::Get {
                pool,
                key: Key::new(1, 0),
            }
        };
        let c = c.clone();
        thread::spawn(move || {
            c.submit(req, move |r| {
                let _ = tx.send(r);
            })
        });
    }
    let blocking = c.get(pool, Key::new(1, 0));
    assert_eq!(blocking, Err(ClientError::Timeout(timeout)));
    for _ in 0..32 {
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("completes, never hangs");
        match r {
            Err(ClientError::Timeout(t)) => assert_eq!(t, timeout),
            Err(e) if e.is_unreachable() => {} // the blocked write gave up on the connection
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    let took = t0.elapsed();
    eprintln!("32 requests to a stopped host all completed within {took:?}");
    assert!(took < Duration::from_secs(5), "timeouts took {took:?}");
    d.signal(Signal::SIGCONT);
    let t1 = Instant::now();
    loop {
        match c.get(pool, Key::new(1, 0)) {
            Ok(v) => {
                assert_eq!(v, Some(value(1, 1000)));
                break;
            }
            Err(e) => {
                assert!(
                    t1.elapsed() < Duration::from_secs(10),
                    "never recovered: {e}"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn unreachable_and_bad_specs_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nobody.sock");
    let e = Client::connect(&format!("unix:{}", path.display()), Options::default())
        .expect_err("nobody listens");
    assert!(e.is_unreachable(), "{e}");
    let e = Client::connect("tcp:127.0.0.1:1", Options::default()).expect_err("bad spec");
    assert!(matches!(e, ClientError::BadSpec { .. }), "{e}");
    assert!(e
        .to_string()
        .contains("unix:/path, vsock:PORT, vsock:CID:PORT, device:/dev/utmem or auto"));
}

#[test]
fn oversized_values_are_refused_before_sending() {
    let d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), Options::default()).expect("connect");
    let max = c.hello().expect("hello").max_value;
    assert!(max >= 512 << 20);
    let pool = c
        .open_pool(PoolKind::Private("big".into()), false)
        .expect("pool");
    let too_big = Bytes::from(vec![0u8; usize::try_from(max).expect("fits") + 1]);
    let e = c
        .put(pool, Key::new(1, 0), too_big)
        .expect_err("over the limit");
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    c.ping().expect("the connection is still fine");
}

#[test]
fn a_refused_pool_is_an_error_and_does_not_block_reconnects() {
    let mut d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), Options::default()).expect("connect");
    let shared = PoolKind::Shared(utmem_client::proto::PoolUuid([7; 16]));
    assert_eq!(
        c.open_pool(shared.clone(), false),
        Err(ClientError::Refused {
            op: utmem_client::proto::Op::NewPool,
            status: Status::Denied
        })
    );
    let pool = c.open("mine").expect("pool");
    d.restart();
    let t0 = Instant::now();
    while c.put(pool, Key::new(1, 0), value(1, 10)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never reconnected");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(c.open_pool(shared, false).is_err());
}

fn mapped_client(spec: &str) -> Client {
    Client::connect(
        spec,
        Options {
            map: true,
            ..Options::default()
        },
    )
    .expect("connect")
}

/// PUTs on a mapped connection answer where the value went; reading it there gives
/// exactly the bytes stored, and nothing once the host dropped or replaced it.
#[test]
fn mapped_reads_return_the_stored_bytes_and_nothing_stale() {
    let d = Daemon::start(&[]);
    let c = mapped_client(&spec(&d));
    assert!(c.is_mapped(), "a local Unix socket maps the arena");
    let pool = c.open("mapped").expect("pool");
    let mut out = Vec::new();
    let mut placed = Vec::new();
    for (i, len) in SIZES.into_iter().enumerate() {
        let key = Key::new(i as u64, 0);
        let v = value(i as u64, len);
        let at = match c.call(Request::Put {
            pool,
            key,
            value: v.clone(),
        }) {
            Ok(Response::Placed(at)) => at,
            other => panic!("PUT of {len} bytes answered {other:?}"),
        };
        assert!(c.read_mapped(at, len, &mut out), "read {len} bytes");
        assert!(out == v[..], "content of {len} bytes");
        // The wrong length is refused, never a short or long read.
        assert!(!c.read_mapped(at, len + 1, &mut out));
        placed.push((key, at, len));
    }
    // Overwrite: the old placement is dead, the new one reads the new bytes.
    let (key, old, len) = placed[9];
    let v2 = value(99, len);
    let Ok(Response::Placed(new)) = c.call(Request::Put {
        pool,
        key,
        value: v2.clone(),
    }) else {
        panic!("overwrite not placed");
    };
    assert!(
        !c.read_mapped(old, len, &mut out),
        "a replaced value is gone"
    );
    assert!(c.read_mapped(new, len, &mut out) && out == v2[..]);
    // FLUSH and DESTROY_POOL clear the stamps.
    let (key, at, len) = placed[5];
    c.flush(pool, key).expect("flush");
    assert!(!c.read_mapped(at, len, &mut out), "a flushed value is gone");
    c.destroy_pool(pool).expect("destroy");
    for (_, at, len) in &placed {
        assert!(!c.read_mapped(*at, *len, &mut out), "after DESTROY_POOL");
    }
    // A client that did not ask for a mapping gets plain answers.
    let plain = Client::connect(&spec(&d), Options::default()).expect("connect");
    let p2 = plain.open("plain").expect("pool");
    assert_eq!(
        plain.call(Request::Put {
            pool: p2,
            key: Key::new(1, 0),
            value: value(1, 5000)
        }),
        Ok(Response::Done)
    );
    assert!(!plain.is_mapped());
}

/// A named listener stands for a VM (hybrid vsock): no descriptor may go there.
#[test]
fn named_listeners_do_not_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vm.sock");
    let d = Daemon::start(&[&format!("--listen=unix:{}=vm-a", sock.display())]);
    let c = mapped_client(&format!("unix:{}", sock.display()));
    assert!(!c.is_mapped());
    let pool = c.open("p").expect("pool");
    assert_eq!(
        c.call(Request::Put {
            pool,
            key: Key::new(1, 0),
            value: value(1, 5000)
        }),
        Ok(Response::Done)
    );
    assert_eq!(c.hello().expect("hello").identity, "vm-a");
    drop(d);
}

/// Values read in place while another thread keeps replacing them: the host must
/// never reuse space a reader is in, so every read sees one whole value.
#[test]
fn mapped_reads_never_see_reused_space() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const LEN: usize = 20_000;
    let d = Daemon::start(&[]);
    let c = mapped_client(&spec(&d));
    let pool = c.open("race").expect("pool");
    let latest = Arc::new(Mutex::new([None; 4]));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, latest, done) = (c.clone(), Arc::clone(&latest), Arc::clone(&done));
        thread::spawn(move || {
            for v in 0..3000u64 {
                let k = (v % 4) as usize;
                let fill = (v % 250) as u8 + 1;
                let r = c.call(Request::Put {
                    pool,
                    key: Key::new(k as u64, 0),
                    value: Bytes::from(vec![fill; LEN]),
                });
                let Ok(Response::Placed(at)) = r else {
                    panic!("PUT answered {r:?}");
                };
                latest.lock().unwrap()[k] = Some((at, fill));
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let (mut whole, mut gone) = (0u64, 0u64);
    while !done.load(Ordering::Relaxed) {
        for k in 0..4 {
            let Some((at, fill)) = latest.lock().unwrap()[k] else {
                continue;
            };
            // Hold the value a while, as a slow reader would: the writer goes on
            // replacing values (and freeing their space) meanwhile.
            let check = |b: utmem_client::VolatileSlice<'_>| {
                thread::sleep(Duration::from_millis(1));
                let mut copy = vec![0u8; LEN];
                b.copy_to(&mut copy[..]);
                copy.iter().all(|x| *x == fill)
            };
            // What `check` saw inside the value counts, whether or not the value was
            // replaced by the time it returned (then the answer is `None`).
            let mut saw = None;
            let _ = c.with_mapped(at, LEN, |b| saw = Some(check(b)));
            match saw {
                Some(true) => whole += 1,
                Some(false) => panic!("key {k}: a mapped read saw bytes of another value"),
                None => gone += 1,
            }
        }
    }
    writer.join().expect("writer");
    eprintln!("{whole} whole reads, {gone} of values already replaced");
    assert!(whole > 20, "too few reads overlapped the writes: {whole}");
}

/// The pipelined API over a channel (the default on a local Unix socket): PUT, FLUSH,
/// COPY and PING go through the shared-memory rings, GET and the rest over the socket,
/// and a mixed stream still behaves as if it went over one ordered connection:
/// every GET sees the last PUT, FLUSH or COPY submitted before it.
#[test]
fn mixed_pipelines_keep_their_order_across_channel_and_socket() {
    use std::sync::{Arc, Mutex};
    let d = Daemon::start(&[]);
    let mut outcomes = Vec::new();
    for use_ in [
        utmem_client::ChannelUse::Requests,
        utmem_client::ChannelUse::Off,
    ] {
        let opts = Options {
            channel: use_,
            ..Options::default()
        };
        let c = Client::connect(&spec(&d), opts).expect("connect");
        let pool = c.open(&format!("mixed-{use_:?}")).expect("pool");
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut model: Vec<Option<Bytes>> = vec![None; 8];
        let mut want = Vec::new();
        let (tx, rx) = mpsc::channel();
        let mut batch = Vec::new();
        for i in 0..3000u64 {
            let k = (i * 7 % 8) as usize;
            let key = Key::new(k as u64, 0);
            let req = match i % 5 {
                0 | 1 => {
                    let v = value(i, (i as usize * 131) % 9000);
                    model[k] = Some(v.clone());
                    Request::Put {
                        pool,
                        key,
                        value: v,
                    }
                }
                2 => {
                    want.push((i, model[k].clone()));
                    Request::Get { pool, key }
                }
                3 if i % 3 == 0 => {
                    model[k] = None;
                    Request::Flush { pool, key }
                }
                3 => {
                    let dst = (k + 1) % 8;
                    model[dst] = model[k].clone();
                    Request::Copy {
                        pool,
                        src: key,
                        dst: Key::new(dst as u64, 0),
                    }
                }
                _ => Request::Ping,
            };
            let (got, tx) = (Arc::clone(&got), tx.clone());
            batch.push((
                req,
                Box::new(move |r: Result<Response, ClientError>| {
                    got.lock().unwrap().push((i, r));
                    let _ = tx.send(());
                }) as utmem_client::Completion,
            ));
            if batch.len() == 64 {
                c.submit_many(std::mem::take(&mut batch));
            }
        }
        c.submit_many(batch);
        for _ in 0..3000 {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("every request completes");
        }
        let got = got.lock().unwrap();
        for (i, w) in &want {
            let r = &got.iter().find(|(j, _)| j == i).expect("answered").1;
            match (r, w) {
                (Ok(Response::Value(v)), Some(w)) => assert_eq!(v, w, "GET {i} ({use_:?})"),
                (Ok(Response::Missing), None) => {}
                (Ok(Response::Value(v)), None) => {
                    panic!("GET {i} ({use_:?}) got {} bytes, want none", v.len())
                }
                (r, w) => panic!(
                    "GET {i} ({use_:?}): {r:?}, want {:?}",
                    w.as_ref().map(Bytes::len)
                ),
            }
        }
        for (i, r) in got.iter() {
            assert!(r.is_ok(), "request {i} ({use_:?}): {r:?}");
        }
        outcomes.push((c.channel().is_some(), c.channel_requests() > 0));
    }
    // `Requests` sends through a channel it does not hand out; `Off` opens none.
    assert_eq!(outcomes, [(false, true), (false, false)]);
}
