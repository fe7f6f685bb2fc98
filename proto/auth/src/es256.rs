//! ES256 signatures through `ring` instead of RustCrypto's `p256`.
//!
//! Every lookup makes the node verify two ES256 signatures (the access token and the
//! DPoP proof), and every client call signs a proof. With `p256` these were most of a
//! lookup's CPU time (docs/benchmarks.md); `ring`'s P-256, already linked for TLS, is
//! several times faster. Only how ES256 signatures are made and checked changes: keys
//! are still parsed and vetted by `jsonwebtoken`'s RustCrypto provider first (so a
//! point off the curve is still a key error), and every other algorithm stays with it.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, rust_crypto};
use jsonwebtoken::errors::Result;
use jsonwebtoken::signature::{Error, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};

static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();

/// Makes this the process's `jsonwebtoken` provider, unless one is in use already (then
/// that one stays: signatures are equally valid either way, only slower). Called before
/// every signature this crate makes or checks.
pub(crate) fn install() {
    let provider = PROVIDER.get_or_init(|| CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: rust_crypto::DEFAULT_PROVIDER.key_utils.clone(),
    });
    let _ = provider.install_default();
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    if *alg == Algorithm::ES256
        && let Ok(pair) = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            key.as_bytes(),
            &SystemRandom::new(),
        )
    {
        return Ok(Box::new(Es256Signer(pair)));
    }
    (rust_crypto::DEFAULT_PROVIDER.signer_factory)(alg, key)
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    // Vets the key (curve membership) exactly as before.
    let fallback = (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)?;
    if *alg == Algorithm::ES256
        && let DecodingKeyKind::SecretOrDer(point) = key.kind()
        && point.len() == 65
        && point[0] == 4
    {
        return Ok(Box::new(Es256Verifier(point.clone())));
    }
    Ok(fallback)
}

struct Es256Signer(EcdsaKeyPair);

impl Signer<Vec<u8>> for Es256Signer {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, Error> {
        self.0
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| Error::new())
    }
}

impl JwtSigner for Es256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

/// An uncompressed SEC1 point, already checked to be on the curve.
struct Es256Verifier(Vec<u8>);

impl Verifier<Vec<u8>> for Es256Verifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), Error> {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(msg, signature)
            .map_err(|_| Error::new())
    }
}

impl JwtVerifier for Es256Verifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

#[cfg(all(test, feature = "dev-issuer"))]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePrivateKey;

    #[test]
    fn ring_signs_with_keys_made_here_and_rustcrypto_verifies() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let der = secret.to_pkcs8_der().unwrap();
        let key = EncodingKey::from_ec_der(der.as_bytes());
        // ring reads the PKCS#8 document p256 writes.
        assert!(
            EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                key.as_bytes(),
                &SystemRandom::new()
            )
            .is_ok()
        );
        let sig = signer(&Algorithm::ES256, &key)
            .unwrap()
            .try_sign(b"message")
            .unwrap();
        let point = secret.public_key().to_sec1_bytes();
        let x = crate::jwk::b64url(&point[1..33]);
        let y = crate::jwk::b64url(&point[33..]);
        let public = DecodingKey::from_ec_components(&x, &y).unwrap();
        let rust =
            (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, &public).unwrap();
        rust.verify(b"message", &sig).unwrap();
        let ours = verifier(&Algorithm::ES256, &public).unwrap();
        ours.verify(b"message", &sig).unwrap();
        assert!(ours.verify(b"other message", &sig).is_err());
    }
}
