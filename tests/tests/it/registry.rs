//! Register, look up, delete and export over real mTLS against a real node.

use pil_client::v1;
use pil_tests::*;
use tonic::Code;

#[tokio::test]
async fn register_lookup_delete_round_trip() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(1);

    let mut p = pointer(&patient, ORG_A, 1, &["medications", "lab-results"]);
    p.last_updated = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    });
    let first = a.upsert(p.clone()).await.unwrap();
    assert_eq!(first.outcome, v1::WriteOutcome::Inserted as i32);
    let stored = first.pointer.unwrap();
    assert_eq!(stored.region, "test");
    assert!(!stored.pointer_id.is_empty());

    // Idempotent: the same pointer again changes nothing.
    let again = a.upsert(p.clone()).await.unwrap();
    assert_eq!(again.outcome, v1::WriteOutcome::Unchanged as i32);

    // A newer second pointer at another endpoint comes first in lookups.
    let mut newer = pointer(&patient, ORG_A, 2, &["imaging"]);
    newer.last_updated = Some(prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 0,
    });
    a.upsert(newer).await.unwrap();
    let found = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(found.pointers.len(), 2);
    assert_eq!(found.pointers[0].categories, ["imaging"]);
    assert_eq!(found.pointers[1].categories, ["lab-results", "medications"]);
    assert_eq!(found.pointers[1].patient.as_ref(), Some(&patient));
    assert_eq!(found.regions.len(), 1);
    assert_eq!(found.regions[0].state, v1::RegionState::Ok as i32);
    assert_eq!(found.regions[0].pointer_count, 2);
    assert!(!found.query_id.is_empty());

    // Updating categories is an update.
    p.categories = vec!["medications".into()];
    let upd = a.upsert(p.clone()).await.unwrap();
    assert_eq!(upd.outcome, v1::WriteOutcome::Updated as i32);

    // Other patients see nothing.
    let other = a.lookup(lookup(&patient_id(2))).await.unwrap();
    assert!(other.pointers.is_empty());

    // Delete, then it is gone; deleting again reports nothing to delete.
    let del = v1::DeletePointerRequest {
        patient: Some(patient.clone()),
        holder: p.holder.clone(),
        endpoint: p.endpoint.clone(),
    };
    assert!(a.delete(del.clone()).await.unwrap());
    assert!(!a.delete(del).await.unwrap());
    let left = a.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(left.pointers.len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn lookup_filters_by_category_and_organization() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let (a, b) = (
        world.client(ORG_A, node.addr()).await,
        world.client(ORG_B, node.addr()).await,
    );
    let patient = patient_id(3);
    a.upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap();
    b.upsert(pointer(&patient, ORG_B, 1, &["nursing", "care-plans"]))
        .await
        .unwrap();

    let by_cat = a
        .lookup(v1::LookupRequest {
            patient: Some(patient.clone()),
            categories: vec!["care-plans".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_cat.pointers.len(), 1);
    assert_eq!(
        by_cat.pointers[0]
            .holder
            .as_ref()
            .unwrap()
            .organization_number,
        ORG_B
    );

    let by_org = a
        .lookup(v1::LookupRequest {
            patient: Some(patient.clone()),
            organization_numbers: vec![ORG_A.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_org.pointers.len(), 1);
    assert_eq!(by_org.pointers[0].categories, ["medications"]);

    let bad = a
        .lookup(v1::LookupRequest {
            patient: Some(patient),
            categories: vec!["horoscopes".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&bad), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test]
async fn export_returns_plain_identifiers_of_own_pointers_only() {
    use futures::StreamExt;
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let (a, b) = (
        world.client(ORG_A, node.addr()).await,
        world.client(ORG_B, node.addr()).await,
    );
    for i in 0..1200 {
        a.upsert(pointer(&patient_id(100 + i), ORG_A, 1, &["medications"]))
            .await
            .unwrap();
    }
    b.upsert(pointer(&patient_id(100), ORG_B, 1, &["nursing"]))
        .await
        .unwrap();

    let mut stream = a.export(ORG_A).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(page) = stream.next().await {
        for p in page.unwrap() {
            assert_eq!(p.holder.as_ref().unwrap().organization_number, ORG_A);
            seen.insert(p.patient.unwrap().value);
        }
    }
    let expected: std::collections::BTreeSet<_> =
        (0..1200).map(|i| patient_id(100 + i).value).collect();
    assert_eq!(seen, expected);

    // B may not export A's pointers.
    let refused = match b.export(ORG_A).await {
        Err(e) => e,
        Ok(_) => panic!("export of another organization's pointers was allowed"),
    };
    assert_eq!(code(&refused), Code::PermissionDenied);
    node.stop().await;
}

#[tokio::test]
async fn health_and_reflection_services_answer() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let client = world.client(ORG_A, node.addr()).await;

    let mut health = HealthClient::new(client.channel());
    let status = health
        .check(HealthCheckRequest {
            service: "pil.v1.LookupService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(client.channel());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "pil.v1.LookupService",
        "pil.v1.RegistryService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    node.stop().await;
}
