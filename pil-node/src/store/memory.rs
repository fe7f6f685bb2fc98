//! An engine that keeps everything in memory, under one lock. It forgets everything
//! when dropped, so it is for tests: the registry's and the audit log's tests run on
//! it and on RocksDB alike, which keeps [`Store`] an interface rather than RocksDB's
//! shape.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use super::{
    AuditEntry, HeadSigning, LogEntry, LogSize, Moved, ORG_LEN, Op, OpResult, PatientMove,
    PatientRecords, PointerKey, Sealed, Store, StoreError, StoredBlock, StoredOptOut,
    StoredPatient, StoredPointer, Witnessed,
    events::{
        self, EventPage, Followers, Journal, PeerFollow, PeerState, StoredEvent,
        StoredSubscription, SubscriptionId,
    },
    merge_cosignatures, merge_patients,
    model::Change,
    now_nanos,
    plan::{Current, plan},
    tree::{self, Group, Sequencer, TreeReader},
};
use crate::patient_keys::Pseudonym;

/// A new, empty store.
pub fn open() -> Arc<dyn Store> {
    Arc::new(MemoryStore::default())
}

#[derive(Default)]
struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pointers: BTreeMap<PointerKey, Arc<StoredPointer>>,
    blocks: BTreeMap<(Pseudonym, [u8; 16]), StoredBlock>,
    opt_outs: HashMap<Pseudonym, StoredOptOut>,
    records: BTreeMap<u64, Vec<u8>>,
    by_patient: BTreeSet<(Pseudonym, u64)>,
    nodes: HashMap<(u8, u64), [u8; 32]>,
    heads: BTreeMap<u64, String>,
    witnessed: HashMap<String, Witnessed>,
    retained_from: u64,
    sequencer: Sequencer,
    subscriptions: BTreeMap<SubscriptionId, StoredSubscription>,
    events: BTreeMap<(SubscriptionId, u64), StoredEvent>,
    counters: HashMap<SubscriptionId, u64>,
    peer_follows: BTreeMap<(SubscriptionId, String), PeerFollow>,
    routing_key_id: Option<String>,
    routing_tokens: BTreeMap<u64, u64>,
    routing_positions: HashMap<u64, u64>,
    /// Oldest first; complete from `journal_from` (0: since the store was made).
    journal: std::collections::VecDeque<StoredEvent>,
    journal_from: i64,
}

impl TreeReader for State {
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self.nodes.get(&(level, index)).copied())
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.heads.last_key_value().map(|(s, n)| (*s, n.clone())))
    }

    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.latest_head()
    }
}

impl State {
    fn write(&mut self, group: Group) {
        for r in group.records {
            if let Some(p) = r.patient {
                self.by_patient.insert((p, r.index));
            }
            self.records.insert(r.index, r.bytes);
        }
        for (level, index, hash) in group.nodes {
            self.nodes.insert((level, index), hash);
        }
        self.heads.extend(group.heads);
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn engine(&self) -> &'static str {
        "memory"
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        let mut state = self.lock();
        let mut current: Current = ops
            .iter()
            .map(|op| (op.key(), state.pointers.get(&op.key()).cloned()))
            .collect();
        let (changes, mut results) = plan(vec![ops], &mut current);
        let mut followers = Followers::new();
        for (id, sub) in &state.subscriptions {
            for (patient, f) in sub.followers(*id) {
                followers.entry(patient).or_default().push(f);
            }
        }
        let now = now_nanos();
        state.journal.extend(events::journal_for(&changes, now));
        let mut counters = std::mem::take(&mut state.counters);
        for (id, n, event) in events::events_for(&changes, &followers, now, &mut counters) {
            state.events.insert((id, n), event);
        }
        state.counters = counters;
        for change in changes {
            match change {
                Change::Put { key, value, .. } => {
                    state.pointers.insert(key, value);
                }
                Change::Delete { key, .. } => {
                    state.pointers.remove(&key);
                }
            }
        }
        Ok(results.pop().unwrap_or_default())
    }

    async fn patient(&self, patient: Pseudonym) -> Result<PatientRecords, StoreError> {
        let state = self.lock();
        if let Some(o) = state.opt_outs.get(&patient) {
            return Ok(PatientRecords {
                opt_out: Some(o.clone()),
                ..Default::default()
            });
        }
        Ok(PatientRecords {
            opt_out: None,
            blocks: state
                .blocks
                .range((patient, [0; 16])..=(patient, [0xff; 16]))
                .map(|(_, b)| b.clone())
                .collect(),
            pointers: state
                .pointers
                .iter()
                .filter(|(k, _)| k.patient == patient)
                .map(|(k, v)| (*k, StoredPointer::clone(v)))
                .collect(),
        })
    }

    async fn get_many(
        &self,
        keys: Vec<PointerKey>,
    ) -> Result<Vec<Option<StoredPointer>>, StoreError> {
        let state = self.lock();
        Ok(keys
            .iter()
            .map(|k| state.pointers.get(k).map(|v| StoredPointer::clone(v)))
            .collect())
    }

    async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: [u8; ORG_LEN],
    ) -> Result<Vec<PointerKey>, StoreError> {
        let state = self.lock();
        Ok(state
            .pointers
            .keys()
            .filter(|k| k.patient == patient && k.org == org)
            .copied()
            .collect())
    }

    async fn org_keys(
        &self,
        org: [u8; ORG_LEN],
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, StoreError> {
        let order = |k: &PointerKey| (k.org, k.patient, k.ident);
        let state = self.lock();
        let mut keys: Vec<PointerKey> = state
            .pointers
            .keys()
            .filter(|k| k.org == org && after.is_none_or(|a| order(k) > order(&a)))
            .copied()
            .collect();
        keys.sort_by_key(order);
        keys.truncate(limit);
        Ok(keys)
    }

    async fn expired(&self, now: i64, limit: usize) -> Result<Vec<PointerKey>, StoreError> {
        let state = self.lock();
        let mut due: Vec<(i64, PointerKey)> = state
            .pointers
            .iter()
            .filter_map(|(k, v)| {
                v.effective_expiry()
                    .filter(|at| *at <= now)
                    .map(|at| (at, *k))
            })
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, k)| k).collect())
    }

    async fn patients_after(
        &self,
        after: Option<Pseudonym>,
        limit: usize,
    ) -> Result<Vec<StoredPatient>, StoreError> {
        let state = self.lock();
        let later = |p: &Pseudonym| after.is_none_or(|a| *p > a);
        let mut found: Vec<StoredPatient> = Vec::new();
        for (k, v) in &state.pointers {
            if later(&k.patient) {
                found.push(StoredPatient {
                    pseudonym: k.patient,
                    sealed: v.sealed(),
                });
            }
        }
        let sealed = |s: &[u8]| (!s.is_empty()).then(|| Sealed::Current(s.to_vec()));
        for ((p, _), b) in &state.blocks {
            if later(p) {
                found.push(StoredPatient {
                    pseudonym: *p,
                    sealed: sealed(&b.sealed_patient),
                });
            }
        }
        for (p, o) in &state.opt_outs {
            if later(p) {
                found.push(StoredPatient {
                    pseudonym: *p,
                    sealed: sealed(&o.sealed_patient),
                });
            }
        }
        Ok(merge_patients(vec![found], limit))
    }

    async fn move_patients(&self, moves: Vec<PatientMove>) -> Result<Moved, StoreError> {
        let mut state = self.lock();
        let mut moved = Moved::default();
        for m in moves {
            let keys: Vec<PointerKey> = state
                .pointers
                .keys()
                .filter(|k| k.patient == m.from)
                .copied()
                .collect();
            for key in keys {
                let value = state.pointers.remove(&key).expect("listed above");
                let to = PointerKey {
                    patient: m.to,
                    ..key
                };
                state
                    .pointers
                    .entry(to)
                    .or_insert_with(|| Arc::new(value.resealed(&m.sealed)));
                moved.pointers += 1;
            }
            let ids: Vec<[u8; 16]> = state
                .blocks
                .range((m.from, [0; 16])..=(m.from, [0xff; 16]))
                .map(|((_, id), _)| *id)
                .collect();
            for id in ids {
                let mut block = state.blocks.remove(&(m.from, id)).expect("listed above");
                block.sealed_patient = m.sealed.clone();
                state.blocks.entry((m.to, id)).or_insert(block);
                moved.protections += 1;
            }
            if let Some(mut o) = state.opt_outs.remove(&m.from) {
                o.sealed_patient = m.sealed.clone();
                state.opt_outs.entry(m.to).or_insert(o);
                moved.protections += 1;
            }
        }
        Ok(moved)
    }

    async fn put_block(
        &self,
        patient: Pseudonym,
        id: [u8; 16],
        block: StoredBlock,
    ) -> Result<(), StoreError> {
        self.lock().blocks.insert((patient, id), block);
        Ok(())
    }

    async fn delete_block(&self, patient: Pseudonym, id: [u8; 16]) -> Result<bool, StoreError> {
        Ok(self.lock().blocks.remove(&(patient, id)).is_some())
    }

    async fn blocks(&self, patient: Pseudonym) -> Result<Vec<([u8; 16], StoredBlock)>, StoreError> {
        Ok(self
            .lock()
            .blocks
            .range((patient, [0; 16])..=(patient, [0xff; 16]))
            .map(|((_, id), b)| (*id, b.clone()))
            .collect())
    }

    async fn set_opt_out(
        &self,
        patient: Pseudonym,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, StoreError> {
        let mut state = self.lock();
        Ok(match opt_out {
            Some(o) => state.opt_outs.insert(patient, o),
            None => state.opt_outs.remove(&patient),
        }
        .is_some())
    }

    async fn opt_out(&self, patient: Pseudonym) -> Result<Option<StoredOptOut>, StoreError> {
        Ok(self.lock().opt_outs.get(&patient).cloned())
    }

    async fn audit_append(&self, mut entry: Box<dyn AuditEntry>) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let mut group = Group::default();
        let index = state.sequencer.append(&mut *entry, &mut group)?;
        state.write(group);
        Ok(index)
    }

    async fn audit_sign(
        &self,
        signer: Arc<dyn HeadSigning>,
    ) -> Result<Option<(u64, String)>, StoreError> {
        let mut state = self.lock();
        let mut group = Group::default();
        state.sequencer.sign(&*signer, &mut group)?;
        state.write(group);
        state.latest_head()
    }

    async fn audit_size(&self) -> Result<LogSize, StoreError> {
        let state = self.lock();
        Ok(LogSize {
            size: state.sequencer.size(),
            signed: state.sequencer.signed(),
        })
    }

    async fn audit_record(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().records.get(&index).cloned())
    }

    async fn audit_records(
        &self,
        from: u64,
        ascending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let state = self.lock();
        let pick = |(i, b): (&u64, &Vec<u8>)| (*i, b.clone());
        Ok(if ascending {
            state.records.range(from..).take(limit).map(pick).collect()
        } else {
            state
                .records
                .range(..from)
                .rev()
                .take(limit)
                .map(pick)
                .collect()
        })
    }

    async fn audit_patient_indexes(
        &self,
        patient: Pseudonym,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .lock()
            .by_patient
            .range((patient, 0)..(patient, before))
            .rev()
            .take(limit)
            .map(|(_, i)| *i)
            .collect())
    }

    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<LogEntry>, StoreError> {
        let state = self.lock();
        (start..end)
            .map(|index| {
                let leaf_hash = state.node(0, index)?.ok_or_else(|| {
                    StoreError::Tree(format!("no leaf hash stored for record {index}"))
                })?;
                Ok(LogEntry {
                    index,
                    record: state.records.get(&index).cloned(),
                    leaf_hash,
                })
            })
            .collect()
    }

    async fn audit_heads_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        Ok(self
            .lock()
            .heads
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(s, n)| (*s, n.clone()))
            .collect())
    }

    async fn audit_latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.lock().latest_head()
    }

    async fn audit_add_cosignatures(&self, size: u64, lines: String) -> Result<(), StoreError> {
        let mut state = self.lock();
        let note = state
            .heads
            .get(&size)
            .ok_or_else(|| StoreError::Tree(format!("no signed head of size {size}")))?;
        let merged = merge_cosignatures(note, &lines)?;
        state.heads.insert(size, merged);
        Ok(())
    }

    async fn witnessed(&self, origin: String) -> Result<Option<Witnessed>, StoreError> {
        Ok(self.lock().witnessed.get(&origin).cloned())
    }

    async fn witness_advance(
        &self,
        origin: String,
        old: u64,
        new: Witnessed,
    ) -> Result<Result<(), u64>, StoreError> {
        let mut state = self.lock();
        let stored = state.witnessed.get(&origin).map_or(0, |w| w.size);
        if stored != old || new.size < old {
            return Ok(Err(stored));
        }
        state.witnessed.insert(origin, new);
        Ok(Ok(()))
    }

    async fn audit_inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        tree::inclusion_proof(&*self.lock(), index, size)
    }

    async fn audit_consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        tree::consistency_proof(&*self.lock(), old, new)
    }

    async fn audit_retained_from(&self) -> Result<u64, StoreError> {
        Ok(self.lock().retained_from)
    }

    async fn audit_drop_contents(
        &self,
        upto: u64,
        patients: Vec<(u64, Pseudonym)>,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if upto <= state.retained_from {
            return Ok(());
        }
        let kept = state.records.split_off(&upto);
        state.records = kept;
        for (index, p) in patients {
            state.by_patient.remove(&(p, index));
        }
        state.retained_from = upto;
        Ok(())
    }

    async fn put_subscription(
        &self,
        id: SubscriptionId,
        subscription: StoredSubscription,
    ) -> Result<(), StoreError> {
        self.lock().subscriptions.insert(id, subscription);
        Ok(())
    }

    async fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<Option<StoredSubscription>, StoreError> {
        Ok(self.lock().subscriptions.get(&id).cloned())
    }

    async fn subscriptions_of(
        &self,
        owner: String,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        Ok(self
            .lock()
            .subscriptions
            .iter()
            .filter(|(_, s)| s.owner == owner)
            .map(|(id, s)| (*id, s.clone()))
            .collect())
    }

    async fn events(
        &self,
        id: SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let state = self.lock();
        let mut range = state.events.range((id, 0)..=(id, u64::MAX));
        let oldest = range.next().map(|((_, n), _)| *n);
        let last = state.counters.get(&id).copied().unwrap_or(0);
        Ok(EventPage {
            events: state
                .events
                .range((id, after.saturating_add(1))..=(id, u64::MAX))
                .take(limit)
                .map(|((_, n), e)| (*n, e.clone()))
                .collect(),
            last,
            first_kept: events::first_kept(oldest, last),
        })
    }

    async fn events_due(&self, before: i64) -> Result<bool, StoreError> {
        Ok(self.lock().events.values().any(|e| e.at < before))
    }

    async fn drop_events(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let mut state = self.lock();
        let old: Vec<(SubscriptionId, u64)> = state
            .events
            .iter()
            .filter(|(_, e)| e.at < before)
            .take(limit)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            state.events.remove(k);
        }
        Ok(old.len())
    }

    async fn journal(&self, patients: Vec<Pseudonym>, since: i64) -> Result<Journal, StoreError> {
        let state = self.lock();
        Ok(Journal {
            events: state
                .journal
                .iter()
                .filter(|e| e.at >= since && e.patient().is_some_and(|p| patients.contains(&p)))
                .cloned()
                .collect(),
            complete_from: state.journal_from,
        })
    }

    async fn drop_journal(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let mut state = self.lock();
        let mut dropped = 0;
        while dropped < limit && state.journal.front().is_some_and(|e| e.at < before) {
            let e = state.journal.pop_front().expect("a front was seen");
            state.journal_from = state.journal_from.max(e.at + 1);
            dropped += 1;
        }
        if dropped < limit {
            state.journal_from = state.journal_from.max(before);
        }
        Ok(dropped)
    }

    async fn all_subscriptions(
        &self,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        Ok(self
            .lock()
            .subscriptions
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect())
    }

    async fn peer_follows(&self, id: SubscriptionId) -> Result<Vec<PeerFollow>, StoreError> {
        Ok(self
            .lock()
            .peer_follows
            .range((id, String::new())..)
            .take_while(|((i, _), _)| *i == id)
            .map(|(_, f)| f.clone())
            .collect())
    }

    async fn set_peer_follow(
        &self,
        id: SubscriptionId,
        region: String,
        state: PeerState,
        detail: String,
    ) -> Result<(), StoreError> {
        let mut s = self.lock();
        let f = s
            .peer_follows
            .entry((id, region.clone()))
            .or_insert_with(|| PeerFollow {
                region,
                ..Default::default()
            });
        f.state = state as i32;
        f.detail = detail;
        Ok(())
    }

    async fn collect_events(
        &self,
        id: SubscriptionId,
        region: String,
        from: u64,
        to: u64,
        events: Vec<StoredEvent>,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock();
        let position = s
            .peer_follows
            .get(&(id, region.clone()))
            .map(|f| f.position)
            .unwrap_or(0);
        if position != from {
            return Ok(false);
        }
        let mut n = s.counters.get(&id).copied().unwrap_or(0);
        for event in events {
            n += 1;
            s.events.insert((id, n), event);
        }
        s.counters.insert(id, n);
        s.peer_follows
            .entry((id, region.clone()))
            .or_insert_with(|| PeerFollow {
                region,
                ..Default::default()
            })
            .position = to;
        Ok(true)
    }

    async fn routing_key_id(&self) -> Result<Option<String>, StoreError> {
        Ok(self.lock().routing_key_id.clone())
    }

    async fn set_routing_key(&self, key_id: String, clear: bool) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.routing_key_id = Some(key_id);
        if clear {
            s.routing_tokens.clear();
            s.routing_positions.clear();
        }
        Ok(())
    }

    async fn add_routing_tokens(&self, key_id: String, tokens: Vec<u64>) -> Result<(), StoreError> {
        let mut s = self.lock();
        super::routing_key_matches(s.routing_key_id.as_deref(), &key_id)?;
        for token in tokens {
            if s.routing_positions.contains_key(&token) {
                continue;
            }
            let next = s.routing_tokens.last_key_value().map_or(1, |(p, _)| p + 1);
            s.routing_tokens.insert(next, token);
            s.routing_positions.insert(token, next);
        }
        Ok(())
    }

    async fn routing_tokens(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let s = self.lock();
        Ok(s.routing_tokens
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(p, t)| (*p, *t))
            .collect())
    }

    async fn claim_once(&self, _key: String, _until: i64) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn forget_claims(&self, _now: i64) -> Result<(), StoreError> {
        Ok(())
    }
}
