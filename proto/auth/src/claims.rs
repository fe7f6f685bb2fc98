//! Serde types of the claims in a HelseID-style access token.
//!
//! The same types serve the development issuer (serialize) and the verifier (deserialize), so
//! the two cannot drift apart. Parsing is tolerant where HelseID's published material shows
//! variation (audience as string or array; scope as string or array; `authorization_details` as
//! an array, a single object, or JSON-in-a-string; hyphenated attribute names from the earlier
//! drafts of the tillitsrammeverk data model), and strict where it matters for security: the
//! verifier refuses duplicate claim names, requires the purpose-of-use code system, and refuses
//! more than one tillitsrammeverk entry.
//!
//! Sources: HelseID's claim names (`helseid://claims/...`, NHN developer portal, "Claims");
//! the attest as HelseID accepts it (`type` = `nhn:tillitsrammeverk:parameters`, with
//! `practitioner`, `care_relationship`, `patients`; NHN's JSON schema "Complete Trust Framework
//! structure" and the HelseID samples); the information model in NorskHelsenett/Tillitsrammeverk
//! `specs/informasjons_og_datamodell.md` (identifiers as `{id, name, system, authority}`, codes as
//! `{code, text, system, assigner}`).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Claim name: organization number of the legal entity (hovedenhet) of the client.
pub const CLAIM_ORGNR_PARENT: &str = "helseid://claims/client/claims/orgnr_parent";
/// Claim name: organization number of the point of care (underenhet).
pub const CLAIM_ORGNR_CHILD: &str = "helseid://claims/client/claims/orgnr_child";
/// Claim name: the health professional's HPR number.
pub const CLAIM_HPR_NUMBER: &str = "helseid://claims/hpr/hpr_number";
/// `type` of the tillitsrammeverk entry in `authorization_details`.
pub const TILLITSRAMMEVERK_TYPE: &str = "nhn:tillitsrammeverk:parameters";
/// Code system of HL7 v3 PurposeOfUse (TREAT, ETREAT, COC, ...).
pub const PURPOSE_OF_USE_SYSTEM: &str = "urn:oid:2.16.840.1.113883.1.11.20448";
/// Code system of HPR authorizations (kodeverk 9060: LE = lege, SP = sykepleier, ...).
pub const HPR_AUTHORIZATION_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.1.9060";
/// Identifier system of Norwegian organization numbers (Enhetsregisteret).
pub const ORGNR_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.4.101";
/// Identifier system of fødselsnummer (the practitioner's person identifier in the attest).
pub const FNR_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.4.1";
/// Identifier system of HPR numbers.
pub const HPR_NUMBER_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.4.4";
/// Code system of helsetjenestetyper (kodeverk 8655), used for `healthcare_service`.
pub const HEALTHCARE_SERVICE_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.1.8655";

/// Normalizes an OID code system to its `urn:oid:` form, so that `2.16.840...` and
/// `urn:oid:2.16.840...` (both seen in NHN material) compare equal.
pub fn normalize_oid_system(system: &str) -> String {
    let trimmed = system.trim();
    if trimmed.starts_with("urn:oid:") {
        trimmed.to_owned()
    } else if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        format!("urn:oid:{trimmed}")
    } else {
        trimmed.to_owned()
    }
}

/// The claims of an access token. Unknown claims are kept in [`AccessTokenClaims::extra`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// Issuer.
    pub iss: String,
    /// Audience: one string or an array (RFC 7519 §4.1.3).
    pub aud: Audience,
    /// Expiry, seconds since the epoch.
    #[serde(with = "numeric_date")]
    pub exp: i64,
    /// Not before, seconds since the epoch.
    #[serde(
        default,
        with = "numeric_date::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub nbf: Option<i64>,
    /// Issued at, seconds since the epoch.
    #[serde(
        default,
        with = "numeric_date::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub iat: Option<i64>,
    /// Token identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Granted scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// The OAuth client that obtained the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Organization number of the legal entity.
    #[serde(
        rename = "helseid://claims/client/claims/orgnr_parent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub orgnr_parent: Option<String>,
    /// Organization number of the point of care.
    #[serde(
        rename = "helseid://claims/client/claims/orgnr_child",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub orgnr_child: Option<String>,
    /// The health professional's HPR number (a string; a JSON number is tolerated).
    #[serde(
        rename = "helseid://claims/hpr/hpr_number",
        default,
        deserialize_with = "string_or_number::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub hpr_number: Option<String>,
    /// Confirmation (RFC 7800); `jkt` binds the token to a DPoP key (RFC 9449 §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// Rich authorization details (RFC 9396), holding the tillitsrammeverk attest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_details: Option<AuthorizationDetails>,
    /// Every other claim (`sub`, `helseid://claims/identity/pid`, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `aud`: a single string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "x"`
    One(String),
    /// `"aud": ["x", "y"]`
    Many(Vec<String>),
}

impl Audience {
    /// All audience values.
    pub fn values(&self) -> Vec<&str> {
        match self {
            Audience::One(a) => vec![a.as_str()],
            Audience::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `scope`: a space-separated string (RFC 8693 §4.2, RFC 9068) or, as IdentityServer-based
/// issuers such as HelseID may emit, an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scope {
    /// `"scope": "a b c"`
    Delimited(String),
    /// `"scope": ["a", "b", "c"]`
    List(Vec<String>),
}

impl Scope {
    /// The individual scope values.
    pub fn values(&self) -> Vec<&str> {
        match self {
            Scope::Delimited(s) => s.split(' ').filter(|s| !s.is_empty()).collect(),
            Scope::List(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// Whether `wanted` is one of the scopes (exact match).
    pub fn contains(&self, wanted: &str) -> bool {
        self.values().contains(&wanted)
    }
}

/// `cnf` (RFC 7800).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// SHA-256 JWK thumbprint of the DPoP key the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
    /// Other confirmation methods (e.g. `x5t#S256`), kept but not interpreted.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Why the tillitsrammeverk attest could not be taken from `authorization_details`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// No entry has `type` = `nhn:tillitsrammeverk:parameters`.
    #[error("no authorization_details entry of type \"nhn:tillitsrammeverk:parameters\"")]
    Missing,
    /// More than one such entry: which one counts would be a guess.
    #[error(
        "{0} authorization_details entries of type \"nhn:tillitsrammeverk:parameters\"; exactly one is allowed"
    )]
    Ambiguous(usize),
    /// The entry does not have the documented shape.
    #[error("the tillitsrammeverk attest is malformed: {0}")]
    Malformed(String),
}

/// A JSON value parsed with duplicate object keys refused, at every depth.
///
/// `serde_json::Value` silently keeps the last of two equal keys, while other parsers keep the
/// first; in signed data that difference is an attack surface (the issuer validates one value,
/// we read another). Used for `authorization_details`, JOSE headers and JWKS documents.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictValue(pub Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value without duplicate object keys")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key \"{key}\"")));
            }
            let StrictValue(v) = map.next_value()?;
            obj.insert(key, v);
        }
        Ok(Value::Object(obj))
    }
}

/// Parses JSON text with duplicate keys refused.
pub fn parse_strict_json(text: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(text).map(|v| v.0)
}

/// `authorization_details` (RFC 9396): an array of typed objects. A single object, and entries
/// serialized as JSON strings (as some .NET issuers emit structured claims), are tolerated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct AuthorizationDetails(pub Value);

impl<'de> Deserialize<'de> for AuthorizationDetails {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StrictValue::deserialize(d).map(|v| AuthorizationDetails(v.0))
    }
}

impl AuthorizationDetails {
    /// Builds the array form from entries.
    pub fn from_entries(entries: Vec<Value>) -> Self {
        AuthorizationDetails(Value::Array(entries))
    }

    /// The entries, with JSON-in-a-string entries parsed.
    pub fn entries(&self) -> Result<Vec<Value>, AttestError> {
        let raw: Vec<&Value> = match &self.0 {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        raw.into_iter()
            .map(|entry| match entry {
                Value::String(text) => parse_strict_json(text.as_bytes()).map_err(|e| {
                    AttestError::Malformed(format!(
                        "an authorization_details entry is a string that is not JSON: {e}"
                    ))
                }),
                other => Ok(other.clone()),
            })
            .collect()
    }

    /// The single tillitsrammeverk attest.
    pub fn tillitsrammeverk(&self) -> Result<TillitsrammeverkAttest, AttestError> {
        let matching: Vec<Value> = self
            .entries()?
            .into_iter()
            .filter(|e| e.get("type").and_then(Value::as_str) == Some(TILLITSRAMMEVERK_TYPE))
            .collect();
        match matching.len() {
            0 => Err(AttestError::Missing),
            1 => {
                let mut iter = matching.into_iter();
                match iter.next() {
                    Some(entry) => serde_json::from_value(entry)
                        .map_err(|e| AttestError::Malformed(e.to_string())),
                    None => Err(AttestError::Missing),
                }
            }
            n => Err(AttestError::Ambiguous(n)),
        }
    }
}

/// The tillitsrammeverk attest (`type` = `nhn:tillitsrammeverk:parameters`): the consumer's
/// attestation of the health professional's basis for access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TillitsrammeverkAttest {
    /// Always `nhn:tillitsrammeverk:parameters`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The health professional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practitioner: Option<Practitioner>,
    /// The care relationship to the patient, with the purpose of use.
    #[serde(
        default,
        alias = "care-relationship",
        alias = "care-relation",
        skip_serializing_if = "Option::is_none"
    )]
    pub care_relationship: Option<CareRelationship>,
    /// Patients the attest concerns (`[{}]` and a single object are tolerated).
    #[serde(
        default,
        alias = "patient",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub patients: Vec<AttestPatient>,
    /// Other members (`toa`, versions, ...), kept but not interpreted.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl TillitsrammeverkAttest {
    /// An attest with the given parts.
    pub fn new(
        practitioner: Option<Practitioner>,
        care_relationship: Option<CareRelationship>,
        patients: Vec<AttestPatient>,
    ) -> Self {
        TillitsrammeverkAttest {
            kind: TILLITSRAMMEVERK_TYPE.to_owned(),
            practitioner,
            care_relationship,
            patients,
            extra: BTreeMap::new(),
        }
    }
}

/// `practitioner`: who the health professional is and where they work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Practitioner {
    /// The person (fødselsnummer/D-nummer), usually added by HelseID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    /// HPR number, as a plain string or an identifier object.
    #[serde(
        default,
        alias = "hpr-nr",
        alias = "hpr_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub hpr_nr: Option<HprNumber>,
    /// Authorization (profession), code system 9060: `LE`, `SP`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Code>,
    /// Legal entity (hovedenhet), organization number.
    #[serde(
        default,
        alias = "legal-entity",
        skip_serializing_if = "Option::is_none"
    )]
    pub legal_entity: Option<Identifier>,
    /// Point of care (underenhet), organization number.
    #[serde(
        default,
        alias = "point-of-care",
        skip_serializing_if = "Option::is_none"
    )]
    pub point_of_care: Option<Identifier>,
    /// Department (e.g. RESH id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<Identifier>,
}

/// An HPR number: `"9144900"` or `{ "id": "9144900", "system": ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HprNumber {
    /// Plain string.
    Plain(String),
    /// Identifier object.
    Identifier(Identifier),
}

impl HprNumber {
    /// The number itself.
    pub fn value(&self) -> &str {
        match self {
            HprNumber::Plain(s) => s,
            HprNumber::Identifier(i) => &i.id,
        }
    }
}

/// `care_relationship`: why the professional needs the data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CareRelationship {
    /// Healthcare service type (kodeverk 8655).
    #[serde(
        default,
        alias = "healthcare-service",
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcare_service: Option<Code>,
    /// Purpose of use, HL7 v3 PurposeOfUse (`TREAT`, `ETREAT`, `COC`, ...).
    #[serde(
        default,
        alias = "purpose-of-use",
        skip_serializing_if = "Option::is_none"
    )]
    pub purpose_of_use: Option<Code>,
    /// Detailed purpose of use.
    #[serde(
        default,
        alias = "purpose-of-use-details",
        skip_serializing_if = "Option::is_none"
    )]
    pub purpose_of_use_details: Option<Code>,
    /// Reference to the local access decision.
    #[serde(
        default,
        alias = "decision-ref",
        skip_serializing_if = "Option::is_none"
    )]
    pub decision_ref: Option<DecisionRef>,
}

/// `decision_ref`: the consumer's own record of the access decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRef {
    /// Identifier of the local decision.
    #[serde(default, alias = "ref_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Whether the user chose the basis for access themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_selected: Option<bool>,
}

/// A patient entry in the attest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestPatient {
    /// The patient's identifier (fødselsnummer, D-nummer, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    /// Where the patient is treated.
    #[serde(
        default,
        alias = "point-of-care",
        skip_serializing_if = "Option::is_none"
    )]
    pub point_of_care: Option<Identifier>,
    /// Department where the patient is treated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<Identifier>,
}

/// An identifier: `{ "id", "name", "system", "authority" }` (`value` accepted for `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifier {
    /// The identifier.
    #[serde(alias = "value")]
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Identifier system (an OID URN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Authoritative source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

impl Identifier {
    /// An identifier with a system.
    pub fn new(id: impl Into<String>, system: impl Into<String>) -> Self {
        Identifier {
            id: id.into(),
            name: None,
            system: Some(system.into()),
            authority: None,
        }
    }
}

/// A coded value: `{ "code", "text", "system", "assigner" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Code {
    /// The code.
    pub code: String,
    /// Display text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Code system (an OID URN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Who maintains the code system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigner: Option<String>,
}

impl Code {
    /// A code with a system.
    pub fn new(code: impl Into<String>, system: impl Into<String>) -> Self {
        Code {
            code: code.into(),
            text: None,
            system: Some(system.into()),
            assigner: None,
        }
    }
}

fn one_or_many<'de, D>(deserializer: D) -> Result<Vec<AttestPatient>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<AttestPatient>),
        One(Box<AttestPatient>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(p) => vec![*p],
        OneOrMany::Null(()) => Vec::new(),
    })
}

/// NumericDate (RFC 7519 §2): integer seconds; a non-integer is tolerated and truncated.
pub mod numeric_date {
    use super::*;

    struct NumericDateVisitor;

    impl Visitor<'_> for NumericDateVisitor {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a NumericDate (seconds since the epoch)")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("NumericDate out of range"))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            if v.is_finite() && v.abs() < 9.0e15 {
                Ok(v.trunc() as i64)
            } else {
                Err(E::custom("NumericDate out of range"))
            }
        }
    }

    /// Serializes as an integer.
    pub fn serialize<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*v)
    }

    /// Deserializes an integer or a float.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_any(NumericDateVisitor)
    }

    /// The same for optional claims.
    pub mod option {
        use super::*;

        /// Serializes as an integer.
        pub fn serialize<S: serde::Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_i64(*v),
                None => s.serialize_none(),
            }
        }

        /// Deserializes an integer, a float or null.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] i64);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

mod string_or_number {
    use super::*;

    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum StringOrNumber {
            S(String),
            N(u64),
        }
        Ok(Option::<StringOrNumber>::deserialize(d)?.map(|v| match v {
            StringOrNumber::S(s) => s,
            StringOrNumber::N(n) => n.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The attest as HelseID's samples send it (identifiers without names, codes with systems),
    /// inside an access token with the array form of `authorization_details`.
    fn helseid_like_token() -> Value {
        json!({
            "iss": "https://helseid-sts.test.nhn.no",
            "aud": "pil",
            "exp": 1_900_000_000,
            "nbf": 1_800_000_000,
            "iat": 1_800_000_000,
            "jti": "8B7C6D1E",
            "scope": "openid pil:lookup",
            "client_id": "c-123",
            "sub": "abc",
            "helseid://claims/client/claims/orgnr_parent": "974589095",
            "helseid://claims/client/claims/orgnr_child": "974589096",
            "helseid://claims/hpr/hpr_number": "9144900",
            "cnf": { "jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I" },
            "authorization_details": [
                { "type": "helseid_authorization", "practitioner_role": {} },
                {
                    "type": "nhn:tillitsrammeverk:parameters",
                    "practitioner": {
                        "authorization": { "code": "LE", "system": "urn:oid:2.16.578.1.12.4.1.1.9060" },
                        "legal_entity": { "id": "974589095", "system": "urn:oid:2.16.578.1.12.4.1.4.101" },
                        "point_of_care": { "id": "974589096", "system": "urn:oid:2.16.578.1.12.4.1.4.101" },
                        "department": { "id": "705592", "system": "urn:oid:2.16.578.1.12.4.1.4.102" }
                    },
                    "care_relationship": {
                        "healthcare_service": { "code": "S03", "system": "urn:oid:2.16.578.1.12.4.1.1.8655" },
                        "purpose_of_use": { "code": "TREAT", "system": "urn:oid:2.16.840.1.113883.1.11.20448" },
                        "purpose_of_use_details": { "code": "15", "system": "urn:oid:2.16.578.1.12.4.1.1.9151" },
                        "decision_ref": { "id": "30F4AB40-DBC2-41A7-8AC4-181AD3FDC25B", "user_selected": true }
                    },
                    "patients": [{}]
                }
            ]
        })
    }

    #[test]
    fn parses_helseid_like_token() {
        let claims: AccessTokenClaims = serde_json::from_value(helseid_like_token()).unwrap();
        assert_eq!(claims.aud, Audience::One("pil".into()));
        assert!(claims.scope.as_ref().unwrap().contains("pil:lookup"));
        assert_eq!(claims.orgnr_parent.as_deref(), Some("974589095"));
        assert_eq!(claims.hpr_number.as_deref(), Some("9144900"));
        assert_eq!(claims.extra.get("sub"), Some(&json!("abc")));
        let attest = claims
            .authorization_details
            .as_ref()
            .unwrap()
            .tillitsrammeverk()
            .unwrap();
        let care = attest.care_relationship.unwrap();
        assert_eq!(care.purpose_of_use.unwrap().code, "TREAT");
        assert_eq!(care.decision_ref.unwrap().user_selected, Some(true));
        assert_eq!(attest.patients, vec![AttestPatient::default()]);
        assert_eq!(
            attest.practitioner.unwrap().authorization.unwrap().code,
            "LE"
        );
    }

    #[test]
    fn tolerates_documented_variations() {
        let mut token = helseid_like_token();
        token["aud"] = json!(["pil"]);
        token["scope"] = json!(["openid", "pil:lookup"]);
        token["exp"] = json!(1_900_000_000.7);
        token["helseid://claims/hpr/hpr_number"] = json!(9_144_900);
        // A single object, with the hyphenated names of the information-model draft and the
        // HPR number as an identifier object.
        token["authorization_details"] = json!({
            "type": "nhn:tillitsrammeverk:parameters",
            "practitioner": {
                "hpr-nr": { "id": "9144900", "system": "urn:oid:2.16.578.1.12.4.1.4.4" },
                "legal-entity": { "id": "974589095", "name": "Sykehuset HF" }
            },
            "care-relationship": {
                "purpose-of-use": { "code": "ETREAT", "system": "2.16.840.1.113883.1.11.20448" },
                "decision-ref": { "ref_id": "abc" }
            },
            "patients": { "identifier": { "id": "13116900216", "system": "urn:oid:2.16.578.1.12.4.1.4.1" } }
        });
        let claims: AccessTokenClaims = serde_json::from_value(token).unwrap();
        assert_eq!(claims.exp, 1_900_000_000);
        assert_eq!(claims.scope.unwrap().values(), vec!["openid", "pil:lookup"]);
        assert_eq!(claims.hpr_number.as_deref(), Some("9144900"));
        let attest = claims
            .authorization_details
            .unwrap()
            .tillitsrammeverk()
            .unwrap();
        let practitioner = attest.practitioner.unwrap();
        assert_eq!(practitioner.hpr_nr.unwrap().value(), "9144900");
        assert_eq!(practitioner.legal_entity.unwrap().id, "974589095");
        let care = attest.care_relationship.unwrap();
        let pou = care.purpose_of_use.unwrap();
        assert_eq!(pou.code, "ETREAT");
        assert_eq!(
            normalize_oid_system(pou.system.as_deref().unwrap()),
            PURPOSE_OF_USE_SYSTEM
        );
        assert_eq!(care.decision_ref.unwrap().id.as_deref(), Some("abc"));
        assert_eq!(attest.patients.len(), 1);
        assert_eq!(
            attest.patients[0].identifier.as_ref().unwrap().id,
            "13116900216"
        );
    }

    #[test]
    fn attest_as_json_string_entry() {
        let entry = json!({
            "type": "nhn:tillitsrammeverk:parameters",
            "care_relationship": { "purpose_of_use": { "code": "TREAT", "system": PURPOSE_OF_USE_SYSTEM } }
        });
        let details = AuthorizationDetails(json!([entry.to_string()]));
        assert!(details.tillitsrammeverk().is_ok());
    }

    #[test]
    fn attest_missing_ambiguous_or_malformed() {
        let other = json!({"type": "helseid_authorization"});
        assert_eq!(
            AuthorizationDetails(json!([other])).tillitsrammeverk(),
            Err(AttestError::Missing)
        );
        let attest = json!({"type": TILLITSRAMMEVERK_TYPE});
        assert_eq!(
            AuthorizationDetails(json!([attest, attest])).tillitsrammeverk(),
            Err(AttestError::Ambiguous(2))
        );
        let bad = json!({"type": TILLITSRAMMEVERK_TYPE, "care_relationship": {"purpose_of_use": "TREAT"}});
        assert!(matches!(
            AuthorizationDetails(json!([bad])).tillitsrammeverk(),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(
            AuthorizationDetails(json!(["{not json"])).tillitsrammeverk(),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn duplicate_claims_are_refused() {
        let text = r#"{"iss":"a","iss":"b","aud":"pil","exp":1}"#;
        assert!(serde_json::from_str::<AccessTokenClaims>(text).is_err());
        let text = r#"{"iss":"a","aud":"pil","exp":1,"helseid://claims/client/claims/orgnr_parent":"1","helseid://claims/client/claims/orgnr_parent":"2"}"#;
        assert!(serde_json::from_str::<AccessTokenClaims>(text).is_err());
    }

    #[test]
    fn duplicate_keys_inside_the_attest_are_refused() {
        let text = r#"{"iss":"a","aud":"pil","exp":1,"authorization_details":[{"type":"nhn:tillitsrammeverk:parameters","care_relationship":{"purpose_of_use":{"code":"TREAT","code":"ETREAT","system":"x"}}}]}"#;
        let err = serde_json::from_str::<AccessTokenClaims>(text).unwrap_err();
        assert!(err.to_string().contains("duplicate key"), "{err}");
        // Also in the JSON-in-a-string form.
        let inner = r#"{"type":"nhn:tillitsrammeverk:parameters","type":"other"}"#;
        let details = AuthorizationDetails(Value::Array(vec![Value::String(inner.into())]));
        assert!(matches!(
            details.tillitsrammeverk(),
            Err(AttestError::Malformed(_))
        ));
        assert!(parse_strict_json(br#"{"a":[{"b":1,"b":2}]}"#).is_err());
        assert_eq!(
            parse_strict_json(br#"{"a":[{"b":1.5,"c":null,"d":true}]}"#).unwrap(),
            json!({"a":[{"b":1.5,"c":null,"d":true}]})
        );
    }

    #[test]
    fn bad_numeric_dates_are_refused() {
        for exp in [
            json!("tomorrow"),
            json!(f64::MAX),
            json!(u64::MAX),
            json!(null),
        ] {
            let token = json!({"iss":"a","aud":"pil","exp": exp});
            assert!(serde_json::from_value::<AccessTokenClaims>(token).is_err());
        }
    }

    #[test]
    fn round_trips_through_serde() {
        let claims: AccessTokenClaims = serde_json::from_value(helseid_like_token()).unwrap();
        let again: AccessTokenClaims =
            serde_json::from_value(serde_json::to_value(&claims).unwrap()).unwrap();
        assert_eq!(claims, again);
    }

    #[test]
    fn oid_normalization() {
        assert_eq!(
            normalize_oid_system("2.16.840.1.113883.1.11.20448"),
            PURPOSE_OF_USE_SYSTEM
        );
        assert_eq!(
            normalize_oid_system(PURPOSE_OF_USE_SYSTEM),
            PURPOSE_OF_USE_SYSTEM
        );
        assert_eq!(
            normalize_oid_system("http://terminology.hl7.org/ValueSet/v3-PurposeOfUse"),
            "http://terminology.hl7.org/ValueSet/v3-PurposeOfUse"
        );
    }
}
