//! The embedded engine: a region's store in one RocksDB directory.
//!
//! RocksDB calls block, so none of them runs on the async executor except reads that
//! are answered from memory ([`db::Tier::Cached`]): writes go to the writer threads
//! ([`writer`], [`audit`]), other reads to the blocking pool.

mod audit;
mod db;
mod events;
mod journal;
mod moves;
mod routing;
mod witness;
mod writer;

use std::{path::Path, sync::Arc};

use db::{Db, DbError, Tier};

use super::{
    AuditEntry, Closer, Figure, HeadSigning, LogEntry, LogSize, Moved, ORG_LEN, Op, OpResult,
    PatientMove, PatientRecords, PointerKey, Queues, Store, StoreError, StoredBlock, StoredOptOut,
    StoredPatient, StoredPointer, Witnessed,
    events::{
        EventPage, Journal, PeerFollow, PeerState, StoredEvent, StoredSubscription, SubscriptionId,
    },
    tree::{self, TreeReader},
};
use crate::patient_keys::Pseudonym;

/// Opens (or creates) the store in `path` and starts its writer threads.
pub async fn open(path: &Path) -> Result<(Arc<dyn Store>, Closer), StoreError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || open_blocking(&path))
        .await
        .map_err(StoreError::engine)?
}

fn open_blocking(path: &Path) -> Result<(Arc<dyn Store>, Closer), StoreError> {
    let db = Arc::new(Db::open(path)?);
    let (audit, audit_thread) = audit::Appender::start(db.clone())?;
    let (writer, writer_thread) = writer::Writer::start(db.clone());
    let store = RocksStore { db, writer, audit };
    let closer = Closer::new(move || {
        if writer_thread.join().is_err() {
            tracing::error!("the pointer writer thread panicked");
        }
        if audit_thread.join().is_err() {
            tracing::error!("the audit appender thread panicked");
        }
    });
    Ok((Arc::new(store), closer))
}

struct RocksStore {
    db: Arc<Db>,
    writer: writer::Writer,
    audit: audit::Appender,
}

impl RocksStore {
    /// Runs a read on the blocking pool, where waiting for the disk is fine.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(StoreError::engine)?
    }
}

fn patient_records(db: &Db, patient: &Pseudonym, tier: Tier) -> Result<PatientRecords, DbError> {
    if let Some(opt_out) = db.opt_out(patient, tier)? {
        return Ok(PatientRecords {
            opt_out: Some(opt_out),
            ..Default::default()
        });
    }
    Ok(PatientRecords {
        opt_out: None,
        blocks: db
            .blocks(patient, tier)?
            .into_iter()
            .map(|(_, b)| b)
            .collect(),
        pointers: db.patient_pointers(patient, tier)?,
    })
}

impl TreeReader for Db {
    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self.audit_node(level, index)?)
    }

    fn latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.audit_latest_head()?)
    }

    fn remembered_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.audit_remembered_head()?)
    }
}

#[async_trait::async_trait]
impl Store for RocksStore {
    fn engine(&self) -> &'static str {
        "rocksdb"
    }

    fn queues(&self) -> Queues {
        Queues {
            writer: self.writer.queue(),
            audit: self.audit.queue(),
        }
    }

    fn figures(&self) -> Vec<Figure> {
        self.db.figures()
    }

    async fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let dir = dir.to_path_buf();
        self.blocking(move |db| Ok(db.checkpoint(&dir)?)).await
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        self.writer.apply(ops).await
    }

    async fn patient(&self, patient: Pseudonym) -> Result<PatientRecords, StoreError> {
        // Read in place when everything is in memory (the common case: a hop to the
        // blocking pool cost more than the read); otherwise on the blocking pool.
        match patient_records(&self.db, &patient, Tier::Cached) {
            Err(DbError::NotCached) => {}
            done => return Ok(done?),
        }
        self.blocking(move |db| Ok(patient_records(db, &patient, Tier::Any)?))
            .await
    }

    async fn get_many(
        &self,
        keys: Vec<PointerKey>,
    ) -> Result<Vec<Option<StoredPointer>>, StoreError> {
        self.blocking(move |db| Ok(db.get_many(&keys)?)).await
    }

    async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: [u8; ORG_LEN],
    ) -> Result<Vec<PointerKey>, StoreError> {
        self.blocking(move |db| Ok(db.patient_org_keys(&patient, &org)?))
            .await
    }

    async fn org_keys(
        &self,
        org: [u8; ORG_LEN],
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, StoreError> {
        self.blocking(move |db| Ok(db.org_keys(&org, after.as_ref(), limit)?))
            .await
    }

    async fn expired(&self, now: i64, limit: usize) -> Result<Vec<PointerKey>, StoreError> {
        self.blocking(move |db| Ok(db.expired(now, limit)?)).await
    }

    async fn patients_after(
        &self,
        after: Option<Pseudonym>,
        limit: usize,
    ) -> Result<Vec<StoredPatient>, StoreError> {
        self.blocking(move |db| Ok(db.patients_after(after.as_ref(), limit)?))
            .await
    }

    async fn move_patients(&self, moves: Vec<PatientMove>) -> Result<Moved, StoreError> {
        self.writer.move_patients(moves).await
    }

    async fn put_block(
        &self,
        patient: Pseudonym,
        id: [u8; 16],
        block: StoredBlock,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| Ok(db.put_block(&patient, &id, &block)?))
            .await
    }

    async fn delete_block(&self, patient: Pseudonym, id: [u8; 16]) -> Result<bool, StoreError> {
        self.blocking(move |db| Ok(db.delete_block(&patient, &id)?))
            .await
    }

    async fn blocks(&self, patient: Pseudonym) -> Result<Vec<([u8; 16], StoredBlock)>, StoreError> {
        self.blocking(move |db| Ok(db.blocks(&patient, Tier::Any)?))
            .await
    }

    async fn set_opt_out(
        &self,
        patient: Pseudonym,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, StoreError> {
        self.blocking(move |db| {
            let existed = db.opt_out(&patient, Tier::Any)?.is_some();
            db.set_opt_out(&patient, opt_out.as_ref())?;
            Ok(existed)
        })
        .await
    }

    async fn opt_out(&self, patient: Pseudonym) -> Result<Option<StoredOptOut>, StoreError> {
        self.blocking(move |db| Ok(db.opt_out(&patient, Tier::Any)?))
            .await
    }

    async fn audit_append(&self, entry: Box<dyn AuditEntry>) -> Result<u64, StoreError> {
        self.audit.append(entry).await
    }

    async fn audit_sign(
        &self,
        signer: Arc<dyn HeadSigning>,
    ) -> Result<Option<(u64, String)>, StoreError> {
        self.audit.sign(signer).await
    }

    async fn audit_size(&self) -> Result<LogSize, StoreError> {
        Ok(self.audit.size())
    }

    async fn audit_record(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking(move |db| Ok(db.audit_record(index)?)).await
    }

    async fn audit_records(
        &self,
        from: u64,
        ascending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.blocking(move |db| Ok(db.audit_records(from, ascending, limit)?))
            .await
    }

    async fn audit_patient_indexes(
        &self,
        patient: Pseudonym,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.blocking(move |db| Ok(db.audit_patient_indexes(&patient, before, limit)?))
            .await
    }

    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<LogEntry>, StoreError> {
        self.blocking(move |db| {
            let count = end.saturating_sub(start) as usize;
            let mut present: std::collections::HashMap<u64, Vec<u8>> = db
                .audit_records(start, true, count)?
                .into_iter()
                .filter(|(i, _)| *i < end)
                .collect();
            (start..end)
                .map(|index| {
                    let leaf_hash = TreeReader::node(db, 0, index)?.ok_or_else(|| {
                        StoreError::Tree(format!("no leaf hash stored for record {index}"))
                    })?;
                    Ok(LogEntry {
                        index,
                        record: present.remove(&index),
                        leaf_hash,
                    })
                })
                .collect()
        })
        .await
    }

    async fn audit_heads_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        self.blocking(move |db| Ok(db.audit_heads_after(after, limit)?))
            .await
    }

    async fn audit_latest_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.blocking(|db| Ok(db.audit_latest_head()?)).await
    }

    async fn audit_add_cosignatures(&self, size: u64, lines: String) -> Result<(), StoreError> {
        self.blocking(move |db| db.add_cosignatures(size, &lines))
            .await
    }

    async fn witnessed(&self, origin: String) -> Result<Option<Witnessed>, StoreError> {
        self.blocking(move |db| Ok(db.witnessed(&origin)?)).await
    }

    async fn witness_advance(
        &self,
        origin: String,
        old: u64,
        new: Witnessed,
    ) -> Result<Result<(), u64>, StoreError> {
        self.blocking(move |db| Ok(db.witness_advance(&origin, old, &new)?))
            .await
    }

    async fn audit_inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.blocking(move |db| tree::inclusion_proof(db, index, size))
            .await
    }

    async fn audit_consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.blocking(move |db| tree::consistency_proof(db, old, new))
            .await
    }

    async fn audit_retained_from(&self) -> Result<u64, StoreError> {
        self.blocking(|db| Ok(db.audit_retained_from()?)).await
    }

    async fn audit_drop_contents(
        &self,
        upto: u64,
        patients: Vec<(u64, Pseudonym)>,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| Ok(db.audit_drop_contents(upto, &patients)?))
            .await
    }

    async fn put_subscription(
        &self,
        id: SubscriptionId,
        subscription: StoredSubscription,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| Ok(db.put_subscription(&id, &subscription)?))
            .await
    }

    async fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<Option<StoredSubscription>, StoreError> {
        self.blocking(move |db| Ok(db.subscription(&id)?)).await
    }

    async fn subscriptions_of(
        &self,
        owner: String,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        self.blocking(move |db| Ok(db.subscriptions_of(Some(&owner))?))
            .await
    }

    async fn all_subscriptions(
        &self,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        self.blocking(move |db| Ok(db.subscriptions_of(None)?))
            .await
    }

    async fn peer_follows(&self, id: SubscriptionId) -> Result<Vec<PeerFollow>, StoreError> {
        self.blocking(move |db| Ok(db.peer_follows(&id)?)).await
    }

    async fn set_peer_follow(
        &self,
        id: SubscriptionId,
        region: String,
        state: PeerState,
        detail: String,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| Ok(db.set_peer_follow(&id, &region, state, &detail)?))
            .await
    }

    async fn collect_events(
        &self,
        id: SubscriptionId,
        region: String,
        from: u64,
        to: u64,
        events: Vec<StoredEvent>,
    ) -> Result<bool, StoreError> {
        self.blocking(move |db| Ok(db.collect_events(&id, &region, from, to, &events)?))
            .await
    }

    async fn events(
        &self,
        id: SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.blocking(move |db| Ok(db.events(&id, after, limit)?))
            .await
    }

    async fn drop_events(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.blocking(move |db| Ok(db.drop_events(before, limit)?))
            .await
    }

    async fn journal(&self, patients: Vec<Pseudonym>, since: i64) -> Result<Journal, StoreError> {
        self.blocking(move |db| Ok(db.journal(&patients, since)?))
            .await
    }

    async fn drop_journal(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.blocking(move |db| Ok(db.drop_journal(before, limit)?))
            .await
    }

    async fn events_due(&self, before: i64) -> Result<bool, StoreError> {
        self.blocking(move |db| Ok(db.events_due(before)?)).await
    }

    async fn routing_key_id(&self) -> Result<Option<String>, StoreError> {
        self.blocking(|db| Ok(db.routing_key_id()?)).await
    }

    async fn set_routing_key(&self, key_id: String, clear: bool) -> Result<(), StoreError> {
        self.blocking(move |db| Ok(db.set_routing_key(&key_id, clear)?))
            .await
    }

    async fn add_routing_tokens(&self, key_id: String, tokens: Vec<u64>) -> Result<(), StoreError> {
        self.blocking(move |db| db.add_routing_tokens(&key_id, &tokens))
            .await
    }

    async fn routing_tokens(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.blocking(move |db| Ok(db.routing_tokens(after, limit)?))
            .await
    }

    async fn claim_once(&self, _key: String, _until: i64) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn forget_claims(&self, _now: i64) -> Result<(), StoreError> {
        Ok(())
    }
}
