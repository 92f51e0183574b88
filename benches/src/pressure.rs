//! `utmem-bench pressure`: the utmem paper's Fig. 5. Redis is confined to a memory
//! cgroup of L bytes with swap available; datasets of 0.5×, 1.0× and 1.5× L of 16 KiB
//! values are written and read with plain SET/GET (Redis swaps) and with
//! UTMEM.SET/GET (the values live in utmem-hostd, outside the cgroup).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use utmem_testkit::{Daemon, Redis};

use crate::load::{self, Kind};

/// Settings of the experiment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Memory limit L of Redis's cgroup.
    pub limit: u64,
    /// Dataset sizes as multiples of L.
    pub factors: Vec<f64>,
    /// Value size.
    pub value: usize,
    /// Requests per run.
    pub requests: u64,
    /// Connections.
    pub clients: usize,
    /// Where the swap file goes if one is needed.
    pub swap_dir: PathBuf,
    /// Module options beyond transport and threshold.
    pub module_options: Vec<(String, String)>,
}

/// One (factor, kind) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// SET ops/s.
    pub set_ops: f64,
    /// SET p99 µs.
    pub set_p99_us: u32,
    /// GET ops/s.
    pub get_ops: f64,
    /// GET p99 µs.
    pub get_p99_us: u32,
    /// Error replies.
    pub errors: u64,
    /// Why there are no figures (redis-server died, e.g. killed by the OOM killer).
    pub failed: Option<String>,
}

/// One dataset size.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Multiple of L.
    pub factor: f64,
    /// Values in the dataset.
    pub values: u64,
    /// Plain SET/GET.
    pub plain: Cell,
    /// UTMEM.SET/GET.
    pub utmem: Cell,
}

/// The experiment's result, with what could not be set up.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// L in bytes.
    pub limit: u64,
    /// Rows.
    pub rows: Vec<Row>,
    /// Set-up problems (the figures mean less for each).
    pub problems: Vec<String>,
    /// Module options given beyond transport and threshold.
    pub module_options: Vec<(String, String)>,
}

/// A memory cgroup, removed (its processes moved back to the root) on drop.
struct Cgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    fn create(limit: u64) -> Result<Cgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let name = format!("utmem-bench-{}", std::process::id());
        let (root, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.to_path_buf(), "memory.limit_in_bytes")
        } else if v2.exists() {
            (PathBuf::from("/sys/fs/cgroup"), "memory.max")
        } else {
            return Err("no cgroup memory controller (neither v1 nor v2) is mounted".into());
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cg = Cgroup { dir, root };
        std::fs::write(cg.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("cannot set {limit_file}: {e}"))?;
        // v1: prefer swapping anonymous memory over the OOM killer.
        let _ = std::fs::write(cg.dir.join("memory.swappiness"), "100");
        Ok(cg)
    }

    fn add(&self, pid: u32) -> Result<(), String> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("cannot move pid {pid} into {}: {e}", self.dir.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in pids.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A swap file, switched off and removed on drop.
struct Swap(PathBuf);

impl Swap {
    fn create(dir: &Path) -> Result<Swap, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let f = dir.join("utmem-bench.swap");
        let run = |cmd: &str, args: &[&str]| -> Result<(), String> {
            let st = Command::new(cmd)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("{cmd}: {e}"))?;
            st.success()
                .then_some(())
                .ok_or(format!("{cmd} {args:?} failed"))
        };
        let p = f.display().to_string();
        run("fallocate", &["-l", "2G", &p])?;
        run("chmod", &["600", &p])?;
        run("mkswap", &[&p])?;
        run("swapon", &[&p]).inspect_err(|_| {
            let _ = std::fs::remove_file(&f);
        })?;
        Ok(Swap(f))
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
        let _ = std::fs::remove_file(&self.0);
    }
}

fn swap_present() -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() > 1)
}

fn cell(
    redis: &Redis,
    values: u64,
    s: &Settings,
    (set, get): (&str, &str),
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<Cell> {
    let addr: SocketAddr = format!("127.0.0.1:{}", redis.port).parse()?;
    let value = vec![b'v'; s.value];
    eprintln!("pressure:   filling {values} keys with {set}");
    let fill = load::Spec {
        addr,
        command: set.into(),
        kind: Kind::Set,
        clients: s.clients,
        requests: values,
        keyspace: values,
        size: s.value,
    };
    // Random keys do not cover the keyspace; a sequential pass would need its own mode,
    // so fill with twice the requests (covers ~86% of keys).
    load::run(
        &load::Spec {
            requests: values * 2,
            ..fill.clone()
        },
        &value,
        stop,
    )?;
    let spec = |command: &str, kind| load::Spec {
        command: command.into(),
        kind,
        requests: s.requests,
        ..fill.clone()
    };
    eprintln!("pressure:   {} x {set}", s.requests);
    let w = load::run(&spec(set, Kind::Set), &value, stop)?;
    eprintln!("pressure:   {} x {get}", s.requests);
    let r = load::run(&spec(get, Kind::Get), &value, stop)?;
    Ok(Cell {
        set_ops: w.ops(),
        set_p99_us: w.pct(990),
        get_ops: r.ops(),
        get_p99_us: r.pct(990),
        errors: w.errors + r.errors,
        failed: None,
    })
}

/// Runs the experiment; progress on stderr.
pub fn run(s: &Settings, stop: &dyn Fn() -> bool) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    if !root {
        problems.push("not root: no cgroup and no swap file; Redis is not confined".into());
    }
    let _swap = if root && !swap_present() {
        match Swap::create(&s.swap_dir) {
            Ok(sw) => {
                eprintln!("pressure: swap file {} on", sw.0.display());
                Some(sw)
            }
            Err(e) => {
                problems.push(format!("no swap: {e}"));
                None
            }
        }
    } else {
        None
    };
    let daemon = Daemon::start(&["--capacity=8G"]);
    let mut rows = Vec::new();
    for &factor in &s.factors {
        // factor is a small positive multiple, so this fits.
        #[allow(clippy::cast_possible_truncation)]
        let values = ((s.limit as f64 * factor) / s.value as f64) as u64;
        let mut cells = Vec::new();
        for (kind, cmds) in [
            ("plain", ("SET", "GET")),
            ("utmem", ("UTMEM.SET", "UTMEM.GET")),
        ] {
            if stop() {
                anyhow::bail!("interrupted");
            }
            eprintln!(
                "pressure: {factor}x L = {values} values of {} B, {kind}",
                s.value
            );
            let spec = daemon.spec();
            let args = crate::module_args(&spec, &s.module_options);
            let redis = Redis::start(&args, &[]);
            let cg = if root {
                match Cgroup::create(s.limit).and_then(|cg| cg.add(redis.child.id()).map(|()| cg)) {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            } else {
                None
            };
            let mut redis = redis;
            let c = match cell(&redis, values, s, cmds, stop) {
                Ok(c) => c,
                // Plain Redis swapping in a small cgroup may be OOM-killed: that is a
                // result (it did not survive), not a reason to stop the experiment.
                Err(e) if !redis.alive() => {
                    let why = format!(
                        "{kind} redis-server at {factor}x L died ({e}); the kernel log says why \
                         (a memory cgroup OOM kill shows as `Memory cgroup out of memory`)"
                    );
                    eprintln!("pressure: {why}");
                    problems.push(why.clone());
                    Cell {
                        set_ops: 0.0,
                        set_p99_us: 0,
                        get_ops: 0.0,
                        get_p99_us: 0,
                        errors: 0,
                        failed: Some(why),
                    }
                }
                Err(e) => return Err(e),
            };
            cells.push(c);
            drop(redis);
            drop(cg);
        }
        let utmem = cells.pop().unwrap_or_else(|| unreachable!());
        let plain = cells.pop().unwrap_or_else(|| unreachable!());
        if plain.failed.is_none() && utmem.failed.is_none() {
            eprintln!(
                "pressure: {factor}x L: GET {:.2}x, SET {:.2}x of plain",
                utmem.get_ops / plain.get_ops.max(1e-9),
                utmem.set_ops / plain.set_ops.max(1e-9)
            );
        }
        rows.push(Row {
            factor,
            values,
            plain,
            utmem,
        });
    }
    problems.dedup();
    Ok(Report {
        limit: s.limit,
        module_options: s.module_options.clone(),
        rows,
        problems,
    })
}

/// The table.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Redis in a memory cgroup of {} MiB with swap; 16 KiB values; 50 clients; module options: {}.\n",
        r.limit >> 20,
        crate::report::options_text(&r.module_options)
    );
    let _ = writeln!(out, "| dataset | SET ops/s plain | UTMEM.SET | ratio | SET p99 plain | UTMEM.SET p99 | GET ops/s plain | UTMEM.GET | ratio | GET p99 plain | UTMEM.GET p99 |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let (p, u) = (&row.plain, &row.utmem);
        if p.failed.is_some() || u.failed.is_some() {
            let show = |c: &Cell, ops: f64| match c.failed {
                Some(_) => "died".to_owned(),
                None => format!("{ops:.0}"),
            };
            let _ = writeln!(
                out,
                "| {:.1}× L ({} values) | {} | {} | — | | | {} | {} | — | | |",
                row.factor,
                row.values,
                show(p, p.set_ops),
                show(u, u.set_ops),
                show(p, p.get_ops),
                show(u, u.get_ops)
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {:.1}× L ({} values) | {:.0} | {:.0} | {:.2} | {} µs | {} µs | {:.0} | {:.0} | {:.2} | {} µs | {} µs |",
            row.factor, row.values, p.set_ops, u.set_ops, u.set_ops / p.set_ops.max(1e-9),
            p.set_p99_us, u.set_p99_us, p.get_ops, u.get_ops, u.get_ops / p.get_ops.max(1e-9),
            p.get_p99_us, u.get_p99_us
        );
    }
    for p in &r.problems {
        let _ = writeln!(out, "\nNote: {p}");
    }
    out
}
