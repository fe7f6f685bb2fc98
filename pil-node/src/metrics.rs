//! Prometheus metrics, served as OpenMetrics text on their own plain-HTTP listener
//! (`[metrics] listen`), off the client-facing mTLS port. The gRPC figures use the
//! names the gRPC ecosystem's interceptors use, so existing dashboards work. No label
//! names a patient or a person: only services, methods, status codes, decisions and
//! peer regions.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use http_body::Frame;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// How long a request may take, in seconds: 0.25 ms to about 8 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    grpc_type: &'static str,
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handled {
    grpc_type: &'static str,
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerOutcome {
    peer: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerRoute {
    peer: String,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Log {
    log: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Alarm {
    log: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WitnessOutcome {
    witness: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Witness {
    witness: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: &'static str,
}

/// The engine figures exported, by the store's name for them: metric name and help.
const FIGURES: &[(&str, &str, &str)] = &[
    (
        "estimated_pointers",
        "pil_rocksdb_estimated_pointers",
        "Pointers stored, as RocksDB estimates them",
    ),
    (
        "estimated_audit_records",
        "pil_rocksdb_estimated_audit_records",
        "Audit records stored, as RocksDB estimates them",
    ),
    (
        "sst_bytes",
        "pil_rocksdb_sst_bytes",
        "Bytes of RocksDB table files",
    ),
    (
        "memtable_bytes",
        "pil_rocksdb_memtable_bytes",
        "Bytes of RocksDB memtables",
    ),
    (
        "block_cache_bytes",
        "pil_rocksdb_block_cache_bytes",
        "Bytes in RocksDB's block cache",
    ),
    (
        "pending_compaction_bytes",
        "pil_rocksdb_pending_compaction_bytes",
        "Bytes RocksDB estimates compaction still has to rewrite",
    ),
    (
        "running_compactions",
        "pil_rocksdb_running_compactions",
        "RocksDB compactions running now",
    ),
    (
        "background_errors",
        "pil_rocksdb_background_errors",
        "RocksDB background errors (a full disk, I/O errors) since start",
    ),
    (
        "pool_max_connections",
        "pil_postgres_pool_max_connections",
        "Most connections the PostgreSQL pool opens",
    ),
    (
        "pool_connections",
        "pil_postgres_pool_connections",
        "Connections the PostgreSQL pool holds",
    ),
    (
        "pool_idle_connections",
        "pil_postgres_pool_idle_connections",
        "Pool connections not in use",
    ),
    (
        "pool_waiting",
        "pil_postgres_pool_waiting",
        "Tasks waiting for a pool connection",
    ),
];

/// Reads a figure that lives elsewhere (a peer's breaker) just before a scrape.
type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    refresh: std::sync::Mutex<Vec<Refresh>>,
    audit_append_seconds: Histogram,
    audit_append_failures: Counter,
    peer_circuit: Family<Peer, Gauge>,
    replay_entries: Gauge,
    replay_capacity: Gauge,
    started: Family<Rpc, Counter>,
    handled: Family<Handled, Counter>,
    handling: Histograms<Rpc>,
    lookups: Family<Decision, Counter>,
    forwarded: Family<PeerOutcome, Counter>,
    forwarded_seconds: Histograms<Peer>,
    queue_waiting: Family<Queue, Gauge>,
    queue_groups: Family<Queue, Counter>,
    queue_items: Family<Queue, Counter>,
    figures: std::collections::HashMap<&'static str, Gauge>,
    token_cache_hits: Counter,
    token_cache_misses: Counter,
    dpop_replays: Counter,
    dpop_full: Counter,
    event_delivery_seconds: Histogram,
    rekey_progress: Gauge<f64, std::sync::atomic::AtomicU64>,
    rekey_moved: Gauge,
    pseudonym_keys_read: Gauge,
    routed: Family<PeerRoute, Counter>,
    summary_age: Family<Peer, Gauge<f64, std::sync::atomic::AtomicU64>>,
    tokens_evaluated: Family<Peer, Counter>,
    summary_patients: Gauge,
    witness_cosigned: Family<Log, Counter>,
    witness_alarms: Family<Alarm, Counter>,
    cosignatures: Family<WitnessOutcome, Counter>,
    witnessed_size: Family<Witness, Gauge>,
    published_size: Gauge,
    rate_limited: Family<Organization, Counter>,
    connections: Gauge,
    connections_refused: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Organization {
    organization: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Raises a counter that mirrors a count kept elsewhere to that count.
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// How a lookup was decided, as the metrics count it.
#[derive(Debug, Clone, Copy)]
pub enum LookupDecision {
    Allowed,
    Emergency,
    Denied,
    Unauthenticated,
    /// Refused for another reason (bad input, overload, storage).
    Failed,
}

impl Metrics {
    pub fn new() -> Self {
        Self::for_engine(&[])
    }

    /// The node's metrics, with a gauge for each of `figures` (the names the store
    /// engine reports; see [`crate::store::Store::figures`]).
    pub fn for_engine(figures: &[&str]) -> Self {
        let mut registry = Registry::default();
        let started = Family::<Rpc, Counter>::default();
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            started.clone(),
        );
        let handled = Family::<Handled, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            handled.clone(),
        );
        let handling: Histograms<Rpc> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its last message, in seconds",
            handling.clone(),
        );
        let lookups = Family::<Decision, Counter>::default();
        registry.register(
            "pil_lookups",
            "Lookups answered by this node as home node, by decision",
            lookups.clone(),
        );
        let forwarded = Family::<PeerOutcome, Counter>::default();
        registry.register(
            "pil_forwarded_lookups",
            "Lookups this node forwarded to a peer region, by the peer's outcome",
            forwarded.clone(),
        );
        let forwarded_seconds: Histograms<Peer> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "pil_forwarded_lookup_seconds",
            "Time a peer region took to answer a forwarded lookup, in seconds",
            forwarded_seconds.clone(),
        );
        let audit_append_seconds = latency_buckets();
        registry.register(
            "pil_audit_append_seconds",
            "Time to make one audit record durable (its group commit included), in seconds",
            audit_append_seconds.clone(),
        );
        let audit_append_failures = Counter::default();
        registry.register(
            "pil_audit_append_failures",
            "Audit records that could not be made durable (their requests were refused)",
            audit_append_failures.clone(),
        );
        let routed = Family::<PeerRoute, Counter>::default();
        registry.register(
            "pil_routing_decisions",
            "How this node's lookups treated each peer region: asked because its summary \
             may hold the patient (may_hold), because it is stale or missing (stale, \
             no_summary, no_token), because every region was asked (all_regions), or not \
             asked (holds_nothing)",
            routed.clone(),
        );
        let summary_age = Family::<Peer, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "pil_routing_summary_age_seconds",
            "Age of the routing summary this node holds for a peer region (since it asked \
             for it); past the staleness bound the peer is asked about every patient",
            summary_age.clone(),
        );
        let tokens_evaluated = Family::<Peer, Counter>::default();
        registry.register(
            "pil_routing_tokens_evaluated",
            "Blinded routing tokens this node evaluated for a peer region (it learns \
             neither patient nor token)",
            tokens_evaluated.clone(),
        );
        let summary_patients = Gauge::default();
        registry.register(
            "pil_routing_summary_patients",
            "Patients this region's published routing summary covers",
            summary_patients.clone(),
        );
        let peer_circuit = Family::<Peer, Gauge>::default();
        registry.register(
            "pil_peer_circuit_state",
            "A peer region's circuit breaker: 0 closed, 1 half-open (one trial call), 2 open",
            peer_circuit.clone(),
        );
        let replay_entries = Gauge::default();
        registry.register(
            "pil_dpop_replay_cache_entries",
            "DPoP proofs remembered against replay at this node",
            replay_entries.clone(),
        );
        let replay_capacity = Gauge::default();
        registry.register(
            "pil_dpop_replay_cache_capacity",
            "The most DPoP proofs the replay cache holds; when full, new proofs are refused",
            replay_capacity.clone(),
        );
        let queue_waiting = Family::<Queue, Gauge>::default();
        registry.register(
            "pil_store_queue_waiting",
            "Jobs waiting in the store's pointer writer or audit appender queue",
            queue_waiting.clone(),
        );
        let queue_groups = Family::<Queue, Counter>::default();
        registry.register(
            "pil_store_groups",
            "Group commits of the pointer writer or the audit appender",
            queue_groups.clone(),
        );
        let queue_items = Family::<Queue, Counter>::default();
        registry.register(
            "pil_store_group_items",
            "What the group commits held (pointer operations; audit records and head \
             signings): divided by pil_store_groups_total, the mean group size",
            queue_items.clone(),
        );
        let mut gauges = std::collections::HashMap::new();
        for (figure, name, help) in FIGURES {
            if figures.contains(figure) {
                let gauge = Gauge::default();
                registry.register(*name, *help, gauge.clone());
                gauges.insert(*figure, gauge);
            }
        }
        let token_cache_hits = Counter::default();
        registry.register(
            "pil_token_cache_hits",
            "Access tokens whose signature check was reused from the token cache",
            token_cache_hits.clone(),
        );
        let token_cache_misses = Counter::default();
        registry.register(
            "pil_token_cache_misses",
            "Access tokens whose signature was checked (not in the token cache)",
            token_cache_misses.clone(),
        );
        let dpop_replays = Counter::default();
        registry.register(
            "pil_dpop_replays_refused",
            "DPoP proofs refused because they had been used before",
            dpop_replays.clone(),
        );
        let dpop_full = Counter::default();
        registry.register(
            "pil_dpop_replay_cache_full_refusals",
            "DPoP proofs refused because the replay cache was full",
            dpop_full.clone(),
        );
        let event_delivery_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "pil_event_delivery_lag_seconds",
            "Time from a change to its event's delivery to the subscriber, in seconds",
            event_delivery_seconds.clone(),
        );
        let rekey_progress = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "pil_pseudonym_rekey_progress_ratio",
            "Share of the store the current re-keying pass has walked (1 when done or idle)",
            rekey_progress.clone(),
        );
        let rekey_moved = Gauge::default();
        registry.register(
            "pil_pseudonym_rekey_patients_moved",
            "Patients moved to the pseudonym key in force since the key ring last changed",
            rekey_moved.clone(),
        );
        let pseudonym_keys_read = Gauge::default();
        registry.register(
            "pil_pseudonym_keys_read",
            "Pseudonym keys a lookup reads the registry under (more than 1 during a rotation)",
            pseudonym_keys_read.clone(),
        );
        let witness_cosigned = Family::<Log, Counter>::default();
        registry.register(
            "pil_witness_cosigned",
            "Checkpoints of another log this node cosigned as its witness",
            witness_cosigned.clone(),
        );
        let witness_alarms = Family::<Alarm, Counter>::default();
        registry.register(
            "pil_witness_alarms",
            "Signed checkpoints of a witnessed log that contradict what this witness \
             cosigned: rollback (smaller, signed later), fork (same size, another root) \
             or inconsistent (the consistency proof fails)",
            witness_alarms.clone(),
        );
        let cosignatures = Family::<WitnessOutcome, Counter>::default();
        registry.register(
            "pil_audit_cosignature_requests",
            "This log's heads submitted to a witness, by outcome: cosigned, refused (the \
             witness holds a history this log does not extend) or failed (unreachable, \
             malformed answer)",
            cosignatures.clone(),
        );
        let witnessed_size = Family::<Witness, Gauge>::default();
        registry.register(
            "pil_audit_witnessed_size",
            "The size of this log's newest head a witness cosigned",
            witnessed_size.clone(),
        );
        let published_size = Gauge::default();
        registry.register(
            "pil_audit_published_size",
            "The size of this log's newest head cosigned by the configured quorum of \
             witnesses",
            published_size.clone(),
        );
        let rate_limited = Family::<Organization, Counter>::default();
        registry.register(
            "pil_rate_limited_requests",
            "Requests refused because their organization was over \
             [limits] requests_per_second_per_organization",
            rate_limited.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "pil_connections",
            "Client and peer connections open now, TLS handshakes under way included",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "pil_connections_refused",
            "Connections closed at once because [limits] max_connections were open",
            connections_refused.clone(),
        );
        Self {
            rate_limited,
            connections,
            connections_refused,
            witness_cosigned,
            witness_alarms,
            cosignatures,
            witnessed_size,
            published_size,
            registry,
            refresh: std::sync::Mutex::default(),
            rekey_progress,
            rekey_moved,
            pseudonym_keys_read,
            queue_waiting,
            queue_groups,
            queue_items,
            figures: gauges,
            token_cache_hits,
            token_cache_misses,
            dpop_replays,
            dpop_full,
            event_delivery_seconds,
            replay_entries,
            replay_capacity,
            audit_append_seconds,
            audit_append_failures,
            peer_circuit,
            routed,
            summary_age,
            tokens_evaluated,
            summary_patients,
            started,
            handled,
            handling,
            lookups,
            forwarded,
            forwarded_seconds,
        }
    }

    /// Counts a request refused for its organization's rate.
    pub fn rate_limited(&self, organization: &str) {
        self.rate_limited
            .get_or_create(&Organization {
                organization: organization.into(),
            })
            .inc();
    }

    /// The connections open now.
    pub fn connections(&self, open: usize) {
        self.connections.set(open as i64);
    }

    /// Counts a connection refused for the connection limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts a checkpoint of `log` cosigned by this node as its witness.
    pub fn witness_cosigned(&self, log: &str) {
        self.witness_cosigned
            .get_or_create(&Log { log: log.into() })
            .inc();
    }

    /// Counts a checkpoint of `log` that is evidence against it.
    pub fn witness_alarm(&self, log: &str, kind: &'static str) {
        self.witness_alarms
            .get_or_create(&Alarm {
                log: log.into(),
                kind,
            })
            .inc();
    }

    /// Counts one submission of this log's head to `witness`.
    pub fn cosignature(&self, witness: &str, outcome: &'static str) {
        self.cosignatures
            .get_or_create(&WitnessOutcome {
                witness: witness.into(),
                outcome,
            })
            .inc();
    }

    /// The newest head size `witness` cosigned.
    pub fn witnessed_size(&self, witness: &str, size: u64) {
        self.witnessed_size
            .get_or_create(&Witness {
                witness: witness.into(),
            })
            .set(size as i64);
    }

    /// The newest head size the quorum cosigned.
    pub fn published_size(&self, size: u64) {
        self.published_size.set(size as i64);
    }

    /// Counts a lookup answered (or refused) at this node as home node.
    pub fn lookup(&self, decision: LookupDecision) {
        let decision = match decision {
            LookupDecision::Allowed => "allowed",
            LookupDecision::Emergency => "emergency",
            LookupDecision::Denied => "denied",
            LookupDecision::Unauthenticated => "unauthenticated",
            LookupDecision::Failed => "failed",
        };
        self.lookups.get_or_create(&Decision { decision }).inc();
    }

    /// Counts one forwarded lookup's outcome at `peer`, with its time when it was called.
    pub fn forwarded(&self, peer: &str, outcome: &'static str, took: Option<std::time::Duration>) {
        self.forwarded
            .get_or_create(&PeerOutcome {
                peer: peer.to_string(),
                outcome,
            })
            .inc();
        if let Some(took) = took {
            self.forwarded_seconds
                .get_or_create(&Peer {
                    peer: peer.to_string(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Counts how one lookup treated `peer` (see `pil_routing_decisions`).
    pub fn routed(&self, peer: &str, route: &'static str) {
        self.routed
            .get_or_create(&PeerRoute {
                peer: peer.to_string(),
                route,
            })
            .inc();
    }

    /// The age of the summary held for `peer` (`None`: none held).
    pub fn summary_age(&self, peer: &str, age: Option<std::time::Duration>) {
        let gauge = self.summary_age.get_or_create(&Peer {
            peer: peer.to_string(),
        });
        gauge.set(age.map_or(f64::INFINITY, |a| a.as_secs_f64()));
    }

    /// Counts blinded tokens evaluated for `peer`.
    pub fn tokens_evaluated(&self, peer: &str, n: u64) {
        self.tokens_evaluated
            .get_or_create(&Peer {
                peer: peer.to_string(),
            })
            .inc_by(n);
    }

    /// Patients this region's summary covers.
    pub fn summary_patients(&self, n: u64) {
        self.summary_patients.set(n as i64);
    }

    /// Runs `refresh` before every scrape, to read figures kept elsewhere.
    pub fn on_scrape(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(refresh));
    }

    /// One audit append: how long it took, or that it failed.
    pub fn audit_append(&self, took: std::time::Duration, ok: bool) {
        if ok {
            self.audit_append_seconds.observe(took.as_secs_f64());
        } else {
            self.audit_append_failures.inc();
        }
    }

    /// A peer's breaker as `pil_peer_circuit_state` says it.
    pub fn peer_circuit(&self, peer: &str, state: i64) {
        self.peer_circuit
            .get_or_create(&Peer {
                peer: peer.to_string(),
            })
            .set(state);
    }

    /// The store's queues and figures as they are now.
    pub fn store(&self, queues: crate::store::Queues, figures: &[crate::store::Figure]) {
        for (queue, q) in [("writer", queues.writer), ("audit", queues.audit)] {
            let label = Queue { queue };
            self.queue_waiting
                .get_or_create(&label)
                .set(q.waiting as i64);
            catch_up(&self.queue_groups.get_or_create(&label), q.groups);
            catch_up(&self.queue_items.get_or_create(&label), q.items);
        }
        for f in figures {
            if let Some(gauge) = self.figures.get(f.name) {
                gauge.set(f.value as i64);
            }
        }
    }

    /// Where re-keying stands, and how many keys the registry is read under.
    pub fn rekeying(&self, progress: f64, moved: u64, keys_read: usize) {
        self.rekey_progress.set(progress);
        self.rekey_moved.set(moved as i64);
        self.pseudonym_keys_read.set(keys_read as i64);
    }

    /// Token and DPoP checks so far (see [`crate::access::Access::verification_counts`]).
    pub fn verification(&self, (hits, misses, replays, full): (u64, u64, u64, u64)) {
        catch_up(&self.token_cache_hits, hits);
        catch_up(&self.token_cache_misses, misses);
        catch_up(&self.dpop_replays, replays);
        catch_up(&self.dpop_full, full);
    }

    /// An event delivered `lag` after the change it tells of.
    pub fn event_delivered(&self, lag: std::time::Duration) {
        self.event_delivery_seconds.observe(lag.as_secs_f64());
    }

    /// How full the DPoP replay cache is.
    pub fn replay_cache(&self, entries: usize, capacity: usize) {
        self.replay_entries.set(entries as i64);
        self.replay_capacity.set(capacity as i64);
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        for refresh in self
            .refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            refresh(self);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The service and method of a gRPC path, `/pil.v1.LookupService/Lookup`; unknown
/// paths are counted under one name, so a scanner cannot grow the label set.
fn rpc_of(path: &str) -> (String, String, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let known = (service.starts_with("pil.v1.") || service.starts_with("grpc."))
        && !method.is_empty()
        && method.len() <= 64
        && method.bytes().all(|b| b.is_ascii_alphanumeric());
    if !known {
        return ("unknown".into(), "unknown".into(), "unary");
    }
    let kind = match method {
        "SyncPointers" => "client_stream",
        "ExportPointers" | "StreamEvents" | "ExportAudit" | "ReadLog" | "Watch" => "server_stream",
        "ServerReflectionInfo" => "bidi_stream",
        _ => "unary",
    };
    (service.to_string(), method.to_string(), kind)
}

/// Counts every RPC the node serves: started, handled by code, and its handling time.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type Body = tonic::body::Body;

impl<S, B> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (grpc_service, grpc_method, grpc_type) = rpc_of(req.uri().path());
        let rpc = Rpc {
            grpc_type,
            grpc_service,
            grpc_method,
        };
        self.metrics.started.get_or_create(&rpc).inc();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        let began = Instant::now();
        Box::pin(async move {
            let response = inner.call(req).await?;
            let mut call = Finished {
                metrics,
                rpc,
                began,
                done: false,
            };
            // A trailers-only answer (most refusals) carries its status in the headers.
            if let Some(code) = response.headers().get("grpc-status") {
                call.finish(code.as_bytes());
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(Counted { body, call }),
            ))
        })
    }
}

/// One RPC whose end is still to be counted.
struct Finished {
    metrics: Arc<Metrics>,
    rpc: Rpc,
    began: Instant,
    done: bool,
}

impl Finished {
    fn finish(&mut self, code: &[u8]) {
        if self.done {
            return;
        }
        self.done = true;
        let code = std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.trim().parse::<i32>().ok())
            .map_or("Unknown", |c| code_name(tonic::Code::from_i32(c)));
        self.metrics
            .handled
            .get_or_create(&Handled {
                grpc_type: self.rpc.grpc_type,
                grpc_service: self.rpc.grpc_service.clone(),
                grpc_method: self.rpc.grpc_method.clone(),
                grpc_code: code,
            })
            .inc();
        self.metrics
            .handling
            .get_or_create(&self.rpc)
            .observe(self.began.elapsed().as_secs_f64());
    }
}

impl Drop for Finished {
    /// A stream the client left before its end.
    fn drop(&mut self) {
        self.finish(b"1");
    }
}

/// A response body that counts its RPC when the trailers (with the status) go out.
struct Counted {
    body: Body,
    call: Finished,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    this.call.finish(code.as_bytes());
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(b"13"),
            Poll::Ready(None) => this.call.finish(b"0"),
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The code's name as gRPC's own libraries spell it in metrics (`OK`, `NotFound`, …).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The answer to one request on the metrics listener.
fn answer(
    req: &http::Request<hyper::body::Incoming>,
    metrics: &Metrics,
) -> http::Result<http::Response<http_body_util::Full<bytes::Bytes>>> {
    if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
        http::Response::builder()
            .header(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(http_body_util::Full::new(bytes::Bytes::from(
                metrics.render(),
            )))
    } else {
        http::Response::builder()
            .status(http::StatusCode::NOT_FOUND)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"only GET /metrics is served here\n",
            )))
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&req, &metrics);
                async move { response }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
