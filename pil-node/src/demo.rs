//! The one-command local setup: a dev PKI, keys, a node configuration, a client
//! profile per demo organization, and a realistic synthetic data set.

use std::path::{Path, PathBuf};

use pil_proto::{ident, v1};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::{
    config::{AuditConfig, AuthConfig, KeyConfig, Limits, LogConfig, NodeConfig, TlsConfig},
    patient_keys::write_new_key_file,
    pki::{self, PkiError},
    pointer::NewPointer,
    registry::{Registry, RegistryError, now_nanos},
    store::OpResult,
};

/// A demo organization: number, name, file-name slug, and the categories it holds.
pub struct DemoOrg {
    pub number: &'static str,
    pub name: &'static str,
    pub slug: &'static str,
    pub base_url: &'static str,
    pub categories: &'static [&'static str],
    /// The health professional its profile's tokens name: HPR number and
    /// authorization (profession) code.
    pub professional: (&'static str, &'static str),
}

/// The demo's organizations. The last one is a record-system vendor that writes for
/// the GP office (configured under `writes_for`).
pub const DEMO_ORGS: &[DemoOrg] = &[
    DemoOrg {
        number: "983974724",
        name: "Helse Bergen HF",
        slug: "helse-bergen",
        base_url: "https://fhir.helse-bergen.example/r4",
        categories: &[
            "clinical-notes",
            "lab-results",
            "imaging",
            "medications",
            "mental-health",
        ],
        professional: ("565501872", "LE"),
    },
    DemoOrg {
        number: "964338531",
        name: "Bergen kommune",
        slug: "bergen-kommune",
        base_url: "https://fhir.bergen-kommune.example/r4",
        categories: &["nursing", "care-plans", "medications", "vital-signs"],
        professional: ("9144900", "SP"),
    },
    DemoOrg {
        number: "923609016",
        name: "Fjordsiden legesenter",
        slug: "fjordsiden-legesenter",
        base_url: "https://ehr-vendor.example/fjordsiden/fhir",
        categories: &["clinical-notes", "medications", "lab-results", "allergies"],
        professional: ("565501872", "LE"),
    },
    DemoOrg {
        number: "914637651",
        name: "Vest DHO AS",
        slug: "vest-dho",
        base_url: "https://dho.vest.example/fhir/r4",
        categories: &["home-monitoring", "vital-signs", "care-plans"],
        professional: ("9144900", "SP"),
    },
    DemoOrg {
        number: "985399077",
        name: "Journalleverandøren AS",
        slug: "journalleverandoren",
        base_url: "https://ehr-vendor.example/fhir",
        categories: &[],
        professional: ("565501872", "LE"),
    },
];

/// The development token issuer's name, key id and audience.
pub const DEV_ISSUER: &str = "https://helseid.dev.pil.invalid";
pub const DEV_KID: &str = "dev-issuer-1";
pub const DEV_AUDIENCE: &str = "pil";

/// Writes a development token issuer (signing key and JWKS) into `dir`, reusing an
/// existing key. Returns (key path, JWKS path).
pub fn write_dev_issuer(dir: &Path) -> Result<(PathBuf, PathBuf), DemoError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = dir.join("issuer-key.pem");
    let jwks = dir.join("jwks.json");
    let issuer = if key.exists() {
        pil_auth::dev_issuer::DevIssuer::load(DEV_ISSUER, DEV_KID, &key)
    } else {
        pil_auth::dev_issuer::DevIssuer::generate(DEV_ISSUER, DEV_KID)
    }
    .map_err(|e| DemoError::Data(format!("dev issuer: {e}")))?;
    issuer
        .write_files(&key, &jwks)
        .map_err(|e| DemoError::Data(format!("dev issuer: {e}")))?;
    Ok((key, jwks))
}

/// Everything [`prepare`] wrote.
pub struct DemoSetup {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: NodeConfig,
    /// `(organization, profile path)`.
    pub profiles: Vec<(&'static DemoOrg, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("demo data: {0}")]
    Data(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes (or reuses) a dev PKI, keys, `node.toml` and client profiles in `dir`.
pub fn prepare(
    dir: &Path,
    region: &str,
    listen: std::net::SocketAddr,
) -> Result<DemoSetup, DemoError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Profiles and node.toml name absolute paths, so they work from wherever the user
    // stands.
    let dir = &std::path::absolute(dir).map_err(io(dir))?;
    let orgs: Vec<(&str, &str)> = DEMO_ORGS.iter().map(|o| (o.number, o.name)).collect();
    let files = pki::write_dev_pki(&dir.join("pki"), region, &orgs)?;
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir).map_err(io(&keys_dir))?;
    let pseudonym_key_file = keys_dir.join("pseudonym.key");
    let storage_key_file = keys_dir.join("storage.key");
    let routing_key_file = keys_dir.join("routing.key");
    for key in [&pseudonym_key_file, &storage_key_file, &routing_key_file] {
        if !key.exists() {
            write_new_key_file(key).map_err(io(key))?;
        }
    }
    let vendor = DEMO_ORGS.last().expect("demo orgs").number.to_string();
    let (issuer_key, jwks_file) = write_dev_issuer(&dir.join("issuer"))?;
    let legal_config = dir.join("legal-config");
    // The hospital runs the demo node; the vendor's privacy officer audits it.
    pil_legal::write_default(
        &legal_config,
        region,
        &[DEMO_ORGS[0].number],
        &[vendor.as_str()],
    )
    .map_err(io(&legal_config))?;
    let (audit_key, _) = crate::audit::write_signing_key(&dir.join("audit"))
        .map_err(|e| DemoError::Data(e.to_string()))?;
    let config = NodeConfig {
        region: region.to_string(),
        listen,
        data_dir: dir.join("data"),
        storage: Default::default(),
        test_data: true,
        legal_config,
        auth: AuthConfig {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            required_scope: "pil:lookup".into(),
            jwks_file: Some(jwks_file),
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_secs: crate::config::DEFAULT_JWKS_REFRESH_SECS,
            leeway_secs: 5,
            require_dpop: false,
            public_url: Some(format!("https://localhost:{}", listen.port())),
            dpop_replay_capacity: crate::config::DEFAULT_DPOP_REPLAY_CAPACITY,
            token_cache: crate::config::DEFAULT_TOKEN_CACHE,
        },
        tls: TlsConfig {
            client_ca: files.ca_cert.clone(),
            cert: files.node_cert.clone(),
            key: files.node_key.clone(),
        },
        keys: KeyConfig {
            pseudonym_key_file,
            storage_key_file,
            routing_key_file: Some(routing_key_file),
        },
        audit: AuditConfig {
            signing_key_file: audit_key,
            sign_interval_secs: 10,
            retention_interval_secs: 3600,
            witnesses: Vec::new(),
            witness_quorum: None,
        },
        federation: Default::default(),
        writes_for: [(vendor, vec![DEMO_ORGS[2].number.to_string()])].into(),
        limits: Limits::default(),
        log: LogConfig::default(),
        metrics: Default::default(),
        witness: None,
        source: None,
    };
    let config_path = dir.join("node.toml");
    let text = toml::to_string_pretty(&config).map_err(|e| DemoError::Data(e.to_string()))?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;

    let profiles_dir = dir.join("profiles");
    std::fs::create_dir_all(&profiles_dir).map_err(io(&profiles_dir))?;
    let mut profiles = Vec::new();
    for (org, files) in DEMO_ORGS.iter().zip(&files.orgs) {
        let path = profiles_dir.join(format!("{}.toml", org.slug));
        let (hpr, profession) = org.professional;
        let token = DevToken {
            issuer_key: issuer_key.clone(),
            organization: org.number.to_string(),
            hpr: hpr.into(),
            profession: profession.into(),
        };
        let text = profile_toml(listen, &files.cert, &files.key, &files_ca(dir)) + &token.toml();
        std::fs::write(&path, text).map_err(io(&path))?;
        profiles.push((org, path));
    }
    Ok(DemoSetup {
        dir: dir.to_path_buf(),
        config_path,
        config,
        profiles,
    })
}

/// The demo's regions.
pub const DEMO_REGIONS: [&str; 3] = ["helse-vest", "helse-midt", "helse-nord"];

/// Prepares one node per region in `dir/<region>`, on consecutive ports from
/// `first_listen`, sharing one CA and one token issuer and federated with each other.
pub fn prepare_regions(
    dir: &Path,
    first_listen: std::net::SocketAddr,
) -> Result<Vec<DemoSetup>, DemoError> {
    let listen = |i: usize| {
        let mut a = first_listen;
        a.set_port(first_listen.port() + i as u16);
        a
    };
    let mut setups = Vec::new();
    for (i, region) in DEMO_REGIONS.iter().enumerate() {
        let region_dir = dir.join(region);
        if i > 0 {
            // Same CA and token issuer as the first region.
            let first = dir.join(DEMO_REGIONS[0]);
            for (from, to) in [
                ("pki/ca.pem", "pki/ca.pem"),
                ("pki/ca-key.pem", "pki/ca-key.pem"),
                ("issuer/issuer-key.pem", "issuer/issuer-key.pem"),
            ] {
                let (from, to) = (first.join(from), region_dir.join(to));
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                std::fs::copy(&from, &to).map_err(io(&from))?;
            }
        }
        setups.push(prepare(&region_dir, region, listen(i))?);
    }
    for (i, setup) in setups.iter_mut().enumerate() {
        setup.config.federation.peers = DEMO_REGIONS
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, region)| crate::config::PeerConfig {
                region: region.to_string(),
                address: listen(j).to_string(),
                server_name: "localhost".into(),
                purposes: Vec::new(),
            })
            .collect();
        let text =
            toml::to_string_pretty(&setup.config).map_err(|e| DemoError::Data(e.to_string()))?;
        std::fs::write(&setup.config_path, text).map_err(io(&setup.config_path))?;
        setup.config.source = Some(setup.config_path.clone());
    }
    Ok(setups)
}

/// Which region holds each pointer of the data set: spread so that many patients
/// have pointers in more than one region.
pub fn region_of(pointer_index: usize, patient_value: &str) -> usize {
    let patient: usize = patient_value
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    (patient.wrapping_add(pointer_index)) % DEMO_REGIONS.len()
}

fn files_ca(dir: &Path) -> PathBuf {
    dir.join("pki").join("ca.pem")
}

/// A client profile (the format `pil --profile` reads).
pub fn profile_toml(addr: std::net::SocketAddr, cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "# PIL client profile\naddress = \"https://{addr}\"\nserver_name = \"localhost\"\n\
         ca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
        ca = ca.display().to_string(),
        cert = cert.display().to_string(),
        key = key.display().to_string(),
    )
}

/// The `[token]` section of a profile: how the CLI mints development tokens.
pub struct DevToken {
    pub issuer_key: PathBuf,
    pub organization: String,
    pub hpr: String,
    pub profession: String,
}

impl DevToken {
    pub fn toml(&self) -> String {
        format!(
            "\n# Development tokens, minted by `pil` for each call (never in production).\n\
             [token]\nissuer = {DEV_ISSUER:?}\nissuer_key = {:?}\nkid = {DEV_KID:?}\n\
             audience = {DEV_AUDIENCE:?}\norganization = {:?}\nhpr = {:?}\nprofession = {:?}\n\
             purpose = \"TREAT\"\ncare_relationship = true\ndpop = true\n",
            self.issuer_key.display().to_string(),
            self.organization,
            self.hpr,
            self.profession,
        )
    }
}

/// The demo data set: `patients` synthetic patients, each with pointers at one to four
/// of the demo organizations. Deterministic for a given seed.
pub fn data_set(patients: u64, seed: u64) -> Vec<v1::Pointer> {
    let mut rng = StdRng::seed_from_u64(seed);
    let holders = &DEMO_ORGS[..4];
    let day = 86_400i64;
    let now = now_nanos() / 1_000_000_000;
    let mut out = Vec::new();
    for i in 0..patients {
        let value = if i % 10 == 9 {
            ident::synthetic_dnr(seed.wrapping_add(i))
        } else {
            ident::synthetic_fnr(seed.wrapping_add(i))
        };
        let system = if i % 10 == 9 {
            ident::SYSTEM_DNR
        } else {
            ident::SYSTEM_FNR
        };
        let n = rng.gen_range(1..=holders.len());
        for org in holders.choose_multiple(&mut rng, n) {
            let k = rng.gen_range(1..=org.categories.len().min(3));
            let categories = org
                .categories
                .choose_multiple(&mut rng, k)
                .map(|c| c.to_string())
                .collect();
            let start = now - rng.gen_range(30..3650) * day;
            let updated = now - rng.gen_range(0..30) * day;
            out.push(v1::Pointer {
                patient: Some(v1::PatientIdentifier {
                    system: system.to_string(),
                    value: value.clone(),
                }),
                holder: Some(v1::Organization {
                    organization_number: org.number.to_string(),
                    sub_unit_organization_number: String::new(),
                    name: org.name.to_string(),
                }),
                endpoint: Some(v1::Endpoint {
                    base_url: org.base_url.to_string(),
                    api_kind: v1::ApiKind::FhirR4 as i32,
                }),
                categories,
                period: Some(v1::Period {
                    start: Some(prost_types::Timestamp {
                        seconds: start,
                        nanos: 0,
                    }),
                    end: None,
                }),
                last_updated: Some(prost_types::Timestamp {
                    seconds: updated,
                    nanos: 0,
                }),
                ..Default::default()
            });
        }
    }
    out
}

/// A patient whose answer shows what PIL is for: pointers in more than one region, one
/// of them to a sensitive category held by the hospital, which the legal configuration
/// shows to a doctor and hides from a nurse.
pub fn showcase_patient(data: &[v1::Pointer]) -> Option<String> {
    let mut seen: std::collections::BTreeMap<&str, (std::collections::BTreeSet<usize>, bool)> =
        Default::default();
    let mut order = Vec::new();
    for (i, p) in data.iter().enumerate() {
        let value = p.patient.as_ref().map(|p| p.value.as_str()).unwrap_or("");
        let sensitive = p
            .holder
            .as_ref()
            .is_some_and(|h| h.organization_number == DEMO_ORGS[0].number)
            && p.categories.iter().any(|c| c == "mental-health");
        let entry = seen.entry(value).or_insert_with(|| {
            order.push(value);
            Default::default()
        });
        entry.0.insert(region_of(i, value));
        entry.1 |= sensitive;
    }
    order
        .into_iter()
        .find(|v| seen[v].0.len() > 1 && seen[v].1)
        .map(str::to_string)
}

/// Loads pointers straight into a registry (merge). Returns (inserted, unchanged).
pub async fn load(registry: &Registry, pointers: &[v1::Pointer]) -> Result<(u64, u64), DemoError> {
    let (mut inserted, mut unchanged) = (0, 0);
    for chunk in pointers.chunks(5_000) {
        let now = now_nanos();
        let ops = chunk
            .iter()
            .map(|p| {
                NewPointer::from_wire(p, true)
                    .map(|np| registry.prepare(&np, now))
                    .map_err(|e| DemoError::Data(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for r in registry.apply(ops).await? {
            match r {
                OpResult::Inserted(_) => inserted += 1,
                _ => unchanged += 1,
            }
        }
    }
    Ok((inserted, unchanged))
}
