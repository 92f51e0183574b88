//! `utmem-hostd --metrics`: the real daemon scraped over HTTP while a real client
//! (utmem-client) loads it, each scrape parsed by Prometheus's own Python parser
//! (`prometheus_client.parser`), then the figures checked against what was done.
//!
//! The parser comes from the first interpreter that has it: `$UTMEM_PYTHON`, the venv
//! `$UTMEM_VENV` or `target/venv`, then `python3`; `scripts/setup` installs the
//! `prometheus-client` package.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use utmem_client::proto::{Key, PoolKind};
use utmem_client::{Client, Options};
use utmem_testkit::{free_port, hostd_binary, Daemon};

/// Reads the exposition text on stdin; prints one JSON object per sample.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        print(json.dumps({"family": fam.name, "type": fam.type, "name": s.name,
                          "labels": s.labels, "value": s.value}))
"#;

/// The first interpreter that can import the parser, else `python3` (which then fails
/// loudly in [`parse`]).
fn python() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/metrics-<hash> -> target/venv
    let target_venv = exe.ancestors().nth(3).map(|t| t.join("venv"));
    let candidates = std::env::var_os("UTMEM_PYTHON")
        .map(Into::into)
        .into_iter()
        .chain(std::env::var_os("UTMEM_VENV").map(|v| std::path::Path::new(&v).join("bin/python")))
        .chain(target_venv.map(|v| v.join("bin/python")))
        .chain(std::iter::once("python3".into()));
    let candidates: Vec<std::path::PathBuf> = candidates.collect();
    candidates
        .iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import prometheus_client.parser"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .cloned()
        .unwrap_or_else(|| "python3".into())
}

static PYTHON: std::sync::LazyLock<std::path::PathBuf> = std::sync::LazyLock::new(python);

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    family_type: String,
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses `text` with prometheus_client; panics (never skips) if the parser is missing.
fn parse(text: &str) -> Vec<Sample> {
    let mut child = Command::new(&*PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (or $UTMEM_PYTHON) must run: scripts/setup installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition (or is missing: scripts/setup installs \
         the prometheus-client package; $UTMEM_PYTHON picks the interpreter): {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            Sample {
                family_type: v["type"].as_str().expect("type").to_owned(),
                name: v["name"].as_str().expect("name").to_owned(),
                labels: v["labels"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("label").to_owned()))
                    .collect(),
                value: v["value"].as_f64().expect("value"),
            }
        })
        .collect()
}

/// `GET path` over HTTP/1.1: (status line, headers, body).
fn http_get(port: u16, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

fn scrape(port: u16) -> Vec<Sample> {
    let (status, headers, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    parse(&body)
}

/// The value of the sample `name` with these labels (exactly one must exist).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

const QUOTA: u64 = 8 << 20;
const KEYS: u64 = 200;

fn size_of(k: u64) -> usize {
    // 1,000 B .. ~11 KiB: both sides of the 4 KiB line where payloads go to the arena.
    1000 + usize::try_from(k * 50).unwrap()
}

#[test]
fn metrics_scraped_under_load_match_what_was_done() {
    let port = free_port();
    let daemon = Daemon::start(&[
        &format!("--metrics=127.0.0.1:{port}"),
        &format!("--quota={QUOTA}"),
    ]);
    let opts = Options {
        map: true,
        ..Options::default()
    };
    let client = Arc::new(Client::connect(&daemon.spec(), opts).expect("connect"));
    let who = client.hello().expect("hello").identity;
    // A pool name that needs escaping in a label value.
    let odd = "odd \"pool\"\\name\nline2";
    let load = client
        .open_pool(PoolKind::Private("load".into()), false)
        .expect("pool");

    // Load in one thread, scrapes (each parsed) in this one meanwhile.
    let done = Arc::new(AtomicBool::new(false));
    let loader = {
        let (client, done) = (Arc::clone(&client), Arc::clone(&done));
        std::thread::spawn(move || {
            for round in 0..3 {
                for k in 0..KEYS {
                    let v = Bytes::from(vec![u8::try_from(k % 251).unwrap(); size_of(k)]);
                    client.put(load, Key::new(k, 0), v).expect("put");
                    if round > 0 {
                        assert!(client.get(load, Key::new(k, 0)).expect("get").is_some());
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut scrapes = 0;
    let mut last_puts = 0.0;
    while !done.load(Ordering::SeqCst) || scrapes < 2 {
        let s = scrape(port);
        let puts = s
            .iter()
            .find(|x| {
                x.name == "utmem_puts_total"
                    && x.labels.get("pool").map(String::as_str) == Some("load")
            })
            .map_or(0.0, |x| x.value);
        assert!(
            puts >= last_puts,
            "a counter went down: {last_puts} -> {puts}"
        );
        last_puts = puts;
        scrapes += 1;
    }
    loader.join().expect("loader");
    assert!(scrapes >= 2);

    // Misses, a NO_SPACE (over the quota, not over --max-value) and, in an
    // ephemeral pool, evictions.
    for k in KEYS..KEYS + 7 {
        assert!(client.get(load, Key::new(k, 0)).expect("get").is_none());
    }
    let oddp = client
        .open_pool(PoolKind::Private(odd.into()), false)
        .expect("odd pool");
    let too_big = Bytes::from(vec![1u8; usize::try_from(QUOTA).unwrap() + 1]);
    assert!(client.put(oddp, Key::new(1, 0), too_big).is_err());
    client
        .put(oddp, Key::new(2, 0), Bytes::from_static(b"small"))
        .expect("small put");
    let cache = client
        .open_pool(PoolKind::Private("cache".into()), true)
        .expect("ephemeral pool");
    for k in 0..12 {
        client
            .put(cache, Key::new(k, 0), Bytes::from(vec![7u8; 1 << 20]))
            .expect("ephemeral put");
    }

    let s = scrape(port);
    let id = who.as_str();
    let load_bytes: u64 = (0..KEYS).map(|k| size_of(k) as u64).sum();
    let l = [("identity", id), ("pool", "load")];
    assert_eq!(value(&s, "utmem_pool_bytes", &l), load_bytes as f64);
    assert_eq!(value(&s, "utmem_pool_values", &l), KEYS as f64);
    assert_eq!(value(&s, "utmem_puts_total", &l), (3 * KEYS) as f64);
    assert_eq!(value(&s, "utmem_gets_total", &l), (2 * KEYS + 7) as f64);
    assert_eq!(value(&s, "utmem_hits_total", &l), (2 * KEYS) as f64);
    assert_eq!(value(&s, "utmem_misses_total", &l), 7.0);
    assert_eq!(value(&s, "utmem_no_space_total", &l), 0.0);

    let o = [("identity", id), ("pool", odd)];
    assert_eq!(value(&s, "utmem_no_space_total", &o), 1.0);
    assert_eq!(value(&s, "utmem_too_large_total", &o), 0.0);
    assert_eq!(value(&s, "utmem_puts_total", &o), 1.0);
    assert_eq!(value(&s, "utmem_pool_bytes", &o), 5.0);

    let c = [("identity", id), ("pool", "cache")];
    let kept = value(&s, "utmem_pool_values", &c);
    let evicted = value(&s, "utmem_evictions_total", &c);
    assert_eq!(value(&s, "utmem_puts_total", &c), 12.0);
    assert!(evicted > 0.0, "an 8 MiB quota cannot keep 12 MiB");
    assert_eq!(kept + evicted, 12.0, "every value put and gone was evicted");
    let cache_bytes = value(&s, "utmem_pool_bytes", &c);
    assert_eq!(cache_bytes, kept * f64::from(1u32 << 20));

    let i = [("identity", id)];
    let total = load_bytes as f64 + 5.0 + cache_bytes;
    assert_eq!(value(&s, "utmem_identity_bytes", &i), total);
    assert_eq!(
        value(&s, "utmem_identity_values", &i),
        KEYS as f64 + 1.0 + kept
    );
    assert_eq!(value(&s, "utmem_identity_quota_bytes", &i), QUOTA as f64);
    assert_eq!(value(&s, "utmem_identity_pools", &i), 3.0);
    assert_eq!(value(&s, "utmem_identity_connections", &i), 1.0);
    assert!(value(&s, "utmem_identity_charged_bytes", &i) <= QUOTA as f64);
    let arena = value(&s, "utmem_arena_size_bytes", &i);
    assert!(
        arena >= 2.0 * QUOTA as f64,
        "a mapping client made the arena: {arena}"
    );
    assert!(value(&s, "utmem_arena_used_bytes", &i) >= cache_bytes);
    assert_eq!(value(&s, "utmem_used_bytes", &[]), total);
    assert!(value(&s, "utmem_capacity_bytes", &[]) > 0.0);

    // Every family has its type; counters end in _total.
    for x in &s {
        if x.family_type == "counter" {
            assert!(x.name.ends_with("_total"), "{x:?}");
        } else {
            assert_eq!(x.family_type, "gauge", "{x:?}");
        }
        assert!(x.name.starts_with("utmem_"), "{x:?}");
    }

    // The same figures as the operator's stats.
    let (ok, json, err) = daemon.admin_cmd(&["stats", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["used"].as_f64(), Some(total));

    // Anything but GET /metrics is 404; the connection closing is the end of the answer.
    assert_eq!(http_get(port, "/").0, "HTTP/1.1 404 Not Found");
    assert_eq!(http_get(port, "/metricsx").0, "HTTP/1.1 404 Not Found");
    drop(client);
}

#[test]
fn metrics_refuse_a_non_loopback_address_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(hostd_binary())
        .arg(format!(
            "--listen=unix:{}",
            dir.path().join("g.sock").display()
        ))
        .arg(format!("--metrics=0.0.0.0:{}", free_port()))
        .output()
        .expect("utmem-hostd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--metrics-any-address"), "{err}");
}
