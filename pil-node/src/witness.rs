//! This node as a witness of other regions' audit logs (c2sp.org/tlog-witness): it
//! serves `POST /add-checkpoint` on its own plain-HTTP listener (`[witness] listen`),
//! cosigns a checkpoint only when it is consistent with the last one it cosigned for
//! that log, and stores the new size (in the region's store, atomically with the check
//! against the stored one) before it answers.
//!
//! A validly signed checkpoint that contradicts what was cosigned — a rollback, a
//! fork, an inconsistent history — is refused with the specification's answer and
//! raised: an error log line, `pil_witness_alarms_total`, and an audit record here
//! holding the checkpoint as evidence.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use pil_transparency::{
    Cosigner, HeadSigner, HeadVerifier,
    witness::{AddCheckpoint, MAX_REQUEST_BYTES, Refusal, SIZE_CONTENT_TYPE, check},
};

use crate::{
    audit::{AuditRecord, WeakAuditLog, record::Action},
    config::WitnessConfig,
    metrics::Metrics,
};

/// The witness's keys: its own, and those of the logs it witnesses.
pub struct Witness {
    cosigner: Cosigner,
    logs: HashMap<String, HeadVerifier>,
    audit: WeakAuditLog,
    region: String,
    metrics: Arc<Metrics>,
}

/// One answer of the witness.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        body.push('\n');
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// The witness's keys as `[witness]` names them, loaded and checked.
pub struct WitnessKeys {
    cosigner: Cosigner,
    logs: HashMap<String, HeadVerifier>,
}

impl WitnessKeys {
    pub fn load(config: &WitnessConfig) -> Result<Self, String> {
        let signer = HeadSigner::load(&config.key_file)
            .map_err(|e| format!("witness.key_file {}: {e}", config.key_file.display()))?;
        let cosigner = Cosigner::new(config.name.clone(), signer).map_err(|e| e.to_string())?;
        let mut logs = HashMap::new();
        for log in &config.logs {
            let keys = HeadVerifier::load(&log.key_file).map_err(|e| {
                format!(
                    "witness.logs {:?}: key_file {}: {e}",
                    log.origin,
                    log.key_file.display()
                )
            })?;
            logs.insert(log.origin.clone(), keys);
        }
        Ok(Self { cosigner, logs })
    }

    /// The witness's public key as verifiers are given it.
    pub fn vkey(&self) -> String {
        self.cosigner.key().to_vkey()
    }
}

impl Witness {
    pub fn new(
        keys: WitnessKeys,
        audit: WeakAuditLog,
        region: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cosigner: keys.cosigner,
            logs: keys.logs,
            audit,
            region: region.to_string(),
            metrics,
        }
    }

    /// Answers one `add-checkpoint` request body.
    pub async fn add_checkpoint(&self, body: &[u8]) -> Reply {
        let request = match AddCheckpoint::parse(body) {
            Ok(r) => r,
            Err(e) => return Reply::text(400, e.to_string()),
        };
        let origin = request.origin().to_string();
        let keys = self.logs.get(&origin);
        let store = match self.audit.store() {
            Ok(s) => s,
            Err(_) => return Reply::text(503, "the witness is stopping"),
        };
        let stored = match keys {
            Some(_) => match store.witnessed(origin.clone()).await {
                Ok(s) => s,
                Err(e) => return unavailable(&e),
            },
            None => None,
        };
        let (sth, witnessed) = match check(&request, keys, stored.as_ref()) {
            Ok(ok) => ok,
            Err(refusal) => {
                if let Some(kind) = refusal.alarm() {
                    self.raise(&origin, kind, &refusal, &request.checkpoint)
                        .await;
                }
                return refusal_reply(&refusal);
            }
        };
        match store
            .witness_advance(origin.clone(), request.old_size, witnessed)
            .await
        {
            Ok(Ok(())) => {}
            // Another submission advanced the log between the check and the store.
            Ok(Err(latest)) => return size_reply(latest),
            Err(e) => return unavailable(&e),
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics.witness_cosigned(&origin);
        tracing::debug!(log = %origin, size = sth.head.size, "cosigned");
        Reply {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: self.cosigner.cosign(&sth.head.body(), now),
        }
    }

    async fn raise(&self, origin: &str, kind: &'static str, refusal: &Refusal, checkpoint: &str) {
        tracing::error!(
            log = %origin, kind, %refusal,
            "a witnessed log signed a checkpoint that contradicts what this witness cosigned"
        );
        self.metrics.witness_alarm(origin, kind);
        let detail = format!("{origin}: {kind}: {refusal}; the checkpoint: {checkpoint:?}");
        let record = AuditRecord::operation(&self.region, Action::WitnessAlarm, "ALARM", detail);
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(log = %origin, error = %e, "could not record a witness alarm");
        }
    }
}

fn unavailable(e: &crate::store::StoreError) -> Reply {
    tracing::warn!(error = %e, "the witness's store failed; nothing was cosigned");
    Reply::text(
        503,
        "the witness cannot read or store its state now; try again",
    )
}

fn size_reply(latest: u64) -> Reply {
    Reply {
        status: 409,
        content_type: SIZE_CONTENT_TYPE,
        body: format!("{latest}\n"),
    }
}

fn refusal_reply(refusal: &Refusal) -> Reply {
    match refusal.latest_size() {
        Some(latest) => size_reply(latest),
        None => Reply::text(refusal.status(), refusal.to_string()),
    }
}

/// Serves `POST /add-checkpoint` on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, witness: Arc<Witness>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let witness = witness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let witness = witness.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&witness, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn answer(
    witness: &Witness,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let reply = if req.uri().path() != "/add-checkpoint" {
        Reply::text(404, "this witness serves POST /add-checkpoint only")
    } else if req.method() != http::Method::POST {
        Reply::text(405, "add-checkpoint takes POST")
    } else {
        match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => witness.add_checkpoint(&body.to_bytes()).await,
            Err(_) => Reply::text(
                413,
                format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
            ),
        }
    };
    http::Response::builder()
        .status(reply.status)
        .header(http::header::CONTENT_TYPE, reply.content_type)
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_default()
}
