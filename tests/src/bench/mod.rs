//! The benchmark harness behind `pil-bench`: real nodes as child processes, real
//! mutual TLS and requester tokens, a deterministic data set, and the two baselines
//! (a trivial gRPC service and PostgreSQL) measured in the same run.

pub mod data;
pub mod events;
pub mod floor;
pub mod load;
pub mod node;
pub mod pg;
pub mod proc;
pub mod report;
pub mod routing;
pub mod suite;
pub mod sync_cost;
