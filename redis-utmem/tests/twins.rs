//! UTMEM.* side by side with their plain twins (SET, GET, MGET, MSET, GETDEL, STRLEN)
//! on one server: every option and error case, at a threshold that offloads
//! everything and at the default. For each case it compares the reply, the RESP3
//! tracking pushes around it (order included), the keyspace notifications, the
//! resulting value, type and TTL, and what the replica ends up with. Every
//! difference is reported by case name; the test fails on any difference that
//! docs/module.md does not list as intended (its table "Where UTMEM.* differs from
//! SET/GET", one id per row).
//!
//! Real redis-server (or $UTMEM_REDIS_SERVER) with a replica, real utmem-hostd.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use utmem_testkit::{pattern, Daemon, Redis};

/// A RESP3 value, as far as these commands need it.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Simple(String),
    Err(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<V>),
    Push(Vec<V>),
    Other(String),
}

/// A raw RESP connection (RESP3 after `HELLO 3`), so pushes and their order are seen.
struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    fn connect(port: u16) -> Resp {
        let w = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Resp {
            r: BufReader::new(w.try_clone().expect("clone")),
            w,
        }
    }

    fn send(&mut self, args: &[Vec<u8>]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).expect("send");
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("read");
        assert!(l.ends_with("\r\n"), "connection closed or bad line {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn read(&mut self) -> V {
        let l = self.line();
        let (t, rest) = l.split_at(1);
        let n = || rest.parse::<i64>().unwrap_or(-1);
        let items = |s: &mut Resp, k: i64| (0..k).map(|_| s.read()).collect::<Vec<_>>();
        match t {
            "+" => V::Simple(rest.into()),
            "-" => V::Err(rest.into()),
            ":" => V::Int(n()),
            "_" => V::Null,
            "$" | "=" if n() < 0 => V::Null,
            "$" | "=" => {
                let len = usize::try_from(n()).expect("len");
                let mut b = vec![0u8; len + 2];
                self.r.read_exact(&mut b).expect("bulk");
                b.truncate(len);
                V::Bulk(b)
            }
            "*" if n() < 0 => V::Null,
            "*" | "~" => V::Array(items(self, n())),
            ">" => V::Push(items(self, n())),
            "%" => V::Array(items(self, 2 * n())),
            _ => V::Other(l.clone()),
        }
    }

    /// Sends a command and reads its reply (pushes before it are dropped).
    fn call(&mut self, args: &[&[u8]]) -> V {
        self.send(&args.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
        loop {
            match self.read() {
                V::Push(_) => {}
                v => return v,
            }
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .as_millis(),
    )
    .expect("ms")
}

/// The twin commands: (plain, utmem).
const TWINS: [(&str, &str, &str); 6] = [
    ("{SET}", "SET", "UTMEM.SET"),
    ("{GET}", "GET", "UTMEM.GET"),
    ("{MGET}", "MGET", "UTMEM.MGET"),
    ("{MSET}", "MSET", "UTMEM.MSET"),
    ("{GETDEL}", "GETDEL", "UTMEM.GETDEL"),
    ("{STRLEN}", "STRLEN", "UTMEM.STRLEN"),
];

/// One case: commands that prepare the key(s), then the command under test. Words:
/// `{SET}` … `{STRLEN}` become the twin of each side, `{K}`/`{K2}` the side's keys,
/// `{V1}`/`{V2}` values of the size under test, `{SMALL}` a 3-byte value, `{FUT_S}`
/// / `{FUT_MS}` a time 1000 s ahead.
struct Case {
    name: &'static str,
    setup: &'static [&'static str],
    cmd: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "set-new",
        setup: &[],
        cmd: "{SET} {K} {V1}",
    },
    Case {
        name: "set-overwrite-twin",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2}",
    },
    Case {
        name: "set-overwrite-small-string",
        setup: &["SET {K} {SMALL}"],
        cmd: "{SET} {K} {V2}",
    },
    Case {
        name: "set-overwrite-list",
        setup: &["RPUSH {K} a"],
        cmd: "{SET} {K} {V1}",
    },
    Case {
        name: "set-overwrite-ttl",
        setup: &["{SET} {K} {V1} EX 100"],
        cmd: "{SET} {K} {V2}",
    },
    Case {
        name: "set-nx-absent",
        setup: &[],
        cmd: "{SET} {K} {V1} NX",
    },
    Case {
        name: "set-nx-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} NX",
    },
    Case {
        name: "set-xx-absent",
        setup: &[],
        cmd: "{SET} {K} {V1} XX",
    },
    Case {
        name: "set-xx-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} XX",
    },
    Case {
        name: "set-nx-nx",
        setup: &[],
        cmd: "{SET} {K} {V1} NX NX",
    },
    Case {
        name: "set-nx-xx",
        setup: &[],
        cmd: "{SET} {K} {V1} NX XX",
    },
    Case {
        name: "set-get-absent",
        setup: &[],
        cmd: "{SET} {K} {V1} GET",
    },
    Case {
        name: "set-get-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} GET",
    },
    Case {
        name: "set-get-list",
        setup: &["RPUSH {K} a"],
        cmd: "{SET} {K} {V1} GET",
    },
    Case {
        name: "set-nx-get-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} NX GET",
    },
    Case {
        name: "set-xx-get-absent",
        setup: &[],
        cmd: "{SET} {K} {V1} XX GET",
    },
    Case {
        name: "set-ex",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 100",
    },
    Case {
        name: "set-px",
        setup: &[],
        cmd: "{SET} {K} {V1} PX 100000",
    },
    Case {
        name: "set-exat",
        setup: &[],
        cmd: "{SET} {K} {V1} EXAT {FUT_S}",
    },
    Case {
        name: "set-pxat",
        setup: &[],
        cmd: "{SET} {K} {V1} PXAT {FUT_MS}",
    },
    Case {
        name: "set-exat-past",
        setup: &[],
        cmd: "{SET} {K} {V1} EXAT 1",
    },
    Case {
        name: "set-pxat-past-overwrite",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} PXAT 1",
    },
    Case {
        name: "set-keepttl",
        setup: &["{SET} {K} {V1} EX 100"],
        cmd: "{SET} {K} {V2} KEEPTTL",
    },
    Case {
        name: "set-keepttl-none",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} KEEPTTL",
    },
    Case {
        name: "set-keepttl-string",
        setup: &["SET {K} {SMALL} EX 100"],
        cmd: "{SET} {K} {V2} KEEPTTL",
    },
    Case {
        name: "set-ex-ex",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 10 EX 200",
    },
    Case {
        name: "set-px-px",
        setup: &[],
        cmd: "{SET} {K} {V1} PX 10 PX 200000",
    },
    Case {
        name: "set-exat-exat",
        setup: &[],
        cmd: "{SET} {K} {V1} EXAT 1 EXAT {FUT_S}",
    },
    Case {
        name: "set-pxat-pxat",
        setup: &[],
        cmd: "{SET} {K} {V1} PXAT 1 PXAT {FUT_MS}",
    },
    Case {
        name: "set-keepttl-keepttl",
        setup: &[],
        cmd: "{SET} {K} {V1} KEEPTTL KEEPTTL",
    },
    Case {
        name: "set-ex-abc-then-ex",
        setup: &[],
        cmd: "{SET} {K} {V1} EX abc EX 10",
    },
    Case {
        name: "set-ex-px",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 10 PX 20",
    },
    Case {
        name: "set-ex-keepttl",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 10 KEEPTTL",
    },
    Case {
        name: "set-keepttl-ex",
        setup: &[],
        cmd: "{SET} {K} {V1} KEEPTTL EX 10",
    },
    Case {
        name: "set-ex-missing",
        setup: &[],
        cmd: "{SET} {K} {V1} EX",
    },
    Case {
        name: "set-ex-abc",
        setup: &[],
        cmd: "{SET} {K} {V1} EX abc",
    },
    Case {
        name: "set-ex-plus",
        setup: &[],
        cmd: "{SET} {K} {V1} EX +10",
    },
    Case {
        name: "set-px-plus",
        setup: &[],
        cmd: "{SET} {K} {V1} PX +5000",
    },
    Case {
        name: "set-ex-leading-zero",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 010",
    },
    Case {
        name: "set-ex-minus-zero",
        setup: &[],
        cmd: "{SET} {K} {V1} EX -0",
    },
    Case {
        name: "set-ex-zero",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 0",
    },
    Case {
        name: "set-ex-negative",
        setup: &[],
        cmd: "{SET} {K} {V1} EX -5",
    },
    Case {
        name: "set-ex-huge",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 9223372036854775807",
    },
    Case {
        name: "set-px-overflow",
        setup: &[],
        cmd: "{SET} {K} {V1} PX 9223372036854775807",
    },
    Case {
        name: "set-ex-space",
        setup: &[],
        cmd: "{SET} {K} {V1} EX 1_0",
    },
    Case {
        name: "set-unknown-option",
        setup: &[],
        cmd: "{SET} {K} {V1} FOO",
    },
    Case {
        name: "set-lowercase-options",
        setup: &["{SET} {K} {V1}"],
        cmd: "{SET} {K} {V2} xx get px 100000",
    },
    Case {
        name: "set-arity",
        setup: &[],
        cmd: "{SET} {K}",
    },
    Case {
        name: "get-absent",
        setup: &[],
        cmd: "{GET} {K}",
    },
    Case {
        name: "get-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{GET} {K}",
    },
    Case {
        name: "get-list",
        setup: &["RPUSH {K} a"],
        cmd: "{GET} {K}",
    },
    Case {
        name: "get-arity",
        setup: &[],
        cmd: "{GET} {K} {K2}",
    },
    Case {
        name: "plain-get-of-twin",
        setup: &["{SET} {K} {V1}"],
        cmd: "GET {K}",
    },
    Case {
        name: "mget",
        setup: &["{SET} {K} {V1}", "RPUSH {K2} a"],
        cmd: "{MGET} {K} {K2} {K3}",
    },
    Case {
        name: "mset",
        setup: &["{SET} {K} {V1} EX 100", "RPUSH {K3} a"],
        cmd: "{MSET} {K} {V2} {K2} {V1} {K3} {V2}",
    },
    Case {
        name: "mset-arity",
        setup: &[],
        cmd: "{MSET} {K} {V1} {K2}",
    },
    Case {
        name: "getdel-absent",
        setup: &[],
        cmd: "{GETDEL} {K}",
    },
    Case {
        name: "getdel-present",
        setup: &["{SET} {K} {V1} EX 100"],
        cmd: "{GETDEL} {K}",
    },
    Case {
        name: "getdel-list",
        setup: &["RPUSH {K} a"],
        cmd: "{GETDEL} {K}",
    },
    Case {
        name: "strlen-absent",
        setup: &[],
        cmd: "{STRLEN} {K}",
    },
    Case {
        name: "strlen-present",
        setup: &["{SET} {K} {V1}"],
        cmd: "{STRLEN} {K}",
    },
    Case {
        name: "strlen-list",
        setup: &["RPUSH {K} a"],
        cmd: "{STRLEN} {K}",
    },
];

/// The words of `template` for one side.
fn words(template: &str, utmem: bool, key: &str, v1: &[u8], v2: &[u8]) -> Vec<Vec<u8>> {
    let fut_s = (now_ms() / 1000 + 1000).to_string();
    let fut_ms = (now_ms() + 1_000_000).to_string();
    template
        .split(' ')
        .map(|w| {
            if let Some((_, p, u)) = TWINS.iter().find(|t| t.0 == w) {
                return (if utmem { *u } else { *p }).as_bytes().to_vec();
            }
            match w {
                "{K}" => format!("{key}:1").into_bytes(),
                "{K2}" => format!("{key}:2").into_bytes(),
                "{K3}" => format!("{key}:3").into_bytes(),
                "{V1}" => v1.to_vec(),
                "{V2}" => v2.to_vec(),
                "{SMALL}" => b"abc".to_vec(),
                "{FUT_S}" => fut_s.clone().into_bytes(),
                "{FUT_MS}" => fut_ms.clone().into_bytes(),
                w => w.as_bytes().to_vec(),
            }
        })
        .collect()
}

/// Comparable text: bulk values by length and hash, the side's key prefix and the
/// command's own name removed.
fn show(v: &V, key: &str) -> String {
    let norm = |s: &str| {
        s.replace(key, "K")
            .replace("utmem.", "")
            .replace("UTMEM.", "")
    };
    match v {
        V::Simple(s) => format!("+{s}"),
        V::Err(e) => format!("-{}", norm(e)),
        V::Int(i) => format!(":{i}"),
        V::Null => "nil".into(),
        V::Bulk(b) => match std::str::from_utf8(b).map(norm) {
            Ok(s) if s.len() <= 40 => format!("\"{s}\""),
            _ => format!("bulk[{}:{:08x}]", b.len(), crc32fast::hash(b)),
        },
        V::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| show(x, key))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        V::Push(a) => format!(
            ">[{}]",
            a.iter()
                .map(|x| show(x, key))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        V::Other(s) => s.clone(),
    }
}

/// Value, type and TTL (to the 10 s) of a key, as one line.
fn state(c: &mut Resp, utmem: bool, k: &str, key: &str) -> String {
    let get: &[u8] = if utmem { b"UTMEM.GET" } else { b"GET" };
    let ty = c.call(&[b"TYPE", k.as_bytes()]);
    let val = match &ty {
        V::Simple(t) if t == "list" => c.call(&[b"LRANGE", k.as_bytes(), b"0", b"-1"]),
        _ => c.call(&[get, k.as_bytes()]),
    };
    let ttl = match c.call(&[b"PTTL", k.as_bytes()]) {
        V::Int(t) if t > 0 => format!("ttl~{}s", (t + 5000) / 10_000 * 10),
        v => format!("ttl {}", show(&v, key)),
    };
    format!("{} {} {ttl}", show(&ty, key), show(&val, key))
}

/// What one side of a case produced, aspect by aspect.
#[derive(Debug, Default)]
struct Seen {
    /// TYPE of each key before and after the command.
    types: Vec<(String, String)>,
    reply: String,
    events: Vec<String>,
    state: String,
    replica: String,
}

struct Bench {
    port: u16,
    replica_port: u16,
    /// Plain connection for set-up and state reads.
    c: Resp,
    /// RESP3 with CLIENT TRACKING on: runs the command under test.
    t: Resp,
    /// Subscribed to every keyspace and keyevent channel, and to `barrier`.
    s: Resp,
    r: Resp,
    barrier: u64,
}

impl Bench {
    fn new(port: u16, replica_port: u16) -> Bench {
        let c = Resp::connect(port);
        let mut t = Resp::connect(port);
        t.call(&[b"HELLO", b"3"]);
        assert_eq!(
            t.call(&[b"CLIENT", b"TRACKING", b"ON"]),
            V::Simple("OK".into())
        );
        let mut s = Resp::connect(port);
        s.send(&[b"PSUBSCRIBE".to_vec(), b"__key*__:*".to_vec()]);
        s.read();
        s.send(&[b"SUBSCRIBE".to_vec(), b"barrier".to_vec()]);
        s.read();
        Bench {
            port,
            replica_port,
            c,
            t,
            s,
            r: Resp::connect(replica_port),
            barrier: 0,
        }
    }

    /// Notifications since the last barrier.
    fn events(&mut self, key: &str) -> Vec<String> {
        self.barrier += 1;
        let id = self.barrier.to_string();
        self.c.call(&[b"PUBLISH", b"barrier", id.as_bytes()]);
        let mut out = Vec::new();
        loop {
            let V::Array(m) = self.s.read() else { continue };
            match m.as_slice() {
                [V::Bulk(kind), V::Bulk(ch), V::Bulk(msg)]
                    if kind == b"message" && ch == b"barrier" && msg == id.as_bytes() =>
                {
                    return out;
                }
                [V::Bulk(kind), _, V::Bulk(ch), V::Bulk(msg)] if kind == b"pmessage" => {
                    let ch = String::from_utf8_lossy(ch).replace(key, "K");
                    let msg = String::from_utf8_lossy(msg).replace(key, "K");
                    out.push(format!("{ch} {msg}"));
                }
                _ => {}
            }
        }
    }

    fn run(&mut self, case: &Case, utmem: bool, key: &str, v1: &[u8], v2: &[u8]) -> Seen {
        for k in 1..=3 {
            self.c.call(&[b"DEL", format!("{key}:{k}").as_bytes()]);
        }
        for s in case.setup {
            let w = words(s, utmem, key, v1, v2);
            let refs: Vec<&[u8]> = w.iter().map(Vec::as_slice).collect();
            let r = self.c.call(&refs);
            assert!(!matches!(r, V::Err(_)), "{}: set-up {s}: {r:?}", case.name);
        }
        // The tracking connection reads the key first, so an overwrite invalidates it.
        let get: &[u8] = if utmem { b"UTMEM.GET" } else { b"GET" };
        self.t.call(&[get, format!("{key}:1").as_bytes()]);
        let type_of = |c: &mut Resp, k: usize| {
            show(&c.call(&[b"TYPE", format!("{key}:{k}").as_bytes()]), key)
        };
        let before: Vec<String> = (1..=3).map(|k| type_of(&mut self.c, k)).collect();
        self.events(key);
        // The command, then PING: whatever arrives until PONG, in order.
        let w = words(case.cmd, utmem, key, v1, v2);
        self.t.send(&w);
        self.t.send(&[b"PING".to_vec()]);
        let mut seq = Vec::new();
        loop {
            let v = self.t.read();
            if v == V::Simple("PONG".into()) {
                break;
            }
            seq.push(show(&v, key));
        }
        let mut state_line = String::new();
        for k in 1..=3 {
            let k = format!("{key}:{k}");
            state_line += &format!("{}; ", state(&mut self.c, utmem, &k, key));
        }
        let after: Vec<String> = (1..=3).map(|k| type_of(&mut self.c, k)).collect();
        let events = self.events(key);
        self.c.call(&[b"WAIT", b"1", b"5000"]);
        let mut replica = String::new();
        for k in 1..=3 {
            let k = format!("{key}:{k}");
            replica += &format!("{}; ", state(&mut self.r, utmem, &k, key));
        }
        Seen {
            types: before.into_iter().zip(after).collect(),
            reply: seq.join(" | "),
            events,
            state: state_line,
            replica,
        }
    }
}

/// Intended differences: the ids of the table in docs/module.md.
fn intended() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/module.md"))
        .expect("docs/module.md");
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Where UTMEM.* differs from SET/GET"))
        .expect("docs/module.md has the section \"Where UTMEM.* differs from SET/GET\"");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// The id of an intended difference this is, if it is one. `types`: each key's type
/// before and after the command on the utmem side.
fn classify(
    aspect: &str,
    plain: &str,
    utmem: &str,
    types: &[(String, String)],
) -> Option<&'static str> {
    // `new` events of keys that existed with another type and were replaced.
    let replaced: Vec<String> = types
        .iter()
        .enumerate()
        .filter(|(_, (b, a))| b != a && b != "+none" && a != "+none")
        .flat_map(|(i, _)| {
            let k = format!("K:{}", i + 1);
            [
                format!("__keyspace@0__:{k} new"),
                format!("__keyevent@0__:new {k}"),
            ]
        })
        .collect();
    let strip_new = |s: &str| {
        s.split(", ")
            .filter(|e| !replaced.iter().any(|r| r == e))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match aspect {
        "state" | "replica" if plain.replace("+string", "+utmem-val") == utmem => {
            Some("type-utmem-val")
        }
        "reply" if utmem.contains("-WRONGTYPE") && !plain.contains("-WRONGTYPE") => {
            Some("wrongtype-for-string-commands")
        }
        "events" if plain == strip_new(utmem) => Some("new-on-type-change"),
        _ => None,
    }
}

#[test]
fn utmem_commands_behave_like_their_plain_twins() {
    let d = Daemon::start(&[]);
    let extra = ["--notify-keyspace-events", "KEAn"];
    let master = Redis::start(&["transport", &d.spec()], &extra);
    let port = master.port.to_string();
    let mut rextra = extra.to_vec();
    rextra.extend(["--replicaof", "127.0.0.1", port.as_str()]);
    let replica = Redis::start(&["transport", &d.spec()], &rextra);
    let mut b = Bench::new(master.port, replica.port);
    // Wait for the replica to be in sync.
    for _ in 0..200 {
        if replica.info("replication", "master_link_status") == "up" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let allowed = intended();
    let mut report = Vec::new();
    let mut unexpected = 0;
    let mut compared = 0;
    for (threshold, sizes) in [("0", [0usize, 5000]), ("4096", [10, 70_000])] {
        for port in [b.port, b.replica_port] {
            let mut c = Resp::connect(port);
            c.call(&[b"CONFIG", b"SET", b"utmem.threshold", threshold.as_bytes()]);
        }
        for len in sizes {
            let v1 = pattern(len as u64, len);
            let v2 = pattern(len as u64 + 1, len + 7);
            for case in CASES {
                let tag = format!("{}@t{threshold}/{len}B", case.name);
                let plain = b.run(case, false, &format!("p:{tag}"), &v1, &v2);
                let ours = b.run(case, true, &format!("u:{tag}"), &v1, &v2);
                compared += 1;
                for (aspect, p, u) in [
                    ("reply", plain.reply.clone(), ours.reply.clone()),
                    ("events", plain.events.join(", "), ours.events.join(", ")),
                    ("state", plain.state.clone(), ours.state.clone()),
                    ("replica", plain.replica.clone(), ours.replica.clone()),
                ] {
                    if p == u {
                        continue;
                    }
                    let id = classify(aspect, &p, &u, &ours.types);
                    let ok = id.is_some_and(|id| allowed.iter().any(|a| a == id));
                    if !ok {
                        unexpected += 1;
                    }
                    report.push(format!(
                        "{} {tag} {aspect} [{}]\n    SET side:   {p}\n    UTMEM side: {u}",
                        if ok { "intended" } else { "DIFFERENT" },
                        id.unwrap_or("no id"),
                    ));
                }
            }
        }
    }
    eprintln!(
        "twins: {compared} cases compared, {} differences ({unexpected} not intended)\n{}",
        report.len(),
        report.join("\n")
    );
    assert!(compared > 200, "only {compared} cases ran");
    assert_eq!(
        unexpected,
        0,
        "differences not listed in docs/module.md:\n{}",
        report.join("\n")
    );
    drop(replica);
    drop(master);
}
