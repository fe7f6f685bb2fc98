//! Having this log's heads cosigned by its witnesses (c2sp.org/tlog-witness): the
//! other regions, and any independent witness that speaks the protocol.
//!
//! After a head is signed, every witness that has not cosigned it is sent the head
//! with a consistency proof from the size it last cosigned, over HTTP
//! `add-checkpoint`. The size a witness holds is learnt from its first answer (409 with
//! that size), so nothing about witnesses needs keeping across restarts. Cosignature
//! lines are added to the stored head; a head counts as published once the quorum's
//! lines are on it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use pil_transparency::{
    CosignerKey, Quorum, add_signatures,
    witness::{AddCheckpoint, SIZE_CONTENT_TYPE, parse_size_answer},
};

use crate::{config::AuditConfig, metrics::Metrics, store::Store};

/// How long one witness may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from a witness (a few signature lines).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Requests per head and witness: the first may only learn the witness's size.
const ATTEMPTS: usize = 3;

/// This log's witnesses and the quorum that publishes a head.
pub struct Witnesses {
    remotes: Vec<Remote>,
    needed: usize,
    tls: Option<tokio_rustls::TlsConnector>,
    metrics: Option<Arc<Metrics>>,
    /// One round of asking at a time, so sizes learnt in one serve the next.
    turn: tokio::sync::Mutex<()>,
    /// The newest head size that had the quorum's cosignatures.
    published: AtomicU64,
    /// The last round left the head short of the quorum because a witness could not
    /// be reached (not because one refused it): ask again.
    retry: AtomicBool,
}

struct Remote {
    key: CosignerKey,
    add_checkpoint: url::Url,
    /// The size this witness last cosigned, as it told us (0: not yet known).
    known: AtomicU64,
}

/// Why a witness did not cosign.
#[derive(Debug, thiserror::Error)]
enum AskError {
    /// The witness holds a history this log does not extend.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl Witnesses {
    /// The witnesses `[audit]` names; `None` when it names none.
    pub fn from_config(audit: &AuditConfig) -> Result<Option<Self>, String> {
        if audit.witnesses.is_empty() {
            return Ok(None);
        }
        let mut remotes = Vec::new();
        let mut https = false;
        for w in &audit.witnesses {
            let key = CosignerKey::parse_vkey(&w.key).map_err(|e| e.to_string())?;
            let base = w.url.trim_end_matches('/');
            let add_checkpoint = url::Url::parse(&format!("{base}/add-checkpoint"))
                .map_err(|e| format!("witness {}: url {:?}: {e}", key.name(), w.url))?;
            https |= add_checkpoint.scheme() == "https";
            remotes.push(Remote {
                key,
                add_checkpoint,
                known: AtomicU64::new(0),
            });
        }
        let tls = if https {
            Some(crate::http_client::client_tls(
                None,
                "the system's CA certificates",
            )?)
        } else {
            None
        };
        Ok(Some(Self {
            remotes,
            needed: audit.quorum(),
            tls,
            metrics: None,
            turn: tokio::sync::Mutex::new(()),
            published: AtomicU64::new(0),
            retry: AtomicBool::new(false),
        }))
    }

    /// The same witnesses, counting outcomes into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The witnesses' keys and the quorum, as an auditor checks a head against them.
    pub fn quorum(&self) -> Quorum {
        Quorum {
            witnesses: self.remotes.iter().map(|r| r.key.clone()).collect(),
            needed: self.needed,
        }
    }

    /// Whether the newest head asked about lacks the quorum for a witness that could
    /// not be reached; a witness that refused it is asked again only with a new head.
    pub fn pending(&self) -> bool {
        self.retry.load(Ordering::Relaxed)
    }

    /// Asks every witness without a valid cosignature on the head `(size, note)`;
    /// stores the cosignatures given and returns the head with them.
    pub async fn cosign(&self, store: &Arc<dyn Store>, size: u64, note: String) -> String {
        let _turn = self.turn.lock().await;
        let mut unreachable = false;
        let asking = self
            .remotes
            .iter()
            .filter(|r| !matches!(r.key.verify_note(&note), Ok(Some(_))))
            .map(|r| self.ask(r, store, size, &note));
        let answers = futures::future::join_all(asking).await;
        let mut note = note;
        for (name, answer) in answers {
            let outcome = match answer {
                Ok(lines) => match store.audit_add_cosignatures(size, lines.clone()).await {
                    Ok(()) => {
                        if let Ok(merged) = add_signatures(&note, &lines) {
                            note = merged;
                        }
                        "cosigned"
                    }
                    Err(e) => {
                        tracing::warn!(witness = %name, error = %e, "could not store a cosignature");
                        unreachable = true;
                        "failed"
                    }
                },
                Err(AskError::Refused(reason)) => {
                    tracing::error!(
                        witness = %name, size, %reason,
                        "a witness refused this log's head: it cosigned a history this log \
                         does not extend (was the data directory replaced or cut?)"
                    );
                    "refused"
                }
                Err(AskError::Failed(reason)) => {
                    tracing::warn!(witness = %name, size, %reason, "a witness could not be asked to cosign");
                    unreachable = true;
                    "failed"
                }
            };
            if let Some(m) = &self.metrics {
                m.cosignature(&name, outcome);
            }
        }
        let met = self.quorum().check(&note).is_ok_and(|c| c.met());
        self.retry.store(unreachable && !met, Ordering::Relaxed);
        if met {
            self.published.fetch_max(size, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.published_size(self.published.load(Ordering::Relaxed));
            }
        }
        note
    }

    async fn ask(
        &self,
        remote: &Remote,
        store: &Arc<dyn Store>,
        size: u64,
        note: &str,
    ) -> (String, Result<String, AskError>) {
        let name = remote.key.name().to_string();
        let answer = tokio::time::timeout(
            ASK_TIMEOUT * ATTEMPTS as u32,
            self.ask_until_answered(remote, store, size, note),
        )
        .await
        .unwrap_or_else(|_| Err(AskError::Failed("no answer in time".into())));
        if answer.is_ok() {
            remote.known.store(size, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.witnessed_size(&name, size);
            }
        }
        (name, answer)
    }

    async fn ask_until_answered(
        &self,
        remote: &Remote,
        store: &Arc<dyn Store>,
        size: u64,
        note: &str,
    ) -> Result<String, AskError> {
        let mut last_conflict = None;
        for _ in 0..ATTEMPTS {
            let old = remote.known.load(Ordering::Relaxed);
            if old > size {
                return Err(AskError::Refused(format!(
                    "it cosigned size {old} of this log, which now has only {size} records \
                     under its newest head"
                )));
            }
            let proof = if old == 0 || old == size {
                Vec::new()
            } else {
                store
                    .audit_consistency_proof(old, size)
                    .await
                    .map_err(|e| AskError::Failed(format!("consistency proof: {e}")))?
            };
            let body = AddCheckpoint {
                old_size: old,
                proof,
                checkpoint: note.to_string(),
            }
            .to_body();
            let answer = crate::http_client::send(
                http::Method::POST,
                &remote.add_checkpoint,
                self.tls.as_ref(),
                &[(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                Bytes::from(body),
                MAX_ANSWER_BYTES,
            )
            .await
            .map_err(AskError::Failed)?;
            let text = String::from_utf8_lossy(&answer.body).trim_end().to_string();
            match answer.status.as_u16() {
                200 => return self.cosignature_in(remote, note, &answer.body),
                409 => {
                    let is_size = answer
                        .header(http::header::CONTENT_TYPE)
                        .is_some_and(|t| t.starts_with(SIZE_CONTENT_TYPE));
                    let latest = parse_size_answer(&answer.body)
                        .filter(|_| is_size)
                        .ok_or_else(|| AskError::Failed(format!("409 without a size: {text}")))?;
                    if last_conflict == Some(latest) || latest == old {
                        return Err(AskError::Refused(format!(
                            "it holds another root for size {latest}: {text}"
                        )));
                    }
                    last_conflict = Some(latest);
                    remote.known.store(latest, Ordering::Relaxed);
                }
                422 => {
                    return Err(AskError::Refused(format!(
                        "this log's consistency proof from size {old} does not verify against \
                         the head it cosigned: {text}"
                    )));
                }
                status => {
                    return Err(AskError::Failed(format!("it answered {status}: {text}")));
                }
            }
        }
        Err(AskError::Failed(
            "its size kept changing while it was asked".into(),
        ))
    }

    /// The witness's own cosignature line from its answer; other lines are ignored.
    fn cosignature_in(&self, remote: &Remote, note: &str, body: &[u8]) -> Result<String, AskError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| AskError::Failed("the answer is not UTF-8".into()))?;
        let prefix = format!("\u{2014} {} ", remote.key.name());
        let lines: String = text
            .split_inclusive('\n')
            .filter(|l| l.starts_with(&prefix))
            .collect();
        let cosigned = add_signatures(note, &lines)
            .map_err(|e| AskError::Failed(format!("malformed cosignature: {e}")))?;
        match remote.key.verify_note(&cosigned) {
            Ok(Some(_)) => Ok(lines),
            _ => Err(AskError::Failed(
                "the answer holds no valid cosignature by this witness's key".into(),
            )),
        }
    }
}
