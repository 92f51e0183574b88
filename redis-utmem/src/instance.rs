//! This Redis instance's id: part of its pool's name, so that two servers never
//! share (and empty) one pool, while a restarted server finds its own again.
//!
//! The id lives in a small file in Redis's working directory (`dir`), beside its RDB
//! and AOF: two containers with the same port and uid have different data directories,
//! a restarted server has the same one.

use std::io::Write;
use std::path::Path;

/// The file's name, in Redis's working directory.
pub const FILE: &str = "utmem.id";

fn valid(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(b.len()) {
        // No entropy source: time and pid still differ between instances.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() << 30 | u64::from(d.subsec_nanos()));
        b = (u64::from(std::process::id()) ^ t).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The id kept in `dir`, created there on first use. `Err((id, why))`: the file
/// could not be written; `id` is a fresh one for this run only.
pub fn id(dir: &Path) -> Result<String, (String, std::io::Error)> {
    let path = dir.join(FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if valid(s) {
            return Ok(s.to_owned());
        }
    }
    let id = random_id();
    let tmp = dir.join(format!("{FILE}.tmp"));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{id}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    match written {
        Ok(()) => Ok(id),
        Err(e) => Err((id, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_kept_and_distinct_per_directory() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ida = id(a.path()).unwrap();
        assert!(valid(&ida));
        assert_eq!(id(a.path()).unwrap(), ida, "kept across restarts");
        assert_ne!(id(b.path()).unwrap(), ida, "another directory, another id");
        std::fs::write(a.path().join(FILE), "garbage").unwrap();
        assert!(valid(&id(a.path()).unwrap()), "a bad file is replaced");
    }
}
