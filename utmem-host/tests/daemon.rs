//! The real utmem-hostd over real Unix sockets.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use rand::{rngs::StdRng, Rng, SeedableRng};
use utmem_proto::{
    encode_request, Key, Op, PoolKind, PoolUuid, RequestHeader, RequestId, Status,
    REQUEST_HEADER_LEN,
};
use utmem_testkit::{closed_by_peer, read_reply, Conn, Daemon};

const MIB: u64 = 1 << 20;

/// log-uniform in [0, 1 MiB]: as many tiny values as huge ones.
fn log_uniform_size(rng: &mut StdRng) -> usize {
    let e: f64 = rng.gen_range(0.0..=20.0);
    (2f64.powf(e) as usize).saturating_sub(1).min(1 << 20)
}

/// One connection: `ops` pipelined PUT/GET on 64 keys of its own, content-checked.
/// Returns the number of GETs that hit.
fn pipelined_worker(path: std::path::PathBuf, conn_no: u64, ops: usize, data: Bytes) -> usize {
    let mut c = Conn::connect(&path);
    c.hello();
    let pool = c.open_private("load");
    let mut reader = c.s.try_clone().expect("clone");
    let (tx, rx) = mpsc::sync_channel::<(u64, Op, Option<(usize, usize)>)>(1 << 16);
    let expect = data.clone();
    let checker = thread::spawn(move || {
        let mut buf = BytesMut::new();
        let mut hits = 0;
        for (id, op, want) in rx {
            let r = read_reply(&mut reader, &mut buf).expect("reply");
            assert_eq!(r.header.id, RequestId(id), "reply order");
            assert_eq!(r.header.op, op);
            match (op, want) {
                (Op::Put, _) => assert_eq!(r.header.status, Status::Ok, "put {id}"),
                (_, None) => assert_eq!(r.header.status, Status::Miss, "get {id}"),
                (_, Some((off, len))) => {
                    assert_eq!(r.header.status, Status::Ok, "get {id}");
                    assert_eq!(r.payload.len(), len, "length of get {id}");
                    assert!(
                        r.payload[..] == expect[off..off + len],
                        "content of get {id}"
                    );
                    hits += 1;
                }
            }
        }
        hits
    });
    let mut rng = StdRng::seed_from_u64(conn_no);
    let mut model: Vec<Option<(usize, usize)>> = vec![None; 64];
    let mut out = BytesMut::with_capacity(1 << 20);
    for i in 0..ops {
        let k = rng.gen_range(0..64usize);
        let key = Key::new(conn_no * 1000 + k as u64, 0);
        let id = i as u64 + 100;
        let mut h = Conn::keyed(Op::Get, pool, key);
        h.id = RequestId(id);
        if rng.gen_bool(0.5) {
            let len = log_uniform_size(&mut rng);
            let off = rng.gen_range(0..=data.len() - len);
            h.op = Op::Put;
            encode_request(&h, &data[off..off + len], &mut out);
            model[k] = Some((off, len));
            tx.send((id, Op::Put, None)).expect("checker alive");
        } else {
            encode_request(&h, &[], &mut out);
            tx.send((id, Op::Get, model[k])).expect("checker alive");
        }
        if out.len() > 256 * 1024 || i + 1 == ops {
            c.s.write_all(&out).expect("write");
            out.clear();
        }
    }
    drop(tx);
    checker.join().expect("checker")
}

/// A connection that sends `bytes` and must then be closed by the daemon.
fn hostile(path: &std::path::Path, bytes: &[u8]) -> bool {
    let mut s = UnixStream::connect(path).expect("connect");
    // The daemon may close before everything is written; that is the point.
    let _ = s.write_all(bytes);
    closed_by_peer(&mut s)
}

fn header_bytes(op: u8, len: u64) -> Vec<u8> {
    let mut h = RequestHeader::new(Op::Put, RequestId(1)).encode().to_vec();
    h[5] = op;
    h[32..40].copy_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn pipelined_load_with_hostile_neighbours() {
    let mut d = Daemon::start(&["--capacity=4G"]);
    let mut rng = StdRng::seed_from_u64(7);
    let data: Bytes = (0..2 << 20)
        .map(|_| rng.gen::<u8>())
        .collect::<Vec<u8>>()
        .into();
    let workers: Vec<_> = (0..8)
        .map(|n| {
            let (p, data) = (d.sock.clone(), data.clone());
            thread::spawn(move || pipelined_worker(p, n, 10_000, data))
        })
        .collect();
    // Meanwhile: garbage, a truncated header, a 2^40 length and an unknown op.
    let path = d.sock.clone();
    let bad = thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(9);
        for round in 0..20 {
            let junk: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
            assert!(hostile(&path, &junk), "random bytes, round {round}");
            assert!(
                hostile(&path, &header_bytes(Op::Put as u8, 1 << 40)),
                "2^40 length"
            );
            assert!(hostile(&path, &header_bytes(0x77, 0)), "unknown op");
            let mut s = UnixStream::connect(&path).expect("connect");
            s.write_all(&header_bytes(Op::Put as u8, 10)[..REQUEST_HEADER_LEN / 2])
                .expect("half a header");
            drop(s);
        }
    });
    bad.join().expect("hostile connections were all closed");
    let hits: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert!(hits > 10_000, "GETs should mostly hit; got {hits}");
    assert!(d.alive(), "daemon died: {}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("closing connection: malformed frame: bad magic"),
        "{log}"
    );
    assert!(log.contains("is over the limit"), "{log}");
    assert!(log.contains("unknown op 0x77"), "{log}");
    assert!(log.contains("in the middle of a frame"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn values_from_0_bytes_to_1_mib_round_trip() {
    let d = Daemon::start(&[]);
    let mut c = Conn::connect(&d.sock);
    let h = c.hello();
    assert!(h.max_value >= 512 * MIB);
    assert!(h.identity.starts_with("uid:"), "{}", h.identity);
    let pool = c.open_private("sizes");
    let sizes = [0usize, 1, 63, 64, 4095, 4096, 4097, 65536, 1 << 20];
    for (i, n) in sizes.iter().enumerate() {
        let v: Vec<u8> = (0..*n).map(|j| (j * 31 + i) as u8).collect();
        assert_eq!(c.put(pool, Key::new(i as u64, 0), &v), Status::Ok);
    }
    for (i, n) in sizes.iter().enumerate() {
        let v: Vec<u8> = (0..*n).map(|j| (j * 31 + i) as u8).collect();
        assert_eq!(c.get(pool, Key::new(i as u64, 0)), Ok(v));
    }
    // put-put-get coherence, FLUSH_OBJECT over indexes, COPY inside the host.
    let k = Key::new(100, 1);
    c.put(pool, k, b"v1");
    c.put(pool, k, b"v2");
    assert_eq!(c.get(pool, k), Ok(b"v2".to_vec()));
    let mut copy = Conn::keyed(Op::Copy, pool, k);
    copy.len = 12;
    let dst = utmem_proto::CopyTarget(Key::new(101, 0)).encode();
    assert_eq!(c.call(copy, &dst).header.status, Status::Ok);
    assert_eq!(c.get(pool, Key::new(101, 0)), Ok(b"v2".to_vec()));
    c.put(pool, Key::new(100, 2), b"x");
    let fo = Conn::keyed(Op::FlushObject, pool, Key::new(100, 0));
    assert_eq!(c.call(fo, &[]).header.status, Status::Ok);
    assert_eq!(c.call(fo, &[]).header.status, Status::Ok);
    assert_eq!(c.get(pool, k), Err(Status::Miss));
    assert_eq!(c.get(pool, Key::new(100, 2)), Err(Status::Miss));
    // Unknown pool, wrong version.
    assert_eq!(
        c.put(utmem_proto::PoolId(999), k, b"x"),
        Status::UnknownPool
    );
    let mut old = RequestHeader::new(Op::Ping, RequestId(0));
    old.version = 9;
    assert_eq!(c.call(old, &[]).header.status, Status::Version);
    // Reopening by name after a reconnect reattaches to the same pool.
    drop(c);
    let mut c = Conn::connect(&d.sock);
    let again = c.open_private("sizes");
    assert_eq!(c.get(again, Key::new(8, 0)).map(|v| v.len()), Ok(1 << 20));
}

#[test]
fn quota_isolates_identities_and_bounds_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("vm-a.sock_7719");
    let b = dir.path().join("vm-b.sock_7719");
    let d = Daemon::start_in(
        dir,
        &[
            &format!("--listen=unix:{}=vm-a", a.display()),
            &format!("--listen=unix:{}=vm-b", b.display()),
            "--capacity=256M",
            "--quota=128M",
        ],
    );
    let mut cb = Conn::connect(&b);
    assert_eq!(cb.hello().identity, "vm-b");
    let pb = cb.open_private("default");
    let vb = vec![0xbbu8; 1 << 20];
    for i in 0..32 {
        assert_eq!(cb.put(pb, Key::new(i, 0), &vb), Status::Ok);
    }
    let mut ca = Conn::connect(&a);
    assert_eq!(ca.hello().identity, "vm-a");
    assert_eq!(ca.hello().quota, 128 * MIB);
    let pa = ca.open_private("default"); // same name, its own pool
    assert_eq!(ca.get(pa, Key::new(0, 0)), Err(Status::Miss));
    let va = vec![0xaau8; 1 << 20];
    let mut stored = 0;
    for i in 0..200 {
        match ca.put(pa, Key::new(i, 0), &va) {
            Status::Ok => stored += 1,
            Status::NoSpace => break,
            s => panic!("unexpected {s}"),
        }
    }
    // Each value is charged its length plus the per-value overhead.
    let fit = 128 * MIB / (MIB + utmem_host::VALUE_OVERHEAD);
    assert_eq!(stored, fit, "exactly the quota fits");
    // The refused PUT left the old value of an existing key intact.
    assert_eq!(
        ca.put(pa, Key::new(0, 0), &vec![1u8; 2 << 20]),
        Status::NoSpace
    );
    assert_eq!(ca.get(pa, Key::new(0, 0)), Ok(va.clone()));
    let sa = ca.stats();
    assert_eq!((sa.values, sa.bytes, sa.refusals), (fit, fit * MIB, 2));
    // vm-b is untouched and still has its own quota left.
    for i in 0..32 {
        assert_eq!(cb.get(pb, Key::new(i, 0)), Ok(vb.clone()));
    }
    assert_eq!(cb.put(pb, Key::new(99, 0), &vb), Status::Ok);
    let sb = cb.stats();
    assert_eq!((sb.values, sb.bytes), (33, 33 * MIB));
    let rss = d.rss_bytes();
    assert!(
        rss < 256 * MIB + 64 * MIB,
        "RSS {rss} over capacity + 64 MiB"
    );
    // A guest's STATS shows only itself; the admin view shows both.
    let (ok, out, err) = d.admin_cmd(&["stats", "--json"]);
    assert!(ok, "{err}");
    let snap: utmem_host::HostSnapshot = serde_json::from_str(&out).expect("json");
    let names: Vec<_> = snap.identities.iter().map(|i| i.name.as_str()).collect();
    // (uid:N is the test harness's readiness probe on the plain socket.)
    assert!(
        names.contains(&"vm-a") && names.contains(&"vm-b"),
        "{names:?}"
    );
    assert_eq!(snap.used, (fit + 33) * MIB);
    assert_eq!(
        snap.charged,
        (fit + 33) * (MIB + utmem_host::VALUE_OVERHEAD)
    );
}

#[test]
fn flushing_everything_leaves_zero_and_drop_identity_frees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.sock");
    let d = Daemon::start_in(dir, &[&format!("--listen=unix:{}=vm-a", a.display())]);
    let mut c = Conn::connect(&d.sock);
    let p = c.open_private("p");
    let e = c
        .open(PoolKind::Private("e".into()), true)
        .expect("ephemeral");
    for i in 0..100 {
        c.put(p, Key::new(i, 0), &[7u8; 5000]);
        c.put(e, Key::new(i, 1), &[8u8; 300]);
    }
    assert_eq!(c.stats().values, 200);
    for i in 0..100 {
        assert_eq!(c.flush(p, Key::new(i, 0)), Status::Ok);
        assert_eq!(c.flush(e, Key::new(i, 1)), Status::Ok);
        assert_eq!(c.flush(e, Key::new(i, 1)), Status::Ok);
    }
    let s = c.stats();
    assert_eq!((s.values, s.bytes), (0, 0));
    let mut ca = Conn::connect(&a);
    let pa = ca.open_private("default");
    ca.put(pa, Key::new(1, 0), &[1u8; 1000]);
    let snap = |d: &Daemon| -> utmem_host::HostSnapshot {
        let (ok, out, err) = d.admin_cmd(&["stats", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).expect("json")
    };
    assert_eq!(snap(&d).used, 1000);
    let (ok, table, _) = d.admin_cmd(&["stats"]);
    assert!(
        ok && table.contains("vm-a") && table.contains("#1 default (persistent)"),
        "{table}"
    );
    let (ok, out, err) = d.admin_cmd(&["drop-identity", "vm-a"]);
    assert!(ok, "{err}");
    assert!(out.contains("freed 1000 bytes"), "{out}");
    let s = snap(&d);
    assert_eq!(s.used, 0);
    assert!(s.identities.iter().all(|i| i.name != "vm-a"));
    // The old connection's pool is gone; reopening the name gives an empty pool.
    assert_eq!(ca.get(pa, Key::new(1, 0)), Err(Status::UnknownPool));
    let pa2 = ca.open_private("default");
    assert_eq!(ca.get(pa2, Key::new(1, 0)), Err(Status::Miss));
    let (ok, _, err) = d.admin_cmd(&["drop-identity", "nobody"]);
    assert!(!ok && err.contains("no identity named"), "{err}");
}

#[test]
fn shared_pools_need_a_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("hostd.toml");
    let uuid = "12345678-9abc-def0-0123-456789abcdef";
    std::fs::write(
        &cfg,
        format!("[[shared]]\nuuid = \"{uuid}\"\nquota = \"1M\"\ngrant = [\"vm-a\", \"vm-b\"]\n"),
    )
    .expect("config");
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.sock")));
    let d = Daemon::start_in(
        dir,
        &[
            &format!("--config={}", cfg.display()),
            &format!("--listen=unix:{}=vm-a", a.display()),
            &format!("--listen=unix:{}=vm-b", b.display()),
            &format!("--listen=unix:{}=vm-c", c.display()),
        ],
    );
    let u = PoolUuid(*uuid::Uuid::parse_str(uuid).expect("uuid").as_bytes());
    let mut ca = Conn::connect(&a);
    let mut cb = Conn::connect(&b);
    let mut cc = Conn::connect(&c);
    let pa = ca.open(PoolKind::Shared(u), false).expect("granted");
    let pb = cb.open(PoolKind::Shared(u), false).expect("granted");
    assert_eq!(cc.open(PoolKind::Shared(u), false), Err(Status::Denied));
    assert_eq!(ca.put(pa, Key::new(1, 0), b"shared!"), Status::Ok);
    assert_eq!(cb.get(pb, Key::new(1, 0)), Ok(b"shared!".to_vec()));
    // The shared pool has its own quota: 1 MiB.
    assert_eq!(
        ca.put(pa, Key::new(2, 0), &vec![0u8; 2 << 20]),
        Status::NoSpace
    );
    // SIGHUP: vm-c is granted now.
    std::fs::write(
        d.dir.path().join("hostd.toml"),
        format!("[[shared]]\nuuid = \"{uuid}\"\nquota = \"1M\"\ngrant = [\"vm-c\"]\n"),
    )
    .expect("config");
    d.signal(Signal::SIGHUP);
    let t0 = std::time::Instant::now();
    loop {
        match cc.open(PoolKind::Shared(u), false) {
            Ok(pc) => {
                assert_eq!(cc.get(pc, Key::new(1, 0)), Ok(b"shared!".to_vec()));
                break;
            }
            Err(s) => {
                assert_eq!(s, Status::Denied);
                assert!(t0.elapsed().as_secs() < 10, "reload never took effect");
                thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn sockets_stale_in_use_and_removed_at_exit() {
    let d = Daemon::start(&[]);
    // In use: a second daemon on the same path refuses to start.
    let out = std::process::Command::new(utmem_testkit::hostd_binary())
        .arg(format!("--listen=unix:{}", d.sock.display()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // SIGTERM: clean exit, socket files removed.
    let mut d = d;
    d.signal(Signal::SIGTERM);
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "exit status {status}");
    assert!(!d.sock.exists() && !d.admin.exists());
    // Stale: a socket file nobody listens on is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&d.sock).expect("bind");
    drop(stale);
    assert!(d.sock.exists());
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = d.sock.clone();
    let d2 = Daemon::start_in(dir, &[&format!("--listen=unix:{}", sock.display())]);
    let mut c = Conn::connect(&sock);
    c.hello();
    drop(d2);
}

#[test]
fn idle_identities_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.sock");
    let d = Daemon::start_in(
        dir,
        &[
            &format!("--listen=unix:{}=vm-a", a.display()),
            "--idle-expiry=300ms",
        ],
    );
    let mut c = Conn::connect(&a);
    let p = c.open_private("x");
    c.put(p, Key::new(1, 0), b"abc");
    thread::sleep(std::time::Duration::from_millis(700));
    // Still connected: nothing expires.
    assert_eq!(c.get(p, Key::new(1, 0)), Ok(b"abc".to_vec()));
    drop(c);
    let t0 = std::time::Instant::now();
    loop {
        let (_, out, _) = d.admin_cmd(&["stats", "--json"]);
        let s: utmem_host::HostSnapshot = serde_json::from_str(&out).expect("json");
        if s.identities.iter().all(|i| i.name != "vm-a") {
            assert_eq!(s.used, 0);
            break;
        }
        assert!(t0.elapsed().as_secs() < 10, "identity never expired");
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(d.log_text().contains("pools dropped"));
}
