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
    let pool = format!("redis-{}", r.port);
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
    let mine = format!("redis-{}", replica.port);
    assert_eq!(d.wait_pool_values(&mine, 9).0, 9, "the replica's own pool");
    assert_eq!(
        d.wait_pool_values(&format!("redis-{}", master.port), 9).0,
        9
    );
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
