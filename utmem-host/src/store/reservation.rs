//! Bytes charged for a PUT whose payload is still on its way.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::identity::Identity;

/// A charge against an account and the host, made when a PUT's header arrived;
/// given back on drop unless [`crate::Store::commit_put`] turned it into a value's.
#[derive(Debug)]
pub struct Reservation {
    acct: Arc<Identity>,
    host: Arc<AtomicU64>,
    n: u64,
}

impl Reservation {
    pub(crate) fn new(acct: Arc<Identity>, host: Arc<AtomicU64>, n: u64) -> Self {
        Reservation { acct, host, n }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.n
    }

    /// `n` more bytes were charged to it.
    pub(crate) fn add(&mut self, n: u64) {
        self.n += n;
    }

    /// Hands its bytes over to the caller (who now accounts for them).
    pub(crate) fn take(&mut self) -> u64 {
        std::mem::take(&mut self.n)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.n > 0 {
            self.acct.charged.fetch_sub(self.n, Relaxed);
            self.host.fetch_sub(self.n, Relaxed);
        }
    }
}
