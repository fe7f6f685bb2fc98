//! Routing tokens in RocksDB: `routing_tokens` holds each token under its position
//! (big-endian, so iteration is position order), `routing_by_token` the position of
//! each token (so adding is idempotent), and the meta family the key they were made
//! under. Positions are given under `Db::routing_turn`.

use rocksdb::{IteratorMode, WriteBatch};

use super::db::{CF_META, CF_ROUTING_BY_TOKEN, CF_ROUTING_TOKENS, Db, DbError, be_u64, corrupt};
use crate::store::{StoreError, routing_key_matches};

const ROUTING_KEY_ID: &[u8] = b"routing_key_id";

impl Db {
    pub fn routing_key_id(&self) -> Result<Option<String>, DbError> {
        self.db
            .get_cf(self.cf(CF_META), ROUTING_KEY_ID)?
            .map(|v| String::from_utf8(v).map_err(|_| corrupt(CF_META, "routing key id")))
            .transpose()
    }

    pub fn set_routing_key(&self, key_id: &str, clear: bool) -> Result<(), DbError> {
        let _turn = self.routing_turn.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        if clear {
            batch.delete_range_cf(self.cf(CF_ROUTING_TOKENS), &[0u8; 8][..], &[0xffu8; 9][..]);
            batch.delete_range_cf(
                self.cf(CF_ROUTING_BY_TOKEN),
                &[0u8; 8][..],
                &[0xffu8; 9][..],
            );
        }
        batch.put_cf(self.cf(CF_META), ROUTING_KEY_ID, key_id.as_bytes());
        self.write_synced(batch)
    }

    pub fn add_routing_tokens(&self, key_id: &str, tokens: &[u64]) -> Result<(), StoreError> {
        let _turn = self.routing_turn.lock().unwrap_or_else(|e| e.into_inner());
        routing_key_matches(self.routing_key_id()?.as_deref(), key_id)?;
        let mut next = match self
            .db
            .iterator_cf(self.cf(CF_ROUTING_TOKENS), IteratorMode::End)
            .next()
        {
            Some(item) => be_u64(&item.map_err(DbError::from)?.0, CF_ROUTING_TOKENS)? + 1,
            None => 1,
        };
        let by_token = self.cf(CF_ROUTING_BY_TOKEN);
        let mut batch = WriteBatch::default();
        let mut taken = std::collections::HashSet::new();
        for token in tokens {
            let key = token.to_be_bytes();
            if !taken.insert(*token)
                || self
                    .db
                    .get_cf(by_token, key)
                    .map_err(DbError::from)?
                    .is_some()
            {
                continue;
            }
            batch.put_cf(self.cf(CF_ROUTING_TOKENS), next.to_be_bytes(), key);
            batch.put_cf(by_token, key, next.to_be_bytes());
            next += 1;
        }
        if batch.is_empty() {
            return Ok(());
        }
        Ok(self.write_synced(batch)?)
    }

    pub fn routing_tokens(&self, after: u64, limit: usize) -> Result<Vec<(u64, u64)>, DbError> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_ROUTING_TOKENS),
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            out.push((
                be_u64(&k, CF_ROUTING_TOKENS)?,
                be_u64(&v, CF_ROUTING_TOKENS)?,
            ));
        }
        Ok(out)
    }
}
