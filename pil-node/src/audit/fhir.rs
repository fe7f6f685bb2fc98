//! An audit record as a FHIR R4 `AuditEvent`, following IHE Basic Audit Log Patterns
//! (BALP, <https://profiles.ihe.net/ITI/BALP/>) where a BALP profile fits.
//!
//! One record concerns at most one patient, so one record gives one `AuditEvent`, which
//! is what BALP asks of a query: one event per patient.
//!
//! # Which profile
//!
//! - A successful lookup, federated lookup or `PolicyService.Explain` about one patient
//!   claims `IHE.BasicAudit.PatientQuery` (without a patient: `IHE.BasicAudit.Query`).
//!   BALP fixes `outcome` to `0` in these profiles ("failures are recorded
//!   differently", and BALP sends authorization failures to FHIR core's access-denied
//!   guidance), so a failed or refused query keeps the same shape but claims only the
//!   core `AuditEvent` profile.
//! - Registry writes, blocks, opt-outs, reloads and audit access claim only the core
//!   profile. BALP's PatientCreate/PatientUpdate/PatientDelete would need the written
//!   resource's id (`entity[data].what` 1..1), which a record does not hold, and an
//!   upsert is neither a create nor an update for certain; they use DICOM event types
//!   instead (see `event_kind`).
//!
//! # Mapping decisions
//!
//! - `type`: BALP's Query profiles fix `type` to `audit-event-type#rest` ("Restful
//!   Operation"), and an R4 `AuditEvent` has exactly one type, so DICOM 110112 "Query"
//!   cannot be used beside it. Our API is gRPC, not FHIR REST; we follow BALP because
//!   the event claims its profile, and say what really happened in a second subtype.
//! - `subtype`: BALP requires one of `restful-interaction` `search`, `search-type`,
//!   `search-system`. A lookup is a search for one patient's pointers, the closest
//!   being plain `search` (as in BALP's own examples). Every event also carries
//!   `urn:pil:audit-action#<action>` (the record's `action`, snake_case) so the exact
//!   PIL operation is never lost to the REST vocabulary.
//! - Agents, per BALP Query: the client (DICOM 110153 "Source Role ID", `requestor`
//!   false) is whoever opened the connection: the organization of the client
//!   certificate, or, for a federated lookup, the forwarding node (a node certificate,
//!   `forwarded_by`), exactly as an IHE XCA responding gateway records the initiating
//!   gateway. The server (110152 "Destination Role ID") is this node with its URL. The
//!   user (`v3-ParticipationType#IRCP`, `requestor` true) is the health professional
//!   from the access token, with HPR number, profession (`role`) and purpose of use.
//!   The token's OAuth client and organizations follow BALP's token patterns: DICOM
//!   110150 "Application" for the `client_id`, `v3-RoleClass#PROV` for the legal entity
//!   and its sub-unit (both `requestor` false). Without a user the client is the
//!   requestor.
//! - BALP requires `agent[client].network`; records do not keep the peer's address,
//!   so it carries only the core `data-absent-reason` extension (`unknown`), never a
//!   made-up address. The same stands for any other required but unknown value.
//! - Entities: the patient (by the node's pseudonym, never the identifier), the query
//!   (base64 JSON `{"action", "query_id"}`; BALP forbids `detail` there), the
//!   `query_id` as BALP's transaction entity (its correlation id across regions, the
//!   role BALP gives X-Request-Id), and two entities of type 4 "Other" named
//!   `access decision` and `request outcome` whose `detail`s carry the deciding rules,
//!   pointer count, organizations, peers asked and the record's detail.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::record::{Action, AuditRecord, Coding, RequesterInfo};

/// BALP: a successful query about one identified patient.
pub const PATIENT_QUERY_PROFILE: &str =
    "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery";
/// BALP: a successful query without an identified patient.
pub const QUERY_PROFILE: &str =
    "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Query";
/// FHIR core `AuditEvent`, claimed when no BALP profile fits.
pub const AUDIT_EVENT_PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/AuditEvent";

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const ROLE_CLASS: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleClass";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
/// Enhetsregisteret (organization numbers).
const ORGANIZATION_NUMBER: &str = "urn:oid:2.16.578.1.12.4.1.4.101";
/// Helsepersonellregisteret (HPR numbers).
const HPR_NUMBER: &str = "urn:oid:2.16.578.1.12.4.1.4.4";
/// Volven 9060, health personnel categories (`LE`, `SP`, ...).
const PROFESSION: &str = "urn:oid:2.16.578.1.12.4.1.1.9060";
/// PIL's own: a node by region id, and the record's action.
const PIL_REGION: &str = "urn:pil:region";
const PIL_ACTION: &str = "urn:pil:audit-action";

/// The node exporting its log: the server of every event it recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Region id, as in the records.
    pub region: String,
    /// Where clients reach the node, e.g. `https://pil.helse-vest.example:7443`.
    pub node_url: String,
}

/// The `AuditEvent` for one record.
pub fn audit_event(record: &AuditRecord, node: &NodeInfo) -> Value {
    let kind = event_kind(record.action);
    let outcome = outcome_code(&record.outcome.status);
    let profile = if !kind.query || outcome != "0" {
        AUDIT_EVENT_PROFILE
    } else if record.patient.is_some() {
        PATIENT_QUERY_PROFILE
    } else {
        QUERY_PROFILE
    };

    let mut subtype = Vec::new();
    if kind.query {
        subtype.push(coding(RESTFUL_INTERACTION, "search", "search"));
    }
    if let Some((code, display)) = kind.subtype {
        subtype.push(coding(DCM, code, display));
    }
    subtype.push(json!({"system": PIL_ACTION, "code": action_code(record.action)}));

    let outcome_desc = if record.outcome.detail.is_empty() {
        record.outcome.status.clone()
    } else {
        format!("{}: {}", record.outcome.status, record.outcome.detail)
    };

    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": resource_id(&record.region, record.index),
        "meta": {"profile": [profile]},
        "type": kind.event_type,
        "subtype": subtype,
        "action": kind.action,
        "recorded": record.time,
        "outcome": outcome,
        "outcomeDesc": outcome_desc,
    });
    if let Some(requester) = &record.requester {
        event["purposeOfEvent"] = Value::Array(purposes(requester));
    }
    event["agent"] = Value::Array(agents(record, node));
    event["source"] = json!({
        "site": record.region,
        "observer": node_reference(&record.region),
        "type": [coding(SOURCE_TYPE, "4", "Application Server")],
    });
    event["entity"] = Value::Array(entities(record, kind.query));
    event
}

/// A `Bundle` of type `collection` holding the given resources.
pub fn bundle(events: Vec<Value>) -> Value {
    let entry: Vec<Value> = events
        .into_iter()
        .map(|resource| json!({"resource": resource}))
        .collect();
    json!({"resourceType": "Bundle", "type": "collection", "entry": entry})
}

/// How an action is typed as an event.
struct EventKind {
    /// `AuditEvent.type`.
    event_type: Value,
    /// A DICOM subtype, where one applies.
    subtype: Option<(&'static str, &'static str)>,
    /// `AuditEvent.action`: C, R, U, D or E.
    action: &'static str,
    /// A query in BALP's sense: RESTful-search shape, query entity.
    query: bool,
}

/// Queries follow BALP; everything else takes the DICOM audit event id that says what
/// happened (PS3.15 A.5.3): pointers, blocks and opt-outs are parts of the patient's
/// record at this node (110110 "Patient Record"), an export (and a backup, which
/// copies everything) is 110106, a sync is an
/// import (110107), a reload of the legal configuration is a security configuration
/// change (110113 "Security Alert", subtype 110129), and audit access is 110101
/// "Audit Log Used". An operator's look at the federation peers is application
/// activity (110100).
fn event_kind(action: Action) -> EventKind {
    let dicom = |code: &str, display: &str| coding(DCM, code, display);
    let patient_record = || dicom("110110", "Patient Record");
    let (event_type, subtype, action_code, query) = match action {
        Action::Lookup
        | Action::FederatedLookup
        | Action::Explain
        | Action::Subscribe
        | Action::EventDelivery => (
            coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            None,
            "E",
            true,
        ),
        Action::PointerUpsert => (patient_record(), None, "U", false),
        Action::PointerDelete => (patient_record(), None, "D", false),
        Action::PointerSync => (dicom("110107", "Import"), None, "U", false),
        Action::PointerExport | Action::Backup => (dicom("110106", "Export"), None, "R", false),
        Action::BlockCreate | Action::OptOutSet => (patient_record(), None, "C", false),
        Action::BlockLift | Action::OptOutLift | Action::Retention => {
            (patient_record(), None, "D", false)
        }
        Action::BlockList | Action::OptOutGet => (patient_record(), None, "R", false),
        Action::PolicyReload => (
            dicom("110113", "Security Alert"),
            Some(("110129", "Security Configuration")),
            "E",
            false,
        ),
        Action::AuditAccess => (dicom("110101", "Audit Log Used"), None, "R", false),
        Action::WitnessAlarm => (dicom("110113", "Security Alert"), None, "E", false),
        Action::AuditReview => (dicom("110101", "Audit Log Used"), None, "C", false),
        Action::PeersList | Action::PeerPing | Action::Refused | Action::SubscriptionManage => {
            (dicom("110100", "Application Activity"), None, "E", false)
        }
    };
    EventKind {
        event_type,
        subtype,
        action: action_code,
        query,
    }
}

/// `AuditEvent.outcome` from a gRPC status name: `0` success, `4` minor failure for
/// what the caller caused (gRPC codes HTTP maps to 4xx), `8` serious failure for the
/// server's own failures and anything unknown.
fn outcome_code(status: &str) -> &'static str {
    match status {
        "OK" => "0",
        "CANCELLED"
        | "INVALID_ARGUMENT"
        | "NOT_FOUND"
        | "ALREADY_EXISTS"
        | "PERMISSION_DENIED"
        | "UNAUTHENTICATED"
        | "RESOURCE_EXHAUSTED"
        | "FAILED_PRECONDITION"
        | "ABORTED"
        | "OUT_OF_RANGE" => "4",
        _ => "8",
    }
}

/// The record's action as it serializes (`lookup`, `pointer_upsert`, ...).
fn action_code(action: Action) -> String {
    match serde_json::to_value(action) {
        Ok(Value::String(code)) => code,
        _ => format!("{action:?}"),
    }
}

/// `<region>-<index>`, kept within FHIR's id syntax (`[A-Za-z0-9\-\.]{1,64}`).
fn resource_id(region: &str, index: u64) -> String {
    let region: String = region
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("{region}-{index}")
}

fn agents(record: &AuditRecord, node: &NodeInfo) -> Vec<Value> {
    let user = record.requester.as_ref();
    let mut agents = vec![
        json!({
            "type": concept(DCM, "110153", "Source Role ID"),
            "who": client_who(record),
            // BALP: the user is the requestor; without one, the client system is.
            "requestor": user.is_none(),
            // Required by BALP, not kept in the record.
            "network": absent_element(),
        }),
        json!({
            "type": concept(DCM, "110152", "Destination Role ID"),
            "who": node_reference(&record.region),
            "requestor": false,
            "network": server_network(record, node),
        }),
    ];
    if let Some(requester) = user {
        let mut agent = json!({
            "type": concept(PARTICIPATION_TYPE, "IRCP", "information recipient"),
            "who": match &requester.hpr_number {
                Some(hpr) => named(
                    reference("Practitioner", HPR_NUMBER, hpr),
                    requester.practitioner_name.as_deref(),
                ),
                None => absent_element(),
            },
            "requestor": true,
        });
        if let Some(profession) = &requester.profession {
            agent["role"] = json!([{"coding": [{"system": PROFESSION, "code": profession}]}]);
        }
        agent["purposeOfUse"] = Value::Array(purposes(requester));
        agents.push(agent);
        agents.push(json!({
            "type": concept(DCM, "110150", "Application"),
            "who": {"identifier": {"value": requester.client_id}},
            "requestor": false,
        }));
        agents.push(json!({
            "type": concept(ROLE_CLASS, "PROV", "healthcare provider"),
            "who": named(
                reference("Organization", ORGANIZATION_NUMBER, &requester.organization),
                requester.organization_name.as_deref(),
            ),
            "requestor": false,
        }));
        if let Some(child) = &requester.child_organization {
            let mut who = reference("Organization", ORGANIZATION_NUMBER, child);
            who["display"] = json!(match &requester.child_organization_name {
                Some(name) => format!("{name}, sub-unit of {}", requester.organization),
                None => format!("sub-unit of {}", requester.organization),
            });
            agents.push(json!({
                "type": concept(ROLE_CLASS, "PROV", "healthcare provider"),
                "who": who,
                "requestor": false,
            }));
        }
    }
    agents
}

/// Who opened the connection: the forwarding node for a federated lookup, else the
/// client certificate's organization (or node, for node-to-node calls).
fn client_who(record: &AuditRecord) -> Value {
    let caller = &record.caller;
    let node = caller
        .node_region
        .as_deref()
        .or(record.forwarded_by.as_deref());
    match (record.action, caller.organization.as_deref(), node) {
        (Action::FederatedLookup, _, Some(region)) => node_reference(region),
        (_, Some(organization), _) => reference("Organization", ORGANIZATION_NUMBER, organization),
        (_, None, Some(region)) => node_reference(region),
        (_, None, None) => absent_element(),
    }
}

/// This node's URL, when the node describes the region that logged the record.
fn server_network(record: &AuditRecord, node: &NodeInfo) -> Value {
    if node.region == record.region && !node.node_url.is_empty() {
        // network-type 5: URI.
        json!({"address": node.node_url, "type": "5"})
    } else {
        absent_element()
    }
}

fn purposes(requester: &RequesterInfo) -> Vec<Value> {
    std::iter::once(&requester.purpose_of_use)
        .chain(requester.purpose_details.as_ref())
        .map(|c: &Coding| json!({"coding": [{"system": c.system, "code": c.code}]}))
        .collect()
}

fn entities(record: &AuditRecord, query: bool) -> Vec<Value> {
    let mut entities = Vec::new();
    if let Some(pseudonym) = &record.patient {
        entities.push(json!({
            "what": reference(
                "Patient",
                &format!("urn:pil:patient-pseudonym:{}", record.region),
                pseudonym,
            ),
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    let action = action_code(record.action);
    if query {
        let request = json!({"action": action, "query_id": record.query_id});
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "description": format!("{action} query_id={}", record.query_id),
            "query": BASE64.encode(request.to_string()),
        }));
    }
    entities.push(json!({
        "what": {"identifier": {"value": record.query_id}},
        "type": coding(BALP_ENTITY_TYPE, "XrequestId", "transport specific unique identifier where http X-Request-Id is used"),
    }));

    let decision = &record.decision;
    let mut details = Vec::new();
    if decision.outcome != "not_applicable" {
        details.push(detail("decision", &decision.outcome));
    }
    if decision.emergency {
        details.push(detail("emergency", "true"));
    }
    for rule in &decision.rules {
        details.push(detail(
            "legal-basis",
            &format!("{}: {}", rule.id, rule.legal_basis),
        ));
        details.push(detail(
            "rule-effect",
            &format!("{}: {}", rule.id, rule.effect),
        ));
    }
    if let Some(requester) = &record.requester {
        details.push(detail(
            "care-relationship",
            &requester.care_relationship.to_string(),
        ));
        if let Some(reference) = &requester.decision_ref {
            details.push(detail("decision-ref", reference));
        }
    }
    if !details.is_empty() {
        entities.push(other_entity("access decision", details));
    }

    let outcome = &record.outcome;
    let mut details = Vec::new();
    let counts_pointers = matches!(
        record.action,
        Action::Lookup
            | Action::FederatedLookup
            | Action::EventDelivery
            | Action::PointerUpsert
            | Action::PointerDelete
            | Action::PointerSync
            | Action::PointerExport
    );
    if counts_pointers || outcome.pointers > 0 {
        details.push(detail("pointers", &outcome.pointers.to_string()));
    }
    for organization in &outcome.organizations {
        details.push(detail("organization", organization));
    }
    for peer in &record.peers_asked {
        details.push(detail("peer-region", peer));
    }
    if let Some(region) = &record.forwarded_by {
        details.push(detail("forwarded-by", region));
    }
    if let Some(text) = &record.detail {
        details.push(detail("detail", text));
    }
    if let Some(index) = record.reviewed {
        details.push(detail("reviewed-record", &index.to_string()));
    }
    if !details.is_empty() {
        entities.push(other_entity("request outcome", details));
    }
    entities
}

/// An entity of type 4 "Other" holding details; never type 2, which BALP's query
/// slice would claim (and forbids `detail` in).
fn other_entity(name: &str, details: Vec<Value>) -> Value {
    json!({
        "type": coding(ENTITY_TYPE, "4", "Other"),
        "name": name,
        "detail": details,
    })
}

fn detail(kind: &str, value: &str) -> Value {
    json!({"type": kind, "valueString": value})
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [coding(system, code, display)]})
}

fn reference(resource_type: &str, system: &str, value: &str) -> Value {
    json!({"type": resource_type, "identifier": {"system": system, "value": value}})
}

/// A reference with the display name the record knows, if any.
fn named(mut reference: Value, name: Option<&str>) -> Value {
    if let Some(name) = name {
        reference["display"] = json!(name);
    }
    reference
}

fn node_reference(region: &str) -> Value {
    let mut reference = reference("Device", PIL_REGION, region);
    reference["display"] = json!(format!("PIL node {region}"));
    reference
}

/// An element required here but not known: only FHIR's `data-absent-reason`.
fn absent_element() -> Value {
    json!({"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]})
}

#[cfg(test)]
mod tests {
    use super::super::record::{CallerInfo, DecisionInfo, OutcomeInfo, RuleInfo};
    use super::*;

    const PURPOSE_OF_USE: &str = "urn:oid:2.16.840.1.113883.1.11.20448";

    fn node() -> NodeInfo {
        NodeInfo {
            region: "helse-vest".into(),
            node_url: "https://pil.helse-vest.example:7443".into(),
        }
    }

    fn requester() -> RequesterInfo {
        RequesterInfo {
            organization: "983974899".into(),
            organization_name: None,
            child_organization: Some("974557746".into()),
            child_organization_name: None,
            hpr_number: Some("565501872".into()),
            practitioner_name: None,
            profession: Some("LE".into()),
            purpose_of_use: Coding {
                system: PURPOSE_OF_USE.into(),
                code: "TREAT".into(),
            },
            purpose_details: None,
            care_relationship: true,
            decision_ref: Some("dips-tilgang-4711".into()),
            client_id: "dips-arena-haukeland".into(),
        }
    }

    fn record(action: Action) -> AuditRecord {
        AuditRecord {
            index: 42,
            time: "2025-03-14T09:26:53.589Z".into(),
            region: "helse-vest".into(),
            action,
            query_id: "3f2a9c1e7b6d4e5f8a9b0c1d2e3f4a5b".into(),
            caller: CallerInfo {
                organization: Some("983974899".into()),
                node_region: None,
            },
            requester: Some(requester()),
            patient: Some("9b1c3f7a2e6d4c8b0a1f2e3d4c5b6a79".into()),
            decision: DecisionInfo {
                outcome: "allowed".into(),
                emergency: false,
                rules: vec![RuleInfo {
                    id: "treat-care-relationship".into(),
                    legal_basis: "pasientjournalloven § 19".into(),
                    effect: "permit".into(),
                }],
            },
            outcome: OutcomeInfo {
                status: "OK".into(),
                ..OutcomeInfo::default()
            },
            peers_asked: Vec::new(),
            forwarded_by: None,
            detail: None,
            reviewed: None,
        }
    }

    fn lookup_allowed() -> AuditRecord {
        let mut r = record(Action::Lookup);
        r.requester.as_mut().unwrap().purpose_details = Some(Coding {
            system: "urn:oid:2.16.578.1.12.4.1.1.8655".into(),
            code: "S08".into(),
        });
        r.decision.rules.push(RuleInfo {
            id: "profession-doctor".into(),
            legal_basis: "helsepersonelloven § 45".into(),
            effect: "permit".into(),
        });
        r.outcome.pointers = 3;
        r.outcome.organizations = vec!["974557746".into(), "983974899".into()];
        r.peers_asked = vec!["helse-midt".into(), "helse-nord".into()];
        r
    }

    fn lookup_denied() -> AuditRecord {
        let mut r = record(Action::Lookup);
        r.index = 43;
        r.decision.outcome = "denied".into();
        r.decision.rules = vec![RuleInfo {
            id: "forbid-no-care-relationship".into(),
            legal_basis: "pasientjournalloven § 19".into(),
            effect: "forbid".into(),
        }];
        r.requester.as_mut().unwrap().care_relationship = false;
        r.outcome.status = "PERMISSION_DENIED".into();
        r.outcome.detail = "no rule permits this lookup".into();
        r
    }

    fn lookup_unauthenticated() -> AuditRecord {
        let mut r = record(Action::Lookup);
        r.index = 44;
        r.requester = None;
        r.patient = None;
        r.decision = DecisionInfo {
            outcome: "unauthenticated".into(),
            ..DecisionInfo::default()
        };
        r.outcome.status = "UNAUTHENTICATED".into();
        r.outcome.detail = "access token expired".into();
        r
    }

    fn federated_lookup() -> AuditRecord {
        let mut r = record(Action::FederatedLookup);
        r.index = 45;
        r.region = "helse-midt".into();
        r.caller = CallerInfo {
            organization: None,
            node_region: Some("helse-vest".into()),
        };
        r.forwarded_by = Some("helse-vest".into());
        r.outcome.pointers = 1;
        r.outcome.organizations = vec!["921592957".into()];
        r
    }

    fn pointer_upsert() -> AuditRecord {
        let mut r = record(Action::PointerUpsert);
        r.index = 46;
        r.caller.organization = Some("974557746".into());
        r.requester = None;
        r.decision = DecisionInfo {
            outcome: "not_applicable".into(),
            ..DecisionInfo::default()
        };
        r.outcome.pointers = 1;
        r.outcome.detail = "pointer stored".into();
        r
    }

    fn block_create() -> AuditRecord {
        let mut r = record(Action::BlockCreate);
        r.index = 47;
        r.caller.organization = Some("983658725".into());
        r.requester = None;
        r.decision = DecisionInfo {
            outcome: "not_applicable".into(),
            ..DecisionInfo::default()
        };
        r.detail = Some("block 5e0c1a2b3c4d5e6f: hpr_number 565501872".into());
        r
    }

    fn explain() -> AuditRecord {
        let mut r = record(Action::Explain);
        r.index = 48;
        r
    }

    fn ev(record: &AuditRecord) -> Value {
        let node = NodeInfo {
            region: record.region.clone(),
            node_url: format!("https://pil.{}.example:7443", record.region),
        };
        audit_event(record, &node)
    }

    fn agent<'a>(event: &'a Value, system: &str, code: &str) -> Vec<&'a Value> {
        event["agent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| {
                a["type"]["coding"][0]["system"] == system && a["type"]["coding"][0]["code"] == code
            })
            .collect()
    }

    fn entity<'a>(event: &'a Value, system: &str, code: &str) -> Vec<&'a Value> {
        event["entity"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"]["system"] == system && e["type"]["code"] == code)
            .collect()
    }

    fn named_details(event: &Value, name: &str, kind: &str) -> Vec<String> {
        event["entity"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .flat_map(|e| e["detail"].as_array().unwrap().iter())
            .filter(|d| d["type"] == kind)
            .map(|d| d["valueString"].as_str().unwrap().to_owned())
            .collect()
    }

    fn decoded_query(event: &Value) -> Value {
        let queries = entity(event, ENTITY_TYPE, "2");
        assert_eq!(queries.len(), 1);
        let query = queries[0];
        assert_eq!(query["role"]["system"], OBJECT_ROLE);
        assert_eq!(query["role"]["code"], "24");
        assert!(
            query.get("detail").is_none(),
            "BALP: entity[query].detail 0..0"
        );
        assert!(query.get("what").is_none(), "BALP: entity[query].what 0..0");
        let bytes = BASE64.decode(query["query"].as_str().unwrap()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn requestors(event: &Value) -> usize {
        event["agent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["requestor"] == true)
            .count()
    }

    fn assert_absent(element: &Value) {
        assert_eq!(element["extension"][0]["url"], DATA_ABSENT_REASON);
        assert_eq!(element["extension"][0]["valueCode"], "unknown");
    }

    #[test]
    fn allowed_lookup_is_a_balp_patient_query() {
        let r = lookup_allowed();
        let e = audit_event(&r, &node());
        assert_eq!(e["resourceType"], "AuditEvent");
        assert_eq!(e["id"], "helse-vest-42");
        assert_eq!(e["meta"]["profile"], json!([PATIENT_QUERY_PROFILE]));
        assert_eq!(e["type"]["system"], AUDIT_EVENT_TYPE);
        assert_eq!(e["type"]["code"], "rest");
        assert_eq!(e["subtype"][0]["system"], RESTFUL_INTERACTION);
        assert_eq!(e["subtype"][0]["code"], "search");
        assert_eq!(
            e["subtype"][1],
            json!({"system": PIL_ACTION, "code": "lookup"})
        );
        assert_eq!(e["action"], "E");
        assert_eq!(e["recorded"], "2025-03-14T09:26:53.589Z");
        assert_eq!(e["outcome"], "0");
        assert_eq!(e["outcomeDesc"], "OK");
        assert_eq!(
            e["purposeOfEvent"],
            json!([
                {"coding": [{"system": PURPOSE_OF_USE, "code": "TREAT"}]},
                {"coding": [{"system": "urn:oid:2.16.578.1.12.4.1.1.8655", "code": "S08"}]},
            ])
        );

        let client = agent(&e, DCM, "110153");
        assert_eq!(client.len(), 1);
        assert_eq!(
            client[0]["who"]["identifier"]["system"],
            ORGANIZATION_NUMBER
        );
        assert_eq!(client[0]["who"]["identifier"]["value"], "983974899");
        assert_eq!(client[0]["requestor"], false);
        assert_absent(&client[0]["network"]);

        let server = agent(&e, DCM, "110152");
        assert_eq!(server.len(), 1);
        assert_eq!(
            server[0]["who"]["identifier"],
            json!({"system": PIL_REGION, "value": "helse-vest"})
        );
        assert_eq!(
            server[0]["network"]["address"],
            "https://pil.helse-vest.example:7443"
        );
        assert_eq!(server[0]["network"]["type"], "5");
        assert_eq!(server[0]["requestor"], false);

        let user = agent(&e, PARTICIPATION_TYPE, "IRCP");
        assert_eq!(user.len(), 1);
        assert_eq!(user[0]["requestor"], true);
        assert_eq!(
            user[0]["who"]["identifier"],
            json!({"system": HPR_NUMBER, "value": "565501872"})
        );
        assert_eq!(
            user[0]["role"][0]["coding"][0],
            json!({"system": PROFESSION, "code": "LE"})
        );
        assert_eq!(user[0]["purposeOfUse"], e["purposeOfEvent"]);
        assert!(
            user[0].get("network").is_none(),
            "BALP: agent[user].network 0..0"
        );
        assert_eq!(requestors(&e), 1);

        let app = agent(&e, DCM, "110150");
        assert_eq!(app[0]["who"]["identifier"]["value"], "dips-arena-haukeland");
        let orgs = agent(&e, ROLE_CLASS, "PROV");
        assert_eq!(orgs.len(), 2);
        assert_eq!(orgs[0]["who"]["identifier"]["value"], "983974899");
        assert_eq!(orgs[1]["who"]["identifier"]["value"], "974557746");

        assert_eq!(e["source"]["observer"]["identifier"]["value"], "helse-vest");
        assert_eq!(e["source"]["type"][0]["system"], SOURCE_TYPE);
        assert_eq!(e["source"]["type"][0]["code"], "4");

        let patient = entity(&e, ENTITY_TYPE, "1");
        assert_eq!(patient.len(), 1);
        assert_eq!(patient[0]["role"], coding(OBJECT_ROLE, "1", "Patient"));
        assert_eq!(patient[0]["what"]["type"], "Patient");
        assert_eq!(
            patient[0]["what"]["identifier"],
            json!({
                "system": "urn:pil:patient-pseudonym:helse-vest",
                "value": "9b1c3f7a2e6d4c8b0a1f2e3d4c5b6a79",
            })
        );
        assert_eq!(
            decoded_query(&e),
            json!({"action": "lookup", "query_id": "3f2a9c1e7b6d4e5f8a9b0c1d2e3f4a5b"})
        );
        let transaction = entity(&e, BALP_ENTITY_TYPE, "XrequestId");
        assert_eq!(transaction[0]["what"]["identifier"]["value"], r.query_id);

        assert_eq!(
            named_details(&e, "access decision", "legal-basis"),
            [
                "treat-care-relationship: pasientjournalloven § 19",
                "profession-doctor: helsepersonelloven § 45",
            ]
        );
        assert_eq!(
            named_details(&e, "access decision", "decision"),
            ["allowed"]
        );
        assert_eq!(
            named_details(&e, "access decision", "care-relationship"),
            ["true"]
        );
        assert_eq!(
            named_details(&e, "access decision", "decision-ref"),
            ["dips-tilgang-4711"]
        );
        assert_eq!(named_details(&e, "request outcome", "pointers"), ["3"]);
        assert_eq!(
            named_details(&e, "request outcome", "organization"),
            ["974557746", "983974899"]
        );
        assert_eq!(
            named_details(&e, "request outcome", "peer-region"),
            ["helse-midt", "helse-nord"]
        );
    }

    #[test]
    fn denied_lookup_keeps_the_query_shape_without_the_success_profile() {
        let e = ev(&lookup_denied());
        // BALP fixes outcome 0 in PatientQuery: a refusal cannot claim it.
        assert_eq!(e["meta"]["profile"], json!([AUDIT_EVENT_PROFILE]));
        assert_eq!(e["type"]["code"], "rest");
        assert_eq!(e["subtype"][0]["code"], "search");
        assert_eq!(e["outcome"], "4");
        assert_eq!(
            e["outcomeDesc"],
            "PERMISSION_DENIED: no rule permits this lookup"
        );
        assert_eq!(agent(&e, PARTICIPATION_TYPE, "IRCP")[0]["requestor"], true);
        assert_eq!(entity(&e, ENTITY_TYPE, "1").len(), 1);
        assert_eq!(decoded_query(&e)["action"], "lookup");
        assert_eq!(named_details(&e, "access decision", "decision"), ["denied"]);
        assert_eq!(
            named_details(&e, "access decision", "rule-effect"),
            ["forbid-no-care-relationship: forbid"]
        );
        assert_eq!(
            named_details(&e, "access decision", "care-relationship"),
            ["false"]
        );
        assert_eq!(named_details(&e, "request outcome", "pointers"), ["0"]);
    }

    #[test]
    fn unauthenticated_attempt_has_no_user_and_the_client_requests() {
        let e = ev(&lookup_unauthenticated());
        assert_eq!(e["meta"]["profile"], json!([AUDIT_EVENT_PROFILE]));
        assert_eq!(e["outcome"], "4");
        assert_eq!(e["outcomeDesc"], "UNAUTHENTICATED: access token expired");
        assert!(e.get("purposeOfEvent").is_none());
        assert!(agent(&e, PARTICIPATION_TYPE, "IRCP").is_empty());
        assert!(agent(&e, ROLE_CLASS, "PROV").is_empty());
        let client = agent(&e, DCM, "110153");
        assert_eq!(client[0]["requestor"], true);
        assert_eq!(client[0]["who"]["identifier"]["value"], "983974899");
        assert_eq!(requestors(&e), 1);
        assert!(entity(&e, ENTITY_TYPE, "1").is_empty());
        assert_eq!(
            decoded_query(&e)["query_id"],
            "3f2a9c1e7b6d4e5f8a9b0c1d2e3f4a5b"
        );
        assert_eq!(
            named_details(&e, "access decision", "decision"),
            ["unauthenticated"]
        );
        assert!(named_details(&e, "access decision", "care-relationship").is_empty());
    }

    #[test]
    fn caller_without_certificate_identity_is_absent_not_invented() {
        let e = ev(&lookup_without_caller());
        assert_absent(&agent(&e, DCM, "110153")[0]["who"]);
    }

    #[test]
    fn federated_lookup_names_the_forwarding_node_as_client() {
        let e = ev(&federated_lookup());
        assert_eq!(e["id"], "helse-midt-45");
        assert_eq!(e["meta"]["profile"], json!([PATIENT_QUERY_PROFILE]));
        assert_eq!(e["subtype"][1]["code"], "federated_lookup");
        let client = agent(&e, DCM, "110153");
        assert_eq!(client.len(), 1);
        assert_eq!(client[0]["who"]["type"], "Device");
        assert_eq!(
            client[0]["who"]["identifier"],
            json!({"system": PIL_REGION, "value": "helse-vest"})
        );
        assert_eq!(client[0]["requestor"], false);
        let server = agent(&e, DCM, "110152");
        assert_eq!(server[0]["who"]["identifier"]["value"], "helse-midt");
        assert_eq!(
            server[0]["network"]["address"],
            "https://pil.helse-midt.example:7443"
        );
        // The professional behind the forwarded token is still the requestor.
        assert_eq!(agent(&e, PARTICIPATION_TYPE, "IRCP")[0]["requestor"], true);
        assert_eq!(requestors(&e), 1);
        assert_eq!(
            agent(&e, ROLE_CLASS, "PROV")[0]["who"]["identifier"]["value"],
            "983974899"
        );
        assert_eq!(
            entity(&e, ENTITY_TYPE, "1")[0]["what"]["identifier"]["system"],
            "urn:pil:patient-pseudonym:helse-midt"
        );
        assert_eq!(decoded_query(&e)["action"], "federated_lookup");
        assert_eq!(
            named_details(&e, "request outcome", "forwarded-by"),
            ["helse-vest"]
        );
        assert_eq!(named_details(&e, "request outcome", "pointers"), ["1"]);
    }

    fn lookup_without_patient() -> AuditRecord {
        let mut r = record(Action::Lookup);
        r.index = 49;
        r.patient = None;
        r
    }

    fn lookup_without_caller() -> AuditRecord {
        let mut r = lookup_unauthenticated();
        r.index = 50;
        r.caller = CallerInfo::default();
        r
    }

    #[test]
    fn successful_query_without_patient_is_a_balp_query() {
        let e = ev(&lookup_without_patient());
        assert_eq!(e["meta"]["profile"], json!([QUERY_PROFILE]));
        assert!(entity(&e, ENTITY_TYPE, "1").is_empty());
        assert_eq!(decoded_query(&e)["action"], "lookup");
    }

    #[test]
    fn explain_is_a_patient_query() {
        let e = ev(&explain());
        assert_eq!(e["meta"]["profile"], json!([PATIENT_QUERY_PROFILE]));
        assert_eq!(e["action"], "E");
        assert_eq!(decoded_query(&e)["action"], "explain");
        assert!(named_details(&e, "request outcome", "pointers").is_empty());
    }

    #[test]
    fn pointer_upsert_is_a_patient_record_update() {
        let e = ev(&pointer_upsert());
        assert_eq!(e["meta"]["profile"], json!([AUDIT_EVENT_PROFILE]));
        assert_eq!(e["type"], coding(DCM, "110110", "Patient Record"));
        assert_eq!(
            e["subtype"],
            json!([{"system": PIL_ACTION, "code": "pointer_upsert"}])
        );
        assert_eq!(e["action"], "U");
        assert_eq!(e["outcome"], "0");
        assert_eq!(e["outcomeDesc"], "OK: pointer stored");
        assert!(e.get("purposeOfEvent").is_none());
        let client = agent(&e, DCM, "110153");
        assert_eq!(client[0]["who"]["identifier"]["value"], "974557746");
        assert_eq!(client[0]["requestor"], true);
        assert_eq!(entity(&e, ENTITY_TYPE, "1").len(), 1);
        assert!(entity(&e, ENTITY_TYPE, "2").is_empty());
        assert!(named_details(&e, "access decision", "decision").is_empty());
        assert_eq!(named_details(&e, "request outcome", "pointers"), ["1"]);
    }

    #[test]
    fn block_create_is_a_patient_record_create() {
        let e = ev(&block_create());
        assert_eq!(e["meta"]["profile"], json!([AUDIT_EVENT_PROFILE]));
        assert_eq!(e["type"], coding(DCM, "110110", "Patient Record"));
        assert_eq!(
            e["subtype"],
            json!([{"system": PIL_ACTION, "code": "block_create"}])
        );
        assert_eq!(e["action"], "C");
        assert_eq!(entity(&e, ENTITY_TYPE, "1").len(), 1);
        assert!(entity(&e, ENTITY_TYPE, "2").is_empty());
        assert_eq!(
            named_details(&e, "request outcome", "detail"),
            ["block 5e0c1a2b3c4d5e6f: hpr_number 565501872"]
        );
        assert!(named_details(&e, "request outcome", "pointers").is_empty());
    }

    #[test]
    fn every_action_gets_a_type_and_an_action_code() {
        for action in [
            Action::Lookup,
            Action::FederatedLookup,
            Action::Explain,
            Action::PointerUpsert,
            Action::PointerDelete,
            Action::PointerSync,
            Action::PointerExport,
            Action::BlockCreate,
            Action::BlockLift,
            Action::BlockList,
            Action::OptOutSet,
            Action::OptOutLift,
            Action::OptOutGet,
            Action::PolicyReload,
            Action::AuditAccess,
            Action::AuditReview,
            Action::Subscribe,
            Action::EventDelivery,
            Action::SubscriptionManage,
            Action::PeersList,
            Action::PeerPing,
            Action::Refused,
            Action::WitnessAlarm,
        ] {
            let e = ev(&record(action));
            assert!(e["type"]["code"].is_string(), "{action:?}");
            assert!(["C", "R", "U", "D", "E"].contains(&e["action"].as_str().unwrap()));
            let code = e["subtype"].as_array().unwrap().last().unwrap()["code"].clone();
            assert_eq!(code, serde_json::to_value(action).unwrap());
        }
        let reload = ev(&record(Action::PolicyReload));
        assert_eq!(reload["type"]["code"], "110113");
        assert_eq!(
            reload["subtype"][0],
            coding(DCM, "110129", "Security Configuration")
        );
    }

    #[test]
    fn grpc_status_maps_to_outcome() {
        for (status, code) in [
            ("OK", "0"),
            ("PERMISSION_DENIED", "4"),
            ("UNAUTHENTICATED", "4"),
            ("INVALID_ARGUMENT", "4"),
            ("NOT_FOUND", "4"),
            ("FAILED_PRECONDITION", "4"),
            ("INTERNAL", "8"),
            ("UNAVAILABLE", "8"),
            ("DEADLINE_EXCEEDED", "8"),
            ("SOMETHING_NEW", "8"),
        ] {
            assert_eq!(outcome_code(status), code, "{status}");
        }
    }

    #[test]
    fn node_of_another_region_gives_no_address() {
        let r = federated_lookup();
        let e = audit_event(&r, &node());
        assert_absent(&agent(&e, DCM, "110152")[0]["network"]);
    }

    #[test]
    fn ids_stay_within_fhir_syntax() {
        assert_eq!(resource_id("helse-vest", 7), "helse-vest-7");
        assert_eq!(resource_id("sør/øst", 1), "s-r--st-1");
        assert!(resource_id(&"x".repeat(100), u64::MAX).len() <= 64);
    }

    #[test]
    fn bundle_is_a_collection() {
        let events: Vec<Value> = [lookup_allowed(), pointer_upsert()]
            .iter()
            .map(ev)
            .collect();
        let b = bundle(events.clone());
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "collection");
        assert_eq!(b["entry"][0]["resource"], events[0]);
        assert_eq!(b["entry"][1]["resource"], events[1]);
        assert!(
            b.get("total").is_none(),
            "bdl-1: total only for searchset and history"
        );
    }

    /// Writes the sample events for `validate_auditevent.py` when
    /// `PIL_FHIR_SAMPLES_DIR` is set: one file per event, a Bundle and JSON Lines.
    #[test]
    fn write_samples() {
        let Some(dir) = std::env::var_os("PIL_FHIR_SAMPLES_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let samples = [
            ("lookup-allowed", lookup_allowed()),
            ("lookup-denied", lookup_denied()),
            ("lookup-unauthenticated", lookup_unauthenticated()),
            ("lookup-without-caller", lookup_without_caller()),
            ("lookup-without-patient", lookup_without_patient()),
            ("federated-lookup", federated_lookup()),
            ("explain", explain()),
            ("pointer-upsert", pointer_upsert()),
            ("block-create", block_create()),
        ];
        let mut events = Vec::new();
        let mut lines = String::new();
        for (name, record) in &samples {
            let event = ev(record);
            let text = serde_json::to_string_pretty(&event).unwrap();
            std::fs::write(dir.join(format!("{name}.json")), text + "\n").unwrap();
            lines.push_str(&event.to_string());
            lines.push('\n');
            events.push(event);
        }
        std::fs::write(dir.join("events.jsonl"), lines).unwrap();
        let text = serde_json::to_string_pretty(&bundle(events)).unwrap();
        std::fs::write(dir.join("bundle.json"), text + "\n").unwrap();
    }
}
