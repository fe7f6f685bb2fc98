//! The storage boundary: everything a region holds, behind one interface that names
//! capabilities — pointers, protections (blocks and opt-outs), the audit log — and not
//! an engine.
//!
//! [`Store`] is what the rest of the node sees. Its methods are async and never block
//! the executor: an engine that blocks (RocksDB) runs its calls on its own threads or
//! the blocking pool, inside the engine. Writes are planned by one set of rules
//! ([`plan`]) and the audit tree is extended by one piece of arithmetic ([`tree`]),
//! so every engine means the same by an insert or a signed head.
//!
//! Engines: [`rocks`] (embedded RocksDB, the default), [`postgres`] (several nodes of
//! a region on one replicated database) and [`memory`] (for tests). The same store
//! tests run on every engine.

pub mod backup;
pub mod events;
pub mod memory;
mod model;
mod plan;
pub mod postgres;
pub mod rocks;
mod tree;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::patient_keys::Pseudonym;
pub use events::{
    EventPage, FollowedPatient, Journal, PeerFollow, PeerState, StoredEvent, StoredSubscription,
    SubscriptionId,
};
pub use model::{
    AuditEntry, Change, HeadSigning, IDENT_LEN, KEY_LEN, LogEntry, LogSize, Moved, ORG_LEN, Op,
    OpResult, PatientMove, PatientRecords, PointerKey, Sealed, StoredBlock, StoredOptOut,
    StoredPatient, StoredPointer, merge_patients, now_nanos,
};
pub use pil_transparency::witness::Witnessed;

/// Why the store could not do what was asked. Cloneable: one failed group write
/// fails every request in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, the database, a connection).
    #[error("storage engine: {}", with_causes(.0.as_ref()))]
    Engine(Arc<dyn std::error::Error + Send + Sync>),
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("the store has format {found:?}; this node understands {expected:?}")]
    Format {
        found: String,
        expected: &'static str,
    },
    /// Planned on top of a write that failed; nothing of it was stored.
    #[error("an earlier write it depended on failed; nothing of it was stored")]
    Aborted,
    /// The node is stopping.
    #[error("the store is closed")]
    Closed,
    /// A record could not be encoded, or a head signed.
    #[error("audit record: {0}")]
    Record(String),
    /// The stored tree is incomplete or a proof was asked outside it.
    #[error("audit log: {0}")]
    Tree(String),
    /// The engine cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// Another node of the region made the stored routing tokens under another key.
    #[error(
        "the region's routing tokens are made under routing key {stored}, not this node's \
         {ours}; nothing was written. Give this node the region's routing key file and \
         restart it"
    )]
    RoutingKey { stored: String, ours: String },
    /// The stored log disagrees with a head it signed: records were removed or
    /// rewritten while the node was stopped.
    #[error(
        "the audit log does not match the newest tree head this node signed ({0}); it was \
         cut or rewritten while the node was stopped. Restore the data directory from a \
         backup, or keep it as evidence; the node will not append to it"
    )]
    Cut(String),
}

/// An error and its causes, as one line: drivers put what a person can act on ("password
/// missing") in the cause of a generic error ("invalid configuration").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `note` with the witnesses' signature `lines` added, one line per witness.
pub(crate) fn merge_cosignatures(note: &str, lines: &str) -> Result<String, StoreError> {
    pil_transparency::add_signatures(note, lines)
        .map_err(|e| StoreError::Tree(format!("cosignatures of a signed head: {e}")))
}

impl StoreError {
    pub fn engine(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Engine(Arc::new(e))
    }
}

/// A region's storage. Cheap to share (`Arc<dyn Store>`); the engine stops when the
/// last handle is dropped and its [`Closer`] is joined.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// The engine's name, for logs.
    fn engine(&self) -> &'static str;

    /// How the writer and audit queues are doing.
    fn queues(&self) -> Queues {
        Queues::default()
    }

    /// The engine's own figures, read when asked (a scrape, a status call).
    fn figures(&self) -> Vec<Figure> {
        Vec::new()
    }

    /// Makes a consistent copy of everything stored into `dir`, which must not exist,
    /// while the node serves. Engines with their own backup tools refuse.
    async fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        let _ = dir;
        Err(StoreError::Unsupported(format!(
            "the {} engine has no online checkpoint; use its own backup tools",
            self.engine()
        )))
    }

    // Pointers.

    /// Applies `ops` atomically; returns once they are durable. Concurrent calls may
    /// share one durable write, but each sees the ones before it.
    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError>;
    /// What a lookup reads about a patient.
    async fn patient(&self, patient: Pseudonym) -> Result<PatientRecords, StoreError>;
    /// The current values of `keys`, in order.
    async fn get_many(
        &self,
        keys: Vec<PointerKey>,
    ) -> Result<Vec<Option<StoredPointer>>, StoreError>;
    /// Keys of one organization's pointers for one patient.
    async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: [u8; ORG_LEN],
    ) -> Result<Vec<PointerKey>, StoreError>;
    /// Up to `limit` keys of an organization's pointers in key order, after `after`.
    async fn org_keys(
        &self,
        org: [u8; ORG_LEN],
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, StoreError>;
    /// Up to `limit` pointers whose expiry is at or before `now` (ns since the epoch).
    async fn expired(&self, now: i64, limit: usize) -> Result<Vec<PointerKey>, StoreError>;

    /// Up to `limit` patients with pointers or protections, in pseudonym order after
    /// `after`.
    async fn patients_after(
        &self,
        after: Option<Pseudonym>,
        limit: usize,
    ) -> Result<Vec<StoredPatient>, StoreError>;
    /// Moves each patient's pointers, blocks and opt-out from `from` to `to`, all in one
    /// atomic write that no pointer write interleaves with. Where `to` already holds an
    /// entry, it is newer and is kept. Makes no change events: nothing changed for the
    /// holders or the followers.
    async fn move_patients(&self, moves: Vec<PatientMove>) -> Result<Moved, StoreError>;

    // Protections.

    /// Stores a block, durably.
    async fn put_block(
        &self,
        patient: Pseudonym,
        id: [u8; 16],
        block: StoredBlock,
    ) -> Result<(), StoreError>;
    /// Removes a block; true when it existed.
    async fn delete_block(&self, patient: Pseudonym, id: [u8; 16]) -> Result<bool, StoreError>;
    /// A patient's blocks with their ids.
    async fn blocks(&self, patient: Pseudonym) -> Result<Vec<([u8; 16], StoredBlock)>, StoreError>;
    /// Records (`Some`) or lifts (`None`) an opt-out, durably; returns whether one
    /// existed before.
    async fn set_opt_out(
        &self,
        patient: Pseudonym,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, StoreError>;
    /// The patient's opt-out, if any.
    async fn opt_out(&self, patient: Pseudonym) -> Result<Option<StoredOptOut>, StoreError>;

    // The audit log.

    /// Appends `entry` with the next index; returns the index once it is durable.
    async fn audit_append(&self, entry: Box<dyn AuditEntry>) -> Result<u64, StoreError>;
    /// Signs the tree unless its size is signed already; returns the newest head.
    async fn audit_sign(
        &self,
        signer: Arc<dyn HeadSigning>,
    ) -> Result<Option<(u64, String)>, StoreError>;
    /// How many records the log holds and how many its newest head covers.
    async fn audit_size(&self) -> Result<LogSize, StoreError>;
    /// One record's bytes, if its contents are kept.
    async fn audit_record(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` kept records from `from` on (ascending) or before `from`
    /// (descending), as `(index, bytes)`.
    async fn audit_records(
        &self,
        from: u64,
        ascending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Indexes of records about a patient before `before`, newest first.
    async fn audit_patient_indexes(
        &self,
        patient: Pseudonym,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError>;
    /// Entries `[start, end)` with their leaf hashes, contents where kept.
    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<LogEntry>, StoreError>;
    /// Up to `limit` signed heads of trees larger than `after`, oldest first.
    async fn audit_heads_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError>;
    /// The newest signed head.
    async fn audit_latest_head(&self) -> Result<Option<(u64, String)>, StoreError>;
    /// Leaf `index`'s audit path in the tree of `size`.
    async fn audit_inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError>;
    /// The proof that the tree of `old` is a prefix of the tree of `new`.
    async fn audit_consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError>;
    /// The first index whose record contents are kept.
    async fn audit_retained_from(&self) -> Result<u64, StoreError>;
    /// Drops the contents of records before `upto`, keeping their leaf hashes;
    /// `patients` are the dropped records' pseudonyms, to drop them from the index.
    async fn audit_drop_contents(
        &self,
        upto: u64,
        patients: Vec<(u64, Pseudonym)>,
    ) -> Result<(), StoreError>;

    /// Adds witnesses' cosignature lines to this log's signed head of `size`, one line
    /// per witness (the newest).
    async fn audit_add_cosignatures(&self, size: u64, lines: String) -> Result<(), StoreError>;

    // Witnessing other regions' logs.

    /// The checkpoint this node, as a witness, last cosigned for the log `origin`.
    async fn witnessed(&self, origin: String) -> Result<Option<Witnessed>, StoreError>;
    /// Stores `new` as the log's latest cosigned checkpoint, durably, if the stored one
    /// still has size `old` (0: none) and `new` is no smaller; otherwise changes
    /// nothing and gives the stored size. Atomic across the region's nodes, so two
    /// submissions cannot both advance from the same size.
    async fn witness_advance(
        &self,
        origin: String,
        old: u64,
        new: Witnessed,
    ) -> Result<Result<(), u64>, StoreError>;

    // Subscriptions and their events.

    /// Stores a subscription (new, renewed, ended, or following fewer patients), in
    /// turn with pointer writes: every write acknowledged after this returns makes the
    /// events it should for it, and none made after it stops following.
    async fn put_subscription(
        &self,
        id: SubscriptionId,
        subscription: StoredSubscription,
    ) -> Result<(), StoreError>;
    async fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<Option<StoredSubscription>, StoreError>;
    /// Every subscription the organization `owner` holds.
    async fn subscriptions_of(
        &self,
        owner: String,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError>;
    /// Up to `limit` events of subscription `id` numbered after `after`, in order.
    async fn events(
        &self,
        id: SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError>;
    /// Drops up to `limit` events written before `before` (unix nanoseconds); returns
    /// how many it dropped.
    async fn drop_events(&self, before: i64, limit: usize) -> Result<usize, StoreError>;
    /// Whether any event is older than `before` (what [`Store::drop_events`] would drop).
    async fn events_due(&self, before: i64) -> Result<bool, StoreError>;
    /// Every subscription stored here.
    async fn all_subscriptions(
        &self,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError>;
    /// How each other region follows subscription `id`.
    async fn peer_follows(&self, id: SubscriptionId) -> Result<Vec<PeerFollow>, StoreError>;
    /// Sets another region's state for subscription `id`, keeping its position.
    async fn set_peer_follow(
        &self,
        id: SubscriptionId,
        region: String,
        state: PeerState,
        detail: String,
    ) -> Result<(), StoreError>;
    /// Appends `events` collected from `region` to subscription `id`'s, numbered after
    /// its newest, and moves that region's position from `from` to `to`, in one atomic
    /// write, in turn with pointer writes. False (and nothing written) when the
    /// position is no longer `from`: another node of the region collected them first.
    async fn collect_events(
        &self,
        id: SubscriptionId,
        region: String,
        from: u64,
        to: u64,
        events: Vec<StoredEvent>,
    ) -> Result<bool, StoreError>;

    // The journal: every pointer change, kept a bounded time, written in the same
    // atomic write as the change (see `events::journal_for`).

    /// The journaled changes of `patients` written at or after `since` (unix
    /// nanoseconds), in write order, and since when the journal is complete.
    async fn journal(&self, patients: Vec<Pseudonym>, since: i64) -> Result<Journal, StoreError>;
    /// Drops up to `limit` journaled changes written before `before`, oldest first;
    /// the journal is then complete only from the oldest change it still holds, or
    /// `before` once none older is left. Returns how many it dropped.
    async fn drop_journal(&self, before: i64, limit: usize) -> Result<usize, StoreError>;

    // Routing tokens: what this region's membership summary is built over.

    /// The routing key the stored tokens were made under (its id), if any.
    async fn routing_key_id(&self) -> Result<Option<String>, StoreError>;
    /// Records that the stored tokens are made under `key_id`, durably; with `clear`,
    /// forgets every stored token in the same write.
    async fn set_routing_key(&self, key_id: String, clear: bool) -> Result<(), StoreError>;
    /// Stores tokens made under `key_id` durably; each one not stored yet gets the next
    /// position. Every node of a region sees positions in the order they were given.
    /// Refused ([`StoreError::RoutingKey`]) when the stored tokens are under another key
    /// ([`routing_key_matches`]).
    async fn add_routing_tokens(&self, key_id: String, tokens: Vec<u64>) -> Result<(), StoreError>;
    /// Up to `limit` stored tokens at positions after `after`, in position order:
    /// `(position, token)`.
    async fn routing_tokens(&self, after: u64, limit: usize)
    -> Result<Vec<(u64, u64)>, StoreError>;

    // Checks every node of a region shares.

    /// Records `key` until `until` (unix seconds); false when it is recorded already and
    /// has not expired. A store one node owns answers true: that node's own replay
    /// cache has checked already. A store several nodes share makes a DPoP proof
    /// accepted by one node refused by every other.
    async fn claim_once(&self, key: String, until: i64) -> Result<bool, StoreError>;
    /// Forgets claims that expired before `now`.
    async fn forget_claims(&self, now: i64) -> Result<(), StoreError>;
}

/// What the stored routing key record says while every stored patient is being
/// covered under `key_id` (after a new key, or for a store that never had tokens).
pub fn routing_key_walking(key_id: &str) -> String {
    format!("{key_id} walking")
}

/// Whether tokens made under `ours` may join those the store holds under `stored`.
pub fn routing_key_matches(stored: Option<&str>, ours: &str) -> Result<(), StoreError> {
    match stored {
        Some(s) if s == ours || s == routing_key_walking(ours) => Ok(()),
        other => Err(StoreError::RoutingKey {
            stored: other.unwrap_or("none").to_string(),
            ours: ours.to_string(),
        }),
    }
}

/// `first` and whatever else is queued in `rx`, up to `max` by `weight`: what one
/// group commit takes. Counted in `stats`.
pub(crate) fn take_queued<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    first: T,
    max: usize,
    weight: impl Fn(&T) -> usize,
    stats: &GroupStats,
) -> Vec<T> {
    let mut n = weight(&first);
    let mut jobs = vec![first];
    while n < max {
        match rx.try_recv() {
            Ok(job) => {
                n += weight(&job);
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    stats.groups.fetch_add(1, Ordering::Relaxed);
    stats.items.fetch_add(n as u64, Ordering::Relaxed);
    jobs
}

/// How one of an engine's queues groups its work: groups committed and what they
/// held (operations for the writer, records and signings for the audit log).
#[derive(Debug, Default)]
pub struct GroupStats {
    groups: AtomicU64,
    items: AtomicU64,
}

impl GroupStats {
    /// The figures now, with `waiting` jobs in the queue of `tx`.
    pub(crate) fn figures<T>(&self, tx: &tokio::sync::mpsc::Sender<T>) -> QueueFigures {
        QueueFigures {
            waiting: (tx.max_capacity() - tx.capacity()) as u64,
            groups: self.groups.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
        }
    }
}

/// A queue's figures: jobs waiting now, and groups and items committed so far (their
/// ratio is the mean group size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueFigures {
    pub waiting: u64,
    pub groups: u64,
    pub items: u64,
}

/// The engine's pointer writer and audit appender queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queues {
    pub writer: QueueFigures,
    pub audit: QueueFigures,
}

/// One of the engine's own figures (RocksDB's statistics, the PostgreSQL pool), by a
/// stable name the metrics endpoint exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    pub name: &'static str,
    pub value: u64,
}

/// Waits for an engine's threads once every [`Store`] handle is gone.
pub struct Closer(Option<Box<dyn FnOnce() + Send>>);

impl Closer {
    pub(crate) fn new(close: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(close)))
    }

    /// Nothing to wait for.
    pub fn none() -> Self {
        Self(None)
    }

    /// Waits until queued writes are durable and the engine has closed. Call after
    /// every handle is dropped.
    pub async fn close(mut self) {
        if let Some(close) = self.0.take()
            && tokio::task::spawn_blocking(close).await.is_err()
        {
            tracing::error!("closing the store failed");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
