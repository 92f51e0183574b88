//! What the client must withstand from its callers and from the host: many threads
//! reading mapped values at once, a process that binds the socket path and hands
//! out descriptors that could fault, a host that hangs in the handshake, and an
//! operator who drops the identity under a running client.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use utmem_client::proto::{
    encode_reply, HelloReply, Key, Limits, MapReply, Op, Placement, PoolKind, ReplyHeader,
    RequestHeader, Status, CAP_COPY, CAP_MAP, REQUEST_HEADER_LEN, VERSION,
};
use utmem_client::{Client, ClientError, Options, Request, Response};
use utmem_testkit::Daemon;

fn spec(d: &Daemon) -> String {
    format!("unix:{}", d.sock.display())
}

fn mapped_opts() -> Options {
    Options {
        map: true,
        ..Options::default()
    }
}

/// Several threads read mapped values in place while another keeps replacing them.
/// The host parks freed space only while the connection's one reader word is odd and
/// unchanged; if a second reader could move the word (or make it even) while the first
/// is inside, the first would see the space reused under it.
#[test]
fn mapped_readers_on_many_threads_never_see_reused_space() {
    const LEN: usize = 20_000;
    const KEYS: usize = 4;
    let d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), mapped_opts()).expect("connect");
    assert!(c.is_mapped());
    let pool = c.open("race").expect("pool");
    let latest = Arc::new(Mutex::new([None; KEYS]));
    let done = Arc::new(AtomicBool::new(false));
    // Reads that ran inside a value (whatever the stamp said afterwards).
    let inside = Arc::new(AtomicU64::new(0));
    const READS: u64 = 600;
    let writer = {
        let (c, latest, done, inside) = (
            c.clone(),
            Arc::clone(&latest),
            Arc::clone(&done),
            Arc::clone(&inside),
        );
        thread::spawn(move || {
            // Until the readers have read enough, however slow this machine is.
            for v in 0..1_000_000u64 {
                if inside.load(Ordering::Relaxed) >= READS {
                    break;
                }
                let k = (v % KEYS as u64) as usize;
                let fill = (v % 250) as u8 + 1;
                let r = c.call(Request::Put {
                    pool,
                    key: Key::new(k as u64, 0),
                    value: Bytes::from(vec![fill; LEN]),
                });
                let Ok(Response::Placed(at)) = r else {
                    panic!("PUT answered {r:?}");
                };
                latest.lock().unwrap()[k] = Some((at, fill));
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let torn = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (c, latest, done, torn, inside) = (
                c.clone(),
                Arc::clone(&latest),
                Arc::clone(&done),
                Arc::clone(&torn),
                Arc::clone(&inside),
            );
            thread::spawn(move || {
                let (mut whole, mut copy) = (0u64, vec![0u8; LEN]);
                while !done.load(Ordering::Relaxed) {
                    for k in 0..KEYS {
                        let Some((at, fill)) = latest.lock().unwrap()[(k + t) % KEYS] else {
                            continue;
                        };
                        // In place, as a reply would use it: what `f` sees counts, whatever
                        // the stamp check after it says.
                        let ok = c.with_mapped(at, LEN, |b| {
                            // Stagger the readers so they overlap in every order.
                            thread::sleep(Duration::from_micros(300 * (t as u64 + 1)));
                            b.copy_to(&mut copy[..]);
                            let same = copy.iter().all(|x| *x == fill);
                            inside.fetch_add(1, Ordering::Relaxed);
                            if !same {
                                torn.fetch_add(1, Ordering::Relaxed);
                            }
                            same
                        });
                        if ok == Some(true) {
                            whole += 1;
                        }
                    }
                }
                whole
            })
        })
        .collect();
    writer.join().expect("writer");
    let whole: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    let inside = inside.load(Ordering::Relaxed);
    eprintln!("{inside} reads inside values on 3 threads, {whole} still current after");
    assert_eq!(
        torn.load(Ordering::Relaxed),
        0,
        "a reader saw space reused under it"
    );
    assert!(
        inside >= READS,
        "too few reads overlapped the writes: {inside}"
    );
}

/// What a fake host hands out on MAP.
#[derive(Clone, Copy, Debug)]
enum BadMap {
    /// A memfd shorter than the length announced.
    Short,
    /// A memfd of the announced length, not sealed, truncated once sent.
    Unsealed,
}

fn memfd(len: u64, seal: bool) -> std::fs::File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"fake-arena".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and is owned by nothing else.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).expect("set_len");
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a descriptor we own; F_ADD_SEALS takes an int argument.
        assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } >= 0);
    }
    f
}

/// Serves one connection like a host that offers MAP but hands out `bad`
/// descriptors: HELLO, NEW_POOL (id 1), MAP, and PUTs answered with a placement
/// past the end of what it really gave.
fn fake_host(listener: UnixListener, bad: BadMap) {
    let (mut s, _) = listener.accept().expect("accept");
    let announced: u64 = 1 << 20;
    let mut buf = BytesMut::new();
    let mut keep = Vec::new();
    loop {
        while buf.len() < REQUEST_HEADER_LEN {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        hb.copy_from_slice(&buf[..REQUEST_HEADER_LEN]);
        let h = RequestHeader::decode(&hb, &Limits::default()).expect("request");
        let total = REQUEST_HEADER_LEN + h.len as usize;
        while buf.len() < total {
            let mut chunk = vec![0u8; 1 << 16];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = buf.split_to(total);
        let reply = ReplyHeader::new(h.op, h.id, Status::Ok);
        let mut out = BytesMut::new();
        match h.op {
            Op::Hello => {
                let hello = HelloReply {
                    version: VERSION,
                    capabilities: CAP_COPY | CAP_MAP,
                    max_value: 512 << 20,
                    quota: 1 << 30,
                    identity: "fake".into(),
                };
                encode_reply(&reply, &hello.encode(), &mut out);
            }
            Op::NewPool => encode_reply(&reply, &1u32.to_le_bytes(), &mut out),
            Op::Map => {
                let arena = match bad {
                    BadMap::Short => memfd(4096, true),
                    BadMap::Unsealed => memfd(announced, false),
                };
                let word = memfd(4096, true);
                encode_reply(&reply, &MapReply { len: announced }.encode(), &mut out);
                utmem_sys::send_with_fds(s.as_fd(), &out, &[arena.as_fd(), word.as_fd()])
                    .expect("send MAP");
                if let BadMap::Unsealed = bad {
                    arena
                        .set_len(0)
                        .expect("truncate what the client may have mapped");
                }
                keep.push((arena, word));
                continue;
            }
            Op::Put => {
                // Deep inside what was announced, beyond what really exists.
                let at = Placement {
                    offset: 512 << 10,
                    stamp: 7,
                };
                encode_reply(&reply, &at.encode(), &mut out);
            }
            _ => encode_reply(&reply, &[], &mut out),
        }
        std::io::Write::write_all(&mut s, &out).expect("reply");
    }
}

/// A process that binds the socket path must not be able to crash the client's
/// process with SIGBUS: a descriptor that could shrink, or is shorter than announced,
/// is refused (reads go over the socket) and the connection still works.
#[test]
fn a_fake_host_with_unsafe_descriptors_cannot_fault_the_client() {
    for bad in [BadMap::Short, BadMap::Unsealed] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let host = thread::spawn(move || fake_host(listener, bad));
        let c =
            Client::connect(&format!("unix:{}", path.display()), mapped_opts()).expect("connect");
        assert!(
            !c.is_mapped(),
            "{bad:?}: mapped a descriptor that can fault"
        );
        let pool = c.open("p").expect("pool");
        // The fake places the value where no page exists; reading it there would be
        // SIGBUS (the reader thread pre-faults placed values too).
        let r = c.call(Request::Put {
            pool,
            key: Key::new(1, 0),
            value: Bytes::from(vec![1u8; 100]),
        });
        let Ok(Response::Placed(at)) = r else {
            panic!("{bad:?}: PUT answered {r:?}");
        };
        let mut out = Vec::new();
        assert!(!c.read_mapped(at, 100, &mut out), "{bad:?}");
        assert_eq!(c.with_mapped(at, 100, |_| ()), None, "{bad:?}");
        c.ping().expect("the socket path still works");
        drop(c);
        host.join().expect("fake host");
    }
}

/// Readers of the connection state (INFO utmem, UTMEM.STATS and UTMEM.SET's host
/// check call these on Redis's main thread) return while another thread is stuck in
/// a handshake with a host that accepted the connection and then stopped.
#[test]
fn a_hung_handshake_does_not_block_readers_of_the_connection_state() {
    let mut d = Daemon::start(&[]);
    let opts = Options {
        // Long: the handshake below stays stuck until the host is continued.
        timeout: Duration::from_secs(60),
        ..mapped_opts()
    };
    let c = Client::connect(&spec(&d), opts).expect("connect");
    let pool = c.open("hung").expect("pool");
    d.restart();
    let t0 = Instant::now();
    while c.is_connected() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never saw the restart"
        );
        thread::sleep(Duration::from_millis(10));
    }
    d.signal(Signal::SIGSTOP);
    // This request makes the client connect: the kernel accepts for the stopped host,
    // and HELLO goes unanswered.
    let (tx, rx) = mpsc::channel();
    let pinger = {
        let c = c.clone();
        thread::spawn(move || {
            let _ = tx.send(c.put(pool, Key::new(1, 0), Bytes::from(vec![3u8; 10_000])));
        })
    };
    // Give it every chance to be inside the handshake before we look.
    thread::sleep(Duration::from_millis(300));
    assert!(!c.is_connected());
    assert!(!c.is_mapped());
    assert!(c.hello().is_some(), "the last HELLO is still known");
    assert!(c.check_connected().is_err());
    let mut out = Vec::new();
    let stale = Placement {
        offset: 0,
        stamp: 1,
    };
    assert!(!c.read_mapped(stale, 10, &mut out));
    // Those returned while the handshake could not have finished: the host is stopped.
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the request finished although the host is stopped"
    );
    d.signal(Signal::SIGCONT);
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the request completes once the host runs");
    r.expect("the PUT went through once the host answered");
    pinger.join().expect("pinger");
    assert!(c.is_connected());
}

/// `utmem-hostd drop-identity` while the client runs: its pools are gone, the host
/// answers UNKNOWN_POOL, and the client re-opens the pool under the same handle, so
/// PUTs succeed again; the old values are gone, never returned.
#[test]
fn dropped_identity_pools_are_reopened_under_the_same_handle() {
    for map in [false, true] {
        let d = Daemon::start(&[]);
        let opts = Options {
            map,
            ..Options::default()
        };
        let c = Client::connect(&spec(&d), opts).expect("connect");
        // The module's way: a registered pool, used through its handle.
        let pool = c.register_pool(PoolKind::Private("b2".into()), false, false);
        let old = Bytes::from(vec![0xaau8; 5000]);
        let placed = c
            .call(Request::Put {
                pool,
                key: Key::new(1, 0),
                value: old.clone(),
            })
            .expect("first PUT");
        let name = c.hello().expect("hello").identity;
        let (ok, out, err) = d.admin_cmd(&["drop-identity", &name]);
        assert!(ok, "drop-identity: {out} {err}");
        let new = Bytes::from(vec![0x55u8; 5000]);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match c.call(Request::Put {
                pool,
                key: Key::new(2, 0),
                value: new.clone(),
            }) {
                Ok(_) => break,
                Err(ClientError::Refused {
                    status: Status::UnknownPool,
                    ..
                }) if attempts < 3 => {}
                Err(e) => panic!("map={map}: PUT {attempts} after drop-identity: {e}"),
            }
        }
        eprintln!("map={map}: the PUT succeeded on attempt {attempts}");
        assert!(c.is_connected());
        match c.get(pool, Key::new(1, 0)) {
            Ok(None)
            | Err(ClientError::Refused {
                status: Status::UnknownPool,
                ..
            }) => {}
            other => panic!("map={map}: the dropped value answered {other:?}"),
        }
        if let Response::Placed(at) = placed {
            let mut out = Vec::new();
            assert!(!c.read_mapped(at, old.len(), &mut out), "old bytes mapped");
        }
        assert_eq!(c.get(pool, Key::new(2, 0)).expect("get"), Some(new));
        assert_eq!(
            c.stats().expect("stats").values,
            1,
            "the new identity holds one value"
        );
    }
}

/// A destroyed pool is re-opened (empty) for the requests after the one that
/// learned it was gone, as it would be after a reconnect.
#[test]
fn a_destroyed_pool_is_reopened_empty() {
    let d = Daemon::start(&[]);
    let c = Client::connect(&spec(&d), Options::default()).expect("connect");
    let pool = c.open("gone").expect("pool");
    c.put(pool, Key::new(1, 0), Bytes::from_static(b"v1"))
        .expect("put");
    c.destroy_pool(pool).expect("destroy");
    assert_eq!(
        c.get(pool, Key::new(1, 0)),
        Err(ClientError::Refused {
            op: Op::Get,
            status: Status::UnknownPool
        })
    );
    assert_eq!(c.get(pool, Key::new(1, 0)).expect("get"), None);
    c.put(pool, Key::new(1, 0), Bytes::from_static(b"v2"))
        .expect("put");
    assert_eq!(
        c.get(pool, Key::new(1, 0)).expect("get"),
        Some(Bytes::from_static(b"v2"))
    );
}

/// A registered pool the host refused (a shared pool not granted yet) is tried again
/// while the connection lasts, so it works once the grant arrives (SIGHUP), without
/// waiting for a reconnect that may never come.
#[test]
fn a_refused_registered_pool_opens_once_granted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("hostd.toml");
    let uuid = "12345678-9abc-def0-0123-456789abcdef";
    let grant =
        |who: &str| format!("[[shared]]\nuuid = \"{uuid}\"\nquota = \"1M\"\ngrant = [\"{who}\"]\n");
    std::fs::write(&cfg, grant("vm-a")).expect("config");
    let sock = dir.path().join("c.sock");
    let d = Daemon::start_in(
        dir,
        &[
            &format!("--config={}", cfg.display()),
            &format!("--listen=unix:{}=vm-c", sock.display()),
        ],
    );
    let c =
        Client::connect(&format!("unix:{}", sock.display()), Options::default()).expect("connect");
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        let hex = uuid.replace('-', "");
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    let pool = c.register_pool(
        PoolKind::Shared(utmem_client::proto::PoolUuid(u)),
        false,
        false,
    );
    let put = || c.put(pool, Key::new(1, 0), Bytes::from_static(b"shared"));
    assert!(put().is_err(), "not granted yet");
    std::fs::write(&cfg, grant("vm-c")).expect("config");
    d.signal(Signal::SIGHUP);
    let t0 = Instant::now();
    while let Err(e) = put() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the pool never opened: {e}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(c.is_connected());
    assert_eq!(
        c.get(pool, Key::new(1, 0)).expect("get"),
        Some(Bytes::from_static(b"shared"))
    );
}
