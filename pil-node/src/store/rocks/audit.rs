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
    AuditEntry, GroupStats, HeadSigning, LogSize, QueueFigures, StoreError, take_queued,
    tree::{AuditJob as Job, Group, Head, Sequencer, sequence},
};

/// Most records committed in one write.
const MAX_GROUP: usize = 4096;
const QUEUE_DEPTH: usize = 8192;

/// Handle to the appender thread; the thread ends when the handle is dropped.
pub struct Appender {
    tx: mpsc::Sender<Job>,
    size: Arc<AtomicU64>,
    signed: Arc<AtomicU64>,
    stats: Arc<GroupStats>,
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
            stats: Default::default(),
        };
        let thread = AppendThread {
            db,
            sequencer,
            size: appender.size.clone(),
            signed: appender.signed.clone(),
            stats: appender.stats.clone(),
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

    pub fn queue(&self) -> QueueFigures {
        self.stats.figures(&self.tx)
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
    stats: Arc<GroupStats>,
}

impl AppendThread {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let jobs = take_queued(&mut rx, first, MAX_GROUP, |_| 1, &self.stats);
            self.commit(jobs);
        }
    }

    fn commit(&mut self, jobs: Vec<Job>) {
        let before = self.sequencer.clone();
        let mut group = Group::default();
        let (owed, failed) = sequence(&mut self.sequencer, jobs, &mut group);
        let written = match failed {
            Some(e) => Err(e),
            None => self
                .db
                .audit_append(&group)
                .and_then(|()| self.db.audit_latest_head())
                .map_err(StoreError::from),
        };
        if let Err(e) = &written {
            tracing::error!(error = %e, "audit records could not be written");
            // Nothing was stored: forget the appended leaves too.
            self.sequencer = before;
        }
        self.size.store(self.sequencer.size(), Ordering::Release);
        self.signed
            .store(self.sequencer.signed(), Ordering::Release);
        owed.answer(&written);
    }
}
