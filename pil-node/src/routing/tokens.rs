//! Routing tokens: the RFC 9497 OPRF (ristretto255-SHA512, base mode) of a patient's
//! identifier under a region's routing key.
//!
//! The region evaluates its own patients' tokens directly ([`RoutingKey::token`]). A
//! home node gets the token of the patient it looks up by [`blind`]ing the identifier,
//! having the region evaluate the blinded element ([`RoutingKey::evaluate_blinded`]),
//! and [`Blinded::finalize`]: the region sees a uniformly random group element, so it
//! learns nothing of whom the home node asks about, and the home node learns one
//! token per evaluation it asks for, so the region's rate limit on evaluations is a
//! limit on how many identifiers anyone can test.

use pil_proto::ident::PatientId;
use voprf::{BlindedElement, EvaluationElement, OprfClient, OprfServer, Ristretto255};

/// Domain separation of the routing key derived from its seed.
const KEY_INFO: &[u8] = b"pil routing key v1";

/// A token as summaries hold it: the first 8 bytes of the OPRF output. Filters take
/// 64-bit keys; the OPRF output is uniform, so any 8 of its bytes are.
pub type Token = u64;

/// Why a token exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the routing key seed does not make a key")]
    Key,
    #[error("a blinded element must be a valid ristretto255 point (32 bytes)")]
    BlindedElement,
    #[error("an evaluated element must be a valid ristretto255 point (32 bytes)")]
    EvaluatedElement,
    #[error("the OPRF could not be evaluated")]
    Evaluation,
}

/// A region's routing key: the only thing that makes its tokens.
pub struct RoutingKey {
    server: OprfServer<Ristretto255>,
    id: String,
}

impl std::fmt::Debug for RoutingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoutingKey(..)")
    }
}

/// The OPRF's input for an identifier: its system, a zero byte, its value, so a
/// number can never collide with one of another kind.
fn input(patient: &PatientId) -> Vec<u8> {
    let mut out = Vec::with_capacity(patient.system().len() + 1 + patient.value().len());
    out.extend_from_slice(patient.system().as_bytes());
    out.push(0);
    out.extend_from_slice(patient.value().as_bytes());
    out
}

fn token_of(output: &[u8]) -> Token {
    let mut head = [0u8; 8];
    head.copy_from_slice(&output[..8]);
    u64::from_be_bytes(head)
}

impl RoutingKey {
    /// The key a 32-byte secret seed derives (RFC 9497 DeriveKeyPair).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, TokenError> {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(b"pil routing key id\0")
            .chain_update(seed)
            .finalize();
        OprfServer::new_from_seed(seed, KEY_INFO)
            .map(|server| Self {
                server,
                id: hex::encode(&digest[..4]),
            })
            .map_err(|_| TokenError::Key)
    }

    /// The key in the routing key file `path` (64 hex characters).
    pub fn load(path: &std::path::Path) -> Result<Self, crate::patient_keys::KeyError> {
        let seed = crate::patient_keys::read_key_file(path)?;
        Self::from_seed(&seed).map_err(|_| crate::patient_keys::KeyError::Format {
            path: path.display().to_string(),
        })
    }

    /// The key's id: safe to show, and what tells peers that tokens changed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This region's token for a patient.
    pub fn token(&self, patient: &PatientId) -> Result<Token, TokenError> {
        self.server
            .evaluate(&input(patient))
            .map(|out| token_of(&out))
            .map_err(|_| TokenError::Evaluation)
    }

    /// Evaluates another node's blinded element; what it answers with.
    pub fn evaluate_blinded(&self, blinded: &[u8]) -> Result<Vec<u8>, TokenError> {
        let element = BlindedElement::<Ristretto255>::deserialize(blinded)
            .map_err(|_| TokenError::BlindedElement)?;
        Ok(self.server.blind_evaluate(&element).serialize().to_vec())
    }
}

/// A patient's identifier blinded for one evaluation by a region.
pub struct Blinded {
    state: OprfClient<Ristretto255>,
    input: Vec<u8>,
}

/// Blinds `patient` for a region to evaluate: the state to finalize with, and the
/// element to send (32 bytes, fresh randomness every time).
pub fn blind(patient: &PatientId) -> Result<(Blinded, Vec<u8>), TokenError> {
    let input = input(patient);
    let result = OprfClient::<Ristretto255>::blind(&input, &mut rand::rngs::OsRng)
        .map_err(|_| TokenError::Evaluation)?;
    let message = result.message.serialize().to_vec();
    Ok((
        Blinded {
            state: result.state,
            input,
        },
        message,
    ))
}

impl Blinded {
    /// The region's token for the patient, from its evaluation of the blinded element.
    pub fn finalize(self, evaluated: &[u8]) -> Result<Token, TokenError> {
        let element = EvaluationElement::<Ristretto255>::deserialize(evaluated)
            .map_err(|_| TokenError::EvaluatedElement)?;
        self.state
            .finalize(&self.input, &element)
            .map(|out| token_of(&out))
            .map_err(|_| TokenError::Evaluation)
    }
}

#[cfg(test)]
mod tests {
    use pil_proto::ident::{SYSTEM_FNR, synthetic_fnr};

    use super::*;

    fn patient(seed: u64) -> PatientId {
        PatientId::parse(SYSTEM_FNR, &synthetic_fnr(seed), true).unwrap()
    }

    /// The exchange gives the home node exactly the token the region computes for
    /// itself, while the region sees only a fresh random element.
    #[test]
    fn a_blinded_exchange_yields_the_regions_own_token() {
        let region = RoutingKey::from_seed(&[7; 32]).unwrap();
        let p = patient(1);
        let (blinded, message) = blind(&p).unwrap();
        assert_eq!(message.len(), 32);
        assert!(!message.windows(11).any(|w| w == p.value().as_bytes()));
        let answer = region.evaluate_blinded(&message).unwrap();
        assert_eq!(
            blinded.finalize(&answer).unwrap(),
            region.token(&p).unwrap()
        );
        // Blinding the same identifier again sends something unrelated.
        let (_, again) = blind(&p).unwrap();
        assert_ne!(again, message);
    }

    #[test]
    fn tokens_differ_by_patient_and_by_region() {
        let (a, b) = (
            RoutingKey::from_seed(&[1; 32]).unwrap(),
            RoutingKey::from_seed(&[2; 32]).unwrap(),
        );
        assert_ne!(a.token(&patient(1)).unwrap(), a.token(&patient(2)).unwrap());
        assert_ne!(a.token(&patient(1)).unwrap(), b.token(&patient(1)).unwrap());
        assert_eq!(a.token(&patient(1)).unwrap(), a.token(&patient(1)).unwrap());
    }

    #[test]
    fn malformed_elements_are_refused() {
        let region = RoutingKey::from_seed(&[3; 32]).unwrap();
        assert_eq!(
            region.evaluate_blinded(&[0xff; 32]),
            Err(TokenError::BlindedElement)
        );
        assert_eq!(
            region.evaluate_blinded(&[1; 5]),
            Err(TokenError::BlindedElement)
        );
        let (blinded, _) = blind(&patient(1)).unwrap();
        assert!(matches!(
            blinded.finalize(&[0xff; 32]),
            Err(TokenError::EvaluatedElement)
        ));
    }
}
