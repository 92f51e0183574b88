//! Which value an ephemeral pool drops first. Policy only: the pool owns the values.

mod lru;

pub use lru::Lru;

use utmem_proto::Key;

/// An order over the keys of one pool, consulted when room must be made.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// A key was stored (new or replaced).
    fn insert(&mut self, key: Key);
    /// A key was read.
    fn touch(&mut self, key: Key);
    /// A key left the pool.
    fn remove(&mut self, key: Key);
    /// The key to drop next, if any.
    fn victim(&self) -> Option<Key>;
}
