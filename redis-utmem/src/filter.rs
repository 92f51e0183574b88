//! Saves that would have to call values lost are refused before they start.
//!
//! A type callback cannot fail a save that runs on the main thread (SAVE, SHUTDOWN's
//! save, DEBUG RELOAD, DUMP, MIGRATE): a value it cannot read could only be written as
//! lost. So while offloaded values exist and the host does not answer, a command filter
//! turns those commands into `utmem.refused`, which answers with an error and changes
//! nothing.
//! (BGSAVE needs no filter: its child fails the save instead.)

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use redis_module::{Context, RedisError, RedisResult, RedisString};

use crate::raw::FilterArgs;

/// Whether the server has RDB save points (then SHUTDOWN saves); refreshed by cron.
pub static SAVE_POINTS: AtomicBool = AtomicBool::new(true);

fn is(word: Option<&[u8]>, name: &str) -> bool {
    word.is_some_and(|w| w.eq_ignore_ascii_case(name.as_bytes()))
}

/// Whether some values live only on a host that does not answer now.
fn values_unreachable() -> bool {
    crate::stats::get().offloaded_values.load(Relaxed) > 0 && !crate::io::host_answers()
}

/// The filter: SAVE, SHUTDOWN that would save, DEBUG RELOAD, DUMP, MIGRATE.
pub fn refuse_unreadable_saves(args: &FilterArgs) {
    let n = args.len();
    let Some(first) = args.arg(0) else { return };
    // Cheap for every other command: a look at the first letter.
    if !matches!(first.first(), Some(b's' | b'S' | b'd' | b'D' | b'm' | b'M')) {
        return;
    }
    let what = if is(Some(first), "save") && n == 1 {
        "SAVE"
    } else if is(Some(first), "debug") && is(args.arg(1), "reload") {
        "DEBUG RELOAD"
    } else if is(Some(first), "dump") {
        // DUMP and MIGRATE serialise on the main thread too; MIGRATE then deletes the
        // source, so a value written as lost there would be lost for good.
        "DUMP"
    } else if is(Some(first), "migrate") {
        "MIGRATE"
    } else if is(Some(first), "shutdown") && n <= 6 {
        let flag = |f: &str| (1..n).any(|i| is(args.arg(i), f));
        let saves = flag("save") || (SAVE_POINTS.load(Relaxed) && !flag("nosave"));
        if !saves || flag("force") || flag("abort") {
            return;
        }
        "SHUTDOWN"
    } else {
        return;
    };
    if !values_unreachable() {
        return;
    }
    let why = format!(
        "UTMEMDOWN {what} refused: {} offloaded values are on a host that does not answer now, \
         and this save would have to record them as lost. Retry once the host is back \
         (INFO utmem: utmem_connected), use BGSAVE (it fails instead), or SHUTDOWN NOSAVE",
        crate::stats::get().offloaded_values.load(Relaxed)
    );
    args.replace_all(&[b"utmem.refused", why.as_bytes()]);
}

/// `utmem.refused reason`: what a refused command became.
pub fn refused(_ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let why = args
        .get(1)
        .map_or_else(|| "UTMEMDOWN refused".to_owned(), |s| s.to_string_lossy());
    Err(RedisError::String(crate::raw::error_text(&why)))
}

/// Refreshes [`SAVE_POINTS`] (cron; main thread).
pub fn refresh_save_points(ctx: &Context) {
    if let Ok(redis_module::RedisValue::Array(a)) = ctx.call("CONFIG", &["GET", "save"][..]) {
        let v = match a.get(1) {
            Some(redis_module::RedisValue::BulkRedisString(s)) => s.to_string_lossy(),
            Some(
                redis_module::RedisValue::BulkString(s) | redis_module::RedisValue::SimpleString(s),
            ) => s.clone(),
            _ => return,
        };
        SAVE_POINTS.store(!v.trim().is_empty(), Relaxed);
    }
}
