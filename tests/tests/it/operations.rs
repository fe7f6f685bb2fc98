//! The operator's commands on the node's machine: `pil-node status`, and a backup
//! taken while the node serves writes, restored into a stopped node.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use pil_proto::v1;
use pil_tests::*;
use pil_transparency::HeadVerifier;

fn config_file(world: &World) -> String {
    world.path().join("node.toml").display().to_string()
}

async fn status(world: &World) -> serde_json::Value {
    let out = pil_node(vec![
        "status".into(),
        "--config".into(),
        config_file(world),
        "--json".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Every patient seed with a pointer of `org`, as exported.
async fn exported(client: &pil_client::PilClient, org: &str) -> BTreeSet<String> {
    let mut stream = client.export(org).await.unwrap();
    let mut patients = BTreeSet::new();
    while let Some(page) = stream.next().await {
        for p in page.unwrap() {
            patients.insert(p.patient.unwrap().value);
        }
    }
    patients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_the_node_is_doing() {
    let world = World::new();
    let config = world.region_config("vest");
    let node = ProcessNode::start(&config, world.path());
    let writer = world.client(ORG_A, node.addr).await;
    writer
        .upsert(pointer(&patient_id(1), ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let s = status(&world).await;
    assert_eq!(s["region"], "vest");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        s["engine"],
        if on_postgres() { "postgres" } else { "rocksdb" }
    );
    assert!(s["audit"]["records"].as_u64().unwrap() >= 2, "{s:#}");
    assert!(s["writer"]["groups"].as_u64().unwrap() >= 1, "{s:#}");
    assert!(
        s["issuer_key_ids"]
            .as_array()
            .is_some_and(|k| !k.is_empty()),
        "{s:#}"
    );
    assert_eq!(
        s["certificate"]["sha256"].as_str().unwrap().len(),
        64,
        "{s:#}"
    );
    assert!(s["restored"].is_null(), "{s:#}");
    // One pseudonym key, named by its id, and nothing to re-key.
    assert_eq!(
        s["pseudonym_keys"]["key"].as_str().unwrap().len(),
        8,
        "{s:#}"
    );
    assert_eq!(s["pseudonym_keys"]["state"], "idle", "{s:#}");
    // The text form says the same for a person.
    let out = pil_node(vec![
        "status".into(),
        "--config".into(),
        config_file(&world),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("serving region vest"),
        "{}",
        output_text(&out)
    );

    // With the node stopped, status says the node cannot be reached.
    assert!(node.terminate().success());
    let out = pil_node(vec![
        "status".into(),
        "--config".into(),
        config_file(&world),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is it running"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_write_load_restores_every_acknowledged_pointer() {
    let world = World::new();
    let config = world.region_config("vest");
    let node = ProcessNode::start(&config, world.path());
    let addr = node.addr;
    let backup_dir = world.path().join("backup-1");
    let backup_args = vec![
        "backup".to_string(),
        "--config".into(),
        config_file(&world),
        "--to".into(),
        backup_dir.display().to_string(),
        "--json".into(),
    ];
    if on_postgres() {
        // A PostgreSQL region is backed up with the database's own tools.
        let out = pil_node(backup_args).await;
        assert!(!out.status.success());
        assert!(
            output_text(&out).contains("database's own tools"),
            "{}",
            output_text(&out)
        );
        return;
    }

    // Writes go on while the backup is taken; each acknowledged one is remembered
    // with whether the backup had begun.
    let writer = world.client(ORG_A, addr).await;
    for i in 0..100 {
        writer
            .upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    let began = Arc::new(AtomicBool::new(false));
    let before: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (began, before, stop) = (began.clone(), before.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 100;
            while !stop.load(Ordering::SeqCst) {
                let patient = patient_id(i);
                // Read before the write is sent: a write acknowledged while this says
                // "not yet" was sent, and so acknowledged, before the backup began.
                let sent_before = !began.load(Ordering::SeqCst);
                writer
                    .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
                    .await
                    .unwrap();
                if sent_before {
                    before.lock().unwrap().push(patient.value);
                }
                i += 1;
            }
            i
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let auditor = world.client(HOST, addr).await;
    let head_before = auditor.audit_tree_head(true).await.unwrap();
    began.store(true, Ordering::SeqCst);
    let out = pil_node(backup_args).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(manifest["region"], "vest");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let written = load.await.unwrap();
    let acknowledged_before: BTreeSet<String> = before
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .chain((0..100).map(|i| patient_id(i).value))
        .collect();
    assert!(written > 100, "no writes during the test");
    // A backup into a directory that holds something is refused, and says why.
    let out = pil_node(vec![
        "backup".into(),
        "--config".into(),
        config_file(&world),
        "--to".into(),
        backup_dir.display().to_string(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not empty"),
        "{}",
        output_text(&out)
    );

    // Restore needs the node stopped, and a data directory that holds data is only
    // replaced when asked for.
    let restore = |replace: bool| {
        let mut args = vec![
            "restore".to_string(),
            "--config".into(),
            config_file(&world),
            "--from".into(),
            backup_dir.display().to_string(),
        ];
        if replace {
            args.push("--replace".into());
        }
        pil_node(args)
    };
    let out = restore(true).await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("stop it before restoring"),
        "{}",
        output_text(&out)
    );
    assert!(node.terminate().success());
    let out = restore(false).await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("--replace"),
        "{}",
        output_text(&out)
    );
    let out = restore(true).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let kept = std::fs::read_dir(config.data_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.before-restore-")
        });
    assert!(kept, "the replaced data directory is kept");

    // The restored node serves every pointer acknowledged before the backup began,
    // says at start that later records are lost, and its log verifies and extends
    // the head signed before the backup.
    let node = ProcessNode::start(&config, world.path());
    assert!(
        node.log_text().contains("starting on a restored store"),
        "{}",
        node.log_text()
    );
    let client = world.client(ORG_A, node.addr).await;
    let served = exported(&client, ORG_A).await;
    let missing: Vec<&String> = acknowledged_before.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "lost {} acknowledged pointers",
        missing.len()
    );
    let auditor = world.client(HOST, node.addr).await;
    let verifier = HeadVerifier::load(
        config
            .audit
            .signing_key_file
            .with_file_name("public-key.pem"),
    )
    .unwrap();
    let heads = auditor.audit_tree_heads().await.unwrap();
    let entries: Vec<v1::LogEntry> = auditor
        .audit_read_log(0)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    let report = pil_client::verify_log(&entries, &heads, &verifier);
    assert!(report.is_ok(), "{report:?}");
    let now = auditor.audit_tree_head(true).await.unwrap();
    let (old, new) = (
        verifier.verify_note(&head_before.note).unwrap(),
        verifier.verify_note(&now.note).unwrap(),
    );
    let proof = auditor
        .audit_consistency_proof(old.head.size, new.head.size)
        .await
        .unwrap();
    pil_client::audit_verify::check_consistency(&old, &new, &proof)
        .expect("consistent with the head before");
    // The backup and the restore are in the audit log.
    let details: Vec<String> = entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&e.record).ok())
        .filter(|r| r["action"] == "backup")
        .map(|r| r["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(details.iter().any(|d| d.contains("started")), "{details:?}");
    assert!(
        details.iter().any(|d| d.contains("was restored")),
        "{details:?}"
    );
    let s = status(&world).await;
    assert!(
        s["restored"].as_str().is_some_and(|r| r.contains("lost")),
        "{s:#}"
    );
    drop(node);
}
