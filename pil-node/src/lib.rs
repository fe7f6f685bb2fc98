//! A regional PIL node: the pointer registry, its store and the gRPC service over it.
//!
//! Start at [`server::start`]; docs/ARCHITECTURE.md maps the modules.

mod access;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
mod error;
pub mod federation;
mod http_client;
mod identity;
mod in_force;
mod issuer_keys;
mod lookup;
pub mod metrics;
pub mod patient_keys;
pub mod pki;
pub mod pointer;
pub mod registry;
mod rekey;
mod reload;
pub mod routing;
mod secret_file;
pub mod server;
mod service;
pub mod store;
mod sync;
mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod tls;
pub mod witness;
