//! Privacy-preserving routing with real regions: a lookup asks only the regions whose
//! summaries may hold the patient, a region that holds nothing never learns of the
//! lookup, a new pointer is routable within the staleness bound, a region whose
//! summary is stale or missing is asked, and what a peer is sent cannot be tested
//! offline.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use pil_client::v1;
use pil_tests::*;

const VEST: &str = "helse-vest";
const MIDT: &str = "helse-midt";
const NORD: &str = "helse-nord";
/// The staleness bound the tests' regions trust summaries for.
const BOUND_MS: u64 = 2000;

fn state(r: &v1::LookupResponse, region: &str) -> (v1::RegionState, String) {
    let s = r
        .regions
        .iter()
        .find(|s| s.region == region)
        .unwrap_or_else(|| panic!("no status for {region}: {:?}", r.regions));
    (
        v1::RegionState::try_from(s.state).unwrap(),
        s.detail.clone(),
    )
}

/// The summaries `node` holds of its peers, as `pil peers` shows them.
async fn summaries(world: &World, addr: SocketAddr) -> Vec<(String, v1::PeerSummary)> {
    let mut admin = world.client(OPERATOR, addr).await.admin();
    admin
        .list_peers(v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers
        .into_iter()
        .map(|p| (p.region, p.summary.unwrap_or_default()))
        .collect()
}

/// Waits until `addr` holds a fresh summary of each of `peers` covering at least the
/// patients given.
async fn wait_fresh(world: &World, addr: SocketAddr, peers: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = summaries(world, addr).await;
        let ready = peers.iter().all(|(region, patients)| {
            held.iter()
                .any(|(r, s)| r == region && s.state == "fresh" && s.patients >= *patients)
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "summaries not fresh: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every audit record of `addr`'s log, newest first, as JSON, but those of reading
/// the log itself (the test's own reads).
async fn all_audit_records(world: &World, addr: SocketAddr) -> Vec<serde_json::Value> {
    let channel = world.raw_channel(HOST, addr).await;
    let mut audit = v1::audit_service_client::AuditServiceClient::new(channel);
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = audit
            .search_audit(v1::SearchAuditRequest {
                filter: Some(v1::AuditFilter::default()),
                page_size: 500,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(
            r.records
                .iter()
                .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap())
                .filter(|r| r["action"] != "audit_access"),
        );
        if r.next_page_token.is_empty() {
            return out;
        }
        page_token = r.next_page_token;
    }
}

/// The sample of `series` in a metrics text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Vest and Midt in this process; Nord a real `pil-node serve` logging everything at
/// debug level in JSON, with a metrics listener: what its operator would have.
struct ThreeRegions {
    vest: TestNode,
    midt: TestNode,
    nord: ProcessNode,
    nord_metrics: SocketAddr,
}

async fn three_regions(world: &World, nord_routes: bool) -> ThreeRegions {
    let mut vest_config = world.routed_region_config(VEST, BOUND_MS);
    vest_config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let vest = TestNode::start(vest_config).await;
    let midt = TestNode::start(world.routed_region_config(MIDT, BOUND_MS)).await;
    let base = three_free_ports();
    let nord_addr: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let nord_metrics: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let mut config = if nord_routes {
        world.routed_region_config(NORD, BOUND_MS)
    } else {
        world.region_config(NORD)
    };
    config.listen = nord_addr;
    config.metrics.listen = Some(nord_metrics);
    config.log.filter = "debug".into();
    config.federation.peers = vec![peer(VEST, vest.addr()), peer(MIDT, midt.addr())];
    let dir = world.path().join("nord-node");
    std::fs::create_dir_all(&dir).unwrap();
    let nord = ProcessNode::start(&config, &dir);
    for (node, others) in [
        (&vest, [(MIDT, midt.addr()), (NORD, nord_addr)]),
        (&midt, [(VEST, vest.addr()), (NORD, nord_addr)]),
    ] {
        let mut f = node.node.federation().config().as_ref().clone();
        f.peers = others.iter().map(|(r, a)| peer(r, *a)).collect();
        node.node.federation().set(&f).unwrap();
    }
    ThreeRegions {
        vest,
        midt,
        nord,
        nord_metrics,
    }
}

/// A patient with a pointer only in Midt, looked up at Vest: Midt is asked and
/// answers; Nord, whose summary says it holds nothing about the patient, is not
/// asked, and its audit log, its logs (at debug level) and its metrics hold no sign
/// of the patient or the lookup. A region holding only the patient's opt-out is
/// asked, and honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_holds_nothing_about_the_patient_never_learns_of_the_lookup() {
    let world = World::new();
    let regions = three_regions(&world, true).await;
    let (vest, midt) = (regions.vest.addr(), regions.midt.addr());
    let nord = regions.nord.addr;
    let patient = patient_id(4100);
    world
        .client(ORG_A, midt)
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    // Nord holds someone else, so its summary is not empty.
    let other = patient_id(4101);
    world
        .client(ORG_A, nord)
        .await
        .upsert(pointer(&other, ORG_A, 2, &["medications"]))
        .await
        .unwrap();
    wait_fresh(&world, vest, &[(MIDT, 1), (NORD, 1)]).await;

    let records_before = all_audit_records(&world, nord).await.len();
    let log_before = regions.nord.log_text().len();
    let (_, metrics_before) = http_get(regions.nord_metrics, "/metrics").await;

    let found = world
        .client(ORG_A, vest)
        .await
        .lookup(lookup(&patient))
        .await
        .unwrap();
    assert_eq!(found.pointers.len(), 1, "{found:?}");
    assert_eq!(found.pointers[0].region, MIDT);
    assert_eq!(state(&found, MIDT).0, v1::RegionState::Ok);
    let (nord_state, why) = state(&found, NORD);
    assert_eq!(nord_state, v1::RegionState::HoldsNothing, "{why}");
    assert!(why.contains("holds nothing about the patient"), "{why}");
    assert!(why.contains(&format!("trusted for {BOUND_MS} ms")), "{why}");

    // Nord's audit log gained nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = all_audit_records(&world, nord).await;
    assert_eq!(records.len(), records_before, "{:?}", &records[..1]);
    assert!(
        !records
            .iter()
            .any(|r| r["query_id"] == found.query_id.as_str()),
        "Nord recorded the lookup"
    );
    // Nor did its logs, at debug level: neither the identifier nor the query id.
    let log = regions.nord.log_text();
    let since = &log[log_before..];
    assert!(!since.contains(&patient.value), "{since}");
    assert!(!since.contains(&found.query_id), "{since}");
    assert!(!since.to_lowercase().contains("lookup"), "{since}");
    // Its metrics count no forwarded lookup and no patient-related call; what it
    // served is one blinded token evaluation, which names no one.
    let (_, metrics_after) = http_get(regions.nord_metrics, "/metrics").await;
    let forwarded = r#"grpc_server_started_total{grpc_type="unary",grpc_service="pil.v1.FederationService",grpc_method="ForwardedLookup"}"#;
    assert_eq!(sample(&metrics_before, forwarded), 0.0);
    assert_eq!(sample(&metrics_after, forwarded), 0.0);
    assert!(!metrics_after.contains(&patient.value));
    let evaluated = format!(r#"pil_routing_tokens_evaluated_total{{peer="{VEST}"}}"#);
    assert_eq!(
        sample(&metrics_after, &evaluated) - sample(&metrics_before, &evaluated),
        1.0
    );
    // Midt, which holds the pointer, recorded the lookup under its query id.
    let at_midt = all_audit_records(&world, midt).await;
    assert!(
        at_midt
            .iter()
            .any(|r| r["action"] == "federated_lookup" && r["query_id"] == found.query_id.as_str()),
        "{at_midt:?}"
    );
    // The home node counted its routing decisions.
    let (_, home_metrics) = http_get(regions.vest.node.metrics_addr().unwrap(), "/metrics").await;
    assert!(
        home_metrics.contains(&format!(
            r#"pil_routing_decisions_total{{peer="{NORD}",route="holds_nothing"}} 1"#
        )),
        "{home_metrics}"
    );

    // A patient whose only entry anywhere is an opt-out in Nord: Nord is asked, and
    // the opt-out holds for Midt's pointer too.
    let opted = patient_id(4102);
    world
        .client(ORG_A, midt)
        .await
        .upsert(pointer(&opted, ORG_A, 3, &["medications"]))
        .await
        .unwrap();
    world
        .client(OPERATOR, nord)
        .await
        .set_opt_out(opted.clone(), "the patient asked")
        .await
        .unwrap();
    wait_fresh(&world, vest, &[(MIDT, 2), (NORD, 2)]).await;
    let out = world
        .client(ORG_A, vest)
        .await
        .lookup(lookup(&opted))
        .await
        .unwrap();
    assert!(out.opted_out, "{out:?}");
    assert!(out.pointers.is_empty(), "{out:?}");
    assert_eq!(state(&out, NORD).0, v1::RegionState::Ok);

    // `all_regions` asks every region whatever the summaries say.
    let all = world
        .client(ORG_A, vest)
        .await
        .lookup(v1::LookupRequest {
            all_regions: true,
            ..lookup(&patient)
        })
        .await
        .unwrap();
    assert_eq!(state(&all, NORD).0, v1::RegionState::Ok);
    regions.vest.stop().await;
    regions.midt.stop().await;
}

/// Under continuous registrations in Midt, every pointer acknowledged longer ago than
/// the staleness bound is found by a lookup at Vest (most much sooner), and patients
/// Midt does not hold are not asked of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pointer_is_routable_within_the_bound_under_continuous_registrations() {
    let world = World::new();
    let regions = Regions::start(&world, &[VEST, MIDT], |region, c| {
        *c = world.routed_region_config(region, BOUND_MS);
    })
    .await;
    let (vest, midt) = (regions.node(VEST).addr(), regions.node(MIDT).addr());
    wait_fresh(&world, vest, &[(MIDT, 0)]).await;
    let holder = world.client(ORG_A, midt).await;
    let doctor = world.client(ORG_A, vest).await;
    let registered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, Instant)>::new()));
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let registered = registered.clone();
        let writing = writing.clone();
        async move {
            for i in 0..120u64 {
                let p = patient_id(5000 + i);
                holder
                    .upsert(pointer(&p, ORG_A, 1, &["medications"]))
                    .await
                    .unwrap();
                registered.lock().unwrap().push((i, Instant::now()));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let bound = Duration::from_millis(BOUND_MS);
    let reader = {
        let registered = registered.clone();
        let doctor = &doctor;
        async move {
            let mut found_after = Vec::new();
            let mut checked_past_bound = 0;
            let mut n = 0usize;
            // While registrations go on: in turn one of the newest, and one acknowledged
            // longer than the bound ago.
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let snapshot = registered.lock().unwrap().clone();
                let old: Vec<&(u64, Instant)> = snapshot
                    .iter()
                    .filter(|(_, t)| t.elapsed() >= bound)
                    .collect();
                let pick = if n.is_multiple_of(2) && !old.is_empty() {
                    Some(*old[(n / 2) % old.len()])
                } else {
                    snapshot
                        .iter()
                        .rev()
                        .nth(n % 7.min(snapshot.len().max(1)))
                        .copied()
                };
                let Some((i, acked)) = pick else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let r = doctor.lookup(lookup(&patient_id(5000 + i))).await.unwrap();
                let age = acked.elapsed();
                if r.pointers.len() == 1 {
                    found_after.push(age);
                } else {
                    assert!(
                        age < bound,
                        "patient {i} acknowledged {age:?} ago not found: {:?}",
                        r.regions
                    );
                }
                if age >= bound {
                    checked_past_bound += 1;
                }
            }
            (found_after, checked_past_bound)
        }
    };
    let ((), (found_after, checked)) = tokio::join!(writer, reader);
    assert!(
        checked > 0,
        "no lookup was of a pointer older than the bound"
    );
    assert!(found_after.len() > 20, "{} found", found_after.len());
    // Every patient registered, now well past the bound, is found.
    tokio::time::sleep(bound).await;
    for i in 0..120u64 {
        let r = doctor.lookup(lookup(&patient_id(5000 + i))).await.unwrap();
        assert_eq!(r.pointers.len(), 1, "patient {i}: {:?}", r.regions);
    }
    // Patients Midt never held: it is not asked (up to the false-positive rate).
    let mut skipped = 0;
    for i in 0..50u64 {
        let r = doctor.lookup(lookup(&patient_id(9000 + i))).await.unwrap();
        if state(&r, MIDT).0 == v1::RegionState::HoldsNothing {
            skipped += 1;
        }
    }
    assert!(skipped >= 49, "only {skipped} of 50 not asked");
    regions.stop().await;
}

/// A peer whose summary is older than the bound, or that publishes none, or that
/// cannot be reached, is asked (or reported unavailable), never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_missing_or_unreachable_summary_means_the_region_is_asked() {
    let world = World::new();
    let regions = three_regions(&world, false).await;
    let (vest, midt, nord) = (regions.vest.addr(), regions.midt.addr(), regions.nord.addr);
    let patient = patient_id(4200);
    for (n, addr) in [(1, midt), (2, nord)] {
        world
            .client(ORG_A, addr)
            .await
            .upsert(pointer(&patient, ORG_A, n, &["medications"]))
            .await
            .unwrap();
    }
    wait_fresh(&world, vest, &[(MIDT, 1)]).await;
    // Nord publishes no summary: asked, and found.
    let held = summaries(&world, vest).await;
    let nord_summary = &held.iter().find(|(r, _)| r == NORD).unwrap().1;
    assert_eq!(nord_summary.state, "none", "{nord_summary:?}");
    assert!(
        nord_summary.detail.contains("publishes no routing summary"),
        "{nord_summary:?}"
    );
    let doctor = world.client(ORG_A, vest).await;
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(r.pointers.len(), 2, "{r:?}");

    // A bound of 0 makes every summary stale: Midt is asked about a patient it does
    // not hold, instead of skipped.
    let unknown = patient_id(4201);
    let skipped = doctor.lookup(lookup(&unknown)).await.unwrap();
    assert_eq!(state(&skipped, MIDT).0, v1::RegionState::HoldsNothing);
    let mut f = regions.vest.node.federation().config().as_ref().clone();
    f.summary_staleness_bound_ms = 0;
    regions.vest.node.federation().set(&f).unwrap();
    let asked = doctor.lookup(lookup(&unknown)).await.unwrap();
    assert_eq!(state(&asked, MIDT).0, v1::RegionState::Ok, "{asked:?}");
    let held = summaries(&world, vest).await;
    assert_eq!(
        held.iter().find(|(r, _)| r == MIDT).unwrap().1.state,
        "stale"
    );
    f.summary_staleness_bound_ms = BOUND_MS;
    regions.vest.node.federation().set(&f).unwrap();

    // Midt stops: its summary goes stale within the bound, and Midt is then asked
    // (and reported unavailable) rather than skipped.
    regions.midt.stop().await;
    tokio::time::sleep(Duration::from_millis(BOUND_MS + 300)).await;
    let r = doctor.lookup(lookup(&unknown)).await.unwrap();
    let (midt_state, why) = state(&r, MIDT);
    assert!(
        matches!(
            midt_state,
            v1::RegionState::Unavailable | v1::RegionState::TimedOut
        ),
        "{midt_state:?}: {why}"
    );
    regions.vest.stop().await;
}

/// What a peer's operator holds — the summary it is sent, and the evaluation it may
/// ask for — does not let it list the region's patients: the filter cannot be tested
/// without the region's key, and evaluations are rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holds_nothing_it_could_test_identifiers_against() {
    let world = World::new();
    let regions = three_regions(&world, true).await;
    let nord = regions.nord.addr;
    let holder = world.client(ORG_A, nord).await;
    for i in 0..300u64 {
        holder
            .upsert(pointer(&patient_id(6000 + i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    // As Vest's node: everything Vest's operator could get from Nord.
    let vest_dir = world.path().join("regions").join(VEST);
    let channel = world
        .channel_with(
            nord,
            vest_dir.join("node.pem"),
            vest_dir.join("node-key.pem"),
        )
        .await;
    let mut fed = v1::federation_service_client::FederationServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(20);
    let summary = loop {
        let s = fed
            .get_summary(v1::GetSummaryRequest::default())
            .await
            .map(|r| r.into_inner());
        match s {
            Ok(s) if s.patients + s.added.len() as u64 >= 300 => break s,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("no summary: {other:?}"),
        }
    };
    let filter =
        pil_node::routing::summary::Summary::decode(&summary.filter, summary.patients as usize, 0)
            .unwrap();
    let mut held = filter;
    held.add(summary.added.iter().copied(), 0);
    // Every way to make a token without Nord's key finds no more than chance would.
    let own = pil_node::routing::tokens::RoutingKey::from_seed(&[42; 32]).unwrap();
    let mut found = 0;
    for i in 0..5000u64 {
        let p = pil_proto::ident::PatientId::parse(
            pil_proto::ident::SYSTEM_FNR,
            &patient_id(6000 + i).value,
            true,
        )
        .unwrap();
        let hashed = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(p.value().as_bytes());
            u64::from_be_bytes(d[..8].try_into().unwrap())
        };
        found +=
            usize::from(held.may_hold(hashed)) + usize::from(held.may_hold(own.token(&p).unwrap()));
    }
    assert!(found <= 3, "{found} of 10,000 guesses matched");
    // Testing through Nord takes its cooperation, one identifier per evaluation, at
    // its rate: a burst beyond it is refused.
    let blinded: Vec<Vec<u8>> = (0..256)
        .map(|i| {
            let p = pil_proto::ident::PatientId::parse(
                pil_proto::ident::SYSTEM_FNR,
                &patient_id(7000 + i).value,
                true,
            )
            .unwrap();
            pil_node::routing::tokens::blind(&p).unwrap().1
        })
        .collect();
    let mut refused = None;
    for _ in 0..4 {
        if let Err(e) = fed
            .evaluate_tokens(v1::EvaluateTokensRequest {
                blinded: blinded.clone(),
            })
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("more than the rate's burst was evaluated");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("200"), "{refused:?}");
    regions.vest.stop().await;
    regions.midt.stop().await;
}

fn following(sub: &v1::Subscription, region: &str) -> (v1::RegionFollowingState, String) {
    let r = sub
        .regions
        .iter()
        .find(|r| r.region == region)
        .unwrap_or_else(|| panic!("no state for {region}: {:?}", sub.regions));
    (
        v1::RegionFollowingState::try_from(r.state).unwrap(),
        r.detail.clone(),
    )
}

/// A subscription is told only to the regions that may hold its patient: Nord,
/// holding nothing about the patient, learns nothing of it (nor of its deliveries,
/// whose protections are asked only where they may be). When Nord comes to hold the
/// patient, it is registered there and delivers every change it made since the
/// subscription was (from its journal), and every change after, none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_reaches_a_region_only_once_it_may_hold_the_patient() {
    let world = World::new();
    let regions = Regions::start(&world, &[VEST, MIDT, NORD], |region, c| {
        *c = world.routed_region_config(region, BOUND_MS);
    })
    .await;
    let (vest, midt, nord) = (
        regions.node(VEST).addr(),
        regions.node(MIDT).addr(),
        regions.node(NORD).addr(),
    );
    let patient = patient_id(4300);
    let wire = patient.clone();
    world
        .client(ORG_A, midt)
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    world
        .client(ORG_A, nord)
        .await
        .upsert(pointer(&patient_id(4301), ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    wait_fresh(&world, vest, &[(MIDT, 1), (NORD, 1)]).await;
    let nord_before = all_audit_records(&world, nord).await.len();

    let gp = world.client(ORG_C, vest).await;
    let sub = subscribe(&gp, &[&wire]).await;
    assert_eq!(following(&sub, MIDT).0, v1::RegionFollowingState::Following);
    let (nord_state, why) = following(&sub, NORD);
    assert_eq!(nord_state, v1::RegionFollowingState::HoldsNothing, "{why}");
    assert!(why.contains("holds none of the followed patients"), "{why}");

    // Midt's change is delivered; the delivery asks Midt, not Nord, for protections.
    world
        .client(ORG_A, midt)
        .await
        .upsert(pointer(&patient, ORG_A, 2, &["lab-results"]))
        .await
        .unwrap();
    let first = pull_until(&gp, &sub.id, 0, 1).await;
    assert_eq!(first[0].region, MIDT);
    let at_nord = all_audit_records(&world, nord).await;
    assert_eq!(
        at_nord.len(),
        nord_before,
        "Nord recorded something of the subscription: {:?}",
        &at_nord[..at_nord.len() - nord_before]
    );

    // Nord comes to hold the patient: pointers added, changed and one removed again,
    // one right after the other, before Vest can have registered there. Every change
    // arrives, in order, whenever the registration fell among them.
    let nord_holder = world.client(ORG_B, nord).await;
    for n in [10, 11, 13] {
        nord_holder
            .upsert(pointer(&patient, ORG_B, n, &["medications"]))
            .await
            .unwrap();
    }
    nord_holder
        .upsert(pointer(
            &patient,
            ORG_B,
            10,
            &["medications", "lab-results"],
        ))
        .await
        .unwrap();
    let gone = pointer(&patient, ORG_B, 13, &[]);
    assert!(
        nord_holder
            .delete(v1::DeletePointerRequest {
                patient: gone.patient,
                holder: gone.holder,
                endpoint: gone.endpoint,
            })
            .await
            .unwrap()
    );
    let events = pull_until(&gp, &sub.id, 0, 6).await;
    let from_nord: Vec<(v1::EventKind, String)> = events
        .iter()
        .filter(|e| e.region == NORD)
        .map(|e| {
            let endpoint = e.pointer.as_ref().and_then(|p| p.endpoint.as_ref());
            (
                v1::EventKind::try_from(e.kind).unwrap(),
                endpoint.map(|ep| ep.base_url.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let url = |n: u32| format!("https://fhir{n}.org{ORG_B}.example/r4");
    assert_eq!(
        from_nord,
        vec![
            (v1::EventKind::PointerAppeared, url(10)),
            (v1::EventKind::PointerAppeared, url(11)),
            (v1::EventKind::PointerAppeared, url(13)),
            (v1::EventKind::PointerChanged, url(10)),
            (v1::EventKind::PointerRemoved, url(13)),
        ],
        "{events:?}"
    );
    // Every change after the registration arrives too.
    nord_holder
        .upsert(pointer(&patient, ORG_B, 12, &["lab-results"]))
        .await
        .unwrap();
    let events = pull_until(&gp, &sub.id, 0, 7).await;
    assert_eq!(events.len(), 7, "{events:?}");
    assert_eq!(events.last().unwrap().region, NORD);
    let listed = gp
        .subscriptions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == sub.id)
        .unwrap();
    assert_eq!(
        following(&listed, NORD).0,
        v1::RegionFollowingState::Following
    );
    regions.stop().await;
}

/// The subscriber's token has long expired when Nord comes to hold the followed
/// patient: Nord checks the token as of when the home node verified it, registers
/// the subscription and delivers every change, without the subscriber presenting a
/// token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_coming_to_hold_the_patient_after_the_token_expired_is_still_registered() {
    let world = World::new();
    let regions = Regions::start(&world, &[VEST, NORD], |region, c| {
        *c = world.routed_region_config(region, BOUND_MS);
    })
    .await;
    let (vest, nord) = (regions.node(VEST).addr(), regions.node(NORD).addr());
    let patient = patient_id(4400);
    world
        .client(ORG_A, nord)
        .await
        .upsert(pointer(&patient_id(4401), ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    wait_fresh(&world, vest, &[(NORD, 1)]).await;

    let issuer = world.issuer();
    let short = doctor_token(&issuer)
        .org_parent(ORG_C)
        .expires_in(Duration::from_secs(2))
        .sign()
        .unwrap();
    let gp = world.client_with_token(ORG_C, vest, short, None).await;
    let sub = subscribe(&gp, &[&patient]).await;
    assert_eq!(
        following(&sub, NORD).0,
        v1::RegionFollowingState::HoldsNothing
    );
    // Until the token is refused everywhere (past its expiry and the clock leeway).
    let deadline = Instant::now() + Duration::from_secs(30);
    while gp.lookup(lookup(&patient)).await.is_ok() {
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    world
        .client(ORG_B, nord)
        .await
        .upsert(pointer(&patient, ORG_B, 10, &["medications"]))
        .await
        .unwrap();
    // Pulled by a client with a fresh token: reading the feed needs one, following
    // does not.
    let reader = world.client(ORG_C, vest).await;
    let events = pull_until(&reader, &sub.id, 0, 1).await;
    assert_eq!(events[0].region, NORD, "{events:?}");
    assert_eq!(
        v1::EventKind::try_from(events[0].kind),
        Ok(v1::EventKind::PointerAppeared)
    );
    let listed = reader
        .subscriptions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == sub.id)
        .unwrap();
    let (state, detail) = following(&listed, NORD);
    assert_eq!(state, v1::RegionFollowingState::Following, "{detail}");
    regions.stop().await;
}
