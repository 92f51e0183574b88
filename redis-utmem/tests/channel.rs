//! The module over a shared-memory channel (the default on a local Unix transport):
//! UTMEM.SET answers once its PUT is in the ring, the value is served from Redis's own
//! copy until the host completes it, and a host that stops or dies loses nothing.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use utmem_testkit::{pattern, Daemon, Redis};

fn info_num(r: &Redis, field: &str) -> i64 {
    r.info("utmem", field).parse().unwrap_or(-1)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(30), "never: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn set_answers_from_the_ring_and_a_stopped_then_killed_host_loses_nothing() {
    let mut d = Daemon::start(&[]);
    let r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "channel",
            "yes",
        ],
        &[],
    );
    let mut c = r.conn();
    let before = pattern(1, 20_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("before")
        .arg(&before)
        .query(&mut c)
        .unwrap();
    r.wait_offloaded();
    assert_eq!(r.info("utmem", "utmem_path"), "channel");
    assert_eq!(info_num(&r, "utmem_offloaded_values"), 1);
    assert!(info_num(&r, "utmem_channel_requests") >= 1);
    // The host stops right after it: the SET is still answered (its PUT is in the
    // ring), and the value is served from Redis's own copy.
    d.signal(Signal::SIGSTOP);
    let v = pattern(2, 30_000);
    let t0 = Instant::now();
    let ok: String = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg(&v)
        .query(&mut c)
        .unwrap();
    assert_eq!(ok, "OK");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the SET waited for a stopped host: {:?}",
        t0.elapsed()
    );
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got, v, "served from Redis's copy while the host is stopped");
    assert_eq!(info_num(&r, "utmem_pending"), 1);
    // Killed while still stopped (it never completes the PUT): the channel dies with its
    // connection and the value stays in Redis.
    d.kill();
    wait_for("the value kept in Redis", || {
        info_num(&r, "utmem_pending") == 0 && info_num(&r, "utmem_inline_values") == 1
    });
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got, v, "readable after the host died");
    // The host comes back: the value kept in Redis is offered again and offloaded.
    d.restart();
    wait_for("the value offloaded again", || {
        info_num(&r, "utmem_inline_values") == 0 && info_num(&r, "utmem_pending") == 0
    });
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got, v);
    // The value from before the restart is gone with the host's memory, and says so.
    let e = redis::cmd("UTMEM.GET")
        .arg("before")
        .query::<Vec<u8>>(&mut c)
        .expect_err("lost with the host");
    assert!(e.to_string().contains("UTMEMLOST"), "{e}");
    // A new host connection brings a new channel.
    let _: () = redis::cmd("UTMEM.SET")
        .arg("after")
        .arg(&before)
        .query(&mut c)
        .unwrap();
    r.wait_offloaded();
    assert_eq!(r.info("utmem", "utmem_path"), "channel");
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("after").query(&mut c).unwrap();
    assert_eq!(got, before);
}

#[test]
fn channel_no_uses_the_socket() {
    let d = Daemon::start(&[]);
    let r = Redis::start(
        &["transport", &d.spec(), "threshold", "1024", "channel", "no"],
        &[],
    );
    let mut c = r.conn();
    let v = pattern(3, 10_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg(&v)
        .query(&mut c)
        .unwrap();
    assert_eq!(info_num(&r, "utmem_offloaded_values"), 1, "write-through");
    assert_eq!(r.info("utmem", "utmem_path"), "socket");
    assert_eq!(info_num(&r, "utmem_channel_requests"), 0);
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got, v);
}

#[test]
fn a_daemon_without_channels_is_served_over_the_socket() {
    let d = Daemon::start(&["--channel-threads=0"]);
    let r = Redis::start(&["transport", &d.spec(), "threshold", "1024"], &[]);
    let mut c = r.conn();
    let v = pattern(4, 10_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("k")
        .arg(&v)
        .query(&mut c)
        .unwrap();
    assert_eq!(info_num(&r, "utmem_offloaded_values"), 1);
    assert_eq!(r.info("utmem", "utmem_path"), "socket");
    let got: Vec<u8> = redis::cmd("UTMEM.GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got, v);
}

/// Redis SIGKILLed in the middle of a stream of UTMEM.SETs: the host ends the channel
/// with the connection, drains or drops its work, and dropping the identity frees
/// every byte.
#[test]
fn redis_killed_mid_stream_leaves_nothing_behind() {
    let d = Daemon::start(&[]);
    let mut r = Redis::start(
        &[
            "transport",
            &d.spec(),
            "threshold",
            "1024",
            "channel",
            "yes",
        ],
        &[],
    );
    let pool = r.pool();
    let port = r.port;
    let writer = thread::spawn(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let Ok(mut c) = client.get_connection() else {
            return 0;
        };
        let v = pattern(5, 40_000);
        let mut n = 0u64;
        loop {
            let mut p = redis::pipe();
            for i in 0..50 {
                p.cmd("UTMEM.SET")
                    .arg(format!("k{}", (n + i) % 500))
                    .arg(&v);
            }
            if p.query::<()>(&mut c).is_err() {
                return n;
            }
            n += 50;
        }
    });
    wait_for("values on the host", || d.pool_usage(&pool).0 >= 100);
    r.child.kill().unwrap();
    let _ = r.child.wait();
    let sent = writer.join().unwrap();
    assert!(sent >= 100, "{sent} SETs before the kill");
    let uid = nix::unistd::getuid();
    let (ok, out, err) = d.admin_cmd(&["drop-identity", &format!("uid:{uid}")]);
    assert!(ok, "drop-identity: {out} {err}");
    assert_eq!(d.host_used(), 0, "every byte freed");
    let mut d = d;
    assert!(d.alive());
}
