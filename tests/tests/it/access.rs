//! Requester tokens and the legal configuration, with real nodes and real signed
//! tokens: who may see what, blocks, opt-outs, admin rights and policy reloads.

use std::time::{Duration, SystemTime};

use pil_client::v1;
use pil_tests::*;
use tonic::Code;

/// A node with one patient who has an ordinary and a sensitive pointer at ORG_C.
async fn setup(world: &World) -> (TestNode, v1::PatientIdentifier) {
    let node = TestNode::start(world.config(true)).await;
    let patient = patient_id(500);
    let host = world.client(HOST, node.addr()).await;
    host.upsert(pointer(&patient, ORG_C, 1, &["medications"]))
        .await
        .unwrap();
    host.upsert(pointer(&patient, ORG_C, 2, &["mental-health"]))
        .await
        .unwrap();
    (node, patient)
}

fn categories(r: &v1::LookupResponse) -> Vec<String> {
    let mut c: Vec<String> = r
        .pointers
        .iter()
        .flat_map(|p| p.categories.clone())
        .collect();
    c.sort();
    c
}

#[tokio::test]
async fn decisions_follow_purpose_profession_care_relationship_and_sensitivity() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let addr = node.addr();

    // (purpose, profession, care relationship) -> Some(categories seen) or None (denied)
    let cases: Vec<(&str, &str, bool, Option<Vec<&str>>)> = vec![
        (
            "TREAT",
            "LE",
            true,
            Some(vec!["medications", "mental-health"]),
        ),
        (
            "COC",
            "LE",
            true,
            Some(vec!["medications", "mental-health"]),
        ),
        ("TREAT", "SP", true, Some(vec!["medications"])),
        ("TREAT", "LE", false, None),
        (
            "ETREAT",
            "SP",
            false,
            Some(vec!["medications", "mental-health"]),
        ),
        ("HRESCH", "LE", true, None),
        ("TREAT", "XX", true, None),
    ];
    for (purpose, profession, care, expected) in cases {
        let client = world
            .client_as(ORG_A, addr, |p| {
                p.purpose = purpose.into();
                p.profession = Some(profession.into());
                p.care_relationship = care;
            })
            .await;
        let result = client.lookup(lookup(&patient)).await;
        match expected {
            Some(cats) => {
                let r = result.unwrap_or_else(|e| panic!("{purpose}/{profession}/{care}: {e}"));
                assert_eq!(categories(&r), cats, "{purpose}/{profession}/{care}");
                assert!(!r.rules.is_empty(), "decision records its rules");
                assert!(r.rules.iter().all(|r| !r.legal_basis.is_empty()));
                assert_eq!(r.emergency, purpose == "ETREAT");
            }
            None => {
                let e = result.expect_err(&format!("{purpose}/{profession}/{care} allowed"));
                assert_eq!(code(&e), Code::PermissionDenied, "{e}");
                assert!(e.to_string().contains('§'), "names the legal basis: {e}");
            }
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn the_holder_sees_its_own_sensitive_pointers() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let nurse_at_holder = world
        .client_as(ORG_C, node.addr(), |p| p.profession = Some("SP".into()))
        .await;
    let r = nurse_at_holder.lookup(lookup(&patient)).await.unwrap();
    assert_eq!(categories(&r), ["medications", "mental-health"]);
    node.stop().await;
}

#[tokio::test]
async fn blocks_hide_pointers_from_the_blocked_only_and_can_be_lifted() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let addr = node.addr();
    let mut admin = world.client(OPERATOR, addr).await.admin();
    let doctor = world.client(ORG_A, addr).await;
    let colleague = world
        .client_as(ORG_A, addr, |p| p.hpr = Some("9144900".into()))
        .await;
    // Another professional (a psychologist) at another organization.
    let elsewhere = world
        .client_as(HOST, addr, |p| {
            p.hpr = Some("1234567".into());
            p.profession = Some("PS".into());
        })
        .await;

    use v1::block_target::Target;
    for target in [
        Target::HprNumber(HPR.into()),
        Target::Profession("LE".into()),
        Target::OrganizationNumber(ORG_A.into()),
    ] {
        let by_profession = matches!(target, Target::Profession(_));
        let by_org = matches!(target, Target::OrganizationNumber(_));
        let block = admin
            .create_block(v1::CreateBlockRequest {
                patient: Some(patient.clone()),
                block: Some(v1::Block {
                    target: Some(v1::BlockTarget {
                        target: Some(target),
                    }),
                    reason: "patient's wish".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .block
            .unwrap();
        let seen = doctor.lookup(lookup(&patient)).await.unwrap();
        assert!(seen.pointers.is_empty(), "blocked requester sees nothing");
        assert!(!seen.opted_out);
        let colleague_sees = colleague
            .lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .len();
        // A named-professional block spares the colleague; profession and
        // organization blocks do not.
        assert_eq!(colleague_sees, if by_profession || by_org { 0 } else { 2 });
        assert_eq!(
            elsewhere
                .lookup(lookup(&patient))
                .await
                .unwrap()
                .pointers
                .len(),
            2
        );

        let listed = admin
            .list_blocks(v1::ListBlocksRequest {
                patient: Some(patient.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.blocks.len(), 1);
        let lifted = admin
            .lift_block(v1::LiftBlockRequest {
                patient: Some(patient.clone()),
                block_id: block.block_id,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(lifted.lifted);
        assert_eq!(
            doctor
                .lookup(lookup(&patient))
                .await
                .unwrap()
                .pointers
                .len(),
            2
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn an_opted_out_patient_returns_nothing_and_says_so() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let mut admin = world.client(OPERATOR, node.addr()).await.admin();
    let doctor = world.client(ORG_A, node.addr()).await;
    admin
        .set_opt_out(v1::SetOptOutRequest {
            patient: Some(patient.clone()),
            reason: String::new(),
        })
        .await
        .unwrap();
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert!(r.opted_out);
    assert!(r.pointers.is_empty());
    let lifted = admin
        .lift_opt_out(v1::LiftOptOutRequest {
            patient: Some(patient.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lifted.lifted);
    let r = doctor.lookup(lookup(&patient)).await.unwrap();
    assert!(!r.opted_out);
    assert_eq!(r.pointers.len(), 2);
    node.stop().await;
}

#[tokio::test]
async fn admin_calls_without_the_operator_role_are_refused() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let mut not_operator = world.client(ORG_A, node.addr()).await.admin();
    let err = not_operator
        .set_opt_out(v1::SetOptOutRequest {
            patient: Some(patient.clone()),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = not_operator
        .reload_legal_config(v1::ReloadLegalConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let doctor = world.client(ORG_A, node.addr()).await;
    assert!(!doctor.lookup(lookup(&patient)).await.unwrap().opted_out);
    node.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let addr = node.addr();
    let issuer = world.issuer();
    let base = || doctor_token(&issuer);
    let now = SystemTime::now();
    let other =
        pil_auth::dev_issuer::DevIssuer::generate(pil_node::demo::DEV_ISSUER, "other-kid").unwrap();
    let good = base().sign().unwrap();
    let mut tampered = good.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let header = |alg: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"{alg}","typ":"at+jwt","kid":"dev-issuer-1"}}"#
        ))
    };
    let payload = good.split('.').nth(1).unwrap().to_string();
    let alg_none = format!("{}.{payload}.", header("none"));
    // The classic key-confusion forgery: HMAC keyed with the issuer's public key.
    let hmac_with_public_key = {
        use base64::Engine;
        use hmac::Mac;
        let jwks = std::fs::read(world.path().join("issuer/jwks.json")).unwrap();
        let signing_input = format!("{}.{payload}", header("HS256"));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&jwks).unwrap();
        mac.update(signing_input.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    };

    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            base()
                .issued_at(now - Duration::from_secs(3600))
                .expires_in(Duration::from_secs(60))
                .sign()
                .unwrap(),
        ),
        (
            "not yet valid",
            base()
                .not_before(now + Duration::from_secs(600))
                .sign()
                .unwrap(),
        ),
        (
            "wrong issuer",
            pil_auth::dev_issuer::DevIssuer::load(
                "https://evil.example",
                pil_node::demo::DEV_KID,
                world.path().join("issuer/issuer-key.pem"),
            )
            .unwrap()
            .token()
            .audience("pil")
            .scope("pil:lookup")
            .org_parent(ORG_A)
            .decision_ref("d", false)
            .sign()
            .unwrap(),
        ),
        ("wrong audience", base().audience("other").sign().unwrap()),
        (
            "extra audience",
            base().audiences(["pil", "other"]).sign().unwrap(),
        ),
        (
            "missing scope",
            base().scope("something-else").sign().unwrap(),
        ),
        ("alg none", alg_none),
        ("HMAC with the public key", hmac_with_public_key),
        ("tampered", tampered),
        (
            "unknown kid",
            other
                .token()
                .audience("pil")
                .scope("pil:lookup")
                .org_parent(ORG_A)
                .sign()
                .unwrap(),
        ),
        (
            "other organization",
            base().org_parent(ORG_B).sign().unwrap(),
        ),
        ("no attest", base().without_attest().sign().unwrap()),
    ];
    for (what, token) in cases {
        let client = world.client_with_token(ORG_A, addr, token, None).await;
        let err = client.lookup(lookup(&patient)).await.expect_err(what);
        assert_eq!(code(&err), Code::Unauthenticated, "{what}: {err}");
    }
    // No token at all.
    let bare = world
        .client_with_token(ORG_A, addr, String::new(), None)
        .await;
    assert_eq!(
        code(&bare.lookup(lookup(&patient)).await.unwrap_err()),
        Code::Unauthenticated
    );
    // The good one works.
    let client = world.client_with_token(ORG_A, addr, good, None).await;
    assert_eq!(
        client
            .lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .len(),
        2
    );
    node.stop().await;
}

#[tokio::test]
async fn dpop_bound_tokens_need_a_fresh_proof_from_their_key() {
    use pil_auth::dev_issuer::DpopKey;
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let addr = node.addr();
    let issuer = world.issuer();
    let key = DpopKey::generate().unwrap();
    let bound = doctor_token(&issuer).bound_to(&key).sign().unwrap();

    // With its key: fine (the client makes a fresh proof per call).
    let ok = world
        .client_with_token(
            ORG_A,
            addr,
            bound.clone(),
            Some(DpopKey::from_pem(&key.private_key_pem().unwrap()).unwrap()),
        )
        .await;
    assert_eq!(ok.lookup(lookup(&patient)).await.unwrap().pointers.len(), 2);
    assert_eq!(ok.lookup(lookup(&patient)).await.unwrap().pointers.len(), 2);

    // Missing proof, or a proof by another key.
    let missing = world
        .client_with_token(ORG_A, addr, bound.clone(), None)
        .await;
    assert_eq!(
        code(&missing.lookup(lookup(&patient)).await.unwrap_err()),
        Code::Unauthenticated
    );
    let wrong_key = world
        .client_with_token(
            ORG_A,
            addr,
            bound.clone(),
            Some(DpopKey::generate().unwrap()),
        )
        .await;
    assert_eq!(
        code(&wrong_key.lookup(lookup(&patient)).await.unwrap_err()),
        Code::Unauthenticated
    );

    // Hand-made proofs: another method, another URI, stale, replayed.
    let channel = world.raw_channel(ORG_A, addr).await;
    let mut raw = v1::lookup_service_client::LookupServiceClient::new(channel);
    let uri = format!("https://{addr}/pil.v1.LookupService/Lookup");
    let call = |proof: String| authorized_lookup(&patient, &format!("DPoP {bound}"), &proof);
    let fresh = key.proof("POST", &uri, &bound).unwrap();
    assert!(raw.lookup(call(fresh.clone())).await.is_ok());
    let replayed = raw.lookup(call(fresh)).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed:?}");
    for (what, proof) in [
        ("method", key.proof("GET", &uri, &bound).unwrap()),
        (
            "uri",
            key.proof(
                "POST",
                &format!("https://{addr}/pil.v1.PolicyService/Explain"),
                &bound,
            )
            .unwrap(),
        ),
        (
            "stale",
            key.proof_at(
                "POST",
                &uri,
                &bound,
                SystemTime::now() - Duration::from_secs(600),
            )
            .unwrap(),
        ),
    ] {
        let err = raw.lookup(call(proof)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_token_naming_other_patients_is_refused() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let client = world
        .client_as(ORG_A, node.addr(), |p| {
            p.patients = vec![patient_id(501).value]
        })
        .await;
    let err = client.lookup(lookup(&patient)).await.unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    let client = world
        .client_as(ORG_A, node.addr(), |p| {
            p.patients = vec![patient.value.clone()]
        })
        .await;
    assert_eq!(
        client
            .lookup(lookup(&patient))
            .await
            .unwrap()
            .pointers
            .len(),
        2
    );
    node.stop().await;
}

#[tokio::test]
async fn explain_answers_without_a_lookup() {
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let nurse = world
        .client_as(ORG_A, node.addr(), |p| p.profession = Some("SP".into()))
        .await;
    let r = nurse
        .explain(v1::ExplainRequest {
            categories: vec!["medications".into(), "mental-health".into()],
            patient: Some(patient.clone()),
        })
        .await
        .unwrap();
    assert!(r.allowed);
    assert!(!r.opted_out);
    let by: std::collections::HashMap<_, _> = r
        .categories
        .iter()
        .map(|c| (c.category.as_str(), c.allowed))
        .collect();
    assert!(by["medications"]);
    assert!(!by["mental-health"]);
    let researcher = world
        .client_as(ORG_A, node.addr(), |p| p.purpose = "HRESCH".into())
        .await;
    let r = researcher
        .explain(v1::ExplainRequest::default())
        .await
        .unwrap();
    assert!(!r.allowed);
    assert!(
        r.rules
            .iter()
            .any(|r| r.effect == v1::RuleEffect::Forbid as i32)
    );

    // For a patient who has opted out, the explanation says a lookup returns nothing.
    let mut admin = world.client(OPERATOR, node.addr()).await.admin();
    admin
        .set_opt_out(v1::SetOptOutRequest {
            patient: Some(patient.clone()),
            reason: String::new(),
        })
        .await
        .unwrap();
    let r = nurse
        .explain(v1::ExplainRequest {
            categories: vec![],
            patient: Some(patient.clone()),
        })
        .await
        .unwrap();
    assert!(r.opted_out);
    // An opt-out is a fact about the patient: a requester whose lookup would be
    // refused is not told it.
    for (who, refused) in [
        (
            "research purpose",
            world
                .client_as(ORG_A, node.addr(), |p| p.purpose = "HRESCH".into())
                .await,
        ),
        (
            "no care relationship",
            world
                .client_as(ORG_A, node.addr(), |p| p.care_relationship = false)
                .await,
        ),
        (
            "not health personnel",
            world
                .client_as(ORG_A, node.addr(), |p| p.profession = Some("XX".into()))
                .await,
        ),
    ] {
        assert!(
            refused.lookup(lookup(&patient)).await.is_err(),
            "{who}: a lookup is refused"
        );
        let r = refused
            .explain(v1::ExplainRequest {
                categories: vec![],
                patient: Some(patient.clone()),
            })
            .await
            .unwrap();
        assert!(!r.allowed, "{who}");
        assert!(!r.opted_out, "{who}: the opt-out must not be told");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_dpop_bound_token_is_refused_as_bearer() {
    use pil_auth::dev_issuer::DpopKey;
    let world = World::new();
    let (node, patient) = setup(&world).await;
    let addr = node.addr();
    let key = DpopKey::generate().unwrap();
    let bound = doctor_token(&world.issuer()).bound_to(&key).sign().unwrap();
    let channel = world.raw_channel(ORG_A, addr).await;
    let mut raw = v1::lookup_service_client::LookupServiceClient::new(channel);
    let uri = format!("https://{addr}/pil.v1.LookupService/Lookup");
    for scheme in ["Bearer", "bearer"] {
        let proof = key.proof("POST", &uri, &bound).unwrap();
        let req = authorized_lookup(&patient, &format!("{scheme} {bound}"), &proof);
        let err = raw.lookup(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(
            err.message()
                .contains("must be sent as `authorization: DPoP"),
            "{err:?}"
        );
    }
    // The same token under its own scheme is fine.
    let proof = key.proof("POST", &uri, &bound).unwrap();
    let req = authorized_lookup(&patient, &format!("DPoP {bound}"), &proof);
    assert_eq!(
        raw.lookup(req).await.unwrap().into_inner().pointers.len(),
        2
    );
    // And an unbound token is not one to present under the DPoP scheme.
    let unbound = doctor_token(&world.issuer()).sign().unwrap();
    let proof = key.proof("POST", &uri, &unbound).unwrap();
    let req = authorized_lookup(&patient, &format!("DPoP {unbound}"), &proof);
    let err = raw.lookup(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("not DPoP-bound"), "{err:?}");
    node.stop().await;
}

#[tokio::test]
async fn a_dpop_proof_made_for_one_node_is_refused_by_another() {
    use pil_auth::dev_issuer::DpopKey;
    let world = World::new();
    let a = TestNode::start(world.region_config("helse-vest")).await;
    let b = TestNode::start(world.region_config("helse-midt")).await;
    let patient = patient_id(77);
    let key = DpopKey::generate().unwrap();
    let bound = doctor_token(&world.issuer()).bound_to(&key).sign().unwrap();
    let call = |authority: String, proof: String| {
        (
            authority,
            authorized_lookup(&patient, &format!("DPoP {bound}"), &proof),
        )
    };
    // A proof made for node A, replayed once at node B with A's authority on the wire
    // (a raw HTTP/2 client can send any :authority).
    let for_a = key
        .proof(
            "POST",
            &format!("https://{}/pil.v1.LookupService/Lookup", a.addr()),
            &bound,
        )
        .unwrap();
    let (authority, req) = call(a.addr().to_string(), for_a);
    let err = raw_lookup_as(&world, b.addr(), &authority, req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("not one of this node's names"),
        "{err:?}"
    );
    // A name the node does not have at all.
    let elsewhere = format!("pil.example:{}", b.addr().port());
    let proof = key
        .proof(
            "POST",
            &format!("https://{elsewhere}/pil.v1.LookupService/Lookup"),
            &bound,
        )
        .unwrap();
    let (authority, req) = call(elsewhere, proof);
    let err = raw_lookup_as(&world, b.addr(), &authority, req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Each name in B's certificate, with B's port, is B.
    for host in ["localhost", "127.0.0.1"] {
        let authority = format!("{host}:{}", b.addr().port());
        let proof = key
            .proof(
                "POST",
                &format!("https://{authority}/pil.v1.LookupService/Lookup"),
                &bound,
            )
            .unwrap();
        let (authority, req) = call(authority, proof);
        raw_lookup_as(&world, b.addr(), &authority, req)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
    }
    a.stop().await;
    b.stop().await;
}

/// A hand-made lookup of `patient` with exactly this `authorization` and DPoP proof.
fn authorized_lookup(
    patient: &v1::PatientIdentifier,
    authorization: &str,
    proof: &str,
) -> tonic::Request<v1::LookupRequest> {
    let mut req = tonic::Request::new(lookup(patient));
    req.metadata_mut()
        .insert("authorization", authorization.parse().unwrap());
    req.metadata_mut().insert("dpop", proof.parse().unwrap());
    req
}

/// A lookup over a channel to `addr` whose requests carry `authority` as :authority.
async fn raw_lookup_as(
    world: &World,
    addr: std::net::SocketAddr,
    authority: &str,
    req: tonic::Request<v1::LookupRequest>,
) -> Result<v1::LookupResponse, tonic::Status> {
    let channel = world.raw_channel_addressed(ORG_A, addr, authority).await;
    let mut raw = v1::lookup_service_client::LookupServiceClient::new(channel);
    raw.lookup(req).await.map(|r| r.into_inner())
}
