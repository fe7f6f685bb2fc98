//! The RocksDB layout of the journal of changes (`events::journal_for`).
//!
//! | family               | key                                      | value          |
//! |----------------------|------------------------------------------|----------------|
//! | `journal`            | written at (8, BE) · number in group (4)  | [`StoredEvent`] |
//! | `journal_by_patient` | patient pseudonym · written at · number  | empty          |
//! | `meta`               | `journal_from`                           | unix ns (8, BE) |
//!
//! Time first, so that dropping the oldest reads only what it drops; by patient, so
//! that a late registration reads only its patients. Each group's entries share one
//! time, later than every earlier group's (under the writer's lock).

use prost::Message;
use rocksdb::{IteratorMode, WriteBatch};

use super::{
    db::{CF_JOURNAL, CF_JOURNAL_BY_PATIENT, CF_META, Db, DbError, corrupt},
    events::FollowState,
};
use crate::{
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    store::{
        Change,
        events::{self, Journal, StoredEvent},
    },
};

const JOURNAL_FROM: &[u8] = b"journal_from";
const ENTRY_KEY_LEN: usize = 12;

fn entry_key(at: i64, n: u32) -> [u8; ENTRY_KEY_LEN] {
    let mut k = [0u8; ENTRY_KEY_LEN];
    k[..8].copy_from_slice(&(at.max(0) as u64).to_be_bytes());
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

fn entry_at(key: &[u8]) -> Result<i64, DbError> {
    key.get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(|b| u64::from_be_bytes(b) as i64)
        .ok_or_else(|| corrupt(CF_JOURNAL, "bad key"))
}

impl Db {
    /// At open: the journal is complete from now when it was never kept here, and
    /// the writer's next time is after the newest entry.
    pub(super) fn open_journal(&self, state: &mut FollowState) -> Result<(), DbError> {
        if self.db.get_cf(self.cf(CF_META), JOURNAL_FROM)?.is_none() {
            let now = crate::store::now_nanos();
            self.db
                .put_cf(self.cf(CF_META), JOURNAL_FROM, now.to_be_bytes())?;
        }
        if let Some(item) = self
            .db
            .iterator_cf(self.cf(CF_JOURNAL), IteratorMode::End)
            .next()
        {
            state.journal_at = entry_at(&item?.0)?;
        }
        Ok(())
    }

    /// Adds the journal entries `changes` make to `batch`, at `now` (later than the
    /// group before).
    pub(super) fn add_journal(
        &self,
        state: &mut FollowState,
        changes: &[Change],
        now: i64,
        batch: &mut WriteBatch,
    ) {
        let entries = events::journal_for(changes, now);
        if entries.is_empty() {
            return;
        }
        let at = now;
        state.journal_at = at;
        let (journal, by_patient) = (self.cf(CF_JOURNAL), self.cf(CF_JOURNAL_BY_PATIENT));
        for (n, event) in entries.iter().enumerate() {
            let key = entry_key(at, n as u32);
            batch.put_cf(journal, key, event.encode_to_vec());
            if let Some(patient) = event.patient() {
                batch.put_cf(by_patient, [patient.as_slice(), &key].concat(), []);
            }
        }
    }

    fn journal_from(&self) -> Result<i64, DbError> {
        match self.db.get_cf(self.cf(CF_META), JOURNAL_FROM)? {
            None => Ok(0),
            Some(v) => Ok(i64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| corrupt(CF_META, "journal_from"))?,
            )),
        }
    }

    pub fn journal(&self, patients: &[Pseudonym], since: i64) -> Result<Journal, DbError> {
        let complete_from = self.journal_from()?;
        let since = entry_key(since, 0);
        let mut keys = Vec::new();
        for patient in patients {
            let from = [patient.as_slice(), &since].concat();
            for item in self.prefix_iter(CF_JOURNAL_BY_PATIENT, patient, &from) {
                let (k, _) = item?;
                let key = k
                    .get(PSEUDONYM_LEN..)
                    .filter(|k| k.len() == ENTRY_KEY_LEN)
                    .ok_or_else(|| corrupt(CF_JOURNAL_BY_PATIENT, "bad key"))?;
                keys.push(key.to_vec());
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let cf = self.cf(CF_JOURNAL);
        let mut out = Vec::with_capacity(keys.len());
        for value in self.db.batched_multi_get_cf(cf, keys.iter(), false) {
            // An entry dropped between the two reads is older than asked for anyway.
            if let Some(v) = value? {
                out.push(
                    StoredEvent::decode(&*v).map_err(|e| corrupt(CF_JOURNAL, &e.to_string()))?,
                );
            }
        }
        Ok(Journal {
            events: out,
            complete_from,
        })
    }

    pub fn drop_journal(&self, before: i64, limit: usize) -> Result<usize, DbError> {
        let (journal, by_patient) = (self.cf(CF_JOURNAL), self.cf(CF_JOURNAL_BY_PATIENT));
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        let was = self.journal_from()?;
        let mut from = was;
        for item in self.db.iterator_cf(journal, IteratorMode::Start) {
            let (k, v) = item?;
            let at = entry_at(&k)?;
            if at >= before || dropped == limit {
                break;
            }
            let event =
                StoredEvent::decode(&*v).map_err(|e| corrupt(CF_JOURNAL, &e.to_string()))?;
            batch.delete_cf(journal, &k);
            if let Some(patient) = event.patient() {
                batch.delete_cf(by_patient, [patient.as_slice(), &k].concat());
            }
            from = from.max(at + 1);
            dropped += 1;
        }
        if dropped < limit {
            from = from.max(before);
        }
        if dropped == 0 && from == was {
            return Ok(0);
        }
        batch.put_cf(self.cf(CF_META), JOURNAL_FROM, from.to_be_bytes());
        self.write_synced(batch)?;
        Ok(dropped)
    }
}
