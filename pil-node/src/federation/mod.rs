//! Federation with other regions' nodes: who the peers are, calling them in parallel
//! under one deadline, and not hammering the ones that are down.
//!
//! Pointers never leave their region except inside one answer: a client's lookup is
//! forwarded to every peer with the requester's token, each peer decides under its own
//! legal configuration, and the home node merges what comes back.

mod breaker;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pil_proto::v1::{self, federation_service_client::FederationServiceClient};
use tonic::transport::{Channel, Endpoint};

pub use breaker::{Breaker, BreakerState};

use crate::{
    config::{FederationConfig, PeerConfig, TlsConfig},
    error::status_name,
    in_force::InForce,
};

/// Opens TCP and TLS to one peer, checking its node certificate.
#[derive(Clone)]
struct PeerConnector {
    address: String,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

type PeerIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for PeerConnector {
    type Response = PeerIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<PeerIo, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// How one peer fared in answering a lookup.
#[derive(Debug)]
pub enum PeerOutcome {
    Answered(v1::ForwardedLookupResponse),
    /// Asked for the patient's protections only; why its pointers were not asked for.
    Protections(v1::ForwardedLookupResponse, String),
    Denied(String),
    TimedOut,
    Unavailable(String),
    NotAsked(String),
    /// Not asked: routing found it holds nothing about the patient.
    HoldsNothing(String),
}

impl PeerOutcome {
    /// Its name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            PeerOutcome::Answered(_) => "answered",
            PeerOutcome::Protections(..) => "protections_only",
            PeerOutcome::Denied(_) => "denied",
            PeerOutcome::TimedOut => "timed_out",
            PeerOutcome::Unavailable(_) => "unavailable",
            PeerOutcome::NotAsked(_) => "not_asked",
            PeerOutcome::HoldsNothing(_) => "holds_nothing",
        }
    }
}

/// A peer as this node sees it, for `pil peers`.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub config: PeerConfig,
    pub breaker: BreakerState,
    pub last_latency: Option<Duration>,
    pub last_error: Option<String>,
    pub last_success: Option<Instant>,
}

struct Peer {
    config: PeerConfig,
    client: FederationServiceClient<Channel>,
    health: Mutex<Health>,
}

struct Health {
    breaker: Breaker,
    last_latency: Option<Duration>,
    last_error: Option<String>,
    last_success: Option<Instant>,
}

/// A checked peer list with its clients, ready for [`Federation::install`].
pub struct PreparedPeers {
    peers: Vec<Arc<Peer>>,
    config: FederationConfig,
}

/// The node's peers and how to reach them. Reloadable.
pub struct Federation {
    config: InForce<FederationConfig>,
    peers: InForce<Vec<Arc<Peer>>>,
    tls: TlsConfig,
    region: String,
}

/// Why a call to one peer did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerCallError {
    /// It answered, refusing: asking again the same way will not help.
    #[error("refused: {0}")]
    Refused(String),
    /// It could not be reached or did not answer in time: ask again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Why the peers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("federation: {0}")]
    Config(String),
}

impl Federation {
    pub fn new(
        config: &FederationConfig,
        tls: &TlsConfig,
        region: &str,
    ) -> Result<Self, FederationError> {
        let this = Self {
            config: InForce::new(config.clone()),
            peers: InForce::new(Vec::new()),
            tls: tls.clone(),
            region: region.to_string(),
        };
        this.set(config)?;
        Ok(this)
    }

    /// Replaces the peer list. Peers whose settings did not change keep their
    /// connection and circuit state.
    pub fn set(&self, config: &FederationConfig) -> Result<(), FederationError> {
        let prepared = self.prepare(config)?;
        self.install(prepared);
        Ok(())
    }

    /// Checks a peer list and builds its clients without putting it in force, so a
    /// reload can check everything before it changes anything.
    pub fn prepare(&self, config: &FederationConfig) -> Result<PreparedPeers, FederationError> {
        let mut seen = std::collections::BTreeSet::new();
        for p in &config.peers {
            if !crate::identity::is_valid_region_id(&p.region) {
                return Err(FederationError::Config(format!(
                    "peer region {:?} is not a valid region id",
                    p.region
                )));
            }
            if p.region == self.region {
                return Err(FederationError::Config(format!(
                    "peer {:?} is this node's own region",
                    p.region
                )));
            }
            if !seen.insert(p.region.clone()) {
                return Err(FederationError::Config(format!(
                    "peer region {:?} is listed twice",
                    p.region
                )));
            }
        }
        let old = self.peers();
        let mut peers = Vec::with_capacity(config.peers.len());
        for p in &config.peers {
            if let Some(kept) = old.iter().find(|o| o.config == *p) {
                peers.push(kept.clone());
                continue;
            }
            let client = self.client_for(p)?;
            peers.push(Arc::new(Peer {
                config: p.clone(),
                client,
                health: Mutex::new(Health {
                    breaker: Breaker::new(
                        config.breaker_failures,
                        Duration::from_millis(config.breaker_cooldown_ms),
                    ),
                    last_latency: None,
                    last_error: None,
                    last_success: None,
                }),
            }));
        }
        Ok(PreparedPeers {
            peers,
            config: config.clone(),
        })
    }

    /// Puts a prepared peer list in force.
    pub fn install(&self, prepared: PreparedPeers) {
        self.peers.set(prepared.peers);
        self.config.set(prepared.config);
    }

    fn client_for(
        &self,
        p: &PeerConfig,
    ) -> Result<FederationServiceClient<Channel>, FederationError> {
        let config = crate::tls::peer_client_config(&self.tls, &p.region)
            .map_err(|e| FederationError::Config(format!("peer {}: {e}", p.region)))?;
        let server_name = rustls::pki_types::ServerName::try_from(p.server_name.clone())
            .map_err(|e| FederationError::Config(format!("peer {}: server_name: {e}", p.region)))?;
        let connector = PeerConnector {
            address: p.address.clone(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(config),
        };
        // TLS is done by the connector (to check the peer's node identity); the URI
        // only names the peer.
        let endpoint = Endpoint::from_shared(format!("http://{}", p.address))
            .map_err(|e| FederationError::Config(format!("peer {}: address: {e}", p.region)))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        Ok(FederationServiceClient::new(
            endpoint.connect_with_connector_lazy(connector),
        ))
    }

    fn peers(&self) -> Arc<Vec<Arc<Peer>>> {
        self.peers.get()
    }

    pub fn config(&self) -> Arc<FederationConfig> {
        self.config.get()
    }

    /// Whether `region` is a configured peer.
    pub fn is_peer(&self, region: &str) -> bool {
        self.peers().iter().any(|p| p.config.region == region)
    }

    /// The peers with their state.
    pub fn view(&self) -> Vec<PeerView> {
        self.peers()
            .iter()
            .map(|p| {
                let h = p.health.lock().unwrap_or_else(|e| e.into_inner());
                PeerView {
                    config: p.config.clone(),
                    breaker: h.breaker.state(Instant::now()),
                    last_latency: h.last_latency,
                    last_error: h.last_error.clone(),
                    last_success: h.last_success,
                }
            })
            .collect()
    }

    /// Pings every peer in parallel; a successful ping counts as a success for its
    /// circuit (so a recovered peer closes it).
    pub async fn ping_all(&self, timeout: Duration) -> Vec<(PeerView, Result<Duration, String>)> {
        let peers = self.peers();
        let pings = peers.iter().map(|peer| async move {
            let mut client = peer.client.clone();
            let started = Instant::now();
            let mut req = tonic::Request::new(v1::PingRequest {});
            req.set_timeout(timeout);
            let result = match tokio::time::timeout(timeout, client.ping(req)).await {
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                Ok(Err(status)) => Err(format!(
                    "{}: {}",
                    status_name(status.code()),
                    status.message()
                )),
                Ok(Ok(resp)) if resp.get_ref().region != peer.config.region => {
                    Err(format!("answered as region {:?}", resp.get_ref().region))
                }
                Ok(Ok(_)) => Ok(started.elapsed()),
            };
            {
                let mut h = peer.health.lock().unwrap_or_else(|e| e.into_inner());
                match &result {
                    Ok(rtt) => {
                        h.breaker.success();
                        h.last_latency = Some(*rtt);
                        h.last_success = Some(Instant::now());
                    }
                    Err(e) => h.last_error = Some(e.clone()),
                }
            }
            result
        });
        let results = futures::future::join_all(pings).await;
        self.view().into_iter().zip(results).collect()
    }

    /// The configured peers' regions.
    pub fn regions(&self) -> Vec<String> {
        self.peers()
            .iter()
            .map(|p| p.config.region.clone())
            .collect()
    }

    /// Sends `message` to the peer of `region` once (through `f`), within `deadline`;
    /// a failure says what happened.
    async fn call<M, T, F, Fut>(
        &self,
        region: &str,
        deadline: Duration,
        message: M,
        f: F,
    ) -> Result<T, PeerCallError>
    where
        F: FnOnce(FederationServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let peer = self
            .peers()
            .iter()
            .find(|p| p.config.region == region)
            .cloned()
            .ok_or_else(|| {
                PeerCallError::Unavailable(format!("{region} is not a configured peer"))
            })?;
        let mut req = tonic::Request::new(message);
        req.set_timeout(deadline);
        match tokio::time::timeout(deadline, f(peer.client.clone(), req)).await {
            Err(_) => Err(PeerCallError::Unavailable(format!(
                "no answer within {} ms",
                deadline.as_millis()
            ))),
            Ok(Err(status)) => {
                let why = format!("{}: {}", status_name(status.code()), status.message());
                Err(match status.code() {
                    tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition => PeerCallError::Refused(why),
                    _ => PeerCallError::Unavailable(why),
                })
            }
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    /// Has `region` evaluate blinded routing tokens.
    pub async fn evaluate_at(
        &self,
        region: &str,
        request: v1::EvaluateTokensRequest,
        deadline: Duration,
    ) -> Result<v1::EvaluateTokensResponse, PeerCallError> {
        self.call(region, deadline, request, |mut c, req| async move {
            c.evaluate_tokens(req).await
        })
        .await
    }

    /// `region`'s routing summary, after what this node holds of it.
    pub async fn summary_of(
        &self,
        region: &str,
        request: v1::GetSummaryRequest,
        deadline: Duration,
    ) -> Result<v1::GetSummaryResponse, PeerCallError> {
        self.call(region, deadline, request, |mut c, req| async move {
            c.get_summary(req).await
        })
        .await
    }

    /// Registers, renews or ends a subscription at `region`.
    pub async fn subscribe_at(
        &self,
        region: &str,
        request: v1::ForwardedSubscribeRequest,
        deadline: Duration,
    ) -> Result<v1::ForwardedSubscribeResponse, PeerCallError> {
        self.call(region, deadline, request, |mut c, req| async move {
            c.forwarded_subscribe(req).await
        })
        .await
    }

    /// The events `region` holds for this node's subscriptions after the positions given.
    pub async fn pull_from(
        &self,
        region: &str,
        request: v1::ForwardedPullEventsRequest,
        deadline: Duration,
    ) -> Result<v1::ForwardedPullEventsResponse, PeerCallError> {
        self.call(region, deadline, request, |mut c, req| async move {
            c.forwarded_pull_events(req).await
        })
        .await
    }

    /// Peers' protections for the patients of one delivery, each peer asked for its
    /// own list, in parallel.
    pub async fn protections_from(
        &self,
        asks: Vec<(String, v1::ForwardedProtectionsRequest)>,
        deadline: Duration,
    ) -> Vec<(
        String,
        Result<v1::ForwardedProtectionsResponse, PeerCallError>,
    )> {
        let calls = asks.into_iter().map(|(region, request)| async move {
            let answer = self
                .call(&region, deadline, request, |mut c, req| async move {
                    c.forwarded_protections(req).await
                })
                .await;
            (region, answer)
        });
        futures::future::join_all(calls).await
    }

    /// Asks every peer for its part of a patient's access report.
    pub async fn patient_reports(
        &self,
        request: v1::ForwardedPatientReportRequest,
        deadline: Duration,
    ) -> Vec<(String, Result<Vec<Vec<u8>>, String>)> {
        let peers = self.peers();
        let calls =
            peers.iter().map(|peer| {
                let request = request.clone();
                async move {
                    let mut client = peer.client.clone();
                    let mut req = tonic::Request::new(request);
                    req.set_timeout(deadline);
                    let result =
                        match tokio::time::timeout(deadline, client.forwarded_patient_report(req))
                            .await
                        {
                            Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
                            Ok(Err(status)) => Err(format!(
                                "{}: {}",
                                status_name(status.code()),
                                status.message()
                            )),
                            Ok(Ok(resp)) => Ok(resp.into_inner().records),
                        };
                    (peer.config.region.clone(), result)
                }
            });
        futures::future::join_all(calls).await
    }

    /// Asks every peer in parallel; each gets at most `deadline`. `ask` false lists them
    /// all as not asked; a peer in `skip` (routing found it holds nothing about the
    /// patient) is not asked, for the reason given. With `pointers` false, or for a
    /// peer that does not take `purpose`, only the patient's protections are asked
    /// for: they hold for every region's pointers.
    pub async fn fan_out(
        &self,
        request: v1::ForwardedLookupRequest,
        purpose: &str,
        deadline: Duration,
        ask: bool,
        pointers: bool,
        skip: &std::collections::HashMap<String, String>,
    ) -> Vec<(String, PeerOutcome, Option<Duration>)> {
        let peers = self.peers();
        let calls = peers.iter().map(|peer| {
            let mut request = request.clone();
            let peer = peer.clone();
            let skipped = skip.get(&peer.config.region).cloned();
            async move {
                let region = peer.config.region.clone();
                if !ask {
                    return (
                        region,
                        PeerOutcome::NotAsked("the patient has opted out of PIL".into()),
                        None,
                    );
                }
                if let Some(why) = skipped {
                    return (region, PeerOutcome::HoldsNothing(why), None);
                }
                let takes_purpose = peer.config.purposes.is_empty()
                    || peer
                        .config
                        .purposes
                        .iter()
                        .any(|p| p.eq_ignore_ascii_case(purpose));
                let only_protections = match (pointers, takes_purpose) {
                    (false, _) => Some("the client asked for its home region only".to_string()),
                    (true, false) => Some(format!(
                        "purpose {purpose} is not forwarded to this region; only its \
                         protections were asked for"
                    )),
                    (true, true) => None,
                };
                request.protections_only = only_protections.is_some();
                let now = Instant::now();
                if let Err(retry_in) = peer
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .breaker
                    .allow(now)
                {
                    return (
                        region,
                        PeerOutcome::Unavailable(format!(
                            "not called: circuit open after repeated failures, next try in {} ms",
                            retry_in.as_millis()
                        )),
                        None,
                    );
                }
                let mut client = peer.client.clone();
                let mut req = tonic::Request::new(request);
                req.set_timeout(deadline);
                let started = Instant::now();
                let result = tokio::time::timeout(deadline, client.forwarded_lookup(req)).await;
                let elapsed = started.elapsed();
                let outcome = match result {
                    Err(_) => PeerOutcome::TimedOut,
                    Ok(Ok(resp)) => match only_protections {
                        Some(why) => PeerOutcome::Protections(resp.into_inner(), why),
                        None => PeerOutcome::Answered(resp.into_inner()),
                    },
                    Ok(Err(status)) => match status.code() {
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                            PeerOutcome::Denied(status.message().to_string())
                        }
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                            PeerOutcome::TimedOut
                        }
                        _ => PeerOutcome::Unavailable(format!(
                            "{}: {}",
                            status_name(status.code()),
                            status.message()
                        )),
                    },
                };
                let mut h = peer.health.lock().unwrap_or_else(|e| e.into_inner());
                match &outcome {
                    PeerOutcome::Answered(_)
                    | PeerOutcome::Protections(..)
                    | PeerOutcome::Denied(_) => {
                        h.breaker.success();
                        h.last_latency = Some(elapsed);
                        h.last_success = Some(Instant::now());
                    }
                    PeerOutcome::TimedOut => {
                        h.breaker.failure(Instant::now());
                        h.last_error = Some(format!("timed out after {} ms", elapsed.as_millis()));
                    }
                    PeerOutcome::Unavailable(e) => {
                        h.breaker.failure(Instant::now());
                        h.last_error = Some(e.clone());
                    }
                    PeerOutcome::NotAsked(_) | PeerOutcome::HoldsNothing(_) => {}
                }
                drop(h);
                (region, outcome, Some(elapsed))
            }
        });
        futures::future::join_all(calls).await
    }
}
