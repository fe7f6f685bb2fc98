//! How patient identifiers are protected at rest.
//!
//! The registry never stores a plain identifier in a key: patients are keyed by a keyed
//! pseudonym (truncated HMAC-SHA-256 under a per-node secret), so a copied data
//! directory does not reveal who is in it, and the same identifier maps to different
//! pseudonyms on different nodes. Where an identifier must be read back (an
//! organization exporting what it registered), it is sealed with XChaCha20-Poly1305
//! under a second key, bound to its pseudonym so a sealed value cannot be moved to
//! another record unnoticed.
//!
//! The seal is deterministic: its nonce is derived from the pseudonym, so nothing but
//! the ciphertext is stored (28 bytes per pointer instead of 81). This reveals nothing
//! the key already does: equal seals mean equal pseudonyms, which the key shows
//! anyway. A (key, nonce) pair only repeats for the same pseudonym, hence (short of a
//! 128-bit HMAC collision) for the same identifier, i.e. the same message, so the
//! stream cipher's keystream never covers two different plaintexts.

use std::path::Path;

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use hmac::{Hmac, Mac};
use pil_proto::ident::{PatientId, PatientIdKind};
use rand::RngCore;
use sha2::Sha256;

/// Bytes of a patient pseudonym. 128 bits keeps collisions out of reach for any
/// population while keeping keys short on disk.
pub const PSEUDONYM_LEN: usize = 16;

/// A patient's pseudonym: the only form in which the registry indexes patients.
pub type Pseudonym = [u8; PSEUDONYM_LEN];

const NONCE_LEN: usize = 24;
/// Fills the nonce after the pseudonym, so sealed identifiers have a nonce space of
/// their own.
const SEAL_NONCE_TAG: &[u8; NONCE_LEN - PSEUDONYM_LEN] = b"pil-seal";

/// Why the keys could not be loaded or a sealed identifier not opened.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} must hold 32 bytes as 64 hex characters")]
    Format { path: String },
    #[error("a stored patient identifier could not be decrypted (wrong storage key?)")]
    Open,
}

/// The node's two patient secrets.
#[derive(Clone)]
pub struct PatientKeys {
    pseudonym: Hmac<Sha256>,
    storage: XChaCha20Poly1305,
}

impl std::fmt::Debug for PatientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKeys(..)")
    }
}

impl PatientKeys {
    pub fn from_bytes(pseudonym_key: &[u8; 32], storage_key: &[u8; 32]) -> Self {
        Self {
            pseudonym: <Hmac<Sha256> as Mac>::new_from_slice(pseudonym_key)
                .expect("HMAC accepts any key length"),
            storage: XChaCha20Poly1305::new(storage_key.into()),
        }
    }

    pub fn load(pseudonym_key_file: &Path, storage_key_file: &Path) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(
            &read_key_file(pseudonym_key_file)?,
            &read_key_file(storage_key_file)?,
        ))
    }

    /// The pseudonym of a validated identifier. The identifier's system is part of the
    /// input, so a number can never collide with one of another kind.
    pub fn pseudonym(&self, id: &PatientId) -> Pseudonym {
        let mut mac = self.pseudonym.clone();
        mac.update(id.system().as_bytes());
        mac.update(&[0]);
        mac.update(id.value().as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; PSEUDONYM_LEN];
        out.copy_from_slice(&full[..PSEUDONYM_LEN]);
        out
    }

    /// Encrypts the identifier (one byte for its kind, then its 11 digits) for later
    /// export, bound to the pseudonym.
    pub fn seal(&self, id: &PatientId, pseudonym: &Pseudonym) -> Vec<u8> {
        let mut plain = Vec::with_capacity(1 + id.value().len());
        plain.push(kind_byte(id.kind()));
        plain.extend_from_slice(id.value().as_bytes());
        self.storage
            .encrypt(
                &seal_nonce(pseudonym),
                Payload {
                    msg: &plain,
                    aad: pseudonym,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of a short message cannot fail")
    }

    /// Decrypts a sealed identifier into `(system, value)`.
    pub fn open(&self, sealed: &[u8], pseudonym: &Pseudonym) -> Result<(String, String), KeyError> {
        let plain = self
            .storage
            .decrypt(
                &seal_nonce(pseudonym),
                Payload {
                    msg: sealed,
                    aad: pseudonym,
                },
            )
            .map_err(|_| KeyError::Open)?;
        let (&kind, value) = plain.split_first().ok_or(KeyError::Open)?;
        let system = system_of(kind).ok_or(KeyError::Open)?;
        let value = String::from_utf8(value.to_vec()).map_err(|_| KeyError::Open)?;
        Ok((system.to_string(), value))
    }

    /// Decrypts an identifier sealed by storage format 1: a random nonce, then the
    /// ciphertext of `system\0value`.
    pub fn open_format1(
        &self,
        sealed: &[u8],
        pseudonym: &Pseudonym,
    ) -> Result<(String, String), KeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let plain = self
            .storage
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: pseudonym,
                },
            )
            .map_err(|_| KeyError::Open)?;
        let text = String::from_utf8(plain).map_err(|_| KeyError::Open)?;
        let (system, value) = text.split_once('\0').ok_or(KeyError::Open)?;
        Ok((system.to_string(), value.to_string()))
    }
}

fn seal_nonce(pseudonym: &Pseudonym) -> XNonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..PSEUDONYM_LEN].copy_from_slice(pseudonym);
    nonce[PSEUDONYM_LEN..].copy_from_slice(SEAL_NONCE_TAG);
    nonce.into()
}

/// The sealed kind byte of each identifier system. Stored: never renumber.
const KINDS: [(u8, &str); 3] = [
    (1, pil_proto::ident::SYSTEM_FNR),
    (2, pil_proto::ident::SYSTEM_DNR),
    (3, pil_proto::ident::SYSTEM_FHN),
];

fn kind_byte(kind: PatientIdKind) -> u8 {
    let system = kind.system();
    KINDS
        .iter()
        .find(|(_, s)| *s == system)
        .map(|(b, _)| *b)
        .expect("every identifier kind has a system in KINDS")
}

fn system_of(byte: u8) -> Option<&'static str> {
    KINDS.iter().find(|(b, _)| *b == byte).map(|(_, s)| *s)
}

/// Creates a fresh random 32-byte key file (hex, mode 0600).
pub fn write_new_key_file(path: &Path) -> std::io::Result<()> {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    write_private(path, hex::encode(key).as_bytes())
}

/// Writes a file readable only by its owner, for secrets.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn read_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Format {
        path: path.display().to_string(),
    })?;
    bytes.try_into().map_err(|_| KeyError::Format {
        path: path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> PatientKeys {
        PatientKeys::from_bytes(&[seed; 32], &[seed.wrapping_add(1); 32])
    }

    fn patient() -> PatientId {
        PatientId::parse(
            pil_proto::ident::SYSTEM_FNR,
            &pil_proto::ident::synthetic_fnr(7),
            true,
        )
        .unwrap()
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_across_keys() {
        let p = patient();
        assert_eq!(keys(1).pseudonym(&p), keys(1).pseudonym(&p));
        assert_ne!(keys(1).pseudonym(&p), keys(2).pseudonym(&p));
    }

    #[test]
    fn sealed_identifiers_open_only_with_their_pseudonym() {
        let k = keys(3);
        let p = patient();
        let ps = k.pseudonym(&p);
        let sealed = k.seal(&p, &ps);
        assert!(!sealed.windows(11).any(|w| w == p.value().as_bytes()));
        let (system, value) = k.open(&sealed, &ps).unwrap();
        assert_eq!((system.as_str(), value.as_str()), (p.system(), p.value()));
        assert!(k.open(&sealed, &[0u8; PSEUDONYM_LEN]).is_err());
        assert!(keys(4).open(&sealed, &ps).is_err());
        // Kind byte, 11 digits and the tag; the same identifier seals the same.
        assert_eq!(sealed.len(), 1 + 11 + 16);
        assert_eq!(k.seal(&p, &ps), sealed);
    }

    #[test]
    fn every_identifier_kind_round_trips() {
        let k = keys(5);
        use pil_proto::ident::{SYSTEM_DNR, SYSTEM_FHN, SYSTEM_FNR};
        let fh = (0..100)
            .map(|n| format!("918880123{n:02}"))
            .find(|v| PatientId::parse(SYSTEM_FHN, v, false).is_ok())
            .expect("some check digits complete an FH-nummer");
        for (system, value) in [
            (SYSTEM_FNR, "13097248022".to_string()),
            (SYSTEM_FNR, "13527248013".to_string()),
            (SYSTEM_DNR, "53097248016".to_string()),
            (SYSTEM_FHN, fh),
        ] {
            let p = PatientId::parse(system, &value, false).unwrap();
            let ps = k.pseudonym(&p);
            let (s, v) = k.open(&k.seal(&p, &ps), &ps).unwrap();
            assert_eq!((s.as_str(), v.as_str()), (p.system(), p.value()));
        }
    }

    /// Pointers written by storage format 1 (random nonce, `system\0value`) still open.
    #[test]
    fn format1_seals_still_open() {
        let k = keys(6);
        let p = patient();
        let ps = k.pseudonym(&p);
        let nonce = [9u8; NONCE_LEN];
        let plain = format!("{}\0{}", p.system(), p.value());
        let ct = k
            .storage
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: &ps,
                },
            )
            .unwrap();
        let sealed = [nonce.as_slice(), &ct].concat();
        let (system, value) = k.open_format1(&sealed, &ps).unwrap();
        assert_eq!((system.as_str(), value.as_str()), (p.system(), p.value()));
        assert!(k.open_format1(&sealed, &[0u8; PSEUDONYM_LEN]).is_err());
        assert!(k.open(&sealed, &ps).is_err());
    }
}
