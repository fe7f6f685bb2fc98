//! Tamper-evidence core of the PIL audit log.
//!
//! Every audit record is a leaf of an append-only RFC 6962 Merkle tree.
//! The log signs its tree head (size + root) with Ed25519 in the C2SP
//! checkpoint format. Anyone holding a signed head can then check, without
//! trusting the log's storage:
//!
//! * that a record is in the log — an *inclusion proof* from its leaf hash to
//!   the signed root ([`inclusion_proof`] / [`verify_inclusion`]);
//! * that a later head only appended to an earlier one — a *consistency
//!   proof* between the two roots ([`consistency_proof`] /
//!   [`verify_consistency`]).
//!
//! Witnesses ([`witness`], c2sp.org/tlog-witness) cosign a head only when it is
//! consistent with every head they cosigned before ([`cosignature`]), so a log cannot
//! rewrite its history unseen by anyone who checks a quorum of cosignatures.
//!
//! The writer keeps only a [`Frontier`] (O(log n) hashes) and persists the
//! perfect subtrees each append completes ([`StoredNode`]); proofs for any
//! past size are rebuilt from those through a [`NodeSource`].
//!
//! ```
//! use pil_transparency::*;
//!
//! let mut frontier = Frontier::new();
//! let mut store = MemoryNodes::new();
//! for record in [b"a".as_slice(), b"b", b"c"] {
//!     store.extend(frontier.append(leaf_hash(record)));
//! }
//! let root = frontier.root();
//! let proof = inclusion_proof(&store, 1, 3).unwrap();
//! verify_inclusion(&leaf_hash(b"b"), 1, 3, &proof, &root).unwrap();
//!
//! let signer = HeadSigner::generate();
//! let head = TreeHead { origin: "pil.example/audit".into(), size: 3, root, timestamp_ms: 0 };
//! let sth = signer.sign(head).unwrap();
//! signer.verifier().verify(&sth).unwrap();
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod checkpoint;
pub mod cosignature;
pub mod frontier;
pub mod hash;
pub mod proof;
pub mod signed_head;
pub mod verify;
pub mod witness;

pub use checkpoint::{CheckpointError, SignedTreeHead, TreeHead, key_id};
pub use cosignature::{
    CosignatureError, Cosigner, CosignerKey, Quorum, QuorumCheck, add_signatures,
};
pub use frontier::{Frontier, FrontierError, StoredNode};
pub use hash::{Hash, empty_root, leaf_hash, node_hash};
pub use proof::{
    MemoryNodes, MissingNode, NodeSource, ProofError, consistency_proof, inclusion_proof,
    subtree_root,
};
pub use signed_head::{HeadSigner, HeadVerifier, KeyError};
pub use verify::{VerifyError, verify_consistency, verify_inclusion};
