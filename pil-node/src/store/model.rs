//! What the store holds, in the registry's own terms: pointer keys and records,
//! protections, write operations and their outcomes, audit entries. No engine here.

use std::sync::Arc;

use prost::Message;

use crate::patient_keys::{PSEUDONYM_LEN, Pseudonym};

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Bytes of an organization number in keys.
pub const ORG_LEN: usize = 9;
/// Bytes of the endpoint identity hash in keys.
pub const IDENT_LEN: usize = 16;
/// Bytes of an encoded [`PointerKey`].
pub const KEY_LEN: usize = PSEUDONYM_LEN + ORG_LEN + IDENT_LEN;

/// Where one pointer lives: the patient's pseudonym, the holder's organization number
/// and a hash of the endpoint identity (sub-unit, base URL, API kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointerKey {
    pub patient: Pseudonym,
    pub org: [u8; ORG_LEN],
    pub ident: [u8; IDENT_LEN],
}

impl PointerKey {
    /// The key as one fixed-width byte string, whose byte order is key order.
    pub fn encode(&self) -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        k[..PSEUDONYM_LEN].copy_from_slice(&self.patient);
        k[PSEUDONYM_LEN..PSEUDONYM_LEN + ORG_LEN].copy_from_slice(&self.org);
        k[PSEUDONYM_LEN + ORG_LEN..].copy_from_slice(&self.ident);
        k
    }

    pub fn decode(k: &[u8]) -> Option<Self> {
        if k.len() != KEY_LEN {
            return None;
        }
        Some(Self {
            patient: k[..PSEUDONYM_LEN].try_into().ok()?,
            org: k[PSEUDONYM_LEN..PSEUDONYM_LEN + ORG_LEN].try_into().ok()?,
            ident: k[PSEUDONYM_LEN + ORG_LEN..].try_into().ok()?,
        })
    }
}

/// A stored pointer. The patient identifier is only here, sealed; the organization
/// number is in the key. Its protobuf encoding is the stored form.
#[derive(Clone, PartialEq, Message)]
pub struct StoredPointer {
    /// The identifier as storage format 1 sealed it (`PatientKeys::open_format1`);
    /// empty in pointers written since.
    #[prost(bytes = "vec", tag = "1")]
    pub sealed_patient_format1: Vec<u8>,
    #[prost(string, tag = "2")]
    pub sub_unit: String,
    #[prost(string, tag = "3")]
    pub base_url: String,
    #[prost(int32, tag = "4")]
    pub api_kind: i32,
    #[prost(string, repeated, tag = "5")]
    pub categories: Vec<String>,
    #[prost(int64, optional, tag = "6")]
    pub period_start: Option<i64>,
    #[prost(int64, optional, tag = "7")]
    pub period_end: Option<i64>,
    #[prost(int64, tag = "8")]
    pub last_updated: i64,
    #[prost(int64, optional, tag = "9")]
    pub expires_at: Option<i64>,
    #[prost(string, tag = "10")]
    pub holder_name: String,
    /// When the pointer lapses unless its holder refreshes it: receipt time plus the
    /// node's pointer lifetime. Moved forward by refreshes, not part of the content.
    #[prost(int64, optional, tag = "11")]
    pub lapses_at: Option<i64>,
    /// `PatientKeys::seal` of the identifier, for export.
    #[prost(bytes = "vec", tag = "12")]
    pub sealed_patient: Vec<u8>,
}

impl StoredPointer {
    /// Equal in everything a holder can change (how the identifier is sealed is not
    /// content: format 1 seals carry a random nonce).
    pub fn same_content(&self, other: &Self) -> bool {
        self.sub_unit == other.sub_unit
            && self.base_url == other.base_url
            && self.api_kind == other.api_kind
            && self.categories == other.categories
            && self.period_start == other.period_start
            && self.period_end == other.period_end
            && self.last_updated == other.last_updated
            && self.expires_at == other.expires_at
            && self.holder_name == other.holder_name
    }

    /// When the pointer stops being shown: its holder's expiry or its lapse, whichever
    /// comes first.
    pub fn effective_expiry(&self) -> Option<i64> {
        match (self.expires_at, self.lapses_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A patient's block (sperring).
#[derive(Clone, PartialEq, Message)]
pub struct StoredBlock {
    /// 1 = HPR number, 2 = profession code, 3 = organization number.
    #[prost(int32, tag = "1")]
    pub target_kind: i32,
    #[prost(string, tag = "2")]
    pub target: String,
    #[prost(string, tag = "3")]
    pub holder: String,
    #[prost(string, tag = "4")]
    pub reason: String,
    #[prost(int64, tag = "5")]
    pub created_at: i64,
    /// `PatientKeys::seal` of the identifier, so a pseudonym-key rotation can move the
    /// block; empty in blocks written before it was kept.
    #[prost(bytes = "vec", tag = "6")]
    pub sealed_patient: Vec<u8>,
}

/// A patient's opt-out (reservasjon).
#[derive(Clone, PartialEq, Message)]
pub struct StoredOptOut {
    #[prost(int64, tag = "1")]
    pub since: i64,
    #[prost(string, tag = "2")]
    pub reason: String,
    /// As [`StoredBlock::sealed_patient`].
    #[prost(bytes = "vec", tag = "3")]
    pub sealed_patient: Vec<u8>,
}

/// A patient as a pseudonym-key rotation finds it in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPatient {
    pub pseudonym: Pseudonym,
    /// The identifier as stored with any of the patient's entries, where one is.
    pub sealed: Option<Sealed>,
}

/// A sealed identifier and how it was sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// `PatientKeys::seal`.
    Current(Vec<u8>),
    /// Storage format 1 (`PatientKeys::open_format1`).
    Format1(Vec<u8>),
}

/// One patient moved from its pseudonym under an earlier key to its pseudonym under
/// the key in force, with the identifier sealed for the new pseudonym.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientMove {
    pub from: Pseudonym,
    pub to: Pseudonym,
    pub sealed: Vec<u8>,
}

/// What moving patients moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub pointers: u64,
    pub protections: u64,
}

impl Moved {
    pub fn add(&mut self, other: Moved) {
        self.pointers += other.pointers;
        self.protections += other.protections;
    }
}

impl StoredPointer {
    /// The pointer as it is stored under a patient's new pseudonym.
    pub fn resealed(&self, sealed: &[u8]) -> Self {
        Self {
            sealed_patient: sealed.to_vec(),
            sealed_patient_format1: Vec::new(),
            ..self.clone()
        }
    }

    /// The identifier this pointer carries, as it is sealed.
    pub fn sealed(&self) -> Option<Sealed> {
        if !self.sealed_patient.is_empty() {
            Some(Sealed::Current(self.sealed_patient.clone()))
        } else if !self.sealed_patient_format1.is_empty() {
            Some(Sealed::Format1(self.sealed_patient_format1.clone()))
        } else {
            None
        }
    }
}

/// The first `limit` distinct patients of several sources, each in pseudonym order;
/// where sources disagree about a sealed identifier, one that is present wins.
pub fn merge_patients(sources: Vec<Vec<StoredPatient>>, limit: usize) -> Vec<StoredPatient> {
    let mut all: std::collections::BTreeMap<Pseudonym, Option<Sealed>> = Default::default();
    for source in sources {
        for p in source {
            let slot = all.entry(p.pseudonym).or_default();
            if slot.is_none() {
                *slot = p.sealed;
            }
        }
    }
    all.into_iter()
        .take(limit)
        .map(|(pseudonym, sealed)| StoredPatient { pseudonym, sealed })
        .collect()
}

/// Everything a lookup reads about one patient, in one call: an engine answers it
/// with one read where it can.
#[derive(Debug, Clone, Default)]
pub struct PatientRecords {
    pub opt_out: Option<StoredOptOut>,
    /// Left empty when the patient has opted out.
    pub blocks: Vec<StoredBlock>,
    /// Every stored pointer, lapsed ones included; left empty when opted out.
    pub pointers: Vec<(PointerKey, StoredPointer)>,
}

/// One change a caller asks for.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "batches are almost all of the large variant; boxing it would add an allocation per pointer"
)]
pub enum Op {
    /// Insert or replace. When `keep_last_updated` is set the caller did not send a
    /// `last_updated`: an existing pointer keeps its own, a new one gets `value`'s.
    Upsert {
        key: PointerKey,
        value: StoredPointer,
        keep_last_updated: bool,
    },
    /// Remove if present.
    Delete { key: PointerKey },
    /// Remove if present and still expired at `now` (its expiry may have moved).
    Purge { key: PointerKey, now: i64 },
}

impl Op {
    pub fn key(&self) -> PointerKey {
        match self {
            Op::Upsert { key, .. } | Op::Delete { key } | Op::Purge { key, .. } => *key,
        }
    }
}

/// What an operation did, with the pointer as it is now stored.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    Inserted(Arc<StoredPointer>),
    Updated(Arc<StoredPointer>),
    Unchanged(Arc<StoredPointer>),
    Deleted,
    Absent,
}

/// One change in an atomic write, as planned from [`Op`]s.
#[derive(Debug, Clone)]
pub enum Change {
    /// Store `value` at `key`; `previous` is what was there (to keep indexes exact).
    Put {
        key: PointerKey,
        value: Arc<StoredPointer>,
        previous: Option<Arc<StoredPointer>>,
    },
    /// Remove `key`, whose current value is `previous`; `lapsed` when it is removed
    /// because it expired rather than by its holder.
    Delete {
        key: PointerKey,
        previous: Arc<StoredPointer>,
        lapsed: bool,
    },
}

impl Change {
    pub fn key(&self) -> &PointerKey {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }
}

/// A record for the audit log. Its index is assigned by the store as it appends, and
/// is part of the recorded bytes.
pub trait AuditEntry: Send {
    /// The record's exact bytes (the hash tree's leaf data) once it has `index`.
    fn encode_at(&mut self, index: u64) -> Result<Vec<u8>, super::StoreError>;
    /// The patient the record concerns, to find it by patient.
    fn patient(&self) -> Option<Pseudonym>;
}

/// Signs tree heads for the store as it appends: the store decides when a size is
/// new, the audit log what a signed head says.
pub trait HeadSigning: Send + Sync {
    /// The signed note for the tree of `size` leaves with `root`.
    fn sign(&self, size: u64, root: [u8; 32]) -> Result<String, super::StoreError>;
}

/// One entry of the log as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub index: u64,
    /// `None` once retention removed the contents.
    pub record: Option<Vec<u8>>,
    pub leaf_hash: [u8; 32],
}

/// Where the log stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSize {
    /// Records appended.
    pub size: u64,
    /// Records covered by the newest signed head.
    pub signed: u64,
}
