//! The node's control socket: local operations for the operator on the node's own
//! machine (`pil-node status`, `pil-node backup`), as gRPC over a Unix socket in the
//! data directory that only the node's user may open. Nothing here is reachable over
//! the network, so it needs no certificate; whoever can open the socket can read the
//! data directory anyway.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use futures::Stream;
use pil_proto::v1::{self, control_service_server::ControlService};
use tonic::{Request, Response, Status};

use crate::{
    access::Access,
    audit::{
        WeakAuditLog,
        record::{Action, AuditRecord},
    },
    federation::{BreakerState, Federation},
    reload::Reloader,
    store::backup::{self, Manifest},
};

/// The socket's name in the data directory.
pub const SOCKET: &str = "control.sock";

/// Where the control socket of a node with data directory `data_dir` is.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Why the control socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot reach the node at {path}: {reason}; is it running with this data directory?")]
    Unreachable { path: String, reason: String },
}

/// What the control service reads and does.
#[derive(Clone)]
pub struct Control {
    pub(crate) region: String,
    pub(crate) engine: &'static str,
    pub(crate) data_dir: PathBuf,
    pub(crate) started_at: std::time::SystemTime,
    pub(crate) audit: WeakAuditLog,
    pub(crate) federation: Arc<Federation>,
    pub(crate) access: Arc<Access>,
    pub(crate) reloader: Reloader,
    /// What a restore said, when the node started on a restored store.
    pub(crate) restored: Option<String>,
    pub(crate) rekeying: crate::rekey::Rekeying,
}

/// Binds the socket (owner-only, replacing one a killed node left) and serves it
/// until the returned task is aborted.
pub fn serve(control: Control) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let path = socket_path(&control.data_dir);
    let fail = |source| ControlError::Socket {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&control.data_dir).map_err(fail)?;
    // Bound under another name and made owner-only before it takes the real name, so
    // no one else can connect in between.
    let fresh = path.with_extension("sock.new");
    let _ = std::fs::remove_file(&fresh);
    let listener = tokio::net::UnixListener::bind(&fresh).map_err(fail)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    std::fs::rename(&fresh, &path).map_err(fail)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let service = v1::control_service_server::ControlServiceServer::new(control);
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the control socket stopped");
        }
    }))
}

/// A client of the node whose data directory is `data_dir`.
pub async fn connect(
    data_dir: &Path,
) -> Result<v1::control_service_client::ControlServiceClient<tonic::transport::Channel>, ControlError>
{
    let path = socket_path(data_dir);
    let unreachable = |reason: String| ControlError::Unreachable {
        path: path.display().to_string(),
        reason,
    };
    let socket = path.clone();
    let channel = tonic::transport::Endpoint::from_static("http://pil-node.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| unreachable(pil_proto::error_line::one_line(&e)))?;
    Ok(
        v1::control_service_client::ControlServiceClient::new(channel)
            .max_decoding_message_size(16 * 1024 * 1024),
    )
}

impl Control {
    fn record(&self, status: &str, detail: String) -> AuditRecord {
        AuditRecord::operation(&self.region, Action::Backup, status, detail)
    }

    async fn backup_inner(
        &self,
        dir: PathBuf,
        progress: tokio::sync::mpsc::Sender<Result<v1::BackupResponse, Status>>,
    ) -> Result<Manifest, Status> {
        backup::check_target(&dir).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = self
            .audit
            .store()
            .map_err(|_| Status::unavailable("the node is stopping"))?;
        if self.engine != "rocksdb" {
            return Err(Status::failed_precondition(format!(
                "the {} engine is backed up with the database's own tools (base backups and \
                 WAL archiving; see docs/operator-guide.md, \"Backups\")",
                self.engine
            )));
        }
        // The backup holds its own record, and a head over it.
        self.audit
            .append(self.record(
                "STARTED",
                format!("backup of the store to {} started", dir.display()),
            ))
            .await
            .map_err(|e| Status::unavailable(format!("the backup could not be recorded: {e}")))?;
        let (signed_size, signed_head) = self
            .audit
            .sign_head()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .unwrap_or_default();
        let checkpoint = backup::checkpoint_dir(&self.data_dir);
        store
            .checkpoint(&checkpoint)
            .await
            .map_err(|e| Status::internal(format!("taking the snapshot: {e}")))?;
        drop(store);
        let manifest = Manifest {
            format: 0,
            region: self.region.clone(),
            engine: self.engine.to_string(),
            node_version: env!("CARGO_PKG_VERSION").to_string(),
            taken_at: backup::now_rfc3339(),
            signed_size,
            signed_head,
            files: Vec::new(),
        };
        let mut last = std::time::Instant::now();
        backup::write_backup(checkpoint, dir, manifest, move |copied, total| {
            if last.elapsed() >= std::time::Duration::from_millis(100) || copied == total {
                last = std::time::Instant::now();
                // Runs on the copying thread, so it may wait for the stream.
                let _ = progress.blocking_send(Ok(v1::BackupResponse {
                    step: Some(v1::backup_response::Step::Progress(v1::BackupProgress {
                        copied_bytes: copied,
                        total_bytes: total,
                    })),
                }));
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))
    }
}

type BackupStream = Pin<Box<dyn Stream<Item = Result<v1::BackupResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Control {
    async fn status(
        &self,
        _req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let store = self
            .audit
            .store()
            .map_err(|_| Status::unavailable("the node is stopping"))?;
        let size = store
            .audit_size()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let newest = store
            .audit_latest_head()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let queue = |q: crate::store::QueueFigures| v1::QueueStatus {
            waiting: q.waiting,
            groups: q.groups,
            items: q.items,
        };
        let queues = store.queues();
        let figures = store
            .figures()
            .into_iter()
            .map(|f| v1::StorageFigure {
                name: f.name.to_string(),
                value: f.value,
            })
            .collect();
        drop(store);
        let data_dir_bytes = backup::dir_bytes(self.data_dir.clone()).await;
        let tls = self.reloader.tls_in_force();
        Ok(Response::new(v1::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            region: self.region.clone(),
            engine: self.engine.to_string(),
            started_at: Some(prost_types::Timestamp::from(self.started_at)),
            data_dir_bytes,
            figures,
            audit: Some(v1::AuditLogStatus {
                records: size.size,
                signed: size.signed,
                newest_head: newest.map(|(_, note)| note).unwrap_or_default(),
                signing_key_id: self.audit.signing_key_id(),
            }),
            peers: self
                .federation
                .view()
                .into_iter()
                .map(|p| v1::PeerHealth {
                    region: p.config.region,
                    circuit: match p.breaker {
                        BreakerState::Closed => "closed",
                        BreakerState::HalfOpen => "half-open",
                        BreakerState::Open { .. } => "open",
                    }
                    .to_string(),
                })
                .collect(),
            writer: Some(queue(queues.writer)),
            audit_queue: Some(queue(queues.audit)),
            policies: self.access.legal().summary().policies as u32,
            cert_sha256: tls.cert_sha256,
            cert_not_after: tls.not_after,
            issuer_key_ids: self.access.issuer_kids(),
            restored: self.restored.clone().unwrap_or_default(),
            pseudonym_keys: Some(pseudonym_key_status(self.rekeying.status())),
        }))
    }

    type BackupStream = BackupStream;

    async fn backup(
        &self,
        req: Request<v1::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let dir = PathBuf::from(req.into_inner().directory);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.backup_inner(dir.clone(), tx.clone()).await;
            let (status, detail) = match &result {
                Ok(m) => (
                    "OK",
                    format!(
                        "backup of the store to {}: {} files, {} bytes, holding at least the {} \
                         records of the head signed before it",
                        dir.display(),
                        m.files.len(),
                        m.files.iter().map(|f| f.bytes).sum::<u64>(),
                        m.signed_size
                    ),
                ),
                Err(e) => (
                    "FAILED",
                    format!(
                        "backup of the store to {} failed: {}",
                        dir.display(),
                        e.message()
                    ),
                ),
            };
            // A backup refused before it began (a bad directory) changed nothing and
            // disclosed nothing; everything else is recorded.
            let began = !matches!(&result, Err(e) if e.code() == tonic::Code::InvalidArgument
                || e.code() == tonic::Code::FailedPrecondition);
            if began && let Err(e) = this.audit.append(this.record(status, detail)).await {
                tracing::error!(error = %e, "the backup could not be recorded in the audit log");
            }
            let last = result.map(|m| v1::BackupResponse {
                step: Some(v1::backup_response::Step::Done(v1::BackupDone {
                    manifest_json: serde_json::to_string_pretty(&m).unwrap_or_default(),
                })),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn pseudonym_key_status(s: crate::rekey::RekeyStatus) -> v1::PseudonymKeyStatus {
    v1::PseudonymKeyStatus {
        key: s.keys.current,
        earlier: s.keys.earlier,
        staged: s.keys.staged,
        retired: s.keys.retired,
        state: s.state,
        pass: s.pass,
        progress: s.progress,
        patients_seen: s.patients_seen,
        patients_moved: s.patients_moved,
        pointers_moved: s.pointers_moved,
        protections_moved: s.protections_moved,
        unidentified: s.unidentified,
        detail: s.detail,
    }
}
