//! The audit log with real nodes: every request leaves its record (a change two: one
//! before it is made, one with its outcome), records
//! survive `kill -9`, tampering with the stored log is found and named, proofs verify
//! with only the node's public key, search and export agree, FHIR exports validate,
//! and only auditors may read the log.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use futures::StreamExt;
use pil_client::{
    LogProblem, LogVerifier, PilClient,
    audit_verify::{self, ProofCheckError},
    v1,
};
use pil_tests::*;

use crate::pil;
use pil_transparency::{HeadVerifier, leaf_hash, verify_consistency, verify_inclusion};
use serde_json::Value;
use tonic::Code;

// ---------------------------------------------------------------------------------
// Helpers

fn public_key(world: &World) -> PathBuf {
    world.path().join("audit").join("public-key.pem")
}

fn verifier(world: &World) -> HeadVerifier {
    HeadVerifier::load(public_key(world)).expect("the node's public key")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the CLI succeeded and returns its stdout.
pub(crate) fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "pil failed: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    stdout(&out)
}

/// Asserts the CLI failed with one error line and returns that line.
pub(crate) fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "pil succeeded: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err.trim().to_string()
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

async fn read_log(auditor: &PilClient, from: u64) -> Vec<v1::LogEntry> {
    auditor
        .audit_read_log(from)
        .await
        .expect("read log")
        .map(|e| e.expect("log entry"))
        .collect()
        .await
}

/// Every page of a search, newest first.
async fn search_all(auditor: &PilClient, filter: v1::AuditFilter, page: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let resp = auditor
            .audit_search(v1::SearchAuditRequest {
                filter: Some(filter.clone()),
                page_size: page,
                page_token: token,
            })
            .await
            .expect("search");
        assert!(resp.records.len() <= page as usize);
        out.extend(resp.records.iter().map(|r| json(r)));
        if resp.next_page_token.is_empty() {
            return out;
        }
        token = resp.next_page_token;
    }
}

fn indexes(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r["index"].as_u64().expect("index"))
        .collect()
}

fn reviews_filter() -> v1::AuditFilter {
    v1::AuditFilter {
        actions: vec!["audit_review".into()],
        ..Default::default()
    }
}

fn lookups_filter() -> v1::AuditFilter {
    v1::AuditFilter {
        actions: vec!["lookup".into()],
        ..Default::default()
    }
}

/// RFC 3339 UTC with milliseconds, within the last `minutes`.
fn assert_recent_time(r: &Value) {
    let t = r["time"].as_str().expect("time");
    assert!(
        t.len() == 24 && t.ends_with('Z') && t.as_bytes()[19] == b'.',
        "time {t:?}: RFC 3339, UTC, milliseconds"
    );
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let age = time::OffsetDateTime::now_utc() - at;
    assert!(
        age >= -time::Duration::seconds(5) && age <= time::Duration::minutes(10),
        "time {t} is not now"
    );
}

/// The fields every record has.
fn assert_record(r: &Value, action: &str, caller: &str, status: &str, decision: &str) {
    assert_eq!(r["action"], action, "{r:#}");
    assert_eq!(r["region"], "test", "{r:#}");
    assert_eq!(r["caller"]["organization"], caller, "{r:#}");
    assert!(r["caller"].get("node_region").is_none(), "{r:#}");
    assert_eq!(r["outcome"]["status"], status, "{r:#}");
    assert_eq!(r["decision"]["outcome"], decision, "{r:#}");
    assert!(
        r["query_id"].as_str().is_some_and(|q| !q.is_empty()),
        "{r:#}"
    );
    assert_recent_time(r);
}

/// The record names the patient by a keyed pseudonym, never by the identifier.
fn assert_pseudonym(r: &Value, patient: &v1::PatientIdentifier) -> String {
    let p = r["patient"]
        .as_str()
        .unwrap_or_else(|| panic!("no patient: {r:#}"));
    assert_eq!(p.len(), 32, "16-byte pseudonym in hex: {p}");
    assert!(
        p.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(p, patient.value);
    let text = r.to_string();
    assert!(
        !text.contains(&patient.value),
        "the identifier leaked into the record: {text}"
    );
    p.to_string()
}

/// Reads the log as it grows, request by request. Each read is itself recorded (as
/// the auditor's `audit_access`); the next read checks that record and leaves it
/// out, so what is returned is exactly what the requests in between left.
struct Tail {
    auditor: PilClient,
    next: u64,
    /// The previous read's own record: its index and the index it read from.
    own: Option<(u64, u64)>,
}

impl Tail {
    async fn new(auditor: PilClient) -> Self {
        let mut tail = Self {
            auditor,
            next: 0,
            own: None,
        };
        tail.records().await;
        tail
    }

    async fn records(&mut self) -> Vec<Value> {
        let from = self.next;
        let entries = read_log(&self.auditor, from).await;
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.index, from + i as u64, "consecutive entries");
            assert_eq!(e.leaf_hash, leaf_hash(&e.record).to_vec(), "leaf hash");
            let r = json(&e.record);
            assert_eq!(r["index"], e.index, "the record knows its index");
            if let Some((own, read_from)) = self.own
                && own == e.index
            {
                assert_record(&r, "audit_access", HOST, "OK", "not_applicable");
                assert_eq!(r["detail"], format!("read log from {read_from}"));
                continue;
            }
            out.push(r);
        }
        let size = from + entries.len() as u64;
        if let Some((own, _)) = self.own {
            assert!(size > own, "the previous read was recorded");
        }
        self.own = Some((size, from));
        self.next = size;
        out
    }

    /// A registry change since the last read: the record made before the change
    /// (`STARTED`) and the one with its outcome, with one query id. Returns the latter.
    async fn change(&mut self) -> Value {
        let records = self.records().await;
        assert_eq!(
            records.len(),
            2,
            "a change leaves two records: {records:#?}"
        );
        let (first, outcome) = (&records[0], &records[1]);
        assert_eq!(first["outcome"]["status"], "STARTED", "{first:#}");
        assert_eq!(first["action"], outcome["action"]);
        assert_eq!(first["query_id"], outcome["query_id"]);
        assert_eq!(first["patient"], outcome["patient"]);
        assert_eq!(first["caller"], outcome["caller"]);
        records[1].clone()
    }

    /// Exactly one record since the last read.
    async fn one(&mut self) -> Value {
        let records = self.records().await;
        assert_eq!(records.len(), 1, "exactly one record: {records:#?}");
        records.into_iter().next().unwrap()
    }
}

/// The RocksDB of a stopped node, with every column family open.
fn open_db(data_dir: &Path) -> rocksdb::DB {
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, data_dir).expect("list column families");
    assert!(cfs.iter().any(|c| c == "audit_records"), "{cfs:?}");
    rocksdb::DB::open_cf(&opts, data_dir, &cfs).expect("open the node's database")
}

fn record_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Key of a leaf hash in `audit_nodes`: level 0, index.
fn leaf_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// A node with some history (writes and lookups across several signed heads),
/// stopped cleanly so it signed its final head. Returns the indexes of the lookups.
async fn stopped_node_with_history(world: &World) -> Vec<u64> {
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let host = world.client(HOST, node.addr).await;
    let doctor = world.client(ORG_A, node.addr).await;
    for i in 0..6 {
        host.upsert(pointer(&patient_id(i), ORG_C, 1, &["medications"]))
            .await
            .unwrap();
        doctor.lookup(lookup(&patient_id(i))).await.unwrap();
        if i % 2 == 1 {
            // The node signs a head every second: several heads over the history.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
    }
    let entries = read_log(&host, 0).await;
    drop((host, doctor));
    assert!(node.terminate().success(), "clean shutdown");
    let lookups: Vec<u64> = entries
        .iter()
        .filter(|e| json(&e.record)["action"] == "lookup")
        .map(|e| e.index)
        .collect();
    assert_eq!(lookups.len(), 6);
    lookups
}

/// Verifies the restarted node's log through the library: the report.
async fn library_verify(world: &World, node: &TestNode) -> pil_client::VerifyReport {
    let auditor = world.client(HOST, node.addr()).await;
    let heads = auditor.audit_tree_heads().await.unwrap();
    let mut check = LogVerifier::new(&heads, &verifier(world));
    for e in read_log(&auditor, 0).await {
        check.push(&e);
    }
    check.finish()
}

/// Tampers with a stopped node's log, restarts it, and returns the CLI's error line
/// and the library's report.
async fn tamper_and_verify(
    world: &World,
    tamper: impl FnOnce(&rocksdb::DB),
) -> (String, pil_client::VerifyReport) {
    {
        let db = open_db(&world.config(true).data_dir);
        tamper(&db);
        db.flush_cf(db.cf_handle("audit_records").unwrap()).unwrap();
    }
    restart_and_verify(world).await
}

/// [`tamper_and_verify`] for a node on PostgreSQL: `sql` runs on its database.
/// Runs each statement on the stopped node's database; each changes `rows` rows.
async fn tamper_sql(world: &World, statements: &[(&str, u64)]) {
    let url = world
        .config(true)
        .storage
        .postgres
        .expect("on PostgreSQL")
        .url;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the node's database");
    tokio::spawn(connection);
    for (sql, rows) in statements {
        let changed = client.execute(*sql, &[]).await.expect("tamper");
        assert_eq!(changed, *rows, "rows tampered with: {sql}");
    }
}

async fn tamper_sql_and_verify(
    world: &World,
    statements: &[(&str, u64)],
) -> (String, pil_client::VerifyReport) {
    tamper_sql(world, statements).await;
    restart_and_verify(world).await
}

async fn restart_and_verify(world: &World) -> (String, pil_client::VerifyReport) {
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(HOST, node.addr());
    let key = public_key(world);
    let err = fails(pil(
        &profile,
        &["audit", "verify", "--public-key", key.to_str().unwrap()],
    ));
    let report = library_verify(world, &node).await;
    node.stop().await;
    (err, report)
}

/// The Python that validates FHIR AuditEvents: `$PIL_FHIR_PYTHON`, else the venv
/// `.ci/setup` makes, made here if missing.
fn fhir_python() -> PathBuf {
    python_venv(
        "PIL_FHIR_PYTHON",
        "pil-fhir-venv",
        &package_dir().join("fhir/setup-venv.sh"),
    )
}

// ---------------------------------------------------------------------------------
// One record per request

#[tokio::test]
async fn every_request_leaves_its_records_with_their_fields() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let host = world.client(HOST, addr).await;
    let doctor = world.client(ORG_A, addr).await;
    let operator = world.client(OPERATOR, addr).await;
    let mut tail = Tail::new(world.client(HOST, addr).await).await;
    let patient = patient_id(42);

    // Upsert (HOST writes for ORG_C).
    host.upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    let r = tail.change().await;
    assert_record(&r, "pointer_upsert", HOST, "OK", "not_applicable");
    let pseudonym = assert_pseudonym(&r, &patient);
    assert_eq!(r["outcome"]["pointers"], 1);
    assert_eq!(r["detail"], format!("holder {ORG_C}"));
    assert!(r.get("requester").is_none());
    host.upsert(pointer(&patient, ORG_C, 2, &["allergies"]))
        .await
        .unwrap();
    tail.change().await;

    // An allowed lookup: who, why, what was decided and returned.
    let answer = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(answer.pointers.len(), 2);
    let r = tail.one().await;
    assert_record(&r, "lookup", ORG_A, "OK", "allowed");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym, "same patient");
    assert_eq!(r["query_id"], answer.query_id);
    let q = &r["requester"];
    assert_eq!(q["organization"], ORG_A, "{r:#}");
    assert_eq!(q["hpr_number"], HPR);
    assert_eq!(q["profession"], "LE");
    assert_eq!(q["purpose_of_use"]["code"], "TREAT");
    assert!(
        q["purpose_of_use"]["system"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert_eq!(q["care_relationship"], true);
    assert!(q["client_id"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(r["decision"]["emergency"], false);
    let rules = r["decision"]["rules"].as_array().expect("rules");
    assert!(!rules.is_empty());
    for rule in rules {
        assert!(rule["id"].as_str().is_some_and(|s| !s.is_empty()), "{rule}");
        assert!(
            rule["legal_basis"].as_str().is_some_and(|s| !s.is_empty()),
            "{rule}"
        );
        assert_eq!(rule["effect"], "permit", "{rule}");
    }
    let recorded: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for rule in &answer.rules {
        assert!(recorded.contains(&rule.id.as_str()), "{recorded:?}");
    }
    assert_eq!(r["outcome"]["pointers"], 2);
    assert_eq!(r["outcome"]["organizations"], serde_json::json!([ORG_C]));
    assert!(r.get("peers_asked").is_none() && r.get("forwarded_by").is_none());

    // Emergency access is flagged.
    let emergency = world
        .client_as(ORG_A, addr, |p| {
            p.purpose = "ETREAT".into();
            p.care_relationship = false;
        })
        .await;
    assert!(emergency.lookup(lookup(&patient)).await.unwrap().emergency);
    let r = tail.one().await;
    assert_record(&r, "lookup", ORG_A, "OK", "allowed");
    assert_eq!(r["decision"]["emergency"], true);
    assert_eq!(r["requester"]["purpose_of_use"]["code"], "ETREAT");
    assert_eq!(r["requester"]["care_relationship"], false);

    // A denied lookup.
    let researcher = world
        .client_as(ORG_A, addr, |p| p.purpose = "HRESCH".into())
        .await;
    let e = researcher.lookup(lookup(&patient)).await.unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied);
    let r = tail.one().await;
    assert_record(&r, "lookup", ORG_A, "PERMISSION_DENIED", "denied");
    assert_eq!(r["outcome"]["error_code"], "PIL-DENIED");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);
    assert_eq!(r["requester"]["purpose_of_use"]["code"], "HRESCH");
    assert_eq!(r["outcome"]["pointers"], 0);
    assert!(r["outcome"].get("organizations").is_none());
    assert!(
        r["outcome"]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    let rules = r["decision"]["rules"].as_array().expect("denial's rules");
    assert!(
        rules
            .iter()
            .all(|r| r["legal_basis"].as_str().is_some_and(|s| !s.is_empty()))
    );

    // An unauthenticated lookup (a token that is not one).
    let forger = world
        .client_with_token(ORG_A, addr, "not-a-token".into(), None)
        .await;
    let e = forger.lookup(lookup(&patient)).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated);
    let r = tail.one().await;
    assert_record(&r, "lookup", ORG_A, "UNAUTHENTICATED", "unauthenticated");
    assert_eq!(r["outcome"]["error_code"], "PIL-UNAUTHENTICATED");
    assert!(r.get("requester").is_none(), "no verified requester: {r:#}");
    assert_eq!(r["outcome"]["pointers"], 0);

    // Delete.
    let gone = pointer(&patient, ORG_C, 2, &["allergies"]);
    assert!(
        host.delete(v1::DeletePointerRequest {
            patient: gone.patient.clone(),
            holder: gone.holder.clone(),
            endpoint: gone.endpoint.clone(),
        })
        .await
        .unwrap()
    );
    let r = tail.change().await;
    assert_record(&r, "pointer_delete", HOST, "OK", "not_applicable");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);
    assert_eq!(r["outcome"]["pointers"], 1);

    // Sync.
    let report = doctor
        .sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
            futures::stream::iter(vec![
                (100..103)
                    .map(|i| pointer(&patient_id(i), ORG_A, 1, &["lab-results"]))
                    .collect::<Vec<_>>(),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(report.inserted, 3);
    let r = tail.change().await;
    assert_record(&r, "pointer_sync", ORG_A, "OK", "not_applicable");
    assert_eq!(r["outcome"]["pointers"], 3);
    let detail = r["detail"].as_str().expect("detail");
    assert!(
        detail.contains(ORG_A) && detail.contains("3 inserted"),
        "{detail}"
    );

    // Block create.
    let block = operator
        .create_block(
            patient.clone(),
            v1::Block {
                target: Some(v1::BlockTarget {
                    target: Some(v1::block_target::Target::HprNumber("9144900".into())),
                }),
                reason: "patient's wish".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r = tail.change().await;
    assert_record(&r, "block_create", OPERATOR, "OK", "not_applicable");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);
    let detail = r["detail"].as_str().expect("detail");
    assert!(
        detail.contains(&block.block_id) && detail.contains("9144900"),
        "{detail}"
    );

    // Opt-out.
    operator.set_opt_out(patient.clone(), "").await.unwrap();
    let r = tail.change().await;
    assert_record(&r, "opt_out_set", OPERATOR, "OK", "not_applicable");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);

    // Policy reload.
    let reloaded = operator.reload_legal_config().await.unwrap();
    let r = tail.one().await;
    assert_record(&r, "policy_reload", OPERATOR, "OK", "not_applicable");
    assert!(r.get("patient").is_none());
    assert_eq!(
        r["detail"],
        format!("configuration reloaded: {}", reloaded.detail)
    );

    // Explain.
    let explained = doctor
        .explain(v1::ExplainRequest {
            categories: vec!["medications".into()],
            patient: Some(patient.clone()),
        })
        .await
        .unwrap();
    assert!(explained.allowed && explained.opted_out);
    let r = tail.one().await;
    assert_record(&r, "explain", ORG_A, "OK", "allowed");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);
    assert_eq!(r["requester"]["hpr_number"], HPR);
    assert!(!r["decision"]["rules"].as_array().unwrap().is_empty());

    // An auditor's search is itself recorded, with the patient searched for.
    host.audit_search(v1::SearchAuditRequest {
        filter: Some(v1::AuditFilter {
            patient: Some(patient.clone()),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tail.one().await;
    assert_record(&r, "audit_access", HOST, "OK", "not_applicable");
    assert_eq!(assert_pseudonym(&r, &patient), pseudonym);
    assert!(
        r["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("filter:")),
        "{r:#}"
    );

    // The whole log, as served, verifies.
    let heads = host.audit_tree_heads().await.unwrap();
    let entries = read_log(&host, 0).await;
    let report = pil_client::verify_log(&entries, &heads, &verifier(&world));
    assert!(report.is_ok(), "{report:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_lookup_is_recorded_even_if_the_node_is_killed_right_after() {
    let world = World::new();
    let config = world.config(true);
    let node = ProcessNode::start(&config, world.path());
    let patient = patient_id(7);
    world
        .client(HOST, node.addr)
        .await
        .upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    let doctor = world.client(ORG_A, node.addr).await;
    let answer = doctor.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(answer.pointers.len(), 1);
    node.kill9();

    let node = ProcessNode::start(&config, world.path());
    let auditor = world.client(HOST, node.addr).await;
    let found = search_all(&auditor, lookups_filter(), 100).await;
    assert_eq!(found.len(), 1, "{found:#?}");
    let r = &found[0];
    assert_eq!(r["query_id"], answer.query_id);
    assert_record(r, "lookup", ORG_A, "OK", "allowed");
    assert_eq!(r["outcome"]["pointers"], 1);
    // The restarted node signed what the killed one had not.
    let heads = auditor.audit_tree_heads().await.unwrap();
    let entries = read_log(&auditor, 0).await;
    let report = pil_client::verify_log(&entries, &heads, &verifier(&world));
    assert!(report.is_ok(), "{report:?}");
    let lookup_index = r["index"].as_u64().unwrap();
    assert!(
        report.signed_size > lookup_index,
        "a signed head covers the lookup: {report:?}"
    );
    assert!(node.terminate().success());
}

// ---------------------------------------------------------------------------------
// Tamper evidence

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untampered_log_verifies_after_a_restart() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(HOST, node.addr());
    let key = public_key(&world);
    let out = ok(pil(
        &profile,
        &["audit", "verify", "--public-key", key.to_str().unwrap()],
    ));
    let first = out.lines().next().unwrap_or_default();
    let words: Vec<&str> = first.split(' ').collect();
    assert!(
        first.starts_with("verified ") && first.ends_with(" signed heads") && words.len() == 7,
        "{out}"
    );
    let records: u64 = words[1].parse().unwrap();
    let heads: u64 = words[4].parse().unwrap();
    assert!(records > *lookups.last().unwrap(), "{out}");
    assert!(heads >= 3, "periodic heads and the final one: {out}");

    let out = ok(pil(
        &profile,
        &[
            "--json",
            "audit",
            "verify",
            "--sign-now",
            "--public-key",
            key.to_str().unwrap(),
        ],
    ));
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["problems"], 0);
    // Signed just before; only this verification's own two requests (sign, list
    // heads) are recorded after the head.
    assert_eq!(
        report["records"].as_u64().unwrap() - report["signed_size"].as_u64().unwrap(),
        2,
        "signed now: {report}"
    );

    ok(pil(
        &profile,
        &[
            "audit",
            "verify",
            "--public-key",
            key.to_str().unwrap(),
            "--retention-days",
            "1",
        ],
    ));

    let report = library_verify(&world, &node).await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.removed, 0);

    // Another node's key does not vouch for this log.
    let other = world.path().join("other-key");
    pil_node::audit::write_signing_key(&other).unwrap();
    let err = fails(pil(
        &profile,
        &[
            "audit",
            "verify",
            "--public-key",
            other.join("public-key.pem").to_str().unwrap(),
        ],
    ));
    assert!(err.contains("does not verify with the public key"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_record_is_named() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let k = lookups[2];
    let from = format!("\"hpr_number\":\"{HPR}\"");
    // Cover the tracks: someone else looked the patient up.
    let to = "\"hpr_number\":\"9144900\"";
    let (err, report) = if on_postgres() {
        let sql = format!(
            "UPDATE audit_records SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             '{from}', '{to}'), 'UTF8') WHERE idx = {k}"
        );
        tamper_sql_and_verify(&world, &[(&sql, 1)]).await
    } else {
        tamper_and_verify(&world, |db| {
            let cf = db.cf_handle("audit_records").unwrap();
            let old = db.get_cf(cf, record_key(k)).unwrap().expect("record");
            let text = String::from_utf8(old).unwrap();
            assert!(text.contains(&from), "{text}");
            let new = text.replace(&from, to);
            db.put_cf(cf, record_key(k), new.as_bytes()).unwrap();
        })
        .await
    };
    assert!(
        err.contains(&format!("record {k} was changed")),
        "names record {k}: {err}"
    );
    assert_eq!(report.first_problem, Some(LogProblem::Changed { index: k }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_is_named() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let k = lookups[3];
    let (err, report) = if on_postgres() {
        tamper_sql_and_verify(
            &world,
            &[(&format!("DELETE FROM audit_records WHERE idx = {k}"), 1)],
        )
        .await
    } else {
        tamper_and_verify(&world, |db| {
            let cf = db.cf_handle("audit_records").unwrap();
            assert!(db.get_cf(cf, record_key(k)).unwrap().is_some());
            db.delete_cf(cf, record_key(k)).unwrap();
        })
        .await
    };
    assert!(
        err.contains(&format!("record {k} is missing")),
        "names record {k}: {err}"
    );
    assert_eq!(report.first_problem, Some(LogProblem::Removed { index: k }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_records_are_named() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let (i, j) = (lookups[1], lookups[4]);
    let (err, report) = if on_postgres() {
        let sql = format!(
            "UPDATE audit_records a SET record = b.record FROM audit_records b \
             WHERE (a.idx = {i} AND b.idx = {j}) OR (a.idx = {j} AND b.idx = {i})"
        );
        tamper_sql_and_verify(&world, &[(&sql, 2)]).await
    } else {
        tamper_and_verify(&world, |db| {
            let cf = db.cf_handle("audit_records").unwrap();
            let a = db.get_cf(cf, record_key(i)).unwrap().expect("record i");
            let b = db.get_cf(cf, record_key(j)).unwrap().expect("record j");
            db.put_cf(cf, record_key(i), b).unwrap();
            db.put_cf(cf, record_key(j), a).unwrap();
        })
        .await
    };
    assert!(
        err.contains(&format!(
            "record {i} is out of order: the record at this position claims index {j}"
        )),
        "names records {i} and {j}: {err}"
    );
    assert_eq!(
        report.first_problem,
        Some(LogProblem::WrongIndex {
            index: i,
            claimed: j
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_oldest_records_is_found_with_the_retention_period() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let last = lookups[3];
    // What retention does, years early: drop the oldest contents, keep the hashes.
    if on_postgres() {
        let sql =
            format!("UPDATE audit_records SET record = NULL, patient = NULL WHERE idx <= {last}");
        tamper_sql(&world, &[(&sql, last + 1)]).await;
    } else {
        let db = open_db(&world.config(true).data_dir);
        let cf = db.cf_handle("audit_records").unwrap();
        for index in 0..=last {
            db.delete_cf(cf, record_key(index)).unwrap();
        }
        db.flush_cf(cf).unwrap();
    }
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(HOST, node.addr());
    let key = public_key(&world);
    let key = key.to_str().unwrap();
    // Without the retention period it looks like retention.
    let out = ok(pil(&profile, &["audit", "verify", "--public-key", key]));
    assert!(
        out.contains(&format!(
            "{} oldest records' contents were removed after the retention period",
            last + 1
        )),
        "{out}"
    );
    // With it, the first record younger than a signed head is named.
    let first_head = world
        .client(HOST, node.addr())
        .await
        .audit_tree_heads()
        .await
        .unwrap()[0]
        .size;
    assert!(
        first_head <= last,
        "a head is signed within the deleted range"
    );
    let err = fails(pil(
        &profile,
        &[
            "audit",
            "verify",
            "--public-key",
            key,
            "--retention-days",
            "3653",
        ],
    ));
    assert!(
        err.contains(&format!(
            "record {first_head} is missing: its contents were removed, but it was written after"
        )),
        "{err}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_with_its_leaf_hash_fails_against_the_signed_heads() {
    let world = World::new();
    let lookups = stopped_node_with_history(&world).await;
    let k = lookups[2];
    let (err, report) = if on_postgres() {
        let record = format!(
            "UPDATE audit_records SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             '\"outcome\":\"allowed\"', '\"outcome\":\"denied\"'), 'UTF8') WHERE idx = {k}"
        );
        // RFC 6962's leaf hash: SHA-256 of 0x00 and the record.
        let leaf = format!(
            "UPDATE audit_nodes n SET hash = sha256('\\x00'::bytea || r.record) \
             FROM audit_records r WHERE n.level = 0 AND n.idx = {k} AND r.idx = {k}"
        );
        tamper_sql_and_verify(&world, &[(&record, 1), (&leaf, 1)]).await
    } else {
        tamper_and_verify(&world, |db| {
            let records = db.cf_handle("audit_records").unwrap();
            let old = db.get_cf(records, record_key(k)).unwrap().expect("record");
            let new = String::from_utf8(old)
                .unwrap()
                .replace("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"");
            db.put_cf(records, record_key(k), new.as_bytes()).unwrap();
            let nodes = db.cf_handle("audit_nodes").unwrap();
            assert!(db.get_cf(nodes, leaf_key(k)).unwrap().is_some());
            db.put_cf(nodes, leaf_key(k), leaf_hash(new.as_bytes()))
                .unwrap();
        })
        .await
    };
    match report.first_problem {
        Some(LogProblem::RootMismatch { from, to }) => {
            assert!(from <= k && k < to, "{from}..{to} holds {k}");
            assert!(
                err.contains(&format!(
                    "records {from} to {} do not match the signed tree head of size {to}",
                    to - 1
                )),
                "{err}"
            );
        }
        other => panic!("{other:?}: {err}"),
    }
}

// ---------------------------------------------------------------------------------
// Proofs

#[tokio::test]
async fn inclusion_and_consistency_proofs_verify_with_only_the_public_key() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let host = world.client(HOST, addr).await;
    let doctor = world.client(ORG_A, addr).await;
    for i in 0..5 {
        host.upsert(pointer(&patient_id(i), ORG_C, 1, &["medications"]))
            .await
            .unwrap();
        doctor.lookup(lookup(&patient_id(i))).await.unwrap();
    }
    let key = verifier(&world);

    let old = host.audit_tree_head(true).await.unwrap();
    let old = key
        .verify_note(&old.note)
        .expect("signed by the node's key");
    let size = old.head.size;
    assert!(size >= 10);
    for index in 0..size {
        let answer = host.audit_inclusion_proof(index, size).await.unwrap();
        audit_verify::check_inclusion(&old, index, &answer)
            .unwrap_or_else(|e| panic!("record {index}: {e}"));
        // The same with nothing but the transparency crate.
        let proof: Vec<[u8; 32]> = answer
            .proof
            .iter()
            .map(|h| h.as_slice().try_into().unwrap())
            .collect();
        verify_inclusion(
            &leaf_hash(&answer.record),
            index,
            size,
            &proof,
            &old.head.root,
        )
        .unwrap();
        assert_eq!(json(&answer.record)["index"], index);
        // A changed record does not verify.
        let mut forged = answer.clone();
        forged.record.push(b' ');
        forged.leaf_hash.clear();
        assert!(matches!(
            audit_verify::check_inclusion(&old, index, &forged),
            Err(ProofCheckError::Inclusion { .. })
        ));
    }
    let e = host.audit_inclusion_proof(size, size).await.unwrap_err();
    assert_eq!(code(&e), Code::OutOfRange, "{e}");

    for i in 5..8 {
        doctor.lookup(lookup(&patient_id(i))).await.unwrap();
    }
    let new = host.audit_tree_head(true).await.unwrap();
    let new = key.verify_note(&new.note).unwrap();
    assert!(new.head.size > size);
    let proof = host
        .audit_consistency_proof(size, new.head.size)
        .await
        .unwrap();
    audit_verify::check_consistency(&old, &new, &proof).unwrap();
    let hashes: Vec<[u8; 32]> = proof
        .iter()
        .map(|h| h.as_slice().try_into().unwrap())
        .collect();
    verify_consistency(size, new.head.size, &old.head.root, &new.head.root, &hashes).unwrap();

    // Every head the node ever signed extends the one before.
    let heads = host.audit_tree_heads().await.unwrap();
    assert!(heads.len() >= 2);
    let heads: Vec<_> = heads
        .iter()
        .map(|h| {
            let sth = key.verify_note(&h.note).unwrap();
            assert_eq!(sth.head.size, h.size);
            sth
        })
        .collect();
    for pair in heads.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(a.head.size < b.head.size, "heads grow");
        let proof = host
            .audit_consistency_proof(a.head.size, b.head.size)
            .await
            .unwrap();
        audit_verify::check_consistency(a, b, &proof).unwrap();
    }
    let e = host
        .audit_consistency_proof(0, new.head.size)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::OutOfRange, "{e}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_through_the_cli() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let host = world.client(HOST, addr).await;
    let doctor = world.client(ORG_A, addr).await;
    let patient = patient_id(3);
    host.upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    let answer = doctor.lookup(lookup(&patient)).await.unwrap();
    let index = search_all(&host, lookups_filter(), 10).await[0]["index"]
        .as_u64()
        .unwrap();
    let profile = world.profile(HOST, addr);
    let key = public_key(&world);
    let key = key.to_str().unwrap();
    let saved = world.path().join("head.note");
    let saved = saved.to_str().unwrap();

    let out = ok(pil(
        &profile,
        &[
            "audit",
            "head",
            "--sign-now",
            "--out",
            saved,
            "--public-key",
            key,
        ],
    ));
    assert!(out.contains("saved the signed tree head of size"), "{out}");
    let note = std::fs::read_to_string(saved).unwrap();
    let old = verifier(&world).verify_note(&note).unwrap();
    assert!(old.head.size > index);
    let printed = ok(pil(&profile, &["audit", "head"]));
    assert!(printed.starts_with("pil-audit/test\n"), "{printed}");
    verifier(&world).verify_note(&printed).unwrap();

    // Against the newest head, and against the saved one.
    let index_arg = index.to_string();
    for head in [None, Some(saved)] {
        let mut args = vec!["audit", "prove", "--index", &index_arg, "--public-key", key];
        if let Some(h) = head {
            args.extend(["--head", h]);
        }
        let out = ok(pil(&profile, &args));
        assert!(
            out.starts_with(&format!(
                "record {index} is included in the signed tree of size"
            )),
            "{out}"
        );
        assert!(out.contains(&answer.query_id), "prints the record: {out}");
    }
    let out = ok(pil(
        &profile,
        &[
            "--json",
            "audit",
            "prove",
            "--index",
            &index.to_string(),
            "--public-key",
            key,
        ],
    ));
    let proved: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(proved["included"], true);
    assert_eq!(proved["record"]["query_id"], answer.query_id);

    // A record the saved head does not cover.
    let beyond = old.head.size.to_string();
    let err = fails(pil(
        &profile,
        &[
            "audit",
            "prove",
            "--index",
            &beyond,
            "--public-key",
            key,
            "--head",
            saved,
        ],
    ));
    assert!(
        err.contains("is not covered by the signed tree head"),
        "{err}"
    );

    // More activity, then the log still extends the saved head.
    for i in 10..13 {
        doctor.lookup(lookup(&patient_id(i))).await.unwrap();
    }
    let next = world.path().join("next.note");
    let out = ok(pil(
        &profile,
        &[
            "audit",
            "consistency",
            "--from",
            saved,
            "--public-key",
            key,
            "--out",
            next.to_str().unwrap(),
        ],
    ));
    assert!(
        out.starts_with("consistent: the log of size ")
            && out.contains(&format!("extends the saved head of size {}", old.head.size)),
        "{out}"
    );
    let newer = verifier(&world)
        .verify_note(&std::fs::read_to_string(&next).unwrap())
        .unwrap();
    assert!(newer.head.size > old.head.size);

    // An edited head is refused, as is another node's key.
    let edited = world.path().join("edited.note");
    std::fs::write(
        &edited,
        note.replacen(
            &format!("\n{}\n", old.head.size),
            &format!("\n{}\n", old.head.size - 1),
            1,
        ),
    )
    .unwrap();
    let err = fails(pil(
        &profile,
        &[
            "audit",
            "consistency",
            "--from",
            edited.to_str().unwrap(),
            "--public-key",
            key,
        ],
    ));
    assert!(err.contains("does not verify with the public key"), "{err}");
    let other = world.path().join("other-key");
    pil_node::audit::write_signing_key(&other).unwrap();
    let err = fails(pil(
        &profile,
        &[
            "audit",
            "prove",
            "--index",
            "0",
            "--public-key",
            other.join("public-key.pem").to_str().unwrap(),
        ],
    ));
    assert!(err.contains("does not verify with the public key"), "{err}");
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Search, export, patient report

/// Lookups with varied requesters, a few milliseconds apart so their times differ.
/// Returns the lookup records, oldest first.
async fn varied_lookups(world: &World, node: &TestNode) -> Vec<Value> {
    let addr = node.addr();
    let host = world.client(HOST, addr).await;
    for i in 0..3 {
        host.upsert(pointer(&patient_id(i), ORG_C, 1, &["medications"]))
            .await
            .unwrap();
    }
    let doctor = world.client(ORG_A, addr).await;
    let colleague = world
        .client_as(ORG_A, addr, |p| {
            p.hpr = Some("9144900".into());
            p.purpose = "COC".into();
        })
        .await;
    let emergency = world
        .client_as(ORG_A, addr, |p| {
            p.purpose = "ETREAT".into();
            p.care_relationship = false;
        })
        .await;
    let researcher = world
        .client_as(ORG_A, addr, |p| p.purpose = "HRESCH".into())
        .await;
    let host_doctor = world
        .client_as(HOST, addr, |p| p.hpr = Some("1234567".into()))
        .await;
    let pause = || tokio::time::sleep(Duration::from_millis(15));
    doctor.lookup(lookup(&patient_id(0))).await.unwrap(); // 0: P0 ORG_A TREAT
    pause().await;
    doctor.lookup(lookup(&patient_id(1))).await.unwrap(); // 1: P1 ORG_A TREAT
    pause().await;
    colleague.lookup(lookup(&patient_id(0))).await.unwrap(); // 2: P0 COC 9144900
    pause().await;
    emergency.lookup(lookup(&patient_id(0))).await.unwrap(); // 3: P0 ETREAT
    pause().await;
    researcher.lookup(lookup(&patient_id(0))).await.unwrap_err(); // 4: P0 denied
    pause().await;
    host_doctor.lookup(lookup(&patient_id(2))).await.unwrap(); // 5: P2 HOST
    pause().await;
    doctor.lookup(lookup(&patient_id(1))).await.unwrap(); // 6: P1 ORG_A TREAT
    let mut all = search_all(&host, lookups_filter(), 1000).await;
    all.reverse();
    assert_eq!(all.len(), 7, "{all:#?}");
    let times: Vec<&str> = all.iter().map(|r| r["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    all
}

#[tokio::test]
async fn search_by_patient_professional_organization_purpose_decision_and_time() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let all = varied_lookups(&world, &node).await;
    let auditor = world.client(HOST, node.addr()).await;
    let at = |positions: &[usize]| -> Vec<u64> {
        // Newest first, as search returns them.
        let mut v: Vec<u64> = positions
            .iter()
            .map(|&p| all[p]["index"].as_u64().unwrap())
            .collect();
        v.reverse();
        v
    };
    let lookups = |f: v1::AuditFilter| v1::AuditFilter {
        actions: vec!["lookup".into()],
        ..f
    };
    let cases: Vec<(&str, v1::AuditFilter, Vec<u64>)> = vec![
        (
            "patient",
            lookups(v1::AuditFilter {
                patient: Some(patient_id(0)),
                ..Default::default()
            }),
            at(&[0, 2, 3, 4]),
        ),
        (
            "patient, every action",
            v1::AuditFilter {
                patient: Some(patient_id(1)),
                actions: vec!["lookup".into(), "pointer_upsert".into()],
                ..Default::default()
            },
            {
                let upsert = search_all(
                    &auditor,
                    v1::AuditFilter {
                        patient: Some(patient_id(1)),
                        actions: vec!["pointer_upsert".into()],
                        ..Default::default()
                    },
                    10,
                )
                .await;
                // The record made before the change, and the one with its outcome.
                assert_eq!(upsert.len(), 2);
                assert_eq!(upsert[0]["outcome"]["status"], "OK");
                assert_eq!(upsert[1]["outcome"]["status"], "STARTED");
                let mut v = at(&[1, 6]);
                v.extend(upsert.iter().map(|r| r["index"].as_u64().unwrap()));
                v
            },
        ),
        (
            "professional",
            lookups(v1::AuditFilter {
                hpr_number: "9144900".into(),
                ..Default::default()
            }),
            at(&[2]),
        ),
        (
            "organization",
            lookups(v1::AuditFilter {
                organization_number: HOST.into(),
                ..Default::default()
            }),
            at(&[5]),
        ),
        (
            "purpose",
            lookups(v1::AuditFilter {
                purpose_of_use: "ETREAT".into(),
                ..Default::default()
            }),
            at(&[3]),
        ),
        (
            "emergency",
            v1::AuditFilter {
                emergency_only: true,
                ..Default::default()
            },
            at(&[3]),
        ),
        (
            "decision",
            lookups(v1::AuditFilter {
                decision: "denied".into(),
                ..Default::default()
            }),
            at(&[4]),
        ),
        (
            "time range",
            lookups(v1::AuditFilter {
                from: Some(
                    pil_client::records::parse_time(all[2]["time"].as_str().unwrap()).unwrap(),
                ),
                to: Some(
                    pil_client::records::parse_time(all[5]["time"].as_str().unwrap()).unwrap(),
                ),
                ..Default::default()
            }),
            at(&[2, 3, 4]),
        ),
        (
            "professional and patient",
            lookups(v1::AuditFilter {
                patient: Some(patient_id(1)),
                hpr_number: HPR.into(),
                organization_number: ORG_A.into(),
                purpose_of_use: "TREAT".into(),
                decision: "allowed".into(),
                ..Default::default()
            }),
            at(&[1, 6]),
        ),
    ];
    for (name, filter, expected) in cases {
        for page in [1, 2, 1000] {
            let found = search_all(&auditor, filter.clone(), page).await;
            assert_eq!(indexes(&found), expected, "{name}, pages of {page}");
        }
    }

    // Paging by hand: pages do not overlap and end with an empty token.
    let first = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(lookups_filter()),
            page_size: 4,
            page_token: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(first.records.len(), 4);
    assert!(!first.next_page_token.is_empty());
    let second = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(lookups_filter()),
            page_size: 4,
            page_token: first.next_page_token.clone(),
        })
        .await
        .unwrap();
    let both: Vec<Value> = first
        .records
        .iter()
        .chain(&second.records)
        .map(|r| json(r))
        .collect();
    assert_eq!(indexes(&both), at(&[0, 1, 2, 3, 4, 5, 6]));
    let e = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                decision: "maybe".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_through_the_cli_with_paging() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let all = varied_lookups(&world, &node).await;
    let profile = world.profile(HOST, node.addr());
    let p0 = patient_id(0).value;

    let out = pil(
        &profile,
        &[
            "--json",
            "audit",
            "search",
            "--patient",
            &p0,
            "--action",
            "lookup",
            "--limit",
            "3",
        ],
    );
    let page1 = ok(out.clone());
    let lines: Vec<Value> = page1.lines().map(|l| json(l.as_bytes())).collect();
    let expected: Vec<u64> = [4, 3, 2, 0]
        .iter()
        .map(|&p| all[p]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes(&lines), expected[..3]);
    let more = stderr(&out);
    let token = more
        .trim()
        .strip_prefix("more records: pass --page-token ")
        .unwrap_or_else(|| panic!("{more}"));
    let page2 = ok(pil(
        &profile,
        &[
            "--json",
            "audit",
            "search",
            "--patient",
            &p0,
            "--action",
            "lookup",
            "--limit",
            "3",
            "--page-token",
            token,
        ],
    ));
    let lines: Vec<Value> = page2.lines().map(|l| json(l.as_bytes())).collect();
    assert_eq!(indexes(&lines), expected[3..]);

    // The global --hpr and --purpose filter searches.
    let out = ok(pil(
        &profile,
        &["--json", "--hpr", "9144900", "audit", "search"],
    ));
    let lines: Vec<Value> = out.lines().map(|l| json(l.as_bytes())).collect();
    assert_eq!(indexes(&lines), [all[2]["index"].as_u64().unwrap()]);
    let out = ok(pil(
        &profile,
        &[
            "--json",
            "--purpose",
            "ETREAT",
            "audit",
            "search",
            "--emergency-only",
        ],
    ));
    assert_eq!(out.lines().count(), 1, "{out}");

    // A readable table.
    let table = ok(pil(
        &profile,
        &[
            "audit",
            "search",
            "--decision",
            "denied",
            "--action",
            "lookup",
        ],
    ));
    assert!(
        table.contains("HRESCH") && table.contains("denied") && table.contains(ORG_A),
        "{table}"
    );
    let err = fails(pil(&profile, &["audit", "search", "--from", "yesterday"]));
    assert!(err.contains("--from"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_equals_search_and_fhir_export_validates() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    varied_lookups(&world, &node).await;
    // More kinds of records to export, made through the CLI's admin commands.
    let operator = world.profile(OPERATOR, addr);
    let p1 = patient_id(1).value;
    let p2 = patient_id(2).value;
    let out = ok(pil(
        &operator,
        &[
            "--json",
            "block",
            "add",
            "--patient",
            &p1,
            "--block-profession",
            "SP",
        ],
    ));
    let block_id = json(out.trim().as_bytes())["block_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ok(pil(
        &operator,
        &["--json", "block", "list", "--patient", &p1],
    ));
    assert_eq!(
        json(out.trim().as_bytes())["block_ids"],
        serde_json::json!([block_id])
    );
    ok(pil(&operator, &["opt-out", "set", "--patient", &p2]));
    let out = ok(pil(
        &operator,
        &["--json", "opt-out", "show", "--patient", &p2],
    ));
    assert_eq!(json(out.trim().as_bytes())["opted_out"], true);
    let out = ok(pil(&operator, &["policy", "reload"]));
    assert!(out.starts_with("configuration reloaded: "), "{out}");
    world
        .client(ORG_A, addr)
        .await
        .explain(v1::ExplainRequest::default())
        .await
        .unwrap();
    world
        .client_with_token(ORG_A, addr, "not-a-token".into(), None)
        .await
        .lookup(lookup(&patient_id(0)))
        .await
        .unwrap_err();
    let auditor = world.client(HOST, addr).await;
    let profile = world.profile(HOST, addr);

    // Library: export (oldest first) is search (newest first) reversed, byte for byte.
    for filter in [
        lookups_filter(),
        v1::AuditFilter {
            patient: Some(patient_id(0)),
            actions: vec!["lookup".into()],
            ..Default::default()
        },
        v1::AuditFilter {
            actions: vec!["block_create".into(), "opt_out_set".into()],
            ..Default::default()
        },
    ] {
        let mut searched: Vec<Vec<u8>> = Vec::new();
        let mut token = String::new();
        loop {
            let page = auditor
                .audit_search(v1::SearchAuditRequest {
                    filter: Some(filter.clone()),
                    page_size: 3,
                    page_token: token,
                })
                .await
                .unwrap();
            searched.extend(page.records);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        searched.reverse();
        let exported: Vec<Vec<u8>> = auditor
            .audit_export(v1::ExportAuditRequest {
                filter: Some(filter.clone()),
                format: v1::AuditExportFormat::JsonLines as i32,
            })
            .await
            .unwrap()
            .map(|l| l.unwrap())
            .collect()
            .await;
        assert!(!exported.is_empty());
        assert_eq!(exported, searched, "{filter:?}");
    }

    // CLI: the JSONL export is the records exactly as hashed into the log.
    let jsonl = world.path().join("audit.jsonl");
    let out = pil(
        &profile,
        &[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--out",
            jsonl.to_str().unwrap(),
        ],
    );
    ok(out);
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let entries = read_log(&auditor, 0).await;
    let exported: Vec<&str> = text.lines().collect();
    assert!(exported.len() >= 15, "{}", exported.len());
    for line in &exported {
        let index = json(line.as_bytes())["index"].as_u64().unwrap() as usize;
        assert_eq!(line.as_bytes(), entries[index].record, "record {index}");
        assert_eq!(
            leaf_hash(line.as_bytes()).to_vec(),
            entries[index].leaf_hash
        );
    }
    let exported_indexes: Vec<usize> = exported
        .iter()
        .map(|l| json(l.as_bytes())["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        exported_indexes,
        (0..exported.len()).collect::<Vec<_>>(),
        "everything, oldest first"
    );

    // CLI: FHIR AuditEvents, checked by the FHIR validator.
    let fhir = world.path().join("audit-fhir.jsonl");
    ok(pil(
        &profile,
        &[
            "audit",
            "export",
            "--format",
            "fhir",
            "--out",
            fhir.to_str().unwrap(),
        ],
    ));
    let events = std::fs::read_to_string(&fhir).unwrap();
    assert!(
        events.lines().count() >= exported.len(),
        "one event per record"
    );
    let actions: std::collections::BTreeSet<String> = exported
        .iter()
        .map(|l| json(l.as_bytes())["action"].as_str().unwrap().to_string())
        .collect();
    for a in [
        "lookup",
        "pointer_upsert",
        "block_create",
        "block_list",
        "opt_out_set",
        "opt_out_get",
        "policy_reload",
        "explain",
        "audit_access",
    ] {
        assert!(actions.contains(a), "the export covers {a}: {actions:?}");
    }
    for line in events.lines() {
        let event = json(line.as_bytes());
        assert_eq!(event["resourceType"], "AuditEvent");
        assert!(
            !line.contains(&patient_id(0).value),
            "no patient identifier in FHIR: {line}"
        );
    }
    let validated = Command::new(fhir_python())
        .arg(package_dir().join("fhir/validate_auditevent.py"))
        .arg(&fhir)
        .output()
        .expect("run the FHIR validator");
    assert!(
        validated.status.success(),
        "FHIR validation failed:\n{}{}",
        stdout(&validated),
        stderr(&validated)
    );
    assert!(
        stdout(&validated).contains(&format!(
            "{} AuditEvent(s) validated",
            events.lines().count()
        )),
        "{}",
        stdout(&validated)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patient_report_lists_who_looked_the_patient_up() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let all = varied_lookups(&world, &node).await;
    let auditor = world.client(HOST, node.addr()).await;
    for home_region_only in [true, false] {
        let report = auditor
            .audit_patient_report(patient_id(0), home_region_only)
            .await
            .unwrap();
        assert_eq!(report.regions.len(), 1, "one region in this world");
        let region = &report.regions[0];
        assert_eq!(region.region, "test");
        assert!(region.answered && region.detail.is_empty());
        let records: Vec<Value> = region.records.iter().map(|r| json(r)).collect();
        let expected: Vec<u64> = [0, 2, 3, 4]
            .iter()
            .map(|&p| all[p]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes(&records), expected, "oldest first, lookups only");
    }
    let profile = world.profile(HOST, node.addr());
    let out = ok(pil(
        &profile,
        &[
            "audit",
            "patient-report",
            "--patient",
            &patient_id(0).value,
            "--home-region-only",
        ],
    ));
    assert!(
        out.contains("region test: 4 lookups of this patient"),
        "{out}"
    );
    for text in [
        "9144900", "COC", "ETREAT", "HRESCH", "denied", "yes", HPR, "LE",
    ] {
        assert!(out.contains(text), "{text} in {out}");
    }
    assert!(!out.contains(&patient_id(0).value), "{out}");
    let out = ok(pil(
        &profile,
        &[
            "--json",
            "audit",
            "patient-report",
            "--patient",
            &patient_id(2).value,
        ],
    ));
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["regions"][0]["answered"], true);
    let records = report["regions"][0]["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["requester"]["organization"], HOST);
    assert_eq!(records[0]["requester"]["hpr_number"], "1234567");
    // The auditor's report request is itself recorded, about the patient.
    let access = search_all(
        &auditor,
        v1::AuditFilter {
            patient: Some(patient_id(2)),
            actions: vec!["audit_access".into()],
            ..Default::default()
        },
        100,
    )
    .await;
    assert!(
        access.iter().any(|r| r["detail"] == "patient report"),
        "{access:#?}"
    );
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Who may read the log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_auditors_may_read_the_log_and_refusals_are_recorded() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let mut tail = Tail::new(world.client(HOST, addr).await).await;
    for org in [ORG_A, OPERATOR] {
        let c = world.client(org, addr).await;
        let denied = |r: Result<(), pil_client::ClientError>, what: &str| {
            let e = r.expect_err(&format!("{org} may not {what}"));
            assert_eq!(code(&e), Code::PermissionDenied, "{what}: {e}");
        };
        denied(
            c.audit_search(v1::SearchAuditRequest::default())
                .await
                .map(drop),
            "search",
        );
        let r = tail.one().await;
        assert_record(&r, "audit_access", org, "PERMISSION_DENIED", "denied");
        assert!(
            r["outcome"]["detail"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
        denied(
            c.audit_export(v1::ExportAuditRequest {
                filter: None,
                format: v1::AuditExportFormat::JsonLines as i32,
            })
            .await
            .map(drop),
            "export",
        );
        denied(c.audit_read_log(0).await.map(drop), "read the log");
        denied(c.audit_tree_heads().await.map(drop), "list heads");
        denied(c.audit_tree_head(true).await.map(drop), "sign a head");
        denied(c.audit_inclusion_proof(0, 1).await.map(drop), "prove");
        denied(c.audit_consistency_proof(1, 1).await.map(drop), "prove");
        denied(
            c.audit_patient_report(patient_id(1), true).await.map(drop),
            "report",
        );
        let refused = tail.records().await;
        assert_eq!(refused.len(), 7, "each refusal recorded once: {refused:#?}");
        for r in &refused {
            assert_record(r, "audit_access", org, "PERMISSION_DENIED", "denied");
        }
    }
    // Through the CLI: one line, non-zero exit.
    let err = fails(
        Command::new(env!("CARGO_BIN_EXE_pil-test-cli"))
            .arg("--profile")
            .arg(world.profile(ORG_A, addr))
            .args(["audit", "search"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("permission denied"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_contents_and_the_log_still_verifies() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let host = world.client(HOST, node.addr()).await;
    let doctor = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(950);
    host.upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    for _ in 0..3 {
        doctor.lookup(lookup(&patient)).await.unwrap();
    }
    host.audit_tree_head(true).await.unwrap();
    let before = read_log(&host, 0).await;
    assert!(before.iter().all(|e| !e.record.is_empty()));

    // Eleven years on, everything so far is past the ten-year retention.
    let later = std::time::SystemTime::now() + Duration::from_secs(11 * 366 * 24 * 3600);
    let dropped = node.node.apply_audit_retention(later).await.unwrap();
    // (One more than read: the read itself was recorded.)
    assert_eq!(dropped, before.len() as u64 + 1);
    let after = read_log(&host, 0).await;
    assert!(after.len() > before.len(), "the new reads are logged");
    for (old, new) in before.iter().zip(&after) {
        assert!(new.record.is_empty(), "contents of {} removed", new.index);
        assert_eq!(
            old.leaf_hash, new.leaf_hash,
            "leaf hash of {} kept",
            new.index
        );
    }
    // Search no longer finds them; the tree still verifies against every head.
    let found = search_all(
        &host,
        v1::AuditFilter {
            patient: Some(patient.clone()),
            ..Default::default()
        },
        100,
    )
    .await;
    assert!(found.iter().all(|r| r["action"] != "lookup"), "{found:?}");
    let report = library_verify(&world, &node).await;
    assert!(report.is_ok(), "{:?}", report.first_problem);
    assert_eq!(report.removed, dropped);
    drop((host, doctor));
    node.stop().await;
}

// ---------------------------------------------------------------------------------
// Requests no handler saw, and a cut log

/// `LookupRequest` as a careless client might encode it: the patient's value as raw
/// bytes, so it can carry invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPatient {
    #[prost(string, tag = "1")]
    system: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawLookup {
    #[prost(message, optional, tag = "1")]
    patient: Option<RawPatient>,
}

/// Calls `path` with `message` as its request over a bare channel as [`ORG_A`].
async fn call_raw<M: prost::Message + Default + 'static>(
    world: &World,
    addr: std::net::SocketAddr,
    path: &'static str,
    message: M,
) -> tonic::Status {
    let channel = world.raw_channel(ORG_A, addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<M, v1::LookupResponse>::default();
    grpc.unary(
        tonic::Request::new(message),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_any_handler_are_recorded() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let mut tail = Tail::new(world.client(HOST, addr).await).await;

    // Invalid UTF-8 in a string field: not a valid LookupRequest.
    let bad = RawLookup {
        patient: Some(RawPatient {
            system: pil_proto::ident::SYSTEM_FNR.into(),
            value: vec![0xff, 0xfe, b'1'],
        }),
    };
    let status = call_raw(&world, addr, "/pil.v1.LookupService/Lookup", bad).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let r = tail.one().await;
    assert_record(&r, "refused", ORG_A, "INVALID_ARGUMENT", "not_applicable");
    assert_eq!(r["detail"], "/pil.v1.LookupService/Lookup");

    // A message over the size limit.
    let a = world.client(ORG_A, addr).await;
    let mut p = pointer(&patient_id(5), ORG_A, 1, &["medications"]);
    p.categories = vec!["medications".to_string(); 400_000];
    let e = a.upsert(p).await.unwrap_err();
    assert_eq!(code(&e), Code::ResourceExhausted, "{e}");
    let r = tail.one().await;
    assert_record(&r, "refused", ORG_A, "RESOURCE_EXHAUSTED", "not_applicable");
    assert_eq!(r["detail"], "/pil.v1.RegistryService/UpsertPointer");

    // A method the node does not have.
    let status = call_raw(
        &world,
        addr,
        "/pil.v1.LookupService/Nope",
        RawLookup::default(),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let r = tail.one().await;
    assert_record(&r, "refused", ORG_A, "UNIMPLEMENTED", "not_applicable");

    // A federation ping by an organization, refused, and one by a peer, answered.
    let status = call_raw(
        &world,
        addr,
        "/pil.v1.FederationService/Ping",
        v1::PingRequest {},
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let r = tail.one().await;
    assert_record(&r, "peer_ping", ORG_A, "PERMISSION_DENIED", "denied");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_was_cut_refuses_to_start() {
    let world = World::new();
    stopped_node_with_history(&world).await;
    let config = world.config(true);
    if let Some(pg) = &config.storage.postgres {
        // Remove the newest records, their leaves and subtrees, every head over them,
        // and shrink the tree's row to match.
        let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let size: i64 = client
            .query_one("SELECT size FROM audit_tree", &[])
            .await
            .unwrap()
            .get(0);
        let keep = size - 5;
        client
            .batch_execute(&format!(
                "DELETE FROM audit_records WHERE idx >= {keep};
                 DELETE FROM audit_nodes WHERE ((idx + 1) << level::int) > {keep};
                 DELETE FROM audit_heads WHERE size > {keep};
                 UPDATE audit_tree SET size = {keep};"
            ))
            .await
            .unwrap();
    } else {
        // Remove the newest records, their leaves and every head over them.
        let db = open_db(&config.data_dir);
        let nodes = db.cf_handle("audit_nodes").unwrap();
        let mut size = 0;
        while db.get_cf(nodes, leaf_key(size)).unwrap().is_some() {
            size += 1;
        }
        let keep = size - 5;
        let records = db.cf_handle("audit_records").unwrap();
        for i in keep..size {
            db.delete_cf(records, record_key(i)).unwrap();
            db.delete_cf(nodes, leaf_key(i)).unwrap();
        }
        for level in 1..64u8 {
            for (k, _) in db
                .iterator_cf(nodes, rocksdb::IteratorMode::Start)
                .map(Result::unwrap)
                .filter(|(k, _)| k[0] == level)
            {
                let index = u64::from_be_bytes(k[1..9].try_into().unwrap());
                if (index + 1) << level > keep {
                    db.delete_cf(nodes, &k).unwrap();
                }
            }
        }
        let heads = db.cf_handle("audit_heads").unwrap();
        for (k, _) in db
            .iterator_cf(heads, rocksdb::IteratorMode::Start)
            .map(Result::unwrap)
        {
            if u64::from_be_bytes(k[..8].try_into().unwrap()) > keep {
                db.delete_cf(heads, &k).unwrap();
            }
        }
        db.flush_cf(records).unwrap();
    }
    let err = match pil_node::server::start(config).await {
        Ok(_) => panic!("a node with a cut log must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("does not match the newest tree head this node signed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_log_without_a_signed_head_says_nothing_was_verified() {
    let world = World::new();
    let mut config = world.config(true);
    config.audit.sign_interval_secs = 3600;
    let node = TestNode::start(config).await;
    let profile = world.profile(HOST, node.addr());
    let key = public_key(&world);
    let err = fails(pil(
        &profile,
        &["audit", "verify", "--public-key", key.to_str().unwrap()],
    ));
    assert!(err.contains("nothing could be verified"), "{err}");
    ok(pil(
        &profile,
        &[
            "audit",
            "verify",
            "--sign-now",
            "--public-key",
            key.to_str().unwrap(),
        ],
    ));
    node.stop().await;
}

#[tokio::test]
async fn a_search_for_values_the_log_cannot_hold_is_refused() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let auditor = world.client(HOST, node.addr()).await;
    for (filter, field) in [
        (
            v1::AuditFilter {
                organization_number: "123456789".into(),
                ..Default::default()
            },
            "filter.organization_number",
        ),
        (
            v1::AuditFilter {
                hpr_number: "56550187x".into(),
                ..Default::default()
            },
            "filter.hpr_number",
        ),
    ] {
        let e = auditor
            .audit_search(v1::SearchAuditRequest {
                filter: Some(filter),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::InvalidArgument, "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }
    node.stop().await;
}

/// An auditor marks an emergency access reviewed, with a note: the review is a record
/// of its own naming the reviewed one and its patient, found by action and by patient.
/// A review of a record that does not exist, an empty note, or by a caller without
/// the auditor role is refused, and marks nothing reviewed.
#[tokio::test]
async fn an_emergency_access_is_marked_reviewed_and_the_review_is_recorded() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let addr = node.addr();
    let auditor = world.client(HOST, addr).await;
    let patient = patient_id(43);
    auditor
        .upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    let emergency = world
        .client_as(ORG_A, addr, |p| {
            p.purpose = "ETREAT".into();
            p.care_relationship = false;
        })
        .await;
    assert!(emergency.lookup(lookup(&patient)).await.unwrap().emergency);
    let found = search_all(
        &auditor,
        v1::AuditFilter {
            emergency_only: true,
            ..lookups_filter()
        },
        10,
    )
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    let index = found[0]["index"].as_u64().unwrap();

    auditor
        .audit_review(
            index,
            "  called the ward: unconscious patient, access justified ",
            "Kari Nordmann, personvernombud",
        )
        .await
        .unwrap();
    let reviews = search_all(&auditor, reviews_filter(), 10).await;
    assert_eq!(reviews.len(), 1, "{reviews:?}");
    let r = &reviews[0];
    assert_eq!(r["reviewed"], index);
    assert_eq!(r["caller"]["organization"], HOST);
    assert_eq!(r["outcome"]["status"], "OK");
    assert_eq!(
        r["detail"],
        "Kari Nordmann, personvernombud: called the ward: unconscious patient, access justified"
    );
    assert_eq!(r["patient"], found[0]["patient"]);
    let by_patient = search_all(
        &auditor,
        v1::AuditFilter {
            patient: Some(patient.clone()),
            ..reviews_filter()
        },
        10,
    )
    .await;
    assert_eq!(indexes(&by_patient), indexes(&reviews));

    // Refused, and no review recorded.
    for (what, index, note, expected) in [
        ("no such record", 1_000_000, "x", Code::OutOfRange),
        ("empty note", index, "   ", Code::InvalidArgument),
        (
            "note too long",
            index,
            &"x".repeat(2001)[..],
            Code::InvalidArgument,
        ),
    ] {
        let err = auditor.audit_review(index, note, "").await.unwrap_err();
        assert_eq!(code(&err), expected, "{what}: {err}");
    }
    let err = emergency
        .audit_review(index, "looks fine", "")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");
    let reviews = search_all(&auditor, reviews_filter(), 10).await;
    // Each refusal is recorded as every request is, with its status and no
    // `reviewed`: only the one review marks a record reviewed.
    assert_eq!(reviews.len(), 5, "{reviews:?}");
    let marking: Vec<&Value> = reviews
        .iter()
        .filter(|r| r.get("reviewed").is_some())
        .collect();
    assert_eq!(marking.len(), 1, "{reviews:?}");
    assert_eq!(marking[0]["outcome"]["status"], "OK");
    node.stop().await;
}
