//! The integration tests that run real nodes, one module per theme, in one test
//! executable: one link of the node and RocksDB instead of one per theme.

mod access;
mod audit;
mod cli;
mod durability;
mod federation;
mod privacy;
mod registry;
mod sync;
mod trust;
mod validation;
