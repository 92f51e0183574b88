//! The utmem host side: the pool store and the `utmem-hostd` daemon around it.
//!
//! [`store`] keeps values in pools per identity, with exact byte accounting,
//! per-identity quotas, a host-wide capacity and LRU eviction for ephemeral
//! pools; it knows nothing of sockets. [`server`] accepts guests on Unix and
//! AF_VSOCK listeners, tells who they are from the transport, and serves
//! pipelined utmem-proto requests against the store. [`admin`] is the
//! operator's channel; [`metrics`] the same figures for Prometheus; [`config`]
//! the command line and the TOML file.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod server;
pub mod store;

pub use store::{
    DurableOptions, FsyncPolicy, HostSnapshot, Identity, Policy, Pool, RecoveryReport, SharedGrant,
    Store, StoreOptions, VALUE_OVERHEAD,
};
