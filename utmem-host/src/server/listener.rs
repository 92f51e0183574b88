//! Listening sockets and who their clients are.
//!
//! The identity comes from the transport, never from what a client says: the
//! listener's configured name (a VM's hybrid-vsock socket), else the peer uid
//! of a local Unix client, or the peer CID of an AF_VSOCK guest.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::ListenSpec;

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process accepts connections on the socket path.
    #[error("{0} is in use by a running process (is another utmem-hostd running?)")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The listener.
        what: String,
        /// Why.
        source: io::Error,
    },
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket we created (and remove at exit).
    Unix {
        /// The socket.
        sock: UnixListener,
        /// Its path.
        path: PathBuf,
        /// Identity of every client, if named.
        name: Option<String>,
    },
    /// AF_VSOCK.
    Vsock {
        /// The socket.
        sock: vsock::VsockListener,
        /// Its port.
        port: u32,
    },
}

/// Binds a Unix socket, replacing a stale socket file nobody listens on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket file");
                let _ = std::fs::remove_file(path);
            }
            Err(source) => {
                return Err(ListenError::Bind {
                    what: path.display().to_string(),
                    source,
                })
            }
        },
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| ListenError::Bind {
        what: path.display().to_string(),
        source,
    })
}

impl Listener {
    /// Binds what `spec` says.
    pub fn bind(spec: &ListenSpec) -> Result<Self, ListenError> {
        match spec {
            ListenSpec::Unix { path, name } => Ok(Listener::Unix {
                sock: bind_unix(path)?,
                path: path.clone(),
                name: name.clone(),
            }),
            ListenSpec::Vsock { port } => {
                let sock = vsock::VsockListener::bind_with_cid_port(libc::VMADDR_CID_ANY, *port)
                    .map_err(|source| ListenError::Bind {
                        what: format!("vsock port {port}"),
                        source,
                    })?;
                Ok(Listener::Vsock { sock, port: *port })
            }
            ListenSpec::Ivshmem { path, .. } => Err(ListenError::Bind {
                what: path.display().to_string(),
                source: std::io::Error::other(
                    "an ivshmem listener is bound by device::DeviceListener",
                ),
            }),
        }
    }

    /// The socket file to remove at exit, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Listener::Unix { path, .. } => Some(path),
            Listener::Vsock { .. } => None,
        }
    }

    /// Human name for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { path, name, .. } => match name {
                Some(n) => format!("unix:{} (identity {n})", path.display()),
                None => format!("unix:{} (identity = peer uid)", path.display()),
            },
            Listener::Vsock { port, .. } => format!("vsock:{port} (identity = peer cid)"),
        }
    }
}

/// The identity of a local Unix peer: `uid:<uid>`.
pub fn unix_peer_identity(s: &UnixStream) -> io::Result<String> {
    let cred = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(format!("uid:{}", cred.uid()))
}

/// The identity of a vsock peer: `cid:<cid>`.
pub fn vsock_peer_identity(addr: &vsock::VsockAddr) -> String {
    format!("cid:{}", addr.cid())
}
