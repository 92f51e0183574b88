//! redis-utmem: the utmem Redis module (`libredis_utmem.so`).
//!
//! Large values move out of Redis into a memory pool on the VM host:
//! `UTMEM.SET` keeps a stub in the keyspace (a real data type, so DEL, EXPIRE,
//! RENAME, COPY, SCAN, FLUSHALL, RDB, AOF and replication all work) and hands
//! the bytes to an I/O thread that PUTs them to `utmem-hostd` through
//! `utmem-client`; `UTMEM.GET` of an offloaded value blocks only its own client
//! while the I/O thread fetches it. Values below `threshold` stay in Redis as
//! plain strings. Redis's main thread never waits for the host on the normal
//! path; see `docs/module.md` for the contract.

pub mod commands;
pub mod config;
pub mod datatype;
pub mod gather;
pub mod io;
pub mod raw;
pub mod recall;
pub mod slot;
pub mod stats;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::LazyLock;

use redis_module::configuration::ConfigurationFlags;
use redis_module::{
    redis_module, Context, InfoContext, RedisResult, RedisString, RedisValue, Status,
};

use crate::config::OnHostDown;
use crate::datatype::UTMEM_TYPE;
use crate::stats::Stats;

static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

/// The module's counters.
pub fn stats() -> &'static Stats {
    &STATS
}

/// True in the Redis process itself, false in its fork children.
pub fn is_parent() -> bool {
    io::shared().is_none_or(|_| {
        // `fetch_sync` and friends decide per process; this is the same test.
        PARENT_PID.get().is_none_or(|p| *p == std::process::id())
    })
}

static PARENT_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Logs a warning to the Redis log.
pub fn log_warning(msg: &str) {
    redis_module::logging::log_warning(msg);
}

/// The fields of INFO utmem and UTMEM.STATS.
pub fn info_fields() -> Vec<(&'static str, String)> {
    let s = stats();
    let g = |a: &std::sync::atomic::AtomicI64| a.load(Relaxed).to_string();
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed).to_string();
    let (transport, pool) = io::shared().map_or((String::new(), String::new()), |m| {
        (m.client.target(), m.pool_name.clone())
    });
    vec![
        ("transport", transport),
        ("pool", pool),
        ("connected", u8::from(io::connected()).to_string()),
        ("threshold", config::threshold().to_string()),
        ("offloaded_values", g(&s.offloaded_values)),
        ("offloaded_bytes", g(&s.offloaded_bytes)),
        ("inline_values", g(&s.inline_values)),
        ("inline_sets", c(&s.inline_sets)),
        ("pending", g(&s.pending)),
        ("pending_bytes", g(&s.pending_bytes)),
        ("host_down_fallbacks", c(&s.host_down_fallbacks)),
        ("no_space_fallbacks", c(&s.no_space_fallbacks)),
        ("lost_values", c(&s.lost_values)),
        ("checksum_errors", c(&s.checksum_errors)),
        ("rtt_p50_us", s.rtt_percentile(500).to_string()),
        ("rtt_p99_us", s.rtt_percentile(990).to_string()),
        ("recall_running", g(&s.recall_running)),
        ("recalled", c(&s.recalled)),
    ]
}

#[redis_module_macros::info_command_handler]
fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    raw::info_section(ctx.ctx, &info_fields());
    Ok(())
}

fn port(ctx: &Context) -> String {
    match ctx.call("CONFIG", &["GET", "port"][..]) {
        Ok(RedisValue::Array(a)) => match a.get(1) {
            Some(RedisValue::BulkRedisString(s)) => s.try_as_str().unwrap_or("0").to_owned(),
            Some(RedisValue::BulkString(s)) | Some(RedisValue::SimpleString(s)) => s.clone(),
            _ => "0".into(),
        },
        _ => "0".into(),
    }
}

fn on_fork(born: bool) {
    io::send(io::Job::Fork(born));
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let words: Vec<String> = args.iter().map(|a| a.to_string_lossy()).collect();
    if let Err(e) = config::apply_args(&words) {
        ctx.log_warning(&format!("utmem: refusing to load: {e}"));
        return Status::Err;
    }
    let spec = config::TRANSPORT.get();
    let pool = {
        let mut p = config::POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.is_empty() {
            // A master and its replica on one host never share a pool.
            *p = format!("redis-{}", port(ctx));
        }
        p.clone()
    };
    let _ = PARENT_PID.set(std::process::id());
    raw::handle_io_errors(ctx);
    raw::on_fork_child(ctx, on_fork);
    match io::start(&spec, &pool, config::timeout()) {
        Ok(m) => {
            ctx.log_notice(&format!(
                "utmem: transport {} pool {pool} threshold {} (host {})",
                m.client.target(),
                config::threshold(),
                if m.client.is_connected() { "connected" } else { "not reachable yet" }
            ));
            Status::Ok
        }
        Err(e) => {
            ctx.log_warning(&format!("utmem: refusing to load: option transport: {e}"));
            Status::Err
        }
    }
}

redis_module! {
    name: "utmem",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [UTMEM_TYPE],
    init: init,
    commands: [
        ["utmem.set", commands::set, "write deny-oom", 1, 1, 1, ""],
        ["utmem.get", commands::get, "readonly", 1, 1, 1, ""],
        ["utmem.mget", commands::mget, "readonly", 1, -1, 1, ""],
        ["utmem.mset", commands::mset, "write deny-oom", 1, -1, 2, ""],
        ["utmem.getdel", commands::getdel, "write", 1, 1, 1, ""],
        ["utmem.strlen", commands::strlen, "readonly fast", 1, 1, 1, ""],
        ["utmem.offload", commands::offload, "write", 1, 1, 1, ""],
        ["utmem.recall", commands::recall, "write", 1, 1, 1, ""],
        ["utmem.recallall", commands::recallall, "write", 0, 0, 0, ""],
        ["utmem.stats", commands::stats, "readonly fast", 0, 0, 0, ""],
    ],
    configurations: [
        i64: [
            ["threshold", &config::THRESHOLD, 4096, 0, config::THRESHOLD_MAX, ConfigurationFlags::DEFAULT, None],
            ["timeout-ms", &config::TIMEOUT_MS, 5000, 1, config::TIMEOUT_MAX, ConfigurationFlags::DEFAULT, None],
            ["max-pending-bytes", &config::MAX_PENDING_BYTES, 256 << 20, 0, i64::MAX, ConfigurationFlags::DEFAULT, None],
        ],
        string: [
            ["transport", &config::TRANSPORT, config::DEFAULT_TRANSPORT, ConfigurationFlags::IMMUTABLE, None],
            ["pool", &config::POOL, "", ConfigurationFlags::IMMUTABLE, None],
        ],
        bool: [],
        enum: [
            ["on-host-down", &config::ON_HOST_DOWN, OnHostDown::local, ConfigurationFlags::DEFAULT, None],
        ],
        module_args_as_configuration: false,
    ]
}
