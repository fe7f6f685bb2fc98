//! Change events: following patients, delivery decided at delivery, resuming, and
//! events that survive `kill -9`.

use std::time::Duration;

use pil_client::v1;
use pil_tests::*;

/// The follower: a GP's organization, whose doctor has a care relationship.
const GP: &str = ORG_C;

fn kinds(events: &[v1::Event]) -> Vec<(u64, v1::EventKind)> {
    events
        .iter()
        .map(|e| (e.number, v1::EventKind::try_from(e.kind).unwrap()))
        .collect()
}

/// The audit log's records, as JSON.
async fn records(world: &World, addr: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let auditor = world.client(HOST, addr).await;
    let entries: Vec<v1::LogEntry> = futures::StreamExt::collect::<Vec<_>>(
        futures::StreamExt::map(auditor.audit_read_log(0).await.unwrap(), |e| {
            e.expect("log entry")
        }),
    )
    .await;
    entries
        .iter()
        .map(|e| serde_json::from_slice(&e.record).expect("record JSON"))
        .collect()
}

/// Every change of a followed patient arrives, numbered without gaps, carrying the
/// pointer a lookup returns; a consumer resumes after the last number it processed
/// and gets exactly the rest; patients not followed make no events; the stream
/// delivers new events as they are written, with heartbeats in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_every_change_in_order_and_resumes_where_it_left_off() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let (p1, p2, other) = (patient_id(100), patient_id(101), patient_id(102));
    let gp = world.client(GP, node.addr()).await;
    let sub = subscribe(&gp, &[&p1, &p2]).await;
    assert_eq!(sub.id.len(), 32);
    assert_eq!(sub.patients.len(), 2);
    assert_eq!(sub.organization_number, GP);
    assert!(!sub.legal_basis.is_empty());
    let days = (sub.expires_at.unwrap().seconds - sub.created_at.unwrap().seconds) / 86400;
    assert_eq!(days, 30, "as long as the legal configuration allows");

    let hospital = world.client(ORG_A, node.addr()).await;
    hospital
        .upsert(pointer(&p1, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    hospital
        .upsert(pointer(&other, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    // The same pointer again: a refresh, not a change.
    hospital
        .upsert(pointer(&p1, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    hospital
        .upsert(pointer(&p1, ORG_A, 1, &["medications", "lab-results"]))
        .await
        .unwrap();
    hospital
        .upsert(pointer(&p2, ORG_A, 2, &["medications"]))
        .await
        .unwrap();
    let deleted = hospital
        .delete(v1::DeletePointerRequest {
            patient: Some(p1.clone()),
            holder: pointer(&p1, ORG_A, 1, &[]).holder,
            endpoint: pointer(&p1, ORG_A, 1, &[]).endpoint,
        })
        .await
        .unwrap();
    assert!(deleted);

    // Two at a time, resuming after the last one processed.
    let first = gp.pull_events(&sub.id, 0, 2).await.unwrap();
    assert_eq!(first.last_event, 4);
    assert_eq!(
        kinds(&first.events),
        [
            (1, v1::EventKind::PointerAppeared),
            (2, v1::EventKind::PointerChanged)
        ]
    );
    let rest = gp.pull_events(&sub.id, 2, 100).await.unwrap();
    assert_eq!(
        kinds(&rest.events),
        [
            (3, v1::EventKind::PointerAppeared),
            (4, v1::EventKind::PointerRemoved)
        ]
    );
    assert!(
        gp.pull_events(&sub.id, 4, 100)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    // Asking again gives the same events, with the same ids.
    let again = gp.pull_events(&sub.id, 0, 100).await.unwrap();
    let ids: Vec<&str> = again.events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [1, 2, 3, 4].map(|n| format!("{}-{n}", sub.id)));
    // Each names its patient, and carries the pointer as a lookup shows it.
    assert_eq!(again.events[2].patient.as_ref(), Some(&p2));
    let looked_up = world
        .client(ORG_A, node.addr())
        .await
        .lookup(lookup(&p2))
        .await
        .unwrap();
    assert_eq!(again.events[2].pointer.as_ref(), looked_up.pointers.first());
    assert_eq!(
        again.events[1].pointer.as_ref().unwrap().categories,
        ["lab-results", "medications"]
    );
    let beyond = gp.pull_events(&sub.id, 9, 10).await.unwrap_err();
    assert_eq!(code(&beyond), tonic::Code::OutOfRange, "{beyond}");

    // The stream: what is there after the position, then new events, then heartbeats.
    let mut stream = gp.stream_events(&sub.id, 3, 1).await.unwrap();
    async fn next(
        stream: &mut tonic::Streaming<v1::StreamEventsResponse>,
    ) -> v1::stream_events_response::Message {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message within the timeout")
            .unwrap()
            .unwrap()
            .message
            .unwrap()
    }
    let event = |m| match m {
        v1::stream_events_response::Message::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(event(next(&mut stream).await).number, 4);
    hospital
        .upsert(pointer(&p2, ORG_A, 3, &["imaging"]))
        .await
        .unwrap();
    let live = event(next(&mut stream).await);
    assert_eq!(
        (live.number, live.kind),
        (5, v1::EventKind::PointerAppeared as i32)
    );
    match next(&mut stream).await {
        v1::stream_events_response::Message::Heartbeat(h) => assert_eq!(h.last_event, 5),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    drop(stream);

    // Listed by its owner; every delivery and the subscription itself are in the log,
    // under the patient.
    let listed = gp.subscriptions().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_event, 5);
    let records = records(&world, node.addr()).await;
    let pseudonym_of = |action: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["action"] == action && r["outcome"]["status"] == "OK")
            .filter_map(|r| r["patient"].as_str().map(String::from))
            .collect()
    };
    let subscribed = pseudonym_of("subscribe");
    assert_eq!(subscribed.len(), 2, "one record per followed patient");
    let delivered = pseudonym_of("event_delivery");
    for p in &subscribed {
        assert!(delivered.contains(p), "deliveries to {p} recorded");
    }
    node.stop().await;
}

/// Only the organization that subscribed may read, renew or end its subscription;
/// an ended subscription makes no more events, and renewing needs a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_its_owners_alone_and_ends_when_they_end_it() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let p = patient_id(200);
    let gp = world.client(GP, node.addr()).await;
    let sub = gp
        .subscribe(v1::SubscribeRequest {
            patients: vec![p.clone()],
            days: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .subscription
        .unwrap();
    let days = (sub.expires_at.unwrap().seconds - sub.created_at.unwrap().seconds) / 86400;
    assert_eq!(days, 7);

    let stranger = world.client(ORG_A, node.addr()).await;
    for e in [
        stranger.pull_events(&sub.id, 0, 10).await.unwrap_err(),
        stranger.end_subscription(&sub.id).await.unwrap_err(),
        stranger.renew_subscription(&sub.id, 1).await.unwrap_err(),
    ] {
        assert_eq!(code(&e), tonic::Code::PermissionDenied, "{e}");
        assert!(e.to_string().contains("another organization"), "{e}");
    }
    assert!(stranger.subscriptions().await.unwrap().is_empty());
    let unknown = gp.pull_events(&"0".repeat(32), 0, 10).await.unwrap_err();
    assert_eq!(code(&unknown), tonic::Code::NotFound, "{unknown}");
    let bad = gp.pull_events("not-an-id", 0, 10).await.unwrap_err();
    assert_eq!(code(&bad), tonic::Code::InvalidArgument, "{bad}");

    // Renewed: extended from now, as long as asked within what the configuration allows.
    let renewed = gp.renew_subscription(&sub.id, 365).await.unwrap();
    let days = (renewed.expires_at.unwrap().seconds - renewed.created_at.unwrap().seconds) / 86400;
    assert_eq!(days, 30);

    let hospital = world.client(ORG_A, node.addr()).await;
    hospital
        .upsert(pointer(&p, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let ended = gp.end_subscription(&sub.id).await.unwrap();
    assert!(ended.ended);
    hospital
        .upsert(pointer(&p, ORG_A, 2, &["medications"]))
        .await
        .unwrap();
    let page = gp.pull_events(&sub.id, 0, 10).await.unwrap();
    assert_eq!(kinds(&page.events), [(1, v1::EventKind::PointerAppeared)]);
    let again = gp.renew_subscription(&sub.id, 1).await.unwrap_err();
    assert_eq!(code(&again), tonic::Code::FailedPrecondition, "{again}");

    // No subscription without patients, nor for patients the token does not cover.
    let none = gp
        .subscribe(v1::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(code(&none), tonic::Code::InvalidArgument, "{none}");
    node.stop().await;
}

/// An opt-out or a block set after subscribing stops delivery from then on: the
/// follower is told once that the patient is not followed any more, not why, and the
/// audit log shows no pointer delivered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protections_set_after_subscribing_stop_delivery() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let (opted, blocked, kept) = (patient_id(300), patient_id(301), patient_id(302));
    let gp = world.client(GP, node.addr()).await;
    let sub = subscribe(&gp, &[&opted, &blocked, &kept]).await;
    let hospital = world.client(ORG_A, node.addr()).await;
    for p in [&opted, &blocked, &kept] {
        hospital
            .upsert(pointer(p, ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    let before = gp.pull_events(&sub.id, 0, 10).await.unwrap();
    assert!(before.events.iter().all(|e| e.pointer.is_some()));
    assert_eq!(before.events.len(), 3);

    let mut admin = world.client(OPERATOR, node.addr()).await.admin();
    admin
        .set_opt_out(v1::SetOptOutRequest {
            patient: Some(opted.clone()),
            reason: String::new(),
        })
        .await
        .unwrap();
    admin
        .create_block(v1::CreateBlockRequest {
            patient: Some(blocked.clone()),
            block: Some(v1::Block {
                target: Some(v1::BlockTarget {
                    target: Some(v1::block_target::Target::OrganizationNumber(GP.into())),
                }),
                reason: "patient's wish".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let write_round = |endpoint: u32| {
        let hospital = &hospital;
        let patients = [&opted, &blocked, &kept];
        async move {
            for p in patients {
                hospital
                    .upsert(pointer(p, ORG_A, endpoint, &["medications"]))
                    .await
                    .unwrap();
            }
        }
    };
    let of = |events: &[v1::Event], p: &v1::PatientIdentifier| -> Vec<v1::Event> {
        events
            .iter()
            .filter(|e| e.patient.as_ref() == Some(p))
            .cloned()
            .collect()
    };
    write_round(2).await;
    let after = gp.pull_events(&sub.id, 3, 100).await.unwrap();
    // Told, without a pointer and without why.
    for p in [&opted, &blocked] {
        let told = of(&after.events, p);
        assert_eq!(
            kinds(&told),
            [(told[0].number, v1::EventKind::PatientUnfollowed)]
        );
        assert!(told[0].pointer.is_none());
    }
    assert_eq!(
        kinds(&of(&after.events, &kept)),
        [(
            after.events.last().unwrap().number,
            v1::EventKind::PointerAppeared
        )]
    );
    // From then on their changes make no events at all.
    write_round(3).await;
    let later = gp
        .pull_events(&sub.id, after.last_event, 100)
        .await
        .unwrap();
    assert_eq!(later.events.len(), 1);
    assert_eq!(later.events[0].patient.as_ref(), Some(&kept));
    let listed = gp.subscriptions().await.unwrap();
    assert_eq!(listed[0].patients, std::slice::from_ref(&kept));

    // The log: after the protections, no delivery to the protected showed a pointer.
    let records = records(&world, node.addr()).await;
    let protected_at = records
        .iter()
        .rposition(|r| r["action"] == "block_create")
        .expect("the block's record");
    for r in &records[protected_at..] {
        if r["action"] == "event_delivery" && r["decision"]["outcome"] == "denied" {
            assert_eq!(r["outcome"]["pointers"].as_u64().unwrap_or(0), 0, "{r}");
        }
    }
    node.stop().await;
}

/// A subscription past its expiry makes no events (a write then has none, and is
/// not delivered later); renewing it with a fresh token starts them again, numbered on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_subscription_makes_no_events_until_renewed() {
    let world = World::new();
    let config = world.config(true);
    let node = TestNode::start(config.clone()).await;
    let p = patient_id(520);
    let gp = world.client(GP, node.addr()).await;
    let sub = subscribe(&gp, &[&p]).await;
    let hospital = world.client(ORG_A, node.addr()).await;
    hospital
        .upsert(pointer(&p, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    assert_eq!(gp.pull_events(&sub.id, 0, 100).await.unwrap().last_event, 1);
    drop((gp, hospital));
    node.stop().await;

    // Its expiry passes while the node is stopped.
    let (store, closer) = pil_node::server::open_store(&config).await.unwrap();
    let id: [u8; 16] = hex::decode(&sub.id).unwrap().try_into().unwrap();
    let mut stored = store.subscription(id).await.unwrap().unwrap();
    stored.expires_at = pil_node::registry::now_nanos() - 1;
    store.put_subscription(id, stored).await.unwrap();
    drop(store);
    closer.close().await;

    let node = TestNode::start(config).await;
    let gp = world.client(GP, node.addr()).await;
    let hospital = world.client(ORG_A, node.addr()).await;
    hospital
        .upsert(pointer(&p, ORG_A, 2, &["medications"]))
        .await
        .unwrap();
    let page = gp.pull_events(&sub.id, 1, 100).await.unwrap();
    assert!(page.events.is_empty(), "expired: no event for the write");
    assert_eq!(page.last_event, 1);
    let listed = gp.subscriptions().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(listed[0].expires_at.as_ref().unwrap().seconds <= now);

    let renewed = gp.renew_subscription(&sub.id, 1).await.unwrap();
    assert!(renewed.expires_at.unwrap().seconds > now + 3600);
    hospital
        .upsert(pointer(&p, ORG_A, 3, &["medications"]))
        .await
        .unwrap();
    let page = gp.pull_events(&sub.id, 1, 100).await.unwrap();
    assert_eq!(kinds(&page.events), [(2, v1::EventKind::PointerAppeared)]);
    let endpoint = page.events[0]
        .pointer
        .as_ref()
        .unwrap()
        .endpoint
        .as_ref()
        .unwrap();
    assert!(endpoint.base_url.contains("fhir3"), "{}", endpoint.base_url);
    node.stop().await;
}

/// An event is written with the write that makes it: a node killed right after
/// acknowledging writes delivers all their events after it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_acknowledged_writes_survive_kill_9() {
    let world = World::new();
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let gp = world.client(GP, node.addr).await;
    let patients: Vec<v1::PatientIdentifier> = (0..5).map(|i| patient_id(400 + i)).collect();
    let sub = subscribe(&gp, &patients.iter().collect::<Vec<_>>()).await;
    let hospital = world.client(ORG_A, node.addr).await;
    let mut tasks = Vec::new();
    for (t, p) in patients.iter().enumerate() {
        let (hospital, p) = (hospital.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            for i in 1..=10 {
                hospital
                    .upsert(pointer(&p, ORG_A, i, &["medications"]))
                    .await
                    .unwrap_or_else(|e| panic!("write {t}/{i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop((gp, hospital));
    node.kill9();

    let node = ProcessNode::start(&config, world.path());
    let gp = world.client(GP, node.addr).await;
    let page = gp.pull_events(&sub.id, 0, 1000).await.unwrap();
    assert_eq!(page.last_event, 50, "one event per acknowledged write");
    let numbers: Vec<u64> = page.events.iter().map(|e| e.number).collect();
    assert_eq!(numbers, (1..=50).collect::<Vec<_>>());
    node.terminate();
}

/// The command line: `pil follow` prints the subscription, `pil --json events` one
/// CloudEvents object per line, and `pil subscriptions end` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_follows_and_prints_events_as_cloudevents() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let p = patient_id(500);
    let profile = world.profile(GP, node.addr());
    let file = world.path().join("followed.txt");
    std::fs::write(&file, format!("# ward 3\n{}\n", p.value)).unwrap();
    let out = crate::pil(
        &profile,
        &[
            "--json",
            "follow",
            "--patients-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = made["subscription"]["id"].as_str().unwrap().to_string();
    assert_eq!(made["subscription"]["patients"][0], p.value.as_str());

    let hospital = world.client(ORG_A, node.addr()).await;
    for n in 1..=2 {
        hospital
            .upsert(pointer(&p, ORG_A, n, &["medications"]))
            .await
            .unwrap();
    }
    let out = crate::pil(&profile, &["--json", "events", &id, "--after", "0"]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, e) in lines.iter().enumerate() {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "no.pil.pointer.appeared");
        assert_eq!(e["sequence"], (i + 1).to_string());
        assert_eq!(e["id"], format!("{id}-{}", i + 1));
        assert_eq!(e["data"]["patient"]["value"], p.value.as_str());
        assert_eq!(e["data"]["pointer"]["holder"]["organization_number"], ORG_A);
    }
    let out = crate::pil(&profile, &["events", &id, "--after", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().count() == 1, "{text}");

    let out = crate::pil(&profile, &["--json", "subscriptions", "end", &id]);
    assert!(out.status.success(), "{out:?}");
    let ended: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ended[0]["ended"], true);
    let out = crate::pil(&profile, &["follow"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--patients-file"),
        "{out:?}"
    );
    node.stop().await;
}

/// Events are kept for `events_days`: once older events are dropped, a consumer whose
/// position is before them is told from where it can resume (and to resynchronize with
/// a lookup), and resuming there gets the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_older_than_retention_says_where_to_resume() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let p = patient_id(600);
    let gp = world.client(GP, node.addr()).await;
    let sub = subscribe(&gp, &[&p]).await;
    let hospital = world.client(ORG_A, node.addr()).await;
    for n in 1..=3 {
        hospital
            .upsert(pointer(&p, ORG_A, n, &["medications"]))
            .await
            .unwrap();
    }
    assert_eq!(
        gp.pull_events(&sub.id, 0, 10).await.unwrap().events.len(),
        3
    );
    drop((gp, hospital));
    node.stop().await;

    // Years pass for the first two events: their write time is moved to the epoch.
    let config = world.config(true);
    if on_postgres() {
        let url = config.storage.postgres.clone().expect("on PostgreSQL").url;
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let aged = client
            .execute("UPDATE events SET at = 1 WHERE seq <= 2", &[])
            .await
            .unwrap();
        assert_eq!(aged, 2);
    } else {
        use prost::Message;
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, &config.data_dir).unwrap();
        let db = rocksdb::DB::open_cf(&opts, &config.data_dir, &cfs).unwrap();
        let cf = db.cf_handle("events").unwrap();
        let events: Vec<_> = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        for (k, v) in &events[..2] {
            let mut e = pil_node::store::StoredEvent::decode(&**v).unwrap();
            e.at = 1;
            db.put_cf(cf, k, e.encode_to_vec()).unwrap();
        }
    }

    // The purge drops them within its interval (a second here).
    let node = TestNode::start(config).await;
    let gp = world.client(GP, node.addr()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match gp.pull_events(&sub.id, 0, 10).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "old events never dropped"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(code(&refused), tonic::Code::OutOfRange, "{refused}");
    assert!(
        refused.to_string().contains("resume after event 2")
            && refused
                .to_string()
                .contains("look the subscription's patients up"),
        "{refused}"
    );
    let rest = gp.pull_events(&sub.id, 2, 10).await.unwrap();
    assert_eq!(kinds(&rest.events), [(3, v1::EventKind::PointerAppeared)]);
    node.stop().await;
}
