//! `utmem`: talk to a utmem host from the command line.
//!
//! Exit codes: 0 ok, 1 not found, 2 usage (a bad argument, a file that cannot be read),
//! 3 host error.

mod bench;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use utmem_client::proto::{Key, PoolKind};
use utmem_client::{Client, ClientError, Options};

/// Talk to a utmem host: store, fetch and drop values, read counters, measure a transport.
#[derive(Debug, Parser)]
#[command(name = "utmem", version)]
struct Cli {
    /// Where the host is: unix:/path, vsock:PORT, vsock:CID:PORT, device:/dev/utmem or auto.
    #[arg(long, env = "UTMEM_CONNECT", value_name = "SPEC")]
    connect: String,
    /// Pool name (a persistent pool of your identity).
    #[arg(long, default_value = "default")]
    pool: String,
    /// Open the pool durable (kept across host restarts; the host needs --data-dir).
    #[arg(long)]
    durable: bool,
    /// Per-request timeout in milliseconds (at least 1).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One round trip; prints the latency and who the host says you are.
    Ping,
    /// Store FILE (or stdin, `-`) under object id OID.
    Put {
        /// Object id.
        oid: u64,
        /// File to read, or `-` for stdin.
        #[arg(default_value = "-")]
        file: String,
    },
    /// Write the value of OID to stdout (exit 1 if there is none).
    Get {
        /// Object id.
        oid: u64,
    },
    /// Drop the value of OID.
    Del {
        /// Object id.
        oid: u64,
    },
    /// Counters of your identity.
    Stats,
    /// Measure ops/s and latency; one summary line on stdout, progress on stderr.
    Bench(bench::BenchArgs),
}

enum Failure {
    NotFound(String),
    Host(ClientError),
    /// A usage or local error (exit 2): a bad argument, a file that cannot be read.
    Local(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Host(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::NotFound(m)) => {
            eprintln!("utmem: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Host(ClientError::BadSpec { spec })) => {
            eprintln!("utmem: {}", ClientError::BadSpec { spec });
            ExitCode::from(2)
        }
        Err(Failure::Host(e)) => {
            eprintln!("utmem: {e}");
            ExitCode::from(3)
        }
        Err(Failure::Local(m)) => {
            eprintln!("utmem: {m}");
            ExitCode::from(2)
        }
    }
}

/// The bytes of FILE, or of stdin for `-`.
fn read_input(file: &str) -> Result<Vec<u8>, Failure> {
    let mut data = Vec::new();
    let res = if file == "-" {
        std::io::stdin().read_to_end(&mut data)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut data))
    };
    res.map_err(|e| Failure::Local(format!("cannot read {file}: {e}")))?;
    Ok(data)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let opts = Options {
        timeout: Duration::from_millis(cli.timeout_ms),
        ..Options::default()
    };
    // Local input first: a file that cannot be read is the caller's error, not the host's.
    let data = match &cli.command {
        Command::Put { file, .. } => Some(read_input(file)?),
        _ => None,
    };
    let client = Client::connect(&cli.connect, opts)?;
    let pool = client.open_pool_with(utmem_client::proto::NewPool {
        kind: PoolKind::Private(cli.pool.clone()),
        ephemeral: false,
        durable: cli.durable,
    })?;
    let key = |oid: u64| Key::new(oid, 0);
    match cli.command {
        Command::Ping => {
            let t0 = std::time::Instant::now();
            client.ping()?;
            let rtt = t0.elapsed();
            let who = client.hello().map(|h| h.identity).unwrap_or_default();
            println!(
                "pong from {} in {}us (identity {who})",
                client.target(),
                rtt.as_micros()
            );
        }
        Command::Put { oid, .. } => {
            client.put(pool, key(oid), Bytes::from(data.unwrap_or_default()))?;
        }
        Command::Get { oid } => match client.get(pool, key(oid))? {
            Some(v) => std::io::stdout()
                .write_all(&v)
                .map_err(|e| Failure::Local(format!("cannot write stdout: {e}")))?,
            None => {
                return Err(Failure::NotFound(format!(
                    "no value under {oid} in pool {}",
                    cli.pool
                )))
            }
        },
        Command::Del { oid } => client.flush(pool, key(oid))?,
        Command::Stats => {
            let s = client.stats()?;
            let who = client.hello().map(|h| h.identity).unwrap_or_default();
            println!("identity   {who}");
            println!("pools      {}", s.pools);
            println!("values     {}", s.values);
            println!("bytes      {}", s.bytes);
            println!("quota      {}", s.quota);
            println!("puts       {}", s.puts);
            println!("gets       {}", s.gets);
            println!("hits       {}", s.hits);
            println!("misses     {}", s.misses);
            println!("evictions  {}", s.evictions);
            println!("refusals   {}", s.refusals);
        }
        Command::Bench(args) => {
            let r = bench::run(&client, pool, &args)?;
            println!("{}", r.summary());
        }
    }
    Ok(())
}
