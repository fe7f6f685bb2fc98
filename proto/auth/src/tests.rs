//! End-to-end tests: tokens and proofs minted by the development issuer, checked by the
//! verifier. One test per refusal in the acceptance list, plus the happy paths.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use crate::claims::{Code, ORGNR_SYSTEM, PURPOSE_OF_USE_SYSTEM};
use crate::dev_issuer::{DevIssuer, DpopKey, TokenBuilder};
use crate::dpop::DpopError;
use crate::jwk::{access_token_hash, b64url, thumbprint};
use crate::verify::{Jwks, RequestContext, TokenError, TokenVerifier, VerifierConfig};

const ISS: &str = "https://helseid-sts.pil.test";
const AUD: &str = "pil";
const SCOPE: &str = "pil:lookup";
const ORG: &str = "974589095";
const CHILD: &str = "974589087";
const HPR: &str = "9144900";
const URI: &str = "https://node.example:7443/pil.v1.LookupService/Lookup";

struct Fixture {
    issuer: DevIssuer,
    verifier: TokenVerifier,
    dpop: DpopKey,
    now: SystemTime,
}

fn config() -> VerifierConfig {
    VerifierConfig::new(ISS, AUD, SCOPE)
}

fn fixture_with(cfg: VerifierConfig) -> Fixture {
    let issuer = DevIssuer::generate(ISS, "key-2025").unwrap();
    let jwks = Jwks::from_json(&issuer.jwks().to_string()).unwrap();
    Fixture {
        verifier: TokenVerifier::new(cfg, jwks),
        issuer,
        dpop: DpopKey::generate().unwrap(),
        now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    }
}

fn fixture() -> Fixture {
    fixture_with(config())
}

impl Fixture {
    /// A token for ORG/CHILD and HPR, issued now.
    fn token(&self) -> TokenBuilder<'_> {
        self.issuer
            .token()
            .org_parent(ORG)
            .org_child(CHILD)
            .hpr_number(HPR)
            .issued_at(self.now)
    }

    fn ctx<'a>(&self, proof: Option<&'a str>) -> RequestContext<'a> {
        RequestContext::grpc(ORG, URI, proof).at(self.now)
    }

    fn verify(
        &self,
        token: &str,
        proof: Option<&str>,
    ) -> Result<crate::verify::VerifiedRequester, TokenError> {
        self.verifier.verify(token, &self.ctx(proof))
    }

    fn proof(&self, token: &str) -> String {
        self.dpop.proof_at("POST", URI, token, self.now).unwrap()
    }

    fn secs(&self, delta: i64) -> SystemTime {
        if delta >= 0 {
            self.now + Duration::from_secs(delta as u64)
        } else {
            self.now - Duration::from_secs((-delta) as u64)
        }
    }
}

/// Signs a hand-made header and payload (for tokens the dev issuer refuses to make).
fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

fn payload_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&crate::jwk::b64url_decode(part).unwrap()).unwrap()
}

fn dpop_err(result: Result<crate::verify::VerifiedRequester, TokenError>) -> DpopError {
    match result {
        Err(TokenError::Dpop(e)) => e,
        other => panic!("expected a DPoP error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- happy paths

#[test]
fn unbound_at_jwt_token_is_accepted() {
    let f = fixture();
    let token = f
        .token()
        .purpose_details("15", "urn:oid:2.16.578.1.12.4.1.1.9151")
        .healthcare_service("S03", "urn:oid:2.16.578.1.12.4.1.1.8655")
        .decision_ref("30F4AB40", true)
        .patient("13116900216", "urn:oid:2.16.578.1.12.4.1.4.1")
        .sign()
        .unwrap();
    let who = f.verify(&token, None).unwrap();
    assert_eq!(who.org_number, ORG);
    assert_eq!(who.child_org_number.as_deref(), Some(CHILD));
    assert_eq!(who.hpr_number.as_deref(), Some(HPR));
    assert_eq!(who.profession.as_deref(), Some("LE"));
    assert_eq!(
        who.purpose_of_use,
        Code::new("TREAT", PURPOSE_OF_USE_SYSTEM)
    );
    assert_eq!(who.purpose_of_use_details.as_ref().unwrap().code, "15");
    assert_eq!(who.healthcare_service.as_ref().unwrap().code, "S03");
    let decision = who.decision_ref.as_ref().unwrap();
    assert_eq!(decision.id.as_deref(), Some("30F4AB40"));
    assert_eq!(decision.user_selected, Some(true));
    assert_eq!(who.point_of_care.as_ref().unwrap().id, CHILD);
    assert_eq!(who.patients.len(), 1);
    assert_eq!(
        who.patients[0].identifier.as_ref().unwrap().id,
        "13116900216"
    );
    assert_eq!(who.client_id, crate::dev_issuer::DEFAULT_CLIENT_ID);
    assert_eq!(who.jti, payload_of(&token)["jti"].as_str().unwrap());
    assert_eq!(who.expires_at, f.secs(300));
    assert!(!who.dpop_bound);
    assert_eq!(who.dpop_jkt, None);
    assert_eq!(who.scopes, vec![SCOPE.to_owned()]);
}

#[test]
fn typ_jwt_and_media_type_forms_are_accepted() {
    let f = fixture();
    for typ in ["JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt"] {
        let token = f.token().typ(typ).sign().unwrap();
        assert!(f.verify(&token, None).is_ok(), "typ {typ}");
    }
}

#[test]
fn bound_token_with_valid_proof_is_accepted() {
    let f = fixture();
    let token = f
        .token()
        .bound_to(&f.dpop)
        .purpose("ETREAT")
        .profession("SP")
        .sign()
        .unwrap();
    let proof = f.proof(&token);
    let who = f.verify(&token, Some(&proof)).unwrap();
    assert!(who.dpop_bound);
    assert_eq!(who.dpop_jkt.as_deref(), Some(f.dpop.thumbprint()));
    assert_eq!(who.purpose_of_use.code, "ETREAT");
    assert_eq!(who.profession.as_deref(), Some("SP"));
}

#[test]
fn bound_token_is_accepted_when_dpop_is_required() {
    let mut cfg = config();
    cfg.require_dpop = true;
    let f = fixture_with(cfg);
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.proof(&token);
    assert!(f.verify(&token, Some(&proof)).unwrap().dpop_bound);
}

#[test]
fn proof_htu_ignores_query_and_fragment_and_normalizes_case_and_port() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f
        .dpop
        .proof_at(
            "POST",
            "HTTPS://NODE.example:7443/pil.v1.LookupService/Lookup",
            &token,
            f.now,
        )
        .unwrap();
    let ctx = RequestContext::grpc(
        ORG,
        "https://node.example:7443/pil.v1.LookupService/Lookup?trace=1#x",
        Some(&proof),
    )
    .at(f.now);
    assert!(f.verifier.verify(&token, &ctx).is_ok());
}

#[test]
fn eddsa_proof_key_is_accepted() {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let f = fixture();
    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let der = signing.to_pkcs8_der().unwrap();
    let key = EncodingKey::from_ed_der(der.as_bytes());
    let jwk =
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(signing.verifying_key().to_bytes())});
    let jkt = thumbprint(&jwk).unwrap();
    let token = f.token().cnf_jkt(jkt.clone()).sign().unwrap();
    let proof = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk}),
        &json!({"jti": "e1", "htm": "POST", "htu": URI, "iat": 1_800_000_000, "ath": access_token_hash(&token)}),
        &key,
        Algorithm::EdDSA,
    );
    let who = f.verify(&token, Some(&proof)).unwrap();
    assert_eq!(who.dpop_jkt.as_deref(), Some(jkt.as_str()));
}

// ---------------------------------------------------------------- time

#[test]
fn expired_token_is_refused() {
    let f = fixture();
    let token = f.token().issued_at(f.secs(-400)).sign().unwrap(); // exp = now - 100
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::Expired { .. })
    ));
}

#[test]
fn expiry_within_leeway_is_accepted_and_just_past_it_refused() {
    let f = fixture();
    let token = f.token().issued_at(f.secs(-305)).sign().unwrap(); // exp = now - 5
    assert!(f.verify(&token, None).is_ok());
    let token = f.token().issued_at(f.secs(-306)).sign().unwrap(); // exp = now - 6
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::Expired {
            exp: 1_799_999_994,
            now: 1_800_000_000
        })
    );
}

#[test]
fn not_yet_valid_token_is_refused() {
    let f = fixture();
    let token = f.token().not_before(f.secs(60)).sign().unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::NotYetValid { .. })
    ));
    // nbf within leeway is fine.
    let token = f.token().not_before(f.secs(5)).sign().unwrap();
    assert!(f.verify(&token, None).is_ok());
}

#[test]
fn token_issued_in_the_future_is_refused() {
    let f = fixture();
    let token = f
        .token()
        .issued_at(f.secs(120))
        .not_before(f.now)
        .sign()
        .unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::IssuedInFuture { .. })
    ));
}

// ---------------------------------------------------------------- issuer, audience, scope

#[test]
fn wrong_issuer_is_refused() {
    let f = fixture();
    let mut claims = f.token().build_claims();
    claims.iss = "https://helseid-sts.pil.test/".to_owned(); // exact match only
    let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::WrongIssuer { .. })
    ));
}

#[test]
fn wrong_audience_is_refused() {
    let f = fixture();
    let token = f.token().audience("nhn:kjernejournal").sign().unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::WrongAudience {
            expected: AUD.into(),
            found: vec!["nhn:kjernejournal".into()]
        })
    );
}

#[test]
fn extra_audience_is_refused() {
    let f = fixture();
    let token = f
        .token()
        .audiences([AUD, "nhn:kjernejournal"])
        .sign()
        .unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::ExtraAudience {
            extra: vec!["nhn:kjernejournal".into()]
        })
    );
    // Our audience alone, as an array, is fine.
    let token = f.token().audiences([AUD]).sign().unwrap();
    assert!(f.verify(&token, None).is_ok());
}

#[test]
fn missing_scope_is_refused() {
    let f = fixture();
    let token = f.token().scope("openid pil:lookup.read").sign().unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::MissingScope(SCOPE.into()))
    );
    let mut claims = f.token().build_claims();
    claims.scope = None;
    let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::MissingScope(SCOPE.into()))
    );
    // Among other scopes, and as an array, it is found.
    let token = f
        .token()
        .scope("openid pil:lookup offline_access")
        .sign()
        .unwrap();
    assert!(f.verify(&token, None).is_ok());
    let token = f
        .token()
        .claim("scope", json!(["openid", SCOPE]))
        .sign()
        .unwrap();
    assert!(f.verify(&token, None).is_ok());
}

#[test]
fn missing_client_id_or_jti_is_refused() {
    let f = fixture();
    let mut claims = f.token().build_claims();
    claims.client_id = None;
    let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::MissingClaim("client_id"))
    );
    let mut claims = f.token().build_claims();
    claims.jti = Some(String::new());
    let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingClaim("jti")));
}

// ---------------------------------------------------------------- header and signature

#[test]
fn alg_none_is_refused() {
    let f = fixture();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "at+jwt", "kid": "key-2025"});
        let token = format!(
            "{}.{}.",
            b64url(header.to_string()),
            b64url(claims.to_string())
        );
        assert_eq!(f.verify(&token, None), Err(TokenError::AlgNone), "{alg}");
    }
}

#[test]
fn hmac_signed_with_the_public_key_as_secret_is_refused() {
    let f = fixture();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    let public_jwk = f.issuer.public_jwk();
    let x = crate::jwk::b64url_decode(public_jwk["x"].as_str().unwrap()).unwrap();
    let y = crate::jwk::b64url_decode(public_jwk["y"].as_str().unwrap()).unwrap();
    let mut sec1 = vec![4u8];
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    let secrets: Vec<Vec<u8>> = vec![
        f.issuer.jwks().to_string().into_bytes(),
        public_jwk.to_string().into_bytes(),
        sec1,
    ];
    for secret in secrets {
        for (name, alg) in [
            ("HS256", Algorithm::HS256),
            ("HS384", Algorithm::HS384),
            ("HS512", Algorithm::HS512),
        ] {
            let header = json!({"alg": name, "typ": "at+jwt", "kid": "key-2025"});
            let token = sign_raw(&header, &claims, &EncodingKey::from_secret(&secret), alg);
            assert_eq!(
                f.verify(&token, None),
                Err(TokenError::SymmetricAlgorithm(name.into()))
            );
        }
    }
}

#[test]
fn tampered_signature_is_refused() {
    let f = fixture();
    let token = f.token().sign().unwrap();
    let (message, signature) = token.rsplit_once('.').unwrap();
    let mut sig = crate::jwk::b64url_decode(signature).unwrap();
    sig[10] ^= 0x01;
    let tampered = format!("{message}.{}", b64url(&sig));
    assert_eq!(f.verify(&tampered, None), Err(TokenError::BadSignature));
    // A signature of the wrong length, too.
    let truncated = format!("{message}.{}", b64url(&sig[..32]));
    assert_eq!(f.verify(&truncated, None), Err(TokenError::BadSignature));
}

#[test]
fn tampered_payload_is_refused() {
    let f = fixture();
    let token = f.token().sign().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = payload_of(&token);
    claims["helseid://claims/client/claims/orgnr_parent"] = json!("999999999");
    let forged = format!("{}.{}.{}", parts[0], b64url(claims.to_string()), parts[2]);
    assert_eq!(f.verify(&forged, None), Err(TokenError::BadSignature));
}

#[test]
fn unknown_kid_is_refused() {
    let f = fixture();
    let stranger = DevIssuer::generate(ISS, "key-unknown").unwrap();
    let token = stranger
        .token()
        .org_parent(ORG)
        .issued_at(f.now)
        .sign()
        .unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::UnknownKid("key-unknown".into()))
    );
    // A token from another key that claims our kid fails on the signature.
    let impostor = DevIssuer::generate(ISS, "key-2025").unwrap();
    let token = impostor
        .token()
        .org_parent(ORG)
        .issued_at(f.now)
        .sign()
        .unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::BadSignature));
}

#[test]
fn missing_kid_is_refused() {
    let f = fixture();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    let token = sign_raw(
        &json!({"alg": "ES256", "typ": "at+jwt"}),
        &claims,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingKid));
}

#[test]
fn algorithm_not_fitting_the_key_is_refused() {
    let f = fixture();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    for alg in ["ES384", "RS256", "PS256", "EdDSA"] {
        let token = sign_raw(
            &json!({"alg": alg, "typ": "at+jwt", "kid": "key-2025"}),
            &claims,
            f.issuer.encoding_key(),
            Algorithm::ES256,
        );
        assert!(
            matches!(
                f.verify(&token, None),
                Err(TokenError::KeyAlgorithmMismatch { .. })
            ),
            "{alg}"
        );
    }
    let token = sign_raw(
        &json!({"alg": "ES512", "typ": "at+jwt", "kid": "key-2025"}),
        &claims,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::UnsupportedAlgorithm("ES512".into()))
    );
}

#[test]
fn wrong_or_missing_typ_and_crit_are_refused() {
    let f = fixture();
    let token = f.token().typ("dpop+jwt").sign().unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::WrongType(Some("dpop+jwt".into())))
    );
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    let token = sign_raw(
        &json!({"alg": "ES256", "kid": "key-2025"}),
        &claims,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(f.verify(&token, None), Err(TokenError::WrongType(None)));
    let token = sign_raw(
        &json!({"alg": "ES256", "typ": "at+jwt", "kid": "key-2025", "crit": ["exp"]}),
        &claims,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(f.verify(&token, None), Err(TokenError::CriticalHeader));
}

#[test]
fn embedded_header_keys_are_not_trusted() {
    // An attacker signs with their own key and puts it in the header: the verifier uses only
    // the JWKS, so the signature fails under the real key.
    let f = fixture();
    let attacker = DevIssuer::generate(ISS, "key-2025").unwrap();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    let token = sign_raw(
        &json!({"alg": "ES256", "typ": "at+jwt", "kid": "key-2025", "jwk": attacker.public_jwk(), "jku": "https://evil.example/jwks"}),
        &claims,
        attacker.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(f.verify(&token, None), Err(TokenError::BadSignature));
}

#[test]
fn malformed_tokens_are_refused() {
    let f = fixture();
    for bad in [
        "",
        "abc",
        "a.b",
        "a.b.c.d.e",
        "!!.!!.!!",
        &"x".repeat(40_000),
    ] {
        assert!(
            matches!(f.verify(bad, None), Err(TokenError::Malformed(_))),
            "{bad:.20}"
        );
    }
    // Claims of the wrong type after a good signature.
    let token = sign_raw(
        &json!({"alg": "ES256", "typ": "at+jwt", "kid": "key-2025"}),
        &json!({"iss": ISS, "aud": AUD, "exp": "soon"}),
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::InvalidClaims(_))
    ));
}

#[test]
fn hostile_header_and_claim_values_do_not_panic() {
    let f = fixture();
    let claims = serde_json::to_value(f.token().build_claims()).unwrap();
    for typ in ["applicatio€/at+jwt", "€€€€€€€€€€€€€€", "ü"] {
        let token = sign_raw(
            &json!({"alg": "ES256", "typ": typ, "kid": "key-2025"}),
            &claims,
            f.issuer.encoding_key(),
            Algorithm::ES256,
        );
        assert!(matches!(
            f.verify(&token, None),
            Err(TokenError::WrongType(_))
        ));
    }
    let token = sign_raw(
        &json!({"alg": "€S", "typ": "at+jwt", "kid": "key-2025"}),
        &claims,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::UnsupportedAlgorithm(_))
    ));
    // An exp at the edge of what SystemTime can hold.
    let mut huge = claims.clone();
    huge["exp"] = json!(i64::MAX);
    let token = sign_raw(
        &json!({"alg": "ES256", "typ": "at+jwt", "kid": "key-2025"}),
        &huge,
        f.issuer.encoding_key(),
        Algorithm::ES256,
    );
    // Representable on some platforms, not on others: either way, no panic.
    assert!(matches!(
        f.verify(&token, None),
        Ok(_) | Err(TokenError::InvalidClaims(_))
    ));
    // Duplicate header parameters.
    let header = r#"{"alg":"ES256","typ":"at+jwt","kid":"key-2025","kid":"other"}"#;
    let message = format!("{}.{}", b64url(header), b64url(claims.to_string()));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        f.issuer.encoding_key(),
        Algorithm::ES256,
    )
    .unwrap();
    assert!(matches!(
        f.verify(&format!("{message}.{signature}"), None),
        Err(TokenError::Malformed(_))
    ));
}

// ---------------------------------------------------------------- organization and attest

#[test]
fn organization_not_matching_the_certificate_is_refused() {
    let f = fixture();
    let token = f.token().sign().unwrap();
    let ctx = RequestContext::grpc("987654321", URI, None).at(f.now);
    assert_eq!(
        f.verifier.verify(&token, &ctx),
        Err(TokenError::OrganizationMismatch {
            token_org: ORG.into(),
            cert_org: "987654321".into()
        })
    );
    // The certificate naming the child org (point of care) is not enough either.
    let ctx = RequestContext::grpc(CHILD, URI, None).at(f.now);
    assert!(matches!(
        f.verifier.verify(&token, &ctx),
        Err(TokenError::OrganizationMismatch { .. })
    ));
}

#[test]
fn missing_or_malformed_org_numbers_are_refused() {
    let f = fixture();
    let token = f.issuer.token().issued_at(f.now).sign().unwrap();
    assert_eq!(
        f.verify(&token, None),
        Err(TokenError::MissingClaim("orgnr_parent"))
    );
    let token = f.token().org_child("12345").sign().unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::InvalidOrgNumber {
            claim: "orgnr_child",
            ..
        })
    ));
    // Nine digits with a wrong check digit, as every PIL API refuses them.
    let token = f.token().org_child("983974725").sign().unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::InvalidOrgNumber {
            claim: "orgnr_child",
            ..
        })
    ));
    for bad in ["91449OO", "1234567890"] {
        let token = f.token().hpr_number(bad).sign().unwrap();
        assert!(
            matches!(f.verify(&token, None), Err(TokenError::InvalidHprNumber(_))),
            "{bad}"
        );
    }
}

#[test]
fn token_without_attest_is_refused() {
    let f = fixture();
    let token = f.token().without_attest().sign().unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingAttest));
    // authorization_details with only other types.
    let token = f
        .token()
        .without_attest()
        .claim(
            "authorization_details",
            json!([{"type": "helseid_authorization"}]),
        )
        .sign()
        .unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingAttest));
}

#[test]
fn attest_without_purpose_is_refused() {
    let f = fixture();
    let token = f.token().without_purpose().sign().unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingPurposeOfUse));
    let token = f.token().purpose("").sign().unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::MissingPurposeOfUse));
}

#[test]
fn purpose_in_another_code_system_is_refused() {
    let f = fixture();
    let token = f
        .token()
        .purpose_coded(Code::new(
            "TREAT",
            "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        ))
        .sign()
        .unwrap();
    assert!(matches!(
        f.verify(&token, None),
        Err(TokenError::InvalidPurposeOfUse(_))
    ));
    // The bare OID is the same system.
    let token = f
        .token()
        .purpose_coded(Code::new("COC", "2.16.840.1.113883.1.11.20448"))
        .sign()
        .unwrap();
    assert_eq!(
        f.verify(&token, None).unwrap().purpose_of_use,
        Code::new("COC", PURPOSE_OF_USE_SYSTEM)
    );
}

#[test]
fn two_attests_are_refused() {
    let f = fixture();
    let mut claims = f.token().build_claims();
    let details = claims.authorization_details.take().unwrap();
    let entry = details.entries().unwrap().remove(0);
    claims.authorization_details = Some(crate::claims::AuthorizationDetails::from_entries(vec![
        entry.clone(),
        entry,
    ]));
    let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::AmbiguousAttest(2)));
}

#[test]
fn attest_contradicting_the_token_is_refused() {
    let f = fixture();
    let base = f.token().build_claims();
    let entry = base
        .authorization_details
        .as_ref()
        .unwrap()
        .entries()
        .unwrap()
        .remove(0);

    let mut other_entity = entry.clone();
    other_entity["practitioner"]["legal_entity"] =
        json!({"id": "987654321", "system": ORGNR_SYSTEM});
    let mut other_poc = entry.clone();
    other_poc["practitioner"]["point_of_care"] = json!({"id": "987654321", "system": ORGNR_SYSTEM});
    let mut other_hpr = entry.clone();
    other_hpr["practitioner"]["hpr_nr"] = json!("1234567");
    let mut other_profession_system = entry;
    other_profession_system["practitioner"]["authorization"]["system"] = json!("urn:oid:1.2.3");

    for (variant, expect_mismatch) in [
        (other_entity, true),
        (other_poc, true),
        (other_hpr, true),
        (other_profession_system, false),
    ] {
        let mut claims = base.clone();
        claims.authorization_details =
            Some(crate::claims::AuthorizationDetails::from_entries(vec![
                variant,
            ]));
        let token = f.issuer.sign_claims(&claims, "at+jwt").unwrap();
        let result = f.verify(&token, None);
        if expect_mismatch {
            assert!(
                matches!(result, Err(TokenError::AttestMismatch(_))),
                "{result:?}"
            );
        } else {
            assert!(
                matches!(result, Err(TokenError::InvalidAttest(_))),
                "{result:?}"
            );
        }
    }
}

#[test]
fn minimal_helseid_style_attest_is_accepted() {
    // As the HelseID sample sends it: no HPR in the attest, no child org, `patients: [{}]`,
    // and the single-object form of authorization_details.
    let f = fixture();
    let attest = json!({
        "type": "nhn:tillitsrammeverk:parameters",
        "practitioner": {
            "authorization": {"code": "LE", "system": "urn:oid:2.16.578.1.12.4.1.1.9060"},
            "legal_entity": {"id": ORG, "system": ORGNR_SYSTEM},
            "point_of_care": {"id": ORG, "system": ORGNR_SYSTEM}
        },
        "care_relationship": {
            "purpose_of_use": {"code": "TREAT", "system": PURPOSE_OF_USE_SYSTEM},
            "healthcare_service": {"code": "S03", "system": "urn:oid:2.16.578.1.12.4.1.1.8655"},
            "decision_ref": {"id": "30F4AB40-DBC2-41A7-8AC4-181AD3FDC25B", "user_selected": true}
        },
        "patients": [{}]
    });
    let token = f
        .issuer
        .token()
        .org_parent(ORG)
        .issued_at(f.now)
        .without_attest()
        .claim("authorization_details", attest)
        .sign()
        .unwrap();
    let who = f.verify(&token, None).unwrap();
    assert_eq!(who.hpr_number, None);
    assert_eq!(who.child_org_number, None);
    assert_eq!(who.profession.as_deref(), Some("LE"));
    assert_eq!(who.patients.len(), 1);
    assert!(who.patients[0].identifier.is_none());
}

// ---------------------------------------------------------------- DPoP

#[test]
fn bound_token_without_proof_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    assert_eq!(f.verify(&token, None), Err(TokenError::DpopProofMissing));
}

#[test]
fn unbound_token_is_refused_when_dpop_is_required() {
    let mut cfg = config();
    cfg.require_dpop = true;
    let f = fixture_with(cfg);
    let token = f.token().sign().unwrap();
    let proof = f.proof(&token);
    assert_eq!(
        f.verify(&token, Some(&proof)),
        Err(TokenError::DpopRequired)
    );
    assert_eq!(f.verify(&token, None), Err(TokenError::DpopRequired));
}

#[test]
fn proof_signed_by_another_key_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let thief = DpopKey::generate().unwrap();
    let proof = thief.proof_at("POST", URI, &token, f.now).unwrap();
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::KeyMismatch { .. }
    ));
}

#[test]
fn proof_with_a_swapped_jwk_fails_its_signature() {
    // Signed by the thief, but showing the legitimate public key.
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let thief = DpopKey::generate().unwrap();
    let proof = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": f.dpop.public_jwk()}),
        &json!({"jti": "j", "htm": "POST", "htu": URI, "iat": 1_800_000_000, "ath": access_token_hash(&token)}),
        thief.encoding_key(),
        Algorithm::ES256,
    );
    assert_eq!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::BadSignature
    );
}

#[test]
fn proof_for_another_method_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    for method in ["GET", "post"] {
        let proof = f.dpop.proof_at(method, URI, &token, f.now).unwrap();
        assert_eq!(
            dpop_err(f.verify(&token, Some(&proof))),
            DpopError::MethodMismatch {
                expected: "POST".into(),
                found: method.into()
            }
        );
    }
}

#[test]
fn proof_for_another_uri_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    for uri in [
        "https://node.example:7443/pil.v1.LookupService/Subscribe",
        "https://other.example:7443/pil.v1.LookupService/Lookup",
        "https://node.example:8443/pil.v1.LookupService/Lookup",
        "http://node.example:7443/pil.v1.LookupService/Lookup",
        "/pil.v1.LookupService/Lookup",
    ] {
        let proof = f.dpop.proof_at("POST", uri, &token, f.now).unwrap();
        assert!(
            matches!(
                dpop_err(f.verify(&token, Some(&proof))),
                DpopError::UriMismatch { .. }
            ),
            "{uri}"
        );
    }
}

#[test]
fn stale_proof_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.dpop.proof_at("POST", URI, &token, f.secs(-66)).unwrap();
    assert_eq!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::Stale {
            iat: 1_799_999_934,
            now: 1_800_000_000,
            window_secs: 60
        }
    );
    // Window plus leeway is still fresh.
    let proof = f.dpop.proof_at("POST", URI, &token, f.secs(-65)).unwrap();
    assert!(f.verify(&token, Some(&proof)).is_ok());
}

#[test]
fn proof_from_the_future_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.dpop.proof_at("POST", URI, &token, f.secs(30)).unwrap();
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::IssuedInFuture { .. }
    ));
    let proof = f.dpop.proof_at("POST", URI, &token, f.secs(5)).unwrap();
    assert!(f.verify(&token, Some(&proof)).is_ok());
}

#[test]
fn proof_with_wrong_ath_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let other_token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.dpop.proof_at("POST", URI, &other_token, f.now).unwrap();
    assert_eq!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::AthMismatch
    );
    let no_ath = f
        .dpop
        .sign_proof(&json!({"jti": "j2", "htm": "POST", "htu": URI, "iat": 1_800_000_000}))
        .unwrap();
    assert_eq!(
        dpop_err(f.verify(&token, Some(&no_ath))),
        DpopError::MissingAth
    );
}

#[test]
fn replayed_proof_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.proof(&token);
    assert!(f.verify(&token, Some(&proof)).is_ok());
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::Replayed(_)
    ));
    // A fresh proof for the same token is fine.
    let again = f.proof(&token);
    assert!(f.verify(&token, Some(&again)).is_ok());
    // The same jti in a proof made later is still a replay within the window.
    let jti = payload_of(&proof)["jti"].clone();
    let same_jti = f
        .dpop
        .sign_proof(&json!({"jti": jti, "htm": "POST", "htu": URI, "iat": 1_800_000_010, "ath": access_token_hash(&token)}))
        .unwrap();
    let ctx = RequestContext::grpc(ORG, URI, Some(&same_jti)).at(f.secs(10));
    assert!(matches!(
        f.verifier.verify(&token, &ctx),
        Err(TokenError::Dpop(DpopError::Replayed(_)))
    ));
}

#[test]
fn failed_checks_do_not_burn_the_jti() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.proof(&token);
    // Presented with the wrong certificate first: refused before the proof is looked at.
    let wrong = RequestContext::grpc("987654321", URI, Some(&proof)).at(f.now);
    assert!(f.verifier.verify(&token, &wrong).is_err());
    assert!(f.verify(&token, Some(&proof)).is_ok());
}

#[test]
fn proof_header_refusals() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let claims = json!({"jti": "h", "htm": "POST", "htu": URI, "iat": 1_800_000_000, "ath": access_token_hash(&token)});
    let key = f.dpop.encoding_key();
    let jwk = f.dpop.public_jwk().clone();
    let cases: Vec<(Value, DpopError)> = vec![
        (
            json!({"typ": "JWT", "alg": "ES256", "jwk": jwk}),
            DpopError::WrongType(Some("JWT".into())),
        ),
        (
            json!({"alg": "ES256", "jwk": jwk}),
            DpopError::WrongType(None),
        ),
        (
            json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}),
            DpopError::SymmetricAlgorithm("HS256".into()),
        ),
        (
            json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}),
            DpopError::KeyAlgorithmMismatch("RS256".into()),
        ),
        (
            json!({"typ": "dpop+jwt", "alg": "ES256"}),
            DpopError::MissingJwk,
        ),
        (
            json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk, "crit": ["x"]}),
            DpopError::CriticalHeader,
        ),
    ];
    for (header, expected) in cases {
        let proof = sign_raw(&header, &claims, key, Algorithm::ES256);
        assert_eq!(
            dpop_err(f.verify(&token, Some(&proof))),
            expected,
            "{header}"
        );
    }
    // alg none
    let proof = format!(
        "{}.{}.",
        b64url(json!({"typ": "dpop+jwt", "alg": "none", "jwk": jwk}).to_string()),
        b64url(claims.to_string())
    );
    assert_eq!(dpop_err(f.verify(&token, Some(&proof))), DpopError::AlgNone);
    // Private key material in the jwk.
    let pem = f.dpop.private_key_pem().unwrap();
    let secret = {
        use p256::pkcs8::DecodePrivateKey;
        p256::SecretKey::from_pkcs8_pem(&pem).unwrap()
    };
    let mut private_jwk = jwk.clone();
    private_jwk["d"] = json!(b64url(secret.to_bytes()));
    let proof = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": private_jwk}),
        &claims,
        key,
        Algorithm::ES256,
    );
    assert_eq!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::PrivateKeyInJwk("d".into())
    );
    // A symmetric jwk.
    let proof = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
        &claims,
        key,
        Algorithm::ES256,
    );
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::PrivateKeyInJwk(_)
    ));
    // Garbage.
    assert!(matches!(
        dpop_err(f.verify(&token, Some("not.a.proof"))),
        DpopError::Malformed(_)
    ));
}

#[test]
fn proof_with_missing_claims_is_refused() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let full = json!({"jti": "m", "htm": "POST", "htu": URI, "iat": 1_800_000_000, "ath": access_token_hash(&token)});
    for missing in ["jti", "htm", "htu", "iat"] {
        let mut claims = full.clone();
        claims.as_object_mut().unwrap().remove(missing);
        let proof = f.dpop.sign_proof(&claims).unwrap();
        assert!(
            matches!(
                dpop_err(f.verify(&token, Some(&proof))),
                DpopError::InvalidClaims(_)
            ),
            "{missing}"
        );
    }
    let mut claims = full;
    claims["jti"] = json!("x".repeat(300));
    let proof = f.dpop.sign_proof(&claims).unwrap();
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::InvalidClaims(_)
    ));
}

#[test]
fn error_codes_are_distinct() {
    let errors = [
        TokenError::AlgNone,
        TokenError::BadSignature,
        TokenError::MissingAttest,
        TokenError::DpopProofMissing,
        TokenError::Dpop(DpopError::Replayed("x".into())),
        TokenError::Dpop(DpopError::AthMismatch),
    ];
    let codes: std::collections::HashSet<&str> = errors.iter().map(TokenError::code).collect();
    assert_eq!(codes.len(), errors.len());
    // Every refusal has a human-readable reason.
    for e in &errors {
        assert!(!e.to_string().is_empty());
    }
}

// ---------------------------------------------------------------- keys

#[test]
fn key_rotation_accepts_tokens_signed_with_either_key() {
    let old = DevIssuer::generate(ISS, "key-2024").unwrap();
    let new = DevIssuer::generate(ISS, "key-2025").unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let jwks = Jwks::from_json(&DevIssuer::jwks_of(&[&old, &new]).to_string()).unwrap();
    assert_eq!(jwks.kids(), vec!["key-2024", "key-2025"]);
    let verifier = TokenVerifier::new(config(), jwks);
    let ctx = RequestContext::grpc(ORG, URI, None).at(now);
    for issuer in [&old, &new] {
        let token = issuer
            .token()
            .org_parent(ORG)
            .issued_at(now)
            .sign()
            .unwrap();
        assert!(verifier.verify(&token, &ctx).is_ok(), "{}", issuer.kid());
    }
    // After the old key is withdrawn, its tokens are refused.
    let only_new = Jwks::from_json(&new.jwks().to_string()).unwrap();
    let reloaded = TokenVerifier::with_replay_cache(config(), only_new, verifier.replay_cache());
    let token = old.token().org_parent(ORG).issued_at(now).sign().unwrap();
    assert_eq!(
        reloaded.verify(&token, &ctx),
        Err(TokenError::UnknownKid("key-2024".into()))
    );
}

#[test]
fn reload_keeps_the_replay_cache() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap();
    let proof = f.proof(&token);
    assert!(f.verify(&token, Some(&proof)).is_ok());
    let jwks = Jwks::from_json(&f.issuer.jwks().to_string()).unwrap();
    let reloaded = TokenVerifier::with_replay_cache(config(), jwks, f.verifier.replay_cache());
    assert!(matches!(
        reloaded.verify(&token, &f.ctx(Some(&proof))),
        Err(TokenError::Dpop(DpopError::Replayed(_)))
    ));
}

#[test]
fn demo_flow_through_files() {
    let dir = std::env::temp_dir().join(format!("pil-auth-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let issuer = DevIssuer::generate(ISS, "demo").unwrap();
    issuer
        .write_files(dir.join("issuer.pem"), dir.join("jwks.json"))
        .unwrap();
    let verifier = TokenVerifier::from_jwks_file(config(), dir.join("jwks.json")).unwrap();
    // A client process reloads the issuer key and mints a bound token.
    let client_issuer = DevIssuer::load(ISS, "demo", dir.join("issuer.pem")).unwrap();
    let key = DpopKey::generate().unwrap();
    let token = client_issuer
        .token()
        .org_parent(ORG)
        .hpr_number(HPR)
        .bound_to(&key)
        .sign()
        .unwrap();
    let proof = key.proof("POST", URI, &token).unwrap();
    let who = verifier
        .verify(&token, &RequestContext::grpc(ORG, URI, Some(&proof)))
        .unwrap();
    assert!(who.dpop_bound);
    assert_eq!(who.hpr_number.as_deref(), Some(HPR));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ------------------------------------------------------- reused signature checks

/// A token seen before skips only its signature check: every claim and the DPoP proof
/// are checked again on each call.
#[test]
fn a_reused_token_is_checked_again_on_every_call() {
    let f = fixture();
    let token = f.token().bound_to(&f.dpop).sign().unwrap(); // exp = now + 300
    assert!(f.verify(&token, Some(&f.proof(&token))).is_ok());
    assert!(f.verify(&token, Some(&f.proof(&token))).is_ok());

    // The same proof again is a replay, and no proof at all is refused.
    let proof = f.proof(&token);
    assert!(f.verify(&token, Some(&proof)).is_ok());
    assert!(matches!(
        dpop_err(f.verify(&token, Some(&proof))),
        DpopError::Replayed(_)
    ));
    assert_eq!(f.verify(&token, None), Err(TokenError::DpopProofMissing));

    // From another organization's certificate.
    let ctx = RequestContext::grpc("987654321", URI, None).at(f.now);
    assert!(matches!(
        f.verifier.verify(&token, &ctx),
        Err(TokenError::OrganizationMismatch { .. })
    ));

    // Later, the same token has expired.
    let later = f.secs(400);
    let proof = f.dpop.proof_at("POST", URI, &token, later).unwrap();
    let ctx = RequestContext::grpc(ORG, URI, Some(&proof)).at(later);
    assert!(matches!(
        f.verifier.verify(&token, &ctx),
        Err(TokenError::Expired { .. })
    ));
}

/// A refused signature is not remembered as good, and a verifier with other keys does
/// not trust what another verifier checked.
#[test]
fn only_good_signatures_under_the_same_keys_are_reused() {
    let f = fixture();
    let token = f.token().sign().unwrap();
    let (rest, signature) = token.rsplit_once('.').unwrap();
    let mut forged = signature.as_bytes().to_vec();
    forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
    let forged = format!("{rest}.{}", String::from_utf8(forged).unwrap());
    for _ in 0..2 {
        assert_eq!(f.verify(&forged, None), Err(TokenError::BadSignature));
    }
    assert!(f.verify(&token, None).is_ok());

    // Keys rotated: a verifier with only the new issuer's keys refuses the old token.
    let other = DevIssuer::generate(ISS, "key-2025").unwrap();
    let jwks = Jwks::from_json(&other.jwks().to_string()).unwrap();
    let rotated = TokenVerifier::new(config(), jwks);
    assert_eq!(
        rotated.verify(&token, &f.ctx(None)),
        Err(TokenError::BadSignature)
    );
}
