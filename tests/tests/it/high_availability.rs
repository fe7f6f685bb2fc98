//! Several nodes serving one region from one PostgreSQL database.

use pil_auth::dev_issuer::DpopKey;
use pil_client::v1;
use pil_node::config::{Engine, PostgresConfig, StorageConfig};
use pil_node::test_support::Throwaway;
use pil_tests::*;
use pil_transparency::HeadVerifier;

const VEST: &str = "helse-vest";
/// The name a load balancer gives the region's nodes.
const PUBLIC: &str = "vest.pil.test";

/// Storage in the PostgreSQL database at `url`.
fn on_database(url: &str, pool_size: usize, connect_timeout_secs: u64) -> StorageConfig {
    StorageConfig {
        engine: Engine::Postgres,
        postgres: Some(PostgresConfig {
            url: url.to_string(),
            pool_size,
            connect_timeout_secs,
            ca_file: None,
            password_file: None,
        }),
    }
}

/// The region's whole log, read through one node; its indexes consecutive.
async fn consecutive_log(auditor: &pil_client::PilClient) -> Vec<v1::LogEntry> {
    let entries: Vec<v1::LogEntry> = futures::StreamExt::collect::<Vec<_>>(
        futures::StreamExt::map(auditor.audit_read_log(0).await.unwrap(), |e| {
            e.expect("log entry")
        }),
    )
    .await;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.index, i as u64, "consecutive indexes, none twice");
    }
    entries
}

/// The key the region's heads are signed with.
fn region_key(world: &World) -> HeadVerifier {
    let key = world
        .path()
        .join("regions")
        .join(VEST)
        .join("audit")
        .join("public-key.pem");
    HeadVerifier::load(key).unwrap()
}

/// Three nodes on one database, driven at once: every acknowledged write is seen by
/// lookups at every node, concurrent writes of one pointer have exactly one
/// insertion, a block set through one node applies at the others, and the audit
/// records of all three form one log with consecutive indexes that verifies, and a
/// DPoP proof accepted by one node is refused by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_of_one_region_share_one_database() {
    let world = World::new();
    let server = Throwaway::start();
    let db = server.create_migrated_database("shared-region");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut config = world.region_config(VEST);
        config.storage = on_database(&db.url, 8, 5);
        config.auth.public_url = Some(format!("https://{PUBLIC}"));
        nodes.push(TestNode::start(config).await);
    }

    // Each node writes its own patients, and all three write one shared pointer.
    let shared = patient_id(5000);
    let writes = nodes.iter().enumerate().map(|(n, node)| {
        let world = &world;
        let shared = shared.clone();
        async move {
            let client = world.client(ORG_A, node.addr()).await;
            let mut outcomes = Vec::new();
            for i in 0..20u64 {
                let patient = patient_id(5001 + n as u64 * 100 + i);
                client
                    .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
                    .await
                    .expect("acknowledged");
                let r = client
                    .upsert(pointer(&shared, ORG_A, 1, &["medications"]))
                    .await
                    .expect("acknowledged");
                outcomes.push(r.outcome);
            }
            outcomes
        }
    });
    let outcomes: Vec<i32> = futures::future::join_all(writes)
        .await
        .into_iter()
        .flatten()
        .collect();
    let inserted = outcomes
        .iter()
        .filter(|o| **o == v1::WriteOutcome::Inserted as i32)
        .count();
    assert_eq!(inserted, 1, "one pointer, inserted once: {outcomes:?}");

    // Every node sees every acknowledged write.
    for node in &nodes {
        let doctor = world.client(ORG_A, node.addr()).await;
        for n in 0..3u64 {
            for i in 0..20u64 {
                let patient = patient_id(5001 + n * 100 + i);
                let found = doctor.lookup(lookup(&patient)).await.unwrap();
                assert_eq!(
                    found.pointers.len(),
                    1,
                    "patient {n}/{i} at {}",
                    node.addr()
                );
            }
        }
        let found = doctor.lookup(lookup(&shared)).await.unwrap();
        assert_eq!(found.pointers.len(), 1);
    }

    // A block set through the first node holds at the third at once.
    let mut admin = world.client(OPERATOR, nodes[0].addr()).await.admin();
    admin
        .create_block(v1::CreateBlockRequest {
            patient: Some(shared.clone()),
            block: Some(v1::Block {
                target: Some(v1::BlockTarget {
                    target: Some(v1::block_target::Target::OrganizationNumber(ORG_A.into())),
                }),
                reason: "patient's wish".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let seen = world
        .client(ORG_A, nodes[2].addr())
        .await
        .lookup(lookup(&shared))
        .await
        .unwrap();
    assert!(seen.pointers.is_empty(), "blocked at every node: {seen:?}");

    // A proof used at one node is refused at another, as at the same node.
    let key = DpopKey::generate().unwrap();
    let token = doctor_token(&world.issuer()).bound_to(&key).sign().unwrap();
    let proof = key
        .proof(
            "POST",
            &format!("https://{PUBLIC}/pil.v1.LookupService/Lookup"),
            &token,
        )
        .unwrap();
    let call = || {
        let mut req = tonic::Request::new(lookup(&patient_id(5001)));
        let meta = req.metadata_mut();
        meta.insert("authorization", format!("DPoP {token}").parse().unwrap());
        meta.insert("dpop", proof.parse().unwrap());
        req
    };
    let at = |n: usize| {
        let world = &world;
        let addr = nodes[n].addr();
        async move {
            v1::lookup_service_client::LookupServiceClient::new(
                world.raw_channel_addressed(ORG_A, addr, PUBLIC).await,
            )
        }
    };
    assert!(at(0).await.lookup(call()).await.is_ok());
    let replayed = at(1).await.lookup(call()).await.unwrap_err();
    assert_eq!(
        replayed.code(),
        tonic::Code::Unauthenticated,
        "{replayed:?}"
    );
    assert!(replayed.message().contains("already used"), "{replayed:?}");

    // One log: read through the second node, consecutive indexes, and it verifies
    // against the heads every node signed.
    let auditor = world.client(HOST, nodes[1].addr()).await;
    auditor.audit_tree_head(true).await.unwrap();
    // Heads first: the nodes go on signing while the log is read.
    let heads = auditor.audit_tree_heads().await.unwrap();
    let entries = consecutive_log(&auditor).await;
    assert!(
        entries.len() >= 3 * 40 + 60,
        "every request recorded: {}",
        entries.len()
    );
    let report = pil_client::verify_log(&entries, &heads, &region_key(&world));
    assert!(report.is_ok(), "{report:?}");
    // The head was signed before the auditor's own reads were recorded.
    assert!(
        report.signed_size + 2 >= entries.len() as u64,
        "a signed head covers the writes and lookups: {report:?}"
    );

    for node in nodes {
        node.stop().await;
    }
}

/// With its database gone, a node fails requests with a clear status instead of
/// answering without an audit record, or hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_database_is_gone_fails_closed() {
    let world = World::new();
    let server = Throwaway::start();
    let db = server.create_migrated_database("gone");
    let mut config = world.config(true);
    config.storage = on_database(&db.url, 4, 2);
    let node = TestNode::start(config).await;
    let patient = patient_id(6000);
    world
        .client(ORG_A, node.addr())
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    drop(server);
    let doctor = world.client(ORG_A, node.addr()).await;
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        doctor.lookup(lookup(&patient)),
    )
    .await
    .expect("an answer, not a hang");
    let e = answer.expect_err("no answer without the database");
    assert!(
        matches!(code(&e), tonic::Code::Unavailable | tonic::Code::Internal),
        "{e}"
    );
    node.stop().await;
}

/// `pil-node migrate` brings an empty database to the node's schema, a second run
/// changes nothing, and a node then starts on it; before, it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_prepares_the_database_and_a_node_refuses_one_it_did_not() {
    let world = World::new();
    let server = Throwaway::start();
    let mut config = world.config(true);
    config.storage = on_database(&server.url("postgres"), 4, 5);
    let refused = pil_node::server::start(config.clone()).await.err();
    assert!(
        refused
            .as_ref()
            .is_some_and(|e| e.to_string().contains("pil-node migrate")),
        "{refused:?}"
    );
    let file = world.path().join("pg-node.toml");
    std::fs::write(&file, toml::to_string_pretty(&config).unwrap()).unwrap();
    for _ in 0..2 {
        let out = std::process::Command::new(sibling_binary("pil-test-node"))
            .args(["migrate", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "database schema at version 7"
        );
    }
    let node = TestNode::start(config).await;
    node.stop().await;
}

/// With `ca_file` the node speaks TLS to its database and checks the server's
/// certificate; with `sslmode=require` and no CA it does not connect at all. The
/// password comes from `password_file`, which must be private to the node's user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_can_be_tls() {
    let world = World::new();
    let pki = world.path().join("pki");
    let ca =
        pil_node::pki::DevCa::from_pem_files(&pki.join("ca.pem"), &pki.join("ca-key.pem")).unwrap();
    let cert = ca.issue_node("db", &["localhost", "127.0.0.1"]).unwrap();
    let server = Throwaway::start_tls(&cert.cert_pem, &cert.key_pem);
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        server.port()
    );
    let password = world.path().join("db-password");
    std::fs::write(&password, format!("{}\n", Throwaway::PASSWORD)).unwrap();
    let mode = |m| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(m)).unwrap();
    };
    let mut storage = on_database(&url, 4, 5);
    storage.postgres.as_mut().unwrap().password_file = Some(password.clone());
    mode(0o600);
    let plain = storage.postgres.as_ref().unwrap().engine_config();
    assert!(
        pil_node::store::postgres::migrate(&plain).await.is_err(),
        "sslmode=require without a CA must not connect"
    );
    storage.postgres.as_mut().unwrap().ca_file = Some(world.ca.clone());
    let tls = storage.postgres.as_ref().unwrap().engine_config();
    mode(0o644);
    let open = pil_node::store::postgres::migrate(&tls).await.unwrap_err();
    assert!(open.to_string().contains("chmod 600"), "{open}");
    mode(0o600);
    let mut no_password = tls.clone();
    no_password.password_file = None;
    let refused = pil_node::store::postgres::migrate(&no_password)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("password"), "{refused}");
    pil_node::store::postgres::migrate(&tls).await.unwrap();
    let mut config = world.config(true);
    config.storage = storage;
    let node = TestNode::start(config).await;
    let patient = patient_id(7000);
    world
        .client(ORG_A, node.addr())
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let found = world
        .client(ORG_A, node.addr())
        .await
        .lookup(lookup(&patient))
        .await
        .unwrap();
    assert_eq!(found.pointers.len(), 1);
    node.stop().await;
}

/// Two nodes on a primary with a synchronous standby, under writes and lookups: the
/// primary's machine fails (`kill -9` of every server process) and the standby is
/// promoted. The nodes find the new primary on their own, every acknowledged pointer
/// and every acknowledged request's audit record is there, and the log verifies
/// across the failover against heads signed before and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_failover_loses_no_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    let world = World::new();
    let primary = Throwaway::start_primary();
    // The standby first: the primary's commits wait for it.
    let standby = Throwaway::start_standby_of(&primary);
    primary.create_migrated_database("failover");
    let url = Throwaway::url_of_primary(&[&primary, &standby], "failover");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut config = world.region_config(VEST);
        config.storage = on_database(&url, 4, 5);
        nodes.push(TestNode::start(config).await);
    }

    let acknowledged = std::sync::Mutex::new(Vec::new());
    let (answered, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    let drivers = (0..4u64).map(|d| {
        let (world, nodes, acknowledged) = (&world, &nodes, &acknowledged);
        let (answered, refused, stop) = (&answered, &refused, &stop);
        async move {
            let client = world.client(ORG_A, nodes[d as usize % 2].addr()).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let patient = patient_id(8000 + d * 10_000 + i);
                i += 1;
                match client
                    .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
                    .await
                {
                    Ok(_) => acknowledged.lock().unwrap().push(patient.clone()),
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                // An answered lookup of an acknowledged write finds it, failover or not.
                match client.lookup(lookup(&patient)).await {
                    Ok(found) => {
                        assert_eq!(found.pointers.len(), 1, "acknowledged, then not found");
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(
                            matches!(code(&e), tonic::Code::Unavailable | tonic::Code::Internal),
                            "{e}"
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    let acked = || acknowledged.lock().unwrap().len();
    let auditor = world.client(HOST, nodes[1].addr()).await;
    let control = async {
        let until = |n: usize, what: &'static str| {
            let deadline = Instant::now() + Duration::from_secs(60);
            async move {
                while acked() < n {
                    assert!(Instant::now() < deadline, "{what}: {} of {n}", acked());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        until(60, "writes before the failover").await;
        auditor.audit_tree_head(true).await.unwrap();
        let before = auditor.audit_tree_heads().await.unwrap();
        // A commit seen on the primary reaches the standby within a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::block_in_place(|| primary.kill_9());
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| standby.promote());
        let at_promotion = acked();
        until(
            at_promotion + 60,
            "writes after the failover, through both nodes",
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        before
    };
    let (heads_before, _) = tokio::join!(control, futures::future::join_all(drivers));
    assert_eq!(standby.sql("failover", "SELECT pg_is_in_recovery()"), "f");

    // Every acknowledged write, at both nodes.
    let acknowledged = acknowledged.into_inner().unwrap();
    for node in &nodes {
        let doctor = world.client(ORG_A, node.addr()).await;
        for patient in &acknowledged {
            let found = doctor.lookup(lookup(patient)).await.unwrap();
            assert_eq!(found.pointers.len(), 1, "{patient:?} at {}", node.addr());
        }
    }

    // One log, consecutive, holding a record of every acknowledged request, and
    // consistent with every head: those signed before the failover and after it.
    auditor.audit_tree_head(true).await.unwrap();
    let mut heads = heads_before.clone();
    heads.extend(auditor.audit_tree_heads().await.unwrap());
    let entries = consecutive_log(&auditor).await;
    let requests = acknowledged.len() as u64 + answered.load(Ordering::Relaxed);
    assert!(
        entries.len() as u64 >= requests,
        "{} records for {requests} acknowledged requests",
        entries.len()
    );
    let report = pil_client::verify_log(&entries, &heads, &region_key(&world));
    assert!(report.is_ok(), "{report:?}");
    let newest_before = heads_before.iter().map(|h| h.size).max().unwrap();
    assert!(
        newest_before > 0 && report.signed_size > newest_before,
        "{report:?}"
    );
    for node in nodes {
        node.stop().await;
    }
}
