//! `LookupService.Lookup`, and the local answer that federated lookups share.

use pil_proto::{ident::PatientId, v1};
use tonic::{Request, Response, Status};

use super::{NodeService, applied_rules, denied, internal, invalid};
use crate::{
    access::Requester,
    audit::{
        AuditRecord,
        record::{Action, RequesterInfo},
        rule_infos,
    },
    pointer,
    registry::LookupFilter,
};

/// What this node's own pointers give a requester.
pub struct LocalAnswer {
    pub pointers: Vec<v1::Pointer>,
    pub rules: Vec<pil_legal::RuleRef>,
    pub emergency: bool,
    pub opted_out: bool,
}

impl NodeService {
    /// Decides and answers a lookup from this node's own pointers, and fills the audit
    /// record with who asked, what was decided and what was returned.
    pub(super) async fn answer_locally(
        &self,
        requester: &Requester,
        patient: &PatientId,
        filter: LookupFilter,
        entry: &mut AuditRecord,
    ) -> Result<LocalAnswer, Status> {
        entry.requester = Some(RequesterInfo::from(requester));
        if !requester.covers(patient) {
            entry.decision.outcome = "denied".into();
            return Err(Status::permission_denied(
                "the access token's attest names other patients than the one looked up",
            ));
        }
        let legal = self.access.legal();
        let search = legal.decide_lookup(&requester.facts);
        entry.decision.rules = rule_infos(&search.rules);
        entry.decision.emergency = search.emergency;
        if !search.allowed {
            entry.decision.outcome = "denied".into();
            return Err(denied(&search));
        }
        entry.decision.outcome = "allowed".into();
        let (opt_out, blocks) = self.registry.protections(patient).await.map_err(internal)?;
        if opt_out.is_some() {
            entry.outcome.detail = "the patient has opted out of PIL".into();
            return Ok(LocalAnswer {
                pointers: Vec::new(),
                rules: search.rules,
                emergency: false,
                opted_out: true,
            });
        }
        let found = self
            .registry
            .lookup(patient, &filter)
            .await
            .map_err(internal)?;
        let region = self.registry.region().to_string();
        let mut rules = search.rules.clone();
        let mut emergency = search.emergency;
        let mut pointers = Vec::with_capacity(found.len());
        for p in found {
            let holder = p
                .holder
                .as_ref()
                .map(|h| h.organization_number.clone())
                .unwrap_or_default();
            if requester.is_blocked(&blocks, &holder) {
                continue;
            }
            let decision = legal.decide(
                &requester.facts,
                &pil_legal::PointerFacts {
                    holder,
                    categories: p.categories.clone(),
                    region: region.clone(),
                },
            );
            for r in &decision.rules {
                if !rules.iter().any(|k| k.id == r.id) {
                    rules.push(r.clone());
                }
            }
            if decision.allowed {
                emergency |= decision.emergency;
                pointers.push(p);
            }
        }
        entry.decision.rules = rule_infos(&rules);
        entry.decision.emergency = emergency;
        entry.outcome.pointers = pointers.len() as u32;
        let mut orgs: Vec<String> = pointers
            .iter()
            .filter_map(|p| p.holder.as_ref().map(|h| h.organization_number.clone()))
            .collect();
        orgs.sort();
        orgs.dedup();
        entry.outcome.organizations = orgs;
        Ok(LocalAnswer {
            pointers,
            rules,
            emergency,
            opted_out: false,
        })
    }

    async fn lookup_inner(
        &self,
        req: Request<v1::LookupRequest>,
        entry: &mut AuditRecord,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        let patient = pointer::patient(req.get_ref().patient.as_ref(), self.config.test_data)
            .map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        let requester = self.requester(&req, "/pil.v1.LookupService/Lookup")?;
        let caller = requester.token.org_number.clone();
        let req = req.into_inner();
        let categories =
            pointer::category_list("categories", &req.categories, false).map_err(invalid)?;
        let organizations = req
            .organization_numbers
            .iter()
            .map(|o| pointer::org_number("organization_numbers", o).map(|o| o.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let filter = LookupFilter {
            categories,
            organizations,
        };
        let local = self
            .answer_locally(&requester, &patient, filter, entry)
            .await;
        let local = match local {
            Ok(a) => a,
            Err(status) => {
                tracing::info!(caller = %caller, query_id = %entry.query_id, status = %status.message(), "lookup refused");
                return Err(status);
            }
        };
        let region = self.registry.region().to_string();
        tracing::info!(
            caller = %caller, query_id = %entry.query_id, found = local.pointers.len(),
            emergency = local.emergency, opted_out = local.opted_out,
            purpose = %requester.facts.purpose, "lookup"
        );
        Ok(Response::new(v1::LookupResponse {
            regions: vec![v1::RegionStatus {
                region,
                state: v1::RegionState::Ok as i32,
                detail: if local.opted_out {
                    "the patient has opted out of PIL".into()
                } else {
                    String::new()
                },
                pointer_count: local.pointers.len() as u32,
            }],
            pointers: local.pointers,
            query_id: entry.query_id.clone(),
            opted_out: local.opted_out,
            rules: applied_rules(&local.rules),
            emergency: local.emergency,
        }))
    }
}

#[tonic::async_trait]
impl v1::lookup_service_server::LookupService for NodeService {
    async fn lookup(
        &self,
        req: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        let mut entry = self.audit_entry(&req, Action::Lookup);
        let result = self.lookup_inner(req, &mut entry).await;
        self.audited(entry, result).await
    }
}
