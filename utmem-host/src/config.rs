//! The daemon's settings: listener specs, sizes, and the TOML file with
//! per-identity quotas and shared-pool grants (re-read on SIGHUP).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use utmem_proto::PoolUuid;

use crate::store::{Policy, SharedGrant};

/// Errors in settings; each names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that is not `<number>[K|M|G|T][i][B]`.
    #[error(
        "bad size {0:?}: expected a number with an optional K, M, G or T suffix (binary units)"
    )]
    BadSize(String),
    /// A listener spec of the wrong form.
    #[error(
        "bad listener {0:?}: expected unix:PATH, unix:PATH=NAME, vsock:PORT or ivshmem:PATH=NAME"
    )]
    BadListen(String),
    /// A uuid that does not parse.
    #[error("bad shared pool uuid {0:?}")]
    BadUuid(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
}

/// Parses `512M`, `1G`, `1GiB`, `4096`: binary units, because these are memory sizes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_owned());
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix(['i', 'I']).unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Where the daemon listens for guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// A Unix socket; with a name, every client of it is that identity (a VM's
    /// hybrid-vsock socket), without one the peer uid is.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// Identity of every client.
        name: Option<String>,
    },
    /// AF_VSOCK on this port, any guest CID; the identity is `cid:<peer cid>`.
    Vsock {
        /// Port.
        port: u32,
    },
    /// An ivshmem server socket for one VM's `ivshmem-doorbell` device (the guest's
    /// `/dev/utmem`): the region of identity `name`.
    Ivshmem {
        /// Socket path (QEMU's `-chardev socket,path=`).
        path: PathBuf,
        /// The VM's identity (its hybrid-vsock listener's name).
        name: String,
    },
}

impl std::str::FromStr for ListenSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadListen(s.to_owned());
        if let Some(rest) = s.strip_prefix("unix:") {
            let (path, name) = match rest.rsplit_once('=') {
                Some((p, n)) if !n.is_empty() && !n.contains('/') => (p, Some(n.to_owned())),
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(bad());
            }
            Ok(ListenSpec::Unix {
                path: PathBuf::from(path),
                name,
            })
        } else if let Some(rest) = s.strip_prefix("ivshmem:") {
            match rest.rsplit_once('=') {
                Some((p, n)) if !p.is_empty() && !n.is_empty() && !n.contains('/') => {
                    Ok(ListenSpec::Ivshmem {
                        path: PathBuf::from(p),
                        name: n.to_owned(),
                    })
                }
                _ => Err(bad()),
            }
        } else if let Some(port) = s.strip_prefix("vsock:") {
            Ok(ListenSpec::Vsock {
                port: port.parse().map_err(|_| bad())?,
            })
        } else {
            Err(bad())
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShared {
    uuid: String,
    quota: Option<String>,
    #[serde(default)]
    grant: Vec<String>,
}

/// The TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Host-wide capacity (the command line wins).
    pub capacity: Option<String>,
    /// Default quota per identity (the command line wins).
    pub quota: Option<String>,
    /// Extra listeners, same syntax as `--listen`.
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    quotas: HashMap<String, String>,
    #[serde(default)]
    shared: Vec<FileShared>,
}

impl ConfigFile {
    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The store policy this file describes; `default_quota` applies to unnamed identities
    /// and to shared pools without a quota of their own.
    pub fn policy(&self, default_quota: u64) -> Result<Policy, ConfigError> {
        let mut policy = Policy::new(default_quota);
        for (name, q) in &self.quotas {
            policy.quotas.insert(name.clone(), parse_size(q)?);
        }
        for s in &self.shared {
            let uuid =
                uuid::Uuid::parse_str(&s.uuid).map_err(|_| ConfigError::BadUuid(s.uuid.clone()))?;
            let quota = s.quota.as_deref().map(parse_size).transpose()?;
            policy.shared.insert(
                PoolUuid(*uuid.as_bytes()),
                SharedGrant {
                    quota: quota.unwrap_or(default_quota),
                    identities: s.grant.iter().cloned().collect::<HashSet<_>>(),
                },
            );
        }
        Ok(policy)
    }
}

/// Half of physical memory: the default capacity.
pub fn default_capacity() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok().flatten().unwrap_or(0);
    let size = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096);
    let total = u64::try_from(pages).unwrap_or(0) * u64::try_from(size).unwrap_or(4096);
    (total / 2).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size("3T").unwrap(), 3 << 40);
        for bad in ["", "G", "1X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_specs() {
        assert_eq!(
            "unix:/run/vm1.sock_7719=vm1".parse::<ListenSpec>().unwrap(),
            ListenSpec::Unix {
                path: "/run/vm1.sock_7719".into(),
                name: Some("vm1".into())
            }
        );
        assert_eq!(
            "unix:/tmp/u.sock".parse::<ListenSpec>().unwrap(),
            ListenSpec::Unix {
                path: "/tmp/u.sock".into(),
                name: None
            }
        );
        assert_eq!(
            "vsock:7719".parse::<ListenSpec>().unwrap(),
            ListenSpec::Vsock { port: 7719 }
        );
        assert_eq!(
            "ivshmem:/run/vm1.ivshmem=vm1"
                .parse::<ListenSpec>()
                .unwrap(),
            ListenSpec::Ivshmem {
                path: "/run/vm1.ivshmem".into(),
                name: "vm1".into()
            }
        );
        for bad in ["ivshmem:/x", "ivshmem:=vm", "ivshmem:/x=", "ivshmem:/x=a/b"] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad}");
        }
        for bad in ["tcp:1", "unix:", "vsock:x", "vsock:"] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_file() {
        let f = ConfigFile::parse(
            r#"
            quota = "1G"
            listen = ["unix:/tmp/a=vm-a"]
            [quotas]
            "cid:3" = "2G"
            [[shared]]
            uuid = "12345678-9abc-def0-0123-456789abcdef"
            quota = "64M"
            grant = ["vm-a", "cid:3"]
            "#,
        )
        .unwrap();
        let p = f.policy(1 << 30).unwrap();
        assert_eq!(p.quota_of("cid:3"), 2 << 30);
        assert_eq!(p.quota_of("cid:4"), 1 << 30);
        let u = PoolUuid(
            *uuid::Uuid::parse_str("12345678-9abc-def0-0123-456789abcdef")
                .unwrap()
                .as_bytes(),
        );
        assert!(p.grants(&u, "vm-a"));
        assert!(!p.grants(&u, "vm-b"));
        assert_eq!(p.shared[&u].quota, 64 << 20);
        assert!(ConfigFile::parse("bogus = 1").is_err());
    }
}
