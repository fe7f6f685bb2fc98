//! The gRPC services. The only module that knows tonic's request and status types:
//! it authenticates the caller from the connection, authorizes writes, validates
//! input, calls the registry, and maps every failure to a status a person can act on.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use pil_proto::{ident::OrgNumber, v1};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    config::NodeConfig,
    identity::Caller,
    pointer::{self, FieldError, NewPointer},
    registry::{LookupFilter, Outcome, Registry, RegistryError},
    sync::{ReplaceScope, SyncError, SyncParams, SyncSession},
    tls::PeerInfo,
};

/// Pointers per message of an export stream.
const EXPORT_PAGE: usize = 500;

/// Serves the client-facing API of one node.
#[derive(Clone)]
pub struct NodeService {
    registry: Registry,
    config: Arc<NodeConfig>,
}

impl NodeService {
    pub fn new(registry: Registry, config: Arc<NodeConfig>) -> Self {
        Self { registry, config }
    }

    /// The calling organization, from the connection's client certificate.
    fn organization<T>(&self, req: &Request<T>) -> Result<OrgNumber, Status> {
        let info = req
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
        match &info.caller {
            Ok(Caller::Organization { org_number, .. }) => {
                OrgNumber::parse(org_number).map_err(|e| {
                    Status::unauthenticated(format!(
                        "the client certificate's organization number is invalid: {e}"
                    ))
                })
            }
            Ok(Caller::Node { region }) => Err(Status::permission_denied(format!(
                "node certificate of region {region:?} cannot call the client API; use an \
                 organization certificate"
            ))),
            Err(e) => Err(Status::unauthenticated(format!(
                "the client certificate does not identify an organization: {e}"
            ))),
        }
    }

    /// Refuses unless `caller` may write pointers held by `holder`.
    fn authorize_write(&self, caller: &OrgNumber, holder: &OrgNumber) -> Result<(), Status> {
        if self
            .config
            .write_scope(caller.as_str())
            .contains(holder.as_str())
        {
            Ok(())
        } else {
            tracing::warn!(caller = %caller, holder = %holder, "write for another organization refused");
            Err(Status::permission_denied(format!(
                "organization {caller} may not write pointers for organization {holder}; a \
                 node operator can allow it under [writes_for] in the node configuration"
            )))
        }
    }
}

fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn internal(e: RegistryError) -> Status {
    tracing::error!(error = %e, "request failed");
    match e {
        RegistryError::Write(crate::writer::WriteError::Closed) => {
            Status::unavailable("the node is shutting down; retry against another instance")
        }
        _ => Status::internal("the node could not complete the request; see its log"),
    }
}

#[tonic::async_trait]
impl v1::registry_service_server::RegistryService for NodeService {
    async fn upsert_pointer(
        &self,
        req: Request<v1::UpsertPointerRequest>,
    ) -> Result<Response<v1::UpsertPointerResponse>, Status> {
        let caller = self.organization(&req)?;
        let wire = req
            .into_inner()
            .pointer
            .ok_or_else(|| Status::invalid_argument("pointer: is required"))?;
        let p = NewPointer::from_wire(&wire, self.config.test_data).map_err(invalid)?;
        self.authorize_write(&caller, &p.endpoint.org)?;
        let (outcome, stored) = self.registry.upsert(p).await.map_err(internal)?;
        tracing::info!(caller = %caller, ?outcome, "pointer upserted");
        let outcome = match outcome {
            Outcome::Inserted => v1::WriteOutcome::Inserted,
            Outcome::Updated => v1::WriteOutcome::Updated,
            Outcome::Unchanged => v1::WriteOutcome::Unchanged,
        };
        Ok(Response::new(v1::UpsertPointerResponse {
            outcome: outcome as i32,
            pointer: Some(stored),
        }))
    }

    async fn delete_pointer(
        &self,
        req: Request<v1::DeletePointerRequest>,
    ) -> Result<Response<v1::DeletePointerResponse>, Status> {
        let caller = self.organization(&req)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        let endpoint =
            pointer::endpoint_ref(req.holder.as_ref(), req.endpoint.as_ref()).map_err(invalid)?;
        self.authorize_write(&caller, &endpoint.org)?;
        let deleted = self
            .registry
            .delete(&patient, &endpoint)
            .await
            .map_err(internal)?;
        tracing::info!(caller = %caller, deleted, "pointer delete");
        Ok(Response::new(v1::DeletePointerResponse { deleted }))
    }

    async fn sync_pointers(
        &self,
        req: Request<Streaming<v1::SyncPointersRequest>>,
    ) -> Result<Response<v1::SyncPointersResponse>, Status> {
        let caller = self.organization(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(v1::SyncPointersRequest {
                item: Some(v1::sync_pointers_request::Item::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a sync must be its header",
                ));
            }
        };
        let org = pointer::org_number("header.organization_number", &header.organization_number)
            .map_err(invalid)?;
        self.authorize_write(&caller, &org)?;
        let replace = match (
            v1::SyncMode::try_from(header.mode),
            v1::ReplaceScope::try_from(header.scope),
        ) {
            (Ok(v1::SyncMode::Merge), _) => None,
            (Ok(v1::SyncMode::Replace), Ok(v1::ReplaceScope::Patients)) => {
                Some(ReplaceScope::Patients)
            }
            (Ok(v1::SyncMode::Replace), Ok(v1::ReplaceScope::Organization)) => {
                Some(ReplaceScope::Organization)
            }
            (Ok(v1::SyncMode::Replace), _) => {
                return Err(Status::invalid_argument(
                    "header.scope: replace mode needs REPLACE_SCOPE_PATIENTS or \
                     REPLACE_SCOPE_ORGANIZATION",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "header.mode: must be SYNC_MODE_MERGE or SYNC_MODE_REPLACE",
                ));
            }
        };
        let limits = &self.config.limits;
        let mut session = SyncSession::new(
            self.registry.clone(),
            SyncParams {
                org: org.clone(),
                replace,
                all_or_nothing: header.all_or_nothing,
                allow_synthetic: self.config.test_data,
                max_all_or_nothing_records: limits.max_all_or_nothing_records,
                max_replace_records: limits.max_replace_records,
            },
        );
        while let Some(msg) = stream.next().await {
            match msg?.item {
                Some(v1::sync_pointers_request::Item::Batch(batch)) => {
                    session
                        .add_batch(batch.pointers)
                        .await
                        .map_err(sync_status)?;
                }
                Some(v1::sync_pointers_request::Item::Header(_)) => {
                    return Err(Status::invalid_argument(
                        "a sync has exactly one header, as its first message",
                    ));
                }
                None => return Err(Status::invalid_argument("empty sync message")),
            }
        }
        let report = session.finish().await.map_err(sync_status)?;
        tracing::info!(
            caller = %caller, org = %org, inserted = report.inserted, updated = report.updated,
            unchanged = report.unchanged, removed = report.removed, rejected = report.rejected,
            "sync finished"
        );
        Ok(Response::new(v1::SyncPointersResponse {
            inserted: report.inserted,
            updated: report.updated,
            unchanged: report.unchanged,
            removed: report.removed,
            rejected: report.rejected,
            errors: report
                .errors
                .into_iter()
                .map(|e| v1::RecordError {
                    position: e.position,
                    field: e.field.to_string(),
                    message: e.message,
                })
                .collect(),
            replace_applied: report.replace_applied,
        }))
    }

    type ExportPointersStream =
        Pin<Box<dyn Stream<Item = Result<v1::ExportPointersResponse, Status>> + Send>>;

    async fn export_pointers(
        &self,
        req: Request<v1::ExportPointersRequest>,
    ) -> Result<Response<Self::ExportPointersStream>, Status> {
        let caller = self.organization(&req)?;
        let org = pointer::org_number("organization_number", &req.get_ref().organization_number)
            .map_err(invalid)?;
        self.authorize_write(&caller, &org)?;
        tracing::info!(caller = %caller, org = %org, "export started");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let mut after = None;
            loop {
                match registry.export_page(org.clone(), after, EXPORT_PAGE).await {
                    Ok((pointers, last)) => {
                        let Some(last) = last else { return };
                        after = Some(last);
                        let msg = v1::ExportPointersResponse { pointers };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn sync_status(e: SyncError) -> Status {
    match e {
        SyncError::Invalid(msg) => Status::invalid_argument(msg),
        SyncError::Registry(e) => internal(e),
    }
}

#[tonic::async_trait]
impl v1::lookup_service_server::LookupService for NodeService {
    async fn lookup(
        &self,
        req: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        let caller = self.organization(&req)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
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
        let pointers = self
            .registry
            .lookup(&patient, &filter)
            .await
            .map_err(internal)?;
        let query_id = new_query_id();
        tracing::info!(caller = %caller, query_id, found = pointers.len(), "lookup");
        Ok(Response::new(v1::LookupResponse {
            regions: vec![v1::RegionStatus {
                region: self.registry.region().to_string(),
                state: v1::RegionState::Ok as i32,
                detail: String::new(),
                pointer_count: pointers.len() as u32,
            }],
            pointers,
            query_id,
        }))
    }
}

/// A random id for one lookup, carried into logs (and, across regions, the audit log).
fn new_query_id() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}
