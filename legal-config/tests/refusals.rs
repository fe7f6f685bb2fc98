//! A legal configuration with anything wrong in it is refused, by both
//! `LegalConfig::load` and `check`, with messages naming file and problem.

use std::fs;
use std::path::{Path, PathBuf};

use pil_legal::{LegalConfig, PolicyError, check};

const VALID_RULE_HEAD: &str = r#"@id("extra-rule")
@legal_basis("pasientjournalloven § 19")
@explanation("A rule added by a test.")
"#;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A fresh copy of the default legal configuration, for one test to break.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("legal-config-{name}"));
    let _ = fs::remove_dir_all(&dir);
    copy_dir(
        Path::new(
            &std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
        ),
        &dir,
    );
    dir
}

fn write(dir: &Path, file: &str, text: &str) {
    fs::write(dir.join(file), text).unwrap();
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} does not contain {from:?}");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

/// Both `load` and `check` refuse, with the same problems; returns the message.
fn refused(dir: &Path) -> (String, PolicyError) {
    let load = LegalConfig::load(dir).expect_err("load must refuse");
    let check = check(dir).expect_err("check must refuse");
    // Same problems (Cedar's "did you mean" hints may pick either of two
    // equally close names, so compare without them).
    let strip = |e: &PolicyError| {
        e.problems()
            .iter()
            .map(|p| {
                (
                    p.file.clone(),
                    p.line,
                    p.column,
                    p.policy.clone(),
                    p.message.split(" (help:").next().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&load), strip(&check));
    assert!(!load.problems().is_empty());
    (load.to_string(), load)
}

#[test]
fn the_default_configuration_loads() {
    let dir = scratch("default");
    LegalConfig::load(&dir).unwrap();
    assert_eq!(check(&dir).unwrap().policies, 7);
}

#[test]
fn syntax_error_is_refused_with_file_and_line() {
    let dir = scratch("syntax");
    write(
        &dir,
        "policies/70-broken.cedar",
        &format!(
            "// a broken rule\n{VALID_RULE_HEAD}permit (principal, action, resource)\nwhen {{ context.purpose == }};\n"
        ),
    );
    let (message, error) = refused(&dir);
    assert!(
        message.contains("70-broken.cedar:6:27: syntax error: unexpected token `}`"),
        "{message}"
    );
    assert!(message.contains("syntax error"), "{message}");
    let problem = &error.problems()[0];
    assert!(problem.file.ends_with("policies/70-broken.cedar"));
    assert_eq!(problem.line, Some(6));
}

#[test]
fn unknown_attribute_is_refused_by_schema_validation() {
    let dir = scratch("attribute");
    write(
        &dir,
        "policies/70-owner.cedar",
        &format!(
            "{VALID_RULE_HEAD}permit (principal, action == Action::\"lookup\", resource)\nwhen {{ resource.owner == \"me\" }};\n"
        ),
    );
    let (message, error) = refused(&dir);
    assert!(message.contains("70-owner.cedar:5:"), "{message}");
    assert!(message.contains("rule `extra-rule`"), "{message}");
    assert!(message.contains("does not match the schema"), "{message}");
    assert!(message.contains("owner"), "{message}");
    assert_eq!(error.problems()[0].policy.as_deref(), Some("extra-rule"));
}

#[test]
fn wrongly_typed_rule_is_refused() {
    let dir = scratch("type");
    write(
        &dir,
        "policies/70-type.cedar",
        &format!(
            "{VALID_RULE_HEAD}forbid (principal, action, resource)\nwhen {{ context.care_relationship == \"yes\" }};\n"
        ),
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("70-type.cedar"), "{message}");
    assert!(message.contains("does not match the schema"), "{message}");
}

#[test]
fn unknown_action_is_refused() {
    let dir = scratch("action");
    write(
        &dir,
        "policies/70-action.cedar",
        &format!("{VALID_RULE_HEAD}permit (principal, action == Action::\"delete\", resource);\n"),
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("70-action.cedar"), "{message}");
    assert!(message.contains("delete"), "{message}");
}

#[test]
fn missing_legal_basis_is_refused() {
    let dir = scratch("legal-basis");
    edit(
        &dir,
        "policies/50-emergency.cedar",
        "@legal_basis(\"helsepersonelloven § 7 (øyeblikkelig hjelp); pasientjournalloven § 19\")\n",
        "",
    );
    let (message, error) = refused(&dir);
    assert!(message.contains("50-emergency.cedar"), "{message}");
    assert!(message.contains("rule `permit-emergency`"), "{message}");
    assert!(
        message.contains("missing required annotation(s): @legal_basis"),
        "{message}"
    );
    assert_eq!(error.problems().len(), 1);
    assert!(error.problems()[0].line.is_some());
}

#[test]
fn missing_id_and_explanation_are_refused() {
    let dir = scratch("id");
    write(
        &dir,
        "policies/70-anonymous.cedar",
        "@legal_basis(\"pasientjournalloven § 19\")\npermit (principal, action, resource);\n",
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("70-anonymous.cedar:1:1"), "{message}");
    assert!(
        message.contains("@id(\"...\"), @explanation(\"...\")"),
        "{message}"
    );
}

#[test]
fn empty_legal_basis_is_refused() {
    let dir = scratch("empty-basis");
    write(
        &dir,
        "policies/70-empty.cedar",
        "@id(\"empty-basis\")\n@legal_basis(\"  \")\n@explanation(\"x\")\nforbid (principal, action, resource);\n",
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("@legal_basis"), "{message}");
}

#[test]
fn duplicate_id_is_refused() {
    let dir = scratch("duplicate");
    write(
        &dir,
        "policies/70-duplicate.cedar",
        "@id(\"permit-treatment\")\n@legal_basis(\"x\")\n@explanation(\"y\")\nforbid (principal, action, resource);\n",
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("70-duplicate.cedar"), "{message}");
    assert!(message.contains("already used by a rule in"), "{message}");
    assert!(message.contains("40-treatment.cedar"), "{message}");
}

#[test]
fn reserved_id_and_bad_emergency_flag_are_refused() {
    let dir = scratch("reserved");
    write(
        &dir,
        "policies/70-reserved.cedar",
        "@id(\"default-deny\")\n@legal_basis(\"x\")\n@explanation(\"y\")\nforbid (principal, action, resource);\n\
         @id(\"odd-flag\")\n@emergency(\"yes\")\n@legal_basis(\"x\")\n@explanation(\"y\")\npermit (principal, action, resource);\n",
    );
    let (message, error) = refused(&dir);
    assert!(message.contains("reserved"), "{message}");
    assert!(
        message.contains("@emergency must be \"true\" or \"false\""),
        "{message}"
    );
    assert_eq!(error.problems().len(), 2);
}

#[test]
fn undefined_profession_group_is_refused() {
    let dir = scratch("group");
    edit(
        &dir,
        "policies/60-sensitive-categories.cedar",
        "ProfessionGroup::\"sensitive-care\"",
        "ProfessionGroup::\"sensitve-care\"",
    );
    let (message, _) = refused(&dir);
    assert!(
        message.contains("60-sensitive-categories.cedar"),
        "{message}"
    );
    assert!(message.contains("sensitve-care"), "{message}");
    assert!(message.contains("does not define"), "{message}");
}

#[test]
fn templates_are_refused() {
    let dir = scratch("template");
    write(
        &dir,
        "policies/70-template.cedar",
        &format!("{VALID_RULE_HEAD}permit (principal == ?principal, action, resource);\n"),
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("templates"), "{message}");
}

#[test]
fn broken_schema_is_refused() {
    let dir = scratch("schema-syntax");
    edit(
        &dir,
        "schema.cedarschema",
        "entity ProfessionGroup;",
        "entity ProfessionGroup",
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("schema.cedarschema:"), "{message}");
}

#[test]
fn schema_that_drops_what_rules_use_is_refused() {
    let dir = scratch("schema-drop");
    edit(
        &dir,
        "schema.cedarschema",
        "  care_relationship: Bool,\n",
        "",
    );
    let (message, _) = refused(&dir);
    // The rules that use it no longer validate ...
    assert!(message.contains("30-care-relationship.cedar"), "{message}");
    assert!(message.contains("care_relationship"), "{message}");
    // ... and the schema no longer matches what PIL supplies.
    assert!(
        message.contains("the schema does not describe the facts PIL supplies"),
        "{message}"
    );
}

#[test]
fn schema_demanding_facts_pil_does_not_supply_is_refused() {
    let dir = scratch("schema-extra");
    edit(
        &dir,
        "schema.cedarschema",
        "  region: String,\n};\n\n// Facts about the request",
        "  region: String,\n  ward: String,\n};\n\n// Facts about the request",
    );
    let (message, _) = refused(&dir);
    assert!(message.contains("schema.cedarschema"), "{message}");
    assert!(
        message.contains("the schema does not describe the facts PIL supplies"),
        "{message}"
    );
    assert!(message.contains("ward"), "{message}");
}

#[test]
fn settings_problems_are_refused() {
    let dir = scratch("settings");
    edit(
        &dir,
        "node.toml",
        "operator = [\"910000004\"]",
        "operator = [\"910000005\"]",
    );
    edit(
        &dir,
        "node.toml",
        "  \"genetics\",\n]\n\n[profession_groups]",
        "  \"genetics\",\n  \"astrology\",\n]\n\n[profession_groups]",
    );
    let (message, error) = refused(&dir);
    assert!(message.contains("node.toml"), "{message}");
    assert!(
        message.contains("`910000005` is not a valid organization number"),
        "{message}"
    );
    assert!(
        message.contains("`astrology` is not in [categories] known"),
        "{message}"
    );
    assert_eq!(error.problems().len(), 2);
}

#[test]
fn misspelt_setting_is_refused_with_line() {
    let dir = scratch("settings-key");
    edit(
        &dir,
        "node.toml",
        "audit_log_days = 3653",
        "audit_log_dayz = 3653",
    );
    let (message, error) = refused(&dir);
    assert!(message.contains("node.toml:"), "{message}");
    assert!(message.contains("audit_log_dayz"), "{message}");
    assert!(error.problems()[0].line.is_some());
}

#[test]
fn missing_files_are_refused() {
    let dir = scratch("missing");
    fs::remove_file(dir.join("node.toml")).unwrap();
    for entry in fs::read_dir(dir.join("policies")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let (message, _) = refused(&dir);
    assert!(message.contains("node.toml: cannot read"), "{message}");
    assert!(
        message.contains("contains no *.cedar rule files"),
        "{message}"
    );

    let (message, _) = refused(&dir.join("no-such-dir"));
    assert!(message.contains("is not a directory"), "{message}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let dir = scratch("many");
    write(
        &dir,
        "policies/70-broken.cedar",
        "@id(\"x\")\npermit (principal, action, resource) when { ;\n",
    );
    edit(
        &dir,
        "policies/50-emergency.cedar",
        "@legal_basis(\"helsepersonelloven § 7 (øyeblikkelig hjelp); pasientjournalloven § 19\")\n",
        "",
    );
    let (message, error) = refused(&dir);
    assert!(error.problems().len() >= 2, "{message}");
    assert!(message.contains("70-broken.cedar"), "{message}");
    assert!(message.contains("50-emergency.cedar"), "{message}");
}
