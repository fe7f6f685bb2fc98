//! Appending to the audit log. A request's record must be durable before its answer
//! leaves the node; the store appends it to the region's RFC 6962 tree (with group
//! commit, in whichever engine) and this module says what is appended and signed.

use std::{
    sync::{Arc, Weak},
    time::{SystemTime, UNIX_EPOCH},
};

use pil_transparency::{HeadSigner, TreeHead};

use super::record::AuditRecord;
use crate::{
    in_force::InForce,
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    store::{AuditEntry, HeadSigning, LogSize, Store, StoreError},
};

/// Why the audit log could not record or answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("the audit log is closed")]
    Closed,
    #[error("audit signing key: {0}")]
    Key(String),
    #[error("audit log: {0}")]
    Tree(String),
}

/// The node's audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    signer: Arc<NoteSigner>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    witnesses: Option<Arc<super::Witnesses>>,
}

impl AuditLog {
    /// The log in `store`, whose heads are signed with `signer` under the origin
    /// `pil-audit/<region>`.
    pub fn new(store: Arc<dyn Store>, region: &str, signer: HeadSigner) -> Self {
        Self {
            store,
            signer: Arc::new(NoteSigner {
                signer: InForce::new(signer),
                origin: format!("pil-audit/{region}"),
            }),
            metrics: None,
            witnesses: None,
        }
    }

    /// The same log, having every head it signs cosigned by `witnesses`.
    pub fn with_witnesses(mut self, witnesses: Option<Arc<super::Witnesses>>) -> Self {
        self.witnesses = witnesses;
        self
    }

    /// The log's witnesses, when it has any.
    pub fn witnesses(&self) -> Option<&Arc<super::Witnesses>> {
        self.witnesses.as_ref()
    }

    /// The same log, timing every append into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Appends `record` (its `index` is assigned by the store) and returns once it is
    /// durable.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let began = std::time::Instant::now();
        let appended = self.store.audit_append(Box::new(record)).await;
        if let Some(m) = &self.metrics {
            m.audit_append(began.elapsed(), appended.is_ok());
        }
        Ok(appended?)
    }

    /// Signs the current tree unless its size is already signed, and has the newest
    /// head cosigned by the witnesses that have not yet; returns it `(size, note)`, with
    /// the cosignatures it has, if there is one.
    pub async fn sign_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        let head = self.store.audit_sign(self.signer.clone()).await?;
        Ok(match (head, &self.witnesses) {
            (Some((size, note)), Some(w)) => Some((size, w.cosign(&self.store, size, note).await)),
            (head, _) => head,
        })
    }

    /// A handle that does not keep the log open: for the parts of the node that live
    /// as long as the process (e.g. the SIGHUP handler).
    pub fn downgrade(&self) -> WeakAuditLog {
        WeakAuditLog {
            store: Arc::downgrade(&self.store),
            signer: self.signer.clone(),
        }
    }

    /// How many records the log holds and how many the newest head covers.
    pub async fn size(&self) -> Result<LogSize, AuditError> {
        Ok(self.store.audit_size().await?)
    }

    /// The store the log lives in, for readers (search, proofs).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// An [`AuditLog`] handle that lets the log close when the node stops.
#[derive(Clone)]
pub struct WeakAuditLog {
    store: Weak<dyn Store>,
    signer: Arc<NoteSigner>,
}

/// An audit signing key put in force by [`WeakAuditLog::rotate_signing_key`].
#[derive(Debug, Clone)]
pub struct KeyRotation {
    /// Signed-note key ids under the log's origin.
    pub from: String,
    pub to: String,
    /// The index of the record announcing the new key; the head over it is the
    /// last one the old key signed.
    pub announced_at: u64,
}

impl WeakAuditLog {
    /// Appends like [`AuditLog::append`]; fails with `Closed` once the node stopped.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let store = self.store.upgrade().ok_or(AuditError::Closed)?;
        Ok(store.audit_append(Box::new(record)).await?)
    }

    /// The store, while the node runs.
    pub fn store(&self) -> Result<Arc<dyn Store>, AuditError> {
        self.store.upgrade().ok_or(AuditError::Closed)
    }

    /// Signs like [`AuditLog::sign_head`]; fails with `Closed` once the node stopped.
    pub async fn sign_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        Ok(self.store()?.audit_sign(self.signer.clone()).await?)
    }

    /// The key id heads are signed with now.
    pub fn signing_key_id(&self) -> String {
        self.signer.signer.get().key_id(&self.signer.origin)
    }

    /// Signs heads with `fresh` from now on, unless it is the key in use. The new key
    /// is announced first, in `announcement` (its detail gets the new public key),
    /// and the old key signs the head over that record: an auditor holding only the
    /// old key can learn the new one from the log.
    pub async fn rotate_signing_key(
        &self,
        fresh: HeadSigner,
        mut announcement: AuditRecord,
    ) -> Result<Option<KeyRotation>, AuditError> {
        let old = self.signer.signer.get();
        if old.verifier() == fresh.verifier() {
            return Ok(None);
        }
        let store = self.store()?;
        let (from, to) = (
            old.key_id(&self.signer.origin),
            fresh.key_id(&self.signer.origin),
        );
        let public = fresh
            .public_key_pem()
            .map_err(|e| AuditError::Key(e.to_string()))?;
        announcement.outcome.detail = format!(
            "audit signing key rotated: heads after this record are signed by key {to} \
             (was {from}); public key: {}",
            public.trim().replace('\n', " ")
        );
        announcement.detail = Some(announcement.outcome.detail.clone());
        let announced_at = store.audit_append(Box::new(announcement)).await?;
        store.audit_sign(self.signer.clone()).await?;
        self.signer.signer.set(fresh);
        store.audit_sign(self.signer.clone()).await?;
        Ok(Some(KeyRotation {
            from,
            to,
            announced_at,
        }))
    }
}

/// Signs heads as C2SP signed notes with the node's key, which an operator may
/// rotate while the node runs.
struct NoteSigner {
    signer: InForce<HeadSigner>,
    origin: String,
}

impl HeadSigning for NoteSigner {
    fn sign(&self, size: u64, root: [u8; 32]) -> Result<String, StoreError> {
        let head = TreeHead {
            origin: self.origin.clone(),
            size,
            root,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        self.signer
            .get()
            .sign(head)
            .and_then(|signed| signed.to_note())
            .map_err(|e| StoreError::Record(format!("signing the tree head: {e}")))
    }
}

impl AuditEntry for AuditRecord {
    fn encode_at(&mut self, index: u64) -> Result<Vec<u8>, StoreError> {
        self.index = index;
        serde_json::to_vec(self).map_err(|e| StoreError::Record(e.to_string()))
    }

    fn patient(&self) -> Option<Pseudonym> {
        let bytes = hex::decode(self.patient.as_deref()?).ok()?;
        <[u8; PSEUDONYM_LEN]>::try_from(bytes.as_slice()).ok()
    }
}
