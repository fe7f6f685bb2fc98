//! Pointers as text: the NDJSON and CSV forms used by `pil sync`, `pil export` and
//! `--json` output. Times are RFC 3339; the API kind is its short name (`FHIR_R4`).
//!
//! CSV columns, with a header row: `patient_system, patient_value,
//! organization_number, sub_unit_organization_number, name, base_url, api_kind,
//! categories` (separated by `;`), `period_start, period_end, last_updated,
//! expires_at`. Empty cells are absent values.

use pil_proto::{ident, v1};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// A pointer in its JSON form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointerJson {
    pub patient: PatientJson,
    pub holder: HolderJson,
    pub endpoint: EndpointJson,
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<PeriodJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pointer_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientJson {
    pub system: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderJson {
    pub organization_number: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub_unit_organization_number: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointJson {
    pub base_url: String,
    pub api_kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// A record that could not be read, with its line (1-based).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RecordError {
    pub line: u64,
    pub message: String,
}

/// The short name of an API kind, e.g. `FHIR_R4`.
pub fn api_kind_name(kind: i32) -> String {
    v1::ApiKind::try_from(kind)
        .map(|k| k.as_str_name().trim_start_matches("API_KIND_").to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({kind})"))
}

fn parse_api_kind(name: &str) -> Result<i32, String> {
    let upper = name.trim().to_ascii_uppercase().replace('-', "_");
    v1::ApiKind::from_str_name(&format!("API_KIND_{upper}"))
        .or_else(|| v1::ApiKind::from_str_name(&upper))
        .filter(|k| *k != v1::ApiKind::Unspecified)
        .map(|k| k as i32)
        .ok_or_else(|| {
            format!("unknown api_kind {name:?} (FHIR_R4, FHIR_R5, IHE_XDS, OPENEHR, OTHER)")
        })
}

/// Formats a timestamp as RFC 3339.
pub fn format_time(t: &prost_types::Timestamp) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
    )
    .ok()
    .and_then(|d| d.format(&Rfc3339).ok())
    .unwrap_or_else(|| format!("{}s", t.seconds))
}

/// Parses an RFC 3339 time (a bare date means midnight UTC).
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let s = s.trim();
    let with_time;
    let s = if s.len() == 10 {
        with_time = format!("{s}T00:00:00Z");
        &with_time
    } else {
        s
    };
    let d = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e})"))?;
    let n = d.unix_timestamp_nanos();
    Ok(prost_types::Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    })
}

fn opt_time(s: &Option<String>) -> Result<Option<prost_types::Timestamp>, String> {
    s.as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(parse_time)
        .transpose()
}

impl PointerJson {
    pub fn from_wire(p: &v1::Pointer) -> Self {
        let patient = p.patient.clone().unwrap_or_default();
        let holder = p.holder.clone().unwrap_or_default();
        let endpoint = p.endpoint.clone().unwrap_or_default();
        Self {
            patient: PatientJson {
                system: patient.system,
                value: patient.value,
            },
            holder: HolderJson {
                organization_number: holder.organization_number,
                sub_unit_organization_number: holder.sub_unit_organization_number,
                name: holder.name,
            },
            endpoint: EndpointJson {
                base_url: endpoint.base_url,
                api_kind: api_kind_name(endpoint.api_kind),
            },
            categories: p.categories.clone(),
            period: p.period.as_ref().map(|pd| PeriodJson {
                start: pd.start.as_ref().map(format_time),
                end: pd.end.as_ref().map(format_time),
            }),
            last_updated: p.last_updated.as_ref().map(format_time),
            expires_at: p.expires_at.as_ref().map(format_time),
            region: p.region.clone(),
            pointer_id: p.pointer_id.clone(),
        }
    }

    pub fn to_wire(&self) -> Result<v1::Pointer, String> {
        Ok(v1::Pointer {
            patient: Some(v1::PatientIdentifier {
                system: self.patient.system.clone(),
                value: self.patient.value.clone(),
            }),
            holder: Some(v1::Organization {
                organization_number: self.holder.organization_number.clone(),
                sub_unit_organization_number: self.holder.sub_unit_organization_number.clone(),
                name: self.holder.name.clone(),
            }),
            endpoint: Some(v1::Endpoint {
                base_url: self.endpoint.base_url.clone(),
                api_kind: parse_api_kind(&self.endpoint.api_kind)?,
            }),
            categories: self.categories.clone(),
            period: match &self.period {
                None => None,
                Some(p) => Some(v1::Period {
                    start: opt_time(&p.start)?,
                    end: opt_time(&p.end)?,
                }),
            },
            last_updated: opt_time(&self.last_updated)?,
            expires_at: opt_time(&self.expires_at)?,
            region: String::new(),
            pointer_id: String::new(),
        })
    }
}

/// Parses one NDJSON line.
pub fn parse_json_line(line: &str) -> Result<v1::Pointer, String> {
    let p: PointerJson = serde_json::from_str(line).map_err(|e| e.to_string())?;
    p.to_wire()
}

/// The CSV header row.
pub const CSV_HEADER: [&str; 12] = [
    "patient_system",
    "patient_value",
    "organization_number",
    "sub_unit_organization_number",
    "name",
    "base_url",
    "api_kind",
    "categories",
    "period_start",
    "period_end",
    "last_updated",
    "expires_at",
];

/// Parses one CSV record (after the header).
pub fn parse_csv_record(r: &csv::StringRecord) -> Result<v1::Pointer, String> {
    if r.len() != CSV_HEADER.len() {
        return Err(format!(
            "expected {} columns ({}), found {}",
            CSV_HEADER.len(),
            CSV_HEADER.join(","),
            r.len()
        ));
    }
    let cell = |i: usize| r.get(i).unwrap_or("").trim().to_string();
    let opt = |i: usize| Some(cell(i)).filter(|s| !s.is_empty());
    let period = (opt(8).is_some() || opt(9).is_some()).then(|| PeriodJson {
        start: opt(8),
        end: opt(9),
    });
    PointerJson {
        patient: PatientJson {
            system: cell(0),
            value: cell(1),
        },
        holder: HolderJson {
            organization_number: cell(2),
            sub_unit_organization_number: cell(3),
            name: cell(4),
        },
        endpoint: EndpointJson {
            base_url: cell(5),
            api_kind: cell(6),
        },
        categories: cell(7)
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        period,
        last_updated: opt(10),
        expires_at: opt(11),
        ..Default::default()
    }
    .to_wire()
}

fn detect_system(value: &str) -> &'static str {
    match value.trim().as_bytes().first() {
        Some(b'4'..=b'7') => ident::SYSTEM_DNR,
        Some(b'8' | b'9') => ident::SYSTEM_FHN,
        _ => ident::SYSTEM_FNR,
    }
}

/// A patient identifier as typed on the command line: its system is given, or
/// told by the first digit (D-nummer 4–7, felles hjelpenummer 8–9, else fødselsnummer).
pub fn patient(value: &str, system: Option<&str>) -> v1::PatientIdentifier {
    v1::PatientIdentifier {
        system: system.unwrap_or_else(|| detect_system(value)).to_string(),
        value: value.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let line = r#"{"patient":{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"13097248022"},"holder":{"organization_number":"974760673"},"endpoint":{"base_url":"https://x.no/fhir","api_kind":"FHIR_R4"},"categories":["medications"],"period":{"start":"2020-01-01T00:00:00Z"},"last_updated":"2024-05-01T12:00:00.5Z"}"#;
        let p = parse_json_line(line).unwrap();
        assert_eq!(
            p.endpoint.as_ref().unwrap().api_kind,
            v1::ApiKind::FhirR4 as i32
        );
        assert_eq!(p.last_updated.unwrap().nanos, 500_000_000);
        let back = PointerJson::from_wire(&p);
        assert_eq!(back.to_wire().unwrap(), p);
    }

    #[test]
    fn csv_record() {
        let r = csv::StringRecord::from(vec![
            "urn:oid:2.16.578.1.12.4.1.4.1",
            "13097248022",
            "974760673",
            "",
            "Reg",
            "https://x.no",
            "fhir_r4",
            "medications; lab-results",
            "2020-01-01",
            "",
            "",
            "",
        ]);
        let p = parse_csv_record(&r).unwrap();
        assert_eq!(p.categories, ["medications", "lab-results"]);
        assert_eq!(p.period.unwrap().start.unwrap().seconds, 1_577_836_800);
        assert!(parse_csv_record(&csv::StringRecord::from(vec!["a"])).is_err());
    }

    #[test]
    fn bad_kind_and_time_are_reported() {
        assert!(parse_api_kind("SOAP").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
