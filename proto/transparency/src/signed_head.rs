//! Ed25519 signing and verification of tree heads.
//!
//! A signed head is the log's public, non-repudiable commitment: once a
//! client holds two signed heads, a consistency proof between them either
//! verifies or proves the log rewrote history. Keys are stored as PKCS#8 /
//! SPKI PEM so they can be produced and inspected with standard tools
//! (`openssl genpkey -algorithm ed25519`).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use thiserror::Error;

use crate::checkpoint::{CheckpointError, SignedTreeHead, TreeHead, key_id, split_note};
use crate::verify::VerifyError;

/// Why a key could not be loaded, encoded or written.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The text is not an unencrypted PKCS#8 Ed25519 private key in PEM.
    #[error("not a PKCS#8 PEM Ed25519 private key: {0}")]
    PrivateKeyPem(ed25519_dalek::pkcs8::Error),
    /// The text is not an SPKI ("PUBLIC KEY") Ed25519 public key in PEM.
    #[error("not an SPKI PEM Ed25519 public key: {0}")]
    PublicKeyPem(ed25519_dalek::pkcs8::spki::Error),
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The log's signing key.
pub struct HeadSigner {
    key: SigningKey,
}

impl fmt::Debug for HeadSigner {
    // Never print the secret half.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadSigner")
            .field(
                "public_key",
                &hex::encode(self.key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl HeadSigner {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut OsRng),
        }
    }

    /// Reads an unencrypted PKCS#8 PEM private key (`BEGIN PRIVATE KEY`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(KeyError::PrivateKeyPem)?;
        Ok(Self { key })
    }

    /// The private key as PKCS#8 PEM; the buffer is wiped when dropped.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(KeyError::PrivateKeyPem)
    }

    /// The public key as SPKI PEM (`BEGIN PUBLIC KEY`), for verifiers.
    pub fn public_key_pem(&self) -> Result<String, KeyError> {
        self.verifier().public_key_pem()
    }

    /// The matching verifier.
    pub fn verifier(&self) -> HeadVerifier {
        HeadVerifier::from(self.key.verifying_key())
    }

    /// The signed-note key id of this key for a log named `origin`.
    pub fn key_id(&self, origin: &str) -> String {
        hex::encode(key_id(origin, &self.key.verifying_key()))
    }

    /// Loads a private key file written by [`HeadSigner::write_new`] (or any
    /// PKCS#8 PEM Ed25519 key).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let pem = Zeroizing::new(fs::read_to_string(path).map_err(io_error(path))?);
        Self::from_pkcs8_pem(&pem)
    }

    /// Generates a key and writes it to a new file, readable only by its
    /// owner on Unix (mode 0600). Refuses to overwrite an existing file, so
    /// a misconfigured path can never destroy the log's identity.
    pub fn write_new(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let signer = Self::generate();
        let pem = signer.to_pkcs8_pem()?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io_error(path))?;
        file.write_all(pem.as_bytes()).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
        Ok(signer)
    }

    /// The key itself, for a cosigner that keeps its key in the same file format.
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Signs `head`'s checkpoint body. Fails only if the origin cannot be a
    /// checkpoint origin / key name (see [`TreeHead::validate`]).
    pub fn sign(&self, head: TreeHead) -> Result<SignedTreeHead, CheckpointError> {
        head.validate()?;
        let signature = self.key.sign(head.body().as_bytes()).to_bytes();
        let key_id = hex::encode(key_id(&head.origin, &self.key.verifying_key()));
        Ok(SignedTreeHead {
            head,
            key_id,
            signature,
        })
    }
}

/// A log's public keys, for checking its signed tree heads: the key in use and,
/// after rotations, the keys before it. A head verifies when one of them signed it;
/// which one is told by the signature's key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadVerifier {
    /// Oldest first, as an operator lists its key history; never empty.
    keys: Vec<VerifyingKey>,
}

impl From<VerifyingKey> for HeadVerifier {
    fn from(key: VerifyingKey) -> Self {
        Self { keys: vec![key] }
    }
}

const PUBLIC_KEY_END: &str = "-----END PUBLIC KEY-----";

impl HeadVerifier {
    /// Reads one or more SPKI PEM public keys (`BEGIN PUBLIC KEY`), oldest first: a
    /// node's key history is its public keys concatenated.
    pub fn from_public_key_pem(pem: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut rest = pem;
        while let Some(end) = rest.find(PUBLIC_KEY_END) {
            let block = &rest[..end + PUBLIC_KEY_END.len()];
            let block = block.trim_start();
            keys.push(VerifyingKey::from_public_key_pem(block).map_err(KeyError::PublicKeyPem)?);
            rest = &rest[end + PUBLIC_KEY_END.len()..];
        }
        if keys.is_empty() || !rest.trim().is_empty() {
            // Let the parser say what is wrong with the text that is not a key.
            let text = if keys.is_empty() { pem } else { rest.trim() };
            return Err(KeyError::PublicKeyPem(
                VerifyingKey::from_public_key_pem(text)
                    .err()
                    .unwrap_or(ed25519_dalek::pkcs8::spki::Error::KeyMalformed),
            ));
        }
        Ok(Self { keys })
    }

    /// This history followed by `newer`'s keys not already in it.
    pub fn and(mut self, newer: &HeadVerifier) -> Self {
        for key in &newer.keys {
            if !self.keys.contains(key) {
                self.keys.push(*key);
            }
        }
        self
    }

    /// The newest public key as SPKI PEM.
    pub fn public_key_pem(&self) -> Result<String, KeyError> {
        self.newest()
            .to_public_key_pem(LineEnding::LF)
            .map_err(KeyError::PublicKeyPem)
    }

    /// Every key as SPKI PEM, oldest first: the key history to hand an auditor.
    pub fn history_pem(&self) -> Result<String, KeyError> {
        let mut out = String::new();
        for key in &self.keys {
            out.push_str(
                &key.to_public_key_pem(LineEnding::LF)
                    .map_err(KeyError::PublicKeyPem)?,
            );
        }
        Ok(out)
    }

    /// Loads a file of one or more SPKI PEM public keys.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let pem = fs::read_to_string(path).map_err(io_error(path))?;
        Self::from_public_key_pem(&pem)
    }

    /// The newest Ed25519 public key (`as_bytes()` gives the raw 32 bytes).
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.newest()
    }

    /// How many keys the history holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true: a verifier holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn newest(&self) -> &VerifyingKey {
        self.keys.last().expect("a verifier holds at least one key")
    }

    /// The signed-note key id of the newest key for a log named `origin`.
    pub fn key_id(&self, origin: &str) -> String {
        hex::encode(key_id(origin, self.newest()))
    }

    /// The key whose id under `origin` is `id`.
    fn key_with_id(&self, origin: &str, id: &[u8]) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| key_id(origin, k)[..] == *id)
    }

    /// Checks that `sth` was signed by one of these keys: the key id must be one of
    /// theirs under the head's origin, and the signature must verify (strictly,
    /// rejecting malleable encodings) over the checkpoint body.
    pub fn verify(&self, sth: &SignedTreeHead) -> Result<(), VerifyError> {
        sth.head.validate()?;
        let key = hex::decode(&sth.key_id)
            .ok()
            .and_then(|id| self.key_with_id(&sth.head.origin, &id))
            .ok_or_else(|| VerifyError::KeyIdMismatch {
                expected: self.key_id(&sth.head.origin),
                got: sth.key_id.clone(),
            })?;
        let signature = Signature::from_bytes(&sth.signature);
        key.verify_strict(sth.head.body().as_bytes(), &signature)
            .map_err(|_| VerifyError::BadSignature)
    }

    /// Verifies a checkpoint in C2SP signed-note form (as produced by
    /// [`SignedTreeHead::to_note`]) and returns the head it commits to.
    ///
    /// Per signed-note, lines from other keys (e.g. witness cosignatures)
    /// are ignored; the line whose name is the origin and whose key id is
    /// this key's must be present and must verify.
    pub fn verify_note(&self, note: &str) -> Result<SignedTreeHead, VerifyError> {
        let (text, signatures) = split_note(note)?;
        let head = TreeHead::parse_body(text)?;
        let line = signatures
            .iter()
            .find(|s| {
                s.name == head.origin && self.key_with_id(&head.origin, &s.bytes[..4]).is_some()
            })
            .ok_or_else(|| VerifyError::NoMatchingSignature {
                name: head.origin.clone(),
                key_id: self.key_id(&head.origin),
            })?;
        let signature: [u8; 64] = line.bytes[4..]
            .try_into()
            .map_err(|_| VerifyError::BadSignature)?;
        let sth = SignedTreeHead {
            head,
            key_id: hex::encode(&line.bytes[..4]),
            signature,
        };
        self.verify(&sth)?;
        Ok(sth)
    }
}
