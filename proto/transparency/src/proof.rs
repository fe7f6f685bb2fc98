//! Proof generation from stored perfect subtrees (RFC 6962 §2.1.1, §2.1.2).
//!
//! The log persists every [`StoredNode`] that [`crate::Frontier::append`]
//! reports, i.e. every *perfect, aligned* subtree. Any Merkle tree hash a
//! proof needs, for any past tree size, is either one of those nodes or is
//! rebuilt from O(log n) of them with RFC 6962's split rule, so proofs for
//! old tree heads stay producible without keeping per-size snapshots.

use std::collections::HashMap;

use thiserror::Error;

use crate::frontier::StoredNode;
use crate::hash::{Hash, empty_root, node_hash};

/// Read access to stored perfect subtrees.
///
/// `node(level, index)` must return the hash of leaves
/// `[index * 2^level, (index + 1) * 2^level)`, as reported by
/// [`crate::Frontier::append`].
pub trait NodeSource {
    /// Why a node could not be read (missing, I/O, ...).
    type Error: std::error::Error + 'static;

    /// The stored hash of the perfect subtree at `(level, index)`.
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

impl<T: NodeSource + ?Sized> NodeSource for &T {
    type Error = T::Error;

    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        (**self).node(level, index)
    }
}

/// Why a proof could not be produced.
#[derive(Debug, Error)]
pub enum ProofError<E> {
    /// An inclusion proof was asked for a leaf the tree does not contain.
    #[error("leaf index {index} is out of range for a tree of size {size} (need index < size)")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The tree size the proof was asked against.
        size: u64,
    },
    /// A consistency proof was asked from a larger tree to a smaller one.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeExceedsNew {
        /// The earlier tree size.
        old_size: u64,
        /// The later tree size.
        new_size: u64,
    },
    /// RFC 6962 defines consistency proofs only for `0 < old_size`: every
    /// tree extends the empty tree, so there is nothing to prove.
    #[error(
        "consistency proof from old tree size 0 is undefined: the empty tree is consistent with every tree, so there is nothing to prove"
    )]
    EmptyOldTree,
    /// A subtree range was reversed.
    #[error("invalid leaf range [{start}, {end}): start must not exceed end")]
    InvalidRange {
        /// First leaf of the range.
        start: u64,
        /// One past the last leaf of the range.
        end: u64,
    },
    /// The node store failed, typically because a node the proof needs was
    /// never stored (the tree is smaller than asked).
    #[error("node store: {0}")]
    Source(#[source] E),
}

/// A stored node that is not in a [`MemoryNodes`].
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("no stored node at level {level}, index {index}")]
pub struct MissingNode {
    /// Level of the requested node.
    pub level: u8,
    /// Index of the requested node within its level.
    pub index: u64,
}

/// An in-memory [`NodeSource`], for tests and for clients that mirror a log.
#[derive(Clone, Debug, Default)]
pub struct MemoryNodes {
    nodes: HashMap<(u8, u64), Hash>,
}

impl MemoryNodes {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores one node, replacing any earlier hash at the same position.
    pub fn insert(&mut self, node: StoredNode) {
        self.nodes.insert((node.level, node.index), node.hash);
    }

    /// Number of stored nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl Extend<StoredNode> for MemoryNodes {
    fn extend<I: IntoIterator<Item = StoredNode>>(&mut self, iter: I) {
        for node in iter {
            self.insert(node);
        }
    }
}

impl FromIterator<StoredNode> for MemoryNodes {
    fn from_iter<I: IntoIterator<Item = StoredNode>>(iter: I) -> Self {
        let mut store = Self::new();
        store.extend(iter);
        store
    }
}

impl NodeSource for MemoryNodes {
    type Error = MissingNode;

    fn node(&self, level: u8, index: u64) -> Result<Hash, MissingNode> {
        self.nodes
            .get(&(level, index))
            .copied()
            .ok_or(MissingNode { level, index })
    }
}

/// Largest power of two strictly smaller than `n`; requires `n >= 2`.
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start:end]) for a non-empty range.
fn mth<S: NodeSource>(src: &S, start: u64, end: u64) -> Result<Hash, ProofError<S::Error>> {
    let n = end - start;
    if n.is_power_of_two() && start.is_multiple_of(n) {
        let level = n.trailing_zeros() as u8;
        return src.node(level, start >> level).map_err(ProofError::Source);
    }
    let k = split_point(n);
    let left = mth(src, start, start + k)?;
    let right = mth(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The RFC 6962 Merkle tree hash of leaves `[start, end)`.
///
/// Perfect aligned ranges are read straight from the store; others are
/// split at the largest power of two below their length, as RFC 6962 does.
/// `subtree_root(src, 0, n)` is the root of the tree of size `n`; an empty
/// range gives [`empty_root`].
pub fn subtree_root<S: NodeSource>(
    src: &S,
    start: u64,
    end: u64,
) -> Result<Hash, ProofError<S::Error>> {
    match end.checked_sub(start) {
        None => Err(ProofError::InvalidRange { start, end }),
        Some(0) => Ok(empty_root()),
        Some(_) => mth(src, start, end),
    }
}

/// RFC 6962 §2.1.1 `PATH(index, D[0:size])`: the audit path of leaf `index`
/// in the tree of size `size`, ordered from the leaf upwards.
pub fn inclusion_proof<S: NodeSource>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::with_capacity(64);
    path(src, index, 0, size, &mut proof)?;
    Ok(proof)
}

/// PATH(m, D[start:end]) with `m` an absolute leaf index.
fn path<S: NodeSource>(
    src: &S,
    m: u64,
    start: u64,
    end: u64,
    out: &mut Vec<Hash>,
) -> Result<(), ProofError<S::Error>> {
    let n = end - start;
    if n == 1 {
        return Ok(());
    }
    let mid = start + split_point(n);
    if m < mid {
        path(src, m, start, mid, out)?;
        out.push(mth(src, mid, end)?);
    } else {
        path(src, m, mid, end, out)?;
        out.push(mth(src, start, mid)?);
    }
    Ok(())
}

/// RFC 6962 §2.1.2 `PROOF(old_size, D[0:new_size])`: the hashes that let a
/// client holding the old root verify that the new tree extends it.
///
/// Equal sizes give an empty proof; `old_size == 0` is an error because
/// RFC 6962 defines the proof only for `0 < old_size`.
pub fn consistency_proof<S: NodeSource>(
    src: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if old_size > new_size {
        return Err(ProofError::OldSizeExceedsNew { old_size, new_size });
    }
    if old_size == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    let mut proof = Vec::with_capacity(64);
    if old_size < new_size {
        subproof(src, old_size, 0, new_size, true, &mut proof)?;
    }
    Ok(proof)
}

/// SUBPROOF(m, D[start:end], b) with `m` counted from `start`.
fn subproof<S: NodeSource>(
    src: &S,
    m: u64,
    start: u64,
    end: u64,
    b: bool,
    out: &mut Vec<Hash>,
) -> Result<(), ProofError<S::Error>> {
    let n = end - start;
    if m == n {
        // The verifier already knows MTH(D[0:m]) when b is true.
        if !b {
            out.push(mth(src, start, end)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(src, m, start, start + k, b, out)?;
        out.push(mth(src, start + k, end)?);
    } else {
        subproof(src, m - k, start + k, end, false, out)?;
        out.push(mth(src, start, start + k)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontier::Frontier;
    use crate::hash::leaf_hash;

    fn store(n: u8) -> MemoryNodes {
        let mut f = Frontier::new();
        (0..n).flat_map(|i| f.append(leaf_hash(&[i]))).collect()
    }

    #[test]
    fn split_point_is_largest_power_below() {
        for (n, k) in [
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 4),
            (8, 4),
            (9, 8),
            (u64::MAX, 1 << 63),
        ] {
            assert_eq!(split_point(n), k, "n={n}");
        }
    }

    #[test]
    fn argument_errors() {
        let s = store(4);
        assert!(matches!(
            inclusion_proof(&s, 4, 4),
            Err(ProofError::IndexOutOfRange { index: 4, size: 4 })
        ));
        assert!(matches!(
            inclusion_proof(&s, 0, 0),
            Err(ProofError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            consistency_proof(&s, 3, 2),
            Err(ProofError::OldSizeExceedsNew {
                old_size: 3,
                new_size: 2
            })
        ));
        assert!(matches!(
            consistency_proof(&s, 0, 2),
            Err(ProofError::EmptyOldTree)
        ));
        assert!(matches!(
            consistency_proof(&s, 0, 0),
            Err(ProofError::EmptyOldTree)
        ));
        assert!(matches!(
            subtree_root(&s, 3, 2),
            Err(ProofError::InvalidRange { start: 3, end: 2 })
        ));
        assert_eq!(subtree_root(&s, 2, 2).unwrap(), empty_root());
        assert!(consistency_proof(&s, 4, 4).unwrap().is_empty());
    }

    #[test]
    fn missing_nodes_surface_as_source_errors() {
        let s = store(4);
        let err = inclusion_proof(&s, 0, 5).unwrap_err();
        assert!(matches!(
            err,
            ProofError::Source(MissingNode { level: 0, index: 4 })
        ));
        assert!(err.to_string().contains("level 0, index 4"));
        let as_error: &dyn std::error::Error = &err;
        assert!(as_error.source().is_some());
        assert!(matches!(
            consistency_proof(&s, 2, 6),
            Err(ProofError::Source(_))
        ));
    }
}
