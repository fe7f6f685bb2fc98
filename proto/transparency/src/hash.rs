//! RFC 6962 §2.1 hashing with domain separation.
//!
//! Leaves and interior nodes are hashed with different one-byte prefixes so
//! that no leaf can ever be passed off as an interior node (or the other way
//! round): without the prefix an attacker could present the concatenation of
//! two child hashes as a "leaf" and forge an inclusion proof for it.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// Prefix byte for leaf hashes (RFC 6962 §2.1).
const LEAF_PREFIX: u8 = 0x00;
/// Prefix byte for interior node hashes (RFC 6962 §2.1).
const NODE_PREFIX: u8 = 0x01;

/// `SHA-256(0x00 || data)`: the hash of one log entry.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `SHA-256("")`: the root of the empty tree, MTH({}) in RFC 6962.
///
/// Deliberately not the hash of an empty *leaf*, which is `leaf_hash(b"")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}
