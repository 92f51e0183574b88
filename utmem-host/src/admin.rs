//! The operator's channel: a Unix socket (mode 0600) that guests cannot reach.
//!
//! One request per connection, one line: `stats` or `drop-identity NAME`.
//! The answer is `ok` followed by a body (JSON for `stats`), or `error: why`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use crate::server::{bind_unix, ListenError};
use crate::store::{HostSnapshot, Store};

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The daemon's admin socket is not reachable.
    #[error("cannot reach the admin socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The socket failed mid-request.
    #[error("admin socket error: {0}")]
    Io(#[from] io::Error),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
    /// The answer does not parse.
    #[error("malformed answer from the daemon: {0}")]
    Malformed(String),
}

/// Binds the admin socket with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    // Narrow the umask around bind so the socket is never reachable by others, even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let sock = bind_unix(path);
    nix::sys::stat::umask(old);
    let sock = sock?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ListenError::Bind {
            what: path.display().to_string(),
            source,
        }
    })?;
    Ok(sock)
}

/// Serves admin requests on `sock` forever.
pub fn spawn(sock: UnixListener, store: Arc<Store>) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name("utmem-admin".into())
        .spawn(move || {
            for conn in sock.incoming().flatten() {
                if let Err(e) = serve_one(conn, &store) {
                    tracing::warn!("admin request failed: {e}");
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the admin thread: {e}"))
}

fn serve_one(conn: UnixStream, store: &Store) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new((&conn).take(4096)).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let answer = match (words.next(), words.next(), words.next()) {
        (Some("stats"), None, _) => {
            let snap = store.snapshot();
            format!(
                "ok\n{}\n",
                serde_json::to_string(&snap).map_err(io::Error::other)?
            )
        }
        (Some("drop-identity"), Some(name), None) => match store.drop_identity(name) {
            Some(bytes) => {
                tracing::info!(identity = name, bytes, "identity dropped by the operator");
                format!("ok\ndropped {name}: freed {bytes} bytes\n")
            }
            None => format!("error: no identity named {name:?}\n"),
        },
        _ => format!(
            "error: unknown request {:?}; expected `stats` or `drop-identity NAME`\n",
            line.trim()
        ),
    };
    (&conn).write_all(answer.as_bytes())
}

fn request(path: &Path, line: &str) -> Result<String, AdminError> {
    let mut conn = UnixStream::connect(path).map_err(|source| AdminError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    conn.write_all(line.as_bytes())?;
    conn.write_all(b"\n")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    match answer.split_once('\n') {
        Some(("ok", body)) => Ok(body.trim_end().to_owned()),
        _ => Err(AdminError::Refused(
            answer.trim().trim_start_matches("error: ").to_owned(),
        )),
    }
}

/// Asks the daemon for everything it holds.
pub fn stats(path: &Path) -> Result<HostSnapshot, AdminError> {
    let body = request(path, "stats")?;
    serde_json::from_str(&body).map_err(|e| AdminError::Malformed(e.to_string()))
}

/// Asks the daemon to free every pool of identity `name`; returns its message.
pub fn drop_identity(path: &Path, name: &str) -> Result<String, AdminError> {
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(AdminError::Refused(format!("bad identity name {name:?}")));
    }
    request(path, &format!("drop-identity {name}"))
}

/// The snapshot as a table for humans.
pub fn render(s: &HostSnapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "host: {} of {} bytes used", s.used, s.capacity);
    let _ = writeln!(
        out,
        "{:<24} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "identity / pool",
        "values",
        "bytes",
        "quota",
        "puts",
        "gets",
        "hits",
        "misses",
        "evictions",
        "refusals"
    );
    for i in &s.identities {
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            i.name,
            i.values,
            i.bytes,
            i.quota,
            i.puts,
            i.gets,
            i.hits,
            i.misses,
            i.evictions,
            i.refusals
        );
        for p in &i.pools {
            let kind = match (p.shared, p.ephemeral, p.durable) {
                (true, true, _) => "shared, ephemeral",
                (true, false, true) => "shared, durable",
                (true, false, false) => "shared, persistent",
                (false, true, _) => "ephemeral",
                (false, false, true) => "durable",
                (false, false, false) => "persistent",
            };
            let label = format!("  #{} {} ({kind})", p.id, p.name);
            let _ = writeln!(out, "{label:<24} {:>10} {:>12}", p.values, p.bytes);
        }
    }
    out
}
