//! `utmem-bench compare`: plain SET/GET against UTMEM.SET/UTMEM.GET on the same
//! server, same keyspace and request count, alternating rounds so drift hits
//! both; with Redis memory, host pool bytes and Redis main-thread CPU per request.
//! The load is the built-in generator ([`crate::load`]); with
//! [`Settings::redis_benchmark`], Debian's redis-benchmark also runs, right after it
//! in each round, for the sizes it can send ([`crate::redis_benchmark`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use utmem_testkit::{Daemon, Redis};

use crate::load::{self, Kind, Outcome};
use crate::redis_benchmark as rb;

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Value sizes.
    pub sizes: Vec<usize>,
    /// Connections.
    pub clients: usize,
    /// Rounds per size (each round runs plain and utmem once).
    pub rounds: usize,
    /// Bytes of values each run sends (bounds requests per size).
    pub bytes_per_run: u64,
    /// Fewest and most requests per run.
    pub min_requests: u64,
    /// Most requests per run.
    pub max_requests: u64,
    /// Module options beyond transport and threshold.
    pub module_options: Vec<(String, String)>,
    /// Also drive each size up to [`rb::MAX_VALUE`] with redis-benchmark.
    pub redis_benchmark: bool,
}

impl Settings {
    /// The full run, or `--quick` (under a minute).
    pub fn new(quick: bool) -> Self {
        Settings {
            sizes: vec![1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
            clients: 50,
            rounds: if quick { 1 } else { 3 },
            bytes_per_run: if quick { 192 << 20 } else { 1 << 30 },
            min_requests: if quick { 1500 } else { 5000 },
            max_requests: if quick { 15_000 } else { 100_000 },
            module_options: Vec::new(),
            redis_benchmark: false,
        }
    }

    fn requests(&self, size: usize) -> u64 {
        (self.bytes_per_run / size as u64).clamp(self.min_requests, self.max_requests)
    }

    fn keyspace(&self, size: usize) -> u64 {
        ((256u64 << 20) / size as u64).clamp(100, 10_000)
    }
}

/// One operation's figures (medians over rounds).
#[derive(Debug, Clone, Serialize)]
pub struct OpFigures {
    /// Requests per second.
    pub ops: f64,
    /// Median latency, µs.
    pub p50_us: u32,
    /// 99th percentile latency, µs.
    pub p99_us: u32,
    /// Redis main-thread CPU per request, µs.
    pub main_cpu_us: f64,
    /// Error replies.
    pub errors: u64,
}

/// One kind (plain or utmem) at one size.
#[derive(Debug, Clone, Serialize)]
pub struct KindFigures {
    /// SET or UTMEM.SET.
    pub set: OpFigures,
    /// GET or UTMEM.GET.
    pub get: OpFigures,
    /// Redis used_memory above the empty server, with the keyspace filled.
    pub used_memory: i64,
    /// Redis RSS with the keyspace filled.
    pub rss: i64,
    /// Bytes in the host pool.
    pub pool_bytes: u64,
    /// The same commands driven by redis-benchmark (when it ran at this size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_benchmark: Option<DriverFigures>,
}

/// SET and GET figures of one driver.
#[derive(Debug, Clone, Serialize)]
pub struct DriverFigures {
    /// SET or UTMEM.SET.
    pub set: OpFigures,
    /// GET or UTMEM.GET.
    pub get: OpFigures,
}

/// One value size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// Value size.
    pub size: usize,
    /// Requests per run.
    pub requests: u64,
    /// Keys.
    pub keyspace: u64,
    /// Plain SET/GET.
    pub plain: KindFigures,
    /// UTMEM.SET/UTMEM.GET.
    pub utmem: KindFigures,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: String,
    /// Redis version.
    pub redis: String,
    /// Connections.
    pub clients: usize,
    /// Rounds per size.
    pub rounds: usize,
    /// Module options given beyond transport and threshold.
    pub module_options: Vec<(String, String)>,
    /// Per size.
    pub sizes: Vec<SizeResult>,
}

/// CPU time (user+system) of a thread, in µs, from /proc.
fn thread_cpu_us(pid: u32, tid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may contain spaces), 1-based 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .unwrap_or(100);
    ticks * 1_000_000 / hz
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn median_u32(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

struct Bench<'a> {
    redis: &'a Redis,

    stop: &'a dyn Fn() -> bool,
}

impl Bench<'_> {
    fn flushall(&self) -> anyhow::Result<()> {
        let mut c = self.redis.conn();
        let _: () = redis::cmd("FLUSHALL").query(&mut c)?;
        self.wait_offloaded()?;
        Ok(())
    }

    fn wait_offloaded(&self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while self.redis.info("utmem", "utmem_pending") != "0" {
            if t0.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("values stayed pending for a minute");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn used(&self) -> (i64, i64) {
        let u = self
            .redis
            .info("memory", "used_memory")
            .parse()
            .unwrap_or(0);
        let r = self
            .redis
            .info("memory", "used_memory_rss")
            .parse()
            .unwrap_or(0);
        (u, r)
    }

    fn run(&self, spec: &load::Spec, value: &[u8]) -> anyhow::Result<(Outcome, f64)> {
        let pid = self.redis.child.id();
        let cpu0 = thread_cpu_us(pid, pid);
        let out = load::run(spec, value, self.stop)?;
        if spec.kind == Kind::Set {
            self.wait_offloaded()?;
        }
        let cpu = thread_cpu_us(pid, pid).saturating_sub(cpu0);
        let per = cpu as f64 / out.done.max(1) as f64;
        Ok((out, per))
    }

    /// One redis-benchmark run, and the main thread's CPU per request.
    fn run_rb(&self, spec: &rb::Spec) -> anyhow::Result<(rb::Figures, f64)> {
        let pid = self.redis.child.id();
        let cpu0 = thread_cpu_us(pid, pid);
        let f = rb::run(spec)?;
        if spec.with_value {
            self.wait_offloaded()?;
            let mut c = self.redis.conn();
            let keys: u64 = redis::cmd("DBSIZE").query(&mut c)?;
            // redis-benchmark counts error replies as answers: make sure values landed.
            anyhow::ensure!(
                keys > 0,
                "redis-benchmark's {} stored nothing",
                spec.command
            );
        }
        let cpu = thread_cpu_us(pid, pid).saturating_sub(cpu0);
        Ok((f, cpu as f64 / spec.requests.max(1) as f64))
    }

    /// Fills every key (so GETs hit), then measures memory.
    fn fill(
        &self,
        command: &str,
        keyspace: u64,
        value: &[u8],
        key: fn(u64) -> String,
    ) -> anyhow::Result<()> {
        let mut c = self.redis.conn();
        for chunk in (0..keyspace).collect::<Vec<_>>().chunks(64) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd(command).arg(key(*k)).arg(value).ignore();
            }
            let _: () = p.query(&mut c)?;
        }
        self.wait_offloaded()
    }
}

fn rb_figures(runs: &[(rb::Figures, f64)]) -> OpFigures {
    // Clamped to u32's range first, so the cast cannot wrap.
    #[allow(clippy::cast_possible_truncation)]
    let us = |v: f64| v.round().clamp(0.0, f64::from(u32::MAX)) as u32;
    OpFigures {
        ops: median(runs.iter().map(|(f, _)| f.ops).collect()),
        p50_us: median_u32(runs.iter().map(|(f, _)| us(f.p50_us)).collect()),
        p99_us: median_u32(runs.iter().map(|(f, _)| us(f.p99_us)).collect()),
        main_cpu_us: median(runs.iter().map(|(_, c)| *c).collect()),
        errors: 0,
    }
}

fn figures(runs: &[(Outcome, f64)]) -> OpFigures {
    OpFigures {
        ops: median(runs.iter().map(|(o, _)| o.ops()).collect()),
        p50_us: median_u32(runs.iter().map(|(o, _)| o.pct(500)).collect()),
        p99_us: median_u32(runs.iter().map(|(o, _)| o.pct(990)).collect()),
        main_cpu_us: median(runs.iter().map(|(_, c)| *c).collect()),
        errors: runs.iter().map(|(o, _)| o.errors).sum(),
    }
}

/// Runs the comparison; progress on stderr.
pub fn run(s: &Settings, stop: &dyn Fn() -> bool) -> anyhow::Result<Report> {
    eprintln!("compare: starting utmem-hostd and redis-server");
    // `--module-option durable=yes`: the host keeps the pool in a data directory.
    let durable = s
        .module_options
        .iter()
        .any(|(n, v)| n == "durable" && v == "yes");
    let daemon = if durable {
        Daemon::start(&["--capacity=8G", "--data-dir=$DIR/data", "--fsync=10ms"])
    } else {
        Daemon::start(&["--capacity=8G"])
    };
    let spec = daemon.spec();
    let args = crate::module_args(&spec, &s.module_options);
    let redis = Redis::start(&args, &["--maxmemory", "0"]);
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse()?;
    let b = Bench {
        redis: &redis,
        stop,
    };
    let pool = redis.pool();
    let version = redis.info("server", "redis_version");
    let mut sizes = Vec::new();
    let total = s.sizes.len() * s.rounds * 2;
    if s.redis_benchmark {
        eprintln!(
            "compare: redis-benchmark also drives sizes up to {} B, e.g. {}",
            rb::MAX_VALUE,
            rb_spec(redis.port, "UTMEM.SET", true, s, 1024).shell_line()
        );
    }
    let mut step = 0;
    for &size in &s.sizes {
        let requests = s.requests(size);
        let keyspace = s.keyspace(size);
        let value = vec![b'x'; size];
        let mut runs: [[Vec<(Outcome, f64)>; 2]; 2] = Default::default(); // [plain|utmem][set|get]
        let mut rb_runs: [[Vec<(rb::Figures, f64)>; 2]; 2] = Default::default();
        let with_rb = s.redis_benchmark && size <= rb::MAX_VALUE;
        let mut mem = [(0i64, 0i64, 0u64); 2];
        for round in 0..s.rounds {
            // Alternate which goes first.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                if stop() {
                    anyhow::bail!("interrupted");
                }
                step += 1;
                let (set, get) = if which == 0 {
                    ("SET", "GET")
                } else {
                    ("UTMEM.SET", "UTMEM.GET")
                };
                eprintln!(
                    "compare [{step}/{total}]: {} B values, {set}/{get}, {requests} requests x2, {} clients",
                    size, s.clients
                );
                b.flushall()?;
                let base = b.used().0;
                let spec = |command: &str, kind| load::Spec {
                    addr,
                    command: command.into(),
                    kind,
                    clients: s.clients,
                    requests,
                    keyspace,
                    size,
                };
                let r = b.run(&spec(set, Kind::Set), &value)?;
                runs[which][0].push(r);
                b.fill(set, keyspace, &value, |k| format!("key:{k}"))?;
                let (u, rss) = b.used();
                let pool_bytes = daemon.pool_usage(&pool).1;
                mem[which] = (u - base, rss, pool_bytes);
                let r = b.run(&spec(get, Kind::Get), &value)?;
                runs[which][1].push(r);
                if with_rb {
                    eprintln!("compare [{step}/{total}]: the same with redis-benchmark");
                    b.flushall()?;
                    let r = b.run_rb(&rb_spec(redis.port, set, true, s, size))?;
                    rb_runs[which][0].push(r);
                    b.fill(set, keyspace, &value, rb::key)?;
                    let r = b.run_rb(&rb_spec(redis.port, get, false, s, size))?;
                    rb_runs[which][1].push(r);
                }
            }
        }
        b.flushall()?;
        let kind = |w: usize| KindFigures {
            set: figures(&runs[w][0]),
            get: figures(&runs[w][1]),
            used_memory: mem[w].0,
            rss: mem[w].1,
            pool_bytes: mem[w].2,
            redis_benchmark: with_rb.then(|| DriverFigures {
                set: rb_figures(&rb_runs[w][0]),
                get: rb_figures(&rb_runs[w][1]),
            }),
        };
        let r = SizeResult {
            size,
            requests,
            keyspace,
            plain: kind(0),
            utmem: kind(1),
        };
        eprintln!(
            "compare: {} B: GET {:.2}x, SET {:.2}x of plain",
            size,
            r.utmem.get.ops / r.plain.get.ops.max(1e-9),
            r.utmem.set.ops / r.plain.set.ops.max(1e-9)
        );
        sizes.push(r);
    }
    Ok(Report {
        machine: machine(),
        redis: version,
        clients: s.clients,
        rounds: s.rounds,
        module_options: s.module_options.clone(),
        sizes,
    })
}

/// The redis-benchmark run matching the built-in generator's at `size`.
fn rb_spec(port: u16, command: &str, with_value: bool, s: &Settings, size: usize) -> rb::Spec {
    rb::Spec {
        port,
        command: command.into(),
        with_value,
        clients: s.clients,
        requests: s.requests(size),
        keyspace: s.keyspace(size),
        size,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
