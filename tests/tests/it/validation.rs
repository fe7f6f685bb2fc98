//! Invalid input is INVALID_ARGUMENT with a message naming the problem, and stores
//! nothing.

use pil_client::v1;
use pil_proto::ident;
use pil_tests::*;
use tonic::Code;

async fn assert_refused(client: &pil_client::PilClient, p: v1::Pointer, expect_in_message: &str) {
    let err = client.upsert(p.clone()).await.unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains(expect_in_message),
        "message {err:?} should mention {expect_in_message:?}"
    );
    // Nothing stored: the identifier (if it is valid at all) has no pointers.
    if let Some(patient) = p.patient.as_ref()
        && let Ok(found) = client.lookup(lookup(patient)).await
    {
        assert!(found.pointers.is_empty());
    }
}

/// Completes a 6-digit date with an individual number and classic mod-11 check digits.
fn with_check_digits(date: &str) -> String {
    let w1 = [3, 7, 6, 1, 8, 9, 4, 5, 2];
    let w2 = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];
    for individual in 100..1000 {
        let mut d: Vec<u32> = format!("{date}{individual}")
            .chars()
            .map(|c| c.to_digit(10).unwrap())
            .collect();
        let k1 = (11 - d.iter().zip(w1).map(|(a, b)| a * b).sum::<u32>() % 11) % 11;
        if k1 == 10 {
            continue;
        }
        d.push(k1);
        let k2 = (11 - d.iter().zip(w2).map(|(a, b)| a * b).sum::<u32>() % 11) % 11;
        if k2 == 10 {
            continue;
        }
        d.push(k2);
        return d.iter().map(|x| x.to_string()).collect();
    }
    unreachable!("some individual number has valid check digits")
}

#[tokio::test]
async fn invalid_identifiers_are_refused() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let good = patient_id(20).value;
    let mut wrong_check = good.clone().into_bytes();
    wrong_check[10] = if wrong_check[10] == b'9' {
        b'0'
    } else {
        wrong_check[10] + 1
    };
    let wrong_check = String::from_utf8(wrong_check).unwrap();
    let feb_31 = with_check_digits("310299");
    let cases = [
        (wrong_check.as_str(), "check digit"),
        (&good[..10], "11 digits"),
        ("1234567890a", "digit"),
        // 31 February, with correct check digits so the date is what is wrong.
        (feb_31.as_str(), "date"),
        ("", "11 digits"),
    ];
    for (value, message) in cases {
        let patient = v1::PatientIdentifier {
            system: ident::SYSTEM_FNR.into(),
            value: value.into(),
        };
        let p = pointer(&patient, ORG_A, 1, &["medications"]);
        let err = a.upsert(p).await.unwrap_err();
        assert_eq!(code(&err), Code::InvalidArgument, "{value:?}: {err}");
        let text = err.to_string();
        assert!(text.contains(message), "{value:?}: {text}");
        assert!(
            value.is_empty() || !text.contains(value),
            "message leaks the identifier: {text}"
        );
    }
    // Unknown system, and a D-nummer under the fødselsnummer system.
    let unknown = v1::PatientIdentifier {
        system: "urn:oid:1.2.3".into(),
        value: good.clone(),
    };
    assert_refused(&a, pointer(&unknown, ORG_A, 1, &["medications"]), "system").await;
    let dnr = v1::PatientIdentifier {
        system: ident::SYSTEM_FNR.into(),
        value: ident::synthetic_dnr(5),
    };
    assert_refused(&a, pointer(&dnr, ORG_A, 1, &["medications"]), "patient").await;
    node.stop().await;
}

#[tokio::test]
async fn identifiers_with_whitespace_around_them_are_refused() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let good = patient_id(21).value;
    for value in [
        format!(" {good}"),
        format!("{good}\n"),
        format!("\t{good}"),
        format!("{good}\u{a0}"),
    ] {
        let patient = v1::PatientIdentifier {
            system: ident::SYSTEM_FNR.into(),
            value,
        };
        let err = a
            .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains("patient.value: has whitespace"),
            "{err}"
        );
        let err = a.lookup(lookup(&patient)).await.unwrap_err();
        assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    }
    let patient = patient_id(21);
    let mut p = pointer(&patient, ORG_A, 1, &["medications"]);
    p.holder.as_mut().unwrap().organization_number = format!("{ORG_A} ");
    assert_refused(&a, p, "holder.organization_number: has whitespace").await;
    // Nothing was stored under the trimmed identifier.
    assert!(
        a.lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .is_empty()
    );
    node.stop().await;
}

#[tokio::test]
async fn bad_fields_are_refused_with_their_names() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(21);
    let base = pointer(&patient, ORG_A, 1, &["medications"]);

    let mut p = base.clone();
    p.endpoint.as_mut().unwrap().base_url = "http://plain.example/fhir".into();
    assert_refused(&a, p, "https").await;
    let mut p = base.clone();
    p.endpoint.as_mut().unwrap().base_url = "fhir.example".into();
    assert_refused(&a, p, "endpoint.base_url").await;
    let mut p = base.clone();
    p.endpoint.as_mut().unwrap().base_url = format!("https://x.example/{}", "a".repeat(600));
    assert_refused(&a, p, "longer than").await;
    let mut p = base.clone();
    p.categories = vec!["gossip".into()];
    assert_refused(&a, p, "unknown category").await;
    let mut p = base.clone();
    p.holder.as_mut().unwrap().organization_number = "98397472".into();
    assert_refused(&a, p, "holder.organization_number").await;
    let mut p = base.clone();
    p.holder.as_mut().unwrap().organization_number = "983974725".into();
    assert_refused(&a, p, "holder.organization_number").await;
    let mut p = base.clone();
    p.holder.as_mut().unwrap().name = "x".repeat(300);
    assert_refused(&a, p, "holder.name").await;
    let mut p = base.clone();
    p.endpoint.as_mut().unwrap().api_kind = 0;
    assert_refused(&a, p, "api_kind").await;
    node.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let world = World::new();
    let node = TestNode::start(world.config(true)).await;
    let a = world.client(ORG_A, node.addr()).await;
    let patient = patient_id(22);
    let mut p = pointer(&patient, ORG_A, 1, &["medications"]);
    // Well over the 4 MiB message limit.
    p.categories = vec!["medications".to_string(); 400_000];
    let err = a.upsert(p).await.unwrap_err();
    // gRPC's status code guide: a message over the limit is RESOURCE_EXHAUSTED.
    assert_eq!(code(&err), Code::ResourceExhausted, "{err}");
    assert!(
        err.to_string().contains("larger than this node accepts"),
        "{err}"
    );
    // Too many categories, but within the message size.
    let mut p = pointer(&patient, ORG_A, 1, &["medications"]);
    p.categories = vec!["medications".to_string(); 100];
    assert_refused(&a, p, "at most").await;
    assert!(
        a.lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .is_empty()
    );
    node.stop().await;
}

#[tokio::test]
async fn a_production_node_refuses_synthetic_identifiers() {
    let world = World::new();
    let node = TestNode::start(world.config(false)).await;
    let a = world.client(ORG_A, node.addr()).await;
    for value in [ident::synthetic_fnr(30), ident::synthetic_dnr(31)] {
        let system = if value.starts_with(['4', '5', '6', '7']) {
            ident::SYSTEM_DNR
        } else {
            ident::SYSTEM_FNR
        };
        let patient = v1::PatientIdentifier {
            system: system.into(),
            value,
        };
        let err = a
            .upsert(pointer(&patient, ORG_A, 1, &["medications"]))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::InvalidArgument);
        assert!(err.to_string().contains("synthetic"), "{err}");
        let err = a.lookup(lookup(&patient)).await.unwrap_err();
        assert_eq!(code(&err), Code::InvalidArgument);
    }
    node.stop().await;
}
