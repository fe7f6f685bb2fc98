//! Between the node's own types and the wire's: the one place that builds `v1`
//! messages from registry pointers, blocks and rules (requests are checked into
//! domain types by `pointer.rs`).

use pil_proto::v1;
use sha2::{Digest, Sha256};

use crate::{
    lookup::Shown,
    pointer::to_timestamp,
    registry::Pointer,
    store::{PointerKey, StoredBlock},
};

/// A registry pointer as a lookup, a write or an export answers it.
pub fn pointer(p: &Pointer) -> v1::Pointer {
    let v = &p.value;
    v1::Pointer {
        patient: Some(v1::PatientIdentifier {
            system: p.patient.0.clone(),
            value: p.patient.1.clone(),
        }),
        holder: Some(v1::Organization {
            organization_number: p.holder().to_string(),
            sub_unit_organization_number: v.sub_unit.clone(),
            name: v.holder_name.clone(),
        }),
        endpoint: Some(v1::Endpoint {
            base_url: v.base_url.clone(),
            api_kind: v.api_kind,
        }),
        categories: v.categories.clone(),
        period: (v.period_start.is_some() || v.period_end.is_some()).then(|| v1::Period {
            start: v.period_start.map(to_timestamp),
            end: v.period_end.map(to_timestamp),
        }),
        last_updated: Some(to_timestamp(v.last_updated)),
        expires_at: v.expires_at.map(to_timestamp),
        region: p.region.clone(),
        pointer_id: pointer_id(&p.key),
    }
}

/// A stable opaque id: a hash of the key, so it reveals nothing about the patient.
fn pointer_id(key: &PointerKey) -> String {
    let digest = Sha256::new()
        .chain_update(b"pil-pointer-id\0")
        .chain_update(key.encode())
        .finalize();
    hex::encode(&digest[..12])
}

/// A stored block as the admin service lists it.
pub fn block(id: [u8; 16], b: &StoredBlock) -> v1::Block {
    use v1::block_target::Target;
    let target = match b.target_kind {
        crate::access::BLOCK_HPR => Some(Target::HprNumber(b.target.clone())),
        crate::access::BLOCK_PROFESSION => Some(Target::Profession(b.target.clone())),
        crate::access::BLOCK_ORGANIZATION => Some(Target::OrganizationNumber(b.target.clone())),
        _ => None,
    };
    v1::Block {
        block_id: hex::encode(id),
        target: Some(v1::BlockTarget { target }),
        holder_organization_number: b.holder.clone(),
        reason: b.reason.clone(),
        created_at: Some(to_timestamp(b.created_at)),
    }
}

/// The rules of a decision as an answer states them.
pub fn applied_rules<'a>(
    rules: impl IntoIterator<Item = &'a pil_legal::RuleRef>,
) -> Vec<v1::AppliedRule> {
    rules
        .into_iter()
        .map(|r| v1::AppliedRule {
            id: r.id.clone(),
            legal_basis: r.legal_basis.clone(),
            explanation: r.explanation.clone(),
            effect: match r.effect {
                pil_legal::RuleEffect::Permit => v1::RuleEffect::Permit as i32,
                pil_legal::RuleEffect::Forbid => v1::RuleEffect::Forbid as i32,
            },
        })
        .collect()
}

/// A pointer from another region's answer, as the lookup decides on it.
impl Shown for v1::Pointer {
    fn holder(&self) -> &str {
        self.holder
            .as_ref()
            .map(|h| h.organization_number.as_str())
            .unwrap_or_default()
    }

    fn categories(&self) -> &[String] {
        &self.categories
    }

    fn region(&self) -> &str {
        &self.region
    }

    fn endpoint(&self) -> (&str, &str, i32) {
        let sub_unit = self
            .holder
            .as_ref()
            .map(|h| h.sub_unit_organization_number.as_str())
            .unwrap_or_default();
        match &self.endpoint {
            Some(e) => (sub_unit, e.base_url.as_str(), e.api_kind),
            None => (sub_unit, "", 0),
        }
    }

    fn updated(&self) -> (i64, i32) {
        self.last_updated
            .as_ref()
            .map(|t| (t.seconds, t.nanos))
            .unwrap_or_default()
    }
}
