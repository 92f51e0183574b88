//! Debian's stock `redis-benchmark` as a second load driver for `compare`, the tool
//! users already trust: the same 50 clients, random keys (`-r`) and value sizes as
//! the built-in generator, one `--csv` row per run.
//!
//! Plain and utmem commands are both sent in redis-benchmark's custom-command form
//! (`SET key:__rand_int__ <value>`, `UTMEM.SET key:__rand_int__ <value>`), so the two
//! sides differ only in the command's name. The value travels as one argv string,
//! and Linux caps one at 128 KiB: sizes above [`MAX_VALUE`] are not run.

use std::process::Command;

use serde::Serialize;

/// Largest value size sent through redis-benchmark (half of Linux's 128 KiB argv
/// string cap, a power of two like the compared sizes).
pub const MAX_VALUE: usize = 64 << 10;

/// What one redis-benchmark run reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Requests per second.
    pub ops: f64,
    /// Mean latency, µs.
    pub avg_us: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 95th percentile, µs.
    pub p95_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Worst latency, µs.
    pub max_us: f64,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Redis port on 127.0.0.1.
    pub port: u16,
    /// SET, GET, UTMEM.SET or UTMEM.GET.
    pub command: String,
    /// Whether the command takes a value (SET forms).
    pub with_value: bool,
    /// Connections (`-c`).
    pub clients: usize,
    /// Requests (`-n`).
    pub requests: u64,
    /// Keys are `key:<12 digits below keyspace>` (`-r`).
    pub keyspace: u64,
    /// Value size in bytes.
    pub size: usize,
}

impl Spec {
    /// The arguments, with the value (if any) last.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-p",
            &self.port.to_string(),
            "-c",
            &self.clients.to_string(),
            "-n",
            &self.requests.to_string(),
            "-r",
            &self.keyspace.to_string(),
            "--csv",
            &self.command,
            "key:__rand_int__",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if self.with_value {
            a.push("x".repeat(self.size));
        }
        a
    }

    /// The command line a person would type (the value as a shell expansion).
    pub fn shell_line(&self) -> String {
        let mut a = self.args();
        if self.with_value {
            a.pop();
            a.push(format!(
                "\"$(head -c {} /dev/zero | tr '\\0' x)\"",
                self.size
            ));
        }
        format!("redis-benchmark {}", a.join(" "))
    }
}

/// The key redis-benchmark's `-r` makes of `n`: `key:` and 12 digits.
pub fn key(n: u64) -> String {
    format!("key:{n:012}")
}

/// Runs redis-benchmark (`$UTMEM_REDIS_BENCHMARK` or `redis-benchmark`).
pub fn run(spec: &Spec) -> anyhow::Result<Figures> {
    anyhow::ensure!(
        spec.size <= MAX_VALUE,
        "redis-benchmark cannot send {} B values (at most {MAX_VALUE} B in one argv string)",
        spec.size
    );
    let bin = std::env::var("UTMEM_REDIS_BENCHMARK").unwrap_or_else(|_| "redis-benchmark".into());
    let out = Command::new(&bin)
        .args(spec.args())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {bin} (apt-get install redis-tools): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{bin} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse_csv(&stdout)
}

/// The figures of redis-benchmark's `--csv` output (Redis 7.0: a header, then one
/// row per test: `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
/// "p95_latency_ms","p99_latency_ms","max_latency_ms"`). A custom command's test
/// name is the command line itself, value included, so fields are taken from the end.
pub fn parse_csv(out: &str) -> anyhow::Result<Figures> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("redis-benchmark printed nothing"))?;
    let names: Vec<&str> = header.split(',').map(|f| f.trim_matches('"')).collect();
    let row = lines
        .next_back()
        .ok_or_else(|| anyhow::anyhow!("redis-benchmark printed no result row"))?;
    let n = names.len();
    anyhow::ensure!(
        n >= 2 && names[0] == "test",
        "unexpected CSV header {header:?}"
    );
    // The test name may itself hold commas: split the row from the right.
    let mut fields: Vec<&str> = row.rsplitn(n, ',').collect();
    fields.reverse();
    anyhow::ensure!(fields.len() == n, "unexpected CSV row {row:.80}...");
    let get = |name: &str| -> anyhow::Result<f64> {
        let i = names
            .iter()
            .position(|x| *x == name)
            .ok_or_else(|| anyhow::anyhow!("redis-benchmark's CSV has no {name} column"))?;
        let v = fields[i].trim().trim_matches('"');
        v.parse()
            .map_err(|e| anyhow::anyhow!("{name} = {v:?} in redis-benchmark's CSV: {e}"))
    };
    let ms = |name: &str| get(name).map(|v| v * 1000.0);
    Ok(Figures {
        ops: get("rps")?,
        avg_us: ms("avg_latency_ms")?,
        p50_us: ms("p50_latency_ms")?,
        p95_us: ms("p95_latency_ms")?,
        p99_us: ms("p99_latency_ms")?,
        max_us: ms("max_latency_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_7_csv_with_a_custom_command_title() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"UTMEM.SET key:__rand_int__ x,y\",\"9708.74\",\"3.635\",\"0.144\",\"0.967\",\"15.991\",\"19.663\",\"20.239\"\n";
        let f = parse_csv(out).unwrap();
        assert_eq!(f.ops, 9708.74);
        assert!((f.p50_us - 967.0).abs() < 1e-6);
        assert!((f.p99_us - 19663.0).abs() < 1e-6);
        assert!((f.max_us - 20239.0).abs() < 1e-6);
        assert!(parse_csv("").is_err());
        assert!(parse_csv("\"test\",\"rps\"\n\"GET\",\"fast\"\n").is_err());
    }

    #[test]
    fn command_lines() {
        let s = Spec {
            port: 6379,
            command: "UTMEM.SET".into(),
            with_value: true,
            clients: 50,
            requests: 1000,
            keyspace: 100,
            size: 4,
        };
        assert_eq!(s.args().last().unwrap(), "xxxx");
        assert_eq!(
            s.shell_line(),
            "redis-benchmark -p 6379 -c 50 -n 1000 -r 100 --csv UTMEM.SET key:__rand_int__ \"$(head -c 4 /dev/zero | tr '\\0' x)\""
        );
        assert_eq!(key(42), "key:000000000042");
    }
}
