//! `FederationService`: lookups forwarded by peer nodes, answered from this node's own
//! pointers under its own legal configuration. Only configured peers' node
//! certificates may call it, and a forwarded lookup is never forwarded again.

use pil_proto::{ident::OrgNumber, v1};
use tonic::{Request, Response, Status};

use super::{NodeService, applied_rules, invalid};
use crate::{
    audit::{AuditRecord, record::Action},
    identity::Caller,
    pointer,
    tls::PeerInfo,
};

impl NodeService {
    /// The calling peer's region; refuses organizations and unknown nodes.
    fn peer_region<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match req.extensions().get::<PeerInfo>().map(|i| &i.caller) {
            Some(Ok(Caller::Node { region })) if self.federation.is_peer(region) => {
                Ok(region.clone())
            }
            Some(Ok(Caller::Node { region })) => {
                tracing::warn!(%region, "federated call from a node that is not a peer refused");
                Err(Status::permission_denied(format!(
                    "node of region {region:?} is not a configured peer of this node"
                )))
            }
            Some(Ok(Caller::Organization { org_number, .. })) => {
                tracing::warn!(caller = %org_number, "federated call with an organization certificate refused");
                Err(Status::permission_denied(
                    "the federation API is for peer nodes only; organizations use LookupService",
                ))
            }
            _ => Err(Status::unauthenticated(
                "no node certificate on this connection",
            )),
        }
    }

    async fn forwarded_lookup_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedLookupRequest>,
    ) -> Result<Response<v1::ForwardedLookupResponse>, Status> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region.clone());
        let Ok(_permit) = self.forward_limit.clone().try_acquire_owned() else {
            tracing::warn!(peer = %region, "forwarded lookup shed: at capacity");
            return Err(Status::resource_exhausted(format!(
                "this node is serving its maximum of {} forwarded lookups; retry shortly",
                self.federation.config().max_concurrent_forwarded
            )));
        };
        let r = req.into_inner();
        let query_id = r.query_id.trim();
        if !query_id.is_empty()
            && query_id.len() <= 64
            && query_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            entry.query_id = query_id.to_string();
        }
        let lookup = r
            .lookup
            .ok_or_else(|| Status::invalid_argument("lookup: is required"))?;
        let patient =
            pointer::patient(lookup.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        let client_org = OrgNumber::parse(r.client_organization_number.trim())
            .map_err(|e| Status::invalid_argument(format!("client_organization_number: {e}")))?;
        let requester = self
            .access
            .authenticate_forwarded(client_org.as_str(), &r.access_token)
            .map_err(|e| match e {
                crate::access::AccessError::Unauthenticated(reason) => {
                    tracing::info!(peer = %region, %reason, "forwarded requester refused");
                    Status::unauthenticated(reason)
                }
                other => super::internal_access(other),
            })?;
        let filter = super::lookup::lookup_filter(&lookup)?;
        let local = self
            .answer_locally(&requester, &patient, filter, entry)
            .await?;
        tracing::info!(
            peer = %region, query_id = %entry.query_id, found = local.pointers.len(),
            "forwarded lookup"
        );
        Ok(Response::new(v1::ForwardedLookupResponse {
            pointers: local.pointers,
            opted_out: local.opted_out,
            rules: applied_rules(&local.rules),
            emergency: local.emergency,
        }))
    }

    async fn forwarded_patient_report_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedPatientReportRequest>,
    ) -> Result<Response<v1::ForwardedPatientReportResponse>, Status> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region);
        let r = req.into_inner();
        let auditor = OrgNumber::parse(r.auditor_organization_number.trim())
            .map_err(|e| Status::invalid_argument(format!("auditor_organization_number: {e}")))?;
        if !self
            .access
            .legal()
            .has_role(auditor.as_str(), pil_legal::Role::Auditor)
        {
            return Err(Status::permission_denied(format!(
                "organization {auditor} does not hold the auditor role in this region's legal \
                 configuration"
            )));
        }
        entry.caller.organization = Some(auditor.to_string());
        let patient =
            pointer::patient(r.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let pseudonym = hex::encode(self.registry.pseudonym(&patient));
        entry.patient = Some(pseudonym.clone());
        entry.detail = Some("patient report".into());
        let records = self.patient_lookups(pseudonym).await?;
        Ok(Response::new(v1::ForwardedPatientReportResponse {
            records,
        }))
    }
}

#[tonic::async_trait]
impl v1::federation_service_server::FederationService for NodeService {
    async fn forwarded_lookup(
        &self,
        req: Request<v1::ForwardedLookupRequest>,
    ) -> Result<Response<v1::ForwardedLookupResponse>, Status> {
        let mut entry = self.audit_entry(&req, Action::FederatedLookup);
        let result = self.forwarded_lookup_inner(&mut entry, req).await;
        self.audited(entry, result).await
    }

    async fn ping(
        &self,
        req: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        self.peer_region(&req)?;
        Ok(Response::new(v1::PingResponse {
            region: self.registry.region().to_string(),
        }))
    }

    async fn forwarded_patient_report(
        &self,
        req: Request<v1::ForwardedPatientReportRequest>,
    ) -> Result<Response<v1::ForwardedPatientReportResponse>, Status> {
        let mut entry = self.audit_entry(&req, Action::AuditAccess);
        let result = self.forwarded_patient_report_inner(&mut entry, req).await;
        self.audited(entry, result).await
    }
}
