//! `utmem-hostd`: the utmem host daemon, and its operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use utmem_host::config::{default_capacity, parse_size, ConfigFile, ListenSpec};
use utmem_host::server::device::{self, DeviceListener};
use utmem_host::server::{
    default_io_threads, serve_all, Listener, ServerConfig, Timeouts, DEFAULT_MAX_CONNECTIONS,
};
use utmem_host::{admin, metrics};
use utmem_host::{DurableOptions, Policy, Store, StoreOptions, VALUE_OVERHEAD};
use utmem_proto::{DEFAULT_MAX_VALUE, MIN_MAX_VALUE};

/// The utmem host daemon: keeps guests' large values in memory pools on the host.
#[derive(Debug, Parser)]
#[command(name = "utmem-hostd", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where guests connect: unix:PATH, unix:PATH=NAME (every client is identity NAME,
    /// e.g. a VM's hybrid-vsock socket <uds>_<port>), vsock:PORT, or ivshmem:PATH=NAME
    /// (the ivshmem server for VM NAME's `ivshmem-doorbell` device, its `/dev/utmem`;
    /// give its hybrid-vsock listener the same NAME). Repeatable.
    /// [default: none; the config file's `listen`]
    #[arg(long, value_name = "SPEC")]
    listen: Vec<ListenSpec>,
    /// Host-wide cap on stored value bytes (e.g. 8G). [default: half of physical memory]
    #[arg(long, value_parser = parse_size)]
    capacity: Option<u64>,
    /// Cap on the bytes of each identity (a cap, not a reservation). [default: the capacity]
    #[arg(long, value_parser = parse_size)]
    quota: Option<u64>,
    /// Largest value a guest may store: at least 512M (the default, Redis's bulk
    /// limit); it can only be raised.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_MAX_VALUE)]
    max_value: u64,
    /// Connections one identity may have open; more are answered DENIED and closed.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Pools one identity may have open; NEW_POOL beyond is answered NO_SPACE.
    #[arg(long, default_value_t = DEFAULT_MAX_POOLS, value_parser = clap::value_parser!(u64).range(1..))]
    max_pools: u64,
    /// Drop a connection that stalls in the middle of a request for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    read_timeout: Duration,
    /// Drop a connection that takes none of its waiting replies for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    write_timeout: Duration,
    /// Threads serving the connections. [default: one per core, at most 4]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    io_threads: Option<u64>,
    /// Threads serving shared-memory channels of local clients; 0 offers no channels
    /// (clients then use their Unix socket for everything).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=16))]
    channel_threads: u64,
    /// TOML file with per-identity quotas and shared-pool grants; re-read on SIGHUP.
    /// [default: none]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The operator's socket (created with mode 0600): unix:PATH. [default: none]
    #[arg(long, value_name = "unix:PATH")]
    admin: Option<String>,
    /// Drop the pools of an identity that has had no connection for this long (e.g. 1h).
    /// [default: never]
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_expiry: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9719): no
    /// authentication, and they name every identity and pool, so only loopback
    /// addresses unless --metrics-any-address. [default: none]
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Allow --metrics on a non-loopback address (anyone who reaches it sees the figures).
    #[arg(long, requires = "metrics")]
    metrics_any_address: bool,
    /// Keep durable pools (NEW_POOL with the durable flag) in this directory, and load
    /// them from it at start. [default: none; durable pools are refused]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// When durable pools' records reach the disk: `always` (each change is answered
    /// after its fdatasync, batched), an interval such as `10ms` (a machine crash
    /// loses at most that), or `never` (the kernel decides). A kill of the daemon
    /// loses nothing answered under any of them.
    #[arg(
        long,
        value_name = "POLICY",
        default_value = "10ms",
        requires = "data_dir"
    )]
    fsync: utmem_host::FsyncPolicy,
    /// Dead bytes in an identity's durable log that trigger a compaction, once they
    /// also outweigh the live ones.
    #[arg(long, value_parser = parse_size, default_value = "64M", requires = "data_dir")]
    compact_floor: u64,
    /// Log level; RUST_LOG overrides it.
    #[arg(long, default_value = "info",
          value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log_level: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print per-identity and per-pool values, bytes and counters of a running daemon.
    Stats {
        /// The daemon's admin socket.
        #[arg(long, value_name = "PATH")]
        admin: String,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Free every pool of an identity whose VM is gone (e.g. cid:3).
    DropIdentity {
        /// The identity.
        name: String,
        /// The daemon's admin socket.
        #[arg(long, value_name = "PATH")]
        admin: String,
    },
}

/// Default `--max-pools` (per identity).
const DEFAULT_MAX_POOLS: u64 = 1024;

fn admin_path(spec: &str) -> PathBuf {
    PathBuf::from(spec.strip_prefix("unix:").unwrap_or(spec))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Stats { admin, json }) => admin::stats(&admin_path(&admin)).map(|s| {
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print!("{}", admin::render(&s));
            }
        }),
        Some(Command::DropIdentity { name, admin }) => {
            admin::drop_identity(&admin_path(&admin), &name).map(|m| println!("{m}"))
        }
        None => return serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("utmem-hostd: {e}");
            ExitCode::from(1)
        }
    }
}

struct Settings {
    policy: Policy,
    capacity: u64,
    listen: Vec<ListenSpec>,
}

fn settings(args: &ServeArgs) -> Result<Settings, String> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p).map_err(|e| e.to_string())?,
        None => ConfigFile::default(),
    };
    let size = |s: &Option<String>| s.as_deref().map(parse_size).transpose();
    let capacity = match args.capacity {
        Some(c) => c,
        None => size(&file.capacity)
            .map_err(|e| e.to_string())?
            .unwrap_or_else(default_capacity),
    };
    let quota = match args.quota {
        Some(q) => q,
        None => size(&file.quota)
            .map_err(|e| e.to_string())?
            .unwrap_or(capacity),
    };
    let policy = file.policy(quota).map_err(|e| e.to_string())?;
    let mut listen = args.listen.clone();
    for l in &file.listen {
        listen.push(
            l.parse()
                .map_err(|e: utmem_host::config::ConfigError| e.to_string())?,
        );
    }
    Ok(Settings {
        policy,
        capacity,
        listen,
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("utmem-hostd: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: ServeArgs) -> Result<(), String> {
    if args.max_value < MIN_MAX_VALUE {
        return Err(format!(
            "--max-value must be at least {MIN_MAX_VALUE} bytes (Redis's bulk limit)"
        ));
    }
    let s = settings(&args)?;
    if s.listen.is_empty() && args.admin.is_none() {
        return Err("nothing to listen on: give --listen unix:PATH or --listen vsock:PORT".into());
    }
    // Signals first, so a signal that arrives during start-up still cleans up.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let opts = StoreOptions {
        value_overhead: VALUE_OVERHEAD,
        max_pools: usize::try_from(args.max_pools).unwrap_or(usize::MAX),
    };
    let store = Arc::new(Store::with_options(
        s.capacity,
        args.max_value,
        s.policy,
        opts,
    ));
    if let Some(dir) = &args.data_dir {
        let opts = DurableOptions {
            dir: dir.clone(),
            fsync: args.fsync,
            compact_floor: args.compact_floor,
        };
        let r = store
            .open_data_dir(opts)
            .map_err(|e| format!("data directory {}: {e}", dir.display()))?;
        tracing::info!(
            dir = %dir.display(),
            identities = r.identities,
            pools = r.pools,
            values = r.values,
            bytes = r.bytes,
            damaged_bytes = r.damaged_bytes,
            dropped_keys = r.dropped_keys,
            elapsed = ?r.elapsed,
            "durable pools loaded"
        );
    }
    let server = ServerConfig {
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        timeouts: Timeouts {
            read: args.read_timeout,
            write: args.write_timeout,
        },
        io_threads: args
            .io_threads
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(default_io_threads),
        channel_threads: usize::try_from(args.channel_threads).unwrap_or(1),
    };
    let mut created: Vec<PathBuf> = Vec::new();
    let cleanup = |created: &[PathBuf]| {
        for p in created {
            let _ = std::fs::remove_file(p);
        }
    };
    if let Some(addr) = args.metrics {
        let sock = metrics::bind(addr, args.metrics_any_address).map_err(|e| e.to_string())?;
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        metrics::spawn(sock, Arc::clone(&store))
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
        tracing::info!("metrics at http://{local}/metrics");
    }
    if let Some(spec) = &args.admin {
        let path = admin_path(spec);
        let sock = admin::bind(&path).map_err(|e| {
            cleanup(&created);
            e.to_string()
        })?;
        tracing::info!(path = %path.display(), "admin socket ready");
        created.push(path);
        admin::spawn(sock, Arc::clone(&store));
    }
    let mut listeners = Vec::new();
    let mut devices = Vec::new();
    for spec in &s.listen {
        let bound = match spec {
            ListenSpec::Ivshmem { path, name } => DeviceListener::bind(path, name).map(|d| {
                created.push(d.path().to_owned());
                tracing::info!("listening on {}", d.describe());
                devices.push(d);
            }),
            _ => Listener::bind(spec).map(|l| {
                created.extend(l.path().map(Path::to_owned));
                tracing::info!("listening on {}", l.describe());
                listeners.push(l);
            }),
        };
        if let Err(e) = bound {
            cleanup(&created);
            return Err(e.to_string());
        }
    }
    if !listeners.is_empty() || !devices.is_empty() {
        serve_all(listeners, devices, Arc::clone(&store), server).map_err(|e| {
            cleanup(&created);
            format!("cannot start the server threads: {e}")
        })?;
    }
    tracing::info!(
        capacity = s.capacity,
        max_value = args.max_value,
        max_connections = server.max_connections,
        max_pools = opts.max_pools,
        io_threads = server.io_threads,
        channel_threads = server.channel_threads,
        "utmem-hostd ready"
    );
    if let Some(idle) = args.idle_expiry {
        let store = Arc::clone(&store);
        std::thread::Builder::new()
            .name("utmem-expiry".into())
            .spawn(move || loop {
                std::thread::sleep(
                    (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10)),
                );
                for name in store.expire_idle(idle) {
                    tracing::info!(identity = %name, "identity idle for {idle:?}: pools dropped");
                }
            })
            .map_err(|e| e.to_string())?;
    }
    for sig in signals.forever() {
        match sig {
            SIGHUP => match settings(&args) {
                Ok(new) => {
                    store.set_policy(new.policy);
                    tracing::info!("configuration reloaded (quotas and grants; listeners and capacity need a restart)");
                }
                Err(e) => tracing::error!("configuration not reloaded, keeping the old one: {e}"),
            },
            _ => {
                tracing::info!("signal {sig}: shutting down");
                break;
            }
        }
    }
    device::shutdown();
    cleanup(&created);
    Ok(())
}
