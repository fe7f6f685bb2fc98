//! A regional PIL node: the pointer registry in RocksDB and the gRPC service over it.
//!
//! Start at [`server::start`]; docs/ARCHITECTURE.md maps the modules.

pub mod access;
pub mod audit;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod federation;
pub mod identity;
pub mod patient_keys;
pub mod pki;
pub mod pointer;
pub mod preflight;
pub mod registry;
pub mod reload;
pub mod secret_file;
pub mod server;
pub mod service;
pub mod storage;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod writer;
