//! What a node checks before it touches its data directory: key file modes, keys,
//! TLS, the audit signing key, peers, tokens and the legal configuration. Every check
//! runs, so an operator (and `pil-node check-config`) sees every problem at once.

use std::sync::Arc;

use pil_transparency::HeadSigner;

use crate::{
    access::{Access, own_names},
    audit::AuditError,
    config::NodeConfig,
    federation::Federation,
    patient_keys::PatientKeys,
    secret_file::check_private,
    server::NodeError,
    tls,
};

/// Everything loaded and checked, ready to serve with.
pub struct Checked {
    pub keys: PatientKeys,
    pub tls: Arc<rustls::ServerConfig>,
    pub signer: HeadSigner,
    pub federation: Arc<Federation>,
    pub access: Arc<Access>,
}

/// Loads and checks everything `config` names, for a node listening on `port`.
/// Returns every problem found, not only the first.
pub fn check(config: &NodeConfig, port: u16) -> Result<Checked, Vec<NodeError>> {
    let mut problems = Vec::new();
    for (what, path) in [
        ("the pseudonym key", &config.keys.pseudonym_key_file),
        ("the storage key", &config.keys.storage_key_file),
        ("the TLS private key", &config.tls.key),
        ("the audit signing key", &config.audit.signing_key_file),
    ] {
        if let Err(e) = check_private(what, path) {
            problems.push(e.into());
        }
    }
    let keys = PatientKeys::load(
        &config.keys.pseudonym_key_file,
        &config.keys.storage_key_file,
    )
    .map_err(NodeError::from);
    let tls_config = tls::server_config(&config.tls).map_err(NodeError::from);
    let signer = HeadSigner::load(&config.audit.signing_key_file).map_err(|e| {
        NodeError::from(AuditError::Key(format!(
            "{}: {e}",
            config.audit.signing_key_file.display()
        )))
    });
    let federation = Federation::new(&config.federation, &config.tls, &config.region)
        .map(Arc::new)
        .map_err(|e| NodeError::Task(e.to_string()));
    let access = tls::own_host_names(&config.tls)
        .map_err(NodeError::from)
        .and_then(|names| {
            let names = own_names(config.auth.public_url.as_deref(), &names, port);
            Access::load(config, names)
                .map(Arc::new)
                .map_err(NodeError::from)
        });
    match (keys, tls_config, signer, federation, access) {
        (Ok(keys), Ok(tls), Ok(signer), Ok(federation), Ok(access)) if problems.is_empty() => {
            Ok(Checked {
                keys,
                tls,
                signer,
                federation,
                access,
            })
        }
        (keys, tls, signer, federation, access) => {
            problems.extend(keys.err());
            problems.extend(tls.err());
            problems.extend(signer.err());
            problems.extend(federation.err());
            problems.extend(access.err());
            Err(problems)
        }
    }
}
