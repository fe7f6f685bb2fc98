//! Client library for PIL nodes, and the `pil` command line built on it.
//!
//! Connect with a [`Profile`] (node address, CA, organization certificate and key) and
//! call the typed methods of [`PilClient`]. [`records`] converts pointers to and from
//! the NDJSON and CSV forms that record systems exchange with PIL.

pub mod cli;
pub mod client;
pub mod credentials;
pub mod profile;
pub mod records;

pub use client::{ClientError, PilClient, SyncOptions};
pub use credentials::{Credentials, DevTokenParams};
pub use pil_proto::v1;
pub use profile::Profile;
