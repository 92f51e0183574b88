//! Least-recently-used order: every use takes a fresh tick; the smallest tick goes first.

use std::collections::{BTreeMap, HashMap};

use utmem_proto::Key;

use super::EvictionPolicy;

/// LRU order in O(log n) per operation.
#[derive(Debug, Default)]
pub struct Lru {
    tick: u64,
    by_tick: BTreeMap<u64, Key>,
    tick_of: HashMap<Key, u64>,
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, key: Key) {
        self.touch(key);
    }

    fn touch(&mut self, key: Key) {
        self.tick += 1;
        if let Some(old) = self.tick_of.insert(key, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(t) = self.tick_of.remove(&key) {
            self.by_tick.remove(&t);
        }
    }

    fn victim(&self) -> Option<Key> {
        self.by_tick.first_key_value().map(|(_, k)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let mut l = Lru::default();
        let (a, b, c) = (Key::new(1, 0), Key::new(2, 0), Key::new(3, 0));
        l.insert(a);
        l.insert(b);
        l.insert(c);
        assert_eq!(l.victim(), Some(a));
        l.touch(a);
        assert_eq!(l.victim(), Some(b));
        l.remove(b);
        assert_eq!(l.victim(), Some(c));
        l.remove(c);
        l.remove(a);
        assert_eq!(l.victim(), None);
    }
}
