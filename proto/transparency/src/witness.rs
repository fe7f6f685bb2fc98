//! The witness protocol (<https://c2sp.org/tlog-witness>): a log submits a new
//! checkpoint with the size the witness last cosigned and a consistency proof from
//! it; the witness checks both against what it stored and cosigns.
//!
//! This module is the protocol without the transport: the `add-checkpoint` request
//! body, and [`check`], the witness's decision, as a pure function of the request,
//! the log's keys and the witness's stored state. The caller stores the new state
//! (atomically with reading the old) before it answers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use thiserror::Error;

use crate::checkpoint::{SignedTreeHead, TreeHead, split_note};
use crate::hash::Hash;
use crate::signed_head::HeadVerifier;
use crate::verify::verify_consistency;

/// The specification's limit on consistency proof lines.
pub const MAX_PROOF_LINES: usize = 63;
/// The media type of a 409 answer's body (the witness's latest size).
pub const SIZE_CONTENT_TYPE: &str = "text/x.tlog.size";
/// The largest request body a witness reads.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// One `add-checkpoint` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the witness last cosigned for this log (0: none).
    pub old_size: u64,
    /// RFC 6962 consistency proof from `old_size` to the checkpoint's size.
    pub proof: Vec<Hash>,
    /// The signed checkpoint (a signed note).
    pub checkpoint: String,
}

/// Why a request body is not an `add-checkpoint` request.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The body is not UTF-8, or longer than [`MAX_REQUEST_BYTES`].
    #[error("the request body must be UTF-8 text of at most {MAX_REQUEST_BYTES} bytes")]
    NotText,
    /// The first line is not `old <decimal size>`.
    #[error("the first line must be \"old <size>\" (decimal, no leading zeros)")]
    OldSize,
    /// A proof line is not the base64 of 32 bytes.
    #[error("consistency proof line {0} is not the base64 of a 32-byte hash")]
    ProofLine(usize),
    /// More proof lines than the specification allows.
    #[error("more than {MAX_PROOF_LINES} consistency proof lines")]
    TooManyProofLines,
    /// No empty line between the proof and the checkpoint.
    #[error("no empty line before the checkpoint")]
    NoCheckpoint,
}

impl AddCheckpoint {
    /// The request body.
    pub fn to_body(&self) -> String {
        let mut out = format!("old {}\n", self.old_size);
        for hash in &self.proof {
            out.push_str(&BASE64.encode(hash));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        out
    }

    /// The log the checkpoint names: its first line.
    pub fn origin(&self) -> &str {
        self.checkpoint.split('\n').next().unwrap_or_default()
    }

    /// Reads a request body, strictly.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::NotText);
        }
        let text = std::str::from_utf8(body).map_err(|_| RequestError::NotText)?;
        let (head, checkpoint) = text.split_once("\n\n").ok_or(RequestError::NoCheckpoint)?;
        let mut lines = head.split('\n');
        let old_size = lines
            .next()
            .and_then(|l| l.strip_prefix("old "))
            .and_then(canonical_decimal)
            .ok_or(RequestError::OldSize)?;
        let mut proof = Vec::new();
        for (i, line) in lines.enumerate() {
            if proof.len() == MAX_PROOF_LINES {
                return Err(RequestError::TooManyProofLines);
            }
            let hash = BASE64
                .decode(line)
                .ok()
                .and_then(|b| Hash::try_from(b).ok())
                .ok_or(RequestError::ProofLine(i + 1))?;
            proof.push(hash);
        }
        Ok(Self {
            old_size,
            proof,
            checkpoint: checkpoint.to_owned(),
        })
    }
}

fn canonical_decimal(s: &str) -> Option<u64> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok { s.parse().ok() } else { None }
}

/// What a witness keeps about one log: the latest checkpoint it cosigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witnessed {
    /// Its tree size.
    pub size: u64,
    /// Its root hash.
    pub root: Hash,
    /// When the log says it signed it (the checkpoint's timestamp line).
    pub timestamp_ms: u64,
    /// The checkpoint as submitted, kept as evidence.
    pub checkpoint: String,
}

/// Why a witness does not cosign, with the specification's HTTP status.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request or its checkpoint is not well formed (400).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The witness does not witness this log (404).
    #[error("this witness does not witness the log {0:?}")]
    UnknownOrigin(String),
    /// No signature by the log's keys verifies (403).
    #[error("the checkpoint is not signed by a key of the log {0:?}")]
    NotSigned(String),
    /// The old size is larger than the checkpoint's (400).
    #[error("the old size {old} is larger than the checkpoint's size {size}")]
    OldSizeTooLarge {
        /// The request's old size.
        old: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The old size is not the size the witness last cosigned (409, body: that size).
    #[error("the old size is {old}, but this witness last cosigned size {latest}")]
    Conflict {
        /// The request's old size.
        old: u64,
        /// The witness's latest cosigned size.
        latest: u64,
        /// The checkpoint is smaller than the one cosigned but signed later: the log
        /// went back on what it published.
        rollback: bool,
    },
    /// Same size as the checkpoint cosigned, another root: two histories (409).
    #[error("the log signed two roots for size {size}: a fork")]
    Fork {
        /// The size with two roots.
        size: u64,
        /// The witness's latest cosigned size (the 409 body).
        latest: u64,
    },
    /// The consistency proof does not verify (422).
    #[error("the consistency proof from size {old} to {size} does not verify: {reason}")]
    Inconsistent {
        /// From.
        old: u64,
        /// To.
        size: u64,
        /// What the verifier said.
        reason: String,
    },
}

impl Refusal {
    /// The HTTP status the specification gives this answer.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) | Refusal::OldSizeTooLarge { .. } => 400,
            Refusal::NotSigned(_) => 403,
            Refusal::UnknownOrigin(_) => 404,
            Refusal::Conflict { .. } | Refusal::Fork { .. } => 409,
            Refusal::Inconsistent { .. } => 422,
        }
    }

    /// For a 409, the witness's latest size (the answer's body).
    pub fn latest_size(&self) -> Option<u64> {
        match self {
            Refusal::Conflict { latest, .. } | Refusal::Fork { latest, .. } => Some(*latest),
            _ => None,
        }
    }

    /// When the refusal is evidence against the log (a validly signed checkpoint that
    /// contradicts what was cosigned), its name: `rollback`, `fork`, `inconsistent`.
    pub fn alarm(&self) -> Option<&'static str> {
        match self {
            Refusal::Conflict { rollback: true, .. } => Some("rollback"),
            Refusal::Fork { .. } => Some("fork"),
            Refusal::Inconsistent { .. } => Some("inconsistent"),
            _ => None,
        }
    }
}

/// The witness's decision on `request`, given the keys of the log it names
/// ([`AddCheckpoint::origin`]; `None`: a log this witness does not witness) and what it
/// stored for that log. On success the checkpoint is the new state to store (before
/// answering) and to cosign.
pub fn check(
    request: &AddCheckpoint,
    log_keys: Option<&HeadVerifier>,
    stored: Option<&Witnessed>,
) -> Result<(SignedTreeHead, Witnessed), Refusal> {
    let (text, _) =
        split_note(&request.checkpoint).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let head = TreeHead::parse_body(text).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let keys = log_keys.ok_or_else(|| Refusal::UnknownOrigin(head.origin.clone()))?;
    let sth = keys
        .verify_note(&request.checkpoint)
        .map_err(|_| Refusal::NotSigned(head.origin.clone()))?;
    let size = sth.head.size;
    let old = request.old_size;
    if old > size {
        return Err(Refusal::OldSizeTooLarge { old, size });
    }
    let latest = stored.map_or(0, |s| s.size);
    if old != latest {
        let rollback =
            stored.is_some_and(|s| size < s.size && sth.head.timestamp_ms > s.timestamp_ms);
        return Err(Refusal::Conflict {
            old,
            latest,
            rollback,
        });
    }
    match stored {
        Some(s) if s.size == size => {
            if s.root != sth.head.root {
                return Err(Refusal::Fork { size, latest });
            }
            if !request.proof.is_empty() {
                return Err(Refusal::Malformed(
                    "a checkpoint of the size cosigned last takes no proof".into(),
                ));
            }
        }
        Some(s) => verify_consistency(s.size, size, &s.root, &sth.head.root, &request.proof)
            .map_err(|e| Refusal::Inconsistent {
                old,
                size,
                reason: e.to_string(),
            })?,
        None if !request.proof.is_empty() => {
            return Err(Refusal::Malformed(
                "the proof must be empty when the old size is 0".into(),
            ));
        }
        None => {}
    }
    let witnessed = Witnessed {
        size,
        root: sth.head.root,
        timestamp_ms: sth.head.timestamp_ms,
        checkpoint: request.checkpoint.clone(),
    };
    Ok((sth, witnessed))
}

/// Reads a 409 answer's body: the witness's latest size.
pub fn parse_size_answer(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body)
        .ok()?
        .strip_suffix('\n')
        .and_then(canonical_decimal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frontier, HeadSigner, MemoryNodes, consistency_proof, leaf_hash};

    struct Log {
        signer: HeadSigner,
        frontier: Frontier,
        nodes: MemoryNodes,
        clock: u64,
    }

    impl Log {
        fn new(signer: HeadSigner) -> Self {
            Self {
                signer,
                frontier: Frontier::new(),
                nodes: MemoryNodes::new(),
                clock: 0,
            }
        }
        fn append(&mut self, n: usize, salt: &str) {
            for i in 0..n {
                let leaf = leaf_hash(format!("{salt}{i}").as_bytes());
                self.nodes.extend(self.frontier.append(leaf));
            }
        }
        fn checkpoint(&mut self) -> String {
            self.clock += 1;
            let head = TreeHead {
                origin: "pil-audit/a".into(),
                size: self.frontier.size(),
                root: self.frontier.root(),
                timestamp_ms: self.clock,
            };
            self.signer.sign(head).unwrap().to_note().unwrap()
        }
        fn request(&mut self, old: u64) -> AddCheckpoint {
            let size = self.frontier.size();
            let proof = if old == 0 || old == size {
                Vec::new()
            } else {
                consistency_proof(&self.nodes, old, size).unwrap()
            };
            AddCheckpoint {
                old_size: old,
                proof,
                checkpoint: self.checkpoint(),
            }
        }
    }

    fn decide(
        request: &AddCheckpoint,
        keys: &HeadVerifier,
        stored: &Option<Witnessed>,
    ) -> Result<Witnessed, Refusal> {
        let keys = (request.origin() == "pil-audit/a").then_some(keys);
        check(request, keys, stored.as_ref()).map(|(_, w)| w)
    }

    #[test]
    fn the_body_round_trips() {
        let mut log = Log::new(HeadSigner::generate());
        log.append(5, "a");
        let mut state = None;
        let keys = log.signer.verifier();
        state = Some(decide(&log.request(0), &keys, &state).unwrap());
        log.append(6, "b");
        let request = log.request(5);
        assert_eq!(
            request.proof.len(),
            consistency_proof(&log.nodes, 5, 11).unwrap().len()
        );
        assert_eq!(
            AddCheckpoint::parse(request.to_body().as_bytes()).unwrap(),
            request
        );
        assert_eq!(decide(&request, &keys, &state).unwrap().size, 11);
    }

    #[test]
    fn a_consistent_log_is_cosigned_step_by_step() {
        let mut log = Log::new(HeadSigner::generate());
        let keys = log.signer.verifier();
        let mut state = None;
        for step in 1..6 {
            let old = state.as_ref().map_or(0, |s: &Witnessed| s.size);
            log.append(step * 3, "x");
            state = Some(decide(&log.request(old), &keys, &state).unwrap());
        }
        assert_eq!(state.unwrap().size, 45);
    }

    #[test]
    fn a_rebuilt_history_is_refused_and_raised() {
        let signer = HeadSigner::generate();
        let pem = signer.to_pkcs8_pem().unwrap();
        let mut log = Log::new(signer);
        let keys = log.signer.verifier();
        log.append(10, "real");
        let state = Some(decide(&log.request(0), &keys, &None).unwrap());
        // Same key, another history of the same and of a larger size.
        let mut rebuilt = Log::new(HeadSigner::from_pkcs8_pem(&pem).unwrap());
        rebuilt.clock = 100;
        rebuilt.append(10, "forged");
        let fork = decide(&rebuilt.request(10), &keys, &state).unwrap_err();
        assert_eq!((fork.status(), fork.alarm()), (409, Some("fork")));
        rebuilt.append(5, "more");
        let split = decide(&rebuilt.request(10), &keys, &state).unwrap_err();
        assert_eq!((split.status(), split.alarm()), (422, Some("inconsistent")));
        // A shorter history signed later is a rollback; the answer names the size.
        let mut short = Log::new(HeadSigner::from_pkcs8_pem(&pem).unwrap());
        short.clock = 200;
        short.append(4, "real");
        let back = decide(&short.request(0), &keys, &state).unwrap_err();
        assert_eq!(
            (back.status(), back.alarm(), back.latest_size()),
            (409, Some("rollback"), Some(10))
        );
        // An old checkpoint replayed is not evidence: it was signed before.
        let mut replay = Log::new(HeadSigner::from_pkcs8_pem(&pem).unwrap());
        replay.append(4, "real");
        let old = decide(&replay.request(0), &keys, &state).unwrap_err();
        assert_eq!((old.status(), old.alarm()), (409, None));
    }

    #[test]
    fn the_specification_answers() {
        let mut log = Log::new(HeadSigner::generate());
        let keys = log.signer.verifier();
        log.append(3, "a");
        let request = log.request(0);
        let unknown = check(&request, None, None).unwrap_err();
        assert_eq!(unknown.status(), 404);
        let other = HeadSigner::generate().verifier();
        assert_eq!(decide(&request, &other, &None).unwrap_err().status(), 403);
        let mut big = request.clone();
        big.old_size = 4;
        assert_eq!(decide(&big, &keys, &None).unwrap_err().status(), 400);
        let mut stale = request.clone();
        stale.old_size = 2;
        let conflict = decide(&stale, &keys, &None).unwrap_err();
        assert_eq!((conflict.status(), conflict.latest_size()), (409, Some(0)));
        let state = Some(decide(&request, &keys, &None).unwrap());
        // The same checkpoint again is cosigned again.
        assert!(decide(&log.request(3), &keys, &state).is_ok());
        log.append(2, "b");
        let mut bad = log.request(3);
        bad.proof[0][0] ^= 1;
        assert_eq!(decide(&bad, &keys, &state).unwrap_err().status(), 422);
    }

    #[test]
    fn bodies_are_read_strictly() {
        for bad in [
            &b"old 01\n\nx"[..],
            b"old 1\nnot-base64\n\nx",
            b"old 1\n",
            b"new 1\n\nx",
            b"\xff\n\n",
        ] {
            assert!(AddCheckpoint::parse(bad).is_err(), "{bad:?}");
        }
        let many = format!(
            "old 1\n{}\nx",
            format!("{}\n", BASE64.encode([0u8; 32])).repeat(64)
        );
        assert_eq!(
            AddCheckpoint::parse(many.as_bytes()),
            Err(RequestError::TooManyProofLines)
        );
        assert_eq!(parse_size_answer(b"12\n"), Some(12));
        assert_eq!(parse_size_answer(b"012\n"), None);
    }
}
