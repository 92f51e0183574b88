//! UTMEM.GET of values in the host's arena, which Redis maps read-only over a local
//! Unix socket: served without a round trip, always the current bytes, and never
//! stale data once the host dropped them.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use utmem_testkit::{pattern, Daemon, Redis};

fn counter(r: &Redis, name: &str) -> u64 {
    r.info("utmem", name).parse().expect(name)
}

#[test]
fn mapped_reads_serve_current_values_and_never_dropped_ones() {
    let d = Daemon::start(&[]);
    let r = Redis::start(&["transport", &d.spec(), "threshold", "1024"], &[]);
    let mut c = r.conn();
    let sizes = [1024usize, 4096, 5000, 16 << 10, 65536, 300_000, 1 << 20];
    for (i, len) in sizes.iter().enumerate() {
        let _: () = redis::cmd("UTMEM.SET")
            .arg(format!("k{i}"))
            .arg(pattern(i as u64, *len))
            .query(&mut c)
            .expect("set");
    }
    for round in 0..3u64 {
        for (i, len) in sizes.iter().enumerate() {
            let v: Vec<u8> = redis::cmd("UTMEM.GET")
                .arg(format!("k{i}"))
                .query(&mut c)
                .expect("get");
            assert!(
                v == pattern(i as u64 + round * 100, *len),
                "k{i} round {round}"
            );
            // Overwrite: the next read must see the new bytes, never these.
            let _: () = redis::cmd("UTMEM.SET")
                .arg(format!("k{i}"))
                .arg(pattern(i as u64 + (round + 1) * 100, *len))
                .query(&mut c)
                .expect("overwrite");
        }
    }
    let mget: Vec<Vec<u8>> = redis::cmd("UTMEM.MGET")
        .arg("k0")
        .arg("k3")
        .query(&mut c)
        .expect("mget");
    assert!(mget[0] == pattern(300, 1024) && mget[1] == pattern(303, 16 << 10));
    let reads = counter(&r, "utmem_mapped_reads");
    assert!(reads >= 3 * sizes.len() as u64, "mapped reads: {reads}");
    assert_eq!(counter(&r, "utmem_mapped_fallbacks"), 0);

    // With mapped reads off, the same values come over the socket.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("utmem.mapped-read-max")
        .arg("0")
        .query(&mut c)
        .expect("config");
    let v: Vec<u8> = redis::cmd("UTMEM.GET")
        .arg("k2")
        .query(&mut c)
        .expect("get");
    assert!(v == pattern(302, 5000));
    assert_eq!(counter(&r, "utmem_mapped_reads"), reads);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("utmem.mapped-read-max")
        .arg("1048576")
        .query(&mut c)
        .expect("config");

    // The operator drops this identity: the host frees the values under Redis's
    // mapping. Reads must say the value is lost, never return the old bytes.
    let ident = format!("uid:{}", nix::unistd::getuid());
    let (ok, out, err) = d.admin_cmd(&["drop-identity", &ident]);
    assert!(ok, "drop-identity: {out} {err}");
    for i in 0..sizes.len() {
        let res: redis::RedisResult<Vec<u8>> =
            redis::cmd("UTMEM.GET").arg(format!("k{i}")).query(&mut c);
        let e = match res {
            Ok(v) => panic!("k{i}: {} bytes returned after the host dropped it", v.len()),
            Err(e) => e,
        };
        assert!(
            e.to_string().contains("UTMEMLOST") || e.to_string().contains("UTMEMDOWN"),
            "{e}"
        );
    }
    assert!(counter(&r, "utmem_mapped_fallbacks") >= sizes.len() as u64);
}
