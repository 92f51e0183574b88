//! Transport specs, as written in module options, CLI flags and docs:
//! `unix:/path`, `vsock:PORT` (the host, CID 2), `vsock:CID:PORT`,
//! `device:/dev/utmem` (the guest device, with vsock to the host's default port for
//! what the device does not carry), `device:/dev/utmem,vsock:PORT`, `auto`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use utmem_proto::DEFAULT_VSOCK_PORT;

use crate::error::ClientError;

/// The vsock CID of the host, seen from a guest.
pub const HOST_CID: u32 = 2;
/// The guest driver's device; `auto` prefers it when it exists.
pub const DEVICE_PATH: &str = "/dev/utmem";

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A Unix socket path (a local daemon, or a VMM's hybrid-vsock socket).
    Unix(PathBuf),
    /// AF_VSOCK to `cid:port`.
    Vsock {
        /// Peer CID (2 = the host).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// The guest device (`/dev/utmem`) for channels and mapped reads, and AF_VSOCK to
    /// the host (CID 2) at `port` for the rest.
    Device {
        /// The device node.
        path: PathBuf,
        /// The host's vsock port.
        port: u32,
    },
    /// Pick at connect time: see [`Spec::resolve`].
    Auto,
}

impl FromStr for Spec {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadSpec { spec: s.to_owned() };
        if s == "auto" {
            return Ok(Spec::Auto);
        }
        if let Some(rest) = s.strip_prefix("device:") {
            let (path, port) = match rest.split_once(",vsock:") {
                Some((p, port)) => (p, port.parse::<u32>().map_err(|_| bad())?),
                None => (rest, DEFAULT_VSOCK_PORT),
            };
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(Spec::Device {
                path: PathBuf::from(path),
                port,
            });
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Spec::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let num = |x: &str| x.parse::<u32>().map_err(|_| bad());
            return match rest.split_once(':') {
                None => Ok(Spec::Vsock {
                    cid: HOST_CID,
                    port: num(rest)?,
                }),
                Some((cid, port)) => {
                    let cid = num(cid)?;
                    // 0 (hypervisor), 1 (local) and u32::MAX (any) are not peers to dial.
                    if cid < 2 || cid == u32::MAX {
                        return Err(bad());
                    }
                    Ok(Spec::Vsock {
                        cid,
                        port: num(port)?,
                    })
                }
            };
        }
        Err(bad())
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Unix(p) => write!(f, "unix:{}", p.display()),
            Spec::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Spec::Device { path, port } if *port == DEFAULT_VSOCK_PORT => {
                write!(f, "device:{}", path.display())
            }
            Spec::Device { path, port } => write!(f, "device:{},vsock:{port}", path.display()),
            Spec::Auto => f.write_str("auto"),
        }
    }
}

impl Spec {
    /// Turns `auto` into a concrete transport and says why; others stay as they are.
    /// `auto` means the `/dev/utmem` device when it exists, otherwise
    /// `vsock:2:<default port>` (and a device the host does not serve falls back to
    /// that vsock connection at connect time).
    pub fn resolve(&self) -> Spec {
        self.resolve_with(Path::new(DEVICE_PATH))
    }

    fn resolve_with(&self, device: &Path) -> Spec {
        if *self != Spec::Auto {
            return self.clone();
        }
        if device.exists() {
            let chosen = Spec::Device {
                path: device.to_owned(),
                port: DEFAULT_VSOCK_PORT,
            };
            tracing::info!(
                "transport auto: {} exists; using {chosen}",
                device.display()
            );
            return chosen;
        }
        let chosen = Spec::Vsock {
            cid: HOST_CID,
            port: DEFAULT_VSOCK_PORT,
        };
        tracing::info!("transport auto: no {}; using {chosen}", device.display());
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "unix:/run/utmem.sock".parse::<Spec>(),
            Ok(Spec::Unix("/run/utmem.sock".into()))
        );
        assert_eq!(
            "vsock:7719".parse::<Spec>(),
            Ok(Spec::Vsock { cid: 2, port: 7719 })
        );
        assert_eq!(
            "vsock:3:1234".parse::<Spec>(),
            Ok(Spec::Vsock { cid: 3, port: 1234 })
        );
        assert_eq!("auto".parse::<Spec>(), Ok(Spec::Auto));
        assert_eq!(
            "device:/dev/utmem".parse::<Spec>(),
            Ok(Spec::Device {
                path: "/dev/utmem".into(),
                port: DEFAULT_VSOCK_PORT
            })
        );
        assert_eq!(
            "device:/dev/utmem,vsock:9".parse::<Spec>(),
            Ok(Spec::Device {
                path: "/dev/utmem".into(),
                port: 9
            })
        );
    }

    #[test]
    fn rejects_bad_forms_with_the_accepted_ones_named() {
        for bad in [
            "",
            "unix:",
            "tcp:1",
            "vsock:",
            "vsock:x",
            "vsock:2:",
            "vsock:1:5",
            "vsock:0:5",
            "vsock:4294967295:1",
            "vsock:2:3:4",
            "vsock:99999999999",
            "AUTO",
            "device:",
            "device:dev/utmem",
            "device:/dev/utmem,vsock:x",
        ] {
            let e = bad.parse::<Spec>().unwrap_err();
            assert!(e
                .to_string()
                .contains("unix:/path, vsock:PORT, vsock:CID:PORT, device:/dev/utmem or auto"));
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "unix:/a/b",
            "vsock:2:7719",
            "vsock:3:1",
            "auto",
            "device:/dev/utmem",
            "device:/dev/u,vsock:5",
        ] {
            assert_eq!(s.parse::<Spec>().unwrap().to_string(), s);
        }
        assert_eq!("vsock:5".parse::<Spec>().unwrap().to_string(), "vsock:2:5");
    }

    #[test]
    fn auto_resolves_without_connecting() {
        let none = Path::new("/nonexistent/utmem-device");
        assert_eq!(
            Spec::Auto.resolve_with(none),
            Spec::Vsock {
                cid: 2,
                port: DEFAULT_VSOCK_PORT
            }
        );
        let u = Spec::Unix("/x".into());
        assert_eq!(u.resolve_with(none), u);
        let here = Path::new("/dev/null");
        assert_eq!(
            Spec::Auto.resolve_with(here),
            Spec::Device {
                path: here.into(),
                port: DEFAULT_VSOCK_PORT
            }
        );
    }
}
