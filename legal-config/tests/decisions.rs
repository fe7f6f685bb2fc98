//! Decisions made by the default legal configuration in `legal-config/`.

use std::sync::OnceLock;

use pil_legal::{Decision, LegalConfig, PointerFacts, Requester, Role, RuleEffect};

const OWN_ORG: &str = "910000004";
const OWN_UNIT: &str = "910000012";
const OTHER_ORG: &str = "920000002";
const REGION: &str = "helse-vest";

/// This package's directory, read when the test runs (a reused test binary's compiled-in
/// path may be another checkout's).
fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("cargo test sets CARGO_MANIFEST_DIR")
        .into()
}

fn config() -> &'static LegalConfig {
    static CONFIG: OnceLock<LegalConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        LegalConfig::load(package_dir())
            .unwrap_or_else(|e| panic!("default legal configuration must load: {e}"))
    })
}

fn requester(profession: Option<&str>, purpose: &str, care_relationship: bool) -> Requester {
    Requester {
        organization: OWN_ORG.into(),
        point_of_care: Some(OWN_UNIT.into()),
        hpr_number: Some("9144889".into()),
        profession: profession.map(Into::into),
        purpose: purpose.into(),
        purpose_details: None,
        care_relationship,
    }
}

fn pointer(holder: &str, categories: &[&str]) -> PointerFacts {
    PointerFacts {
        holder: holder.into(),
        categories: categories.iter().map(|c| c.to_string()).collect(),
        region: REGION.into(),
    }
}

fn doctor(purpose: &str, care: bool) -> Requester {
    requester(Some("LE"), purpose, care)
}

/// Every decision must say why, and the emergency flag only accompanies an
/// allowed decision made by an emergency rule.
fn assert_well_formed(d: &Decision) {
    assert!(
        !d.rules.is_empty(),
        "a decision must record its rules: {d:?}"
    );
    assert!(d.errors.is_empty(), "no evaluation errors expected: {d:?}");
    for r in &d.rules {
        assert!(!r.id.is_empty() && !r.legal_basis.is_empty() && !r.explanation.is_empty());
        let expected = if d.allowed {
            RuleEffect::Permit
        } else {
            RuleEffect::Forbid
        };
        assert_eq!(r.effect, expected, "{d:?}");
    }
    if d.emergency {
        assert!(d.allowed);
    }
}

// ---------------------------------------------------------------------------
// Each default rule, by name
// ---------------------------------------------------------------------------

#[test]
fn permit_treatment_for_treat_and_coc_with_care_relationship() {
    for purpose in ["TREAT", "COC"] {
        for profession in ["LE", "SP", "PS", "JO", "FT", "TL"] {
            let d = config().decide(
                &requester(Some(profession), purpose, true),
                &pointer(OTHER_ORG, &["lab-results", "medications"]),
            );
            assert_well_formed(&d);
            assert!(d.allowed, "{profession} {purpose}: {d:?}");
            assert!(!d.emergency);
            assert_eq!(d.rule_ids(), ["permit-treatment"]);
            assert_eq!(
                d.rules[0].legal_basis,
                "pasientjournalloven § 19; helsepersonelloven §§ 25 og 45"
            );
        }
    }
}

#[test]
fn permit_patient_request() {
    let d = config().decide(&doctor("PATRQT", true), &pointer(OTHER_ORG, &["imaging"]));
    assert_well_formed(&d);
    assert!(d.allowed);
    assert_eq!(d.rule_ids(), ["permit-patient-request"]);
    assert!(
        d.rules[0]
            .legal_basis
            .contains("pasient- og brukerrettighetsloven § 5-1")
    );
}

#[test]
fn permit_emergency_without_care_relationship_is_flagged() {
    let d = config().decide(
        &requester(Some("SP"), "ETREAT", false),
        &pointer(OTHER_ORG, &["allergies"]),
    );
    assert_well_formed(&d);
    assert!(d.allowed);
    assert!(d.emergency, "emergency access must be flagged: {d:?}");
    assert_eq!(d.rule_ids(), ["permit-emergency"]);
    assert!(d.rules[0].legal_basis.contains("helsepersonelloven § 7"));

    // With a care relationship too, it is still emergency access.
    let d = config().decide(&doctor("ETREAT", true), &pointer(OTHER_ORG, &["allergies"]));
    assert!(d.allowed && d.emergency);
    assert_eq!(d.rule_ids(), ["permit-emergency"]);
}

#[test]
fn forbid_non_care_purpose() {
    for purpose in [
        "HRESCH",
        "POPHLTH",
        "PUBHLTH",
        "HPAYMT",
        "HOPERAT",
        "HMARKT",
        "NOSUCHCODE",
        "",
        "treat",
    ] {
        let d = config().decide(
            &doctor(purpose, true),
            &pointer(OTHER_ORG, &["lab-results"]),
        );
        assert_well_formed(&d);
        assert!(!d.allowed, "{purpose:?}: {d:?}");
        assert_eq!(d.rule_ids(), ["forbid-non-care-purpose"], "{purpose:?}");
        // And refused before the register is read.
        let d = config().decide_lookup(&doctor(purpose, true));
        assert!(!d.allowed);
        assert_eq!(d.rule_ids(), ["forbid-non-care-purpose"], "{purpose:?}");
    }
}

#[test]
fn forbid_not_health_personnel() {
    for profession in [None, Some("XX"), Some("le")] {
        let d = config().decide(
            &requester(profession, "TREAT", true),
            &pointer(OTHER_ORG, &["lab-results"]),
        );
        assert_well_formed(&d);
        assert!(!d.allowed, "{profession:?}");
        assert_eq!(
            d.rule_ids(),
            ["forbid-not-health-personnel"],
            "{profession:?}"
        );
    }
    // No HPR number and no authorization at all.
    let mut anonymous = requester(None, "ETREAT", false);
    anonymous.hpr_number = None;
    let d = config().decide_lookup(&anonymous);
    assert!(!d.allowed);
    assert_eq!(d.rule_ids(), ["forbid-not-health-personnel"]);
}

#[test]
fn forbid_without_care_relationship() {
    for purpose in ["TREAT", "COC", "PATRQT"] {
        let d = config().decide(
            &doctor(purpose, false),
            &pointer(OTHER_ORG, &["lab-results"]),
        );
        assert_well_formed(&d);
        assert!(!d.allowed);
        assert_eq!(d.rule_ids(), ["forbid-without-care-relationship"]);
        assert!(d.rules[0].legal_basis.contains("helsepersonelloven § 21 a"));
    }
    // Not even the organization that holds the data.
    let d = config().decide(&doctor("TREAT", false), &pointer(OWN_ORG, &["lab-results"]));
    assert!(!d.allowed);
    assert_eq!(d.rule_ids(), ["forbid-without-care-relationship"]);
}

#[test]
fn forbid_sensitive_categories_for_other_organizations() {
    // A nurse with a care relationship sees ordinary pointers but not a psychiatric one.
    let nurse = requester(Some("SP"), "TREAT", true);
    assert!(
        config()
            .decide(&nurse, &pointer(OTHER_ORG, &["nursing"]))
            .allowed
    );
    for sensitive in [
        "mental-health",
        "substance-abuse",
        "sexual-health",
        "genetics",
    ] {
        let d = config().decide(&nurse, &pointer(OTHER_ORG, &["clinical-notes", sensitive]));
        assert_well_formed(&d);
        assert!(!d.allowed, "{sensitive}");
        assert_eq!(d.rule_ids(), ["forbid-sensitive-categories"]);
        assert!(
            d.rules[0]
                .legal_basis
                .contains("personvernforordningen art. 9")
        );
    }
}

#[test]
fn default_deny_when_no_rule_permits() {
    // A dental secretary is health personnel but not in the "treating" group.
    let d = config().decide(
        &requester(Some("TH"), "TREAT", true),
        &pointer(OTHER_ORG, &["dental"]),
    );
    assert_well_formed(&d);
    assert!(!d.allowed);
    assert_eq!(d.rule_ids(), ["default-deny"]);
    assert_eq!(d.rules[0].effect, RuleEffect::Forbid);
    assert!(d.rules[0].explanation.contains("No rule permits"));
    // Nor in an emergency.
    let d = config().decide_lookup(&requester(Some("TH"), "ETREAT", false));
    assert!(!d.allowed && !d.emergency);
    assert_eq!(d.rule_ids(), ["default-deny"]);
}

// ---------------------------------------------------------------------------
// The exceptions to the sensitive-category rule
// ---------------------------------------------------------------------------

#[test]
fn sensitive_visible_to_holding_organization() {
    let nurse = requester(Some("SP"), "TREAT", true);
    // Holder is the requester's organization (the parent of its point of care).
    let d = config().decide(&nurse, &pointer(OWN_ORG, &["mental-health"]));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.rule_ids(), ["permit-treatment"]);
    // Holder is the requester's own point of care.
    assert!(
        config()
            .decide(&nurse, &pointer(OWN_UNIT, &["mental-health"]))
            .allowed
    );
    // Holder is a sibling unit the requester does not belong to.
    assert!(
        !config()
            .decide(&nurse, &pointer("910000020", &["mental-health"]))
            .allowed
    );
    // Without a point of care, the organization itself.
    let mut no_unit = nurse.clone();
    no_unit.point_of_care = None;
    assert!(
        config()
            .decide(&no_unit, &pointer(OWN_ORG, &["genetics"]))
            .allowed
    );
    assert!(
        !config()
            .decide(&no_unit, &pointer(OWN_UNIT, &["genetics"]))
            .allowed
    );
}

#[test]
fn sensitive_visible_in_emergency() {
    let d = config().decide(
        &requester(Some("SP"), "ETREAT", false),
        &pointer(OTHER_ORG, &["substance-abuse"]),
    );
    assert!(d.allowed && d.emergency, "{d:?}");
    assert_eq!(d.rule_ids(), ["permit-emergency"]);
}

#[test]
fn sensitive_visible_to_sensitive_care_group_with_care_relationship() {
    for profession in ["LE", "PS"] {
        for purpose in ["TREAT", "COC", "PATRQT"] {
            let d = config().decide(
                &requester(Some(profession), purpose, true),
                &pointer(OTHER_ORG, &["mental-health"]),
            );
            assert!(d.allowed, "{profession} {purpose}: {d:?}");
        }
        // Never without the care relationship.
        let d = config().decide(
            &requester(Some(profession), "TREAT", false),
            &pointer(OTHER_ORG, &["mental-health"]),
        );
        assert!(!d.allowed);
    }
}

#[test]
fn unknown_category_is_treated_as_sensitive() {
    let nurse = requester(Some("SP"), "TREAT", true);
    let d = config().decide(&nurse, &pointer(OTHER_ORG, &["tarot-readings"]));
    assert!(!d.allowed);
    assert_eq!(d.rule_ids(), ["forbid-sensitive-categories"]);
    // But the holder and the sensitive-care group still see it.
    assert!(
        config()
            .decide(&nurse, &pointer(OWN_ORG, &["tarot-readings"]))
            .allowed
    );
    assert!(
        config()
            .decide(
                &doctor("TREAT", true),
                &pointer(OTHER_ORG, &["tarot-readings"])
            )
            .allowed
    );
    assert!(config().is_known_category("dental"));
    assert!(!config().is_known_category("tarot-readings"));
}

// ---------------------------------------------------------------------------
// Several rules at once; search vs lookup
// ---------------------------------------------------------------------------

#[test]
fn every_applicable_forbid_is_recorded() {
    let d = config().decide(
        &requester(Some("XX"), "HRESCH", false),
        &pointer(OTHER_ORG, &["genetics"]),
    );
    assert!(!d.allowed);
    assert_eq!(
        d.rule_ids(),
        [
            "forbid-non-care-purpose",
            "forbid-not-health-personnel",
            "forbid-without-care-relationship",
            "forbid-sensitive-categories",
        ]
    );
}

#[test]
fn search_is_not_affected_by_categories() {
    // The coarse check knows no pointer, so only purpose, profession and care
    // relationship matter.
    let d = config().decide_lookup(&requester(Some("SP"), "TREAT", true));
    assert!(d.allowed);
    assert_eq!(d.rule_ids(), ["permit-treatment"]);
    let d = config().decide_lookup(&requester(Some("SP"), "ETREAT", false));
    assert!(d.allowed && d.emergency);
    let d = config().decide_lookup(&requester(Some("SP"), "TREAT", false));
    assert!(!d.allowed);
    assert_eq!(d.rule_ids(), ["forbid-without-care-relationship"]);
}

#[test]
fn purpose_details_do_not_change_the_outcome() {
    let mut r = doctor("TREAT", true);
    let p = pointer(OTHER_ORG, &["lab-results"]);
    let without = config().decide(&r, &p);
    r.purpose_details = Some("oppfølging etter utskrivning".into());
    assert_eq!(config().decide(&r, &p), without);
}

#[test]
fn decision_serializes_for_the_audit_log() {
    let d = config().decide(
        &requester(Some("SP"), "ETREAT", false),
        &pointer(OTHER_ORG, &["allergies"]),
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["allowed"], true);
    assert_eq!(json["emergency"], true);
    assert_eq!(json["rules"][0]["id"], "permit-emergency");
    assert_eq!(json["rules"][0]["effect"], "permit");
    assert!(json.get("errors").is_none());
    let back: Decision = serde_json::from_value(json).unwrap();
    assert_eq!(back, d);
}

// ---------------------------------------------------------------------------
// The full matrix, against an independent statement of the intended rules
// ---------------------------------------------------------------------------

const PURPOSES: [&str; 8] = [
    "TREAT", "COC", "ETREAT", "PATRQT", "HRESCH", "POPHLTH", "HPAYMT", "BOGUS",
];
const PROFESSIONS: [Option<&str>; 8] = [
    Some("LE"),
    Some("SP"),
    Some("PS"),
    Some("JO"),
    Some("TH"),
    Some("HF"),
    Some("XX"),
    None,
];
const CATEGORY_SETS: [&[&str]; 5] = [
    &["lab-results"],
    &["clinical-notes", "medications", "home-monitoring"],
    &["mental-health"],
    &["lab-results", "sexual-health"],
    &["unheard-of"],
];
const HOLDERS: [&str; 3] = [OWN_ORG, OWN_UNIT, OTHER_ORG];

/// What the default rules are meant to say, written out plainly.
/// Returns the expected determining rule ids (in rule order).
fn expected(
    purpose: &str,
    profession: Option<&str>,
    care: bool,
    pointer: Option<(&[&str], &str)>,
) -> Vec<&'static str> {
    let health_personnel = profession.is_some_and(|p| p != "XX");
    let treating = matches!(profession, Some("LE" | "SP" | "PS" | "JO"));
    let sensitive_care = matches!(profession, Some("LE" | "PS"));
    let care_purpose = ["TREAT", "COC", "ETREAT", "PATRQT"].contains(&purpose);
    let emergency = purpose == "ETREAT";

    let mut forbids = Vec::new();
    if !care_purpose {
        forbids.push("forbid-non-care-purpose");
    }
    if !health_personnel {
        forbids.push("forbid-not-health-personnel");
    }
    if !care && !emergency {
        forbids.push("forbid-without-care-relationship");
    }
    if let Some((categories, holder)) = pointer {
        let sensitive = categories.iter().any(|c| {
            [
                "mental-health",
                "substance-abuse",
                "sexual-health",
                "genetics",
                "unheard-of",
            ]
            .contains(c)
        });
        let own = holder == OWN_ORG || holder == OWN_UNIT;
        if sensitive && !(own || emergency || (sensitive_care && care)) {
            forbids.push("forbid-sensitive-categories");
        }
    }
    if !forbids.is_empty() {
        return forbids;
    }
    let mut permits = Vec::new();
    if treating && ["TREAT", "COC"].contains(&purpose) && care {
        permits.push("permit-treatment");
    }
    if treating && purpose == "PATRQT" && care {
        permits.push("permit-patient-request");
    }
    if treating && emergency {
        permits.push("permit-emergency");
    }
    if permits.is_empty() {
        permits.push("default-deny");
    }
    permits
}

#[test]
fn full_matrix_matches_the_intended_rules() {
    let mut checked = 0;
    let mut allowed = 0;
    let mut emergencies = 0;
    for purpose in PURPOSES {
        for profession in PROFESSIONS {
            for care in [true, false] {
                let r = requester(profession, purpose, care);

                let want = expected(purpose, profession, care, None);
                let d = config().decide_lookup(&r);
                assert_well_formed(&d);
                assert_eq!(
                    d.rule_ids(),
                    want,
                    "search: {purpose} {profession:?} care={care}"
                );
                assert_eq!(d.allowed, want[0].starts_with("permit"));
                assert_eq!(d.emergency, want == ["permit-emergency"]);

                for categories in CATEGORY_SETS {
                    for holder in HOLDERS {
                        let want = expected(purpose, profession, care, Some((categories, holder)));
                        let d = config().decide(&r, &pointer(holder, categories));
                        assert_well_formed(&d);
                        assert_eq!(
                            d.rule_ids(),
                            want,
                            "lookup: {purpose} {profession:?} care={care} {categories:?} holder={holder}"
                        );
                        assert_eq!(d.allowed, want[0].starts_with("permit"));
                        assert_eq!(d.emergency, want == ["permit-emergency"]);
                        checked += 1;
                        allowed += d.allowed as usize;
                        emergencies += d.emergency as usize;
                    }
                }
            }
        }
    }
    assert_eq!(
        checked,
        PURPOSES.len() * PROFESSIONS.len() * 2 * CATEGORY_SETS.len() * HOLDERS.len()
    );
    assert!(allowed > 0 && allowed < checked);
    assert!(emergencies > 0);
}

#[test]
fn every_default_rule_is_exercised_by_the_matrix() {
    let summary = config().summary();
    let mut seen = std::collections::HashSet::new();
    for purpose in PURPOSES {
        for profession in PROFESSIONS {
            for care in [true, false] {
                let r = requester(profession, purpose, care);
                seen.extend(config().decide_lookup(&r).rules.into_iter().map(|r| r.id));
                for categories in CATEGORY_SETS {
                    for holder in HOLDERS {
                        seen.extend(
                            config()
                                .decide(&r, &pointer(holder, categories))
                                .rules
                                .into_iter()
                                .map(|r| r.id),
                        );
                    }
                }
            }
        }
    }
    for rule in &summary.rules {
        assert!(
            seen.contains(&rule.rule.id),
            "rule {} never determined a decision",
            rule.rule.id
        );
    }
    assert!(seen.contains("default-deny"));
}

// ---------------------------------------------------------------------------
// Settings, summary
// ---------------------------------------------------------------------------

#[test]
fn settings_and_roles() {
    let c = config();
    let s = c.settings();
    assert_eq!(s.node.region, REGION);
    assert_eq!(s.retention.audit_log_days, 3653);
    assert_eq!(s.retention.pointer_lifetime_days, 365);
    assert_eq!(
        s.categories.sensitive,
        [
            "mental-health",
            "substance-abuse",
            "sexual-health",
            "genetics"
        ]
    );
    assert_eq!(s.categories.known.len(), 14);
    assert!(c.has_role("910000004", Role::Operator));
    assert!(!c.has_role("910000004", Role::Auditor));
    assert!(c.has_role("920000002", Role::Auditor));
    assert!(!c.has_role("999999999", Role::Operator));
}

#[test]
fn summary_lists_every_rule_with_its_legal_basis() {
    let summary = pil_legal::check(package_dir()).unwrap();
    assert_eq!(summary.policies, 7);
    assert_eq!(summary.permits, 3);
    assert_eq!(summary.forbids, 4);
    assert_eq!(summary.emergency_rules, 1);
    let ids: Vec<&str> = summary.rules.iter().map(|r| r.rule.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "forbid-non-care-purpose",
            "forbid-not-health-personnel",
            "forbid-without-care-relationship",
            "permit-treatment",
            "permit-patient-request",
            "permit-emergency",
            "forbid-sensitive-categories",
        ]
    );
    for r in &summary.rules {
        assert!(r.file.starts_with("policies"), "{:?}", r.file);
        assert!(!r.rule.legal_basis.is_empty());
        assert_eq!(r.emergency, r.rule.id == "permit-emergency");
    }
    let text = summary.to_string();
    assert!(
        text.contains("7 rules: 3 permit, 4 forbid, 1 marked emergency"),
        "{text}"
    );
    assert!(
        text.contains("helsepersonelloven § 7 (øyeblikkelig hjelp)"),
        "{text}"
    );
    assert_eq!(
        config().rule("permit-emergency").unwrap().effect,
        RuleEffect::Permit
    );
    assert!(config().rule("no-such-rule").is_none());
}

// ---------------------------------------------------------------------------
// Speed
// ---------------------------------------------------------------------------

#[test]
fn decisions_are_fast() {
    let c = config();
    let r = requester(Some("SP"), "TREAT", true);
    let p = pointer(OTHER_ORG, &["lab-results", "mental-health"]);
    let n = 10_000;
    let start = std::time::Instant::now();
    let mut allowed = 0;
    for i in 0..n {
        let d = if i % 4 == 0 {
            c.decide_lookup(&r)
        } else {
            c.decide(&r, &p)
        };
        allowed += d.allowed as usize;
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    eprintln!("{per:.1} µs per decision ({n} decisions)");
    assert_eq!(allowed, n / 4);
}

#[test]
fn readme_documents_every_rule() {
    let readme =
        std::fs::read_to_string(package_dir().join("../docs/legal-configuration.md")).unwrap();
    for rule in config().summary().rules {
        assert!(
            readme.contains(&format!("`{}`", rule.rule.id)),
            "docs/legal-configuration.md does not explain {}",
            rule.rule.id
        );
    }
}
