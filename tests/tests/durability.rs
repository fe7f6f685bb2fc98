//! Data survives restarts and `kill -9`; expired pointers disappear and are purged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pil_client::v1;
use pil_tests::*;

#[tokio::test]
async fn data_survives_a_restart() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    for i in 0..50 {
        a.upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    drop(a);
    node.stop().await;

    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    for i in 0..50 {
        let found = a.lookup(lookup(&patient_id(i))).await.unwrap();
        assert_eq!(found.pointers.len(), 1, "patient {i}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let world = World::new();
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let a = world.client(ORG_A, node.addr).await;
    // Concurrent writers, so acknowledgements come from group commits.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                a.upsert(pointer(
                    &patient_id(t * 1000 + i),
                    ORG_A,
                    1,
                    &["medications"],
                ))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sync = a
        .sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
            futures::stream::iter(vec![
                (9000..9300)
                    .map(|i| pointer(&patient_id(i), ORG_A, 2, &["lab-results"]))
                    .collect::<Vec<_>>(),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(sync.inserted, 300);
    drop(a);
    node.kill9();

    let node = ProcessNode::start(&config, world.path());
    let a = world.client(ORG_A, node.addr).await;
    for t in 0..8u64 {
        for i in 0..40 {
            let found = a.lookup(lookup(&patient_id(t * 1000 + i))).await.unwrap();
            assert_eq!(found.pointers.len(), 1, "write {t}/{i} lost");
        }
    }
    for i in 9000..9300 {
        assert_eq!(
            a.lookup(lookup(&patient_id(i)))
                .await
                .unwrap()
                .pointers
                .len(),
            1
        );
    }
    assert!(node.terminate().success(), "SIGTERM shutdown is clean");
}

#[tokio::test]
async fn expired_pointers_are_not_returned_and_are_purged() {
    use futures::StreamExt;
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(77);
    let soon = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(2);
    let mut short = pointer(&patient, ORG_A, 1, &["medications"]);
    short.expires_at = Some(prost_types::Timestamp {
        seconds: soon.as_secs() as i64,
        nanos: 0,
    });
    a.upsert(short).await.unwrap();
    a.upsert(pointer(&patient, ORG_A, 2, &["imaging"]))
        .await
        .unwrap();
    let before = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(before.pointers.len(), 2);
    assert!(before.pointers.iter().any(|p| p.expires_at.is_some()));

    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(after.pointers.len(), 1);
    assert_eq!(after.pointers[0].categories, ["imaging"]);

    // The purge (every second in tests) removes it from storage too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut exported = 0;
        let mut stream = a.export(ORG_A).await.unwrap();
        while let Some(page) = stream.next().await {
            exported += page.unwrap().len();
        }
        if exported == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired pointer never purged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn pointers_lapse_unless_their_holder_refreshes_them() {
    use futures::StreamExt;
    let world = World::new();
    // No purge while the refresh is checked (a purge would remove the lapsed pointer
    // first, and the refresh would insert it anew).
    let mut quiet = world.config(true);
    quiet.limits.purge_interval_secs = 3600;
    let node = TestNode::start(quiet).await;
    let a = world.client(ORG_A, node.addr()).await;
    let registry = node.node.registry().clone();
    let patient = patient_id(78);
    let ident = pil_proto::ident::PatientId::parse(&patient.system, &patient.value, true).unwrap();

    // Received 400 days ago, never refreshed: past the configured 365-day lifetime.
    let old = pointer(&patient, ORG_A, 1, &["medications"]);
    let stale = pil_node::pointer::NewPointer::from_wire(&old, true).unwrap();
    let long_ago = pil_node::registry::now_nanos() - 400 * 24 * 3600 * 1_000_000_000;
    registry
        .apply(vec![registry.prepare(&stale, long_ago)])
        .await
        .unwrap();
    a.upsert(pointer(&patient, ORG_A, 2, &["imaging"]))
        .await
        .unwrap();
    let found = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(found.pointers.len(), 1, "the lapsed pointer is not shown");
    assert_eq!(found.pointers[0].categories, ["imaging"]);
    let pil_node::registry::PatientView::Visible { pointers, .. } = registry
        .patient_view(&ident, &Default::default())
        .await
        .unwrap()
    else {
        panic!("the patient has not opted out");
    };
    assert_eq!(pointers.len(), 1);

    // Its holder sending it again, unchanged, refreshes it.
    let again = a.upsert(old.clone()).await.unwrap();
    assert_eq!(again.outcome, v1::WriteOutcome::Unchanged as i32);
    let found = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(found.pointers.len(), 2, "the refreshed pointer is back");

    // A pointer left to lapse is purged from storage (the purge runs every second in
    // the default test configuration).
    let other = patient_id(79);
    let forgotten = pil_node::pointer::NewPointer::from_wire(
        &pointer(&other, ORG_A, 1, &["medications"]),
        true,
    )
    .unwrap();
    registry
        .apply(vec![registry.prepare(&forgotten, long_ago)])
        .await
        .unwrap();
    drop(registry);
    drop(a);
    node.stop().await;
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut exported = 0;
        let mut stream = a.export(ORG_A).await.unwrap();
        while let Some(page) = stream.next().await {
            exported += page.unwrap().len();
        }
        if exported == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lapsed pointer never purged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await;
}
