//! Appending to the audit log: one writer thread, group commit, signed heads.
//!
//! A request's record must be durable before its answer leaves the node, and lookups
//! are the hot path, so records are appended by one thread that takes whatever is
//! queued, assigns consecutive indexes, extends the hash tree and writes the lot with
//! one synced write. The tree's frontier (O(log n) hashes) lives in that thread; every
//! completed subtree is stored so proofs can be served from disk.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use pil_transparency::{Frontier, HeadSigner, SignedTreeHead, TreeHead, leaf_hash};
use tokio::sync::{mpsc, oneshot};

use super::record::AuditRecord;
use crate::{
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    storage::{AuditAppend, StorageError, Store},
};

/// Most records committed in one write.
const MAX_GROUP: usize = 4096;
const QUEUE_DEPTH: usize = 8192;

/// Why the audit log could not record or answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log storage: {0}")]
    Storage(String),
    #[error("the audit log is closed")]
    Closed,
    #[error("audit signing key: {0}")]
    Key(String),
    #[error("audit log: {0}")]
    Tree(String),
    /// The stored log disagrees with a head this node signed: records were removed
    /// or rewritten while it was stopped.
    #[error(
        "the audit log does not match the newest tree head this node signed ({0}); it was \
         cut or rewritten while the node was stopped. Restore the data directory from a \
         backup, or keep it as evidence; the node will not append to it"
    )]
    Cut(String),
}

impl From<StorageError> for AuditError {
    fn from(e: StorageError) -> Self {
        AuditError::Storage(e.to_string())
    }
}

enum Job {
    Append(Box<AuditRecord>, oneshot::Sender<Result<u64, AuditError>>),
    Sign(oneshot::Sender<Result<Option<(u64, String)>, AuditError>>),
}

/// The node's audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    store: Arc<Store>,
    origin: String,
    signed_size: Arc<AtomicU64>,
    size: Arc<AtomicU64>,
}

impl AuditLog {
    /// Opens the log in `store` and starts its writer thread. The thread ends when
    /// every handle is dropped.
    pub fn open(
        store: Arc<Store>,
        region: &str,
        signer: HeadSigner,
    ) -> Result<(Self, thread::JoinHandle<()>), AuditError> {
        let size = store.audit_size()?;
        let frontier = restore_frontier(&store, size)?;
        let signed = check_against_newest_head(&store, size)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let origin = format!("pil-audit/{region}");
        let log = Self {
            tx,
            store: store.clone(),
            origin: origin.clone(),
            signed_size: Arc::new(AtomicU64::new(signed)),
            size: Arc::new(AtomicU64::new(size)),
        };
        let writer = Writer {
            store,
            frontier,
            signer,
            origin,
            size: log.size.clone(),
            signed_size: log.signed_size.clone(),
        };
        let handle = thread::Builder::new()
            .name("pil-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Storage(e.to_string()))?;
        Ok((log, handle))
    }

    /// Appends `record` (its `index` is assigned here) and returns once it is
    /// durable.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Append(Box::new(record), reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Signs the current tree unless its size is already signed; returns the newest
    /// signed head `(size, note)`, if any.
    pub async fn sign_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Sign(reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// A handle that does not keep the log open: for the parts of the node that live
    /// as long as the process (e.g. the SIGHUP handler).
    pub fn downgrade(&self) -> WeakAuditLog {
        WeakAuditLog {
            tx: self.tx.downgrade(),
        }
    }

    /// Number of records in the log.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether records were added since the last signed head.
    pub fn unsigned(&self) -> bool {
        self.size() > self.signed_size.load(Ordering::Acquire)
    }

    /// The checkpoint origin, `pil-audit/<region>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The stored database, for readers (search, proofs).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// An [`AuditLog`] handle that lets the log close when the node stops.
#[derive(Clone)]
pub struct WeakAuditLog {
    tx: mpsc::WeakSender<Job>,
}

impl WeakAuditLog {
    /// Appends like [`AuditLog::append`]; fails with `Closed` once the node stopped.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let tx = self.tx.upgrade().ok_or(AuditError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Job::Append(Box::new(record), reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        drop(tx);
        rx.await.map_err(|_| AuditError::Closed)?
    }
}

/// Checks the stored log against the newest head this node signed (remembered twice, so
/// removing the heads over a cut end is noticed too); returns that head's size.
fn check_against_newest_head(store: &Store, size: u64) -> Result<u64, AuditError> {
    let newest = store
        .audit_latest_head()?
        .into_iter()
        .chain(store.audit_remembered_head()?)
        .max_by_key(|(size, _)| *size);
    let Some((signed, note)) = newest else {
        return Ok(0);
    };
    if size < signed {
        return Err(AuditError::Cut(format!(
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
        .ok_or_else(|| AuditError::Cut("the newest stored head cannot be read".into()))?;
    let root = restore_frontier(store, signed)
        .map_err(|e| AuditError::Cut(e.to_string()))?
        .root();
    if head.size != signed || head.root != root {
        return Err(AuditError::Cut(format!(
            "the first {signed} records have another root hash than the signed head"
        )));
    }
    Ok(signed)
}

/// Rebuilds the frontier of a tree of `size` leaves from its stored peaks.
fn restore_frontier(store: &Store, size: u64) -> Result<Frontier, AuditError> {
    let mut peaks = Vec::new();
    let mut start = 0u64;
    for level in (0..64u8).rev() {
        if size & (1u64 << level) != 0 {
            let hash = store.audit_node(level, start >> level)?.ok_or_else(|| {
                AuditError::Tree(format!(
                    "stored tree is missing the subtree at level {level}, index {}",
                    start >> level
                ))
            })?;
            peaks.push(hash);
            start += 1u64 << level;
        }
    }
    Frontier::from_parts(size, peaks).map_err(|e| AuditError::Tree(e.to_string()))
}

struct Writer {
    store: Arc<Store>,
    frontier: Frontier,
    signer: HeadSigner,
    origin: String,
    size: Arc<AtomicU64>,
    signed_size: Arc<AtomicU64>,
}

enum Reply {
    Appended(oneshot::Sender<Result<u64, AuditError>>, u64),
    Signed(oneshot::Sender<Result<Option<(u64, String)>, AuditError>>),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit(jobs);
        }
    }

    fn commit(&mut self, jobs: Vec<Job>) {
        let before = self.frontier.clone();
        let mut records: Vec<(u64, Vec<u8>, Option<Pseudonym>)> = Vec::new();
        let mut nodes = Vec::new();
        let mut heads = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        let mut failed: Option<AuditError> = None;
        for job in jobs {
            match job {
                Job::Append(mut record, reply) => {
                    let index = self.frontier.size();
                    record.index = index;
                    let bytes = match serde_json::to_vec(&record) {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = reply.send(Err(AuditError::Tree(e.to_string())));
                            continue;
                        }
                    };
                    for n in self.frontier.append(leaf_hash(&bytes)) {
                        nodes.push((n.level, n.index, n.hash));
                    }
                    let patient = record.patient.as_deref().and_then(pseudonym_of);
                    records.push((index, bytes, patient));
                    replies.push(Reply::Appended(reply, index));
                }
                Job::Sign(reply) => {
                    let size = self.frontier.size();
                    if size > 0 && size > self.signed_size.load(Ordering::Acquire) {
                        match self.sign(size) {
                            Ok(note) => heads.push((size, note)),
                            Err(e) => failed = Some(e),
                        }
                    }
                    replies.push(Reply::Signed(reply));
                }
            }
        }
        let appends: Vec<AuditAppend<'_>> = records
            .iter()
            .map(|(index, bytes, patient)| AuditAppend {
                index: *index,
                record: bytes,
                patient: *patient,
            })
            .collect();
        let written = match failed {
            Some(e) => Err(e),
            None => self
                .store
                .audit_append(&appends, &nodes, &heads)
                .map_err(AuditError::from),
        };
        match written {
            Ok(()) => {
                self.size.store(self.frontier.size(), Ordering::Release);
                if let Some((size, _)) = heads.last() {
                    self.signed_size.store(*size, Ordering::Release);
                }
                for reply in replies {
                    match reply {
                        Reply::Appended(tx, index) => {
                            let _ = tx.send(Ok(index));
                        }
                        Reply::Signed(tx) => {
                            let _ = tx.send(self.latest_head());
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit records could not be written");
                // Nothing was stored: forget the appended leaves too.
                self.frontier = before;
                for reply in replies {
                    match reply {
                        Reply::Appended(tx, _) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                        Reply::Signed(tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
    }

    fn sign(&self, size: u64) -> Result<String, AuditError> {
        let head = TreeHead {
            origin: self.origin.clone(),
            size,
            root: self.frontier.root(),
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let signed: SignedTreeHead = self
            .signer
            .sign(head)
            .map_err(|e| AuditError::Tree(e.to_string()))?;
        signed
            .to_note()
            .map_err(|e| AuditError::Tree(e.to_string()))
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        Ok(self.store.audit_latest_head()?)
    }
}

fn pseudonym_of(hex_str: &str) -> Option<Pseudonym> {
    let bytes = hex::decode(hex_str).ok()?;
    (bytes.len() == PSEUDONYM_LEN).then(|| {
        let mut p = [0u8; PSEUDONYM_LEN];
        p.copy_from_slice(&bytes);
        p
    })
}
