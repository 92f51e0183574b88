//! `utmem-hostd drop-identity` while that identity's Redis runs: the module's client
//! re-opens its pool, so new values are offloaded again without a host restart, and
//! the dropped ones answer UTMEMLOST, never old bytes.

use std::time::{Duration, Instant};

use utmem_testkit::{pattern, Daemon, Redis};

fn offloads_again_after_drop_identity(d: &Daemon, spec: &str, identity: &str) {
    let r = Redis::start(&["transport", spec, "threshold", "1024"], &[]);
    let pool = r.pool();
    let mut c = r.conn();
    let old = pattern(1, 50_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("old")
        .arg(&old)
        .query(&mut c)
        .expect("set");
    assert_eq!(d.wait_pool_values(&pool, 1).0, 1, "{identity}: offloaded");
    let (ok, out, err) = d.admin_cmd(&["drop-identity", identity]);
    assert!(ok, "{identity}: drop-identity: {out} {err}");
    assert_eq!(d.pool_usage(&pool).0, 0);
    // New values reach the host again (the first may be kept in Redis for a moment,
    // and is offered again in the background).
    let new = pattern(2, 50_000);
    let _: () = redis::cmd("UTMEM.SET")
        .arg("new")
        .arg(&new)
        .query(&mut c)
        .expect("set");
    let _: () = redis::cmd("UTMEM.SET")
        .arg("new2")
        .arg(&new)
        .query(&mut c)
        .expect("set");
    let t0 = Instant::now();
    while d.pool_usage(&pool).0 != 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{identity}: never offloaded again; host_down_fallbacks {}",
            r.info("utmem", "utmem_host_down_fallbacks")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.info("utmem", "utmem_connected"), "1");
    let got: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("new")
        .query(&mut c)
        .expect("get");
    assert!(got == new, "{identity}: new value");
    let e = redis::cmd("UTMEM.GET")
        .arg("old")
        .query::<Vec<u8>>(&mut c)
        .expect_err("the dropped value is gone");
    assert!(e.to_string().contains("UTMEMLOST"), "{identity}: {e}");
}

#[test]
fn drop_identity_under_a_running_redis_on_uid_and_named_listeners() {
    let d = Daemon::start(&[]);
    let uid = format!("uid:{}", nix::unistd::getuid());
    offloads_again_after_drop_identity(&d, &d.spec(), &uid);
    drop(d);

    let dir = tempfile::tempdir().expect("tempdir");
    let vm = dir.path().join("vm.sock");
    let d = Daemon::start_in(dir, &[&format!("--listen=unix:{}=vm-a", vm.display())]);
    offloads_again_after_drop_identity(&d, &format!("unix:{}", vm.display()), "vm-a");
}
