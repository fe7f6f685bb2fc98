//! The `pil` command line against a real node: sync from files, lookup, export, and
//! one-line errors with a non-zero exit.

use std::process::Command;

use pil_tests::*;

fn pil(profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pil-test-cli"))
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .expect("run pil")
}

fn ndjson_line(i: u64, org: &str, category: &str) -> String {
    let p = patient_id(i);
    format!(
        r#"{{"patient":{{"system":"{}","value":"{}"}},"holder":{{"organization_number":"{org}"}},"endpoint":{{"base_url":"https://fhir.org{org}.example/r4","api_kind":"FHIR_R4"}},"categories":["{category}"],"last_updated":"2025-01-0{}T10:00:00Z"}}"#,
        p.system,
        p.value,
        1 + i % 9
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_lookup_and_export_through_the_cli() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(ORG_A, node.addr());
    let dir = world.path();

    let ndjson = dir.join("pointers.ndjson");
    let lines: Vec<String> = (0..30)
        .map(|i| ndjson_line(i, ORG_A, "medications"))
        .collect();
    std::fs::write(&ndjson, lines.join("\n") + "\n").unwrap();
    let out = pil(&profile, &["--json", "sync", ndjson.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["inserted"], 30);

    // CSV, replace mode: keeps 0..10, removes 10..30.
    let csv_path = dir.join("pointers.csv");
    let mut csv = String::from(
        "patient_system,patient_value,organization_number,sub_unit_organization_number,name,base_url,api_kind,categories,period_start,period_end,last_updated,expires_at\n",
    );
    for i in 0..10 {
        let p = patient_id(i);
        csv.push_str(&format!(
            "{},{},{ORG_A},,Org A,https://fhir.org{ORG_A}.example/r4,FHIR_R4,medications,,,2025-01-0{}T10:00:00Z,\n",
            p.system,
            p.value,
            1 + i % 9
        ));
    }
    std::fs::write(&csv_path, csv).unwrap();
    let out = pil(
        &profile,
        &[
            "--json",
            "sync",
            csv_path.to_str().unwrap(),
            "--mode",
            "replace",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["removed"], 20, "{report}");
    assert_eq!(report["updated"], 10, "the name changed: {report}");

    let out = pil(
        &profile,
        &["--json", "lookup", "--patient", &patient_id(3).value],
    );
    assert!(out.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["pointers"].as_array().unwrap().len(), 1);
    assert_eq!(answer["pointers"][0]["holder"]["name"], "Org A");
    assert_eq!(answer["regions"][0]["state"], "ok");

    // Table output names the region and the endpoint.
    let out = pil(&profile, &["lookup", "--patient", &patient_id(3).value]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("https://fhir.org983974724.example/r4") && text.contains("region test: ok"),
        "{text}"
    );

    let export = dir.join("export.ndjson");
    let out = pil(
        &profile,
        &[
            "export",
            "--organization",
            ORG_A,
            "--out",
            export.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(exported.lines().count(), 10);
    // The export can be synced back unchanged: it is the reconciliation format.
    let out = pil(&profile, &["--json", "sync", export.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["unchanged"], 10, "{report}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_and_exit_non_zero() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(ORG_A, node.addr());

    let out = pil(&profile, &["lookup", "--patient", "12345678901"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("invalid argument"),
        "{err}"
    );

    // A file with a broken line: all-or-nothing stores nothing.
    let file = world.path().join("broken.ndjson");
    std::fs::write(
        &file,
        format!("{}\n{{not json\n", ndjson_line(1, ORG_A, "medications")),
    )
    .unwrap();
    let out = pil(
        &profile,
        &["sync", file.to_str().unwrap(), "--all-or-nothing"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
    let out = pil(
        &profile,
        &["--json", "lookup", "--patient", &patient_id(1).value],
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["pointers"].as_array().unwrap().len(), 0);

    // Writing for another organization.
    let out = pil(
        &profile,
        &[
            "register",
            "--patient",
            &patient_id(2).value,
            "--organization",
            ORG_B,
            "--url",
            "https://x.example",
            "--category",
            "medications",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    node.stop().await;
}

#[test]
fn dev_pki_makes_certificates_and_a_token_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(sibling_binary("pil-test-node"))
        .args(["dev-pki", "--region", "helse-test", "--org"])
        .arg(format!("{ORG_A}=Test Org"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run pil-node dev-pki");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("issuer/jwks.json")).unwrap())
            .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], pil_node::demo::DEV_KID);
    let key = std::fs::read_to_string(dir.path().join("issuer/issuer-key.pem")).unwrap();
    let issuer = pil_auth::dev_issuer::DevIssuer::from_pem(
        pil_node::demo::DEV_ISSUER,
        pil_node::demo::DEV_KID,
        &key,
    )
    .unwrap();
    assert_eq!(issuer.jwks(), jwks, "the key and the JWKS belong together");
    assert!(dir.path().join(format!("org-{ORG_A}.pem")).exists());
}

/// A base port with the two after it free too.
fn three_free_ports() -> u16 {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base < 65000
            && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

#[test]
fn the_demo_runs_three_federated_regions() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let base = three_free_ports();
    let mut demo = Command::new(sibling_binary("pil-test-node"))
        .args(["demo", "--patients", "60", "--listen"])
        .arg(format!("127.0.0.1:{base}"))
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run pil-node demo");
    let stdout = demo.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Press ctrl-c") {
            break;
        }
    }
    for region in ["helse-vest", "helse-midt", "helse-nord"] {
        assert!(printed.contains(region), "{printed}");
    }
    // Some patient has pointers in several regions; one lookup at the first region
    // returns them all, and every region answered.
    let profile = dir.path().join("helse-vest/profiles/helse-bergen.toml");
    let mut multi_region = false;
    for i in 0..10 {
        let value = pil_proto::ident::synthetic_fnr(2032 + i);
        let out = pil(&profile, &["--json", "lookup", "--patient", &value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let states: Vec<_> = r["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["state"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(states.len(), 3, "{r}");
        assert!(states.iter().all(|s| s == "ok"), "{r}");
        let mut regions: Vec<_> = r["pointers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["region"].as_str().unwrap().to_string())
            .collect();
        regions.sort();
        regions.dedup();
        multi_region |= regions.len() > 1;
    }
    assert!(multi_region, "no patient with pointers in several regions");
    let _ = demo.kill();
    let _ = demo.wait();
}
