//! Property-based fuzzing of every parser that takes outside input: identifiers,
//! access tokens and DPoP proofs, checkpoints, cosignatures and witness requests,
//! NDJSON and CSV sync files, pointers off the wire, configuration files, and the
//! node's stored records. Inputs are arbitrary bytes and mutations of the seeds kept
//! in `tests/corpus/<parser>/`; failures proptest finds are kept in
//! `tests/proptest-regressions/`. The property everywhere: no panic, only a typed
//! error; where an input verifies after a mutation, it says what the seed said.

use std::{path::PathBuf, time::SystemTime};

use pil_auth::{
    dev_issuer::DpopKey,
    verify::{Jwks, RequestContext, TokenVerifier, VerifierConfig},
};
use pil_tests::*;
use pil_transparency::{
    CosignerKey, HeadSigner, HeadVerifier, Quorum, TreeHead, add_signatures, witness::AddCheckpoint,
};
use proptest::{collection::vec, prelude::*, test_runner::Config};

/// The seeds of one parser, every file of `tests/corpus/<name>/`.
fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir: PathBuf = package_dir().join("corpus").join(name);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| std::fs::read(f.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} holds no seeds", dir.display());
    seeds
}

/// A seed with a few bytes replaced, inserted or removed, or arbitrary bytes.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edits = vec((any::<usize>(), any::<u8>(), 0..3u8), 0..6);
    prop_oneof![
        9 => (0..seeds.len(), edits).prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for (at, byte, kind) in edits {
                let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
                match kind {
                    0 if !bytes.is_empty() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            bytes
        }),
        1 => vec(any::<u8>(), 0..512),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/fuzz.txt",
            ),
        )),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn identifiers(bytes in mutated(corpus("identifiers"))) {
        let value = text(&bytes);
        let value = value.trim_end_matches('\n');
        for system in [
            pil_proto::ident::SYSTEM_FNR,
            pil_proto::ident::SYSTEM_DNR,
            pil_proto::ident::SYSTEM_FHN,
            value,
        ] {
            let _ = pil_proto::ident::PatientId::parse(system, value, true);
            let _ = pil_proto::ident::PatientId::parse(system, value, false);
        }
        let _ = pil_proto::ident::OrgNumber::parse(value);
        let _ = pil_proto::ident::HprNumber::parse(value);
    }

    #[test]
    fn checkpoints_and_cosignatures(bytes in mutated(corpus("checkpoints"))) {
        let note = text(&bytes);
        let _ = TreeHead::parse_body(&note);
        let key = seed_log_key();
        if let Ok(sth) = key.verify_note(&note) {
            // What verifies is what the log signed: the seed's head.
            prop_assert_eq!(sth.head, seed_head());
        }
        for vkey in note.lines() {
            let _ = CosignerKey::parse_vkey(vkey);
        }
        let _ = add_signatures(&note, &note);
        let _ = seed_quorum().check(&note);
    }

    #[test]
    fn witness_requests(bytes in mutated(corpus("add-checkpoint"))) {
        if let Ok(request) = AddCheckpoint::parse(&bytes) {
            prop_assert_eq!(AddCheckpoint::parse(request.to_body().as_bytes()), Ok(request.clone()));
            let key = seed_log_key();
            let _ = pil_transparency::witness::check(&request, Some(&key), None);
        }
        let _ = pil_transparency::witness::parse_size_answer(&bytes);
    }

    #[test]
    fn sync_lines_and_files(bytes in mutated(corpus("sync"))) {
        let line = text(&bytes);
        for l in line.lines() {
            if let Ok(p) = pil_client::records::parse_json_line(l) {
                let _ = pil_node::pointer::NewPointer::from_wire(&p, true);
            }
        }
        let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(bytes.as_slice());
        for record in rdr.records().flatten() {
            if let Ok(p) = pil_client::records::parse_csv_record(&record) {
                let _ = pil_node::pointer::NewPointer::from_wire(&p, true);
            }
        }
    }

    #[test]
    fn stored_records(bytes in mutated(corpus("stored"))) {
        use prost::Message as _;
        let _ = pil_node::store::StoredPointer::decode(bytes.as_slice());
        let _ = pil_node::store::StoredBlock::decode(bytes.as_slice());
        let _ = pil_node::store::StoredOptOut::decode(bytes.as_slice());
        let _ = pil_client::audit_record::Record::parse(&bytes);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn node_configuration(bytes in mutated(corpus("node-toml"))) {
        if let Ok(config) = toml::from_str::<pil_node::config::NodeConfig>(&text(&bytes)) {
            let _ = config.validate();
        }
    }

    #[test]
    fn tokens_and_dpop_proofs(
        token in mutated(vec![seed_token().0.into_bytes()]),
        proof in mutated(vec![seed_token().1.into_bytes()]),
    ) {
        let (good_token, good_proof) = seed_token();
        let verifier = seed_verifier();
        let (token, proof) = (text(&token), text(&proof));
        for (t, p) in [(&token, &good_proof), (&good_token, &proof), (&token, &proof)] {
            let ctx = RequestContext::grpc(ORG_A, URI, Some(p));
            let _ = verifier.verify(t, &ctx);
            let _ = verifier.verify(t, &RequestContext::forwarded(ORG_A));
        }
    }
}

const URI: &str = "https://localhost:7443/pil.v1.LookupService/Lookup";

/// The seed corpus's checkpoints are signed by this key (`corpus/log-key.pem`, kept
/// so new seeds can be made).
fn seed_log_key() -> HeadVerifier {
    let pem = std::fs::read_to_string(package_dir().join("corpus").join("log-key.pem")).unwrap();
    HeadSigner::from_pkcs8_pem(&pem).unwrap().verifier()
}

fn seed_head() -> TreeHead {
    let note = std::fs::read_to_string(
        package_dir()
            .join("corpus")
            .join("checkpoints")
            .join("signed.note"),
    )
    .unwrap();
    seed_log_key().verify_note(&note).unwrap().head
}

fn seed_quorum() -> Quorum {
    let text =
        std::fs::read_to_string(package_dir().join("corpus").join("witnesses.vkeys")).unwrap();
    Quorum {
        witnesses: text
            .lines()
            .map(|l| CosignerKey::parse_vkey(l).unwrap())
            .collect(),
        needed: 1,
    }
}

/// A valid DPoP-bound token and proof from a fresh development issuer, and the
/// verifier that accepts them.
fn seed_token() -> (String, String) {
    SEED.with(|s| s.0.clone())
}

fn seed_verifier() -> TokenVerifier {
    SEED.with(|s| s.1.clone())
}

thread_local! {
    static SEED: ((String, String), TokenVerifier) = {
        let issuer = pil_auth::dev_issuer::DevIssuer::generate("https://issuer.fuzz.test", "fuzz-key").unwrap();
        let key = DpopKey::generate().unwrap();
        let token = doctor_token(&issuer)
            .bound_to(&key)
            .issued_at(SystemTime::now())
            .sign()
            .unwrap();
        let proof = key.proof("POST", URI, &token).unwrap();
        let jwks = Jwks::from_json(&issuer.jwks().to_string()).unwrap();
        let config = VerifierConfig::new(issuer.issuer(), pil_node::demo::DEV_AUDIENCE, "pil:lookup");
        ((token, proof), TokenVerifier::new(config, jwks))
    };
}

/// The signed seeds were made by another implementation (`corpus/make-seeds.py`,
/// Python's `cryptography`): PIL reads them as that reading of the C2SP formats wrote
/// them, and the other seeds are well formed, so mutations start from valid input.
#[test]
fn the_corpus_seeds_are_what_they_say() {
    let dir = package_dir().join("corpus");
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
    let cosigned = read("checkpoints/cosigned.note");
    let sth = seed_log_key().verify_note(&cosigned).unwrap();
    assert_eq!(sth.head.size, 1234);
    let check = seed_quorum().check(&cosigned).unwrap();
    assert_eq!(
        check.cosigned,
        vec![("witness.corpus.test".to_string(), 1_764_000_001)]
    );
    for (file, old, proof) in [
        ("first.txt", 0, 0),
        ("with-proof.txt", 1000, 3),
        ("same-size.txt", 1234, 0),
    ] {
        let request =
            AddCheckpoint::parse(read(&format!("add-checkpoint/{file}")).as_bytes()).unwrap();
        assert_eq!(
            (request.old_size, request.proof.len()),
            (old, proof),
            "{file}"
        );
        assert_eq!(request.origin(), "pil-audit/corpus");
    }
    for line in read("sync/pointers.ndjson").lines() {
        pil_client::records::parse_json_line(line).unwrap();
    }
    let csv_text = read("sync/pointers.csv");
    let mut rdr = csv::ReaderBuilder::new().from_reader(csv_text.as_bytes());
    for record in rdr.records() {
        pil_client::records::parse_csv_record(&record.unwrap()).unwrap();
    }
    toml::from_str::<pil_node::config::NodeConfig>(&read("node-toml/node.toml")).unwrap();
}
