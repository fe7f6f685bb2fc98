//! Faults tried on purpose, and what survives them counted (docs/reliability.md): a
//! node killed again and again under mixed load (`PIL_CRASH_ROUNDS` makes the loop
//! longer; `tests/bench/faults.sh` runs it so), a disk that refuses writes, and hostile
//! load.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use pil_client::{LogVerifier, PilClient, v1};
use pil_tests::*;
use pil_transparency::{HeadVerifier, verify_consistency};
use serde_json::Value;

/// What the clients were told was done, by patient seed.
#[derive(Default)]
struct Acknowledged {
    upserts: BTreeSet<u64>,
    synced: BTreeSet<u64>,
    lookups: BTreeSet<u64>,
}

/// Writes, bulk syncs, lookups and audit reads against `node` until it dies; every
/// acknowledged write and lookup is noted.
fn mixed_load(
    writer: PilClient,
    doctor: PilClient,
    auditor: PilClient,
    round: u64,
    acked: &Arc<Mutex<Acknowledged>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let (writer, acked) = (writer.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..2_000u64 {
                let seed = round * 1_000_000 + t * 10_000 + i;
                let p = pointer(&patient_id(seed), ORG_A, 1, &["medications"]);
                if writer.upsert(p).await.is_err() {
                    return;
                }
                acked.lock().unwrap().upserts.insert(seed);
            }
        }));
    }
    {
        let (writer, acked) = (writer.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for batch in 0..200u64 {
                let seeds: Vec<u64> = (0..20)
                    .map(|i| round * 1_000_000 + 500_000 + batch * 20 + i)
                    .collect();
                let pointers: Vec<_> = seeds
                    .iter()
                    .map(|s| pointer(&patient_id(*s), ORG_A, 2, &["lab-results"]))
                    .collect();
                let options =
                    sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false);
                match writer
                    .sync(options, futures::stream::iter(vec![pointers]))
                    .await
                {
                    Ok(_) => acked.lock().unwrap().synced.extend(seeds),
                    Err(_) => return,
                }
            }
        }));
    }
    {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5_000u64 {
                // A patient of its own per lookup, so each lookup's record is findable.
                let seed = round * 1_000_000 + 900_000 + i;
                if doctor.lookup(lookup(&patient_id(seed))).await.is_err() {
                    return;
                }
                acked.lock().unwrap().lookups.insert(seed);
            }
        }));
    }
    tasks.push(tokio::spawn(async move {
        loop {
            let page = auditor
                .audit_search(v1::SearchAuditRequest {
                    page_size: 50,
                    ..Default::default()
                })
                .await;
            if page.is_err() {
                return;
            }
        }
    }));
    tasks
}

/// The whole log checked against the node's signed heads with only its public key.
async fn verify_whole_log(auditor: &PilClient, key: &HeadVerifier) -> pil_client::VerifyReport {
    use futures::StreamExt;
    let heads = auditor.audit_tree_heads().await.unwrap();
    let mut check = LogVerifier::new(&heads, key);
    let mut log = auditor.audit_read_log(0).await.unwrap();
    while let Some(e) = log.next().await {
        check.push(&e.unwrap());
    }
    check.finish()
}

/// The records about `seed`'s patient with `action`, by outcome status.
async fn statuses(auditor: &PilClient, seed: u64, action: &str) -> Vec<String> {
    let records = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                patient: Some(patient_id(seed)),
                actions: vec![action.into()],
                ..Default::default()
            }),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .records;
    records
        .iter()
        .map(|r| {
            let r: Value = serde_json::from_slice(r).unwrap();
            r["outcome"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_again_and_again_under_mixed_load_loses_nothing_it_acknowledged() {
    let rounds: u64 = std::env::var("PIL_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let world = World::new();
    let mut config = world.config(true);
    let key = HeadVerifier::load(world.path().join("audit").join("public-key.pem")).unwrap();
    // Another region witnesses the crashing node's log throughout.
    let (witness, quorum) = start_witness(&world, &mut config).await;
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut checked = Acknowledged::default();
    let mut last_head: Option<(u64, [u8; 32])> = None;
    let mut records_seen = 0;
    for round in 0..=rounds {
        let node = ProcessNode::start(&config, world.path());
        let writer = world.client(ORG_A, node.addr).await;
        let doctor = world.client(ORG_A, node.addr).await;
        let auditor = world.client(HOST, node.addr).await;

        // What was acknowledged before the last kill is all there, once.
        let now = std::mem::take(&mut *acked.lock().unwrap());
        for seed in now.upserts.iter().chain(&now.synced) {
            let found = doctor.lookup(lookup(&patient_id(*seed))).await.unwrap();
            assert_eq!(found.pointers.len(), 1, "acknowledged write {seed} lost");
        }
        // Each acknowledged change: its record before and its outcome, once each.
        for seed in now.upserts.iter().step_by(3) {
            let mut s = statuses(&auditor, *seed, "pointer_upsert").await;
            s.sort();
            assert_eq!(s, ["OK", "STARTED"], "write {seed}: one record each");
        }
        // Each acknowledged lookup: one record.
        for seed in now.lookups.iter().step_by(3) {
            let s = statuses(&auditor, *seed, "lookup").await;
            assert_eq!(s, ["OK"], "lookup {seed}: one record, not {s:?}");
        }
        checked.upserts.extend(now.upserts);
        checked.synced.extend(now.synced);
        checked.lookups.extend(now.lookups);

        // The log verifies, and extends what was signed before the kill.
        doctor.lookup(lookup(&patient_id(7))).await.unwrap();
        let head = auditor.audit_tree_head(true).await.unwrap();
        let report = verify_whole_log(&auditor, &key).await;
        assert!(report.is_ok(), "round {round}: {:?}", report.first_problem);
        assert!(report.records >= records_seen, "records were lost");
        records_seen = report.records;
        let sth = pil_client::audit_verify::check_head(&head.note, &key).unwrap();
        // The witness agrees: it cosigned the head after the kill, so it is consistent
        // with every head it cosigned before.
        let cosigned = quorum.check(&head.note).unwrap();
        assert!(cosigned.met(), "round {round}: {cosigned:?}");
        if let Some((size, root)) = last_head {
            let proof = auditor
                .audit_consistency_proof(size, sth.head.size)
                .await
                .unwrap();
            let proof: Vec<[u8; 32]> = proof
                .iter()
                .map(|h| h.as_slice().try_into().unwrap())
                .collect();
            verify_consistency(size, sth.head.size, &root, &sth.head.root, &proof)
                .expect("each head extends the one before the kill");
        }
        last_head = Some((sth.head.size, sth.head.root));
        if round == rounds {
            assert!(node.terminate().success());
            break;
        }

        let tasks = mixed_load(writer, doctor, auditor, round, &acked);
        // Killed at a different moment each round.
        let wait = 300 + (round * 7919) % 900;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        node.kill9();
        for t in tasks {
            t.await.unwrap();
        }
    }
    println!(
        "crash loop: {rounds} kills; acknowledged {} upserts, {} synced pointers, {} lookups; \
         lost 0; {} audit records verified",
        checked.upserts.len(),
        checked.synced.len(),
        checked.lookups.len(),
        records_seen
    );
    assert!(!checked.upserts.is_empty() && !checked.lookups.is_empty());
    let metrics = http_get(witness.node.metrics_addr().unwrap(), "/metrics")
        .await
        .1;
    assert!(!metrics.contains("pil_witness_alarms_total{"), "{metrics}");
    witness.stop().await;
}

/// A node of region `witness` that witnesses `config`'s log, which asks it to cosign
/// every head; the quorum an auditor checks heads against.
async fn start_witness(
    world: &World,
    config: &mut pil_node::config::NodeConfig,
) -> (TestNode, pil_transparency::Quorum) {
    let port = free_port();
    let mut witness = world.region_config("witness");
    let key_file = world
        .path()
        .join("regions")
        .join("witness")
        .join("witness.key");
    let signer = pil_transparency::HeadSigner::write_new(&key_file).unwrap();
    let name = "witness.pil.test";
    let vkey = pil_transparency::Cosigner::new(name, signer)
        .unwrap()
        .key()
        .to_vkey();
    witness.witness = Some(pil_node::config::WitnessConfig {
        listen: ([127, 0, 0, 1], port).into(),
        name: name.into(),
        key_file,
        logs: vec![pil_node::config::WitnessedLog {
            origin: format!("pil-audit/{}", config.region),
            key_file: world.path().join("audit").join("public-key.pem"),
        }],
    });
    witness.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    config.audit.witnesses = vec![pil_node::config::WitnessEndpoint {
        key: vkey.clone(),
        url: format!("http://127.0.0.1:{port}"),
    }];
    let quorum = pil_transparency::Quorum {
        witnesses: vec![pil_transparency::CosignerKey::parse_vkey(&vkey).unwrap()],
        needed: 1,
    };
    (TestNode::start(witness).await, quorum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_stalled_streams_and_one_organizations_flood_leave_others_answered() {
    let world = World::new();
    let mut config = world.config(true);
    config.limits.max_connections = 48;
    config.limits.handshake_timeout_secs = 1;
    config.limits.max_concurrent_streams = 8;
    config.limits.requests_per_second_per_organization = 200;
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let node = TestNode::start(config).await;
    let addr = node.addr();
    // Callers connected before the attack.
    let other = world.client(ORG_B, addr).await;
    let flooder = world.client(ORG_A, addr).await;
    let staller = world.client(ORG_C, addr).await;
    other.lookup(lookup(&patient_id(1))).await.unwrap();

    // Connections that never start their TLS handshake, more than the node takes.
    let mut half_open = Vec::new();
    for _ in 0..100 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
            half_open.push(tcp);
        }
    }
    // Streams opened and never fed: bulk syncs whose first batch never comes.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let staller = staller.clone();
        stalled.push(tokio::spawn(async move {
            let options = sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false);
            let _ = staller
                .sync(options, futures::stream::pending::<Vec<v1::Pointer>>())
                .await;
        }));
    }
    // One organization sending far more than its rate.
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood = Vec::new();
    for t in 0..16u64 {
        let (flooder, refused) = (flooder.clone(), refused.clone());
        flood.push(tokio::spawn(async move {
            for i in 0..100u64 {
                if let Err(e) = flooder.lookup(lookup(&patient_id(t * 1000 + i))).await
                    && code(&e) == tonic::Code::ResourceExhausted
                {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }

    // Everyone else is answered within the client's deadline throughout.
    for i in 0..40u64 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            other.lookup(lookup(&patient_id(100 + i))),
        )
        .await;
        assert!(
            matches!(answer, Ok(Ok(_))),
            "lookup {i} of another organization: {answer:?}"
        );
        if i == 20 {
            // The half-open ones were cut at the handshake timeout; a second wave.
            for _ in 0..100 {
                if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
                    half_open.push(tcp);
                }
            }
        }
    }
    for f in flood {
        f.await.unwrap();
    }
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the flooding organization was slowed down"
    );
    let metrics = http_get(node.node.metrics_addr().unwrap(), "/metrics")
        .await
        .1;
    let figure = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(figure("pil_connections_refused_total") > 0.0, "{metrics}");
    assert!(
        figure(&format!(
            "pil_rate_limited_requests_total{{organization=\"{ORG_A}\"}}"
        )) > 0.0,
        "{metrics}"
    );
    for s in stalled {
        s.abort();
    }
    drop(half_open);
    drop((other, flooder, staller));
    node.stop().await;
}

#[tokio::test]
async fn writes_the_disk_refuses_are_refused_clearly_and_the_node_recovers_without_a_restart() {
    if on_postgres() {
        // A database that stops answering is high_availability.rs's subject.
        return;
    }
    let world = World::new();
    let config = world.config(true);
    let node = TestNode::start(config.clone()).await;
    let writer = world.client(ORG_A, node.addr()).await;
    let auditor = world.client(HOST, node.addr()).await;
    for i in 0..10 {
        writer
            .upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    let before = auditor.audit_tree_head(true).await.unwrap();

    // The disk refuses every write of this node (and of no other node in this process).
    let failing = format!("return({})", config.data_dir.display());
    fail::cfg("store::write", &failing).unwrap();
    let refused = writer
        .upsert(pointer(&patient_id(100), ORG_A, 1, &["medications"]))
        .await
        .unwrap_err();
    assert_eq!(code(&refused), tonic::Code::Unavailable, "{refused}");
    let lookup_refused = writer.lookup(lookup(&patient_id(1))).await.unwrap_err();
    assert_eq!(
        code(&lookup_refused),
        tonic::Code::Unavailable,
        "{lookup_refused}"
    );
    assert!(
        lookup_refused.to_string().contains("audit log"),
        "says why: {lookup_refused}"
    );
    fail::remove("store::write");

    // Space is back: the same node takes writes again; nothing acknowledged changed and
    // nothing refused was stored.
    writer
        .upsert(pointer(&patient_id(101), ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    for i in (0..10).chain([101]) {
        let found = writer.lookup(lookup(&patient_id(i))).await.unwrap();
        assert_eq!(found.pointers.len(), 1, "patient {i}");
    }
    assert!(
        writer
            .lookup(lookup(&patient_id(100)))
            .await
            .unwrap()
            .pointers
            .is_empty(),
        "the refused write was not made"
    );
    let after = auditor.audit_tree_head(true).await.unwrap();
    let proof: Vec<[u8; 32]> = auditor
        .audit_consistency_proof(before.size, after.size)
        .await
        .unwrap()
        .iter()
        .map(|h| h.as_slice().try_into().unwrap())
        .collect();
    let key = HeadVerifier::load(world.path().join("audit").join("public-key.pem")).unwrap();
    let (old, new) = (
        pil_client::audit_verify::check_head(&before.note, &key).unwrap(),
        pil_client::audit_verify::check_head(&after.note, &key).unwrap(),
    );
    verify_consistency(
        old.head.size,
        new.head.size,
        &old.head.root,
        &new.head.root,
        &proof,
    )
    .unwrap();
    let report = verify_whole_log(&auditor, &key).await;
    assert!(report.is_ok(), "{:?}", report.first_problem);
    drop((writer, auditor));
    node.stop().await;
}

/// Unmounts the small disk when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_clearly_and_writes_resume_when_space_returns() {
    if on_postgres() {
        return;
    }
    let world = World::new();
    let disk = world.path().join("small-disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m", "tmpfs"])
        .arg(&disk)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("this machine does not let the test mount a tmpfs; the full disk is not tried");
        return;
    }
    let _unmount = Mounted(disk.clone());
    let mut config = world.config(true);
    config.data_dir = disk.join("data");
    let node = TestNode::start(config).await;
    let writer = world.client(ORG_A, node.addr()).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        writer
            .upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
        acked.push(i);
    }

    // Fill the disk.
    let filler = disk.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refusal = None;
    for i in 10..2_000u64 {
        match writer
            .upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
        {
            Ok(_) => acked.push(i),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("a write is refused once the disk is full");
    assert_eq!(code(&refusal), tonic::Code::Unavailable, "{refusal}");

    // Space returns: the same node takes writes again, within a bounded wait.
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = false;
    for _ in 0..60 {
        if writer
            .upsert(pointer(&patient_id(5_000), ORG_A, 1, &["medications"]))
            .await
            .is_ok()
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        resumed,
        "writes resume without a restart once space returns"
    );
    for i in acked {
        let found = writer.lookup(lookup(&patient_id(i))).await.unwrap();
        assert_eq!(found.pointers.len(), 1, "acknowledged write {i}");
    }
    // The log has no gap or damage from the writes the disk refused.
    let auditor = world.client(HOST, node.addr()).await;
    auditor.audit_tree_head(true).await.unwrap();
    let key = HeadVerifier::load(world.path().join("audit").join("public-key.pem")).unwrap();
    let report = verify_whole_log(&auditor, &key).await;
    assert!(report.is_ok(), "{:?}", report.first_problem);
    drop((writer, auditor));
    node.stop().await;
}
