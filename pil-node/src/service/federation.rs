//! `FederationService`: lookups forwarded by peer nodes, answered from this node's own
//! pointers under its own legal configuration. Only configured peers' node
//! certificates may call it, and a forwarded lookup is never forwarded again.

use pil_proto::v1;
use tonic::{Request, Response, Status};

use super::{NodeService, convert::applied_rules, invalid};
use crate::{
    audit::{
        AuditRecord,
        record::{Action, RequesterInfo},
    },
    error::Error,
    identity::Caller,
    pointer,
    tls::PeerInfo,
};

/// Keeps the home node's query id for the audit record, if it is one.
pub(super) fn take_query_id(entry: &mut AuditRecord, query_id: &str) {
    let query_id = query_id.trim();
    if !query_id.is_empty()
        && query_id.len() <= 64
        && query_id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        entry.query_id = query_id.to_string();
    }
}

impl NodeService {
    /// The requester of a call a peer forwarded, verified here.
    pub(super) fn forwarded_requester(
        &self,
        region: &str,
        client_organization_number: &str,
        access_token: &str,
    ) -> Result<crate::access::Requester, Error> {
        self.forwarded_requester_at(region, client_organization_number, access_token, None)
    }

    /// [`Self::forwarded_requester`], the token checked as of `at` when given.
    pub(super) fn forwarded_requester_at(
        &self,
        region: &str,
        client_organization_number: &str,
        access_token: &str,
        at: Option<std::time::SystemTime>,
    ) -> Result<crate::access::Requester, Error> {
        let client_org =
            pointer::org_number("client_organization_number", client_organization_number)
                .map_err(invalid)?;
        match at {
            None => self
                .access
                .authenticate_forwarded(client_org.as_str(), access_token),
            Some(at) => {
                self.access
                    .authenticate_forwarded_at(client_org.as_str(), access_token, at)
            }
        }
        .map_err(|e| match e {
            crate::access::AccessError::Unauthenticated(reason) => {
                tracing::info!(peer = %region, %reason, "forwarded requester refused");
                Error::unauthenticated(reason)
            }
            other => super::internal_access(other),
        })
    }

    /// The calling peer's region; refuses organizations and unknown nodes.
    pub(super) fn peer_region<T>(&self, req: &Request<T>) -> Result<String, Error> {
        match req.extensions().get::<PeerInfo>().map(|i| &i.caller) {
            Some(Ok(Caller::Node { region })) if self.federation.is_peer(region) => {
                Ok(region.clone())
            }
            Some(Ok(Caller::Node { region })) => {
                tracing::warn!(%region, "federated call from a node that is not a peer refused");
                Err(Error::denied(format!(
                    "node of region {region:?} is not a configured peer of this node"
                )))
            }
            Some(Ok(Caller::Organization { org_number, .. })) => {
                tracing::warn!(caller = %org_number, "federated call with an organization certificate refused");
                Err(Error::denied(
                    "the federation API is for peer nodes only; organizations use LookupService",
                ))
            }
            _ => Err(Error::unauthenticated(
                "no node certificate on this connection",
            )),
        }
    }

    async fn forwarded_lookup_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedLookupRequest>,
    ) -> Result<Response<v1::ForwardedLookupResponse>, Error> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region.clone());
        let Ok(_permit) = self.forward_limit.clone().try_acquire_owned() else {
            tracing::warn!(peer = %region, "forwarded lookup shed: at capacity");
            return Err(Error::overloaded(format!(
                "this node is serving its maximum of {} forwarded lookups; retry shortly",
                self.federation.config().max_concurrent_forwarded
            )));
        };
        let r = req.into_inner();
        take_query_id(entry, &r.query_id);
        let lookup = r
            .lookup
            .ok_or_else(|| Error::invalid("lookup: is required"))?;
        let patient =
            pointer::patient(lookup.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let pseudonym = self.registry.pseudonym(&patient);
        entry.patient = Some(hex::encode(pseudonym));
        let requester =
            self.forwarded_requester(&region, &r.client_organization_number, &r.access_token)?;
        let filter = super::lookup::lookup_filter(&lookup)?;
        if r.protections_only {
            entry.requester = Some(RequesterInfo::from(&requester));
            entry.detail = Some("protections only".into());
            return Ok(Response::new(
                self.protections_for(&requester, &patient).await?,
            ));
        }
        let local = match self
            .answer_locally(&requester, &patient, pseudonym, filter, entry)
            .await
        {
            Ok(local) => local,
            // Refused here, the lookup may still be allowed elsewhere: the patient's
            // protections registered here must hold there too.
            Err(Error::Denied(why)) => {
                entry.outcome.detail = why.clone();
                return Ok(Response::new(v1::ForwardedLookupResponse {
                    refused: why,
                    ..self.protections_for(&requester, &patient).await?
                }));
            }
            Err(status) => return Err(status),
        };
        tracing::info!(
            peer = %region, query_id = %entry.query_id, found = local.pointers.len(),
            "forwarded lookup"
        );
        Ok(Response::new(v1::ForwardedLookupResponse {
            pointers: local.pointers,
            opted_out: local.opted_out,
            rules: applied_rules(&local.rules),
            emergency: local.emergency,
            blocked_all_holders: local.shut.all_holders,
            blocked_holders: local.shut.holders.into_iter().collect(),
            refused: String::new(),
        }))
    }

    /// The patient's protections registered here that hold for `requester`.
    async fn protections_for(
        &self,
        requester: &crate::access::Requester,
        patient: &pil_proto::ident::PatientId,
    ) -> Result<v1::ForwardedLookupResponse, Error> {
        super::lookup::covered(requester, patient)?;
        let (opt_out, blocks) = self
            .registry
            .protections(patient)
            .await
            .map_err(super::internal)?;
        let shut = requester.shut_out(&blocks);
        Ok(v1::ForwardedLookupResponse {
            opted_out: opt_out.is_some(),
            blocked_all_holders: shut.all_holders,
            blocked_holders: shut.holders.into_iter().collect(),
            ..Default::default()
        })
    }

    async fn forwarded_patient_report_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedPatientReportRequest>,
    ) -> Result<Response<v1::ForwardedPatientReportResponse>, Error> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region);
        let r = req.into_inner();
        let auditor = pointer::org_number(
            "auditor_organization_number",
            &r.auditor_organization_number,
        )
        .map_err(invalid)?;
        if !self
            .access
            .legal()
            .has_role(auditor.as_str(), pil_legal::Role::Auditor)
        {
            return Err(Error::denied(format!(
                "organization {auditor} does not hold the auditor role in this region's legal \
                 configuration"
            )));
        }
        entry.caller.organization = Some(auditor.to_string());
        let patient =
            pointer::patient(r.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        entry.detail = Some("patient report".into());
        let records = self.patient_lookups(&patient).await?;
        Ok(Response::new(v1::ForwardedPatientReportResponse {
            records,
        }))
    }
}

/// Blinded elements one call may carry.
const MAX_BLINDED: usize = 256;

impl NodeService {
    /// Routing calls name no patient, so they leave no audit record when answered
    /// (a refusal is recorded, as every refusal is); they are counted per peer.
    fn evaluate_tokens_inner(
        &self,
        req: Request<v1::EvaluateTokensRequest>,
    ) -> Result<v1::EvaluateTokensResponse, Error> {
        let region = self.peer_region(&req)?;
        let Some(publisher) = &self.routing.publisher else {
            return Err(no_routing_key());
        };
        let blinded = req.into_inner().blinded;
        if blinded.is_empty() || blinded.len() > MAX_BLINDED {
            return Err(Error::invalid(format!(
                "blinded: give 1 to {MAX_BLINDED} elements, not {}",
                blinded.len()
            )));
        }
        let rate = self.federation.config().token_evaluations_per_second;
        if !self.routing.allow_evaluations(&region, blinded.len(), rate) {
            tracing::warn!(peer = %region, rate, "routing token evaluations beyond the peer's rate refused");
            return Err(Error::overloaded(format!(
                "region {region} asked for more than {rate} routing-token evaluations a second; \
                 ask this region directly meanwhile"
            )));
        }
        let evaluated = publisher
            .evaluate(&blinded)
            .map_err(|e| Error::invalid(format!("blinded: {e}")))?;
        self.metrics
            .tokens_evaluated(&region, evaluated.len() as u64);
        Ok(v1::EvaluateTokensResponse {
            key_id: publisher.key().id().to_string(),
            evaluated,
        })
    }

    async fn get_summary_inner(
        &self,
        req: Request<v1::GetSummaryRequest>,
    ) -> Result<v1::GetSummaryResponse, Error> {
        self.peer_region(&req)?;
        let Some(publisher) = &self.routing.publisher else {
            return Err(no_routing_key());
        };
        let req = req.into_inner();
        let wait = std::time::Duration::from_millis(u64::from(req.wait_ms.min(10_000)));
        let published = publisher
            .published_when_new(&req.build, req.after, wait)
            .await
            .map_err(|e| match e {
                crate::routing::publish::PublishError::Building(_)
                | crate::routing::publish::PublishError::Store(
                    crate::store::StoreError::RoutingKey { .. },
                ) => Error::unavailable(e.to_string()),
                e => Error::internal(e),
            })?;
        let build = published.build;
        Ok(v1::GetSummaryResponse {
            key_id: published.key_id,
            build: build.id.clone(),
            filter: if published.with_filter {
                build.filter.clone()
            } else {
                Vec::new()
            },
            filter_encoding: crate::routing::summary::FILTER_ENCODING.into(),
            with_filter: published.with_filter,
            patients: build.patients,
            added: published.added,
            position: published.position,
            complete: published.complete,
        })
    }
}

fn no_routing_key() -> Error {
    Error::precondition(
        "this region publishes no routing summary (no [keys] routing_key_file); ask it \
         about every patient",
    )
}

#[tonic::async_trait]
impl v1::federation_service_server::FederationService for NodeService {
    async fn evaluate_tokens(
        &self,
        req: Request<v1::EvaluateTokensRequest>,
    ) -> Result<Response<v1::EvaluateTokensResponse>, Status> {
        self.evaluate_tokens_inner(req)
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_summary(
        &self,
        req: Request<v1::GetSummaryRequest>,
    ) -> Result<Response<v1::GetSummaryResponse>, Status> {
        self.get_summary_inner(req)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn forwarded_lookup(
        &self,
        req: Request<v1::ForwardedLookupRequest>,
    ) -> Result<Response<v1::ForwardedLookupResponse>, Status> {
        self.serve(req, Action::FederatedLookup, |s, e, r| {
            Box::pin(s.forwarded_lookup_inner(e, r))
        })
        .await
    }

    async fn ping(
        &self,
        req: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        self.serve(req, Action::PeerPing, |s, _, r| {
            Box::pin(async move {
                s.peer_region(&r)?;
                Ok(Response::new(v1::PingResponse {
                    region: s.registry.region().to_string(),
                }))
            })
        })
        .await
    }

    async fn forwarded_subscribe(
        &self,
        req: Request<v1::ForwardedSubscribeRequest>,
    ) -> Result<Response<v1::ForwardedSubscribeResponse>, Status> {
        self.serve(req, Action::Subscribe, |s, e, r| {
            Box::pin(s.forwarded_subscribe_inner(e, r))
        })
        .await
    }

    async fn forwarded_pull_events(
        &self,
        req: Request<v1::ForwardedPullEventsRequest>,
    ) -> Result<Response<v1::ForwardedPullEventsResponse>, Status> {
        self.serve(req, Action::EventDelivery, |s, e, r| {
            Box::pin(s.forwarded_pull_inner(e, r))
        })
        .await
    }

    async fn forwarded_protections(
        &self,
        req: Request<v1::ForwardedProtectionsRequest>,
    ) -> Result<Response<v1::ForwardedProtectionsResponse>, Status> {
        self.serve(req, Action::FederatedLookup, |s, e, r| {
            Box::pin(s.forwarded_protections_inner(e, r))
        })
        .await
    }

    async fn forwarded_patient_report(
        &self,
        req: Request<v1::ForwardedPatientReportRequest>,
    ) -> Result<Response<v1::ForwardedPatientReportResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.forwarded_patient_report_inner(e, r))
        })
        .await
    }
}
