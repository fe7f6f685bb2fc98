//! The RocksDB engine's audit appender: one thread that takes whatever is queued,
//! gives each record the next index, extends the tree and writes the lot with one
//! synced write. The frontier (O(log n) hashes) lives in that thread.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use tokio::sync::{mpsc, oneshot};

use super::db::Db;
use crate::store::{
    AuditEntry, HeadSigning, LogSize, StoreError,
    tree::{Group, Sequencer},
};

/// Most records committed in one write.
const MAX_GROUP: usize = 4096;
const QUEUE_DEPTH: usize = 8192;

type Head = Option<(u64, String)>;

enum Job {
    Append(
        Box<dyn AuditEntry>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    Sign(
        Arc<dyn HeadSigning>,
        oneshot::Sender<Result<Head, StoreError>>,
    ),
}

/// Handle to the appender thread; the thread ends when the handle is dropped.
pub struct Appender {
    tx: mpsc::Sender<Job>,
    size: Arc<AtomicU64>,
    signed: Arc<AtomicU64>,
}

impl Appender {
    /// Checks the stored log and starts the thread over it.
    pub fn start(db: Arc<Db>) -> Result<(Self, thread::JoinHandle<()>), StoreError> {
        let size = db.audit_size()?;
        let sequencer = Sequencer::restore(&*db, size)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let appender = Self {
            tx,
            size: Arc::new(AtomicU64::new(sequencer.size())),
            signed: Arc::new(AtomicU64::new(sequencer.signed())),
        };
        let thread = AppendThread {
            db,
            sequencer,
            size: appender.size.clone(),
            signed: appender.signed.clone(),
        };
        let handle = thread::Builder::new()
            .name("pil-audit".into())
            .spawn(move || thread.run(rx))
            .map_err(StoreError::engine)?;
        Ok((appender, handle))
    }

    pub async fn append(&self, entry: Box<dyn AuditEntry>) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Append(entry, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn sign(&self, signer: Arc<dyn HeadSigning>) -> Result<Head, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Sign(signer, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn size(&self) -> LogSize {
        LogSize {
            size: self.size.load(Ordering::Acquire),
            signed: self.signed.load(Ordering::Acquire),
        }
    }
}

struct AppendThread {
    db: Arc<Db>,
    sequencer: Sequencer,
    size: Arc<AtomicU64>,
    signed: Arc<AtomicU64>,
}

enum Reply {
    Appended(oneshot::Sender<Result<u64, StoreError>>, u64),
    Signed(oneshot::Sender<Result<Head, StoreError>>),
}

impl AppendThread {
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
        let before = self.sequencer.clone();
        let mut group = Group::default();
        let mut replies = Vec::with_capacity(jobs.len());
        let mut failed: Option<StoreError> = None;
        for job in jobs {
            match job {
                Job::Append(mut entry, reply) => {
                    match self.sequencer.append(&mut *entry, &mut group) {
                        Ok(index) => replies.push(Reply::Appended(reply, index)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Job::Sign(signer, reply) => {
                    if let Err(e) = self.sequencer.sign(&*signer, &mut group) {
                        failed = Some(e);
                    }
                    replies.push(Reply::Signed(reply));
                }
            }
        }
        let written = match failed {
            Some(e) => Err(e),
            None => self.db.audit_append(&group).map_err(StoreError::from),
        };
        if let Err(e) = &written {
            tracing::error!(error = %e, "audit records could not be written");
            // Nothing was stored: forget the appended leaves too.
            self.sequencer = before;
        }
        self.size.store(self.sequencer.size(), Ordering::Release);
        self.signed
            .store(self.sequencer.signed(), Ordering::Release);
        for reply in replies {
            match (reply, &written) {
                (Reply::Appended(tx, index), Ok(())) => {
                    let _ = tx.send(Ok(index));
                }
                (Reply::Signed(tx), Ok(())) => {
                    let _ = tx.send(self.db.audit_latest_head().map_err(StoreError::from));
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
