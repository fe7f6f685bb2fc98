//! A development token issuer and DPoP client key, standing in for HelseID in the demo and in
//! tests.
//!
//! It mints ES256 access tokens with the same claim types the verifier reads
//! ([`crate::claims`]), and makes DPoP proofs. It uses no verifier type, so a client crate can
//! depend on `pil-auth` with only the `dev-issuer` feature. **Not for production**: the signing
//! key is a file on disk and nothing checks who asks for a token.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::SecretKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand::RngCore;
use rand::rngs::OsRng;
use serde_json::{Value, json};

use crate::claims::{
    AccessTokenClaims, Audience, AuthorizationDetails, CareRelationship, Code, Confirmation,
    DecisionRef, HPR_AUTHORIZATION_SYSTEM, HPR_NUMBER_SYSTEM, HprNumber, Identifier, ORGNR_SYSTEM,
    PURPOSE_OF_USE_SYSTEM, Practitioner, Scope, TillitsrammeverkAttest,
};
use crate::jwk::{access_token_hash, b64url, htu_from_uri, thumbprint};

/// Default audience of minted tokens.
pub const DEFAULT_AUDIENCE: &str = "pil";
/// Default scope of minted tokens.
pub const DEFAULT_SCOPE: &str = "pil:lookup";
/// Default `client_id` of minted tokens.
pub const DEFAULT_CLIENT_ID: &str = "pil-dev-client";
/// Default lifetime of minted tokens.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// Why the development issuer failed.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    /// Reading or writing a key file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The private key PEM could not be read or written.
    #[error("private key PEM: {0}")]
    Pem(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
    /// A JWK could not be built.
    #[error("JWK: {0}")]
    Jwk(String),
}

/// An ES256 key pair with its public JWK; shared by the issuer and the DPoP client key.
struct EcKeyPair {
    secret: SecretKey,
    encoding_key: EncodingKey,
    /// Public JWK without `kid`/`use`/`alg`.
    public_jwk: Value,
}

impl EcKeyPair {
    fn generate() -> Result<Self, DevIssuerError> {
        Self::from_secret(SecretKey::random(&mut OsRng))
    }

    fn from_secret(secret: SecretKey) -> Result<Self, DevIssuerError> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| DevIssuerError::Pem(e.to_string()))?;
        let encoding_key = EncodingKey::from_ec_der(der.as_bytes());
        let point = secret.public_key().to_encoded_point(false);
        let (x, y) = match (point.x(), point.y()) {
            (Some(x), Some(y)) => (b64url(x), b64url(y)),
            _ => {
                return Err(DevIssuerError::Jwk(
                    "public key is the identity point".into(),
                ));
            }
        };
        let public_jwk = json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y });
        Ok(EcKeyPair {
            secret,
            encoding_key,
            public_jwk,
        })
    }

    fn private_pem(&self) -> Result<Zeroizing<String>, DevIssuerError> {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| DevIssuerError::Pem(e.to_string()))
    }
}

/// The development issuer: an ES256 signing key with a `kid`, and the issuer name it signs as.
pub struct DevIssuer {
    issuer: String,
    kid: String,
    key: EcKeyPair,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// A new issuer with a freshly generated P-256 key.
    pub fn generate(
        issuer: impl Into<String>,
        kid: impl Into<String>,
    ) -> Result<Self, DevIssuerError> {
        Ok(DevIssuer {
            issuer: issuer.into(),
            kid: kid.into(),
            key: EcKeyPair::generate()?,
        })
    }

    /// An issuer from a PKCS#8 PEM private key (as written by [`DevIssuer::write_files`]).
    pub fn from_pem(
        issuer: impl Into<String>,
        kid: impl Into<String>,
        pem: &str,
    ) -> Result<Self, DevIssuerError> {
        let secret =
            SecretKey::from_pkcs8_pem(pem).map_err(|e| DevIssuerError::Pem(e.to_string()))?;
        Ok(DevIssuer {
            issuer: issuer.into(),
            kid: kid.into(),
            key: EcKeyPair::from_secret(secret)?,
        })
    }

    /// An issuer from a PEM file.
    pub fn load(
        issuer: impl Into<String>,
        kid: impl Into<String>,
        private_key_path: impl AsRef<Path>,
    ) -> Result<Self, DevIssuerError> {
        let path = private_key_path.as_ref();
        let pem =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| DevIssuerError::Io {
                    action: "reading",
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::from_pem(issuer, kid, &pem)
    }

    /// The issuer name (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 PEM.
    pub fn private_key_pem(&self) -> Result<Zeroizing<String>, DevIssuerError> {
        self.key.private_pem()
    }

    /// The public key as a JWK with `kid`, `use` = `sig` and `alg` = `ES256`.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.key.public_jwk.clone();
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!("ES256");
        jwk
    }

    /// A JWKS with this issuer's key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk()] })
    }

    /// A JWKS with the keys of several issuers — for key rotation, where the old and the new key
    /// are published together.
    pub fn jwks_of(issuers: &[&DevIssuer]) -> Value {
        json!({ "keys": issuers.iter().map(|i| i.public_jwk()).collect::<Vec<_>>() })
    }

    /// Writes the private key (PEM, mode 0600 on Unix) and the JWKS (JSON).
    pub fn write_files(
        &self,
        private_key_path: impl AsRef<Path>,
        jwks_path: impl AsRef<Path>,
    ) -> Result<(), DevIssuerError> {
        let pem = self.private_key_pem()?;
        write_private(private_key_path.as_ref(), pem.as_bytes())?;
        let jwks_path = jwks_path.as_ref();
        let text = serde_json::to_string_pretty(&self.jwks())
            .map_err(|e| DevIssuerError::Jwk(e.to_string()))?;
        std::fs::write(jwks_path, text).map_err(|source| DevIssuerError::Io {
            action: "writing",
            path: jwks_path.display().to_string(),
            source,
        })
    }

    /// A token builder with the defaults: audience [`DEFAULT_AUDIENCE`], scope
    /// [`DEFAULT_SCOPE`], client [`DEFAULT_CLIENT_ID`], lifetime [`DEFAULT_LIFETIME`], purpose
    /// `TREAT`, profession `LE`, no organization, no HPR number, not DPoP-bound.
    pub fn token(&self) -> TokenBuilder<'_> {
        TokenBuilder::new(self)
    }

    #[cfg(all(test, feature = "verifier"))]
    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.key.encoding_key
    }

    /// Signs arbitrary claims (an [`AccessTokenClaims`] or any JSON) with this issuer's key,
    /// `kid` and the given `typ`.
    pub fn sign_claims<T: serde::Serialize>(
        &self,
        claims: &T,
        typ: &str,
    ) -> Result<String, DevIssuerError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        crate::es256::install();
        Ok(jsonwebtoken::encode(
            &header,
            claims,
            &self.key.encoding_key,
        )?)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevIssuerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| DevIssuerError::Io {
        action: "writing",
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevIssuerError> {
    std::fs::write(path, bytes).map_err(|source| DevIssuerError::Io {
        action: "writing",
        path: path.display().to_string(),
        source,
    })
}

/// Builds one access token. Every setter returns the builder.
#[derive(Debug, Clone)]
pub struct TokenBuilder<'a> {
    issuer: &'a DevIssuer,
    typ: String,
    audiences: Vec<String>,
    scope: String,
    client_id: String,
    jti: Option<String>,
    issued_at: Option<SystemTime>,
    lifetime: Duration,
    not_before: Option<SystemTime>,
    orgnr_parent: Option<String>,
    orgnr_parent_name: Option<String>,
    practitioner: Option<(String, String)>,
    orgnr_child: Option<String>,
    hpr_number: Option<String>,
    profession: Option<String>,
    purpose: Option<Code>,
    purpose_details: Option<Code>,
    healthcare_service: Option<Code>,
    decision_ref: Option<DecisionRef>,
    patients: Vec<crate::claims::AttestPatient>,
    attest: bool,
    jkt: Option<String>,
    extra: Vec<(String, Value)>,
}

impl<'a> TokenBuilder<'a> {
    fn new(issuer: &'a DevIssuer) -> Self {
        TokenBuilder {
            issuer,
            typ: "at+jwt".to_owned(),
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            scope: DEFAULT_SCOPE.to_owned(),
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            jti: None,
            issued_at: None,
            lifetime: DEFAULT_LIFETIME,
            not_before: None,
            orgnr_parent: None,
            orgnr_parent_name: None,
            practitioner: None,
            orgnr_child: None,
            hpr_number: None,
            profession: Some("LE".to_owned()),
            purpose: Some(Code::new("TREAT", PURPOSE_OF_USE_SYSTEM)),
            purpose_details: None,
            healthcare_service: None,
            decision_ref: None,
            patients: Vec::new(),
            attest: true,
            jkt: None,
            extra: Vec::new(),
        }
    }

    /// Header `typ` (default `at+jwt`).
    pub fn typ(mut self, typ: impl Into<String>) -> Self {
        self.typ = typ.into();
        self
    }

    /// A single audience.
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audiences = vec![aud.into()];
        self
    }

    /// Several audiences (emitted as an array).
    pub fn audiences<S: Into<String>>(mut self, auds: impl IntoIterator<Item = S>) -> Self {
        self.audiences = auds.into_iter().map(Into::into).collect();
        self
    }

    /// The scope string (space-separated).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// `client_id`.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// `jti` (default: random).
    pub fn jti(mut self, jti: impl Into<String>) -> Self {
        self.jti = Some(jti.into());
        self
    }

    /// `iat` (default: now); `exp` is `iat` + lifetime.
    pub fn issued_at(mut self, at: SystemTime) -> Self {
        self.issued_at = Some(at);
        self
    }

    /// Lifetime: `exp` = `iat` + this (default [`DEFAULT_LIFETIME`]).
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// `nbf` (default: same as `iat`).
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }

    /// `orgnr_parent`: the legal entity; also the attest's `legal_entity`.
    pub fn org_parent(mut self, orgnr: impl Into<String>) -> Self {
        self.orgnr_parent = Some(orgnr.into());
        self
    }

    /// `orgnr_child`: the point of care; also the attest's `point_of_care`.
    pub fn org_child(mut self, orgnr: impl Into<String>) -> Self {
        self.orgnr_child = Some(orgnr.into());
        self
    }

    /// The legal entity's display name in the attest.
    pub fn org_parent_name(mut self, name: impl Into<String>) -> Self {
        self.orgnr_parent_name = Some(name.into());
        self
    }

    /// The health professional's person identifier and name in the attest's
    /// practitioner, as HelseID adds them.
    pub fn practitioner(mut self, pid: impl Into<String>, name: impl Into<String>) -> Self {
        self.practitioner = Some((pid.into(), name.into()));
        self
    }

    /// The HPR number claim (also put in the attest).
    pub fn hpr_number(mut self, hpr: impl Into<String>) -> Self {
        self.hpr_number = Some(hpr.into());
        self
    }

    /// Profession / authorization code, kodeverk 9060 (default `LE`).
    pub fn profession(mut self, code: impl Into<String>) -> Self {
        self.profession = Some(code.into());
        self
    }

    /// Purpose of use code in the HL7 PurposeOfUse system (default `TREAT`).
    pub fn purpose(mut self, code: impl Into<String>) -> Self {
        self.purpose = Some(Code::new(code, PURPOSE_OF_USE_SYSTEM));
        self
    }

    /// Purpose of use with an explicit code system (for tests of wrong systems).
    pub fn purpose_coded(mut self, code: Code) -> Self {
        self.purpose = Some(code);
        self
    }

    /// Leaves out the purpose of use (the attest stays).
    pub fn without_purpose(mut self) -> Self {
        self.purpose = None;
        self
    }

    /// Detailed purpose of use.
    pub fn purpose_details(mut self, code: impl Into<String>, system: impl Into<String>) -> Self {
        self.purpose_details = Some(Code::new(code, system));
        self
    }

    /// Healthcare service type.
    pub fn healthcare_service(
        mut self,
        code: impl Into<String>,
        system: impl Into<String>,
    ) -> Self {
        self.healthcare_service = Some(Code::new(code, system));
        self
    }

    /// Reference to the local access decision.
    pub fn decision_ref(mut self, id: impl Into<String>, user_selected: bool) -> Self {
        self.decision_ref = Some(DecisionRef {
            id: Some(id.into()),
            user_selected: Some(user_selected),
        });
        self
    }

    /// Adds a patient to the attest.
    pub fn patient(mut self, id: impl Into<String>, system: impl Into<String>) -> Self {
        self.patients.push(crate::claims::AttestPatient {
            identifier: Some(Identifier::new(id, system)),
            ..Default::default()
        });
        self
    }

    /// Leaves out the tillitsrammeverk attest altogether.
    pub fn without_attest(mut self) -> Self {
        self.attest = false;
        self
    }

    /// Binds the token to a DPoP key thumbprint (`cnf.jkt`).
    pub fn cnf_jkt(mut self, jkt: impl Into<String>) -> Self {
        self.jkt = Some(jkt.into());
        self
    }

    /// Binds the token to a DPoP client key.
    pub fn bound_to(self, key: &DpopKey) -> Self {
        let jkt = key.thumbprint().to_owned();
        self.cnf_jkt(jkt)
    }

    /// Any other claim; replaces a built claim of the same name in the signed token.
    pub fn claim(mut self, name: impl Into<String>, value: Value) -> Self {
        self.extra.push((name.into(), value));
        self
    }

    /// The claims this builder makes, typed. Claims added with [`TokenBuilder::claim`] are in
    /// `extra` unless they name a standard claim; [`TokenBuilder::build_json`] applies them all.
    pub fn build_claims(&self) -> AccessTokenClaims {
        let iat = self.issued_at.unwrap_or_else(SystemTime::now);
        let iat_s = unix(iat);
        let nbf_s = unix(self.not_before.unwrap_or(iat));
        let exp_s =
            iat_s.saturating_add(i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX));

        let authorization_details = self.attest.then(|| {
            let practitioner = Practitioner {
                identifier: self.practitioner.as_ref().map(|(pid, name)| Identifier {
                    name: Some(name.clone()),
                    ..Identifier::new(pid, crate::claims::FNR_SYSTEM)
                }),
                hpr_nr: self
                    .hpr_number
                    .clone()
                    .map(|h| HprNumber::Identifier(Identifier::new(h, HPR_NUMBER_SYSTEM))),
                authorization: self
                    .profession
                    .clone()
                    .map(|p| Code::new(p, HPR_AUTHORIZATION_SYSTEM)),
                legal_entity: self.orgnr_parent.clone().map(|o| Identifier {
                    name: self.orgnr_parent_name.clone(),
                    ..Identifier::new(o, ORGNR_SYSTEM)
                }),
                point_of_care: self
                    .orgnr_child
                    .clone()
                    .or_else(|| self.orgnr_parent.clone())
                    .map(|o| Identifier::new(o, ORGNR_SYSTEM)),
                department: None,
            };
            let care = CareRelationship {
                healthcare_service: self.healthcare_service.clone(),
                purpose_of_use: self.purpose.clone(),
                purpose_of_use_details: self.purpose_details.clone(),
                decision_ref: self.decision_ref.clone(),
            };
            let attest =
                TillitsrammeverkAttest::new(Some(practitioner), Some(care), self.patients.clone());
            AuthorizationDetails::from_entries(vec![
                serde_json::to_value(attest).unwrap_or(Value::Null),
            ])
        });

        let mut claims = AccessTokenClaims {
            iss: self.issuer.issuer.clone(),
            aud: if self.audiences.len() == 1 {
                Audience::One(self.audiences[0].clone())
            } else {
                Audience::Many(self.audiences.clone())
            },
            exp: exp_s,
            nbf: Some(nbf_s),
            iat: Some(iat_s),
            jti: Some(self.jti.clone().unwrap_or_else(random_id)),
            scope: Some(Scope::Delimited(self.scope.clone())),
            client_id: Some(self.client_id.clone()),
            orgnr_parent: self.orgnr_parent.clone(),
            orgnr_child: self.orgnr_child.clone(),
            hpr_number: self.hpr_number.clone(),
            cnf: self.jkt.clone().map(|jkt| Confirmation {
                jkt: Some(jkt),
                other: Default::default(),
            }),
            authorization_details,
            extra: Default::default(),
        };
        for (name, value) in &self.extra {
            let typed = serde_json::to_value(&claims)
                .ok()
                .and_then(|v| v.get(name).cloned())
                .is_some();
            if !typed {
                claims.extra.insert(name.clone(), value.clone());
            }
        }
        claims
    }

    /// The JSON payload that [`TokenBuilder::sign`] signs, with every [`TokenBuilder::claim`]
    /// applied (replacing standard claims of the same name).
    pub fn build_json(&self) -> Value {
        let mut claims = self.build_claims();
        claims.extra.clear();
        let mut json = serde_json::to_value(&claims).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut json {
            for (name, value) in &self.extra {
                map.insert(name.clone(), value.clone());
            }
        }
        json
    }

    /// Signs the token.
    pub fn sign(&self) -> Result<String, DevIssuerError> {
        self.issuer.sign_claims(&self.build_json(), &self.typ)
    }
}

/// A DPoP client key (ES256) that makes proofs (RFC 9449 §4.2).
pub struct DpopKey {
    key: EcKeyPair,
    jwk: Jwk,
    thumbprint: String,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A freshly generated P-256 key.
    pub fn generate() -> Result<Self, DevIssuerError> {
        Self::from_pair(EcKeyPair::generate()?)
    }

    /// A key from a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Result<Self, DevIssuerError> {
        let secret =
            SecretKey::from_pkcs8_pem(pem).map_err(|e| DevIssuerError::Pem(e.to_string()))?;
        Self::from_pair(EcKeyPair::from_secret(secret)?)
    }

    fn from_pair(key: EcKeyPair) -> Result<Self, DevIssuerError> {
        let thumbprint =
            thumbprint(&key.public_jwk).map_err(|e| DevIssuerError::Jwk(e.to_string()))?;
        let jwk: Jwk = serde_json::from_value(key.public_jwk.clone())
            .map_err(|e| DevIssuerError::Jwk(e.to_string()))?;
        Ok(DpopKey {
            key,
            jwk,
            thumbprint,
        })
    }

    /// The private key as PKCS#8 PEM.
    pub fn private_key_pem(&self) -> Result<Zeroizing<String>, DevIssuerError> {
        self.key.private_pem()
    }

    #[cfg(all(test, feature = "verifier"))]
    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.key.encoding_key
    }

    /// The public JWK that goes into each proof's header.
    pub fn public_jwk(&self) -> &Value {
        &self.key.public_jwk
    }

    /// The RFC 7638 SHA-256 thumbprint: the `cnf.jkt` of tokens bound to this key.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A proof for one request, issued now with a fresh `jti`. `uri` may include a query; it
    /// is dropped from `htu`.
    pub fn proof(
        &self,
        method: &str,
        uri: &str,
        access_token: &str,
    ) -> Result<String, DevIssuerError> {
        self.proof_at(method, uri, access_token, SystemTime::now())
    }

    /// A proof issued at `iat` (for tests of freshness).
    pub fn proof_at(
        &self,
        method: &str,
        uri: &str,
        access_token: &str,
        iat: SystemTime,
    ) -> Result<String, DevIssuerError> {
        let claims = json!({
            "jti": random_id(),
            "htm": method,
            "htu": htu_from_uri(uri),
            "iat": unix(iat),
            "ath": access_token_hash(access_token),
        });
        self.sign_proof(&claims)
    }

    /// Signs arbitrary proof claims with the `dpop+jwt` header (for tests of malformed proofs).
    pub fn sign_proof(&self, claims: &Value) -> Result<String, DevIssuerError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("dpop+jwt".to_owned());
        header.jwk = Some(self.jwk.clone());
        crate::es256::install();
        Ok(jsonwebtoken::encode(
            &header,
            claims,
            &self.key.encoding_key,
        )?)
    }
}

/// 128 random bits, base64url.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    b64url(bytes)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("pil-auth-test-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let issuer = DevIssuer::generate("https://issuer.test", "k1").unwrap();
        let key_path = dir.join("issuer.pem");
        let jwks_path = dir.join("jwks.json");
        issuer.write_files(&key_path, &jwks_path).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem = std::fs::read_to_string(&key_path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let jwks: Value =
            serde_json::from_str(&std::fs::read_to_string(&jwks_path).unwrap()).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], "k1");
        assert_eq!(jwks["keys"][0]["kty"], "EC");
        assert!(jwks["keys"][0].get("d").is_none());

        let reloaded = DevIssuer::load("https://issuer.test", "k1", &key_path).unwrap();
        assert_eq!(reloaded.public_jwk(), issuer.public_jwk());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn builder_defaults() {
        let issuer = DevIssuer::generate("https://issuer.test", "k1").unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let claims = issuer
            .token()
            .org_parent("974589095")
            .hpr_number("9144900")
            .issued_at(at)
            .build_claims();
        assert_eq!(claims.iss, "https://issuer.test");
        assert_eq!(claims.aud, Audience::One(DEFAULT_AUDIENCE.into()));
        assert_eq!(claims.iat, Some(1_800_000_000));
        assert_eq!(claims.exp, 1_800_000_300);
        assert!(claims.scope.unwrap().contains(DEFAULT_SCOPE));
        assert!(claims.cnf.is_none());
        let attest = claims
            .authorization_details
            .unwrap()
            .tillitsrammeverk()
            .unwrap();
        let care = attest.care_relationship.unwrap();
        assert_eq!(
            care.purpose_of_use.unwrap(),
            Code::new("TREAT", PURPOSE_OF_USE_SYSTEM)
        );
        let practitioner = attest.practitioner.unwrap();
        assert_eq!(practitioner.authorization.unwrap().code, "LE");
        assert_eq!(practitioner.legal_entity.unwrap().id, "974589095");
        assert_eq!(practitioner.hpr_nr.unwrap().value(), "9144900");
    }

    #[test]
    fn proofs_have_fresh_jti_and_thumbprint() {
        let key = DpopKey::generate().unwrap();
        let a = key.proof("POST", "https://n.example/x?q=1", "tok").unwrap();
        let b = key.proof("POST", "https://n.example/x?q=1", "tok").unwrap();
        assert_ne!(a, b);
        let payload = |p: &str| -> Value {
            let part = p.split('.').nth(1).unwrap();
            serde_json::from_slice(&crate::jwk::b64url_decode(part).unwrap()).unwrap()
        };
        assert_ne!(payload(&a)["jti"], payload(&b)["jti"]);
        assert_eq!(payload(&a)["htu"], "https://n.example/x");
        assert_eq!(payload(&a)["ath"], access_token_hash("tok"));
        assert_eq!(key.thumbprint().len(), 43);
        let reloaded = DpopKey::from_pem(&key.private_key_pem().unwrap()).unwrap();
        assert_eq!(reloaded.thumbprint(), key.thumbprint());
    }
}
