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
//! The pseudonym key is versioned: its file is a key ring, the key in force on its
//! first line and earlier keys (or one staged to come) after it. Patients are stored
//! under the key in force; while any are still stored under an earlier key (a rotation
//! is moving them), reads look under every key in the ring.
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
    #[error(
        "pseudonym key file {path}, line {line}: expected a key as 64 hex characters, \
         optionally after the word `staged`"
    )]
    Ring { path: String, line: usize },
    #[error("pseudonym key file {path} holds no key in force (its first key line)")]
    NoCurrent { path: String },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Change(String),
    #[error("a stored patient identifier could not be decrypted (wrong storage key?)")]
    Open,
}

/// The node's patient secrets: the pseudonym key ring and the storage key.
#[derive(Clone)]
pub struct PatientKeys {
    pseudonym: Hmac<Sha256>,
    /// The keys besides the one in force that the registry is read under, never
    /// written: earlier keys and staged ones.
    others: Vec<Hmac<Sha256>>,
    /// Retired keys: only audit records are found under them.
    retired: Vec<Hmac<Sha256>>,
    ids: KeyIds,
    storage: XChaCha20Poly1305,
}

/// The ring's keys by id (a hash of the key: names it, reveals nothing of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyIds {
    pub current: String,
    pub earlier: Vec<String>,
    pub staged: Vec<String>,
    pub retired: Vec<String>,
}

/// One key of a ring file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingKey {
    pub key: [u8; 32],
    pub role: Role,
}

/// What a ring key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The first of these is in force; later ones are earlier keys, read until the
    /// patients stored under them are moved.
    Active,
    /// To come into force at the next rotation: read already, so that every node of a
    /// region finds what the first node to rotate writes.
    Staged,
    /// No longer read for the registry; kept to find audit records by patient that
    /// were written while it was in force.
    Retired,
}

/// The id of a pseudonym key.
pub fn key_id(key: &[u8; 32]) -> String {
    use sha2::Digest;
    let digest = Sha256::new()
        .chain_update(b"pil pseudonym key id\0")
        .chain_update(key)
        .finalize();
    hex::encode(&digest[..4])
}

/// Parses a pseudonym key ring: one key per line (64 hex characters), the first bare
/// one in force and later bare ones earlier keys; `staged <hex>` marks a key to come,
/// `retired <hex>` one kept only for audit search; `#` starts a comment.
pub fn parse_ring(text: &str, path: &Path) -> Result<Vec<RingKey>, KeyError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (role, hex_key) = match line.split_once(char::is_whitespace) {
            Some(("staged", rest)) => (Role::Staged, rest.trim()),
            Some(("retired", rest)) => (Role::Retired, rest.trim()),
            Some(_) => {
                return Err(KeyError::Ring {
                    path: path.display().to_string(),
                    line: n + 1,
                });
            }
            None => (Role::Active, line),
        };
        let key: [u8; 32] = hex::decode(hex_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Ring {
                path: path.display().to_string(),
                line: n + 1,
            })?;
        keys.push(RingKey { key, role });
    }
    if !keys.iter().any(|k| k.role == Role::Active) {
        return Err(KeyError::NoCurrent {
            path: path.display().to_string(),
        });
    }
    Ok(keys)
}

/// A ring file's text, keys in the order given.
pub fn format_ring(keys: &[RingKey]) -> String {
    let mut out = String::from(
        "# PIL pseudonym key ring: the first key is in force, the others are read\n\
         # until no patient is stored under them. Keep this file secret.\n",
    );
    for k in keys {
        match k.role {
            Role::Active => {}
            Role::Staged => out.push_str("staged "),
            Role::Retired => out.push_str("retired "),
        }
        out.push_str(&hex::encode(k.key));
        out.push('\n');
    }
    out
}

fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

impl std::fmt::Debug for PatientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKeys(..)")
    }
}

impl PatientKeys {
    pub fn from_bytes(pseudonym_key: &[u8; 32], storage_key: &[u8; 32]) -> Self {
        Self::from_ring(
            &[RingKey {
                key: *pseudonym_key,
                role: Role::Active,
            }],
            storage_key,
        )
    }

    /// Keys from a ring (which must hold a key in force: [`parse_ring`] checks).
    pub fn from_ring(ring: &[RingKey], storage_key: &[u8; 32]) -> Self {
        let current = ring
            .iter()
            .position(|k| k.role == Role::Active)
            .expect("a ring holds a key in force");
        let mut ids = KeyIds {
            current: key_id(&ring[current].key),
            ..KeyIds::default()
        };
        let (mut others, mut retired) = (Vec::new(), Vec::new());
        for (i, k) in ring.iter().enumerate() {
            if i == current {
                continue;
            }
            let id = key_id(&k.key);
            match k.role {
                Role::Active => {
                    others.push(hmac(&k.key));
                    ids.earlier.push(id);
                }
                Role::Staged => {
                    others.push(hmac(&k.key));
                    ids.staged.push(id);
                }
                Role::Retired => {
                    retired.push(hmac(&k.key));
                    ids.retired.push(id);
                }
            }
        }
        Self {
            pseudonym: hmac(&ring[current].key),
            others,
            retired,
            ids,
            storage: XChaCha20Poly1305::new(storage_key.into()),
        }
    }

    pub fn load(pseudonym_key_file: &Path, storage_key_file: &Path) -> Result<Self, KeyError> {
        Ok(Self::from_ring(
            &read_ring_file(pseudonym_key_file)?,
            &read_key_file(storage_key_file)?,
        ))
    }

    /// The ring's key ids.
    pub fn ids(&self) -> &KeyIds {
        &self.ids
    }

    /// Whether the ring holds keys besides the one in force.
    pub fn has_others(&self) -> bool {
        !self.others.is_empty()
    }

    /// Whether a rotation is under way: patients may be stored under earlier keys,
    /// which are moved unless a staged key says another rotation is coming first.
    pub fn rekeying(&self) -> bool {
        !self.ids.earlier.is_empty() && self.ids.staged.is_empty()
    }

    /// The patient's pseudonyms under the ring's other keys the registry is read
    /// under (earlier and staged).
    pub fn other_pseudonyms(&self, id: &PatientId) -> Vec<Pseudonym> {
        self.others.iter().map(|k| pseudonym_under(k, id)).collect()
    }

    /// The patient's pseudonyms under every key of the ring, retired ones too: where
    /// audit records about them may be filed.
    pub fn every_pseudonym(&self, id: &PatientId) -> Vec<Pseudonym> {
        std::iter::once(&self.pseudonym)
            .chain(&self.others)
            .chain(&self.retired)
            .map(|k| pseudonym_under(k, id))
            .collect()
    }

    /// The pseudonym of a validated identifier. The identifier's system is part of the
    /// input, so a number can never collide with one of another kind.
    pub fn pseudonym(&self, id: &PatientId) -> Pseudonym {
        pseudonym_under(&self.pseudonym, id)
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

fn pseudonym_under(key: &Hmac<Sha256>, id: &PatientId) -> Pseudonym {
    let mut mac = key.clone();
    mac.update(id.system().as_bytes());
    mac.update(&[0]);
    mac.update(id.value().as_bytes());
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; PSEUDONYM_LEN];
    out.copy_from_slice(&full[..PSEUDONYM_LEN]);
    out
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

/// What a change to a ring file did, by key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingChange {
    pub current: String,
    pub changed: Vec<String>,
}

/// Adds a new random key to the ring as staged: every node given the ring reads
/// under it from its next reload, before any writes under it (see
/// [`rotate_ring_file`]). Refused when one is staged already.
pub fn stage_ring_file(path: &Path) -> Result<RingChange, KeyError> {
    let mut ring = read_ring_file(path)?;
    if let Some(k) = ring.iter().find(|k| k.role == Role::Staged) {
        return Err(KeyError::Change(format!(
            "key {} is staged already; rotate to it first",
            key_id(&k.key)
        )));
    }
    let key = random_key();
    ring.push(RingKey {
        key,
        role: Role::Staged,
    });
    write_ring_file(path, &ring)?;
    Ok(RingChange {
        current: current_id(&ring),
        changed: vec![key_id(&key)],
    })
}

/// Puts the staged key in force (a new random one when none is staged); the key in
/// force becomes an earlier key, read until re-keying has moved every patient.
pub fn rotate_ring_file(path: &Path) -> Result<RingChange, KeyError> {
    let mut ring = read_ring_file(path)?;
    let old = current_id(&ring);
    let next = match ring.iter().position(|k| k.role == Role::Staged) {
        Some(i) => ring.remove(i).key,
        None => random_key(),
    };
    ring.insert(
        0,
        RingKey {
            key: next,
            role: Role::Active,
        },
    );
    write_ring_file(path, &ring)?;
    Ok(RingChange {
        current: key_id(&next),
        changed: vec![old],
    })
}

/// Marks every earlier key retired: no longer read for the registry, kept for
/// finding audit records by patient. Only once re-keying is done.
pub fn retire_ring_file(path: &Path) -> Result<RingChange, KeyError> {
    let mut ring = read_ring_file(path)?;
    let current = ring
        .iter()
        .position(|k| k.role == Role::Active)
        .expect("a parsed ring holds a key in force");
    let mut changed = Vec::new();
    for (i, k) in ring.iter_mut().enumerate() {
        if i != current && k.role == Role::Active {
            k.role = Role::Retired;
            changed.push(key_id(&k.key));
        }
    }
    if changed.is_empty() {
        return Err(KeyError::Change("the ring holds no earlier key".into()));
    }
    write_ring_file(path, &ring)?;
    Ok(RingChange {
        current: current_id(&ring),
        changed,
    })
}

fn current_id(ring: &[RingKey]) -> String {
    ring.iter()
        .find(|k| k.role == Role::Active)
        .map(|k| key_id(&k.key))
        .unwrap_or_default()
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

/// Replaces a ring file at once (a new file renamed over it), owner-only.
fn write_ring_file(path: &Path, ring: &[RingKey]) -> Result<(), KeyError> {
    let fail = |source| KeyError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    write_private(&tmp, format_ring(ring).as_bytes()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Creates a fresh random 32-byte key file (hex, mode 0600).
pub fn write_new_key_file(path: &Path) -> std::io::Result<()> {
    write_private(path, hex::encode(random_key()).as_bytes())
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

/// Reads a pseudonym key ring file.
pub fn read_ring_file(path: &Path) -> Result<Vec<RingKey>, KeyError> {
    parse_ring(&read_text(path)?, path)
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn read_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = read_text(path)?;
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

    #[test]
    fn rings_parse_with_the_key_in_force_first() {
        let path = Path::new("ring");
        let a = hex::encode([1u8; 32]);
        let b = hex::encode([2u8; 32]);
        let c = hex::encode([3u8; 32]);
        // A single bare key is a ring of one (the format before rings).
        let one = parse_ring(&format!("{a}\n"), path).unwrap();
        assert_eq!(
            one,
            vec![RingKey {
                key: [1; 32],
                role: Role::Active
            }]
        );
        let d = hex::encode([4u8; 32]);
        let text = format!("# c\nstaged {c}\n{a}\n\n{b} # old\nretired {d}\n");
        let ring = parse_ring(&text, path).unwrap();
        let ringed = PatientKeys::from_ring(&ring, &[9; 32]);
        assert_eq!(ringed.ids().current, key_id(&[1; 32]));
        assert_eq!(ringed.ids().staged, vec![key_id(&[3; 32])]);
        assert_eq!(ringed.ids().earlier, vec![key_id(&[2; 32])]);
        assert_eq!(ringed.ids().retired, vec![key_id(&[4; 32])]);
        assert!(!ringed.rekeying(), "a staged key holds re-keying back");
        let p = patient();
        assert_eq!(ringed.pseudonym(&p), keys(1).pseudonym(&p));
        assert_eq!(ringed.other_pseudonyms(&p).len(), 2);
        assert_eq!(ringed.every_pseudonym(&p).len(), 4);
        assert_eq!(parse_ring(&format_ring(&ring), path).unwrap(), ring);
        for bad in [
            "staged".to_string(),
            format!("old {a}"),
            "abc".into(),
            format!("staged {a}"),
        ] {
            assert!(parse_ring(&bad, path).is_err(), "{bad}");
        }
    }

    #[test]
    fn ring_files_stage_rotate_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pseudonym.key");
        write_new_key_file(&path).unwrap();
        let first = read_ring_file(&path).unwrap();
        let staged = stage_ring_file(&path).unwrap();
        assert!(stage_ring_file(&path).is_err(), "one staged key at a time");
        let rotated = rotate_ring_file(&path).unwrap();
        assert_eq!(rotated.current, staged.changed[0]);
        assert_eq!(rotated.changed, vec![key_id(&first[0].key)]);
        let ring = read_ring_file(&path).unwrap();
        let keys = PatientKeys::from_ring(&ring, &[0; 32]);
        assert!(keys.rekeying());
        assert_eq!(keys.ids().earlier, vec![key_id(&first[0].key)]);
        let retired = retire_ring_file(&path).unwrap();
        assert_eq!(retired.changed, keys.ids().earlier);
        let keys = PatientKeys::from_ring(&read_ring_file(&path).unwrap(), &[0; 32]);
        assert!(!keys.has_others() && !keys.rekeying());
        assert_eq!(keys.ids().retired, vec![key_id(&first[0].key)]);
        assert!(retire_ring_file(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
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
