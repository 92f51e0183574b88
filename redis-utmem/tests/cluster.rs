//! utmem scales out the way Redis does: values move between servers with DUMP/RESTORE
//! and MIGRATE (COPY, REPLACE), and a Redis Cluster reshards slots while clients run
//! UTMEM.SET/UTMEM.GET. Each server has its own utmem-hostd (one per host), and every
//! host ends with exactly the bytes of the keys its server owns.
//!
//! Real redis-server (or $UTMEM_REDIS_SERVER) and redis-cli, real utmem-hostd.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Connection, Value};
use utmem_testkit::{pattern, Daemon, Redis};

fn q<T: redis::FromRedisValue>(c: &mut Connection, args: &[&[u8]]) -> T {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("utf8"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c)
        .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(args[0])))
}

/// Bytes of the offloaded (utmem-val) keys a server holds now, by scanning it.
fn offloaded_bytes(c: &mut Connection) -> u64 {
    let mut total = 0;
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("TYPE")
            .arg("utmem-val")
            .arg("COUNT")
            .arg(1000)
            .query(c)
            .expect("scan");
        for k in keys {
            let n: u64 = q(c, &[b"UTMEM.STRLEN", k.as_bytes()]);
            total += n;
        }
        if next == "0" {
            return total;
        }
        cursor = next;
    }
}

/// Waits until the host holds exactly the bytes of the server's offloaded keys.
fn host_matches_server(d: &Daemon, r: &Redis, who: &str) {
    let pool = r.pool();
    let mut c = r.conn();
    let t0 = Instant::now();
    loop {
        let want = offloaded_bytes(&mut c);
        let have = d.pool_usage(&pool).1;
        if want == have {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{who}: host holds {have} bytes, the server's offloaded keys {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dump_restore_and_migrate_move_values_between_servers() {
    let (da, db) = (Daemon::start(&[]), Daemon::start(&[]));
    let a = Redis::start(&["transport", &da.spec(), "threshold", "1024"], &[]);
    // B keeps values below 8 KiB inline: what arrives is stored by B's own threshold.
    let b = Redis::start(&["transport", &db.spec(), "threshold", "8192"], &[]);
    let (mut ca, mut cb) = (a.conn(), b.conn());
    let sizes = [10usize, 2000, 5000, 70_000, 1 << 20];
    let keys: Vec<String> = (0..sizes.len()).map(|i| format!("k{i}")).collect();
    for (i, n) in sizes.iter().enumerate() {
        let _: () = q(
            &mut ca,
            &[b"UTMEM.SET", keys[i].as_bytes(), &pattern(i as u64, *n)],
        );
    }
    let _: i64 = q(&mut ca, &[b"EXPIRE", b"k3", b"1000"]);
    let check = |c: &mut Connection, who: &str| {
        for (i, n) in sizes.iter().enumerate() {
            let v: Vec<u8> = q(c, &[b"UTMEM.GET", keys[i].as_bytes()]);
            assert!(v == pattern(i as u64, *n), "{who}: {} differs", keys[i]);
        }
        let ttl: i64 = q(c, &[b"TTL", b"k3"]);
        assert!(ttl > 900, "{who}: TTL of k3 {ttl}");
    };
    // DUMP / RESTORE.
    for k in &keys {
        let dump: Vec<u8> = q(&mut ca, &[b"DUMP", k.as_bytes()]);
        let ttl: i64 = q(&mut ca, &[b"PTTL", k.as_bytes()]);
        let ttl = ttl.max(0).to_string();
        let _: () = q(&mut cb, &[b"RESTORE", k.as_bytes(), ttl.as_bytes(), &dump]);
    }
    check(&mut cb, "B after RESTORE");
    // B's own threshold decides: only the two values of 8 KiB and more reach its host.
    let on_b: u64 = sizes
        .iter()
        .filter(|n| **n >= 8192)
        .map(|n| *n as u64)
        .sum();
    assert_eq!(db.wait_pool_values(&b.pool(), 2), (2, on_b));
    // MIGRATE COPY REPLACE: both keep them.
    let port_b = b.port.to_string();
    let mut migrate: Vec<&[u8]> = vec![
        b"MIGRATE",
        b"127.0.0.1",
        port_b.as_bytes(),
        b"",
        b"0",
        b"10000",
        b"COPY",
        b"REPLACE",
        b"KEYS",
    ];
    migrate.extend(keys.iter().map(|k| k.as_bytes()));
    let _: () = q(&mut ca, &migrate);
    check(&mut ca, "A after MIGRATE COPY");
    check(&mut cb, "B after MIGRATE COPY");
    // MIGRATE REPLACE: they move.
    migrate.retain(|w| *w != b"COPY");
    let _: () = q(&mut ca, &migrate);
    check(&mut cb, "B after MIGRATE");
    let n: i64 = q(&mut ca, &[b"DBSIZE"]);
    assert_eq!(n, 0, "MIGRATE removes the keys from A");
    assert_eq!(
        da.wait_pool_values(&a.pool(), 0),
        (0, 0),
        "A's host after MIGRATE"
    );
    assert_eq!(
        db.wait_pool_values(&b.pool(), 2),
        (2, on_b),
        "B's host after MIGRATE"
    );
}

/// A minimal cluster client: follows MOVED (remembering where each key lives) and ASK.
struct ClusterClient {
    conns: HashMap<u16, Connection>,
    home: HashMap<Vec<u8>, u16>,
    any: u16,
}

impl ClusterClient {
    fn conn(&mut self, port: u16) -> &mut Connection {
        self.conns.entry(port).or_insert_with(|| {
            let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("url");
            let c = c
                .get_connection_with_timeout(Duration::from_secs(5))
                .expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            c
        })
    }

    fn call(&mut self, key: &[u8], args: &[&[u8]]) -> Value {
        let mut port = *self.home.get(key).unwrap_or(&self.any);
        let mut asking = false;
        for _ in 0..20 {
            let mut pipe = redis::pipe();
            if asking {
                pipe.cmd("ASKING").ignore();
            }
            let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("utf8"));
            for a in &args[1..] {
                cmd.arg(*a);
            }
            pipe.add_command(cmd);
            match pipe.query::<Vec<Value>>(self.conn(port)) {
                Ok(mut v) => return v.pop().unwrap_or(Value::Nil),
                Err(e) => {
                    let text = e.to_string();
                    let to = |s: &str| -> Option<u16> { s.rsplit(':').next()?.trim().parse().ok() };
                    let redirect = text.split_whitespace().last().and_then(to);
                    match (e.code(), redirect) {
                        (Some("MOVED"), Some(p)) => {
                            self.home.insert(key.to_vec(), p);
                            port = p;
                            asking = false;
                        }
                        (Some("ASK"), Some(p)) => {
                            port = p;
                            asking = true;
                        }
                        (Some("TRYAGAIN" | "CLUSTERDOWN"), _) => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        _ => panic!("{}: {text}", String::from_utf8_lossy(args[0])),
                    }
                }
            }
        }
        panic!("too many redirections for {}", String::from_utf8_lossy(key));
    }
}

#[test]
fn a_cluster_reshards_offloaded_values_under_load() {
    let hosts: Vec<Daemon> = (0..3).map(|_| Daemon::start(&[])).collect();
    let nodes: Vec<Redis> = hosts
        .iter()
        .map(|d| Redis::start_cluster_node(&["transport", &d.spec(), "threshold", "1024"], &[]))
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let t0 = Instant::now();
    for n in &nodes {
        while n.info("cluster", "cluster_enabled") != "1"
            || redis::cmd("CLUSTER")
                .arg("INFO")
                .query::<String>(&mut n.conn())
                .map_or(true, |s| !s.contains("cluster_state:ok"))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| q(&mut n.conn(), &[b"CLUSTER", b"MYID"]))
        .collect();
    // The load: UTMEM.SET of versioned values, each read back right after; every read
    // must return the last acknowledged version of its key.
    const KEYS: u64 = 300;
    let value = |k: u64, ver: u64| {
        let mut v = format!("k{k}v{ver}:").into_bytes();
        v.extend(pattern(k * 1000 + ver, 2000 + (k as usize * 37) % 6000));
        v
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(vec![0u64; KEYS as usize]));
    let load = {
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        let any = nodes[0].port;
        std::thread::spawn(move || {
            let mut c = ClusterClient {
                conns: HashMap::new(),
                home: HashMap::new(),
                any,
            };
            let mut ops = 0u64;
            let mut ver = 0u64;
            while !stop.load(Ordering::Relaxed) || ver < KEYS {
                ver += 1;
                let k = ver % KEYS;
                let key = format!("k{k}").into_bytes();
                let v = value(k, ver);
                let r = c.call(&key, &[b"UTMEM.SET", &key, &v]);
                assert_eq!(r, Value::Okay, "UTMEM.SET k{k}");
                acked.lock().expect("lock")[k as usize] = ver;
                let got = c.call(&key, &[b"UTMEM.GET", &key]);
                assert!(
                    got == Value::BulkString(v),
                    "k{k}: read after ack is not v{ver}"
                );
                ops += 2;
            }
            (c, ops)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Move slots around while the load runs: 0 → 1, then 2 → 0.
    for (from, to, slots) in [(0usize, 1usize, "3000"), (2, 0, "2000")] {
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(&addrs[0])
            .args(["--cluster-from", &ids[from], "--cluster-to", &ids[to]])
            .args(["--cluster-slots", slots, "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard {from} -> {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (mut c, ops) = load.join().expect("the load saw a wrong or lost value");
    // Every key reads its last acknowledged value.
    let acked = acked.lock().expect("lock").clone();
    for k in 0..KEYS {
        let key = format!("k{k}").into_bytes();
        let got = c.call(&key, &[b"UTMEM.GET", &key]);
        assert!(
            got == Value::BulkString(value(k, acked[k as usize])),
            "k{k} after the reshard"
        );
    }
    let total: i64 = nodes
        .iter()
        .map(|n| q::<i64>(&mut n.conn(), &[b"DBSIZE"]))
        .sum();
    assert_eq!(total, KEYS as i64, "every key lives on exactly one node");
    for (i, (d, n)) in hosts.iter().zip(&nodes).enumerate() {
        host_matches_server(d, n, &format!("node {i}"));
    }
    eprintln!("cluster: {ops} commands during two reshards");
}
