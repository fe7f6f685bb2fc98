//! Witnessing in RocksDB: the meta family holds, per witnessed log, the checkpoint this
//! node last cosigned (`witnessed/<origin>`: size, root, timestamp, the note), and
//! cosignatures collected for this node's own heads are added to `audit_heads`. Both
//! read-modify-writes happen under `Db::witness_turn`, with synced writes.

use pil_transparency::witness::Witnessed;
use rocksdb::WriteBatch;

use super::db::{CF_AUDIT_HEADS, CF_META, Db, DbError, be_u64, corrupt};
use crate::store::{StoreError, merge_cosignatures};

fn key(origin: &str) -> Vec<u8> {
    [b"witnessed/".as_slice(), origin.as_bytes()].concat()
}

impl Db {
    pub fn witnessed(&self, origin: &str) -> Result<Option<Witnessed>, DbError> {
        let Some(v) = self.db.get_cf(self.cf(CF_META), key(origin))? else {
            return Ok(None);
        };
        let bad = || corrupt(CF_META, "witnessed checkpoint");
        if v.len() < 48 {
            return Err(bad());
        }
        Ok(Some(Witnessed {
            size: be_u64(&v[..8], CF_META)?,
            root: v[8..40].try_into().map_err(|_| bad())?,
            timestamp_ms: be_u64(&v[40..48], CF_META)?,
            checkpoint: String::from_utf8(v[48..].to_vec()).map_err(|_| bad())?,
        }))
    }

    pub fn witness_advance(
        &self,
        origin: &str,
        old: u64,
        new: &Witnessed,
    ) -> Result<Result<(), u64>, DbError> {
        let _turn = self.witness_turn.lock().unwrap_or_else(|e| e.into_inner());
        let stored = self.witnessed(origin)?.map_or(0, |w| w.size);
        if stored != old || new.size < old {
            return Ok(Err(stored));
        }
        let value = [
            new.size.to_be_bytes().as_slice(),
            &new.root,
            &new.timestamp_ms.to_be_bytes(),
            new.checkpoint.as_bytes(),
        ]
        .concat();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), key(origin), value);
        self.write_synced(batch)?;
        Ok(Ok(()))
    }

    pub fn add_cosignatures(&self, size: u64, lines: &str) -> Result<(), StoreError> {
        let _turn = self.witness_turn.lock().unwrap_or_else(|e| e.into_inner());
        let heads = self.cf(CF_AUDIT_HEADS);
        let Some(note) = self
            .db
            .get_cf(heads, size.to_be_bytes())
            .map_err(DbError::from)?
        else {
            return Err(StoreError::Tree(format!("no signed head of size {size}")));
        };
        let note = String::from_utf8(note).map_err(|_| corrupt(CF_AUDIT_HEADS, "utf-8"))?;
        let merged = merge_cosignatures(&note, lines)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(heads, size.to_be_bytes(), merged.as_bytes());
        Ok(self.write_synced(batch)?)
    }
}
