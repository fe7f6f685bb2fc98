//! The admin API: patients' blocks and opt-outs, and legal-configuration reloads.
//! Every call needs the operator role.

use pil_legal::Role;
use pil_proto::v1;
use tonic::{Request, Response, Status};

use super::{NodeService, internal, invalid};
use crate::{
    access::{AccessError, BLOCK_HPR, BLOCK_ORGANIZATION, BLOCK_PROFESSION},
    pointer,
    registry::now_nanos,
    storage::{StoredBlock, StoredOptOut},
};

/// Longest accepted reason text, in characters.
const MAX_REASON: usize = 500;

fn reason(text: &str) -> Result<String, Status> {
    let text = text.trim();
    if text.chars().count() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "reason: is longer than {MAX_REASON} characters"
        )));
    }
    Ok(text.to_string())
}

fn block_to_wire(id: [u8; 16], b: &StoredBlock) -> v1::Block {
    use v1::block_target::Target;
    let target = match b.target_kind {
        BLOCK_HPR => Some(Target::HprNumber(b.target.clone())),
        BLOCK_PROFESSION => Some(Target::Profession(b.target.clone())),
        BLOCK_ORGANIZATION => Some(Target::OrganizationNumber(b.target.clone())),
        _ => None,
    };
    v1::Block {
        block_id: hex::encode(id),
        target: Some(v1::BlockTarget { target }),
        holder_organization_number: b.holder.clone(),
        reason: b.reason.clone(),
        created_at: Some(pointer::to_timestamp(b.created_at)),
    }
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for NodeService {
    async fn create_block(
        &self,
        req: Request<v1::CreateBlockRequest>,
    ) -> Result<Response<v1::CreateBlockResponse>, Status> {
        use v1::block_target::Target;
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let block = req
            .block
            .ok_or_else(|| Status::invalid_argument("block: is required"))?;
        let (target_kind, target) = match block.target.and_then(|t| t.target) {
            Some(Target::HprNumber(h)) => (
                BLOCK_HPR,
                pil_proto::ident::HprNumber::parse(h.trim())
                    .map_err(|e| Status::invalid_argument(format!("block.target.hpr_number: {e}")))?
                    .as_str()
                    .to_string(),
            ),
            Some(Target::Profession(p)) => {
                let p = p.trim().to_ascii_uppercase();
                if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(Status::invalid_argument(
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
                return Err(Status::invalid_argument(
                    "block.target: name an HPR number, a profession or an organization",
                ));
            }
        };
        let holder = match block.holder_organization_number.trim() {
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
        };
        let id = self
            .registry
            .create_block(&patient, stored.clone())
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, kind = target_kind, "block created");
        Ok(Response::new(v1::CreateBlockResponse {
            block: Some(block_to_wire(id, &stored)),
        }))
    }

    async fn lift_block(
        &self,
        req: Request<v1::LiftBlockRequest>,
    ) -> Result<Response<v1::LiftBlockResponse>, Status> {
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let id: [u8; 16] = hex::decode(req.block_id.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Status::invalid_argument("block_id: must be 32 hex characters"))?;
        let lifted = self
            .registry
            .lift_block(&patient, id)
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, lifted, "block lifted");
        Ok(Response::new(v1::LiftBlockResponse { lifted }))
    }

    async fn list_blocks(
        &self,
        req: Request<v1::ListBlocksRequest>,
    ) -> Result<Response<v1::ListBlocksResponse>, Status> {
        self.require_role(&req, Role::Operator)?;
        let patient = pointer::patient(req.get_ref().patient.as_ref(), self.config.test_data)
            .map_err(invalid)?;
        let mut blocks = self.registry.blocks(&patient).await.map_err(internal)?;
        blocks.sort_by_key(|(_, b)| b.created_at);
        Ok(Response::new(v1::ListBlocksResponse {
            blocks: blocks.iter().map(|(id, b)| block_to_wire(*id, b)).collect(),
        }))
    }

    async fn set_opt_out(
        &self,
        req: Request<v1::SetOptOutRequest>,
    ) -> Result<Response<v1::SetOptOutResponse>, Status> {
        let caller = self.require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let since = now_nanos();
        let opt_out = StoredOptOut {
            since,
            reason: reason(&req.reason)?,
        };
        self.registry
            .set_opt_out(&patient, Some(opt_out))
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, "opt-out recorded");
        Ok(Response::new(v1::SetOptOutResponse {
            since: Some(pointer::to_timestamp(since)),
        }))
    }

    async fn lift_opt_out(
        &self,
        req: Request<v1::LiftOptOutRequest>,
    ) -> Result<Response<v1::LiftOptOutResponse>, Status> {
        let caller = self.require_role(&req, Role::Operator)?;
        let patient = pointer::patient(req.get_ref().patient.as_ref(), self.config.test_data)
            .map_err(invalid)?;
        let lifted = self
            .registry
            .set_opt_out(&patient, None)
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, lifted, "opt-out lifted");
        Ok(Response::new(v1::LiftOptOutResponse { lifted }))
    }

    async fn get_opt_out(
        &self,
        req: Request<v1::GetOptOutRequest>,
    ) -> Result<Response<v1::GetOptOutResponse>, Status> {
        self.require_role(&req, Role::Operator)?;
        let patient = pointer::patient(req.get_ref().patient.as_ref(), self.config.test_data)
            .map_err(invalid)?;
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

    async fn reload_legal_config(
        &self,
        req: Request<v1::ReloadLegalConfigRequest>,
    ) -> Result<Response<v1::ReloadLegalConfigResponse>, Status> {
        let caller = self.require_role(&req, Role::Operator)?;
        match self.access.reload() {
            Ok(policies) => {
                tracing::info!(caller = %caller, policies, "legal configuration reloaded");
                Ok(Response::new(v1::ReloadLegalConfigResponse {
                    policies: policies as u32,
                }))
            }
            Err(AccessError::Legal(e)) => {
                tracing::warn!(caller = %caller, error = %e, "legal configuration reload refused");
                Err(Status::failed_precondition(format!(
                    "the new legal configuration is invalid; the previous one stays in force: {e}"
                )))
            }
            Err(e) => Err(Status::failed_precondition(format!(
                "the previous legal configuration stays in force: {e}"
            ))),
        }
    }
}
