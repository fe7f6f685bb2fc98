//! The gRPC services. The only module that knows tonic's request and status types:
//! it authenticates the caller from the connection, authorizes writes, validates
//! input, calls the registry, and maps every failure to a status a person can act on.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use pil_proto::{ident::OrgNumber, v1};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

mod admin;
mod audit;
mod convert;
mod event_federation;
mod events;
mod explain;
mod federation;
mod limits;
mod lookup;
mod refusals;

pub use limits::RateLimitLayer;
pub use refusals::RefusalLayer;

use crate::{
    access::{Access, AccessError, Requester},
    audit::{
        AuditLog, AuditRecord,
        record::{Action, OutcomeInfo},
    },
    config::NodeConfig,
    error::Error,
    federation::Federation,
    identity::Caller,
    pointer::{self, FieldError, NewPointer},
    registry::{Outcome, Registry, RegistryError},
    reload::Reloader,
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
    access: Arc<Access>,
    reloader: Reloader,
    audit: AuditLog,
    federation: Arc<Federation>,
    /// Forwarded lookups being served; the rest are shed.
    forward_limit: Arc<tokio::sync::Semaphore>,
    /// Subscriptions made here, on their way to the other regions.
    relay: Arc<event_federation::Relay>,
    metrics: Arc<crate::metrics::Metrics>,
    routing: Arc<crate::routing::Routing>,
}

/// Scheme and authority a request arrived on, for checking DPoP proofs' `htu`.
#[derive(Debug, Clone)]
pub struct ArrivedOn(pub String);

/// Records where each request arrived, as a request extension.
pub fn remember_origin(
    mut req: http::Request<tonic::body::Body>,
) -> http::Request<tonic::body::Body> {
    let origin = format!(
        "https://{}",
        req.uri().authority().map(|a| a.as_str()).unwrap_or("")
    );
    req.extensions_mut().insert(ArrivedOn(origin));
    req
}

/// A refusal naming the deciding rules and their legal bases.
fn denied(decision: &pil_legal::Decision) -> Error {
    let rules: Vec<String> = decision
        .rules
        .iter()
        .map(|r| format!("{} ({})", r.id, r.legal_basis))
        .collect();
    Error::denied(format!(
        "refused by the legal configuration: {}",
        rules.join("; ")
    ))
}

/// What a node's services are made of.
pub struct ServiceParts {
    pub registry: Registry,
    pub config: Arc<NodeConfig>,
    pub access: Arc<Access>,
    pub reloader: Reloader,
    pub audit: AuditLog,
    pub federation: Arc<Federation>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub routing: Arc<crate::routing::Routing>,
}

impl NodeService {
    pub fn new(parts: ServiceParts) -> Self {
        let ServiceParts {
            registry,
            config,
            access,
            reloader,
            audit,
            federation,
            metrics,
            routing,
        } = parts;
        let limit = federation.config().max_concurrent_forwarded.max(1);
        Self {
            registry,
            config,
            access,
            reloader,
            audit,
            federation,
            forward_limit: Arc::new(tokio::sync::Semaphore::new(limit)),
            relay: Arc::default(),
            metrics,
            routing,
        }
    }

    /// A request's audit record, with what the connection says about the caller.
    /// Handlers fill in the rest; [`NodeService::audited`] completes and stores it.
    fn audit_entry<T>(&self, req: &Request<T>, action: Action) -> AuditRecord {
        if let Some(handled) = req.extensions().get::<refusals::Handled>() {
            handled.mark();
        }
        let caller = refusals::caller_info(req.extensions().get::<PeerInfo>());
        AuditRecord::new(self.registry.region(), action, caller)
    }

    /// Serves one audited request: its record is started from the request, filled in
    /// by `inner` as it goes, and stored before the answer leaves.
    async fn serve<T, R>(
        &self,
        req: Request<T>,
        action: Action,
        inner: impl for<'a> FnOnce(
            &'a Self,
            &'a mut AuditRecord,
            Request<T>,
        )
            -> futures::future::BoxFuture<'a, Result<Response<R>, Error>>,
    ) -> Result<Response<R>, Status> {
        let mut entry = self.audit_entry(&req, action);
        let result = inner(self, &mut entry, req).await;
        self.audited(entry, result).await
    }

    /// Records the request's outcome durably, then lets the answer go. An answer whose
    /// record cannot be stored is not given.
    async fn audited<R>(
        &self,
        mut entry: AuditRecord,
        result: Result<Response<R>, Error>,
    ) -> Result<Response<R>, Status> {
        let result = result.map_err(|e| match e {
            Error::Wire(status) => Error::Wire(refusals::refusal_status(status)),
            e => e,
        });
        match &result {
            Ok(_) => entry.outcome.status = "OK".into(),
            Err(e) => {
                entry.outcome.status = crate::error::status_name(e.grpc_code()).into();
                entry.outcome.error_code = e.code().into();
                tracing::info!(
                    code = e.code(), action = ?entry.action, query_id = %entry.query_id,
                    "request refused"
                );
                entry.outcome.detail = match e {
                    Error::Wire(status) => status.message().to_string(),
                    e => e.to_string(),
                };
                entry.outcome.pointers = 0;
                entry.outcome.organizations.clear();
                match e.decision() {
                    Some("unauthenticated") => entry.decision.outcome = "unauthenticated".into(),
                    // A refused role or peer is a denial, whoever decided it.
                    Some(d) if entry.decision.outcome.is_empty() => {
                        entry.decision.outcome = d.into()
                    }
                    _ => {}
                }
            }
        }
        if entry.decision.outcome.is_empty() {
            entry.decision.outcome = "not_applicable".into();
        }
        if entry.action == Action::Lookup {
            use crate::metrics::LookupDecision as D;
            self.metrics.lookup(match entry.decision.outcome.as_str() {
                "allowed" if entry.decision.emergency => D::Emergency,
                "allowed" => D::Allowed,
                "denied" => D::Denied,
                "unauthenticated" => D::Unauthenticated,
                _ => D::Failed,
            });
        }
        match self.audit.append(entry).await {
            Ok(_) => result.map_err(Status::from),
            Err(e) => Err(unrecorded(e).into()),
        }
    }

    /// Records a change before it is made, so no change to the registry is ever
    /// durable without a record of it, even when the node dies before the outcome is
    /// recorded. The outcome's record follows with the same query id.
    async fn record_first(&self, entry: &AuditRecord) -> Result<(), Error> {
        let mut first = entry.clone();
        first.outcome = OutcomeInfo {
            status: "STARTED".into(),
            detail: "the change is being made; the record with the same query id that \
                     follows has its outcome"
                .into(),
            ..OutcomeInfo::default()
        };
        if first.decision.outcome.is_empty() {
            first.decision.outcome = "not_applicable".into();
        }
        self.audit
            .append(first)
            .await
            .map(|_| ())
            .map_err(unrecorded)
    }

    /// The verified requester of a call to `path`: certificate, token and DPoP proof.
    fn requester<T>(&self, req: &Request<T>, path: &str) -> Result<Requester, Error> {
        let org = self.organization(req)?;
        let meta = req.metadata();
        let header = |name: &str| meta.get(name).and_then(|v| v.to_str().ok());
        let arrived_on = req
            .extensions()
            .get::<ArrivedOn>()
            .map(|a| a.0.as_str())
            .unwrap_or("");
        self.access
            .authenticate(
                org.as_str(),
                header("authorization"),
                header("dpop"),
                arrived_on,
                path,
            )
            .map_err(|e| match e {
                AccessError::Unauthenticated(reason) => {
                    tracing::info!(caller = %org, %reason, "requester refused");
                    Error::unauthenticated(reason)
                }
                other => internal_access(other),
            })
    }

    /// [`Self::requester`], and the DPoP proof recorded for every node of the region: a
    /// proof one node accepted is refused by the others.
    async fn requester_once<T>(&self, req: &Request<T>, path: &str) -> Result<Requester, Error> {
        let requester = self.requester(req, path)?;
        if let Some((key, until)) = requester.token.dpop_replay.clone()
            && !self
                .registry
                .claim_proof(key, until)
                .await
                .map_err(internal)?
        {
            tracing::info!(caller = %requester.token.org_number, "replayed DPoP proof refused");
            return Err(Error::unauthenticated(
                "the DPoP proof was already used (at this or another node of the region); \
                 make a fresh proof for every call",
            ));
        }
        Ok(requester)
    }

    /// Refuses unless the caller's organization holds `role` in the legal configuration.
    fn require_role<T>(&self, req: &Request<T>, role: pil_legal::Role) -> Result<OrgNumber, Error> {
        let org = self.organization(req)?;
        if self.access.legal().has_role(org.as_str(), role) {
            Ok(org)
        } else {
            tracing::warn!(caller = %org, ?role, "call without the required role refused");
            Err(Error::denied(format!(
                "organization {org} does not hold the {role:?} role in this node's legal \
                 configuration"
            )))
        }
    }

    /// The calling organization, from the connection's client certificate.
    fn organization<T>(&self, req: &Request<T>) -> Result<OrgNumber, Error> {
        let info = req
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Error::unauthenticated("no client certificate on this connection"))?;
        match &info.caller {
            Ok(Caller::Organization { org_number, .. }) => {
                OrgNumber::parse(org_number).map_err(|e| {
                    Error::unauthenticated(format!(
                        "the client certificate's organization number is invalid: {e}"
                    ))
                })
            }
            Ok(Caller::Node { region }) => Err(Error::denied(format!(
                "node certificate of region {region:?} cannot call the client API; use an \
                 organization certificate"
            ))),
            Err(e) => Err(Error::unauthenticated(format!(
                "the client certificate does not identify an organization: {e}"
            ))),
        }
    }

    /// Refuses unless `caller` may write pointers held by `holder`.
    fn authorize_write(&self, caller: &OrgNumber, holder: &OrgNumber) -> Result<(), Error> {
        if self
            .config
            .write_scope(caller.as_str())
            .contains(holder.as_str())
        {
            Ok(())
        } else {
            tracing::warn!(caller = %caller, holder = %holder, "write for another organization refused");
            Err(Error::denied(format!(
                "organization {caller} may not write pointers for organization {holder}; a \
                 node operator can allow it under [writes_for] in the node configuration"
            )))
        }
    }
}

/// The answer when a request's record cannot be stored: no answer at all.
fn unrecorded(e: crate::audit::AuditError) -> Error {
    tracing::error!(error = %e, "request not answered: its audit record could not be stored");
    Error::unavailable(
        "the node could not record this request in its audit log, so it was not answered; \
         retry later",
    )
}

fn invalid(e: FieldError) -> Error {
    e.into()
}

fn internal(e: RegistryError) -> Error {
    match e {
        RegistryError::Storage(crate::store::StoreError::Closed) => {
            Error::unavailable("the node is shutting down; retry against another instance")
        }
        RegistryError::Storage(e @ crate::store::StoreError::RoutingKey { .. }) => {
            tracing::error!(error = %e, "a write was refused: this node's routing key is not the region's");
            Error::unavailable(
                "this node cannot make the region's routing tokens (its routing key is not the \
                 one in force); nothing was written; retry against another node of the region",
            )
        }
        e => Error::internal(e),
    }
}

impl NodeService {
    async fn upsert_pointer_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::UpsertPointerRequest>,
    ) -> Result<Response<v1::UpsertPointerResponse>, Error> {
        let caller = self.organization(&req)?;
        let wire = req
            .into_inner()
            .pointer
            .ok_or_else(|| Error::invalid("pointer: is required"))?;
        let p = NewPointer::from_wire(&wire, self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&p.patient)));
        entry.detail = Some(format!("holder {}", p.endpoint.org));
        self.authorize_write(&caller, &p.endpoint.org)?;
        self.record_first(entry).await?;
        let (outcome, stored) = self.registry.upsert(p).await.map_err(internal)?;
        entry.outcome.pointers = u32::from(outcome != Outcome::Unchanged);
        tracing::info!(caller = %caller, ?outcome, "pointer upserted");
        let outcome = match outcome {
            Outcome::Inserted => v1::WriteOutcome::Inserted,
            Outcome::Updated => v1::WriteOutcome::Updated,
            Outcome::Unchanged => v1::WriteOutcome::Unchanged,
        };
        Ok(Response::new(v1::UpsertPointerResponse {
            outcome: outcome as i32,
            pointer: Some(convert::pointer(&stored)),
        }))
    }

    async fn delete_pointer_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::DeletePointerRequest>,
    ) -> Result<Response<v1::DeletePointerResponse>, Error> {
        let caller = self.organization(&req)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        let endpoint =
            pointer::endpoint_ref(req.holder.as_ref(), req.endpoint.as_ref()).map_err(invalid)?;
        entry.detail = Some(format!("holder {}", endpoint.org));
        self.authorize_write(&caller, &endpoint.org)?;
        self.record_first(entry).await?;
        let deleted = self
            .registry
            .delete(&patient, &endpoint)
            .await
            .map_err(internal)?;
        entry.outcome.pointers = u32::from(deleted);
        tracing::info!(caller = %caller, deleted, "pointer delete");
        Ok(Response::new(v1::DeletePointerResponse { deleted }))
    }

    async fn sync_pointers_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<Streaming<v1::SyncPointersRequest>>,
    ) -> Result<Response<v1::SyncPointersResponse>, Error> {
        let caller = self.organization(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(v1::SyncPointersRequest {
                item: Some(v1::sync_pointers_request::Item::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status.into()),
            _ => {
                return Err(Error::invalid(
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
                return Err(Error::invalid(
                    "header.scope: replace mode needs REPLACE_SCOPE_PATIENTS or \
                     REPLACE_SCOPE_ORGANIZATION",
                ));
            }
            _ => {
                return Err(Error::invalid(
                    "header.mode: must be SYNC_MODE_MERGE or SYNC_MODE_REPLACE",
                ));
            }
        };
        entry.detail = Some(format!("holder {org}"));
        self.record_first(entry).await?;
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
                    return Err(Error::invalid(
                        "a sync has exactly one header, as its first message",
                    ));
                }
                None => return Err(Error::invalid("empty sync message")),
            }
        }
        let report = session.finish().await.map_err(sync_status)?;
        tracing::info!(
            caller = %caller, org = %org, inserted = report.inserted, updated = report.updated,
            unchanged = report.unchanged, removed = report.removed, rejected = report.rejected,
            "sync finished"
        );
        entry.outcome.pointers =
            u32::try_from(report.inserted + report.updated + report.removed).unwrap_or(u32::MAX);
        entry.detail = Some(format!(
            "holder {org}: {} inserted, {} updated, {} unchanged, {} removed, {} rejected",
            report.inserted, report.updated, report.unchanged, report.removed, report.rejected
        ));
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

    async fn export_pointers_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ExportPointersRequest>,
    ) -> Result<Response<ExportStream>, Error> {
        let caller = self.organization(&req)?;
        let org = pointer::org_number("organization_number", &req.get_ref().organization_number)
            .map_err(invalid)?;
        entry.detail = Some(format!("holder {org}"));
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
                        let msg = v1::ExportPointersResponse {
                            pointers: pointers.iter().map(convert::pointer).collect(),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(internal(e).into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportPointersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::registry_service_server::RegistryService for NodeService {
    async fn upsert_pointer(
        &self,
        req: Request<v1::UpsertPointerRequest>,
    ) -> Result<Response<v1::UpsertPointerResponse>, Status> {
        self.serve(req, Action::PointerUpsert, |s, e, r| {
            Box::pin(s.upsert_pointer_inner(e, r))
        })
        .await
    }

    async fn delete_pointer(
        &self,
        req: Request<v1::DeletePointerRequest>,
    ) -> Result<Response<v1::DeletePointerResponse>, Status> {
        self.serve(req, Action::PointerDelete, |s, e, r| {
            Box::pin(s.delete_pointer_inner(e, r))
        })
        .await
    }

    async fn sync_pointers(
        &self,
        req: Request<Streaming<v1::SyncPointersRequest>>,
    ) -> Result<Response<v1::SyncPointersResponse>, Status> {
        self.serve(req, Action::PointerSync, |s, e, r| {
            Box::pin(s.sync_pointers_inner(e, r))
        })
        .await
    }

    type ExportPointersStream = ExportStream;

    async fn export_pointers(
        &self,
        req: Request<v1::ExportPointersRequest>,
    ) -> Result<Response<Self::ExportPointersStream>, Status> {
        self.serve(req, Action::PointerExport, |s, e, r| {
            Box::pin(s.export_pointers_inner(e, r))
        })
        .await
    }
}

fn internal_access(e: AccessError) -> Error {
    Error::internal(e)
}

fn sync_status(e: SyncError) -> Error {
    match e {
        SyncError::Invalid(msg) => Error::invalid(msg),
        SyncError::Registry(e) => internal(e),
    }
}
