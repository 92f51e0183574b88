//! Guest side of utmem: transports, the pipelined client and the `utmem` CLI.
//!
//! Not built yet: this crate only re-exports the contract it will speak.

pub use utmem_proto as proto;
