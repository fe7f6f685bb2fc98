//! The Prometheus endpoint: gRPC and PIL figures on their own plain-HTTP listener,
//! with nothing that names a patient or a person.

use pil_tests::*;

use pil_tests::http_get as get;

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// The PIL and gRPC server series a rules or dashboard file names.
fn series_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("pil_") || w.starts_with("grpc_server_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty());
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_and_lookups_by_decision_and_name_no_one() {
    let world = World::new();
    let mut config = world.config(true);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let node = TestNode::start(config).await;
    let metrics = node.node.metrics_addr().expect("a metrics listener");
    assert_ne!(metrics, node.addr(), "off the client-facing port");
    let p = patient_id(800);
    let hospital = world.client(ORG_A, node.addr()).await;
    hospital
        .upsert(pointer(&p, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    for _ in 0..2 {
        world
            .client(ORG_A, node.addr())
            .await
            .lookup(lookup(&p))
            .await
            .unwrap();
    }
    let refused = world
        .client_as(ORG_A, node.addr(), |t| t.purpose = "HRESCH".into())
        .await
        .lookup(lookup(&p))
        .await
        .unwrap_err();
    assert_eq!(code(&refused), tonic::Code::PermissionDenied);
    let emergency = world
        .client_as(ORG_A, node.addr(), |t| {
            t.purpose = "ETREAT".into();
            t.care_relationship = false;
        })
        .await;
    emergency.lookup(lookup(&p)).await.unwrap();

    let (status, text) = get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let lookups = r#"grpc_type="unary",grpc_service="pil.v1.LookupService",grpc_method="Lookup""#;
    assert_eq!(
        sample(&text, &format!("grpc_server_started_total{{{lookups}}}")),
        4.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("grpc_server_handled_total{{{lookups},grpc_code=\"OK\"}}")
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("grpc_server_handled_total{{{lookups},grpc_code=\"PermissionDenied\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("grpc_server_handling_seconds_count{{{lookups}}}")
        ),
        4.0
    );
    assert_eq!(
        sample(&text, r#"pil_lookups_total{decision="allowed"}"#),
        2.0
    );
    assert_eq!(
        sample(&text, r#"pil_lookups_total{decision="emergency"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"pil_lookups_total{decision="denied"}"#),
        1.0
    );
    assert!(
        text.contains(r#"grpc_method="UpsertPointer""#),
        "every service is counted"
    );
    // Nothing that names a patient, a person or an organization.
    for secret in [p.value.as_str(), HPR, ORG_A] {
        assert!(!text.contains(secret), "{secret} in the metrics:\n{text}");
    }
    assert!(sample(&text, "pil_audit_append_seconds_count") >= 5.0);
    assert_eq!(sample(&text, "pil_audit_append_failures_total"), 0.0);
    assert!(
        sample(&text, "pil_dpop_replay_cache_entries") >= 4.0,
        "one per lookup's proof"
    );
    assert_eq!(
        sample(&text, "pil_dpop_replay_cache_capacity"),
        pil_node::config::DEFAULT_DPOP_REPLAY_CAPACITY as f64
    );
    // The store's queues group their work, and the engine reports its own figures.
    assert!(sample(&text, r#"pil_store_groups_total{queue="writer"}"#) >= 1.0);
    assert!(sample(&text, r#"pil_store_group_items_total{queue="audit"}"#) >= 5.0);
    assert!(sample(&text, r#"pil_store_groups_total{queue="audit"}"#) >= 1.0);
    assert_eq!(
        sample(&text, r#"pil_store_queue_waiting{queue="writer"}"#),
        0.0
    );
    if on_postgres() {
        assert_eq!(sample(&text, "pil_postgres_pool_max_connections"), 8.0);
        assert!(!text.contains("pil_rocksdb_"));
    } else {
        assert!(sample(&text, "pil_rocksdb_estimated_pointers") >= 0.0);
        assert_eq!(sample(&text, "pil_rocksdb_background_errors"), 0.0);
        assert!(!text.contains("pil_postgres_"));
    }
    // Each token's signature is checked once and then reused; no proof was replayed.
    let (hits, misses) = (
        sample(&text, "pil_token_cache_hits_total"),
        sample(&text, "pil_token_cache_misses_total"),
    );
    assert!(hits + misses >= 4.0, "{hits} + {misses}");
    assert_eq!(sample(&text, "pil_dpop_replays_refused_total"), 0.0);
    // Scraped while writes go on, the counters move between scrapes.
    let upserts = r#"grpc_server_started_total{grpc_type="unary",grpc_service="pil.v1.RegistryService",grpc_method="UpsertPointer"}"#;
    let load = {
        let hospital = world.client(ORG_A, node.addr()).await;
        tokio::spawn(async move {
            for i in 0..200 {
                hospital
                    .upsert(pointer(&patient_id(900 + i), ORG_A, 1, &["medications"]))
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while !load.is_finished() {
        let (_, during) = get(metrics, "/metrics").await;
        seen.push(sample(&during, upserts));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    load.await.unwrap();
    let (_, after) = get(metrics, "/metrics").await;
    seen.push(sample(&after, upserts));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&201.0), "{seen:?}");
    assert!(
        seen.iter().any(|n| *n > 1.0 && *n < 201.0),
        "no scrape saw the load under way: {seen:?}"
    );
    let (status, _) = get(metrics, "/other").await;
    assert!(status.contains("404"), "{status}");
    node.stop().await;
}

/// A peer that cannot be reached: its forwarded lookups are counted by outcome, with
/// their time, and its circuit shows open once the breaker trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_down_shows_in_its_counts_and_circuit() {
    let world = World::new();
    let mut config = world.config(true);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    config.federation.peers = vec![peer("helse-midt", dead_addr)];
    config.federation.breaker_cooldown_ms = 60_000;
    let node = TestNode::start(config).await;
    let metrics = node.node.metrics_addr().unwrap();
    let p = patient_id(801);
    let doctor = world.client(ORG_A, node.addr()).await;
    for _ in 0..5 {
        doctor.lookup(lookup(&p)).await.unwrap();
    }
    let (_, text) = get(metrics, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            r#"pil_forwarded_lookups_total{peer="helse-midt",outcome="unavailable"}"#
        ),
        5.0
    );
    assert_eq!(
        sample(
            &text,
            r#"pil_forwarded_lookup_seconds_count{peer="helse-midt"}"#
        ),
        3.0,
        "called until the breaker opened"
    );
    assert_eq!(
        sample(&text, r#"pil_peer_circuit_state{peer="helse-midt"}"#),
        2.0
    );
    // The shipped alert rules and dashboard use only series this node exports.
    let docs = package_dir().join("../docs/monitoring");
    for file in ["pil-alerts.yml", "pil-dashboard.json"] {
        let rules = std::fs::read_to_string(docs.join(file)).unwrap();
        // Each engine exports its own figures; the dashboard shows both.
        let other_engine = if on_postgres() {
            "pil_rocksdb_"
        } else {
            "pil_postgres_"
        };
        for name in series_names(&rules) {
            if name.starts_with(other_engine) {
                continue;
            }
            assert!(
                text.lines().any(|l| l.starts_with(&name)),
                "{file} uses {name}, which the node does not export"
            );
        }
    }
    node.stop().await;
}

/// promtool: `$PIL_PROMTOOL`, else the copy `.ci/setup` takes out of Debian's
/// prometheus package, taken here if missing.
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PIL_PROMTOOL").map(std::path::PathBuf::from)
        && p.exists()
    {
        return p;
    }
    let dir = std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
        .join(".cache/pil-promtool");
    let status = std::process::Command::new("bash")
        .arg(package_dir().join("monitoring/prometheus-tools.sh"))
        .arg(&dir)
        .status()
        .expect("run prometheus-tools.sh");
    assert!(status.success(), "promtool could not be set up");
    dir.join("promtool")
}

fn run_promtool(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(promtool())
        .args(args)
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

/// Every expression of the dashboard, with Grafana's variables filled in as Grafana
/// would, as recording rules promtool can check.
fn dashboard_as_rules(dashboard: &serde_json::Value) -> String {
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    exprs(dashboard, &mut found);
    assert!(found.len() >= 10, "the dashboard's queries: {found:?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in found.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: pil_dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    rules
}

/// The shipped alert rules and every dashboard query are valid PromQL, and the alerts
/// fire on the series that should raise them (`tests/monitoring/pil-alerts.test.yml`).
#[test]
fn the_alert_rules_and_dashboard_queries_pass_promtool() {
    let docs = package_dir().join("../docs/monitoring");
    let alerts = docs.join("pil-alerts.yml");
    let said = run_promtool(&["check".as_ref(), "rules".as_ref(), alerts.as_os_str()]);
    assert!(said.contains("SUCCESS"), "{said}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(docs.join("pil-dashboard.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rules, dashboard_as_rules(&dashboard)).unwrap();
    let said = run_promtool(&["check".as_ref(), "rules".as_ref(), rules.as_os_str()]);
    assert!(said.contains("SUCCESS"), "{said}");

    let tests = package_dir().join("monitoring/pil-alerts.test.yml");
    let said = run_promtool(&["test".as_ref(), "rules".as_ref(), tests.as_os_str()]);
    assert!(said.contains("SUCCESS"), "{said}");
}
