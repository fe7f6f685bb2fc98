//! Witness cosignatures (<https://c2sp.org/tlog-cosignature>, `cosignature/v1` with
//! Ed25519).
//!
//! A witness that checked a checkpoint is consistent with every earlier one it saw
//! adds a signed-note line of its own to it. The line signs
//!
//! ```text
//! cosignature/v1
//! time <unix seconds>
//! <the checkpoint body>
//! ```
//!
//! and carries `key id (4) || timestamp (8, big-endian) || signature (64)`. The key id
//! is `SHA-256(name || 0x0A || 0x04 || public key)[:4]`, so a cosigner key can never be
//! taken for a log key (type 0x01). A head counts as published once a [`Quorum`] of
//! the witnesses an auditor trusts have cosigned it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::checkpoint::{CheckpointError, split_note};
use crate::signed_head::HeadSigner;

/// Signed-note signature type byte of a `cosignature/v1` Ed25519 key.
const COSIGNATURE_TYPE: u8 = 0x04;
/// The first line of the signed message: domain separation from log signatures.
const HEADER: &str = "cosignature/v1\n";
/// Key id, timestamp, Ed25519 signature.
const LINE_BYTES: usize = 4 + 8 + 64;

/// Why a cosigner key or a cosignature is not usable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CosignatureError {
    /// A witness name is also a signed-note key name.
    #[error("invalid witness name {0:?}: must be non-empty, without spaces or '+'")]
    InvalidName(String),
    /// A verifier key is not `<name>+<key id hex>+<base64(0x04 || 32-byte key)>`.
    #[error(
        "invalid witness key {0:?}: want <name>+<8 hex digits>+<base64 of 0x04 and the 32-byte Ed25519 key>"
    )]
    InvalidKey(String),
    /// The key id in a verifier key is not the one its name and key give.
    #[error("witness key {0:?}: the key id does not match its name and key")]
    KeyIdMismatch(String),
    /// The note is not a signed note.
    #[error(transparent)]
    Note(#[from] CheckpointError),
    /// A line with this witness's name and key id does not verify.
    #[error("the cosignature of {0} does not verify")]
    BadSignature(String),
    /// A witness's answer is not a sequence of signature lines.
    #[error("the witness's answer is not signed-note signature lines: {0}")]
    MalformedAnswer(&'static str),
}

/// Whether `name` can be a witness's (signed-note key) name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
}

fn cosigner_key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', COSIGNATURE_TYPE]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn signed_message(body: &str, timestamp: u64) -> String {
    format!("{HEADER}time {timestamp}\n{body}")
}

/// A witness's signing side: its name and key.
pub struct Cosigner {
    name: String,
    signer: HeadSigner,
}

impl std::fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cosigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Cosigner {
    /// A cosigner named `name` (a schema-less URL such as `witness.example/w1`). Its
    /// key must be its own: the message does not commit to the name.
    pub fn new(name: impl Into<String>, signer: HeadSigner) -> Result<Self, CosignatureError> {
        let name = name.into();
        if !is_valid_name(&name) {
            return Err(CosignatureError::InvalidName(name));
        }
        Ok(Self { name, signer })
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half, as verifiers hold it.
    pub fn key(&self) -> CosignerKey {
        CosignerKey {
            name: self.name.clone(),
            key: self.signer.signing_key().verifying_key(),
        }
    }

    /// The signature line (ending in a newline) cosigning a checkpoint `body` (its
    /// text up to and including the final newline, without signatures) at
    /// `timestamp` (unix seconds).
    pub fn cosign(&self, body: &str, timestamp: u64) -> String {
        let key = self.signer.signing_key();
        let signature = key.sign(signed_message(body, timestamp).as_bytes());
        let mut bytes = Vec::with_capacity(LINE_BYTES);
        bytes.extend_from_slice(&cosigner_key_id(&self.name, &key.verifying_key()));
        bytes.extend_from_slice(&timestamp.to_be_bytes());
        bytes.extend_from_slice(&signature.to_bytes());
        format!("\u{2014} {} {}\n", self.name, BASE64.encode(bytes))
    }
}

/// A witness's public key under its name, as an auditor or a log is configured with
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignerKey {
    name: String,
    key: VerifyingKey,
}

impl CosignerKey {
    /// Reads a signed-note verifier key: `<name>+<key id hex>+<base64(0x04 || key)>`.
    pub fn parse_vkey(vkey: &str) -> Result<Self, CosignatureError> {
        let invalid = || CosignatureError::InvalidKey(vkey.to_owned());
        let vkey = vkey.trim();
        // The name has no '+' and the id is hex; the base64 key may hold '+'.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        if !is_valid_name(name) || id.len() != 8 || id.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let id = hex::decode(id).map_err(|_| invalid())?;
        let bytes = BASE64.decode(key).map_err(|_| invalid())?;
        let [COSIGNATURE_TYPE, key @ ..] = bytes.as_slice() else {
            return Err(invalid());
        };
        let key: [u8; 32] = key.try_into().map_err(|_| invalid())?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| invalid())?;
        if cosigner_key_id(name, &key)[..] != id[..] {
            return Err(CosignatureError::KeyIdMismatch(vkey.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// The verifier key text [`CosignerKey::parse_vkey`] reads.
    pub fn to_vkey(&self) -> String {
        let mut bytes = vec![COSIGNATURE_TYPE];
        bytes.extend_from_slice(self.key.as_bytes());
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.key_id()),
            BASE64.encode(bytes)
        )
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id its signature lines carry.
    pub fn key_id(&self) -> [u8; 4] {
        cosigner_key_id(&self.name, &self.key)
    }

    /// This witness's cosignature of a signed note: `Some(timestamp)` when a line of
    /// its name and key id verifies over the note's text, `None` when it has no line,
    /// an error when its line does not verify.
    pub fn verify_note(&self, note: &str) -> Result<Option<u64>, CosignatureError> {
        let (text, signatures) = split_note(note)?;
        let id = self.key_id();
        let Some(line) = signatures
            .iter()
            .find(|s| s.name == self.name && s.bytes.get(..4) == Some(&id[..]))
        else {
            return Ok(None);
        };
        let bad = || CosignatureError::BadSignature(self.name.clone());
        if line.bytes.len() != LINE_BYTES {
            return Err(bad());
        }
        let timestamp = u64::from_be_bytes(line.bytes[4..12].try_into().map_err(|_| bad())?);
        if timestamp > i64::MAX as u64 {
            return Err(bad());
        }
        let signature: [u8; 64] = line.bytes[12..].try_into().map_err(|_| bad())?;
        self.key
            .verify_strict(
                signed_message(text, timestamp).as_bytes(),
                &Signature::from_bytes(&signature),
            )
            .map_err(|_| bad())?;
        Ok(Some(timestamp))
    }
}

/// Adds signature `lines` (a witness's answer: lines each starting with `—` and ending
/// in a newline) to a signed `note`, replacing a line of the same name and key id, so
/// a head keeps one cosignature per witness, the newest.
pub fn add_signatures(note: &str, lines: &str) -> Result<String, CosignatureError> {
    let (text, existing) = split_note(note)?;
    let answer = format!("{text}\n{lines}");
    let (_, added) = split_note(&answer)
        .map_err(|_| CosignatureError::MalformedAnswer("not signature lines"))?;
    if added.is_empty() {
        return Err(CosignatureError::MalformedAnswer("no signature line"));
    }
    let same = |a: &crate::checkpoint::NoteSignature<'_>,
                b: &crate::checkpoint::NoteSignature<'_>| {
        a.name == b.name && a.bytes.get(..4) == b.bytes.get(..4)
    };
    let mut out = format!("{text}\n");
    for line in existing
        .iter()
        .filter(|e| !added.iter().any(|a| same(a, e)))
    {
        out.push_str(&line.to_line());
    }
    for line in &added {
        out.push_str(&line.to_line());
    }
    Ok(out)
}

/// The witnesses an auditor trusts and how many of them must have cosigned a head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quorum {
    /// The trusted witnesses' keys.
    pub witnesses: Vec<CosignerKey>,
    /// How many distinct witnesses make a head published.
    pub needed: usize,
}

/// What one head's cosignatures say against a [`Quorum`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumCheck {
    /// Witnesses whose cosignature verified, with its timestamp (unix seconds).
    pub cosigned: Vec<(String, u64)>,
    /// Trusted witnesses without a cosignature on the head.
    pub missing: Vec<String>,
    /// Trusted witnesses whose line is there but does not verify.
    pub invalid: Vec<String>,
    /// How many were needed.
    pub needed: usize,
}

impl QuorumCheck {
    /// Whether enough trusted witnesses cosigned.
    pub fn met(&self) -> bool {
        self.cosigned.len() >= self.needed
    }
}

impl Quorum {
    /// Checks every trusted witness's cosignature on a signed note.
    pub fn check(&self, note: &str) -> Result<QuorumCheck, CosignatureError> {
        split_note(note)?;
        let mut check = QuorumCheck {
            cosigned: Vec::new(),
            missing: Vec::new(),
            invalid: Vec::new(),
            needed: self.needed,
        };
        for w in &self.witnesses {
            match w.verify_note(note) {
                Ok(Some(at)) => check.cosigned.push((w.name.clone(), at)),
                Ok(None) => check.missing.push(w.name.clone()),
                Err(_) => check.invalid.push(w.name.clone()),
            }
        }
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HeadSigner, TreeHead};

    fn signed() -> (HeadSigner, String) {
        signed_over([7; 32])
    }

    fn signed_over(root: [u8; 32]) -> (HeadSigner, String) {
        let log = HeadSigner::generate();
        let head = TreeHead {
            origin: "pil-audit/a".into(),
            size: 3,
            root,
            timestamp_ms: 1,
        };
        let note = log.sign(head).unwrap().to_note().unwrap();
        (log, note)
    }

    fn body(note: &str) -> &str {
        &note[..=note.find("\n\n").unwrap()]
    }

    #[test]
    fn a_cosignature_verifies_and_counts_towards_the_quorum() {
        let (log, note) = signed();
        let w1 = Cosigner::new("w1.example/w", HeadSigner::generate()).unwrap();
        let w2 = Cosigner::new("w2.example/w", HeadSigner::generate()).unwrap();
        let cosigned = add_signatures(&note, &w1.cosign(body(&note), 1700)).unwrap();
        assert_eq!(w1.key().verify_note(&cosigned), Ok(Some(1700)));
        assert_eq!(w2.key().verify_note(&cosigned), Ok(None));
        // The log's own signature still verifies with the witness lines beside it.
        log.verifier().verify_note(&cosigned).unwrap();
        let quorum = Quorum {
            witnesses: vec![w1.key(), w2.key()],
            needed: 2,
        };
        let check = quorum.check(&cosigned).unwrap();
        assert!(!check.met());
        assert_eq!(check.missing, vec!["w2.example/w".to_string()]);
        let both = add_signatures(&cosigned, &w2.cosign(body(&note), 1701)).unwrap();
        assert!(quorum.check(&both).unwrap().met());
        // A newer cosignature from the same witness replaces the older.
        let again = add_signatures(&both, &w1.cosign(body(&note), 1800)).unwrap();
        assert_eq!(again.matches("w1.example/w").count(), 1);
        assert_eq!(w1.key().verify_note(&again), Ok(Some(1800)));
    }

    #[test]
    fn a_cosignature_over_another_body_does_not_verify() {
        let (_, note) = signed();
        let (_, other) = signed_over([8; 32]);
        let w = Cosigner::new("w.example", HeadSigner::generate()).unwrap();
        let moved = add_signatures(&note, &w.cosign(body(&other), 5)).unwrap();
        assert_eq!(
            w.key().verify_note(&moved),
            Err(CosignatureError::BadSignature("w.example".into()))
        );
    }

    #[test]
    fn vkeys_round_trip_and_are_checked() {
        let w = Cosigner::new("witness.example/w1", HeadSigner::generate()).unwrap();
        let vkey = w.key().to_vkey();
        assert_eq!(CosignerKey::parse_vkey(&vkey).unwrap(), w.key());
        let renamed = vkey.replacen("witness.example/w1", "witness.example/w2", 1);
        assert!(matches!(
            CosignerKey::parse_vkey(&renamed),
            Err(CosignatureError::KeyIdMismatch(_))
        ));
        for bad in ["", "a+b", "a+0000000+AAAA", "a b+00000000+BA=="] {
            assert!(CosignerKey::parse_vkey(bad).is_err(), "{bad:?}");
        }
        assert!(Cosigner::new("a b", HeadSigner::generate()).is_err());
    }
}
