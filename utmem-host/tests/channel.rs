//! Shared-memory channels against the real utmem-hostd: requests through the rings,
//! chunked PUTs, and hostile clients that scribble over their whole region.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{rngs::StdRng, Rng, SeedableRng};
use utmem_client::channel::Completion;
use utmem_client::proto::channel::{Sqe, HOST_DEAD, SQE_MORE};
use utmem_client::proto::{Key, Op, Placement, PoolKind, RequestId, Status};
use utmem_client::{Channel, ChannelUse, Client, Options};
use utmem_testkit::Daemon;
use vm_memory::Bytes as _;

fn client(d: &Daemon) -> Client {
    let opts = Options {
        map: true,
        channel: ChannelUse::Caller,
        ..Options::default()
    };
    Client::connect(&format!("unix:{}", d.sock.display()), opts).expect("connect")
}

/// Waits for the completions of `n` requests (the host is kicked as needed).
fn wait(ch: &Channel, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    ch.kick();
    while out.len() < n {
        ch.drain(|c| out.push(c));
        if out.len() < n {
            assert!(!ch.is_dead(), "the channel died");
            assert!(t0.elapsed() < Duration::from_secs(30), "no completion");
            if !ch.arm() {
                let mut p = libc::pollfd {
                    fd: ch.complete_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, 100) };
                ch.clear_wakeup();
            }
        }
    }
    out
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

#[test]
fn puts_through_the_channel_are_stored_placed_and_read_back() {
    let d = Daemon::start(&[]);
    let c = client(&d);
    let pool = c
        .open_pool(PoolKind::Private("chan".into()), false)
        .unwrap();
    let (ch, _) = c
        .channel()
        .expect("the host offers a channel on a Unix socket");
    let id = c.pool_id(pool).unwrap();
    let sizes = [0usize, 1, 63, 64, 4096, 100_000, 1 << 20];
    // (index 5 is the 100 000-byte value)
    let mut ids = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let v = pattern(i as u64, n);
        ids.push(
            ch.put(id, Key::new(i as u64, 0), &v)
                .expect("room in staging"),
        );
    }
    let done = wait(&ch, sizes.len());
    assert_eq!(
        done.iter().map(|c| c.id).collect::<Vec<_>>(),
        ids,
        "in order"
    );
    for (i, (&n, comp)) in sizes.iter().zip(&done).enumerate() {
        assert_eq!(comp.status, Status::Ok, "PUT of {n} bytes");
        let want = pattern(i as u64, n);
        let got = c.get(pool, Key::new(i as u64, 0)).unwrap().unwrap();
        assert_eq!(&got[..], &want[..], "{n} bytes over the socket");
        if comp.arg1 != 0 {
            let at = Placement {
                offset: comp.arg0,
                stamp: comp.arg1,
            };
            let mut out = Vec::new();
            assert!(c.read_mapped(at, n, &mut out), "{n} bytes from the arena");
            assert_eq!(out, want);
        }
    }
    // FLUSH and PING through the channel too.
    let f = ch.flush(id, Key::new(4, 0)).unwrap();
    let p = ch.ping().unwrap();
    let done = wait(&ch, 2);
    assert_eq!((done[0].id, done[0].status), (f, Status::Ok));
    assert_eq!((done[1].id, done[1].status), (p, Status::Ok));
    assert_eq!(c.get(pool, Key::new(4, 0)).unwrap(), None);
    // GET, COPY and FLUSH_OBJECT through the channel: the value comes back through
    // staging; one longer than the buffer says how long it is.
    let want = pattern(5, 100_000);
    let g = ch.get(id, Key::new(5, 0), 200_000).unwrap();
    let small = ch.get(id, Key::new(5, 0), 1000).unwrap();
    let miss = ch.get(id, Key::new(777, 0), 10).unwrap();
    let cp = ch.copy(id, Key::new(5, 0), Key::new(55, 3)).unwrap();
    let done = wait(&ch, 4);
    assert_eq!((done[0].id, done[0].status), (g, Status::Ok));
    assert_eq!(done[0].value.as_deref(), Some(&want[..]));
    assert_eq!(
        (done[1].id, done[1].status, done[1].arg0),
        (small, Status::TooLarge, 100_000)
    );
    assert_eq!((done[2].id, done[2].status), (miss, Status::Miss));
    assert_eq!((done[3].id, done[3].status), (cp, Status::Ok));
    assert_eq!(
        &c.get(pool, Key::new(55, 3)).unwrap().unwrap()[..],
        &want[..]
    );
    ch.flush_object(id, 55).unwrap();
    assert_eq!(wait(&ch, 1)[0].status, Status::Ok);
    assert_eq!(c.get(pool, Key::new(55, 3)).unwrap(), None);
    // A value over half of staging is not taken: the caller uses the socket.
    assert!(ch
        .put(
            id,
            Key::new(99, 0),
            &vec![0; (ch.max_payload() + 1) as usize]
        )
        .is_none());
    // Unknown pools are answered, not fatal.
    ch.put(utmem_client::proto::PoolId(999), Key::new(1, 0), b"x")
        .unwrap();
    assert_eq!(wait(&ch, 1)[0].status, Status::UnknownPool);
    assert!(!ch.is_dead());
}

#[test]
fn many_puts_wrap_the_rings_and_staging() {
    let d = Daemon::start(&[]);
    let c = client(&d);
    let pool = c
        .open_pool(PoolKind::Private("wrap".into()), false)
        .unwrap();
    let (ch, _) = c.channel().unwrap();
    let id = c.pool_id(pool).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent = 0u64;
    let mut done = 0u64;
    let t0 = Instant::now();
    // 5000 PUTs of up to 64 KiB go through 1024-entry rings and 8 MiB of staging.
    while done < 5000 {
        while sent < 5000 {
            let n = rng.gen_range(0..65536);
            let v = vec![(sent % 251) as u8; n];
            if ch.put(id, Key::new(sent % 300, 0), &v).is_none() {
                break;
            }
            sent += 1;
        }
        ch.kick();
        let got = ch.drain(|c| assert_eq!(c.status, Status::Ok));
        done += got as u64;
        if got == 0 {
            std::thread::yield_now();
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
    for k in 0..300u64 {
        let last = (0..5000u64).rev().find(|i| i % 300 == k).unwrap();
        let v = c.get(pool, Key::new(k, 0)).unwrap().unwrap();
        assert!(v.iter().all(|b| *b == (last % 251) as u8), "key {k}");
    }
}

/// Writes raw descriptors into a fresh channel (its producer state is ours alone).
fn raw_submit(ch: &Channel, tail: &mut u32, sqes: &[(Sqe, &[u8])], staging_at: &mut u64) {
    let mem = ch.region_for_tests();
    let mut sq = mem.sq_producer().at(*tail);
    for (sqe, payload) in sqes {
        let mut s = *sqe;
        mem.staging(*staging_at, payload.len() as u64)
            .unwrap()
            .copy_from(payload);
        s.offset = *staging_at;
        s.len = payload.len() as u64;
        *staging_at += payload.len() as u64;
        sq.push(&s.encode());
    }
    sq.publish();
    *tail = sq.tail;
    ch.kick();
}

fn raw_completions(ch: &Channel, head: &mut u32, n: u32) -> Vec<utmem_client::proto::channel::Cqe> {
    let mem = ch.region_for_tests();
    let mut cq = mem.cq_consumer().at(*head);
    let t0 = Instant::now();
    while cq.ready().unwrap() < n {
        assert!(t0.elapsed() < Duration::from_secs(10), "no completions");
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = (0..n)
        .map(|_| utmem_client::proto::channel::Cqe::decode(&cq.pop()).unwrap())
        .collect();
    cq.release();
    *head = cq.head;
    out
}

#[test]
fn chunked_puts_become_visible_with_their_last_chunk() {
    let d = Daemon::start(&[]);
    let c = client(&d);
    let pool = c
        .open_pool(PoolKind::Private("chunks".into()), false)
        .unwrap();
    let (ch, _) = c.channel().unwrap();
    let pid = c.pool_id(pool).unwrap();
    let value = pattern(3, 3000);
    let put = |flags: u8, id: u64| Sqe {
        op: Op::Put as u8,
        flags,
        pool: pid,
        id: RequestId(id),
        key: Key::new(5, 0),
        total: 3000,
        ..Sqe::default()
    };
    let (mut tail, mut head, mut at) = (0u32, 0u32, 0u64);
    raw_submit(
        &ch,
        &mut tail,
        &[
            (put(SQE_MORE, 1), &value[..1000]),
            (put(SQE_MORE, 1), &value[1000..2000]),
        ],
        &mut at,
    );
    let cq = raw_completions(&ch, &mut head, 2);
    assert_eq!((cq[0].status, cq[0].arg0), (Status::Ok, 1000));
    assert_eq!((cq[1].status, cq[1].arg0), (Status::Ok, 2000));
    assert_eq!(
        c.get(pool, Key::new(5, 0)).unwrap(),
        None,
        "not visible before its last chunk"
    );
    raw_submit(&ch, &mut tail, &[(put(0, 1), &value[2000..])], &mut at);
    let cq = raw_completions(&ch, &mut head, 1);
    assert_eq!(cq[0].status, Status::Ok);
    assert_eq!(
        c.get(pool, Key::new(5, 0)).unwrap().unwrap(),
        Bytes::from(value)
    );
    // A chunk sequence that does not add up ends the channel, and only it.
    raw_submit(
        &ch,
        &mut tail,
        &[
            (put(SQE_MORE, 2), &[1u8; 10][..]),
            (put(0, 2), &[1u8; 10][..]),
        ],
        &mut at,
    );
    let t0 = Instant::now();
    while ch.region_for_tests().host_flags().load(Ordering::SeqCst) & HOST_DEAD == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the channel was not ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    c.ping().expect("the connection still works");
    assert_eq!(c.get(pool, Key::new(5, 0)).unwrap().unwrap().len(), 3000);
}

#[test]
fn a_client_scribbling_over_its_channel_hurts_nobody_else() {
    let d = Daemon::start(&[]);
    let good = client(&d);
    let gpool = good
        .open_pool(PoolKind::Private("good".into()), false)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Several hostile clients: each opens a channel and writes random bytes over all of
    // it (header, rings, staging) as fast as it can, kicking the host all the while.
    let spec = format!("unix:{}", d.sock.display());
    let vandals: Vec<_> = (0..2)
        .map(|n| {
            let stop = Arc::clone(&stop);
            let spec = spec.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(n);
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A new connection and channel each round.
                    let opts = Options {
                        map: true,
                        channel: ChannelUse::Caller,
                        ..Options::default()
                    };
                    let c = Client::connect(&spec, opts).expect("connect");
                    let p = c.open_pool(PoolKind::Private("bad".into()), false).unwrap();
                    let (ch, _) = c.channel().expect("a channel");
                    let pid = c.pool_id(p).unwrap();
                    // Some plausible descriptors first, then garbage everywhere.
                    for i in 0..50 {
                        let _ = ch.put(pid, Key::new(i, 0), &[7u8; 100]);
                    }
                    let mem = ch.region_for_tests();
                    let len = mem.geometry().region_len() as usize;
                    let all = mem.volatile();
                    for _ in 0..20 {
                        for _ in 0..500 {
                            let at = rng.gen_range(0..len - 8);
                            let _ = all.write_obj(rng.gen::<u64>(), at);
                        }
                        // The tight spots: descriptors, indices and flags.
                        for _ in 0..50 {
                            let at = rng.gen_range(4096..4096 + 1024 * 64);
                            let _ = all.write_obj(rng.gen::<u64>(), at);
                        }
                        for w in [128usize, 192, 256, 320, 384, 448] {
                            if rng.gen_bool(0.3) {
                                let _ = all.write_obj(rng.gen::<u32>(), w);
                            }
                        }
                        ch.kick();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let (gch, _) = good.channel().unwrap();
    let gid = good.pool_id(gpool).unwrap();
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_secs(5) {
        let v = pattern(i, (i as usize * 997) % 20000);
        let id = gch.put(gid, Key::new(i % 50, 0), &v).expect("room");
        let done = wait(&gch, 1);
        assert_eq!((done[0].id, done[0].status), (id, Status::Ok));
        assert_eq!(
            good.get(gpool, Key::new(i % 50, 0)).unwrap().unwrap(),
            Bytes::from(v)
        );
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for v in vandals {
        assert!(v.join().unwrap() > 0);
    }
    assert!(i > 100, "the good client made progress ({i} rounds)");
    let mut dd = d;
    assert!(dd.alive(), "utmem-hostd survived:\n{}", dd.log_text());
    assert!(
        dd.log_text().contains("channel ended"),
        "garbage was noticed and logged"
    );
}
