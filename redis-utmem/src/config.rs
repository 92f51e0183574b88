//! The module's options. Each is a module config (`CONFIG GET/SET utmem.<name>`)
//! and may also be given as a `name value` pair after the module path in
//! `--loadmodule` / `MODULE LOAD`. A bad option makes the load fail with a message
//! naming the option and saying why.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

use redis_module::configuration::{ConfigurationContext, ConfigurationValue};
use redis_module::{enum_configuration, RedisError, RedisString};

/// Values shorter than this stay in Redis as plain strings.
pub static THRESHOLD: AtomicI64 = AtomicI64::new(4096);
/// How long a synchronous wait (MULTI/Lua, RDB save) and any host request may take.
pub static TIMEOUT_MS: AtomicI64 = AtomicI64::new(5000);
/// Cap on value bytes of PUTs in flight to the host (0: no cap).
pub static MAX_PENDING_BYTES: AtomicI64 = AtomicI64::new(256 << 20);
/// Values up to this long are read straight from the host's mapped arena when the
/// transport allows it (a local Unix socket); 0: always ask over the socket.
pub static MAPPED_READ_MAX: AtomicI64 = AtomicI64::new(1 << 20);
/// Where the host is.
pub static TRANSPORT: Spec = Spec(Mutex::new(String::new()));
/// The persistent pool's name; empty means `redis-<port>`.
pub static POOL: Mutex<String> = Mutex::new(String::new());
/// What UTMEM.SET does when the host is unreachable.
pub static ON_HOST_DOWN: Mutex<OnHostDown> = Mutex::new(OnHostDown::local);

/// Use a shared-memory channel to the host when it offers one (a local Unix socket).
pub static CHANNEL: AtomicBool = AtomicBool::new(true);

/// `durable yes`: the pool is a durable pool of the host (kept across host restarts).
pub static DURABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the module's pool is durable.
pub fn durable() -> bool {
    DURABLE.load(Relaxed)
}

/// When UTMEM.SET replies.
pub static SET_ACK: Mutex<SetAck> = Mutex::new(SetAck::host);

/// The default transport.
pub const DEFAULT_TRANSPORT: &str = "auto";

enum_configuration! {
    /// `local`: keep the value in Redis and count it; `error`: refuse the SET.
    #[allow(non_camel_case_types)]
    #[derive(Debug, PartialEq, Eq)]
    pub enum OnHostDown {
        local = 0,
        error = 1,
    }
}

mod set_ack {
    use redis_module::enum_configuration;

    enum_configuration! {
        /// `host`: UTMEM.SET replies once the host stored the value (write-through);
        /// `local`: at once, the PUT follows in the background (write-back), unless the
        /// bytes waiting for the host would exceed `max-pending-bytes`.
        #[allow(non_camel_case_types)]
        #[derive(Debug, PartialEq, Eq)]
        pub enum SetAck {
            host = 0,
            local = 1,
        }
    }
}
pub use set_ack::SetAck;

/// A transport spec, checked when it is set.
#[derive(Debug)]
pub struct Spec(pub Mutex<String>);

impl Spec {
    /// The current value.
    pub fn get(&self) -> String {
        let s = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if s.is_empty() {
            DEFAULT_TRANSPORT.to_owned()
        } else {
            s
        }
    }
}

fn check_spec(s: &str) -> Result<(), String> {
    s.parse::<utmem_client::Spec>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl ConfigurationValue<RedisString> for Spec {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create(None, Spec::get(self).as_str())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let s = val.try_as_str()?.to_owned();
        check_spec(&s).map_err(RedisError::String)?;
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = s;
        Ok(())
    }
}

/// The timeout as a Duration.
pub fn timeout() -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(TIMEOUT_MS.load(Relaxed)).unwrap_or(5000))
}

/// The threshold in bytes.
pub fn threshold() -> usize {
    usize::try_from(THRESHOLD.load(Relaxed)).unwrap_or(0)
}

/// Largest value read from the mapped arena.
pub fn mapped_read_max() -> usize {
    usize::try_from(MAPPED_READ_MAX.load(Relaxed)).unwrap_or(0)
}

/// The options and their bounds, for messages.
pub const OPTIONS: &str =
    "transport, threshold, pool, timeout-ms, on-host-down, max-pending-bytes, mapped-read-max, set-ack, channel, durable";

/// Bounds of the integer options.
pub const THRESHOLD_MAX: i64 = 512 << 20;
/// Largest timeout (one hour).
pub const TIMEOUT_MAX: i64 = 3_600_000;

fn int(name: &str, v: &str, min: i64, max: i64) -> Result<i64, String> {
    let n: i64 = v
        .parse()
        .map_err(|_| format!("option {name}: {v:?} is not an integer"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("option {name}: {n} is outside {min}..={max}"));
    }
    Ok(n)
}

/// Applies `name value` pairs given at load time; the error names the option.
pub fn apply_args(args: &[String]) -> Result<(), String> {
    if !args.len().is_multiple_of(2) {
        return Err(format!(
            "options come in `name value` pairs; got {} words ({})",
            args.len(),
            args.join(" ")
        ));
    }
    for pair in args.chunks(2) {
        let (name, v) = (pair[0].to_ascii_lowercase(), pair[1].as_str());
        match name.as_str() {
            "threshold" => THRESHOLD.store(int("threshold", v, 0, THRESHOLD_MAX)?, Relaxed),
            "timeout-ms" => TIMEOUT_MS.store(int("timeout-ms", v, 1, TIMEOUT_MAX)?, Relaxed),
            "max-pending-bytes" => {
                MAX_PENDING_BYTES.store(int("max-pending-bytes", v, 0, i64::MAX)?, Relaxed)
            }
            "mapped-read-max" => {
                MAPPED_READ_MAX.store(int("mapped-read-max", v, 0, THRESHOLD_MAX)?, Relaxed)
            }
            "transport" => {
                check_spec(v).map_err(|e| format!("option transport: {e}"))?;
                *TRANSPORT.0.lock().unwrap_or_else(PoisonError::into_inner) = v.to_owned();
            }
            "pool" => {
                if v.is_empty() || v.len() > 255 {
                    return Err("option pool: a pool name is 1 to 255 bytes".into());
                }
                *POOL.lock().unwrap_or_else(PoisonError::into_inner) = v.to_owned();
            }
            "durable" => {
                let on = match v.to_ascii_lowercase().as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(format!("option durable: {v:?} is neither `yes` nor `no`")),
                };
                DURABLE.store(on, Relaxed);
            }
            "set-ack" => {
                let mode = match v.to_ascii_lowercase().as_str() {
                    "host" => SetAck::host,
                    "local" => SetAck::local,
                    _ => {
                        return Err(format!(
                            "option set-ack: {v:?} is neither `host` nor `local`"
                        ))
                    }
                };
                *SET_ACK.lock().unwrap_or_else(PoisonError::into_inner) = mode;
            }
            "channel" => {
                let on = match v.to_ascii_lowercase().as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(format!("option channel: {v:?} is neither `yes` nor `no`")),
                };
                CHANNEL.store(on, Relaxed);
            }
            "on-host-down" => {
                let mode = match v.to_ascii_lowercase().as_str() {
                    "local" => OnHostDown::local,
                    "error" => OnHostDown::error,
                    _ => {
                        return Err(format!(
                            "option on-host-down: {v:?} is neither `local` nor `error`"
                        ))
                    }
                };
                *ON_HOST_DOWN.lock().unwrap_or_else(PoisonError::into_inner) = mode;
            }
            _ => {
                return Err(format!(
                    "unknown option {:?}; known options: {OPTIONS}",
                    pair[0]
                ))
            }
        }
    }
    Ok(())
}

/// Whether a value just stored as pending may be acknowledged before the host has it:
/// `set-ack local`, and the bytes waiting for the host (this value's included) stay
/// within `max-pending-bytes`.
pub fn ack_locally() -> bool {
    if *SET_ACK.lock().unwrap_or_else(PoisonError::into_inner) != SetAck::local {
        return false;
    }
    let cap = MAX_PENDING_BYTES.load(Relaxed);
    cap == 0 || crate::stats::get().pending_bytes.load(Relaxed) <= cap
}

/// Whether a SET should fail when the host is down.
pub fn error_when_down() -> bool {
    *ON_HOST_DOWN.lock().unwrap_or_else(PoisonError::into_inner) == OnHostDown::error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_name_themselves() {
        let e = |a: &[&str]| {
            apply_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
        };
        assert!(e(&["threshold", "x"]).starts_with("option threshold"));
        assert!(e(&["threshold", "-1"]).contains("outside"));
        assert!(e(&["transport", "tcp:1"]).starts_with("option transport"));
        assert!(e(&["on-host-down", "panic"]).starts_with("option on-host-down"));
        assert!(e(&["bogus", "1"]).contains("unknown option"));
        assert!(e(&["channel", "maybe"]).starts_with("option channel"));
        assert!(e(&["durable", "maybe"]).starts_with("option durable"));
        assert!(e(&["threshold"]).contains("pairs"));
    }
}
