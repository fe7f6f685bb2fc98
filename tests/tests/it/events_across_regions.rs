//! Change events across regions: a subscription made at the home node covers every
//! region; each region's events reach the subscriber in order and once, also when
//! the home node or a region was down; every region's protections stop delivery.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use pil_client::{PilClient, v1};
use pil_tests::*;

const VEST: &str = "helse-vest";
const MIDT: &str = "helse-midt";
const NORD: &str = "helse-nord";
/// The follower: a GP's organization.
const GP: &str = ORG_C;

fn region_state(sub: &v1::Subscription, region: &str) -> v1::RegionFollowingState {
    let r = sub
        .regions
        .iter()
        .find(|r| r.region == region)
        .unwrap_or_else(|| panic!("no state for {region}: {:?}", sub.regions));
    v1::RegionFollowingState::try_from(r.state).unwrap()
}

/// Nothing after `after` arrives within a while.
async fn nothing_more(gp: &PilClient, id: &str, after: u64) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let page = gp.pull_events(id, after, 100).await.unwrap();
    assert!(page.events.is_empty(), "{:?}", summary(&page.events));
    assert_eq!(page.last_event, after);
}

/// A subscription at the home node is registered in every region; every region's
/// pointers reach the subscriber's one feed, numbered without gaps and labelled with
/// their region, carrying the pointer a lookup shows; the region that delivered
/// records it; an opt-out registered in a third region stops delivery of the home
/// region's own events too, and the patient's events from anywhere after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_covers_every_region_and_every_regions_protections() {
    let world = World::new();
    let regions = Regions::start(&world, &[VEST, MIDT, NORD], |_, _| {}).await;
    let (vest, midt, nord) = (regions.node(VEST), regions.node(MIDT), regions.node(NORD));
    let (p, other) = (patient_id(600), patient_id(601));
    let gp = world.client(GP, vest.addr()).await;
    let sub = subscribe(&gp, &[&p]).await;
    assert_eq!(sub.regions.len(), 2, "{:?}", sub.regions);
    for region in [MIDT, NORD] {
        assert_eq!(
            region_state(&sub, region),
            v1::RegionFollowingState::Following
        );
    }
    let hospital = |node: &TestNode| world.client(ORG_A, node.addr());
    hospital(midt)
        .await
        .upsert(pointer(&p, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    hospital(midt)
        .await
        .upsert(pointer(&other, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    hospital(nord)
        .await
        .upsert(pointer(&p, ORG_A, 2, &["lab-results"]))
        .await
        .unwrap();
    hospital(vest)
        .await
        .upsert(pointer(&p, ORG_A, 3, &["medications"]))
        .await
        .unwrap();
    let events = pull_until(&gp, &sub.id, 0, 3).await;
    assert_eq!(
        events.iter().map(|e| e.number).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let mut from: Vec<&str> = events.iter().map(|e| e.region.as_str()).collect();
    from.sort();
    let mut every = vec![VEST, MIDT, NORD];
    every.sort();
    assert_eq!(from, every);
    for e in &events {
        assert_eq!(e.kind, v1::EventKind::PointerAppeared as i32, "{e:?}");
        assert_eq!(e.patient.as_ref(), Some(&p));
        let pointer = e.pointer.as_ref().expect("the pointer");
        assert_eq!(pointer.region, e.region, "labelled with its region");
    }
    nothing_more(&gp, &sub.id, 3).await;

    // The region whose pointers were delivered recorded the delivery before they left.
    let auditor = world.client(HOST, midt.addr()).await;
    let records: Vec<serde_json::Value> = futures::StreamExt::collect::<Vec<_>>(
        futures::StreamExt::map(auditor.audit_read_log(0).await.unwrap(), |e| {
            serde_json::from_slice(&e.expect("entry").record).unwrap()
        }),
    )
    .await;
    assert!(
        records.iter().any(|r| r["action"] == "event_delivery"
            && r["patient"].is_string()
            && r["outcome"]["pointers"] == 1),
        "midt recorded the delivery of its pointer"
    );
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "subscribe" && r["patient"].is_string()),
        "midt's report of the patient shows who follows them"
    );

    // An opt-out registered in nord holds for every region's pointers.
    world
        .client(OPERATOR, nord.addr())
        .await
        .set_opt_out(p.clone(), "reservasjon")
        .await
        .unwrap();
    hospital(vest)
        .await
        .upsert(pointer(&p, ORG_A, 4, &["medications"]))
        .await
        .unwrap();
    let next = pull_until(&gp, &sub.id, 3, 4).await;
    assert_eq!(
        summary(&next),
        [(4, VEST.to_string(), v1::EventKind::PatientUnfollowed)]
    );
    assert!(next[0].pointer.is_none());
    // No longer followed: a change anywhere makes nothing more for it.
    hospital(midt)
        .await
        .upsert(pointer(&p, ORG_A, 5, &["medications"]))
        .await
        .unwrap();
    nothing_more(&gp, &sub.id, 4).await;
    let listed = gp.subscriptions().await.unwrap();
    assert!(listed[0].patients.is_empty(), "{:?}", listed[0].patients);
    regions.stop().await;
}

fn node_config(
    world: &World,
    region: &str,
    listen: SocketAddr,
    peer_of: (&str, SocketAddr),
) -> pil_node::config::NodeConfig {
    let mut config = world.region_config(region);
    config.listen = listen;
    config.federation.peers = vec![peer(peer_of.0, peer_of.1)];
    config
}

/// A region not reachable when subscribing is registered once it is back, and holds
/// back delivery while its protections cannot be checked; the home node `kill -9`ed
/// collects what the region made meanwhile, and the region `kill -9`ed delivers what
/// it owes when it returns: every event once, in each region's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_down_for_a_while_deliver_what_they_owe_once() {
    let world = World::new();
    let base = three_free_ports();
    let (home_addr, peer_addr): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{base}").parse().unwrap(),
        format!("127.0.0.1:{}", base + 1).parse().unwrap(),
    );
    let home_config = node_config(&world, VEST, home_addr, (MIDT, peer_addr));
    let peer_config = node_config(&world, MIDT, peer_addr, (VEST, home_addr));
    let (home_dir, peer_dir) = (
        world.path().join("vest-node"),
        world.path().join("midt-node"),
    );
    std::fs::create_dir_all(&home_dir).unwrap();
    std::fs::create_dir_all(&peer_dir).unwrap();
    let p = patient_id(700);
    let write = async |addr: SocketAddr, n: u32| {
        world
            .client(ORG_A, addr)
            .await
            .upsert(pointer(&p, ORG_A, n, &["medications"]))
            .await
            .unwrap_or_else(|e| panic!("write {n}: {e}"));
    };

    let home = ProcessNode::start(&home_config, &home_dir);
    let gp = world.client(GP, home_addr).await;
    let sub = subscribe(&gp, &[&p]).await;
    assert_eq!(region_state(&sub, MIDT), v1::RegionFollowingState::Pending);
    write(home_addr, 1).await;
    // Midt's protections cannot be checked: the event waits, and the consumer is told.
    let waiting = gp.pull_events(&sub.id, 0, 100).await.unwrap_err();
    assert_eq!(code(&waiting), tonic::Code::Unavailable, "{waiting}");
    assert!(waiting.to_string().contains(MIDT), "{waiting}");

    let peer = ProcessNode::start(&peer_config, &peer_dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = gp.subscriptions().await.unwrap();
        if region_state(&listed[0], MIDT) == v1::RegionFollowingState::Following {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not registered: {:?}",
            listed[0].regions
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write(peer_addr, 2).await;
    write(peer_addr, 3).await;
    let first = pull_until(&gp, &sub.id, 0, 3).await;
    assert_eq!(
        summary(&first),
        [
            (1, VEST.to_string(), v1::EventKind::PointerAppeared),
            (2, MIDT.to_string(), v1::EventKind::PointerAppeared),
            (3, MIDT.to_string(), v1::EventKind::PointerAppeared),
        ]
    );

    // The home node dies; midt's events made meanwhile are collected after it restarts.
    drop(gp);
    home.kill9();
    write(peer_addr, 4).await;
    write(peer_addr, 5).await;
    let home = ProcessNode::start(&home_config, &home_dir);
    let gp = world.client(GP, home_addr).await;
    let after_restart = pull_until(&gp, &sub.id, 3, 5).await;
    assert_eq!(
        summary(&after_restart),
        [
            (4, MIDT.to_string(), v1::EventKind::PointerAppeared),
            (5, MIDT.to_string(), v1::EventKind::PointerAppeared),
        ]
    );
    let endpoints: Vec<String> = after_restart
        .iter()
        .map(|e| {
            e.pointer
                .as_ref()
                .unwrap()
                .endpoint
                .as_ref()
                .unwrap()
                .base_url
                .clone()
        })
        .collect();
    assert_ne!(
        endpoints[0], endpoints[1],
        "two different changes, not one twice"
    );
    nothing_more(&gp, &sub.id, 5).await;

    // Midt dies: the home region's event waits for it, midt's own arrive after it.
    peer.kill9();
    write(home_addr, 6).await;
    assert_eq!(
        code(&gp.pull_events(&sub.id, 5, 100).await.unwrap_err()),
        tonic::Code::Unavailable
    );
    let peer = ProcessNode::start(&peer_config, &peer_dir);
    write(peer_addr, 7).await;
    let last = pull_until(&gp, &sub.id, 5, 7).await;
    assert_eq!(
        summary(&last),
        [
            (6, VEST.to_string(), v1::EventKind::PointerAppeared),
            (7, MIDT.to_string(), v1::EventKind::PointerAppeared),
        ]
    );
    nothing_more(&gp, &sub.id, 7).await;
    home.terminate();
    peer.terminate();
}
