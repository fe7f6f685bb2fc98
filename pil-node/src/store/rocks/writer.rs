//! The RocksDB engine's pointer writer: one planning thread and one committing thread,
//! with group commit.
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

use super::db::Db;
use crate::store::{
    Change, GroupStats, Moved, Op, OpResult, PatientMove, PointerKey, QueueFigures, StoreError,
    StoredPointer,
    plan::{Current, plan as plan_ops},
    take_queued,
};

/// Most operations committed in one group, to bound memory and latency per fsync.
const MAX_GROUP_OPS: usize = 50_000;
/// Jobs that may wait for the writer before submitters are slowed down.
const QUEUE_DEPTH: usize = 1024;
/// Planned groups that may wait for the committer: enough to plan one group while
/// another is written, without planning far ahead of the disk.
const PLANNED_DEPTH: usize = 1;

enum Job {
    Ops {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Vec<OpResult>, StoreError>>,
    },
    /// Patients moved to new pseudonyms: written between groups, on their own.
    Move {
        moves: Vec<PatientMove>,
        reply: oneshot::Sender<Result<Moved, StoreError>>,
    },
}

impl Job {
    fn weight(&self) -> usize {
        match self {
            Job::Ops { ops, .. } => ops.len(),
            Job::Move { moves, .. } => moves.len(),
        }
    }
}

/// Handle to the writer thread. Cloneable; the thread ends when every handle is gone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    stats: Arc<GroupStats>,
}

impl Writer {
    /// Starts the writer thread over `store`. The returned join handle finishes after
    /// the last `Writer` clone is dropped and the queue is drained.
    pub fn start(store: Arc<Db>) -> (Self, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(GroupStats::default());
        let counted = stats.clone();
        let handle = thread::Builder::new()
            .name("pil-writer".into())
            .spawn(move || run(store, rx, &counted))
            .expect("spawning the writer thread");
        (Self { tx, stats }, handle)
    }

    pub fn queue(&self) -> QueueFigures {
        self.stats.figures(&self.tx)
    }

    /// Applies `ops` atomically; returns once they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Ops { ops, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Moves patients to new pseudonyms once every write queued before is durable, and
    /// before any queued after is planned.
    pub async fn move_patients(&self, moves: Vec<PatientMove>) -> Result<Moved, StoreError> {
        if moves.is_empty() {
            return Ok(Moved::default());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Move { moves, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
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

/// What the committer does next, in order.
enum Commit {
    Group(Planned),
    /// Runs once every group before it is durable; the planner waits for `done`.
    Move {
        moves: Vec<PatientMove>,
        reply: oneshot::Sender<Result<Moved, StoreError>>,
        done: std_mpsc::SyncSender<()>,
    },
}

/// A group ready to be written.
struct Planned {
    group: u64,
    failures_seen: u64,
    changes: Vec<Change>,
    results: Vec<Vec<OpResult>>,
    replies: Vec<oneshot::Sender<Result<Vec<OpResult>, StoreError>>>,
}

fn run(store: Arc<Db>, mut rx: mpsc::Receiver<Job>, stats: &GroupStats) {
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
    'queue: while let Some(first) = rx.blocking_recv() {
        let jobs = take_queued(&mut rx, first, MAX_GROUP_OPS, Job::weight, stats);
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        for job in jobs {
            match job {
                Job::Ops { ops: o, reply } => {
                    ops.push(o);
                    replies.push(reply);
                }
                Job::Move { moves, reply } => {
                    let before = (std::mem::take(&mut ops), std::mem::take(&mut replies));
                    if !send_group(&store, &pending, &mut group, before, &planned_tx) {
                        break 'queue;
                    }
                    let (done, wait) = std_mpsc::sync_channel(1);
                    if planned_tx
                        .send(Commit::Move { moves, reply, done })
                        .is_err()
                    {
                        break 'queue;
                    }
                    // Later groups are planned against what the move left.
                    let _ = wait.recv();
                }
            }
        }
        if !send_group(&store, &pending, &mut group, (ops, replies), &planned_tx) {
            break;
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

type Replies = Vec<oneshot::Sender<Result<Vec<OpResult>, StoreError>>>;

/// Plans a group of jobs and hands it to the committer; false once the committer is
/// gone.
fn send_group(
    store: &Db,
    pending: &Mutex<Pending>,
    group: &mut u64,
    (ops, replies): (Vec<Vec<Op>>, Replies),
    planned_tx: &std_mpsc::SyncSender<Commit>,
) -> bool {
    if ops.is_empty() {
        return true;
    }
    *group += 1;
    match plan(store, pending, *group, ops) {
        Ok((changes, results, failures_seen)) => {
            let planned = Planned {
                group: *group,
                failures_seen,
                changes,
                results,
                replies,
            };
            planned_tx.send(Commit::Group(planned)).is_ok()
        }
        Err(e) => {
            tracing::error!(error = %e, "planning a write group failed");
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            true
        }
    }
}

/// The committing thread: writes planned groups in order and answers their jobs.
fn commit(store: &Db, pending: &Mutex<Pending>, rx: std_mpsc::Receiver<Commit>) {
    let lock = || pending.lock().unwrap_or_else(|e| e.into_inner());
    for next in rx {
        let planned = match next {
            Commit::Group(planned) => planned,
            Commit::Move { moves, reply, done } => {
                let _ = reply.send(store.move_patients(&moves).map_err(StoreError::from));
                let _ = done.send(());
                continue;
            }
        };
        let outcome = if lock().failures != planned.failures_seen {
            Err(StoreError::Aborted)
        } else {
            store.write(&planned.changes).map_err(StoreError::from)
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

/// Decides every operation's effect against what is stored and what is pending,
/// reading stored values once for the whole group, and records the group's changes as
/// pending. Values are shared between the change, the result and later operations on
/// the same key rather than copied: a bulk sync's groups hold tens of thousands.
fn plan(
    store: &Db,
    pending: &Mutex<Pending>,
    group: u64,
    jobs: Vec<Vec<Op>>,
) -> Result<Plan, StoreError> {
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
    let stored = store.get_many(&keys)?;
    current.extend(
        keys.into_iter()
            .zip(stored.into_iter().map(|v| v.map(Arc::new))),
    );

    let (changes, results) = plan_ops(jobs, &mut current);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{patient_keys::PSEUDONYM_LEN, store::IDENT_LEN};

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

    /// Groups are planned while earlier ones are still being written. Each must see
    /// the ones before it: outcomes stay exact, and the store ends as the last write
    /// left it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn outcomes_stay_exact_while_groups_are_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Db::open(dir.path()).unwrap());
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
