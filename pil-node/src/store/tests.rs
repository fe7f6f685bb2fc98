//! Tests every engine passes alike: each runs against the in-memory engine and
//! RocksDB, so the interface, not one engine's shape, is what the node relies on.

use std::sync::Arc;

use pil_transparency::{leaf_hash, verify_consistency, verify_inclusion};

use super::{
    AuditEntry, HeadSigning, IDENT_LEN, Op, OpResult, PointerKey, Store, StoreError, StoredBlock,
    StoredOptOut, StoredPointer,
};
use crate::patient_keys::{PSEUDONYM_LEN, Pseudonym};

/// Runs `test` on a fresh store of every engine, closing each cleanly afterwards.
pub(crate) async fn on_every_engine(test: impl AsyncFn(Arc<dyn Store>)) {
    test(super::memory::open()).await;

    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = super::rocks::open(dir.path()).await.unwrap();
    test(store.clone()).await;
    drop(store);
    closer.close().await;

    let db = crate::test_support::Throwaway::start();
    let config = db.config();
    super::postgres::migrate(&config).await.unwrap();
    let (store, closer) = super::postgres::open(&config).await.unwrap();
    test(store.clone()).await;
    drop(store);
    closer.close().await;
}

const ORG_A: [u8; 9] = *b"974760673";
const ORG_B: [u8; 9] = *b"983044778";
const HOUR: i64 = 3600 * 1_000_000_000;

fn key(patient: u8, org: [u8; 9], ident: u8) -> PointerKey {
    PointerKey {
        patient: [patient; PSEUDONYM_LEN],
        org,
        ident: [ident; IDENT_LEN],
    }
}

fn pointer(last_updated: i64) -> StoredPointer {
    StoredPointer {
        base_url: "https://x.no".into(),
        api_kind: 1,
        categories: vec!["medications".into()],
        last_updated,
        ..Default::default()
    }
}

fn upsert(key: PointerKey, value: StoredPointer) -> Op {
    Op::Upsert {
        key,
        value,
        keep_last_updated: false,
    }
}

fn stored(result: &OpResult) -> &StoredPointer {
    match result {
        OpResult::Inserted(v) | OpResult::Updated(v) | OpResult::Unchanged(v) => v,
        other => panic!("no pointer in {other:?}"),
    }
}

#[tokio::test]
async fn writes_report_exactly_what_they_did() {
    on_every_engine(async |store| {
        let k = key(1, ORG_A, 1);
        let r = store.apply(vec![upsert(k, pointer(5))]).await.unwrap();
        assert!(matches!(r[..], [OpResult::Inserted(_)]));
        let r = store.apply(vec![upsert(k, pointer(5))]).await.unwrap();
        assert!(matches!(r[..], [OpResult::Unchanged(_)]));
        let r = store.apply(vec![upsert(k, pointer(6))]).await.unwrap();
        assert!(matches!(r[..], [OpResult::Updated(_)]));
        // Without a `last_updated` of its own, a write keeps the stored one.
        let mut changed = pointer(99);
        changed.categories = vec!["imaging".into()];
        let r = store
            .apply(vec![Op::Upsert {
                key: k,
                value: changed,
                keep_last_updated: true,
            }])
            .await
            .unwrap();
        assert_eq!(stored(&r[0]).last_updated, 6);
        // Two operations on one key in one call: the second sees the first.
        let r = store
            .apply(vec![Op::Delete { key: k }, Op::Delete { key: k }])
            .await
            .unwrap();
        assert!(matches!(r[..], [OpResult::Deleted, OpResult::Absent]));
        assert_eq!(store.get_many(vec![k]).await.unwrap(), vec![None]);
    })
    .await;
}

/// An update refreshes the pointer, but its lapse (and so its place in the expiry
/// index) moves only when it would move by a day or more.
#[tokio::test]
async fn the_lapse_moves_in_steps_of_a_day() {
    on_every_engine(async |store| {
        let k = key(1, ORG_A, 1);
        let with_lapse = |n, lapses_at| {
            let mut p = pointer(n);
            p.lapses_at = Some(lapses_at);
            upsert(k, p)
        };
        let t0 = 1_000 * 24 * HOUR;
        let r = store.apply(vec![with_lapse(1, t0)]).await.unwrap();
        assert_eq!(stored(&r[0]).lapses_at, Some(t0));
        let r = store.apply(vec![with_lapse(2, t0 + HOUR)]).await.unwrap();
        assert!(matches!(r[0], OpResult::Updated(_)));
        assert_eq!(
            stored(&r[0]).lapses_at,
            Some(t0),
            "an hour does not move it"
        );
        let r = store
            .apply(vec![with_lapse(3, t0 + 48 * HOUR)])
            .await
            .unwrap();
        assert_eq!(stored(&r[0]).lapses_at, Some(t0 + 48 * HOUR));
        // Unchanged content a day later is a refresh that moves only the lapse.
        let r = store
            .apply(vec![with_lapse(3, t0 + 96 * HOUR)])
            .await
            .unwrap();
        assert!(matches!(r[0], OpResult::Unchanged(_)));
        let now = store
            .get_many(vec![k])
            .await
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        assert_eq!((now.last_updated, now.lapses_at), (3, Some(t0 + 96 * HOUR)));
        assert_eq!(store.expired(t0 + 95 * HOUR, 10).await.unwrap(), []);
        assert_eq!(store.expired(t0 + 96 * HOUR, 10).await.unwrap(), [k]);
    })
    .await;
}

#[tokio::test]
async fn reads_find_pointers_by_patient_by_organization_and_by_expiry() {
    on_every_engine(async |store| {
        let (a, b, c) = (key(1, ORG_A, 1), key(1, ORG_B, 1), key(2, ORG_A, 3));
        let expiring = |at| {
            let mut p = pointer(1);
            p.expires_at = Some(at);
            p
        };
        store
            .apply(vec![
                upsert(a, expiring(10)),
                upsert(b, pointer(1)),
                upsert(c, expiring(20)),
            ])
            .await
            .unwrap();
        let mut found: Vec<PointerKey> = store
            .patient([1; PSEUDONYM_LEN])
            .await
            .unwrap()
            .pointers
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        found.sort();
        assert_eq!(found, [a, b]);
        assert_eq!(
            store
                .patient_org_keys([1; PSEUDONYM_LEN], ORG_A)
                .await
                .unwrap(),
            [a]
        );
        assert_eq!(store.org_keys(ORG_A, None, 10).await.unwrap(), [a, c]);
        assert_eq!(store.org_keys(ORG_A, None, 1).await.unwrap(), [a]);
        assert_eq!(store.org_keys(ORG_A, Some(a), 10).await.unwrap(), [c]);
        assert_eq!(store.expired(15, 10).await.unwrap(), [a]);
        assert_eq!(store.expired(25, 10).await.unwrap(), [a, c]);
        // A purge removes only what is still due: `a`'s expiry moved meanwhile.
        store.apply(vec![upsert(a, expiring(30))]).await.unwrap();
        let r = store
            .apply(vec![
                Op::Purge { key: a, now: 25 },
                Op::Purge { key: c, now: 25 },
            ])
            .await
            .unwrap();
        assert!(matches!(r[..], [OpResult::Absent, OpResult::Deleted]));
        assert_eq!(store.expired(25, 10).await.unwrap(), []);
        assert_eq!(store.org_keys(ORG_A, None, 10).await.unwrap(), [a]);
    })
    .await;
}

#[tokio::test]
async fn an_opt_out_hides_everything_and_blocks_are_kept_per_patient() {
    on_every_engine(async |store| {
        let p: Pseudonym = [1; PSEUDONYM_LEN];
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(1))])
            .await
            .unwrap();
        let block = StoredBlock {
            target_kind: 1,
            target: "565501872".into(),
            ..Default::default()
        };
        store.put_block(p, [7; 16], block.clone()).await.unwrap();
        store
            .put_block([2; PSEUDONYM_LEN], [8; 16], block.clone())
            .await
            .unwrap();
        assert_eq!(
            store.blocks(p).await.unwrap(),
            vec![([7; 16], block.clone())]
        );
        let seen = store.patient(p).await.unwrap();
        assert_eq!((seen.blocks.len(), seen.pointers.len()), (1, 1));

        let opt_out = StoredOptOut {
            since: 3,
            reason: "asked".into(),
            sealed_patient: Vec::new(),
        };
        assert!(!store.set_opt_out(p, Some(opt_out.clone())).await.unwrap());
        assert!(store.set_opt_out(p, Some(opt_out.clone())).await.unwrap());
        let seen = store.patient(p).await.unwrap();
        assert_eq!(seen.opt_out, Some(opt_out));
        assert!(seen.blocks.is_empty() && seen.pointers.is_empty());
        assert!(store.set_opt_out(p, None).await.unwrap());
        assert_eq!(store.opt_out(p).await.unwrap(), None);

        assert!(store.delete_block(p, [7; 16]).await.unwrap());
        assert!(!store.delete_block(p, [7; 16]).await.unwrap());
        assert!(store.blocks(p).await.unwrap().is_empty());
        assert_eq!(store.blocks([2; PSEUDONYM_LEN]).await.unwrap().len(), 1);
    })
    .await;
}

/// A record whose bytes name its index, about one patient.
struct Entry(Option<Pseudonym>);

impl AuditEntry for Entry {
    fn encode_at(&mut self, index: u64) -> Result<Vec<u8>, StoreError> {
        Ok(format!("record {index}").into_bytes())
    }

    fn patient(&self) -> Option<Pseudonym> {
        self.0
    }
}

/// Signs a head as its size and root, so a test can read the root back.
struct PlainSigner;

impl HeadSigning for PlainSigner {
    fn sign(&self, size: u64, root: [u8; 32]) -> Result<String, StoreError> {
        Ok(format!("{size} {}", hex::encode(root)))
    }
}

fn root_of(note: &str) -> [u8; 32] {
    let hex_root = note.split_once(' ').unwrap().1;
    hex::decode(hex_root).unwrap().try_into().unwrap()
}

#[tokio::test]
async fn the_audit_log_appends_in_order_and_proves_what_it_holds() {
    on_every_engine(async |store| {
        let signer: Arc<dyn HeadSigning> = Arc::new(PlainSigner);
        assert_eq!(store.audit_sign(signer.clone()).await.unwrap(), None);
        let patient = [3; PSEUDONYM_LEN];
        let appends = (0..10).map(|i| {
            let store = store.clone();
            async move {
                let about = (i % 3 == 0).then_some(patient);
                store.audit_append(Box::new(Entry(about))).await.unwrap()
            }
        });
        let mut indexes = futures::future::join_all(appends).await;
        indexes.sort();
        assert_eq!(
            indexes,
            (0..10).collect::<Vec<u64>>(),
            "consecutive, none twice"
        );
        let (size, old_note) = store.audit_sign(signer.clone()).await.unwrap().unwrap();
        assert_eq!(size, 10);
        let size = store.audit_size().await.unwrap();
        assert_eq!((size.size, size.signed), (10, 10));
        // Signing again without new records signs nothing new.
        assert_eq!(
            store.audit_sign(signer.clone()).await.unwrap().unwrap().0,
            10
        );

        for _ in 0..7 {
            store.audit_append(Box::new(Entry(None))).await.unwrap();
        }
        let (_, new_note) = store.audit_sign(signer.clone()).await.unwrap().unwrap();
        let heads = store.audit_heads_after(0, 10).await.unwrap();
        assert_eq!(heads.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [10, 17]);
        assert_eq!(store.audit_heads_after(10, 10).await.unwrap().len(), 1);
        assert_eq!(store.audit_latest_head().await.unwrap().unwrap().0, 17);

        let (old_root, new_root) = (root_of(&old_note), root_of(&new_note));
        let proof = store.audit_consistency_proof(10, 17).await.unwrap();
        verify_consistency(10, 17, &old_root, &new_root, &proof).unwrap();
        let entries = store.audit_entries(0, 17).await.unwrap();
        assert_eq!(entries.len(), 17);
        for e in &entries {
            let bytes = e.record.clone().unwrap();
            assert_eq!(bytes, format!("record {}", e.index).into_bytes());
            assert_eq!(e.leaf_hash, leaf_hash(&bytes));
            let proof = store.audit_inclusion_proof(e.index, 17).await.unwrap();
            verify_inclusion(&e.leaf_hash, e.index, 17, &proof, &new_root).unwrap();
        }
        assert!(store.audit_inclusion_proof(17, 17).await.is_err());

        assert_eq!(
            store
                .audit_patient_indexes(patient, u64::MAX, 10)
                .await
                .unwrap(),
            [9, 6, 3, 0]
        );
        assert_eq!(
            store.audit_patient_indexes(patient, 6, 1).await.unwrap(),
            [3]
        );
        let newest: Vec<u64> = store
            .audit_records(17, false, 2)
            .await
            .unwrap()
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(newest, [16, 15]);
        assert_eq!(store.audit_records(15, true, 10).await.unwrap().len(), 2);

        // Retention drops contents, never the tree: proofs still verify.
        let dropped = vec![(0, patient), (3, patient)];
        store.audit_drop_contents(5, dropped).await.unwrap();
        assert_eq!(store.audit_retained_from().await.unwrap(), 5);
        assert_eq!(store.audit_record(4).await.unwrap(), None);
        assert!(store.audit_record(5).await.unwrap().is_some());
        assert_eq!(
            store
                .audit_patient_indexes(patient, u64::MAX, 10)
                .await
                .unwrap(),
            [9, 6]
        );
        let kept = store.audit_entries(0, 1).await.unwrap().pop().unwrap();
        assert_eq!(kept.record, None);
        let proof = store.audit_inclusion_proof(0, 17).await.unwrap();
        verify_inclusion(&kept.leaf_hash, 0, 17, &proof, &new_root).unwrap();
    })
    .await;
}

fn subscription(patients: &[u8], categories: &[&str]) -> super::StoredSubscription {
    super::StoredSubscription {
        owner: "983044778".into(),
        categories: categories.iter().map(|c| c.to_string()).collect(),
        patients: patients
            .iter()
            .map(|p| super::events::FollowedPatient {
                pseudonym: vec![*p; PSEUDONYM_LEN],
                sealed: vec![*p],
                stopped: false,
                former: Vec::new(),
            })
            .collect(),
        expires_at: i64::MAX,
        ..Default::default()
    }
}

fn kinds(page: &super::EventPage) -> Vec<(u64, super::events::EventKind, u8)> {
    page.events
        .iter()
        .map(|(n, e)| {
            let kind = super::events::EventKind::try_from(e.kind).unwrap();
            (*n, kind, e.patient().unwrap()[0])
        })
        .collect()
}

/// Every change of content is journaled in its write, whoever follows the patient;
/// the journal reads by patient and time in write order, and dropping its oldest part
/// moves the time from which it is complete.
#[tokio::test]
async fn every_change_is_journaled_and_the_journal_keeps_its_window() {
    use super::events::EventKind::*;
    on_every_engine(async |store| {
        let start = super::now_nanos();
        let before = store.journal(vec![[1; PSEUDONYM_LEN]], 0).await.unwrap();
        assert!(before.events.is_empty());
        assert!(before.complete_from <= start, "{before:?}");
        let mut lab = pointer(1);
        lab.categories = vec!["lab-results".into()];
        store
            .apply(vec![
                upsert(key(1, ORG_A, 1), pointer(1)),
                upsert(key(2, ORG_A, 1), pointer(1)),
            ])
            .await
            .unwrap();
        // A refresh is no change.
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(1))])
            .await
            .unwrap();
        let middle = super::now_nanos();
        store
            .apply(vec![upsert(key(1, ORG_A, 1), lab)])
            .await
            .unwrap();
        store
            .apply(vec![Op::Delete {
                key: key(1, ORG_A, 1),
            }])
            .await
            .unwrap();
        let of = |j: &super::Journal| -> Vec<(super::events::EventKind, u8)> {
            j.events
                .iter()
                .map(|e| {
                    (
                        super::events::EventKind::try_from(e.kind).unwrap(),
                        e.patient().unwrap()[0],
                    )
                })
                .collect()
        };
        let all = store.journal(vec![[1; PSEUDONYM_LEN]], 0).await.unwrap();
        assert_eq!(of(&all), vec![(Appeared, 1), (Changed, 1), (Removed, 1)]);
        // A change out of a category is told to that category's followers.
        let changed = &all.events[1];
        assert_eq!(changed.previous_categories, vec!["medications".to_string()]);
        assert!(changed.concerns(&["medications".into()]));
        assert!(changed.concerns(&["lab-results".into()]));
        assert!(!changed.concerns(&["x-rays".into()]));
        let both = store
            .journal(vec![[2; PSEUDONYM_LEN], [1; PSEUDONYM_LEN]], 0)
            .await
            .unwrap();
        assert_eq!(of(&both)[..2], [(Appeared, 1), (Appeared, 2)]);
        let later = store
            .journal(vec![[1; PSEUDONYM_LEN]], middle)
            .await
            .unwrap();
        assert_eq!(of(&later), vec![(Changed, 1), (Removed, 1)]);

        // Dropped a page at a time, oldest first.
        assert_eq!(store.drop_journal(middle, 1).await.unwrap(), 1);
        let after_page = store.journal(vec![[2; PSEUDONYM_LEN]], 0).await.unwrap();
        assert!(after_page.complete_from > start);
        assert_eq!(store.drop_journal(middle, 10).await.unwrap(), 1);
        let kept = store
            .journal(vec![[1; PSEUDONYM_LEN], [2; PSEUDONYM_LEN]], 0)
            .await
            .unwrap();
        assert_eq!(of(&kept), vec![(Changed, 1), (Removed, 1)]);
        assert_eq!(kept.complete_from, middle);
        assert_eq!(store.drop_journal(middle, 10).await.unwrap(), 0);
    })
    .await;
}

/// A write to a followed patient makes its event in the same write, numbered by the
/// subscription without gaps; writes to others, refreshes and writes after the
/// subscription ends make none.
#[tokio::test]
async fn writes_to_followed_patients_make_numbered_events() {
    use super::events::EventKind::*;
    on_every_engine(async |store| {
        let (a, b) = ([1; 16], [2; 16]);
        store
            .put_subscription(a, subscription(&[1, 2], &[]))
            .await
            .unwrap();
        store
            .put_subscription(b, subscription(&[2], &["lab-results"]))
            .await
            .unwrap();
        let mut lab = pointer(1);
        lab.categories = vec!["lab-results".into()];
        store
            .apply(vec![
                upsert(key(1, ORG_A, 1), pointer(1)),
                upsert(key(2, ORG_A, 1), lab.clone()),
                upsert(key(3, ORG_A, 1), pointer(1)),
            ])
            .await
            .unwrap();
        // The same content again: a refresh, no event.
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(1))])
            .await
            .unwrap();
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(2))])
            .await
            .unwrap();
        store
            .apply(vec![Op::Delete {
                key: key(2, ORG_A, 1),
            }])
            .await
            .unwrap();
        let page = store.events(a, 0, 100).await.unwrap();
        assert_eq!(
            kinds(&page),
            vec![
                (1, Appeared, 1),
                (2, Appeared, 2),
                (3, Changed, 1),
                (4, Removed, 2)
            ]
        );
        assert_eq!((page.last, page.first_kept), (4, 1));
        assert_eq!(page.events[2].1.pointer.as_ref().unwrap().last_updated, 2);
        let page = store.events(b, 0, 100).await.unwrap();
        assert_eq!(kinds(&page), vec![(1, Appeared, 2), (2, Removed, 2)]);
        // Paged from a position.
        let page = store.events(a, 2, 1).await.unwrap();
        assert_eq!(kinds(&page), vec![(3, Changed, 1)]);
        assert_eq!(page.last, 4);

        // Lapsed, then ended: no more events.
        let mut lapsing = pointer(3);
        lapsing.expires_at = Some(10);
        store
            .apply(vec![upsert(key(1, ORG_A, 1), lapsing)])
            .await
            .unwrap();
        store
            .apply(vec![Op::Purge {
                key: key(1, ORG_A, 1),
                now: 20,
            }])
            .await
            .unwrap();
        let page = store.events(a, 4, 100).await.unwrap();
        assert_eq!(kinds(&page), vec![(5, Changed, 1), (6, Lapsed, 1)]);
        let mut ended = store.subscription(a).await.unwrap().unwrap();
        ended.ended = true;
        store.put_subscription(a, ended).await.unwrap();
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(4))])
            .await
            .unwrap();
        assert_eq!(store.events(a, 0, 100).await.unwrap().last, 6);
        let owned = store.subscriptions_of("983044778".into()).await.unwrap();
        assert_eq!(owned.len(), 2);
        assert!(
            store
                .subscriptions_of("974760673".into())
                .await
                .unwrap()
                .is_empty()
        );

        // Retention drops events by age; the first kept moves, the numbers stay.
        let dropped = store.drop_events(i64::MAX, 100).await.unwrap();
        assert_eq!(dropped, 8);
        let page = store.events(a, 0, 100).await.unwrap();
        assert!(page.events.is_empty());
        assert_eq!((page.last, page.first_kept), (6, 7));
    })
    .await;
}

/// Events collected from another region are numbered after the subscription's own,
/// with that region's position moved in the same write; a second collection from the
/// same position (another node of the region was first) writes nothing.
#[tokio::test]
async fn events_collected_from_a_region_move_its_position_with_them() {
    use super::{PeerState, StoredEvent};
    on_every_engine(async |store| {
        let a = [3; 16];
        store
            .put_subscription(a, subscription(&[1], &[]))
            .await
            .unwrap();
        store
            .apply(vec![upsert(key(1, ORG_A, 1), pointer(1))])
            .await
            .unwrap();
        let collected = |n: u64| StoredEvent {
            kind: super::events::EventKind::Appeared as i32,
            key: vec![1; PSEUDONYM_LEN],
            at: 5,
            region: "helse-midt".into(),
            shown: vec![1, 2, 3],
            origin_number: n,
            ..Default::default()
        };
        assert!(store.peer_follows(a).await.unwrap().is_empty());
        store
            .set_peer_follow(a, "helse-midt".into(), PeerState::Following, String::new())
            .await
            .unwrap();
        assert!(
            store
                .collect_events(
                    a,
                    "helse-midt".into(),
                    0,
                    2,
                    vec![collected(1), collected(2)]
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .collect_events(
                    a,
                    "helse-midt".into(),
                    0,
                    2,
                    vec![collected(1), collected(2)]
                )
                .await
                .unwrap(),
            "the position moved on: nothing twice"
        );
        store
            .apply(vec![upsert(key(1, ORG_A, 2), pointer(1))])
            .await
            .unwrap();
        let page = store.events(a, 0, 100).await.unwrap();
        assert_eq!(page.last, 4);
        let origins: Vec<(u64, String, u64)> = page
            .events
            .iter()
            .map(|(n, e)| (*n, e.region.clone(), e.origin_number))
            .collect();
        assert_eq!(
            origins,
            vec![
                (1, String::new(), 0),
                (2, "helse-midt".into(), 1),
                (3, "helse-midt".into(), 2),
                (4, String::new(), 0),
            ]
        );
        assert_eq!(page.events[1].1.shown, vec![1, 2, 3]);
        let follows = store.peer_follows(a).await.unwrap();
        assert_eq!(follows.len(), 1);
        assert_eq!(
            (follows[0].state(), follows[0].position),
            (PeerState::Following, 2)
        );
        // A state change keeps the position.
        store
            .set_peer_follow(a, "helse-midt".into(), PeerState::Ended, "ended".into())
            .await
            .unwrap();
        let follows = store.peer_follows(a).await.unwrap();
        assert_eq!(
            (
                follows[0].state(),
                follows[0].position,
                follows[0].detail.as_str()
            ),
            (PeerState::Ended, 2, "ended")
        );
        assert_eq!(store.all_subscriptions().await.unwrap().len(), 1);
    })
    .await;
}

/// Moving a patient takes their pointers with every index, their blocks and opt-out
/// to the new pseudonym in one write; what the destination holds already is newer and
/// stays; nothing shows as a change to followers; the patient is listed under the new
/// pseudonym with the identifier sealed for it.
#[tokio::test]
async fn moved_patients_keep_everything_under_the_new_pseudonym() {
    on_every_engine(async |store| {
        let (from, to) = ([1; PSEUDONYM_LEN], [2; PSEUDONYM_LEN]);
        let mut expiring = pointer(10);
        expiring.expires_at = Some(HOUR);
        let mut newer = pointer(99);
        newer.sealed_patient = b"newer".to_vec();
        store
            .apply(vec![
                upsert(key(1, ORG_A, 1), expiring),
                upsert(key(1, ORG_B, 2), pointer(20)),
                upsert(key(2, ORG_B, 2), newer),
                upsert(key(3, ORG_A, 1), pointer(30)),
            ])
            .await
            .unwrap();
        store
            .put_block(from, [7; 16], StoredBlock::default())
            .await
            .unwrap();
        store
            .set_opt_out(from, Some(StoredOptOut::default()))
            .await
            .unwrap();
        let followed = [5u8; 16];
        store
            .put_subscription(followed, subscription(&[1, 2], &[]))
            .await
            .unwrap();

        let moved = store
            .move_patients(vec![super::PatientMove {
                from,
                to,
                sealed: b"sealed".to_vec(),
            }])
            .await
            .unwrap();
        assert_eq!((moved.pointers, moved.protections), (2, 2));

        assert!(store.blocks(from).await.unwrap().is_empty());
        assert!(store.opt_out(from).await.unwrap().is_none());
        let blocks = store.blocks(to).await.unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].1.sealed_patient, b"sealed");
        assert_eq!(
            store.opt_out(to).await.unwrap().unwrap().sealed_patient,
            b"sealed"
        );
        let got = store
            .get_many(vec![key(1, ORG_A, 1), key(2, ORG_A, 1), key(2, ORG_B, 2)])
            .await
            .unwrap();
        assert_eq!(got[0], None);
        assert_eq!(got[1].as_ref().unwrap().sealed_patient, b"sealed");
        assert_eq!(got[1].as_ref().unwrap().last_updated, 10);
        // The destination's own, newer pointer stays.
        assert_eq!(got[2].as_ref().unwrap().last_updated, 99);
        assert_eq!(
            store.org_keys(ORG_A, None, 10).await.unwrap(),
            vec![key(2, ORG_A, 1), key(3, ORG_A, 1)]
        );
        assert_eq!(
            store.org_keys(ORG_B, None, 10).await.unwrap(),
            vec![key(2, ORG_B, 2)]
        );
        assert_eq!(
            store.expired(HOUR, 10).await.unwrap(),
            vec![key(2, ORG_A, 1)]
        );
        assert!(
            store
                .events(followed, 0, 10)
                .await
                .unwrap()
                .events
                .is_empty()
        );

        let listed = store.patients_after(None, 10).await.unwrap();
        let pseudonyms: Vec<u8> = listed.iter().map(|p| p.pseudonym[0]).collect();
        assert_eq!(pseudonyms, vec![2, 3]);
        assert!(listed[0].sealed.is_some());
        assert_eq!(
            store.patients_after(Some(to), 10).await.unwrap().len(),
            1,
            "paging continues after the pseudonym given"
        );
        assert_eq!(store.patients_after(None, 1).await.unwrap().len(), 1);
    })
    .await;
}

/// Signs real checkpoints, for tests that add cosignatures to them.
struct NoteSigner(pil_transparency::HeadSigner);

impl HeadSigning for NoteSigner {
    fn sign(&self, size: u64, root: [u8; 32]) -> Result<String, StoreError> {
        let head = pil_transparency::TreeHead {
            origin: "pil-audit/test".into(),
            size,
            root,
            timestamp_ms: 1,
        };
        Ok(self.0.sign(head).unwrap().to_note().unwrap())
    }
}

#[tokio::test]
async fn a_witness_advances_only_from_the_size_it_stored_and_heads_keep_cosignatures() {
    use pil_transparency::{Cosigner, HeadSigner, witness::Witnessed};

    on_every_engine(async |store| {
        let origin = "pil-audit/b".to_string();
        let at = |size: u64| Witnessed {
            size,
            root: [size as u8; 32],
            timestamp_ms: size,
            checkpoint: format!("checkpoint {size}\n"),
        };
        assert_eq!(store.witnessed(origin.clone()).await.unwrap(), None);
        assert_eq!(
            store
                .witness_advance(origin.clone(), 3, at(5))
                .await
                .unwrap(),
            Err(0)
        );
        assert_eq!(
            store
                .witness_advance(origin.clone(), 0, at(5))
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            store
                .witness_advance(origin.clone(), 0, at(9))
                .await
                .unwrap(),
            Err(5)
        );
        // Two advances from the same size: one wins, the other learns the new size.
        let (a, b) = futures::join!(
            store.witness_advance(origin.clone(), 5, at(7)),
            store.witness_advance(origin.clone(), 5, at(8)),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        let now = store.witnessed(origin.clone()).await.unwrap().unwrap();
        assert!(now == at(7) || now == at(8));
        assert_eq!(
            store
                .witness_advance(origin.clone(), now.size, at(6))
                .await
                .unwrap(),
            Err(now.size)
        );
        assert_eq!(store.witnessed("pil-audit/c".into()).await.unwrap(), None);

        let signer: Arc<dyn HeadSigning> = Arc::new(NoteSigner(HeadSigner::generate()));
        store.audit_append(Box::new(Entry(None))).await.unwrap();
        let (size, note) = store.audit_sign(signer).await.unwrap().unwrap();
        let body = &note[..=note.find("\n\n").unwrap()];
        let witness = Cosigner::new("w.example", HeadSigner::generate()).unwrap();
        for at in [10, 20] {
            store
                .audit_add_cosignatures(size, witness.cosign(body, at))
                .await
                .unwrap();
        }
        let (_, kept) = store.audit_latest_head().await.unwrap().unwrap();
        assert_eq!(witness.key().verify_note(&kept).unwrap(), Some(20));
        assert!(
            kept.starts_with(&note),
            "the log's own signature stays first"
        );
        assert!(
            store
                .audit_add_cosignatures(size + 1, witness.cosign(body, 1))
                .await
                .is_err()
        );
    })
    .await;
}
