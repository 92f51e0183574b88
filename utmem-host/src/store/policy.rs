//! What the operator configured: quotas and shared-pool grants. Replaced whole on reload.

use std::collections::{HashMap, HashSet};

use utmem_proto::PoolUuid;

/// A shared pool the configuration declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedGrant {
    /// Cap on the bytes the shared pool holds (charged to the pool, not to its users).
    pub quota: u64,
    /// Identities that may open it.
    pub identities: HashSet<String>,
}

/// Quotas and grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Quota of an identity the configuration does not name.
    pub default_quota: u64,
    /// Quotas by identity name.
    pub quotas: HashMap<String, u64>,
    /// Shared pools by uuid.
    pub shared: HashMap<PoolUuid, SharedGrant>,
}

impl Policy {
    /// Everyone gets `default_quota`; no shared pools.
    pub fn new(default_quota: u64) -> Self {
        Policy {
            default_quota,
            quotas: HashMap::new(),
            shared: HashMap::new(),
        }
    }

    /// The quota of a (non-shared) identity.
    pub fn quota_of(&self, identity: &str) -> u64 {
        self.quotas
            .get(identity)
            .copied()
            .unwrap_or(self.default_quota)
    }

    /// Whether `identity` may open the shared pool `uuid`.
    pub fn grants(&self, uuid: &PoolUuid, identity: &str) -> bool {
        self.shared
            .get(uuid)
            .is_some_and(|g| g.identities.contains(identity))
    }
}
