//! redis-utmem: the utmem Redis module (`libredis_utmem.so`).
//!
//! Large values move out of Redis into a memory pool on the VM host:
//! `UTMEM.SET` keeps a stub in the keyspace (a real data type, so DEL, EXPIRE,
//! RENAME, COPY, SCAN, FLUSHALL, RDB, AOF and replication all work) and PUTs the
//! bytes to `utmem-hostd` through `utmem-client`: through a shared-memory channel
//! from the main thread when the host offers one, else through an I/O thread;
//! `UTMEM.GET` reads the host's mapped arena, or blocks only its own client while
//! the I/O thread fetches the value. Values below `threshold` stay in Redis as
//! plain strings. Redis's main thread never waits for the host on the normal
//! path; see `docs/module.md` for the contract.
//!
//! Layers, each using only those below it:
//! 1. [`raw`] (Redis module API calls the `redis-module` crate lacks), [`config`],
//!    [`stats`];
//! 2. [`slot`]: a value's state machine (pending, local, remote, lost, copy of);
//! 3. [`io`]: the host I/O (shared state, mapped reads, the socket I/O thread, the
//!    channel);
//! 4. the commands ([`commands`], [`recall`], [`gather`]), the data type's callbacks
//!    ([`datatype`]), the save guard ([`filter`]), and the registration (`module`).

pub mod commands;
pub mod config;
pub mod datatype;
pub mod filter;
pub mod gather;
pub mod instance;
pub mod io;
#[cfg(not(test))]
mod module;
pub mod raw;
pub mod recall;
pub mod slot;
pub mod stats;

use std::sync::atomic::Ordering::Relaxed;

use redis_module::{InfoContext, RedisResult};

pub use stats::get as stats;

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
        (
            "path",
            if io::chan::in_use() {
                "channel"
            } else {
                "socket"
            }
            .to_owned(),
        ),
        ("channel_requests", c(&io::chan::SUBMITTED)),
        ("channel_kicks", c(&io::chan::KICKS)),
        ("threshold", config::threshold().to_string()),
        ("offloaded_values", g(&s.offloaded_values)),
        ("offloaded_bytes", g(&s.offloaded_bytes)),
        ("inline_values", g(&s.inline_values)),
        ("inline_sets", c(&s.inline_sets)),
        ("pending", g(&s.pending)),
        ("pending_bytes", g(&s.pending_bytes)),
        ("host_down_fallbacks", c(&s.host_down_fallbacks)),
        ("no_space_fallbacks", c(&s.no_space_fallbacks)),
        ("lost_values", g(&s.lost_values)),
        ("lost_reads", c(&s.lost_reads)),
        ("checksum_errors", c(&s.checksum_errors)),
        ("mapped_reads", c(&s.mapped_reads)),
        ("mapped_fallbacks", c(&s.mapped_fallbacks)),
        ("rtt_p50_us", s.rtt_percentile(500).to_string()),
        ("rtt_p99_us", s.rtt_percentile(990).to_string()),
        ("recall_running", g(&s.recall_running)),
        ("recalled", c(&s.recalled)),
    ]
}

#[redis_module_macros::cron_event_handler]
fn cron(ctx: &redis_module::Context, hz: u64) {
    // Argument strings whose values reached the host go back to Redis here too, so
    // they are freed even when no UTMEM.SET comes along.
    raw::release_held();
    static TICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if TICKS.fetch_add(1, Relaxed).is_multiple_of(hz.max(1)) {
        filter::refresh_save_points(ctx);
    }
}

#[redis_module_macros::info_command_handler]
fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    raw::info_section(ctx, &info_fields());
    Ok(())
}
