//! The module's host I/O, under the value state machine ([`crate::slot`]) and above
//! the client:
//!
//! - [`shared`]: the client, the pool, object ids, whether the host answers;
//! - [`mapped`]: reads straight from the host's mapped arena;
//! - [`socket`]: the I/O thread and synchronous fetches, for what goes over the socket;
//! - [`chan`]: the shared-memory channel that UTMEM.SET's PUTs and the FLUSHes take
//!   when the host offers one.
//!
//! Each part uses only the ones listed before it.

pub mod chan;
pub mod mapped;
pub mod shared;
pub mod socket;

use std::time::Duration;

pub use mapped::{read_mapped, read_near, reply_mapped};
pub use shared::{connected, host_answers, next_oid, remember_for_retry, shared, Shared};
pub use socket::{fetch_sync, lost_err, send, FetchError, Job, PutDone};

/// Connects, starts the I/O thread, and has slots flush through [`flush`].
pub fn start(
    spec: &str,
    pool_name: &str,
    timeout: Duration,
    durable: bool,
) -> Result<&'static Shared, String> {
    let s = shared::init(spec, pool_name, timeout, durable)?;
    socket::spawn(s.client.clone(), s.pool)?;
    crate::slot::on_unreferenced(flush);
    Ok(s)
}

/// Flushes an object on the host: through the channel, or the I/O thread (which holds
/// it back while a fork child may still read the value).
pub fn flush(oid: u64) {
    if !chan::flush(oid) {
        send(Job::Flush(oid));
    }
}
