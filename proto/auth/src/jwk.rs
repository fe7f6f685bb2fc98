//! JWK helpers shared by the verifier and the development issuer.
//!
//! DPoP binds an access token to a client key through the key's RFC 7638 thumbprint
//! (`cnf.jkt`), and binds a proof to the token through `ath`. Both sides must compute these
//! byte-for-byte identically, so they live here, free of verifier types.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// JWK members that carry private (or symmetric) key material (RFC 7518 §6.2.2, §6.3.2, §6.4.1,
/// RFC 8037 §2). A public key used for verification must have none of them.
pub const PRIVATE_JWK_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why a JWK could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// The JWK is not a JSON object.
    #[error("the JWK is not a JSON object")]
    NotAnObject,
    /// A member required for this key type is missing or not a string.
    #[error("the JWK member \"{0}\" is missing or is not a string")]
    MissingMember(&'static str),
    /// The key type is not one we support.
    #[error("the JWK key type \"{0}\" is not supported")]
    UnsupportedKeyType(String),
    /// The curve is not one we support.
    #[error("the JWK curve \"{0}\" is not supported")]
    UnsupportedCurve(String),
    /// The JWK carries private key material.
    #[error("the JWK contains private key material (member \"{0}\")")]
    PrivateKeyMaterial(String),
    /// A symmetric (`kty` = `oct`) key where only public keys are acceptable.
    #[error("symmetric JWKs (kty \"oct\") are not accepted")]
    SymmetricKey,
    /// A member is present but unusable.
    #[error("the JWK member \"{member}\" is invalid: {reason}")]
    InvalidMember {
        /// The member's name.
        member: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// Base64url without padding, as JOSE uses everywhere.
pub fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding (padding and the standard alphabet are refused).
pub fn b64url_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(text)
}

/// The DPoP `ath` value for an access token: base64url(SHA-256(ASCII token)) (RFC 9449 §4.2).
pub fn access_token_hash(access_token: &str) -> String {
    b64url(Sha256::digest(access_token.as_bytes()))
}

/// The RFC 7638 canonical JSON of a JWK: only the required members of its key type, in
/// lexicographic order, no whitespace. Supported: `EC`, `RSA`, `OKP`, `oct`.
pub fn thumbprint_input(jwk: &Value) -> Result<String, JwkError> {
    let obj = jwk.as_object().ok_or(JwkError::NotAnObject)?;
    let kty = string_member(obj, "kty")?;
    let members: &[&'static str] = match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        "oct" => &["k", "kty"],
        other => return Err(JwkError::UnsupportedKeyType(other.to_owned())),
    };
    let mut out = String::from("{");
    for (i, name) in members.iter().enumerate() {
        let value = string_member(obj, name)?;
        if i > 0 {
            out.push(',');
        }
        // Member names are plain ASCII; values are serialized as JSON strings (RFC 7638 §3.2),
        // which escapes anything that needs it.
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        out.push_str(&Value::String(value.to_owned()).to_string());
    }
    out.push('}');
    Ok(out)
}

/// The RFC 7638 JWK thumbprint with SHA-256, base64url-encoded — the value of `cnf.jkt`.
pub fn thumbprint(jwk: &Value) -> Result<String, JwkError> {
    let input = thumbprint_input(jwk)?;
    Ok(b64url(Sha256::digest(input.as_bytes())))
}

/// Refuses a JWK that carries any private or symmetric key material.
pub fn ensure_public(jwk: &Value) -> Result<(), JwkError> {
    let obj = jwk.as_object().ok_or(JwkError::NotAnObject)?;
    match PRIVATE_JWK_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
        Some(member) => Err(JwkError::PrivateKeyMaterial((*member).to_owned())),
        None => Ok(()),
    }
}

/// The `htu` a client should put in a proof for a request URI: the URI without query and
/// fragment (RFC 9449 §4.2).
pub fn htu_from_uri(uri: &str) -> &str {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    &uri[..end]
}

pub(crate) fn string_member<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, JwkError> {
    obj.get(name)
        .and_then(Value::as_str)
        .ok_or(JwkError::MissingMember(name))
}

#[cfg(feature = "verifier")]
pub(crate) use public_key::{PublicKey, parse_public_jwk};

#[cfg(feature = "verifier")]
mod public_key {
    //! Turning a public JWK into a `jsonwebtoken` decoding key, with the checks the library
    //! itself does not make (private members, curve and size, algorithm binding).

    use std::str::FromStr;

    use jsonwebtoken::{Algorithm, DecodingKey};
    use serde_json::Value;

    use super::{JwkError, b64url_decode, ensure_public, string_member};

    /// Smallest RSA modulus we accept, in bytes (2048 bits).
    const MIN_RSA_MODULUS_BYTES: usize = 256;

    /// The kind of a verification key; decides which algorithms may be used with it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum KeyKind {
        Rsa,
        EcP256,
        EcP384,
        Ed25519,
    }

    impl KeyKind {
        /// Whether `alg` is a signature algorithm for this kind of key. Binding the algorithm to
        /// the key type is what stops algorithm-confusion attacks.
        pub(crate) fn allows(self, alg: Algorithm) -> bool {
            matches!(
                (self, alg),
                (
                    KeyKind::Rsa,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                ) | (KeyKind::EcP256, Algorithm::ES256)
                    | (KeyKind::EcP384, Algorithm::ES384)
                    | (KeyKind::Ed25519, Algorithm::EdDSA)
            )
        }
    }

    /// A public verification key parsed from a JWK.
    #[derive(Clone)]
    pub(crate) struct PublicKey {
        pub(crate) kind: KeyKind,
        pub(crate) decoding_key: DecodingKey,
        /// The JWK's `alg`, when it pins one.
        pub(crate) alg: Option<Algorithm>,
        /// The JWK's `use`, when given.
        pub(crate) key_use: Option<String>,
    }

    impl std::fmt::Debug for PublicKey {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PublicKey")
                .field("kind", &self.kind)
                .field("alg", &self.alg)
                .field("key_use", &self.key_use)
                .finish_non_exhaustive()
        }
    }

    impl PublicKey {
        /// Whether a token signed with `alg` may be verified with this key.
        pub(crate) fn allows(&self, alg: Algorithm) -> bool {
            self.kind.allows(alg) && self.alg.is_none_or(|pinned| pinned == alg)
        }
    }

    fn decoded(text: &str, member: &'static str) -> Result<Vec<u8>, JwkError> {
        b64url_decode(text).map_err(|e| JwkError::InvalidMember {
            member,
            reason: format!("not base64url: {e}"),
        })
    }

    fn exact_len(bytes: &[u8], len: usize, member: &'static str) -> Result<(), JwkError> {
        if bytes.len() == len {
            Ok(())
        } else {
            Err(JwkError::InvalidMember {
                member,
                reason: format!("expected {len} bytes, found {}", bytes.len()),
            })
        }
    }

    /// Parses a public JWK (EC P-256/P-384, RSA ≥ 2048 bits, OKP Ed25519). Symmetric keys and
    /// JWKs with private members are refused.
    pub(crate) fn parse_public_jwk(jwk: &Value) -> Result<PublicKey, JwkError> {
        let obj = jwk.as_object().ok_or(JwkError::NotAnObject)?;
        let kty = string_member(obj, "kty")?;
        if kty == "oct" {
            return Err(JwkError::SymmetricKey);
        }
        ensure_public(jwk)?;
        let (kind, decoding_key) = match kty {
            "RSA" => {
                let n = decoded(string_member(obj, "n")?, "n")?;
                let e = decoded(string_member(obj, "e")?, "e")?;
                let significant = n.iter().skip_while(|b| **b == 0).count();
                if significant < MIN_RSA_MODULUS_BYTES {
                    return Err(JwkError::InvalidMember {
                        member: "n",
                        reason: format!(
                            "RSA modulus of {} bits is shorter than 2048 bits",
                            significant * 8
                        ),
                    });
                }
                if e.iter().all(|b| *b == 0) {
                    return Err(JwkError::InvalidMember {
                        member: "e",
                        reason: "RSA exponent is zero or empty".to_owned(),
                    });
                }
                (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
            }
            "EC" => {
                let crv = string_member(obj, "crv")?;
                let (kind, len) = match crv {
                    "P-256" => (KeyKind::EcP256, 32),
                    "P-384" => (KeyKind::EcP384, 48),
                    other => return Err(JwkError::UnsupportedCurve(other.to_owned())),
                };
                let x_text = string_member(obj, "x")?;
                let y_text = string_member(obj, "y")?;
                exact_len(&decoded(x_text, "x")?, len, "x")?;
                exact_len(&decoded(y_text, "y")?, len, "y")?;
                let key = DecodingKey::from_ec_components(x_text, y_text).map_err(|e| {
                    JwkError::InvalidMember {
                        member: "x",
                        reason: e.to_string(),
                    }
                })?;
                (kind, key)
            }
            "OKP" => {
                let crv = string_member(obj, "crv")?;
                if crv != "Ed25519" {
                    return Err(JwkError::UnsupportedCurve(crv.to_owned()));
                }
                let x_text = string_member(obj, "x")?;
                exact_len(&decoded(x_text, "x")?, 32, "x")?;
                let key = DecodingKey::from_ed_components(x_text).map_err(|e| {
                    JwkError::InvalidMember {
                        member: "x",
                        reason: e.to_string(),
                    }
                })?;
                (KeyKind::Ed25519, key)
            }
            other => return Err(JwkError::UnsupportedKeyType(other.to_owned())),
        };
        let alg = match obj.get("alg") {
            None => None,
            Some(Value::String(name)) => {
                let alg = Algorithm::from_str(name).map_err(|_| JwkError::InvalidMember {
                    member: "alg",
                    reason: format!("unknown algorithm \"{name}\""),
                })?;
                if !kind.allows(alg) {
                    return Err(JwkError::InvalidMember {
                        member: "alg",
                        reason: format!("algorithm \"{name}\" does not fit a {kty} key"),
                    });
                }
                Some(alg)
            }
            Some(_) => {
                return Err(JwkError::InvalidMember {
                    member: "alg",
                    reason: "not a string".to_owned(),
                });
            }
        };
        let key_use = match obj.get("use") {
            None => None,
            Some(Value::String(u)) => Some(u.clone()),
            Some(_) => {
                return Err(JwkError::InvalidMember {
                    member: "use",
                    reason: "not a string".to_owned(),
                });
            }
        };
        Ok(PublicKey {
            kind,
            decoding_key,
            alg,
            key_use,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
    #[test]
    fn rfc7638_example_thumbprint() {
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        // Only the required members count, in lexicographic order.
        assert!(
            thumbprint_input(&jwk)
                .unwrap()
                .starts_with("{\"e\":\"AQAB\",\"kty\":\"RSA\",\"n\":\"0vx7")
        );
    }

    #[test]
    fn thumbprint_ignores_optional_members_and_order() {
        let a = json!({"kty":"EC","crv":"P-256","x":"AAAA","y":"BBBB"});
        let b = json!({"y":"BBBB","use":"sig","x":"AAAA","kid":"k","crv":"P-256","kty":"EC"});
        assert_eq!(thumbprint(&a).unwrap(), thumbprint(&b).unwrap());
        assert_eq!(
            thumbprint_input(&a).unwrap(),
            r#"{"crv":"P-256","kty":"EC","x":"AAAA","y":"BBBB"}"#
        );
        let okp =
            json!({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            thumbprint_input(&okp).unwrap(),
            r#"{"crv":"Ed25519","kty":"OKP","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#
        );
        // RFC 8037 Appendix A.3: thumbprint of the Ed25519 example key.
        assert_eq!(
            thumbprint(&okp).unwrap(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn thumbprint_refuses_incomplete_or_unknown_keys() {
        assert_eq!(
            thumbprint(&json!({"kty":"EC","crv":"P-256","x":"AAAA"})),
            Err(JwkError::MissingMember("y"))
        );
        assert_eq!(
            thumbprint(&json!({"kty":"XYZ"})),
            Err(JwkError::UnsupportedKeyType("XYZ".into()))
        );
        assert_eq!(thumbprint(&json!("nope")), Err(JwkError::NotAnObject));
        assert_eq!(
            thumbprint(&json!({"kty":"RSA","n":"AQAB","e":1})),
            Err(JwkError::MissingMember("e"))
        );
    }

    /// RFC 9449 §4.2 / §7.1 example: the access token and its `ath`.
    #[test]
    fn rfc9449_ath_example() {
        assert_eq!(
            access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }

    #[test]
    fn private_members_are_detected() {
        assert!(ensure_public(&json!({"kty":"EC","x":"a","y":"b"})).is_ok());
        assert_eq!(
            ensure_public(&json!({"kty":"EC","x":"a","y":"b","d":"c"})),
            Err(JwkError::PrivateKeyMaterial("d".into()))
        );
        assert_eq!(
            ensure_public(&json!({"kty":"RSA","n":"a","e":"b","qi":"c"})),
            Err(JwkError::PrivateKeyMaterial("qi".into()))
        );
    }

    #[test]
    fn htu_strips_query_and_fragment() {
        assert_eq!(
            htu_from_uri("https://n.example:7443/pil.v1.LookupService/Lookup?a=1#f"),
            "https://n.example:7443/pil.v1.LookupService/Lookup"
        );
        assert_eq!(
            htu_from_uri("https://n.example/x#f?y"),
            "https://n.example/x"
        );
        assert_eq!(htu_from_uri("https://n.example/x"), "https://n.example/x");
    }

    #[cfg(feature = "verifier")]
    #[test]
    fn public_jwk_parsing_checks() {
        // RFC 7638's example key is a 2048-bit RSA key.
        let rsa = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256"
        });
        let key = parse_public_jwk(&rsa).unwrap();
        assert_eq!(key.kind, public_key::KeyKind::Rsa);
        assert!(key.allows(jsonwebtoken::Algorithm::RS256));
        assert!(!key.allows(jsonwebtoken::Algorithm::PS256)); // pinned by "alg"
        assert!(!key.allows(jsonwebtoken::Algorithm::HS256));

        let short = json!({"kty":"RSA","n":"AQAB","e":"AQAB"});
        assert!(matches!(
            parse_public_jwk(&short),
            Err(JwkError::InvalidMember { member: "n", .. })
        ));
        assert_eq!(
            parse_public_jwk(&json!({"kty":"oct","k":"c2VjcmV0"})).unwrap_err(),
            JwkError::SymmetricKey
        );
        assert_eq!(
            parse_public_jwk(&json!({"kty":"EC","crv":"P-521","x":"AA","y":"AA"})).unwrap_err(),
            JwkError::UnsupportedCurve("P-521".into())
        );
        assert!(matches!(
            parse_public_jwk(&json!({"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"})),
            Err(JwkError::InvalidMember { member: "x", .. })
        ));
        assert!(matches!(
            parse_public_jwk(
                &json!({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","alg":"ES256"})
            ),
            Err(JwkError::InvalidMember { member: "alg", .. })
        ));
    }
}
