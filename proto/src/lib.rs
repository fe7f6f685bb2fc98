//! The PIL gRPC contract (package `pil.v1`) and the identifier rules both sides of it
//! enforce. Shared by the node and the client so they can never disagree.

pub mod categories;
pub mod error_line;
pub mod ident;

/// Generated messages and service stubs of package `pil.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pil.v1");
}

/// The encoded file descriptor set of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pil_descriptor");
