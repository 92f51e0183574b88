//! The daemon's network side: listeners, one thread per connection, sessions.

mod listener;
mod session;

pub use listener::{bind_unix, ListenError, Listener};
pub use session::{Session, SessionError, OWN_BUFFER_AT};

use std::sync::Arc;
use std::thread;

use crate::store::Store;

/// Accepts connections on `listener` forever, one thread per connection.
pub fn spawn_acceptor(listener: Listener, store: Arc<Store>) -> thread::JoinHandle<()> {
    let what = listener.describe();
    thread::Builder::new()
        .name("utmem-accept".into())
        .spawn(move || match listener {
            Listener::Unix { sock, name, .. } => {
                for conn in sock.incoming() {
                    let conn = match conn {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(listener = %what, "accept failed: {e}");
                            continue;
                        }
                    };
                    let ident = match &name {
                        Some(n) => n.clone(),
                        None => match listener::unix_peer_identity(&conn) {
                            Ok(n) => n,
                            Err(e) => {
                                tracing::warn!("cannot read peer credentials, closing: {e}");
                                continue;
                            }
                        },
                    };
                    // Only a plain local socket (identity = peer uid) may map the arena: a
                    // named listener is a VMM's hybrid vsock, where descriptors cannot travel.
                    spawn_session(conn, ident, Arc::clone(&store), name.is_none());
                }
            }
            Listener::Vsock { sock, .. } => loop {
                match sock.accept() {
                    Ok((conn, addr)) => {
                        let ident = listener::vsock_peer_identity(&addr);
                        spawn_session(conn, ident, Arc::clone(&store), false);
                    }
                    Err(e) => tracing::warn!(listener = %what, "accept failed: {e}"),
                }
            },
        })
        .unwrap_or_else(|e| panic!("cannot start the accept thread: {e}"))
}

fn spawn_session<S>(conn: S, ident: String, store: Arc<Store>, can_map: bool)
where
    S: std::os::fd::AsFd + Send + 'static,
{
    let spawned = thread::Builder::new()
        .name(format!("utmem-{ident}"))
        .spawn(move || {
            let identity = store.identity(&ident);
            identity.connected();
            tracing::debug!(identity = %ident, "connected");
            let mut session = Session::new(conn, &store, identity, can_map);
            let result = session.run();
            let identity = Arc::clone(session.identity());
            drop(session);
            identity.disconnected();
            match result {
                Ok(()) => tracing::debug!(identity = %ident, "disconnected"),
                Err(SessionError::Io(e)) => {
                    tracing::info!(identity = %ident, "connection lost: {e}")
                }
                Err(e) => tracing::warn!(identity = %ident, "closing connection: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a connection thread: {e}");
    }
}
