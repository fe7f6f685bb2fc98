//! Re-reading configuration while the node serves: on SIGHUP or an operator's call.
//!
//! One place decides what a reload covers, so both triggers behave the same: the
//! legal configuration and the settings that follow from it, the federation peers
//! from the node configuration file, the node's TLS certificate, key and client CA
//! bundle, the token issuer's keys, the audit signing key and the pseudonym key ring.
//! Everything is read and checked before anything is put in force, so a bad file
//! leaves the node as it was. It holds the registry only weakly, so it never keeps the
//! database open past shutdown.

use std::{path::PathBuf, sync::Arc};

use pil_transparency::HeadSigner;

use crate::{
    access::{Access, AccessError},
    audit::{
        WeakAuditLog,
        log::KeyRotation,
        record::{Action, AuditRecord},
    },
    config::{NodeConfig, TlsConfig},
    federation::Federation,
    issuer_keys::{IssuerKeys, KeysError},
    patient_keys::{KeyError, KeyIds, PatientKeys},
    registry::{PointerLifetime, RegistryError, WeakRegistry},
    tls::{ServerTls, TlsError, TlsSummary},
};

/// Why a reload was refused; the previous configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("node configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    IssuerKeys(#[from] KeysError),
    #[error("audit signing key {path}: {reason}")]
    AuditKey { path: String, reason: String },
    #[error(transparent)]
    Secret(#[from] crate::secret_file::SecretFileError),
    #[error("the audit signing key could not be rotated: {0}")]
    Rotation(#[from] crate::audit::AuditError),
    #[error(transparent)]
    PseudonymKeys(#[from] KeyError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the node is stopping")]
    Stopping,
}

/// What a reload put in force.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub policies: usize,
    pub peers: Vec<String>,
    pub tls: TlsSummary,
    pub issuer_kids: Vec<String>,
    /// The key id heads are signed with now.
    pub audit_key: String,
    pub rotation: Option<KeyRotation>,
    pub pseudonym_keys: KeyIds,
}

impl Reloaded {
    /// One line for the operator and the audit record.
    pub fn describe(&self) -> String {
        let rotated = self
            .rotation
            .as_ref()
            .map(|r| {
                format!(
                    " (rotated from {}, announced in record {})",
                    r.from, r.announced_at
                )
            })
            .unwrap_or_default();
        let ring = &self.pseudonym_keys;
        format!(
            "{} policies in force; peers [{}]; node certificate sha256 {} valid until {}; \
             {} client CA certificate(s); issuer keys [{}]; pseudonym key {} (earlier [{}], \
             staged [{}], retired [{}]); heads signed by key {}{rotated}",
            self.policies,
            self.peers.join(", "),
            self.tls.cert_sha256,
            self.tls.not_after,
            self.tls.client_cas,
            self.issuer_kids.join(", "),
            ring.current,
            ring.earlier.join(", "),
            ring.staged.join(", "),
            ring.retired.join(", "),
            self.audit_key,
        )
    }
}

/// What a reload re-reads and where it puts it, as the node was started with.
#[derive(Clone)]
pub struct Reloadable {
    pub access: Arc<Access>,
    pub lifetime: PointerLifetime,
    pub federation: Arc<Federation>,
    /// The node configuration file, re-read for the peers.
    pub source: Option<PathBuf>,
    pub region: String,
    pub tls_files: TlsConfig,
    pub tls: ServerTls,
    /// The names in the node certificate at start, which a new one must keep.
    pub cert_names: Vec<String>,
    pub issuer_keys: Arc<IssuerKeys>,
    pub signing_key_file: PathBuf,
    pub audit: WeakAuditLog,
    pub pseudonym_key_file: PathBuf,
    pub storage_key_file: PathBuf,
    pub registry: WeakRegistry,
}

/// Reloads a running node's configuration. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    parts: Arc<Reloadable>,
    /// One reload at a time, so two cannot interleave their checks and installs.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// Applies the settings of the legal configuration now in force.
    pub fn new(parts: Reloadable) -> Self {
        let this = Self {
            parts: Arc::new(parts),
            turn: Default::default(),
        };
        this.apply_settings();
        this
    }

    /// Re-reads everything a reload covers; on any error nothing changes.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _turn = self.turn.lock().await;
        let p = &*self.parts;
        let peers = match &p.source {
            Some(path) => {
                let federation = NodeConfig::load(path)
                    .map_err(|e| ReloadError::Config(e.to_string()))?
                    .federation;
                Some(
                    p.federation
                        .prepare(&federation)
                        .map_err(|e| ReloadError::Config(e.to_string()))?,
                )
            }
            None => None,
        };
        let legal = p.access.read_legal()?;
        crate::secret_file::check_private("the TLS private key", &p.tls_files.key)?;
        crate::secret_file::check_private("the audit signing key", &p.signing_key_file)?;
        let (tls, tls_summary) = crate::tls::reload_config(&p.tls_files, &p.region, &p.cert_names)?;
        let keys = p.issuer_keys.load().await?;
        let signer = HeadSigner::load(&p.signing_key_file).map_err(|e| ReloadError::AuditKey {
            path: p.signing_key_file.display().to_string(),
            reason: e.to_string(),
        })?;
        crate::secret_file::check_private("the pseudonym key ring", &p.pseudonym_key_file)?;
        let patient_keys = PatientKeys::load(&p.pseudonym_key_file, &p.storage_key_file)?;
        let registry = p.registry.upgrade().ok_or(ReloadError::Stopping)?;
        // Checked against the ring in force, and put in force first: it is the one
        // part whose install can still be refused.
        if patient_keys.ids() != registry.keys().ids() {
            registry.replace_keys(patient_keys).await?;
        }
        let pseudonym_keys = registry.keys().ids().clone();
        drop(registry);

        let policies = legal.summary().policies;
        p.access.install_legal(legal);
        if let Some(peers) = peers {
            p.federation.install(peers);
        }
        p.tls.install(tls, tls_summary.clone());
        p.access.install_jwks(keys.jwks);
        self.apply_settings();
        let announcement =
            AuditRecord::operation(&p.region, Action::PolicyReload, "OK", String::new());
        let rotation = p.audit.rotate_signing_key(signer, announcement).await?;
        Ok(Reloaded {
            policies,
            peers: p
                .federation
                .view()
                .into_iter()
                .map(|p| p.config.region)
                .collect(),
            tls: tls_summary,
            issuer_kids: p.access.issuer_kids(),
            audit_key: p.audit.signing_key_id(),
            rotation,
            pseudonym_keys,
        })
    }

    /// Fetches the issuer's keys again (for keys published at a URL) and puts them in
    /// force when they changed, with an audit record. Returns when to fetch next.
    pub async fn refresh_issuer_keys(&self) -> Option<std::time::Duration> {
        let _turn = self.turn.lock().await;
        let p = &*self.parts;
        let (status, detail, next) = match p.issuer_keys.load().await {
            Ok(loaded) => {
                let before = p.access.issuer_kids();
                let after: Vec<String> =
                    loaded.jwks.kids().into_iter().map(str::to_string).collect();
                if after == before {
                    return loaded.next_fetch;
                }
                p.access.install_jwks(loaded.jwks);
                tracing::info!(kids = ?after, origin = %loaded.origin, "issuer keys changed");
                (
                    "OK",
                    format!(
                        "issuer keys fetched from {}: [{}] in force (were [{}])",
                        loaded.origin,
                        after.join(", "),
                        before.join(", ")
                    ),
                    loaded.next_fetch,
                )
            }
            Err(e) => {
                // Kept quiet in the audit log: nothing changed, and an unreachable
                // issuer would otherwise fill it.
                tracing::warn!(error = %e, "the issuer's keys could not be refreshed; the ones in force stay");
                return Some(std::time::Duration::from_secs(30));
            }
        };
        let record = AuditRecord::operation(&p.region, Action::PolicyReload, status, detail);
        if let Err(e) = p.audit.append(record).await {
            tracing::error!(error = %e, "the change of issuer keys could not be recorded in the audit log");
        }
        next
    }

    /// The node certificate and CA bundle in force.
    pub fn tls_in_force(&self) -> TlsSummary {
        self.parts.tls.summary()
    }

    fn apply_settings(&self) {
        let legal = self.parts.access.legal();
        self.parts
            .lifetime
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
        let result = self.reloader.reload().await;
        let (status, detail) = match &result {
            Ok(r) => ("OK", format!("SIGHUP: {}", r.describe())),
            Err(e) => ("FAILED_PRECONDITION", format!("SIGHUP: {e}")),
        };
        let record = AuditRecord::operation(&self.region, Action::PolicyReload, status, detail);
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(error = %e, "the reload could not be recorded in the audit log");
        }
        result
    }
}
