//! DPoP proof verification (RFC 9449 §4.3) and the replay cache.
//!
//! A DPoP-bound access token is useless without a fresh proof signed by the client's private
//! key; the proof names the HTTP method and URI it was made for and the hash of the token it
//! accompanies. A stolen token, or a proof captured from another call, must therefore fail here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use crate::claims::numeric_date;
use crate::jwk::{JwkError, access_token_hash, parse_public_jwk, thumbprint};
use crate::jws::{AlgRefusal, DecodeFailure, classify_alg, parse_header, verify_and_decode};

/// Longest proof we look at, in bytes. Proofs are small; this bounds the work an attacker can
/// make us do.
pub const MAX_PROOF_LEN: usize = 8 * 1024;
/// Longest `jti` we accept; bounds the replay cache's memory.
pub const MAX_JTI_LEN: usize = 256;

/// Why a DPoP proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    /// Not a compact JWS we can read.
    #[error("DPoP proof is malformed: {0}")]
    Malformed(String),
    /// `typ` is not `dpop+jwt`.
    #[error("DPoP proof has typ {0:?}; \"dpop+jwt\" is required")]
    WrongType(Option<String>),
    /// `alg` is `none`.
    #[error("DPoP proof is unsigned (alg \"none\")")]
    AlgNone,
    /// `alg` is an HMAC algorithm.
    #[error(
        "DPoP proof uses the symmetric algorithm \"{0}\"; only asymmetric algorithms are accepted"
    )]
    SymmetricAlgorithm(String),
    /// `alg` is missing or not supported.
    #[error("DPoP proof algorithm {0:?} is not supported")]
    UnsupportedAlgorithm(String),
    /// The header has a `crit` parameter; we understand no extensions.
    #[error("DPoP proof has a \"crit\" header parameter, which is not supported")]
    CriticalHeader,
    /// No `jwk` header.
    #[error("DPoP proof has no \"jwk\" header")]
    MissingJwk,
    /// The `jwk` header contains private key material.
    #[error("DPoP proof's jwk contains private key material (member \"{0}\")")]
    PrivateKeyInJwk(String),
    /// The `jwk` header is not a usable public key.
    #[error("DPoP proof's jwk is not usable: {0}")]
    InvalidJwk(String),
    /// `alg` does not fit the key type of `jwk`.
    #[error("DPoP proof algorithm \"{0}\" does not fit its jwk")]
    KeyAlgorithmMismatch(String),
    /// The signature does not verify under `jwk`.
    #[error("DPoP proof signature does not verify under its jwk")]
    BadSignature,
    /// The claims are missing or have the wrong types.
    #[error("DPoP proof claims are invalid: {0}")]
    InvalidClaims(String),
    /// `htm` is not the request's method.
    #[error("DPoP proof is for method \"{found}\", the request is \"{expected}\"")]
    MethodMismatch {
        /// The request's method.
        expected: String,
        /// The proof's `htm`.
        found: String,
    },
    /// `htu` is not the request's URI.
    #[error("DPoP proof is for URI \"{found}\", the request is for \"{expected}\"")]
    UriMismatch {
        /// The request URI (without query and fragment).
        expected: String,
        /// The proof's `htu`.
        found: String,
    },
    /// The request URI handed to the verifier is not an absolute http(s) URI.
    #[error("the request URI \"{0}\" is not an absolute http(s) URI")]
    InvalidRequestUri(String),
    /// `iat` is too old.
    #[error("DPoP proof is stale: issued at {iat}, now {now}, window {window_secs} s")]
    Stale {
        /// The proof's `iat`.
        iat: i64,
        /// The verifier's time.
        now: i64,
        /// The freshness window.
        window_secs: i64,
    },
    /// `iat` is in the future.
    #[error("DPoP proof is issued in the future: issued at {iat}, now {now}")]
    IssuedInFuture {
        /// The proof's `iat`.
        iat: i64,
        /// The verifier's time.
        now: i64,
    },
    /// No `ath` although an access token accompanies the proof.
    #[error("DPoP proof has no \"ath\" claim")]
    MissingAth,
    /// `ath` is not the hash of the presented access token.
    #[error("DPoP proof's ath does not match the access token")]
    AthMismatch,
    /// The proof's key is not the key the token is bound to.
    #[error(
        "DPoP proof is signed by a key (thumbprint {found}) other than the token's cnf.jkt ({expected})"
    )]
    KeyMismatch {
        /// The token's `cnf.jkt`.
        expected: String,
        /// The proof key's thumbprint.
        found: String,
    },
    /// This `jti` was already used within the window.
    #[error("DPoP proof jti \"{0}\" was already used (replay)")]
    Replayed(String),
    /// The replay cache is full; refusing is the only safe answer.
    #[error("DPoP replay cache is full ({0} entries); proof refused")]
    ReplayCacheFull(usize),
}

impl DpopError {
    /// A short stable code, for metrics and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            DpopError::Malformed(_) => "dpop_malformed",
            DpopError::WrongType(_) => "dpop_wrong_typ",
            DpopError::AlgNone => "dpop_alg_none",
            DpopError::SymmetricAlgorithm(_) => "dpop_alg_symmetric",
            DpopError::UnsupportedAlgorithm(_) => "dpop_alg_unsupported",
            DpopError::CriticalHeader => "dpop_crit",
            DpopError::MissingJwk => "dpop_no_jwk",
            DpopError::PrivateKeyInJwk(_) => "dpop_private_jwk",
            DpopError::InvalidJwk(_) => "dpop_invalid_jwk",
            DpopError::KeyAlgorithmMismatch(_) => "dpop_key_alg_mismatch",
            DpopError::BadSignature => "dpop_bad_signature",
            DpopError::InvalidClaims(_) => "dpop_invalid_claims",
            DpopError::MethodMismatch { .. } => "dpop_htm_mismatch",
            DpopError::UriMismatch { .. } => "dpop_htu_mismatch",
            DpopError::InvalidRequestUri(_) => "dpop_bad_request_uri",
            DpopError::Stale { .. } => "dpop_stale",
            DpopError::IssuedInFuture { .. } => "dpop_iat_future",
            DpopError::MissingAth => "dpop_no_ath",
            DpopError::AthMismatch => "dpop_ath_mismatch",
            DpopError::KeyMismatch { .. } => "dpop_key_mismatch",
            DpopError::Replayed(_) => "dpop_replay",
            DpopError::ReplayCacheFull(_) => "dpop_replay_cache_full",
        }
    }
}

/// Settings of DPoP proof checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopConfig {
    /// How old a proof's `iat` may be (default 60 s).
    pub window: Duration,
    /// Clock skew tolerated on top of the window, and for `iat` in the future (default 5 s).
    pub leeway: Duration,
    /// Most `jti`s remembered at once (default 100 000); when full, proofs are refused.
    pub replay_capacity: usize,
}

impl Default for DpopConfig {
    fn default() -> Self {
        DpopConfig {
            window: Duration::from_secs(60),
            leeway: Duration::from_secs(5),
            replay_capacity: 500_000,
        }
    }
}

/// Remembers the `jti`s of accepted proofs until they could no longer pass the freshness check,
/// so that no proof is accepted twice. One cache is shared by all requests (and should survive
/// a verifier rebuilt for key rotation: pass it to the new one).
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
    /// Proofs refused because they were seen before, and because the cache was full.
    replays: std::sync::atomic::AtomicU64,
    full: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct ReplayInner {
    /// key → expiry (unix seconds).
    seen: HashMap<String, i64>,
    /// (expiry, key) in insertion order; expiries are non-decreasing as long as time is.
    queue: VecDeque<(i64, String)>,
}

impl ReplayCache {
    /// A cache that holds at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity,
            inner: Mutex::new(ReplayInner::default()),
            replays: Default::default(),
            full: Default::default(),
        }
    }

    /// Proofs refused so far: `(replayed, refused because the cache was full)`.
    pub fn refused(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.replays.load(Relaxed), self.full.load(Relaxed))
    }

    /// Number of remembered entries (including expired ones not yet purged).
    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    /// The most entries it holds; a full cache refuses every new proof.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayInner> {
        // A panic while holding the lock cannot leave the maps in a state that would accept a
        // replay (an insert is one step), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `key` until `expires_at`; refuses it if it is already recorded and unexpired.
    pub fn check_and_insert(&self, key: &str, expires_at: i64, now: i64) -> Result<(), DpopError> {
        let mut inner = self.lock();
        // Purge what has expired.
        while let Some((exp, _)) = inner.queue.front() {
            if *exp > now {
                break;
            }
            if let Some((exp, old)) = inner.queue.pop_front()
                && inner.seen.get(&old) == Some(&exp)
            {
                inner.seen.remove(&old);
            }
        }
        if let Some(exp) = inner.seen.get(key)
            && *exp > now
        {
            self.replays
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(DpopError::Replayed(key.to_owned()));
        }
        if inner.seen.len() >= self.capacity {
            self.full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(DpopError::ReplayCacheFull(self.capacity));
        }
        inner.seen.insert(key.to_owned(), expires_at);
        inner.queue.push_back((expires_at, key.to_owned()));
        Ok(())
    }
}

/// What the proof must match, taken from the request and the access token.
#[derive(Debug, Clone, Copy)]
pub struct DpopExpectations<'a> {
    /// HTTP method of the request (`POST` for gRPC).
    pub method: &'a str,
    /// Request URI, e.g. `https://node.example:7443/pil.v1.LookupService/Lookup`.
    pub uri: &'a str,
    /// The access token presented with the proof.
    pub access_token: &'a str,
    /// The token's `cnf.jkt`.
    pub jkt: &'a str,
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// Thumbprint of the proof key (equal to the token's `cnf.jkt`).
    pub jkt: String,
    /// The proof's `jti`.
    pub jti: String,
    /// The proof's `iat`.
    pub iat: i64,
    /// What the replay check remembered (key thumbprint and `jti`), and until when (unix
    /// seconds) a second use is refused: for checks shared by several processes.
    pub replay: (String, i64),
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: String,
    htm: String,
    htu: String,
    #[serde(with = "numeric_date")]
    iat: i64,
    #[serde(default)]
    ath: Option<String>,
}

/// Verifies DPoP proofs and remembers their `jti`s.
#[derive(Debug, Clone)]
pub struct DpopVerifier {
    config: DpopConfig,
    cache: Arc<ReplayCache>,
}

impl DpopVerifier {
    /// A verifier with its own replay cache.
    pub fn new(config: DpopConfig) -> Self {
        let cache = Arc::new(ReplayCache::new(config.replay_capacity));
        DpopVerifier { config, cache }
    }

    /// A verifier sharing an existing replay cache (e.g. across a key reload).
    pub fn with_cache(config: DpopConfig, cache: Arc<ReplayCache>) -> Self {
        DpopVerifier { config, cache }
    }

    /// The replay cache.
    pub fn cache(&self) -> &Arc<ReplayCache> {
        &self.cache
    }

    /// The settings.
    pub fn config(&self) -> &DpopConfig {
        &self.config
    }

    /// Checks `proof` against the request and token (RFC 9449 §4.3, steps 2–9, 11–12; there is
    /// no server nonce). The `jti` is recorded only when every other check has passed.
    pub fn verify(
        &self,
        proof: &str,
        expect: &DpopExpectations<'_>,
        now: SystemTime,
    ) -> Result<VerifiedProof, DpopError> {
        let header = parse_header(proof, MAX_PROOF_LEN).map_err(DpopError::Malformed)?;

        let typ = header.str_param("typ").map_err(DpopError::Malformed)?;
        if !typ.is_some_and(is_dpop_typ) {
            return Err(DpopError::WrongType(typ.map(str::to_owned)));
        }
        let alg_name = header
            .str_param("alg")
            .map_err(DpopError::Malformed)?
            .ok_or_else(|| DpopError::UnsupportedAlgorithm(String::new()))?;
        let alg = classify_alg(alg_name).map_err(|refusal| match refusal {
            AlgRefusal::None => DpopError::AlgNone,
            AlgRefusal::Symmetric(a) => DpopError::SymmetricAlgorithm(a),
            AlgRefusal::Unsupported(a) => DpopError::UnsupportedAlgorithm(a),
        })?;
        if header.fields.contains_key("crit") {
            return Err(DpopError::CriticalHeader);
        }
        let jwk: &Value = header.fields.get("jwk").ok_or(DpopError::MissingJwk)?;
        let key = parse_public_jwk(jwk).map_err(|e| match e {
            JwkError::PrivateKeyMaterial(m) => DpopError::PrivateKeyInJwk(m),
            JwkError::SymmetricKey => DpopError::PrivateKeyInJwk("k".to_owned()),
            other => DpopError::InvalidJwk(other.to_string()),
        })?;
        if !key.allows(alg) {
            return Err(DpopError::KeyAlgorithmMismatch(alg_name.to_owned()));
        }

        let claims: ProofClaims =
            verify_and_decode(proof, &key.decoding_key, alg).map_err(|e| match e {
                DecodeFailure::Signature => DpopError::BadSignature,
                DecodeFailure::Key(m) => DpopError::InvalidJwk(m),
                DecodeFailure::Claims(m) => DpopError::InvalidClaims(m),
                DecodeFailure::Malformed(m) => DpopError::Malformed(m),
            })?;

        if claims.jti.is_empty() || claims.jti.len() > MAX_JTI_LEN {
            return Err(DpopError::InvalidClaims(format!(
                "jti must have 1 to {MAX_JTI_LEN} characters"
            )));
        }
        if claims.htm != expect.method {
            return Err(DpopError::MethodMismatch {
                expected: expect.method.to_owned(),
                found: claims.htm,
            });
        }
        let expected_uri = normalize_htu(expect.uri)
            .ok_or_else(|| DpopError::InvalidRequestUri(expect.uri.to_owned()))?;
        let proof_uri = normalize_htu(&claims.htu);
        if proof_uri.as_deref() != Some(expected_uri.as_str()) {
            return Err(DpopError::UriMismatch {
                expected: expected_uri,
                found: claims.htu,
            });
        }

        let now = unix_seconds(now);
        let window = secs(self.config.window);
        let leeway = secs(self.config.leeway);
        if claims.iat > now.saturating_add(leeway) {
            return Err(DpopError::IssuedInFuture {
                iat: claims.iat,
                now,
            });
        }
        if claims.iat < now.saturating_sub(window).saturating_sub(leeway) {
            return Err(DpopError::Stale {
                iat: claims.iat,
                now,
                window_secs: window,
            });
        }

        match &claims.ath {
            None => return Err(DpopError::MissingAth),
            Some(ath) if *ath != access_token_hash(expect.access_token) => {
                return Err(DpopError::AthMismatch);
            }
            Some(_) => {}
        }

        let jkt = thumbprint(jwk).map_err(|e| DpopError::InvalidJwk(e.to_string()))?;
        if jkt != expect.jkt {
            return Err(DpopError::KeyMismatch {
                expected: expect.jkt.to_owned(),
                found: jkt,
            });
        }

        // Remember the jti for as long as a proof with this iat could still pass. `now`-based,
        // so that the cache's queue stays ordered; `iat <= now + leeway` makes it long enough.
        let expires_at = now
            .saturating_add(window)
            .saturating_add(leeway.saturating_mul(2))
            .saturating_add(1);
        // Scope the jti by key: a replay needs the same key anyway, and one client cannot burn
        // another client's jti values.
        let cache_key = format!("{jkt}:{}", claims.jti);
        self.cache.check_and_insert(&cache_key, expires_at, now)?;

        Ok(VerifiedProof {
            jkt,
            jti: claims.jti,
            iat: claims.iat,
            replay: (cache_key, expires_at),
        })
    }
}

/// `typ` of a DPoP proof: `dpop+jwt`, letter case ignored, `application/` prefix accepted
/// (RFC 7515 §4.1.9).
fn is_dpop_typ(typ: &str) -> bool {
    let t = typ.trim();
    t.eq_ignore_ascii_case("dpop+jwt") || t.eq_ignore_ascii_case("application/dpop+jwt")
}

/// Seconds since the epoch (0 before it; saturating far in the future).
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Normalizes an `htu` or request URI for comparison (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2–
/// §6.2.3): query and fragment dropped, scheme and host lower-cased, default port dropped, empty
/// path as `/`. Percent-encoding is compared as written. `None` for anything that is not an
/// absolute http(s) URI.
pub fn normalize_htu(uri: &str) -> Option<String> {
    let uri = crate::jwk::htu_from_uri(uri.trim());
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => "443",
        "http" => "80",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    // Split host and port, minding IPv6 literals.
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        let close = stripped.find(']')?;
        let host = &authority[..close + 2];
        let after = &stripped[close + 1..];
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) if !p.is_empty() && !p.chars().all(|c| c.is_ascii_digit()) => return None,
        Some("") => None,
        Some(p) if p == default_port => None,
        other => other,
    };
    let mut out = format!("{scheme}://{}", host.to_ascii_lowercase());
    if let Some(p) = port {
        out.push(':');
        out.push_str(p);
    }
    out.push_str(path);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_normalization() {
        let base = "https://node.example:7443/pil.v1.LookupService/Lookup";
        assert_eq!(normalize_htu(base).as_deref(), Some(base));
        assert_eq!(
            normalize_htu("HTTPS://Node.Example:7443/pil.v1.LookupService/Lookup?x=1#y").as_deref(),
            Some(base)
        );
        assert_eq!(
            normalize_htu("https://node.example:443/a").as_deref(),
            Some("https://node.example/a")
        );
        assert_eq!(
            normalize_htu("http://node.example:80").as_deref(),
            Some("http://node.example/")
        );
        assert_eq!(
            normalize_htu("https://[::1]:7443/a").as_deref(),
            Some("https://[::1]:7443/a")
        );
        assert_eq!(
            normalize_htu("https://[::1]/a").as_deref(),
            Some("https://[::1]/a")
        );
        // The path is case-sensitive.
        assert_ne!(
            normalize_htu("https://n.example/A"),
            normalize_htu("https://n.example/a")
        );
        for bad in [
            "node.example/a",
            "ftp://node.example/a",
            "https:///a",
            "https://user@node.example/a",
            "https://node.example:74x3/a",
            "https://[::1/a",
        ] {
            assert_eq!(normalize_htu(bad), None, "{bad}");
        }
    }

    #[test]
    fn replay_cache_refuses_duplicates_until_expiry() {
        let cache = ReplayCache::new(10);
        assert!(cache.check_and_insert("a", 100, 0).is_ok());
        assert_eq!(
            cache.check_and_insert("a", 100, 50),
            Err(DpopError::Replayed("a".into()))
        );
        assert!(cache.check_and_insert("b", 100, 50).is_ok());
        assert_eq!(cache.len(), 2);
        // At time 100 both have expired and are purged.
        assert!(cache.check_and_insert("a", 200, 100).is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn replay_cache_is_bounded_and_fails_closed() {
        let cache = ReplayCache::new(2);
        assert!(cache.check_and_insert("a", 100, 0).is_ok());
        assert!(cache.check_and_insert("b", 100, 0).is_ok());
        assert_eq!(
            cache.check_and_insert("c", 100, 0),
            Err(DpopError::ReplayCacheFull(2))
        );
        // Once the old entries expire there is room again.
        assert!(cache.check_and_insert("c", 200, 100).is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn replay_cache_is_shared_across_threads() {
        let cache = Arc::new(ReplayCache::new(1000));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || cache.check_and_insert("same", 100, 0).is_ok())
            })
            .collect();
        let accepted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(accepted, 1);
    }

    #[test]
    fn dpop_typ_forms() {
        assert!(is_dpop_typ("dpop+jwt"));
        assert!(is_dpop_typ("DPoP+JWT"));
        assert!(is_dpop_typ("application/dpop+jwt"));
        assert!(!is_dpop_typ("JWT"));
        assert!(!is_dpop_typ("at+jwt"));
    }
}
