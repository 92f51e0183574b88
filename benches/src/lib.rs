//! utmem's benchmarks: `utmem-bench` (the comparisons against plain Redis) and the
//! fixtures of the criterion benches in `benches/`: an in-process utmem-hostd (the
//! real listener and session code on a temp Unix socket) and a raw Unix-socket echo
//! server, the floor a utmem round trip is compared with.

pub mod compare;
pub mod load;
pub mod pressure;
pub mod redis_benchmark;
pub mod report;
pub mod stall;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use utmem_host::config::ListenSpec;
use utmem_host::server::{spawn_acceptor, Listener};
use utmem_host::{Policy, Store};

/// The module's load arguments for the benchmarks: the host at `spec`, values from
/// 1 KiB offloaded, then `extra` (`set-ack local`, ...).
pub fn module_args<'a>(spec: &'a str, extra: &'a [(String, String)]) -> Vec<&'a str> {
    let mut args = vec!["transport", spec, "threshold", "1024"];
    for (n, v) in extra {
        args.push(n);
        args.push(v);
    }
    args
}

/// A daemon serving on a temp socket for as long as the process lives.
#[derive(Debug)]
pub struct LocalHost {
    _dir: tempfile::TempDir,
    /// The socket path.
    pub path: PathBuf,
}

impl LocalHost {
    /// Starts the real session code on a fresh socket with `capacity` bytes.
    pub fn start(capacity: u64) -> LocalHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hostd.sock");
        let spec = ListenSpec::Unix {
            path: path.clone(),
            name: None,
        };
        let listener = Listener::bind(&spec).expect("bind");
        let store = Arc::new(Store::new(
            capacity,
            utmem_proto::DEFAULT_MAX_VALUE,
            Policy::new(capacity),
        ));
        spawn_acceptor(listener, store);
        LocalHost { _dir: dir, path }
    }

    /// The spec string clients connect with.
    pub fn spec(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

/// A Unix-socket echo server for fixed-size messages, and a connected client end.
pub fn echo_pair(size: usize) -> (tempfile::TempDir, UnixStream) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("echo.sock");
    let l = UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let c = UnixStream::connect(&path).expect("connect");
    (dir, c)
}
