//! One audit record: what a node keeps about one request it answered.
//!
//! A record is stored, hashed and exported as its JSON serialization, byte for byte:
//! the hash tree's leaf is exactly the line an auditor reads in a JSON Lines export.
//! The patient appears only as the node's keyed pseudonym, never as the identifier.

use serde::{Deserialize, Serialize};

/// What kind of request a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A client's lookup at its home node.
    Lookup,
    /// A lookup forwarded by a peer node, answered for this node's own pointers.
    FederatedLookup,
    /// `PolicyService.Explain`: a decision without a lookup.
    Explain,
    PointerUpsert,
    PointerDelete,
    PointerSync,
    PointerExport,
    BlockCreate,
    BlockLift,
    BlockList,
    OptOutSet,
    OptOutLift,
    OptOutGet,
    PolicyReload,
    /// An operator's look at the federation peers.
    PeersList,
    /// An auditor's search, export or proof request.
    AuditAccess,
    /// An auditor's review of one record (an emergency access followed up, a refusal
    /// looked into): `reviewed` names it, `detail` holds the note.
    AuditReview,
    /// A peer node's check that this node is reachable and accepts it.
    PeerPing,
    /// `EventService.Subscribe` (one record per followed patient, and one for the
    /// request) and `RenewSubscription`: an organization follows a patient.
    Subscribe,
    /// Events of a subscription delivered (one record per patient per delivery).
    EventDelivery,
    /// A subscription listed or ended by its owner.
    SubscriptionManage,
    /// A backup of the store taken through the node's control socket, or a restore
    /// from one, announced when the restored node starts.
    Backup,
    /// What the node removes by its own retention rules: pointers past their expiry or
    /// lapse, change events past `events_days`, audit record contents past
    /// `audit_log_days`. One record says what is due before anything is removed, a
    /// second what was removed.
    Retention,
    /// As a witness of another region's log: a validly signed checkpoint of it that
    /// contradicts what this node cosigned before (a rollback, a fork, an inconsistent
    /// history). `detail` names the log and holds the checkpoint as evidence. Heads
    /// cosigned are not recorded: each would make a new head for the other side to
    /// witness.
    WitnessAlarm,
    /// A request refused before any service handled it: not valid protobuf, over the
    /// message size limit, or for a method this node does not have. `detail` names
    /// the method.
    Refused,
}

/// Who called, as the connection's certificate says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerInfo {
    /// Organization number from an organization certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// Region id from a node certificate (federated calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_region: Option<String>,
}

/// A coded value (system and code), e.g. a purpose of use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
}

/// The requester named by a verified access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequesterInfo {
    /// Organization number of the legal entity (`orgnr_parent`).
    pub organization: String,
    /// The legal entity's name, when the token's attest gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_name: Option<String>,
    /// Organization number of the sub-unit (`orgnr_child`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_organization: Option<String>,
    /// The sub-unit's name, when the attest gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_organization_name: Option<String>,
    /// The health professional's HPR number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpr_number: Option<String>,
    /// The health professional's name, when the attest gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practitioner_name: Option<String>,
    /// HPR authorization (profession) code, e.g. `LE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profession: Option<String>,
    /// HL7 PurposeOfUse, e.g. `TREAT` in `urn:oid:2.16.840.1.113883.1.11.20448`.
    pub purpose_of_use: Coding,
    /// Detail of the purpose, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_details: Option<Coding>,
    /// Whether the requester asserts a care relationship with the patient.
    pub care_relationship: bool,
    /// Reference to the requester's local access decision, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_ref: Option<String>,
    /// The OAuth client that obtained the token.
    pub client_id: String,
}

/// One rule of the legal configuration that took part in the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub id: String,
    pub legal_basis: String,
    /// `permit` or `forbid`.
    pub effect: String,
}

/// What was decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionInfo {
    /// `allowed`, `denied` (by the legal configuration, or a missing role) or
    /// `unauthenticated`; `not_applicable` for calls without a policy decision that
    /// were let through (registry writes and admin actions authorized by certificate).
    pub outcome: String,
    /// Allowed under emergency access (ETREAT).
    pub emergency: bool,
    /// The deciding rules with their legal bases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleInfo>,
}

/// What the caller got back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeInfo {
    /// gRPC status code name: `OK`, `PERMISSION_DENIED`, `UNAUTHENTICATED`, ...
    pub status: String,
    /// The node's stable error code (`PIL-DENIED`, `PIL-INVALID`, …) when the request
    /// failed in a handler.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_code: String,
    /// The status message, or a short summary for successful writes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Pointers returned (lookups) or written (registry writes).
    pub pointers: u32,
    /// Organizations whose pointers were returned, sorted and distinct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<String>,
}

/// One request, as the answering node logged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in this node's log, counting from 0. Part of the hashed record, so a
    /// record moved to another position no longer matches.
    pub index: u64,
    /// When the node answered: RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The region of the node that answered and logged.
    pub region: String,
    pub action: Action,
    /// The lookup's query id, shared by every region that answered it; a fresh id for
    /// other requests.
    pub query_id: String,
    pub caller: CallerInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<RequesterInfo>,
    /// The patient's keyed pseudonym (hex), when the request concerned one patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    pub decision: DecisionInfo,
    pub outcome: OutcomeInfo,
    /// For a client's lookup: the peer regions it was forwarded to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_asked: Vec<String>,
    /// For a federated lookup: the region of the node that forwarded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_by: Option<String>,
    /// For writes and admin actions: what was done, e.g. the block's target or a
    /// sync's counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a review: the index of the record reviewed, in this node's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed: Option<u64>,
}

impl AuditRecord {
    /// The record of one request to `region`'s node, stamped now with a fresh query id
    /// and no decision yet; whoever handles the request fills in the rest.
    pub fn new(region: &str, action: Action, caller: CallerInfo) -> Self {
        Self {
            index: 0,
            time: now_rfc3339(),
            region: region.to_string(),
            action,
            query_id: new_query_id(),
            caller,
            requester: None,
            patient: None,
            decision: DecisionInfo::default(),
            outcome: OutcomeInfo::default(),
            peers_asked: Vec::new(),
            forwarded_by: None,
            detail: None,
            reviewed: None,
        }
    }

    /// A record of a request no policy decided, with its final status and detail.
    /// A record of the node's own operation (a reload, a backup): nobody's request,
    /// nothing decided, `detail` saying what happened.
    pub fn operation(region: &str, action: Action, status: &str, detail: String) -> Self {
        let mut record = Self::not_decided(
            region,
            action,
            CallerInfo::default(),
            status,
            detail.clone(),
        );
        record.detail = Some(detail);
        record
    }

    pub fn not_decided(
        region: &str,
        action: Action,
        caller: CallerInfo,
        status: &str,
        detail: String,
    ) -> Self {
        let mut record = Self::new(region, action, caller);
        record.decision.outcome = "not_applicable".into();
        record.outcome.status = status.to_string();
        record.outcome.detail = detail;
        record
    }
}

/// Now as RFC 3339, UTC, milliseconds.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&format).unwrap_or_default()
}

/// A random id for one request, carried into logs (and, across regions, the audit log).
fn new_query_id() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}
