//! Bulk synchronization: one organization's pointers streamed in, reconciled with what
//! the registry holds.
//!
//! *Merge* upserts what is sent. *Replace* also removes the organization's pointers
//! that were not sent, per patient or for the whole organization. Replace remembers the
//! keys it has seen (bounded by configuration) and removes the rest only after the
//! stream has ended cleanly; if any record was rejected the removal is skipped, so a
//! typo in one record can never delete the pointer it was meant to keep.
//! *All-or-nothing* holds every record until the end and commits them in one atomic
//! write, or nothing at all.

use std::collections::HashSet;

use pil_proto::{ident::OrgNumber, v1};
use tokio::task::JoinHandle;

use crate::{
    patient_keys::Pseudonym,
    pointer::{FieldError, NewPointer},
    registry::{Registry, RegistryError, now_nanos},
    store::{Op, OpResult, PointerKey},
};

/// Most record errors listed in a report; the count covers all.
pub const MAX_REPORTED_ERRORS: usize = 1000;
/// Keys deleted per write during a replace sweep.
const SWEEP_CHUNK: usize = 10_000;

/// What "complete set" means in replace mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceScope {
    Patients,
    Organization,
}

/// A sync's parameters, from its header.
#[derive(Debug, Clone)]
pub struct SyncParams {
    pub org: OrgNumber,
    /// `None` for merge.
    pub replace: Option<ReplaceScope>,
    pub all_or_nothing: bool,
    pub allow_synthetic: bool,
    pub max_all_or_nothing_records: usize,
    pub max_replace_records: usize,
}

/// A refused record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub position: u64,
    pub field: &'static str,
    pub message: String,
}

/// The counts a sync answers with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub removed: u64,
    pub rejected: u64,
    pub errors: Vec<RecordError>,
    pub replace_applied: bool,
}

/// Why a sync as a whole failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The caller's input; nothing (more) was stored.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// One sync in progress.
pub struct SyncSession {
    registry: Registry,
    params: SyncParams,
    position: u64,
    report: SyncReport,
    held: Vec<Op>,
    seen_keys: HashSet<PointerKey>,
    seen_patients: HashSet<Pseudonym>,
    /// The previous batch's write, still under way while the next batch is read and
    /// validated. One at a time, so a stream's batches are applied in order.
    in_flight: Option<JoinHandle<Result<Vec<OpResult>, RegistryError>>>,
}

impl SyncSession {
    pub fn new(registry: Registry, params: SyncParams) -> Self {
        Self {
            registry,
            params,
            position: 0,
            report: SyncReport::default(),
            held: Vec::new(),
            seen_keys: HashSet::new(),
            seen_patients: HashSet::new(),
            in_flight: None,
        }
    }

    /// Validates one batch and (unless all-or-nothing) starts storing it. The write
    /// goes on while the caller reads the next batch; [`finish`](Self::finish) waits
    /// for it. Validating the next batch while the last is written keeps both cores
    /// busy: on its own, a stream alternates between the two.
    pub async fn add_batch(&mut self, pointers: Vec<v1::Pointer>) -> Result<(), SyncError> {
        let start = self.position;
        self.position += pointers.len() as u64;
        let limit = match (self.params.all_or_nothing, self.params.replace) {
            (true, _) => Some(self.params.max_all_or_nothing_records),
            (false, Some(_)) => Some(self.params.max_replace_records),
            (false, None) => None,
        };
        if let Some(limit) = limit
            && self.position > limit as u64
        {
            return Err(SyncError::Invalid(format!(
                "this sync may carry at most {limit} pointers (all-or-nothing and replace \
                 syncs are held in memory); split it or use merge mode"
            )));
        }

        let registry = self.registry.clone();
        let params = self.params.clone();
        let (ops, errors) = tokio::task::spawn_blocking(move || {
            let now = now_nanos();
            let mut ops = Vec::with_capacity(pointers.len());
            let mut errors = Vec::new();
            for (i, p) in pointers.iter().enumerate() {
                match validate(p, &params) {
                    Ok(np) => ops.push(registry.prepare(&np, now)),
                    Err(e) => errors.push(RecordError {
                        position: start + i as u64,
                        field: e.field,
                        message: e.message,
                    }),
                }
            }
            (ops, errors)
        })
        .await
        .map_err(|e| RegistryError::Task(e.to_string()))?;

        self.report.rejected += errors.len() as u64;
        let room = MAX_REPORTED_ERRORS.saturating_sub(self.report.errors.len());
        self.report.errors.extend(errors.into_iter().take(room));

        if self.params.replace.is_some() {
            for op in &ops {
                if let Op::Upsert { key, .. } = op {
                    self.seen_keys.insert(*key);
                    self.seen_patients.insert(key.patient);
                }
            }
        }
        if self.params.all_or_nothing {
            if self.report.rejected == 0 {
                self.held.extend(ops);
            } else {
                self.held = Vec::new();
            }
            return Ok(());
        }
        self.settle().await?;
        let registry = self.registry.clone();
        self.in_flight = Some(tokio::spawn(async move { registry.apply(ops).await }));
        Ok(())
    }

    /// Waits for the write under way, if any, and counts what it did.
    async fn settle(&mut self) -> Result<(), SyncError> {
        if let Some(write) = self.in_flight.take() {
            let results = write
                .await
                .map_err(|e| RegistryError::Task(e.to_string()))??;
            self.count(&results);
        }
        Ok(())
    }

    /// Ends the sync: commits held records, runs the replace step, reports.
    pub async fn finish(mut self) -> Result<SyncReport, SyncError> {
        self.settle().await?;
        if self.params.all_or_nothing {
            if self.report.rejected > 0 {
                let first = &self.report.errors[0];
                return Err(SyncError::Invalid(format!(
                    "sync rejected, nothing stored: {} invalid record(s); first at position \
                     {}: {}: {}",
                    self.report.rejected, first.position, first.field, first.message
                )));
            }
            let held = std::mem::take(&mut self.held);
            let results = self.registry.apply(held).await?;
            self.count(&results);
        }
        if let Some(scope) = self.params.replace
            && self.report.rejected == 0
        {
            self.report.removed = match scope {
                ReplaceScope::Organization => self.sweep_organization().await?,
                ReplaceScope::Patients => self.sweep_patients().await?,
            };
            self.report.replace_applied = true;
        }
        Ok(self.report)
    }

    async fn sweep_organization(&self) -> Result<u64, SyncError> {
        let mut removed = 0;
        let mut after = None;
        loop {
            let page = self
                .registry
                .org_keys(self.params.org.clone(), after, SWEEP_CHUNK)
                .await?;
            let Some(last) = page.last().copied() else {
                return Ok(removed);
            };
            after = Some(last);
            removed += self.remove_unseen(page).await?;
        }
    }

    async fn sweep_patients(&self) -> Result<u64, SyncError> {
        let mut removed = 0;
        let mut doomed = Vec::new();
        for patient in &self.seen_patients {
            let keys = self
                .registry
                .patient_org_keys(*patient, self.params.org.clone())
                .await?;
            doomed.extend(keys);
            if doomed.len() >= SWEEP_CHUNK {
                removed += self.remove_unseen(std::mem::take(&mut doomed)).await?;
            }
        }
        removed += self.remove_unseen(doomed).await?;
        Ok(removed)
    }

    async fn remove_unseen(&self, keys: Vec<PointerKey>) -> Result<u64, SyncError> {
        let ops: Vec<Op> = keys
            .into_iter()
            .filter(|k| !self.seen_keys.contains(k))
            .map(|key| Op::Delete { key })
            .collect();
        let results = self.registry.apply(ops).await?;
        Ok(results
            .iter()
            .filter(|r| matches!(r, OpResult::Deleted))
            .count() as u64)
    }

    fn count(&mut self, results: &[OpResult]) {
        for r in results {
            match r {
                OpResult::Inserted(_) => self.report.inserted += 1,
                OpResult::Updated(_) => self.report.updated += 1,
                OpResult::Unchanged(_) => self.report.unchanged += 1,
                OpResult::Deleted | OpResult::Absent => {}
            }
        }
    }
}

fn validate(p: &v1::Pointer, params: &SyncParams) -> Result<NewPointer, FieldError> {
    let np = NewPointer::from_wire(p, params.allow_synthetic)?;
    if np.endpoint.org != params.org {
        return Err(FieldError::new(
            "holder.organization_number",
            format!(
                "is {} but this sync is for organization {}",
                np.endpoint.org, params.org
            ),
        ));
    }
    Ok(np)
}
