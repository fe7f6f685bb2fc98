//! The typed gRPC client.

use std::time::Duration;

use futures::{Stream, StreamExt};
use pil_proto::v1::{
    self, admin_service_client::AdminServiceClient, audit_service_client::AuditServiceClient,
    event_service_client::EventServiceClient, lookup_service_client::LookupServiceClient,
    policy_service_client::PolicyServiceClient, registry_service_client::RegistryServiceClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::error::ClientError;
use crate::{credentials::Credentials, profile::Profile};

/// A connection to one node as one organization. Cheap to clone; calls may run
/// concurrently over the one HTTP/2 connection.
#[derive(Clone)]
pub struct PilClient {
    registry: RegistryServiceClient<Channel>,
    lookup: LookupServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    policy: PolicyServiceClient<Channel>,
    audit: AuditServiceClient<Channel>,
    events: EventServiceClient<Channel>,
    channel: Channel,
    /// `https://host:port` as called, for DPoP proofs' `htu`.
    address: String,
    credentials: std::sync::Arc<Credentials>,
}

/// Parameters of a bulk sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub organization_number: String,
    pub mode: v1::SyncMode,
    pub scope: v1::ReplaceScope,
    pub all_or_nothing: bool,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl PilClient {
    /// Connects with mutual TLS as the profile's organization.
    pub async fn connect(profile: &Profile) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            address: profile.address.clone(),
            source,
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&profile.ca)?))
            .identity(Identity::from_pem(
                read(&profile.cert)?,
                read(&profile.key)?,
            ));
        if let Some(name) = &profile.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Channel::from_shared(profile.address.clone())
            .map_err(|e| ClientError::Address {
                address: profile.address.clone(),
                message: e.to_string(),
            })?
            .tls_config(tls)
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_err)?;
        let credentials = match &profile.token {
            Some(t) => Credentials::dev(t)?,
            None => Credentials::None,
        };
        Ok(Self::from_channel(channel, &profile.address).with_credentials(credentials))
    }

    /// Wraps an existing channel to the node at `address` (`https://host:port`).
    pub fn from_channel(channel: Channel, address: &str) -> Self {
        let max = 64 * 1024 * 1024;
        Self {
            registry: RegistryServiceClient::new(channel.clone()).max_decoding_message_size(max),
            lookup: LookupServiceClient::new(channel.clone()).max_decoding_message_size(max),
            admin: AdminServiceClient::new(channel.clone()),
            policy: PolicyServiceClient::new(channel.clone()),
            audit: AuditServiceClient::new(channel.clone()).max_decoding_message_size(max),
            events: EventServiceClient::new(channel.clone()).max_decoding_message_size(max),
            channel,
            address: address.trim_end_matches('/').to_string(),
            credentials: std::sync::Arc::new(Credentials::None),
        }
    }

    /// Uses `credentials` for the requester's token on lookups and explanations.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = std::sync::Arc::new(credentials);
        self
    }

    /// A request carrying the requester's token (and DPoP proof) for `path`.
    fn authorized<T>(&self, msg: T, path: &str) -> Result<tonic::Request<T>, ClientError> {
        let mut req = tonic::Request::new(msg);
        let uri = format!("{}{}", self.address, path);
        for (name, value) in self.credentials.headers(&uri)? {
            let value = value
                .parse()
                .map_err(|_| ClientError::Credentials(format!("{name} is not a valid header")))?;
            req.metadata_mut().insert(name, value);
        }
        Ok(req)
    }

    /// Asks the node what its legal configuration would decide for this requester.
    pub async fn explain(
        &self,
        req: v1::ExplainRequest,
    ) -> Result<v1::ExplainResponse, ClientError> {
        let req = self.authorized(req, "/pil.v1.PolicyService/Explain")?;
        Ok(self.policy.clone().explain(req).await?.into_inner())
    }

    /// Follows patients' pointer changes.
    pub async fn subscribe(
        &self,
        req: v1::SubscribeRequest,
    ) -> Result<v1::SubscribeResponse, ClientError> {
        let req = self.authorized(req, "/pil.v1.EventService/Subscribe")?;
        Ok(self.events.clone().subscribe(req).await?.into_inner())
    }

    /// The organization's subscriptions.
    pub async fn subscriptions(&self) -> Result<Vec<v1::Subscription>, ClientError> {
        let req = self.authorized(
            v1::ListSubscriptionsRequest {},
            "/pil.v1.EventService/ListSubscriptions",
        )?;
        Ok(self
            .events
            .clone()
            .list_subscriptions(req)
            .await?
            .into_inner()
            .subscriptions)
    }

    /// Extends a subscription from now (`days` 0: as long as the node allows).
    pub async fn renew_subscription(
        &self,
        id: &str,
        days: u32,
    ) -> Result<v1::Subscription, ClientError> {
        let req = self.authorized(
            v1::RenewSubscriptionRequest {
                id: id.to_string(),
                days,
            },
            "/pil.v1.EventService/RenewSubscription",
        )?;
        Ok(self
            .events
            .clone()
            .renew_subscription(req)
            .await?
            .into_inner()
            .subscription
            .unwrap_or_default())
    }

    /// Ends a subscription.
    pub async fn end_subscription(&self, id: &str) -> Result<v1::Subscription, ClientError> {
        let req = self.authorized(
            v1::EndSubscriptionRequest { id: id.to_string() },
            "/pil.v1.EventService/EndSubscription",
        )?;
        Ok(self
            .events
            .clone()
            .end_subscription(req)
            .await?
            .into_inner()
            .subscription
            .unwrap_or_default())
    }

    /// Up to `max` events of subscription `id` after number `after`.
    pub async fn pull_events(
        &self,
        id: &str,
        after: u64,
        max: u32,
    ) -> Result<v1::PullEventsResponse, ClientError> {
        let req = self.authorized(
            v1::PullEventsRequest {
                subscription_id: id.to_string(),
                after,
                max_events: max,
            },
            "/pil.v1.EventService/PullEvents",
        )?;
        Ok(self.events.clone().pull_events(req).await?.into_inner())
    }

    /// The events of subscription `id` after number `after`, then each new one.
    pub async fn stream_events(
        &self,
        id: &str,
        after: u64,
        heartbeat_seconds: u32,
    ) -> Result<tonic::Streaming<v1::StreamEventsResponse>, ClientError> {
        let req = self.authorized(
            v1::StreamEventsRequest {
                subscription_id: id.to_string(),
                after,
                heartbeat_seconds,
            },
            "/pil.v1.EventService/StreamEvents",
        )?;
        Ok(self.events.clone().stream_events(req).await?.into_inner())
    }

    /// The admin API (operator role required).
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        self.admin.clone()
    }

    /// The underlying channel, for the standard health and reflection clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Looks a patient up.
    pub async fn lookup(&self, req: v1::LookupRequest) -> Result<v1::LookupResponse, ClientError> {
        let req = self.authorized(req, "/pil.v1.LookupService/Lookup")?;
        Ok(self.lookup.clone().lookup(req).await?.into_inner())
    }

    /// Inserts or replaces one pointer.
    pub async fn upsert(
        &self,
        pointer: v1::Pointer,
    ) -> Result<v1::UpsertPointerResponse, ClientError> {
        let req = v1::UpsertPointerRequest {
            pointer: Some(pointer),
        };
        Ok(self
            .registry
            .clone()
            .upsert_pointer(req)
            .await?
            .into_inner())
    }

    /// Removes one pointer; `Ok(false)` when there was none.
    pub async fn delete(&self, req: v1::DeletePointerRequest) -> Result<bool, ClientError> {
        Ok(self
            .registry
            .clone()
            .delete_pointer(req)
            .await?
            .into_inner()
            .deleted)
    }

    /// Streams batches of pointers as one sync; returns the node's report.
    pub async fn sync(
        &self,
        options: SyncOptions,
        batches: impl Stream<Item = Vec<v1::Pointer>> + Send + 'static,
    ) -> Result<v1::SyncPointersResponse, ClientError> {
        use v1::sync_pointers_request::Item;
        let header = v1::SyncPointersRequest {
            item: Some(Item::Header(v1::SyncHeader {
                mode: options.mode as i32,
                scope: options.scope as i32,
                organization_number: options.organization_number,
                all_or_nothing: options.all_or_nothing,
            })),
        };
        let body = batches.map(|pointers| v1::SyncPointersRequest {
            item: Some(Item::Batch(v1::PointerBatch { pointers })),
        });
        let stream = futures::stream::iter([header]).chain(body);
        Ok(self
            .registry
            .clone()
            .sync_pointers(stream)
            .await?
            .into_inner())
    }

    /// Streams back every pointer registered for an organization.
    pub async fn export(
        &self,
        organization_number: &str,
    ) -> Result<impl Stream<Item = Result<Vec<v1::Pointer>, ClientError>> + use<>, ClientError>
    {
        let req = v1::ExportPointersRequest {
            organization_number: organization_number.to_string(),
        };
        let stream = self
            .registry
            .clone()
            .export_pointers(req)
            .await?
            .into_inner();
        Ok(stream.map(|r| r.map(|m| m.pointers).map_err(ClientError::from)))
    }
}

/// The admin API, typed (operator role required; no requester token).
impl PilClient {
    /// Records a block (sperring) for a patient; returns the block as stored.
    pub async fn create_block(
        &self,
        patient: v1::PatientIdentifier,
        block: v1::Block,
    ) -> Result<v1::Block, ClientError> {
        let req = v1::CreateBlockRequest {
            patient: Some(patient),
            block: Some(block),
        };
        let resp = self.admin.clone().create_block(req).await?.into_inner();
        Ok(resp.block.unwrap_or_default())
    }

    /// Lifts a block; `Ok(false)` when there was no such block.
    pub async fn lift_block(
        &self,
        patient: v1::PatientIdentifier,
        block_id: &str,
    ) -> Result<bool, ClientError> {
        let req = v1::LiftBlockRequest {
            patient: Some(patient),
            block_id: block_id.to_string(),
        };
        Ok(self
            .admin
            .clone()
            .lift_block(req)
            .await?
            .into_inner()
            .lifted)
    }

    /// A patient's blocks, oldest first.
    pub async fn list_blocks(
        &self,
        patient: v1::PatientIdentifier,
    ) -> Result<Vec<v1::Block>, ClientError> {
        let req = v1::ListBlocksRequest {
            patient: Some(patient),
        };
        Ok(self
            .admin
            .clone()
            .list_blocks(req)
            .await?
            .into_inner()
            .blocks)
    }

    /// Records that a patient opts out; returns when it took effect.
    pub async fn set_opt_out(
        &self,
        patient: v1::PatientIdentifier,
        reason: &str,
    ) -> Result<Option<prost_types::Timestamp>, ClientError> {
        let req = v1::SetOptOutRequest {
            patient: Some(patient),
            reason: reason.to_string(),
        };
        Ok(self
            .admin
            .clone()
            .set_opt_out(req)
            .await?
            .into_inner()
            .since)
    }

    /// Lifts a patient's opt-out; `Ok(false)` when there was none.
    pub async fn lift_opt_out(&self, patient: v1::PatientIdentifier) -> Result<bool, ClientError> {
        let req = v1::LiftOptOutRequest {
            patient: Some(patient),
        };
        Ok(self
            .admin
            .clone()
            .lift_opt_out(req)
            .await?
            .into_inner()
            .lifted)
    }

    /// Whether a patient has opted out, and since when.
    pub async fn get_opt_out(
        &self,
        patient: v1::PatientIdentifier,
    ) -> Result<v1::GetOptOutResponse, ClientError> {
        let req = v1::GetOptOutRequest {
            patient: Some(patient),
        };
        Ok(self.admin.clone().get_opt_out(req).await?.into_inner())
    }

    /// Makes the node re-read its configuration (legal configuration, peers, TLS
    /// files, issuer keys, audit signing key); returns what is in force now.
    pub async fn reload_legal_config(&self) -> Result<v1::ReloadLegalConfigResponse, ClientError> {
        let req = v1::ReloadLegalConfigRequest {};
        Ok(self
            .admin
            .clone()
            .reload_legal_config(req)
            .await?
            .into_inner())
    }
}

/// The audit API (auditor role required; authorized by the organization certificate
/// alone, so no requester token is sent). Every call is itself recorded in the log.
impl PilClient {
    /// One page of records matching a filter, newest first.
    pub async fn audit_search(
        &self,
        req: v1::SearchAuditRequest,
    ) -> Result<v1::SearchAuditResponse, ClientError> {
        Ok(self.audit.clone().search_audit(req).await?.into_inner())
    }

    /// Records matching a filter, oldest first, one line (JSON document) per item.
    pub async fn audit_export(
        &self,
        req: v1::ExportAuditRequest,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ClientError>> + use<>, ClientError> {
        let stream = self.audit.clone().export_audit(req).await?.into_inner();
        Ok(flatten_pages(stream, |page: v1::ExportAuditResponse| {
            page.lines
        }))
    }

    /// The whole log from `from_index` on, in order, one entry at a time.
    pub async fn audit_read_log(
        &self,
        from_index: u64,
    ) -> Result<impl Stream<Item = Result<v1::LogEntry, ClientError>> + use<>, ClientError> {
        let req = v1::ReadLogRequest { from_index };
        let stream = self.audit.clone().read_log(req).await?.into_inner();
        Ok(flatten_pages(stream, |page: v1::ReadLogResponse| {
            page.entries
        }))
    }

    /// Every signed tree head the node has made, oldest first (fetched page by page).
    pub async fn audit_tree_heads(&self) -> Result<Vec<v1::SignedTreeHead>, ClientError> {
        let mut heads: Vec<v1::SignedTreeHead> = Vec::new();
        loop {
            let req = v1::ListTreeHeadsRequest {
                after_size: heads.last().map(|h| h.size).unwrap_or(0),
                page_size: 0,
            };
            let page = self.audit.clone().list_tree_heads(req).await?.into_inner();
            heads.extend(page.heads);
            if !page.more {
                return Ok(heads);
            }
        }
    }

    /// The newest signed tree head; with `sign_now`, the node signs its current tree
    /// first, so the head covers every record up to this call.
    pub async fn audit_tree_head(&self, sign_now: bool) -> Result<v1::SignedTreeHead, ClientError> {
        let req = v1::GetTreeHeadRequest { sign_now };
        self.audit
            .clone()
            .get_tree_head(req)
            .await?
            .into_inner()
            .head
            .ok_or_else(|| tonic::Status::internal("the node sent no tree head").into())
    }

    /// Proof that record `index` is in the tree of `tree_size`, with the record.
    pub async fn audit_inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<v1::GetInclusionProofResponse, ClientError> {
        let req = v1::GetInclusionProofRequest { index, tree_size };
        Ok(self
            .audit
            .clone()
            .get_inclusion_proof(req)
            .await?
            .into_inner())
    }

    /// Proof that the tree of `old_size` is a prefix of the tree of `new_size`.
    pub async fn audit_consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let req = v1::GetConsistencyProofRequest { old_size, new_size };
        Ok(self
            .audit
            .clone()
            .get_consistency_proof(req)
            .await?
            .into_inner()
            .proof)
    }

    /// Who looked the patient up, per region.
    pub async fn audit_patient_report(
        &self,
        patient: v1::PatientIdentifier,
        home_region_only: bool,
    ) -> Result<v1::PatientReportResponse, ClientError> {
        let req = v1::PatientReportRequest {
            patient: Some(patient),
            home_region_only,
        };
        Ok(self.audit.clone().patient_report(req).await?.into_inner())
    }

    /// Marks record `index` of the node's log reviewed, with a note; the review is
    /// itself recorded (action `audit_review`).
    pub async fn audit_review(
        &self,
        index: u64,
        note: &str,
        reviewer: &str,
    ) -> Result<(), ClientError> {
        let req = v1::ReviewRecordRequest {
            index,
            note: note.to_string(),
            reviewer: reviewer.to_string(),
        };
        self.audit.clone().review_record(req).await?;
        Ok(())
    }
}

/// A server stream of pages as a stream of their items.
fn flatten_pages<P, T, F>(
    pages: tonic::Streaming<P>,
    items: F,
) -> impl Stream<Item = Result<T, ClientError>>
where
    P: Send + 'static,
    T: Send + 'static,
    F: Fn(P) -> Vec<T> + Send + 'static,
{
    pages.flat_map(move |page| {
        let batch: Vec<Result<T, ClientError>> = match page {
            Ok(p) => items(p).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(ClientError::from(e))],
        };
        futures::stream::iter(batch)
    })
}
