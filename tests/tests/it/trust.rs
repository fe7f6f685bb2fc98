//! Mutual TLS and write authorization: who may connect, and who may write what.

use pil_client::{PilClient, Profile, v1};
use pil_tests::*;
use tonic::Code;

#[tokio::test]
async fn client_without_certificate_is_refused() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&world.ca).unwrap()))
        .domain_name("localhost");
    let result = async {
        let channel = Channel::from_shared(format!("https://{}", node.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await?;
        let client = PilClient::from_channel(channel, &format!("https://{}", node.addr()));
        client
            .lookup(lookup(&patient_id(1)))
            .await
            .map_err(|e| anyhow::anyhow!(e))
    }
    .await;
    assert!(result.is_err(), "a client without a certificate was served");
    node.stop().await;
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_is_refused() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let profile = Profile::load(&world.foreign_org_profile(node.addr())).unwrap();
    let result = match PilClient::connect(&profile).await {
        Err(e) => Err(e),
        Ok(c) => c.lookup(lookup(&patient_id(1))).await.map(|_| ()),
    };
    assert!(
        result.is_err(),
        "a certificate from a foreign CA was accepted"
    );
    node.stop().await;
}

#[tokio::test]
async fn an_organization_cannot_write_another_organizations_pointers() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let b = world.client(ORG_B, node.addr()).await;
    let a = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(9);

    let err = b
        .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    assert!(
        err.to_string().contains(ORG_B) && err.to_string().contains(ORG_A),
        "{err}"
    );
    assert!(
        a.lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .is_empty()
    );

    // Nor delete them.
    let p = pointer(&patient, ORG_A, 1, &["medications"]);
    a.upsert(p.clone()).await.unwrap();
    let err = b
        .delete(v1::DeletePointerRequest {
            patient: Some(patient.clone()),
            holder: p.holder.clone(),
            endpoint: p.endpoint.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    assert_eq!(a.lookup(lookup(&patient)).await.unwrap().pointers.len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn a_hosting_provider_writes_for_its_organizations_only() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let host = world.client(HOST, node.addr()).await;
    let patient = patient_id(10);

    let ok = host
        .upsert(pointer(&patient, ORG_C, 1, &["clinical-notes"]))
        .await
        .unwrap();
    assert_eq!(ok.outcome, v1::WriteOutcome::Inserted as i32);
    // It also writes its own.
    host.upsert(pointer(&patient, HOST, 1, &["clinical-notes"]))
        .await
        .unwrap();
    // But not for organizations it is not configured for.
    let err = host
        .upsert(pointer(&patient, ORG_A, 1, &["clinical-notes"]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    let found = host.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(found.pointers.len(), 2);
    node.stop().await;
}
