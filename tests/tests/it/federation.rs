//! Federation with three or more real nodes on loopback: every region's pointers in
//! one answer, partial answers when regions fail, each region deciding for itself.

use std::time::{Duration, Instant};

use pil_client::v1;
use pil_tests::*;
use tonic::Code;

const VEST: &str = "helse-vest";
const MIDT: &str = "helse-midt";
const NORD: &str = "helse-nord";

/// Three federated regions; the patient has one pointer in each.
async fn three_regions(world: &World) -> (TestNode, TestNode, TestNode, v1::PatientIdentifier) {
    let vest = TestNode::start(world.region_config(VEST)).await;
    let midt = TestNode::start(world.region_config(MIDT)).await;
    let nord = TestNode::start(world.region_config(NORD)).await;
    federate(&[(VEST, &vest), (MIDT, &midt), (NORD, &nord)]);
    let patient = patient_id(900);
    for (n, node) in [&vest, &midt, &nord].into_iter().enumerate() {
        world
            .client(ORG_A, node.addr())
            .await
            .upsert(pointer(&patient, ORG_A, n as u32 + 1, &["medications"]))
            .await
            .unwrap();
    }
    (vest, midt, nord, patient)
}

fn state(r: &v1::LookupResponse, region: &str) -> v1::RegionState {
    let s = r
        .regions
        .iter()
        .find(|s| s.region == region)
        .unwrap_or_else(|| panic!("no status for {region}: {:?}", r.regions));
    v1::RegionState::try_from(s.state).unwrap()
}

fn regions_of(r: &v1::LookupResponse) -> Vec<String> {
    let mut v: Vec<String> = r.pointers.iter().map(|p| p.region.clone()).collect();
    v.sort();
    v
}

/// Audit records of `node` about the lookups of `patient`, read as HOST (auditor).
async fn audit_records(
    world: &World,
    node: &TestNode,
    patient: &v1::PatientIdentifier,
) -> Vec<serde_json::Value> {
    let channel = world.raw_channel(HOST, node.addr()).await;
    let mut audit = v1::audit_service_client::AuditServiceClient::new(channel);
    let r = audit
        .search_audit(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                patient: Some(patient.clone()),
                ..Default::default()
            }),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    r.records
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_returns_every_regions_pointers_each_labelled() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let doctor = world.client(ORG_A, vest.addr()).await;
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(regions_of(&r), [MIDT, NORD, VEST]);
    for region in [VEST, MIDT, NORD] {
        assert_eq!(state(&r, region), v1::RegionState::Ok);
    }

    // Each answering region recorded the lookup under the same query id, and knows
    // which node forwarded it; the home node knows whom it asked.
    let home = audit_records(&world, &vest, &patient).await;
    let home_lookup = home.iter().find(|r| r["action"] == "lookup").unwrap();
    assert_eq!(home_lookup["query_id"], r.query_id.as_str());
    let mut asked: Vec<_> = home_lookup["peers_asked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    asked.sort();
    assert_eq!(asked, [MIDT, NORD]);
    for node in [&midt, &nord] {
        let records = audit_records(&world, node, &patient).await;
        let forwarded: Vec<_> = records
            .iter()
            .filter(|r| r["action"] == "federated_lookup")
            .collect();
        assert_eq!(forwarded.len(), 1, "{records:?}");
        assert_eq!(forwarded[0]["query_id"], r.query_id.as_str());
        assert_eq!(forwarded[0]["forwarded_by"], VEST);
        assert_eq!(forwarded[0]["requester"]["hpr_number"], HPR);
        assert_eq!(forwarded[0]["outcome"]["pointers"], 1);
    }

    // The same endpoint registered in two regions shows once.
    world
        .client(ORG_A, midt.addr())
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let again = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(again.pointers.len(), 3, "{:?}", again.pointers);

    // Home region only.
    let mut home_only = lookup(&patient);
    home_only.home_region_only = true;
    let r = doctor.lookup(home_only).await.unwrap();
    assert_eq!(regions_of(&r), [VEST]);
    assert_eq!(state(&r, MIDT), v1::RegionState::NotAsked);
    assert_eq!(state(&r, NORD), v1::RegionState::NotAsked);
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_region_withholds_the_pointers_its_protections_could_forbid() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let doctor = world.client(ORG_A, vest.addr()).await;
    nord.stop().await;
    let started = Instant::now();
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(state(&r, NORD), v1::RegionState::Unavailable);
    assert_eq!(state(&r, MIDT), v1::RegionState::Ok);
    // Nord may hold a block or an opt-out for this patient: nothing is shown, and the
    // answer says why.
    assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    assert!(r.withheld.contains(NORD), "{}", r.withheld);
    let nord_status = r.regions.iter().find(|s| s.region == NORD).unwrap();
    assert!(
        nord_status.detail.contains("could not be checked"),
        "{nord_status:?}"
    );

    // After repeated failures the dead region is not called at all (circuit open),
    // and `pil peers` shows it.
    for _ in 0..3 {
        doctor.lookup(lookup(&patient)).await.unwrap();
    }
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    let nord_status = r.regions.iter().find(|s| s.region == NORD).unwrap();
    assert!(
        nord_status.detail.contains("circuit open"),
        "{nord_status:?}"
    );
    let mut admin = world.client(OPERATOR, vest.addr()).await.admin();
    let peers = admin
        .list_peers(v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers;
    let by: std::collections::HashMap<_, _> =
        peers.iter().map(|p| (p.region.as_str(), p)).collect();
    assert!(by[MIDT].reachable);
    assert_eq!(by[MIDT].identity, format!("urn:pil:node:{MIDT}"));
    assert!(!by[NORD].reachable);
    assert!(!by[NORD].last_error.is_empty());
    vest.stop().await;
    midt.stop().await;
}

/// A federation endpoint that never answers in time.
struct Slow;

#[tonic::async_trait]
impl v1::federation_service_server::FederationService for Slow {
    async fn forwarded_lookup(
        &self,
        _: tonic::Request<v1::ForwardedLookupRequest>,
    ) -> Result<tonic::Response<v1::ForwardedLookupResponse>, tonic::Status> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err(tonic::Status::internal("too late"))
    }

    async fn forwarded_patient_report(
        &self,
        _: tonic::Request<v1::ForwardedPatientReportRequest>,
    ) -> Result<tonic::Response<v1::ForwardedPatientReportResponse>, tonic::Status> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err(tonic::Status::internal("too late"))
    }

    async fn ping(
        &self,
        _: tonic::Request<v1::PingRequest>,
    ) -> Result<tonic::Response<v1::PingResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::PingResponse {
            region: "helse-sor".into(),
        }))
    }

    async fn evaluate_tokens(
        &self,
        _: tonic::Request<v1::EvaluateTokensRequest>,
    ) -> Result<tonic::Response<v1::EvaluateTokensResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn get_summary(
        &self,
        _: tonic::Request<v1::GetSummaryRequest>,
    ) -> Result<tonic::Response<v1::GetSummaryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn forwarded_subscribe(
        &self,
        _: tonic::Request<v1::ForwardedSubscribeRequest>,
    ) -> Result<tonic::Response<v1::ForwardedSubscribeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn forwarded_pull_events(
        &self,
        _: tonic::Request<v1::ForwardedPullEventsRequest>,
    ) -> Result<tonic::Response<v1::ForwardedPullEventsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn forwarded_protections(
        &self,
        _: tonic::Request<v1::ForwardedProtectionsRequest>,
    ) -> Result<tonic::Response<v1::ForwardedProtectionsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_region_times_out_without_holding_up_the_others() {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    // A slow fourth region, with a real node certificate.
    let sor = world.region_config("helse-sor");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(&sor.tls.cert).unwrap(),
            std::fs::read(&sor.tls.key).unwrap(),
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(&world.ca).unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(v1::federation_service_server::FederationServiceServer::new(
                Slow,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let federation = vest.node.federation();
    let mut config = federation.config().as_ref().clone();
    config.deadline_ms = 1500;
    config.peers.push(peer("helse-sor", addr));
    federation.set(&config).unwrap();

    let doctor = world.client(ORG_A, vest.addr()).await;
    let started = Instant::now();
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(state(&r, "helse-sor"), v1::RegionState::TimedOut);
    for region in [VEST, MIDT, NORD] {
        assert_eq!(state(&r, region), v1::RegionState::Ok);
    }
    // Every other region answered in time, but a protection registered in the slow one
    // could forbid any pointer.
    assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    assert!(r.withheld.contains("helse-sor"), "{}", r.withheld);
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_policy_denies_says_so_while_others_answer() {
    let world = World::new();
    let vest = TestNode::start(world.region_config(VEST)).await;
    let midt_config = world.region_config(MIDT);
    std::fs::write(
        midt_config.legal_config.join("policies/99-closed.cedar"),
        "@id(\"closed\") @legal_basis(\"test\") @explanation(\"closed for maintenance\")\nforbid(principal, action, resource);",
    )
    .unwrap();
    let midt = TestNode::start(midt_config).await;
    let nord = TestNode::start(world.region_config(NORD)).await;
    federate(&[(VEST, &vest), (MIDT, &midt), (NORD, &nord)]);
    let patient = patient_id(901);
    for (n, node) in [&vest, &midt, &nord].into_iter().enumerate() {
        world
            .client(ORG_A, node.addr())
            .await
            .upsert(pointer(&patient, ORG_A, n as u32 + 1, &["medications"]))
            .await
            .unwrap();
    }
    let r = world
        .client(ORG_A, vest.addr())
        .await
        .lookup(lookup(&patient))
        .await
        .unwrap();
    assert_eq!(state(&r, MIDT), v1::RegionState::Denied);
    let midt_status = r.regions.iter().find(|s| s.region == MIDT).unwrap();
    assert!(midt_status.detail.contains("closed"), "{midt_status:?}");
    assert_eq!(regions_of(&r), [NORD, VEST]);
    // Midt logged its refusal.
    let records = audit_records(&world, &midt, &patient).await;
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "federated_lookup" && r["decision"]["outcome"] == "denied"),
        "{records:?}"
    );
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answering_node_checks_forwarded_tokens_itself() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let regions = world.path().join("regions");
    // Calls as node helse-vest, a configured peer of helse-midt.
    let channel = world
        .channel_with(
            midt.addr(),
            regions.join(VEST).join("node.pem"),
            regions.join(VEST).join("node-key.pem"),
        )
        .await;
    let mut federation = v1::federation_service_client::FederationServiceClient::new(channel);
    let issuer = world.issuer();
    let token = || doctor_token(&issuer);
    let forward = |access_token: String| v1::ForwardedLookupRequest {
        lookup: Some(lookup(&patient)),
        access_token,
        query_id: "00112233445566778899aabbccddeeff".into(),
        client_organization_number: ORG_A.into(),
        protections_only: false,
    };
    let good = token().sign().unwrap();
    let answer = federation
        .forwarded_lookup(forward(good.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.pointers.len(), 1);
    assert_eq!(answer.pointers[0].region, MIDT);

    let mut forged = good.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let expired = token()
        .issued_at(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expires_in(Duration::from_secs(60))
        .sign()
        .unwrap();
    let other_org = token().org_parent(ORG_C).sign().unwrap();
    for (what, t) in [
        ("forged", forged),
        ("expired", expired),
        ("another organization", other_org),
        ("none", String::new()),
    ] {
        let err = federation.forwarded_lookup(forward(t)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    }
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_peers_may_call_the_federation_api() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let request = v1::ForwardedLookupRequest {
        lookup: Some(lookup(&patient)),
        access_token: String::new(),
        query_id: String::new(),
        client_organization_number: ORG_A.into(),
        protections_only: false,
    };
    // An organization with a valid certificate.
    let mut as_org = v1::federation_service_client::FederationServiceClient::new(
        world.raw_channel(ORG_A, midt.addr()).await,
    );
    let err = as_org.forwarded_lookup(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A node of a region that is not a peer.
    let sor = world.region_config("helse-sor");
    let mut as_stranger = v1::federation_service_client::FederationServiceClient::new(
        world
            .channel_with(midt.addr(), &sor.tls.cert, &sor.tls.key)
            .await,
    );
    let err = as_stranger.forwarded_lookup(request).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("helse-sor"), "{err:?}");
    // And a node certificate cannot use the client API either.
    let mut lookup_as_node = v1::lookup_service_client::LookupServiceClient::new(
        world
            .channel_with(midt.addr(), &sor.tls.cert, &sor.tls.key)
            .await,
    );
    let err = lookup_as_node.lookup(lookup(&patient)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_lookups_are_not_forwarded_again() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let r = world
        .client(ORG_A, vest.addr())
        .await
        .lookup(lookup(&patient))
        .await
        .unwrap();
    assert_eq!(r.pointers.len(), 3);
    // Each peer was asked exactly once, by the home node, and asked nobody itself.
    for node in [&midt, &nord] {
        let records = audit_records(&world, node, &patient).await;
        let lookups: Vec<_> = records
            .iter()
            .filter(|r| r["action"] == "federated_lookup" || r["action"] == "lookup")
            .collect();
        assert_eq!(lookups.len(), 1, "{records:?}");
        assert_eq!(lookups[0]["forwarded_by"], VEST);
        assert!(lookups[0].get("peers_asked").is_none(), "{:?}", lookups[0]);
    }
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sheds_forwarded_lookups_beyond_its_limit() {
    let world = World::new();
    let nodes = Regions::start(&world, &[VEST, MIDT], |region, config| {
        if region == MIDT {
            config.federation.max_concurrent_forwarded = 1;
        }
    })
    .await;
    let midt = nodes.node(MIDT);
    let patient = patient_id(902);
    let regions = world.path().join("regions");
    let channel = world
        .channel_with(
            midt.addr(),
            regions.join(VEST).join("node.pem"),
            regions.join(VEST).join("node-key.pem"),
        )
        .await;
    let token = doctor_token(&world.issuer()).sign().unwrap();
    let calls = (0..64).map(|_| {
        let mut client =
            v1::federation_service_client::FederationServiceClient::new(channel.clone());
        let request = v1::ForwardedLookupRequest {
            lookup: Some(lookup(&patient)),
            access_token: token.clone(),
            query_id: String::new(),
            client_organization_number: ORG_A.into(),
            protections_only: false,
        };
        async move { client.forwarded_lookup(request).await.map(|_| ()) }
    });
    let results = futures::future::join_all(calls).await;
    let shed = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok + shed, results.len(), "only OK or shed: {results:?}");
    assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_added_and_removed_by_reloading_the_configuration() {
    let world = World::new();
    let midt = TestNode::start(world.region_config(MIDT)).await;
    let mut vest_config = world.region_config(VEST);
    let dir = world.path().join("regions").join(VEST);
    let vest = ProcessNode::start(&vest_config, &dir);
    let patient = patient_id(903);
    for (n, addr) in [vest.addr, midt.addr()].into_iter().enumerate() {
        world
            .client(ORG_A, addr)
            .await
            .upsert(pointer(&patient, ORG_A, n as u32 + 1, &["medications"]))
            .await
            .unwrap();
    }
    // Midt must accept vest as its peer.
    federate_one(&midt, VEST, vest.addr);
    let doctor = world.client(ORG_A, vest.addr).await;
    let mut admin = world.client(OPERATOR, vest.addr).await.admin();
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(regions_of(&r), [VEST]);
    assert_eq!(r.regions.len(), 1);

    // Add midt to vest's configuration file and reload.
    vest_config.listen = vest.addr;
    let reloaded = reload_with_peers(
        &mut admin,
        &mut vest_config,
        &dir,
        vec![peer(MIDT, midt.addr())],
    )
    .await
    .unwrap();
    assert_eq!(reloaded.peers, [MIDT]);
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(regions_of(&r), [MIDT, VEST]);

    // And remove it again.
    reload_with_peers(&mut admin, &mut vest_config, &dir, Vec::new())
        .await
        .unwrap();
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(regions_of(&r), [VEST]);
    assert_eq!(r.regions.len(), 1);
    assert!(vest.terminate().success());
    midt.stop().await;
}

/// A reload checks the peer list and the legal configuration before it applies
/// either: an invalid peer list keeps a valid legal change out of force too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_all_of_its_changes_or_none() {
    let world = World::new();
    let mut vest_config = world.region_config(VEST);
    let dir = world.path().join("regions").join(VEST);
    let vest = ProcessNode::start(&vest_config, &dir);
    vest_config.listen = vest.addr;
    let patient = patient_id(904);
    let doctor = world.client(ORG_A, vest.addr).await;
    doctor
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let mut admin = world.client(OPERATOR, vest.addr).await.admin();

    // A valid legal change, and a peer list naming this node's own region.
    std::fs::write(
        vest_config.legal_config.join("policies").join("99-closed.cedar"),
        "@id(\"closed\") @legal_basis(\"test\") @explanation(\"closed for maintenance\")\nforbid(principal, action, resource);",
    )
    .unwrap();
    let err = reload_with_peers(
        &mut admin,
        &mut vest_config,
        &dir,
        vec![peer(VEST, vest.addr)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("own region"), "{err}");
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(r.pointers.len(), 1, "the legal change must not be in force");

    // With the peer list fixed, the same reload goes through as a whole.
    reload_with_peers(&mut admin, &mut vest_config, &dir, Vec::new())
        .await
        .unwrap();
    let err = doctor.lookup(lookup(&patient)).await.unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(vest.terminate().success());
}

fn federate_one(node: &TestNode, region: &str, addr: std::net::SocketAddr) {
    let federation = node.node.federation();
    let mut config = federation.config().as_ref().clone();
    config.peers.push(peer(region, addr));
    federation.set(&config).unwrap();
}

/// Writes `peers` into the configuration file of the node running from `dir` and asks
/// it to reload.
async fn reload_with_peers(
    admin: &mut v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    config: &mut pil_node::config::NodeConfig,
    dir: &std::path::Path,
    peers: Vec<pil_node::config::PeerConfig>,
) -> Result<v1::ReloadLegalConfigResponse, tonic::Status> {
    config.federation.peers = peers;
    std::fs::write(
        dir.join("node.toml"),
        toml::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    admin
        .reload_legal_config(v1::ReloadLegalConfigRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_presenting_another_regions_certificate_is_not_trusted() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    // Vest is told that helse-midt lives at nord's address.
    let federation = vest.node.federation();
    let mut config = federation.config().as_ref().clone();
    config.peers = vec![peer(MIDT, nord.addr())];
    federation.set(&config).unwrap();
    let r = world
        .client(ORG_A, vest.addr())
        .await
        .lookup(lookup(&patient))
        .await
        .unwrap();
    assert_eq!(state(&r, MIDT), v1::RegionState::Unavailable);
    // What answered as helse-midt is not helse-midt, so its protections are unknown.
    assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    assert!(r.withheld.contains(MIDT), "{}", r.withheld);
    for n in [vest, midt, nord] {
        n.stop().await;
    }
}

/// How many pointers a lookup of `patient` shows `client`.
async fn shown(client: &pil_client::PilClient, patient: &v1::PatientIdentifier) -> usize {
    client.lookup(lookup(patient)).await.unwrap().pointers.len()
}

/// A block on [`HPR`] (optionally for one holder), created by the operator at `node`.
async fn block_hpr(
    world: &World,
    node: &TestNode,
    patient: &v1::PatientIdentifier,
    holder: &str,
) -> String {
    let mut admin = world.client(OPERATOR, node.addr()).await.admin();
    admin
        .create_block(v1::CreateBlockRequest {
            patient: Some(patient.clone()),
            block: Some(v1::Block {
                target: Some(v1::BlockTarget {
                    target: Some(v1::block_target::Target::HprNumber(HPR.into())),
                }),
                holder_organization_number: holder.into(),
                reason: "patient's wish".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .block
        .unwrap()
        .block_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_and_opt_outs_hold_for_every_regions_pointers() {
    let world = World::new();
    let (vest, midt, nord, patient) = three_regions(&world).await;
    let (vest_addr, midt_addr) = (vest.addr(), midt.addr());
    let doctor_at = |addr| world.client(ORG_A, addr);
    let colleague = world
        .client_as(ORG_A, midt_addr, |p| p.hpr = Some("9144900".into()))
        .await;
    let home_only = || {
        let mut r = lookup(&patient);
        r.home_region_only = true;
        r
    };

    // Blocked at helse-vest, for every holder: no region's pointer reaches the
    // professional, whichever region they ask, also for their home region only.
    let block = block_hpr(&world, &vest, &patient, "").await;
    for addr in [vest_addr, midt_addr, nord.addr()] {
        let r = doctor_at(addr)
            .await
            .lookup(lookup(&patient))
            .await
            .unwrap();
        assert!(r.pointers.is_empty(), "{addr}: {:?}", r.pointers);
        assert!(r.withheld.is_empty(), "{}", r.withheld);
        // No region's count hints at what the block hides.
        assert!(
            r.regions.iter().all(|s| s.pointer_count == 0),
            "{:?}",
            r.regions
        );
    }
    let r = doctor_at(midt_addr)
        .await
        .lookup(home_only())
        .await
        .unwrap();
    assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    // The colleague is not blocked.
    assert_eq!(shown(&colleague, &patient).await, 3);
    let mut vest_admin = world.client(OPERATOR, vest_addr).await.admin();
    vest_admin
        .lift_block(v1::LiftBlockRequest {
            patient: Some(patient.clone()),
            block_id: block,
        })
        .await
        .unwrap();

    // Blocked at helse-nord for one holder's pointers: those are hidden everywhere,
    // other holders' stay.
    world
        .client(ORG_B, midt_addr)
        .await
        .upsert(pointer(&patient, ORG_B, 1, &["medications"]))
        .await
        .unwrap();
    block_hpr(&world, &nord, &patient, ORG_B).await;
    for addr in [vest_addr, midt_addr] {
        let r = doctor_at(addr)
            .await
            .lookup(lookup(&patient))
            .await
            .unwrap();
        let holders: Vec<_> = r
            .pointers
            .iter()
            .map(|p| p.holder.as_ref().unwrap().organization_number.clone())
            .collect();
        assert_eq!(holders, [ORG_A; 3], "{addr}");
    }
    assert_eq!(shown(&colleague, &patient).await, 4);

    // Opted out at helse-nord: nothing anywhere, also for the home region only.
    let mut nord_admin = world.client(OPERATOR, nord.addr()).await.admin();
    nord_admin
        .set_opt_out(v1::SetOptOutRequest {
            patient: Some(patient.clone()),
            reason: String::new(),
        })
        .await
        .unwrap();
    for req in [lookup(&patient), home_only()] {
        let r = colleague.lookup(req).await.unwrap();
        assert!(r.opted_out);
        assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    }

    // Helse-nord, which holds the protections, is down: nothing is shown, and the
    // answer says which region could not be checked.
    nord.stop().await;
    let r = colleague.lookup(lookup(&patient)).await.unwrap();
    assert!(r.pointers.is_empty(), "{:?}", r.pointers);
    assert!(r.withheld.contains(NORD), "{}", r.withheld);
    let r = colleague.lookup(home_only()).await.unwrap();
    assert!(r.pointers.is_empty() && r.withheld.contains(NORD), "{r:?}");

    // Unless the legal configuration lets emergency lookups through, naming why.
    let emergency = world
        .client_as(ORG_A, midt_addr, |p| {
            p.hpr = Some("9144900".into());
            p.purpose = "ETREAT".into();
        })
        .await;
    assert!(
        emergency
            .lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .is_empty()
    );
    let settings = world
        .path()
        .join("regions")
        .join(MIDT)
        .join("legal-config/node.toml");
    let text = std::fs::read_to_string(&settings).unwrap();
    let text = text
        .replace(
            "emergency_shows_unchecked = false",
            "emergency_shows_unchecked = true",
        )
        .replace(
            "emergency_legal_basis = \"\"",
            "emergency_legal_basis = \"helsepersonelloven § 7\"",
        );
    std::fs::write(&settings, text).unwrap();
    midt.node.reloader().reload().await.expect("reload");
    let r = emergency.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(r.pointers.len(), 3, "{r:?}");
    assert!(r.withheld.is_empty());
    let rule = r
        .rules
        .iter()
        .find(|r| r.id == "emergency-shows-unchecked-protections")
        .expect("the exception is named");
    assert_eq!(rule.legal_basis, "helsepersonelloven § 7");
    // Other purposes stay withheld.
    assert!(
        colleague
            .lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .is_empty()
    );
    vest.stop().await;
    midt.stop().await;
}
