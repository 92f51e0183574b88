//! UTMEM.* against the replies plain Redis gives, keyspace commands, options.
//! Real redis-server (or $UTMEM_REDIS_SERVER), real utmem-hostd, Unix sockets.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::time::{Duration, Instant};

use redis::{Connection, Value};
use utmem_testkit::{pattern, Daemon, Redis};

const THRESHOLD: usize = 1024;

fn start() -> (Daemon, Redis) {
    let d = Daemon::start(&[]);
    let r = Redis::start(&["transport", &d.spec(), "threshold", "1024"], &[]);
    (d, r)
}

fn pool(r: &Redis) -> String {
    r.pool()
}

/// A reply as comparable text; `utmem.` and key prefixes are normalised away.
fn q(c: &mut Connection, args: &[&[u8]]) -> String {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("utf8"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let out = match cmd.query::<Value>(c) {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error {:?} {}", e.code(), e.detail().unwrap_or_default()),
    };
    out.replace("utmem.", "").replace("UTMEM.", "")
}

fn raw(c: &mut Connection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn set_family_replies_like_plain_redis() {
    let (_d, r) = start();
    let mut c = r.conn();
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
        + 1000)
        .to_string();
    for (n, len) in [10usize, THRESHOLD - 1, THRESHOLD, 70_000]
        .into_iter()
        .enumerate()
    {
        let v1 = pattern(n as u64, len);
        let v2 = pattern(100 + n as u64, len + 3);
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![b"GET", b"K"],
            vec![b"SET", b"K", &v1, b"XX"],
            vec![b"SET", b"K", &v1, b"NX"],
            vec![b"SET", b"K", &v2, b"NX"],
            vec![b"GET", b"K"],
            vec![b"SET", b"K", &v2, b"XX", b"GET"],
            vec![b"GET", b"K"],
            vec![b"SET", b"K", &v1, b"NX", b"GET"],
            vec![b"SET", b"K", &v1, b"GET"],
            vec![b"SET", b"K", &v1, b"EX", b"100"],
            vec![b"TTL", b"K"],
            vec![b"SET", b"K", &v2, b"KEEPTTL"],
            vec![b"TTL", b"K"],
            vec![b"SET", b"K", &v2],
            vec![b"TTL", b"K"],
            vec![b"SET", b"K", &v1, b"EXAT", future.as_bytes()],
            vec![b"TTL", b"K"],
            vec![b"SET", b"K", &v1, b"PX", b"100000"],
            vec![b"SET", b"K", &v1, b"EX", b"0"],
            vec![b"SET", b"K", &v1, b"EX", b"abc"],
            vec![b"SET", b"K", &v1, b"NX", b"XX"],
            vec![b"SET", b"K", &v1, b"EX", b"10", b"PX", b"10"],
            vec![b"SET", b"K", &v1, b"BOGUS"],
            vec![b"SET", b"K"],
            vec![b"GET"],
            vec![b"GET", b"K", b"extra"],
            vec![b"STRLEN", b"K"],
            vec![b"STRLEN", b"nothing"],
            vec![b"MSET", b"K", &v2, b"K2", &v1],
            vec![b"MGET", b"K", b"K2", b"nothing"],
            vec![b"MSET", b"K", &v2, b"K2"],
            vec![b"GETDEL", b"K2"],
            vec![b"GETDEL", b"K2"],
            vec![b"EXISTS", b"K2"],
            vec![b"RPUSH", b"L", b"x"],
            vec![b"GET", b"L"],
            vec![b"SET", b"L", &v1, b"GET"],
            vec![b"STRLEN", b"L"],
            vec![b"GETDEL", b"L"],
            vec![b"MGET", b"L", b"K"],
        ];
        for case in &cases {
            let name = std::str::from_utf8(case[0]).expect("utf8");
            let is_data = !matches!(name, "TTL" | "EXISTS" | "RPUSH");
            let rename = |prefix: &str| -> Vec<Vec<u8>> {
                case.iter()
                    .enumerate()
                    .map(|(i, a)| match (i, *a) {
                        (0, a) if is_data => [prefix.as_bytes(), a].concat(),
                        (_, b"K") => format!("{prefix}K{n}").into_bytes(),
                        (_, b"K2") => format!("{prefix}K2{n}").into_bytes(),
                        (_, b"L") => format!("{prefix}L{n}").into_bytes(),
                        (_, a) => a.to_vec(),
                    })
                    .collect()
            };
            let plain = rename("");
            let ours = rename("UTMEM.");
            let plain_r = q(&mut c, &plain.iter().map(Vec::as_slice).collect::<Vec<_>>());
            let ours_r = q(&mut c, &ours.iter().map(Vec::as_slice).collect::<Vec<_>>());
            let plain_r = plain_r
                .replace(&format!("K{n}"), "K")
                .replace(&format!("L{n}"), "L");
            let ours_r = ours_r
                .replace(&format!("UTMEM.K{n}"), "K")
                .replace(&format!("K{n}"), "K")
                .replace(&format!("L{n}"), "L");
            assert_eq!(
                ours_r,
                plain_r,
                "{} with a {len}-byte value",
                String::from_utf8_lossy(&case[0..case.len().min(2)].concat())
            );
        }
    }
}

#[test]
fn values_round_trip_and_types() {
    let (d, r) = start();
    let mut c = r.conn();
    let big = pattern(1, 100_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("big")
        .arg(&big)
        .query(&mut c)
        .expect("set");
    let _: () = redis::cmd("UTMEM.SET")
        .arg("small")
        .arg("x")
        .query(&mut c)
        .expect("set");
    let got: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("big")
        .query(&mut c)
        .expect("get");
    assert_eq!(got, big);
    assert_eq!(
        raw(&mut c, &["TYPE", "big"]),
        Value::SimpleString("utmem-val".into())
    );
    assert_eq!(
        raw(&mut c, &["TYPE", "small"]),
        Value::SimpleString("string".into())
    );
    // Plain GET of an offloaded key is WRONGTYPE, like any other non-string type.
    assert!(redis::cmd("GET").arg("big").query::<Value>(&mut c).is_err());
    assert_eq!(d.wait_pool_values(&pool(&r), 1), (1, 100_000));
    r.wait_offloaded();
    assert_eq!(r.info("utmem", "utmem_offloaded_values"), "1");
    assert_eq!(r.info("utmem", "utmem_offloaded_bytes"), "100000");
    let usage: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg("big")
        .query(&mut c)
        .expect("usage");
    assert!(usage > 0 && usage < 1000, "MEMORY USAGE {usage}");
    // OFFLOAD / RECALL.
    let plain = pattern(2, 50_000);
    let _: () = redis::cmd("SET")
        .arg("p")
        .arg(&plain)
        .arg("EX")
        .arg("1000")
        .query(&mut c)
        .expect("set");
    assert_eq!(raw(&mut c, &["UTMEM.OFFLOAD", "p"]), Value::Int(1));
    assert_eq!(
        raw(&mut c, &["TYPE", "p"]),
        Value::SimpleString("utmem-val".into())
    );
    let ttl: i64 = redis::cmd("TTL").arg("p").query(&mut c).expect("ttl");
    assert!(ttl > 990, "OFFLOAD kept the TTL: {ttl}");
    assert_eq!(d.wait_pool_values(&pool(&r), 2).0, 2);
    assert_eq!(raw(&mut c, &["UTMEM.RECALL", "p"]), Value::Int(1));
    assert_eq!(
        raw(&mut c, &["TYPE", "p"]),
        Value::SimpleString("string".into())
    );
    let back: Vec<u8> = redis::cmd("GET").arg("p").query(&mut c).expect("get");
    assert_eq!(back, plain);
    let ttl: i64 = redis::cmd("TTL").arg("p").query(&mut c).expect("ttl");
    assert!(ttl > 990, "RECALL kept the TTL: {ttl}");
    assert_eq!(d.wait_pool_values(&pool(&r), 1).0, 1);
    // RECALLALL brings everything back as plain strings.
    for i in 0..50 {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("many{i}"))
            .arg(pattern(i, 5000))
            .query(&mut c)
            .expect("set");
    }
    assert_eq!(raw(&mut c, &["UTMEM.RECALLALL"]), Value::Okay);
    let t0 = Instant::now();
    while r.info("utmem", "utmem_recall_running") != "0" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "RECALLALL never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..50 {
        let v: Vec<u8> = redis::cmd("GET")
            .arg(format!("many{i}"))
            .query(&mut c)
            .expect("get");
        assert_eq!(v, pattern(i, 5000));
    }
    let big_back: Vec<u8> = redis::cmd("GET").arg("big").query(&mut c).expect("get");
    assert_eq!(big_back, big);
    assert_eq!(d.wait_pool_values(&pool(&r), 0), (0, 0));
}

#[test]
fn keyspace_commands_leave_no_bytes_on_the_host() {
    let (d, r) = start();
    let mut c = r.conn();
    let set = |c: &mut Connection, k: &str, seed: u64| {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(k)
            .arg(pattern(seed, 20_000))
            .query(c)
            .expect("set");
    };
    let get = |c: &mut Connection, k: &str| -> Option<Vec<u8>> {
        redis::cmd("UTMEM.GET").arg(k).query(c).expect("get")
    };
    for (i, k) in [
        "del", "unlink", "exp", "ren", "mov", "cp", "swap", "over", "all",
    ]
    .iter()
    .enumerate()
    {
        set(&mut c, k, i as u64);
    }
    assert_eq!(d.wait_pool_values(&pool(&r), 9).0, 9);
    assert_eq!(raw(&mut c, &["EXISTS", "del"]), Value::Int(1));
    assert_eq!(raw(&mut c, &["DEL", "del"]), Value::Int(1));
    assert_eq!(raw(&mut c, &["UNLINK", "unlink"]), Value::Int(1));
    assert_eq!(raw(&mut c, &["PEXPIRE", "exp", "50"]), Value::Int(1));
    assert_eq!(raw(&mut c, &["RENAME", "ren", "ren2"]), Value::Okay);
    assert_eq!(get(&mut c, "ren2"), Some(pattern(3, 20_000)));
    assert_eq!(raw(&mut c, &["MOVE", "mov", "1"]), Value::Int(1));
    assert_eq!(raw(&mut c, &["COPY", "cp", "cp2"]), Value::Int(1));
    assert_eq!(get(&mut c, "cp2"), Some(pattern(5, 20_000)));
    assert_eq!(raw(&mut c, &["DEL", "cp"]), Value::Int(1));
    assert_eq!(
        get(&mut c, "cp2"),
        Some(pattern(5, 20_000)),
        "the copy outlives its source"
    );
    assert_eq!(raw(&mut c, &["SWAPDB", "0", "1"]), Value::Okay);
    assert_eq!(get(&mut c, "mov"), Some(pattern(4, 20_000)));
    assert_eq!(raw(&mut c, &["SWAPDB", "0", "1"]), Value::Okay);
    set(&mut c, "over", 99);
    assert_eq!(get(&mut c, "over"), Some(pattern(99, 20_000)));
    let Value::Array(scan) = raw(&mut c, &["SCAN", "0", "TYPE", "utmem-val", "COUNT", "1000"])
    else {
        panic!("scan")
    };
    assert!(format!("{scan:?}").contains("cp2"));
    let enc = raw(&mut c, &["OBJECT", "ENCODING", "cp2"]);
    assert!(
        matches!(enc, Value::BulkString(_) | Value::SimpleString(_)),
        "{enc:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(get(&mut c, "exp"), None, "expired");
    // del, unlink, exp, cp are gone; ren2, mov (db1), cp2, swap, over, all remain.
    assert_eq!(d.wait_pool_values(&pool(&r), 6).0, 6);
    assert_eq!(raw(&mut c, &["FLUSHALL"]), Value::Okay);
    assert_eq!(d.wait_pool_values(&pool(&r), 0), (0, 0));
    set(&mut c, "async", 1);
    assert_eq!(raw(&mut c, &["FLUSHALL", "ASYNC"]), Value::Okay);
    assert_eq!(d.wait_pool_values(&pool(&r), 0), (0, 0));
    assert_eq!(r.info("utmem", "utmem_offloaded_values"), "0");
    assert_eq!(r.info("utmem", "utmem_offloaded_bytes"), "0");
}

#[test]
fn options_configs_and_bad_options() {
    let (d, r) = start();
    let mut c = r.conn();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("utmem.threshold")
        .query(&mut c)
        .expect("get");
    assert_eq!(v, ["utmem.threshold", "1024"]);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("utmem.threshold")
        .arg("10")
        .query(&mut c)
        .expect("set");
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg("0123456789ab")
        .query(&mut c)
        .expect("set");
    assert_eq!(
        raw(&mut c, &["TYPE", "k"]),
        Value::SimpleString("utmem-val".into())
    );
    assert!(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("utmem.transport")
            .arg("unix:/x")
            .query::<Value>(&mut c)
            .is_err(),
        "transport is immutable"
    );
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("utmem.pool")
        .query(&mut c)
        .expect("get");
    assert_eq!(v[1], pool(&r));
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("utmem.on-host-down")
        .query(&mut c)
        .expect("get");
    assert_eq!(v[1], "local");
    // MODULE LOAD with the same arguments into a server started without the module.
    let bare = Redis::start(&["--no-module"], &[]);
    let mut b = bare.conn();
    let m = utmem_testkit::module_path().display().to_string();
    let _: () = redis::cmd("MODULE")
        .arg("LOAD")
        .arg(&m)
        .arg("transport")
        .arg(d.spec())
        .arg("threshold")
        .arg("4096")
        .query(&mut b)
        .expect("MODULE LOAD");
    let _: () = redis::cmd("UTMEM.SET")
        .arg("x")
        .arg(pattern(1, 5000))
        .query(&mut b)
        .expect("set");
    assert_eq!(
        raw(&mut b, &["TYPE", "x"]),
        Value::SimpleString("utmem-val".into())
    );
    // Bad options: the server refuses to start and says which option and why.
    for (args, says) in [
        (vec!["threshold", "lots"], "option threshold"),
        (vec!["transport", "tcp:1.2.3.4:5"], "option transport"),
        (vec!["on-host-down", "panic"], "option on-host-down"),
        (vec!["frobnicate", "1"], "unknown option"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("r.log");
        let status = std::process::Command::new(utmem_testkit::server_binary())
            .args([
                "--port",
                &utmem_testkit::free_port().to_string(),
                "--logfile",
            ])
            .arg(&log)
            .arg("--loadmodule")
            .arg(&m)
            .args(&args)
            .status()
            .expect("run");
        assert!(!status.success(), "{args:?} should not load");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.contains(says), "{args:?}: log lacks {says:?}:\n{text}");
    }
}

#[test]
fn host_down_local_fallback_then_background_offload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("later.sock");
    let spec = format!("unix:{}", sock.display());
    let r = Redis::start(
        &[
            "transport",
            &spec,
            "threshold",
            "1024",
            "timeout-ms",
            "1000",
        ],
        &[],
    );
    let mut c = r.conn();
    let v = pattern(7, 30_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg(&v)
        .query(&mut c)
        .expect("SET succeeds locally");
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).expect("get");
    assert_eq!(got, v);
    assert_eq!(r.info("utmem", "utmem_inline_values"), "1");
    assert!(
        r.info("utmem", "utmem_host_down_fallbacks")
            .parse::<u64>()
            .expect("n")
            >= 1
    );
    // on-host-down error: refused while the host is down.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("utmem.on-host-down")
        .arg("error")
        .query(&mut c)
        .expect("cfg");
    let e = redis::cmd("UTMEM.SET")
        .arg("k2")
        .arg(&v)
        .query::<()>(&mut c)
        .expect_err("refused");
    assert!(e.to_string().contains("UTMEMDOWN"), "{e:?}");
    assert_eq!(
        raw(&mut c, &["EXISTS", "k2"]),
        Value::Int(0),
        "nothing changed"
    );
    // The host comes up: the kept value goes to it in the background.
    let d = Daemon::start(&[&format!("--listen=unix:{}", sock.display())]);
    let t0 = Instant::now();
    while r.info("utmem", "utmem_offloaded_values") != "1" {
        assert!(t0.elapsed() < Duration::from_secs(20), "never offloaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.info("utmem", "utmem_inline_values"), "0");
    assert_eq!(d.pool_usage(&pool(&r)), (1, 30_000));
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).expect("get");
    assert_eq!(got, v);
}

#[test]
fn no_space_keeps_values_in_redis() {
    let d = Daemon::start(&["--quota=100K"]);
    let r = Redis::start(&["transport", &d.spec(), "threshold", "1024"], &[]);
    let mut c = r.conn();
    for i in 0..5 {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{i}"))
            .arg(pattern(i, 40_000))
            .query(&mut c)
            .expect("never an error");
    }
    for i in 0..5 {
        let v: Vec<u8> = redis::cmd("UTMEM.GET")
            .arg(format!("k{i}"))
            .query(&mut c)
            .expect("get");
        assert_eq!(v, pattern(i, 40_000));
    }
    r.wait_offloaded();
    assert_eq!(r.info("utmem", "utmem_offloaded_values"), "2");
    assert_eq!(r.info("utmem", "utmem_inline_values"), "3");
    assert!(
        r.info("utmem", "utmem_no_space_fallbacks")
            .parse::<u64>()
            .expect("n")
            >= 3
    );
}

#[test]
fn multi_exec_and_lua_wait_synchronously() {
    let (d, r) = start();
    let mut c = r.conn();
    let big = pattern(9, 30_000);
    let (ok, got): (String, Vec<u8>) = redis::pipe()
        .atomic()
        .cmd("UTMEM.SET")
        .arg("m")
        .arg(&big)
        .cmd("UTMEM.GET")
        .arg("m")
        .query(&mut c)
        .expect("MULTI/EXEC");
    assert_eq!((ok.as_str(), &got), ("OK", &big));
    // Once it is on the host, reads inside MULTI and Lua fetch it synchronously.
    assert_eq!(d.wait_pool_values(&pool(&r), 1).0, 1);
    let (got, len): (Vec<u8>, i64) = redis::pipe()
        .atomic()
        .cmd("UTMEM.GET")
        .arg("m")
        .cmd("UTMEM.STRLEN")
        .arg("m")
        .query(&mut c)
        .expect("MULTI/EXEC");
    assert_eq!((got, len), (big.clone(), 30_000));
    let got: Vec<u8> = redis::cmd("EVAL")
        .arg("return redis.call('UTMEM.GET', KEYS[1])")
        .arg(1)
        .arg("m")
        .query(&mut c)
        .expect("EVAL");
    assert_eq!(got, big);
    let ok: String = redis::cmd("EVAL")
        .arg("return redis.call('UTMEM.SET', KEYS[1], ARGV[1])")
        .arg(1)
        .arg("lua")
        .arg(&big)
        .query(&mut c)
        .expect("EVAL SET");
    assert_eq!(ok, "OK");
    assert_eq!(d.wait_pool_values(&pool(&r), 2).0, 2);
}

#[test]
fn max_pending_bytes_caps_puts_in_flight_without_losing_any() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "max-pending-bytes",
            "100000",
        ],
        &[],
    );
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("utmem.max-pending-bytes")
        .query(&mut r.conn())
        .expect("get");
    assert_eq!(v[1], "100000");
    // 40 writers of 60 KB values: at most one or two PUTs fit under the cap at a time.
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let mut c = r.conn();
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let _: () = redis::cmd("UTMEM.SET")
                        .arg(format!("w{t}:{i}"))
                        .arg(pattern(t * 100 + i, 60_000))
                        .query(&mut c)
                        .expect("set");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    assert_eq!(d.wait_pool_values(&pool(&r), 40).0, 40);
    let mut c = r.conn();
    for t in 0..4u64 {
        for i in 0..10u64 {
            let v: Vec<u8> = redis::cmd("UTMEM.GET")
                .arg(format!("w{t}:{i}"))
                .query(&mut c)
                .expect("get");
            assert_eq!(v, pattern(t * 100 + i, 60_000));
        }
    }
    assert_eq!(r.info("utmem", "utmem_pending"), "0");
}

/// UTMEM.STATS mirrors INFO utmem, field for field, with the same `utmem_` names.
#[test]
fn stats_names_match_info() {
    let (_d, r) = start();
    let mut c = r.conn();
    let Value::Array(items) = raw(&mut c, &["UTMEM.STATS"]) else {
        panic!("UTMEM.STATS is not an array");
    };
    let names: Vec<String> = items
        .iter()
        .step_by(2)
        .map(|v| match v {
            Value::SimpleString(s) => s.clone(),
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            v => panic!("{v:?}"),
        })
        .collect();
    let info: String = redis::cmd("INFO").arg("utmem").query(&mut c).expect("info");
    let info_names: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for n in &names {
        assert!(
            info_names.contains(&n.as_str()),
            "{n} is not an INFO utmem field"
        );
    }
}
