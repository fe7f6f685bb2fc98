//! Retention: the contents of records older than the legal configuration's
//! `audit_log_days` are removed; their leaf hashes stay, so the tree, the signed heads
//! and every proof over what remains still verify.

use std::time::{Duration, SystemTime};

use super::AuditError;
use crate::{patient_keys::PSEUDONYM_LEN, store::Store};

const PAGE: usize = 1000;

/// Whether the oldest record whose contents are kept is older than `keep` at `now`.
pub async fn due(store: &dyn Store, keep: Duration, now: SystemTime) -> Result<bool, AuditError> {
    let cutoff = time::OffsetDateTime::from(now - keep);
    let from = store.audit_retained_from().await?;
    let Some((index, bytes)) = store.audit_records(from, true, 1).await?.pop() else {
        return Ok(false);
    };
    Ok(parse(index, &bytes)?.0 < cutoff)
}

/// A record's time, and the patient it concerns.
fn parse(
    index: u64,
    bytes: &[u8],
) -> Result<(time::OffsetDateTime, Option<[u8; PSEUDONYM_LEN]>), AuditError> {
    let record: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AuditError::Tree(format!("record {index}: {e}")))?;
    let at = record["time"]
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .ok_or_else(|| AuditError::Tree(format!("record {index}: no valid time")))?;
    let patient = record["patient"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| <[u8; PSEUDONYM_LEN]>::try_from(b.as_slice()).ok());
    Ok((at, patient))
}

/// Drops the contents of records older than `keep` at `now`; returns how many.
pub async fn apply(store: &dyn Store, keep: Duration, now: SystemTime) -> Result<u64, AuditError> {
    let cutoff = time::OffsetDateTime::from(now - keep);
    {
        let from = store.audit_retained_from().await?;
        let mut upto = from;
        let mut patients = Vec::new();
        'scan: loop {
            let page = store.audit_records(upto, true, PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (index, bytes) in &page {
                let (at, patient) = parse(*index, bytes)?;
                if at >= cutoff {
                    break 'scan;
                }
                if let Some(p) = patient {
                    patients.push((*index, p));
                }
                upto = index + 1;
            }
        }
        if upto > from {
            store.audit_drop_contents(upto, patients).await?;
        }
        Ok(upto - from)
    }
}
