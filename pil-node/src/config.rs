//! Node configuration: one TOML file, with a few settings overridable from the
//! environment or the command line so the same file serves several deployments.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use pil_proto::ident::OrgNumber;
use serde::{Deserialize, Serialize};

/// Everything a node needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's region id, e.g. `helse-vest`. Labels every pointer it answers with.
    pub region: String,
    /// Address the mTLS gRPC listener binds, e.g. `127.0.0.1:7443`.
    pub listen: SocketAddr,
    /// Directory of the RocksDB database (the default engine).
    pub data_dir: PathBuf,
    /// Which storage engine holds the region's data.
    #[serde(default, skip_serializing_if = "StorageConfig::is_default")]
    pub storage: StorageConfig,
    /// Accept synthetic test identifiers (month + 80 / + 65). Only for test and demo nodes.
    #[serde(default)]
    pub test_data: bool,
    /// Directory of the legal configuration (schema, policies, node settings).
    pub legal_config: PathBuf,
    pub tls: TlsConfig,
    pub keys: KeyConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    /// Other regions' nodes this node federates with.
    #[serde(default)]
    pub federation: FederationConfig,
    /// Hosting providers and record-system vendors that write for other organizations:
    /// writer organization number → the organization numbers it may write for.
    #[serde(default)]
    pub writes_for: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default, skip_serializing_if = "MetricsConfig::is_off")]
    pub metrics: MetricsConfig,
    /// This node as a witness of other regions' audit logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<WitnessConfig>,
    /// The file this configuration was read from, re-read on reload for the peers.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The node's TLS identity and the CA its clients' certificates must chain to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of trusted CA certificates for client certificates.
    pub client_ca: PathBuf,
    /// PEM certificate chain the node presents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
}

/// Secrets protecting patient identifiers at rest. Each file holds 32 random bytes as
/// 64 hex characters. Losing the pseudonym key makes the registry unsearchable; losing
/// the storage key makes `export` unable to read identifiers back: back them up apart
/// from the data directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// HMAC-SHA-256 key that turns patient identifiers into the pseudonyms the registry
    /// is keyed by.
    pub pseudonym_key_file: PathBuf,
    /// XChaCha20-Poly1305 key that encrypts the identifiers kept for export.
    pub storage_key_file: PathBuf,
    /// The region's routing key (a 32-byte seed, hex), shared by every node of the
    /// region and by no other region: its membership summary is built over tokens
    /// only this key makes. Without one the region publishes no summary and every
    /// peer asks it about every patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key_file: Option<PathBuf>,
}

/// Requester tokens: who issues them and what this node requires of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The trusted token issuer, compared exactly with `iss` (e.g. HelseID's).
    pub issuer: String,
    /// This node's audience; a token's `aud` must be exactly this.
    pub audience: String,
    /// Scope every token must carry.
    #[serde(default = "default_scope")]
    pub required_scope: String,
    /// The issuer's signing keys as a JWKS file; keys are chosen by `kid`. Re-read on
    /// reload. Exactly one of `jwks_file` and `jwks_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's published JWKS (`https://…`, e.g. HelseID's `jwks_uri`), fetched
    /// at start, on reload and every `jwks_refresh_secs` (sooner when the answer's
    /// `Cache-Control: max-age` says so). The last good copy is kept in the data
    /// directory, so the node starts while the issuer is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// PEM bundle of CAs the JWKS URL's server certificate must chain to. Default:
    /// the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Longest time between fetches of `jwks_url`, in seconds (default 300).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// Clock skew tolerated on `exp`, `nbf` and DPoP `iat`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Refuse tokens that are not DPoP-bound.
    #[serde(default)]
    pub require_dpop: bool,
    /// The node's URL as clients see it (e.g. behind a load balancer), used to check
    /// DPoP proofs' `htu`. Default: the URL the request arrived on.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Most DPoP proofs remembered against replay. A proof is remembered for about
    /// 65 s and a full cache refuses proofs, so this caps DPoP-bound requests at
    /// about capacity / 65 per second (default 500 000: ~7 700/s, ~70 MB when full).
    #[serde(default = "default_replay_capacity")]
    pub dpop_replay_capacity: usize,
    /// Most access tokens whose signature check is reused while they are valid
    /// (default 10 000). Claims and DPoP proofs are still checked on every call.
    #[serde(default = "default_token_cache")]
    pub token_cache: usize,
}

/// Least `[limits] max_message_bytes`: every page the node answers with fits.
pub const MIN_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// Default of `[auth] dpop_replay_capacity`.
pub const DEFAULT_DPOP_REPLAY_CAPACITY: usize = 500_000;
/// Default of `[auth] token_cache`.
pub const DEFAULT_TOKEN_CACHE: usize = 10_000;

fn default_replay_capacity() -> usize {
    DEFAULT_DPOP_REPLAY_CAPACITY
}

fn default_token_cache() -> usize {
    DEFAULT_TOKEN_CACHE
}

/// Default of `[auth] jwks_refresh_secs`.
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = 300;

fn default_jwks_refresh() -> u64 {
    DEFAULT_JWKS_REFRESH_SECS
}

/// The audit log's tree-head signing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Ed25519 private key (PKCS#8 PEM) that signs the audit log's tree heads. Give
    /// auditors its public key; keep the private key off the data directory's backups.
    pub signing_key_file: PathBuf,
    /// Seconds between signed tree heads while the log grows.
    #[serde(default = "default_sign_interval")]
    pub sign_interval_secs: u64,
    /// Seconds between runs of the retention task.
    #[serde(default = "default_retention_interval")]
    pub retention_interval_secs: u64,
    /// The witnesses asked to cosign every head this node signs (c2sp.org/tlog-witness):
    /// the other regions, and any independent witness that speaks the protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<WitnessEndpoint>,
    /// How many witnesses must cosign a head before it counts as published (default:
    /// all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_quorum: Option<usize>,
}

impl AuditConfig {
    /// The quorum in force: as configured, or every witness.
    pub fn quorum(&self) -> usize {
        self.witness_quorum.unwrap_or(self.witnesses.len())
    }
}

/// One witness of this node's audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessEndpoint {
    /// Its verifier key, `<name>+<key id>+<base64 key>` (c2sp.org/signed-note, type
    /// 0x04), as the witness's operator publishes it.
    pub key: String,
    /// Its submission prefix: `add-checkpoint` is posted to `<url>/add-checkpoint`
    /// (`http://` or `https://`).
    pub url: String,
}

/// This node as a witness: the plain-HTTP `add-checkpoint` listener, its cosigning key
/// and the logs it witnesses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// Address of `POST /add-checkpoint`, e.g. `0.0.0.0:7380`. Requests carry no
    /// secret: a checkpoint is accepted on its log's signature alone.
    pub listen: SocketAddr,
    /// The witness's name, e.g. `witness.helse-vest.pil.example`; its cosignatures
    /// carry it.
    pub name: String,
    /// Its Ed25519 private key (PKCS#8 PEM), its own: never the audit signing key.
    pub key_file: PathBuf,
    /// The logs it witnesses.
    #[serde(default)]
    pub logs: Vec<WitnessedLog>,
}

/// A log this node witnesses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessedLog {
    /// The log's origin line, e.g. `pil-audit/helse-vest`.
    pub origin: String,
    /// The log's public keys (SPKI PEM, oldest first: its key history).
    pub key_file: PathBuf,
}

fn default_sign_interval() -> u64 {
    10
}

fn default_retention_interval() -> u64 {
    3600
}

fn default_scope() -> String {
    "pil:lookup".into()
}

fn default_leeway() -> u64 {
    5
}

/// Bounds that keep one caller from exhausting the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted gRPC message, in bytes.
    pub max_message_bytes: usize,
    /// Most pointers an all-or-nothing sync may carry (they are held until the end).
    pub max_all_or_nothing_records: usize,
    /// Most pointers one replace-mode sync may carry (their keys are held until the end).
    pub max_replace_records: usize,
    /// Seconds between purges of expired pointers.
    pub purge_interval_secs: u64,
    /// Seconds allowed for a TLS handshake before the connection is dropped.
    pub handshake_timeout_secs: u64,
    /// Seconds in-flight requests get to finish when the node stops.
    pub shutdown_grace_secs: u64,
    /// Most connections open at once, handshakes included; one more is closed as soon
    /// as it is accepted (and counted), so idle or half-open connections cannot take
    /// every file descriptor.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub max_concurrent_streams: u32,
    /// Requests per second one organization may send (its certificate's organization
    /// number); beyond, `RESOURCE_EXHAUSTED`. 0: no limit.
    pub requests_per_second_per_organization: u32,
    /// Requests an organization may send at once above its rate (default: the rate).
    pub organization_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_all_or_nothing_records: 1_000_000,
            max_replace_records: 50_000_000,
            purge_interval_secs: 60,
            handshake_timeout_secs: 10,
            shutdown_grace_secs: 10,
            max_connections: 4096,
            max_concurrent_streams: 256,
            requests_per_second_per_organization: 0,
            organization_burst: 0,
        }
    }
}

impl Limits {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn purge_interval(&self) -> Duration {
        Duration::from_secs(self.purge_interval_secs.max(1))
    }
}

/// The Prometheus endpoint: plain HTTP on its own address, for the monitoring
/// network only (it carries no patient data, but says how busy the node is).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `GET /metrics`, e.g. `127.0.0.1:9464`; none: no metrics listener.
    pub listen: Option<SocketAddr>,
}

impl MetricsConfig {
    fn is_off(&self) -> bool {
        self.listen.is_none()
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `pil_node=debug,info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A TOML error as one line with its position: the parser's own text spans several
/// lines with a drawing of the spot.
pub fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end_matches('.').replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

impl NodeConfig {
    /// Reads a TOML file; relative paths inside it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: toml_message(&text, &e),
        })?;
        if let Some(base) = path.parent() {
            config.resolve_relative_to(base);
        }
        config.source = Some(path.to_path_buf());
        config.validate()?;
        Ok(config)
    }

    fn resolve_relative_to(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.legal_config,
            &mut self.tls.client_ca,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.keys.pseudonym_key_file,
            &mut self.keys.storage_key_file,
            &mut self.audit.signing_key_file,
        ]
        .into_iter()
        .chain(self.keys.routing_key_file.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [
            self.storage
                .postgres
                .as_mut()
                .and_then(|pg| pg.ca_file.as_mut()),
            self.auth.jwks_file.as_mut(),
            self.auth.jwks_ca_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks what serde cannot (region syntax, organization numbers, bounds) and
    /// reports every problem, not only the first.
    fn validate_witnessing(&self, problems: &mut Vec<String>) {
        let audit = &self.audit;
        for (i, w) in audit.witnesses.iter().enumerate() {
            if let Err(e) = pil_transparency::CosignerKey::parse_vkey(&w.key) {
                problems.push(format!("audit.witnesses[{i}].key: {e}"));
            }
            match url::Url::parse(&w.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(_) => problems.push(format!(
                    "audit.witnesses[{i}].url {:?} must be an http:// or https:// URL",
                    w.url
                )),
                Err(e) => problems.push(format!("audit.witnesses[{i}].url {:?}: {e}", w.url)),
            }
        }
        match audit.witness_quorum {
            Some(q) if q > audit.witnesses.len() => problems.push(format!(
                "audit.witness_quorum is {q}, but only {} witnesses are configured",
                audit.witnesses.len()
            )),
            Some(0) if !audit.witnesses.is_empty() => problems.push(
                "audit.witness_quorum must be at least 1 when witnesses are configured".into(),
            ),
            _ => {}
        }
        if let Some(w) = &self.witness {
            if !pil_transparency::cosignature::is_valid_name(&w.name) {
                problems.push(format!(
                    "witness.name {:?} must be non-empty, without spaces or '+'",
                    w.name
                ));
            }
            if w.listen == self.listen && w.listen.port() != 0 {
                problems.push(format!(
                    "witness.listen {} is the gRPC listener's address; give the witness its \
                     own port",
                    w.listen
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for log in &w.logs {
                if !seen.insert(&log.origin) {
                    problems.push(format!("witness.logs: {:?} is listed twice", log.origin));
                }
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !pil_proto::ident::is_valid_region_id(&self.region) {
            problems.push(format!(
                "region {:?} must be 1-63 characters of a-z, 0-9 and '-', starting and \
                 ending with a letter or digit",
                self.region
            ));
        }
        for (writer, orgs) in &self.writes_for {
            for org in std::iter::once(writer).chain(orgs) {
                if let Err(e) = OrgNumber::parse(org) {
                    problems.push(format!("writes_for: {org:?}: {e}"));
                }
            }
        }
        if let Some(addr) = self.metrics.listen
            && addr == self.listen
            && addr.port() != 0
        {
            problems.push(format!(
                "metrics.listen {addr} is the gRPC listener's address; give the metrics \
                 endpoint its own port (it is plain HTTP, for the monitoring network)"
            ));
        }
        match (&self.auth.jwks_file, &self.auth.jwks_url) {
            (Some(_), Some(_)) => problems
                .push("auth: give the issuer keys as jwks_file or as jwks_url, not both".into()),
            (None, None) => problems.push(
                "auth: the issuer keys are missing: set jwks_file (a JWKS file) or jwks_url \
                 (the issuer's published JWKS)"
                    .into(),
            ),
            (None, Some(url)) => match url::Url::parse(url) {
                Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
                Ok(_) => problems.push(format!(
                    "auth.jwks_url {url:?} must be an https:// URL: the keys decide who may \
                     look patients up"
                )),
                Err(e) => problems.push(format!("auth.jwks_url {url:?}: {e}")),
            },
            (Some(_), None) => {}
        }
        self.validate_witnessing(&mut problems);
        if self.auth.jwks_refresh_secs == 0 {
            problems.push("auth.jwks_refresh_secs must be at least 1".into());
        }
        if self.auth.dpop_replay_capacity < 1_000 {
            problems.push(
                "auth.dpop_replay_capacity must be at least 1000 (proofs remembered against \
                 replay; a full cache refuses every DPoP-bound call)"
                    .into(),
            );
        }
        if self.limits.max_message_bytes < MIN_MESSAGE_BYTES {
            problems.push(format!(
                "limits.max_message_bytes must be at least {MIN_MESSAGE_BYTES} (2 MiB): the \
                 pages the node sends (500 pointers of an export, up to 1000 audit records \
                 of a search) must fit in one message"
            ));
        }
        if self.storage.engine == Engine::Postgres && self.storage.postgres.is_none() {
            problems.push(
                "storage.engine = \"postgres\" needs [storage.postgres] with the database's url"
                    .into(),
            );
        }
        if let Some(pg) = &self.storage.postgres {
            if let Err(e) = pg.url.parse::<tokio_postgres::Config>() {
                problems.push(format!("storage.postgres.url: {e}"));
            }
            if pg.pool_size < 2 {
                problems.push("storage.postgres.pool_size must be at least 2".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// The organizations `writer` may write pointers for, itself included.
    pub fn write_scope(&self, writer: &str) -> BTreeSet<String> {
        let mut scope: BTreeSet<String> = self
            .writes_for
            .get(writer)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        scope.insert(writer.to_string());
        scope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        let text = r#"
            region = "helse-vest"
            listen = "127.0.0.1:0"
            data_dir = "data"
            legal_config = "legal-config"
            [tls]
            client_ca = "ca.pem"
            cert = "node.pem"
            key = "node-key.pem"
            [keys]
            pseudonym_key_file = "p.key"
            storage_key_file = "s.key"
            [auth]
            issuer = "https://issuer.example"
            audience = "pil"
            jwks_file = "jwks.json"
            [audit]
            signing_key_file = "audit.pem"
        "#;
        toml::from_str(text).expect("a valid configuration")
    }

    #[test]
    fn validation_reports_every_problem() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.region = "-vest".into();
        c.writes_for.insert("123".into(), vec![]);
        c.limits.max_message_bytes = 1024;
        let err = c.validate().unwrap_err().to_string();
        for part in [
            "region \"-vest\"",
            "writes_for: \"123\"",
            "max_message_bytes",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }

    #[test]
    fn a_toml_mistake_names_its_line_and_column() {
        let text = "region = \"x\"\nlisten = 5\n";
        let e = toml::from_str::<NodeConfig>(text).unwrap_err();
        let message = toml_message(text, &e);
        assert!(message.starts_with("line 2, column"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

/// A peer's summary is trusted this long (5 s) by default.
pub const DEFAULT_STALENESS_BOUND_MS: u64 = 5000;

/// Federation settings of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// The other regions' nodes.
    pub peers: Vec<PeerConfig>,
    /// Longest a lookup waits for peers, in milliseconds; a client's shorter gRPC
    /// deadline wins.
    pub deadline_ms: u64,
    /// Forwarded lookups served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_forwarded: usize,
    /// Consecutive failures that open a peer's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit stays open before one trial call, in milliseconds
    /// (doubling while the peer stays down, up to 60 s).
    pub breaker_cooldown_ms: u64,
    /// A peer's summary older than this (milliseconds since this node asked for it)
    /// is not trusted: the peer is asked about every patient until a newer one comes.
    /// A pointer or protection acknowledged at a peer longer ago than this is found
    /// by every lookup here.
    pub summary_staleness_bound_ms: u64,
    /// How often each peer's summary is brought up to date, in milliseconds (below
    /// the bound, so a summary is renewed before it goes stale).
    pub summary_refresh_ms: u64,
    /// Routing-token evaluations each peer may ask of this region per second (and
    /// twice that at once); more are refused, and that peer asks this region directly.
    pub token_evaluations_per_second: u32,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            deadline_ms: 2000,
            max_concurrent_forwarded: 64,
            breaker_failures: 3,
            breaker_cooldown_ms: 1000,
            summary_staleness_bound_ms: DEFAULT_STALENESS_BOUND_MS,
            summary_refresh_ms: 1000,
            token_evaluations_per_second: 200,
        }
    }
}

/// One peer region's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's region id; its node certificate must carry `urn:pil:node:<region>`.
    pub region: String,
    /// `host:port` of the peer's listener.
    pub address: String,
    /// The DNS name its TLS certificate is checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Purposes of use (e.g. "TREAT", "ETREAT") forwarded to this peer. Empty: all.
    #[serde(default)]
    pub purposes: Vec<String>,
}

fn default_server_name() -> String {
    "localhost".into()
}

/// Where the region's data is kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub engine: Engine,
    /// The database, when `engine = "postgres"`.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

impl StorageConfig {
    /// The embedded default, left out when a configuration is written.
    pub fn is_default(&self) -> bool {
        self.engine == Engine::Rocksdb && self.postgres.is_none()
    }
}

/// A storage engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Embedded, in `data_dir`: one node per region, nothing to install.
    #[default]
    Rocksdb,
    /// A PostgreSQL database that several nodes of a region share.
    Postgres,
}

/// A PostgreSQL database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq connection string or URL, e.g. `host=/run/postgresql dbname=pil user=pil`.
    pub url: String,
    /// Connections this node keeps open.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Longest wait for a connection, in seconds; a database that does not answer
    /// fails requests after this, never hangs them.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// CA certificates (PEM) the server's certificate must chain to. With it the node
    /// speaks TLS to the database; put `sslmode=require` in `url` so that it never
    /// connects without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A file holding the database user's password (mode 0600), kept out of `url` and
    /// of node.toml so that the configuration can be shared and reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

fn default_pool_size() -> usize {
    16
}

fn default_connect_timeout() -> u64 {
    5
}

impl PostgresConfig {
    /// The engine's own view of these settings.
    pub fn engine_config(&self) -> crate::store::postgres::PgConfig {
        crate::store::postgres::PgConfig {
            url: self.url.clone(),
            pool_size: self.pool_size,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs.max(1)),
            ca_file: self.ca_file.clone(),
            password_file: self.password_file.clone(),
        }
    }
}
