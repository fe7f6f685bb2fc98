//! Client-side proof verification, RFC 9162 §2.1.3.2 and §2.1.4.2.
//!
//! These functions need nothing but the proof and the roots a client already
//! trusts (from signed tree heads), so an auditor can check the log without
//! any access to its storage. The loops follow the RFC step by step; an
//! explicit length check runs first so a malformed proof is reported as
//! such instead of as a root mismatch.
//!
//! Degenerate inputs follow transparency-dev/merkle's Go
//! `proof.VerifyConsistency`: `old_size > new_size` and `old_size == 0` are
//! rejected (the latter because RFC 9162 defines proofs only for
//! `0 < first`, and a proof from the empty tree proves nothing — a client
//! with no earlier head simply has nothing to check), while
//! `old_size == new_size` is accepted with an empty proof and equal roots.

use thiserror::Error;

use crate::checkpoint::CheckpointError;
use crate::hash::{Hash, node_hash};

/// Why a proof or a signed tree head did not verify.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The leaf index is not inside the tree the proof claims to be for.
    #[error("leaf index {index} is out of range for a tree of size {size} (need index < size)")]
    IndexOutOfRange {
        /// Claimed leaf index.
        index: u64,
        /// Claimed tree size.
        size: u64,
    },
    /// The proof has the wrong number of hashes for the given sizes.
    #[error("proof has {got} hashes, but these tree sizes need exactly {want}")]
    WrongProofLength {
        /// Hashes supplied.
        got: usize,
        /// Hashes the sizes imply.
        want: usize,
    },
    /// The inclusion proof leads to a different root than the trusted one.
    #[error(
        "inclusion proof yields root {}, expected {}",
        hex::encode(calculated),
        hex::encode(expected)
    )]
    RootMismatch {
        /// Root recomputed from leaf and proof.
        calculated: Hash,
        /// Trusted root.
        expected: Hash,
    },
    /// Consistency from a larger tree to a smaller one is meaningless.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeExceedsNew {
        /// Claimed earlier size.
        old_size: u64,
        /// Claimed later size.
        new_size: u64,
    },
    /// RFC 9162 defines consistency proofs only for `0 < old_size`.
    #[error(
        "consistency from old tree size 0 is not verifiable: RFC 9162 needs 0 < old size, and the empty tree is consistent with every tree"
    )]
    EmptyOldTree,
    /// The proof does not reproduce the trusted old root.
    #[error(
        "consistency proof yields old root {}, expected {}",
        hex::encode(calculated),
        hex::encode(expected)
    )]
    OldRootMismatch {
        /// Old root recomputed from the proof.
        calculated: Hash,
        /// Trusted old root.
        expected: Hash,
    },
    /// The proof does not lead to the claimed new root (for equal sizes: the
    /// two roots differ).
    #[error(
        "consistency proof yields new root {}, expected {}",
        hex::encode(calculated),
        hex::encode(expected)
    )]
    NewRootMismatch {
        /// New root recomputed from the proof.
        calculated: Hash,
        /// Claimed new root.
        expected: Hash,
    },
    /// The signed tree head names a different key than the verifier holds.
    #[error(
        "signed tree head has key id {got}, but this verifier's key id for its origin is {expected}"
    )]
    KeyIdMismatch {
        /// Key id the verifier computed (signed-note definition).
        expected: String,
        /// Key id carried by the signed tree head.
        got: String,
    },
    /// The Ed25519 signature does not verify over the checkpoint body.
    #[error("Ed25519 signature does not verify over the checkpoint body")]
    BadSignature,
    /// The tree head cannot be (or was not) encoded as a checkpoint body.
    #[error("invalid tree head: {0}")]
    InvalidHead(#[from] CheckpointError),
    /// A signed note carries no signature line from this verifier's key.
    #[error("no signature line from key {name}+{key_id} in the note")]
    NoMatchingSignature {
        /// Key name looked for (the checkpoint origin).
        name: String,
        /// Key id looked for, hex.
        key_id: String,
    },
}

/// Bit length of `x` (0 for 0).
fn bit_len(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Proof length for leaf `index` in a tree of `size`, split into the part
/// below the point where the paths to `index` and `size - 1` diverge
/// ("inner") and the left siblings above it ("border").
fn inclusion_len(index: u64, size: u64) -> (u32, u32) {
    let inner = bit_len(index ^ (size - 1));
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner, border)
}

/// Verifies that `leaf` is entry `index` of the tree of `size` with `root`,
/// following RFC 9162 §2.1.3.2.
///
/// `leaf` is the leaf *hash* ([`crate::hash::leaf_hash`] of the entry).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    // Step 1.
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    let (inner, border) = inclusion_len(index, size);
    let want = (inner + border) as usize;
    if proof.len() != want {
        return Err(VerifyError::WrongProofLength {
            got: proof.len(),
            want,
        });
    }
    // Steps 2-3.
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    // Step 4.
    for p in proof {
        if sn == 0 {
            return Err(VerifyError::WrongProofLength {
                got: proof.len(),
                want,
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // Step 5.
    if sn != 0 {
        return Err(VerifyError::WrongProofLength {
            got: proof.len(),
            want,
        });
    }
    if r != *root {
        return Err(VerifyError::RootMismatch {
            calculated: r,
            expected: *root,
        });
    }
    Ok(())
}

/// Proof length between sizes `0 < old < new` (as transparency-dev/merkle
/// computes it): the inclusion path of leaf `old - 1` in the new tree, less
/// the levels inside the old tree's rightmost perfect subtree, plus that
/// subtree's root unless the old tree is itself perfect.
fn consistency_len(old: u64, new: u64) -> usize {
    let (fork, border) = inclusion_len(old - 1, new);
    let inner = fork.saturating_sub(old.trailing_zeros());
    let seed = u32::from(!old.is_power_of_two());
    (seed + inner + border) as usize
}

/// Verifies that the tree of `new_size` with `new_root` extends the tree of
/// `old_size` with `old_root`, following RFC 9162 §2.1.4.2.
///
/// See the module docs for the handling of `old_size == 0` (rejected) and
/// `old_size == new_size` (empty proof, equal roots).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    if old_size > new_size {
        return Err(VerifyError::OldSizeExceedsNew { old_size, new_size });
    }
    if old_size == 0 {
        return Err(VerifyError::EmptyOldTree);
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(VerifyError::WrongProofLength {
                got: proof.len(),
                want: 0,
            });
        }
        if old_root != new_root {
            return Err(VerifyError::NewRootMismatch {
                calculated: *old_root,
                expected: *new_root,
            });
        }
        return Ok(());
    }
    let want = consistency_len(old_size, new_size);
    let wrong_length = || VerifyError::WrongProofLength {
        got: proof.len(),
        want,
    };
    // Step 1 (an empty proof always has the wrong length here).
    if proof.len() != want || proof.is_empty() {
        return Err(wrong_length());
    }
    // Steps 2 and 5: a perfect old tree's root is implicitly the first path
    // element; borrow it instead of copying the proof.
    let (seed, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (&proof[0], &proof[1..])
    };
    // Steps 3-4.
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    // Step 6.
    for c in rest {
        if sn == 0 {
            return Err(wrong_length());
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // Step 7.
    if sn != 0 {
        return Err(wrong_length());
    }
    if fr != *old_root {
        return Err(VerifyError::OldRootMismatch {
            calculated: fr,
            expected: *old_root,
        });
    }
    if sr != *new_root {
        return Err(VerifyError::NewRootMismatch {
            calculated: sr,
            expected: *new_root,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_lengths_match_rfc_examples() {
        // RFC 6962 §2.1.3 example tree of 7 leaves.
        assert_eq!(inclusion_len(0, 7), (3, 0)); // a: b, h, l
        assert_eq!(inclusion_len(3, 7), (3, 0)); // d: c, g, l
        assert_eq!(inclusion_len(4, 7), (2, 1)); // e: f, j, k
        assert_eq!(inclusion_len(6, 7), (0, 2)); // j: i, k
        assert_eq!(inclusion_len(0, 1), (0, 0));
        // RFC 6962 §2.1.3 consistency examples.
        assert_eq!(consistency_len(3, 7), 4); // c, d, g, l
        assert_eq!(consistency_len(4, 7), 1); // l
        assert_eq!(consistency_len(6, 7), 3); // i, j, k
        assert_eq!(consistency_len(1, 2), 1);
    }

    #[test]
    fn trivial_consistency_cases() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        assert_eq!(verify_consistency(3, 3, &a, &a, &[]), Ok(()));
        assert_eq!(
            verify_consistency(3, 3, &a, &a, &[a]),
            Err(VerifyError::WrongProofLength { got: 1, want: 0 })
        );
        assert!(matches!(
            verify_consistency(3, 3, &a, &b, &[]),
            Err(VerifyError::NewRootMismatch { .. })
        ));
        assert_eq!(
            verify_consistency(0, 3, &a, &b, &[]),
            Err(VerifyError::EmptyOldTree)
        );
        assert_eq!(
            verify_consistency(0, 0, &a, &a, &[]),
            Err(VerifyError::EmptyOldTree)
        );
        assert_eq!(
            verify_consistency(4, 3, &a, &b, &[]),
            Err(VerifyError::OldSizeExceedsNew {
                old_size: 4,
                new_size: 3
            })
        );
        assert!(matches!(
            verify_consistency(2, 3, &a, &b, &[]),
            Err(VerifyError::WrongProofLength { got: 0, .. })
        ));
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        let h = [0u8; 32];
        // Only the length check matters here: must not panic.
        let _ = verify_inclusion(&h, 0, u64::MAX, &[], &h);
        let _ = verify_inclusion(&h, u64::MAX - 1, u64::MAX, &[], &h);
        let _ = verify_consistency(1, u64::MAX, &h, &h, &[]);
        let _ = verify_consistency(u64::MAX - 1, u64::MAX, &h, &h, &[]);
        let _ = verify_consistency(1 << 63, u64::MAX, &h, &h, &[]);
    }
}
