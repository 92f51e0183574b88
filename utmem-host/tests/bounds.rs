//! The host bounds every guest: the real utmem-hostd over real Unix sockets, fed
//! what a hostile or broken guest sends (the scenarios found by fuzzing it).

#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use utmem_proto::{
    encode_request, Key, Limits, MapReply, Op, PoolKind, PoolUuid, ReplyHeader, RequestHeader,
    RequestId, Status, REPLY_HEADER_LEN,
};
use utmem_testkit::{closed_by_peer, read_reply, Conn, Daemon};

const MIB: u64 = 1 << 20;

/// Polls `f` every 50 ms until it is true; false after `secs` seconds.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn snapshot(d: &Daemon) -> utmem_host::HostSnapshot {
    let (ok, out, err) = d.admin_cmd(&["stats", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("json")
}

/// The daemon's CPU time (user + system) so far.
fn cpu_time(d: &Daemon) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect(")")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn threads(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .expect("task")
        .count()
}

fn put_header(pool: utmem_proto::PoolId, key: Key, len: u64) -> [u8; 40] {
    let mut h = Conn::keyed(Op::Put, pool, key);
    h.len = len;
    h.id = RequestId(7);
    h.encode()
}

/// Sends MAP on `s` and returns the arena and reader-word descriptors.
fn map(s: &UnixStream) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd, u64) {
    (&*s)
        .write_all(&RequestHeader::new(Op::Map, RequestId(99)).encode())
        .expect("MAP");
    let mut buf = [0u8; REPLY_HEADER_LEN + MapReply::LEN];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < buf.len() {
        let (n, f) = utmem_sys::recv_with_fds(s.as_fd(), &mut buf[got..]).expect("recv");
        assert!(n > 0, "closed during MAP");
        got += n;
        fds.extend(f);
    }
    let mut hb = [0u8; REPLY_HEADER_LEN];
    hb.copy_from_slice(&buf[..REPLY_HEADER_LEN]);
    let h = ReplyHeader::decode(&hb, &Limits::default()).expect("header");
    assert_eq!(h.status, Status::Ok);
    let len = MapReply::decode(&buf[REPLY_HEADER_LEN..]).expect("map").len;
    let [arena, word] = <[std::os::fd::OwnedFd; 2]>::try_from(fds).expect("two descriptors");
    (arena, word, len)
}

#[test]
fn millions_of_empty_values_hit_no_space() {
    let d = Daemon::start(&["--capacity=1G", "--quota=64M"]);
    let mut c = Conn::connect(&d.sock);
    c.hello();
    let pool = c.open_private("empty");
    let n: u64 = 2_000_000;
    let mut reader = c.s.try_clone().expect("clone");
    let counter = std::thread::spawn(move || {
        let mut buf = BytesMut::new();
        let (mut ok, mut no_space) = (0u64, 0u64);
        for _ in 0..n {
            match read_reply(&mut reader, &mut buf)
                .expect("reply")
                .header
                .status
            {
                Status::Ok => ok += 1,
                Status::NoSpace => no_space += 1,
                s => panic!("unexpected {s}"),
            }
        }
        (ok, no_space)
    });
    let mut out = BytesMut::with_capacity(4 << 20);
    for i in 0..n {
        let mut h = Conn::keyed(Op::Put, pool, Key::new(i, 0));
        h.id = RequestId(i);
        encode_request(&h, &[], &mut out);
        if out.len() >= 4 << 20 || i + 1 == n {
            c.s.write_all(&out).expect("write");
            out.clear();
        }
    }
    let (ok, no_space) = counter.join().expect("counter");
    let fit = 64 * MIB / utmem_host::VALUE_OVERHEAD;
    assert_eq!(
        (ok, no_space),
        (fit, n - fit),
        "the quota bounds empty values"
    );
    let s = c.stats();
    assert_eq!((s.values, s.bytes), (fit, 0));
    let rss = d.rss_bytes();
    assert!(
        rss < 64 * MIB + 64 * MIB,
        "RSS {rss} over the quota + 64 MiB"
    );
}

#[test]
fn two_thousand_connections_take_a_few_threads() {
    // The test and the daemon (which inherits it) need a descriptor each per connection.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_max < 4500 {
        lim.rlim_max = 4500; // as root, the hard limit may be raised too
    }
    lim.rlim_cur = lim.rlim_cur.max(4500);
    // SAFETY: setrlimit reads the struct we pass.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(
        r,
        0,
        "cannot raise RLIMIT_NOFILE: {}",
        std::io::Error::last_os_error()
    );
    let d = Daemon::start(&["--max-connections=2100"]);
    let mut conns: Vec<Conn> = (0..2000).map(|_| Conn::connect(&d.sock)).collect();
    for c in conns.iter_mut() {
        c.hello();
    }
    let n = threads(&d);
    eprintln!(
        "2000 connections: {n} daemon threads, RSS {} KiB",
        d.rss_bytes() >> 10
    );
    assert!(n <= 16, "{n} threads for 2000 connections");
    let p = conns[1999].open_private("last");
    assert_eq!(conns[1999].put(p, Key::new(1, 0), b"v"), Status::Ok);
    assert_eq!(conns[0].stats().values, 1);
}

#[test]
fn stalled_put_headers_are_refused_before_their_payload() {
    let d = Daemon::start(&["--capacity=512M", "--read-timeout=5s"]);
    let mut conns = Vec::new();
    for _ in 0..100 {
        let mut c = Conn::connect(&d.sock);
        c.hello();
        let p = c.open_private("big");
        conns.push((c, p));
    }
    // Every connection announces 500 MiB; only one fits in 512 MiB.
    for (c, p) in conns.iter_mut() {
        c.s.write_all(&put_header(*p, Key::new(1, 0), 500 * MIB))
            .expect("header");
    }
    // Replies come without any payload sent: NO_SPACE for all but one.
    let mut answered = vec![false; conns.len()];
    let mut bufs: Vec<BytesMut> = conns.iter().map(|_| BytesMut::new()).collect();
    for (c, _) in conns.iter_mut() {
        c.s.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
    }
    let t0 = Instant::now();
    while answered.iter().filter(|a| !**a).count() > 1 && t0.elapsed() < Duration::from_secs(30) {
        for (i, (c, _)) in conns.iter_mut().enumerate() {
            if answered[i] {
                continue;
            }
            if let Ok(r) = read_reply(&mut c.s, &mut bufs[i]) {
                assert_eq!(r.header.status, Status::NoSpace, "connection {i}");
                answered[i] = true;
            }
        }
    }
    let waiting: Vec<usize> = (0..conns.len()).filter(|i| !answered[*i]).collect();
    assert_eq!(
        waiting.len(),
        1,
        "one PUT reserved, the others refused at the header"
    );
    // 8 MiB of payload each: the refused ones are read and dropped, never held.
    let chunk = vec![0x5au8; 8 << 20];
    for (c, _) in conns.iter_mut() {
        c.s.write_all(&chunk).expect("payload");
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss = d.rss_bytes();
    eprintln!(
        "100 stalled 500 MiB PUTs, 8 MiB sent each: RSS {} MiB",
        rss >> 20
    );
    assert!(rss < 512 * MIB + 64 * MIB, "RSS {rss}");
    assert!(rss < 64 * MIB, "RSS {rss}: refused payloads were held");
    // The one that stalls mid-payload is dropped after the read timeout, and its
    // reservation given back.
    assert!(snapshot(&d).charged >= 500 * MIB);
    assert!(
        eventually(20, || snapshot(&d).charged == 0),
        "reservation never released"
    );
    assert!(d.log_text().contains("read timeout"), "{}", d.log_text());
}

#[test]
fn replies_nobody_reads_are_dropped_after_the_write_timeout() {
    let d = Daemon::start(&["--capacity=1G", "--write-timeout=2s"]);
    let mut w = Conn::connect(&d.sock);
    let pool = w.open_private("p");
    let value = vec![7u8; 48 << 20];
    assert_eq!(w.put(pool, Key::new(1, 0), &value), Status::Ok);
    drop(value);
    let base = d.rss_bytes();
    let mut readers = Vec::new();
    for _ in 0..8 {
        let c = Conn::connect(&d.sock);
        let mut out = BytesMut::new();
        for id in 0..4 {
            let mut h = Conn::keyed(Op::Get, pool, Key::new(1, 0));
            h.id = RequestId(id);
            encode_request(&h, &[], &mut out);
        }
        (&c.s).write_all(&out).expect("GETs");
        readers.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The value is replaced and flushed; only the unread replies still hold it.
    assert_eq!(w.flush(pool, Key::new(1, 0)), Status::Ok);
    assert_eq!(snapshot(&d).used, 0);
    let freed = eventually(30, || d.rss_bytes() + 40 * MIB < base);
    assert!(freed, "RSS {} stayed near {base}", d.rss_bytes());
    for mut c in readers {
        c.s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut sink = Vec::new();
        let _ = c.s.read_to_end(&mut sink);
    }
    assert!(d.log_text().contains("write timeout"), "{}", d.log_text());
}

#[test]
fn accept_backs_off_when_out_of_descriptors() {
    let mut d = Daemon::start(&[]);
    let lim = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: prlimit on the daemon we started, with a valid rlimit and no old value.
    let r = unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let idle: Vec<UnixStream> = (0..80)
        .map(|_| UnixStream::connect(&d.sock).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, log0) = (cpu_time(&d), d.log_text().len());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, log) = (cpu_time(&d) - cpu0, d.log_text().len() - log0);
    eprintln!("out of descriptors for 3 s: {cpu:?} CPU, {log} bytes of log");
    assert!(
        cpu < Duration::from_millis(1500),
        "accept spins: {cpu:?} CPU in 3 s"
    );
    assert!(log < 16 << 10, "{log} bytes of log in 3 s");
    assert!(d.log_text().contains("backing off"), "{}", d.log_text());
    drop(idle);
    // Once descriptors are free again, new clients are served.
    let mut c = Conn::connect(&d.sock);
    c.hello();
    assert!(d.alive());
}

#[test]
fn the_arena_descriptor_clients_get_is_read_only() {
    let d = Daemon::start(&[]);
    let c = Conn::connect(&d.sock);
    let (arena, _word, len) = map(&c.s);
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(arena.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "flags {flags:#x}");
    let size = usize::try_from(len).expect("len");
    assert!(utmem_sys::Mmap::new(arena.as_fd(), size, true).is_err());
    assert!(utmem_sys::Mmap::new(arena.as_fd(), size, false).is_ok());
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; it must fail.
    assert!(unsafe { libc::fallocate(arena.as_raw_fd(), mode, 0, 4096) } < 0);
}

#[test]
fn replies_before_a_malformed_frame_are_sent_before_closing() {
    let d = Daemon::start(&[]);
    let mut s = UnixStream::connect(&d.sock).expect("connect");
    let mut out = BytesMut::new();
    for id in 1..=3 {
        encode_request(&RequestHeader::new(Op::Ping, RequestId(id)), &[], &mut out);
    }
    out.extend_from_slice(&[0xee; 40]);
    s.write_all(&out).expect("write");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = BytesMut::new();
    for id in 1..=3 {
        let r = read_reply(&mut s, &mut buf).expect("a reply before the close");
        assert_eq!((r.header.id, r.header.status), (RequestId(id), Status::Ok));
    }
    assert!(read_reply(&mut s, &mut buf).is_err(), "then closed");
}

#[test]
fn a_reader_word_stuck_odd_gets_its_connection_dropped() {
    let d = Daemon::start(&["--quota=4M"]);
    let mut stuck = Conn::connect(&d.sock);
    stuck.hello();
    let (_arena, word, _) = map(&stuck.s);
    let w = utmem_sys::Mmap::new(word.as_fd(), 4096, true).expect("map word");
    // SAFETY: the reader word's first u64, page-aligned, only used atomically.
    let word = unsafe { std::sync::atomic::AtomicU64::from_ptr(w.as_ptr().cast::<u64>()) };
    word.fetch_add(1, std::sync::atomic::Ordering::SeqCst); // inside a value, for ever
    let mut c = Conn::connect(&d.sock);
    let _mapped = map(&c.s);
    let p = c.open_private("p");
    let v = vec![1u8; 64 << 10];
    // The arena is 8 MiB; parked space is capped at 1 MiB.
    for i in 0..40 {
        let r = c.call(Conn::keyed(Op::Put, p, Key::new(i, 0)), &v);
        assert_eq!(r.header.status, Status::Ok);
        assert_eq!(r.payload.len(), 16, "placed in the arena");
        assert_eq!(c.flush(p, Key::new(i, 0)), Status::Ok);
    }
    assert!(
        closed_by_peer(&mut stuck.s),
        "the stuck reader's connection was dropped"
    );
    assert!(
        d.log_text().contains("reader word stayed odd"),
        "{}",
        d.log_text()
    );
    let r = c.call(Conn::keyed(Op::Put, p, Key::new(99, 0)), &v);
    assert_eq!((r.header.status, r.payload.len()), (Status::Ok, 16));
}

#[test]
fn shared_pools_survive_destroy_and_drop_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("hostd.toml");
    let uuid = "12345678-9abc-def0-0123-456789abcdef";
    std::fs::write(
        &cfg,
        format!("[[shared]]\nuuid = \"{uuid}\"\nquota = \"1M\"\ngrant = [\"vm-a\", \"vm-b\"]\n"),
    )
    .expect("config");
    let [a, b] = ["a", "b"].map(|n| dir.path().join(format!("{n}.sock")));
    let d = Daemon::start_in(
        dir,
        &[
            &format!("--config={}", cfg.display()),
            &format!("--listen=unix:{}=vm-a", a.display()),
            &format!("--listen=unix:{}=vm-b", b.display()),
        ],
    );
    let u = PoolUuid(*uuid::Uuid::parse_str(uuid).expect("uuid").as_bytes());
    let (mut ca, mut cb) = (Conn::connect(&a), Conn::connect(&b));
    let pa = ca.open(PoolKind::Shared(u), false).expect("a");
    let pb = cb.open(PoolKind::Shared(u), false).expect("b");
    assert_eq!(cb.put(pb, Key::new(1, 0), b"one"), Status::Ok);
    let destroy = Conn::keyed(Op::DestroyPool, pa, Key::default());
    assert_eq!(ca.call(destroy, &[]).header.status, Status::Ok);
    assert_eq!(cb.get(pb, Key::new(1, 0)), Err(Status::UnknownPool));
    let pb = cb.open(PoolKind::Shared(u), false).expect("b reopens");
    assert_eq!(cb.put(pb, Key::new(1, 0), b"two"), Status::Ok);
    let pa = ca.open(PoolKind::Shared(u), false).expect("a reopens");
    assert_eq!(ca.get(pa, Key::new(1, 0)), Ok(b"two".to_vec()));
    let (ok, out, err) = d.admin_cmd(&["drop-identity", &format!("shared:{uuid}")]);
    assert!(ok && out.contains("freed 3 bytes"), "{out}{err}");
    let pa = ca
        .open(PoolKind::Shared(u), false)
        .expect("a reopens after the drop");
    assert_eq!(ca.get(pa, Key::new(1, 0)), Err(Status::Miss));
    assert_eq!(ca.put(pa, Key::new(1, 0), b"three"), Status::Ok);
    let pb = cb.open(PoolKind::Shared(u), false).expect("b too");
    assert_eq!(cb.get(pb, Key::new(1, 0)), Ok(b"three".to_vec()));
}

#[test]
fn connections_and_pools_are_capped_per_identity() {
    let d = Daemon::start(&["--max-connections=3", "--max-pools=2"]);
    // (The test harness's readiness probe may still count for a moment.)
    let mut first = Conn::connect(&d.sock);
    first.hello();
    assert!(eventually(10, || {
        snapshot(&d).identities.iter().all(|i| i.connections <= 1)
    }));
    let mut conns = vec![first, Conn::connect(&d.sock), Conn::connect(&d.sock)];
    for c in conns.iter_mut() {
        c.hello();
    }
    let mut over = Conn::connect(&d.sock);
    let r = over.call(RequestHeader::new(Op::Ping, RequestId(0)), &[]);
    assert_eq!(r.header.status, Status::Denied);
    assert!(closed_by_peer(&mut over.s), "then closed");
    assert!(d.log_text().contains("as many connections as it may"));
    // Pools.
    let c = &mut conns[0];
    c.open_private("one");
    c.open_private("two");
    assert_eq!(
        c.open(PoolKind::Private("three".into()), false),
        Err(Status::NoSpace)
    );
    c.open_private("two"); // reopening is fine
                           // A closed connection makes room for a new one.
    conns.pop();
    assert!(eventually(10, || {
        let mut c = Conn::connect(&d.sock);
        c.call(RequestHeader::new(Op::Ping, RequestId(0)), &[])
            .header
            .status
            == Status::Ok
    }));
}

#[test]
fn a_bad_log_level_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(utmem_testkit::hostd_binary())
        .arg(format!("--listen=unix:{}", dir.path().join("s").display()))
        .args(["--log-level", "bogus"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = eventually(10, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(exited, "utmem-hostd started with --log-level bogus");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("bogus") && err.contains("--log-level"),
        "{err}"
    );
}
