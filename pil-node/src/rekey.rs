//! Re-keying: after a pseudonym-key rotation, moving every patient stored under an
//! earlier key to their pseudonym under the key in force, in the background.
//!
//! Lookups never wait for it: while the ring holds other keys, the registry reads a
//! patient under each of them and writes move a patient before changing them. This
//! task walks the store in pseudonym order, opens each patient's sealed identifier to
//! learn who they are, and moves those not yet under the key in force, a page at a
//! time, each page alone (no write runs while it moves). A pass that moves nothing
//! ends the work until the keys change again. Progress is the share of the pseudonym
//! space walked: pseudonyms are uniform, so it is also the share of patients.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

use crate::{
    patient_keys::{KeyIds, PatientKeys, Pseudonym},
    registry::{Registry, RegistryError},
    store::{Moved, PatientMove, Sealed, StoredPatient},
};

/// Patients read and moved per step.
const PAGE: usize = 256;

/// Where re-keying stands, for status and metrics.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RekeyStatus {
    pub keys: KeyIds,
    /// `idle` (nothing to move), `moving`, `done` (a pass found nothing left under
    /// other keys), `held` (a staged key waits: a rotation is still to come), `failed`.
    pub state: String,
    /// Passes started since the keys last changed.
    pub pass: u32,
    /// Share of the pseudonym space the current (or last) pass has walked, 0 to 1.
    pub progress: f64,
    pub patients_seen: u64,
    pub patients_moved: u64,
    pub pointers_moved: u64,
    pub protections_moved: u64,
    /// Entries stored without an identifier to re-key them by (blocks and opt-outs
    /// written before identifiers were sealed with them). They stay readable under the
    /// earlier key, so it must stay in the ring.
    pub unidentified: u64,
    pub detail: String,
}

/// The re-keying task's shared state.
#[derive(Clone, Default)]
pub struct Rekeying {
    status: Arc<Mutex<RekeyStatus>>,
}

impl Rekeying {
    pub fn status(&self) -> RekeyStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RekeyStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut RekeyStatus)) {
        f(&mut self.lock())
    }

    /// Runs while the node serves (it is aborted at shutdown): a pass whenever the
    /// keys in force ask for one.
    pub async fn run(self, registry: Registry) {
        loop {
            let changed = registry.keys_changed();
            tokio::pin!(changed);
            // Registered before reading the keys: a change in between still wakes.
            changed.as_mut().enable();
            let keys = registry.keys();
            self.begin(&keys);
            if keys.rekeying() {
                tokio::select! {
                    _ = self.until_settled(&registry, &keys) => {}
                    _ = changed.as_mut() => continue,
                }
            }
            changed.await;
        }
    }

    fn begin(&self, keys: &PatientKeys) {
        let state = if keys.rekeying() {
            "moving"
        } else if !keys.ids().staged.is_empty() {
            "held"
        } else {
            "idle"
        };
        *self.lock() = RekeyStatus {
            keys: keys.ids().clone(),
            state: state.into(),
            ..RekeyStatus::default()
        };
    }

    /// Passes until one moves nothing; a failed pass is tried again after a pause.
    async fn until_settled(&self, registry: &Registry, keys: &Arc<PatientKeys>) {
        loop {
            self.update(|s| {
                s.pass += 1;
                s.progress = 0.0;
                s.state = "moving".into();
            });
            match self.pass(registry, keys).await {
                Ok(Pass::Moved(0)) => {
                    self.update(|s| {
                        s.state = "done".into();
                        s.progress = 1.0;
                        s.detail = if s.unidentified == 0 {
                            "every patient is stored under the key in force".into()
                        } else {
                            format!(
                                "{} entries have no identifier to move them by and stay under \
                                 earlier keys: keep those keys in the ring",
                                s.unidentified
                            )
                        };
                    });
                    tracing::info!(key = %keys.ids().current, "pseudonym re-keying done");
                    return;
                }
                Ok(Pass::Moved(n)) => {
                    tracing::info!(patients = n, "pseudonym re-keying pass moved patients");
                }
                Ok(Pass::KeysChanged) => return,
                Err(e) => {
                    tracing::error!(error = %e, "pseudonym re-keying failed; trying again");
                    self.update(|s| {
                        s.state = "failed".into();
                        s.detail = e.to_string();
                    });
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    async fn pass(
        &self,
        registry: &Registry,
        keys: &Arc<PatientKeys>,
    ) -> Result<Pass, RegistryError> {
        let mut after: Option<Pseudonym> = None;
        let mut moved_in_pass = 0u64;
        self.update(|s| s.unidentified = 0);
        loop {
            let page = registry.stored_patients(after, PAGE).await?;
            let Some(last) = page.last().map(|p| p.pseudonym) else {
                return Ok(Pass::Moved(moved_in_pass));
            };
            let (moves, unidentified) = moves_for(keys, &page);
            let patients = moves.len() as u64;
            let moved = if moves.is_empty() {
                Moved::default()
            } else {
                let _alone = registry.sole_turn().await;
                if !Arc::ptr_eq(&registry.keys(), keys) {
                    return Ok(Pass::KeysChanged);
                }
                registry.move_patients(moves).await?
            };
            moved_in_pass += patients;
            self.update(|s| {
                s.patients_seen += page.len() as u64;
                s.patients_moved += patients;
                s.pointers_moved += moved.pointers;
                s.protections_moved += moved.protections;
                s.unidentified += unidentified;
                s.progress = share(&last);
            });
            after = Some(last);
        }
    }
}

enum Pass {
    Moved(u64),
    KeysChanged,
}

/// The moves a page asks for, and how many of its patients carry no identifier.
fn moves_for(keys: &PatientKeys, page: &[StoredPatient]) -> (Vec<PatientMove>, u64) {
    let mut moves = Vec::new();
    let mut unidentified = 0;
    for p in page {
        let opened = match &p.sealed {
            Some(Sealed::Current(s)) => keys.open(s, &p.pseudonym).ok(),
            Some(Sealed::Format1(s)) => keys.open_format1(s, &p.pseudonym).ok(),
            None => None,
        };
        let patient = opened.and_then(|(system, value)| {
            pil_proto::ident::PatientId::parse(&system, &value, true).ok()
        });
        let Some(patient) = patient else {
            // Under the key in force or not, nothing says who it is.
            unidentified += 1;
            continue;
        };
        let to = keys.pseudonym(&patient);
        if to != p.pseudonym {
            moves.push(PatientMove {
                from: p.pseudonym,
                to,
                sealed: keys.seal(&patient, &to),
            });
        }
    }
    (moves, unidentified)
}

/// The share of the pseudonym space up to `p`.
fn share(p: &Pseudonym) -> f64 {
    let head = u64::from_be_bytes(p[..8].try_into().expect("16 bytes"));
    head as f64 / u64::MAX as f64
}

#[cfg(test)]
mod tests {
    use pil_proto::ident::{PatientId, SYSTEM_FNR, synthetic_fnr};

    use super::*;
    use crate::{
        pointer::{EndpointRef, NewPointer},
        store::{StoredBlock, StoredOptOut, tests::on_every_engine},
    };

    fn ring(keys: &[(u8, crate::patient_keys::Role)]) -> PatientKeys {
        let ring: Vec<crate::patient_keys::RingKey> = keys
            .iter()
            .map(|(k, role)| crate::patient_keys::RingKey {
                key: [*k; 32],
                role: *role,
            })
            .collect();
        PatientKeys::from_ring(&ring, &[9; 32])
    }

    fn pointer(patient: &PatientId, n: u32) -> NewPointer {
        NewPointer {
            patient: patient.clone(),
            endpoint: EndpointRef {
                org: "974760673".parse().unwrap(),
                sub_unit: None,
                base_url: format!("https://holder.example/{n}"),
                api_kind: 1,
            },
            categories: vec!["lab".into()],
            period_start: None,
            period_end: None,
            last_updated: Some(1_000 + i64::from(n)),
            expires_at: None,
            holder_name: "Holder".into(),
        }
    }

    /// Patients written under one key are found under the next at every step of a
    /// rotation: before re-keying, while writes move some, and after re-keying moved
    /// the rest; protections follow their patients.
    #[tokio::test]
    async fn rotation_moves_every_patient_and_loses_nothing() {
        use crate::patient_keys::Role::Active;
        on_every_engine(async |store| {
            let registry = Registry::open(store.clone(), ring(&[(1, Active)]), "test");
            let patients: Vec<PatientId> = (0..40)
                .map(|i| PatientId::parse(SYSTEM_FNR, &synthetic_fnr(i), true).unwrap())
                .collect();
            for (i, p) in patients.iter().enumerate() {
                registry.upsert(pointer(p, i as u32)).await.unwrap();
            }
            registry
                .set_opt_out(&patients[1], Some(StoredOptOut::default()))
                .await
                .unwrap();
            registry
                .create_block(&patients[2], StoredBlock::default())
                .await
                .unwrap();
            let found = |registry: Registry, patients: Vec<PatientId>| async move {
                let mut n = 0;
                for p in &patients {
                    let view = registry.patient_view(p, &Default::default()).await.unwrap();
                    if let crate::registry::PatientView::Visible { pointers, .. } = view {
                        n += pointers.len();
                    }
                }
                n
            };
            assert_eq!(found(registry.clone(), patients.clone()).await, 39);

            registry
                .replace_keys(ring(&[(2, Active), (1, Active)]))
                .await
                .unwrap();
            assert_eq!(found(registry.clone(), patients.clone()).await, 39);
            // A write moves its patient first: updated, not inserted beside the old one.
            let (outcome, _) = registry.upsert(pointer(&patients[5], 5)).await.unwrap();
            assert_eq!(outcome, crate::registry::Outcome::Unchanged);
            assert!(
                registry
                    .delete(&patients[6], &pointer(&patients[6], 6).endpoint)
                    .await
                    .unwrap()
            );

            let rekeying = Rekeying::default();
            rekeying.begin(&registry.keys());
            rekeying.until_settled(&registry, &registry.keys()).await;
            let status = rekeying.status();
            assert_eq!(status.state, "done", "{status:?}");
            assert_eq!(status.unidentified, 0);
            // 39 patients with pointers (one deleted, one moved by its write), the
            // opt-out's and the block's patients among them.
            assert_eq!(status.patients_moved, 38);
            assert_eq!(status.protections_moved, 2);
            assert_eq!(status.pass, 2, "the second pass finds nothing left");

            // Nothing is left under the old key: the key in force alone finds all.
            let alone = Registry::open(store.clone(), ring(&[(2, Active)]), "test");
            assert_eq!(found(alone.clone(), patients.clone()).await, 38);
            assert!(alone.protections(&patients[1]).await.unwrap().0.is_some());
            assert_eq!(alone.blocks(&patients[2]).await.unwrap().len(), 1);

            // Dropping the key in force from the ring is refused.
            assert!(matches!(
                alone.replace_keys(ring(&[(3, Active)])).await,
                Err(RegistryError::KeyDropped(_))
            ));
        })
        .await;
    }
}
