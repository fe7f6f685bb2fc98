//! Re-reading configuration while the node serves: on SIGHUP or an operator's call.
//!
//! One place decides what a reload covers, so both triggers behave the same: the
//! legal configuration (swapped atomically, or kept when the new one is invalid), the
//! settings that follow from it, and the federation peers from the node configuration
//! file. It holds no registry handle, so it never keeps the database open past
//! shutdown.

use std::{path::PathBuf, sync::Arc};

use crate::{
    access::{Access, AccessError},
    config::NodeConfig,
    federation::Federation,
    registry::PointerLifetime,
};

/// Why a reload was refused; the previous configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("node configuration: {0}")]
    Config(String),
}

/// What a reload put in force.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub policies: usize,
    pub peers: Vec<String>,
}

/// Reloads a running node's configuration. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    access: Arc<Access>,
    lifetime: PointerLifetime,
    federation: Arc<Federation>,
    source: Option<PathBuf>,
}

impl Reloader {
    /// Applies the settings of the legal configuration now in force.
    pub fn new(
        access: Arc<Access>,
        lifetime: PointerLifetime,
        federation: Arc<Federation>,
        source: Option<PathBuf>,
    ) -> Self {
        let this = Self {
            access,
            lifetime,
            federation,
            source,
        };
        this.apply_settings();
        this
    }

    /// Re-reads the node configuration's peers and the legal configuration. Both are
    /// checked before either is put in force, so on any error nothing changes.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let peers = match &self.source {
            Some(path) => {
                let federation = NodeConfig::load(path)
                    .map_err(|e| ReloadError::Config(e.to_string()))?
                    .federation;
                Some(
                    self.federation
                        .prepare(&federation)
                        .map_err(|e| ReloadError::Config(e.to_string()))?,
                )
            }
            None => None,
        };
        let legal = self.access.read_legal()?;
        let policies = legal.summary().policies;
        self.access.install_legal(legal);
        if let Some(peers) = peers {
            self.federation.install(peers);
        }
        self.apply_settings();
        Ok(Reloaded {
            policies,
            peers: self
                .federation
                .view()
                .into_iter()
                .map(|p| p.config.region)
                .collect(),
        })
    }

    fn apply_settings(&self) {
        let legal = self.access.legal();
        self.lifetime
            .set_days(legal.settings().retention.pointer_lifetime_days);
    }
}

/// A reload on SIGHUP, recorded in the audit log like an operator's reload call.
#[derive(Clone)]
pub struct SignalReload {
    pub reloader: Reloader,
    pub audit: crate::audit::WeakAuditLog,
    pub region: String,
}

impl SignalReload {
    /// Reloads and records the outcome.
    pub async fn run(&self) -> Result<Reloaded, ReloadError> {
        use crate::audit::record::{Action, AuditRecord, CallerInfo};
        let result = self.reloader.reload();
        let (status, detail) = match &result {
            Ok(r) => (
                "OK".to_string(),
                format!(
                    "SIGHUP: {} policies in force, peers {:?}",
                    r.policies, r.peers
                ),
            ),
            Err(e) => ("FAILED_PRECONDITION".to_string(), format!("SIGHUP: {e}")),
        };
        let mut record = AuditRecord::not_decided(
            &self.region,
            Action::PolicyReload,
            CallerInfo::default(),
            &status,
            detail.clone(),
        );
        record.detail = Some(detail);
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(error = %e, "the reload could not be recorded in the audit log");
        }
        result
    }
}
