//! Checking a node's audit log with nothing but the node's public key.
//!
//! The node hashes every record into an RFC 6962 tree and signs the tree's head now
//! and then. [`LogVerifier`] reads the log as the node serves it (`ReadLog`) and
//! rebuilds that tree from the records themselves, so a record changed, removed,
//! moved or inserted after a head was signed no longer adds up to the signed root.
//! It also compares each record with its stored leaf hash and its claimed position,
//! which names the bad record exactly instead of only the stretch between two heads.
//!
//! What this cannot show: records after the newest signed head are only checked
//! against themselves (ask the node to sign first), and a node holding its own
//! signing key can rewrite everything and sign again; keeping old heads and checking
//! that new ones extend them ([`check_consistency`]) is what catches that.

use pil_proto::v1;
use pil_transparency::{
    Frontier, Hash, HeadVerifier, SignedTreeHead, VerifyError, empty_root, leaf_hash,
    verify_consistency, verify_inclusion,
};

/// The first thing wrong with a log, with the record it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogProblem {
    /// A head that does not verify cannot vouch for anything, so it is reported first.
    #[error("signed tree head #{position} does not verify with the public key: {reason}")]
    BadHead { position: usize, reason: String },
    /// The log jumps over positions.
    #[error("record {index} is missing: the log goes on with record {next}")]
    Skipped { index: u64, next: u64 },
    /// The log served an entry twice or went backwards.
    #[error("the log is out of order: entry {got} came where record {index} belongs")]
    OutOfOrder { index: u64, got: u64 },
    /// The record is no longer a JSON object carrying its index.
    #[error("record {index} was changed: it is not a JSON object with an index")]
    Unreadable { index: u64 },
    /// The record at this position says it belongs elsewhere: moved or swapped.
    #[error(
        "record {index} is out of order: the record at this position claims index {claimed} (records were moved or swapped)"
    )]
    WrongIndex { index: u64, claimed: u64 },
    /// The record's bytes no longer hash to the leaf stored when it was appended.
    #[error("record {index} was changed: its contents do not match its leaf hash")]
    Changed { index: u64 },
    /// Contents gone while older records' contents remain; retention removes only the
    /// oldest, so this is a deletion.
    #[error(
        "record {index} is missing: its contents were removed while older records are kept (retention removes only the oldest)"
    )]
    Removed { index: u64 },
    /// Contents gone although a signed head shows the record was written after the
    /// retention cutoff: removed too early to be retention.
    #[error(
        "record {index} is missing: its contents were removed, but it was written after {written_after} (a signed head), within the retention period"
    )]
    RemovedEarly { index: u64, written_after: String },
    /// Neither contents nor a usable leaf hash.
    #[error("record {index} is missing: neither its contents nor a valid leaf hash are stored")]
    NoLeaf { index: u64 },
    /// The records up to a signed head do not rebuild its root; the fault lies in
    /// `from..to` (everything before `from` matched an earlier head).
    #[error(
        "records {from} to {last} do not match the signed tree head of size {to}: one of them, or its leaf hash, was changed, inserted or removed",
        last = .to.saturating_sub(1)
    )]
    RootMismatch { from: u64, to: u64 },
    /// A signed head covers more records than the log returned.
    #[error(
        "the log ends after {size} records, but a signed tree head covers {head_size}: records {size} to {last} are missing",
        last = .head_size.saturating_sub(1)
    )]
    Truncated { size: u64, head_size: u64 },
}

impl LogProblem {
    /// The first record the problem concerns, when one record can be named.
    pub fn record(&self) -> Option<u64> {
        match *self {
            LogProblem::BadHead { .. } => None,
            LogProblem::Skipped { index, .. }
            | LogProblem::OutOfOrder { index, .. }
            | LogProblem::Unreadable { index }
            | LogProblem::WrongIndex { index, .. }
            | LogProblem::Changed { index }
            | LogProblem::Removed { index }
            | LogProblem::RemovedEarly { index, .. }
            | LogProblem::NoLeaf { index } => Some(index),
            LogProblem::RootMismatch { from, .. } => Some(from),
            LogProblem::Truncated { size, .. } => Some(size),
        }
    }
}

/// The outcome of checking a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries read.
    pub records: u64,
    /// Entries whose contents were removed after the retention period (their leaf
    /// hashes still count).
    pub removed: u64,
    /// Signed heads whose signature verified.
    pub heads: usize,
    /// Records covered by the largest signed head whose root matched.
    pub signed_size: u64,
    /// Problems found in total (one per bad entry or head).
    pub problems: u64,
    /// The first problem, in log order (bad heads first).
    pub first_problem: Option<LogProblem>,
}

impl VerifyReport {
    /// No problem found.
    pub fn is_ok(&self) -> bool {
        self.first_problem.is_none()
    }

    /// Records after the newest matching signed head: checked only against
    /// themselves.
    pub fn unsigned(&self) -> u64 {
        self.records.saturating_sub(self.signed_size)
    }
}

/// Checks a log entry by entry, so a log of any size is checked in constant memory
/// (besides the heads).
pub struct LogVerifier {
    /// Heads whose signature verified, by size.
    heads: Vec<SignedTreeHead>,
    next_head: usize,
    frontier: Frontier,
    /// Size of the last head whose root matched.
    matched: u64,
    /// Whether a record with contents was seen (retention removes only a prefix).
    seen_contents: bool,
    /// Newest timestamp (Unix ms) of the heads passed so far: every later record was
    /// written after it.
    passed_ms: Option<u64>,
    /// Records written after this (Unix ms) are within retention.
    retention_cutoff_ms: Option<u64>,
    report: VerifyReport,
}

impl LogVerifier {
    /// Starts a check against `heads` (as `ListTreeHeads` returns them), verifying
    /// each head's signature with `verifier`. The heads' `size` fields are not used:
    /// only the signed note counts.
    pub fn new(heads: &[v1::SignedTreeHead], verifier: &HeadVerifier) -> Self {
        let mut this = Self {
            heads: Vec::with_capacity(heads.len()),
            next_head: 0,
            frontier: Frontier::new(),
            matched: 0,
            seen_contents: false,
            passed_ms: None,
            retention_cutoff_ms: None,
            report: VerifyReport::default(),
        };
        for (position, head) in heads.iter().enumerate() {
            match verifier.verify_note(&head.note) {
                Ok(sth) => this.heads.push(sth),
                Err(e) => this.problem(LogProblem::BadHead {
                    position,
                    reason: e.to_string(),
                }),
            }
        }
        this.report.heads = this.heads.len();
        this.heads.sort_by_key(|h| h.head.size);
        this.check_heads();
        this
    }

    /// Also checks that removed contents are old enough to have fallen to retention:
    /// a record is younger than the signed heads before it, so a removed record after
    /// a head signed less than `keep` before `now` was deleted, not retired. Set this
    /// before the first entry.
    pub fn with_retention(mut self, keep: std::time::Duration, now: std::time::SystemTime) -> Self {
        let now_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let cutoff = now_ms.saturating_sub(keep.as_millis());
        self.retention_cutoff_ms = Some(u64::try_from(cutoff).unwrap_or(u64::MAX));
        self
    }

    /// Checks the next entry of the log.
    pub fn push(&mut self, entry: &v1::LogEntry) {
        let position = self.report.records;
        self.report.records += 1;
        let (leaf, problem) = self.check_entry(position, entry);
        if let Some(p) = problem {
            self.problem(p);
        }
        self.frontier.append(leaf);
        self.check_heads();
    }

    /// Ends the check: heads beyond the last entry mean records are missing.
    pub fn finish(mut self) -> VerifyReport {
        if let Some(beyond) = self.heads.get(self.next_head..).and_then(|h| h.last()) {
            let problem = LogProblem::Truncated {
                size: self.report.records,
                head_size: beyond.head.size,
            };
            self.problem(problem);
        }
        self.report
    }

    /// The leaf to build the tree with, and what is wrong with the entry.
    fn check_entry(&mut self, position: u64, entry: &v1::LogEntry) -> (Hash, Option<LogProblem>) {
        let stored: Option<Hash> = entry.leaf_hash.as_slice().try_into().ok();
        if entry.record.is_empty() {
            let problem = if entry.index != position {
                Some(misplaced(position, entry.index))
            } else if stored.is_none() {
                Some(LogProblem::NoLeaf { index: position })
            } else if self.seen_contents {
                Some(LogProblem::Removed { index: position })
            } else if let (Some(cutoff), Some(passed)) = (self.retention_cutoff_ms, self.passed_ms)
                && passed >= cutoff
            {
                Some(LogProblem::RemovedEarly {
                    index: position,
                    written_after: format_ms(passed),
                })
            } else {
                self.report.removed += 1;
                None
            };
            return (stored.unwrap_or_default(), problem);
        }
        self.seen_contents = true;
        let leaf = leaf_hash(&entry.record);
        if entry.index != position {
            return (leaf, Some(misplaced(position, entry.index)));
        }
        let claimed = serde_json::from_slice::<serde_json::Value>(&entry.record)
            .ok()
            .and_then(|v| v.get("index")?.as_u64());
        let problem = match claimed {
            None => Some(LogProblem::Unreadable { index: position }),
            Some(claimed) if claimed != position => Some(LogProblem::WrongIndex {
                index: position,
                claimed,
            }),
            // A leaf hash of the wrong length cannot be the one stored at append.
            _ if stored.is_none_or(|s| s != leaf) && !entry.leaf_hash.is_empty() => {
                Some(LogProblem::Changed { index: position })
            }
            _ => None,
        };
        (leaf, problem)
    }

    /// Compares every head of the current size with the rebuilt root.
    fn check_heads(&mut self) {
        let size = self.frontier.size();
        while let Some(head) = self.heads.get(self.next_head) {
            if head.head.size != size {
                break;
            }
            let root = if size == 0 {
                empty_root()
            } else {
                self.frontier.root()
            };
            self.passed_ms = self.passed_ms.max(Some(head.head.timestamp_ms));
            if root == head.head.root {
                self.matched = size;
                self.report.signed_size = size;
            } else {
                let problem = LogProblem::RootMismatch {
                    from: self.matched,
                    to: size,
                };
                self.problem(problem);
            }
            self.next_head += 1;
        }
    }

    fn problem(&mut self, problem: LogProblem) {
        self.report.problems += 1;
        self.report.first_problem.get_or_insert(problem);
    }
}

/// Unix milliseconds as RFC 3339 UTC, for messages.
fn format_ms(ms: u64) -> String {
    let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{ms} ms after the epoch"))
}

fn misplaced(position: u64, got: u64) -> LogProblem {
    if got > position {
        LogProblem::Skipped {
            index: position,
            next: got,
        }
    } else {
        LogProblem::OutOfOrder {
            index: position,
            got,
        }
    }
}

/// Checks a whole log (entries in the order served) against signed heads.
pub fn verify_log<'a>(
    entries: impl IntoIterator<Item = &'a v1::LogEntry>,
    heads: &[v1::SignedTreeHead],
    verifier: &HeadVerifier,
) -> VerifyReport {
    let mut check = LogVerifier::new(heads, verifier);
    for entry in entries {
        check.push(entry);
    }
    check.finish()
}

/// Why a proof from the node was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofCheckError {
    #[error("the signed tree head does not verify with the public key: {0}")]
    Head(#[source] VerifyError),
    #[error("the node sent a hash of {0} bytes; hashes are 32 bytes")]
    BadHash(usize),
    #[error("record {index} does not match the leaf hash the node sent with it")]
    RecordMismatch { index: u64 },
    #[error("the node sent record {claimed} when asked for record {index}")]
    WrongRecord { index: u64, claimed: u64 },
    #[error("record {index} is not in the signed tree of size {size}: {source}")]
    Inclusion {
        index: u64,
        size: u64,
        #[source]
        source: VerifyError,
    },
    #[error("the two heads are of different logs: {old} and {new}")]
    OtherLog { old: String, new: String },
    #[error(
        "the new head covers {new} records, fewer than the old head's {old}: the log lost records"
    )]
    Shrunk { old: u64, new: u64 },
    #[error("the log of size {new} does not extend the log of size {old}: {source}")]
    Consistency {
        old: u64,
        new: u64,
        #[source]
        source: VerifyError,
    },
}

/// Verifies a signed note with the node's public key.
pub fn check_head(note: &str, verifier: &HeadVerifier) -> Result<SignedTreeHead, ProofCheckError> {
    verifier.verify_note(note).map_err(ProofCheckError::Head)
}

fn hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, ProofCheckError> {
    proof
        .iter()
        .map(|h| Hash::try_from(h.as_slice()).map_err(|_| ProofCheckError::BadHash(h.len())))
        .collect()
}

/// Checks that the node's answer to `GetInclusionProof(index, head size)` proves the
/// record it sent (or, when retention removed the contents, its leaf hash) is entry
/// `index` of the tree `head` (already verified) signed.
pub fn check_inclusion(
    head: &SignedTreeHead,
    index: u64,
    answer: &v1::GetInclusionProofResponse,
) -> Result<(), ProofCheckError> {
    let leaf = if answer.record.is_empty() {
        Hash::try_from(answer.leaf_hash.as_slice())
            .map_err(|_| ProofCheckError::BadHash(answer.leaf_hash.len()))?
    } else {
        let leaf = leaf_hash(&answer.record);
        if !answer.leaf_hash.is_empty() && answer.leaf_hash != leaf {
            return Err(ProofCheckError::RecordMismatch { index });
        }
        let claimed = serde_json::from_slice::<serde_json::Value>(&answer.record)
            .ok()
            .and_then(|v| v.get("index")?.as_u64());
        if claimed != Some(index) {
            return Err(ProofCheckError::WrongRecord {
                index,
                claimed: claimed.unwrap_or(u64::MAX),
            });
        }
        leaf
    };
    let size = head.head.size;
    verify_inclusion(&leaf, index, size, &hashes(&answer.proof)?, &head.head.root).map_err(
        |source| ProofCheckError::Inclusion {
            index,
            size,
            source,
        },
    )
}

/// Checks that `new` extends `old` (both already verified) by the node's
/// consistency proof: nothing `old` covered was changed or removed.
pub fn check_consistency(
    old: &SignedTreeHead,
    new: &SignedTreeHead,
    proof: &[Vec<u8>],
) -> Result<(), ProofCheckError> {
    if old.head.origin != new.head.origin {
        return Err(ProofCheckError::OtherLog {
            old: old.head.origin.clone(),
            new: new.head.origin.clone(),
        });
    }
    let (o, n) = (old.head.size, new.head.size);
    if n < o {
        return Err(ProofCheckError::Shrunk { old: o, new: n });
    }
    verify_consistency(o, n, &old.head.root, &new.head.root, &hashes(proof)?).map_err(|source| {
        ProofCheckError::Consistency {
            old: o,
            new: n,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use pil_transparency::{HeadSigner, MemoryNodes, TreeHead, consistency_proof, inclusion_proof};

    use super::*;

    const ORIGIN: &str = "pil-audit/test";

    fn record(index: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "index": index,
            "time": format!("2025-01-01T10:00:{:02}.000Z", index % 60),
            "region": "test",
            "action": "lookup",
            "decision": {"outcome": "allowed", "emergency": false},
        }))
        .unwrap()
    }

    /// A log of `n` records as the node serves it, with heads signed at `sizes`.
    struct Log {
        entries: Vec<v1::LogEntry>,
        heads: Vec<v1::SignedTreeHead>,
        signer: HeadSigner,
    }

    impl Log {
        fn new(n: u64, sizes: &[u64]) -> Self {
            let signer = HeadSigner::generate();
            let entries: Vec<v1::LogEntry> = (0..n)
                .map(|i| {
                    let record = record(i);
                    v1::LogEntry {
                        index: i,
                        leaf_hash: leaf_hash(&record).to_vec(),
                        record,
                    }
                })
                .collect();
            let mut log = Self {
                entries,
                heads: Vec::new(),
                signer,
            };
            for &size in sizes {
                let root = log.root(size);
                log.heads.push(log.sign(size, root));
            }
            log
        }

        fn root(&self, size: u64) -> Hash {
            let mut f = Frontier::new();
            for e in &self.entries[..size as usize] {
                f.append(leaf_hash(&e.record));
            }
            f.root()
        }

        fn sign(&self, size: u64, root: Hash) -> v1::SignedTreeHead {
            let head = TreeHead {
                origin: ORIGIN.into(),
                size,
                root,
                timestamp_ms: 1_700_000_000_000 + size,
            };
            v1::SignedTreeHead {
                note: self.signer.sign(head).unwrap().to_note().unwrap(),
                size,
            }
        }

        fn verify(&self) -> VerifyReport {
            verify_log(&self.entries, &self.heads, &self.signer.verifier())
        }
    }

    fn first(report: &VerifyReport) -> LogProblem {
        report
            .first_problem
            .clone()
            .unwrap_or_else(|| panic!("expected a problem: {report:?}"))
    }

    #[test]
    fn an_intact_log_verifies() {
        let log = Log::new(12, &[3, 7, 10]);
        let report = log.verify();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(
            report,
            VerifyReport {
                records: 12,
                removed: 0,
                heads: 3,
                signed_size: 10,
                problems: 0,
                first_problem: None,
            }
        );
        assert_eq!(report.unsigned(), 2);
    }

    #[test]
    fn an_empty_log_without_heads_verifies() {
        let log = Log::new(0, &[]);
        let report = log.verify();
        assert!(report.is_ok());
        assert_eq!(report.records, 0);
    }

    #[test]
    fn a_changed_record_is_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        let mut v: serde_json::Value = serde_json::from_slice(&log.entries[4].record).unwrap();
        v["decision"]["outcome"] = "denied".into();
        log.entries[4].record = serde_json::to_vec(&v).unwrap();
        let report = log.verify();
        assert_eq!(first(&report), LogProblem::Changed { index: 4 });
        assert_eq!(first(&report).record(), Some(4));
        // The stored leaf hash and the heads of sizes 7 and 10 all disagree.
        assert_eq!(report.problems, 3);
        assert_eq!(report.signed_size, 3);
        assert!(
            first(&report)
                .to_string()
                .starts_with("record 4 was changed"),
            "{}",
            first(&report)
        );
    }

    #[test]
    fn a_record_changed_with_its_leaf_hash_fails_the_next_head() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries[4].record = record(4).into_iter().chain(*b" ").collect();
        log.entries[4].leaf_hash = leaf_hash(&log.entries[4].record).to_vec();
        let report = log.verify();
        assert_eq!(first(&report), LogProblem::RootMismatch { from: 3, to: 7 });
        assert_eq!(report.signed_size, 3);
        assert!(first(&report).to_string().contains("records 3 to 6"));
    }

    #[test]
    fn a_changed_record_after_the_last_head_is_still_named() {
        let mut log = Log::new(12, &[10]);
        log.entries[11].record = record(11).into_iter().chain(*b" ").collect();
        assert_eq!(first(&log.verify()), LogProblem::Changed { index: 11 });
    }

    #[test]
    fn a_removed_record_is_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries[5].record.clear();
        let report = log.verify();
        assert_eq!(first(&report), LogProblem::Removed { index: 5 });
        assert_eq!(report.problems, 1, "the leaf hash still rebuilds the root");
    }

    #[test]
    fn a_record_removed_with_its_leaf_hash_is_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries[5].record.clear();
        log.entries[5].leaf_hash.clear();
        assert_eq!(first(&log.verify()), LogProblem::NoLeaf { index: 5 });
    }

    #[test]
    fn an_entry_dropped_from_the_log_is_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries.remove(5);
        let report = log.verify();
        assert_eq!(first(&report), LogProblem::Skipped { index: 5, next: 6 });
        assert!(
            report.problems >= 2,
            "the heads no longer match: {report:?}"
        );
    }

    #[test]
    fn an_entry_dropped_and_the_rest_renumbered_fails_by_index_and_root() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries.remove(5);
        for (i, e) in log.entries.iter_mut().enumerate() {
            e.index = i as u64;
        }
        let report = log.verify();
        assert_eq!(
            first(&report),
            LogProblem::WrongIndex {
                index: 5,
                claimed: 6
            }
        );
    }

    #[test]
    fn swapped_records_are_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        let (a, b) = (log.entries[2].record.clone(), log.entries[5].record.clone());
        log.entries[2].record = b;
        log.entries[5].record = a;
        let report = log.verify();
        assert_eq!(
            first(&report),
            LogProblem::WrongIndex {
                index: 2,
                claimed: 5
            }
        );
        assert!(
            first(&report)
                .to_string()
                .contains("record 2 is out of order")
        );
    }

    #[test]
    fn swapped_entries_are_out_of_order() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries.swap(2, 5);
        assert_eq!(
            first(&log.verify()),
            LogProblem::Skipped { index: 2, next: 5 }
        );
    }

    #[test]
    fn a_record_that_is_no_longer_json_is_named() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries[8].record = b"not json".to_vec();
        assert_eq!(first(&log.verify()), LogProblem::Unreadable { index: 8 });
    }

    #[test]
    fn a_head_signed_by_another_key_is_refused() {
        let mut log = Log::new(12, &[3, 7, 10]);
        let impostor = Log::new(12, &[7]);
        log.heads[1] = impostor.heads[0].clone();
        let report = log.verify();
        match first(&report) {
            LogProblem::BadHead { position, reason } => {
                assert_eq!(position, 1);
                assert!(reason.contains("no signature line"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(report.heads, 2);
    }

    #[test]
    fn an_edited_head_is_refused() {
        let mut log = Log::new(12, &[3, 7, 10]);
        // Claim a bigger tree under the old signature.
        log.heads[2].note = log.heads[2].note.replacen("\n10\n", "\n12\n", 1);
        assert!(matches!(
            first(&log.verify()),
            LogProblem::BadHead { position: 2, .. }
        ));
    }

    #[test]
    fn a_properly_signed_head_over_another_root_fails() {
        let mut log = Log::new(12, &[3, 7, 10]);
        let forged = log.sign(7, [7; 32]);
        log.heads[1] = forged;
        assert_eq!(
            first(&log.verify()),
            LogProblem::RootMismatch { from: 3, to: 7 }
        );
    }

    #[test]
    fn retention_removed_contents_keep_the_log_verifiable() {
        let mut log = Log::new(12, &[3, 7, 10]);
        for e in &mut log.entries[..5] {
            e.record.clear();
        }
        let report = log.verify();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.removed, 5);
        assert_eq!(report.signed_size, 10);
    }

    #[test]
    fn contents_removed_within_the_retention_period_are_found() {
        // Heads at 3, 7, 10 are signed at 1_700_000_000_000 + size ms.
        let mut log = Log::new(12, &[3, 7, 10]);
        for e in &mut log.entries[..5] {
            e.record.clear();
        }
        let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let keep = std::time::Duration::from_millis(1000);
        let check = |now| {
            let mut v =
                LogVerifier::new(&log.heads, &log.signer.verifier()).with_retention(keep, now);
            for e in &log.entries {
                v.push(e);
            }
            v.finish()
        };
        // Record 3 was written after the head of size 3 (…003 ms): still within 1 s at
        // …1002 ms, so its removal cannot be retention.
        let report = check(at(1_700_000_001_002));
        assert_eq!(
            report.first_problem,
            Some(LogProblem::RemovedEarly {
                index: 3,
                written_after: "2023-11-14T22:13:20.003Z".into()
            })
        );
        // A little later every removed record may have fallen to retention.
        let report = check(at(1_700_000_001_004));
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.removed, 5);
    }

    #[test]
    fn a_log_shorter_than_its_heads_is_truncated() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.entries.truncate(8);
        assert_eq!(
            first(&log.verify()),
            LogProblem::Truncated {
                size: 8,
                head_size: 10
            }
        );
    }

    #[test]
    fn heads_in_any_order_and_the_size_field_is_ignored() {
        let mut log = Log::new(12, &[3, 7, 10]);
        log.heads.reverse();
        log.heads[0].size = 999;
        let report = log.verify();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.signed_size, 10);
    }

    #[test]
    fn proofs_verify_against_a_signed_head() {
        let log = Log::new(12, &[12]);
        let verifier = log.signer.verifier();
        let head = check_head(&log.heads[0].note, &verifier).unwrap();
        let mut store = MemoryNodes::new();
        let mut f = Frontier::new();
        for e in &log.entries {
            store.extend(f.append(leaf_hash(&e.record)));
        }
        let to_vecs = |p: Vec<Hash>| p.into_iter().map(|h| h.to_vec()).collect::<Vec<_>>();

        let proof = to_vecs(inclusion_proof(&store, 5, 12).unwrap());
        let mut answer = v1::GetInclusionProofResponse {
            record: log.entries[5].record.clone(),
            leaf_hash: log.entries[5].leaf_hash.clone(),
            proof,
        };
        check_inclusion(&head, 5, &answer).unwrap();
        // Retention: only the leaf hash.
        let removed = v1::GetInclusionProofResponse {
            record: Vec::new(),
            ..answer.clone()
        };
        check_inclusion(&head, 5, &removed).unwrap();
        // Another record under the same proof.
        answer.record = log.entries[6].record.clone();
        answer.leaf_hash = log.entries[6].leaf_hash.clone();
        assert_eq!(
            check_inclusion(&head, 5, &answer),
            Err(ProofCheckError::WrongRecord {
                index: 5,
                claimed: 6
            })
        );
        answer.leaf_hash.clear();
        answer.record = record(5).into_iter().chain(*b" ").collect();
        assert!(matches!(
            check_inclusion(&head, 5, &answer),
            Err(ProofCheckError::Inclusion { index: 5, .. })
        ));

        let mut small = Frontier::new();
        for e in &log.entries[..7] {
            small.append(leaf_hash(&e.record));
        }
        let old = check_head(&log.sign(7, small.root()).note, &verifier).unwrap();
        let proof = to_vecs(consistency_proof(&store, 7, 12).unwrap());
        check_consistency(&old, &head, &proof).unwrap();
        assert!(matches!(
            check_consistency(&head, &old, &proof),
            Err(ProofCheckError::Shrunk { old: 12, new: 7 })
        ));
        let rewritten = check_head(&log.sign(7, [1; 32]).note, &verifier).unwrap();
        assert!(matches!(
            check_consistency(&rewritten, &head, &proof),
            Err(ProofCheckError::Consistency {
                old: 7,
                new: 12,
                ..
            })
        ));
        assert!(matches!(
            check_head(&log.heads[0].note, &HeadSigner::generate().verifier()),
            Err(ProofCheckError::Head(_))
        ));
    }
}
