//! Test fixtures shared by the workspace's integration tests: the real
//! `utmem-hostd` in a temp dir, killed on drop, and a raw frame-level
//! connection built only on utmem-proto.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use utmem_proto::{
    decode_reply, encode_request, HelloReply, HelloRequest, IdentityStats, Key, Limits, NewPool,
    Op, PoolId, PoolKind, Reply, RequestHeader, RequestId, Status, VERSION,
};

/// The `utmem-hostd` binary of this build (target/<profile>/utmem-hostd), or `$UTMEM_HOSTD`.
pub fn hostd_binary() -> PathBuf {
    artifact("utmem-hostd", "UTMEM_HOSTD", "utmem-host")
}

/// `$env` if set, else `name` from this build, which must exist (built by `package`).
fn artifact(name: &str, env: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let bin = sibling(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p {package}), or set {env}",
        bin.display()
    );
    bin
}

/// `name` in target/<profile>/, seen from a test (target/<profile>/deps/) or a binary
/// (target/<profile>/) of this build.
fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>").join(name)
    } else {
        dir.join(name)
    }
}

/// A running utmem-hostd; killed (and its stderr kept) when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    args: Vec<String>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with a guest socket `g.sock`, an admin socket and `extra` args.
    pub fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let sock = dir.path().join("g.sock");
        let admin = dir.path().join("admin.sock");
        let log = dir.path().join("hostd.log");
        let mut args: Vec<String> = vec![
            format!("--listen=unix:{}", sock.display()),
            format!("--admin=unix:{}", admin.display()),
        ];
        args.extend(
            extra
                .iter()
                .map(|s| s.replace("$DIR", &dir.path().display().to_string())),
        );
        let child = spawn(&args, &log);
        let d = Daemon {
            child,
            args,
            dir,
            sock,
            admin,
            log,
        };
        d.wait_for(&d.sock);
        d.wait_for(&d.admin);
        // And every extra Unix listener (`--listen=unix:PATH[=NAME]`) the test gave.
        for a in &d.args {
            if let Some(rest) = a.strip_prefix("--listen=unix:") {
                let path = rest.split('=').next().unwrap_or(rest);
                d.wait_for(Path::new(path));
            }
        }
        d
    }

    /// Kills the daemon (SIGKILL: its memory is gone) and starts it again with the same
    /// arguments on the same sockets (the stale socket files are replaced).
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.args, &self.log);
        self.wait_for(&self.sock);
        self.wait_for(&self.admin);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_for(&self, p: &Path) {
        let t0 = Instant::now();
        while UnixStream::connect(p).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{} never came up: {}",
                p.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
        if sig == nix::sys::signal::Signal::SIGSTOP {
            // kill() returns before every thread has stopped; wait until they have.
            let t0 = Instant::now();
            while !self.all_threads_stopped() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the daemon never stopped"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// True when every thread of the daemon is in state T (stopped).
    pub fn all_threads_stopped(&self) -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        })
    }

    /// `utmem-hostd <args> --admin PATH`, returning (status ok, stdout, stderr).
    pub fn admin_cmd(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(hostd_binary())
            .args(args)
            .arg("--admin")
            .arg(&self.admin)
            .output()
            .expect("run admin command");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .expect("kb")
            .parse()
            .expect("number");
        kb * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(hostd_binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn utmem-hostd")
}

/// A blocking, one-request-at-a-time connection speaking raw frames.
#[derive(Debug)]
pub struct Conn {
    pub s: UnixStream,
    buf: BytesMut,
    next: u64,
}

impl Conn {
    pub fn connect(p: &Path) -> Conn {
        let s = UnixStream::connect(p).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Conn {
            s,
            buf: BytesMut::new(),
            next: 1,
        }
    }

    pub fn call(&mut self, mut h: RequestHeader, payload: &[u8]) -> Reply {
        h.id = RequestId(self.next);
        self.next += 1;
        let mut out = BytesMut::new();
        encode_request(&h, payload, &mut out);
        self.s.write_all(&out).expect("write");
        let r = read_reply(&mut self.s, &mut self.buf).expect("reply");
        assert_eq!(r.header.id, h.id);
        assert_eq!(r.header.op, h.op);
        r
    }

    /// Like [`Conn::call`], but a dead peer is an error instead of a panic.
    pub fn try_call(&mut self, mut h: RequestHeader, payload: &[u8]) -> std::io::Result<Reply> {
        h.id = RequestId(self.next);
        self.next += 1;
        let mut out = BytesMut::new();
        encode_request(&h, payload, &mut out);
        self.s.write_all(&out)?;
        read_reply(&mut self.s, &mut self.buf)
    }

    pub fn hello(&mut self) -> HelloReply {
        let p = HelloRequest {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: 0,
        };
        let r = self.call(RequestHeader::new(Op::Hello, RequestId(0)), &p.encode());
        assert_eq!(r.header.status, Status::Ok);
        HelloReply::decode(&r.payload).expect("hello reply")
    }

    pub fn open(&mut self, kind: PoolKind, ephemeral: bool) -> Result<PoolId, Status> {
        self.open_with(NewPool {
            kind,
            ephemeral,
            durable: false,
        })
    }

    /// NEW_POOL with every flag as given.
    pub fn open_with(&mut self, req: NewPool) -> Result<PoolId, Status> {
        let (flags, payload) = req.encode();
        let mut h = RequestHeader::new(Op::NewPool, RequestId(0));
        h.flags = flags;
        let r = self.call(h, &payload);
        match r.header.status {
            Status::Ok => Ok(PoolId(u32::from_le_bytes(
                r.payload[..4].try_into().expect("4"),
            ))),
            s => Err(s),
        }
    }

    pub fn open_private(&mut self, name: &str) -> PoolId {
        self.open(PoolKind::Private(name.into()), false)
            .expect("open pool")
    }

    pub fn keyed(op: Op, pool: PoolId, key: Key) -> RequestHeader {
        RequestHeader {
            pool,
            key,
            ..RequestHeader::new(op, RequestId(0))
        }
    }

    pub fn put(&mut self, pool: PoolId, key: Key, v: &[u8]) -> Status {
        self.call(Self::keyed(Op::Put, pool, key), v).header.status
    }

    pub fn get(&mut self, pool: PoolId, key: Key) -> Result<Vec<u8>, Status> {
        let r = self.call(Self::keyed(Op::Get, pool, key), &[]);
        match r.header.status {
            Status::Ok => Ok(r.payload.to_vec()),
            s => Err(s),
        }
    }

    pub fn flush(&mut self, pool: PoolId, key: Key) -> Status {
        self.call(Self::keyed(Op::Flush, pool, key), &[])
            .header
            .status
    }

    pub fn stats(&mut self) -> IdentityStats {
        let r = self.call(RequestHeader::new(Op::Stats, RequestId(0)), &[]);
        IdentityStats::decode(&r.payload).expect("stats")
    }
}

/// Reads one whole reply.
pub fn read_reply(s: &mut UnixStream, buf: &mut BytesMut) -> std::io::Result<Reply> {
    loop {
        if let Some(r) = decode_reply(buf, &Limits::default())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            return Ok(r);
        }
        let mut chunk = vec![0u8; 256 * 1024];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// True once the peer has closed the connection (EOF or reset), within 10 s.
pub fn closed_by_peer(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The module of this build (target/<profile>/libredis_utmem.so), or `$UTMEM_MODULE`.
pub fn module_path() -> PathBuf {
    artifact("libredis_utmem.so", "UTMEM_MODULE", "redis-utmem")
}

/// The server binary: `$UTMEM_REDIS_SERVER` (e.g. valkey-server) or `redis-server`.
pub fn server_binary() -> String {
    std::env::var("UTMEM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A running redis-server (or valkey-server) in a temp dir on a free port, killed on drop.
#[derive(Debug)]
pub struct Redis {
    pub child: Child,
    /// The TCP port (0 for a server that listens on [`Redis::unix`] only).
    pub port: u16,
    /// Its Unix socket, for a server without TCP.
    pub unix: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Redis {
    /// Waits until no PUT is in flight (`utmem_pending` is 0): every value UTMEM.SET
    /// answered is on the host or kept in Redis. Over a channel, +OK comes when the
    /// PUT is in the ring, before the host has the value.
    pub fn wait_offloaded(&self) {
        let t0 = std::time::Instant::now();
        while self.info("utmem", "utmem_pending") != "0" {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "PUTs still in flight after 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Starts a server with the module loaded (`module_args` after the module path) and
    /// `extra` server arguments (e.g. `--appendonly yes`).
    pub fn start(module_args: &[&str], extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, module_args, extra)
    }

    /// Like [`Redis::start`] in a given directory (to restart from its dump).
    pub fn start_in(dir: tempfile::TempDir, module_args: &[&str], extra: &[&str]) -> Redis {
        Self::start_with(dir, free_port(), module_args, extra)
    }

    /// A Redis Cluster node: cluster mode on, on a port whose cluster bus port (+10000)
    /// is free too.
    pub fn start_cluster_node(module_args: &[&str], extra: &[&str]) -> Redis {
        let port = loop {
            let p = free_port();
            let Some(bus) = p.checked_add(10_000) else {
                continue;
            };
            if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
                break p;
            }
        };
        let mut all = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        all.extend_from_slice(extra);
        Self::start_with(
            tempfile::tempdir().expect("tempdir"),
            port,
            module_args,
            &all,
        )
    }

    /// A server that listens on a Unix socket in its directory only (`port 0`), as
    /// containers often run it.
    pub fn start_unix(dir: tempfile::TempDir, module_args: &[&str]) -> Redis {
        let sock = dir.path().join("redis.sock").display().to_string();
        Self::start_with(dir, 0, module_args, &["--unixsocket", &sock])
    }

    fn start_with(
        dir: tempfile::TempDir,
        port: u16,
        module_args: &[&str],
        extra: &[&str],
    ) -> Redis {
        let unix = (port == 0).then(|| dir.path().join("redis.sock"));
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--logfile".into(),
            dir.path().join("redis.log").display().to_string(),
            "--save".into(),
            "".into(),
            "--enable-debug-command".into(),
            "yes".into(),
            "--enable-module-command".into(),
            "yes".into(),
        ];
        if !module_args.contains(&"--no-module") {
            args.push("--loadmodule".into());
            args.push(module_path().display().to_string());
            // Options for a whole run (e.g. `channel no`), before the test's own,
            // which win.
            if let Ok(run) = std::env::var("UTMEM_MODULE_ARGS") {
                args.extend(run.split_whitespace().map(str::to_owned));
            }
            args.extend(module_args.iter().map(|s| s.to_string()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(server_binary())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut r = Redis {
            child,
            port,
            unix,
            dir,
            args,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("redis-server exited ({st}): {}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "redis never came up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let url = match &self.unix {
            Some(p) => format!("redis+unix://{}", p.display()),
            None => format!("redis://127.0.0.1:{}/", self.port),
        };
        let c = redis::Client::open(url)?;
        c.get_connection_with_timeout(Duration::from_secs(5))
    }

    /// A new connection (60 s read timeout so a hang fails the test instead of CI).
    pub fn conn(&self) -> redis::Connection {
        let c = self.try_conn().expect("connect to redis");
        c.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        c
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// One INFO field as text.
    pub fn info(&self, section: &str, field: &str) -> String {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query(&mut self.conn())
            .expect("INFO");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The module's pool on the host (INFO utmem's `utmem_pool`).
    pub fn pool(&self) -> String {
        self.info("utmem", "utmem_pool")
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGKILL, then start again with the same arguments and directory (same port).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Command::new(server_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.wait_ready();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// (values, bytes) the host holds in pool `name` of any identity, from the admin socket.
    pub fn pool_usage(&self, name: &str) -> (u64, u64) {
        let (ok, out, err) = self.admin_cmd(&["stats", "--json"]);
        assert!(ok, "stats failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let mut total = (0, 0);
        for ident in v["identities"].as_array().into_iter().flatten() {
            for p in ident["pools"].as_array().into_iter().flatten() {
                if p["name"] == name {
                    total.0 += p["values"].as_u64().unwrap_or(0);
                    total.1 += p["bytes"].as_u64().unwrap_or(0);
                }
            }
        }
        total
    }

    /// Bytes the host holds for every identity (`stats --json`'s `used`).
    pub fn host_used(&self) -> u64 {
        let (ok, out, err) = self.admin_cmd(&["stats", "--json"]);
        assert!(ok, "stats failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["used"].as_u64().expect("stats has `used`")
    }

    /// Waits (up to 20 s) until pool `name` holds `values` values; returns the last usage.
    pub fn wait_pool_values(&self, name: &str, values: u64) -> (u64, u64) {
        let t0 = Instant::now();
        loop {
            let u = self.pool_usage(name);
            if u.0 == values || t0.elapsed() > Duration::from_secs(20) {
                return u;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `unix:<guest socket>`.
    pub fn spec(&self) -> String {
        format!("unix:{}", self.sock.display())
    }
}

/// `CONFIG SET name value` on a connection (panics on refusal).
pub fn config_set(c: &mut redis::Connection, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query::<()>(c)
        .unwrap_or_else(|e| panic!("CONFIG SET {name} {value}: {e}"));
}

/// A value of `len` bytes that encodes `(seed)` in every 8 bytes, so mix-ups show.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
