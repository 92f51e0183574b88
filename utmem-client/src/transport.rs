//! Transports behind one small trait. Unix and AF_VSOCK differ only in how the
//! socket is created; everything after `connect` works on the file descriptor.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ClientError;
use crate::spec::Spec;

/// A connected byte stream to the host.
#[derive(Debug)]
pub enum Stream {
    /// Unix socket.
    Unix(UnixStream),
    /// AF_VSOCK socket.
    Vsock(vsock::VsockStream),
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Vsock(s) => s.as_fd(),
        }
    }
}

impl Stream {
    /// A second handle on the same socket (for the reader thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Vsock(s) => Stream::Vsock(s.try_clone()?),
        })
    }

    /// Read timeout (`None`: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Vsock(s) => s.set_read_timeout(t),
        }
    }

    /// Write timeout (`None`: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Vsock(s) => s.set_write_timeout(t),
        }
    }

    /// Ends both directions, waking a reader blocked on the socket.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Vsock(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A way to reach the host.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Opens a new connection.
    fn connect(&self) -> io::Result<Stream>;
    /// The spec string, for messages.
    fn describe(&self) -> String;
    /// The guest device to take channels and mapped reads from, if any.
    fn device(&self) -> Option<&std::path::Path> {
        None
    }
}

/// A Unix socket path.
#[derive(Debug, Clone)]
pub struct UnixTransport(pub PathBuf);

impl Transport for UnixTransport {
    fn connect(&self) -> io::Result<Stream> {
        UnixStream::connect(&self.0).map(Stream::Unix)
    }

    fn describe(&self) -> String {
        format!("unix:{}", self.0.display())
    }
}

/// AF_VSOCK to a CID and port.
#[derive(Debug, Clone)]
pub struct VsockTransport {
    /// Peer CID (2 = the host).
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl Transport for VsockTransport {
    fn connect(&self) -> io::Result<Stream> {
        vsock::VsockStream::connect_with_cid_port(self.cid, self.port).map(Stream::Vsock)
    }

    fn describe(&self) -> String {
        format!("vsock:{}:{}", self.cid, self.port)
    }
}

/// The guest device for channels and mapped reads, vsock for the rest.
#[derive(Debug, Clone)]
pub struct DeviceTransport {
    /// The device node.
    pub path: PathBuf,
    /// The socket to the same identity.
    pub control: VsockTransport,
}

impl Transport for DeviceTransport {
    fn connect(&self) -> io::Result<Stream> {
        self.control.connect()
    }

    fn describe(&self) -> String {
        format!(
            "device:{} (and {})",
            self.path.display(),
            self.control.describe()
        )
    }

    fn device(&self) -> Option<&std::path::Path> {
        Some(&self.path)
    }
}

/// The transport a spec names (`auto` is resolved first, and logged).
pub fn from_spec(spec: &Spec) -> Result<Box<dyn Transport>, ClientError> {
    match spec.resolve() {
        Spec::Unix(p) => Ok(Box::new(UnixTransport(p))),
        Spec::Vsock { cid, port } => Ok(Box::new(VsockTransport { cid, port })),
        Spec::Device { path, port } => Ok(Box::new(DeviceTransport {
            path,
            control: VsockTransport {
                cid: crate::spec::HOST_CID,
                port,
            },
        })),
        Spec::Auto => Err(ClientError::BadSpec {
            spec: "auto".into(),
        }),
    }
}
