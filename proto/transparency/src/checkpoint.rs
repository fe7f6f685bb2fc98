//! Tree heads in the C2SP checkpoint format (<https://c2sp.org/tlog-checkpoint>).
//!
//! A tree head commits to the whole log at one size. The signed bytes are a
//! checkpoint note body, so PIL's heads can be read and checked by existing
//! transparency-log tooling (witnesses, Go's `sumdb/note`), with the
//! signing time carried in one extension line:
//!
//! ```text
//! <origin>
//! <tree size, decimal>
//! <root hash, standard base64>
//! timestamp <unix milliseconds>
//! ```
//!
//! Key ids follow C2SP signed-note for Ed25519, with the origin as key name
//! (tlog-checkpoint: "the log's key name SHOULD match the origin line"):
//! `SHA-256(origin || 0x0A || 0x01 || public key)[:4]`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::hash::Hash;

/// Signed-note signature type byte for plain Ed25519.
const ED25519_SIGNATURE_TYPE: u8 = 0x01;
/// Prefix of the timestamp extension line.
const TIMESTAMP_PREFIX: &str = "timestamp ";
/// Prefix of a signed-note signature line: em dash, space.
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";

/// Why a tree head or a note is not well formed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CheckpointError {
    /// The origin doubles as the signed-note key name, so it must be usable
    /// as one.
    #[error("invalid origin {origin:?}: {reason}")]
    InvalidOrigin {
        /// The rejected origin.
        origin: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// Every checkpoint line, including the last, ends in a newline.
    #[error("checkpoint body must end with a newline")]
    MissingFinalNewline,
    /// PIL checkpoints have exactly origin, size, root and timestamp lines.
    #[error(
        "checkpoint body must have exactly 4 lines (origin, tree size, root hash, timestamp extension), found {0}"
    )]
    WrongLineCount(usize),
    /// The size line is not a canonical decimal `u64`.
    #[error("invalid tree size line {0:?}: want decimal digits without leading zeros")]
    InvalidSize(String),
    /// The root line is not the canonical base64 of 32 bytes.
    #[error("invalid root hash line {0:?}: want standard base64 of 32 bytes")]
    InvalidRoot(String),
    /// The extension line is not `timestamp <decimal milliseconds>`.
    #[error("invalid timestamp line {0:?}: want \"timestamp <unix milliseconds>\"")]
    InvalidTimestamp(String),
    /// A key id is not 4 bytes of lowercase hex.
    #[error("invalid key id {0:?}: want 8 lowercase hex digits")]
    InvalidKeyId(String),
    /// A signed note does not follow c2sp.org/signed-note.
    #[error("malformed signed note: {0}")]
    MalformedNote(&'static str),
}

/// The state of the log at one size: what a signature commits to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    /// Log identity, e.g. `pil.example.no/audit`; also the signing key name.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 6962 root of the first `size` leaves (hex in JSON).
    #[serde(with = "hex_hash")]
    pub root: Hash,
    /// When the head was produced, Unix time in milliseconds.
    pub timestamp_ms: u64,
}

impl TreeHead {
    /// Checks that the origin can be a checkpoint origin and a signed-note
    /// key name: non-empty, no whitespace, no `+`, no control characters.
    pub fn validate(&self) -> Result<(), CheckpointError> {
        validate_origin(&self.origin)
    }

    /// The checkpoint note text that gets signed.
    ///
    /// Only meaningful for a head that passes [`TreeHead::validate`]; the
    /// signer and verifier check that before using it.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root),
            TIMESTAMP_PREFIX,
            self.timestamp_ms
        )
    }

    /// Parses a body produced by [`TreeHead::body`], strictly: any other
    /// spelling of the same values is rejected, so `parse_body(b)?.body()`
    /// always equals `b`.
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let text = body
            .strip_suffix('\n')
            .ok_or(CheckpointError::MissingFinalNewline)?;
        let lines: Vec<&str> = text.split('\n').collect();
        let [origin, size, root, timestamp] = lines[..] else {
            return Err(CheckpointError::WrongLineCount(lines.len()));
        };
        validate_origin(origin)?;
        let size = parse_decimal(size).ok_or_else(|| CheckpointError::InvalidSize(size.into()))?;
        let root = parse_root(root).ok_or_else(|| CheckpointError::InvalidRoot(root.into()))?;
        let timestamp_ms = timestamp
            .strip_prefix(TIMESTAMP_PREFIX)
            .and_then(parse_decimal)
            .ok_or_else(|| CheckpointError::InvalidTimestamp(timestamp.into()))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            timestamp_ms,
        })
    }
}

fn validate_origin(origin: &str) -> Result<(), CheckpointError> {
    let reason = if origin.is_empty() {
        "must not be empty"
    } else if origin.chars().any(char::is_whitespace) {
        "must not contain whitespace"
    } else if origin.contains('+') {
        "must not contain '+'"
    } else if origin.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(CheckpointError::InvalidOrigin {
        origin: origin.to_owned(),
        reason,
    })
}

/// Canonical decimal: digits only, no sign, no leading zeros, fits a u64.
fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

fn parse_root(s: &str) -> Option<Hash> {
    let bytes = BASE64.decode(s).ok()?;
    let root: Hash = bytes.try_into().ok()?;
    // Reject alternative spellings so the body round-trips byte for byte.
    (BASE64.encode(root) == s).then_some(root)
}

/// The C2SP signed-note key id of an Ed25519 key under `name`:
/// `SHA-256(name || 0x0A || 0x01 || public key)[:4]`.
pub fn key_id(name: &str, public_key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519_SIGNATURE_TYPE]);
    h.update(public_key.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A tree head with the log's Ed25519 signature over its checkpoint body.
///
/// JSON form: `{"head": {"origin", "size", "root" (hex), "timestamp_ms"},
/// "key_id" (8 hex digits), "signature" (base64 of 64 bytes)}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    /// What was signed.
    pub head: TreeHead,
    /// Signed-note key id of the signing key under `head.origin`, lowercase
    /// hex of 4 bytes.
    pub key_id: String,
    /// Ed25519 signature over `head.body()`.
    #[serde(with = "base64_signature")]
    pub signature: [u8; 64],
}

impl SignedTreeHead {
    /// The key id as the 4 bytes a signed-note signature line carries.
    pub fn key_id_bytes(&self) -> Result<[u8; 4], CheckpointError> {
        let invalid = || CheckpointError::InvalidKeyId(self.key_id.clone());
        if self.key_id.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let bytes = hex::decode(&self.key_id).map_err(|_| invalid())?;
        bytes.try_into().map_err(|_| invalid())
    }

    /// The head as a C2SP signed note (checkpoint body, blank line, one
    /// signature line), verifiable by any signed-note implementation that
    /// is given this log's key.
    pub fn to_note(&self) -> Result<String, CheckpointError> {
        self.head.validate()?;
        let mut sig = Vec::with_capacity(4 + 64);
        sig.extend_from_slice(&self.key_id_bytes()?);
        sig.extend_from_slice(&self.signature);
        Ok(format!(
            "{}\n{SIGNATURE_LINE_PREFIX}{} {}\n",
            self.head.body(),
            self.head.origin,
            BASE64.encode(sig)
        ))
    }
}

/// One signature line of a signed note.
pub(crate) struct NoteSignature<'a> {
    pub(crate) name: &'a str,
    /// Key id followed by the signature proper.
    pub(crate) bytes: Vec<u8>,
}

impl NoteSignature<'_> {
    /// The line again, as it appears in a note.
    pub(crate) fn to_line(&self) -> String {
        format!(
            "{SIGNATURE_LINE_PREFIX}{} {}\n",
            self.name,
            BASE64.encode(&self.bytes)
        )
    }
}

/// Splits a signed note into its text (with final newline) and signature
/// lines, per c2sp.org/signed-note.
pub(crate) fn split_note(note: &str) -> Result<(&str, Vec<NoteSignature<'_>>), CheckpointError> {
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(CheckpointError::MalformedNote(
            "contains control characters other than newline",
        ));
    }
    // The text is separated from the signatures by the last empty line.
    let split = note.rfind("\n\n").ok_or(CheckpointError::MalformedNote(
        "no blank line before signatures",
    ))?;
    let (text, signatures) = (&note[..=split], &note[split + 2..]);
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or(CheckpointError::MalformedNote("must end with a newline"))?;
    signatures
        .split('\n')
        .map(|line| {
            let (name, sig) = line
                .strip_prefix(SIGNATURE_LINE_PREFIX)
                .and_then(|rest| rest.split_once(' '))
                .ok_or(CheckpointError::MalformedNote(
                    "signature line is not \"\u{2014} <name> <base64>\"",
                ))?;
            let bytes = BASE64.decode(sig).ok().filter(|b| b.len() >= 4).ok_or(
                CheckpointError::MalformedNote("signature is not base64 of at least 4 bytes"),
            )?;
            Ok(NoteSignature { name, bytes })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|sigs| (text, sigs))
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::hash::Hash;

    pub fn serialize<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("root hash must be 32 bytes of hex"))
    }
}

mod base64_signature {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(sig))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = BASE64.decode(&text).map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("signature must be 64 bytes of base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_canonical() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "18446744073709551616",
            "1e3",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn origin_rules() {
        assert!(validate_origin("pil.example.no/audit").is_ok());
        for bad in ["", "a b", "a\nb", "a+b", "a\u{a0}b", "a\u{7}b"] {
            assert!(validate_origin(bad).is_err(), "{bad:?}");
        }
    }
}
