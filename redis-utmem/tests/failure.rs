//! The host dies or hangs: Redis stays up and responsive, replies follow the
//! failure rules, and no acknowledged value whose pool survived is lost.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use utmem_testkit::{config_set, pattern, Daemon, Redis};

/// The last acknowledged version of a key and when its SET replied.
type LastAck = Option<(u64, Instant)>;

/// A value that says which key and version it is.
fn value(key: u64, version: u64) -> Vec<u8> {
    let mut v = format!("k{key}v{version}:").into_bytes();
    v.extend(pattern(key * 1_000_000 + version, 6000));
    v
}

fn parse(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(&v[..v.iter().position(|b| *b == b':')?]).ok()?;
    let (k, ver) = s.strip_prefix('k')?.split_once('v')?;
    let (k, ver) = (k.parse().ok()?, ver.parse().ok()?);
    (v == value(k, ver)).then_some((k, ver))
}

#[test]
fn host_killed_mid_load_then_restarted() {
    let mut d = Daemon::start(&[]);
    let mut r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "1000",
        ],
        &[],
    );
    const KEYS: u64 = 100;
    let stop = Arc::new(AtomicBool::new(false));
    // last acknowledged (version, ack time) per key
    let acked: Arc<Mutex<Vec<LastAck>>> = Arc::new(Mutex::new(vec![None; KEYS as usize]));
    let writer = {
        let (mut c, stop, acked) = (r.conn(), Arc::clone(&stop), Arc::clone(&acked));
        thread::spawn(move || {
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let k = version % KEYS;
                let res: redis::RedisResult<String> = redis::cmd("UTMEM.SET")
                    .arg(format!("k{k}"))
                    .arg(value(k, version))
                    .query(&mut c);
                assert_eq!(
                    res.expect("UTMEM.SET never fails with on-host-down local"),
                    "OK"
                );
                acked.lock().expect("lock")[k as usize] = Some((version, Instant::now()));
            }
            version
        })
    };
    let reader = {
        let (mut c, stop) = (r.conn(), Arc::clone(&stop));
        thread::spawn(move || {
            let (mut ok, mut down, mut lost) = (0, 0, 0);
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
    thread::sleep(Duration::from_millis(700));
    d.signal(Signal::SIGKILL);
    let killed = Instant::now();
    thread::sleep(Duration::from_millis(700));
    d.restart();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let versions = writer.join().expect("writer");
    let (ok, down, lost) = reader.join().expect("reader");
    eprintln!("{versions} SETs acknowledged; reads: {ok} ok, {down} UTMEMDOWN, {lost} UTMEMLOST");
    assert!(r.alive(), "redis crashed: {}", r.log());
    let mut c = r.conn();
    let _: String = redis::cmd("PING").query(&mut c).expect("ping");
    // Values kept in Redis while the host was away reach the new host in the background.
    let t0 = Instant::now();
    while r.info("utmem", "utmem_inline_values") != "0" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "kept values never re-offloaded"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let margin = Duration::from_millis(300);
    let mut intact_after_kill = 0;
    for (k, last) in acked.lock().expect("lock").iter().enumerate() {
        let Some((version, at)) = last else { continue };
        let res: redis::RedisResult<Option<Vec<u8>>> =
            redis::cmd("UTMEM.GET").arg(format!("k{k}")).query(&mut c);
        match res {
            Ok(Some(v)) => assert_eq!(parse(&v), Some((k as u64, *version)), "k{k}"),
            Err(e) if e.to_string().contains("UTMEMLOST") => {
                // Only values that lived in the killed host's memory may be gone.
                assert!(
                    *at < killed + margin,
                    "k{k} acknowledged after the kill was lost"
                );
            }
            other => panic!("k{k}: {other:?}"),
        }
        if *at > killed + margin {
            intact_after_kill += 1;
        }
    }
    assert!(intact_after_kill > 0, "the load went on after the kill");
}

#[test]
fn redis_answers_others_while_the_host_is_stopped() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "2000",
        ],
        &[],
    );
    let mut c = r.conn();
    let big = pattern(3, 50_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("big")
        .arg(&big)
        .query(&mut c)
        .expect("set");
    let _: () = redis::cmd("SET")
        .arg("plain")
        .arg("hello")
        .query(&mut c)
        .expect("set");
    r.wait_offloaded();
    d.signal(Signal::SIGSTOP);
    // The value sits in the arena Redis maps: it is served without the host.
    let v: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("big")
        .query(&mut c)
        .expect("a mapped read needs no host");
    assert_eq!(v, big);
    assert!(
        r.info("utmem", "utmem_mapped_reads")
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Over the socket, reads wait for the host and then fail; others are served meanwhile.
    config_set(&mut c, "utmem.mapped-read-max", "0");
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let mut c = r.conn();
            thread::spawn(move || {
                let t0 = Instant::now();
                let res: redis::RedisResult<Vec<u8>> =
                    redis::cmd("UTMEM.GET").arg("big").query(&mut c);
                (res, t0.elapsed())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    for _ in 0..20 {
        let _: String = redis::cmd("PING")
            .query(&mut c)
            .expect("PING while the host is stuck");
        let v: String = redis::cmd("GET").arg("plain").query(&mut c).expect("GET");
        assert_eq!(v, "hello");
    }
    for w in waiters {
        let (res, took) = w.join().expect("waiter");
        let e = res.expect_err("the host is stopped");
        assert!(e.to_string().contains("UTMEMDOWN"), "{e}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    d.signal(Signal::SIGCONT);
    let t0 = Instant::now();
    loop {
        match redis::cmd("UTMEM.GET").arg("big").query::<Vec<u8>>(&mut c) {
            Ok(v) => {
                assert_eq!(v, big);
                break;
            }
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "never recovered: {e}"
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `set-ack local` (write-back): UTMEM.SET answers without waiting for the host, the
/// value is readable at once and reaches the host later; beyond `max-pending-bytes`
/// SETs wait for the host again, so Redis memory stays bounded.
#[test]
fn write_back_answers_at_once_and_offloads_later() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "set-ack",
            "local",
            "max-pending-bytes",
            "150000",
            "timeout-ms",
            "3000",
        ],
        &[],
    );
    let mut c = r.conn();
    d.signal(Signal::SIGSTOP);
    let v1 = pattern(1, 100_000);
    let t0 = Instant::now();
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k1")
        .arg(&v1)
        .query(&mut c)
        .expect("set");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let got: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("k1")
        .query(&mut c)
        .expect("get");
    assert_eq!(got, v1, "readable from Redis while the PUT waits");
    // 100 KB are waiting: another 100 KB would pass the cap, so this SET waits.
    let waiter = {
        let mut c = r.conn();
        thread::spawn(move || {
            let t0 = Instant::now();
            let _: () = redis::cmd("UTMEM.SET")
                .arg("k2")
                .arg(pattern(2, 100_000))
                .query(&mut c)
                .expect("set over the cap");
            t0.elapsed()
        })
    };
    thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "a SET over max-pending-bytes waits for the host"
    );
    d.signal(Signal::SIGCONT);
    let waited = waiter.join().expect("waiter");
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let t0 = Instant::now();
    while r.info("utmem", "utmem_offloaded_values") != "2" {
        assert!(t0.elapsed() < Duration::from_secs(10), "never offloaded");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.info("utmem", "utmem_pending"), "0");
    for (k, v) in [("k1", v1), ("k2", pattern(2, 100_000))] {
        let got: Vec<u8> = redis::cmd("UTMEM.GET").arg(k).query(&mut c).expect("get");
        assert_eq!(got, v, "{k} from the host");
    }
}

fn info_num(r: &Redis, field: &str) -> i64 {
    r.info("utmem", field).parse().unwrap_or(-1)
}

fn utmem_set(c: &mut redis::Connection, k: &str, v: &[u8]) -> redis::RedisResult<String> {
    redis::cmd("UTMEM.SET").arg(k).arg(v).query(c)
}

/// `on-host-down error` with a host that hangs: the SET that was waiting answers
/// `-UTMEMDOWN` after `timeout-ms` (its value stays readable in Redis, nothing is
/// lost), and further SETs are refused at once, changing nothing, until the host
/// answers again.
#[test]
fn on_host_down_error_covers_a_hung_host() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "700",
            "on-host-down",
            "error",
        ],
        &[],
    );
    let mut c = r.conn();
    // Until the first connection is made, `error` refuses SETs too.
    let t0 = Instant::now();
    while r.info("utmem", "utmem_connected") != "1" {
        assert!(t0.elapsed() < Duration::from_secs(10), "never connected");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        utmem_set(&mut c, "before", &pattern(1, 5000)).unwrap(),
        "OK"
    );
    d.signal(Signal::SIGSTOP);
    let v = pattern(2, 5000);
    let t0 = Instant::now();
    let res = utmem_set(&mut c, "hung", &v);
    let info: String = redis::cmd("INFO").arg("utmem").query(&mut c).unwrap();
    let e = res.expect_err(&format!("the host is stopped ({:?}) {info}", t0.elapsed()));
    assert!(e.to_string().contains("UTMEMDOWN"), "{e}");
    let back: Vec<u8> = redis::cmd("UTMEM.GET").arg("hung").query(&mut c).unwrap();
    assert_eq!(back, v, "the value of a SET that timed out stays readable");
    let t0 = Instant::now();
    let e = utmem_set(&mut c, "refused", &pattern(3, 5000)).expect_err("refused");
    assert!(e.to_string().contains("UTMEMDOWN"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let exists: i64 = redis::cmd("EXISTS").arg("refused").query(&mut c).unwrap();
    assert_eq!(exists, 0, "a refused SET changes nothing");
    assert_eq!(info_num(&r, "utmem_host_down_fallbacks"), 1);
    d.signal(Signal::SIGCONT);
    let t0 = Instant::now();
    while utmem_set(&mut c, "after", &pattern(4, 5000)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "host never came back"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// INFO counts values, not attempts: two values kept in Redis while the host is down
/// are two fallbacks however often they are offered again; values the host answers
/// MISS for (an operator dropped the identity) leave `offloaded_*` and become
/// `lost_values`, and reading them says UTMEMLOST.
#[test]
fn info_counts_values_and_lost_ones() {
    let mut d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "500",
        ],
        &[],
    );
    let mut c = r.conn();
    for k in 0..3 {
        assert_eq!(
            utmem_set(&mut c, &format!("k{k}"), &pattern(k, 6000)).unwrap(),
            "OK"
        );
    }
    r.wait_offloaded();
    assert_eq!(info_num(&r, "utmem_offloaded_values"), 3);
    // The operator drops this Redis's identity: the host forgets its values.
    let uid = nix::unistd::getuid().as_raw();
    let (ok, _, err) = d.admin_cmd(&["drop-identity", &format!("uid:{uid}")]);
    assert!(ok, "drop-identity: {err}");
    config_set(&mut c, "utmem.mapped-read-max", "0");
    for k in 0..3 {
        let e = redis::cmd("UTMEM.GET")
            .arg(format!("k{k}"))
            .query::<Vec<u8>>(&mut c)
            .expect_err("the host dropped it");
        assert!(e.to_string().contains("UTMEMLOST"), "{e}");
    }
    assert_eq!(info_num(&r, "utmem_offloaded_values"), 0);
    assert_eq!(info_num(&r, "utmem_offloaded_bytes"), 0);
    assert_eq!(info_num(&r, "utmem_lost_values"), 3);
    assert_eq!(info_num(&r, "utmem_lost_reads"), 3);
    let _: () = redis::cmd("DEL").arg("k0").query(&mut c).unwrap();
    assert_eq!(info_num(&r, "utmem_lost_values"), 2);
    // Host down: two values kept in Redis, offered again every second.
    d.kill();
    for k in 10..12 {
        assert_eq!(
            utmem_set(&mut c, &format!("k{k}"), &pattern(k, 6000)).unwrap(),
            "OK"
        );
    }
    thread::sleep(Duration::from_millis(3500));
    assert_eq!(info_num(&r, "utmem_host_down_fallbacks"), 2);
    assert_eq!(info_num(&r, "utmem_inline_values"), 2);
}

/// COPY of an offloaded key while the host does not answer: the copy reads the
/// source's bytes (which stay on the host even after the source key is deleted) until
/// the host has made the copy; nothing is lost, and the host ends with exactly the
/// copy.
#[test]
fn copy_while_the_host_is_stopped_loses_nothing() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "500",
        ],
        &[],
    );
    let mut c = r.conn();
    let v = pattern(9, 7000);
    assert_eq!(utmem_set(&mut c, "src", &v).unwrap(), "OK");
    r.wait_offloaded();
    d.signal(Signal::SIGSTOP);
    let copied: i64 = redis::cmd("COPY")
        .arg("src")
        .arg("dst")
        .query(&mut c)
        .unwrap();
    assert_eq!(copied, 1);
    let _: i64 = redis::cmd("DEL").arg("src").query(&mut c).unwrap();
    // The COPY times out on the host's side of things.
    thread::sleep(Duration::from_millis(1200));
    d.signal(Signal::SIGCONT);
    config_set(&mut c, "utmem.mapped-read-max", "0");
    let t0 = Instant::now();
    loop {
        match redis::cmd("UTMEM.GET").arg("dst").query::<Vec<u8>>(&mut c) {
            Ok(got) => {
                assert!(got == v, "the copy has other bytes");
                break;
            }
            Err(e) => {
                assert!(
                    !e.to_string().contains("UTMEMLOST"),
                    "the copy was lost: {e}"
                );
                assert!(t0.elapsed() < Duration::from_secs(10), "{e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // The retried COPY lands, the source's bytes are flushed: one value on the host.
    let pool = r.pool();
    assert_eq!(d.wait_pool_values(&pool, 1).0, 1);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.pool_usage(&pool), (1, 7000));
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("dst").query(&mut c).unwrap();
    assert!(got == v);
}

/// `CONFIG SET utmem.timeout-ms` takes effect at once, for the requests sent after it.
#[test]
fn timeout_ms_changes_at_run_time() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "timeout-ms",
            "500",
            "mapped-read-max",
            "0",
        ],
        &[],
    );
    let mut c = r.conn();
    assert_eq!(utmem_set(&mut c, "k", &pattern(5, 5000)).unwrap(), "OK");
    // Over a channel, +OK comes before the host has the value: wait until it has.
    r.wait_offloaded();
    d.signal(Signal::SIGSTOP);
    config_set(&mut c, "utmem.timeout-ms", "2500");
    let t0 = Instant::now();
    let e = redis::cmd("UTMEM.GET")
        .arg("k")
        .query::<Vec<u8>>(&mut c)
        .expect_err("host stopped");
    let took = t0.elapsed();
    assert!(e.to_string().contains("2500 ms"), "{e}");
    assert!(
        took >= Duration::from_millis(2000),
        "the old timeout applied: {took:?}"
    );
    d.signal(Signal::SIGCONT);
}
