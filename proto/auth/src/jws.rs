//! Internal JWS plumbing shared by access-token and DPoP-proof verification.
//!
//! We read the protected header ourselves before handing the token to `jsonwebtoken`, so that
//! every refusal (`alg: none`, HMAC, unknown `typ`, `crit`) gets its own error and no key is
//! ever chosen from a value we have not vetted. Signature checking itself is `jsonwebtoken`'s.

use std::str::FromStr;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::jwk::b64url_decode;

/// Asymmetric algorithms we accept, by their JOSE names.
pub(crate) const ALLOWED_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Why an `alg` header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AlgRefusal {
    /// `none` (in any letter case): an unsigned token.
    None,
    /// HS256/HS384/HS512: a shared-secret MAC, never acceptable from a third party.
    Symmetric(String),
    /// Anything else we do not support.
    Unsupported(String),
}

/// Classifies an `alg` value.
pub(crate) fn classify_alg(alg: &str) -> Result<Algorithm, AlgRefusal> {
    if alg.eq_ignore_ascii_case("none") {
        return Err(AlgRefusal::None);
    }
    if alg
        .as_bytes()
        .get(..2)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"HS"))
    {
        return Err(AlgRefusal::Symmetric(alg.to_owned()));
    }
    if !ALLOWED_ALGORITHMS.contains(&alg) {
        return Err(AlgRefusal::Unsupported(alg.to_owned()));
    }
    Algorithm::from_str(alg).map_err(|_| AlgRefusal::Unsupported(alg.to_owned()))
}

/// The protected header of a compact JWS, parsed without trusting anything in it yet.
pub(crate) struct RawHeader {
    pub(crate) fields: Map<String, Value>,
}

impl RawHeader {
    /// A string-valued header parameter; `Err` when present but not a string.
    pub(crate) fn str_param(&self, name: &str) -> Result<Option<&str>, String> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("header parameter \"{name}\" is not a string")),
        }
    }
}

/// Splits a compact JWS and parses its protected header. Refuses anything that is not exactly
/// three base64url segments (so JWE and JSON serializations are refused too), and anything
/// longer than `max_len`.
pub(crate) fn parse_header(token: &str, max_len: usize) -> Result<RawHeader, String> {
    if token.is_empty() {
        return Err("empty token".to_owned());
    }
    if token.len() > max_len {
        return Err(format!("longer than {max_len} bytes"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "expected 3 dot-separated segments, found {}",
            parts.len()
        ));
    }
    if parts[0].is_empty() || parts[1].is_empty() {
        return Err("empty header or payload segment".to_owned());
    }
    let header_bytes =
        b64url_decode(parts[0]).map_err(|e| format!("header is not base64url: {e}"))?;
    let header = crate::claims::parse_strict_json(&header_bytes)
        .map_err(|e| format!("header is not JSON: {e}"))?;
    match header {
        Value::Object(fields) => Ok(RawHeader { fields }),
        _ => Err("header is not a JSON object".to_owned()),
    }
}

/// Why `jsonwebtoken` refused a token whose header we had already vetted.
#[derive(Debug)]
pub(crate) enum DecodeFailure {
    /// The signature does not verify.
    Signature,
    /// The key could not be used (e.g. an EC point not on the curve).
    Key(String),
    /// The payload is not the claims we expect.
    Claims(String),
    /// Anything else (bad base64, ...).
    Malformed(String),
}

/// Verifies the signature with exactly `alg` and `key`, then deserializes the claims. All of
/// `jsonwebtoken`'s own claim checks are switched off: they use the system clock, and we check
/// every claim ourselves against the request's time.
pub(crate) fn verify_and_decode<T: DeserializeOwned>(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
) -> Result<T, DecodeFailure> {
    crate::es256::install();
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    match jsonwebtoken::decode::<T>(token, key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidSignature => DecodeFailure::Signature,
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => DecodeFailure::Key(e.to_string()),
            ErrorKind::Json(_) => DecodeFailure::Claims(e.to_string()),
            _ => DecodeFailure::Malformed(e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_classification() {
        assert_eq!(classify_alg("none"), Err(AlgRefusal::None));
        assert_eq!(classify_alg("NONE"), Err(AlgRefusal::None));
        assert_eq!(
            classify_alg("HS256"),
            Err(AlgRefusal::Symmetric("HS256".into()))
        );
        assert_eq!(
            classify_alg("hs512"),
            Err(AlgRefusal::Symmetric("hs512".into()))
        );
        assert_eq!(
            classify_alg("ES512"),
            Err(AlgRefusal::Unsupported("ES512".into()))
        );
        // Multi-byte input must not panic.
        assert!(matches!(
            classify_alg("€S256"),
            Err(AlgRefusal::Unsupported(_))
        ));
        assert!(matches!(classify_alg("H"), Err(AlgRefusal::Unsupported(_))));
        assert_eq!(
            classify_alg("es256"),
            Err(AlgRefusal::Unsupported("es256".into()))
        );
        for name in ALLOWED_ALGORITHMS {
            assert!(classify_alg(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn header_parsing_refuses_garbage() {
        assert!(parse_header("", 100).is_err());
        assert!(parse_header("a.b", 100).is_err());
        assert!(parse_header("a.b.c.d.e", 100).is_err());
        assert!(parse_header(".b.c", 100).is_err());
        assert!(parse_header("!!!.b.c", 100).is_err());
        // "[]" is JSON but not an object.
        assert!(parse_header("W10.b.c", 100).is_err());
        assert!(parse_header(&"a".repeat(200), 100).is_err());
        // Duplicate header parameters: {"alg":"ES256","alg":"none"}
        let dup = crate::jwk::b64url(r#"{"alg":"ES256","alg":"none"}"#);
        assert!(parse_header(&format!("{dup}.e30.x"), 100).is_err());
        // {"alg":"ES256"}
        let h = parse_header("eyJhbGciOiJFUzI1NiJ9.e30.", 100).unwrap();
        assert_eq!(h.str_param("alg"), Ok(Some("ES256")));
        assert_eq!(h.str_param("kid"), Ok(None));
    }
}
