//! The append-only frontier ("compact range") of a log.
//!
//! A log of `n` leaves is covered, left to right, by one perfect subtree per
//! set bit of `n`, largest first. Keeping just the roots of those subtrees
//! (the *peaks*, at most 64 hashes) is enough to append further leaves and to
//! compute the current root, so the writer never has to read old nodes back.
//! Every perfect subtree an append completes is handed to the caller as a
//! [`StoredNode`]; persisting those is what later lets
//! [`crate::proof`] build proofs from storage alone.

use thiserror::Error;

use crate::hash::{Hash, empty_root, node_hash};

/// A perfect subtree that became complete, identified by its position.
///
/// Level `L`, index `i` covers leaves `[i * 2^L, (i + 1) * 2^L)`; level 0 is
/// the leaves themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StoredNode {
    /// Height of the subtree (0 = a single leaf).
    pub level: u8,
    /// Position of the subtree among those of the same level.
    pub index: u64,
    /// RFC 6962 hash of the subtree.
    pub hash: Hash,
}

/// Why a persisted frontier could not be restored.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrontierError {
    /// A tree of `size` leaves has exactly `size.count_ones()` peaks.
    #[error(
        "a tree of size {size} has {expected} peaks (one per set bit of the size), but {got} were given"
    )]
    PeakCountMismatch {
        /// The claimed tree size.
        size: u64,
        /// `size.count_ones()`.
        expected: u32,
        /// The number of peaks supplied.
        got: usize,
    },
    /// A frontier at `u64::MAX` leaves could not take another append.
    #[error("tree size {0} leaves no room to append; the largest restorable size is u64::MAX - 1")]
    Full(u64),
}

/// The compact range `[0, size)` of a log: its size and its peaks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Roots of the perfect subtrees covering `[0, size)`, largest (leftmost)
    /// first. Invariant: `peaks.len() == size.count_ones()`.
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a frontier persisted as `(size(), peaks())`.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Result<Self, FrontierError> {
        let expected = size.count_ones();
        if peaks.len() != expected as usize {
            return Err(FrontierError::PeakCountMismatch {
                size,
                expected,
                got: peaks.len(),
            });
        }
        // Rejecting u64::MAX keeps `append` free of an overflow path.
        if size == u64::MAX {
            return Err(FrontierError::Full(size));
        }
        Ok(Self { size, peaks })
    }

    /// Number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Roots of the perfect subtrees covering `[0, size)`, largest first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends one leaf hash (see [`crate::hash::leaf_hash`]).
    ///
    /// Returns every perfect subtree this append completed, lowest first: the
    /// leaf itself (level 0, index = old size), then each parent whose right
    /// half was just filled.
    pub fn append(&mut self, leaf: Hash) -> Vec<StoredNode> {
        let index = self.size;
        let mut nodes = Vec::with_capacity(1 + index.trailing_ones() as usize);
        nodes.push(StoredNode {
            level: 0,
            index,
            hash: leaf,
        });
        let mut hash = leaf;
        let mut level: u8 = 0;
        // Each trailing one bit of the old size is a peak of the same height
        // as `hash`, directly to its left: merge them.
        while (index >> level) & 1 == 1 {
            // The invariant peaks.len() == size.count_ones() guarantees a
            // peak for every set bit, so this cannot be empty.
            let left = self
                .peaks
                .pop()
                .expect("frontier invariant: one peak per set bit of size");
            hash = node_hash(&left, &hash);
            level += 1;
            nodes.push(StoredNode {
                level,
                index: index >> level,
                hash,
            });
        }
        self.peaks.push(hash);
        // from_parts refuses u64::MAX and reaching it by appending would take
        // 2^64 appends, so this cannot overflow.
        self.size = index + 1;
        nodes
    }

    /// The RFC 6962 Merkle tree hash of all leaves so far.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(last) = peaks.next() else {
            return empty_root();
        };
        peaks.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;

    #[test]
    fn append_reports_completed_subtrees() {
        let mut f = Frontier::new();
        let l: Vec<Hash> = (0u8..4).map(|i| leaf_hash(&[i])).collect();
        assert_eq!(f.append(l[0]).len(), 1);
        let n = f.append(l[1]);
        assert_eq!(n.len(), 2);
        assert_eq!((n[1].level, n[1].index), (1, 0));
        assert_eq!(n[1].hash, node_hash(&l[0], &l[1]));
        assert_eq!(f.append(l[2]).len(), 1);
        let n = f.append(l[3]);
        assert_eq!(
            n.iter().map(|s| (s.level, s.index)).collect::<Vec<_>>(),
            vec![(0, 3), (1, 1), (2, 0)]
        );
        assert_eq!(f.peaks(), &[n[2].hash]);
        assert_eq!(f.root(), n[2].hash);
    }

    #[test]
    fn from_parts_checks_peak_count() {
        assert!(Frontier::from_parts(0, vec![]).is_ok());
        assert_eq!(
            Frontier::from_parts(3, vec![[0; 32]]),
            Err(FrontierError::PeakCountMismatch {
                size: 3,
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            Frontier::from_parts(u64::MAX, vec![[0; 32]; 64]),
            Err(FrontierError::Full(u64::MAX))
        );
    }

    #[test]
    fn restored_frontier_continues_identically() {
        let mut a = Frontier::new();
        for i in 0u8..11 {
            a.append(leaf_hash(&[i]));
        }
        let mut b = Frontier::from_parts(a.size(), a.peaks().to_vec()).unwrap();
        for i in 11u8..20 {
            assert_eq!(a.append(leaf_hash(&[i])), b.append(leaf_hash(&[i])));
        }
        assert_eq!(a, b);
    }
}
