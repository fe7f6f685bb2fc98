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
        HeadVerifier {
            key: self.key.verifying_key(),
        }
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

/// A log's public key, for checking its signed tree heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadVerifier {
    key: VerifyingKey,
}

impl From<VerifyingKey> for HeadVerifier {
    fn from(key: VerifyingKey) -> Self {
        Self { key }
    }
}

impl HeadVerifier {
    /// Reads an SPKI PEM public key (`BEGIN PUBLIC KEY`).
    pub fn from_public_key_pem(pem: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem).map_err(KeyError::PublicKeyPem)?;
        Ok(Self { key })
    }

    /// The public key as SPKI PEM.
    pub fn public_key_pem(&self) -> Result<String, KeyError> {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .map_err(KeyError::PublicKeyPem)
    }

    /// Loads an SPKI PEM public key file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let pem = fs::read_to_string(path).map_err(io_error(path))?;
        Self::from_public_key_pem(&pem)
    }

    /// The Ed25519 public key (`as_bytes()` gives the raw 32 bytes).
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// The signed-note key id of this key for a log named `origin`.
    pub fn key_id(&self, origin: &str) -> String {
        hex::encode(key_id(origin, &self.key))
    }

    /// Checks that `sth` was signed by this key: the key id must be this
    /// key's id under the head's origin, and the signature must verify
    /// (strictly, rejecting malleable encodings) over the checkpoint body.
    pub fn verify(&self, sth: &SignedTreeHead) -> Result<(), VerifyError> {
        sth.head.validate()?;
        let expected = self.key_id(&sth.head.origin);
        if sth.key_id != expected {
            return Err(VerifyError::KeyIdMismatch {
                expected,
                got: sth.key_id.clone(),
            });
        }
        let signature = Signature::from_bytes(&sth.signature);
        self.key
            .verify_strict(sth.head.body().as_bytes(), &signature)
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
        let id = key_id(&head.origin, &self.key);
        let line = signatures
            .iter()
            .find(|s| s.name == head.origin && s.bytes[..4] == id)
            .ok_or_else(|| VerifyError::NoMatchingSignature {
                name: head.origin.clone(),
                key_id: hex::encode(id),
            })?;
        let signature: [u8; 64] = line.bytes[4..]
            .try_into()
            .map_err(|_| VerifyError::BadSignature)?;
        let sth = SignedTreeHead {
            head,
            key_id: hex::encode(id),
            signature,
        };
        self.verify(&sth)?;
        Ok(sth)
    }
}
