//! Per-organization request rates (`[limits] requests_per_second_per_organization`):
//! one organization's flood is answered `RESOURCE_EXHAUSTED` before any handler runs,
//! so the node keeps its time for everyone else. Peer nodes are limited by
//! federation's own concurrency bound, not here.
//!
//! A request refused here is counted (`pil_rate_limited_requests_total`) and logged at
//! most once a second per organization, but not audited: it is answered with nothing
//! and changes nothing, and a record per refusal would let a flood fill the audit log.

use std::{
    num::NonZeroU32,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::{BoxFuture, Either, Ready, ready};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

use crate::{identity::Caller, metrics::Metrics, tls::PeerInfo};

type Body = tonic::body::Body;

/// The limiter shared by every connection.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Option<Arc<Limiter>>,
}

struct Limiter {
    rate: NonZeroU32,
    keyed: DefaultKeyedRateLimiter<String>,
    metrics: Arc<Metrics>,
    /// When each organization's refusals were last logged.
    logged: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

impl RateLimitLayer {
    /// `rate` requests per second per organization, in bursts of up to `burst`
    /// (`0`: no limit).
    pub fn new(rate: u32, burst: u32, metrics: Arc<Metrics>) -> Self {
        let limiter = NonZeroU32::new(rate).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Arc::new(Limiter {
                rate,
                keyed: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
                metrics,
                logged: Default::default(),
            })
        });
        Self { limiter }
    }
}

impl Limiter {
    /// Counts and logs a refusal, and says why.
    fn over(&self, org: &str) -> Status {
        self.metrics.rate_limited(org);
        let now = Instant::now();
        if let Ok(mut logged) = self.logged.lock() {
            let due = logged
                .get(org)
                .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1));
            if due {
                logged.insert(org.to_string(), now);
                if logged.len() > 10_000 {
                    logged.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
                }
                tracing::warn!(organization = %org, rate = self.rate, "requests over the organization's rate refused");
            }
        }
        Status::resource_exhausted(format!(
            "organization {org} sends more than {} requests per second to this node; slow \
             down and retry (the limit is [limits] requests_per_second_per_organization)",
            self.rate
        ))
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Option<Arc<Limiter>>,
}

impl<S, B> tower::Service<http::Request<B>> for RateLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<
        Ready<Result<Self::Response, Self::Error>>,
        BoxFuture<'static, Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(limiter) = &self.limiter
            && let Some(Ok(Caller::Organization { org_number, .. })) =
                req.extensions().get::<PeerInfo>().map(|i| &i.caller)
            && limiter.keyed.check_key(org_number).is_err()
        {
            return Either::Left(ready(Ok(limiter.over(org_number).into_http())));
        }
        Either::Right(Box::pin(self.inner.call(req)))
    }
}
