//! `durable yes`: the module's pool lives in the host's data directory. A host
//! restart under load loses nothing (no `-UTMEMLOST`, BGSAVE works); a Redis restart
//! leaves exactly the loaded values on the host; a host without a data directory is
//! refused at load.

#![allow(clippy::cast_possible_truncation)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use redis::Connection;
use utmem_testkit::{free_port, module_path, pattern, server_binary, Daemon, Redis};

const KEYS: u64 = 100;

fn value(k: u64, version: u64) -> Vec<u8> {
    let mut v = format!("{k}:{version}:").into_bytes();
    v.extend_from_slice(&pattern(
        k << 32 | version,
        2000 + (k as usize * 97) % 30_000,
    ));
    v
}

fn parse(v: &[u8]) -> Option<(u64, u64)> {
    let mut parts = v.splitn(3, |b| *b == b':');
    let k: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let version: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    (value(k, version) == v).then_some((k, version))
}

fn durable_daemon(fsync: &str) -> Daemon {
    Daemon::start(&["--data-dir=$DIR/data", &format!("--fsync={fsync}")])
}

fn durable_redis(d: &Daemon, extra: &[&str]) -> Redis {
    Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "1000",
            "durable",
            "yes",
        ],
        extra,
    )
}

fn wait_bgsave(c: &mut Connection) {
    let t0 = Instant::now();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(c)
            .expect("info");
        if info.contains("rdb_bgsave_in_progress:0") {
            assert!(
                info.contains("rdb_last_bgsave_status:ok"),
                "BGSAVE failed: {info}"
            );
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "BGSAVE never ended");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_host_restart_under_load_loses_nothing() {
    let mut d = durable_daemon("10ms");
    let r = durable_redis(&d, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Option<u64>>>> = Arc::new(Mutex::new(vec![None; KEYS as usize]));
    let writer = {
        let (mut c, stop, acked) = (r.conn(), Arc::clone(&stop), Arc::clone(&acked));
        thread::spawn(move || {
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let k = version % KEYS;
                let res: String = redis::cmd("UTMEM.SET")
                    .arg(format!("k{k}"))
                    .arg(value(k, version))
                    .query(&mut c)
                    .expect("UTMEM.SET");
                assert_eq!(res, "OK");
                acked.lock().expect("lock")[k as usize] = Some(version);
            }
            version
        })
    };
    let reader = {
        let (mut c, stop) = (r.conn(), Arc::clone(&stop));
        thread::spawn(move || {
            let (mut ok, mut down, mut lost) = (0u64, 0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 7;
                let res: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("UTMEM.GET")
                    .arg(format!("k{}", i % KEYS))
                    .query(&mut c);
                match res {
                    Ok(Some(v)) => {
                        let (k, _) = parse(&v).expect("never wrong data");
                        assert_eq!(k, i % KEYS);
                        ok += 1;
                    }
                    Ok(None) => {}
                    Err(e) if e.to_string().contains("UTMEMDOWN") => down += 1,
                    Err(e) if e.to_string().contains("UTMEMLOST") => lost += 1,
                    Err(e) => panic!("unexpected reply {e}"),
                }
            }
            (ok, down, lost)
        })
    };
    // Two kills of the host in the middle of the load.
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(700));
        d.signal(Signal::SIGKILL);
        thread::sleep(Duration::from_millis(500));
        d.restart();
    }
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let versions = writer.join().expect("writer");
    let (ok, down, lost) = reader.join().expect("reader");
    eprintln!("{versions} SETs acknowledged; reads: {ok} ok, {down} UTMEMDOWN, {lost} UTMEMLOST");
    assert_eq!(lost, 0, "a durable pool lost values across host restarts");
    assert!(ok > 0);
    let mut c = r.conn();
    for (k, last) in acked.lock().expect("lock").iter().enumerate() {
        let Some(version) = last else { continue };
        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
            .arg(format!("k{k}"))
            .query(&mut c)
            .unwrap_or_else(|e| panic!("k{k}: {e}"));
        assert_eq!(parse(&v.expect("present")), Some((k as u64, *version)));
    }
    assert_eq!(r.info("utmem", "utmem_lost_values"), "0");
    let _: () = redis::cmd("BGSAVE").query(&mut c).expect("BGSAVE");
    wait_bgsave(&mut c);
}

#[test]
fn a_redis_restart_leaves_exactly_the_loaded_values() {
    let mut d = durable_daemon("always");
    let mut r = durable_redis(&d, &[]);
    let mut c = r.conn();
    let set = |c: &mut Connection, k: u64, version: u64| {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{k}"))
            .arg(value(k, version))
            .query(c)
            .expect("set");
    };
    for k in 0..40 {
        set(&mut c, k, 1);
    }
    let _: () = redis::cmd("BGSAVE").query(&mut c).expect("BGSAVE");
    wait_bgsave(&mut c);
    // After the dump: overwrites, deletes and new keys that the dump does not have.
    for k in 0..10 {
        set(&mut c, k, 2);
    }
    for k in 10..20 {
        let _: () = redis::cmd("DEL")
            .arg(format!("k{k}"))
            .query(&mut c)
            .expect("del");
    }
    for k in 40..60 {
        set(&mut c, k, 1);
    }
    let pool = r.pool();
    assert_eq!(d.wait_pool_values(&pool, 50).0, 50);
    r.restart();
    let mut c = r.conn();
    let loaded: u64 = (0..40).map(|k| value(k, 1).len() as u64).sum();
    assert_eq!(
        d.wait_pool_values(&pool, 40),
        (40, loaded),
        "the host holds exactly the loaded values"
    );
    for k in 0..60u64 {
        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
            .arg(format!("k{k}"))
            .query(&mut c)
            .expect("get");
        if k < 40 {
            assert_eq!(v, Some(value(k, 1)), "k{k}");
        } else {
            assert_eq!(v, None, "k{k} was not in the dump");
        }
    }
    // And the host keeps exactly those across its own restart.
    d.restart();
    assert_eq!(d.wait_pool_values(&pool, 40), (40, loaded));
    for k in 0..40u64 {
        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
            .arg(format!("k{k}"))
            .query(&mut c)
            .expect("get after host restart");
        assert_eq!(v, Some(value(k, 1)), "k{k}");
    }
}

#[test]
fn durable_yes_without_a_host_data_dir_is_refused_at_load() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("redis.log");
    let mut child = Command::new(server_binary())
        .args(["--port", &free_port().to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(&log)
        .arg("--loadmodule")
        .arg(module_path())
        .args(["transport", &d.spec(), "durable", "yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("redis-server started with durable yes against a host without --data-dir");
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("option durable: the host at") && text.contains("--data-dir"),
        "{text}"
    );
}
