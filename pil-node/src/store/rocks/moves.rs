//! Moving patients to their pseudonyms under a new key, and finding the patients
//! stored: what a pseudonym-key rotation asks of the RocksDB engine. The writer runs
//! [`Db::move_patients`] between its groups, so no pointer write interleaves.

use prost::Message;
use rocksdb::WriteBatch;

use super::db::{
    CF_BLOCKS, CF_BY_ORG, CF_EXPIRY, CF_OPT_OUTS, CF_POINTERS, Db, DbError, by_org, corrupt,
    decode, expiry_key,
};
use crate::{
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    store::{
        Moved, PatientMove, PointerKey, Sealed, StoredBlock, StoredOptOut, StoredPatient,
        merge_patients,
    },
};

/// The pseudonym after `p` in byte order, or `None` after the last.
fn successor(p: &Pseudonym) -> Option<Pseudonym> {
    let mut next = *p;
    for b in next.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(next);
        }
    }
    None
}

impl Db {
    /// Moves each patient's pointers (with their indexes), blocks and opt-out in one
    /// durable write.
    pub fn move_patients(&self, moves: &[PatientMove]) -> Result<Moved, DbError> {
        let mut batch = WriteBatch::default();
        let mut moved = Moved::default();
        let (pointers, orgs, expiry) =
            (self.cf(CF_POINTERS), self.cf(CF_BY_ORG), self.cf(CF_EXPIRY));
        for m in moves {
            for (key, value) in self.patient_pointers(&m.from, super::db::Tier::Any)? {
                batch.delete_cf(pointers, key.encode());
                batch.delete_cf(orgs, by_org(&key));
                if let Some(at) = value.effective_expiry() {
                    batch.delete_cf(expiry, expiry_key(&key, at));
                }
                moved.pointers += 1;
                let to = PointerKey {
                    patient: m.to,
                    ..key
                };
                if self.db.get_pinned_cf(pointers, to.encode())?.is_some() {
                    continue;
                }
                let value = value.resealed(&m.sealed);
                batch.put_cf(pointers, to.encode(), value.encode_to_vec());
                batch.put_cf(orgs, by_org(&to), []);
                if let Some(at) = value.effective_expiry() {
                    batch.put_cf(expiry, expiry_key(&to, at), []);
                }
            }
            let blocks = self.cf(CF_BLOCKS);
            for (id, mut block) in self.blocks(&m.from, super::db::Tier::Any)? {
                batch.delete_cf(blocks, [m.from.as_slice(), &id].concat());
                moved.protections += 1;
                let to = [m.to.as_slice(), &id].concat();
                if self.db.get_pinned_cf(blocks, &to)?.is_none() {
                    block.sealed_patient = m.sealed.clone();
                    batch.put_cf(blocks, to, block.encode_to_vec());
                }
            }
            let opt_outs = self.cf(CF_OPT_OUTS);
            if let Some(mut o) = self.opt_out(&m.from, super::db::Tier::Any)? {
                batch.delete_cf(opt_outs, m.from);
                moved.protections += 1;
                if self.db.get_pinned_cf(opt_outs, m.to)?.is_none() {
                    o.sealed_patient = m.sealed.clone();
                    batch.put_cf(opt_outs, m.to, o.encode_to_vec());
                }
            }
        }
        self.write_synced(batch)?;
        Ok(moved)
    }

    /// Up to `limit` patients with pointers or protections, after `after`.
    pub fn patients_after(
        &self,
        after: Option<&Pseudonym>,
        limit: usize,
    ) -> Result<Vec<StoredPatient>, DbError> {
        let start = match after {
            None => Some([0u8; PSEUDONYM_LEN]),
            Some(p) => successor(p),
        };
        let Some(start) = start else {
            return Ok(Vec::new());
        };
        let sealed = |s: &[u8]| (!s.is_empty()).then(|| Sealed::Current(s.to_vec()));
        let pointers = self.distinct(CF_POINTERS, &start, limit, |v| Ok(decode(v)?.sealed()))?;
        let blocks = self.distinct(CF_BLOCKS, &start, limit, |v| {
            let b = StoredBlock::decode(v).map_err(|e| corrupt(CF_BLOCKS, &e.to_string()))?;
            Ok(sealed(&b.sealed_patient))
        })?;
        let opt_outs = self.distinct(CF_OPT_OUTS, &start, limit, |v| {
            let o = StoredOptOut::decode(v).map_err(|e| corrupt(CF_OPT_OUTS, &e.to_string()))?;
            Ok(sealed(&o.sealed_patient))
        })?;
        Ok(merge_patients(vec![pointers, blocks, opt_outs], limit))
    }

    /// The first `limit` distinct pseudonyms that keys of `cf` start with, from
    /// `start`, each with what `sealed` makes of its first entry.
    fn distinct(
        &self,
        cf: &'static str,
        start: &Pseudonym,
        limit: usize,
        sealed: impl Fn(&[u8]) -> Result<Option<Sealed>, DbError>,
    ) -> Result<Vec<StoredPatient>, DbError> {
        // Across prefixes: the prefix extractors' shortcuts must not apply.
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_total_order_seek(true);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        it.seek(start);
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((k, v)) = it.item() else {
                break;
            };
            let pseudonym: Pseudonym = k
                .get(..PSEUDONYM_LEN)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| corrupt(cf, "bad key"))?;
            out.push(StoredPatient {
                pseudonym,
                sealed: sealed(v)?,
            });
            match successor(&pseudonym) {
                Some(next) => it.seek(next),
                None => break,
            }
        }
        it.status()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successors_carry() {
        let mut p = [0u8; PSEUDONYM_LEN];
        p[15] = 0xff;
        let mut q = [0u8; PSEUDONYM_LEN];
        q[14] = 1;
        assert_eq!(successor(&p), Some(q));
        assert_eq!(successor(&[0xff; PSEUDONYM_LEN]), None);
    }
}
