//! The `pil` command line against a real node: sync from files, lookup, export, and
//! one-line errors with a non-zero exit.

use std::process::Command;

use pil_tests::*;

use crate::pil;

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
    // Said once: not again as the status's own rendering.
    let reason = err.trim().trim_start_matches("error: invalid argument: ");
    assert_eq!(err.matches(reason).count(), 1, "{err}");
    assert!(!err.contains("code:") && !err.contains("message:"), "{err}");

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

#[test]
fn the_demo_runs_three_federated_regions() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), dir.path().to_str().unwrap(), 60);
    let printed = demo.printed.join("\n");
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
        // The demo's regions route: one whose fresh summary holds nothing about the
        // patient is not asked.
        assert!(
            states.iter().all(|s| s == "ok" || s == "holds_nothing"),
            "{r}"
        );
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
    drop(demo);
}

/// `pil-node` with `args`, as an operator would run it, with backtraces asked for.
fn pil_node(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(sibling_binary("pil-test-node"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run pil-node")
}

#[test]
fn start_up_errors_are_one_line_naming_the_file() {
    let world = World::new();
    let dir = world.path();
    let write = |config: &pil_node::config::NodeConfig| {
        let path = dir.join("node.toml");
        std::fs::write(&path, toml::to_string_pretty(config).unwrap()).unwrap();
        path
    };
    // A missing key file.
    let mut config = world.config(true);
    config.keys.pseudonym_key_file = dir.join("gone.key");
    let path = write(&config);
    let out = pil_node(&["serve".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("gone.key"),
        "{err}"
    );
    assert!(
        !err.contains("Caused by") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(!config.data_dir.exists());

    // A TOML mistake: the file, the line and the column, on one line.
    std::fs::write(&path, "region = \"x\"\nlisten = 5\n").unwrap();
    let out = pil_node(&["serve".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("line 2, column"), "{err}");
}

#[test]
fn check_config_reports_every_problem_and_touches_nothing() {
    let world = World::new();
    let config = world.config(true);
    let path = world.path().join("node.toml");
    std::fs::write(&path, toml::to_string_pretty(&config).unwrap()).unwrap();
    let out = pil_node(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("is valid: region test"), "{said}");

    // Two problems at once: a key others can read, and a missing JWKS.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(&config.keys.storage_key_file, mode).unwrap();
    }
    let mut broken = config.clone();
    broken.auth.jwks_file = Some(world.path().join("no-jwks.json"));
    std::fs::write(&path, toml::to_string_pretty(&broken).unwrap()).unwrap();
    let out = pil_node(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no-jwks.json"), "{err}");
    #[cfg(unix)]
    assert!(err.contains("chmod 600"), "{err}");
    assert!(err.contains("problem(s) found"), "{err}");
    assert!(
        !config.data_dir.exists(),
        "check-config made the data directory"
    );
}

#[test]
fn every_command_the_demo_prints_runs_as_printed() {
    // The README runs the demo from the repository's root with the default
    // `--dir pil-demo`, a path relative to where the user stands.
    let cwd = tempfile::tempdir().unwrap();
    let demo = Demo::start(cwd.path(), "pil-demo", 200);
    let printed = &demo.printed;
    let text = printed.join("\n");
    let commands: Vec<&str> = printed
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.contains(" --profile "))
        .collect();
    assert!(commands.len() >= 9, "{text}");
    assert!(text.contains("auditor role"), "{text}");
    assert!(text.contains("audit public key"), "{text}");
    // The commands name `pil` as a user's PATH finds it; here that is this build's CLI.
    let bin = cwd.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pil-test-cli"), bin.join("pil")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for command in &commands {
        let out = Command::new("sh")
            .args(["-c", command])
            .env("PATH", &path)
            .current_dir(cwd.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{command}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    // The suggested patient shows what PIL is for: pointers in several regions, a
    // sensitive one the doctor sees and the nurse does not.
    let json = commands
        .iter()
        .position(|c| c.ends_with("--json"))
        .expect("a --json lookup");
    let r: serde_json::Value = serde_json::from_str(&outputs[json]).unwrap();
    let mut regions: Vec<&str> = r["pointers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["region"].as_str().unwrap())
        .collect();
    regions.sort();
    regions.dedup();
    assert!(regions.len() > 1, "{r}");
    assert!(
        outputs[0].contains("mental-health"),
        "the doctor sees it: {}",
        outputs[0]
    );
    assert!(commands[1].contains("bergen-kommune"), "{}", commands[1]);
    assert!(
        !outputs[1].contains("mental-health"),
        "the nurse does not: {}",
        outputs[1]
    );
    assert!(cwd.path().join("export.ndjson").exists());
    drop(demo);
}

#[test]
fn a_python_client_written_from_the_guide_works_against_three_regions() {
    let cwd = tempfile::tempdir().unwrap();
    let _demo = Demo::start(cwd.path(), "pil-demo", 50);
    let examples = package_dir().join("../docs/examples/python");
    let python = python_venv(
        "PIL_EXAMPLE_PYTHON",
        "pil-python-venv",
        &examples.join("setup-venv.sh"),
    );
    let out = Command::new(python)
        .arg(examples.join("pil_example.py"))
        .arg("--demo-dir")
        .arg(cwd.path().join("pil-demo"))
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim().lines().last(), Some("OK"), "{stdout}");
}

/// A token obtained elsewhere is used as it is bound: a Bearer token as Bearer, a
/// DPoP-bound one with a fresh proof per call from `--dpop-key`; a bound token without
/// its key, or with another key, is refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_elsewhere_is_sent_as_it_is_bound() {
    use pil_auth::dev_issuer::DpopKey;
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let profile = world.profile(ORG_A, node.addr());
    let patient = patient_id(5);
    world
        .client(ORG_A, node.addr())
        .await
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    let key = DpopKey::generate().unwrap();
    let key_file = world.path().join("dpop-key.pem");
    write_private(&key_file, &key.private_key_pem().unwrap());
    let other_file = world.path().join("other-key.pem");
    write_private(
        &other_file,
        &DpopKey::generate().unwrap().private_key_pem().unwrap(),
    );
    let bound = doctor_token(&world.issuer()).bound_to(&key).sign().unwrap();
    let bearer = doctor_token(&world.issuer()).sign().unwrap();
    let lookup_with = |args: &[&str]| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["lookup", "--patient", &patient.value]);
        pil(&profile, &all)
    };
    let key_arg = key_file.to_str().unwrap();
    for args in [
        vec!["--token", bound.as_str(), "--dpop-key", key_arg],
        vec!["--token", bearer.as_str()],
    ] {
        let out = lookup_with(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["pointers"].as_array().unwrap().len(), 1, "{answer}");
    }
    for (args, says) in [
        (vec!["--token", bound.as_str()], "--dpop-key"),
        (
            vec![
                "--token",
                bound.as_str(),
                "--dpop-key",
                other_file.to_str().unwrap(),
            ],
            "not the one the token is bound to",
        ),
        (
            vec!["--token", bearer.as_str(), "--dpop-key", key_arg],
            "not DPoP-bound",
        ),
    ] {
        let out = lookup_with(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    node.stop().await;
}
