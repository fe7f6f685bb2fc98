//! Client library for PIL nodes, and the `pil` command line built on it.
//!
//! Connect with a [`Profile`] (node address, CA, organization certificate and key) and
//! call the typed methods of [`PilClient`]. [`records`] converts pointers to and from
//! the NDJSON and CSV forms that record systems exchange with PIL. [`audit_verify`]
//! checks a node's audit log and its proofs with nothing but the node's public key.

pub mod audit_cli;
pub mod audit_record;
pub mod audit_verify;
pub mod cli;
pub mod client;
pub mod console;
pub mod console_cli;
pub mod credentials;
pub mod error;
pub mod events_cli;
pub mod peers_cli;
pub mod profile;
pub mod records;

pub use audit_verify::{LogProblem, LogVerifier, VerifyReport, verify_log};
pub use client::{PilClient, SyncOptions};
pub use credentials::{Credentials, DevTokenParams};
pub use error::{ClientError, Refusal};
pub use pil_proto::v1;
pub use profile::Profile;
