//! No plain patient identifier in the data directory (RocksDB's, or the PostgreSQL
//! server's) or the logs.

use pil_client::v1;
use pil_tests::*;

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_patient_identifier_in_storage_or_logs() {
    let world = World::new();
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let a = world.client(ORG_A, node.addr).await;
    let patients: Vec<v1::PatientIdentifier> = (0..200).map(|i| patient_id(4000 + i)).collect();
    for p in &patients {
        a.upsert(pointer(p, ORG_A, 1, &["mental-health"]))
            .await
            .unwrap();
        a.lookup(lookup(p)).await.unwrap();
    }
    // Some refused requests too: error paths must not log identifiers either.
    let mut bad = pointer(&patients[0], ORG_A, 1, &["nonsense"]);
    a.upsert(bad.clone()).await.unwrap_err();
    bad.holder.as_mut().unwrap().organization_number = ORG_B.into();
    a.upsert(bad).await.unwrap_err();
    drop(a);
    let log = node.log.clone();
    // A clean stop flushes memtables into SST files, so both the WAL and the tables
    // have been written when we look.
    assert!(node.terminate().success());
    let log = log.lock().unwrap().clone();

    let files = match &world.postgres {
        // The whole server: tables, indexes and write-ahead log.
        Some(pg) => files_under(&pg.data_dir()),
        None => {
            let files = files_under(&config.data_dir);
            assert!(
                files
                    .iter()
                    .any(|f| f.extension().is_some_and(|e| e == "sst" || e == "log"))
            );
            files
        }
    };
    // One pass per file: a run of 11 digits is looked up among the identifiers.
    let wanted: std::collections::HashSet<&[u8]> =
        patients.iter().map(|p| p.value.as_bytes()).collect();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut digits = 0usize;
        for (i, b) in bytes.iter().enumerate() {
            digits = if b.is_ascii_digit() { digits + 1 } else { 0 };
            if digits >= 11 {
                assert!(
                    !wanted.contains(&bytes[i + 1 - 11..=i]),
                    "patient identifier found in {}",
                    file.display()
                );
            }
        }
    }
    assert!(log.contains("node serving"), "log was captured");
    for p in &patients {
        assert!(!log.contains(&p.value), "patient identifier in the log");
    }
}
