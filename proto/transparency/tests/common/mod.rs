//! Helpers shared by the integration tests.
#![allow(dead_code)]

use pil_transparency::{Frontier, Hash, MemoryNodes, leaf_hash, node_hash};

/// Decodes a 64-digit hex string into a hash.
pub fn hd(s: &str) -> Hash {
    hex::decode(s)
        .expect("valid hex")
        .try_into()
        .expect("32 bytes")
}

/// A log built through the public API: frontier plus every stored node.
pub struct Log {
    pub frontier: Frontier,
    pub store: MemoryNodes,
    pub leaves: Vec<Hash>,
}

impl Log {
    pub fn from_leaf_hashes(leaves: Vec<Hash>) -> Self {
        let mut frontier = Frontier::new();
        let mut store = MemoryNodes::new();
        for leaf in &leaves {
            store.extend(frontier.append(*leaf));
        }
        Self {
            frontier,
            store,
            leaves,
        }
    }

    pub fn from_entries<T: AsRef<[u8]>>(entries: &[T]) -> Self {
        Self::from_leaf_hashes(entries.iter().map(|e| leaf_hash(e.as_ref())).collect())
    }
}

/// Largest power of two strictly below `n` (n >= 2).
pub fn split(n: usize) -> usize {
    assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// RFC 6962 MTH computed straight from the definition.
pub fn naive_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => pil_transparency::empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
        }
    }
}

/// RFC 6962 PATH(m, D[n]) straight from the definition.
pub fn naive_path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return vec![];
    }
    let k = split(n);
    if m < k {
        let mut p = naive_path(m, &leaves[..k]);
        p.push(naive_root(&leaves[k..]));
        p
    } else {
        let mut p = naive_path(m - k, &leaves[k..]);
        p.push(naive_root(&leaves[..k]));
        p
    }
}

/// RFC 6962 SUBPROOF(m, D[n], b) straight from the definition.
pub fn naive_subproof(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if b { vec![] } else { vec![naive_root(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = naive_subproof(m, &leaves[..k], b);
        p.push(naive_root(&leaves[k..]));
        p
    } else {
        let mut p = naive_subproof(m - k, &leaves[k..], false);
        p.push(naive_root(&leaves[..k]));
        p
    }
}
