//! The registry's single writer thread, with group commit.
//!
//! All writes go through one OS thread, off the async executor: it takes every job
//! waiting in its queue, works out each operation's effect against the stored state
//! (and against earlier operations in the same group), and commits the whole group in
//! one synced RocksDB write. One fsync then acknowledges many requests, and because
//! one thread decides every outcome, concurrent writes to the same pointer cannot race
//! and the inserted/updated/unchanged counts are exact.

use std::{collections::HashMap, sync::Arc, thread};

use tokio::sync::{mpsc, oneshot};

use crate::storage::{Change, PointerKey, Store, StoredPointer};

/// Most operations committed in one group, to bound memory and latency per fsync.
const MAX_GROUP_OPS: usize = 50_000;
/// Jobs that may wait for the writer before submitters are slowed down.
const QUEUE_DEPTH: usize = 1024;
/// How far a refresh must move a pointer's lapse before it is written: a holder
/// syncing the same data twice in a day writes once.
const REFRESH_STEP_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// One change a caller asks for.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "batches are almost all of the large variant; boxing it would add an allocation per pointer"
)]
pub enum Op {
    /// Insert or replace. When `keep_last_updated` is set the caller did not send a
    /// `last_updated`: an existing pointer keeps its own, a new one gets `value`'s.
    Upsert {
        key: PointerKey,
        value: StoredPointer,
        keep_last_updated: bool,
    },
    /// Remove if present.
    Delete { key: PointerKey },
    /// Remove if present and still expired at `now` (its expiry may have moved).
    Purge { key: PointerKey, now: i64 },
}

impl Op {
    fn key(&self) -> PointerKey {
        match self {
            Op::Upsert { key, .. } | Op::Delete { key } | Op::Purge { key, .. } => *key,
        }
    }
}

/// What an operation did, with the pointer as it is now stored.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    Inserted(Arc<StoredPointer>),
    Updated(Arc<StoredPointer>),
    Unchanged(Arc<StoredPointer>),
    Deleted,
    Absent,
}

/// A write failed; nothing of the group it was in was stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("storage write failed: {0}")]
    Storage(String),
    #[error("the node is shutting down")]
    Closed,
}

struct Job {
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<Vec<OpResult>, WriteError>>,
}

/// Handle to the writer thread. Cloneable; the thread ends when every handle is gone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `store`. The returned join handle finishes after
    /// the last `Writer` clone is dropped and the queue is drained.
    pub fn start(store: Arc<Store>) -> (Self, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let handle = thread::Builder::new()
            .name("pil-writer".into())
            .spawn(move || run(store, rx))
            .expect("spawning the writer thread");
        (Self { tx }, handle)
    }

    /// Applies `ops` atomically; returns once they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, WriteError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { ops, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        rx.await.map_err(|_| WriteError::Closed)?
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut n = first.ops.len();
        let mut jobs = vec![first];
        while n < MAX_GROUP_OPS {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.ops.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        commit_group(&store, jobs);
    }
    // Every handle is gone: the node is stopping. Flushing now makes the next start
    // skip WAL replay.
    if let Err(e) = store.flush() {
        tracing::warn!(error = %e, "flush at shutdown failed");
    }
}

fn commit_group(store: &Store, jobs: Vec<Job>) {
    let (ops, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.ops, j.reply)).unzip();
    let outcome = plan(store, ops).and_then(|(changes, results)| {
        store
            .write(&changes)
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        Ok(results)
    });
    match outcome {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "write group failed");
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

type Plan = (Vec<Change>, Vec<Vec<OpResult>>);
/// What a key holds as the group is planned: stored, or as an earlier operation left it.
type Current = HashMap<PointerKey, Option<Arc<StoredPointer>>>;

/// Decides every operation's effect, reading stored values once for the whole group.
/// Values are shared between the change, the result and later operations on the same
/// key rather than copied: a bulk sync's groups hold tens of thousands of them.
fn plan(store: &Store, jobs: Vec<Vec<Op>>) -> Result<Plan, WriteError> {
    let mut keys: Vec<PointerKey> = jobs.iter().flatten().map(Op::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let stored = store
        .get_many(&keys)
        .map_err(|e| WriteError::Storage(e.to_string()))?;
    let mut current: Current = keys
        .into_iter()
        .zip(stored.into_iter().map(|v| v.map(Arc::new)))
        .collect();

    let mut changes = Vec::with_capacity(current.len());
    let mut results = Vec::with_capacity(jobs.len());
    for ops in jobs {
        let job_results = ops
            .into_iter()
            .map(|op| apply_op(op, &mut current, &mut changes))
            .collect();
        results.push(job_results);
    }
    Ok((changes, results))
}

fn apply_op(op: Op, current: &mut Current, changes: &mut Vec<Change>) -> OpResult {
    match op {
        Op::Upsert {
            key,
            mut value,
            keep_last_updated,
        } => {
            let slot = current.entry(key).or_default();
            let Some(prev) = slot.take() else {
                let value = Arc::new(value);
                changes.push(Change::Put {
                    key,
                    value: value.clone(),
                    previous: None,
                });
                *slot = Some(value.clone());
                return OpResult::Inserted(value);
            };
            if keep_last_updated {
                value.last_updated = prev.last_updated;
            }
            if !prev.same_content(&value) {
                let value = Arc::new(value);
                changes.push(Change::Put {
                    key,
                    value: value.clone(),
                    previous: Some(prev),
                });
                *slot = Some(value.clone());
                return OpResult::Updated(value);
            }
            // Unchanged content still counts as a refresh. The lapse moves in coarse
            // steps, so repeating a sync costs no writes.
            let refreshed = match (prev.lapses_at, value.lapses_at) {
                (Some(old), Some(new)) => new - old >= REFRESH_STEP_NANOS,
                (old, new) => old != new,
            };
            if !refreshed {
                *slot = Some(prev.clone());
                return OpResult::Unchanged(prev);
            }
            let mut kept = StoredPointer::clone(&prev);
            kept.lapses_at = value.lapses_at;
            let kept = Arc::new(kept);
            changes.push(Change::Put {
                key,
                value: kept.clone(),
                previous: Some(prev),
            });
            *slot = Some(kept.clone());
            OpResult::Unchanged(kept)
        }
        Op::Delete { key } | Op::Purge { key, .. } => {
            let slot = current.entry(key).or_default();
            let still_due = match (&op, slot.as_ref()) {
                (Op::Purge { now, .. }, Some(prev)) => {
                    prev.effective_expiry().is_some_and(|at| at <= *now)
                }
                (_, Some(_)) => true,
                (_, None) => false,
            };
            if !still_due {
                return OpResult::Absent;
            }
            let previous = slot.take().expect("checked above");
            changes.push(Change::Delete { key, previous });
            OpResult::Deleted
        }
    }
}
