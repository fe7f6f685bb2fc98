//! The registry's writer: one planning thread and one committing thread, with group
//! commit.
//!
//! All writes go through one OS thread, off the async executor: it takes every job
//! waiting in its queue, works out each operation's effect against the stored state
//! (and against earlier operations in the same group), and hands the group to the
//! committer, which makes it durable in one synced RocksDB write. One fsync then
//! acknowledges many requests, and because one thread decides every outcome,
//! concurrent writes to the same pointer cannot race and the inserted/updated/unchanged
//! counts are exact.
//!
//! The planner does not wait for the committer: while one group is written and synced
//! it plans the next against [`Pending`], the groups planned but not yet durable. A
//! reply is sent only once its group is durable. If a write fails, every group planned
//! on top of it fails too, and planning starts again from what is stored.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    thread,
};

use tokio::sync::{mpsc, oneshot};

use crate::storage::{Change, PointerKey, Store, StoredPointer};

/// Most operations committed in one group, to bound memory and latency per fsync.
const MAX_GROUP_OPS: usize = 50_000;
/// Jobs that may wait for the writer before submitters are slowed down.
const QUEUE_DEPTH: usize = 1024;
/// Planned groups that may wait for the committer: enough to plan one group while
/// another is written, without planning far ahead of the disk.
const PLANNED_DEPTH: usize = 1;
/// How far a write must move a pointer's lapse before the lapse moves
/// ([`lapse_moves`]).
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

/// Groups planned but not yet durable: the state the planner plans against, on top of
/// what is stored.
#[derive(Default)]
struct Pending {
    /// Each key changed by a group not yet durable: the group that last changed it and
    /// what it left there (`None`: deleted).
    entries: HashMap<PointerKey, (u64, Option<Arc<StoredPointer>>)>,
    /// Failed writes so far. A group planned when this was different planned on top of
    /// a write that never happened.
    failures: u64,
}

/// A group ready to be written.
struct Planned {
    group: u64,
    failures_seen: u64,
    changes: Vec<Change>,
    results: Vec<Vec<OpResult>>,
    replies: Vec<oneshot::Sender<Result<Vec<OpResult>, WriteError>>>,
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Job>) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let (planned_tx, planned_rx) = std_mpsc::sync_channel(PLANNED_DEPTH);
    let committer = {
        let store = store.clone();
        let pending = pending.clone();
        thread::Builder::new()
            .name("pil-commit".into())
            .spawn(move || commit(&store, &pending, planned_rx))
            .expect("spawning the commit thread")
    };
    let mut group = 0u64;
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
        group += 1;
        let (ops, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.ops, j.reply)).unzip();
        match plan(&store, &pending, group, ops) {
            Ok((changes, results, failures_seen)) => {
                let planned = Planned {
                    group,
                    failures_seen,
                    changes,
                    results,
                    replies,
                };
                if planned_tx.send(planned).is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "planning a write group failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
    drop(planned_tx);
    if committer.join().is_err() {
        tracing::error!("the commit thread panicked");
    }
    // Every handle is gone: the node is stopping. Flushing now makes the next start
    // skip WAL replay.
    if let Err(e) = store.flush() {
        tracing::warn!(error = %e, "flush at shutdown failed");
    }
}

/// The committing thread: writes planned groups in order and answers their jobs.
fn commit(store: &Store, pending: &Mutex<Pending>, rx: std_mpsc::Receiver<Planned>) {
    let lock = || pending.lock().unwrap_or_else(|e| e.into_inner());
    for planned in rx {
        let outcome = if lock().failures != planned.failures_seen {
            Err(WriteError::Storage(
                "an earlier write it depended on failed; nothing of it was stored".into(),
            ))
        } else {
            store
                .write(&planned.changes)
                .map_err(|e| WriteError::Storage(e.to_string()))
        };
        {
            let mut pending = lock();
            match &outcome {
                Ok(()) => {
                    // Durable now: reads see these keys in the store. A key a later
                    // group changed again stays pending for that group.
                    for change in &planned.changes {
                        let key = change.key();
                        if pending
                            .entries
                            .get(key)
                            .is_some_and(|(g, _)| *g == planned.group)
                        {
                            pending.entries.remove(key);
                        }
                    }
                }
                Err(e) if pending.failures == planned.failures_seen => {
                    tracing::error!(error = %e, "write group failed");
                    pending.failures += 1;
                    pending.entries.clear();
                }
                Err(_) => {}
            }
        }
        match outcome {
            Ok(()) => {
                for (reply, result) in planned.replies.into_iter().zip(planned.results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                for reply in planned.replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

type Plan = (Vec<Change>, Vec<Vec<OpResult>>, u64);
/// What a key holds as the group is planned: stored, or as an earlier operation left it.
type Current = HashMap<PointerKey, Option<Arc<StoredPointer>>>;

/// Decides every operation's effect against what is stored and what is pending,
/// reading stored values once for the whole group, and records the group's changes as
/// pending. Values are shared between the change, the result and later operations on
/// the same key rather than copied: a bulk sync's groups hold tens of thousands.
fn plan(
    store: &Store,
    pending: &Mutex<Pending>,
    group: u64,
    jobs: Vec<Vec<Op>>,
) -> Result<Plan, WriteError> {
    let lock = || pending.lock().unwrap_or_else(|e| e.into_inner());
    let mut keys: Vec<PointerKey> = jobs.iter().flatten().map(Op::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut current: Current = HashMap::with_capacity(keys.len());
    let failures_seen = {
        let pending = lock();
        keys.retain(|key| match pending.entries.get(key) {
            Some((_, value)) => {
                current.insert(*key, value.clone());
                false
            }
            None => true,
        });
        pending.failures
    };
    // Keys not pending are durable as they are: the planner is the only one who adds
    // to the pending set, and the committer removes a key only once it is stored.
    let stored = store
        .get_many(&keys)
        .map_err(|e| WriteError::Storage(e.to_string()))?;
    current.extend(
        keys.into_iter()
            .zip(stored.into_iter().map(|v| v.map(Arc::new))),
    );

    let mut changes = Vec::with_capacity(current.len());
    let mut results = Vec::with_capacity(jobs.len());
    for ops in jobs {
        let job_results = ops
            .into_iter()
            .map(|op| apply_op(op, &mut current, &mut changes))
            .collect();
        results.push(job_results);
    }

    let mut pending = lock();
    // After a failure the committer refuses this group; its changes must not become
    // the state later groups are planned against.
    if pending.failures == failures_seen {
        for change in &changes {
            let key = *change.key();
            let value = current.get(&key).cloned().flatten();
            pending.entries.insert(key, (group, value));
        }
    }
    Ok((changes, results, failures_seen))
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
                return OpResult::Inserted(put(key, value, None, slot, changes));
            };
            if keep_last_updated {
                value.last_updated = prev.last_updated;
            }
            let lapse_moves = lapse_moves(prev.lapses_at, value.lapses_at);
            if !prev.same_content(&value) {
                if !lapse_moves {
                    value.lapses_at = prev.lapses_at;
                }
                return OpResult::Updated(put(key, value, Some(prev), slot, changes));
            }
            // Unchanged content still counts as a refresh; repeating a sync within a
            // day costs no writes.
            if !lapse_moves {
                *slot = Some(prev.clone());
                return OpResult::Unchanged(prev);
            }
            let mut kept = StoredPointer::clone(&prev);
            kept.lapses_at = value.lapses_at;
            OpResult::Unchanged(put(key, kept, Some(prev), slot, changes))
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

/// Stores `value` at `key` in the plan: a change to write, and what later operations
/// in the group see there. Returns the value, shared.
fn put(
    key: PointerKey,
    value: StoredPointer,
    previous: Option<Arc<StoredPointer>>,
    slot: &mut Option<Arc<StoredPointer>>,
    changes: &mut Vec<Change>,
) -> Arc<StoredPointer> {
    let value = Arc::new(value);
    changes.push(Change::Put {
        key,
        value: value.clone(),
        previous,
    });
    *slot = Some(value.clone());
    value
}

/// Whether a write moves a pointer's lapse from `stored` to `offered`. Every write
/// refreshes the pointer, but its lapse moves only in steps of at least a day: a
/// holder syncing the same data twice in a day writes once, and an update within a day
/// of the last write keeps its place in the expiry index (rewriting it was two of an
/// update's three index entries).
fn lapse_moves(stored: Option<i64>, offered: Option<i64>) -> bool {
    match (stored, offered) {
        (Some(old), Some(new)) => new - old >= REFRESH_STEP_NANOS,
        (old, new) => old != new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{patient_keys::PSEUDONYM_LEN, storage::IDENT_LEN};

    fn key(p: u8) -> PointerKey {
        PointerKey {
            patient: [p; PSEUDONYM_LEN],
            org: *b"974760673",
            ident: [1; IDENT_LEN],
        }
    }

    fn upsert(key: PointerKey, n: i64) -> Op {
        Op::Upsert {
            key,
            value: StoredPointer {
                base_url: "https://x.no".into(),
                api_kind: 1,
                last_updated: n,
                ..Default::default()
            },
            keep_last_updated: false,
        }
    }

    fn with_lapse(op: Op, lapses_at: i64) -> Op {
        match op {
            Op::Upsert {
                key,
                mut value,
                keep_last_updated,
            } => {
                value.lapses_at = Some(lapses_at);
                Op::Upsert {
                    key,
                    value,
                    keep_last_updated,
                }
            }
            other => other,
        }
    }

    /// An update refreshes the pointer, but its lapse (and so its place in the expiry
    /// index) moves only when it would move by a day or more.
    #[tokio::test]
    async fn updates_move_the_lapse_in_steps_of_a_day() {
        const HOUR: i64 = 3600 * 1_000_000_000;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (writer, thread) = Writer::start(store.clone());
        let k = key(1);
        let lapse = |result: &[OpResult]| match &result[0] {
            OpResult::Inserted(v) | OpResult::Updated(v) | OpResult::Unchanged(v) => v.lapses_at,
            other => panic!("unexpected {other:?}"),
        };
        let t0 = 1_000 * 24 * HOUR;
        let r = writer
            .apply(vec![with_lapse(upsert(k, 1), t0)])
            .await
            .unwrap();
        assert_eq!(lapse(&r), Some(t0));
        // Changed content an hour later: updated, the lapse stays.
        let r = writer
            .apply(vec![with_lapse(upsert(k, 2), t0 + HOUR)])
            .await
            .unwrap();
        assert!(matches!(r[0], OpResult::Updated(_)));
        assert_eq!(lapse(&r), Some(t0));
        // Changed content two days later: the lapse moves with it.
        let r = writer
            .apply(vec![with_lapse(upsert(k, 3), t0 + 48 * HOUR)])
            .await
            .unwrap();
        assert!(matches!(r[0], OpResult::Updated(_)));
        assert_eq!(lapse(&r), Some(t0 + 48 * HOUR));
        let stored = store.get_many(&[k]).unwrap().pop().unwrap().unwrap();
        assert_eq!(stored.lapses_at, Some(t0 + 48 * HOUR));
        assert_eq!(stored.last_updated, 3);

        drop(writer);
        thread.join().unwrap();
    }

    /// Groups are planned while earlier ones are still being written. Each must see
    /// the ones before it: outcomes stay exact, and the store ends as the last write
    /// left it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn outcomes_stay_exact_while_groups_are_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (writer, thread) = Writer::start(store.clone());
        let keys: Vec<PointerKey> = (0..10).map(key).collect();

        let tasks: Vec<_> = (0..8i64)
            .map(|t| {
                let writer = writer.clone();
                let keys = keys.clone();
                tokio::spawn(async move {
                    let mut counts = [0u32; 3];
                    for i in 0..200i64 {
                        let op = upsert(keys[i as usize % keys.len()], t * 1000 + i + 1);
                        match writer.apply(vec![op]).await.unwrap().pop().unwrap() {
                            OpResult::Inserted(_) => counts[0] += 1,
                            OpResult::Updated(_) => counts[1] += 1,
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    counts
                })
            })
            .collect();
        let mut counts = [0u32; 3];
        for task in tasks {
            for (sum, n) in counts.iter_mut().zip(task.await.unwrap()) {
                *sum += n;
            }
        }
        assert_eq!(counts, [10, 1600 - 10, 0]);

        let last: Vec<Op> = keys.iter().map(|k| upsert(*k, 99_999)).collect();
        let results = writer.apply(last).await.unwrap();
        assert!(results.iter().all(|r| matches!(r, OpResult::Updated(_))));
        let stored = store.get_many(&keys).unwrap();
        assert!(
            stored
                .iter()
                .all(|v| v.as_ref().is_some_and(|v| v.last_updated == 99_999))
        );

        // Delete twice in one job, and once more in the next: only the first removes.
        let ops = vec![Op::Delete { key: keys[0] }, Op::Delete { key: keys[0] }];
        let (first, second) = tokio::join!(writer.apply(ops), async {
            writer.apply(vec![Op::Delete { key: keys[0] }]).await
        });
        let mut deleted = first.unwrap();
        deleted.extend(second.unwrap());
        assert_eq!(
            deleted
                .iter()
                .filter(|r| matches!(r, OpResult::Deleted))
                .count(),
            1
        );
        assert_eq!(store.get_many(&keys[..1]).unwrap(), vec![None]);

        drop(writer);
        thread.join().unwrap();
    }
}
