//! Exhaustive and property-based checks of frontier, proof generation and
//! verification against the RFC 6962 definitions (tests/common naive_*).

mod common;

use std::sync::OnceLock;

use pil_transparency::{
    Frontier, Hash, VerifyError, consistency_proof, inclusion_proof, leaf_hash, subtree_root,
    verify_consistency, verify_inclusion,
};
use proptest::prelude::*;

use common::{Log, naive_path, naive_root, naive_subproof};

const EXHAUSTIVE_MAX: usize = 70;
const LARGE_SIZES: [usize; 9] = [127, 128, 129, 255, 256, 257, 1000, 1024, 1025];

fn entries(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("pil audit record {i}").into_bytes())
        .collect()
}

/// One log per process, large enough for every test; proofs for smaller
/// sizes come from the same storage, as they would in production.
fn big_log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| Log::from_entries(&entries(2048)))
}

/// Roots of every prefix, by the definition.
fn roots(n: usize) -> Vec<Hash> {
    let leaves = &big_log().leaves;
    (0..=n).map(|s| naive_root(&leaves[..s])).collect()
}

/// Every single-bit change of every proof element (the bit varies with the
/// byte position so all bit positions get covered).
fn flips(proof: &[Hash]) -> impl Iterator<Item = Vec<Hash>> + '_ {
    (0..proof.len()).flat_map(move |e| {
        (0..32).map(move |b| {
            let mut p = proof.to_vec();
            p[e][b] ^= 1 << (b % 8);
            p
        })
    })
}

#[test]
fn frontier_root_matches_definition_for_every_size() {
    let leaves = &big_log().leaves;
    let mut frontier = Frontier::new();
    let sizes = (0..=EXHAUSTIVE_MAX).chain(LARGE_SIZES);
    let mut appended = 0;
    for size in sizes {
        while appended < size {
            frontier.append(leaves[appended]);
            appended += 1;
        }
        let want = naive_root(&leaves[..size]);
        assert_eq!(frontier.root(), want, "size {size}");
        assert_eq!(frontier.peaks().len(), size.count_ones() as usize);
        let from_store = subtree_root(&big_log().store, 0, size as u64).unwrap();
        assert_eq!(from_store, want, "size {size} from storage");
        let restored = Frontier::from_parts(size as u64, frontier.peaks().to_vec()).unwrap();
        assert_eq!(restored.root(), want);
    }
}

#[test]
fn every_inclusion_proof_up_to_70_verifies_and_resists_tampering() {
    let log = big_log();
    let roots = roots(EXHAUSTIVE_MAX + 1);
    let (mut proofs, mut tampered) = (0, 0);
    for n in 1..=EXHAUSTIVE_MAX {
        let leaves = &log.leaves[..n];
        let root = roots[n];
        for i in 0..n {
            let proof = inclusion_proof(&log.store, i as u64, n as u64).unwrap();
            assert_eq!(proof, naive_path(i, leaves), "PATH({i}, {n})");
            verify_inclusion(&leaves[i], i as u64, n as u64, &proof, &root).unwrap();
            proofs += 1;

            let rejects = |leaf: &Hash, index: usize, size: usize, p: &[Hash], r: &Hash| {
                verify_inclusion(leaf, index as u64, size as u64, p, r).is_err()
            };
            for p in flips(&proof) {
                assert!(rejects(&leaves[i], i, n, &p, &root), "flip ({i}, {n})");
                tampered += 1;
            }
            for j in (0..n).filter(|&j| j != i) {
                assert!(
                    rejects(&leaves[i], j, n, &proof, &root),
                    "index {j} ({i}, {n})"
                );
                assert!(
                    rejects(&leaves[j], i, n, &proof, &root),
                    "leaf {j} ({i}, {n})"
                );
            }
            for m in (i + 1..=EXHAUSTIVE_MAX + 1).filter(|&m| m != n) {
                assert!(
                    rejects(&leaves[i], i, m, &proof, &roots[m]),
                    "size {m} ({i}, {n})"
                );
            }
            let mut longer = proof.clone();
            longer.push(root);
            assert!(rejects(&leaves[i], i, n, &longer, &root));
            let mut longer = proof.clone();
            longer.insert(0, leaves[i]);
            assert!(rejects(&leaves[i], i, n, &longer, &root));
            if !proof.is_empty() {
                assert!(rejects(&leaves[i], i, n, &proof[1..], &root));
                assert!(rejects(&leaves[i], i, n, &proof[..proof.len() - 1], &root));
            }
            assert!(rejects(&leaves[i], i, n, &proof, &roots[n - 1]));
        }
    }
    assert_eq!(proofs, EXHAUSTIVE_MAX * (EXHAUSTIVE_MAX + 1) / 2);
    assert!(tampered > 100_000);
}

#[test]
fn every_consistency_proof_up_to_70_verifies_and_resists_tampering() {
    let log = big_log();
    let roots = roots(EXHAUSTIVE_MAX);
    let mut pairs = 0;
    for n in 1..=EXHAUSTIVE_MAX {
        for m in 1..=n {
            let proof = consistency_proof(&log.store, m as u64, n as u64).unwrap();
            let want = if m == n {
                vec![]
            } else {
                naive_subproof(m, &log.leaves[..n], true)
            };
            assert_eq!(proof, want, "PROOF({m}, {n})");
            let (r1, r2) = (roots[m], roots[n]);
            verify_consistency(m as u64, n as u64, &r1, &r2, &proof).unwrap();
            pairs += 1;

            let rejects = |m: usize, n: usize, r1: &Hash, r2: &Hash, p: &[Hash]| {
                verify_consistency(m as u64, n as u64, r1, r2, p).is_err()
            };
            for p in flips(&proof) {
                assert!(rejects(m, n, &r1, &r2, &p), "flip ({m}, {n})");
            }
            if m != n {
                assert!(rejects(m, n, &r2, &r1, &proof), "swapped roots ({m}, {n})");
                assert!(rejects(m, n, &r1, &r1, &proof), "old root twice ({m}, {n})");
                assert!(rejects(m, n, &r2, &r2, &proof), "new root twice ({m}, {n})");
                assert!(
                    rejects(m, n, &r1, &r2, &proof[1..]),
                    "drop first ({m}, {n})"
                );
                let short = &proof[..proof.len() - 1];
                assert!(rejects(m, n, &r1, &r2, short), "drop last ({m}, {n})");
            }
            let mut longer = proof.clone();
            longer.push(r2);
            assert!(rejects(m, n, &r1, &r2, &longer), "trailing root ({m}, {n})");
            let mut longer = proof.clone();
            longer.insert(0, r1);
            assert!(
                rejects(m, n, &r1, &r2, &longer),
                "preceding root ({m}, {n})"
            );
            for m2 in (1..=n).filter(|&m2| m2 != m) {
                assert!(
                    rejects(m2, n, &roots[m2], &r2, &proof),
                    "old size {m2} ({m}, {n})"
                );
            }
            for n2 in (m..=EXHAUSTIVE_MAX).filter(|&n2| n2 != n) {
                assert!(
                    rejects(m, n2, &r1, &roots[n2], &proof),
                    "new size {n2} ({m}, {n})"
                );
            }
        }
    }
    assert_eq!(pairs, EXHAUSTIVE_MAX * (EXHAUSTIVE_MAX + 1) / 2);
}

#[test]
fn larger_trees() {
    let log = big_log();
    for &n in &LARGE_SIZES {
        let leaves = &log.leaves[..n];
        let root = naive_root(leaves);
        for i in 0..n {
            let proof = inclusion_proof(&log.store, i as u64, n as u64).unwrap();
            verify_inclusion(&leaves[i], i as u64, n as u64, &proof, &root).unwrap();
            if i % 61 == 0 || i + 1 == n {
                assert_eq!(proof, naive_path(i, leaves), "PATH({i}, {n})");
                for p in flips(&proof) {
                    assert!(verify_inclusion(&leaves[i], i as u64, n as u64, &p, &root).is_err());
                }
            }
        }
        for m in (1..=n).filter(|m| m % 37 == 0 || m.is_power_of_two() || n - m < 3) {
            let proof = consistency_proof(&log.store, m as u64, n as u64).unwrap();
            let old = naive_root(&leaves[..m]);
            verify_consistency(m as u64, n as u64, &old, &root, &proof).unwrap();
            if m < n {
                assert_eq!(proof, naive_subproof(m, leaves, true), "PROOF({m}, {n})");
            }
            for p in flips(&proof) {
                assert!(verify_consistency(m as u64, n as u64, &old, &root, &p).is_err());
            }
        }
    }
}

#[test]
fn verification_errors_say_what_failed() {
    let log = big_log();
    let roots = roots(8);
    let proof = inclusion_proof(&log.store, 2, 5).unwrap();
    let leaf = log.leaves[2];
    assert_eq!(
        verify_inclusion(&leaf, 5, 5, &proof, &roots[5]),
        Err(VerifyError::IndexOutOfRange { index: 5, size: 5 })
    );
    assert_eq!(
        verify_inclusion(&leaf, 2, 5, &proof[..2], &roots[5]),
        Err(VerifyError::WrongProofLength { got: 2, want: 3 })
    );
    let err = verify_inclusion(&leaf, 2, 5, &proof, &roots[4]).unwrap_err();
    assert!(matches!(err, VerifyError::RootMismatch { .. }));
    assert!(err.to_string().contains(&hex::encode(roots[4])));

    let proof = consistency_proof(&log.store, 3, 7).unwrap();
    assert!(matches!(
        verify_consistency(3, 7, &roots[4], &roots[7], &proof),
        Err(VerifyError::OldRootMismatch { .. })
    ));
    assert!(matches!(
        verify_consistency(3, 7, &roots[3], &roots[6], &proof),
        Err(VerifyError::NewRootMismatch { .. })
    ));
    assert_eq!(
        verify_consistency(3, 7, &roots[3], &roots[7], &proof[..3]),
        Err(VerifyError::WrongProofLength { got: 3, want: 4 })
    );
    assert_eq!(
        verify_consistency(0, 7, &roots[0], &roots[7], &[]),
        Err(VerifyError::EmptyOldTree)
    );
}

#[test]
fn leaf_hash_is_of_the_entry() {
    let log = big_log();
    assert_eq!(log.leaves[0], leaf_hash(b"pil audit record 0"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_inclusion(n in 1usize..=2048, i_seed in any::<u64>(), elem in any::<usize>(),
                        byte in 0usize..32, bit in 0u8..8) {
        let log = big_log();
        let i = (i_seed % n as u64) as usize;
        let leaves = &log.leaves[..n];
        let root = naive_root(leaves);
        let proof = inclusion_proof(&log.store, i as u64, n as u64).unwrap();
        prop_assert_eq!(&proof, &naive_path(i, leaves));
        prop_assert!(verify_inclusion(&leaves[i], i as u64, n as u64, &proof, &root).is_ok());
        if !proof.is_empty() {
            let mut bad = proof.clone();
            bad[elem % proof.len()][byte] ^= 1 << bit;
            prop_assert!(verify_inclusion(&leaves[i], i as u64, n as u64, &bad, &root).is_err());
        }
    }

    #[test]
    fn random_consistency(n in 1usize..=2048, m_seed in any::<u64>(), elem in any::<usize>(),
                          byte in 0usize..32, bit in 0u8..8) {
        let log = big_log();
        let m = 1 + (m_seed % n as u64) as usize;
        let leaves = &log.leaves[..n];
        let (old, new) = (naive_root(&leaves[..m]), naive_root(leaves));
        let proof = consistency_proof(&log.store, m as u64, n as u64).unwrap();
        if m < n {
            prop_assert_eq!(&proof, &naive_subproof(m, leaves, true));
        }
        prop_assert!(verify_consistency(m as u64, n as u64, &old, &new, &proof).is_ok());
        if !proof.is_empty() {
            let mut bad = proof.clone();
            bad[elem % proof.len()][byte] ^= 1 << bit;
            prop_assert!(verify_consistency(m as u64, n as u64, &old, &new, &bad).is_err());
        }
    }
}
