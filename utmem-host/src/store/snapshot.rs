//! A point-in-time view of the whole store, for the operator (admin channel).

use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};
use utmem_proto::PoolKind;

use super::identity::Counters;
use super::{read, Store};

/// The whole host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSnapshot {
    /// Host-wide capacity in bytes.
    pub capacity: u64,
    /// Value bytes held host-wide.
    pub used: u64,
    /// Bytes charged against the capacity: values, per-value overhead, PUTs in flight.
    #[serde(default)]
    pub charged: u64,
    /// Every identity, by name.
    pub identities: Vec<IdentitySnapshot>,
}

/// One identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentitySnapshot {
    /// Its name.
    pub name: String,
    /// Its quota.
    pub quota: u64,
    /// Values charged to it.
    pub values: u64,
    /// Value bytes its pools hold.
    pub bytes: u64,
    /// Bytes charged against its quota: values, per-value overhead, PUTs in flight.
    #[serde(default)]
    pub charged: u64,
    /// Connections open now.
    #[serde(default)]
    pub connections: u64,
    /// PUTs stored.
    pub puts: u64,
    /// GETs.
    pub gets: u64,
    /// GET hits.
    pub hits: u64,
    /// GET misses.
    pub misses: u64,
    /// Values evicted from its ephemeral pools.
    pub evictions: u64,
    /// PUTs refused.
    pub refusals: u64,
    /// PUTs refused with NO_SPACE (the rest of `refusals` were TOO_LARGE).
    #[serde(default)]
    pub no_space: u64,
    /// Bytes of its value arena (0 until a local client maps it).
    #[serde(default)]
    pub arena_size: u64,
    /// Bytes of its arena held by values and their headers (or parked).
    #[serde(default)]
    pub arena_used: u64,
    /// Bytes of its durable pools' log files in the data directory.
    #[serde(default)]
    pub log_bytes: u64,
    /// Of those, bytes of records of live values (the rest is reclaimed by compaction).
    #[serde(default)]
    pub log_live_bytes: u64,
    /// Pools it has open.
    pub pools: Vec<PoolSnapshot>,
}

/// One pool as one identity sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSnapshot {
    /// The handle in that identity.
    pub id: u32,
    /// Private name or shared uuid.
    pub name: String,
    /// Whether it is shared.
    pub shared: bool,
    /// Whether it is ephemeral.
    pub ephemeral: bool,
    /// Whether it is durable (kept in the data directory across restarts).
    #[serde(default)]
    pub durable: bool,
    /// Values it holds.
    pub values: u64,
    /// Bytes it holds.
    pub bytes: u64,
    /// What was done to the pool by every identity that has it open.
    #[serde(default)]
    pub counters: PoolCounters,
}

/// A pool's counters; all monotonic while the pool lives.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolCounters {
    /// PUTs stored.
    pub puts: u64,
    /// GETs.
    pub gets: u64,
    /// GET hits.
    pub hits: u64,
    /// GET misses.
    pub misses: u64,
    /// Values evicted.
    pub evictions: u64,
    /// PUTs refused with NO_SPACE.
    pub no_space: u64,
    /// PUTs refused with TOO_LARGE.
    pub too_large: u64,
}

impl PoolCounters {
    fn of(c: &Counters) -> Self {
        let no_space = c.no_space.load(Relaxed);
        PoolCounters {
            puts: c.puts.load(Relaxed),
            gets: c.gets.load(Relaxed),
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            evictions: c.evictions.load(Relaxed),
            no_space,
            too_large: c.refusals.load(Relaxed).saturating_sub(no_space),
        }
    }
}

impl Store {
    /// Everything, sorted by identity name and pool id.
    pub fn snapshot(&self) -> HostSnapshot {
        let mut identities: Vec<IdentitySnapshot> = read(&self.identities)
            .values()
            .map(|i| {
                let c = &i.counters;
                let arena = super::lock(&i.arena).clone();
                let (arena_size, arena_used) = arena.map_or((0, 0), |a| {
                    (a.len(), a.len().saturating_sub(a.free_bytes()))
                });
                let pools = i
                    .open_pools()
                    .into_iter()
                    .map(|(id, p)| {
                        let (values, bytes) = p.counts();
                        let (name, shared) = match p.kind() {
                            PoolKind::Private(n) => (n.clone(), false),
                            PoolKind::Shared(u) => (u.to_string(), true),
                        };
                        PoolSnapshot {
                            id: id.0,
                            name,
                            shared,
                            ephemeral: p.is_ephemeral(),
                            durable: p.is_durable(),
                            values,
                            bytes,
                            counters: PoolCounters::of(&p.counters),
                        }
                    })
                    .collect();
                let (log_bytes, log_live_bytes) = self.durable_sizes(i).unwrap_or((0, 0));
                IdentitySnapshot {
                    name: i.name.clone(),
                    quota: i.quota(),
                    values: i.values.load(Relaxed),
                    bytes: i.used(),
                    charged: i.charged(),
                    connections: i.connections() as u64,
                    puts: c.puts.load(Relaxed),
                    gets: c.gets.load(Relaxed),
                    hits: c.hits.load(Relaxed),
                    misses: c.misses.load(Relaxed),
                    evictions: c.evictions.load(Relaxed),
                    refusals: c.refusals.load(Relaxed),
                    no_space: c.no_space.load(Relaxed),
                    arena_size,
                    arena_used,
                    log_bytes,
                    log_live_bytes,
                    pools,
                }
            })
            .collect();
        identities.sort_by(|a, b| a.name.cmp(&b.name));
        HostSnapshot {
            capacity: self.capacity,
            used: self.used(),
            charged: self.charged(),
            identities,
        }
    }
}
