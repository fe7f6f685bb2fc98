//! `PolicyService.Explain`: what the legal configuration would decide for the caller's
//! token, without reading any pointer.

use pil_proto::{categories, v1};
use tonic::{Request, Response, Status};

use super::{NodeService, applied_rules, invalid};
use crate::pointer;

#[tonic::async_trait]
impl v1::policy_service_server::PolicyService for NodeService {
    async fn explain(
        &self,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        let requester = self.requester(&req, "/pil.v1.PolicyService/Explain")?;
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
        let legal = self.access.legal();
        let search = legal.decide_lookup(&requester.facts);
        let mut out = v1::ExplainResponse {
            allowed: search.allowed,
            emergency: search.emergency,
            rules: applied_rules(&search.rules),
            categories: Vec::new(),
        };
        if search.allowed {
            // A pointer of another organization: the case the rules distinguish.
            let other = if requester.facts.organization == "974760673" {
                "983044778"
            } else {
                "974760673"
            };
            for category in wanted {
                let d = legal.decide(
                    &requester.facts,
                    &pil_legal::PointerFacts {
                        holder: other.to_string(),
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
