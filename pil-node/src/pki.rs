//! The development PKI: a throw-away certificate authority that issues PIL node and
//! organization certificates for `pil-node dev-pki`, the local demo federation and the
//! tests.
//!
//! Production deployments use certificates from a real CA (Buypass, Commfides, or the
//! region's own PKI for node certificates); nothing here is needed there except
//! [`load_certs`] and [`load_key`], which read PEM files for the TLS setup.
//!
//! The certificates follow the identity conventions that [`crate::identity`] reads:
//!
//! - A **node** certificate carries the URI SAN `urn:pil:node:<region>` plus the DNS names
//!   and IP addresses it is served under, and both the server and the client
//!   authentication EKU, because a node is a server to its clients and a client of its
//!   peers.
//! - An **organization** certificate carries `organizationIdentifier=NTRNO-<orgnr>` in its
//!   subject, like a Norwegian eIDAS enterprise certificate, and only the client
//!   authentication EKU. [`DevCa::issue_organization_serial_number`] issues the older form
//!   with the organization number in the subject `serialNumber` instead.
//!
//! Keys are ECDSA P-256. Leaf certificates are valid from one day ago (to tolerate clock
//! skew) for one year, but never beyond the CA's own expiry; the CA itself is valid for
//! ten years so that a CA generated once can keep issuing (see [`DevCa::from_pem`]).
//!
//! **Not for production:** the CA key is written to disk unencrypted next to the CA
//! certificate.

use std::fmt;
use std::fs;
use std::io::{self, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PrintableString, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::identity::{
    NODE_URI_PREFIX, OID_ORGANIZATION_IDENTIFIER, OID_SERIAL_NUMBER,
    ORGANIZATION_IDENTIFIER_PREFIX, is_org_number_syntax, is_valid_region_id,
};

/// How long leaf certificates are valid, counted from now.
const LEAF_VALIDITY: Duration = Duration::days(365);
/// How long a freshly generated CA is valid, counted from now.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How far back `notBefore` is set, so that peers with a slightly slow clock accept the
/// certificate right after it was issued.
const BACKDATE: Duration = Duration::days(1);

/// The DNS names and IP addresses a node certificate from [`write_dev_pki`] is valid for.
pub const DEV_NODE_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Errors from generating, loading or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid organization number {0:?}: expected exactly 9 digits")]
    InvalidOrgNumber(String),
    #[error(
        "invalid region id {0:?}: expected 1 to 63 lowercase ASCII letters, digits or '-', \
         starting with a letter or digit"
    )]
    InvalidRegion(String),
    #[error("invalid subject alternative name {0:?}: not a DNS name or IP address")]
    InvalidSubjectAltName(String),
    #[error("the {0} must not be empty")]
    EmptyName(&'static str),
    #[error("the CA certificate could not be parsed: {0}")]
    InvalidCaCertificate(String),
    #[error("the certificate is not a CA certificate (basicConstraints cA is not set)")]
    NotACa,
    #[error("the CA private key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate expired at {0}")]
    CaExpired(OffsetDateTime),
    #[error("{path}: no certificate found in PEM file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found in PEM file")]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: CA certificate exists but its key {key_path} does not")]
    CaKeyMissing { path: PathBuf, key_path: PathBuf },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PkiError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// A certificate together with its private key, both as PEM (for files) and DER (for an
/// in-memory rustls configuration).
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM encoded (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PEM encoded PKCS #8 (`PRIVATE KEY`). Secret.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_pkcs8_der: Vec<u8>,
}

impl CertifiedKey {
    fn new(cert: &Certificate, key: &KeyPair) -> Self {
        Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_pkcs8_der: key.serialize_der(),
        }
    }

    /// The certificate in DER, as rustls wants it.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The private key in DER, as rustls wants it.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }
}

impl fmt::Debug for CertifiedKey {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A development certificate authority that can issue node and organization certificates.
pub struct DevCa {
    /// The CA certificate as distributed (`ca.pem`). For a CA loaded with
    /// [`DevCa::from_pem`] this is the original PEM, byte for byte.
    cert_pem: String,
    /// The certificate rcgen signs with. For a reloaded CA this is a re-signed copy with
    /// the same subject, key and key identifier as the original, which is all that ends
    /// up in the issued certificates, so they chain to the original `ca.pem`.
    issuer: Certificate,
    key: KeyPair,
    not_after: OffsetDateTime,
}

impl fmt::Debug for DevCa {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_pem", &self.cert_pem)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Generates a new self-signed CA with the subject `CN=<name>`, valid for ten years.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        if name.trim().is_empty() {
            return Err(PkiError::EmptyName("CA name"));
        }
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let not_after = params.not_after;
        let key = KeyPair::generate()?;
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: issuer.pem(),
            issuer,
            key,
            not_after,
        })
    }

    /// Loads a CA generated earlier from its certificate and PKCS #8 private key (PEM).
    ///
    /// Certificates issued afterwards verify against the original certificate: the subject
    /// and key identifier are taken from it unchanged. Fails if the certificate is not a
    /// CA or the key does not belong to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(PkiError::NotACa);
        }
        let cert_der = first_pem_cert(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|err| PkiError::InvalidCaCertificate(err.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let not_after = params.not_after;
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
            key,
            not_after,
        })
    }

    /// Loads a CA from a certificate file and a key file (see [`DevCa::from_pem`]).
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(PkiError::io("read", cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(PkiError::io("read", key_path))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// The CA certificate (PEM): the trust anchor every party configures.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate in DER, e.g. for a rustls `RootCertStore`.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        first_pem_cert(&self.cert_pem)
    }

    /// The CA private key (PEM, PKCS #8). Secret; needed to reload the CA later.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a PIL node certificate for `region`: server and client authentication, with
    /// the URI SAN `urn:pil:node:<region>` and a DNS or IP SAN for each of
    /// `dns_names_and_ips` (e.g. `"localhost"`, `"127.0.0.1"`).
    pub fn issue_node(
        &self,
        region: &str,
        dns_names_and_ips: &[&str],
    ) -> Result<CertifiedKey, PkiError> {
        if !is_valid_region_id(region) {
            return Err(PkiError::InvalidRegion(region.to_owned()));
        }
        let mut sans = Vec::with_capacity(dns_names_and_ips.len() + 1);
        for name in dns_names_and_ips {
            sans.push(dns_or_ip_san(name)?);
        }
        sans.push(SanType::URI(
            format!("{NODE_URI_PREFIX}{region}").try_into()?,
        ));

        let mut params = self.leaf_params()?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("PIL node {region}"));
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// Issues an organization (client) certificate with the subject
    /// `O=<name>, CN=<name>, organizationIdentifier=NTRNO-<org_number>`.
    pub fn issue_organization(
        &self,
        org_number: &str,
        name: &str,
    ) -> Result<CertifiedKey, PkiError> {
        let identifier = format!("{ORGANIZATION_IDENTIFIER_PREFIX}{org_number}");
        self.issue_org_with(org_number, name, OID_ORGANIZATION_IDENTIFIER, &identifier)
    }

    /// Issues an organization certificate in the older style that carries the
    /// organization number only in the subject `serialNumber`:
    /// `O=<name>, CN=<name>, serialNumber=<org_number>`.
    pub fn issue_organization_serial_number(
        &self,
        org_number: &str,
        name: &str,
    ) -> Result<CertifiedKey, PkiError> {
        self.issue_org_with(org_number, name, OID_SERIAL_NUMBER, org_number)
    }

    fn issue_org_with(
        &self,
        org_number: &str,
        name: &str,
        attribute_oid: &[u64],
        attribute_value: &str,
    ) -> Result<CertifiedKey, PkiError> {
        if !is_org_number_syntax(org_number) {
            return Err(PkiError::InvalidOrgNumber(org_number.to_owned()));
        }
        if name.trim().is_empty() {
            return Err(PkiError::EmptyName("organization name"));
        }
        let mut params = self.leaf_params()?;
        let dn = &mut params.distinguished_name;
        dn.push(DnType::OrganizationName, name);
        dn.push(DnType::CommonName, name);
        // Both attributes are PrintableString in X.520 practice (the value is ASCII).
        dn.push(
            DnType::CustomDnType(attribute_oid.to_vec()),
            DnValue::PrintableString(PrintableString::try_from(attribute_value)?),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// Parameters shared by every leaf certificate: validity, serial, key usage.
    fn leaf_params(&self) -> Result<CertificateParams, PkiError> {
        let now = OffsetDateTime::now_utc();
        if self.not_after <= now {
            return Err(PkiError::CaExpired(self.not_after));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CertifiedKey::new(&cert, &key))
    }
}

/// A random positive 128-bit serial number (RFC 5280 wants unique, unpredictable serials).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    // Keep the encoding a full 16 bytes, which also keeps the value non-zero.
    bytes[0] |= 0x40;
    SerialNumber::from_slice(&bytes)
}

fn dns_or_ip_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // Validate with the same rules rustls applies when it matches a server name.
    if DnsName::try_from(name).is_err() {
        return Err(PkiError::InvalidSubjectAltName(name.to_owned()));
    }
    Ok(SanType::DnsName(name.try_into()?))
}

fn first_pem_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    match rustls_pemfile::certs(&mut pem.as_bytes()).next() {
        Some(Ok(cert)) => Ok(cert),
        Some(Err(err)) => Err(PkiError::InvalidCaCertificate(err.to_string())),
        None => Err(PkiError::InvalidCaCertificate(
            "no CERTIFICATE block in PEM".to_owned(),
        )),
    }
}

/// Paths of one organization's certificate and key written by [`write_dev_pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgFiles {
    pub org_number: String,
    pub name: String,
    /// `org-<orgnr>.pem`.
    pub cert: PathBuf,
    /// `org-<orgnr>-key.pem`, mode 0600.
    pub key: PathBuf,
}

/// Paths of everything [`write_dev_pki`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPkiFiles {
    /// `ca.pem`: the trust anchor for nodes and clients.
    pub ca_cert: PathBuf,
    /// `ca-key.pem`, mode 0600: lets a later run issue more certificates from this CA.
    pub ca_key: PathBuf,
    /// True if `ca.pem`/`ca-key.pem` already existed and were reused instead of generated.
    pub ca_reused: bool,
    /// `node.pem`: the node certificate for the region.
    pub node_cert: PathBuf,
    /// `node-key.pem`, mode 0600.
    pub node_key: PathBuf,
    /// One entry per organization, in the order given.
    pub orgs: Vec<OrgFiles>,
}

/// The name of the dev CA generated by [`write_dev_pki`].
pub const DEV_CA_NAME: &str = "PIL development CA";

/// Writes a complete dev PKI into `dir` (created if missing): `ca.pem` and `ca-key.pem`,
/// `node.pem`/`node-key.pem` for `region` (valid for [`DEV_NODE_NAMES`]), and
/// `org-<orgnr>.pem`/`org-<orgnr>-key.pem` for each `(org_number, name)` in `orgs`.
///
/// If `dir` already holds `ca.pem` and `ca-key.pem`, that CA is reused, so running this
/// once per region into the same directory (or copying the CA files between directories)
/// gives federating nodes a common trust anchor. The node and organization files are
/// always overwritten. Private keys are written with mode 0600 on unix.
pub fn write_dev_pki(
    dir: &Path,
    region: &str,
    orgs: &[(&str, &str)],
) -> Result<DevPkiFiles, PkiError> {
    fs::create_dir_all(dir).map_err(PkiError::io("create directory", dir))?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");

    let ca_reused = ca_cert.exists();
    let ca = if ca_reused {
        if !ca_key.exists() {
            return Err(PkiError::CaKeyMissing {
                path: ca_cert,
                key_path: ca_key,
            });
        }
        DevCa::from_pem_files(&ca_cert, &ca_key)?
    } else {
        DevCa::generate(DEV_CA_NAME)?
    };

    // Issue everything before writing anything, so invalid input leaves no partial PKI.
    let node = ca.issue_node(region, DEV_NODE_NAMES)?;
    let mut issued_orgs = Vec::with_capacity(orgs.len());
    for (org_number, name) in orgs {
        issued_orgs.push((*org_number, *name, ca.issue_organization(org_number, name)?));
    }

    if !ca_reused {
        write_secret(&ca_key, &ca.key_pem())?;
        write_public(&ca_cert, &ca.cert_pem())?;
    }
    let node_cert = dir.join("node.pem");
    let node_key = dir.join("node-key.pem");
    write_public(&node_cert, &node.cert_pem)?;
    write_secret(&node_key, &node.key_pem)?;

    let mut org_files = Vec::with_capacity(issued_orgs.len());
    for (org_number, name, issued) in issued_orgs {
        let cert = dir.join(format!("org-{org_number}.pem"));
        let key = dir.join(format!("org-{org_number}-key.pem"));
        write_public(&cert, &issued.cert_pem)?;
        write_secret(&key, &issued.key_pem)?;
        org_files.push(OrgFiles {
            org_number: org_number.to_owned(),
            name: name.to_owned(),
            cert,
            key,
        });
    }

    Ok(DevPkiFiles {
        ca_cert,
        ca_key,
        ca_reused,
        node_cert,
        node_key,
        orgs: org_files,
    })
}

fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(PkiError::io("write", path))
}

/// Writes a private key readable only by the owner. The permissions are set on the open
/// file before any key material is written, also when the file already existed with
/// looser permissions.
fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(PkiError::io("create", path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(PkiError::io("set permissions of", path))?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(PkiError::io("write", path))
}

/// Reads every certificate from a PEM file (e.g. a chain, or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let file = fs::File::open(path).map_err(PkiError::io("open", path))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(PkiError::io("read certificates from", path))?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS #8, PKCS #1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let file = fs::File::open(path).map_err(PkiError::io("open", path))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(PkiError::io("read private key from", path))?
        .ok_or_else(|| PkiError::NoPrivateKey {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    use super::*;
    use crate::identity::{Caller, caller_from_cert};

    const ORG: &str = "974633574";
    const ORG_NAME: &str = "Helse Bergen HF";

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca_pem: &str) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots
                .add(cert.expect("CA PEM parses"))
                .expect("CA is a valid trust anchor");
        }
        Arc::new(roots)
    }

    /// A node's TLS 1.3 server configuration that requires a client certificate from
    /// `ca_pem`.
    fn server_config(ca_pem: &str, node: &CertifiedKey) -> Arc<ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider())
                .build()
                .expect("client verifier");
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![node.cert_der()], node.key_der())
            .expect("node certificate and key");
        Arc::new(config)
    }

    fn client_config(ca_pem: &str, client: &CertifiedKey) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_root_certificates(roots(ca_pem))
            .with_client_auth_cert(vec![client.cert_der()], client.key_der())
            .expect("client certificate and key");
        Arc::new(config)
    }

    /// Moves TLS records between client and server in memory until the handshake is done
    /// on both sides or one side fails. Returns the server connection (for its view of the
    /// peer) or the first error, tagged with the side that raised it.
    fn handshake(
        client_config: Arc<ClientConfig>,
        server_config: Arc<ServerConfig>,
    ) -> Result<ServerConnection, (&'static str, rustls::Error)> {
        let server_name = ServerName::try_from("localhost").expect("valid server name");
        let mut client =
            ClientConnection::new(client_config, server_name).expect("client connection");
        let mut server = ServerConnection::new(server_config).expect("server connection");
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).expect("write to a Vec");
            }
            let mut slice = buf.as_slice();
            while !slice.is_empty() {
                server.read_tls(&mut slice).expect("read from a slice");
            }
            server
                .process_new_packets()
                .map_err(|err| ("server", err))?;

            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).expect("write to a Vec");
            }
            let mut slice = buf.as_slice();
            while !slice.is_empty() {
                client.read_tls(&mut slice).expect("read from a slice");
            }
            client
                .process_new_packets()
                .map_err(|err| ("client", err))?;

            if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
                return Ok(server);
            }
        }
        panic!("handshake did not finish in 20 rounds");
    }

    #[test]
    fn mutual_tls_handshake_identifies_the_organization() {
        let ca = DevCa::generate("test CA").unwrap();
        let node = ca
            .issue_node("helse-vest", &["localhost", "127.0.0.1"])
            .unwrap();
        let org = ca.issue_organization(ORG, ORG_NAME).unwrap();

        let server = handshake(
            client_config(&ca.cert_pem(), &org),
            server_config(&ca.cert_pem(), &node),
        )
        .unwrap();

        assert_eq!(
            server.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let peer = server
            .peer_certificates()
            .expect("server saw a client certificate");
        assert_eq!(
            caller_from_cert(&peer[0]).unwrap(),
            Caller::Organization {
                org_number: ORG.to_owned(),
                name: Some(ORG_NAME.to_owned()),
            }
        );
    }

    #[test]
    fn node_certificate_works_as_a_federation_client() {
        let ca = DevCa::generate("test CA").unwrap();
        let server_node = ca.issue_node("helse-vest", &["localhost"]).unwrap();
        let client_node = ca.issue_node("helse-nord", &["localhost"]).unwrap();

        let server = handshake(
            client_config(&ca.cert_pem(), &client_node),
            server_config(&ca.cert_pem(), &server_node),
        )
        .unwrap();

        let peer = server.peer_certificates().unwrap();
        assert_eq!(
            caller_from_cert(&peer[0]).unwrap(),
            Caller::Node {
                region: "helse-nord".to_owned()
            }
        );
    }

    #[test]
    fn client_certificate_from_a_foreign_ca_is_rejected() {
        let ca = DevCa::generate("test CA").unwrap();
        // Same name as the trusted CA, different key: must not be confused with it.
        let foreign = DevCa::generate("test CA").unwrap();
        let node = ca.issue_node("helse-vest", &["localhost"]).unwrap();
        let intruder = foreign.issue_organization(ORG, ORG_NAME).unwrap();

        // The client trusts the right CA, so only the server's check can stop this.
        let err = handshake(
            client_config(&ca.cert_pem(), &intruder),
            server_config(&ca.cert_pem(), &node),
        )
        .unwrap_err();

        assert_eq!(err.0, "server");
        assert!(
            matches!(err.1, rustls::Error::InvalidCertificate(_)),
            "unexpected error: {:?}",
            err.1
        );
    }

    #[test]
    fn server_certificate_from_a_foreign_ca_is_rejected_by_the_client() {
        let ca = DevCa::generate("test CA").unwrap();
        let foreign = DevCa::generate("test CA").unwrap();
        let impostor = foreign.issue_node("helse-vest", &["localhost"]).unwrap();
        let org = ca.issue_organization(ORG, ORG_NAME).unwrap();

        let err = handshake(
            client_config(&ca.cert_pem(), &org),
            server_config(&ca.cert_pem(), &impostor),
        )
        .unwrap_err();

        assert_eq!(err.0, "client");
        assert!(matches!(err.1, rustls::Error::InvalidCertificate(_)));
    }

    #[test]
    fn node_certificate_is_only_valid_for_its_names() {
        let ca = DevCa::generate("test CA").unwrap();
        let node = ca.issue_node("helse-vest", &["pil.example.org"]).unwrap();
        let org = ca.issue_organization(ORG, ORG_NAME).unwrap();

        // The client connects to "localhost", which the certificate does not name.
        let err = handshake(
            client_config(&ca.cert_pem(), &org),
            server_config(&ca.cert_pem(), &node),
        )
        .unwrap_err();

        assert_eq!(err.0, "client");
        assert!(matches!(
            err.1,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                | rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
        ));
    }

    #[test]
    fn reloaded_ca_issues_certificates_that_verify_against_the_original_ca_pem() {
        let original = DevCa::generate("test CA").unwrap();
        let ca_pem = original.cert_pem();
        let reloaded = DevCa::from_pem(&ca_pem, &original.key_pem()).unwrap();
        assert_eq!(reloaded.cert_pem(), ca_pem);
        drop(original);

        let node = reloaded.issue_node("helse-vest", &["localhost"]).unwrap();
        let org = reloaded.issue_organization(ORG, ORG_NAME).unwrap();
        let server =
            handshake(client_config(&ca_pem, &org), server_config(&ca_pem, &node)).unwrap();

        let peer = server.peer_certificates().unwrap();
        assert!(matches!(
            caller_from_cert(&peer[0]).unwrap(),
            Caller::Organization { org_number, .. } if org_number == ORG
        ));
    }

    #[test]
    fn reloading_rejects_a_key_from_another_ca() {
        let ca = DevCa::generate("test CA").unwrap();
        let other = DevCa::generate("test CA").unwrap();
        let err = DevCa::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    }

    #[test]
    fn reloading_rejects_a_leaf_certificate() {
        let ca = DevCa::generate("test CA").unwrap();
        let leaf = ca.issue_organization(ORG, ORG_NAME).unwrap();
        let err = DevCa::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotACa), "{err}");
    }

    #[test]
    fn reloading_rejects_garbage() {
        let ca = DevCa::generate("test CA").unwrap();
        assert!(DevCa::from_pem("not a certificate", &ca.key_pem()).is_err());
        assert!(DevCa::from_pem(&ca.cert_pem(), "not a key").is_err());
    }

    #[test]
    fn issuing_validates_its_input() {
        let ca = DevCa::generate("test CA").unwrap();
        for bad in [
            "12345678",
            "1234567890",
            "97463357a",
            "",
            "９７４６３３５７４",
        ] {
            assert!(
                matches!(
                    ca.issue_organization(bad, ORG_NAME),
                    Err(PkiError::InvalidOrgNumber(_))
                ),
                "{bad:?}"
            );
            assert!(matches!(
                ca.issue_organization_serial_number(bad, ORG_NAME),
                Err(PkiError::InvalidOrgNumber(_))
            ));
        }
        assert!(matches!(
            ca.issue_organization(ORG, " "),
            Err(PkiError::EmptyName(_))
        ));
        for bad in [
            "",
            "Helse-Vest",
            "helse vest",
            "-vest",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(ca.issue_node(bad, &[]), Err(PkiError::InvalidRegion(_))),
                "{bad:?}"
            );
        }
        for bad in ["not a name", "trailing-.example", "bad..dots", "æøå.no"] {
            assert!(
                matches!(
                    ca.issue_node("vest", &[bad]),
                    Err(PkiError::InvalidSubjectAltName(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(DevCa::generate(""), Err(PkiError::EmptyName(_))));
    }

    #[test]
    fn leaf_validity_starts_in_the_past_and_lasts_a_year() {
        let ca = DevCa::generate("test CA").unwrap();
        let org = ca.issue_organization(ORG, ORG_NAME).unwrap();
        let der = org.cert_der();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let now = OffsetDateTime::now_utc();
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        assert!(not_before <= now - Duration::hours(23));
        assert!(not_after >= now + Duration::days(364));
        assert!(not_after <= now + Duration::days(366));
        assert!(!cert.is_ca());
    }

    #[test]
    fn debug_output_does_not_leak_private_keys() {
        let ca = DevCa::generate("test CA").unwrap();
        let org = ca.issue_organization(ORG, ORG_NAME).unwrap();
        assert!(!format!("{org:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn write_dev_pki_writes_a_working_pki_and_reuses_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let orgs = [(ORG, ORG_NAME), ("983658725", "Bergen kommune")];
        let files = write_dev_pki(dir.path(), "helse-vest", &orgs).unwrap();
        assert!(!files.ca_reused);
        assert_eq!(files.ca_cert, dir.path().join("ca.pem"));
        assert_eq!(files.node_cert, dir.path().join("node.pem"));
        assert_eq!(files.node_key, dir.path().join("node-key.pem"));
        assert_eq!(files.orgs.len(), 2);
        assert_eq!(files.orgs[1].cert, dir.path().join("org-983658725.pem"));
        assert_eq!(files.orgs[1].key, dir.path().join("org-983658725-key.pem"));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&files.ca_key, &files.node_key, &files.orgs[0].key] {
                let mode = fs::metadata(key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }

        // The files load with the helpers the TLS setup uses, and the org certificate
        // identifies its organization.
        let ca_certs = load_certs(&files.ca_cert).unwrap();
        assert_eq!(ca_certs.len(), 1);
        load_key(&files.node_key).unwrap();
        let org_cert = load_certs(&files.orgs[1].cert).unwrap();
        assert_eq!(
            caller_from_cert(&org_cert[0]).unwrap(),
            Caller::Organization {
                org_number: "983658725".to_owned(),
                name: Some("Bergen kommune".to_owned()),
            }
        );

        // A second run for another region keeps the CA, so the two nodes trust each other.
        let ca_pem_before = fs::read_to_string(&files.ca_cert).unwrap();
        let second_dir = dir.path().join("nord");
        fs::create_dir(&second_dir).unwrap();
        fs::copy(&files.ca_cert, second_dir.join("ca.pem")).unwrap();
        fs::copy(&files.ca_key, second_dir.join("ca-key.pem")).unwrap();
        let second = write_dev_pki(&second_dir, "helse-nord", &[]).unwrap();
        assert!(second.ca_reused);
        assert_eq!(fs::read_to_string(&second.ca_cert).unwrap(), ca_pem_before);

        let node_from_file = |cert: &Path, key: &Path| CertifiedKey {
            cert_pem: fs::read_to_string(cert).unwrap(),
            key_pem: fs::read_to_string(key).unwrap(),
            cert_der: load_certs(cert).unwrap().remove(0),
            key_pkcs8_der: match load_key(key).unwrap() {
                PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
                other => panic!("unexpected key type {other:?}"),
            },
        };
        let vest = node_from_file(&files.node_cert, &files.node_key);
        let nord = node_from_file(&second.node_cert, &second.node_key);
        let server = handshake(
            client_config(&ca_pem_before, &nord),
            server_config(&ca_pem_before, &vest),
        )
        .unwrap();
        assert_eq!(
            caller_from_cert(&server.peer_certificates().unwrap()[0]).unwrap(),
            Caller::Node {
                region: "helse-nord".to_owned()
            }
        );
    }

    #[test]
    fn write_dev_pki_refuses_a_ca_without_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let err = write_dev_pki(dir.path(), "helse-vest", &[]).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMissing { .. }), "{err}");
        assert!(!dir.path().join("node.pem").exists());
    }

    #[test]
    fn write_dev_pki_writes_nothing_on_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_dev_pki(dir.path(), "helse-vest", &[("123", "Bad AS")]).unwrap_err();
        assert!(matches!(err, PkiError::InvalidOrgNumber(_)), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn load_helpers_report_missing_content() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(matches!(
            load_certs(&empty),
            Err(PkiError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_key(&empty),
            Err(PkiError::NoPrivateKey { .. })
        ));
        assert!(matches!(
            load_certs(&dir.path().join("missing.pem")),
            Err(PkiError::Io { .. })
        ));
    }
}
