//! One region as the console reads it: the node (through the audit API), the node's
//! public key, and the head of its log the console saw last.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use pil_proto::v1;
use pil_transparency::{HeadVerifier, SignedTreeHead};

use super::RegionSetup;
use crate::{
    audit_record::Record,
    audit_verify::{self, ProofCheckError},
    client::PilClient,
    error::ClientError,
};

/// At most this many records are read for the charts, flags and follow-up lists.
pub const MAX_RECORDS: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot load the public key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("cannot reach the node at {address}: {source}")]
    Connect {
        address: String,
        source: ClientError,
    },
    #[error("the node at {address} has no signed tree head that verifies: {message}")]
    Head { address: String, message: String },
}

pub struct Region {
    /// The region's id, from its log's origin (`pil-audit/<region>`).
    pub name: String,
    pub client: PilClient,
    key: HeadVerifier,
    /// The note of the last head proven consistent, kept between runs.
    state_file: PathBuf,
}

/// Whether a record is proven to be in the signed log.
#[derive(Debug, Clone)]
pub enum Proof {
    Verified {
        tree_size: u64,
        root: String,
        signed_at: String,
    },
    Failed(String),
}

impl Proof {
    pub fn is_verified(&self) -> bool {
        matches!(self, Proof::Verified { .. })
    }
}

/// A record as the node answered a proof request, and what the proof showed.
pub struct Proven {
    /// The record's JSON as the node sent it; empty when retention removed it.
    pub bytes: Vec<u8>,
    pub proof: Proof,
}

/// What the log's signed heads show now.
pub struct LogState {
    pub head: Result<HeadView, String>,
    /// The head seen last time, when there is one.
    pub last_seen: Option<HeadView>,
    pub consistency: Consistency,
    pub heads_signed: usize,
}

pub struct HeadView {
    pub size: u64,
    pub root: String,
    pub signed_at: String,
    pub note: String,
}

pub enum Consistency {
    /// No earlier head was kept: this one is kept from now on.
    FirstSeen,
    Consistent,
    /// The log does not extend the head seen last time: records were changed or
    /// removed, or the log was rebuilt.
    Broken(String),
    Unknown(String),
}

fn view(head: &SignedTreeHead, note: &str) -> HeadView {
    HeadView {
        size: head.head.size,
        root: hex::encode(head.head.root),
        signed_at: millis_rfc3339(head.head.timestamp_ms),
        note: note.to_string(),
    }
}

pub fn millis_rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

impl Region {
    pub async fn connect(setup: &RegionSetup, state_dir: &Path) -> Result<Self, RegionError> {
        let key = HeadVerifier::load(&setup.public_key).map_err(|e| RegionError::Key {
            path: setup.public_key.clone(),
            message: e.to_string(),
        })?;
        let address = setup.profile.address.clone();
        let client =
            PilClient::connect(&setup.profile)
                .await
                .map_err(|source| RegionError::Connect {
                    address: address.clone(),
                    source,
                })?;
        let head = match client.audit_tree_head(false).await {
            Ok(head) => head,
            // A new node may not have signed yet.
            Err(_) => {
                client
                    .audit_tree_head(true)
                    .await
                    .map_err(|source| RegionError::Connect {
                        address: address.clone(),
                        source,
                    })?
            }
        };
        let signed = audit_verify::check_head(&head.note, &key).map_err(|e| RegionError::Head {
            address: address.clone(),
            message: e.to_string(),
        })?;
        let origin = signed.head.origin;
        let name = origin
            .strip_prefix("pil-audit/")
            .unwrap_or(&origin)
            .to_string();
        let state_file = state_dir.join(format!("{}.head", file_safe(&name)));
        Ok(Self {
            name,
            client,
            key,
            state_file,
        })
    }

    /// The newest head, verified; with `covering`, signed now when the newest does not
    /// yet cover that index.
    async fn head(&self, covering: Option<u64>) -> Result<SignedTreeHead, String> {
        let newest = self
            .client
            .audit_tree_head(false)
            .await
            .map_err(|e| e.to_string())?;
        let mut head = audit_verify::check_head(&newest.note, &self.key).map_err(message)?;
        if covering.is_some_and(|i| i >= head.head.size) {
            let fresh = self
                .client
                .audit_tree_head(true)
                .await
                .map_err(|e| e.to_string())?;
            head = audit_verify::check_head(&fresh.note, &self.key).map_err(message)?;
        }
        Ok(head)
    }

    /// Record `index` with its inclusion proof checked against a signed head.
    pub async fn prove(&self, index: u64) -> Result<Proven, ClientError> {
        let head = match self.head(Some(index)).await {
            Ok(head) => head,
            Err(m) => {
                return Ok(Proven {
                    bytes: Vec::new(),
                    proof: Proof::Failed(m),
                });
            }
        };
        let size = head.head.size;
        if index >= size {
            return Ok(Proven {
                bytes: Vec::new(),
                proof: Proof::Failed(format!(
                    "record {index} is not in the log, whose newest signed head covers {size} records"
                )),
            });
        }
        let answer = self.client.audit_inclusion_proof(index, size).await?;
        let proof = match audit_verify::check_inclusion(&head, index, &answer) {
            Ok(()) => Proof::Verified {
                tree_size: size,
                root: hex::encode(head.head.root),
                signed_at: millis_rfc3339(head.head.timestamp_ms),
            },
            Err(e) => Proof::Failed(message(e)),
        };
        Ok(Proven {
            bytes: answer.record,
            proof,
        })
    }

    /// The newest head against the one seen last time; a consistent newer head is
    /// kept as the one seen.
    pub async fn log_state(&self) -> LogState {
        let last_seen = std::fs::read_to_string(&self.state_file)
            .ok()
            .map(|note| (audit_verify::check_head(&note, &self.key), note));
        let heads_signed = self
            .client
            .audit_tree_heads()
            .await
            .map(|h| h.len())
            .unwrap_or(0);
        let head = match self.client.audit_tree_head(false).await {
            Ok(h) => audit_verify::check_head(&h.note, &self.key)
                .map(|s| (s, h.note))
                .map_err(message),
            Err(e) => Err(e.to_string()),
        };
        let consistency = match (&head, &last_seen) {
            (Err(e), _) => Consistency::Unknown(e.clone()),
            (Ok(_), Some((Err(e), _))) => Consistency::Broken(format!(
                "the head kept from last time does not verify: {}",
                message(e.clone())
            )),
            (Ok((_, note)), None) => match self.keep(note) {
                Ok(()) => Consistency::FirstSeen,
                Err(e) => Consistency::Unknown(e),
            },
            (Ok((new_head, note)), Some((Ok(old), _))) => {
                match self.consistent(old, new_head).await {
                    Ok(()) => match self.keep(note) {
                        Ok(()) => Consistency::Consistent,
                        Err(e) => Consistency::Unknown(e),
                    },
                    Err(e) => Consistency::Broken(e),
                }
            }
        };
        LogState {
            head: head.as_ref().map(|(s, n)| view(s, n)).map_err(Clone::clone),
            last_seen: last_seen.and_then(|(h, n)| h.ok().map(|h| view(&h, &n))),
            consistency,
            heads_signed,
        }
    }

    async fn consistent(&self, old: &SignedTreeHead, new: &SignedTreeHead) -> Result<(), String> {
        let proof = if old.head.size < new.head.size {
            self.client
                .audit_consistency_proof(old.head.size, new.head.size)
                .await
                .map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        audit_verify::check_consistency(old, new, &proof).map_err(message)
    }

    fn keep(&self, note: &str) -> Result<(), String> {
        std::fs::write(&self.state_file, note)
            .map_err(|e| format!("cannot keep the head in {}: {e}", self.state_file.display()))
    }

    /// Lookups (a client's and forwarded ones) of the last `days`, newest last, at
    /// most [`MAX_RECORDS`]; the flag says whether more were left out.
    pub async fn lookups(&self, days: u32) -> Result<(Vec<Record>, bool), ClientError> {
        let from = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
        let filter = v1::AuditFilter {
            actions: vec!["lookup".into(), "federated_lookup".into()],
            from: Some(prost_types::Timestamp::from(from)),
            ..Default::default()
        };
        let mut lines = self
            .client
            .audit_export(v1::ExportAuditRequest {
                filter: Some(filter),
                format: v1::AuditExportFormat::JsonLines as i32,
            })
            .await?;
        let mut out = Vec::new();
        let mut more = false;
        while let Some(line) = lines.next().await {
            let line = line?;
            if out.len() == MAX_RECORDS {
                more = true;
                break;
            }
            if let Ok(r) = Record::parse(&line) {
                out.push(r);
            }
        }
        Ok((out, more))
    }

    /// One page of a search, newest first.
    pub async fn search(
        &self,
        filter: v1::AuditFilter,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<Record>, String), ClientError> {
        let resp = self
            .client
            .audit_search(v1::SearchAuditRequest {
                filter: Some(filter),
                page_size,
                page_token,
            })
            .await?;
        let records = resp
            .records
            .iter()
            .filter_map(|r| Record::parse(r).ok())
            .collect();
        Ok((records, resp.next_page_token))
    }

    /// Every review in the log, by the index of the record reviewed.
    pub async fn reviews(&self) -> Result<BTreeMap<u64, Vec<Record>>, ClientError> {
        let filter = v1::AuditFilter {
            actions: vec!["audit_review".into()],
            ..Default::default()
        };
        let mut out: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let (records, next) = self.search(filter.clone(), 1000, token).await?;
            seen += records.len();
            for r in records {
                if let Some(i) = r.reviewed {
                    out.entry(i).or_default().push(r);
                }
            }
            if next.is_empty() || seen >= MAX_RECORDS {
                return Ok(out);
            }
            token = next;
        }
    }
}

fn message(e: ProofCheckError) -> String {
    e.to_string()
}

/// A region id as a file name.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
