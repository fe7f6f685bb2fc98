//! `PolicyService.Explain`: what the legal configuration would decide for the caller's
//! token, without reading any pointer.

use pil_proto::{categories, v1};
use tonic::{Request, Response, Status};

use super::{NodeService, convert::applied_rules, internal, invalid};
use crate::{
    audit::{
        AuditRecord,
        record::{Action, RequesterInfo},
        rule_infos,
    },
    error::Error,
    pointer,
};

/// The holder of the hypothetical pointers explained: an organization number no
/// requester has, so the rules treat it as "another organization".
const ANOTHER_ORGANIZATION: &str = "000000000";

#[tonic::async_trait]
impl v1::policy_service_server::PolicyService for NodeService {
    async fn explain(
        &self,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        self.serve(req, Action::Explain, |s, e, r| {
            Box::pin(s.explain_inner(e, r))
        })
        .await
    }
}

impl NodeService {
    async fn explain_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.PolicyService/Explain")
            .await?;
        entry.requester = Some(RequesterInfo::from(&requester));
        let wanted = pointer::category_list("categories", &req.get_ref().categories, false)
            .map_err(invalid)?;
        let wanted: Vec<String> = if wanted.is_empty() {
            categories::CATEGORIES
                .iter()
                .map(|(c, _)| c.to_string())
                .collect()
        } else {
            wanted
        };
        let patient = match req.get_ref().patient.as_ref() {
            Some(p) => Some(pointer::patient(Some(p), self.config.test_data).map_err(invalid)?),
            None => None,
        };
        if let Some(patient) = &patient {
            entry.patient = Some(hex::encode(self.registry.pseudonym(patient)));
        }
        if let Some(patient) = &patient
            && !requester.covers(patient)
        {
            return Err(Error::denied(
                "the access token's attest names other patients than the one asked about",
            ));
        }
        let legal = self.access.legal();
        let search = legal.decide_lookup(&requester.facts);
        // An opt-out is a fact about the patient: told only to a requester whose lookup
        // would be allowed, as a lookup would tell it.
        let opted_out = match &patient {
            Some(patient) if search.allowed => self
                .registry
                .protections(patient)
                .await
                .map_err(internal)?
                .0
                .is_some(),
            _ => false,
        };
        entry.decision.outcome = if search.allowed { "allowed" } else { "denied" }.into();
        entry.decision.emergency = search.emergency;
        entry.decision.rules = rule_infos(&search.rules);
        let mut out = v1::ExplainResponse {
            allowed: search.allowed,
            emergency: search.emergency,
            rules: applied_rules(&search.rules),
            categories: Vec::new(),
            opted_out,
        };
        if search.allowed {
            for category in wanted {
                let d = legal.decide(
                    &requester.facts,
                    &pil_legal::PointerFacts {
                        holder: ANOTHER_ORGANIZATION.to_string(),
                        categories: vec![category.clone()],
                        region: self.registry.region().to_string(),
                    },
                );
                out.categories.push(v1::CategoryDecision {
                    category,
                    allowed: d.allowed,
                    emergency: d.emergency,
                    rules: applied_rules(&d.rules),
                });
            }
        }
        tracing::info!(caller = %requester.token.org_number, allowed = out.allowed, "policy explained");
        Ok(Response::new(out))
    }
}
