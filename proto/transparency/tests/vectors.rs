//! Known-answer tests ported from the Go reference implementation
//! transparency-dev/merkle (https://github.com/transparency-dev/merkle),
//! commit 417fb0c314750d94e53942e9f92e79b6d35915db (2026-07-23).
//!
//! | here                                   | upstream file                                   |
//! |----------------------------------------|-------------------------------------------------|
//! | `LEAF_INPUTS`, `NODE_HASHES`, `ROOT_HASHES`, `compact_trees_*` | `testonly/constants.go`  |
//! | `rfc6962_hasher_vectors`, `hasher_collisions` | `rfc6962/rfc6962_test.go`               |
//! | `reference_inclusion_proofs`, `reference_consistency_proofs` | `testonly/reference_test.go` |
//! | `go_generation_argument_errors`         | `proof/proof_test.go` (error rows)              |
//! | `tests/data/{inclusion,consistency}_probes.json` | `testdata/{inclusion,consistency}/**.json`, run as in `proof/verify_test.go` |
//! | `plants_*_vector`                       | `testonly/vectors_test.go` (accumulated vectors of draft-ietf-plants-merkle-tree-certs) |
//!
//! Upstream is Apache-2.0 licensed; the JSON probes are copied verbatim, one
//! object per upstream file, with a `file` field naming it.

mod common;

use std::fs;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pil_transparency::{
    Frontier, Hash, NodeSource, ProofError, consistency_proof, empty_root, inclusion_proof,
    leaf_hash, node_hash, subtree_root, verify_consistency, verify_inclusion,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use common::{Log, hd};

// ---- testonly/constants.go ----------------------------------------------

const LEAF_INPUTS: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

const NODE_HASHES: [&[&str]; 4] = [
    &[
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    &[
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    &[
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
];

const ROOT_HASHES: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// `CompactTrees()`: the peaks after each size, as (level, index) into
/// `NODE_HASHES`.
const COMPACT_TREES: [&[(usize, usize)]; 9] = [
    &[],
    &[(0, 0)],
    &[(1, 0)],
    &[(1, 0), (0, 2)],
    &[(2, 0)],
    &[(2, 0), (0, 4)],
    &[(2, 0), (1, 2)],
    &[(2, 0), (1, 2), (0, 6)],
    &[(3, 0)],
];

fn leaf_inputs() -> Vec<Vec<u8>> {
    LEAF_INPUTS
        .iter()
        .map(|s| hex::decode(s).expect("hex"))
        .collect()
}

fn golden_log() -> Log {
    Log::from_entries(&leaf_inputs())
}

#[test]
fn golden_root_hashes_for_every_size() {
    let mut frontier = Frontier::new();
    assert_eq!(frontier.root(), hd(ROOT_HASHES[0]));
    for (i, entry) in leaf_inputs().iter().enumerate() {
        frontier.append(leaf_hash(entry));
        assert_eq!(frontier.root(), hd(ROOT_HASHES[i + 1]), "size {}", i + 1);
    }
    // Past roots are also reproducible from storage of the full tree.
    let log = golden_log();
    for (size, want) in ROOT_HASHES.iter().enumerate() {
        assert_eq!(
            subtree_root(&log.store, 0, size as u64).unwrap(),
            hd(want),
            "size {size}"
        );
    }
}

#[test]
fn golden_node_hashes_are_exactly_the_stored_nodes() {
    let mut frontier = Frontier::new();
    let mut stored = Vec::new();
    for entry in leaf_inputs() {
        stored.extend(frontier.append(leaf_hash(&entry)));
    }
    let total: usize = NODE_HASHES.iter().map(|level| level.len()).sum();
    assert_eq!(stored.len(), total);
    for node in &stored {
        assert_eq!(
            node.hash,
            hd(NODE_HASHES[node.level as usize][node.index as usize]),
            "level {} index {}",
            node.level,
            node.index
        );
    }
    let log = golden_log();
    for (level, hashes) in NODE_HASHES.iter().enumerate() {
        for (index, want) in hashes.iter().enumerate() {
            assert_eq!(log.store.node(level as u8, index as u64).unwrap(), hd(want));
        }
    }
}

#[test]
fn compact_trees_are_the_frontier_peaks() {
    let mut frontier = Frontier::new();
    for (size, want) in COMPACT_TREES.iter().enumerate() {
        let want: Vec<Hash> = want.iter().map(|&(l, i)| hd(NODE_HASHES[l][i])).collect();
        assert_eq!(frontier.peaks(), &want[..], "size {size}");
        if let Some(entry) = leaf_inputs().get(size) {
            frontier.append(leaf_hash(entry));
        }
    }
}

// ---- rfc6962/rfc6962_test.go -------------------------------------------

#[test]
fn rfc6962_hasher_vectors() {
    // echo -n | sha256sum
    assert_eq!(
        empty_root(),
        hd("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    // echo -n 00 | xxd -r -p | sha256sum
    assert_eq!(
        leaf_hash(b""),
        hd("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    );
    // echo -n 004C313233343536 | xxd -r -p | sha256sum
    assert_eq!(
        leaf_hash(b"L123456"),
        hd("395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56")
    );
    // The upstream "RFC6962 Node" vector hashes 4-byte children ("N123",
    // "N456"), which the 32-byte `Hash` type cannot express; node hashing
    // is pinned by NODE_HASHES levels 1-3 instead:
    for level in 1..NODE_HASHES.len() {
        for (i, want) in NODE_HASHES[level].iter().enumerate() {
            let l = hd(NODE_HASHES[level - 1][2 * i]);
            let r = hd(NODE_HASHES[level - 1][2 * i + 1]);
            assert_eq!(node_hash(&l, &r), hd(want));
        }
    }
}

#[test]
fn hasher_collisions() {
    let (h1, h2) = (leaf_hash(b"Hello"), leaf_hash(b"World"));
    assert_ne!(h1, h2, "different leaves must hash differently");
    let sub = node_hash(&h1, &h2);
    let forged = leaf_hash(&[h1, h2].concat());
    assert_ne!(sub, forged, "a node must not be passable as a leaf");
    assert_ne!(sub, node_hash(&h2, &h1), "children order must matter");
}

// ---- testonly/reference_test.go ----------------------------------------

#[test]
fn reference_inclusion_proofs() {
    let table: &[(u64, u64, &[&str])] = &[
        (0, 1, &[]),
        (
            0,
            2,
            &["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
        ),
        (
            1,
            2,
            &["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    let log = golden_log();
    for &(index, size, want) in table {
        let want: Vec<Hash> = want.iter().map(|h| hd(h)).collect();
        let got = inclusion_proof(&log.store, index, size).unwrap();
        assert_eq!(got, want, "index {index} size {size}");
        let leaf = log.leaves[index as usize];
        let root = hd(ROOT_HASHES[size as usize]);
        verify_inclusion(&leaf, index, size, &got, &root).unwrap();
    }
}

#[test]
fn reference_consistency_proofs() {
    let table: &[(u64, u64, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        // From TestRefSubtreeConsistencyProof's start = 0 rows.
        (
            4,
            8,
            &["6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
        ),
    ];
    let log = golden_log();
    for &(m, n, want) in table {
        let want: Vec<Hash> = want.iter().map(|h| hd(h)).collect();
        let got = consistency_proof(&log.store, m, n).unwrap();
        assert_eq!(got, want, "{m} -> {n}");
        let (r1, r2) = (hd(ROOT_HASHES[m as usize]), hd(ROOT_HASHES[n as usize]));
        verify_consistency(m, n, &r1, &r2, &got).unwrap();
    }
}

// ---- proof/proof_test.go (argument errors) -----------------------------

#[test]
fn go_generation_argument_errors() {
    let log = golden_log();
    for (size, index) in [(0, 0), (0, 1), (1, 2), (0, 3), (7, 8)] {
        assert!(
            matches!(
                inclusion_proof(&log.store, index, size),
                Err(ProofError::IndexOutOfRange { .. })
            ),
            "Inclusion({index}, {size}) must fail"
        );
    }
    for (size1, size2) in [(5, 0), (9, 8), (0, 5), (0, 0), (6, 3)] {
        assert!(
            consistency_proof(&log.store, size1, size2).is_err(),
            "Consistency({size1}, {size2}) must fail"
        );
    }
}

// ---- testdata/{inclusion,consistency} run as proof/verify_test.go -------

/// Upstream stores byte strings as base64 and deliberately includes some
/// that are not 32 bytes long (e.g. `"WrongLeaf"`, `"don't care 1"`, or
/// empty). Go rejects most of those by their length; a `Hash` cannot even
/// hold them, so for this crate they are rejected by construction. To still
/// exercise the verifier on those probes, such strings are mapped to a
/// 32-byte stand-in, SHA-256("not-a-32-byte-hash" || bytes), which keeps
/// equal inputs equal and different inputs different.
fn to_hash(bytes: &[u8]) -> Hash {
    bytes.try_into().unwrap_or_else(|_| {
        let mut h = Sha256::new();
        h.update(b"not-a-32-byte-hash");
        h.update(bytes);
        h.finalize().into()
    })
}

fn is_hash(bytes: &[u8]) -> bool {
    bytes.len() == 32
}

/// Checks one probe outcome. Probes with a non-32-byte input that upstream
/// expects to fail are rejected by the type already; the stand-in run must
/// still reject them unless Go's length check was the only reason (then the
/// file is recorded in `length_only`).
fn check(
    file: &str,
    desc: &str,
    representable: bool,
    want_err: bool,
    result: Result<(), pil_transparency::VerifyError>,
    wrong: &mut Vec<String>,
    length_only: &mut Vec<String>,
) {
    match (representable, want_err, result.is_err()) {
        (_, false, false) | (_, true, true) => {}
        (false, true, false) => length_only.push(file.to_owned()),
        _ => wrong.push(format!("{file}: {desc} -> {result:?}")),
    }
}

mod b64 {
    use super::*;
    use serde::Deserializer;

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        BASE64.decode(s).map_err(serde::de::Error::custom)
    }

    pub fn many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v: Option<Vec<String>> = Option::deserialize(d)?;
        v.unwrap_or_default()
            .into_iter()
            .map(|s| BASE64.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[derive(Deserialize)]
struct ProbeFile<T> {
    commit: String,
    probes: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InclusionProbe {
    file: String,
    leaf_idx: u64,
    tree_size: u64,
    #[serde(deserialize_with = "b64::one")]
    root: Vec<u8>,
    #[serde(deserialize_with = "b64::one")]
    leaf_hash: Vec<u8>,
    #[serde(deserialize_with = "b64::many", default)]
    proof: Vec<Vec<u8>>,
    desc: String,
    want_err: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsistencyProbe {
    file: String,
    size1: u64,
    size2: u64,
    #[serde(deserialize_with = "b64::one")]
    root1: Vec<u8>,
    #[serde(deserialize_with = "b64::one")]
    root2: Vec<u8>,
    #[serde(deserialize_with = "b64::many", default)]
    proof: Vec<Vec<u8>>,
    desc: String,
    want_err: bool,
}

fn load<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    let path = format!(
        "{}/tests/data/{name}",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR")
    );
    let file: ProbeFile<T> = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(file.commit, "417fb0c314750d94e53942e9f92e79b6d35915db");
    file.probes
}

#[test]
fn inclusion_probes() {
    let probes: Vec<InclusionProbe> = load("inclusion_probes.json");
    assert_eq!(probes.len(), 98);
    let log = golden_log();
    let (mut wrong, mut length_only, mut generated) = (Vec::new(), Vec::new(), 0);
    for p in &probes {
        let representable =
            is_hash(&p.leaf_hash) && is_hash(&p.root) && p.proof.iter().all(|h| is_hash(h));
        let proof: Vec<Hash> = p.proof.iter().map(|h| to_hash(h)).collect();
        let (leaf, root) = (to_hash(&p.leaf_hash), to_hash(&p.root));
        let result = verify_inclusion(&leaf, p.leaf_idx, p.tree_size, &proof, &root);
        let (file, desc) = (&p.file, &p.desc);
        check(
            file,
            desc,
            representable,
            p.want_err,
            result,
            &mut wrong,
            &mut length_only,
        );
        // Happy paths over the golden tree: generation must match exactly.
        if !p.want_err && p.tree_size <= 8 && root == hd(ROOT_HASHES[p.tree_size as usize]) {
            assert_eq!(leaf, log.leaves[p.leaf_idx as usize], "{}", p.file);
            let ours = inclusion_proof(&log.store, p.leaf_idx, p.tree_size).unwrap();
            assert_eq!(ours, proof, "{}: generated proof differs", p.file);
            generated += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} probes wrong:\n{}",
        wrong.len(),
        probes.len(),
        wrong.join("\n")
    );
    // Leaf and root both empty in a size-1 tree: only Go's length check
    // rejects it, and `Hash` cannot express an empty hash at all.
    assert_eq!(
        length_only,
        ["testdata/inclusion/single-entry/empty-root-and-leaf.json"]
    );
    // inclusion/{0,1,2,3,4}/happy-path.json
    assert_eq!(generated, 5);
}

#[test]
fn consistency_probes() {
    let probes: Vec<ConsistencyProbe> = load("consistency_probes.json");
    assert_eq!(probes.len(), 98);
    let log = golden_log();
    let (mut wrong, mut length_only, mut generated) = (Vec::new(), Vec::new(), 0);
    for p in &probes {
        let representable =
            is_hash(&p.root1) && is_hash(&p.root2) && p.proof.iter().all(|h| is_hash(h));
        let proof: Vec<Hash> = p.proof.iter().map(|h| to_hash(h)).collect();
        let (r1, r2) = (to_hash(&p.root1), to_hash(&p.root2));
        let result = verify_consistency(p.size1, p.size2, &r1, &r2, &proof);
        let (file, desc) = (&p.file, &p.desc);
        check(
            file,
            desc,
            representable,
            p.want_err,
            result,
            &mut wrong,
            &mut length_only,
        );
        if !p.want_err
            && p.size2 <= 8
            && r1 == hd(ROOT_HASHES[p.size1 as usize])
            && r2 == hd(ROOT_HASHES[p.size2 as usize])
        {
            let ours = consistency_proof(&log.store, p.size1, p.size2).unwrap();
            assert_eq!(ours, proof, "{}: generated proof differs", p.file);
            generated += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} probes wrong:\n{}",
        wrong.len(),
        probes.len(),
        wrong.join("\n")
    );
    assert!(length_only.is_empty(), "{length_only:?}");
    // consistency/{0,1,2,3,4}/happy-path.json
    assert_eq!(generated, 5);
}

// ---- testonly/vectors_test.go ------------------------------------------
//
// Accumulated vectors from the "Subtree Test Vectors" appendix of
// draft-ietf-plants-merkle-tree-certs: every output over a 130-leaf tree
// (d[i] = the single byte i) is folded into one SHA-256. Where those
// outputs are plain RFC 6962 roots / proofs they come from this crate.

const VECTOR_MAX: u64 = 130;

fn vector_log() -> Log {
    let entries: Vec<[u8; 1]> = (0..VECTOR_MAX).map(|i| [i as u8]).collect();
    Log::from_entries(&entries)
}

/// `isSubtreeValid`: start is a multiple of bit_ceil(end - start).
fn subtree_valid(start: u64, end: u64) -> bool {
    start == 0 || start == end || start.is_multiple_of((end - start).next_power_of_two())
}

fn proof_line(prefix: String, proof: &[Hash]) -> String {
    let mut line = prefix;
    for h in proof {
        line.push(' ');
        line.push_str(&hex::encode(h));
    }
    line.push('\n');
    line
}

/// A valid subtree `[start, end)` viewed as a tree of its own: its perfect
/// subtrees are perfect subtrees of the big tree shifted by `start`, which
/// is aligned to every one of them.
struct Shifted<'a, S> {
    inner: &'a S,
    start: u64,
}

impl<S: NodeSource> NodeSource for Shifted<'_, S> {
    type Error = S::Error;

    fn node(&self, level: u8, index: u64) -> Result<Hash, S::Error> {
        self.inner.node(level, index + (self.start >> level))
    }
}

#[test]
fn plants_subtree_hash_vector() {
    let log = vector_log();
    let mut h = Sha256::new();
    for end in 0..=VECTOR_MAX {
        for start in 0..=end {
            if subtree_valid(start, end) {
                let root = subtree_root(&log.store, start, end).unwrap();
                h.update(format!("[{start}, {end}) {}\n", hex::encode(root)));
            }
        }
    }
    assert_eq!(
        hex::encode(h.finalize()),
        "b82806ad4265bb151c1119c0f4db437bb4d1a1f887b3a7fba1cd4ebf552e3e81"
    );
}

#[test]
fn plants_subtree_inclusion_proof_vector() {
    let log = vector_log();
    let mut h = Sha256::new();
    for end in 0..=VECTOR_MAX {
        for start in 0..=end {
            if !subtree_valid(start, end) {
                continue;
            }
            let sub = Shifted {
                inner: &log.store,
                start,
            };
            for index in start..end {
                let proof = inclusion_proof(&sub, index - start, end - start).unwrap();
                h.update(proof_line(format!("{index} [{start}, {end})"), &proof));
            }
        }
    }
    assert_eq!(
        hex::encode(h.finalize()),
        "ac2a8f989e44d99e399db448050ff5f19757df53cfb716aa81015d3955d8163f"
    );
}

/// Port of `refSubtreeConsistencyProof` (testonly/reference_test.go) for
/// the `start > 0` rows only: subtree consistency is not part of this
/// crate, but the accumulated digest covers those rows too.
fn ref_subtree_consistency(start: usize, end: usize, leaves: &[Hash], known: bool) -> Vec<Hash> {
    let size = leaves.len();
    if start >= end {
        return vec![];
    }
    if start == 0 && end == size {
        return if known {
            vec![]
        } else {
            vec![common::naive_root(leaves)]
        };
    }
    let split = common::split(size);
    let (mut proof, sibling) = if end <= split {
        (
            ref_subtree_consistency(start, end, &leaves[..split], known),
            &leaves[split..],
        )
    } else if split <= start {
        (
            ref_subtree_consistency(start - split, end - split, &leaves[split..], known),
            &leaves[..split],
        )
    } else {
        (
            ref_subtree_consistency(0, end - split, &leaves[split..], false),
            &leaves[..split],
        )
    };
    proof.push(common::naive_root(sibling));
    proof
}

#[test]
fn plants_subtree_consistency_proof_vector() {
    let log = vector_log();
    let mut h = Sha256::new();
    let mut from_crate = 0;
    for n in 0..=VECTOR_MAX {
        for end in 0..=n {
            for start in 0..=end {
                if !subtree_valid(start, end) {
                    continue;
                }
                let proof = if start == end {
                    vec![]
                } else if start == 0 {
                    from_crate += 1;
                    consistency_proof(&log.store, end, n).unwrap()
                } else {
                    ref_subtree_consistency(
                        start as usize,
                        end as usize,
                        &log.leaves[..n as usize],
                        true,
                    )
                };
                h.update(proof_line(format!("[{start}, {end}) {n}"), &proof));
            }
        }
    }
    // Every 0 < m <= n <= 130 consistency proof went through the crate.
    assert_eq!(from_crate, 130 * 131 / 2);
    assert_eq!(
        hex::encode(h.finalize()),
        "10fa99b37bf9bf9ffa26b412fbd98bd75363256d0b75d61bc4538b9c9c5a0a74"
    );
}
