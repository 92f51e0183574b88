//! The daemon's network side: listeners, an accept thread, a few I/O threads that
//! serve every connection (no thread per connection), sessions.

mod acceptor;
pub mod channel;
pub mod device;
mod listener;
mod session;
mod worker;

pub use listener::{bind_unix, ListenError, Listener};
pub use session::{Session, SessionError, Timeouts, MAX_QUEUED, OWN_BUFFER_AT};

use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// Limits of the network side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Connections one identity may have open; more are answered DENIED and closed.
    pub max_connections: usize,
    /// Read and write timeouts of a connection.
    pub timeouts: Timeouts,
    /// I/O threads serving the connections.
    pub io_threads: usize,
    /// Threads serving shared-memory channels (0: no channels are offered).
    pub channel_threads: usize,
}

/// Default `--max-connections` (per identity).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `--read-timeout` and `--write-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            timeouts: Timeouts {
                read: DEFAULT_TIMEOUT,
                write: DEFAULT_TIMEOUT,
            },
            io_threads: default_io_threads(),
            channel_threads: 1,
        }
    }
}

/// One I/O thread per core, at most four.
pub fn default_io_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
}

/// Serves `listeners` with `cfg`: starts the I/O threads and the accept thread.
pub fn serve(
    listeners: Vec<Listener>,
    store: Arc<Store>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    serve_all(listeners, Vec::new(), store, cfg)
}

/// [`serve`], plus guest device (ivshmem) listeners; these need a channel service
/// thread.
pub fn serve_all(
    listeners: Vec<Listener>,
    devices: Vec<device::DeviceListener>,
    store: Arc<Store>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    let service = match cfg.channel_threads {
        0 => None,
        n => Some(channel::Service::start(n)?),
    };
    for d in devices {
        let Some(service) = service.clone() else {
            return Err(std::io::Error::other(format!(
                "{} needs a channel service thread (--channel-threads at least 1)",
                d.describe()
            )));
        };
        device::spawn(d, Arc::clone(&store), service)?;
    }
    let workers = (0..cfg.io_threads.max(1))
        .map(|n| worker::spawn(n, Arc::clone(&store), cfg.timeouts, service.clone()))
        .collect::<std::io::Result<Vec<_>>>()?;
    acceptor::spawn(listeners, store, workers, cfg.max_connections)?;
    Ok(())
}

/// Serves one listener with the default limits (benches and embedders).
pub fn spawn_acceptor(listener: Listener, store: Arc<Store>) {
    if let Err(e) = serve(vec![listener], store, ServerConfig::default()) {
        panic!("cannot start the server threads: {e}");
    }
}
