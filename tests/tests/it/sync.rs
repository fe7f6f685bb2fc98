//! Bulk sync over the client stream: both modes, counts, per-record errors,
//! all-or-nothing, idempotence.

use pil_client::v1;
use pil_tests::*;
use tonic::Code;

fn batches(
    pointers: Vec<v1::Pointer>,
    size: usize,
) -> impl futures::Stream<Item = Vec<v1::Pointer>> + Send + 'static {
    let chunks: Vec<Vec<v1::Pointer>> = pointers.chunks(size).map(|c| c.to_vec()).collect();
    futures::stream::iter(chunks)
}

fn set(range: std::ops::Range<u64>, categories: &[&str]) -> Vec<v1::Pointer> {
    range
        .map(|i| pointer(&patient_id(i), ORG_A, 1, categories))
        .collect()
}

async fn count_for(client: &pil_client::PilClient, range: std::ops::Range<u64>) -> usize {
    let mut n = 0;
    for i in range {
        n += client
            .lookup(lookup(&patient_id(i)))
            .await
            .unwrap()
            .pointers
            .len();
    }
    n
}

#[tokio::test]
async fn merge_counts_and_idempotence() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let merge = || sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false);

    let r = a
        .sync(merge(), batches(set(0..500, &["medications"]), 64))
        .await
        .unwrap();
    assert_eq!(
        (r.inserted, r.updated, r.unchanged, r.removed, r.rejected),
        (500, 0, 0, 0, 0)
    );

    // Same data again: nothing changes.
    let r = a
        .sync(merge(), batches(set(0..500, &["medications"]), 100))
        .await
        .unwrap();
    assert_eq!((r.inserted, r.updated, r.unchanged), (0, 0, 500));

    // Half changed, some new.
    let mut next = set(0..250, &["lab-results"]);
    next.extend(set(500..600, &["medications"]));
    let r = a.sync(merge(), batches(next, 1000)).await.unwrap();
    assert_eq!(
        (r.inserted, r.updated, r.unchanged, r.removed),
        (100, 250, 0, 0)
    );
    assert!(!r.replace_applied);
    assert_eq!(count_for(&a, 0..600).await, 600);
    node.stop().await;
}

#[tokio::test]
async fn replace_organization_removes_everything_not_sent() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let b = world.client(ORG_B, node.addr()).await;
    let replace = || sync_options(v1::SyncMode::Replace, v1::ReplaceScope::Organization, false);

    a.sync(replace(), batches(set(0..300, &["medications"]), 100))
        .await
        .unwrap();
    // Another organization's pointer for one of the same patients must survive.
    b.upsert(pointer(&patient_id(5), ORG_B, 1, &["nursing"]))
        .await
        .unwrap();

    let mut next = set(100..300, &["medications"]);
    next.extend(set(300..350, &["medications"]));
    let r = a.sync(replace(), batches(next, 77)).await.unwrap();
    assert_eq!(
        (r.inserted, r.updated, r.unchanged, r.removed),
        (50, 0, 200, 100)
    );
    assert!(r.replace_applied);
    assert_eq!(
        count_for(&a, 0..100).await,
        1,
        "only B's pointer for patient 5 is left"
    );
    assert_eq!(count_for(&a, 100..350).await, 250);

    // Replacing with an empty set removes all of the organization's pointers.
    let r = a.sync(replace(), batches(Vec::new(), 10)).await.unwrap();
    assert_eq!(r.removed, 250);
    node.stop().await;
}

#[tokio::test]
async fn replace_patients_touches_only_the_patients_sent() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    // Patients 0..10 with two endpoints each.
    let mut initial = set(0..10, &["medications"]);
    initial.extend((0..10).map(|i| pointer(&patient_id(i), ORG_A, 2, &["imaging"])));
    a.sync(
        sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
        batches(initial, 100),
    )
    .await
    .unwrap();

    // For patients 0..3 only endpoint 1 remains; other patients are untouched.
    let r = a
        .sync(
            sync_options(v1::SyncMode::Replace, v1::ReplaceScope::Patients, false),
            batches(set(0..3, &["medications"]), 100),
        )
        .await
        .unwrap();
    assert_eq!((r.unchanged, r.removed), (3, 3));
    assert_eq!(count_for(&a, 0..3).await, 3);
    assert_eq!(count_for(&a, 3..10).await, 14);
    node.stop().await;
}

#[tokio::test]
async fn bad_records_are_reported_by_position_and_skip_the_replace_step() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    a.sync(
        sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false),
        batches(set(0..20, &["medications"]), 100),
    )
    .await
    .unwrap();

    let mut next = set(0..10, &["medications"]);
    next[3]
        .patient
        .as_mut()
        .unwrap()
        .value
        .replace_range(10..11, "x");
    next[7].endpoint.as_mut().unwrap().base_url = "http://insecure.example".into();
    let mut other_org = pointer(&patient_id(1), ORG_B, 1, &["nursing"]);
    other_org.holder.as_mut().unwrap().organization_number = ORG_B.into();
    next.push(other_org);
    let r = a
        .sync(
            sync_options(v1::SyncMode::Replace, v1::ReplaceScope::Organization, false),
            batches(next, 4),
        )
        .await
        .unwrap();
    assert_eq!(r.rejected, 3);
    let positions: Vec<_> = r
        .errors
        .iter()
        .map(|e| (e.position, e.field.as_str()))
        .collect();
    assert_eq!(
        positions,
        [
            (3, "patient"),
            (7, "endpoint.base_url"),
            (10, "holder.organization_number")
        ]
    );
    assert!(!r.replace_applied);
    assert_eq!(r.removed, 0);
    assert_eq!(count_for(&a, 0..20).await, 20, "nothing removed");
    node.stop().await;
}

#[tokio::test]
async fn all_or_nothing_stores_nothing_when_one_record_is_bad() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let mut records = set(0..50, &["medications"]);
    records[42].categories = vec!["astrology".into()];
    let err = a
        .sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, true),
            batches(records, 10),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    assert!(err.to_string().contains("position 42"), "{err}");
    assert_eq!(count_for(&a, 0..50).await, 0);

    let r = a
        .sync(
            sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, true),
            batches(set(0..50, &["medications"]), 10),
        )
        .await
        .unwrap();
    assert_eq!(r.inserted, 50);
    node.stop().await;
}

#[tokio::test]
async fn sync_header_is_checked() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let err = a
        .sync(
            sync_options(v1::SyncMode::Replace, v1::ReplaceScope::Unspecified, false),
            batches(set(0..2, &["medications"]), 10),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);

    let mut for_b = sync_options(v1::SyncMode::Merge, v1::ReplaceScope::Unspecified, false);
    for_b.organization_number = ORG_B.into();
    let err = a.sync(for_b, batches(Vec::new(), 1)).await.unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    node.stop().await;
}
