//! Signed tree heads: checkpoint body format, Ed25519 signing, key files,
//! JSON and signed-note encodings.

mod common;

use std::fs;
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, VerifyingKey};
use pil_transparency::{
    CheckpointError, HeadSigner, HeadVerifier, SignedTreeHead, TreeHead, VerifyError, key_id,
};

use common::hd;

/// Root of the 5-leaf golden tree (transparency-dev testonly/constants.go).
const ROOT5: &str = "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4";

fn head() -> TreeHead {
    TreeHead {
        origin: "pil.example.no/audit".into(),
        size: 5,
        root: hd(ROOT5),
        timestamp_ms: 1_700_000_000_123,
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("signed_head");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_file(&path);
    path
}

// ---- body format ---------------------------------------------------------

#[test]
fn body_is_a_c2sp_checkpoint_with_timestamp_extension() {
    let body = head().body();
    assert_eq!(
        body,
        "pil.example.no/audit\n5\nTju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=\ntimestamp 1700000000123\n"
    );
    assert_eq!(TreeHead::parse_body(&body).unwrap(), head());
}

#[test]
fn body_roundtrips_edge_values() {
    for (size, timestamp_ms) in [(0, 0), (u64::MAX, u64::MAX), (1, 1)] {
        let h = TreeHead {
            size,
            timestamp_ms,
            root: [0xab; 32],
            ..head()
        };
        assert_eq!(TreeHead::parse_body(&h.body()).unwrap(), h);
    }
}

#[test]
fn parse_body_rejects_non_canonical_and_malformed_bodies() {
    let root = "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=";
    type Expect = fn(&CheckpointError) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("o\n5\nROOT\ntimestamp 1", |e| {
            matches!(e, CheckpointError::MissingFinalNewline)
        }),
        ("o\n5\nROOT\n", |e| {
            matches!(e, CheckpointError::WrongLineCount(3))
        }),
        ("o\n5\nROOT\ntimestamp 1\nextra\n", |e| {
            matches!(e, CheckpointError::WrongLineCount(5))
        }),
        ("o\n5\nROOT\ntimestamp 1\n\n", |e| {
            matches!(e, CheckpointError::WrongLineCount(5))
        }),
        ("\n5\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidOrigin { .. })
        }),
        ("a b\n5\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidOrigin { .. })
        }),
        ("a+b\n5\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidOrigin { .. })
        }),
        ("o\n05\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidSize(_))
        }),
        ("o\n+5\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidSize(_))
        }),
        ("o\n-1\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidSize(_))
        }),
        ("o\n18446744073709551616\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidSize(_))
        }),
        ("o\n5\nnot base64!\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidRoot(_))
        }),
        ("o\n5\nAAAA\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidRoot(_))
        }),
        (
            "o\n5\nTju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ\ntimestamp 1\n",
            |e| matches!(e, CheckpointError::InvalidRoot(_)),
        ),
        // Same bytes, non-canonical trailing bits.
        (
            "o\n5\nTju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNR=\ntimestamp 1\n",
            |e| matches!(e, CheckpointError::InvalidRoot(_)),
        ),
        ("o\n5\nROOT\ntime 1\n", |e| {
            matches!(e, CheckpointError::InvalidTimestamp(_))
        }),
        ("o\n5\nROOT\ntimestamp 01\n", |e| {
            matches!(e, CheckpointError::InvalidTimestamp(_))
        }),
        ("o\n5\nROOT\ntimestamp  1\n", |e| {
            matches!(e, CheckpointError::InvalidTimestamp(_))
        }),
        ("o\r\n5\nROOT\ntimestamp 1\n", |e| {
            matches!(e, CheckpointError::InvalidOrigin { .. })
        }),
    ];
    for (body, is_expected) in cases {
        let body = body.replace("ROOT", root);
        let err = TreeHead::parse_body(&body).unwrap_err();
        assert!(is_expected(&err), "{body:?} gave {err:?}");
    }
    assert!(TreeHead::parse_body(&format!("o\n0\n{root}\ntimestamp 0\n")).is_ok());
}

// ---- signing ------------------------------------------------------------

#[test]
fn sign_verify_roundtrip() {
    let signer = HeadSigner::generate();
    let sth = signer.sign(head()).unwrap();
    assert_eq!(sth.head, head());
    assert_eq!(sth.key_id.len(), 8);
    let verifier = signer.verifier();
    verifier.verify(&sth).unwrap();
    assert_eq!(sth.key_id, verifier.key_id(&sth.head.origin));
    // The signature is plain Ed25519 over the body bytes.
    let sig = Signature::from_bytes(&sth.signature);
    verifier
        .verifying_key()
        .verify_strict(head().body().as_bytes(), &sig)
        .unwrap();
}

#[test]
fn signing_refuses_origins_that_cannot_be_key_names() {
    let signer = HeadSigner::generate();
    for origin in ["", "two words", "a+b", "line\nbreak"] {
        let h = TreeHead {
            origin: origin.into(),
            ..head()
        };
        assert!(
            matches!(signer.sign(h), Err(CheckpointError::InvalidOrigin { .. })),
            "{origin:?}"
        );
    }
}

#[test]
fn tampered_heads_fail() {
    let signer = HeadSigner::generate();
    let verifier = signer.verifier();
    let sth = signer.sign(head()).unwrap();

    let tamper = |f: &dyn Fn(&mut SignedTreeHead)| {
        let mut t = sth.clone();
        f(&mut t);
        verifier.verify(&t).unwrap_err()
    };
    assert_eq!(tamper(&|t| t.head.size += 1), VerifyError::BadSignature);
    assert_eq!(tamper(&|t| t.head.size -= 1), VerifyError::BadSignature);
    assert_eq!(tamper(&|t| t.head.root[31] ^= 1), VerifyError::BadSignature);
    assert_eq!(
        tamper(&|t| t.head.timestamp_ms += 1),
        VerifyError::BadSignature
    );
    assert_eq!(tamper(&|t| t.signature[0] ^= 1), VerifyError::BadSignature);
    assert_eq!(
        tamper(&|t| t.signature[63] ^= 0x80),
        VerifyError::BadSignature
    );
    // The key id is bound to the origin, so a changed origin is caught
    // before the signature check; with a matching id it fails there.
    assert!(matches!(
        tamper(&|t| t.head.origin.push('x')),
        VerifyError::KeyIdMismatch { .. }
    ));
    let forged_origin = tamper(&|t| {
        t.head.origin = "pil.example.no/other".into();
        t.key_id = verifier.key_id(&t.head.origin);
    });
    assert_eq!(forged_origin, VerifyError::BadSignature);
    assert!(matches!(
        tamper(&|t| t.key_id = "00000000".into()),
        VerifyError::KeyIdMismatch { .. }
    ));
    assert!(matches!(
        tamper(&|t| t.head.origin = "bad origin".into()),
        VerifyError::InvalidHead(CheckpointError::InvalidOrigin { .. })
    ));
}

#[test]
fn wrong_key_fails() {
    let sth = HeadSigner::generate().sign(head()).unwrap();
    let other = HeadSigner::generate().verifier();
    assert!(matches!(
        other.verify(&sth),
        Err(VerifyError::KeyIdMismatch { .. })
    ));
    // Even with the key id rewritten to the other key's, the signature fails.
    let mut relabelled = sth.clone();
    relabelled.key_id = other.key_id(&sth.head.origin);
    assert_eq!(other.verify(&relabelled), Err(VerifyError::BadSignature));
}

// ---- keys ----------------------------------------------------------------

#[test]
fn pem_roundtrip() {
    let signer = HeadSigner::generate();
    let pem = signer.to_pkcs8_pem().unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let again = HeadSigner::from_pkcs8_pem(&pem).unwrap();
    // Ed25519 is deterministic: same key, same signature.
    assert_eq!(again.sign(head()).unwrap(), signer.sign(head()).unwrap());

    let public = signer.public_key_pem().unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let verifier = HeadVerifier::from_public_key_pem(&public).unwrap();
    assert_eq!(verifier, signer.verifier());
    verifier.verify(&signer.sign(head()).unwrap()).unwrap();
    assert_eq!(verifier.public_key_pem().unwrap(), public);
}

#[test]
fn rfc8410_example_keys() {
    // RFC 8410 §10.3 private key and §10.1 public key (the same key pair).
    let private = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                   -----END PRIVATE KEY-----\n";
    let public = "-----BEGIN PUBLIC KEY-----\n\
                  MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
                  -----END PUBLIC KEY-----\n";
    let signer = HeadSigner::from_pkcs8_pem(private).unwrap();
    let verifier = HeadVerifier::from_public_key_pem(public).unwrap();
    assert_eq!(signer.verifier(), verifier);
    assert_eq!(
        hex::encode(verifier.verifying_key().as_bytes()),
        "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
    );
    verifier.verify(&signer.sign(head()).unwrap()).unwrap();
}

#[test]
fn bad_pem_is_rejected() {
    assert!(HeadSigner::from_pkcs8_pem("not a key").is_err());
    let public = HeadSigner::generate().public_key_pem().unwrap();
    assert!(HeadSigner::from_pkcs8_pem(&public).is_err());
    let private = HeadSigner::generate().to_pkcs8_pem().unwrap();
    assert!(HeadVerifier::from_public_key_pem(&private).is_err());
}

#[test]
fn key_files() {
    let path = tmp("log-key.pem");
    let signer = HeadSigner::write_new(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private key file mode {mode:o}");
    }
    // Never overwrite an existing key.
    let err = HeadSigner::write_new(&path).unwrap_err();
    assert!(err.to_string().contains("log-key.pem"), "{err}");
    let loaded = HeadSigner::load(&path).unwrap();
    assert_eq!(loaded.verifier(), signer.verifier());

    let public_path = tmp("log-key.pub.pem");
    fs::write(&public_path, signer.public_key_pem().unwrap()).unwrap();
    let verifier = HeadVerifier::load(&public_path).unwrap();
    verifier.verify(&loaded.sign(head()).unwrap()).unwrap();

    assert!(HeadSigner::load(tmp("missing")).is_err());
    assert!(HeadVerifier::load(tmp("missing")).is_err());
    fs::remove_file(&path).unwrap();
    fs::remove_file(&public_path).unwrap();
}

#[test]
fn debug_does_not_leak_the_private_key() {
    let signer = HeadSigner::generate();
    let pem = signer.to_pkcs8_pem().unwrap();
    let der = BASE64.decode(pem.lines().nth(1).unwrap()).unwrap();
    let secret = &der[der.len() - 32..];
    let debug = format!("{signer:?}");
    assert!(!debug.contains(&hex::encode(secret)), "{debug}");
    assert!(debug.contains(&hex::encode(signer.verifier().verifying_key().as_bytes())));
}

// ---- JSON ----------------------------------------------------------------

#[test]
fn json_shape_and_roundtrip() {
    let signer = HeadSigner::generate();
    let sth = signer.sign(head()).unwrap();
    let json = serde_json::to_value(&sth).unwrap();
    assert_eq!(json["head"]["origin"], "pil.example.no/audit");
    assert_eq!(json["head"]["size"], 5);
    assert_eq!(json["head"]["root"], ROOT5);
    assert_eq!(json["head"]["timestamp_ms"], 1_700_000_000_123u64);
    assert_eq!(json["key_id"], sth.key_id.as_str());
    assert_eq!(json["signature"], BASE64.encode(sth.signature));

    let text = serde_json::to_string(&sth).unwrap();
    let back: SignedTreeHead = serde_json::from_str(&text).unwrap();
    assert_eq!(back, sth);
    signer.verifier().verify(&back).unwrap();

    let mut edited = json.clone();
    edited["head"]["size"] = 6.into();
    let edited: SignedTreeHead = serde_json::from_value(edited).unwrap();
    assert_eq!(
        signer.verifier().verify(&edited),
        Err(VerifyError::BadSignature)
    );

    for (field, value) in [
        ("root", "abcd"),
        ("root", "zz"),
        ("signature", "AAAA"),
        ("signature", "%%%"),
    ] {
        let mut bad = json.clone();
        if field == "root" {
            bad["head"]["root"] = value.into();
        } else {
            bad[field] = value.into();
        }
        assert!(
            serde_json::from_value::<SignedTreeHead>(bad).is_err(),
            "{field}={value}"
        );
    }
}

// ---- signed-note key id and note form ------------------------------------

#[test]
fn c2sp_signed_note_example_key_id_and_signature() {
    // From c2sp.org/signed-note, "Verifier keys" example.
    let vkey = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
    let text = "This is an example message.\n";
    let sig = "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=";

    let parts: Vec<&str> = vkey.split('+').collect();
    let key_bytes = BASE64.decode(parts[2]).unwrap();
    assert_eq!(key_bytes[0], 0x01, "Ed25519 signature type");
    let public = VerifyingKey::from_bytes(&key_bytes[1..].try_into().unwrap()).unwrap();
    assert_eq!(hex::encode(key_id(parts[0], &public)), parts[1]);

    let sig = BASE64.decode(sig).unwrap();
    assert_eq!(hex::encode(&sig[..4]), parts[1]);
    let signature = Signature::from_slice(&sig[4..]).unwrap();
    public.verify_strict(text.as_bytes(), &signature).unwrap();
}

#[test]
fn signed_note_roundtrip() {
    let signer = HeadSigner::generate();
    let verifier = signer.verifier();
    let sth = signer.sign(head()).unwrap();
    let note = sth.to_note().unwrap();
    let (body, sig_line) = note.split_once("\n\n").unwrap();
    assert_eq!(format!("{body}\n"), head().body());
    assert!(sig_line.starts_with("\u{2014} pil.example.no/audit "));
    assert_eq!(verifier.verify_note(&note).unwrap(), sth);

    // Signatures from other keys (e.g. witnesses) are ignored.
    let witness = HeadSigner::generate();
    let mut cosigned = note.clone();
    cosigned.push_str(&format!(
        "\u{2014} witness.example/w1 {}\n",
        BASE64.encode([[0u8; 4].as_slice(), &[1u8; 64]].concat())
    ));
    assert_eq!(verifier.verify_note(&cosigned).unwrap(), sth);
    assert!(matches!(
        witness.verifier().verify_note(&note),
        Err(VerifyError::NoMatchingSignature { .. })
    ));

    let tampered = note.replacen("\n5\n", "\n6\n", 1);
    assert_eq!(
        verifier.verify_note(&tampered),
        Err(VerifyError::BadSignature)
    );
    for bad in [
        note.replace("\n\n", "\n"),
        note.trim_end().to_owned(),
        note.replace('\u{2014}', "-"),
        note.replace("timestamp", "time\u{7}stamp"),
    ] {
        assert!(verifier.verify_note(&bad).is_err(), "{bad:?}");
    }
    let bad_id = SignedTreeHead {
        key_id: "XYZ".into(),
        ..sth
    };
    assert!(matches!(
        bad_id.to_note(),
        Err(CheckpointError::InvalidKeyId(_))
    ));
}

// ---- key history -----------------------------------------------------------

#[test]
fn a_key_history_verifies_heads_of_every_key_in_it_and_no_other() {
    let old = HeadSigner::generate();
    let new = HeadSigner::generate();
    let stranger = HeadSigner::generate();
    let pem = format!(
        "{}\n{}",
        old.public_key_pem().unwrap(),
        new.public_key_pem().unwrap()
    );
    let history = HeadVerifier::from_public_key_pem(&pem).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history, old.verifier().and(&new.verifier()));
    assert_eq!(
        HeadVerifier::from_public_key_pem(&history.history_pem().unwrap()).unwrap(),
        history
    );
    // The newest key is the one a fresh head is signed with.
    assert_eq!(history.key_id("o"), new.key_id("o"));
    for signer in [&old, &new] {
        let sth = signer.sign(head()).unwrap();
        history.verify(&sth).unwrap();
        history.verify_note(&sth.to_note().unwrap()).unwrap();
    }
    let foreign = stranger.sign(head()).unwrap();
    assert!(matches!(
        history.verify(&foreign),
        Err(VerifyError::KeyIdMismatch { .. })
    ));
    assert!(matches!(
        history.verify_note(&foreign.to_note().unwrap()),
        Err(VerifyError::NoMatchingSignature { .. })
    ));
    // Text after the last key that is not a key is refused, not ignored.
    assert!(HeadVerifier::from_public_key_pem(&format!("{pem}\ngarbage")).is_err());
}
