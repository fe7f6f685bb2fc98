//! Retention: the contents of records older than the legal configuration's
//! `audit_log_days` are removed; their leaf hashes stay, so the tree, the signed heads
//! and every proof over what remains still verify.

use std::time::{Duration, SystemTime};

use super::AuditError;
use crate::{patient_keys::PSEUDONYM_LEN, store::Store};

const PAGE: usize = 1000;

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
                let record: serde_json::Value = serde_json::from_slice(bytes)
                    .map_err(|e| AuditError::Tree(format!("record {index}: {e}")))?;
                let at = record["time"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .ok_or_else(|| AuditError::Tree(format!("record {index}: no valid time")))?;
                if at >= cutoff {
                    break 'scan;
                }
                if let Some(p) = record["patient"]
                    .as_str()
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|b| <[u8; PSEUDONYM_LEN]>::try_from(b.as_slice()).ok())
                {
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
