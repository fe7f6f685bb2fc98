//! Verification of HelseID-style access tokens for a PIL node.
//!
//! A lookup is served only when the token is signed by the trusted issuer, meant for this node,
//! current, carries the required scope, names the same organization as the client's mTLS
//! certificate, carries the tillitsrammeverk attest with a purpose of use, and — when it is
//! DPoP-bound or the node demands DPoP — comes with a valid, fresh, unreplayed DPoP proof.
//! Each refusal is a distinct [`TokenError`]; the gRPC layer maps all of them to
//! `UNAUTHENTICATED`.
//!
//! **Organization binding.** The client certificate identifies the *legal entity*
//! (hovedenhet), so `helseid://claims/client/claims/orgnr_parent` must equal the certificate's
//! organization number. `orgnr_child` is the point of care (underenhet) inside that entity; it
//! is reported but not compared with the certificate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::claims::{
    AccessTokenClaims, AttestError, AttestPatient, Code, DecisionRef, HPR_AUTHORIZATION_SYSTEM,
    Identifier, PURPOSE_OF_USE_SYSTEM, normalize_oid_system,
};
use crate::dpop::{
    DpopConfig, DpopError, DpopExpectations, DpopVerifier, ReplayCache, secs, unix_seconds,
};
use crate::jwk::{JwkError, PublicKey, parse_public_jwk};
use crate::jws::{AlgRefusal, DecodeFailure, classify_alg, parse_header, verify_and_decode};

/// Longest access token we look at, in bytes.
pub const MAX_TOKEN_LEN: usize = 32 * 1024;

/// Why an access token (or its DPoP proof) was refused. All map to gRPC `UNAUTHENTICATED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS we can read.
    #[error("access token is malformed: {0}")]
    Malformed(String),
    /// `alg` is `none`.
    #[error("access token is unsigned (alg \"none\")")]
    AlgNone,
    /// `alg` is an HMAC algorithm.
    #[error(
        "access token uses the symmetric algorithm \"{0}\"; only asymmetric algorithms are accepted"
    )]
    SymmetricAlgorithm(String),
    /// `alg` is missing or not supported.
    #[error("access token algorithm {0:?} is not supported")]
    UnsupportedAlgorithm(String),
    /// `typ` is missing or not an access-token type.
    #[error("access token has typ {0:?}; \"at+jwt\" or \"JWT\" is required")]
    WrongType(Option<String>),
    /// The header has a `crit` parameter.
    #[error("access token has a \"crit\" header parameter, which is not supported")]
    CriticalHeader,
    /// No `kid` header.
    #[error("access token has no \"kid\" header")]
    MissingKid,
    /// `kid` is not in the issuer's JWKS.
    #[error("access token is signed with unknown key \"{0}\"")]
    UnknownKid(String),
    /// `alg` does not fit the key `kid` names.
    #[error("access token algorithm \"{alg}\" does not fit key \"{kid}\"")]
    KeyAlgorithmMismatch {
        /// The key id.
        kid: String,
        /// The token's algorithm.
        alg: String,
    },
    /// The signature does not verify.
    #[error("access token signature does not verify")]
    BadSignature,
    /// The claims are missing or have the wrong types.
    #[error("access token claims are invalid: {0}")]
    InvalidClaims(String),
    /// `iss` is not the trusted issuer.
    #[error("access token issuer \"{found}\" is not the trusted issuer \"{expected}\"")]
    WrongIssuer {
        /// The trusted issuer.
        expected: String,
        /// The token's `iss`.
        found: String,
    },
    /// `aud` does not name this node.
    #[error("access token audience {found:?} does not include \"{expected}\"")]
    WrongAudience {
        /// Our audience.
        expected: String,
        /// The token's `aud`.
        found: Vec<String>,
    },
    /// `aud` names this node and others; a token for several services is refused.
    #[error("access token audience names other services too: {extra:?}")]
    ExtraAudience {
        /// The other audiences.
        extra: Vec<String>,
    },
    /// `exp` has passed.
    #[error("access token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `nbf` has not come.
    #[error("access token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `iat` is in the future.
    #[error("access token is issued in the future ({iat}; now {now})")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The verifier's time.
        now: i64,
    },
    /// The required scope is not granted.
    #[error("access token lacks the required scope \"{0}\"")]
    MissingScope(String),
    /// A required claim is missing or empty.
    #[error("access token lacks the claim \"{0}\"")]
    MissingClaim(&'static str),
    /// An organization number claim is not nine digits with a valid check digit.
    #[error(
        "claim \"{claim}\" is not an organization number (9 digits, mod-11 check digit): \"{value}\""
    )]
    InvalidOrgNumber {
        /// Which claim.
        claim: &'static str,
        /// Its value.
        value: String,
    },
    /// The HPR number claim is not 1 to 9 digits.
    #[error("HPR number \"{0}\" is not an HPR number (1 to 9 digits)")]
    InvalidHprNumber(String),
    /// `orgnr_parent` is not the organization of the client certificate.
    #[error(
        "token organization {token_org} does not match the client certificate's organization {cert_org}"
    )]
    OrganizationMismatch {
        /// The token's `orgnr_parent`.
        token_org: String,
        /// The certificate's organization number.
        cert_org: String,
    },
    /// No tillitsrammeverk attest in `authorization_details`.
    #[error("access token carries no tillitsrammeverk attest")]
    MissingAttest,
    /// More than one tillitsrammeverk attest.
    #[error("access token carries {0} tillitsrammeverk attests; exactly one is allowed")]
    AmbiguousAttest(usize),
    /// The attest does not have the documented shape.
    #[error("tillitsrammeverk attest is invalid: {0}")]
    InvalidAttest(String),
    /// The attest has no purpose of use.
    #[error("tillitsrammeverk attest has no purpose of use")]
    MissingPurposeOfUse,
    /// The purpose of use is not a code in the HL7 PurposeOfUse system.
    #[error("purpose of use is invalid: {0}")]
    InvalidPurposeOfUse(String),
    /// The attest contradicts the token's own claims.
    #[error("tillitsrammeverk attest contradicts the token: {0}")]
    AttestMismatch(String),
    /// The token is DPoP-bound but no proof was presented.
    #[error("access token is DPoP-bound (cnf.jkt) but no DPoP proof was presented")]
    DpopProofMissing,
    /// The node requires DPoP and the token is not bound.
    #[error("this node requires DPoP-bound tokens; the token has no cnf.jkt")]
    DpopRequired,
    /// The DPoP proof was refused.
    #[error(transparent)]
    Dpop(#[from] DpopError),
}

impl TokenError {
    /// A short stable code, for metrics and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::AlgNone => "token_alg_none",
            TokenError::SymmetricAlgorithm(_) => "token_alg_symmetric",
            TokenError::UnsupportedAlgorithm(_) => "token_alg_unsupported",
            TokenError::WrongType(_) => "token_wrong_typ",
            TokenError::CriticalHeader => "token_crit",
            TokenError::MissingKid => "token_no_kid",
            TokenError::UnknownKid(_) => "token_unknown_kid",
            TokenError::KeyAlgorithmMismatch { .. } => "token_key_alg_mismatch",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::InvalidClaims(_) => "token_invalid_claims",
            TokenError::WrongIssuer { .. } => "token_wrong_issuer",
            TokenError::WrongAudience { .. } => "token_wrong_audience",
            TokenError::ExtraAudience { .. } => "token_extra_audience",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::IssuedInFuture { .. } => "token_iat_future",
            TokenError::MissingScope(_) => "token_missing_scope",
            TokenError::MissingClaim(_) => "token_missing_claim",
            TokenError::InvalidOrgNumber { .. } => "token_invalid_orgnr",
            TokenError::InvalidHprNumber(_) => "token_invalid_hpr",
            TokenError::OrganizationMismatch { .. } => "token_org_mismatch",
            TokenError::MissingAttest => "token_no_attest",
            TokenError::AmbiguousAttest(_) => "token_ambiguous_attest",
            TokenError::InvalidAttest(_) => "token_invalid_attest",
            TokenError::MissingPurposeOfUse => "token_no_purpose",
            TokenError::InvalidPurposeOfUse(_) => "token_invalid_purpose",
            TokenError::AttestMismatch(_) => "token_attest_mismatch",
            TokenError::DpopProofMissing => "dpop_missing",
            TokenError::DpopRequired => "dpop_required",
            TokenError::Dpop(e) => e.code(),
        }
    }
}

/// Why a JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not JSON of the form `{"keys": [...]}`.
    #[error("JWKS is not valid: {0}")]
    Invalid(String),
    /// A signing key has no `kid`; keys are chosen by `kid`, so every key needs one.
    #[error("JWKS key #{0} has no \"kid\"")]
    MissingKid(usize),
    /// Two keys share a `kid`.
    #[error("JWKS has two keys with kid \"{0}\"")]
    DuplicateKid(String),
    /// A key is unusable (private material, symmetric, too short, unknown curve, ...).
    #[error("JWKS key \"{kid}\" is not usable: {source}")]
    BadKey {
        /// The key id.
        kid: String,
        /// Why.
        source: JwkError,
    },
    /// No signing key at all.
    #[error("JWKS has no signing keys")]
    Empty,
}

/// The trusted issuer's public signing keys, by `kid`. Loaded once; to pick up rotated keys,
/// load again and build a new [`TokenVerifier`] (passing the old replay cache along).
#[derive(Debug, Clone)]
pub struct Jwks {
    keys: HashMap<String, PublicKey>,
}

impl Jwks {
    /// Parses a JWKS document. Every key must be a public asymmetric key with a unique `kid`;
    /// keys whose `use` is not `sig` (encryption keys) are skipped.
    pub fn from_json(json: &str) -> Result<Self, JwksError> {
        let doc = crate::claims::parse_strict_json(json.as_bytes())
            .map_err(|e| JwksError::Invalid(e.to_string()))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError::Invalid("no \"keys\" array".to_owned()))?;
        let mut keys = HashMap::new();
        for (i, jwk) in list.iter().enumerate() {
            let kid = match jwk.get("kid") {
                Some(Value::String(k)) if !k.is_empty() => k.clone(),
                _ => return Err(JwksError::MissingKid(i)),
            };
            let key = parse_public_jwk(jwk).map_err(|source| JwksError::BadKey {
                kid: kid.clone(),
                source,
            })?;
            if key.key_use.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            if keys.insert(kid.clone(), key).is_some() {
                return Err(JwksError::DuplicateKid(kid));
            }
        }
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(Jwks { keys })
    }

    /// Reads and parses a JWKS file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, JwksError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The key ids, sorted.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    /// Number of signing keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys (never true for a loaded JWKS).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What the verifier checks against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// The trusted issuer, compared exactly with `iss`.
    pub issuer: String,
    /// This node's audience; `aud` must be exactly this.
    pub audience: String,
    /// Scope every token must carry.
    pub required_scope: String,
    /// Clock skew tolerated for `exp`, `nbf`, `iat` and DPoP `iat` (default 5 s).
    pub leeway: Duration,
    /// Refuse tokens that are not DPoP-bound.
    pub require_dpop: bool,
    /// How old a DPoP proof may be (default 60 s).
    pub dpop_window: Duration,
    /// Most DPoP `jti`s remembered at once (default 500 000). Each is kept for the
    /// proof window plus leeway, so this caps the DPoP-bound requests a node accepts
    /// per second at about capacity / 65 s.
    pub replay_capacity: usize,
    /// Most verified access tokens whose signature check is reused (default 10 000).
    pub token_cache_capacity: usize,
}

impl VerifierConfig {
    /// Settings with the defaults: leeway 5 s, DPoP optional, window 60 s.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        required_scope: impl Into<String>,
    ) -> Self {
        VerifierConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            required_scope: required_scope.into(),
            leeway: Duration::from_secs(5),
            require_dpop: false,
            dpop_window: Duration::from_secs(60),
            replay_capacity: 500_000,
            token_cache_capacity: 10_000,
        }
    }

    fn dpop_config(&self) -> DpopConfig {
        DpopConfig {
            window: self.dpop_window,
            leeway: self.leeway,
            replay_capacity: self.replay_capacity,
        }
    }
}

/// The request a token arrives with.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// Organization number from the client's mTLS certificate.
    pub cert_org_number: &'a str,
    /// The `DPoP` header/metadata value, if any.
    pub dpop_proof: Option<&'a str>,
    /// HTTP method (`POST` for gRPC).
    pub method: &'a str,
    /// Request URI, e.g. `https://node.example:7443/pil.v1.LookupService/Lookup`.
    pub uri: &'a str,
    /// The time to check against.
    pub now: SystemTime,
    /// The token was forwarded by a peer node, which checked its DPoP proof: a proof
    /// is bound to the node it was made for, so the answering node checks everything
    /// else and takes the sender constraint as met.
    pub forwarded: bool,
}

impl<'a> RequestContext<'a> {
    /// A lookup forwarded by a peer node for a client of organization
    /// `cert_org_number` (as the home node's certificate check found it).
    pub fn forwarded(cert_org_number: &'a str) -> Self {
        RequestContext {
            cert_org_number,
            dpop_proof: None,
            method: "POST",
            uri: "",
            now: SystemTime::now(),
            forwarded: true,
        }
    }

    /// A gRPC request (`POST`) at the current time.
    pub fn grpc(cert_org_number: &'a str, uri: &'a str, dpop_proof: Option<&'a str>) -> Self {
        RequestContext {
            cert_org_number,
            dpop_proof,
            method: "POST",
            uri,
            now: SystemTime::now(),
            forwarded: false,
        }
    }

    /// The same request, checked at another time.
    pub fn at(self, now: SystemTime) -> Self {
        RequestContext { now, ..self }
    }
}

/// An identifier's display name, when it has a non-empty one.
fn named(id: Option<&Identifier>) -> Option<String> {
    id.and_then(|i| i.name.as_deref())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// Who is asking, and why — everything later authorization and audit need from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRequester {
    /// Organization number of the legal entity (`orgnr_parent`, equal to the certificate's).
    pub org_number: String,
    /// Organization number of the point of care (`orgnr_child`), if given.
    pub child_org_number: Option<String>,
    /// The health professional's HPR number, from the claim or the attest.
    pub hpr_number: Option<String>,
    /// The professional's authorization code (kodeverk 9060: `LE`, `SP`, ...).
    pub profession: Option<String>,
    /// Purpose of use (code and system, the system normalized to `urn:oid:` form).
    pub purpose_of_use: Code,
    /// Detailed purpose of use.
    pub purpose_of_use_details: Option<Code>,
    /// Healthcare service type of the care relationship.
    pub healthcare_service: Option<Code>,
    /// Reference to the consumer's local access decision.
    pub decision_ref: Option<DecisionRef>,
    /// The legal entity's name, when the attest gives it.
    pub org_name: Option<String>,
    /// The health professional's name, when the attest's practitioner identifier gives it.
    pub practitioner_name: Option<String>,
    /// The practitioner's point of care as attested.
    pub point_of_care: Option<Identifier>,
    /// The practitioner's department as attested.
    pub department: Option<Identifier>,
    /// Patients named in the attest (often none: HelseID may strip identifiers).
    pub patients: Vec<AttestPatient>,
    /// The OAuth client.
    pub client_id: String,
    /// The token's `jti`.
    pub jti: String,
    /// When the token expires.
    pub expires_at: SystemTime,
    /// Whether the token was DPoP-bound (and a valid proof was checked).
    pub dpop_bound: bool,
    /// The DPoP key thumbprint, when bound.
    pub dpop_jkt: Option<String>,
    /// The checked proof's replay key and until when (unix seconds) it must not be
    /// accepted again; nodes that share a region's store record it there, so a proof
    /// accepted by one is refused by all.
    pub dpop_replay: Option<(String, i64)>,
    /// All granted scopes.
    pub scopes: Vec<String>,
}

/// Access tokens whose signature this verifier has checked, with their claims.
///
/// A record system sends the same token with many calls until it expires, and the
/// ES256 check is most of what verifying costs. The signature over exactly these
/// bytes was good under these keys, so it stays good: only the signature check and
/// the JSON parse are reused; every claim (time, audience, organization, attest) and
/// the DPoP proof are still checked on each call. The cache belongs to one verifier,
/// so a verifier built with new keys starts empty.
#[derive(Clone)]
struct SignatureCache(Arc<quick_cache::sync::Cache<String, Arc<AccessTokenClaims>>>);

impl SignatureCache {
    fn new(capacity: usize) -> Self {
        SignatureCache(Arc::new(quick_cache::sync::Cache::new(capacity.max(1))))
    }
}

impl std::fmt::Debug for SignatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureCache")
            .field("len", &self.0.len())
            .finish()
    }
}

/// Verifies access tokens (and DPoP proofs) for one node. Cheap to share: wrap in an `Arc`.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    config: VerifierConfig,
    jwks: Jwks,
    dpop: DpopVerifier,
    verified: SignatureCache,
    counts: Arc<CacheCounts>,
}

/// How often a token's signature check was reused, kept across key reloads so the
/// counts only grow.
#[derive(Debug, Default)]
struct CacheCounts {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl TokenVerifier {
    /// A verifier with its own replay cache.
    pub fn new(config: VerifierConfig, jwks: Jwks) -> Self {
        let cache = Arc::new(ReplayCache::new(config.replay_capacity));
        Self::with_replay_cache(config, jwks, cache)
    }

    /// A verifier sharing a replay cache, e.g. the previous verifier's after a JWKS reload, so
    /// that reloading keys does not reopen a replay window.
    pub fn with_replay_cache(config: VerifierConfig, jwks: Jwks, cache: Arc<ReplayCache>) -> Self {
        let dpop = DpopVerifier::with_cache(config.dpop_config(), cache);
        let verified = SignatureCache::new(config.token_cache_capacity);
        TokenVerifier {
            config,
            jwks,
            dpop,
            verified,
            counts: Default::default(),
        }
    }

    /// The same verifier with the issuer's keys `jwks`: the replay cache and the
    /// counts are kept (so a key reload reopens no replay window), the reused
    /// signature checks are not.
    pub fn with_keys(&self, jwks: Jwks) -> Self {
        let mut fresh = Self::with_replay_cache(self.config.clone(), jwks, self.replay_cache());
        fresh.counts = self.counts.clone();
        fresh
    }

    /// Tokens whose signature check was reused, and tokens whose signature was
    /// checked, so far.
    pub fn token_cache_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counts.hits.load(Relaxed),
            self.counts.misses.load(Relaxed),
        )
    }

    /// A verifier whose JWKS is read from a file.
    pub fn from_jwks_file(
        config: VerifierConfig,
        path: impl AsRef<Path>,
    ) -> Result<Self, JwksError> {
        Ok(Self::new(config, Jwks::from_file(path)?))
    }

    /// The replay cache (to hand to a rebuilt verifier).
    pub fn replay_cache(&self) -> Arc<ReplayCache> {
        Arc::clone(self.dpop.cache())
    }

    /// The settings.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The issuer keys in use.
    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }

    /// Verifies `token` for the request described by `ctx`.
    pub fn verify(
        &self,
        token: &str,
        ctx: &RequestContext<'_>,
    ) -> Result<VerifiedRequester, TokenError> {
        let claims = self.signed_claims(token)?;
        let now = unix_seconds(ctx.now);
        let expires_at = u64::try_from(claims.exp)
            .ok()
            .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp)))
            .ok_or_else(|| {
                TokenError::InvalidClaims(format!("exp {} is out of range", claims.exp))
            })?;
        let leeway = secs(self.config.leeway);

        // Issuer and audience.
        if claims.iss != self.config.issuer {
            return Err(TokenError::WrongIssuer {
                expected: self.config.issuer.clone(),
                found: claims.iss,
            });
        }
        let audiences = claims.aud.values();
        if !audiences.contains(&self.config.audience.as_str()) {
            return Err(TokenError::WrongAudience {
                expected: self.config.audience.clone(),
                found: audiences.iter().map(|a| (*a).to_owned()).collect(),
            });
        }
        let extra: Vec<String> = audiences
            .iter()
            .filter(|a| **a != self.config.audience)
            .map(|a| (*a).to_owned())
            .collect();
        if !extra.is_empty() {
            return Err(TokenError::ExtraAudience { extra });
        }

        // Time.
        if now > claims.exp.saturating_add(leeway) {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
        }
        if let Some(nbf) = claims.nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(TokenError::NotYetValid { nbf, now });
        }
        if let Some(iat) = claims.iat
            && iat > now.saturating_add(leeway)
        {
            return Err(TokenError::IssuedInFuture { iat, now });
        }

        // Scope and identifiers.
        let scopes: Vec<String> = claims
            .scope
            .as_ref()
            .map(|s| s.values().into_iter().map(str::to_owned).collect())
            .unwrap_or_default();
        if !scopes.contains(&self.config.required_scope) {
            return Err(TokenError::MissingScope(self.config.required_scope.clone()));
        }
        let client_id = non_empty(claims.client_id.as_deref(), "client_id")?;
        let jti = non_empty(claims.jti.as_deref(), "jti")?;

        // Organization: orgnr_parent is the legal entity, which the certificate identifies.
        let org_number = non_empty(claims.orgnr_parent.as_deref(), "orgnr_parent")?;
        check_org_number(&org_number, "orgnr_parent")?;
        if org_number != ctx.cert_org_number {
            return Err(TokenError::OrganizationMismatch {
                token_org: org_number,
                cert_org: ctx.cert_org_number.to_owned(),
            });
        }
        let child_org_number = match claims.orgnr_child.as_deref() {
            None | Some("") => None,
            Some(child) => {
                check_org_number(child, "orgnr_child")?;
                Some(child.to_owned())
            }
        };
        let claim_hpr = match claims.hpr_number.as_deref() {
            None | Some("") => None,
            Some(h) => Some(check_hpr(h)?),
        };

        // The tillitsrammeverk attest.
        let attest = claims
            .authorization_details
            .as_ref()
            .ok_or(TokenError::MissingAttest)?
            .tillitsrammeverk()
            .map_err(|e| match e {
                AttestError::Missing => TokenError::MissingAttest,
                AttestError::Ambiguous(n) => TokenError::AmbiguousAttest(n),
                AttestError::Malformed(m) => TokenError::InvalidAttest(m),
            })?;
        let care = attest.care_relationship.unwrap_or_default();
        let purpose = care.purpose_of_use.ok_or(TokenError::MissingPurposeOfUse)?;
        let purpose_of_use = check_purpose(purpose)?;
        let practitioner = attest.practitioner.unwrap_or_default();

        if let Some(le) = &practitioner.legal_entity
            && le.id != org_number
        {
            return Err(TokenError::AttestMismatch(format!(
                "attested legal entity {} is not orgnr_parent {org_number}",
                le.id
            )));
        }
        if let (Some(poc), Some(child)) = (&practitioner.point_of_care, &child_org_number)
            && poc.id != *child
        {
            return Err(TokenError::AttestMismatch(format!(
                "attested point of care {} is not orgnr_child {child}",
                poc.id
            )));
        }
        let attest_hpr = match &practitioner.hpr_nr {
            Some(h) if !h.value().is_empty() => Some(check_hpr(h.value())?),
            _ => None,
        };
        let hpr_number = match (claim_hpr, attest_hpr) {
            (Some(c), Some(a)) if c != a => {
                return Err(TokenError::AttestMismatch(format!(
                    "attested HPR number {a} is not the token's HPR number {c}"
                )));
            }
            (c, a) => c.or(a),
        };
        let profession = match practitioner.authorization {
            None => None,
            Some(auth) => {
                if let Some(system) = &auth.system
                    && normalize_oid_system(system) != HPR_AUTHORIZATION_SYSTEM
                {
                    return Err(TokenError::InvalidAttest(format!(
                        "practitioner authorization has code system \"{system}\", not {HPR_AUTHORIZATION_SYSTEM}"
                    )));
                }
                if auth.code.trim().is_empty() {
                    None
                } else {
                    Some(auth.code)
                }
            }
        };

        // Sender constraint.
        let jkt = claims
            .cnf
            .as_ref()
            .and_then(|c| c.jkt.as_deref())
            .filter(|j| !j.is_empty());
        let mut dpop_replay = None;
        let dpop_jkt = match jkt {
            Some(jkt) if ctx.forwarded => Some(jkt.to_owned()),
            Some(jkt) => {
                let proof = ctx.dpop_proof.ok_or(TokenError::DpopProofMissing)?;
                let verified = self.dpop.verify(
                    proof,
                    &DpopExpectations {
                        method: ctx.method,
                        uri: ctx.uri,
                        access_token: token,
                        jkt,
                    },
                    ctx.now,
                )?;
                dpop_replay = Some(verified.replay);
                Some(verified.jkt)
            }
            None if self.config.require_dpop => return Err(TokenError::DpopRequired),
            // An unbound token: a proof sent along proves nothing about the token and is ignored.
            None => None,
        };

        Ok(VerifiedRequester {
            org_name: named(practitioner.legal_entity.as_ref()),
            practitioner_name: named(practitioner.identifier.as_ref()),
            org_number,
            child_org_number,
            hpr_number,
            profession,
            purpose_of_use,
            purpose_of_use_details: care.purpose_of_use_details,
            healthcare_service: care.healthcare_service,
            decision_ref: care.decision_ref,
            point_of_care: practitioner.point_of_care,
            department: practitioner.department,
            patients: attest.patients,
            client_id,
            jti,
            expires_at,
            dpop_bound: dpop_jkt.is_some(),
            dpop_jkt,
            dpop_replay,
            scopes,
        })
    }

    /// The token's claims once its signature is good: checked now, or reused from an
    /// earlier check of the same token.
    fn signed_claims(&self, token: &str) -> Result<AccessTokenClaims, TokenError> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(claims) = self.verified.0.get(token) {
            self.counts.hits.fetch_add(1, Relaxed);
            return Ok((*claims).clone());
        }
        self.counts.misses.fetch_add(1, Relaxed);
        let claims = self.verify_signature(token)?;
        self.verified
            .0
            .insert(token.to_owned(), Arc::new(claims.clone()));
        Ok(claims)
    }

    /// Header checks, key selection and signature; returns the parsed claims.
    fn verify_signature(&self, token: &str) -> Result<AccessTokenClaims, TokenError> {
        let header = parse_header(token, MAX_TOKEN_LEN).map_err(TokenError::Malformed)?;

        let alg_name = header
            .str_param("alg")
            .map_err(TokenError::Malformed)?
            .ok_or_else(|| TokenError::UnsupportedAlgorithm(String::new()))?;
        let alg = classify_alg(alg_name).map_err(|refusal| match refusal {
            AlgRefusal::None => TokenError::AlgNone,
            AlgRefusal::Symmetric(a) => TokenError::SymmetricAlgorithm(a),
            AlgRefusal::Unsupported(a) => TokenError::UnsupportedAlgorithm(a),
        })?;

        let typ = header.str_param("typ").map_err(TokenError::Malformed)?;
        if !typ.is_some_and(is_access_token_typ) {
            return Err(TokenError::WrongType(typ.map(str::to_owned)));
        }
        if header.fields.contains_key("crit") {
            return Err(TokenError::CriticalHeader);
        }

        // The key comes from the configured JWKS only; jwk/jku/x5u/x5c in the header are ignored.
        let kid = header
            .str_param("kid")
            .map_err(TokenError::Malformed)?
            .ok_or(TokenError::MissingKid)?;
        let key = self
            .jwks
            .keys
            .get(kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.to_owned()))?;
        if !key.allows(alg) {
            return Err(TokenError::KeyAlgorithmMismatch {
                kid: kid.to_owned(),
                alg: alg_name.to_owned(),
            });
        }

        verify_and_decode(token, &key.decoding_key, alg).map_err(|e| match e {
            DecodeFailure::Signature => TokenError::BadSignature,
            DecodeFailure::Key(m) | DecodeFailure::Malformed(m) => TokenError::Malformed(m),
            DecodeFailure::Claims(m) => TokenError::InvalidClaims(m),
        })
    }
}

/// `typ` of an access token: `at+jwt` (RFC 9068) or `JWT`, letter case ignored, with or
/// without the `application/` prefix.
fn is_access_token_typ(typ: &str) -> bool {
    let t = typ.trim();
    let t = match t.as_bytes().get(..12) {
        // The first 12 bytes are ASCII, so byte 12 is a character boundary.
        Some(prefix) if prefix.eq_ignore_ascii_case(b"application/") => &t[12..],
        _ => t,
    };
    t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("jwt")
}

fn non_empty(value: Option<&str>, name: &'static str) -> Result<String, TokenError> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v.to_owned()),
        _ => Err(TokenError::MissingClaim(name)),
    }
}

/// An organization number as every other part of PIL checks it: 9 digits whose
/// mod-11 check digit is right.
fn check_org_number(value: &str, claim: &'static str) -> Result<(), TokenError> {
    pil_proto::ident::OrgNumber::parse(value)
        .map(|_| ())
        .map_err(|_| TokenError::InvalidOrgNumber {
            claim,
            value: value.to_owned(),
        })
}

/// An HPR number as every other part of PIL checks it: 1 to 9 digits.
fn check_hpr(value: &str) -> Result<String, TokenError> {
    pil_proto::ident::HprNumber::parse(value)
        .map(|h| h.as_str().to_owned())
        .map_err(|_| TokenError::InvalidHprNumber(value.to_owned()))
}

fn check_purpose(purpose: Code) -> Result<Code, TokenError> {
    let code = purpose.code.trim();
    if code.is_empty() {
        return Err(TokenError::MissingPurposeOfUse);
    }
    if code.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::InvalidPurposeOfUse(format!(
            "code \"{}\" contains whitespace",
            purpose.code
        )));
    }
    let system = match purpose.system.as_deref() {
        None => {
            return Err(TokenError::InvalidPurposeOfUse(format!(
                "code \"{code}\" has no code system; {PURPOSE_OF_USE_SYSTEM} is required"
            )));
        }
        Some(s) => normalize_oid_system(s),
    };
    if system != PURPOSE_OF_USE_SYSTEM {
        return Err(TokenError::InvalidPurposeOfUse(format!(
            "code system \"{system}\" is not {PURPOSE_OF_USE_SYSTEM}"
        )));
    }
    Ok(Code {
        code: code.to_owned(),
        system: Some(system),
        ..purpose
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn access_token_typ_forms() {
        for ok in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "JWT",
            "jwt",
            "application/jwt",
        ] {
            assert!(is_access_token_typ(ok), "{ok}");
        }
        for bad in [
            "dpop+jwt",
            "JOSE",
            "",
            "application/",
            "id+jwt",
            "applicatio€/at+jwt",
            "€€€€€€€€",
        ] {
            assert!(!is_access_token_typ(bad), "{bad}");
        }
    }

    #[test]
    fn jwks_loading_rules() {
        let ec = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
        let with = |extra: &str| {
            format!(
                r#"{{"keys":[{}]}}"#,
                ec.replacen('{', &format!("{{{extra}"), 1)
            )
        };
        assert!(Jwks::from_json(&with(r#""kid":"a","#)).is_ok());
        assert!(matches!(
            Jwks::from_json(&with("")),
            Err(JwksError::MissingKid(0))
        ));
        assert!(matches!(
            Jwks::from_json(&with(r#""kid":"a","d":"secret","#)),
            Err(JwksError::BadKey {
                source: JwkError::PrivateKeyMaterial(_),
                ..
            })
        ));
        assert!(matches!(
            Jwks::from_json(&with(r#""kid":"a","use":"enc","#)),
            Err(JwksError::Empty)
        ));
        let two = format!(
            r#"{{"keys":[{},{}]}}"#,
            ec.replacen('{', r#"{"kid":"a","#, 1),
            ec.replacen('{', r#"{"kid":"a","#, 1)
        );
        assert!(matches!(Jwks::from_json(&two), Err(JwksError::DuplicateKid(k)) if k == "a"));
        assert!(matches!(
            Jwks::from_json(r#"{"keys":[{"kid":"h","kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(JwksError::BadKey {
                source: JwkError::SymmetricKey,
                ..
            })
        ));
        assert!(matches!(
            Jwks::from_json(r#"{"keys":[]}"#),
            Err(JwksError::Empty)
        ));
        assert!(matches!(Jwks::from_json("[]"), Err(JwksError::Invalid(_))));
        assert!(matches!(
            Jwks::from_file("/nonexistent/jwks.json"),
            Err(JwksError::Io { .. })
        ));
    }

    #[test]
    fn purpose_checks() {
        let ok = check_purpose(Code::new("TREAT", "2.16.840.1.113883.1.11.20448")).unwrap();
        assert_eq!(ok.system.as_deref(), Some(PURPOSE_OF_USE_SYSTEM));
        assert_eq!(
            check_purpose(Code::new("  ", PURPOSE_OF_USE_SYSTEM)),
            Err(TokenError::MissingPurposeOfUse)
        );
        assert!(matches!(
            check_purpose(Code::new("TREAT", "urn:oid:1.2.3")),
            Err(TokenError::InvalidPurposeOfUse(_))
        ));
        let mut no_system = Code::new("TREAT", "");
        no_system.system = None;
        assert!(matches!(
            check_purpose(no_system),
            Err(TokenError::InvalidPurposeOfUse(_))
        ));
    }
}
