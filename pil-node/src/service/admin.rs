//! The admin API: patients' blocks and opt-outs, and legal-configuration reloads.
//! Every call needs the operator role.

use pil_legal::Role;
use pil_proto::v1;
use tonic::{Request, Response, Status};

use super::{NodeService, internal, invalid};
use crate::{
    access::{AccessError, BLOCK_HPR, BLOCK_ORGANIZATION, BLOCK_PROFESSION},
    audit::{AuditRecord, record::Action},
    error::Error,
    pointer,
    registry::now_nanos,
    store::{StoredBlock, StoredOptOut},
};

/// Longest accepted reason text, in characters.
const MAX_REASON: usize = 500;

fn reason(text: &str) -> Result<String, Error> {
    let text = text.trim();
    if text.chars().count() > MAX_REASON {
        return Err(Error::invalid(format!(
            "reason: is longer than {MAX_REASON} characters"
        )));
    }
    Ok(text.to_string())
}

impl NodeService {
    /// The request's patient, validated and noted (pseudonymized) in its audit record.
    fn patient_of(
        &self,
        patient: Option<&v1::PatientIdentifier>,
        entry: &mut AuditRecord,
    ) -> Result<pil_proto::ident::PatientId, Error> {
        let patient = pointer::patient(patient, self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        Ok(patient)
    }

    async fn create_block_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::CreateBlockRequest>,
    ) -> Result<Response<v1::CreateBlockResponse>, Error> {
        use v1::block_target::Target;
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient = self.patient_of(req.patient.as_ref(), entry)?;
        let block = req
            .block
            .ok_or_else(|| Error::invalid("block: is required"))?;
        let (target_kind, target) = match block.target.and_then(|t| t.target) {
            Some(Target::HprNumber(h)) => (
                BLOCK_HPR,
                pointer::untrimmed("block.target.hpr_number", &h)
                    .and_then(|()| {
                        pil_proto::ident::HprNumber::parse(&h).map_err(|e| {
                            pointer::FieldError::new("block.target.hpr_number", e.to_string())
                        })
                    })
                    .map_err(invalid)?
                    .as_str()
                    .to_string(),
            ),
            Some(Target::Profession(p)) => {
                let p = p.trim().to_ascii_uppercase();
                if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(Error::invalid(
                        "block.target.profession: must be an HPR authorization code such as SP",
                    ));
                }
                (BLOCK_PROFESSION, p)
            }
            Some(Target::OrganizationNumber(o)) => (
                BLOCK_ORGANIZATION,
                pointer::org_number("block.target.organization_number", &o)
                    .map_err(invalid)?
                    .to_string(),
            ),
            None => {
                return Err(Error::invalid(
                    "block.target: name an HPR number, a profession or an organization",
                ));
            }
        };
        let holder = match block.holder_organization_number.as_str() {
            "" => String::new(),
            h => pointer::org_number("block.holder_organization_number", h)
                .map_err(invalid)?
                .to_string(),
        };
        let stored = StoredBlock {
            target_kind,
            target,
            holder,
            reason: reason(&block.reason)?,
            created_at: now_nanos(),
            // Sealed by the registry as it stores the block.
            sealed_patient: Vec::new(),
        };
        let kind = match target_kind {
            BLOCK_HPR => "professional",
            BLOCK_PROFESSION => "profession",
            _ => "organization",
        };
        let what = format!(
            "on {kind} {}{}",
            stored.target,
            if stored.holder.is_empty() {
                String::new()
            } else {
                format!(", holder {}", stored.holder)
            }
        );
        entry.detail = Some(format!("block {what}"));
        self.record_first(entry).await?;
        let id = self
            .registry
            .create_block(&patient, stored.clone())
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, kind = target_kind, "block created");
        entry.detail = Some(format!("block {} {what}", hex::encode(id)));
        Ok(Response::new(v1::CreateBlockResponse {
            block: Some(super::convert::block(id, &stored)),
        }))
    }

    async fn lift_block_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::LiftBlockRequest>,
    ) -> Result<Response<v1::LiftBlockResponse>, Error> {
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient = self.patient_of(req.patient.as_ref(), entry)?;
        let id: [u8; 16] = hex::decode(&req.block_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::invalid("block_id: must be 32 hex characters"))?;
        self.record_first(entry).await?;
        let lifted = self
            .registry
            .lift_block(&patient, id)
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, lifted, "block lifted");
        Ok(Response::new(v1::LiftBlockResponse { lifted }))
    }

    async fn list_blocks_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ListBlocksRequest>,
    ) -> Result<Response<v1::ListBlocksResponse>, Error> {
        self.require_role(&req, Role::Operator)?;
        let patient = self.patient_of(req.get_ref().patient.as_ref(), entry)?;
        let mut blocks = self.registry.blocks(&patient).await.map_err(internal)?;
        blocks.sort_by_key(|(_, b)| b.created_at);
        Ok(Response::new(v1::ListBlocksResponse {
            blocks: blocks
                .iter()
                .map(|(id, b)| super::convert::block(*id, b))
                .collect(),
        }))
    }

    async fn set_opt_out_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::SetOptOutRequest>,
    ) -> Result<Response<v1::SetOptOutResponse>, Error> {
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient = self.patient_of(req.patient.as_ref(), entry)?;
        let since = now_nanos();
        let opt_out = StoredOptOut {
            since,
            reason: reason(&req.reason)?,
            sealed_patient: Vec::new(),
        };
        self.record_first(entry).await?;
        self.registry
            .set_opt_out(&patient, Some(opt_out))
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, "opt-out recorded");
        Ok(Response::new(v1::SetOptOutResponse {
            since: Some(pointer::to_timestamp(since)),
        }))
    }

    async fn lift_opt_out_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::LiftOptOutRequest>,
    ) -> Result<Response<v1::LiftOptOutResponse>, Error> {
        let caller = self.require_role(&req, Role::Operator)?;
        let patient = self.patient_of(req.get_ref().patient.as_ref(), entry)?;
        self.record_first(entry).await?;
        let lifted = self
            .registry
            .set_opt_out(&patient, None)
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, lifted, "opt-out lifted");
        Ok(Response::new(v1::LiftOptOutResponse { lifted }))
    }

    async fn get_opt_out_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::GetOptOutRequest>,
    ) -> Result<Response<v1::GetOptOutResponse>, Error> {
        self.require_role(&req, Role::Operator)?;
        let patient = self.patient_of(req.get_ref().patient.as_ref(), entry)?;
        let (opt_out, _) = self
            .registry
            .protections(&patient)
            .await
            .map_err(internal)?;
        Ok(Response::new(v1::GetOptOutResponse {
            opted_out: opt_out.is_some(),
            since: opt_out.map(|o| pointer::to_timestamp(o.since)),
        }))
    }

    async fn reload_legal_config_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ReloadLegalConfigRequest>,
    ) -> Result<Response<v1::ReloadLegalConfigResponse>, Error> {
        let caller = self.require_role(&req, Role::Operator)?;
        entry.detail = Some("configuration reload".into());
        match self.reloader.reload().await {
            Ok(reloaded) => {
                let detail = reloaded.describe();
                tracing::info!(caller = %caller, %detail, "configuration reloaded");
                entry.detail = Some(format!("configuration reloaded: {detail}"));
                Ok(Response::new(v1::ReloadLegalConfigResponse {
                    policies: reloaded.policies as u32,
                    peers: reloaded.peers,
                    detail,
                }))
            }
            Err(crate::reload::ReloadError::Access(AccessError::Legal(e))) => {
                tracing::warn!(caller = %caller, error = %e, "legal configuration reload refused");
                Err(Error::precondition(format!(
                    "the new legal configuration is invalid; the previous one stays in force: {e}"
                )))
            }
            Err(e) => {
                tracing::warn!(caller = %caller, error = %e, "configuration reload refused");
                Err(Error::precondition(format!(
                    "the reload was refused and nothing changed: {e}"
                )))
            }
        }
    }
}

impl NodeService {
    async fn list_peers_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ListPeersRequest>,
    ) -> Result<Response<v1::ListPeersResponse>, Error> {
        self.require_role(&req, Role::Operator)?;
        entry.detail = Some("list peers".into());
        let summaries = self.routing.router.views();
        let peers = self
            .federation
            .ping_all(std::time::Duration::from_secs(2))
            .await
            .into_iter()
            .map(|(view, ping)| {
                use crate::federation::BreakerState;
                let summary = summaries
                    .get(&view.config.region)
                    .cloned()
                    .unwrap_or_default();
                v1::PeerStatus {
                    summary: Some(v1::PeerSummary {
                        state: if summary.state.is_empty() {
                            "none"
                        } else {
                            summary.state
                        }
                        .into(),
                        age_ms: summary.age.map_or(0, |a| a.as_millis() as u64),
                        bound_ms: self.federation.config().summary_staleness_bound_ms,
                        patients: summary.patients,
                        filter_bytes: summary.filter_bytes,
                        key_id: summary.key_id,
                        detail: summary.detail,
                    }),
                    identity: format!("urn:pil:node:{}", view.config.region),
                    region: view.config.region,
                    address: view.config.address,
                    purposes: view.config.purposes,
                    reachable: ping.is_ok(),
                    latency_ms: ping
                        .as_ref()
                        .map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32)
                        .unwrap_or(0),
                    last_error: ping.err().or(view.last_error).unwrap_or_default(),
                    circuit: match view.breaker {
                        BreakerState::Closed => "closed",
                        BreakerState::Open { .. } => "open",
                        BreakerState::HalfOpen => "half-open",
                    }
                    .into(),
                }
            })
            .collect();
        Ok(Response::new(v1::ListPeersResponse { peers }))
    }
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for NodeService {
    async fn list_peers(
        &self,
        req: Request<v1::ListPeersRequest>,
    ) -> Result<Response<v1::ListPeersResponse>, Status> {
        self.serve(req, Action::PeersList, |s, e, r| {
            Box::pin(s.list_peers_inner(e, r))
        })
        .await
    }

    async fn create_block(
        &self,
        req: Request<v1::CreateBlockRequest>,
    ) -> Result<Response<v1::CreateBlockResponse>, Status> {
        self.serve(req, Action::BlockCreate, |s, e, r| {
            Box::pin(s.create_block_inner(e, r))
        })
        .await
    }

    async fn lift_block(
        &self,
        req: Request<v1::LiftBlockRequest>,
    ) -> Result<Response<v1::LiftBlockResponse>, Status> {
        self.serve(req, Action::BlockLift, |s, e, r| {
            Box::pin(s.lift_block_inner(e, r))
        })
        .await
    }

    async fn list_blocks(
        &self,
        req: Request<v1::ListBlocksRequest>,
    ) -> Result<Response<v1::ListBlocksResponse>, Status> {
        self.serve(req, Action::BlockList, |s, e, r| {
            Box::pin(s.list_blocks_inner(e, r))
        })
        .await
    }

    async fn set_opt_out(
        &self,
        req: Request<v1::SetOptOutRequest>,
    ) -> Result<Response<v1::SetOptOutResponse>, Status> {
        self.serve(req, Action::OptOutSet, |s, e, r| {
            Box::pin(s.set_opt_out_inner(e, r))
        })
        .await
    }

    async fn lift_opt_out(
        &self,
        req: Request<v1::LiftOptOutRequest>,
    ) -> Result<Response<v1::LiftOptOutResponse>, Status> {
        self.serve(req, Action::OptOutLift, |s, e, r| {
            Box::pin(s.lift_opt_out_inner(e, r))
        })
        .await
    }

    async fn get_opt_out(
        &self,
        req: Request<v1::GetOptOutRequest>,
    ) -> Result<Response<v1::GetOptOutResponse>, Status> {
        self.serve(req, Action::OptOutGet, |s, e, r| {
            Box::pin(s.get_opt_out_inner(e, r))
        })
        .await
    }

    async fn reload_legal_config(
        &self,
        req: Request<v1::ReloadLegalConfigRequest>,
    ) -> Result<Response<v1::ReloadLegalConfigResponse>, Status> {
        self.serve(req, Action::PolicyReload, |s, e, r| {
            Box::pin(s.reload_legal_config_inner(e, r))
        })
        .await
    }
}
