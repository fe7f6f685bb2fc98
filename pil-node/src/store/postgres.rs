//! The PostgreSQL engine, for regions that run several nodes on one replicated
//! database. Everything the region holds is in the database, so any node of the
//! region can answer any request and a node keeps nothing another one needs.
//!
//! Writes are grouped as on RocksDB: one task per node takes what is queued and commits
//! it in one transaction. Groups from different nodes are ordered by row locks taken
//! at the start of their transaction (`SELECT … FOR UPDATE` on a one-row coordinator),
//! not by a leader: the pointer writers of a region take turns, so outcomes
//! (inserted, updated, unchanged) stay exact, and the audit appenders take turns on the
//! tree's row, so two nodes can never give out the same index. Only plain SQL is used
//! (no advisory locks, no server-side functions), which PostgreSQL-compatible
//! distributed engines also support.

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{NoTls, Row};

use super::{
    AuditEntry, Closer, Figure, GroupStats, HeadSigning, LogEntry, LogSize, Moved, ORG_LEN, Op,
    OpResult, PatientMove, PatientRecords, PointerKey, Queues, Sealed, Store, StoreError,
    StoredBlock, StoredOptOut, StoredPatient, StoredPointer, Witnessed,
    events::{
        self, EventPage, Follower, Followers, Journal, PeerFollow, PeerState, StoredEvent,
        StoredSubscription, SubscriptionId,
    },
    merge_cosignatures, merge_patients,
    model::Change,
    plan::{Current, plan},
    take_queued,
    tree::{
        self, AuditJob, FetchedNodes, Group, Head, NodeRecorder, Sequencer, TreeReader, sequence,
    },
};
use crate::patient_keys::{PSEUDONYM_LEN, Pseudonym};

/// Most write operations or audit records committed in one transaction.
const MAX_GROUP: usize = 4096;
const QUEUE_DEPTH: usize = 8192;

/// The schema, one migration per version. A database at a version this node does not
/// know is refused.
const MIGRATIONS: &[&str] = &[
    // 1: pointers, protections and the audit log.
    "CREATE TABLE pointers (
         patient bytea NOT NULL,
         org bytea NOT NULL,
         ident bytea NOT NULL,
         value bytea NOT NULL,
         expiry bigint,
         PRIMARY KEY (patient, org, ident)
     );
     CREATE INDEX pointers_by_org ON pointers (org, patient, ident);
     CREATE INDEX pointers_by_expiry ON pointers (expiry) WHERE expiry IS NOT NULL;
     CREATE TABLE blocks (
         patient bytea NOT NULL,
         id bytea NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (patient, id)
     );
     CREATE TABLE opt_outs (patient bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE coordinator (name text PRIMARY KEY);
     INSERT INTO coordinator VALUES ('pointers');
     CREATE TABLE audit_tree (
         id integer PRIMARY KEY CHECK (id = 1),
         size bigint NOT NULL,
         signed bigint NOT NULL,
         peaks bytea NOT NULL,
         retained_from bigint NOT NULL
     );
     INSERT INTO audit_tree VALUES (1, 0, 0, '', 0);
     CREATE TABLE audit_records (
         idx bigint PRIMARY KEY,
         record bytea,
         patient bytea
     );
     CREATE INDEX audit_by_patient ON audit_records (patient, idx) WHERE patient IS NOT NULL;
     CREATE TABLE audit_nodes (
         level smallint NOT NULL,
         idx bigint NOT NULL,
         hash bytea NOT NULL,
         PRIMARY KEY (level, idx)
     );
     CREATE TABLE audit_heads (size bigint PRIMARY KEY, note text NOT NULL);",
    // 2: what every node of the region must refuse a second time (DPoP proofs).
    "CREATE TABLE seen_once (key text PRIMARY KEY, until bigint NOT NULL);
     CREATE INDEX seen_once_until ON seen_once (until);",
    // 3: subscriptions to pointer changes, and their events.
    "CREATE TABLE subscriptions (id bytea PRIMARY KEY, owner text NOT NULL, value bytea NOT NULL);
     CREATE INDEX subscriptions_by_owner ON subscriptions (owner);
     CREATE TABLE followers (
         patient bytea NOT NULL,
         subscription bytea NOT NULL,
         categories text[] NOT NULL,
         expires_at bigint NOT NULL,
         PRIMARY KEY (patient, subscription)
     );
     CREATE INDEX followers_by_subscription ON followers (subscription);
     CREATE TABLE event_counters (subscription bytea PRIMARY KEY, last bigint NOT NULL);
     CREATE TABLE events (
         subscription bytea NOT NULL,
         seq bigint NOT NULL,
         at bigint NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (subscription, seq)
     );
     CREATE INDEX events_by_time ON events (at);",
    // 4: how other regions follow a subscription made here, and where its events
    // collected from each stand.
    "CREATE TABLE peer_follows (
         subscription bytea NOT NULL,
         region text NOT NULL,
         state integer NOT NULL,
         detail text NOT NULL,
         position bigint NOT NULL,
         PRIMARY KEY (subscription, region)
     );",
    // 5: the routing tokens this region's membership summary is built over, in the
    // order they were stored (positions are given in the 'routing' turn).
    "CREATE TABLE routing_tokens (token bigint PRIMARY KEY, position bigint NOT NULL UNIQUE);
     CREATE TABLE routing_key (id integer PRIMARY KEY CHECK (id = 1), key_id text NOT NULL);
     INSERT INTO coordinator VALUES ('routing');",
    // 6: the journal of every pointer change, kept a bounded time, for subscriptions
    // registered after this region came to hold their patient.
    "CREATE TABLE journal (
         seq bigserial PRIMARY KEY,
         at bigint NOT NULL,
         patient bytea NOT NULL,
         value bytea NOT NULL
     );
     CREATE INDEX journal_by_patient ON journal (patient, seq);
     CREATE INDEX journal_by_time ON journal (at);
     CREATE TABLE journal_from (id integer PRIMARY KEY CHECK (id = 1), at bigint NOT NULL);
     INSERT INTO journal_from
         VALUES (1, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);",
    // 7: the checkpoint this region, as a witness, last cosigned for each log it
    // witnesses.
    "CREATE TABLE witnessed (
         origin text PRIMARY KEY,
         size bigint NOT NULL,
         root bytea NOT NULL,
         timestamp_ms bigint NOT NULL,
         checkpoint text NOT NULL
     );",
];

/// The schema version this node speaks, as the refusals name it.
const SCHEMA: &str = "schema version 7";

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq connection string or URL (`host=/run/postgresql dbname=pil`,
    /// `postgres://pil@db.example/pil`).
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// CA certificates (PEM) the database server's certificate must chain to; with it,
    /// connections use TLS (rustls) as the connection string's `sslmode` asks
    /// (`require`: never without).
    pub ca_file: Option<std::path::PathBuf>,
    /// A private file holding the password (its first line).
    pub password_file: Option<std::path::PathBuf>,
}

/// Records whose contents one retention transaction drops.
const RETENTION_PAGE: u64 = 10_000;

fn db_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::engine(e)
}

fn pool(config: &PgConfig) -> Result<Pool, StoreError> {
    let mut pg = tokio_postgres::Config::from_str(&config.url).map_err(db_error)?;
    pg.connect_timeout(config.connect_timeout);
    if let Some(file) = &config.password_file {
        pg.password(read_password(file)?);
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &config.ca_file {
        None => Manager::from_config(pg, NoTls, manager_config),
        Some(ca) => Manager::from_config(pg, tls(ca)?, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.pool_size.max(2))
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(db_error)
}

fn read_password(file: &std::path::Path) -> Result<String, StoreError> {
    const WHAT: &str = "the database password file";
    crate::secret_file::check_private(WHAT, file).map_err(db_error)?;
    let text = std::fs::read_to_string(file).map_err(|source| {
        db_error(crate::secret_file::SecretFileError::Read {
            what: WHAT,
            path: file.to_path_buf(),
            source,
        })
    })?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// TLS to the database, trusting the CAs in `ca`.
fn tls(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = crate::pki::load_certs(ca).map_err(db_error)?;
    for cert in certs {
        roots.add(cert).map_err(db_error)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(db_error)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(db_error)
}

/// The schema version the database is at (0: none).
async fn schema_version(c: &impl GenericClient) -> Result<u32, StoreError> {
    let exists: bool = c
        .query_one("SELECT to_regclass('pil_schema') IS NOT NULL", &[])
        .await
        .map_err(db_error)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = c
        .query_opt("SELECT version FROM pil_schema", &[])
        .await
        .map_err(db_error)?;
    Ok(row.map(|r| r.get::<_, i32>(0) as u32).unwrap_or(0))
}

/// Brings the database's schema to this node's version; returns the version. Safe to
/// run from several nodes at once: the schema table is locked while migrating.
pub async fn migrate(config: &PgConfig) -> Result<u32, StoreError> {
    let pool = pool(config)?;
    let mut c = client(&pool).await?;
    c.batch_execute("CREATE TABLE IF NOT EXISTS pil_schema (version integer NOT NULL)")
        .await
        .map_err(db_error)?;
    let tx = c.transaction().await.map_err(db_error)?;
    tx.batch_execute("LOCK TABLE pil_schema IN EXCLUSIVE MODE")
        .await
        .map_err(db_error)?;
    let at = schema_version(&tx).await?;
    let known = MIGRATIONS.len() as u32;
    if at > known {
        return Err(newer_schema(at));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(at as usize) {
        tx.batch_execute(step).await.map_err(db_error)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    tx.execute("DELETE FROM pil_schema", &[])
        .await
        .map_err(db_error)?;
    tx.execute("INSERT INTO pil_schema VALUES ($1)", &[&(known as i32)])
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(known)
}

fn newer_schema(at: u32) -> StoreError {
    StoreError::Format {
        found: format!("schema version {at}, from a newer node (run that version)"),
        expected: SCHEMA,
    }
}

/// Connects to the region's database, checks its schema and its audit log, and starts
/// this node's writer tasks.
pub async fn open(config: &PgConfig) -> Result<(Arc<dyn Store>, Closer), StoreError> {
    let pool = pool(config)?;
    {
        let c = client(&pool).await?;
        let at = schema_version(&c).await?;
        let known = MIGRATIONS.len() as u32;
        if at > known {
            return Err(newer_schema(at));
        }
        if at < known {
            return Err(StoreError::Format {
                found: format!(
                    "schema version {at}; run `pil-node migrate --config <node.toml>` first"
                ),
                expected: SCHEMA,
            });
        }
    }
    check_log(&pool).await?;
    let (write_tx, write_rx) = mpsc::channel(QUEUE_DEPTH);
    let (audit_tx, audit_rx) = mpsc::channel(QUEUE_DEPTH);
    let (write_stats, audit_stats) = (
        Arc::new(GroupStats::default()),
        Arc::new(GroupStats::default()),
    );
    let writer = tokio::spawn(write_loop(pool.clone(), write_rx, write_stats.clone()));
    let appender = tokio::spawn(audit_loop(pool.clone(), audit_rx, audit_stats.clone()));
    let store = PgStore {
        pool,
        writes: write_tx,
        audit: audit_tx,
        write_stats,
        audit_stats,
    };
    let closer = Closer::new(move || {
        for task in [writer, appender] {
            if futures::executor::block_on(task).is_err() {
                tracing::error!("a database writer task failed");
            }
        }
    });
    Ok((Arc::new(store), closer))
}

struct PgStore {
    pool: Pool,
    writes: mpsc::Sender<WriteJob>,
    audit: mpsc::Sender<AuditJob>,
    write_stats: Arc<GroupStats>,
    audit_stats: Arc<GroupStats>,
}

struct WriteJob {
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<Vec<OpResult>, StoreError>>,
}

fn key_of(row: &Row, first: usize) -> Result<PointerKey, StoreError> {
    let part = |i: usize| row.get::<_, &[u8]>(first + i);
    PointerKey::decode(&[part(0), part(1), part(2)].concat())
        .ok_or_else(|| corrupt("pointers", "key of the wrong length"))
}

/// A sealed identifier kept with a protection, if one was.
fn current_seal(sealed: Vec<u8>) -> Option<Sealed> {
    (!sealed.is_empty()).then_some(Sealed::Current(sealed))
}

fn corrupt(what: &'static str, detail: &str) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

/// A subscription id read from `what`'s column.
fn subscription_id(what: &'static str, bytes: &[u8]) -> Result<SubscriptionId, StoreError> {
    SubscriptionId::try_from(bytes).map_err(|_| corrupt(what, "a key of the wrong length"))
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| corrupt(what, &e.to_string()))
}

/// Key columns as three arrays (patient, organization, endpoint), for `unnest`.
type KeyColumns<'a> = (Vec<&'a [u8]>, Vec<&'a [u8]>, Vec<&'a [u8]>);

fn key_arrays(keys: &[PointerKey]) -> KeyColumns<'_> {
    let mut out = (
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
    );
    for k in keys {
        out.0.push(k.patient.as_slice());
        out.1.push(k.org.as_slice());
        out.2.push(k.ident.as_slice());
    }
    out
}

macro_rules! select_keys {
    () => {
        "SELECT p.patient, p.org, p.ident, p.value FROM pointers p
         JOIN unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(patient, org, ident)
           ON p.patient = k.patient AND p.org = k.org AND p.ident = k.ident"
    };
}

async fn read_keys(
    c: &impl GenericClient,
    keys: &[PointerKey],
    lock: bool,
) -> Result<HashMap<PointerKey, StoredPointer>, StoreError> {
    let (p, o, i) = key_arrays(keys);
    let sql = if lock {
        concat!(select_keys!(), " FOR UPDATE OF p")
    } else {
        select_keys!()
    };
    let rows = c.query(sql, &[&p, &o, &i]).await.map_err(db_error)?;
    rows.iter()
        .map(|r| Ok((key_of(r, 0)?, decode("pointers", r.get(3))?)))
        .collect()
}

/// Takes what is queued and commits it in one transaction, in turn with the other
/// nodes of the region.
async fn write_loop(pool: Pool, mut rx: mpsc::Receiver<WriteJob>, stats: Arc<GroupStats>) {
    while let Some(first) = rx.recv().await {
        let jobs = take_queued(&mut rx, first, MAX_GROUP, |j| j.ops.len(), &stats);
        let (ops, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.ops, j.reply)).unzip();
        match write_group(&pool, ops).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "write group failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Takes the region's turn at pointer writes (the coordinator's row lock) for the
/// rest of `tx`: groups, subscriptions and collected events number events in turn.
async fn take_pointer_turn(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "SELECT name FROM coordinator WHERE name = 'pointers' FOR UPDATE",
        &[],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The turn routing tokens are given positions in.
async fn take_routing_turn(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "SELECT name FROM coordinator WHERE name = 'routing' FOR UPDATE",
        &[],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn write_group(pool: &Pool, jobs: Vec<Vec<Op>>) -> Result<Vec<Vec<OpResult>>, StoreError> {
    let mut c = client(pool).await?;
    let tx = c.transaction().await.map_err(db_error)?;
    take_pointer_turn(&tx).await?;
    let mut keys: Vec<PointerKey> = jobs.iter().flatten().map(Op::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut stored = read_keys(&tx, &keys, true).await?;
    let mut current: Current = keys
        .iter()
        .map(|k| (*k, stored.remove(k).map(Arc::new)))
        .collect();
    let (changes, results) = plan(jobs, &mut current);
    // What each changed key holds at the end of the group: one row per key.
    let mut changed: Vec<PointerKey> = changes.iter().map(|c| *c.key()).collect();
    changed.sort_unstable();
    changed.dedup();
    let (mut put_keys, mut values, mut expiries, mut gone) = (vec![], vec![], vec![], vec![]);
    for key in changed {
        match current.get(&key).cloned().flatten() {
            Some(v) => {
                put_keys.push(key);
                values.push(v.encode_to_vec());
                expiries.push(v.effective_expiry());
            }
            None => gone.push(key),
        }
    }
    if !put_keys.is_empty() {
        let (p, o, i) = key_arrays(&put_keys);
        tx.execute(
            "INSERT INTO pointers (patient, org, ident, value, expiry)
             SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::int8[])
             ON CONFLICT (patient, org, ident)
             DO UPDATE SET value = EXCLUDED.value, expiry = EXCLUDED.expiry",
            &[&p, &o, &i, &values, &expiries],
        )
        .await
        .map_err(db_error)?;
    }
    if !gone.is_empty() {
        let (p, o, i) = key_arrays(&gone);
        tx.execute(
            "DELETE FROM pointers p USING unnest($1::bytea[], $2::bytea[], $3::bytea[])
                 AS k(patient, org, ident)
             WHERE p.patient = k.patient AND p.org = k.org AND p.ident = k.ident",
            &[&p, &o, &i],
        )
        .await
        .map_err(db_error)?;
    }
    // One time for the group's journal entries and events.
    let now = super::now_nanos();
    write_journal(&tx, &changes, now).await?;
    write_events(&tx, &changes, now).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(results)
}

/// Journals `changes`, in the group's transaction.
async fn write_journal(
    tx: &deadpool_postgres::Transaction<'_>,
    changes: &[Change],
    now: i64,
) -> Result<(), StoreError> {
    let entries = events::journal_for(changes, now);
    if entries.is_empty() {
        return Ok(());
    }
    let ats: Vec<i64> = entries.iter().map(|e| e.at).collect();
    let patients: Vec<&[u8]> = entries
        .iter()
        .map(|e| e.key.get(..PSEUDONYM_LEN).unwrap_or_default())
        .collect();
    let values: Vec<Vec<u8>> = entries.iter().map(|e| e.encode_to_vec()).collect();
    tx.execute(
        "INSERT INTO journal (at, patient, value)
         SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[])",
        &[&ats, &patients, &values],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Writes the events `changes` make for their patients' followers, in the group's
/// transaction (which holds the coordinator's lock, as subscribing does).
async fn write_events(
    tx: &deadpool_postgres::Transaction<'_>,
    changes: &[Change],
    now: i64,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let patients: Vec<Vec<u8>> = events::patients(changes)
        .iter()
        .map(|p| p.to_vec())
        .collect();
    let rows = tx
        .query(
            "SELECT patient, subscription, categories, expires_at FROM followers
             WHERE patient = ANY($1)",
            &[&patients],
        )
        .await
        .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut followers = Followers::new();
    for r in rows {
        let patient = Pseudonym::try_from(r.get::<_, &[u8]>(0))
            .map_err(|_| corrupt("followers", "a key of the wrong length"))?;
        let subscription = subscription_id("followers", r.get(1))?;
        followers.entry(patient).or_default().push(Follower {
            subscription,
            categories: r.get(2),
            expires_at: r.get(3),
        });
    }
    let ids: Vec<Vec<u8>> = events::subscriptions(changes, &followers)
        .iter()
        .map(|id| id.to_vec())
        .collect();
    let mut last: HashMap<SubscriptionId, u64> = HashMap::new();
    for r in tx
        .query(
            "SELECT subscription, last FROM event_counters WHERE subscription = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(db_error)?
    {
        let id = subscription_id("event_counters", r.get(0))?;
        last.insert(id, r.get::<_, i64>(1) as u64);
    }
    let made = events::events_for(changes, &followers, now, &mut last);
    if made.is_empty() {
        return Ok(());
    }
    let subs: Vec<&[u8]> = made.iter().map(|(id, _, _)| id.as_slice()).collect();
    let seqs: Vec<i64> = made.iter().map(|(_, n, _)| *n as i64).collect();
    let ats: Vec<i64> = made.iter().map(|(_, _, e)| e.at).collect();
    let values: Vec<Vec<u8>> = made.iter().map(|(_, _, e)| e.encode_to_vec()).collect();
    tx.execute(
        "INSERT INTO events (subscription, seq, at, value)
         SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[])",
        &[&subs, &seqs, &ats, &values],
    )
    .await
    .map_err(db_error)?;
    let (ids, lasts): (Vec<Vec<u8>>, Vec<i64>) =
        last.iter().map(|(id, n)| (id.to_vec(), *n as i64)).unzip();
    tx.execute(
        "INSERT INTO event_counters (subscription, last)
         SELECT * FROM unnest($1::bytea[], $2::int8[])
         ON CONFLICT (subscription) DO UPDATE SET last = EXCLUDED.last",
        &[&ids, &lasts],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The tree's coordinator row, locked for the transaction.
async fn lock_tree(tx: &deadpool_postgres::Transaction<'_>) -> Result<Sequencer, StoreError> {
    let row = tx
        .query_one(
            "SELECT size, signed, peaks FROM audit_tree WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(db_error)?;
    let peaks: Vec<u8> = row.get(2);
    let peaks = peaks
        .chunks(32)
        .map(|c| <[u8; 32]>::try_from(c).map_err(|_| corrupt("audit_tree", "peaks")))
        .collect::<Result<Vec<_>, _>>()?;
    Sequencer::from_parts(
        row.get::<_, i64>(0) as u64,
        peaks,
        row.get::<_, i64>(1) as u64,
    )
}

async fn audit_loop(pool: Pool, mut rx: mpsc::Receiver<AuditJob>, stats: Arc<GroupStats>) {
    while let Some(first) = rx.recv().await {
        let jobs = take_queued(&mut rx, first, MAX_GROUP, |_| 1, &stats);
        let mut owed = None;
        let written = async {
            let mut c = client(&pool).await?;
            let tx = c.transaction().await.map_err(db_error)?;
            let mut seq = lock_tree(&tx).await?;
            let mut group = Group::default();
            let (o, failed) = sequence(&mut seq, jobs, &mut group);
            owed = Some(o);
            if let Some(e) = failed {
                return Err(e);
            }
            write_tree_group(&tx, &seq, &group).await?;
            let head = latest_head(&tx).await?;
            tx.commit().await.map_err(db_error)?;
            Ok::<_, StoreError>(head)
        }
        .await;
        if let Err(e) = &written {
            tracing::error!(error = %e, "audit records could not be written");
        }
        if let Some(owed) = owed {
            owed.answer(&written);
        }
    }
}

async fn write_tree_group(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: &Sequencer,
    group: &Group,
) -> Result<(), StoreError> {
    if !group.records.is_empty() {
        let idx: Vec<i64> = group.records.iter().map(|r| r.index as i64).collect();
        let bytes: Vec<&[u8]> = group.records.iter().map(|r| r.bytes.as_slice()).collect();
        let patients: Vec<Option<&[u8]>> = group
            .records
            .iter()
            .map(|r| r.patient.as_ref().map(|p| p.as_slice()))
            .collect();
        tx.execute(
            "INSERT INTO audit_records (idx, record, patient)
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[])",
            &[&idx, &bytes, &patients],
        )
        .await
        .map_err(db_error)?;
    }
    if !group.nodes.is_empty() {
        let levels: Vec<i16> = group.nodes.iter().map(|n| i16::from(n.0)).collect();
        let idx: Vec<i64> = group.nodes.iter().map(|n| n.1 as i64).collect();
        let hashes: Vec<&[u8]> = group.nodes.iter().map(|n| n.2.as_slice()).collect();
        tx.execute(
            "INSERT INTO audit_nodes (level, idx, hash)
             SELECT * FROM unnest($1::int2[], $2::int8[], $3::bytea[])",
            &[&levels, &idx, &hashes],
        )
        .await
        .map_err(db_error)?;
    }
    for (size, note) in &group.heads {
        tx.execute(
            "INSERT INTO audit_heads (size, note) VALUES ($1, $2)",
            &[&(*size as i64), note],
        )
        .await
        .map_err(db_error)?;
    }
    if !group.is_empty() {
        tx.execute(
            "UPDATE audit_tree SET size = $1, signed = $2, peaks = $3 WHERE id = 1",
            &[
                &(seq.size() as i64),
                &(seq.signed() as i64),
                &seq.peaks().concat(),
            ],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

async fn latest_head(c: &impl GenericClient) -> Result<Head, StoreError> {
    Ok(c.query_opt(
        "SELECT size, note FROM audit_heads ORDER BY size DESC LIMIT 1",
        &[],
    )
    .await
    .map_err(db_error)?
    .map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
}

/// Runs `compute` over the tree: once to learn which nodes it reads, then on those
/// nodes fetched in one query.
async fn over_tree<T>(
    c: &impl GenericClient,
    head: Head,
    compute: impl Fn(&dyn TreeReader) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let recorder = NodeRecorder::with_head(head.clone());
    let _ = compute(&recorder);
    let asked = recorder.asked();
    let levels: Vec<i16> = asked.iter().map(|(l, _)| i16::from(*l)).collect();
    let idx: Vec<i64> = asked.iter().map(|(_, i)| *i as i64).collect();
    let rows = c
        .query(
            "SELECT n.level, n.idx, n.hash FROM audit_nodes n
             JOIN unnest($1::int2[], $2::int8[]) AS k(level, idx)
               ON n.level = k.level AND n.idx = k.idx",
            &[&levels, &idx],
        )
        .await
        .map_err(db_error)?;
    let mut nodes = HashMap::with_capacity(rows.len());
    for r in rows {
        let hash: Vec<u8> = r.get(2);
        let hash = <[u8; 32]>::try_from(hash.as_slice())
            .map_err(|_| corrupt("audit_nodes", "hash of the wrong length"))?;
        nodes.insert((r.get::<_, i16>(0) as u8, r.get::<_, i64>(1) as u64), hash);
    }
    compute(&FetchedNodes { nodes, head })
}

/// Checks the stored log against the newest head the region signed, as RocksDB's
/// engine does at start.
async fn check_log(pool: &Pool) -> Result<(), StoreError> {
    let c = client(pool).await?;
    let row = c
        .query_one("SELECT size, signed FROM audit_tree WHERE id = 1", &[])
        .await
        .map_err(db_error)?;
    let (size, signed) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
    // The tree's row remembers the signed size apart from the heads' table, so that
    // cutting the log together with the heads over its end is noticed too.
    if signed > size {
        return Err(StoreError::Cut(format!(
            "the log holds {size} records, a head covered {signed}"
        )));
    }
    let head = latest_head(&c).await?;
    over_tree(&c, head, |r| Sequencer::restore(&r, size).map(|_| ())).await
}

impl PgStore {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        client(&self.pool).await
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    fn queues(&self) -> Queues {
        Queues {
            writer: self.write_stats.figures(&self.writes),
            audit: self.audit_stats.figures(&self.audit),
        }
    }

    fn figures(&self) -> Vec<Figure> {
        let status = self.pool.status();
        vec![
            Figure {
                name: "pool_max_connections",
                value: status.max_size as u64,
            },
            Figure {
                name: "pool_connections",
                value: status.size as u64,
            },
            Figure {
                name: "pool_idle_connections",
                value: status.available as u64,
            },
            Figure {
                name: "pool_waiting",
                value: status.waiting as u64,
            },
        ]
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.writes
            .send(WriteJob { ops, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn patient(&self, patient: Pseudonym) -> Result<PatientRecords, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT 0, value, NULL::bytea, NULL::bytea, NULL::bytea
                   FROM opt_outs WHERE patient = $1
                 UNION ALL SELECT 1, value, NULL, NULL, NULL FROM blocks WHERE patient = $1
                 UNION ALL SELECT 2, value, patient, org, ident FROM pointers WHERE patient = $1",
                &[&patient.as_slice()],
            )
            .await
            .map_err(db_error)?;
        let mut out = PatientRecords::default();
        for r in &rows {
            let value: &[u8] = r.get(1);
            match r.get::<_, i32>(0) {
                0 => out.opt_out = Some(decode("opt_outs", value)?),
                1 => out.blocks.push(decode("blocks", value)?),
                _ => out
                    .pointers
                    .push((key_of(r, 2)?, decode("pointers", value)?)),
            }
        }
        if out.opt_out.is_some() {
            out.blocks.clear();
            out.pointers.clear();
        }
        Ok(out)
    }

    async fn get_many(
        &self,
        keys: Vec<PointerKey>,
    ) -> Result<Vec<Option<StoredPointer>>, StoreError> {
        let c = self.client().await?;
        let mut found = read_keys(&c, &keys, false).await?;
        Ok(keys.iter().map(|k| found.remove(k)).collect())
    }

    async fn patient_org_keys(
        &self,
        patient: Pseudonym,
        org: [u8; ORG_LEN],
    ) -> Result<Vec<PointerKey>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT patient, org, ident FROM pointers WHERE patient = $1 AND org = $2
                 ORDER BY ident",
                &[&patient.as_slice(), &org.as_slice()],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(|r| key_of(r, 0)).collect()
    }

    async fn org_keys(
        &self,
        org: [u8; ORG_LEN],
        after: Option<PointerKey>,
        limit: usize,
    ) -> Result<Vec<PointerKey>, StoreError> {
        let c = self.client().await?;
        let limit = limit as i64;
        let org = org.as_slice();
        let rows = match after {
            None => {
                c.query(
                    "SELECT patient, org, ident FROM pointers WHERE org = $1
                     ORDER BY patient, ident LIMIT $2",
                    &[&org, &limit],
                )
                .await
            }
            Some(a) => {
                let (patient, ident) = (a.patient.as_slice(), a.ident.as_slice());
                c.query(
                    "SELECT patient, org, ident FROM pointers
                     WHERE org = $1 AND (patient, ident) > ($2, $3)
                     ORDER BY patient, ident LIMIT $4",
                    &[&org, &patient, &ident, &limit],
                )
                .await
            }
        }
        .map_err(db_error)?;
        rows.iter().map(|r| key_of(r, 0)).collect()
    }

    async fn expired(&self, now: i64, limit: usize) -> Result<Vec<PointerKey>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT patient, org, ident FROM pointers WHERE expiry <= $1
                 ORDER BY expiry, patient, org, ident LIMIT $2",
                &[&now, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(|r| key_of(r, 0)).collect()
    }

    async fn patients_after(
        &self,
        after: Option<Pseudonym>,
        limit: usize,
    ) -> Result<Vec<StoredPatient>, StoreError> {
        let c = self.client().await?;
        // Before every pseudonym when there is no `after`.
        let after: Vec<u8> = after.map(|a| a.to_vec()).unwrap_or_default();
        let limit_rows = limit as i64;
        let mut sources = Vec::with_capacity(3);
        for (table, sql) in [
            (
                "pointers",
                "SELECT DISTINCT ON (patient) patient, value FROM pointers
                 WHERE patient > $1 ORDER BY patient LIMIT $2",
            ),
            (
                "blocks",
                "SELECT DISTINCT ON (patient) patient, value FROM blocks
                 WHERE patient > $1 ORDER BY patient LIMIT $2",
            ),
            (
                "opt_outs",
                "SELECT patient, value FROM opt_outs WHERE patient > $1 ORDER BY patient LIMIT $2",
            ),
        ] {
            let rows = c
                .query(sql, &[&after, &limit_rows])
                .await
                .map_err(db_error)?;
            let mut found = Vec::with_capacity(rows.len());
            for r in &rows {
                let pseudonym = Pseudonym::try_from(r.get::<_, &[u8]>(0))
                    .map_err(|_| corrupt(table, "a patient of the wrong length"))?;
                let value: &[u8] = r.get(1);
                let sealed = match table {
                    "pointers" => decode::<StoredPointer>(table, value)?.sealed(),
                    "blocks" => current_seal(decode::<StoredBlock>(table, value)?.sealed_patient),
                    _ => current_seal(decode::<StoredOptOut>(table, value)?.sealed_patient),
                };
                found.push(StoredPatient { pseudonym, sealed });
            }
            sources.push(found);
        }
        Ok(merge_patients(sources, limit))
    }

    async fn move_patients(&self, moves: Vec<PatientMove>) -> Result<Moved, StoreError> {
        if moves.is_empty() {
            return Ok(Moved::default());
        }
        let to: HashMap<&[u8], &PatientMove> =
            moves.iter().map(|m| (m.from.as_slice(), m)).collect();
        let from: Vec<&[u8]> = to.keys().copied().collect();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        take_pointer_turn(&tx).await?;
        let mut moved = Moved::default();
        let rows = tx
            .query(
                "DELETE FROM pointers WHERE patient = ANY($1) RETURNING patient, org, ident, value",
                &[&from],
            )
            .await
            .map_err(db_error)?;
        let (mut keys, mut values, mut expiries) = (vec![], vec![], vec![]);
        for r in &rows {
            let key = key_of(r, 0)?;
            let m = to[key.patient.as_slice()];
            let value = decode::<StoredPointer>("pointers", r.get(3))?.resealed(&m.sealed);
            keys.push(PointerKey {
                patient: m.to,
                ..key
            });
            expiries.push(value.effective_expiry());
            values.push(value.encode_to_vec());
        }
        moved.pointers = keys.len() as u64;
        if !keys.is_empty() {
            let (p, o, i) = key_arrays(&keys);
            tx.execute(
                "INSERT INTO pointers (patient, org, ident, value, expiry)
                 SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::int8[])
                 ON CONFLICT (patient, org, ident) DO NOTHING",
                &[&p, &o, &i, &values, &expiries],
            )
            .await
            .map_err(db_error)?;
        }
        let rows = tx
            .query(
                "DELETE FROM blocks WHERE patient = ANY($1) RETURNING patient, id, value",
                &[&from],
            )
            .await
            .map_err(db_error)?;
        for r in &rows {
            let m = to[r.get::<_, &[u8]>(0)];
            let mut block: StoredBlock = decode("blocks", r.get(2))?;
            block.sealed_patient = m.sealed.clone();
            tx.execute(
                "INSERT INTO blocks (patient, id, value) VALUES ($1, $2, $3)
                 ON CONFLICT (patient, id) DO NOTHING",
                &[
                    &m.to.as_slice(),
                    &r.get::<_, &[u8]>(1),
                    &block.encode_to_vec(),
                ],
            )
            .await
            .map_err(db_error)?;
        }
        let opt_outs = tx
            .query(
                "DELETE FROM opt_outs WHERE patient = ANY($1) RETURNING patient, value",
                &[&from],
            )
            .await
            .map_err(db_error)?;
        for r in &opt_outs {
            let m = to[r.get::<_, &[u8]>(0)];
            let mut o: StoredOptOut = decode("opt_outs", r.get(1))?;
            o.sealed_patient = m.sealed.clone();
            tx.execute(
                "INSERT INTO opt_outs (patient, value) VALUES ($1, $2)
                 ON CONFLICT (patient) DO NOTHING",
                &[&m.to.as_slice(), &o.encode_to_vec()],
            )
            .await
            .map_err(db_error)?;
        }
        moved.protections = (rows.len() + opt_outs.len()) as u64;
        tx.commit().await.map_err(db_error)?;
        Ok(moved)
    }

    async fn put_block(
        &self,
        patient: Pseudonym,
        id: [u8; 16],
        block: StoredBlock,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO blocks (patient, id, value) VALUES ($1, $2, $3)
             ON CONFLICT (patient, id) DO UPDATE SET value = EXCLUDED.value",
            &[&patient.as_slice(), &id.as_slice(), &block.encode_to_vec()],
        )
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn delete_block(&self, patient: Pseudonym, id: [u8; 16]) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM blocks WHERE patient = $1 AND id = $2",
                &[&patient.as_slice(), &id.as_slice()],
            )
            .await
            .map_err(db_error)?;
        Ok(n > 0)
    }

    async fn blocks(&self, patient: Pseudonym) -> Result<Vec<([u8; 16], StoredBlock)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id, value FROM blocks WHERE patient = $1 ORDER BY id",
                &[&patient.as_slice()],
            )
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let id = <[u8; 16]>::try_from(r.get::<_, &[u8]>(0))
                    .map_err(|_| corrupt("blocks", "id of the wrong length"))?;
                Ok((id, decode("blocks", r.get(1))?))
            })
            .collect()
    }

    async fn set_opt_out(
        &self,
        patient: Pseudonym,
        opt_out: Option<StoredOptOut>,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        let existed = tx
            .execute(
                "DELETE FROM opt_outs WHERE patient = $1",
                &[&patient.as_slice()],
            )
            .await
            .map_err(db_error)?
            > 0;
        if let Some(o) = opt_out {
            tx.execute(
                "INSERT INTO opt_outs (patient, value) VALUES ($1, $2)",
                &[&patient.as_slice(), &o.encode_to_vec()],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(existed)
    }

    async fn opt_out(&self, patient: Pseudonym) -> Result<Option<StoredOptOut>, StoreError> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT value FROM opt_outs WHERE patient = $1",
            &[&patient.as_slice()],
        )
        .await
        .map_err(db_error)?
        .map(|r| decode("opt_outs", r.get(0)))
        .transpose()
    }

    async fn audit_append(&self, entry: Box<dyn AuditEntry>) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.audit
            .send(AuditJob::Append(entry, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn audit_sign(&self, signer: Arc<dyn HeadSigning>) -> Result<Head, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.audit
            .send(AuditJob::Sign(signer, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn audit_size(&self) -> Result<LogSize, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT size, signed FROM audit_tree WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        Ok(LogSize {
            size: row.get::<_, i64>(0) as u64,
            signed: row.get::<_, i64>(1) as u64,
        })
    }

    async fn audit_record(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt(
            "SELECT record FROM audit_records WHERE idx = $1",
            &[&(index as i64)],
        )
        .await
        .map_err(db_error)?
        .and_then(|r| r.get::<_, Option<Vec<u8>>>(0)))
    }

    async fn audit_records(
        &self,
        from: u64,
        ascending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let c = self.client().await?;
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let sql = if ascending {
            "SELECT idx, record FROM audit_records WHERE idx >= $1 AND record IS NOT NULL
             ORDER BY idx LIMIT $2"
        } else {
            "SELECT idx, record FROM audit_records WHERE idx < $1 AND record IS NOT NULL
             ORDER BY idx DESC LIMIT $2"
        };
        let rows = c
            .query(sql, &[&from, &(limit as i64)])
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    async fn audit_patient_indexes(
        &self,
        patient: Pseudonym,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let c = self.client().await?;
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT idx FROM audit_records WHERE patient = $1 AND idx < $2
                 ORDER BY idx DESC LIMIT $3",
                &[&patient.as_slice(), &before, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<LogEntry>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT n.idx, r.record, n.hash FROM audit_nodes n
                 LEFT JOIN audit_records r ON r.idx = n.idx
                 WHERE n.level = 0 AND n.idx >= $1 AND n.idx < $2 ORDER BY n.idx",
                &[&(start as i64), &(end as i64)],
            )
            .await
            .map_err(db_error)?;
        if rows.len() as u64 != end.saturating_sub(start) {
            return Err(StoreError::Tree(format!(
                "leaf hashes missing between {start} and {end}"
            )));
        }
        rows.iter()
            .map(|r| {
                let hash: Vec<u8> = r.get(2);
                Ok(LogEntry {
                    index: r.get::<_, i64>(0) as u64,
                    record: r.get(1),
                    leaf_hash: <[u8; 32]>::try_from(hash.as_slice())
                        .map_err(|_| corrupt("audit_nodes", "hash of the wrong length"))?,
                })
            })
            .collect()
    }

    async fn audit_heads_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT size, note FROM audit_heads WHERE size > $1 ORDER BY size LIMIT $2",
                &[
                    &i64::try_from(after).unwrap_or(i64::MAX),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    async fn audit_latest_head(&self) -> Result<Head, StoreError> {
        latest_head(&self.client().await?).await
    }

    async fn audit_inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let c = self.client().await?;
        over_tree(&c, None, |r| tree::inclusion_proof(&r, index, size)).await
    }

    async fn audit_consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let c = self.client().await?;
        over_tree(&c, None, |r| tree::consistency_proof(&r, old, new)).await
    }

    async fn audit_retained_from(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        Ok(
            c.query_one("SELECT retained_from FROM audit_tree WHERE id = 1", &[])
                .await
                .map_err(db_error)?
                .get::<_, i64>(0) as u64,
        )
    }

    async fn audit_drop_contents(
        &self,
        upto: u64,
        _patients: Vec<(u64, Pseudonym)>,
    ) -> Result<(), StoreError> {
        // In pages, each its own transaction: years of records dropped at once would
        // otherwise be one transaction holding every row it changed.
        let mut from = self.audit_retained_from().await?;
        let mut c = self.client().await?;
        while from < upto {
            let to = upto.min(from + RETENTION_PAGE);
            let tx = c.transaction().await.map_err(db_error)?;
            tx.execute(
                "UPDATE audit_records SET record = NULL, patient = NULL
                 WHERE idx >= $1 AND idx < $2 AND record IS NOT NULL",
                &[&(from as i64), &(to as i64)],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                "UPDATE audit_tree SET retained_from = GREATEST(retained_from, $1) WHERE id = 1",
                &[&(to as i64)],
            )
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            from = to;
        }
        Ok(())
    }

    async fn put_subscription(
        &self,
        id: SubscriptionId,
        subscription: StoredSubscription,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        // In turn with pointer groups: a group sees the followers or committed first.
        take_pointer_turn(&tx).await?;
        tx.execute(
            "INSERT INTO subscriptions (id, owner, value) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, value = EXCLUDED.value",
            &[
                &id.as_slice(),
                &subscription.owner,
                &subscription.encode_to_vec(),
            ],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM followers WHERE subscription = $1",
            &[&id.as_slice()],
        )
        .await
        .map_err(db_error)?;
        let followers = subscription.followers(id);
        if !followers.is_empty() {
            let patients: Vec<&[u8]> = followers.iter().map(|(p, _)| p.as_slice()).collect();
            let subs: Vec<&[u8]> = vec![id.as_slice(); followers.len()];
            // One text array per row does not fit unnest's arrays of one dimension:
            // the categories are the subscription's, the same for every row.
            tx.execute(
                "INSERT INTO followers (patient, subscription, categories, expires_at)
                 SELECT p, s, $3::text[], $4::int8 FROM unnest($1::bytea[], $2::bytea[]) AS f(p, s)
                 ON CONFLICT DO NOTHING",
                &[
                    &patients,
                    &subs,
                    &subscription.categories,
                    &subscription.expires_at,
                ],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(())
    }

    async fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<Option<StoredSubscription>, StoreError> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT value FROM subscriptions WHERE id = $1",
            &[&id.as_slice()],
        )
        .await
        .map_err(db_error)?
        .map(|r| decode("subscriptions", r.get(0)))
        .transpose()
    }

    async fn subscriptions_of(
        &self,
        owner: String,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        let c = self.client().await?;
        c.query(
            "SELECT id, value FROM subscriptions WHERE owner = $1 ORDER BY id",
            &[&owner],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| {
            let id = subscription_id("subscriptions", r.get(0))?;
            Ok((id, decode("subscriptions", r.get(1))?))
        })
        .collect()
    }

    async fn events(
        &self,
        id: SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let c = self.client().await?;
        // One snapshot for the page and its bounds.
        let row = c
            .query_one(
                "SELECT (SELECT last FROM event_counters WHERE subscription = $1),
                        (SELECT min(seq) FROM events WHERE subscription = $1)",
                &[&id.as_slice()],
            )
            .await
            .map_err(db_error)?;
        let last = row.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
        let oldest = row.get::<_, Option<i64>>(1).map(|n| n as u64);
        let rows = c
            .query(
                "SELECT seq, value FROM events WHERE subscription = $1 AND seq > $2
                 ORDER BY seq LIMIT $3",
                &[
                    &id.as_slice(),
                    &(after.min(i64::MAX as u64) as i64),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(db_error)?;
        let events = rows
            .iter()
            .map(|r| Ok((r.get::<_, i64>(0) as u64, decode("events", r.get(1))?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(EventPage {
            events,
            last,
            first_kept: events::first_kept(oldest, last),
        })
    }

    async fn events_due(&self, before: i64) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(
            c.query_opt("SELECT 1 FROM events WHERE at < $1 LIMIT 1", &[&before])
                .await
                .map_err(db_error)?
                .is_some(),
        )
    }

    async fn drop_events(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM events WHERE (subscription, seq) IN
                 (SELECT subscription, seq FROM events WHERE at < $1 LIMIT $2)",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        Ok(n as usize)
    }

    async fn journal(&self, patients: Vec<Pseudonym>, since: i64) -> Result<Journal, StoreError> {
        let c = self.client().await?;
        let patients: Vec<&[u8]> = patients.iter().map(|p| p.as_slice()).collect();
        let events = c
            .query(
                "SELECT value FROM journal WHERE patient = ANY($1) AND at >= $2 ORDER BY seq",
                &[&patients, &since],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| decode("journal", r.get(0)))
            .collect::<Result<Vec<StoredEvent>, StoreError>>()?;
        let complete_from = c
            .query_one("SELECT at FROM journal_from WHERE id = 1", &[])
            .await
            .map_err(db_error)?
            .get(0);
        Ok(Journal {
            events,
            complete_from,
        })
    }

    async fn drop_journal(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        let dropped = tx
            .query(
                "DELETE FROM journal WHERE seq IN
                 (SELECT seq FROM journal WHERE at < $1 ORDER BY at LIMIT $2)
                 RETURNING at",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        let newest = dropped.iter().map(|r| r.get::<_, i64>(0)).max();
        let from = if dropped.len() < limit {
            Some(before)
        } else {
            newest.map(|at| at + 1)
        };
        if let Some(from) = from {
            tx.execute(
                "UPDATE journal_from SET at = greatest(at, $1) WHERE id = 1",
                &[&from],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(dropped.len())
    }

    async fn all_subscriptions(
        &self,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, StoreError> {
        let c = self.client().await?;
        c.query("SELECT id, value FROM subscriptions ORDER BY id", &[])
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| {
                let id = subscription_id("subscriptions", r.get(0))?;
                Ok((id, decode("subscriptions", r.get(1))?))
            })
            .collect()
    }

    async fn peer_follows(&self, id: SubscriptionId) -> Result<Vec<PeerFollow>, StoreError> {
        let c = self.client().await?;
        Ok(c.query(
            "SELECT region, state, detail, position FROM peer_follows
                 WHERE subscription = $1 ORDER BY region",
            &[&id.as_slice()],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| PeerFollow {
            region: r.get(0),
            state: r.get(1),
            detail: r.get(2),
            position: r.get::<_, i64>(3) as u64,
        })
        .collect())
    }

    async fn set_peer_follow(
        &self,
        id: SubscriptionId,
        region: String,
        state: PeerState,
        detail: String,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO peer_follows (subscription, region, state, detail, position)
             VALUES ($1, $2, $3, $4, 0)
             ON CONFLICT (subscription, region)
             DO UPDATE SET state = EXCLUDED.state, detail = EXCLUDED.detail",
            &[&id.as_slice(), &region, &(state as i32), &detail],
        )
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn collect_events(
        &self,
        id: SubscriptionId,
        region: String,
        from: u64,
        to: u64,
        collected: Vec<StoredEvent>,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        // In turn with pointer groups, which number this subscription's events too.
        take_pointer_turn(&tx).await?;
        let position = tx
            .query_opt(
                "SELECT position FROM peer_follows WHERE subscription = $1 AND region = $2",
                &[&id.as_slice(), &region],
            )
            .await
            .map_err(db_error)?
            .map_or(0, |r| r.get::<_, i64>(0) as u64);
        if position != from {
            return Ok(false);
        }
        let last = tx
            .query_opt(
                "SELECT last FROM event_counters WHERE subscription = $1",
                &[&id.as_slice()],
            )
            .await
            .map_err(db_error)?
            .map_or(0, |r| r.get::<_, i64>(0));
        let seqs: Vec<i64> = (1..=collected.len() as i64).map(|i| last + i).collect();
        let subs: Vec<&[u8]> = vec![id.as_slice(); collected.len()];
        let ats: Vec<i64> = collected.iter().map(|e| e.at).collect();
        let values: Vec<Vec<u8>> = collected.iter().map(|e| e.encode_to_vec()).collect();
        tx.execute(
            "INSERT INTO events (subscription, seq, at, value)
             SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[])",
            &[&subs, &seqs, &ats, &values],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO event_counters (subscription, last) VALUES ($1, $2)
             ON CONFLICT (subscription) DO UPDATE SET last = EXCLUDED.last",
            &[&id.as_slice(), &(last + collected.len() as i64)],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO peer_follows (subscription, region, state, detail, position)
             VALUES ($1, $2, $3, '', $4)
             ON CONFLICT (subscription, region) DO UPDATE SET position = EXCLUDED.position",
            &[
                &id.as_slice(),
                &region,
                &(PeerState::Following as i32),
                &(to.min(i64::MAX as u64) as i64),
            ],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn audit_add_cosignatures(&self, size: u64, lines: String) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let note: String = tx
            .query_opt(
                "SELECT note FROM audit_heads WHERE size = $1 FOR UPDATE",
                &[&size],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::Tree(format!("no signed head of size {size}")))?
            .get(0);
        let merged = merge_cosignatures(&note, &lines)?;
        tx.execute(
            "UPDATE audit_heads SET note = $2 WHERE size = $1",
            &[&size, &merged],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn witnessed(&self, origin: String) -> Result<Option<Witnessed>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT size, root, timestamp_ms, checkpoint FROM witnessed WHERE origin = $1",
                &[&origin],
            )
            .await
            .map_err(db_error)?;
        row.map(|r| {
            let root: Vec<u8> = r.get(1);
            Ok(Witnessed {
                size: r.get::<_, i64>(0) as u64,
                root: root
                    .try_into()
                    .map_err(|_| corrupt("witnessed", "root of the wrong length"))?,
                timestamp_ms: r.get::<_, i64>(2) as u64,
                checkpoint: r.get(3),
            })
        })
        .transpose()
    }

    async fn witness_advance(
        &self,
        origin: String,
        old: u64,
        new: Witnessed,
    ) -> Result<Result<(), u64>, StoreError> {
        let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let c = self.client().await?;
        // One statement: inserted when none is stored and `old` is 0, updated only
        // from `old` and never to a smaller size; a concurrent advance from the same
        // size finds the new size.
        let changed = c
            .execute(
                "INSERT INTO witnessed AS w (origin, size, root, timestamp_ms, checkpoint)
                 SELECT $1, $2, $3, $4, $5 WHERE $2::bigint >= $6::bigint AND ($6::bigint = 0 OR EXISTS
                     (SELECT 1 FROM witnessed WHERE origin = $1 AND size = $6::bigint))
                 ON CONFLICT (origin) DO UPDATE SET size = EXCLUDED.size,
                     root = EXCLUDED.root, timestamp_ms = EXCLUDED.timestamp_ms,
                     checkpoint = EXCLUDED.checkpoint
                 WHERE w.size = $6::bigint AND EXCLUDED.size >= $6::bigint",
                &[
                    &origin,
                    &big(new.size),
                    &new.root.as_slice(),
                    &big(new.timestamp_ms),
                    &new.checkpoint,
                    &big(old),
                ],
            )
            .await
            .map_err(db_error)?;
        if changed == 1 {
            return Ok(Ok(()));
        }
        Ok(Err(self.witnessed(origin).await?.map_or(0, |w| w.size)))
    }

    async fn routing_key_id(&self) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT key_id FROM routing_key WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_routing_key(&self, key_id: String, clear: bool) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        take_routing_turn(&tx).await?;
        if clear {
            tx.batch_execute("DELETE FROM routing_tokens")
                .await
                .map_err(db_error)?;
        }
        tx.execute(
            "INSERT INTO routing_key (id, key_id) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET key_id = EXCLUDED.key_id",
            &[&key_id],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn add_routing_tokens(&self, key_id: String, tokens: Vec<u64>) -> Result<(), StoreError> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut tokens: Vec<i64> = tokens.into_iter().map(|t| t as i64).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        // In turn, so a reader that sees a position has seen every earlier one.
        take_routing_turn(&tx).await?;
        let stored: Option<String> = tx
            .query_opt("SELECT key_id FROM routing_key WHERE id = 1", &[])
            .await
            .map_err(db_error)?
            .map(|r| r.get(0));
        super::routing_key_matches(stored.as_deref(), &key_id)?;
        tx.execute(
            "INSERT INTO routing_tokens (token, position)
             SELECT t, (SELECT coalesce(max(position), 0) FROM routing_tokens) + row_number() OVER ()
             FROM unnest($1::bigint[]) AS t
             WHERE NOT EXISTS (SELECT 1 FROM routing_tokens r WHERE r.token = t)",
            &[&tokens],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn routing_tokens(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let c = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT position, token FROM routing_tokens WHERE position > $1
                 ORDER BY position LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn claim_once(&self, key: String, until: i64) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let n = c
            .execute(
                "INSERT INTO seen_once (key, until) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET until = EXCLUDED.until
                 WHERE seen_once.until <= $3",
                &[&key, &until, &now],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn forget_claims(&self, now: i64) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM seen_once WHERE until <= $1", &[&now])
            .await
            .map_err(db_error)?;
        Ok(())
    }
}
