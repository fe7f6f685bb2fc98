//! What a group of write operations does, decided against what a key holds now. Every
//! engine writes what this plans, so an insert, an update, a refresh and a purge mean
//! the same whichever engine stores them.

use std::{collections::HashMap, sync::Arc};

use super::model::{Change, Op, OpResult, PointerKey, StoredPointer};

/// How far a write must move a pointer's lapse before the lapse moves
/// ([`lapse_moves`]).
const REFRESH_STEP_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// What each key holds as a group is planned: stored, or as an earlier operation in
/// the group left it (`None`: nothing).
pub type Current = HashMap<PointerKey, Option<Arc<StoredPointer>>>;

/// Plans `jobs` in order against `current` (which must hold every key they touch),
/// leaving in it what each key holds afterwards. Returns the changes to write and
/// each job's results.
pub fn plan(jobs: Vec<Vec<Op>>, current: &mut Current) -> (Vec<Change>, Vec<Vec<OpResult>>) {
    let mut changes = Vec::with_capacity(current.len());
    let results = jobs
        .into_iter()
        .map(|ops| {
            ops.into_iter()
                .map(|op| apply_op(op, current, &mut changes))
                .collect()
        })
        .collect();
    (changes, results)
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
            let lapsed = matches!(op, Op::Purge { .. });
            changes.push(Change::Delete {
                key,
                previous,
                lapsed,
            });
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
