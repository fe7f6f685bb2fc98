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
    signer: Arc<dyn HeadSigning>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl AuditLog {
    /// The log in `store`, whose heads are signed with `signer` under the origin
    /// `pil-audit/<region>`.
    pub fn new(store: Arc<dyn Store>, region: &str, signer: HeadSigner) -> Self {
        Self {
            store,
            signer: Arc::new(NoteSigner {
                signer,
                origin: format!("pil-audit/{region}"),
            }),
            metrics: None,
        }
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

    /// Signs the current tree unless its size is already signed; returns the newest
    /// signed head `(size, note)`, if any.
    pub async fn sign_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        Ok(self.store.audit_sign(self.signer.clone()).await?)
    }

    /// A handle that does not keep the log open: for the parts of the node that live
    /// as long as the process (e.g. the SIGHUP handler).
    pub fn downgrade(&self) -> WeakAuditLog {
        WeakAuditLog {
            store: Arc::downgrade(&self.store),
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
}

/// Signs heads as C2SP signed notes with the node's key.
struct NoteSigner {
    signer: HeadSigner,
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
