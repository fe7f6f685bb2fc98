//! The legal configuration of a PIL node and the decisions it makes.
//!
//! A node's `legal-config/` directory holds
//!
//! * `schema.cedarschema` — the Cedar schema: the entity types, actions and
//!   request context the rules may talk about;
//! * `policies/*.cedar` — the rules, each a Cedar `permit` or `forbid` policy
//!   carrying `@id`, `@legal_basis` and `@explanation` annotations (and
//!   `@emergency("true")` for emergency-access rules);
//! * `node.toml` — node settings: region, retention periods, data category
//!   vocabulary and which categories are sensitive, the profession groups the
//!   rules name, and which organizations hold the operator and auditor roles.
//!
//! [`LegalConfig::load`] reads and checks all of it (schema, syntax, strict
//! validation of every rule against the schema, required annotations, the
//! profession groups the rules name, and that the schema still describes the
//! facts PIL supplies) and refuses to load if anything is wrong, naming file,
//! line and problem. [`check`] runs the same checks for `pil policy check`.
//!
//! Two questions are asked of a loaded configuration:
//!
//! * [`LegalConfig::decide_lookup`] — "may this requester search this node's
//!   register at all?" — is Cedar action `search` on the `Registry` entity. It is
//!   asked before the register is read, so a request with a forbidden purpose
//!   never touches patient data.
//! * [`LegalConfig::decide`] — "may this requester see this pointer?" — is Cedar
//!   action `lookup` on a `Pointer` entity, asked for every pointer found.
//!
//! Every [`Decision`] lists the rules that determined it, each with its legal
//! basis; when nothing permits a request it records an explicit
//! `default-deny` entry, so every decision in the audit log says why.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicyId, PolicySet, Request, Response, RestrictedExpression,
    Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};

/// File name of the Cedar schema inside the legal configuration directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Directory (inside the legal configuration directory) holding the `*.cedar` rules.
pub const POLICY_DIR: &str = "policies";
/// File name of the node settings inside the legal configuration directory.
pub const SETTINGS_FILE: &str = "node.toml";

/// Rule id recorded when no rule permits a request.
pub const DEFAULT_DENY_ID: &str = "default-deny";
/// Rule id recorded when evaluating the rules failed (the request is refused).
pub const EVALUATION_ERROR_ID: &str = "evaluation-error";

/// Annotations every rule must carry.
pub const REQUIRED_ANNOTATIONS: [&str; 3] = ["id", "legal_basis", "explanation"];

/// Principal id used when a request carries no HPR number.
const UNIDENTIFIED: &str = "unidentified";
/// Entity id of the pointer under decision (one pointer per request).
const POINTER_ID: &str = "pointer";

// ---------------------------------------------------------------------------
// Requests and decisions
// ---------------------------------------------------------------------------

/// Who asks, and why: the facts from the requester's certificate and signed
/// token (HelseID / tillitsrammeverk).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requester {
    /// Organization number of the requesting organization (`orgnr_parent`).
    pub organization: String,
    /// Organization number of the sub-unit / point of care (`orgnr_child`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_of_care: Option<String>,
    /// HPR number of the health professional, if the token carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpr_number: Option<String>,
    /// HPR authorization code (helsepersonellkategori), e.g. `LE`, `SP`, `PS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profession: Option<String>,
    /// HL7 v3 PurposeOfUse code, e.g. `TREAT`, `ETREAT`, `COC`, `PATRQT`.
    pub purpose: String,
    /// Detail of the purpose, when the token carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_details: Option<String>,
    /// Whether the requester asserts a care relationship with the patient.
    pub care_relationship: bool,
}

/// The facts about one pointer that the rules may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PointerFacts {
    /// Organization number of the organization holding the data.
    pub holder: String,
    /// Data categories, from the vocabulary in `node.toml` (`[categories] known`).
    /// A category outside that vocabulary is treated as sensitive.
    pub categories: Vec<String>,
    /// Region of the node where the pointer is registered.
    pub region: String,
}

/// Whether a rule permits or forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleEffect {
    Permit,
    Forbid,
}

impl fmt::Display for RuleEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleEffect::Permit => "permit",
            RuleEffect::Forbid => "forbid",
        })
    }
}

/// One rule that determined a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// The rule's `@id`.
    pub id: String,
    /// The rule's `@legal_basis`.
    pub legal_basis: String,
    /// The rule's `@explanation`, in plain language.
    pub explanation: String,
    pub effect: RuleEffect,
}

/// The outcome of one question put to the legal configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// True when the request was allowed by a rule marked `@emergency("true")`.
    pub emergency: bool,
    /// The determining rules: every permit rule that applied when allowed,
    /// every forbid rule that applied when refused, or the single
    /// `default-deny` (or `evaluation-error`) entry. Never empty.
    pub rules: Vec<RuleRef>,
    /// Errors met while evaluating the rules. Non-empty only for an
    /// `evaluation-error` decision, which is always a refusal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Decision {
    /// Ids of the determining rules, in rule order.
    pub fn rule_ids(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.id.as_str()).collect()
    }

    /// Whether the rule with this id is among the determining rules.
    pub fn has_rule(&self, id: &str) -> bool {
        self.rules.iter().any(|r| r.id == id)
    }
}

/// Roles a certificate identity (organization number) may hold on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the node, federates it, rolls out legal configuration.
    Operator,
    /// Reads, verifies and exports the audit log.
    Auditor,
}

// ---------------------------------------------------------------------------
// node.toml
// ---------------------------------------------------------------------------

/// The contents of `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub node: NodeSection,
    pub retention: Retention,
    pub categories: Categories,
    /// Group name → HPR authorization codes. Rules name groups as
    /// `ProfessionGroup::"name"`.
    pub profession_groups: BTreeMap<String, Vec<String>>,
    pub roles: Roles,
    #[serde(default)]
    pub default_deny: DefaultDeny,
    #[serde(default)]
    pub protections: Protections,
    #[serde(default)]
    pub subscriptions: Subscriptions,
}

/// How long an organization may follow a patient's pointer changes, and on what
/// ground.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriptions {
    /// The longest a subscription lasts before it must be renewed with a fresh token.
    pub max_days: u32,
    /// The legal basis for following a patient that long, shown with every
    /// subscription.
    pub legal_basis: String,
    /// Days an event is kept for consumers that were away.
    pub events_days: u32,
    /// Hours this region keeps every pointer change in its journal, so that a
    /// subscription made at another region, and registered here only once this
    /// region came to hold its patient, is given every change since it was made.
    /// A registration later than this is given the live pointers instead.
    #[serde(default = "default_journal_hours")]
    pub journal_hours: u32,
}

fn default_journal_hours() -> u32 {
    24
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            max_days: 30,
            legal_basis: "helsepersonelloven § 45; pasientjournalloven § 19: following a                           patient is allowed as looking them up is, for health personnel                           who give the patient care, for as long as that care lasts"
                .into(),
            events_days: 30,
            journal_hours: default_journal_hours(),
        }
    }
}

/// What a lookup does when a region holding the patient's protections (opt-out and
/// blocks, which hold for every region's pointers) cannot be asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protections {
    /// Emergency lookups (purpose ETREAT) show pointers even then. Off by default: the
    /// answer withholds every pointer a protection could forbid.
    #[serde(default)]
    pub emergency_shows_unchecked: bool,
    /// The legal basis for showing them; required when the above is on.
    #[serde(default)]
    pub emergency_legal_basis: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The region this node serves.
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Days an audit log entry is kept.
    pub audit_log_days: u32,
    /// Days a pointer lives unless its holder refreshes it.
    pub pointer_lifetime_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Categories {
    /// Every data category a pointer may carry.
    pub known: Vec<String>,
    /// Categories whose existence is especially sensitive.
    pub sensitive: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Organization numbers holding the operator role.
    #[serde(default)]
    pub operator: Vec<String>,
    /// Organization numbers holding the auditor role.
    #[serde(default)]
    pub auditor: Vec<String>,
}

/// Legal basis and explanation recorded with a `default-deny` decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    pub legal_basis: String,
    pub explanation: String,
}

impl Default for DefaultDeny {
    fn default() -> Self {
        DefaultDeny {
            legal_basis: "helsepersonelloven § 21; personvernforordningen art. 9 nr. 1".into(),
            explanation: "No rule permits this request, so it is refused: health information \
                          is confidential unless a rule gives a reason to share it."
                .into(),
        }
    }
}

impl NodeSettings {
    /// Semantic checks that the TOML parser cannot make.
    fn check(&self, file: &Path, problems: &mut Vec<Problem>) {
        let mut bad = |message: String| problems.push(Problem::in_file(file, message));
        if !pil_proto::ident::is_valid_region_id(&self.node.region) {
            bad(format!(
                "[node] region `{}` must be 1-63 characters of a-z, 0-9 and '-', starting and \
                 ending with a letter or digit",
                self.node.region
            ));
        }
        if self.retention.audit_log_days == 0 {
            bad("[retention] audit_log_days must be at least 1".into());
        }
        if self.retention.pointer_lifetime_days == 0 {
            bad("[retention] pointer_lifetime_days must be at least 1".into());
        }
        if self.categories.known.is_empty() {
            bad("[categories] known must list at least one category".into());
        }
        if self.protections.emergency_shows_unchecked
            && self.protections.emergency_legal_basis.trim().is_empty()
        {
            bad(
                "[protections] emergency_shows_unchecked needs emergency_legal_basis: name the \
                 legal basis for showing pointers whose protections could not be checked"
                    .into(),
            );
        }
        if self.subscriptions.max_days == 0 || self.subscriptions.events_days == 0 {
            bad("[subscriptions] max_days and events_days must be at least 1".into());
        }
        if self.subscriptions.journal_hours == 0 {
            bad("[subscriptions] journal_hours must be at least 1".into());
        }
        if self.subscriptions.legal_basis.trim().is_empty() {
            bad(
                "[subscriptions] legal_basis must name the legal basis for following a                  patient's pointers"
                    .into(),
            );
        }
        let mut seen = HashSet::new();
        for c in &self.categories.known {
            if !is_category_name(c) {
                bad(format!(
                    "[categories] known: `{c}` is not a valid category name (lower-case letters, digits and '-')"
                ));
            }
            if !seen.insert(c) {
                bad(format!("[categories] known: `{c}` is listed twice"));
            }
        }
        for c in &self.categories.sensitive {
            if !self.categories.known.contains(c) {
                bad(format!(
                    "[categories] sensitive: `{c}` is not in [categories] known"
                ));
            }
        }
        for (group, codes) in &self.profession_groups {
            if !is_category_name(group) {
                bad(format!(
                    "[profession_groups] `{group}` is not a valid group name (lower-case letters, digits and '-')"
                ));
            }
            if codes.is_empty() {
                bad(format!("[profession_groups] `{group}` has no members"));
            }
            for code in codes {
                if !is_profession_code(code) {
                    bad(format!(
                        "[profession_groups] `{group}`: `{code}` is not an HPR authorization code (1-4 upper-case letters or digits)"
                    ));
                }
            }
        }
        for (role, list) in [
            ("operator", &self.roles.operator),
            ("auditor", &self.roles.auditor),
        ] {
            for orgnr in list {
                if !is_valid_orgnr(orgnr) {
                    bad(format!(
                        "[roles] {role}: `{orgnr}` is not a valid organization number (9 digits, mod-11 check digit)"
                    ));
                }
            }
        }
        if self.default_deny.legal_basis.trim().is_empty()
            || self.default_deny.explanation.trim().is_empty()
        {
            bad("[default_deny] legal_basis and explanation must not be empty".into());
        }
    }
}

fn is_category_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_profession_code(s: &str) -> bool {
    (1..=4).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Whether `s` is a valid Norwegian organization number: the one rule of pil-proto
/// (9 digits whose last is the mod-11 check digit over the first 8).
pub fn is_valid_orgnr(s: &str) -> bool {
    pil_proto::ident::OrgNumber::parse(s).is_ok()
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One thing wrong with a legal configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line of the fault, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the fault, when known.
    pub column: Option<usize>,
    /// The rule at fault (its `@id`, or Cedar's name for it when it has none).
    pub policy: Option<String>,
    pub message: String,
}

impl Problem {
    fn in_file(file: &Path, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: None,
            column: None,
            policy: None,
            message: message.into(),
        }
    }

    fn at(mut self, text: &str, offset: Option<usize>) -> Self {
        if let Some((line, column)) = offset.and_then(|o| line_column(text, o)) {
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }

    fn policy(mut self, id: impl Into<String>) -> Self {
        self.policy = Some(id.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(policy) = &self.policy {
            write!(f, "rule `{policy}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a legal configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The configuration has one or more problems; nothing was loaded.
    #[error("legal configuration in {} refused, {} problem(s):\n{}", dir.display(), problems.len(), list_problems(problems))]
    Invalid {
        dir: PathBuf,
        problems: Vec<Problem>,
    },
}

impl PolicyError {
    /// All problems found.
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Invalid { problems, .. } => problems,
        }
    }
}

fn list_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> Option<(usize, usize)> {
    let before = text.get(..offset.min(text.len()))?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    Some((line, column))
}

/// An error with its chain of causes and help text, on one line.
fn explain(error: &dyn Diagnostic) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(help) = error.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    message
}

/// The message of a Cedar diagnostic, with its help text, and its first location.
fn describe(diag: &dyn Diagnostic) -> (String, Option<usize>) {
    let mut message = diag.to_string();
    if let Some(help) = diag.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    let offset = diag
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset());
    (message, offset)
}

// ---------------------------------------------------------------------------
// The loaded configuration
// ---------------------------------------------------------------------------

/// A rule as loaded, with what a summary or decision needs about it.
#[derive(Debug, Clone)]
struct RuleInfo {
    rule: RuleRef,
    emergency: bool,
    /// Path relative to the configuration directory.
    file: PathBuf,
    /// Position in load order (file name order, then order within the file).
    order: usize,
}

/// Summary of a checked legal configuration, for `pil policy check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub dir: PathBuf,
    pub region: String,
    /// Number of rules.
    pub policies: usize,
    pub permits: usize,
    pub forbids: usize,
    /// Number of rules marked `@emergency("true")`.
    pub emergency_rules: usize,
    pub sensitive_categories: Vec<String>,
    pub audit_log_days: u32,
    pub pointer_lifetime_days: u32,
    /// The rules, in load order.
    pub rules: Vec<RuleSummary>,
}

/// One rule in a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSummary {
    #[serde(flatten)]
    pub rule: RuleRef,
    pub emergency: bool,
    /// The file the rule is in, relative to the configuration directory.
    pub file: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "legal configuration {} is valid (region {})",
            self.dir.display(),
            self.region
        )?;
        writeln!(
            f,
            "{} rules: {} permit, {} forbid, {} marked emergency",
            self.policies, self.permits, self.forbids, self.emergency_rules
        )?;
        writeln!(
            f,
            "sensitive categories: {}",
            self.sensitive_categories.join(", ")
        )?;
        writeln!(
            f,
            "retention: audit log {} days, pointers {} days",
            self.audit_log_days, self.pointer_lifetime_days
        )?;
        for r in &self.rules {
            writeln!(
                f,
                "  {:<6} {}{}  [{}]\n         legal basis: {}",
                r.rule.effect,
                r.rule.id,
                if r.emergency { " (emergency)" } else { "" },
                r.file.display(),
                r.rule.legal_basis
            )?;
        }
        Ok(())
    }
}

/// Which question is asked.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// Cedar action `search` on this node's `Registry`.
    Registry,
    /// Cedar action `lookup` on one `Pointer`.
    Pointer(&'a PointerFacts),
}

/// Pre-built Cedar names, so that a decision only builds the few entities
/// that describe the request.
#[derive(Debug, Clone)]
struct Names {
    organization: EntityTypeName,
    professional: EntityTypeName,
    profession_group: EntityTypeName,
    pointer: EntityTypeName,
    search: EntityUid,
    lookup: EntityUid,
    registry: EntityUid,
}

impl Names {
    fn new(region: &str) -> Result<Self, String> {
        let ty = |s: &str| {
            EntityTypeName::from_str(s).map_err(|e| format!("bad entity type name {s}: {e}"))
        };
        let action = ty("Action")?;
        let registry = ty("Registry")?;
        Ok(Names {
            organization: ty("Organization")?,
            professional: ty("Professional")?,
            profession_group: ty("ProfessionGroup")?,
            pointer: ty("Pointer")?,
            search: EntityUid::from_type_name_and_id(action.clone(), EntityId::new("search")),
            lookup: EntityUid::from_type_name_and_id(action, EntityId::new("lookup")),
            registry: EntityUid::from_type_name_and_id(registry, EntityId::new(region)),
        })
    }
}

/// Decisions this configuration has made, reused for the same facts.
///
/// A decision is a pure function of the configuration, the requester's facts and
/// the pointer's facts (no clock, no other state), and a record system asks the
/// same questions over and over: the same clinician, the same few holders and
/// category sets. Evaluating Cedar builds entities and a request each time, so
/// the answers are kept. The cache belongs to one loaded configuration; a reload
/// builds a new configuration and so starts empty.
#[derive(Clone)]
struct DecisionCache(Arc<quick_cache::sync::Cache<(Requester, Option<PointerFacts>), Decision>>);

/// Decisions kept per configuration; a few MB at most.
const DECISION_CACHE_CAPACITY: usize = 20_000;

impl DecisionCache {
    fn new() -> Self {
        DecisionCache(Arc::new(quick_cache::sync::Cache::new(
            DECISION_CACHE_CAPACITY,
        )))
    }
}

impl fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionCache")
            .field("len", &self.0.len())
            .finish()
    }
}

/// A loaded, validated legal configuration, ready to decide requests.
///
/// Build it once (at start-up or when a new configuration is rolled out) and
/// share it; [`LegalConfig::decide`] takes `&self` and is cheap: repeated
/// questions are answered from a cache of earlier decisions.
#[derive(Debug, Clone)]
pub struct LegalConfig {
    dir: PathBuf,
    settings: NodeSettings,
    schema: Schema,
    policies: PolicySet,
    rules: HashMap<PolicyId, RuleInfo>,
    names: Names,
    /// Profession code → the `ProfessionGroup` entities it belongs to.
    groups_of: HashMap<String, Vec<EntityUid>>,
    known_categories: HashSet<String>,
    /// `context.sensitive_categories` when the pointer has no unknown category.
    sensitive_set: RestrictedExpression,
    /// Action entities from the schema (needed for action groups).
    action_entities: Vec<Entity>,
    registry_entity: Entity,
    default_deny: RuleRef,
    decided: DecisionCache,
}

impl LegalConfig {
    /// Load and check the legal configuration in `dir`.
    ///
    /// Refuses (with every problem found, each naming its file and, where
    /// possible, line and rule) if the schema or a rule does not parse, a rule
    /// fails strict validation against the schema, a rule lacks `@id`,
    /// `@legal_basis` or `@explanation`, two rules share an `@id`, a rule
    /// names a profession group `node.toml` does not define, `node.toml` is
    /// malformed, or the schema no longer describes the facts PIL supplies.
    pub fn load(dir: impl AsRef<Path>) -> Result<LegalConfig, PolicyError> {
        let dir = dir.as_ref();
        let mut problems = Vec::new();
        let loaded = load_inner(dir, &mut problems);
        problems.sort_by(|a, b| {
            (&a.file, a.line, a.column, &a.policy, &a.message)
                .cmp(&(&b.file, b.line, b.column, &b.policy, &b.message))
        });
        problems.dedup();
        match loaded {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                if problems.is_empty() {
                    problems.push(Problem::in_file(dir, "could not be loaded"));
                }
                Err(PolicyError::Invalid {
                    dir: dir.to_path_buf(),
                    problems,
                })
            }
        }
    }

    /// Decide whether `requester` may see `pointer` (Cedar action `lookup`).
    pub fn decide(&self, requester: &Requester, pointer: &PointerFacts) -> Decision {
        self.cached(requester, Target::Pointer(pointer))
    }

    /// Decide whether `requester` may search this node's register at all
    /// (Cedar action `search` on `Registry::"<region>"`), before any pointer
    /// is read. A refusal here means the register is not touched.
    pub fn decide_lookup(&self, requester: &Requester) -> Decision {
        self.cached(requester, Target::Registry)
    }

    /// The node settings from `node.toml`.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// The directory the configuration was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the organization number (from a client certificate) holds `role`.
    pub fn has_role(&self, orgnr: &str, role: Role) -> bool {
        let list = match role {
            Role::Operator => &self.settings.roles.operator,
            Role::Auditor => &self.settings.roles.auditor,
        };
        list.iter().any(|o| o == orgnr)
    }

    /// Whether `category` is in the node's category vocabulary.
    pub fn is_known_category(&self, category: &str) -> bool {
        self.known_categories.contains(category)
    }

    /// The rule with this `@id`, if loaded.
    pub fn rule(&self, id: &str) -> Option<RuleRef> {
        self.rules.get(&PolicyId::new(id)).map(|r| r.rule.clone())
    }

    /// Summary of the configuration: counts and every rule with its legal basis.
    pub fn summary(&self) -> Summary {
        let mut rules: Vec<&RuleInfo> = self.rules.values().collect();
        rules.sort_by_key(|r| r.order);
        let permits = rules
            .iter()
            .filter(|r| r.rule.effect == RuleEffect::Permit)
            .count();
        Summary {
            dir: self.dir.clone(),
            region: self.settings.node.region.clone(),
            policies: rules.len(),
            permits,
            forbids: rules.len() - permits,
            emergency_rules: rules.iter().filter(|r| r.emergency).count(),
            sensitive_categories: self.settings.categories.sensitive.clone(),
            audit_log_days: self.settings.retention.audit_log_days,
            pointer_lifetime_days: self.settings.retention.pointer_lifetime_days,
            rules: rules
                .into_iter()
                .map(|r| RuleSummary {
                    rule: r.rule.clone(),
                    emergency: r.emergency,
                    file: r.file.clone(),
                })
                .collect(),
        }
    }

    /// The decision for these facts: from the cache, or evaluated and kept. An
    /// evaluation error is not kept, so a transient one cannot stick.
    fn cached(&self, requester: &Requester, target: Target<'_>) -> Decision {
        let key = match target {
            Target::Registry => (requester.clone(), None),
            Target::Pointer(p) => (requester.clone(), Some(p.clone())),
        };
        if let Some(decision) = self.decided.0.get(&key) {
            return decision;
        }
        let decision = self.evaluate(requester, target);
        if decision.errors.is_empty() {
            self.decided.0.insert(key, decision.clone());
        }
        decision
    }

    fn evaluate(&self, requester: &Requester, target: Target<'_>) -> Decision {
        match self.build_request(requester, target, None) {
            Ok((request, entities)) => {
                let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
                self.to_decision(&response)
            }
            Err(error) => self.evaluation_error(vec![error]),
        }
    }

    fn to_decision(&self, response: &Response) -> Decision {
        let diagnostics = response.diagnostics();
        let errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            // Cedar skips a rule whose evaluation fails; a skipped forbid
            // could let a request through. Refuse instead (fail closed).
            return self.evaluation_error(errors);
        }
        let mut infos: Vec<&RuleInfo> = diagnostics
            .reason()
            .filter_map(|id| self.rules.get(id))
            .collect();
        infos.sort_by_key(|r| r.order);
        let allowed = response.decision() == CedarDecision::Allow;
        let emergency = allowed && infos.iter().any(|r| r.emergency);
        let mut rules: Vec<RuleRef> = infos.into_iter().map(|r| r.rule.clone()).collect();
        if rules.is_empty() {
            rules.push(self.default_deny.clone());
        }
        Decision {
            allowed,
            emergency,
            rules,
            errors: Vec::new(),
        }
    }

    fn evaluation_error(&self, errors: Vec<String>) -> Decision {
        Decision {
            allowed: false,
            emergency: false,
            rules: vec![RuleRef {
                id: EVALUATION_ERROR_ID.into(),
                legal_basis: self.default_deny.legal_basis.clone(),
                explanation: "The rules could not be evaluated for this request, so it is refused."
                    .into(),
                effect: RuleEffect::Forbid,
            }],
            errors,
        }
    }

    fn org_uid(&self, orgnr: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.names.organization.clone(), EntityId::new(orgnr))
    }

    /// Build the Cedar request and entities for one question. With
    /// `schema`, both are validated against it (used at load time to prove
    /// the schema matches what this code supplies); without, nothing is
    /// re-checked per request.
    fn build_request(
        &self,
        requester: &Requester,
        target: Target<'_>,
        schema: Option<&Schema>,
    ) -> Result<(Request, Entities), String> {
        let mut entities: Vec<Entity> = Vec::with_capacity(self.action_entities.len() + 2);
        entities.extend(self.action_entities.iter().cloned());

        // The professional is in their point of care, in the organization
        // it belongs to, and in the groups of their authorization. The
        // hierarchy is given already closed (point of care and organization
        // both as direct parents), so no organization entities are needed
        // and Cedar has almost nothing to compute per request.
        let org = self.org_uid(&requester.organization);
        let point_of_care = requester
            .point_of_care
            .as_deref()
            .filter(|p| *p != requester.organization);
        let mut parents = HashSet::with_capacity(4);
        if let Some(poc) = point_of_care {
            parents.insert(self.org_uid(poc));
        }
        parents.insert(org);
        let mut attrs = HashMap::new();
        if let Some(profession) = &requester.profession {
            if let Some(groups) = self.groups_of.get(profession) {
                parents.extend(groups.iter().cloned());
            }
            attrs.insert(
                "profession".to_string(),
                RestrictedExpression::new_string(profession.clone()),
            );
        }
        let principal = EntityUid::from_type_name_and_id(
            self.names.professional.clone(),
            EntityId::new(requester.hpr_number.as_deref().unwrap_or(UNIDENTIFIED)),
        );
        entities.push(
            Entity::new(principal.clone(), attrs, parents)
                .map_err(|e| format!("principal: {}", explain(&e)))?,
        );

        let (action, resource, sensitive) = match target {
            Target::Registry => {
                entities.push(self.registry_entity.clone());
                (
                    self.names.search.clone(),
                    self.names.registry.clone(),
                    self.sensitive_set.clone(),
                )
            }
            Target::Pointer(pointer) => {
                let holder = self.org_uid(&pointer.holder);
                let unknown: Vec<&String> = pointer
                    .categories
                    .iter()
                    .filter(|c| !self.known_categories.contains(c.as_str()))
                    .collect();
                let sensitive = if unknown.is_empty() {
                    self.sensitive_set.clone()
                } else {
                    let all: BTreeSet<&String> = self
                        .settings
                        .categories
                        .sensitive
                        .iter()
                        .chain(unknown)
                        .collect();
                    RestrictedExpression::new_set(
                        all.into_iter()
                            .map(|c| RestrictedExpression::new_string(c.clone())),
                    )
                };
                let uid = EntityUid::from_type_name_and_id(
                    self.names.pointer.clone(),
                    EntityId::new(POINTER_ID),
                );
                let attrs = HashMap::from([
                    (
                        "holder".to_string(),
                        RestrictedExpression::new_entity_uid(holder),
                    ),
                    (
                        "categories".to_string(),
                        RestrictedExpression::new_set(
                            pointer
                                .categories
                                .iter()
                                .map(|c| RestrictedExpression::new_string(c.clone())),
                        ),
                    ),
                    (
                        "region".to_string(),
                        RestrictedExpression::new_string(pointer.region.clone()),
                    ),
                ]);
                entities.push(
                    Entity::new(uid.clone(), attrs, HashSet::new())
                        .map_err(|e| format!("pointer: {}", explain(&e)))?,
                );
                (self.names.lookup.clone(), uid, sensitive)
            }
        };

        let mut context = vec![
            (
                "purpose".to_string(),
                RestrictedExpression::new_string(requester.purpose.clone()),
            ),
            (
                "care_relationship".to_string(),
                RestrictedExpression::new_bool(requester.care_relationship),
            ),
            ("sensitive_categories".to_string(), sensitive),
        ];
        if let Some(details) = &requester.purpose_details {
            context.push((
                "purpose_details".to_string(),
                RestrictedExpression::new_string(details.clone()),
            ));
        }
        let context =
            Context::from_pairs(context).map_err(|e| format!("context: {}", explain(&e)))?;
        let request = Request::new(principal, action, resource, context, schema)
            .map_err(|e| format!("request: {}", explain(&e)))?;
        let entities = Entities::from_entities(entities, schema)
            .map_err(|e| format!("entities: {}", explain(&e)))?;
        Ok((request, entities))
    }

    /// Prove at load time that the schema describes exactly the facts
    /// `build_request` supplies, for both questions and with and without the
    /// optional facts. Otherwise a schema edit could make rules silently
    /// stop matching.
    fn self_test(&self) -> Vec<String> {
        let full = Requester {
            organization: "910000004".into(),
            point_of_care: Some("910000012".into()),
            hpr_number: Some("1234567".into()),
            profession: self.groups_of.keys().next().cloned(),
            purpose: "TREAT".into(),
            purpose_details: Some("self-test".into()),
            care_relationship: true,
        };
        let bare = Requester {
            point_of_care: None,
            hpr_number: None,
            profession: None,
            purpose_details: None,
            ..full.clone()
        };
        let pointer = PointerFacts {
            holder: "920000002".into(),
            categories: vec!["self-test-unknown-category".into()],
            region: self.settings.node.region.clone(),
        };
        let mut errors = Vec::new();
        for requester in [&full, &bare] {
            for target in [Target::Registry, Target::Pointer(&pointer)] {
                if let Err(e) = self.build_request(requester, target, Some(&self.schema))
                    && !errors.contains(&e)
                {
                    errors.push(e);
                }
            }
        }
        errors
    }
}

/// Check the legal configuration in `dir` without running a node, as
/// `pil policy check DIR` does: the same checks as [`LegalConfig::load`].
pub fn check(dir: impl AsRef<Path>) -> Result<Summary, PolicyError> {
    LegalConfig::load(dir).map(|config| config.summary())
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

fn read(path: &Path, problems: &mut Vec<Problem>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            problems.push(Problem::in_file(path, format!("cannot read: {e}")));
            None
        }
    }
}

fn load_settings(path: &Path, problems: &mut Vec<Problem>) -> Option<NodeSettings> {
    let text = read(path, problems)?;
    match toml::from_str::<NodeSettings>(&text) {
        Ok(settings) => {
            let before = problems.len();
            settings.check(path, problems);
            (problems.len() == before).then_some(settings)
        }
        Err(e) => {
            let offset = e.span().map(|s| s.start);
            problems.push(Problem::in_file(path, e.message().to_string()).at(&text, offset));
            None
        }
    }
}

fn load_schema(path: &Path, problems: &mut Vec<Problem>) -> Option<Schema> {
    let text = read(path, problems)?;
    match Schema::from_cedarschema_str(&text) {
        Ok((schema, warnings)) => {
            let before = problems.len();
            for warning in warnings {
                let (message, offset) = describe(&warning);
                problems.push(Problem::in_file(path, message).at(&text, offset));
            }
            (problems.len() == before).then_some(schema)
        }
        Err(e) => {
            let (message, offset) = describe(&e);
            problems.push(Problem::in_file(path, message).at(&text, offset));
            None
        }
    }
}

/// The `*.cedar` files in `policies/`, in file name order.
fn policy_files(dir: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let policy_dir = dir.join(POLICY_DIR);
    let entries = match std::fs::read_dir(&policy_dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(Problem::in_file(&policy_dir, format!("cannot read: {e}")));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "cedar"))
        .collect();
    files.sort();
    if files.is_empty() {
        problems.push(Problem::in_file(
            &policy_dir,
            "contains no *.cedar rule files",
        ));
    }
    files
}

/// A rule file that parsed: its path and text (for line numbers).
struct PolicyFile {
    path: PathBuf,
    text: String,
}

fn load_inner(dir: &Path, problems: &mut Vec<Problem>) -> Option<LegalConfig> {
    if !dir.is_dir() {
        problems.push(Problem::in_file(dir, "is not a directory"));
        return None;
    }
    let settings_path = dir.join(SETTINGS_FILE);
    let schema_path = dir.join(SCHEMA_FILE);
    let settings = load_settings(&settings_path, problems);
    let schema = load_schema(&schema_path, problems);

    // Parse every rule file; rename each rule to its @id.
    let mut files: Vec<PolicyFile> = Vec::new();
    let mut policies = PolicySet::new();
    let mut rules: HashMap<PolicyId, RuleInfo> = HashMap::new();
    let mut file_of: HashMap<PolicyId, usize> = HashMap::new();
    for path in policy_files(dir, problems) {
        let Some(text) = read(&path, problems) else {
            continue;
        };
        let parsed = match PolicySet::from_str(&text) {
            Ok(set) => set,
            Err(errors) => {
                for error in errors.iter() {
                    let (message, offset) = describe(error);
                    problems.push(
                        Problem::in_file(&path, format!("syntax error: {message}"))
                            .at(&text, offset),
                    );
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            problems.push(Problem::in_file(
                &path,
                "templates (rules with ?principal or ?resource slots) are not supported",
            ));
        }
        if parsed.is_empty() {
            problems.push(Problem::in_file(&path, "contains no rules"));
        }
        let index = files.len();
        for policy in parsed.policies() {
            let offset = policy.to_cedar().and_then(|src| text.find(src.trim()));
            let offset = offset.or_else(|| {
                policy
                    .annotation("id")
                    .and_then(|id| text.find(&format!("\"{id}\"")))
            });
            let located = |message: String| Problem::in_file(&path, message).at(&text, offset);
            let missing: Vec<&str> = REQUIRED_ANNOTATIONS
                .iter()
                .copied()
                .filter(|key| policy.annotation(key).is_none_or(|v| v.trim().is_empty()))
                .collect();
            let cedar_name = policy.id().to_string();
            let name = policy
                .annotation("id")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or(&cedar_name)
                .to_string();
            if !missing.is_empty() {
                problems.push(
                    located(format!(
                        "missing required annotation(s): {}",
                        missing
                            .iter()
                            .map(|k| format!("@{k}(\"...\")"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                    .policy(name.clone()),
                );
                continue;
            }
            let id = name;
            if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(located("@id must not contain spaces".into()).policy(id.clone()));
                continue;
            }
            if id == DEFAULT_DENY_ID || id == EVALUATION_ERROR_ID {
                problems.push(
                    located(format!("@id \"{id}\" is reserved for PIL's own entries"))
                        .policy(id.clone()),
                );
                continue;
            }
            let emergency = match policy.annotation("emergency") {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    problems.push(
                        located(format!(
                            "@emergency must be \"true\" or \"false\", not \"{other}\""
                        ))
                        .policy(id.clone()),
                    );
                    continue;
                }
            };
            let policy_id = PolicyId::new(&id);
            if let Some(&other) = file_of.get(&policy_id) {
                problems.push(
                    located(format!(
                        "@id \"{id}\" is already used by a rule in {}",
                        files[other].path.display()
                    ))
                    .policy(id.clone()),
                );
                continue;
            }
            let effect = match policy.effect() {
                Effect::Permit => RuleEffect::Permit,
                Effect::Forbid => RuleEffect::Forbid,
            };
            let annotation = |key: &str| policy.annotation(key).unwrap_or_default().to_string();
            let info = RuleInfo {
                rule: RuleRef {
                    id: id.clone(),
                    legal_basis: annotation("legal_basis"),
                    explanation: annotation("explanation"),
                    effect,
                },
                emergency,
                file: path.strip_prefix(dir).unwrap_or(&path).to_path_buf(),
                order: rules.len(),
            };
            if let Err(e) = policies.add(policy.new_id(policy_id.clone())) {
                problems.push(located(e.to_string()).policy(id.clone()));
                continue;
            }
            file_of.insert(policy_id.clone(), index);
            rules.insert(policy_id, info);
        }
        files.push(PolicyFile { path, text });
    }

    // Strict validation of every rule against the schema.
    let schema = schema?;
    if !problems.is_empty() && policies.is_empty() {
        return None;
    }
    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    let validation_problem = |id: &PolicyId, diag: &dyn Diagnostic, kind: &str| {
        let (message, offset) = describe(diag);
        match file_of.get(id).map(|&i| &files[i]) {
            Some(file) => Problem::in_file(&file.path, format!("{kind}: {message}"))
                .at(&file.text, offset)
                .policy(id.to_string()),
            None => Problem::in_file(&schema_path, format!("{kind}: {message}")),
        }
    };
    for error in result.validation_errors() {
        problems.push(validation_problem(
            error.policy_id(),
            error,
            "does not match the schema",
        ));
    }
    for warning in result.validation_warnings() {
        problems.push(validation_problem(
            warning.policy_id(),
            warning,
            "suspicious rule (validation warning)",
        ));
    }

    // Every profession group a rule names must be defined in node.toml.
    let settings = settings?;
    let names = match Names::new(&settings.node.region) {
        Ok(names) => names,
        Err(e) => {
            problems.push(Problem::in_file(&settings_path, e));
            return None;
        }
    };
    for policy in policies.policies() {
        for literal in policy.entity_literals() {
            if literal.type_name() == &names.profession_group
                && !settings
                    .profession_groups
                    .contains_key(literal.id().unescaped())
            {
                let file = &files[file_of[policy.id()]];
                let offset = file.text.find(&format!("\"{}\"", literal.id().unescaped()));
                problems.push(
                    Problem::in_file(
                        &file.path,
                        format!(
                            "names profession group \"{}\", which [profession_groups] in {} does not define",
                            literal.id().unescaped(),
                            SETTINGS_FILE
                        ),
                    )
                    .at(&file.text, offset)
                    .policy(policy.id().to_string()),
                );
            }
        }
    }

    let mut groups_of: HashMap<String, Vec<EntityUid>> = HashMap::new();
    for (group, codes) in &settings.profession_groups {
        let uid =
            EntityUid::from_type_name_and_id(names.profession_group.clone(), EntityId::new(group));
        for code in codes {
            let groups = groups_of.entry(code.clone()).or_default();
            if !groups.contains(&uid) {
                groups.push(uid.clone());
            }
        }
    }
    // Action entities only matter when the schema puts actions in groups
    // (`action in Action::"group"`); otherwise leave them out of every request.
    let action_entities = match schema.action_entities() {
        Ok(entities) => {
            let entities: Vec<Entity> = entities.iter().cloned().collect();
            let grouped = entities
                .iter()
                .any(|e| !e.clone().into_inner().2.is_empty());
            if grouped { entities } else { Vec::new() }
        }
        Err(e) => {
            problems.push(Problem::in_file(&schema_path, format!("actions: {e}")));
            return None;
        }
    };
    let registry_entity = match Entity::new(
        names.registry.clone(),
        HashMap::from([(
            "region".to_string(),
            RestrictedExpression::new_string(settings.node.region.clone()),
        )]),
        HashSet::new(),
    ) {
        Ok(entity) => entity,
        Err(e) => {
            problems.push(Problem::in_file(&settings_path, format!("registry: {e}")));
            return None;
        }
    };
    let sensitive_set = RestrictedExpression::new_set(
        settings
            .categories
            .sensitive
            .iter()
            .map(|c| RestrictedExpression::new_string(c.clone())),
    );
    let default_deny = RuleRef {
        id: DEFAULT_DENY_ID.into(),
        legal_basis: settings.default_deny.legal_basis.clone(),
        explanation: settings.default_deny.explanation.clone(),
        effect: RuleEffect::Forbid,
    };
    let config = LegalConfig {
        dir: dir.to_path_buf(),
        known_categories: settings.categories.known.iter().cloned().collect(),
        settings,
        schema,
        policies,
        rules,
        names,
        groups_of,
        sensitive_set,
        action_entities,
        registry_entity,
        default_deny,
        decided: DecisionCache::new(),
    };
    for error in config.self_test() {
        problems.push(Problem::in_file(
            &schema_path,
            format!("the schema does not describe the facts PIL supplies: {error}"),
        ));
    }
    Some(config)
}

/// The default legal configuration shipped with PIL, embedded so a demo or test node
/// can be set up without the source tree.
pub const DEFAULT_FILES: &[(&str, &str)] = &[
    ("schema.cedarschema", include_str!("../schema.cedarschema")),
    ("node.toml", include_str!("../node.toml")),
    (
        "policies/10-purpose-of-use.cedar",
        include_str!("../policies/10-purpose-of-use.cedar"),
    ),
    (
        "policies/20-health-personnel.cedar",
        include_str!("../policies/20-health-personnel.cedar"),
    ),
    (
        "policies/30-care-relationship.cedar",
        include_str!("../policies/30-care-relationship.cedar"),
    ),
    (
        "policies/40-treatment.cedar",
        include_str!("../policies/40-treatment.cedar"),
    ),
    (
        "policies/50-emergency.cedar",
        include_str!("../policies/50-emergency.cedar"),
    ),
    (
        "policies/60-sensitive-categories.cedar",
        include_str!("../policies/60-sensitive-categories.cedar"),
    ),
];

/// Writes the default legal configuration into `dir` for `region`, with the given
/// organizations in the operator and auditor roles.
pub fn write_default(
    dir: &Path,
    region: &str,
    operators: &[&str],
    auditors: &[&str],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("policies"))?;
    let list = |orgs: &[&str]| {
        orgs.iter()
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, text) in DEFAULT_FILES {
        let text = if *name == "node.toml" {
            text.lines()
                .map(|line| {
                    if line.starts_with("region = ") {
                        format!("region = {region:?}")
                    } else if line.starts_with("operator = ") {
                        format!("operator = [{}]", list(operators))
                    } else if line.starts_with("auditor = ") {
                        format!("auditor = [{}]", list(auditors))
                    } else {
                        line.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        } else {
            text.to_string()
        };
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orgnr_check_digit() {
        assert!(is_valid_orgnr("910000004"));
        assert!(is_valid_orgnr("983974899"));
        assert!(!is_valid_orgnr("910000005"));
        assert!(!is_valid_orgnr("91000000"));
        assert!(!is_valid_orgnr("9100000041"));
        assert!(!is_valid_orgnr("91000000x"));
        assert!(!is_valid_orgnr("９10000004"));
    }

    #[test]
    fn line_and_column() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_column(text, 0), Some((1, 1)));
        assert_eq!(line_column(text, 3), Some((2, 1)));
        assert_eq!(line_column(text, 8), Some((3, 1)));
        assert_eq!(line_column(text, 5), Some((2, 3)));
        assert_eq!(line_column(text, 100), Some((3, 2)));
    }

    #[test]
    fn config_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LegalConfig>();
        assert_send_sync::<Decision>();
        assert_send_sync::<PolicyError>();
    }

    /// Kept decisions are the decisions: for every mix of requester and pointer
    /// facts, asking again (answered from the cache) gives what Cedar gives.
    #[test]
    fn kept_decisions_match_fresh_evaluation() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
        let config = LegalConfig::load(&dir)
            .unwrap_or_else(|e| panic!("default legal configuration must load: {e}"));
        let region = config.settings().node.region.clone();
        let mut requesters = Vec::new();
        for profession in [None, Some("LE"), Some("SP"), Some("PS")] {
            for purpose in ["TREAT", "ETREAT", "COC", "PATRQT", "HMARKT"] {
                for care_relationship in [false, true] {
                    requesters.push(Requester {
                        organization: "910000004".into(),
                        point_of_care: Some("910000012".into()),
                        hpr_number: Some("9144889".into()),
                        profession: profession.map(Into::into),
                        purpose: purpose.into(),
                        purpose_details: None,
                        care_relationship,
                    });
                }
            }
        }
        let mut pointers = Vec::new();
        for holder in ["910000004", "920000002"] {
            for categories in [
                vec!["medications"],
                vec!["mental-health"],
                vec!["medications", "no-such-category"],
            ] {
                pointers.push(PointerFacts {
                    holder: holder.into(),
                    categories: categories.into_iter().map(Into::into).collect(),
                    region: region.clone(),
                });
            }
        }
        for round in 0..2 {
            for r in &requesters {
                assert_eq!(
                    config.decide_lookup(r),
                    config.evaluate(r, Target::Registry),
                    "search, round {round}, {r:?}"
                );
                for p in &pointers {
                    assert_eq!(
                        config.decide(r, p),
                        config.evaluate(r, Target::Pointer(p)),
                        "lookup, round {round}, {r:?}, {p:?}"
                    );
                }
            }
        }
        let kept = requesters.len() * (pointers.len() + 1);
        assert_eq!(config.decided.0.len(), kept);
        let reloaded = LegalConfig::load(&dir).unwrap();
        assert_eq!(
            reloaded.decided.0.len(),
            0,
            "a reload starts with no kept decisions"
        );
    }

    #[test]
    fn names_and_codes() {
        assert!(is_category_name("mental-health"));
        assert!(!is_category_name("Mental health"));
        assert!(is_profession_code("LE"));
        assert!(is_profession_code("FA1"));
        assert!(!is_profession_code("le"));
        assert!(!is_profession_code("LEGEE"));
    }
}
