//! The pointer registry: what a node holds and how it is read and changed.
//!
//! Sits between the service layer (which authenticates and authorizes) and storage
//! (which only knows bytes). Turns validated pointers into pseudonymized, sealed
//! records and back. Reads run in place when what they need is in memory, otherwise
//! on the blocking pool; writes go to the writer (`writer.rs`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

use pil_proto::{
    ident::{OrgNumber, PatientId},
    v1,
};
use sha2::{Digest, Sha256};

use crate::{
    patient_keys::{KeyError, PatientKeys, Pseudonym},
    pointer::{EndpointRef, NewPointer, to_timestamp},
    storage::{
        IDENT_LEN, ORG_LEN, PointerKey, StorageError, Store, StoredBlock, StoredOptOut,
        StoredPointer, Tier,
    },
    writer::{Op, OpResult, WriteError, Writer},
};

/// Pointer lifetime until the legal configuration sets one.
const DEFAULT_LIFETIME_DAYS: u32 = 365;
const NANOS_PER_DAY: i64 = 24 * 3600 * 1_000_000_000;

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
    Storage(#[from] StorageError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("internal task failed: {0}")]
    Task(String),
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

/// A patient as a lookup sees them.
pub enum PatientView {
    /// The patient has opted out of PIL: nothing is shown.
    OptedOut,
    /// The patient's blocks, and the live pointers matching the filter.
    Visible {
        blocks: Vec<StoredBlock>,
        pointers: Vec<v1::Pointer>,
    },
}

/// A node's registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    keys: PatientKeys,
    region: String,
    writer: Writer,
    lifetime: PointerLifetime,
}

/// Joins the writer thread when the registry is closed.
pub struct RegistryCloser {
    writer_thread: thread::JoinHandle<()>,
}

impl RegistryCloser {
    /// Waits for queued writes to finish. Call after every `Registry` clone is dropped.
    pub fn join(self) {
        let _ = self.writer_thread.join();
    }
}

impl Registry {
    pub fn open(
        store: Arc<Store>,
        keys: PatientKeys,
        region: impl Into<String>,
    ) -> (Self, RegistryCloser) {
        let (writer, writer_thread) = Writer::start(store.clone());
        let registry = Self {
            inner: Arc::new(Inner {
                store,
                keys,
                region: region.into(),
                writer,
                lifetime: PointerLifetime(Arc::new(AtomicU32::new(DEFAULT_LIFETIME_DAYS))),
            }),
        };
        (registry, RegistryCloser { writer_thread })
    }

    /// How long a pointer lives without a refresh by its holder. The handle does not
    /// keep the registry open.
    pub fn pointer_lifetime(&self) -> PointerLifetime {
        self.inner.lifetime.clone()
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The patient's pseudonym under this node's key.
    pub fn pseudonym(&self, patient: &PatientId) -> Pseudonym {
        self.inner.keys.pseudonym(patient)
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
        let pseudonym = self.pseudonym(&p.patient);
        let key = self.key_for(&pseudonym, &p.endpoint);
        let value = StoredPointer {
            sealed_patient: self.inner.keys.seal(&p.patient, &pseudonym),
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
    pub async fn upsert(&self, p: NewPointer) -> Result<(Outcome, v1::Pointer), RegistryError> {
        let op = self.prepare(&p, now_nanos());
        let key = match &op {
            Op::Upsert { key, .. } => *key,
            _ => unreachable!("prepare makes upserts"),
        };
        let result = self.inner.writer.apply(vec![op]).await?.pop();
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
        let patient = v1::PatientIdentifier {
            system: p.patient.system().to_string(),
            value: p.patient.value().to_string(),
        };
        Ok((outcome, self.to_wire(&key, &stored, patient)))
    }

    /// Removes one pointer; true when it existed.
    pub async fn delete(
        &self,
        patient: &PatientId,
        endpoint: &EndpointRef,
    ) -> Result<bool, RegistryError> {
        let key = self.key_for(&self.pseudonym(patient), endpoint);
        let result = self.inner.writer.apply(vec![Op::Delete { key }]).await?;
        Ok(matches!(result.first(), Some(OpResult::Deleted)))
    }

    /// Applies prepared operations atomically (one durable write).
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, RegistryError> {
        Ok(self.inner.writer.apply(ops).await?)
    }

    /// What a lookup reads about one patient: the opt-out, and unless there is one,
    /// the blocks and the live pointers. Read in place when everything is in memory
    /// (the common case: a hop to the blocking pool cost more than the read);
    /// otherwise read again on the blocking pool, where waiting for the disk is fine.
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
        match self.read_view(&pseudonym, patient, filter, Tier::Cached) {
            Err(RegistryError::Storage(StorageError::NotCached)) => {}
            done => return done,
        }
        let patient = patient.clone();
        let this = self.clone();
        let filter = filter.clone();
        self.blocking(move || this.read_view(&pseudonym, &patient, &filter, Tier::Any))
            .await
    }

    fn read_view(
        &self,
        pseudonym: &Pseudonym,
        patient: &PatientId,
        filter: &LookupFilter,
        tier: Tier,
    ) -> Result<PatientView, RegistryError> {
        let store = &self.inner.store;
        if store.opt_out(pseudonym, tier)?.is_some() {
            return Ok(PatientView::OptedOut);
        }
        let blocks = store
            .blocks(pseudonym, tier)?
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let pointers = self.live_pointers(pseudonym, patient, filter, tier)?;
        Ok(PatientView::Visible { blocks, pointers })
    }

    /// The patient's live pointers held here that match the filter, newest first.
    fn live_pointers(
        &self,
        pseudonym: &Pseudonym,
        patient: &PatientId,
        filter: &LookupFilter,
        tier: Tier,
    ) -> Result<Vec<v1::Pointer>, RegistryError> {
        let wire_patient = v1::PatientIdentifier {
            system: patient.system().to_string(),
            value: patient.value().to_string(),
        };
        let now = now_nanos();
        let mut found: Vec<(PointerKey, StoredPointer)> = self
            .inner
            .store
            .patient_pointers(pseudonym, tier)?
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
        Ok(found
            .iter()
            .map(|(k, p)| self.to_wire(k, p, wire_patient.clone()))
            .collect())
    }

    /// Keys of an organization's pointers for one patient (replace-mode sync).
    pub async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: OrgNumber,
    ) -> Result<Vec<PointerKey>, RegistryError> {
        let this = self.clone();
        self.blocking(move || {
            Ok(this
                .inner
                .store
                .patient_org_keys(&patient, &org_bytes(&org))?)
        })
        .await
    }

    /// A page of an organization's pointer keys, after `after`.
    pub async fn org_keys(
        &self,
        org: OrgNumber,
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, RegistryError> {
        let this = self.clone();
        self.blocking(move || {
            Ok(this
                .inner
                .store
                .org_keys(&org_bytes(&org), after.as_ref(), limit)?)
        })
        .await
    }

    /// A page of an organization's pointers with their plain identifiers, for export.
    /// Returns the last key read, to continue from.
    pub async fn export_page(
        &self,
        org: OrgNumber,
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<(Vec<v1::Pointer>, Option<PointerKey>), RegistryError> {
        let this = self.clone();
        self.blocking(move || {
            let store = &this.inner.store;
            let keys = store.org_keys(&org_bytes(&org), after.as_ref(), limit)?;
            let values = store.get_many(&keys)?;
            let mut out = Vec::with_capacity(keys.len());
            for (key, value) in keys.iter().zip(values) {
                // A pointer removed between the two reads is simply not exported.
                let Some(value) = value else { continue };
                let (system, value_id) = if value.sealed_patient.is_empty() {
                    this.inner
                        .keys
                        .open_format1(&value.sealed_patient_format1, &key.patient)?
                } else {
                    this.inner.keys.open(&value.sealed_patient, &key.patient)?
                };
                let patient = v1::PatientIdentifier {
                    system,
                    value: value_id,
                };
                out.push(this.to_wire(key, &value, patient));
            }
            Ok((out, keys.last().copied()))
        })
        .await
    }

    /// Removes pointers whose expiry has passed; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, RegistryError> {
        let mut purged = 0;
        loop {
            let now = now_nanos();
            let this = self.clone();
            let due = self
                .blocking(move || Ok(this.inner.store.expired(now, 1000)?))
                .await?;
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
            if n < 1000 {
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
        let pseudonym = self.pseudonym(patient);
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let this = self.clone();
        self.blocking(move || Ok(this.inner.store.put_block(&pseudonym, &id, &block)?))
            .await?;
        Ok(id)
    }

    /// Lifts a block; true when it existed.
    pub async fn lift_block(
        &self,
        patient: &PatientId,
        id: [u8; 16],
    ) -> Result<bool, RegistryError> {
        let pseudonym = self.pseudonym(patient);
        let this = self.clone();
        self.blocking(move || Ok(this.inner.store.delete_block(&pseudonym, &id)?))
            .await
    }

    /// A patient's blocks with their ids.
    pub async fn blocks(
        &self,
        patient: &PatientId,
    ) -> Result<Vec<([u8; 16], StoredBlock)>, RegistryError> {
        let pseudonym = self.pseudonym(patient);
        let this = self.clone();
        self.blocking(move || Ok(this.inner.store.blocks(&pseudonym, Tier::Any)?))
            .await
    }

    /// Records (`Some`) or lifts (`None`) an opt-out; returns whether one existed before.
    pub async fn set_opt_out(
        &self,
        patient: &PatientId,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, RegistryError> {
        let pseudonym = self.pseudonym(patient);
        let this = self.clone();
        self.blocking(move || {
            let store = &this.inner.store;
            let existed = store.opt_out(&pseudonym, Tier::Any)?.is_some();
            store.set_opt_out(&pseudonym, opt_out.as_ref())?;
            Ok(existed)
        })
        .await
    }

    /// The patient's opt-out and blocks: what a lookup must respect.
    pub async fn protections(
        &self,
        patient: &PatientId,
    ) -> Result<(Option<StoredOptOut>, Vec<StoredBlock>), RegistryError> {
        let pseudonym = self.pseudonym(patient);
        let this = self.clone();
        self.blocking(move || {
            let store = &this.inner.store;
            let opt_out = store.opt_out(&pseudonym, Tier::Any)?;
            let blocks = store
                .blocks(&pseudonym, Tier::Any)?
                .into_iter()
                .map(|(_, b)| b)
                .collect();
            Ok((opt_out, blocks))
        })
        .await
    }

    /// Flushes memtables to disk files.
    pub async fn flush(&self) -> Result<(), RegistryError> {
        let this = self.clone();
        self.blocking(move || Ok(this.inner.store.flush()?)).await
    }

    /// Converts a stored pointer to its wire form.
    pub fn to_wire(
        &self,
        key: &PointerKey,
        p: &StoredPointer,
        patient: v1::PatientIdentifier,
    ) -> v1::Pointer {
        v1::Pointer {
            patient: Some(patient),
            holder: Some(v1::Organization {
                organization_number: String::from_utf8_lossy(&key.org).into_owned(),
                sub_unit_organization_number: p.sub_unit.clone(),
                name: p.holder_name.clone(),
            }),
            endpoint: Some(v1::Endpoint {
                base_url: p.base_url.clone(),
                api_kind: p.api_kind,
            }),
            categories: p.categories.clone(),
            period: (p.period_start.is_some() || p.period_end.is_some()).then(|| v1::Period {
                start: p.period_start.map(to_timestamp),
                end: p.period_end.map(to_timestamp),
            }),
            last_updated: Some(to_timestamp(p.last_updated)),
            expires_at: p.expires_at.map(to_timestamp),
            region: self.inner.region.clone(),
            pointer_id: pointer_id(key),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RegistryError::Task(e.to_string()))?
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
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

/// A stable opaque id: a hash of the key, so it reveals nothing about the patient.
fn pointer_id(key: &PointerKey) -> String {
    let digest = Sha256::new()
        .chain_update(b"pil-pointer-id\0")
        .chain_update(key.encode())
        .finalize();
    hex::encode(&digest[..12])
}
