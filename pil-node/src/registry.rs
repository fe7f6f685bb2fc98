//! The pointer registry: what a node holds and how it is read and changed.
//!
//! Sits between the service layer (which authenticates and authorizes) and the store
//! (`store/`, whichever engine). Turns validated pointers into pseudonymized, sealed
//! records and back.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use pil_proto::ident::{OrgNumber, PatientId};
use sha2::{Digest, Sha256};

use crate::{
    in_force::InForce,
    patient_keys::{KeyError, PatientKeys, Pseudonym},
    pointer::{EndpointRef, NewPointer},
    store::{
        EventPage, FollowedPatient, IDENT_LEN, ORG_LEN, Op, OpResult, PatientMove, PatientRecords,
        PeerFollow, PeerState, PointerKey, Store, StoreError, StoredBlock, StoredEvent,
        StoredOptOut, StoredPointer, StoredSubscription, SubscriptionId,
    },
};

/// What must happen before a write to a patient is acknowledged, so that every other
/// region finds it: the region's routing summary must cover the patient. Set by the
/// node when it publishes a summary ([`Registry::set_coverage`]).
#[async_trait::async_trait]
pub trait Coverage: Send + Sync {
    /// Whether the patient under this pseudonym is covered already: cheap, so asked
    /// of every write.
    fn covers(&self, pseudonym: &Pseudonym) -> bool;
    /// Covers these patients, durably.
    async fn cover(&self, patients: Vec<(Pseudonym, PatientId)>) -> Result<(), StoreError>;
}

/// A write's turn: held shared by every write, alone by a change of the pseudonym keys
/// and by each step of re-keying, so that the keys a write read stay where they are
/// until it is done.
pub type WriteTurn = tokio::sync::OwnedRwLockReadGuard<()>;

/// Pointer lifetime until the legal configuration sets one.
const DEFAULT_LIFETIME_DAYS: u32 = 365;
pub const NANOS_PER_DAY: i64 = 24 * 3600 * 1_000_000_000;

/// The pointer lifetime in force, in days; changed by reloads, applied to pointers
/// written from then on.
#[derive(Clone)]
pub struct PointerLifetime(Arc<AtomicU32>);

impl PointerLifetime {
    pub fn set_days(&self, days: u32) {
        self.0.store(days.max(1), Ordering::Relaxed);
    }

    pub fn days(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a registry operation failed. None of these is the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(
        "the new pseudonym key ring no longer holds the key in force ({0}): patients stored \
         under it could not be found; keep it as an earlier key (`pil-node pseudonym-key rotate` \
         does)"
    )]
    KeyDropped(String),
}

/// The outcome of one upsert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Inserted,
    Updated,
    Unchanged,
}

/// Filters of a lookup. Empty lists mean "all".
#[derive(Debug, Clone, Default)]
pub struct LookupFilter {
    pub categories: Vec<String>,
    pub organizations: Vec<String>,
}

/// A pointer as the registry holds it, with the patient it is about in the clear.
#[derive(Debug, Clone, PartialEq)]
pub struct Pointer {
    pub key: PointerKey,
    pub value: StoredPointer,
    /// The patient identifier's FHIR system and value.
    pub patient: (String, String),
    /// The region holding it.
    pub region: String,
}

/// A patient as a lookup sees them.
pub enum PatientView {
    /// The patient has opted out of PIL: nothing is shown.
    OptedOut,
    /// The patient's blocks, and the live pointers matching the filter.
    Visible {
        blocks: Vec<StoredBlock>,
        pointers: Vec<Pointer>,
    },
}

/// A node's registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// A registry handle that does not keep the store open.
#[derive(Clone)]
pub struct WeakRegistry(std::sync::Weak<Inner>);

impl WeakRegistry {
    pub fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}

struct Inner {
    store: Arc<dyn Store>,
    keys: InForce<PatientKeys>,
    turns: Arc<tokio::sync::RwLock<()>>,
    /// Woken when the pseudonym keys change, for the re-keying task.
    keys_changed: tokio::sync::Notify,
    region: String,
    lifetime: PointerLifetime,
    /// Woken after every write, for event streams waiting for new events.
    written: Arc<tokio::sync::Notify>,
    coverage: std::sync::OnceLock<Arc<dyn Coverage>>,
}

impl Registry {
    pub fn open(store: Arc<dyn Store>, keys: PatientKeys, region: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                keys: InForce::new(keys),
                turns: Arc::new(tokio::sync::RwLock::new(())),
                keys_changed: tokio::sync::Notify::new(),
                region: region.into(),
                lifetime: PointerLifetime(Arc::new(AtomicU32::new(DEFAULT_LIFETIME_DAYS))),
                written: Arc::new(tokio::sync::Notify::new()),
                coverage: std::sync::OnceLock::new(),
            }),
        }
    }

    /// What every write covers its patients with from now on (set once).
    pub fn set_coverage(&self, coverage: Arc<dyn Coverage>) {
        if self.inner.coverage.set(coverage).is_err() {
            tracing::warn!("the registry's coverage was set twice; the first is kept");
        }
    }

    /// Covers the patients of a write, where they are not covered yet: before the
    /// write, so nothing is acknowledged that another region could miss.
    async fn cover(
        &self,
        patients: impl IntoIterator<Item = (Pseudonym, PatientId)>,
    ) -> Result<(), RegistryError> {
        let Some(coverage) = self.inner.coverage.get() else {
            return Ok(());
        };
        let missing: Vec<(Pseudonym, PatientId)> = patients
            .into_iter()
            .filter(|(p, _)| !coverage.covers(p))
            .collect();
        if !missing.is_empty() {
            coverage.cover(missing).await?;
        }
        Ok(())
    }

    /// How long a pointer lives without a refresh by its holder. The handle does not
    /// keep the registry open.
    pub fn pointer_lifetime(&self) -> PointerLifetime {
        self.inner.lifetime.clone()
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    pub fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }

    /// The patient keys in force.
    pub fn keys(&self) -> Arc<PatientKeys> {
        self.inner.keys.get()
    }

    /// The patient's pseudonym under the key in force.
    pub fn pseudonym(&self, patient: &PatientId) -> Pseudonym {
        self.keys().pseudonym(patient)
    }

    /// The patient's pseudonyms under every key of the ring, where audit records about
    /// them may be filed.
    pub fn audit_pseudonyms(&self, patient: &PatientId) -> Vec<Pseudonym> {
        self.keys().every_pseudonym(patient)
    }

    /// Waits for a turn to write (see [`WriteTurn`]).
    pub async fn write_turn(&self) -> WriteTurn {
        self.inner.turns.clone().read_owned().await
    }

    /// Waits for the store to be the caller's alone: no write runs until it is dropped.
    pub async fn sole_turn(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.inner.turns.clone().write_owned().await
    }

    /// Puts new pseudonym keys in force once no write runs, after making every
    /// subscription follow its patients under them. Refused when the ring no longer
    /// reads the registry under the key in force: what is stored under it would be lost.
    pub async fn replace_keys(&self, keys: PatientKeys) -> Result<(), RegistryError> {
        let _alone = self.sole_turn().await;
        let old = self.keys();
        let kept = keys.ids().current == old.ids().current
            || keys.ids().earlier.contains(&old.ids().current)
            || keys.ids().staged.contains(&old.ids().current);
        if !kept {
            return Err(RegistryError::KeyDropped(old.ids().current.clone()));
        }
        self.follow_under(&keys).await?;
        self.inner.keys.set(keys);
        self.inner.keys_changed.notify_waiters();
        Ok(())
    }

    /// Woken when the pseudonym keys change.
    pub fn keys_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.keys_changed.notified()
    }

    /// Makes every subscription follow its patients under `keys`: the pseudonym in
    /// force, and every other pseudonym the ring reads, so that a change stored under
    /// either makes its event. Run before the keys come into force, and at start.
    pub async fn follow_under(&self, keys: &PatientKeys) -> Result<usize, RegistryError> {
        let mut changed = 0;
        for (id, mut sub) in self.inner.store.all_subscriptions().await? {
            let mut touched = false;
            for f in &mut sub.patients {
                let Ok(stored) = Pseudonym::try_from(f.pseudonym.as_slice()) else {
                    continue;
                };
                let Ok(patient) = self.identifier(&f.sealed, &stored) else {
                    continue;
                };
                let fresh = followed_under(keys, &patient, f.stopped);
                let mut former = fresh.former.clone();
                // Pseudonyms under keys no longer in the ring still name stored events.
                for old in std::iter::once(&f.pseudonym).chain(&f.former) {
                    if *old != fresh.pseudonym && !former.contains(old) {
                        former.push(old.clone());
                    }
                }
                if f.pseudonym != fresh.pseudonym || f.former != former {
                    f.pseudonym = fresh.pseudonym;
                    f.sealed = fresh.sealed;
                    f.former = former;
                    touched = true;
                }
            }
            if touched {
                self.inner.store.put_subscription(id, sub).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// A page of the patients stored, for re-keying.
    pub async fn stored_patients(
        &self,
        after: Option<Pseudonym>,
        limit: usize,
    ) -> Result<Vec<crate::store::StoredPatient>, RegistryError> {
        Ok(self.inner.store.patients_after(after, limit).await?)
    }

    /// Moves patients to new pseudonyms (re-keying holds the store alone meanwhile).
    pub async fn move_patients(
        &self,
        moves: Vec<PatientMove>,
    ) -> Result<crate::store::Moved, RegistryError> {
        Ok(self.inner.store.move_patients(moves).await?)
    }

    /// A sealed identifier, opened and parsed.
    fn identifier(&self, sealed: &[u8], pseudonym: &Pseudonym) -> Result<PatientId, RegistryError> {
        let (system, value) = self.keys().open(sealed, pseudonym)?;
        PatientId::parse(&system, &value, true).map_err(|_| RegistryError::Keys(KeyError::Open))
    }

    /// A patient as a subscription made now follows them.
    pub fn follow(&self, patient: &PatientId, stopped: bool) -> FollowedPatient {
        followed_under(&self.keys(), patient, stopped)
    }

    /// Moves the patients' entries under other keys of the ring to the key in force,
    /// before a write to them: a write then always finds what it replaces.
    async fn move_first(
        &self,
        keys: &PatientKeys,
        patients: &[PatientId],
    ) -> Result<(), RegistryError> {
        if !keys.has_others() || patients.is_empty() {
            return Ok(());
        }
        let mut moves = Vec::new();
        for patient in patients {
            let to = keys.pseudonym(patient);
            let sealed = keys.seal(patient, &to);
            for from in keys.other_pseudonyms(patient) {
                moves.push(PatientMove {
                    from,
                    to,
                    sealed: sealed.clone(),
                });
            }
        }
        self.inner.store.move_patients(moves).await?;
        Ok(())
    }

    /// The patient's pseudonyms the registry is read under: other keys' first, the
    /// one in force last. Moves go from the others to the one in force, so reading in
    /// this order never misses an entry that moves in between.
    fn read_pseudonyms(&self, current: Pseudonym, patient: &PatientId) -> Vec<Pseudonym> {
        let keys = self.keys();
        let mut out = keys.other_pseudonyms(patient);
        out.push(current);
        out
    }

    /// Everything stored about a patient under any key the registry is read under.
    async fn records(
        &self,
        current: Pseudonym,
        patient: &PatientId,
    ) -> Result<PatientRecords, RegistryError> {
        let store = &self.inner.store;
        let pseudonyms = self.read_pseudonyms(current, patient);
        if pseudonyms.len() == 1 {
            return Ok(store.patient(current).await?);
        }
        let mut all = PatientRecords::default();
        for p in pseudonyms {
            let found = store.patient(p).await?;
            if found.opt_out.is_some() {
                return Ok(PatientRecords {
                    opt_out: found.opt_out,
                    ..Default::default()
                });
            }
            for b in found.blocks {
                if !all.blocks.contains(&b) {
                    all.blocks.push(b);
                }
            }
            for (key, value) in found.pointers {
                // Read under both while it moved: the same pointer, once.
                let same = all
                    .pointers
                    .iter()
                    .position(|(k, _)| k.org == key.org && k.ident == key.ident);
                match same {
                    Some(i) if all.pointers[i].1.last_updated >= value.last_updated => {}
                    Some(i) => all.pointers[i] = (key, value),
                    None => all.pointers.push((key, value)),
                }
            }
        }
        Ok(all)
    }

    /// Where a pointer with this identity lives.
    pub fn key_for(&self, patient: &Pseudonym, endpoint: &EndpointRef) -> PointerKey {
        PointerKey {
            patient: *patient,
            org: org_bytes(&endpoint.org),
            ident: endpoint_ident(endpoint),
        }
    }

    /// Prepares a validated pointer for the writer: pseudonymized and sealed. CPU-bound;
    /// call from a blocking context for large batches.
    pub fn prepare(&self, p: &NewPointer, now: i64) -> Op {
        let keys = self.keys();
        let pseudonym = keys.pseudonym(&p.patient);
        let key = self.key_for(&pseudonym, &p.endpoint);
        let value = StoredPointer {
            sealed_patient: keys.seal(&p.patient, &pseudonym),
            sealed_patient_format1: Vec::new(),
            sub_unit: p
                .endpoint
                .sub_unit
                .as_ref()
                .map(|o| o.as_str().to_string())
                .unwrap_or_default(),
            base_url: p.endpoint.base_url.clone(),
            api_kind: p.endpoint.api_kind,
            categories: p.categories.clone(),
            period_start: p.period_start,
            period_end: p.period_end,
            last_updated: p.last_updated.unwrap_or(now),
            expires_at: p.expires_at,
            holder_name: p.holder_name.clone(),
            lapses_at: Some(
                now.saturating_add(i64::from(self.inner.lifetime.days()) * NANOS_PER_DAY),
            ),
        };
        Op::Upsert {
            key,
            value,
            keep_last_updated: p.last_updated.is_none(),
        }
    }

    /// Inserts or replaces one pointer; returns what happened and the stored pointer.
    pub async fn upsert(&self, p: NewPointer) -> Result<(Outcome, Pointer), RegistryError> {
        let turn = self.write_turn().await;
        let op = self.prepare(&p, now_nanos());
        let key = match &op {
            Op::Upsert { key, .. } => *key,
            _ => unreachable!("prepare makes upserts"),
        };
        let result = self.apply_during(&turn, vec![op]).await?.pop();
        let (outcome, stored) = match result {
            Some(OpResult::Inserted(s)) => (Outcome::Inserted, s),
            Some(OpResult::Updated(s)) => (Outcome::Updated, s),
            Some(OpResult::Unchanged(s)) => (Outcome::Unchanged, s),
            other => {
                return Err(RegistryError::Task(format!(
                    "unexpected upsert result {other:?}"
                )));
            }
        };
        let patient = (
            p.patient.system().to_string(),
            p.patient.value().to_string(),
        );
        Ok((
            outcome,
            self.pointer(key, StoredPointer::clone(&stored), patient),
        ))
    }

    /// Removes one pointer; true when it existed.
    pub async fn delete(
        &self,
        patient: &PatientId,
        endpoint: &EndpointRef,
    ) -> Result<bool, RegistryError> {
        let turn = self.write_turn().await;
        let keys = self.keys();
        // A delete carries no identifier for `apply_during` to move by.
        self.move_first(&keys, std::slice::from_ref(patient))
            .await?;
        let key = self.key_for(&keys.pseudonym(patient), endpoint);
        let results = self.apply_during(&turn, vec![Op::Delete { key }]).await?;
        Ok(matches!(results.first(), Some(OpResult::Deleted)))
    }

    /// Applies prepared operations atomically (one durable write).
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, RegistryError> {
        let turn = self.write_turn().await;
        self.apply_during(&turn, ops).await
    }

    /// [`Registry::apply`] in a turn the caller holds (it read the keys it deletes in
    /// the same turn). While the ring holds other keys, upserts prepared under keys
    /// since replaced are moved to the key in force, and their patients' entries under
    /// other keys moved first.
    pub async fn apply_during(
        &self,
        _turn: &WriteTurn,
        mut ops: Vec<Op>,
    ) -> Result<Vec<OpResult>, RegistryError> {
        let keys = self.keys();
        if keys.has_others() {
            let mut patients: std::collections::BTreeMap<Pseudonym, PatientId> = Default::default();
            for op in &mut ops {
                let Op::Upsert { key, value, .. } = op else {
                    continue;
                };
                let patient = match value.sealed() {
                    Some(crate::store::Sealed::Current(sealed)) => {
                        self.identifier(&sealed, &key.patient)?
                    }
                    _ => continue,
                };
                let current = keys.pseudonym(&patient);
                if current != key.patient {
                    key.patient = current;
                    value.sealed_patient = keys.seal(&patient, &current);
                }
                patients.insert(current, patient);
            }
            let patients: Vec<PatientId> = patients.into_values().collect();
            self.move_first(&keys, &patients).await?;
        }
        if let Some(coverage) = self.inner.coverage.get() {
            let mut uncovered = Vec::new();
            for op in &ops {
                let Op::Upsert { key, value, .. } = op else {
                    continue;
                };
                if coverage.covers(&key.patient) {
                    continue;
                }
                if let Some(crate::store::Sealed::Current(sealed)) = value.sealed() {
                    uncovered.push((key.patient, self.identifier(&sealed, &key.patient)?));
                }
            }
            self.cover(uncovered).await?;
        }
        let results = self.inner.store.apply(ops).await?;
        self.inner.written.notify_waiters();
        Ok(results)
    }

    /// Notified after every write through this node (writes through other nodes of a
    /// region on one database are not seen: event streams also poll).
    pub fn writes(&self) -> Arc<tokio::sync::Notify> {
        self.inner.written.clone()
    }

    /// A sealed identifier's FHIR system and value.
    pub fn open_sealed(
        &self,
        sealed: &[u8],
        pseudonym: &Pseudonym,
    ) -> Result<(String, String), RegistryError> {
        Ok(self.keys().open(sealed, pseudonym)?)
    }

    /// A stored pointer of `patient` as the registry shows it.
    pub fn pointer_of(
        &self,
        key: PointerKey,
        value: StoredPointer,
        patient: (String, String),
    ) -> Pointer {
        self.pointer(key, value, patient)
    }

    pub async fn put_subscription(
        &self,
        id: SubscriptionId,
        subscription: StoredSubscription,
    ) -> Result<(), RegistryError> {
        Ok(self.inner.store.put_subscription(id, subscription).await?)
    }

    pub async fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<Option<StoredSubscription>, RegistryError> {
        Ok(self.inner.store.subscription(id).await?)
    }

    pub async fn subscriptions_of(
        &self,
        owner: &str,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, RegistryError> {
        Ok(self.inner.store.subscriptions_of(owner.to_string()).await?)
    }

    pub async fn events(
        &self,
        id: SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, RegistryError> {
        Ok(self.inner.store.events(id, after, limit).await?)
    }

    pub async fn all_subscriptions(
        &self,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, RegistryError> {
        Ok(self.inner.store.all_subscriptions().await?)
    }

    pub async fn peer_follows(&self, id: SubscriptionId) -> Result<Vec<PeerFollow>, RegistryError> {
        Ok(self.inner.store.peer_follows(id).await?)
    }

    pub async fn set_peer_follow(
        &self,
        id: SubscriptionId,
        region: &str,
        state: PeerState,
        detail: String,
    ) -> Result<(), RegistryError> {
        Ok(self
            .inner
            .store
            .set_peer_follow(id, region.to_string(), state, detail)
            .await?)
    }

    /// Stores events collected from `region` (see [`crate::store::Store::collect_events`]);
    /// streams of the subscription are woken as by a write.
    pub async fn collect_events(
        &self,
        id: SubscriptionId,
        region: &str,
        from: u64,
        to: u64,
        events: Vec<StoredEvent>,
    ) -> Result<bool, RegistryError> {
        let stored = self
            .inner
            .store
            .collect_events(id, region.to_string(), from, to, events)
            .await?;
        self.inner.written.notify_waiters();
        Ok(stored)
    }

    /// Whether any event is older than `days`.
    pub async fn events_due(&self, days: u32) -> Result<bool, RegistryError> {
        let before = now_nanos() - i64::from(days) * NANOS_PER_DAY;
        Ok(self.inner.store.events_due(before).await?)
    }

    /// Whether any pointer's expiry or lapse has passed.
    pub async fn purge_due(&self) -> Result<bool, RegistryError> {
        Ok(!self.inner.store.expired(now_nanos(), 1).await?.is_empty())
    }

    /// Drops events older than `days`; returns how many.
    pub async fn drop_events_older_than(&self, days: u32) -> Result<usize, RegistryError> {
        let before = now_nanos() - i64::from(days) * NANOS_PER_DAY;
        drop_paged(|page| self.inner.store.drop_events(before, page)).await
    }

    /// What a lookup reads about one patient: the opt-out, and unless there is one,
    /// the blocks and the live pointers.
    pub async fn patient_view(
        &self,
        patient: &PatientId,
        filter: &LookupFilter,
    ) -> Result<PatientView, RegistryError> {
        self.patient_view_of(self.pseudonym(patient), patient, filter)
            .await
    }

    /// [`Registry::patient_view`] for a patient whose pseudonym the caller already
    /// computed (a lookup computes it once, for its audit record and its read).
    pub async fn patient_view_of(
        &self,
        pseudonym: Pseudonym,
        patient: &PatientId,
        filter: &LookupFilter,
    ) -> Result<PatientView, RegistryError> {
        let records = self.records(pseudonym, patient).await?;
        if records.opt_out.is_some() {
            return Ok(PatientView::OptedOut);
        }
        Ok(PatientView::Visible {
            blocks: records.blocks,
            pointers: self.live_pointers(records.pointers, patient, filter),
        })
    }

    /// The live pointers among `stored` that match the filter, newest first.
    fn live_pointers(
        &self,
        stored: Vec<(PointerKey, StoredPointer)>,
        patient: &PatientId,
        filter: &LookupFilter,
    ) -> Vec<Pointer> {
        let patient = (patient.system().to_string(), patient.value().to_string());
        let now = now_nanos();
        let mut found: Vec<(PointerKey, StoredPointer)> = stored
            .into_iter()
            .filter(|(key, p)| {
                p.effective_expiry().is_none_or(|at| at > now)
                    && (filter.organizations.is_empty()
                        || filter.organizations.iter().any(|o| o.as_bytes() == key.org))
                    && (filter.categories.is_empty()
                        || p.categories.iter().any(|c| filter.categories.contains(c)))
            })
            .collect();
        found.sort_by(|a, b| {
            b.1.last_updated
                .cmp(&a.1.last_updated)
                .then_with(|| a.0.cmp(&b.0))
        });
        found
            .into_iter()
            .map(|(k, p)| self.pointer(k, p, patient.clone()))
            .collect()
    }

    /// Keys of an organization's pointers for one patient (replace-mode sync).
    pub async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: OrgNumber,
    ) -> Result<Vec<PointerKey>, RegistryError> {
        Ok(self
            .inner
            .store
            .patient_org_keys(patient, org_bytes(&org))
            .await?)
    }

    /// A page of an organization's pointer keys, after `after`.
    pub async fn org_keys(
        &self,
        org: OrgNumber,
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, RegistryError> {
        Ok(self
            .inner
            .store
            .org_keys(org_bytes(&org), after, limit)
            .await?)
    }

    /// A page of an organization's pointers with their plain identifiers, for export.
    /// Returns the last key read, to continue from.
    pub async fn export_page(
        &self,
        org: OrgNumber,
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<(Vec<Pointer>, Option<PointerKey>), RegistryError> {
        let store = &self.inner.store;
        let keys = store.org_keys(org_bytes(&org), after, limit).await?;
        let values = store.get_many(keys.clone()).await?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(values) {
            // A pointer removed between the two reads is simply not exported.
            let Some(value) = value else { continue };
            let keys = self.keys();
            let (system, value_id) = if value.sealed_patient.is_empty() {
                keys.open_format1(&value.sealed_patient_format1, &key.patient)?
            } else {
                keys.open(&value.sealed_patient, &key.patient)?
            };
            out.push(self.pointer(*key, value, (system, value_id)));
        }
        Ok((out, keys.last().copied()))
    }

    /// Records a DPoP proof as used for the whole region (see [`Store::claim_once`]);
    /// false when a node of the region accepted it already.
    pub async fn claim_proof(&self, key: String, until: i64) -> Result<bool, RegistryError> {
        Ok(self.inner.store.claim_once(key, until).await?)
    }

    /// Forgets DPoP proofs past their window (they can no longer be replayed).
    pub async fn forget_used_proofs(&self) -> Result<(), RegistryError> {
        Ok(self
            .inner
            .store
            .forget_claims(now_nanos() / 1_000_000_000)
            .await?)
    }

    /// Removes pointers whose expiry has passed; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, RegistryError> {
        const PAGE: usize = 1000;
        let mut purged = 0;
        loop {
            let now = now_nanos();
            let due = self.inner.store.expired(now, PAGE).await?;
            if due.is_empty() {
                return Ok(purged);
            }
            let n = due.len();
            let ops = due.into_iter().map(|key| Op::Purge { key, now }).collect();
            purged += self
                .apply(ops)
                .await?
                .iter()
                .filter(|r| matches!(r, OpResult::Deleted))
                .count();
            if n < PAGE {
                return Ok(purged);
            }
        }
    }

    /// Records a patient's block; returns its id.
    pub async fn create_block(
        &self,
        patient: &PatientId,
        block: StoredBlock,
    ) -> Result<[u8; 16], RegistryError> {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let _turn = self.write_turn().await;
        let (pseudonym, sealed) = self.protection_turn(patient).await?;
        let block = StoredBlock {
            sealed_patient: sealed,
            ..block
        };
        self.inner.store.put_block(pseudonym, id, block).await?;
        Ok(id)
    }

    /// Lifts a block; true when it existed.
    pub async fn lift_block(
        &self,
        patient: &PatientId,
        id: [u8; 16],
    ) -> Result<bool, RegistryError> {
        let _turn = self.write_turn().await;
        let (pseudonym, _) = self.protection_turn(patient).await?;
        Ok(self.inner.store.delete_block(pseudonym, id).await?)
    }

    /// Where a change to a patient's protections goes (their pseudonym in force and
    /// sealed identifier), once their entries under other keys are moved there.
    async fn protection_turn(
        &self,
        patient: &PatientId,
    ) -> Result<(Pseudonym, Vec<u8>), RegistryError> {
        let keys = self.keys();
        self.move_first(&keys, std::slice::from_ref(patient))
            .await?;
        let pseudonym = keys.pseudonym(patient);
        self.cover([(pseudonym, patient.clone())]).await?;
        Ok((pseudonym, keys.seal(patient, &pseudonym)))
    }

    /// A patient's blocks with their ids.
    pub async fn blocks(
        &self,
        patient: &PatientId,
    ) -> Result<Vec<([u8; 16], StoredBlock)>, RegistryError> {
        let mut all = Vec::new();
        for p in self.read_pseudonyms(self.pseudonym(patient), patient) {
            for (id, b) in self.inner.store.blocks(p).await? {
                if !all.iter().any(|(i, _)| *i == id) {
                    all.push((id, b));
                }
            }
        }
        Ok(all)
    }

    /// Records (`Some`) or lifts (`None`) an opt-out; returns whether one existed before.
    pub async fn set_opt_out(
        &self,
        patient: &PatientId,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, RegistryError> {
        let _turn = self.write_turn().await;
        let (pseudonym, sealed) = self.protection_turn(patient).await?;
        let opt_out = opt_out.map(|o| StoredOptOut {
            sealed_patient: sealed,
            ..o
        });
        Ok(self.inner.store.set_opt_out(pseudonym, opt_out).await?)
    }

    /// The patient's live pointers as stored, oldest first: what a region that came to
    /// hold a patient delivers first to a subscription registered with it then.
    pub async fn live_stored(
        &self,
        patient: &PatientId,
    ) -> Result<Vec<(PointerKey, StoredPointer)>, RegistryError> {
        let records = self.records(self.pseudonym(patient), patient).await?;
        let now = now_nanos();
        let mut live: Vec<(PointerKey, StoredPointer)> = records
            .pointers
            .into_iter()
            .filter(|(_, p)| p.effective_expiry().is_none_or(|at| at > now))
            .collect();
        live.sort_by(|a, b| {
            a.1.last_updated
                .cmp(&b.1.last_updated)
                .then_with(|| a.0.cmp(&b.0))
        });
        Ok(live)
    }

    /// The journaled changes of `patient` since `since` (unix nanoseconds), under
    /// every key it is read under, in write order: what a region that came to hold
    /// the patient delivers to a subscription registered with it then.
    pub async fn journal(
        &self,
        patient: &PatientId,
        since: i64,
    ) -> Result<crate::store::Journal, RegistryError> {
        let pseudonyms = self.read_pseudonyms(self.pseudonym(patient), patient);
        Ok(self.inner.store.journal(pseudonyms, since).await?)
    }

    /// Drops journaled changes older than `hours`; returns how many.
    pub async fn drop_journal_older_than(&self, hours: u32) -> Result<usize, RegistryError> {
        let before = now_nanos() - i64::from(hours) * 3_600_000_000_000;
        drop_paged(|page| self.inner.store.drop_journal(before, page)).await
    }

    /// The patient's opt-out and blocks: what a lookup must respect.
    pub async fn protections(
        &self,
        patient: &PatientId,
    ) -> Result<(Option<StoredOptOut>, Vec<StoredBlock>), RegistryError> {
        let records = self.records(self.pseudonym(patient), patient).await?;
        if records.opt_out.is_some() {
            return Ok((records.opt_out, Vec::new()));
        }
        Ok((None, records.blocks))
    }

    fn pointer(&self, key: PointerKey, value: StoredPointer, patient: (String, String)) -> Pointer {
        Pointer {
            key,
            value,
            patient,
            region: self.inner.region.clone(),
        }
    }
}

pub use crate::store::now_nanos;

/// A patient as a subscription follows them under `keys`.
fn followed_under(keys: &PatientKeys, patient: &PatientId, stopped: bool) -> FollowedPatient {
    let pseudonym = keys.pseudonym(patient);
    FollowedPatient {
        pseudonym: pseudonym.to_vec(),
        sealed: keys.seal(patient, &pseudonym),
        stopped,
        former: keys
            .other_pseudonyms(patient)
            .into_iter()
            .map(|p| p.to_vec())
            .collect(),
    }
}

pub fn org_bytes(org: &OrgNumber) -> [u8; ORG_LEN] {
    let mut b = [0u8; ORG_LEN];
    b.copy_from_slice(org.as_str().as_bytes());
    b
}

fn endpoint_ident(e: &EndpointRef) -> [u8; IDENT_LEN] {
    let mut h = Sha256::new();
    h.update(e.sub_unit.as_ref().map(|o| o.as_str()).unwrap_or(""));
    h.update([0]);
    h.update(e.base_url.as_bytes());
    h.update([0]);
    h.update(e.api_kind.to_be_bytes());
    let digest = h.finalize();
    let mut out = [0u8; IDENT_LEN];
    out.copy_from_slice(&digest[..IDENT_LEN]);
    out
}

/// Drops a page at a time, so that no one write grows without bound, until a page is
/// not full; returns how many were dropped.
async fn drop_paged<F, Fut>(mut drop: F) -> Result<usize, RegistryError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize, crate::store::StoreError>>,
{
    const PAGE: usize = 10_000;
    let mut dropped = 0;
    loop {
        let n = drop(PAGE).await?;
        dropped += n;
        if n < PAGE {
            return Ok(dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use pil_proto::ident::SYSTEM_FNR;

    use super::*;
    use crate::{lookup::Shown, store::tests::on_every_engine};

    const ORG_A: &str = "974760673";
    const ORG_B: &str = "983044778";

    fn registry(store: Arc<dyn Store>) -> Registry {
        Registry::open(store, PatientKeys::from_bytes(&[1; 32], &[2; 32]), "test")
    }

    fn patient(value: &str) -> PatientId {
        PatientId::parse(SYSTEM_FNR, value, false).unwrap()
    }

    fn new_pointer(patient: &PatientId, org: &str, category: &str) -> NewPointer {
        NewPointer {
            patient: patient.clone(),
            endpoint: EndpointRef {
                org: OrgNumber::parse(org).unwrap(),
                sub_unit: None,
                base_url: format!("https://{org}.example.no/fhir"),
                api_kind: 1,
            },
            holder_name: format!("Holder {org}"),
            categories: vec![category.to_string()],
            period_start: None,
            period_end: None,
            last_updated: None,
            expires_at: None,
        }
    }

    fn visible(view: PatientView) -> (Vec<StoredBlock>, Vec<Pointer>) {
        match view {
            PatientView::Visible { blocks, pointers } => (blocks, pointers),
            PatientView::OptedOut => panic!("the patient has not opted out"),
        }
    }

    #[tokio::test]
    async fn upserts_are_shown_to_lookups_as_their_holders_sent_them() {
        on_every_engine(async |store| {
            let registry = registry(store);
            let p = patient("13097248022");
            let (outcome, stored) = registry
                .upsert(new_pointer(&p, ORG_A, "medications"))
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::Inserted);
            assert_eq!(stored.region, "test");
            assert_eq!(stored.holder(), ORG_A);
            assert_eq!(
                (stored.patient.0.as_str(), stored.patient.1.as_str()),
                (SYSTEM_FNR, "13097248022")
            );
            let again = registry
                .upsert(new_pointer(&p, ORG_A, "medications"))
                .await
                .unwrap();
            assert_eq!(again.0, Outcome::Unchanged);
            assert_eq!(again.1.key, stored.key, "the same pointer");
            let changed = registry
                .upsert(new_pointer(&p, ORG_A, "imaging"))
                .await
                .unwrap();
            assert_eq!(changed.0, Outcome::Updated);
            registry
                .upsert(new_pointer(&p, ORG_B, "medications"))
                .await
                .unwrap();

            let (_, all) = visible(
                registry
                    .patient_view(&p, &LookupFilter::default())
                    .await
                    .unwrap(),
            );
            assert_eq!(all.len(), 2);
            let by_category = LookupFilter {
                categories: vec!["medications".into()],
                organizations: vec![],
            };
            let (_, found) = visible(registry.patient_view(&p, &by_category).await.unwrap());
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].holder(), ORG_B);
            let by_org = LookupFilter {
                categories: vec![],
                organizations: vec![ORG_A.into()],
            };
            let (_, found) = visible(registry.patient_view(&p, &by_org).await.unwrap());
            assert_eq!(found[0].value.categories, ["imaging"]);
            // Another patient sees none of it.
            let (_, none) = visible(
                registry
                    .patient_view(&patient("29029648784"), &LookupFilter::default())
                    .await
                    .unwrap(),
            );
            assert!(none.is_empty());

            assert!(
                registry
                    .delete(&p, &new_pointer(&p, ORG_A, "x").endpoint)
                    .await
                    .unwrap()
            );
            assert!(
                !registry
                    .delete(&p, &new_pointer(&p, ORG_A, "x").endpoint)
                    .await
                    .unwrap()
            );
        })
        .await;
    }

    /// A pointer past its expiry or its lapse is not shown, and the purge removes it.
    #[tokio::test]
    async fn expired_and_lapsed_pointers_are_hidden_then_purged() {
        on_every_engine(async |store| {
            let registry = registry(store);
            let p = patient("13097248022");
            let mut expired = new_pointer(&p, ORG_A, "medications");
            expired.expires_at = Some(now_nanos() - 1);
            let long_ago = now_nanos() - 400 * NANOS_PER_DAY;
            let lapsed = registry.prepare(&new_pointer(&p, ORG_B, "imaging"), long_ago);
            registry
                .apply(vec![registry.prepare(&expired, now_nanos()), lapsed])
                .await
                .unwrap();
            registry
                .upsert(new_pointer(&p, "984661185", "allergies"))
                .await
                .unwrap();
            let (_, shown) = visible(
                registry
                    .patient_view(&p, &LookupFilter::default())
                    .await
                    .unwrap(),
            );
            assert_eq!(shown.len(), 1);
            assert_eq!(shown[0].value.categories, ["allergies"]);
            assert_eq!(registry.purge_expired().await.unwrap(), 2);
            assert_eq!(registry.purge_expired().await.unwrap(), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn an_export_page_opens_the_sealed_identifiers() {
        on_every_engine(async |store| {
            let registry = registry(store);
            let org = OrgNumber::parse(ORG_A).unwrap();
            for value in ["13097248022", "29029648784", "29020075838"] {
                registry
                    .upsert(new_pointer(&patient(value), ORG_A, "medications"))
                    .await
                    .unwrap();
            }
            registry
                .upsert(new_pointer(&patient("15021951940"), ORG_B, "medications"))
                .await
                .unwrap();
            let (first, after) = registry.export_page(org.clone(), None, 2).await.unwrap();
            let (rest, _) = registry.export_page(org, after, 10).await.unwrap();
            assert_eq!((first.len(), rest.len()), (2, 1));
            let mut values: Vec<String> = first
                .iter()
                .chain(&rest)
                .map(|p| p.patient.1.clone())
                .collect();
            values.sort();
            assert_eq!(values, ["13097248022", "29020075838", "29029648784"]);
        })
        .await;
    }

    #[tokio::test]
    async fn protections_are_kept_and_an_opt_out_hides_the_patient() {
        on_every_engine(async |store| {
            let registry = registry(store);
            let p = patient("13097248022");
            registry
                .upsert(new_pointer(&p, ORG_A, "medications"))
                .await
                .unwrap();
            let block = StoredBlock {
                target_kind: 3,
                target: ORG_B.into(),
                holder: ORG_A.into(),
                reason: "asked".into(),
                created_at: 1,
                sealed_patient: Vec::new(),
            };
            let id = registry.create_block(&p, block.clone()).await.unwrap();
            // Stored with the identifier sealed, so a key rotation can move it.
            let pseudonym = registry.pseudonym(&p);
            let sealed = registry.keys().seal(&p, &pseudonym);
            let block = StoredBlock {
                sealed_patient: sealed.clone(),
                ..block
            };
            let (blocks, pointers) = visible(
                registry
                    .patient_view(&p, &LookupFilter::default())
                    .await
                    .unwrap(),
            );
            assert_eq!((blocks, pointers.len()), (vec![block.clone()], 1));
            assert_eq!(registry.protections(&p).await.unwrap(), (None, vec![block]));

            let opt_out = StoredOptOut {
                since: 2,
                reason: "reservasjon".into(),
                sealed_patient: Vec::new(),
            };
            assert!(
                !registry
                    .set_opt_out(&p, Some(opt_out.clone()))
                    .await
                    .unwrap()
            );
            let opt_out = StoredOptOut {
                sealed_patient: sealed,
                ..opt_out
            };
            assert!(matches!(
                registry
                    .patient_view(&p, &LookupFilter::default())
                    .await
                    .unwrap(),
                PatientView::OptedOut
            ));
            assert_eq!(registry.protections(&p).await.unwrap().0, Some(opt_out));
            assert!(registry.set_opt_out(&p, None).await.unwrap());
            assert!(registry.lift_block(&p, id).await.unwrap());
            assert!(registry.blocks(&p).await.unwrap().is_empty());
        })
        .await;
    }
}
