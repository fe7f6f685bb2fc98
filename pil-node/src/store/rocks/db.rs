//! The RocksDB layout of a region's store: column families, keys, and synchronous
//! reads and writes. Only the RocksDB engine calls these, from its own threads or the
//! blocking pool.
//!
//! Column families (all keys fixed-width binary, so byte order is key order):
//!
//! | family            | key                                          | value          |
//! |-------------------|----------------------------------------------|----------------|
//! | `pointers`        | patient pseudonym (16) · org (9) · ident (16) | [`StoredPointer`] |
//! | `pointers_by_org` | org (9) · patient pseudonym (16) · ident (16) | empty          |
//! | `pointer_expiry`  | expiry (8, sign-flipped BE ns) · pointer key (41) | empty      |
//! | `blocks`          | patient pseudonym (16) · block id (16)        | [`StoredBlock`] |
//! | `opt_outs`        | patient pseudonym (16)                        | [`StoredOptOut`] |
//! | `meta`            | name                                         | value          |
//! | `audit_records`   | index (8, BE)                                 | record JSON    |
//! | `audit_nodes`     | level (1) · index (8, BE)                      | SHA-256 (32)   |
//! | `audit_heads`     | tree size (8, BE)                             | signed note    |
//! | `audit_by_patient`| patient pseudonym (16) · index (8, BE)         | empty          |
//!
//! `pointers` is laid out for the hot path: a lookup is one prefix scan over the
//! patient's pseudonym (a fixed 16-byte prefix with a bloom filter, so patients with no
//! pointers cost a filter probe). `pointers_by_org` serves export and replace-mode sync,
//! `pointer_expiry` the purge of expired pointers in time order. `ident` is a hash of
//! the endpoint identity (sub-unit, base URL, API kind), keeping keys short and fixed.
//! Every write goes through one `WriteBatch` with a synced WAL, so the three families
//! never disagree and an acknowledged write survives a crash.
//!
//! The audit log is append-only: `audit_records` holds each record's exact bytes (the
//! hash tree's leaf data), `audit_nodes` every complete subtree of the RFC 6962 tree
//! (level 0 = leaf hashes, kept when retention drops a record's contents), so proofs
//! need O(log² n) reads. `audit_heads` keeps every signed tree head.

use std::path::Path;

use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode,
    MemtableFactory, Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions,
};

use super::events::FollowState;
use crate::{
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    store::{
        Change, Figure, KEY_LEN, ORG_LEN, PointerKey, StoreError, StoredBlock, StoredOptOut,
        StoredPointer, tree::Group,
    },
};

pub(super) const CF_POINTERS: &str = "pointers";
pub(super) const CF_BY_ORG: &str = "pointers_by_org";
pub(super) const CF_EXPIRY: &str = "pointer_expiry";
pub(super) const CF_META: &str = "meta";
pub(super) const CF_BLOCKS: &str = "blocks";
pub(super) const CF_OPT_OUTS: &str = "opt_outs";
/// Audit record contents, by index.
const CF_AUDIT_RECORDS: &str = "audit_records";
const CF_AUDIT_NODES: &str = "audit_nodes";
pub(super) const CF_AUDIT_HEADS: &str = "audit_heads";
const CF_AUDIT_BY_PATIENT: &str = "audit_by_patient";
pub(super) const CF_SUBSCRIPTIONS: &str = "subscriptions";
pub(super) const CF_FOLLOWERS: &str = "followers";
pub(super) const CF_EVENTS: &str = "events";
pub(super) const CF_EVENT_COUNTERS: &str = "event_counters";
pub(super) const CF_ROUTING_TOKENS: &str = "routing_tokens";
pub(super) const CF_ROUTING_BY_TOKEN: &str = "routing_by_token";
pub(super) const CF_JOURNAL: &str = "journal";
pub(super) const CF_JOURNAL_BY_PATIENT: &str = "journal_by_patient";

/// Every column family, for what is done to all of them.
const EVERY_CF: [&str; 18] = [
    CF_POINTERS,
    CF_BY_ORG,
    CF_EXPIRY,
    CF_META,
    CF_BLOCKS,
    CF_OPT_OUTS,
    CF_AUDIT_RECORDS,
    CF_AUDIT_NODES,
    CF_AUDIT_HEADS,
    CF_AUDIT_BY_PATIENT,
    CF_SUBSCRIPTIONS,
    CF_FOLLOWERS,
    CF_EVENTS,
    CF_EVENT_COUNTERS,
    CF_ROUTING_TOKENS,
    CF_ROUTING_BY_TOKEN,
    CF_JOURNAL,
    CF_JOURNAL_BY_PATIENT,
];
/// First audit index whose contents are kept (earlier ones fell to retention).
const AUDIT_RETAINED_FROM: &[u8] = b"audit_retained_from";
/// The newest signed head again, apart from the heads' family: cutting the log's end
/// together with the heads over it still leaves the node knowing what it signed.
const AUDIT_NEWEST_HEAD: &[u8] = b"audit_newest_head";

/// Hash buckets of the `pointers` memtable (8 bytes each, per memtable).
const MEMTABLE_BUCKETS: usize = 1 << 18;

const FORMAT_KEY: &[u8] = b"format";
/// Format 2 seals patient identifiers compactly (`StoredPointer::sealed_patient`).
/// A format 1 directory is upgraded on open: its pointers are read as they are and
/// rewritten in format 2 when their holder next changes them.
const FORMAT_VERSION: &[u8] = b"2";
const FORMAT_1: &[u8] = b"1";

/// What a RocksDB call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("data directory has format {found:?}, this node understands {FORMAT_VERSION:?}")]
    Format { found: String },
    /// A [`Tier::Cached`] read would have had to wait for the disk.
    #[error("not in memory; read again allowing disk reads")]
    NotCached,
    /// A write failed by the `store::write` fail point (builds with `failpoints`).
    #[error("write failed (injected): {0}")]
    Injected(String),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Db(e) => StoreError::engine(e),
            DbError::Corrupt { cf, detail } => StoreError::Corrupt { what: cf, detail },
            DbError::Format { found } => StoreError::Format {
                found,
                expected: "2",
            },
            DbError::NotCached => StoreError::engine(std::io::Error::other(
                "a cache-only read missed where a full read was meant",
            )),
            DbError::Injected(e) => StoreError::engine(std::io::Error::other(e)),
        }
    }
}

/// How far a read may go for its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Anywhere, disk included: may block, so call it from a blocking context.
    Any,
    /// Memtables and the block cache only: never waits for the disk, so it can run on
    /// the async executor; fails with [`DbError::NotCached`] instead.
    Cached,
}

impl Tier {
    fn options(self) -> ReadOptions {
        let mut opts = ReadOptions::default();
        if self == Tier::Cached {
            opts.set_read_tier(rocksdb::ReadTier::BlockCache);
        }
        opts
    }
}

/// RocksDB's error, or [`DbError::NotCached`] for a cache-only read that missed.
fn read_error(e: rocksdb::Error) -> DbError {
    if e.kind() == rocksdb::ErrorKind::Incomplete {
        DbError::NotCached
    } else {
        DbError::Db(e)
    }
}

/// A key's entry in `pointers_by_org`: organization first.
pub(super) fn by_org(key: &PointerKey) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..ORG_LEN].copy_from_slice(&key.org);
    k[ORG_LEN..ORG_LEN + PSEUDONYM_LEN].copy_from_slice(&key.patient);
    k[ORG_LEN + PSEUDONYM_LEN..].copy_from_slice(&key.ident);
    k
}

fn from_by_org(k: &[u8]) -> Option<PointerKey> {
    if k.len() != KEY_LEN {
        return None;
    }
    Some(PointerKey {
        org: k[..ORG_LEN].try_into().ok()?,
        patient: k[ORG_LEN..ORG_LEN + PSEUDONYM_LEN].try_into().ok()?,
        ident: k[ORG_LEN + PSEUDONYM_LEN..].try_into().ok()?,
    })
}

/// A key's entry in `pointer_expiry`: the expiry first, so the index is in time order.
pub(super) fn expiry_key(key: &PointerKey, expires_at: i64) -> [u8; 8 + KEY_LEN] {
    let mut k = [0u8; 8 + KEY_LEN];
    k[..8].copy_from_slice(&sortable(expires_at));
    k[8..].copy_from_slice(&key.encode());
    k
}

/// One entry of a pointer write. The key is inline (the longest is an expiry key):
/// a bulk sync writes three entries per pointer, and each allocation showed.
struct Entry {
    family: u8,
    key: [u8; 8 + KEY_LEN],
    len: usize,
    /// `None` deletes.
    value: Option<Vec<u8>>,
}

impl Entry {
    fn new(family: u8, key: &[u8], value: Option<Vec<u8>>) -> Self {
        let mut buf = [0u8; 8 + KEY_LEN];
        buf[..key.len()].copy_from_slice(key);
        Self {
            family,
            key: buf,
            len: key.len(),
            value,
        }
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.len]
    }
}

/// Maps i64 to big-endian bytes whose byte order is numeric order.
fn sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// The open database.
pub struct Db {
    pub(super) db: DB,
    /// Held while a pointer group is written and while a subscription is: see
    /// `events.rs`.
    follow: std::sync::Mutex<FollowState>,
    /// Held while routing tokens are given positions: see `routing.rs`.
    pub(super) routing_turn: std::sync::Mutex<()>,
    /// The data directory, which names this database to the `store::write` fail point.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    path: std::path::PathBuf,
    /// Held while a witnessed checkpoint or a head's cosignatures are rewritten: see
    /// `witness.rs`.
    pub(super) witness_turn: std::sync::Mutex<()>,
}

impl Db {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let cache = Cache::new_lru_cache(256 * 1024 * 1024);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);

        // `point_reads`: a family with a prefix is also read by whole key (the writer
        // reads the stored pointer of every key it writes), so its filters hold whole
        // keys as well as prefixes. Without them a sync into a patient that another
        // holder already has read a data block for every new pointer.
        let cf = |prefix_len: Option<usize>, point_reads: bool| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_bottommost_compression_type(DBCompressionType::Zstd);
            if let Some(n) = prefix_len {
                o.set_prefix_extractor(SliceTransform::create_fixed_prefix(n));
                o.set_memtable_prefix_bloom_ratio(0.1);
                o.set_memtable_whole_key_filtering(point_reads);
                table.set_whole_key_filtering(point_reads);
            }
            o.set_block_based_table_factory(&table);
            o
        };
        // Every read of `pointers` is by patient (a lookup's prefix scan, the writer's
        // point reads), so its memtable hashes patients to small skip lists: a bulk
        // sync inserts random patients, and searching one skip list of every pointer
        // for each was the largest part of its write. Hashed memtables need inserts
        // from one thread at a time, which the writer does anyway.
        db_opts.set_allow_concurrent_memtable_write(false);
        let mut pointers = cf(Some(PSEUDONYM_LEN), true);
        pointers.set_memtable_factory(MemtableFactory::HashSkipList {
            bucket_count: MEMTABLE_BUCKETS,
            height: 4,
            branching_factor: 4,
        });
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_POINTERS, pointers),
            ColumnFamilyDescriptor::new(CF_BY_ORG, cf(Some(ORG_LEN), false)),
            ColumnFamilyDescriptor::new(CF_EXPIRY, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_BLOCKS, cf(Some(PSEUDONYM_LEN), false)),
            ColumnFamilyDescriptor::new(CF_OPT_OUTS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_AUDIT_RECORDS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_AUDIT_NODES, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_AUDIT_HEADS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_AUDIT_BY_PATIENT, cf(Some(PSEUDONYM_LEN), false)),
            ColumnFamilyDescriptor::new(CF_SUBSCRIPTIONS, cf(None, false)),
            // The key is the whole prefix: a patient nobody follows, which is nearly every
            // patient a write touches, costs a filter probe, in the memtable too.
            ColumnFamilyDescriptor::new(CF_FOLLOWERS, cf(Some(PSEUDONYM_LEN), true)),
            ColumnFamilyDescriptor::new(CF_EVENTS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_EVENT_COUNTERS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_ROUTING_TOKENS, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_ROUTING_BY_TOKEN, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_JOURNAL, cf(None, false)),
            ColumnFamilyDescriptor::new(CF_JOURNAL_BY_PATIENT, cf(Some(PSEUDONYM_LEN), false)),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let store = Self {
            db,
            follow: Default::default(),
            routing_turn: Default::default(),
            path: path.to_path_buf(),
            witness_turn: Default::default(),
        };
        store.check_format()?;
        store.follow_state().any = store.any_followers()?;
        store.open_journal(&mut store.follow_state())?;
        Ok(store)
    }

    /// RocksDB's own figures, summed over the column families where they are kept
    /// per family.
    pub fn figures(&self) -> Vec<Figure> {
        let of = |cf: &str, property: &str| {
            self.db
                .property_int_value_cf(self.cf(cf), property)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        let sum = |property: &str| EVERY_CF.iter().map(|cf| of(cf, property)).sum::<u64>();
        let db = |property: &str| {
            self.db
                .property_int_value(property)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        vec![
            Figure {
                name: "estimated_pointers",
                value: of(CF_POINTERS, "rocksdb.estimate-num-keys"),
            },
            Figure {
                name: "estimated_audit_records",
                value: of(CF_AUDIT_RECORDS, "rocksdb.estimate-num-keys"),
            },
            Figure {
                name: "sst_bytes",
                value: sum("rocksdb.total-sst-files-size"),
            },
            Figure {
                name: "memtable_bytes",
                value: sum("rocksdb.cur-size-all-mem-tables"),
            },
            Figure {
                name: "block_cache_bytes",
                value: of(CF_POINTERS, "rocksdb.block-cache-usage"),
            },
            Figure {
                name: "pending_compaction_bytes",
                value: sum("rocksdb.estimate-pending-compaction-bytes"),
            },
            Figure {
                name: "running_compactions",
                value: db("rocksdb.num-running-compactions"),
            },
            Figure {
                name: "background_errors",
                value: db("rocksdb.background-errors"),
            },
        ]
    }

    /// A consistent copy of the database in `dir` (which must not exist): hard links
    /// to the immutable table files where `dir` is on the same file system.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), DbError> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir)?;
        Ok(())
    }

    fn check_format(&self) -> Result<(), DbError> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, FORMAT_KEY)? {
            None => {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                self.db.put_cf_opt(meta, FORMAT_KEY, FORMAT_VERSION, &w)?;
                Ok(())
            }
            Some(v) if v == FORMAT_VERSION => Ok(()),
            Some(v) if v == FORMAT_1 => {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                self.db.put_cf_opt(meta, FORMAT_KEY, FORMAT_VERSION, &w)?;
                Ok(())
            }
            Some(v) => Err(DbError::Format {
                found: String::from_utf8_lossy(&v).into_owned(),
            }),
        }
    }

    pub(super) fn follow_state(&self) -> std::sync::MutexGuard<'_, FollowState> {
        self.follow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every durable write goes through here.
    pub(super) fn write_synced(&self, batch: WriteBatch) -> Result<(), DbError> {
        self.injected_failure()?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// The failing disk, on demand: with the `failpoints` feature, the `store::write`
    /// fail point configured as `return(<data directory>)` fails this database's
    /// writes (`return` alone: every database's) until it is removed.
    fn injected_failure(&self) -> Result<(), DbError> {
        #[cfg(feature = "failpoints")]
        if let Some(dir) = fail::eval("store::write", |arg| arg.unwrap_or_default())
            && (dir.is_empty() || std::path::Path::new(&dir) == self.path)
        {
            return Err(DbError::Injected("No space left on device".into()));
        }
        Ok(())
    }

    pub(super) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Reads the current values of `keys`, in order.
    pub fn get_many(&self, keys: &[PointerKey]) -> Result<Vec<Option<StoredPointer>>, DbError> {
        let cf = self.cf(CF_POINTERS);
        let encoded: Vec<[u8; KEY_LEN]> = keys.iter().map(PointerKey::encode).collect();
        self.db
            .batched_multi_get_cf(cf, encoded.iter(), false)
            .into_iter()
            .map(|r| match r? {
                None => Ok(None),
                Some(v) => decode(&v).map(Some),
            })
            .collect()
    }

    /// All pointers stored for a patient.
    pub fn patient_pointers(
        &self,
        patient: &Pseudonym,
        tier: Tier,
    ) -> Result<Vec<(PointerKey, StoredPointer)>, DbError> {
        let mut out = Vec::new();
        for item in self.prefix_scan_in(CF_POINTERS, patient, tier) {
            let (k, v) = item?;
            let key = PointerKey::decode(&k).ok_or_else(|| corrupt(CF_POINTERS, "bad key"))?;
            out.push((key, decode(&v)?));
        }
        Ok(out)
    }

    /// Keys of one organization's pointers for one patient.
    pub fn patient_org_keys(
        &self,
        patient: &Pseudonym,
        org: &[u8; ORG_LEN],
    ) -> Result<Vec<PointerKey>, DbError> {
        let mut prefix = [0u8; PSEUDONYM_LEN + ORG_LEN];
        prefix[..PSEUDONYM_LEN].copy_from_slice(patient);
        prefix[PSEUDONYM_LEN..].copy_from_slice(org);
        self.prefix_scan(CF_POINTERS, &prefix)
            .map(|item| {
                let (k, _) = item?;
                PointerKey::decode(&k).ok_or_else(|| corrupt(CF_POINTERS, "bad key"))
            })
            .collect()
    }

    /// Up to `limit` keys of an organization's pointers, in key order, after `after`.
    pub fn org_keys(
        &self,
        org: &[u8; ORG_LEN],
        after: Option<&PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, DbError> {
        let cf = self.cf(CF_BY_ORG);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(upper_bound(org));
        opts.set_prefix_same_as_start(true);
        let start = after.map(by_org).map(|k| k.to_vec());
        let mode = match &start {
            Some(s) => IteratorMode::From(s, rocksdb::Direction::Forward),
            None => IteratorMode::From(org, rocksdb::Direction::Forward),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.db.iterator_cf_opt(cf, opts, mode) {
            let (k, _) = item?;
            let key = from_by_org(&k).ok_or_else(|| corrupt(CF_BY_ORG, "bad key"))?;
            if Some(&key) == after {
                continue;
            }
            out.push(key);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Up to `limit` pointers whose expiry is at or before `now` (ns since the epoch).
    pub fn expired(&self, now: i64, limit: usize) -> Result<Vec<PointerKey>, DbError> {
        let cf = self.cf(CF_EXPIRY);
        let mut opts = ReadOptions::default();
        let mut bound = sortable(now).to_vec();
        bound.extend_from_slice(&[0xff; KEY_LEN + 1]);
        opts.set_iterate_upper_bound(bound);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, opts, IteratorMode::Start) {
            let (k, _) = item?;
            let key = PointerKey::decode(&k[8..]).ok_or_else(|| corrupt(CF_EXPIRY, "bad key"))?;
            out.push(key);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Applies `changes` atomically and durably (the WAL is synced before returning).
    pub fn write(&self, changes: &[Change]) -> Result<(), DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Each column family's entries go into the batch in key order: the memtable
        // skip list then continues its search from the previous insert instead of
        // starting from the top for every random pseudonym (that search was a third of
        // a bulk sync's CPU). The sort is stable, so two entries for one key keep
        // their order.
        const POINTERS: u8 = 0;
        const BY_ORG: u8 = 1;
        const EXPIRY: u8 = 2;
        let mut entries: Vec<Entry> = Vec::with_capacity(changes.len() * 3);
        for change in changes {
            match change {
                Change::Put {
                    key,
                    value,
                    previous,
                } => {
                    entries.push(Entry::new(
                        POINTERS,
                        &key.encode(),
                        Some(value.encode_to_vec()),
                    ));
                    if previous.is_none() {
                        entries.push(Entry::new(BY_ORG, &by_org(key), Some(Vec::new())));
                    }
                    let before = previous.as_ref().and_then(|p| p.effective_expiry());
                    let after = value.effective_expiry();
                    if before != after {
                        if let Some(at) = before {
                            entries.push(Entry::new(EXPIRY, &expiry_key(key, at), None));
                        }
                        if let Some(at) = after {
                            entries.push(Entry::new(
                                EXPIRY,
                                &expiry_key(key, at),
                                Some(Vec::new()),
                            ));
                        }
                    }
                }
                Change::Delete { key, previous, .. } => {
                    entries.push(Entry::new(POINTERS, &key.encode(), None));
                    entries.push(Entry::new(BY_ORG, &by_org(key), None));
                    if let Some(at) = previous.effective_expiry() {
                        entries.push(Entry::new(EXPIRY, &expiry_key(key, at), None));
                    }
                }
            }
        }
        entries.sort_by(|a, b| (a.family, a.key()).cmp(&(b.family, b.key())));
        let families = [self.cf(CF_POINTERS), self.cf(CF_BY_ORG), self.cf(CF_EXPIRY)];
        let mut batch = WriteBatch::default();
        for entry in &entries {
            let cf = families[usize::from(entry.family)];
            match &entry.value {
                Some(value) => batch.put_cf(cf, entry.key(), value),
                None => batch.delete_cf(cf, entry.key()),
            }
        }
        // The group's events, in the same batch: see `events.rs`.
        let mut follow = self.follow_state();
        // One time for the group's journal entries and events: later than the
        // group before, so journal keys never collide.
        let now = crate::store::now_nanos().max(follow.journal_at + 1);
        self.add_journal(&mut follow, changes, now, &mut batch);
        let counters = self.add_events(&follow, changes, now, &mut batch)?;
        let written = self.write_synced(batch);
        match &written {
            Ok(()) => follow.counters.extend(counters),
            // What the failed batch would have advanced is read again.
            Err(_) => follow.counters.clear(),
        }
        written
    }

    /// Flushes memtables to SST files, e.g. before a backup or in tests that inspect
    /// the files.
    pub fn flush(&self) -> Result<(), DbError> {
        for name in EVERY_CF {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// Entries of `cf` from `from` while their keys start with `prefix`.
    pub(super) fn prefix_iter<'a>(
        &'a self,
        cf: &'static str,
        prefix: &[u8],
        from: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, DbError>> + 'a {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(upper_bound(prefix));
        self.db
            .iterator_cf_opt(
                self.cf(cf),
                opts,
                IteratorMode::From(from, rocksdb::Direction::Forward),
            )
            .map(|r| r.map_err(read_error))
    }

    fn prefix_scan<'a>(
        &'a self,
        cf: &'static str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<KeyValue, DbError>> + 'a {
        self.prefix_scan_in(cf, prefix, Tier::Any)
    }

    fn prefix_scan_in<'a>(
        &'a self,
        cf: &'static str,
        prefix: &'a [u8],
        tier: Tier,
    ) -> impl Iterator<Item = Result<KeyValue, DbError>> + 'a {
        let mut opts = tier.options();
        opts.set_iterate_upper_bound(upper_bound(prefix));
        opts.set_prefix_same_as_start(true);
        self.db
            .iterator_cf_opt(
                self.cf(cf),
                opts,
                IteratorMode::From(prefix, rocksdb::Direction::Forward),
            )
            .map(|r| r.map_err(read_error))
    }
}

/// A raw key and value from an iterator.
pub(super) type KeyValue = (Box<[u8]>, Box<[u8]>);

impl Db {
    fn put_synced(&self, cf: &str, key: &[u8], value: Option<Vec<u8>>) -> Result<(), DbError> {
        self.injected_failure()?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        match value {
            Some(v) => self.db.put_cf_opt(self.cf(cf), key, v, &opts)?,
            None => self.db.delete_cf_opt(self.cf(cf), key, &opts)?,
        }
        Ok(())
    }

    /// Stores a block, durably.
    pub fn put_block(
        &self,
        patient: &Pseudonym,
        id: &[u8; 16],
        block: &StoredBlock,
    ) -> Result<(), DbError> {
        let key = [patient.as_slice(), id].concat();
        self.put_synced(CF_BLOCKS, &key, Some(block.encode_to_vec()))
    }

    /// Removes a block; true when it existed.
    pub fn delete_block(&self, patient: &Pseudonym, id: &[u8; 16]) -> Result<bool, DbError> {
        let key = [patient.as_slice(), id].concat();
        let existed = self.db.get_cf(self.cf(CF_BLOCKS), &key)?.is_some();
        if existed {
            self.put_synced(CF_BLOCKS, &key, None)?;
        }
        Ok(existed)
    }

    /// A patient's blocks with their ids.
    pub fn blocks(
        &self,
        patient: &Pseudonym,
        tier: Tier,
    ) -> Result<Vec<([u8; 16], StoredBlock)>, DbError> {
        self.prefix_scan_in(CF_BLOCKS, patient, tier)
            .map(|item| {
                let (k, v) = item?;
                let id: [u8; 16] = k
                    .get(PSEUDONYM_LEN..)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| corrupt(CF_BLOCKS, "bad key"))?;
                let block =
                    StoredBlock::decode(&*v).map_err(|e| corrupt(CF_BLOCKS, &e.to_string()))?;
                Ok((id, block))
            })
            .collect()
    }

    /// Records or lifts (`None`) a patient's opt-out, durably.
    pub fn set_opt_out(
        &self,
        patient: &Pseudonym,
        opt_out: Option<&StoredOptOut>,
    ) -> Result<(), DbError> {
        self.put_synced(CF_OPT_OUTS, patient, opt_out.map(|o| o.encode_to_vec()))
    }

    /// The patient's opt-out, if any.
    pub fn opt_out(
        &self,
        patient: &Pseudonym,
        tier: Tier,
    ) -> Result<Option<StoredOptOut>, DbError> {
        self.db
            .get_cf_opt(self.cf(CF_OPT_OUTS), patient, &tier.options())
            .map_err(read_error)?
            .map(|v| StoredOptOut::decode(&*v).map_err(|e| corrupt(CF_OPT_OUTS, &e.to_string())))
            .transpose()
    }
}

fn audit_node_key(level: u8, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = level;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(super) fn be_u64(k: &[u8], cf: &'static str) -> Result<u64, DbError> {
    k.get(k.len().saturating_sub(8)..)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(cf, "bad key"))
}

/// The audit log's storage: append-only records, tree nodes and signed heads.
impl Db {
    /// Stores one group of the log (records, the subtrees they complete, signed
    /// heads) in one durable write.
    pub fn audit_append(&self, group: &Group) -> Result<(), DbError> {
        if group.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for r in &group.records {
            batch.put_cf(self.cf(CF_AUDIT_RECORDS), r.index.to_be_bytes(), &r.bytes);
            if let Some(p) = &r.patient {
                let key = [p.as_slice(), &r.index.to_be_bytes()].concat();
                batch.put_cf(self.cf(CF_AUDIT_BY_PATIENT), key, []);
            }
        }
        for (level, index, hash) in &group.nodes {
            batch.put_cf(
                self.cf(CF_AUDIT_NODES),
                audit_node_key(*level, *index),
                hash,
            );
        }
        for (size, note) in &group.heads {
            batch.put_cf(self.cf(CF_AUDIT_HEADS), size.to_be_bytes(), note.as_bytes());
        }
        if let Some((size, note)) = group.heads.last() {
            let value = [size.to_be_bytes().as_slice(), note.as_bytes()].concat();
            batch.put_cf(self.cf(CF_META), AUDIT_NEWEST_HEAD, value);
        }
        self.write_synced(batch)
    }

    /// Number of leaves in the audit tree.
    pub fn audit_size(&self) -> Result<u64, DbError> {
        let mut it = self.db.iterator_cf(
            self.cf(CF_AUDIT_NODES),
            IteratorMode::From(&audit_node_key(0, u64::MAX), rocksdb::Direction::Reverse),
        );
        match it.next() {
            Some(item) => {
                let (k, _) = item?;
                if k.first() == Some(&0) {
                    Ok(be_u64(&k, CF_AUDIT_NODES)? + 1)
                } else {
                    Ok(0)
                }
            }
            None => Ok(0),
        }
    }

    /// A stored complete subtree's hash.
    pub fn audit_node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, DbError> {
        self.db
            .get_cf(self.cf(CF_AUDIT_NODES), audit_node_key(level, index))?
            .map(|v| {
                <[u8; 32]>::try_from(v.as_slice()).map_err(|_| corrupt(CF_AUDIT_NODES, "bad hash"))
            })
            .transpose()
    }

    /// One record's bytes, if its contents are kept.
    pub fn audit_record(&self, index: u64) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_AUDIT_RECORDS), index.to_be_bytes())?)
    }

    /// Up to `limit` stored records from `from` on (ascending) or before `from`
    /// (descending), as `(index, bytes)`.
    pub fn audit_records(
        &self,
        from: u64,
        ascending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let start = from.to_be_bytes();
        let mode = if ascending {
            IteratorMode::From(&start, rocksdb::Direction::Forward)
        } else {
            IteratorMode::From(&start, rocksdb::Direction::Reverse)
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_AUDIT_RECORDS), mode) {
            let (k, v) = item?;
            let index = be_u64(&k, CF_AUDIT_RECORDS)?;
            if !ascending && index >= from {
                continue;
            }
            out.push((index, v.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Indexes of records about a patient before `before`, newest first.
    pub fn audit_patient_indexes(
        &self,
        patient: &Pseudonym,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, DbError> {
        let start = [patient.as_slice(), &before.to_be_bytes()].concat();
        let mut opts = ReadOptions::default();
        opts.set_prefix_same_as_start(true);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_AUDIT_BY_PATIENT),
            opts,
            IteratorMode::From(&start, rocksdb::Direction::Reverse),
        ) {
            let (k, _) = item?;
            if !k.starts_with(patient) {
                break;
            }
            let index = be_u64(&k, CF_AUDIT_BY_PATIENT)?;
            if index >= before {
                continue;
            }
            out.push(index);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The newest signed tree head.
    pub fn audit_latest_head(&self) -> Result<Option<(u64, String)>, DbError> {
        let mut it = self
            .db
            .iterator_cf(self.cf(CF_AUDIT_HEADS), IteratorMode::End);
        it.next().map(decode_head).transpose()
    }

    /// The newest signed head as remembered apart from the heads' family.
    pub fn audit_remembered_head(&self) -> Result<Option<(u64, String)>, DbError> {
        let Some(v) = self.db.get_cf(self.cf(CF_META), AUDIT_NEWEST_HEAD)? else {
            return Ok(None);
        };
        let size = be_u64(v.get(..8).unwrap_or_default(), CF_META)?;
        let note = String::from_utf8(v[8..].to_vec())
            .map_err(|_| corrupt(CF_META, "newest head is not UTF-8"))?;
        Ok(Some((size, note)))
    }

    /// Up to `limit` signed heads of trees larger than `after`, oldest first.
    pub fn audit_heads_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, DbError> {
        let start = after.saturating_add(1).to_be_bytes();
        self.db
            .iterator_cf(
                self.cf(CF_AUDIT_HEADS),
                IteratorMode::From(&start, rocksdb::Direction::Forward),
            )
            .take(limit)
            .map(decode_head)
            .collect()
    }

    /// The first index whose record contents are kept.
    pub fn audit_retained_from(&self) -> Result<u64, DbError> {
        match self.db.get_cf(self.cf(CF_META), AUDIT_RETAINED_FROM)? {
            Some(v) => be_u64(&v, CF_META),
            None => Ok(0),
        }
    }

    /// Drops the contents of records `[retained_from, upto)`, keeping their leaf
    /// hashes; `patients` are the dropped records' pseudonyms, to drop their index
    /// entries too.
    pub fn audit_drop_contents(
        &self,
        upto: u64,
        patients: &[(u64, Pseudonym)],
    ) -> Result<(), DbError> {
        let from = self.audit_retained_from()?;
        if upto <= from {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_AUDIT_RECORDS),
            from.to_be_bytes(),
            upto.to_be_bytes(),
        );
        for (index, p) in patients {
            let key = [p.as_slice(), &index.to_be_bytes()].concat();
            batch.delete_cf(self.cf(CF_AUDIT_BY_PATIENT), key);
        }
        batch.put_cf(self.cf(CF_META), AUDIT_RETAINED_FROM, upto.to_be_bytes());
        self.write_synced(batch)
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn upper_bound(prefix: &[u8]) -> Vec<u8> {
    let mut b = prefix.to_vec();
    while let Some(last) = b.pop() {
        if last < 0xff {
            b.push(last + 1);
            return b;
        }
    }
    // All 0xff: no upper bound exists; a longer key than any stored one stands in.
    vec![0xff; KEY_LEN + 9]
}

/// A signed tree head as stored: tree size (big-endian key) and the signed note.
fn decode_head(item: Result<KeyValue, rocksdb::Error>) -> Result<(u64, String), DbError> {
    let (k, v) = item?;
    Ok((
        be_u64(&k, CF_AUDIT_HEADS)?,
        String::from_utf8(v.into_vec()).map_err(|_| corrupt(CF_AUDIT_HEADS, "utf-8"))?,
    ))
}

pub(super) fn decode(v: &[u8]) -> Result<StoredPointer, DbError> {
    StoredPointer::decode(v).map_err(|e| corrupt(CF_POINTERS, &e.to_string()))
}

pub(super) fn corrupt(cf: &'static str, detail: &str) -> DbError {
    DbError::Corrupt {
        cf,
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IDENT_LEN;

    fn key(p: u8, org: &[u8; 9], i: u8) -> PointerKey {
        PointerKey {
            patient: [p; PSEUDONYM_LEN],
            org: *org,
            ident: [i; IDENT_LEN],
        }
    }

    fn value(expires_at: Option<i64>) -> StoredPointer {
        StoredPointer {
            base_url: "https://x.no".into(),
            api_kind: 1,
            categories: vec!["medications".into()],
            last_updated: 5,
            expires_at,
            ..Default::default()
        }
    }

    #[test]
    fn keys_round_trip_and_sort_numerically() {
        let k = key(1, b"974760673", 2);
        assert_eq!(PointerKey::decode(&k.encode()), Some(k));
        assert_eq!(from_by_org(&by_org(&k)), Some(k));
        assert!(sortable(-5) < sortable(3));
        assert!(sortable(i64::MIN) < sortable(-1));
        assert!(sortable(0) < sortable(i64::MAX));
    }

    /// A format 1 directory opens, keeps its pointers as they were and is marked
    /// format 2; a format this node does not know is refused.
    #[test]
    fn format1_directories_are_upgraded_and_unknown_formats_refused() {
        let dir = tempfile::tempdir().unwrap();
        let old = key(1, b"974760673", 1);
        {
            let store = Db::open(dir.path()).unwrap();
            let meta = store.cf(CF_META);
            store.db.put_cf(meta, FORMAT_KEY, FORMAT_1).unwrap();
            let mut v = value(None);
            v.sealed_patient_format1 = vec![7; 81];
            store
                .write(&[Change::Put {
                    key: old,
                    value: v.into(),
                    previous: None,
                }])
                .unwrap();
        }
        {
            let store = Db::open(dir.path()).unwrap();
            let meta = store.cf(CF_META);
            assert_eq!(
                store.db.get_cf(meta, FORMAT_KEY).unwrap().as_deref(),
                Some(FORMAT_VERSION)
            );
            let found = store.patient_pointers(&[1; 16], Tier::Any).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].1.sealed_patient_format1, vec![7; 81]);
            assert!(found[0].1.sealed_patient.is_empty());
            store.db.put_cf(meta, FORMAT_KEY, b"3").unwrap();
        }
        assert!(matches!(
            Db::open(dir.path()),
            Err(DbError::Format { found }) if found == "3"
        ));
    }

    /// A cache-only read never waits for the disk: it reports `NotCached` for data only
    /// on disk, and finds it once a full read has brought it into the block cache.
    #[test]
    fn cached_reads_report_misses_instead_of_reading_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let a = key(1, b"974760673", 1);
        {
            let store = Db::open(dir.path()).unwrap();
            store
                .write(&[Change::Put {
                    key: a,
                    value: value(None).into(),
                    previous: None,
                }])
                .unwrap();
            // In the memtable: found without the disk.
            assert_eq!(
                store
                    .patient_pointers(&[1; 16], Tier::Cached)
                    .unwrap()
                    .len(),
                1
            );
            store.flush().unwrap();
        }
        let store = Db::open(dir.path()).unwrap();
        assert!(matches!(
            store.patient_pointers(&[1; 16], Tier::Cached),
            Err(DbError::NotCached)
        ));
        assert_eq!(
            store.patient_pointers(&[1; 16], Tier::Any).unwrap().len(),
            1
        );
        assert_eq!(
            store
                .patient_pointers(&[1; 16], Tier::Cached)
                .unwrap()
                .len(),
            1
        );
        // A patient with nothing stored is answered from the filters alone.
        assert!(
            store
                .patient_pointers(&[9; 16], Tier::Cached)
                .unwrap()
                .is_empty()
        );
        assert!(store.opt_out(&[1; 16], Tier::Any).unwrap().is_none());
    }

    #[test]
    fn writes_keep_indexes_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = Db::open(dir.path()).unwrap();
        let (a, b) = (key(1, b"974760673", 1), key(1, b"983044778", 1));
        let c = key(2, b"974760673", 3);
        store
            .write(&[
                Change::Put {
                    key: a,
                    value: value(Some(10)).into(),
                    previous: None,
                },
                Change::Put {
                    key: b,
                    value: value(None).into(),
                    previous: None,
                },
                Change::Put {
                    key: c,
                    value: value(Some(20)).into(),
                    previous: None,
                },
            ])
            .unwrap();
        assert_eq!(
            store.patient_pointers(&[1; 16], Tier::Any).unwrap().len(),
            2
        );
        assert_eq!(store.patient_org_keys(&[1; 16], b"974760673").unwrap(), [a]);
        assert_eq!(store.org_keys(b"974760673", None, 10).unwrap(), [a, c]);
        assert_eq!(store.org_keys(b"974760673", Some(&a), 10).unwrap(), [c]);
        assert_eq!(store.expired(15, 10).unwrap(), [a]);
        // Moving an expiry re-indexes it.
        store
            .write(&[Change::Put {
                key: a,
                value: value(Some(30)).into(),
                previous: Some(value(Some(10)).into()),
            }])
            .unwrap();
        assert_eq!(store.expired(25, 10).unwrap(), [c]);
        store
            .write(&[Change::Delete {
                key: c,
                previous: value(Some(20)).into(),
                lapsed: false,
            }])
            .unwrap();
        assert_eq!(store.expired(25, 10).unwrap(), []);
        assert_eq!(store.org_keys(b"974760673", None, 10).unwrap(), [a]);
        drop(store);
        let store = Db::open(dir.path()).unwrap();
        assert_eq!(store.get_many(&[a, c]).unwrap()[0], Some(value(Some(30))));
    }
}
