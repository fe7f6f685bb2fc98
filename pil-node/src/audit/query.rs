//! Searching the audit log: which records match an auditor's filter, newest first,
//! read from the store in chunks and bounded per call. No wire types here; the audit
//! service turns requests into a [`Filter`] and pages into answers.

use super::{AuditRecord, record::Action};
use crate::store::{Store, StoreError};

/// Records read per storage call while scanning.
const SCAN_CHUNK: usize = 1000;
/// Records one search call scans at most before returning a page token.
const MAX_SCAN: usize = 200_000;

/// A parsed search filter.
#[derive(Clone, Default)]
pub struct Filter {
    /// The patient's pseudonyms (hex) under every key of the ring: records made under
    /// an earlier key are theirs too. Empty: any patient.
    pub patients: Vec<String>,
    pub hpr: Option<String>,
    pub organization: Option<String>,
    pub purpose: Option<String>,
    pub decision: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub actions: Vec<String>,
    pub emergency_only: bool,
    /// Only what showed someone the patient's pointers: lookups, subscriptions and
    /// delivered events (patient reports).
    pub lookups_only: bool,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        let req = r.requester.as_ref();
        (self.patients.is_empty()
            || r.patient
                .as_ref()
                .is_some_and(|p| self.patients.contains(p)))
            && self
                .hpr
                .as_ref()
                .is_none_or(|h| req.and_then(|q| q.hpr_number.as_ref()) == Some(h))
            && self.organization.as_ref().is_none_or(|o| {
                r.caller.organization.as_ref() == Some(o)
                    || req.is_some_and(|q| {
                        &q.organization == o || q.child_organization.as_ref() == Some(o)
                    })
            })
            && self
                .purpose
                .as_ref()
                .is_none_or(|p| req.is_some_and(|q| q.purpose_of_use.code.eq_ignore_ascii_case(p)))
            && self
                .decision
                .as_ref()
                .is_none_or(|d| &r.decision.outcome == d)
            && self
                .from
                .as_ref()
                .is_none_or(|f| r.time.as_str() >= f.as_str())
            && self
                .to
                .as_ref()
                .is_none_or(|t| r.time.as_str() < t.as_str())
            && (self.actions.is_empty() || self.actions.iter().any(|a| action_name(r.action) == *a))
            && (!self.emergency_only || r.decision.emergency)
            && (!self.lookups_only
                || matches!(
                    r.action,
                    Action::Lookup
                        | Action::FederatedLookup
                        | Action::Subscribe
                        | Action::EventDelivery
                ))
    }
}

fn action_name(a: Action) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn parse_record(bytes: &[u8]) -> Option<AuditRecord> {
    serde_json::from_slice(bytes).ok()
}

/// Newest-first matching records before index `before`, at most `limit`; returns
/// them and where to continue.
pub async fn search(
    store: &dyn Store,
    filter: &Filter,
    before: u64,
    limit: usize,
) -> Result<(Vec<Vec<u8>>, Option<u64>), StoreError> {
    let pseudonyms: Vec<[u8; 16]> = filter
        .patients
        .iter()
        .filter_map(|p| hex::decode(p).ok())
        .filter_map(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
        .collect();
    let mut out = Vec::new();
    let mut cursor = before;
    let mut scanned = 0usize;
    loop {
        let chunk: Vec<(u64, Vec<u8>)> = match pseudonyms.as_slice() {
            [] => store.audit_records(cursor, false, SCAN_CHUNK).await?,
            ps => {
                // The newest of the union are among the newest of each.
                let mut indexes = Vec::new();
                for p in ps {
                    indexes.extend(store.audit_patient_indexes(*p, cursor, SCAN_CHUNK).await?);
                }
                indexes.sort_unstable_by(|a, b| b.cmp(a));
                indexes.dedup();
                indexes.truncate(SCAN_CHUNK);
                let mut chunk = Vec::with_capacity(indexes.len());
                for i in indexes {
                    if let Some(b) = store.audit_record(i).await? {
                        chunk.push((i, b));
                    }
                }
                chunk
            }
        };
        if chunk.is_empty() {
            return Ok((out, None));
        }
        for (index, bytes) in chunk {
            cursor = index;
            scanned += 1;
            if parse_record(&bytes).is_some_and(|r| filter.matches(&r)) {
                out.push(bytes);
                if out.len() >= limit {
                    return Ok((out, (index > 0).then_some(index)));
                }
            }
        }
        if cursor == 0 {
            return Ok((out, None));
        }
        if scanned >= MAX_SCAN {
            return Ok((out, Some(cursor)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{audit::record::CallerInfo, store::tests::on_every_engine};

    fn lookup(patient: &str, outcome: &str, emergency: bool) -> AuditRecord {
        let mut r = AuditRecord::new("test", Action::Lookup, CallerInfo::default());
        r.patient = Some(patient.to_string());
        r.decision.outcome = outcome.into();
        r.decision.emergency = emergency;
        r
    }

    /// Newest first, only what matches, a patient's records found through the
    /// patient index, and pages that continue where the last one ended.
    #[tokio::test]
    async fn searches_page_through_matching_records_newest_first() {
        on_every_engine(async |store| {
            let (a, b) = ("aa".repeat(16), "bb".repeat(16));
            for i in 0..30u64 {
                let patient = if i % 2 == 0 { &a } else { &b };
                let outcome = if i % 3 == 0 { "denied" } else { "allowed" };
                store
                    .audit_append(Box::new(lookup(patient, outcome, i == 7)))
                    .await
                    .unwrap();
            }
            let index_of = |bytes: &Vec<u8>| parse_record(bytes).unwrap().index;
            let of_a = Filter {
                patients: vec![a.clone()],
                ..Filter::default()
            };
            let (page, next) = search(&*store, &of_a, u64::MAX, 4).await.unwrap();
            assert_eq!(
                page.iter().map(index_of).collect::<Vec<_>>(),
                [28, 26, 24, 22]
            );
            let (rest, end) = search(&*store, &of_a, next.unwrap(), 100).await.unwrap();
            assert_eq!(rest.len(), 11);
            assert_eq!(end, None);

            let denied_b = Filter {
                patients: vec![b.clone()],
                decision: Some("denied".into()),
                ..Filter::default()
            };
            let (page, _) = search(&*store, &denied_b, u64::MAX, 100).await.unwrap();
            assert_eq!(
                page.iter().map(index_of).collect::<Vec<_>>(),
                [27, 21, 15, 9, 3]
            );

            let emergencies = Filter {
                emergency_only: true,
                ..Filter::default()
            };
            let (page, _) = search(&*store, &emergencies, u64::MAX, 100).await.unwrap();
            assert_eq!(page.iter().map(index_of).collect::<Vec<_>>(), [7]);
        })
        .await;
    }
}
