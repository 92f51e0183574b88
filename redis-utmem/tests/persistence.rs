//! RDB, AOF and replication return byte-identical values; a BGSAVE keeps every
//! value it snapshotted even while its keys are deleted and overwritten.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::time::{Duration, Instant};

use redis::{Connection, Value};
use utmem_testkit::{pattern, Daemon, Redis};

const SIZES: [usize; 6] = [1, 1023, 1024, 5000, 100_000, 1 << 20];

fn module_args(d: &Daemon) -> Vec<String> {
    vec![
        "transport".into(),
        d.spec(),
        "threshold".into(),
        "1024".into(),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn fill(c: &mut Connection, n: u64) {
    for i in 0..n {
        let len = SIZES[(i as usize) % SIZES.len()];
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{i}"))
            .arg(pattern(i, len))
            .query(c)
            .expect("set");
    }
}

fn check(c: &mut Connection, n: u64, what: &str) {
    for i in 0..n {
        let len = SIZES[(i as usize) % SIZES.len()];
        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
            .arg(format!("k{i}"))
            .query(c)
            .unwrap_or_else(|e| panic!("{what}: k{i}: {e}"));
        assert!(
            v.as_deref() == Some(&pattern(i, len)[..]),
            "{what}: k{i} differs"
        );
    }
}

fn wait_bgsave(c: &mut Connection) {
    let t0 = Instant::now();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(c)
            .expect("info");
        if info.contains("rdb_bgsave_in_progress:0") && info.contains("aof_rewrite_in_progress:0") {
            assert!(
                !info.contains("rdb_last_bgsave_status:err"),
                "BGSAVE failed: {info}"
            );
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "BGSAVE never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn debug_reload_and_restart_from_bgsave() {
    let d = Daemon::start(&[]);
    let margs = module_args(&d);
    let mut r = Redis::start(&args(&margs), &[]);
    let mut c = r.conn();
    fill(&mut c, 30);
    let pool = r.pool();
    let _: () = redis::cmd("DEBUG")
        .arg("RELOAD")
        .query(&mut c)
        .expect("DEBUG RELOAD");
    check(&mut c, 30, "after DEBUG RELOAD");
    // 30 keys, 20 of them at or above the threshold: nothing leaked on the host.
    assert_eq!(d.wait_pool_values(&pool, 20).0, 20);
    let _: () = redis::cmd("BGSAVE").query(&mut c).expect("BGSAVE");
    wait_bgsave(&mut c);
    r.restart();
    let mut c = r.conn();
    check(&mut c, 30, "after restart from the BGSAVE dump");
    // The pool was emptied at start and refilled from the dump.
    assert_eq!(d.wait_pool_values(&pool, 20).0, 20);
}

#[test]
fn aof_rewrite_and_restart() {
    let d = Daemon::start(&[]);
    let margs = module_args(&d);
    for preamble in ["yes", "no"] {
        let mut r = Redis::start(
            &args(&margs),
            &["--appendonly", "yes", "--aof-use-rdb-preamble", preamble],
        );
        let mut c = r.conn();
        fill(&mut c, 24);
        let _: () = redis::cmd("BGREWRITEAOF").query(&mut c).expect("rewrite");
        wait_bgsave(&mut c);
        // More writes after the rewrite go to the AOF tail as UTMEM.SET commands.
        let _: () = redis::cmd("UTMEM.SET")
            .arg("tail")
            .arg(pattern(77, 9000))
            .query(&mut c)
            .expect("set");
        r.restart();
        let mut c = r.conn();
        check(&mut c, 24, &format!("AOF (preamble {preamble})"));
        let v: Vec<u8> = redis::cmd("UTMEM.GET")
            .arg("tail")
            .query(&mut c)
            .expect("get");
        assert_eq!(v, pattern(77, 9000));
    }
}

#[test]
fn a_replica_gets_the_values_into_its_own_pool() {
    replica_sync(&[], &[]);
}

#[test]
fn a_diskless_replica_load_works_too() {
    replica_sync(
        &[
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ],
        &["--repl-diskless-load", "swapdb"],
    );
}

fn replica_sync(master_extra: &[&str], replica_extra: &[&str]) {
    let d = Daemon::start(&[]);
    let margs = module_args(&d);
    let master = Redis::start(&args(&margs), master_extra);
    let mut m = master.conn();
    fill(&mut m, 12);
    let port = master.port.to_string();
    let mut extra = vec!["--replicaof", "127.0.0.1", &port];
    extra.extend_from_slice(replica_extra);
    let replica = Redis::start(&args(&margs), &extra);
    let mut r = replica.conn();
    let t0 = Instant::now();
    while replica.info("replication", "master_link_status") != "up" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "replica never synced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Commands after the full sync are replicated as UTMEM.SET.
    let _: () = redis::cmd("UTMEM.SET")
        .arg("later")
        .arg(pattern(55, 70_000))
        .arg("EX")
        .arg("1000")
        .query(&mut m)
        .expect("set");
    let _: () = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut m)
        .expect("wait");
    check(&mut r, 12, "replica");
    let v: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("later")
        .query(&mut r)
        .expect("get");
    assert_eq!(v, pattern(55, 70_000));
    let ttl: i64 = redis::cmd("TTL").arg("later").query(&mut r).expect("ttl");
    assert!(ttl > 990, "{ttl}");
    let mine = replica.pool();
    assert_eq!(d.wait_pool_values(&mine, 9).0, 9, "the replica's own pool");
    assert_eq!(d.wait_pool_values(&master.pool(), 9).0, 9);
}

#[test]
fn bgsave_keeps_what_it_snapshotted_while_keys_change() {
    let d = Daemon::start(&[]);
    let margs = module_args(&d);
    let mut r = Redis::start(&args(&margs), &[]);
    let mut c = r.conn();
    let n = 200u64;
    for i in 0..n {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{i}"))
            .arg(pattern(i, 8000))
            .query(&mut c)
            .expect("set");
    }
    // Slow the child down (10 ms per key) so the changes below race it.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdb-key-save-delay")
        .arg("10000")
        .query(&mut c)
        .expect("delay");
    let _: () = redis::cmd("BGSAVE").query(&mut c).expect("BGSAVE");
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..n {
        if i % 2 == 0 {
            let _: Value = redis::cmd("DEL")
                .arg(format!("k{i}"))
                .query(&mut c)
                .expect("del");
        } else {
            let _: () = redis::cmd("UTMEM.SET")
                .arg(format!("k{i}"))
                .arg(pattern(1000 + i, 8000))
                .query(&mut c)
                .expect("overwrite");
        }
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdb-key-save-delay")
        .arg("0")
        .query(&mut c)
        .expect("delay");
    wait_bgsave(&mut c);
    let log = r.log();
    assert!(
        log.contains("Background saving terminated with success"),
        "{log}"
    );
    r.restart();
    let mut c = r.conn();
    for i in 0..n {
        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
            .arg(format!("k{i}"))
            .query(&mut c)
            .expect("get");
        assert_eq!(v, Some(pattern(i, 8000)), "k{i} from the snapshot");
    }
}

fn bgsave_status(r: &Redis, c: &mut Connection) -> (String, Duration) {
    let t0 = Instant::now();
    let _: Value = redis::cmd("BGSAVE").query(c).expect("bgsave starts");
    loop {
        if r.info("persistence", "rdb_bgsave_in_progress") == "0" {
            return (
                r.info("persistence", "rdb_last_bgsave_status"),
                t0.elapsed(),
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "BGSAVE never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mapped_reads_off(c: &mut Connection) {
    utmem_testkit::config_set(c, "utmem.mapped-read-max", "0");
}

/// The host restarted without this Redis's values: what it answers MISS for is lost,
/// whoever asks. BGSAVE succeeds (the child records those values as lost), reads say
/// UTMEMLOST, and a Redis restarted from that RDB says so too; nothing is marked lost
/// by the restart alone, and SAVE works again.
#[test]
fn saves_succeed_after_the_host_lost_values() {
    let mut d = Daemon::start(&[]);
    let ma = module_args(&d);
    let mut r = Redis::start(&args(&ma), &["--save", "3600 1"]);
    let mut c = r.conn();
    mapped_reads_off(&mut c);
    for k in 0..3u64 {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{k}"))
            .arg(pattern(k, 6000))
            .query(&mut c)
            .expect("set");
    }
    r.wait_offloaded();
    let _: () = redis::cmd("SAVE").query(&mut c).expect("save");
    d.kill();
    d.restart();
    // The client reconnects on its own; nothing is lost until the host says MISS.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(r.info("utmem", "utmem_lost_values"), "0");
    let (status, _) = bgsave_status(&r, &mut c);
    assert_eq!(
        status,
        "ok",
        "BGSAVE after the host lost values: {}",
        r.log()
    );
    let e = redis::cmd("UTMEM.GET")
        .arg("k0")
        .query::<Vec<u8>>(&mut c)
        .expect_err("lost");
    assert!(e.to_string().contains("UTMEMLOST"), "{e}");
    assert_eq!(r.info("utmem", "utmem_lost_values"), "1");
    let _: () = redis::cmd("SAVE")
        .query(&mut c)
        .expect("SAVE after the loss");
    drop(c);
    r.restart();
    let mut c = r.conn();
    for k in 0..3u64 {
        let e = redis::cmd("UTMEM.GET")
            .arg(format!("k{k}"))
            .query::<Vec<u8>>(&mut c)
            .expect_err("still lost after a restart from the RDB");
        assert!(e.to_string().contains("UTMEMLOST"), "k{k}: {e}");
    }
    let (status, _) = bgsave_status(&r, &mut c);
    assert_eq!(status, "ok");
}

/// The host is down (not restarted): its values are unreachable, not lost. BGSAVE
/// fails fast with a log line saying why; SAVE, SHUTDOWN that would save and DEBUG
/// RELOAD are refused up front with a clear error (their type callbacks could only
/// write the values as lost); once the host is back, everything saves again.
#[test]
fn saves_wait_for_an_unreachable_host_instead_of_losing_values() {
    let d = Daemon::start(&[]);
    let mut ma = module_args(&d);
    ma.extend(["timeout-ms".into(), "1000".into()]);
    let r = Redis::start(&args(&ma), &[]);
    let mut c = r.conn();
    let v = pattern(7, 6000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg(&v)
        .query(&mut c)
        .expect("set");
    r.wait_offloaded();
    d.signal(nix::sys::signal::Signal::SIGSTOP);
    mapped_reads_off(&mut c);
    // A read times out: now the module knows the host does not answer.
    let e = redis::cmd("UTMEM.GET")
        .arg("k")
        .query::<Vec<u8>>(&mut c)
        .expect_err("host stopped");
    assert!(e.to_string().contains("UTMEMDOWN"), "{e}");
    let (status, took) = bgsave_status(&r, &mut c);
    assert_eq!(status, "err");
    assert!(took < Duration::from_secs(15), "BGSAVE took {took:?}");
    assert!(
        r.log().contains("BGSAVE/replication snapshot aborted"),
        "{}",
        r.log()
    );
    for cmd in [
        &["SAVE"][..],
        &["DEBUG", "RELOAD"],
        &["SHUTDOWN", "SAVE"],
        &["DUMP", "k"],
    ] {
        let mut q = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            q.arg(*a);
        }
        let e = q.query::<Value>(&mut c).expect_err("refused");
        assert!(e.to_string().contains("refused"), "{cmd:?}: {e}");
    }
    assert_eq!(r.info("utmem", "utmem_lost_values"), "0");
    d.signal(nix::sys::signal::Signal::SIGCONT);
    let t0 = Instant::now();
    while redis::cmd("SAVE").query::<()>(&mut c).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "SAVE never allowed again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _: () = redis::cmd("DEBUG")
        .arg("RELOAD")
        .query(&mut c)
        .expect("reload");
    let back: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).expect("get");
    assert_eq!(back, v);
}

/// Fork safety: the BGSAVE / AOF-rewrite child reads every value through its slot,
/// which the I/O and reader threads lock all the time. 50 clients mix UTMEM.SET/GET/DEL
/// of 1–64 KiB values for 60 s while BGSAVE and BGREWRITEAOF run back to back: every one
/// completes within 10 s (a child stuck on a lock held at fork time never would), and
/// the host's bytes return to zero after FLUSHALL.
#[test]
fn forks_under_load_always_complete() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let d = Daemon::start(&[]);
    let ma = module_args(&d);
    let r = Redis::start(&args(&ma), &["--appendonly", "yes"]);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..50u64)
        .map(|t| {
            let (mut c, stop, ops) = (r.conn(), Arc::clone(&stop), Arc::clone(&ops));
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = format!("k{}", x % 400);
                    let res: redis::RedisResult<Value> = match x % 10 {
                        0..=3 => {
                            let len = 1024 + (x >> 8) as usize % (63 * 1024);
                            redis::cmd("UTMEM.SET")
                                .arg(&key)
                                .arg(pattern(x, len))
                                .query(&mut c)
                        }
                        4..=7 => redis::cmd("UTMEM.GET").arg(&key).query(&mut c),
                        _ => redis::cmd("DEL").arg(&key).query(&mut c),
                    };
                    res.expect("no errors while the host is up");
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut c = r.conn();
    let t0 = Instant::now();
    let mut forks = 0;
    while t0.elapsed() < Duration::from_secs(60) {
        for cmd in ["BGSAVE", "BGREWRITEAOF"] {
            let started = Instant::now();
            // A rewrite may still be scheduled behind a save; retry until it starts.
            while redis::cmd(cmd).query::<Value>(&mut c).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{cmd} never started"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            loop {
                let info: String = redis::cmd("INFO").arg("persistence").query(&mut c).unwrap();
                if info.contains("rdb_bgsave_in_progress:0")
                    && info.contains("aof_rewrite_in_progress:0")
                    && info.contains("aof_rewrite_scheduled:0")
                {
                    assert!(!info.contains("rdb_last_bgsave_status:err"), "{info}");
                    assert!(!info.contains("aof_last_bgrewrite_status:err"), "{info}");
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{cmd} did not complete within 10 s (fork child stuck?): {info}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            forks += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client");
    }
    eprintln!("{forks} forks, {} commands", ops.load(Ordering::Relaxed));
    let _: () = redis::cmd("FLUSHALL").query(&mut c).expect("flushall");
    let pool = r.pool();
    assert_eq!(
        d.wait_pool_values(&pool, 0),
        (0, 0),
        "host bytes after FLUSHALL"
    );
}

fn q<T: redis::FromRedisValue>(c: &mut Connection, args: &[&[u8]]) -> T {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("utf8"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c)
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(args[0])))
}

/// UTMEM.RECALL swaps on the main thread and propagates as the plain write it is: a
/// replica and an AOF replay end with the same plain string (and TTL) as the master,
/// even with a write right after it, inside MULTI and Lua too; RECALLALL reaches the
/// replica and the AOF as well.
#[test]
fn recall_is_a_plain_write_on_replicas_and_in_the_aof() {
    let d = Daemon::start(&[]);
    let ma = module_args(&d);
    let mut master = Redis::start(
        &args(&ma),
        // `always`: the restart below is a SIGKILL, and with `everysec` a busy disk lets
        // Redis postpone writing the AOF buffer by up to two seconds.
        &[
            "--appendonly",
            "yes",
            "--aof-use-rdb-preamble",
            "no",
            "--appendfsync",
            "always",
            "--repl-diskless-sync-delay",
            "0",
        ],
    );
    let mut m = master.conn();
    let port = master.port.to_string();
    let replica = Redis::start(&args(&ma), &["--replicaof", "127.0.0.1", &port]);
    let t0 = Instant::now();
    while replica.info("replication", "master_link_status") != "up" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "replica never synced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut r = replica.conn();
    mapped_reads_off(&mut m);
    let v = |k: u64| pattern(k, 5000);
    for k in 0..8u64 {
        let _: () = q(&mut m, &[b"UTMEM.SET", format!("k{k}").as_bytes(), &v(k)]);
    }
    let _: i64 = q(&mut m, &[b"EXPIRE", b"k0", b"1000"]);
    // Plain client: the fetch blocks it, the swap runs on the main thread.
    assert_eq!(q::<i64>(&mut m, &[b"UTMEM.RECALL", b"k0"]), 1);
    let _: i64 = q(&mut m, &[b"APPEND", b"k0", b"+x"]);
    // MULTI and Lua: synchronously.
    let _: () = q(&mut m, &[b"MULTI"]);
    let _: () = q(&mut m, &[b"UTMEM.RECALL", b"k1"]);
    let _: () = q(&mut m, &[b"APPEND", b"k1", b"+y"]);
    let ex: redis::RedisResult<Value> = redis::cmd("EXEC").query(&mut m);
    assert!(ex.is_ok(), "EXEC: {ex:?} {}", master.log());
    let _: i64 = q(
        &mut m,
        &[
            b"EVAL",
            b"redis.call('UTMEM.RECALL', KEYS[1]) return redis.call('APPEND', KEYS[1], '+z')",
            b"1",
            b"k2",
        ],
    );
    // RECALLALL: the rest.
    let _: () = q(&mut m, &[b"UTMEM.RECALLALL"]);
    while master.info("utmem", "utmem_recall_running") != "0" {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: i64 = q(&mut m, &[b"WAIT", b"1", b"5000"]);
    let expect = |k: u64| {
        let mut want = v(k);
        want.extend_from_slice(match k {
            0 => b"+x".as_slice(),
            1 => b"+y",
            2 => b"+z",
            _ => b"",
        });
        want
    };
    let verify = |c: &mut Connection, who: &str| {
        for k in 0..8u64 {
            let key = format!("k{k}");
            let t: String = q(c, &[b"TYPE", key.as_bytes()]);
            assert_eq!(t, "string", "{who}: {key} is still {t}");
            let got: Vec<u8> = q(c, &[b"GET", key.as_bytes()]);
            assert!(got == expect(k), "{who}: {key} differs");
        }
        let ttl: i64 = q(c, &[b"TTL", b"k0"]);
        assert!(ttl > 900, "{who}: TTL {ttl}");
    };
    verify(&mut m, "master");
    verify(&mut r, "replica");
    drop(m);
    master.restart();
    let mut m = master.conn();
    verify(&mut m, "master after AOF replay");
}

/// Two Redis servers with the same port and uid (here both on port 0 behind Unix
/// sockets, as two containers would be) get two pools: starting the second does not
/// empty the first's. A restarted server finds its own pool again (no new pool left
/// behind on the host).
#[test]
fn two_servers_with_the_same_port_keep_their_own_pools() {
    let d = Daemon::start(&[]);
    let ma = module_args(&d);
    let a = Redis::start_unix(tempfile::tempdir().expect("dir"), &args(&ma));
    let mut ca = a.conn();
    mapped_reads_off(&mut ca);
    let v = pattern(1, 9000);
    let _: () = q(&mut ca, &[b"UTMEM.SET", b"k", &v]);
    let b = Redis::start_unix(tempfile::tempdir().expect("dir"), &args(&ma));
    let mut cb = b.conn();
    let _: () = q(&mut cb, &[b"UTMEM.SET", b"k", &pattern(2, 9000)]);
    assert_ne!(a.pool(), b.pool());
    assert!(a.pool().starts_with("redis-0-"), "{}", a.pool());
    let got: Vec<u8> = q(&mut ca, &[b"UTMEM.GET", b"k"]);
    assert!(got == v, "the second server emptied the first one's pool");
    // A restart keeps the name: the host has exactly these two pools.
    let (pa, mut a) = (a.pool(), a);
    drop(ca);
    a.restart();
    assert_eq!(a.pool(), pa);
    let (ok, out, err) = d.admin_cmd(&["stats", "--json"]);
    assert!(ok, "{err}");
    let pools = out.matches("\"name\": \"redis-").count();
    assert_eq!(pools, 2, "{out}");
}
