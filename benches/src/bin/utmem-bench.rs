//! `utmem-bench`: is utmem worth it? Plain Redis against Redis with utmem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use utmem_benches::{compare, report};

/// Compare plain Redis with Redis + utmem on this machine.
#[derive(Debug, Parser)]
#[command(name = "utmem-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// SET/GET against UTMEM.SET/UTMEM.GET for 1 KiB .. 1 MiB values, 50 clients; starts
    /// its own utmem-hostd and redis-server and cleans up (also on Ctrl-C).
    Compare {
        /// One round, fewer requests: under a minute.
        #[arg(long)]
        quick: bool,
        /// Where to write compare.json, compare.svg and compare.png.
        #[arg(long, default_value = "target/utmem-bench")]
        out: PathBuf,
        /// Value sizes to run (bytes). [default: 1024,4096,16384,65536,262144,1048576]
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Extra module options, NAME=VALUE (repeatable), e.g. `set-ack=local`.
        /// [default: none]
        #[arg(long = "module-option", value_name = "NAME=VALUE")]
        module_options: Vec<String>,
        /// Load driver: `builtin` (utmem-bench's own generator, every size), or
        /// `redis-benchmark`: the built-in generator and, for sizes up to 64 KiB,
        /// Debian's redis-benchmark beside it (its rows in the same tables).
        #[arg(long, value_enum, default_value_t = Driver::Builtin)]
        driver: Driver,
    },
    /// PING latency while utmem-hostd is stopped (SIGSTOP) and clients wait in UTMEM.GET.
    Stall {
        /// Clients blocked in UTMEM.GET meanwhile.
        #[arg(long, default_value_t = 16)]
        waiting: usize,
        /// PINGs per measurement.
        #[arg(long, default_value_t = 2000)]
        pings: usize,
    },
    /// The memory-pressure experiment (the utmem paper's Fig. 5): Redis in a memory
    /// cgroup with swap, datasets of 0.5x, 1.0x and 1.5x its limit. Needs root to set up
    /// the cgroup and a swap file; removes them afterwards.
    Pressure {
        /// The cgroup's memory limit L, in MiB.
        #[arg(long, default_value_t = 256)]
        limit_mib: u64,
        /// Requests per run.
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Where to write the JSON (and the swap file while it runs).
        #[arg(long, default_value = "target/utmem-bench")]
        out: PathBuf,
        /// Extra module options, NAME=VALUE (repeatable), e.g. `set-ack=local`.
        /// [default: none]
        #[arg(long = "module-option", value_name = "NAME=VALUE")]
        module_options: Vec<String>,
    },
}

/// Who sends the requests in `compare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Driver {
    /// utmem-bench's own generator only.
    Builtin,
    /// The built-in generator plus redis-benchmark (sizes up to 64 KiB).
    RedisBenchmark,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            eprintln!("utmem-bench: cannot install a signal handler: {e}");
        }
    }
    let stopped = || stop.load(Ordering::Relaxed);
    match cli.command {
        Command::Stall { waiting, pings } => match utmem_benches::stall::run(waiting, pings) {
            Ok(r) => {
                println!(
                    "PING p50/p99: {}/{} us with the host running, {}/{} us with it stopped and {} clients waiting in UTMEM.GET",
                    r.running_us.0, r.running_us.1, r.stopped_us.0, r.stopped_us.1, r.waiting_clients
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("utmem-bench: {e}");
                ExitCode::from(1)
            }
        },
        Command::Pressure {
            limit_mib,
            requests,
            out,
            module_options,
        } => {
            let module_options = match split_options(&module_options) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("utmem-bench: {e}");
                    return ExitCode::from(2);
                }
            };
            let s = utmem_benches::pressure::Settings {
                module_options,
                limit: limit_mib << 20,
                factors: vec![0.5, 1.0, 1.5],
                value: 16 << 10,
                requests,
                clients: 50,
                swap_dir: out.clone(),
            };
            match utmem_benches::pressure::run(&s, &stopped) {
                Ok(r) => {
                    println!("{}", utmem_benches::pressure::markdown(&r));
                    let json = out.join("pressure.json");
                    if let Err(e) = serde_json::to_string_pretty(&r)
                        .map_err(anyhow::Error::from)
                        .and_then(|j| std::fs::write(&json, j).map_err(anyhow::Error::from))
                    {
                        eprintln!("utmem-bench: {e}");
                        return ExitCode::from(1);
                    }
                    eprintln!("utmem-bench: wrote {}", json.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("utmem-bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Compare {
            quick,
            out,
            sizes,
            module_options,
            driver,
        } => {
            let mut s = compare::Settings::new(quick);
            s.redis_benchmark = driver == Driver::RedisBenchmark;
            match split_options(&module_options) {
                Ok(o) => s.module_options = o,
                Err(e) => {
                    eprintln!("utmem-bench: {e}");
                    return ExitCode::from(2);
                }
            }
            if !sizes.is_empty() {
                s.sizes = sizes;
            }
            match compare::run(&s, &stopped) {
                Ok(r) => {
                    let md = report::markdown(&r);
                    println!("{md}");
                    if let Err(e) = std::fs::create_dir_all(&out) {
                        eprintln!("utmem-bench: cannot create {}: {e}", out.display());
                        return ExitCode::from(1);
                    }
                    let json = out.join("compare.json");
                    let svg = out.join("compare.svg");
                    let png = out.join("compare.png");
                    let written = serde_json::to_string_pretty(&r)
                        .map_err(anyhow::Error::from)
                        .and_then(|j| std::fs::write(&json, j).map_err(anyhow::Error::from))
                        .and_then(|()| report::svg(&r, &svg));
                    match written {
                        Ok(()) => {
                            eprintln!(
                                "utmem-bench: wrote {} and {}",
                                json.display(),
                                svg.display()
                            );
                            // The PNG is a convenience: without rsvg-convert, say so and go on.
                            match report::png(&svg, &png) {
                                Ok(()) => eprintln!("utmem-bench: wrote {}", png.display()),
                                Err(e) => eprintln!("utmem-bench: no PNG: {e}"),
                            }
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("utmem-bench: {e}");
                            ExitCode::from(1)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("utmem-bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `NAME=VALUE` strings as (name, value) pairs.
fn split_options(opts: &[String]) -> Result<Vec<(String, String)>, String> {
    opts.iter()
        .map(|o| {
            o.split_once('=')
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--module-option {o:?}: expected NAME=VALUE"))
        })
        .collect()
}
