//! The pointer record as the node understands it: validated input from the wire, and
//! the conversion back. Everything that enters the registry passes through here, so an
//! invalid pointer never reaches storage.

use pil_proto::{
    categories,
    ident::{OrgNumber, PatientId},
    v1,
};

/// Longest accepted endpoint URL, in bytes.
pub const MAX_URL_LEN: usize = 512;
/// Longest accepted organization display name, in characters.
pub const MAX_NAME_LEN: usize = 200;

/// Earliest and latest instants accepted in timestamps (1900-01-01 and 2200-01-01), so
/// nanosecond arithmetic cannot overflow and typos like year 20245 are caught.
const MIN_SECONDS: i64 = -2_208_988_800;
const MAX_SECONDS: i64 = 7_258_118_400;

/// A field that failed validation, with a message a person can act on. Never contains
/// a patient identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Which endpoint of which organization a pointer is about; with the patient, this is a
/// pointer's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointRef {
    pub org: OrgNumber,
    pub sub_unit: Option<OrgNumber>,
    pub base_url: String,
    pub api_kind: i32,
}

/// A validated pointer, ready to be stored. Times are nanoseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPointer {
    pub patient: PatientId,
    pub endpoint: EndpointRef,
    pub holder_name: String,
    /// Sorted and de-duplicated.
    pub categories: Vec<String>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    /// `None`: keep the stored value, or use the time of the write for a new pointer.
    pub last_updated: Option<i64>,
    pub expires_at: Option<i64>,
}

/// Validates a patient identifier from the wire.
pub fn patient(
    p: Option<&v1::PatientIdentifier>,
    allow_synthetic: bool,
) -> Result<PatientId, FieldError> {
    let p = p.ok_or_else(|| FieldError::new("patient", "is required"))?;
    untrimmed("patient.system", &p.system)?;
    untrimmed("patient.value", &p.value)?;
    PatientId::parse(&p.system, &p.value, allow_synthetic)
        .map_err(|e| FieldError::new("patient", e.to_string()))
}

/// Validates an organization number field.
pub fn org_number(field: &'static str, value: &str) -> Result<OrgNumber, FieldError> {
    untrimmed(field, value)?;
    OrgNumber::parse(value).map_err(|e| FieldError::new(field, e.to_string()))
}

/// Refuses an identifier with whitespace around it: the contract says "exactly", and a
/// node that trimmed would accept what another implementation refuses.
pub fn untrimmed(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.trim() != value {
        return Err(FieldError::new(
            field,
            "has whitespace around it; send the identifier alone, with no spaces, tabs or \
             line breaks",
        ));
    }
    Ok(())
}

/// Validates the identity fields shared by writes and deletes.
pub fn endpoint_ref(
    holder: Option<&v1::Organization>,
    endpoint: Option<&v1::Endpoint>,
) -> Result<EndpointRef, FieldError> {
    let holder = holder.ok_or_else(|| FieldError::new("holder", "is required"))?;
    let org = org_number("holder.organization_number", &holder.organization_number)?;
    let sub_unit = match holder.sub_unit_organization_number.as_str() {
        "" => None,
        s => Some(org_number("holder.sub_unit_organization_number", s)?),
    };
    let endpoint = endpoint.ok_or_else(|| FieldError::new("endpoint", "is required"))?;
    let base_url = endpoint_url(&endpoint.base_url)?;
    let api_kind = match v1::ApiKind::try_from(endpoint.api_kind) {
        Ok(v1::ApiKind::Unspecified) | Err(_) => {
            return Err(FieldError::new(
                "endpoint.api_kind",
                "must be one of FHIR_R4, FHIR_R5, IHE_XDS, OPENEHR, OTHER",
            ));
        }
        Ok(k) => k as i32,
    };
    Ok(EndpointRef {
        org,
        sub_unit,
        base_url,
        api_kind,
    })
}

fn endpoint_url(raw: &str) -> Result<String, FieldError> {
    const FIELD: &str = "endpoint.base_url";
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(FieldError::new(FIELD, "is required"));
    }
    if raw.len() > MAX_URL_LEN {
        return Err(FieldError::new(
            FIELD,
            format!("is longer than {MAX_URL_LEN} bytes"),
        ));
    }
    let url = url::Url::parse(raw)
        .map_err(|e| FieldError::new(FIELD, format!("is not a valid URL ({e})")))?;
    if url.scheme() != "https" {
        return Err(FieldError::new(FIELD, "must use https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(FIELD, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(FIELD, "must not contain credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(
            FIELD,
            "must be a base URL without query or fragment",
        ));
    }
    // The normalized form, so trivially different spellings are one endpoint.
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Validates a timestamp and converts it to nanoseconds since the epoch.
pub fn timestamp(
    field: &'static str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<i64>, FieldError> {
    let Some(t) = t else { return Ok(None) };
    if !(MIN_SECONDS..MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(FieldError::new(
            field,
            "must be a valid time between 1900 and 2200",
        ));
    }
    Ok(Some(t.seconds * 1_000_000_000 + i64::from(t.nanos)))
}

/// Converts nanoseconds since the epoch back to a protobuf timestamp.
pub fn to_timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// Nanoseconds since the epoch as RFC 3339, for messages and records.
pub fn rfc3339(nanos: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Validates category codes; returns them sorted and de-duplicated.
pub fn category_list(
    field: &'static str,
    codes: &[String],
    required: bool,
) -> Result<Vec<String>, FieldError> {
    if required && codes.is_empty() {
        return Err(FieldError::new(field, "at least one category is required"));
    }
    if codes.len() > categories::MAX_CATEGORIES_PER_POINTER {
        return Err(FieldError::new(
            field,
            format!(
                "at most {} categories are allowed",
                categories::MAX_CATEGORIES_PER_POINTER
            ),
        ));
    }
    let mut out = Vec::with_capacity(codes.len());
    for code in codes {
        let code = code.trim();
        if !categories::is_known(code) {
            let shown: String = code.chars().take(categories::MAX_CATEGORY_LEN).collect();
            return Err(FieldError::new(
                field,
                format!("unknown category {shown:?} (see the category list in the docs)"),
            ));
        }
        out.push(code.to_string());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl NewPointer {
    /// Validates a pointer from the wire. `region` and `pointer_id` are ignored.
    pub fn from_wire(p: &v1::Pointer, allow_synthetic: bool) -> Result<Self, FieldError> {
        let patient = patient(p.patient.as_ref(), allow_synthetic)?;
        let endpoint = endpoint_ref(p.holder.as_ref(), p.endpoint.as_ref())?;
        let holder_name = p
            .holder
            .as_ref()
            .map(|h| h.name.trim().to_string())
            .unwrap_or_default();
        if holder_name.chars().count() > MAX_NAME_LEN {
            return Err(FieldError::new(
                "holder.name",
                format!("is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let categories = category_list("categories", &p.categories, true)?;
        let (period_start, period_end) = match &p.period {
            None => (None, None),
            Some(period) => (
                timestamp("period.start", period.start.as_ref())?,
                timestamp("period.end", period.end.as_ref())?,
            ),
        };
        if let (Some(s), Some(e)) = (period_start, period_end)
            && s > e
        {
            return Err(FieldError::new("period", "start is after end"));
        }
        Ok(Self {
            patient,
            endpoint,
            holder_name,
            categories,
            period_start,
            period_end,
            last_updated: timestamp("last_updated", p.last_updated.as_ref())?,
            expires_at: timestamp("expires_at", p.expires_at.as_ref())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::Pointer {
        v1::Pointer {
            patient: Some(v1::PatientIdentifier {
                system: pil_proto::ident::SYSTEM_FNR.into(),
                value: pil_proto::ident::synthetic_fnr(1),
            }),
            holder: Some(v1::Organization {
                organization_number: "974760673".into(),
                ..Default::default()
            }),
            endpoint: Some(v1::Endpoint {
                base_url: "https://fhir.example.no/r4/".into(),
                api_kind: v1::ApiKind::FhirR4 as i32,
            }),
            categories: vec![
                "medications".into(),
                "lab-results".into(),
                "medications".into(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn normalizes_url_and_categories() {
        let p = NewPointer::from_wire(&wire(), true).unwrap();
        assert_eq!(p.endpoint.base_url, "https://fhir.example.no/r4");
        assert_eq!(p.categories, ["lab-results", "medications"]);
    }

    #[test]
    fn rejects_bad_fields_with_their_names() {
        type Mutation = Box<dyn Fn(&mut v1::Pointer)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|p| p.endpoint.as_mut().unwrap().base_url = "http://x.no".into()),
                "endpoint.base_url",
            ),
            (
                Box::new(|p| p.endpoint.as_mut().unwrap().base_url = "not a url".into()),
                "endpoint.base_url",
            ),
            (
                Box::new(|p| p.endpoint.as_mut().unwrap().base_url = "https://u:p@x.no".into()),
                "endpoint.base_url",
            ),
            (
                Box::new(|p| p.endpoint.as_mut().unwrap().api_kind = 0),
                "endpoint.api_kind",
            ),
            (
                Box::new(|p| p.categories = vec!["gossip".into()]),
                "categories",
            ),
            (Box::new(|p| p.categories.clear()), "categories"),
            (
                Box::new(|p| p.holder.as_mut().unwrap().organization_number = "974760674".into()),
                "holder.organization_number",
            ),
            (
                Box::new(|p| p.patient.as_mut().unwrap().value = "1234567890".into()),
                "patient",
            ),
            (
                Box::new(|p| {
                    p.expires_at = Some(prost_types::Timestamp {
                        seconds: i64::MAX,
                        nanos: 0,
                    })
                }),
                "expires_at",
            ),
        ];
        for (mutate, field) in cases {
            let mut p = wire();
            mutate(&mut p);
            let err = NewPointer::from_wire(&p, true).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn synthetic_identifiers_need_a_test_node() {
        assert_eq!(
            NewPointer::from_wire(&wire(), false).unwrap_err().field,
            "patient"
        );
    }

    #[test]
    fn timestamps_round_trip() {
        for nanos in [0, -1, 1_700_000_000_123_456_789, -2_000_000_000_000_000_001] {
            let t = to_timestamp(nanos);
            assert_eq!(timestamp("t", Some(&t)).unwrap(), Some(nanos));
        }
    }
}
