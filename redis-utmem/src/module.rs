//! The module's registration with Redis: name, data type, commands, configs.
//! Left out of unit-test builds, which run without Redis and its allocator.

use redis_module::configuration::ConfigurationFlags;
use redis_module::redis_module;

use crate::config::{self, OnHostDown, SetAck};
use crate::datatype::UTMEM_TYPE;
use redis_module::{Context, RedisString, RedisValue, Status};

use crate::{commands, io, raw};

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

/// CONFIG SET utmem.timeout-ms: requests sent from now on use the new timeout.
fn on_timeout_changed(
    _ctx: &redis_module::configuration::ConfigurationContext,
    _name: &str,
    _v: &'static std::sync::atomic::AtomicI64,
) {
    if let Some(s) = io::shared() {
        s.client.set_timeout(config::timeout());
    }
}

fn on_fork(born: bool) {
    io::chan::set_fork_running(born);
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
        let mut p = config::POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.is_empty() {
            // One pool per Redis instance: a master and its replica, or two containers
            // with the same port and uid, never share one (the pool is emptied at start).
            let id = crate::instance::id(std::path::Path::new(".")).unwrap_or_else(|(id, e)| {
                ctx.log_warning(&format!(
                    "utmem: cannot keep the instance id in {} ({e}); this run's pool is \
                         not reused after a restart and stays on the host until dropped",
                    crate::instance::FILE
                ));
                id
            });
            *p = format!("redis-{}-{id}", port(ctx));
        }
        p.clone()
    };
    for (name, arity, summary) in [
        (
            "utmem.set",
            -3,
            c"Set a value, offloading it to the utmem host",
        ),
        (
            "utmem.get",
            2,
            c"Get a value, from the utmem host if offloaded",
        ),
        ("utmem.mget", -2, c"Get several values"),
        ("utmem.mset", -3, c"Set several values"),
        ("utmem.getdel", 2, c"Get a value and delete its key"),
        (
            "utmem.strlen",
            2,
            c"Length of a value, without a host round trip",
        ),
        (
            "utmem.offload",
            2,
            c"Turn a plain string into a utmem value",
        ),
        (
            "utmem.recall",
            2,
            c"Turn a utmem value back into a plain string",
        ),
        (
            "utmem.recallall",
            1,
            c"Recall every utmem value, in the background",
        ),
        ("utmem.stats", 1, c"The module's counters"),
    ] {
        if !raw::set_command_info(ctx, name, arity, summary) {
            ctx.log_notice(&format!(
                "utmem: this server cannot take command info for {name}"
            ));
        }
    }
    if !raw::register_filter(ctx, crate::filter::refuse_unreadable_saves) {
        ctx.log_warning("utmem: cannot register the command filter that guards SAVE");
    }
    raw::set_module_type(crate::datatype::raw_type);
    raw::track_forks(crate::slot::fork_gate::close, crate::slot::fork_gate::open);
    raw::set_module_options(ctx);
    raw::on_fork_child(ctx, on_fork);
    raw::on_before_sleep(ctx, io::chan::before_sleep);
    let durable = config::durable();
    match io::start(&spec, &pool, config::timeout(), durable) {
        Ok(m) => {
            ctx.log_notice(&format!(
                "utmem: transport {} pool {pool}{} threshold {} (host {})",
                m.client.target(),
                if durable { " (durable)" } else { "" },
                config::threshold(),
                if m.client.is_connected() {
                    "connected"
                } else {
                    "not reachable yet"
                }
            ));
            Status::Ok
        }
        Err(e) => {
            ctx.log_warning(&format!("utmem: refusing to load: {e}"));
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
        ["utmem.refused", crate::filter::refused, "readonly fast", 0, 0, 0, ""],
    ],
    configurations: [
        i64: [
            ["threshold", &config::THRESHOLD, 4096, 0, config::THRESHOLD_MAX, ConfigurationFlags::DEFAULT, None],
            ["timeout-ms", &config::TIMEOUT_MS, 5000, 1, config::TIMEOUT_MAX, ConfigurationFlags::DEFAULT, Some(Box::new(on_timeout_changed))],
            ["max-pending-bytes", &config::MAX_PENDING_BYTES, 256 << 20, 0, i64::MAX, ConfigurationFlags::DEFAULT, None],
            ["mapped-read-max", &config::MAPPED_READ_MAX, 1 << 20, 0, config::THRESHOLD_MAX, ConfigurationFlags::DEFAULT, None],
        ],
        string: [
            ["transport", &config::TRANSPORT, config::DEFAULT_TRANSPORT, ConfigurationFlags::IMMUTABLE, None],
            ["pool", &config::POOL, "", ConfigurationFlags::IMMUTABLE, None],
        ],
        bool: [
            ["channel", &config::CHANNEL, true, ConfigurationFlags::IMMUTABLE, None],
        ],
        enum: [
            ["on-host-down", &config::ON_HOST_DOWN, OnHostDown::local, ConfigurationFlags::DEFAULT, None],
            ["set-ack", &config::SET_ACK, SetAck::host, ConfigurationFlags::DEFAULT, None],
        ],
        module_args_as_configuration: false,
    ]
}
