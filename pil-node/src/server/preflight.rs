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
    issuer_keys::IssuerKeys,
    patient_keys::PatientKeys,
    secret_file::check_private,
    server::NodeError,
    tls,
};

/// Everything loaded and checked, ready to serve with.
pub struct Checked {
    pub keys: PatientKeys,
    /// The region's routing key, when it publishes a routing summary.
    pub routing_key: Option<crate::routing::tokens::RoutingKey>,
    pub tls: Arc<rustls::ServerConfig>,
    /// The names in the node certificate, which a rotated one must keep.
    pub cert_names: Vec<String>,
    pub signer: HeadSigner,
    pub federation: Arc<Federation>,
    pub access: Arc<Access>,
    pub issuer_keys: Arc<IssuerKeys>,
    /// When to fetch the issuer's keys again, when they are fetched.
    pub next_key_fetch: Option<std::time::Duration>,
    /// The witnesses asked to cosign this log's heads.
    pub witnesses: Option<crate::audit::Witnesses>,
    /// This node's own keys as a witness of other logs.
    pub witness: Option<crate::witness::WitnessKeys>,
}

/// Loads and checks everything `config` names, for a node listening on `port`.
/// Returns every problem found, not only the first.
pub async fn check(config: &NodeConfig, port: u16) -> Result<Checked, Vec<NodeError>> {
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
    if let Some(path) = &config.keys.routing_key_file
        && let Err(e) = check_private("the routing key", path)
    {
        problems.push(e.into());
    }
    let routing_key = match &config.keys.routing_key_file {
        None => None,
        Some(path) => match crate::routing::tokens::RoutingKey::load(path) {
            Ok(key) => Some(key),
            Err(e) => {
                problems.push(e.into());
                None
            }
        },
    };
    let tls_config = tls::server_config(&config.tls).map_err(NodeError::from);
    let signer = HeadSigner::load(&config.audit.signing_key_file).map_err(|e| {
        NodeError::from(AuditError::Key(format!(
            "{}: {e}",
            config.audit.signing_key_file.display()
        )))
    });
    let witnesses = crate::audit::Witnesses::from_config(&config.audit).unwrap_or_else(|e| {
        problems.push(NodeError::Witness(e));
        None
    });
    if let Some(w) = &config.witness
        && let Err(e) = check_private("the witness key", &w.key_file)
    {
        problems.push(e.into());
    }
    let witness = match config
        .witness
        .as_ref()
        .map(crate::witness::WitnessKeys::load)
    {
        Some(Err(e)) => {
            problems.push(NodeError::Witness(e));
            None
        }
        loaded => loaded.and_then(Result::ok),
    };
    let federation = Federation::new(&config.federation, &config.tls, &config.region)
        .map(Arc::new)
        .map_err(|e| NodeError::Task(e.to_string()));
    let issuer_keys = match IssuerKeys::new(&config.auth, &config.data_dir) {
        Ok(source) => source
            .load_at_start()
            .await
            .map(|loaded| (Arc::new(source), loaded)),
        Err(e) => Err(e),
    }
    .map_err(NodeError::from);
    let cert_names = tls::own_host_names(&config.tls).map_err(NodeError::from);
    // Access is tried only when its inputs loaded; their problems are reported above.
    let access = match (&cert_names, issuer_keys.as_ref()) {
        (Ok(names), Ok((_, loaded))) => {
            let names = own_names(config.auth.public_url.as_deref(), names, port);
            Some(
                Access::load(config, names, loaded.jwks.clone())
                    .map(Arc::new)
                    .map_err(NodeError::from),
            )
        }
        _ => None,
    };
    match (
        keys,
        tls_config,
        signer,
        federation,
        issuer_keys,
        cert_names,
        access,
    ) {
        (
            Ok(keys),
            Ok(tls),
            Ok(signer),
            Ok(federation),
            Ok((issuer_keys, loaded)),
            Ok(cert_names),
            Some(Ok(access)),
        ) if problems.is_empty() => Ok(Checked {
            keys,
            routing_key,
            tls,
            cert_names,
            signer,
            federation,
            access,
            issuer_keys,
            next_key_fetch: loaded.next_fetch,
            witnesses,
            witness,
        }),
        (keys, tls, signer, federation, issuer_keys, cert_names, access) => {
            problems.extend(keys.err());
            problems.extend(tls.err());
            problems.extend(issuer_keys.err());
            problems.extend(cert_names.err());
            problems.extend(signer.err());
            problems.extend(federation.err());
            problems.extend(access.and_then(Result::err));
            Err(problems)
        }
    }
}
