//! Requests refused before any handler ran — not valid protobuf, over the message size
//! limit, for an unknown method — still leave an audit record, and get the status code
//! gRPC's guide gives them. Requests a handler answered are recorded by the handler.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{Code, Status};

use crate::{
    audit::{
        AuditLog, AuditRecord,
        record::{Action, CallerInfo},
    },
    identity::Caller,
    tls::PeerInfo,
};

/// Set by a handler once it has taken charge of a request's audit record.
#[derive(Debug, Clone, Default)]
pub struct Handled(Arc<AtomicBool>);

impl Handled {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The status a refusal is answered with: tonic reports an oversized message as
/// OUT_OF_RANGE and undecodable protobuf as INTERNAL; the caller needs to know it sent
/// something the node cannot take.
pub fn refusal_status(status: Status) -> Status {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            Status::resource_exhausted(format!(
                "the message is larger than this node accepts ({}); send smaller messages, \
                 e.g. fewer pointers per sync batch",
                message
                    .split_once("found ")
                    .map(|(_, rest)| rest)
                    .unwrap_or(message)
            ))
        }
        Code::Internal if message.contains("failed to decode Protobuf message") => {
            Status::invalid_argument(format!(
                "the request is not a valid protobuf message of this method's type ({message}); \
                 check that the client was generated from this node's proto files"
            ))
        }
        _ => status,
    }
}

/// Wraps the services so refusals no handler saw are recorded.
#[derive(Clone)]
pub struct RefusalLayer {
    audit: AuditLog,
    region: String,
}

impl RefusalLayer {
    pub fn new(audit: AuditLog, region: String) -> Self {
        Self { audit, region }
    }
}

impl<S> tower::Layer<S> for RefusalLayer {
    type Service = RefusalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefusalService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RefusalService<S> {
    inner: S,
    layer: RefusalLayer,
}

type Body = tonic::body::Body;

impl<S, B> tower::Service<http::Request<B>> for RefusalService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let handled = Handled::default();
        req.extensions_mut().insert(handled.clone());
        let method = req.uri().path().to_string();
        let caller = caller_info(req.extensions().get::<PeerInfo>());
        // The clone that was made ready is the one that serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = inner.call(req).await?;
            if handled.is_marked() {
                return Ok(response);
            }
            // A refusal before the handler is a trailers-only response: its status is
            // in the headers. A response without one is a stream under way.
            let Some(status) = Status::from_header_map(response.headers()) else {
                return Ok(response);
            };
            if status.code() == Code::Ok {
                return Ok(response);
            }
            let status = refusal_status(status);
            let mut record = AuditRecord::not_decided(
                &layer.region,
                Action::Refused,
                caller,
                crate::error::status_name(status.code()),
                status.message().to_string(),
            );
            record.detail = Some(method);
            if let Err(e) = layer.audit.append(record).await {
                tracing::error!(error = %e, "a refused request could not be recorded");
                return Ok(Status::unavailable(
                    "the node could not record this request in its audit log; retry later",
                )
                .into_http());
            }
            Ok(status.into_http())
        })
    }
}

pub(super) fn caller_info(info: Option<&PeerInfo>) -> CallerInfo {
    match info.map(|i| &i.caller) {
        Some(Ok(Caller::Organization { org_number, .. })) => CallerInfo {
            organization: Some(org_number.clone()),
            node_region: None,
        },
        Some(Ok(Caller::Node { region })) => CallerInfo {
            organization: None,
            node_region: Some(region.clone()),
        },
        _ => CallerInfo::default(),
    }
}
