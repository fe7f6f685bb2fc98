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
    // The purge is in the audit log: what was due, before it was removed, then what
    // was removed.
    let auditor = world.client(HOST, node.addr()).await;
    let found = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                actions: vec!["retention".into()],
                ..Default::default()
            }),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let details: Vec<String> = found
        .records
        .iter()
        .rev()
        .map(|r| {
            let r: serde_json::Value = serde_json::from_slice(r).unwrap();
            r["detail"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        details,
        [
            "due for removal: pointers past their expiry or lapse",
            "removed 1: pointers past their expiry or lapse"
        ],
        "{details:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_change_is_stored_without_its_audit_record_even_on_kill_9() {
    let world = World::new();
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let a = world.client(ORG_A, node.addr).await;
    // Writers still under way when the node is killed.
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..400 {
                let p = pointer(&patient_id(t * 1000 + i), ORG_A, 1, &["medications"]);
                if a.upsert(p).await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.kill9();
    for t in tasks {
        t.await.unwrap();
    }

    let node = TestNode::start(config).await;
    let a = world.client(ORG_A, node.addr()).await;
    let auditor = world.client(HOST, node.addr()).await;
    let mut stored = 0;
    for t in 0..6u64 {
        for i in 0..400 {
            let patient = patient_id(t * 1000 + i);
            if a.lookup(lookup(&patient))
                .await
                .unwrap()
                .pointers
                .is_empty()
            {
                continue;
            }
            stored += 1;
            let records = auditor
                .audit_search(v1::SearchAuditRequest {
                    filter: Some(v1::AuditFilter {
                        patient: Some(patient.clone()),
                        actions: vec!["pointer_upsert".into()],
                        ..Default::default()
                    }),
                    page_size: 10,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .records;
            assert!(
                !records.is_empty(),
                "pointer {t}/{i} is stored without its record"
            );
        }
    }
    assert!(stored > 0, "some writes were made before the kill");
    node.stop().await;
}

#[tokio::test]
async fn a_node_that_cannot_start_leaves_its_data_directory_alone() {
    let world = World::new();
    // The listen address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = world.config(true);
    config.listen = taken.local_addr().unwrap();
    let err = pil_node::server::start(config.clone())
        .await
        .err()
        .expect("address in use");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
    assert!(!config.data_dir.exists(), "the data directory was created");
    drop(taken);

    // The audit signing key is missing.
    let mut config = world.config(true);
    config.audit.signing_key_file = world.path().join("audit/missing.pem");
    let err = pil_node::server::start(config.clone())
        .await
        .err()
        .expect("no key");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    assert!(!config.data_dir.exists(), "the data directory was created");

    // A node that has run once: a failed start signs no new head.
    let node = TestNode::start(world.config(true)).await;
    node.stop().await;
    let before = stored_state(&world).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = world.config(true);
    config.listen = taken.local_addr().unwrap();
    assert!(pil_node::server::start(config).await.is_err());
    assert_eq!(
        stored_state(&world).await,
        before,
        "the stored state changed"
    );
}

/// What a stopped node's storage holds, coarsely: its data directory's files, or on
/// PostgreSQL the audit log's size, signed size and heads and the pointers' count.
async fn stored_state(world: &World) -> Vec<(String, u64)> {
    let config = world.config(true);
    let Some(pg) = config.storage.postgres.filter(|_| on_postgres()) else {
        return dir_listing(&config.data_dir);
    };
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect to the node's database");
    tokio::spawn(connection);
    let mut state = Vec::new();
    for (name, sql) in [
        ("size", "SELECT size FROM audit_tree"),
        ("signed", "SELECT signed FROM audit_tree"),
        ("heads", "SELECT count(*) FROM audit_heads"),
        ("records", "SELECT count(*) FROM audit_records"),
        ("pointers", "SELECT count(*) FROM pointers"),
    ] {
        let n: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        state.push((name.to_string(), n as u64));
    }
    state
}

/// Names and sizes of the files in `dir`.
fn dir_listing(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    out.sort();
    out
}

#[cfg(unix)]
#[tokio::test]
async fn secret_keys_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::new();
    let config = world.config(true);
    for key in [
        &config.keys.pseudonym_key_file,
        &config.keys.storage_key_file,
        &config.tls.key,
        &config.audit.signing_key_file,
    ] {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = pil_node::server::start(config.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{} at 0644 was accepted", key.display()));
        let text = err.to_string();
        assert!(
            text.contains(&format!("chmod 600 {}", key.display())),
            "{text}"
        );
        assert!(text.contains("readable by other users"), "{text}");
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert!(!config.data_dir.exists());
    TestNode::start(config).await.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_closes_cleanly_when_a_client_keeps_a_call_open_past_the_grace_period() {
    let world = World::new();
    let mut config = world.config(true);
    config.limits.shutdown_grace_secs = 1;
    let node = TestNode::start(config.clone()).await;
    let a = world.client(ORG_A, node.addr()).await;
    // A sync whose client never sends its end: the call stays open.
    let open = tokio::spawn(async move {
        a.sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
            futures::stream::pending::<Vec<v1::Pointer>>(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(60), node.stop())
        .await
        .expect("the node stops");
    // RocksDB was closed: the data directory opens again in this process.
    let (store, closer) = pil_node::store::rocks::open(&config.data_dir)
        .await
        .expect("the store was closed");
    drop(store);
    closer.close().await;
    assert!(open.await.unwrap().is_err(), "the open call was cut off");
}

/// A node a test drops without stopping (it failed first) stops accepting: the
/// harness never leaves a listener behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_test_node_stops_listening() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(node);
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "the dropped node still accepts connections on {addr}"
    );
}
