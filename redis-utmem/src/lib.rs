//! The utmem Redis module.
//!
//! Not built yet (see the README's status table): this crate holds no code so
//! that nothing claims to work before it does.
