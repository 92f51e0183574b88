//! The `utmem` CLI against the real utmem-hostd: output, exit codes, bench summary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use utmem_testkit::Daemon;

fn utmem(connect: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_utmem"))
        .arg("--connect")
        .arg(connect)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn utmem");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

#[test]
fn put_get_del_stats_and_exit_codes() {
    let d = Daemon::start(&[]);
    let spec = format!("unix:{}", d.sock.display());
    let out = utmem(&spec, &["ping"], b"");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pong from unix:"));
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert!(utmem(&spec, &["--pool", "cli", "put", "42", "-"], &data)
        .status
        .success());
    let out = utmem(&spec, &["--pool", "cli", "get", "42"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, data);
    // Another pool name is another pool.
    assert_eq!(utmem(&spec, &["get", "42"], b"").status.code(), Some(1));
    assert!(utmem(&spec, &["--pool", "cli", "del", "42"], b"")
        .status
        .success());
    let out = utmem(&spec, &["--pool", "cli", "get", "42"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no value under 42"));
    let out = utmem(&spec, &["stats"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("identity   uid:") && text.contains("values     0"),
        "{text}"
    );
    // Usage errors: 2. Host errors: 3.
    assert_eq!(utmem("tcp:1", &["ping"], b"").status.code(), Some(2));
    assert_eq!(utmem(&spec, &["frobnicate"], b"").status.code(), Some(2));
    let gone = format!("unix:{}/nobody.sock", d.dir.path().display());
    let out = utmem(&gone, &["ping"], b"");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
}

#[test]
fn bench_prints_one_summary_line() {
    let d = Daemon::start(&[]);
    let spec = format!("unix:{}", d.sock.display());
    let out = utmem(
        &spec,
        &[
            "bench",
            "--size",
            "4096",
            "--ops",
            "2000",
            "--inflight",
            "16",
            "--put-ratio",
            "0.3",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{line}");
    assert!(words[0].parse::<f64>().expect("rate") > 0.0);
    assert_eq!(words[1], "ops/s");
    assert!(
        words[2].starts_with("p50=") && words[2].ends_with("us"),
        "{line}"
    );
    assert!(
        words[3].starts_with("p99=") && words[3].ends_with("us"),
        "{line}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bench: 2000 ops, 16 in flight"));
}

/// Bad arguments and unreadable files are usage errors (2) that name what was wrong,
/// even with a host up; they never reach the host (3).
#[test]
fn bad_arguments_and_files_exit_2_and_say_which() {
    let d = Daemon::start(&[]);
    let spec = format!("unix:{}", d.sock.display());
    let cases: [(&[&str], &str); 6] = [
        (&["bench", "--put-ratio", "2"], "--put-ratio"),
        (&["bench", "--put-ratio=-0.5"], "--put-ratio"),
        (&["bench", "--inflight", "0"], "--inflight"),
        (&["bench", "--keys", "0"], "--keys"),
        (&["--timeout-ms", "0", "ping"], "--timeout-ms"),
        (&["put", "5", "/nonexistent"], "/nonexistent"),
    ];
    for (args, named) in cases {
        let out = utmem(&spec, args, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?} should name {named}: {err}");
    }
    // Nothing was stored by the failed put.
    assert_eq!(utmem(&spec, &["get", "5"], b"").status.code(), Some(1));
}

#[test]
fn version_names_the_program() {
    let out = Command::new(env!("CARGO_BIN_EXE_utmem"))
        .arg("--version")
        .output()
        .expect("run utmem");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("utmem {}", env!("CARGO_PKG_VERSION"))
    );
}
