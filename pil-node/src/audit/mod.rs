//! The audit log: every request the node answers, recorded before the answer leaves.
//!
//! [`record`] is what is kept, [`log`] appends it durably into an RFC 6962 hash tree
//! with signed tree heads, [`fhir`] presents it as FHIR AuditEvents, [`query`] searches it, and
//! [`retention`] drops old contents while keeping the tree verifiable.

pub mod fhir;
pub mod log;
pub mod query;
pub mod record;
pub mod retention;
mod witnessing;

use std::path::{Path, PathBuf};

pub use log::{AuditError, AuditLog, WeakAuditLog};
pub use record::AuditRecord;
pub use witnessing::Witnesses;

use crate::access::Requester;
use record::{Coding, RequesterInfo, RuleInfo};

/// Writes a new tree-head signing key and its public key into `dir`, or keeps the
/// ones there. Returns `(private key, public key)` paths.
pub fn write_signing_key(dir: &Path) -> Result<(PathBuf, PathBuf), AuditError> {
    std::fs::create_dir_all(dir).map_err(|e| AuditError::Key(format!("{}: {e}", dir.display())))?;
    let key = dir.join("signing-key.pem");
    let public = dir.join("public-key.pem");
    let signer = if key.exists() {
        pil_transparency::HeadSigner::load(&key)
    } else {
        pil_transparency::HeadSigner::write_new(&key)
    }
    .map_err(|e| AuditError::Key(format!("{}: {e}", key.display())))?;
    let pem = signer
        .public_key_pem()
        .map_err(|e| AuditError::Key(e.to_string()))?;
    std::fs::write(&public, pem)
        .map_err(|e| AuditError::Key(format!("{}: {e}", public.display())))?;
    Ok((key, public))
}

impl From<&Requester> for RequesterInfo {
    fn from(r: &Requester) -> Self {
        let t = &r.token;
        RequesterInfo {
            organization: t.org_number.clone(),
            organization_name: t.org_name.clone(),
            child_organization: t.child_org_number.clone(),
            child_organization_name: t
                .child_org_number
                .as_ref()
                .and(t.point_of_care.as_ref())
                .and_then(|p| p.name.clone()),
            hpr_number: t.hpr_number.clone(),
            practitioner_name: t.practitioner_name.clone(),
            profession: t.profession.clone(),
            purpose_of_use: coding(&t.purpose_of_use),
            purpose_details: t.purpose_of_use_details.as_ref().map(coding),
            care_relationship: r.facts.care_relationship,
            decision_ref: t.decision_ref.as_ref().and_then(|d| d.id.clone()),
            client_id: t.client_id.clone(),
        }
    }
}

fn coding(c: &pil_auth::claims::Code) -> Coding {
    Coding {
        system: c.system.clone().unwrap_or_default(),
        code: c.code.clone(),
    }
}

/// The rules of a decision as recorded.
pub fn rule_infos<'a>(rules: impl IntoIterator<Item = &'a pil_legal::RuleRef>) -> Vec<RuleInfo> {
    rules
        .into_iter()
        .map(|r| RuleInfo {
            id: r.id.clone(),
            legal_basis: r.legal_basis.clone(),
            effect: match r.effect {
                pil_legal::RuleEffect::Permit => "permit".into(),
                pil_legal::RuleEffect::Forbid => "forbid".into(),
            },
        })
        .collect()
}
