//! An audit record as the client reads it. The record format belongs to the node
//! (docs/auditor-guide.md lists its fields); unknown fields are ignored and missing
//! ones left empty, so a newer node's records still read.

use serde::Deserialize;

/// One record of a node's audit log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Record {
    pub index: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub region: String,
    pub action: String,
    pub query_id: String,
    pub caller: Caller,
    pub requester: Option<Requester>,
    /// The patient's keyed pseudonym (hex).
    pub patient: Option<String>,
    pub decision: Decision,
    pub outcome: Outcome,
    pub peers_asked: Vec<String>,
    pub forwarded_by: Option<String>,
    pub detail: Option<String>,
    /// For a review: the reviewed record's index.
    pub reviewed: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Caller {
    pub organization: Option<String>,
    pub node_region: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Requester {
    pub organization: String,
    pub organization_name: Option<String>,
    pub child_organization: Option<String>,
    pub child_organization_name: Option<String>,
    pub hpr_number: Option<String>,
    pub practitioner_name: Option<String>,
    pub profession: Option<String>,
    pub purpose_of_use: Coding,
    pub care_relationship: bool,
    pub decision_ref: Option<String>,
    pub client_id: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Coding {
    pub system: String,
    pub code: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Decision {
    pub outcome: String,
    pub emergency: bool,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Rule {
    pub id: String,
    pub legal_basis: String,
    pub effect: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Outcome {
    pub status: String,
    pub error_code: String,
    pub detail: String,
    pub pointers: u32,
    pub organizations: Vec<String>,
}

/// The node sent a record that is not a JSON object.
#[derive(Debug, thiserror::Error)]
#[error("the node sent an audit record that is not JSON: {0}")]
pub struct NotARecord(#[from] serde_json::Error);

impl Record {
    pub fn parse(bytes: &[u8]) -> Result<Self, NotARecord> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Whose request it was: the requester's organization (and sub-unit), else the
    /// caller's, else the calling node.
    pub fn organization(&self) -> String {
        match (&self.requester, &self.caller) {
            (Some(r), _) => match &r.child_organization {
                Some(child) => format!("{} / {child}", r.organization),
                None => r.organization.clone(),
            },
            (
                None,
                Caller {
                    organization: Some(o),
                    ..
                },
            ) => o.clone(),
            (
                None,
                Caller {
                    node_region: Some(n),
                    ..
                },
            ) => format!("node {n}"),
            _ => String::new(),
        }
    }

    /// The organization with the names the record knows, e.g.
    /// "Haukeland universitetssjukehus (983974899)".
    pub fn organization_named(&self) -> String {
        let Some(r) = &self.requester else {
            return self.organization();
        };
        let one = |number: &str, name: &Option<String>| match name {
            Some(name) => format!("{name} ({number})"),
            None => number.to_string(),
        };
        let parent = one(&r.organization, &r.organization_name);
        match &r.child_organization {
            Some(child) => format!("{parent} / {}", one(child, &r.child_organization_name)),
            None => parent,
        }
    }

    /// The health professional with the name the record knows, e.g.
    /// "Kari Nordmann (HPR 565501872)"; empty without an HPR number.
    pub fn professional_named(&self) -> String {
        let Some(r) = &self.requester else {
            return String::new();
        };
        match (&r.hpr_number, &r.practitioner_name) {
            (Some(hpr), Some(name)) => format!("{name} (HPR {hpr})"),
            (Some(hpr), None) => format!("HPR {hpr}"),
            (None, Some(name)) => name.clone(),
            (None, None) => String::new(),
        }
    }

    /// A field of the requester, empty when the record has none.
    pub fn requester_field(&self, f: impl Fn(&Requester) -> Option<String>) -> String {
        self.requester.as_ref().and_then(f).unwrap_or_default()
    }

    pub fn hpr(&self) -> String {
        self.requester_field(|r| r.hpr_number.clone())
    }

    pub fn purpose(&self) -> String {
        self.requester_field(|r| Some(r.purpose_of_use.code.clone()))
    }

    /// The start of the patient's pseudonym: enough to tell records apart.
    pub fn patient_short(&self) -> String {
        self.patient
            .as_deref()
            .map(|p| p.chars().take(12).collect())
            .unwrap_or_default()
    }

    /// A client's lookup or one a peer forwarded.
    pub fn is_lookup(&self) -> bool {
        self.action == "lookup" || self.action == "federated_lookup"
    }

    /// Whether the requester's own organization (or sub-unit) is among those whose
    /// pointers the lookup returned.
    pub fn own_organization_holds(&self) -> bool {
        let Some(r) = &self.requester else {
            return false;
        };
        self.outcome
            .organizations
            .iter()
            .any(|o| *o == r.organization || Some(o) == r.child_organization.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_where_the_record_has_them() {
        let r = Record::parse(
            br#"{"index":3,"action":"lookup","requester":{"organization":"983974899",
            "organization_name":"Helse Bergen","child_organization":"974557746",
            "hpr_number":"565501872","practitioner_name":"Kari Nordmann",
            "purpose_of_use":{"system":"s","code":"TREAT"},"care_relationship":true,
            "client_id":"c"},"outcome":{"status":"OK","pointers":1,
            "organizations":["974557746"]},"future_field":1}"#,
        )
        .unwrap();
        assert_eq!(
            r.organization_named(),
            "Helse Bergen (983974899) / 974557746"
        );
        assert_eq!(r.professional_named(), "Kari Nordmann (HPR 565501872)");
        assert!(r.own_organization_holds());
        assert!(r.is_lookup());
    }

    #[test]
    fn a_node_call_names_the_node() {
        let r =
            Record::parse(br#"{"action":"peer_ping","caller":{"node_region":"vest"}}"#).unwrap();
        assert_eq!(r.organization(), "node vest");
        assert_eq!(r.professional_named(), "");
        assert!(!r.own_organization_holds());
    }
}
