//! Durable pools against the real utmem-hostd: `kill -9` at random points, torn and
//! damaged log files, overwrite churn, drop-identity, refusal without a data dir.

#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;

use rand::{Rng, SeedableRng};
use utmem_proto::{encode_request, Key, NewPool, Op, PoolId, PoolKind, Status, CAP_DURABLE};
use utmem_testkit::{pattern, read_reply, Conn, Daemon};

fn durable(name: &str) -> NewPool {
    NewPool {
        kind: PoolKind::Private(name.into()),
        ephemeral: false,
        durable: true,
    }
}

fn data_dir(d: &Daemon) -> PathBuf {
    d.dir.path().join("data")
}

/// Every log file under the data directory, oldest name first.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(log_files(&p));
        } else if p.extension().is_some_and(|x| x == "log") {
            v.push(p);
        }
    }
    v.sort();
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    log_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

fn start(extra: &[&str]) -> Daemon {
    let mut args = vec!["--data-dir=$DIR/data"];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

fn open(d: &Daemon, name: &str) -> (Conn, PoolId) {
    let mut c = Conn::connect(&d.sock);
    let p = c.open_with(durable(name)).expect("open durable pool");
    (c, p)
}

/// A size log-uniform over 0 B..=1 MiB (0 as likely as any power of two).
fn log_uniform(rng: &mut impl Rng) -> usize {
    let bits = rng.gen_range(0..=20u32);
    if bits == 0 {
        return rng.gen_range(0..=1);
    }
    rng.gen_range((1usize << (bits - 1))..=(1usize << bits))
}

/// What one key may hold after a crash: the last acknowledged value, or the one in flight.
#[derive(Default, Clone)]
struct Expect {
    acked: Option<(u64, usize)>,
    in_flight: Option<(u64, usize)>,
}

fn crash_round(seed: u64, fsync: &str, puts: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A small compaction floor so that compactions run (and get killed) too.
    let mut d = start(&[&format!("--fsync={fsync}"), "--compact-floor=8M"]);
    let (mut c, pool) = open(&d, "crash");
    let kill_at = rng.gen_range(1..puts) as u64;
    let keys = (puts / 3).max(1) as u64;
    let mut expect: HashMap<u64, Expect> = HashMap::new();
    let mut sent = 0u64;
    for i in 0..puts as u64 {
        // A third of the keys, so most are overwritten a few times.
        let k = rng.gen_range(0..keys);
        let len = log_uniform(&mut rng);
        let seed = seed << 32 | i;
        let v = pattern(seed, len);
        sent += len as u64;
        expect.entry(k).or_default().in_flight = Some((seed, len));
        let h = Conn::keyed(Op::Put, pool, Key::new(k, 0));
        let r = if i == kill_at {
            // The kill lands while this PUT is in flight (sent, maybe stored, maybe
            // answered): its value may or may not be there afterwards.
            let mut out = BytesMut::new();
            encode_request(&h, &v, &mut out);
            let sent = c.s.write_all(&out);
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..2000)));
            d.kill();
            sent.and_then(|()| read_reply(&mut c.s, &mut BytesMut::new()))
        } else {
            c.try_call(h, &v)
        };
        match r {
            Ok(r) => {
                assert_eq!(r.header.status, Status::Ok, "PUT {i}");
                let e = expect.entry(k).or_default();
                e.acked = e.in_flight.take();
            }
            Err(_) => break,
        }
        if i == kill_at {
            break;
        }
    }
    eprintln!(
        "seed {seed:#x} fsync {fsync}: killed during PUT {kill_at} of {puts} ({} MiB sent)",
        sent >> 20
    );
    d.restart();
    let (mut c, pool) = open(&d, "crash");
    let mut present = 0;
    for (k, e) in &expect {
        match c.get(pool, Key::new(*k, 0)) {
            Ok(v) => {
                present += 1;
                let ok = [e.acked, e.in_flight]
                    .iter()
                    .flatten()
                    .any(|(s, len)| v.len() == *len && v == pattern(*s, *len));
                assert!(
                    ok,
                    "seed {seed} ({fsync}): key {k} holds {} bytes that were never acknowledged \
                     nor in flight",
                    v.len()
                );
            }
            Err(Status::Miss) => assert!(
                e.acked.is_none(),
                "seed {seed} ({fsync}): acknowledged key {k} is gone after kill -9"
            ),
            Err(s) => panic!("GET {k}: {s:?}"),
        }
    }
    // Accounting covers what was loaded.
    assert_eq!(c.stats().values, present, "seed {seed}");
}

/// 10 rounds of PUTs with sizes log-uniform over 0 B..=1 MiB and a `kill -9` at a
/// random point, each restarted and checked: every acknowledged value is there and
/// byte-identical, and nothing else is. Scaled to stay near a minute in debug builds:
/// 1,500 PUTs per round (about 110 MB), 15,000 in all.
#[test]
fn acknowledged_puts_survive_kill_9() {
    let policies = [
        "always", "always", "always", "always", "always", "always", "10ms", "10ms", "never",
        "never",
    ];
    for (i, fsync) in policies.iter().enumerate() {
        crash_round(0x5eed_0000 + i as u64, fsync, 10_000);
    }
}

fn put_all(c: &mut Conn, pool: PoolId, n: u64, max: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|k| {
            let v = pattern(seed ^ k, rng.gen_range(0..max));
            assert_eq!(c.put(pool, Key::new(k, 0), &v), Status::Ok);
            v
        })
        .collect()
}

/// Each key reads back exact or MISS; returns how many were MISS.
fn check_exact_or_miss(d: &Daemon, name: &str, want: &[Vec<u8>]) -> usize {
    let (mut c, pool) = open(d, name);
    let mut missing = 0;
    for (k, v) in want.iter().enumerate() {
        match c.get(pool, Key::new(k as u64, 0)) {
            Ok(got) => assert!(got == *v, "key {k}: wrong bytes after recovery"),
            Err(Status::Miss) => missing += 1,
            Err(s) => panic!("GET {k}: {s:?}"),
        }
    }
    missing
}

#[test]
fn a_torn_tail_is_cut_off() {
    let mut d = start(&["--fsync=never"]);
    let (mut c, pool) = open(&d, "torn");
    let want = put_all(&mut c, pool, 300, 32 << 10, 1);
    d.kill();
    let files = log_files(&data_dir(&d));
    let last = files.last().expect("a segment").clone();
    let len = std::fs::metadata(&last).expect("meta").len();
    // Cut in the middle of the last value's record.
    let cut = len - (want[299].len() as u64) / 2 - 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open")
        .set_len(cut)
        .expect("truncate");
    d.restart();
    assert_eq!(
        check_exact_or_miss(&d, "torn", &want),
        1,
        "only the torn value"
    );
    assert!(d.log_text().contains("torn tail"), "{}", d.log_text());
    // The tail was cut off for good: PUTs after it and another restart keep everything.
    let (mut c, pool) = open(&d, "torn");
    assert_eq!(c.put(pool, Key::new(299, 0), &want[299]), Status::Ok);
    d.restart();
    assert_eq!(check_exact_or_miss(&d, "torn", &want), 0);
}

#[test]
fn flipped_bytes_give_miss_never_wrong_bytes() {
    let mut d = start(&["--fsync=never"]);
    let (mut c, pool) = open(&d, "flip");
    let want = put_all(&mut c, pool, 400, 16 << 10, 2);
    d.kill();
    let files = log_files(&data_dir(&d));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let flips = 25;
    for _ in 0..flips {
        let f = &files[rng.gen_range(0..files.len())];
        let mut b = std::fs::read(f).expect("read");
        let at = rng.gen_range(0..b.len());
        b[at] ^= 1 << rng.gen_range(0..8);
        std::fs::write(f, &b).expect("write");
    }
    d.restart();
    let missing = check_exact_or_miss(&d, "flip", &want);
    // A flip costs at most the record it hits (a damaged header is skipped to the next one).
    assert!(
        missing <= flips,
        "{missing} keys lost to {flips} flipped bits"
    );
    assert!(
        d.log_text().contains("damaged"),
        "recovery says what it dropped"
    );
}

#[test]
fn overwrite_churn_keeps_the_files_bounded() {
    let mut d = start(&["--fsync=never", "--compact-floor=2M"]);
    let (mut c, pool) = open(&d, "churn");
    // 32 keys of up to 64 KiB (about 1 MiB live), overwritten 150 times: ~150 MiB written.
    let live_max = 32u64 * (64 << 10);
    let mut last = Vec::new();
    let mut peak = 0;
    let mut written = 0u64;
    for round in 0..150u64 {
        last = put_all(&mut c, pool, 32, 64 << 10, round);
        written += last.iter().map(|v| v.len() as u64).sum::<u64>();
        peak = peak.max(dir_bytes(&data_dir(&d)));
    }
    // Compaction runs beside the PUTs, and PUTs wait for it once they are the live
    // bytes (or the floor) ahead: the files never follow what was written.
    assert!(
        peak < 16 << 20 && peak < written / 8,
        "log files reached {peak} bytes after {written} bytes written: {}",
        d.log_text()
    );
    let log_bytes = || {
        let snap: serde_json::Value =
            serde_json::from_str(&d.admin_cmd(&["stats", "--json"]).1).expect("json");
        snap["identities"][0]["log_bytes"]
            .as_u64()
            .expect("log_bytes")
    };
    // Once the PUTs stop, one more PUT round after any running compaction settles it.
    let bound = 2 * live_max + (2 << 20) + live_max;
    let t0 = std::time::Instant::now();
    while log_bytes() > bound || dir_bytes(&data_dir(&d)) > bound {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "log stays at {} bytes ({} on disk), bound {bound}",
            log_bytes(),
            dir_bytes(&data_dir(&d))
        );
        last = put_all(&mut c, pool, 32, 64 << 10, 1000);
        std::thread::sleep(Duration::from_millis(200));
    }
    d.restart();
    assert_eq!(check_exact_or_miss(&d, "churn", &last), 0);
}

#[test]
fn flushes_and_pool_drops_survive_a_restart() {
    let mut d = start(&["--fsync=always"]);
    let (mut c, pool) = open(&d, "a");
    let want = put_all(&mut c, pool, 20, 8 << 10, 4);
    assert_eq!(c.flush(pool, Key::new(3, 0)), Status::Ok);
    let r = c.call(Conn::keyed(Op::FlushObject, pool, Key::new(4, 0)), &[]);
    assert_eq!(r.header.status, Status::Ok);
    let other = c.open_with(durable("b")).expect("b");
    put_all(&mut c, other, 5, 1 << 10, 5);
    let r = c.call(Conn::keyed(Op::DestroyPool, other, Key::default()), &[]);
    assert_eq!(r.header.status, Status::Ok);
    d.restart();
    let (mut c, pool) = open(&d, "a");
    for (k, v) in want.iter().enumerate() {
        let got = c.get(pool, Key::new(k as u64, 0));
        if k == 3 || k == 4 {
            assert_eq!(got, Err(Status::Miss), "key {k} was flushed");
        } else {
            assert_eq!(got.as_ref(), Ok(v), "key {k}");
        }
    }
    let b = c.open_with(durable("b")).expect("b");
    assert_eq!(c.get(b, Key::new(0, 0)), Err(Status::Miss), "b was dropped");
    let s = c.stats();
    assert_eq!(s.values, 18);
    assert_eq!(
        s.bytes,
        want.iter()
            .enumerate()
            .filter(|(k, _)| *k != 3 && *k != 4)
            .map(|(_, v)| v.len() as u64)
            .sum::<u64>()
    );
}

#[test]
fn quotas_cover_durable_pools_across_restarts() {
    let mut d = start(&["--fsync=10ms", "--quota=1M"]);
    let (mut c, pool) = open(&d, "q");
    let v = vec![7u8; 300 << 10];
    for k in 0..3 {
        assert_eq!(c.put(pool, Key::new(k, 0), &v), Status::Ok);
    }
    assert_eq!(c.put(pool, Key::new(3, 0), &v), Status::NoSpace);
    d.restart();
    let (mut c, pool) = open(&d, "q");
    assert_eq!(c.stats().bytes, 3 * (300 << 10));
    assert_eq!(
        c.put(pool, Key::new(3, 0), &v),
        Status::NoSpace,
        "still full"
    );
    assert_eq!(c.get(pool, Key::new(2, 0)), Ok(v));
}

#[test]
fn drop_identity_deletes_durable_data() {
    let mut d = start(&["--fsync=always"]);
    let (mut c, pool) = open(&d, "gone");
    let name = c.hello().identity;
    put_all(&mut c, pool, 10, 4 << 10, 6);
    assert!(!log_files(&data_dir(&d)).is_empty());
    drop(c);
    let (ok, out, err) = d.admin_cmd(&["drop-identity", &name]);
    assert!(ok, "{out}{err}");
    assert!(
        log_files(&data_dir(&d)).is_empty(),
        "durable files left after drop-identity"
    );
    d.restart();
    let (mut c, pool) = open(&d, "gone");
    assert_eq!(c.get(pool, Key::new(1, 0)), Err(Status::Miss));
    assert_eq!(c.stats().values, 0);
}

#[test]
fn durable_pools_need_a_data_dir_and_say_so() {
    let d = Daemon::start(&[]);
    let mut c = Conn::connect(&d.sock);
    assert_eq!(c.hello().capabilities & CAP_DURABLE, 0);
    assert_eq!(c.open_with(durable("x")), Err(Status::BadRequest));
    let d = start(&[]);
    let mut c = Conn::connect(&d.sock);
    assert_ne!(c.hello().capabilities & CAP_DURABLE, 0);
    c.open_with(durable("x")).expect("durable");
    // The same name with other flags is another pool's name: refused.
    assert_eq!(
        c.open(PoolKind::Private("x".into()), false),
        Err(Status::BadRequest)
    );
    // Durable and ephemeral at once does not decode.
    let mut req = durable("y");
    req.ephemeral = true;
    assert_eq!(c.open_with(req), Err(Status::BadRequest));
}
