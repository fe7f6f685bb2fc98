//! Rotating the pseudonym key while the node serves: every patient moves to the new
//! key in the background, and continuous lookups find every pointer and honour every
//! opt-out at every moment; writes during the move land under the new key; audit
//! search by patient finds records from before and after; the earlier key is retired
//! once re-keying is done, and the node restarts on the rotated ring.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use pil_proto::v1;
use pil_tests::*;

/// Patients stored before the rotation.
const PATIENTS: u64 = 3000;

async fn progress(config: &str) -> serde_json::Value {
    let out = pil_node(&["pseudonym-key", "progress", "--config", config, "--json"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("progress JSON")
}

/// Looks up every patient in turn until `stop`, counting lookups and anything missed:
/// patient 0 has opted out; every other one has exactly its one pointer.
fn keep_looking(
    doctor: pil_client::PilClient,
    stop: Arc<AtomicBool>,
    lookups: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut missed = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let seed = i % PATIENTS;
            let r = doctor.lookup(lookup(&patient_id(seed))).await.unwrap();
            let fine = if seed == 0 {
                r.opted_out && r.pointers.is_empty()
            } else {
                !r.opted_out && r.pointers.len() == 1
            };
            if !fine {
                missed.push(format!(
                    "patient {seed}: opted out {}, {} pointers",
                    r.opted_out,
                    r.pointers.len()
                ));
            }
            lookups.fetch_add(1, Ordering::SeqCst);
            // Spread over the store rather than walking it in the re-keyer's order.
            i += 7919;
        }
        missed
    })
}

async fn lookups_of(auditor: &pil_client::PilClient, seed: u64) -> usize {
    let page = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                patient: Some(patient_id(seed)),
                actions: vec!["lookup".into()],
                ..Default::default()
            }),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    page.records.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pseudonym_key_rotation_under_continuous_lookups_never_misses_a_pointer() {
    let world = World::new();
    let config = world.region_config("vest");
    let node = ProcessNode::start(&config, world.path());
    let config_file = world.path().join("node.toml").display().to_string();
    let writer = world.client(ORG_A, node.addr).await;
    let batches: Vec<Vec<v1::Pointer>> = (0..PATIENTS)
        .map(|i| pointer(&patient_id(i), ORG_A, 1, &["medications"]))
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|c| c.to_vec())
        .collect();
    let sync = writer
        .sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
            futures::stream::iter(batches),
        )
        .await
        .unwrap();
    assert_eq!(sync.inserted, PATIENTS);
    // Two patients followed by a subscription made before the rotation.
    let (followed, removed) = (patient_id(PATIENTS + 1), patient_id(PATIENTS + 2));
    for p in [&followed, &removed] {
        writer
            .upsert(pointer(p, ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    let gp = world.client(ORG_C, node.addr).await;
    let sub = gp
        .subscribe(v1::SubscribeRequest {
            patients: vec![followed.clone(), removed.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .subscription
        .unwrap();
    let operator = world.client(OPERATOR, node.addr).await;
    operator.set_opt_out(patient_id(0), "").await.unwrap();
    let doctor = world.client(ORG_A, node.addr).await;
    doctor.lookup(lookup(&patient_id(5))).await.unwrap();
    let before = progress(&config_file).await;
    assert_eq!(before["state"], "idle", "{before:#}");

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let looking = keep_looking(doctor.clone(), stop.clone(), lookups.clone());

    // Rotate: a new key in force, the old one earlier; the reload starts re-keying.
    let out = pil_node(&["pseudonym-key", "rotate", "--config", &config_file]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let reloaded = operator.reload_legal_config().await.expect("reload");
    let rotated = progress(&config_file).await;
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, before["key"].as_str().unwrap());
    assert_eq!(rotated["earlier"][0], before["key"], "{rotated:#}");
    assert!(
        reloaded
            .detail
            .contains(&format!("pseudonym key {new_key}")),
        "{}",
        reloaded.detail
    );

    // Writes while patients move: updates land under the new key, as updates.
    let mut during = 0;
    for i in (1..PATIENTS).step_by(97) {
        let r = writer
            .upsert(pointer(&patient_id(i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
        assert_eq!(r.outcome(), v1::WriteOutcome::Unchanged, "patient {i}");
        during += 1;
    }
    // Changes to followed patients while they move still make their events.
    writer
        .upsert(pointer(
            &followed,
            ORG_A,
            1,
            &["medications", "lab-results"],
        ))
        .await
        .unwrap();
    let gone = writer
        .delete(v1::DeletePointerRequest {
            patient: Some(removed.clone()),
            holder: pointer(&removed, ORG_A, 1, &[]).holder,
            endpoint: pointer(&removed, ORG_A, 1, &[]).endpoint,
        })
        .await
        .unwrap();
    assert!(gone);
    let lookups_at_rotation = lookups.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let p = progress(&config_file).await;
        if p["state"] == "done" {
            break p;
        }
        assert_ne!(p["state"], "failed", "{p:#}");
        assert!(Instant::now() < deadline, "re-keying did not finish: {p:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Lookups went on until well after re-keying finished.
    let at_done = lookups.load(Ordering::SeqCst);
    while lookups.load(Ordering::SeqCst) < at_done + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let missed = looking.await.unwrap();
    assert!(missed.is_empty(), "missed during rotation: {missed:?}");
    assert!(at_done > lookups_at_rotation, "no lookups while re-keying");
    assert_eq!(done["unidentified"], 0, "{done:#}");
    let moved = done["patients_moved"].as_u64().unwrap();
    // Every patient moved, by the re-keyer or by a write to them.
    let stored = PATIENTS + 2;
    assert!(
        moved + during + 2 >= stored && moved <= stored,
        "{moved} moved: {done:#}"
    );
    // After re-keying too, and none missed.
    writer
        .upsert(pointer(&followed, ORG_A, 1, &["lab-results"]))
        .await
        .unwrap();
    let events = gp.pull_events(&sub.id, 0, 100).await.unwrap();
    let kinds: Vec<v1::EventKind> = events
        .events
        .iter()
        .map(|e| v1::EventKind::try_from(e.kind).unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            v1::EventKind::PointerChanged,
            v1::EventKind::PointerRemoved,
            v1::EventKind::PointerChanged
        ]
    );
    assert!(
        events.events.iter().all(|e| e
            .patient
            .as_ref()
            .is_some_and(|p| *p == followed || *p == removed)),
        "events name their patients: {events:?}"
    );
    assert_eq!(done["protections_moved"], 1, "the opt-out moved: {done:#}");

    // The patient's audit records from before the rotation are still theirs.
    doctor.lookup(lookup(&patient_id(5))).await.unwrap();
    let auditor = world.client(HOST, node.addr).await;
    let seen = lookups_of(&auditor, 5).await;
    assert!(seen >= 2, "records of patient 5 before and after: {seen}");

    // Retired once done: the registry is read under the new key alone, and audit
    // search still finds what was filed under the old one.
    let out = pil_node(&["pseudonym-key", "retire", "--config", &config_file]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    operator.reload_legal_config().await.expect("reload");
    let retired = progress(&config_file).await;
    assert_eq!(retired["retired"][0], before["key"], "{retired:#}");
    assert!(retired["earlier"].as_array().unwrap().is_empty());
    assert_eq!(lookups_of(&auditor, 5).await, seen);
    let stop = Arc::new(AtomicBool::new(false));
    let looking = keep_looking(doctor.clone(), stop.clone(), lookups.clone());
    let from = lookups.load(Ordering::SeqCst);
    while lookups.load(Ordering::SeqCst) < from + PATIENTS / 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let missed = looking.await.unwrap();
    assert!(missed.is_empty(), "missed after retiring: {missed:?}");

    // A retire without re-keying done is refused; so is a ring that drops the key
    // in force, and the node keeps serving on its ring.
    let out = pil_node(&["pseudonym-key", "retire", "--config", &config_file]).await;
    assert!(!out.status.success());
    let key_file = &config.keys.pseudonym_key_file;
    let kept = std::fs::read_to_string(key_file).unwrap();
    write_private(key_file, &format!("{}\n", hex::encode([7u8; 32])));
    let err = operator
        .reload_legal_config()
        .await
        .expect_err("a ring without the key in force");
    assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains(&new_key), "{err}");
    write_private(key_file, &kept);

    // The node starts again on the rotated ring and finds everything.
    assert!(node.terminate().success());
    let node = ProcessNode::start(&config, world.path());
    let doctor = world.client(ORG_A, node.addr).await;
    for seed in (1..PATIENTS).step_by(13) {
        let r = doctor.lookup(lookup(&patient_id(seed))).await.unwrap();
        assert_eq!(r.pointers.len(), 1, "patient {seed} after restart");
    }
    let r = doctor.lookup(lookup(&patient_id(0))).await.unwrap();
    assert!(r.opted_out);
    assert!(node.terminate().success());
}
