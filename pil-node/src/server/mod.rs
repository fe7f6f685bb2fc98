//! Starting and stopping a node: wires configuration, storage, registry, services and
//! the TLS listener together, and tears them down in order on shutdown so in-flight
//! requests finish and the store closes cleanly.

pub(crate) mod preflight;

use std::{net::SocketAddr, sync::Arc};

use pil_proto::v1::{
    admin_service_server::AdminServiceServer, audit_service_server::AuditServiceServer,
    event_service_server::EventServiceServer, federation_service_server::FederationServiceServer,
    lookup_service_server::LookupServiceServer, policy_service_server::PolicyServiceServer,
    registry_service_server::RegistryServiceServer,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    access::{Access, AccessError},
    audit::AuditLog,
    config::NodeConfig,
    federation::Federation,
    patient_keys::KeyError,
    registry::Registry,
    reload::Reloader,
    secret_file::SecretFileError,
    service::NodeService,
    store::StoreError,
    tls::{self, TlsError},
};

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    IssuerKeys(#[from] crate::issuer_keys::KeysError),
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    #[error("cannot open the store: {0}")]
    Storage(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error("witnessing: {0}")]
    Witness(String),
    /// More than one of the above, found together before start.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<NodeError>),
}

impl NodeError {
    /// `problems` as one error: the problem itself when there is one.
    pub fn all(mut problems: Vec<NodeError>) -> Self {
        if problems.len() == 1 {
            problems.remove(0)
        } else {
            NodeError::Several(problems)
        }
    }
}

/// A started node.
pub struct RunningNode {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    witness_addr: Option<SocketAddr>,
    registry: Registry,
    access: Arc<Access>,
    reloader: Reloader,
    federation: Arc<Federation>,
    audit: crate::audit::WeakAuditLog,
    region: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), NodeError>>,
}

impl RunningNode {
    /// The address the listener is bound to (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `GET /metrics` is served, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where `POST /add-checkpoint` is served, when `[witness]` is set.
    pub fn witness_addr(&self) -> Option<SocketAddr> {
        self.witness_addr
    }

    /// The node's registry, for in-process use (demo data, tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Token verification and the legal configuration in force (for reloads).
    pub fn access(&self) -> Arc<Access> {
        self.access.clone()
    }

    /// The federation peers, e.g. to set them once every node's address is known.
    pub fn federation(&self) -> Arc<Federation> {
        self.federation.clone()
    }

    /// Runs the audit retention task once as if it were `now` (the node runs it
    /// periodically); returns how many records' contents were removed.
    pub async fn apply_audit_retention(
        &self,
        now: std::time::SystemTime,
    ) -> Result<u64, crate::audit::AuditError> {
        let days = self.access.legal().settings().retention.audit_log_days;
        let keep = std::time::Duration::from_secs(u64::from(days) * 24 * 3600);
        crate::audit::retention::apply(&*self.audit.store()?, keep, now).await
    }

    /// What SIGHUP does: reload, and record the reload in the audit log.
    pub fn signal_reload(&self) -> crate::reload::SignalReload {
        crate::reload::SignalReload {
            reloader: self.reloader.clone(),
            audit: self.audit.clone(),
            region: self.region.clone(),
        }
    }

    /// Reloads the node's configuration (SIGHUP does the same).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Stops accepting, lets in-flight requests finish, and closes the database.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let RunningNode { task, registry, .. } = self;
        drop(registry);
        task.await.map_err(|e| NodeError::Task(e.to_string()))?
    }

    /// Runs until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), NodeError> {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

/// Opens storage and starts serving according to `config`.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    let config = Arc::new(config);
    // Everything that can fail is checked before anything on disk changes: a node that
    // cannot serve leaves its data directory as it found it. The listener is bound
    // first, so the node's names carry the port it got.
    let listener = TcpListener::bind(config.listen)
        .await
        .and_then(|l| l.local_addr().map(|addr| (l, addr)))
        .map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        });
    let port = listener
        .as_ref()
        .map_or(config.listen.port(), |(_, addr)| addr.port());
    let checked = preflight::check(&config, port).await;
    let metrics_listener = bind_if_set(config.metrics.listen).await;
    let witness_listener = bind_if_set(config.witness.as_ref().map(|w| w.listen)).await;
    let (listener, addr, checked, metrics_listener, witness_listener) =
        match (listener, checked, metrics_listener, witness_listener) {
            (Ok((listener, addr)), Ok(checked), Ok(m), Ok(w)) => (listener, addr, checked, m, w),
            (listener, checked, metrics_listener, witness_listener) => {
                let mut problems: Vec<NodeError> = listener.err().into_iter().collect();
                problems.extend(metrics_listener.err());
                problems.extend(witness_listener.err());
                problems.extend(checked.err().unwrap_or_default());
                return Err(NodeError::all(problems));
            }
        };
    let preflight::Checked {
        keys,
        routing_key,
        tls: tls_config,
        cert_names,
        signer,
        federation,
        access,
        issuer_keys,
        next_key_fetch,
        witnesses,
        witness,
    } = checked;
    let server_tls = tls::ServerTls::new(tls_config, tls::summary(&config.tls)?);

    let (store, closer) = open_store(&config).await?;
    let figures: Vec<&str> = store.figures().iter().map(|f| f.name).collect();
    let metrics = Arc::new(crate::metrics::Metrics::for_engine(&figures));
    // Weak, so a scrape never keeps the store open past shutdown.
    let engine = Arc::downgrade(&store);
    let audit = AuditLog::new(store.clone(), &config.region, signer).with_metrics(metrics.clone());
    // Records written before an unclean stop get a signed head now; its witnesses are
    // asked once the node serves (the head loop's first round).
    audit.sign_head().await?;
    let audit = audit.with_witnesses(witnesses.map(|w| Arc::new(w.with_metrics(metrics.clone()))));
    let restored = announce_restore(&audit, &config).await?;
    let registry = Registry::open(store.clone(), keys, config.region.clone());
    let publisher = match routing_key {
        Some(key) => Some(crate::routing::publish::Publisher::open(key, store).await?),
        None => None,
    };
    if let Some(p) = &publisher {
        // Before any write: every write from here on covers its patients.
        registry.set_coverage(p.clone());
    }
    if registry.keys().has_others() {
        // Subscriptions made before the ring changed follow under it before any write.
        let keys = registry.keys();
        registry.follow_under(&keys).await?;
    }
    let registry_for_routing = registry.clone();
    let rekeying = crate::rekey::Rekeying::default();
    let reloader = Reloader::new(crate::reload::Reloadable {
        access: access.clone(),
        lifetime: registry.pointer_lifetime(),
        federation: federation.clone(),
        source: config.source.clone(),
        region: config.region.clone(),
        tls_files: config.tls.clone(),
        tls: server_tls.clone(),
        cert_names,
        issuer_keys,
        signing_key_file: config.audit.signing_key_file.clone(),
        audit: audit.downgrade(),
        pseudonym_key_file: config.keys.pseudonym_key_file.clone(),
        storage_key_file: config.keys.storage_key_file.clone(),
        registry: registry.downgrade(),
    });

    let watched = (rekeying.clone(), registry.downgrade());
    metrics.on_scrape(move |m| {
        let status = watched.0.status();
        let progress = if status.state == "moving" {
            status.progress
        } else {
            1.0
        };
        let keys_read = watched
            .1
            .upgrade()
            .map(|r| {
                let keys = r.keys();
                1 + keys.ids().earlier.len() + keys.ids().staged.len()
            })
            .unwrap_or(1);
        m.rekeying(progress, status.patients_moved, keys_read);
    });
    let metrics_for_listener = metrics.clone();
    let peers = federation.clone();
    metrics.on_scrape(move |m| {
        for peer in peers.view() {
            let state = match peer.breaker {
                crate::federation::BreakerState::Closed => 0,
                crate::federation::BreakerState::HalfOpen => 1,
                crate::federation::BreakerState::Open { .. } => 2,
            };
            m.peer_circuit(&peer.config.region, state);
        }
    });
    let replay = access.clone();
    metrics.on_scrape(move |m| {
        let (entries, capacity) = replay.replay_cache_use();
        m.replay_cache(entries, capacity);
        m.verification(replay.verification_counts());
    });
    metrics.on_scrape(move |m| {
        if let Some(store) = engine.upgrade() {
            m.store(store.queues(), &store.figures());
        }
    });
    let router = crate::routing::router::Router::new(federation.clone(), metrics.clone());
    let routing = Arc::new(crate::routing::Routing::new(
        publisher.clone(),
        router.clone(),
    ));
    if let Some(p) = publisher.clone() {
        metrics.on_scrape(move |m| m.summary_patients(p.patients()));
    }
    let publishing = tokio::spawn(async move {
        if let Some(p) = publisher {
            p.run(registry_for_routing).await;
        }
    });
    let routing_peers = tokio::spawn(router.run());
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let witness_addr = witness_listener.as_ref().and_then(|l| l.local_addr().ok());
    let witness_server = match (witness_listener, witness) {
        (Some(listener), Some(keys)) => {
            let witness = crate::witness::Witness::new(
                keys,
                audit.downgrade(),
                &config.region,
                metrics.clone(),
            );
            tokio::spawn(crate::witness::serve(listener, Arc::new(witness)))
        }
        _ => tokio::spawn(async {}),
    };
    let service = NodeService::new(crate::service::ServiceParts {
        registry: registry.clone(),
        config: config.clone(),
        access: access.clone(),
        reloader: reloader.clone(),
        audit: audit.clone(),
        federation: federation.clone(),
        metrics: metrics.clone(),
        routing: routing.clone(),
    });
    let max = config.limits.max_message_bytes;
    let registry_svc = RegistryServiceServer::new(service.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let lookup_svc = LookupServiceServer::new(service.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin_svc = AdminServiceServer::new(service.clone()).max_decoding_message_size(max);
    let policy_svc = PolicyServiceServer::new(service.clone()).max_decoding_message_size(max);
    let federation_svc = FederationServiceServer::new(service.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let event_svc = EventServiceServer::new(service.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let collectors = tokio::spawn(service.clone().run_collectors());
    let late_registrations = tokio::spawn(service.clone().run_late_registrations());
    let metrics_server = tokio::spawn(async move {
        if let Some(listener) = metrics_listener {
            crate::metrics::serve(listener, metrics_for_listener).await;
        }
    });
    let audit_svc = AuditServiceServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<RegistryServiceServer<NodeService>>()
        .await;
    health
        .set_serving::<LookupServiceServer<NodeService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pil_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    let incoming = tls::incoming(
        listener,
        server_tls,
        std::time::Duration::from_secs(config.limits.handshake_timeout_secs),
        tls::ConnectionLimit::new(config.limits.max_connections.max(1), metrics.clone()),
        cut_rx,
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let purge = tokio::spawn(purge_loop(
        registry.clone(),
        audit.clone(),
        access.clone(),
        config.clone(),
    ));
    let key_refresh = tokio::spawn(key_refresh_loop(reloader.clone(), next_key_fetch));
    let rekey = tokio::spawn(rekeying.clone().run(registry.clone()));
    crate::store::backup::remove_stale_checkpoints(&config.data_dir);
    let control_socket = crate::control::socket_path(&config.data_dir);
    let control = crate::control::serve(crate::control::Control {
        region: config.region.clone(),
        engine: audit.store().engine(),
        data_dir: config.data_dir.clone(),
        started_at: std::time::SystemTime::now(),
        audit: audit.downgrade(),
        federation: federation.clone(),
        access: access.clone(),
        reloader: reloader.clone(),
        restored,
        rekeying,
    })?;
    let heads = tokio::spawn(head_loop(audit.clone(), config.clone()));
    let retention = tokio::spawn(retention_loop(
        audit.clone(),
        access.clone(),
        config.clone(),
    ));
    let final_head = audit.clone();
    let weak_audit = audit.downgrade();

    let router = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(tower::util::MapRequestLayer::new(
            crate::service::remember_origin,
        ))
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams.max(1)))
        .layer(crate::metrics::MetricsLayer::new(metrics.clone()))
        .layer(crate::service::RateLimitLayer::new(
            config.limits.requests_per_second_per_organization,
            config.limits.organization_burst,
            metrics,
        ))
        .layer(crate::service::RefusalLayer::new(
            audit.clone(),
            config.region.clone(),
        ))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(registry_svc)
        .add_service(lookup_svc)
        .add_service(admin_svc)
        .add_service(policy_svc)
        .add_service(audit_svc)
        .add_service(event_svc)
        .add_service(federation_svc);
    tracing::info!(region = %config.region, %addr, test_data = config.test_data, "node serving");

    let grace = config.limits.shutdown_grace();
    let task = tokio::spawn(async move {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let notify = stopping.clone();
        let serve = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.await;
            notify.notify_one();
        });
        // In-flight requests get `grace` to finish; clients that keep their
        // connections open past it are cut off, so their tasks let go of the node.
        let served = tokio::select! {
            served = serve => Some(served),
            _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => None,
        };
        if served.is_none() {
            tracing::warn!(
                ?grace,
                "connections still open after the grace period; closing them"
            );
            let _ = cut.send(true);
        }
        for task in [
            metrics_server,
            witness_server,
            control,
            collectors,
            late_registrations,
            purge,
            key_refresh,
            rekey,
            heads,
            retention,
            publishing,
            routing_peers,
        ] {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&control_socket);
        // The last records get a signed head, so tampering with them while the node
        // is stopped shows.
        if let Err(e) = final_head.sign_head().await {
            tracing::warn!(error = %e, "could not sign the audit log's final tree head");
        }
        drop(final_head);
        // Every registry and audit handle goes with the connections; wait for queued
        // writes, then the store closes with the last handle.
        closer.close().await;
        tracing::info!("node stopped");
        served.unwrap_or(Ok(())).map_err(NodeError::from)
    });

    Ok(RunningNode {
        addr,
        metrics_addr,
        witness_addr,
        registry,
        access,
        reloader,
        federation,
        audit: weak_audit,
        region: config.region.clone(),
        stop: Some(stop_tx),
        task,
    })
}

/// Opens the store the configuration names (also for tools and tests that read or
/// change a stopped node's storage).
pub async fn open_store(
    config: &NodeConfig,
) -> Result<(Arc<dyn crate::store::Store>, crate::store::Closer), StoreError> {
    match (&config.storage.engine, &config.storage.postgres) {
        (crate::config::Engine::Postgres, Some(pg)) => {
            crate::store::postgres::open(&pg.engine_config()).await
        }
        _ => crate::store::rocks::open(&config.data_dir).await,
    }
}

/// Signs the audit tree head whenever records were added since the last one.
/// A plain-HTTP side listener (metrics, witness), when its address is configured.
async fn bind_if_set(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, NodeError> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| NodeError::Bind { addr, source }),
        None => Ok(None),
    }
}

async fn head_loop(audit: AuditLog, config: Arc<NodeConfig>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(
        config.audit.sign_interval_secs.max(1),
    ));
    let mut first = true;
    loop {
        tick.tick().await;
        let unsigned = audit.size().await.is_ok_and(|s| s.size > s.signed);
        // The head at start, and a head some witness could not cosign yet, are
        // offered to the witnesses again.
        let pending = audit.witnesses().is_some_and(|w| first || w.pending());
        first = false;
        if (unsigned || pending)
            && let Err(e) = audit.sign_head().await
        {
            tracing::warn!(error = %e, "signing the audit tree head failed");
        }
    }
}

/// Drops the contents of audit records past the legal configuration's retention.
async fn retention_loop(audit: AuditLog, access: Arc<Access>, config: Arc<NodeConfig>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(
        config.audit.retention_interval_secs.max(1),
    ));
    loop {
        tick.tick().await;
        let days = access.legal().settings().retention.audit_log_days;
        let keep = std::time::Duration::from_secs(u64::from(days) * 24 * 3600);
        let store = audit.store().clone();
        let due = crate::audit::retention::due(&*store, keep, std::time::SystemTime::now()).await;
        retain(
            &audit,
            &config.region,
            due.map_err(|e| e.to_string()),
            format!("contents of audit records older than {days} days"),
            async {
                crate::audit::retention::apply(&*store, keep, std::time::SystemTime::now())
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }
}

/// One retention step, recorded in the audit log: what is due before anything is
/// removed (nothing is, when that record cannot be stored), then what was removed.
async fn retain(
    audit: &AuditLog,
    region: &str,
    due: Result<bool, String>,
    what: String,
    remove: impl std::future::Future<Output = Result<u64, String>>,
) {
    match due {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, %what, "could not tell what retention has to remove");
            return;
        }
    }
    let record = |status: &str, detail: String| {
        crate::audit::AuditRecord::operation(
            region,
            crate::audit::record::Action::Retention,
            status,
            detail,
        )
    };
    if let Err(e) = audit
        .append(record("OK", format!("due for removal: {what}")))
        .await
    {
        tracing::error!(error = %e, %what, "retention not run: its audit record could not be stored");
        return;
    }
    let (status, detail) = match remove.await {
        Ok(n) => {
            tracing::info!(removed = n, %what, "retention removed what was due");
            ("OK", format!("removed {n}: {what}"))
        }
        Err(e) => {
            tracing::warn!(error = %e, %what, "retention failed");
            ("INTERNAL", format!("removing {what} failed: {e}"))
        }
    };
    if let Err(e) = audit.append(record(status, detail)).await {
        tracing::error!(error = %e, %what, "the outcome of retention could not be recorded");
    }
}

/// A store restored from a backup is announced once, at the first start after the
/// restore: in the log and in the audit log. Returns what was announced.
async fn announce_restore(
    audit: &AuditLog,
    config: &NodeConfig,
) -> Result<Option<String>, NodeError> {
    let Some(note) = crate::store::backup::restored_note(&config.data_dir) else {
        return Ok(None);
    };
    let said = note.describe();
    tracing::warn!(restored = %said, "starting on a restored store");
    audit
        .append(crate::audit::AuditRecord::operation(
            &config.region,
            crate::audit::record::Action::Backup,
            "OK",
            said.clone(),
        ))
        .await?;
    audit.sign_head().await?;
    crate::store::backup::forget_note(&config.data_dir);
    Ok(Some(said))
}

/// Fetches the issuer's published keys again when they are due (never, for a file).
async fn key_refresh_loop(reloader: Reloader, first: Option<std::time::Duration>) {
    let mut next = first;
    while let Some(wait) = next {
        tokio::time::sleep(wait).await;
        next = reloader.refresh_issuer_keys().await;
    }
}

/// Purges lapsed pointers, change events past their retention, and the journal.
async fn purge_loop(
    registry: Registry,
    audit: AuditLog,
    access: Arc<Access>,
    config: Arc<NodeConfig>,
) {
    let mut tick = tokio::time::interval(config.limits.purge_interval());
    // The first purge comes one interval after start, not during it.
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = registry.forget_used_proofs().await {
            tracing::warn!(error = %e, "forgetting DPoP proofs past their window failed");
        }
        // The journal only repeats what the registry and its audit log hold, so
        // dropping its old part changes nothing to record.
        let hours = access.legal().settings().subscriptions.journal_hours;
        match registry.drop_journal_older_than(hours).await {
            Ok(n) => tracing::debug!(dropped = n, hours, "journal of changes trimmed"),
            Err(e) => tracing::warn!(error = %e, "trimming the journal of changes failed"),
        }
        retain(
            &audit,
            &config.region,
            registry.purge_due().await.map_err(|e| e.to_string()),
            "pointers past their expiry or lapse".into(),
            async {
                registry
                    .purge_expired()
                    .await
                    .map(|n| n as u64)
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        let days = access.legal().settings().subscriptions.events_days;
        retain(
            &audit,
            &config.region,
            registry.events_due(days).await.map_err(|e| e.to_string()),
            format!("change events older than {days} days"),
            async {
                registry
                    .drop_events_older_than(days)
                    .await
                    .map(|n| n as u64)
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }
}
