//! The audit log's RFC 6962 tree as every engine keeps it: records get consecutive
//! indexes, each append stores the complete subtrees it finishes, and heads are signed
//! over the frontier. An engine supplies reads ([`TreeReader`]) and one atomic write of
//! a [`Group`]; the arithmetic is here, once.

use std::sync::Arc;

use pil_transparency::{Frontier, TreeHead, leaf_hash};
use tokio::sync::oneshot;

use super::{
    StoreError,
    model::{AuditEntry, HeadSigning},
};
use crate::patient_keys::Pseudonym;

/// What the tree code reads from an engine, synchronously (engines call it where
/// blocking is allowed).
pub trait TreeReader {
    /// A stored complete subtree's hash.
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError>;
    /// The newest signed head in the heads' own table.
    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError>;
    /// The newest signed head as remembered apart from that table, so that cutting
    /// the log together with the heads over its end is noticed too.
    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError>;
}

impl<T: TreeReader + ?Sized> TreeReader for &T {
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        (**self).node(level, index)
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        (**self).latest_head()
    }

    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        (**self).remembered_head()
    }
}

/// One record as appended.
pub struct Appended {
    pub index: u64,
    pub bytes: Vec<u8>,
    pub patient: Option<Pseudonym>,
}

/// Everything one atomic write of the log stores.
#[derive(Default)]
pub struct Group {
    pub records: Vec<Appended>,
    /// `(level, index, hash)` of every subtree the records complete.
    pub nodes: Vec<(u8, u64, [u8; 32])>,
    /// `(size, signed note)`.
    pub heads: Vec<(u64, String)>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.nodes.is_empty() && self.heads.is_empty()
    }
}

/// The tree's frontier and the size its newest head signs (an empty log by default).
/// Clone it before a group and put the clone back when the group's write fails.
#[derive(Clone, Default)]
pub struct Sequencer {
    frontier: Frontier,
    signed: u64,
}

impl Sequencer {
    /// The stored log of `size` records, checked against the newest head it signed.
    pub fn restore(reader: &impl TreeReader, size: u64) -> Result<Self, StoreError> {
        let frontier = restore_frontier(reader, size)?;
        let signed = check_against_newest_head(reader, size)?;
        Ok(Self { frontier, signed })
    }

    /// The log as a coordinator row keeps it: size, peaks and the signed size.
    pub fn from_parts(size: u64, peaks: Vec<[u8; 32]>, signed: u64) -> Result<Self, StoreError> {
        let frontier =
            Frontier::from_parts(size, peaks).map_err(|e| StoreError::Tree(e.to_string()))?;
        Ok(Self { frontier, signed })
    }

    /// The frontier's peaks, largest first.
    pub fn peaks(&self) -> &[[u8; 32]] {
        self.frontier.peaks()
    }

    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    pub fn signed(&self) -> u64 {
        self.signed
    }

    /// Gives `entry` the next index and adds it, with the subtrees it completes, to
    /// `group`.
    pub fn append(
        &mut self,
        entry: &mut dyn AuditEntry,
        group: &mut Group,
    ) -> Result<u64, StoreError> {
        let index = self.frontier.size();
        let bytes = entry.encode_at(index)?;
        for n in self.frontier.append(leaf_hash(&bytes)) {
            group.nodes.push((n.level, n.index, n.hash));
        }
        group.records.push(Appended {
            index,
            bytes,
            patient: entry.patient(),
        });
        Ok(index)
    }

    /// Signs the tree as it now stands unless that size is signed already.
    pub fn sign(&mut self, signer: &dyn HeadSigning, group: &mut Group) -> Result<(), StoreError> {
        let size = self.frontier.size();
        if size > 0 && size > self.signed {
            let note = signer.sign(size, self.frontier.root())?;
            group.heads.push((size, note));
            self.signed = size;
        }
        Ok(())
    }
}

/// The newest signed head, `(size, note)`.
pub type Head = Option<(u64, String)>;

/// A request to an engine's audit appender.
pub enum AuditJob {
    Append(
        Box<dyn AuditEntry>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    Sign(
        Arc<dyn HeadSigning>,
        oneshot::Sender<Result<Head, StoreError>>,
    ),
}

enum Reply {
    Appended(oneshot::Sender<Result<u64, StoreError>>, u64),
    Signed(oneshot::Sender<Result<Head, StoreError>>),
}

/// The answers a group owes its requests, sent once it is written (or not).
pub struct Owed(Vec<Reply>);

impl Owed {
    /// Answers every request: its index or the newest head when `written` holds that
    /// head, the error otherwise.
    pub fn answer(self, written: &Result<Head, StoreError>) {
        for reply in self.0 {
            match (reply, written) {
                (Reply::Appended(tx, index), Ok(_)) => {
                    let _ = tx.send(Ok(index));
                }
                (Reply::Signed(tx), Ok(head)) => {
                    let _ = tx.send(Ok(head.clone()));
                }
                (Reply::Appended(tx, _), Err(e)) => {
                    let _ = tx.send(Err(e.clone()));
                }
                (Reply::Signed(tx), Err(e)) => {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Sequences `jobs` into `group`: records get the next indexes, signatures sign the
/// tree as it then stands. A record that cannot be encoded is refused on its own; a
/// head that cannot be signed fails the whole group (returned as the error).
pub fn sequence(
    seq: &mut Sequencer,
    jobs: Vec<AuditJob>,
    group: &mut Group,
) -> (Owed, Option<StoreError>) {
    let mut owed = Vec::with_capacity(jobs.len());
    let mut failed = None;
    for job in jobs {
        match job {
            AuditJob::Append(mut entry, reply) => match seq.append(&mut *entry, group) {
                Ok(index) => owed.push(Reply::Appended(reply, index)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            AuditJob::Sign(signer, reply) => {
                if let Err(e) = seq.sign(&*signer, group) {
                    failed = Some(e);
                }
                owed.push(Reply::Signed(reply));
            }
        }
    }
    (Owed(owed), failed)
}

/// Rebuilds the frontier of a tree of `size` leaves from its stored peaks.
fn restore_frontier(reader: &impl TreeReader, size: u64) -> Result<Frontier, StoreError> {
    let mut peaks = Vec::new();
    let mut start = 0u64;
    for level in (0..64u8).rev() {
        if size & (1u64 << level) != 0 {
            let hash = reader.node(level, start >> level)?.ok_or_else(|| {
                StoreError::Tree(format!(
                    "stored tree is missing the subtree at level {level}, index {}",
                    start >> level
                ))
            })?;
            peaks.push(hash);
            start += 1u64 << level;
        }
    }
    Frontier::from_parts(size, peaks).map_err(|e| StoreError::Tree(e.to_string()))
}

/// Checks the stored log against the newest head this log signed; returns that
/// head's size.
fn check_against_newest_head(reader: &impl TreeReader, size: u64) -> Result<u64, StoreError> {
    let newest = reader
        .latest_head()?
        .into_iter()
        .chain(reader.remembered_head()?)
        .max_by_key(|(size, _)| *size);
    let Some((signed, note)) = newest else {
        return Ok(0);
    };
    if size < signed {
        return Err(StoreError::Cut(format!(
            "the log holds {size} records, the head covers {signed}"
        )));
    }
    // The signature is not checked: an operator may have rotated the key since. What
    // matters is that the records still hash to what was signed.
    let body = note.split_once("\n\n").map(|(b, _)| format!("{b}\n"));
    let head = body
        .as_deref()
        .map(TreeHead::parse_body)
        .transpose()
        .ok()
        .flatten()
        .ok_or_else(|| StoreError::Cut("the newest stored head cannot be read".into()))?;
    let root = restore_frontier(reader, signed)
        .map_err(|e| StoreError::Cut(e.to_string()))?
        .root();
    if head.size != signed || head.root != root {
        return Err(StoreError::Cut(format!(
            "the first {signed} records have another root hash than the signed head"
        )));
    }
    Ok(signed)
}

/// A [`TreeReader`] as the proof code reads it.
struct Nodes<'a, R>(&'a R);

impl<R: TreeReader> pil_transparency::NodeSource for Nodes<'_, R> {
    type Error = StoreError;

    fn node(&self, level: u8, index: u64) -> Result<[u8; 32], StoreError> {
        self.0.node(level, index)?.ok_or_else(|| {
            StoreError::Tree(format!("missing subtree at level {level}, index {index}"))
        })
    }
}

/// The audit path of leaf `index` in the tree of `size` leaves.
pub fn inclusion_proof(
    reader: &impl TreeReader,
    index: u64,
    size: u64,
) -> Result<Vec<[u8; 32]>, StoreError> {
    pil_transparency::inclusion_proof(&Nodes(reader), index, size).map_err(proof_error)
}

/// The proof that the tree of `old` leaves is a prefix of the tree of `new`.
pub fn consistency_proof(
    reader: &impl TreeReader,
    old: u64,
    new: u64,
) -> Result<Vec<[u8; 32]>, StoreError> {
    pil_transparency::consistency_proof(&Nodes(reader), old, new).map_err(proof_error)
}

fn proof_error(e: pil_transparency::ProofError<StoreError>) -> StoreError {
    match e {
        pil_transparency::ProofError::Source(e) => e,
        other => StoreError::Tree(other.to_string()),
    }
}

/// A reader that answers every node with zeros and remembers which it was asked for:
/// a proof or a check reads the same nodes whatever their hashes, so an engine that
/// reads asynchronously runs the computation once with this, fetches those nodes in
/// one query, and runs it again on them.
#[derive(Default)]
pub struct NodeRecorder {
    asked: std::cell::RefCell<Vec<(u8, u64)>>,
    heads: Option<(u64, String)>,
}

impl NodeRecorder {
    /// A recorder whose newest head (both copies) is `head`.
    pub fn with_head(head: Option<(u64, String)>) -> Self {
        Self {
            asked: Default::default(),
            heads: head,
        }
    }

    /// The nodes asked for, each once.
    pub fn asked(self) -> Vec<(u8, u64)> {
        let mut asked = self.asked.into_inner();
        asked.sort_unstable();
        asked.dedup();
        asked
    }
}

impl TreeReader for NodeRecorder {
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        self.asked.borrow_mut().push((level, index));
        Ok(Some([0; 32]))
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.heads.clone())
    }

    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.heads.clone())
    }
}

/// Nodes fetched for one computation, with the newest head.
pub struct FetchedNodes {
    pub nodes: std::collections::HashMap<(u8, u64), [u8; 32]>,
    pub head: Option<(u64, String)>,
}

impl TreeReader for FetchedNodes {
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self.nodes.get(&(level, index)).copied())
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.head.clone())
    }

    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.head.clone())
    }
}
