//! The shared harness of the integration tests: a throwaway PKI, real nodes on
//! 127.0.0.1 with ephemeral ports and RocksDB in temp dirs, and clients per
//! organization. Nodes run in-process ([`TestNode`]) or as child processes
//! ([`ProcessNode`]) when a test must kill one.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pil_client::{PilClient, Profile, v1};
use pil_node::{
    config::{AuditConfig, AuthConfig, KeyConfig, Limits, LogConfig, NodeConfig, TlsConfig},
    demo::{DEV_AUDIENCE, DEV_ISSUER, DevToken},
    patient_keys::write_new_key_file,
    pki::{self, DevCa},
    server::{self, RunningNode},
};
use pil_proto::ident;

/// Organizations of the test world: three ordinary ones and a hosting provider.
pub const ORG_A: &str = "983974724";
pub const ORG_B: &str = "964338531";
pub const ORG_C: &str = "923609016";
/// Writes for [`ORG_C`] under `writes_for`; holds the auditor role.
pub const HOST: &str = "985399077";
/// Holds the operator role in the test legal configuration.
pub const OPERATOR: &str = ORG_B;
/// The HPR number in test tokens.
pub const HPR: &str = "565501872";

/// A test world: PKI, keys and a data directory in one temp dir.
pub struct World {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    /// The PostgreSQL server this world's nodes store in, when the suite runs on that
    /// engine (`PIL_TEST_ENGINE=postgres`); each region gets a database of its own.
    pub postgres: Option<pil_node::test_support::Throwaway>,
}

/// Whether the suite runs on PostgreSQL (`PIL_TEST_ENGINE=postgres`) rather than the
/// default RocksDB.
pub fn on_postgres() -> bool {
    std::env::var("PIL_TEST_ENGINE").is_ok_and(|e| e == "postgres")
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let orgs = [
            (ORG_A, "Org A"),
            (ORG_B, "Org B"),
            (ORG_C, "Org C"),
            (HOST, "Hosting provider"),
        ];
        let files = pki::write_dev_pki(&dir.path().join("pki"), "test", &orgs).expect("dev PKI");
        for k in ["pseudonym.key", "storage.key", "routing.key"] {
            write_new_key_file(&dir.path().join(k)).expect("key file");
        }
        pil_node::demo::write_dev_issuer(&dir.path().join("issuer")).expect("dev issuer");
        pil_node::audit::write_signing_key(&dir.path().join("audit")).expect("audit key");
        pil_legal::write_default(
            &dir.path().join("legal-config"),
            "test",
            &[OPERATOR],
            &[HOST],
        )
        .expect("legal configuration");
        Self {
            ca: files.ca_cert,
            dir,
            postgres: on_postgres().then(pil_node::test_support::Throwaway::start),
        }
    }

    /// Where a node of `region` stores: its own database on this world's server, or
    /// RocksDB in its data directory.
    pub fn storage_for(&self, region: &str) -> pil_node::config::StorageConfig {
        match &self.postgres {
            None => Default::default(),
            Some(pg) => {
                let db = pg.create_migrated_database(region);
                pil_node::config::StorageConfig {
                    engine: pil_node::config::Engine::Postgres,
                    postgres: Some(pil_node::config::PostgresConfig {
                        url: db.url,
                        pool_size: 8,
                        connect_timeout_secs: 5,
                        ca_file: None,
                        password_file: None,
                    }),
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A node configuration for this world; `test_data` lets synthetic identifiers in.
    pub fn config(&self, test_data: bool) -> NodeConfig {
        let pki = self.path().join("pki");
        NodeConfig {
            region: "test".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.path().join("data"),
            storage: self.storage_for("test"),
            test_data,
            legal_config: self.path().join("legal-config"),
            auth: AuthConfig {
                issuer: DEV_ISSUER.into(),
                audience: DEV_AUDIENCE.into(),
                required_scope: "pil:lookup".into(),
                jwks_file: Some(self.path().join("issuer").join("jwks.json")),
                jwks_url: None,
                jwks_ca_file: None,
                jwks_refresh_secs: pil_node::config::DEFAULT_JWKS_REFRESH_SECS,
                leeway_secs: 5,
                require_dpop: false,
                public_url: None,
                dpop_replay_capacity: pil_node::config::DEFAULT_DPOP_REPLAY_CAPACITY,
                token_cache: pil_node::config::DEFAULT_TOKEN_CACHE,
            },
            tls: TlsConfig {
                client_ca: self.ca.clone(),
                cert: pki.join("node.pem"),
                key: pki.join("node-key.pem"),
            },
            keys: KeyConfig {
                pseudonym_key_file: self.path().join("pseudonym.key"),
                storage_key_file: self.path().join("storage.key"),
                routing_key_file: None,
            },
            audit: AuditConfig {
                signing_key_file: self.path().join("audit").join("signing-key.pem"),
                sign_interval_secs: 1,
                retention_interval_secs: 3600,
                witnesses: Vec::new(),
                witness_quorum: None,
            },
            federation: Default::default(),
            writes_for: [(HOST.to_string(), vec![ORG_C.to_string()])].into(),
            limits: Limits {
                purge_interval_secs: 1,
                ..Limits::default()
            },
            log: LogConfig::default(),
            metrics: Default::default(),
            witness: None,
            source: None,
        }
    }

    /// A node configuration for `region` in this world: its own node certificate,
    /// keys, legal configuration, audit key and data, sharing the CA, the token issuer
    /// and the organizations' certificates.
    pub fn region_config(&self, region: &str) -> NodeConfig {
        let dir = self.path().join("regions").join(region);
        std::fs::create_dir_all(&dir).expect("region dir");
        let pki = self.path().join("pki");
        let ca = pki::DevCa::from_pem_files(&pki.join("ca.pem"), &pki.join("ca-key.pem"))
            .expect("dev CA");
        let node = ca
            .issue_node(region, &["localhost", "127.0.0.1"])
            .expect("node certificate");
        std::fs::write(dir.join("node.pem"), &node.cert_pem).unwrap();
        write_private(&dir.join("node-key.pem"), &node.key_pem);
        for k in ["pseudonym.key", "storage.key", "routing.key"] {
            if !dir.join(k).exists() {
                write_new_key_file(&dir.join(k)).expect("key file");
            }
        }
        pil_legal::write_default(&dir.join("legal-config"), region, &[OPERATOR], &[HOST])
            .expect("legal configuration");
        pil_node::audit::write_signing_key(&dir.join("audit")).expect("audit key");
        let mut config = self.config(true);
        config.region = region.into();
        config.data_dir = dir.join("data");
        config.storage = self.storage_for(region);
        config.legal_config = dir.join("legal-config");
        config.tls.cert = dir.join("node.pem");
        config.tls.key = dir.join("node-key.pem");
        config.keys.pseudonym_key_file = dir.join("pseudonym.key");
        config.keys.storage_key_file = dir.join("storage.key");
        config.audit.signing_key_file = dir.join("audit").join("signing-key.pem");
        config
    }

    /// [`World::region_config`] for a region that publishes a routing summary (its own
    /// routing key), trusted by its peers for `bound_ms`.
    pub fn routed_region_config(&self, region: &str, bound_ms: u64) -> NodeConfig {
        let mut config = self.region_config(region);
        config.keys.routing_key_file =
            Some(self.path().join("regions").join(region).join("routing.key"));
        config.federation.summary_staleness_bound_ms = bound_ms;
        config.federation.summary_refresh_ms = (bound_ms / 4).max(50);
        config
    }

    /// A client profile file for `org` against `addr`.
    pub fn profile(&self, org: &str, addr: SocketAddr) -> PathBuf {
        let pki = self.path().join("pki");
        let path = self
            .path()
            .join(format!("profile-{org}-{}.toml", addr.port()));
        let token = DevToken {
            issuer_key: self.path().join("issuer").join("issuer-key.pem"),
            organization: org.to_string(),
            hpr: HPR.into(),
            profession: "LE".into(),
        };
        let text = pil_node::demo::profile_toml(
            addr,
            &pki.join(format!("org-{org}.pem")),
            &pki.join(format!("org-{org}-key.pem")),
            &self.ca,
        ) + &token.toml();
        std::fs::write(&path, text).expect("write profile");
        path
    }

    /// A connected client for `org`.
    pub async fn client(&self, org: &str, addr: SocketAddr) -> PilClient {
        let profile = Profile::load(&self.profile(org, addr)).expect("profile");
        PilClient::connect(&profile).await.expect("connect")
    }

    /// The world's development token issuer.
    pub fn issuer(&self) -> pil_auth::dev_issuer::DevIssuer {
        pil_auth::dev_issuer::DevIssuer::load(
            DEV_ISSUER,
            pil_node::demo::DEV_KID,
            self.path().join("issuer").join("issuer-key.pem"),
        )
        .expect("dev issuer")
    }

    /// A client for `org` whose development tokens are adjusted by `f`.
    pub async fn client_as(
        &self,
        org: &str,
        addr: SocketAddr,
        f: impl FnOnce(&mut pil_client::DevTokenParams),
    ) -> PilClient {
        let profile = Profile::load(&self.profile(org, addr)).expect("profile");
        let credentials = pil_client::Credentials::dev(profile.token.as_ref().expect("token"))
            .expect("credentials")
            .adjust(f);
        PilClient::connect(&profile)
            .await
            .expect("connect")
            .with_credentials(credentials)
    }

    /// A client for `org` that sends exactly `token` (and `dpop` as its proof key).
    pub async fn client_with_token(
        &self,
        org: &str,
        addr: SocketAddr,
        token: String,
        dpop: Option<pil_auth::dev_issuer::DpopKey>,
    ) -> PilClient {
        let profile = Profile::load(&self.profile(org, addr)).expect("profile");
        PilClient::connect(&profile)
            .await
            .expect("connect")
            .with_credentials(pil_client::Credentials::Token { token, dpop })
    }

    /// Issues an extra certificate from a *different* CA, for refusal tests.
    /// A bare mTLS channel as organization `org`, for hand-made requests.
    pub async fn raw_channel(&self, org: &str, addr: SocketAddr) -> tonic::transport::Channel {
        let pki = self.path().join("pki");
        self.channel_with(
            addr,
            pki.join(format!("org-{org}.pem")),
            pki.join(format!("org-{org}-key.pem")),
        )
        .await
    }

    /// A bare mTLS channel as organization `org` to `addr` whose requests name
    /// `authority` (host:port) as the node called, as a hand-made HTTP/2 client can.
    pub async fn raw_channel_addressed(
        &self,
        org: &str,
        addr: SocketAddr,
        authority: &str,
    ) -> tonic::transport::Channel {
        let pki = self.path().join("pki");
        self.channel_to(
            addr,
            Some(authority),
            pki.join(format!("org-{org}.pem")),
            pki.join(format!("org-{org}-key.pem")),
        )
        .await
    }

    /// A bare mTLS channel presenting the given certificate and key.
    pub async fn channel_with(
        &self,
        addr: SocketAddr,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> tonic::transport::Channel {
        self.channel_to(addr, None, cert, key).await
    }

    async fn channel_to(
        &self,
        addr: SocketAddr,
        authority: Option<&str>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ))
            .domain_name("localhost");
        let mut endpoint = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        if let Some(authority) = authority {
            endpoint = endpoint.origin(format!("https://{authority}").parse().unwrap());
        }
        endpoint.connect().await.expect("connect")
    }

    pub fn foreign_org_profile(&self, addr: SocketAddr) -> PathBuf {
        let foreign = DevCa::generate("Foreign CA").expect("foreign CA");
        let cert = foreign
            .issue_organization(ORG_A, "Impostor")
            .expect("issue");
        let dir = self.path().join("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("org.pem"), &cert.cert_pem).unwrap();
        write_private(&dir.join("org-key.pem"), &cert.key_pem);
        let path = dir.join("profile.toml");
        let text = pil_node::demo::profile_toml(
            addr,
            &dir.join("org.pem"),
            &dir.join("org-key.pem"),
            &self.ca,
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes a secret (a private key) readable by its owner only, as the node demands.
pub fn write_private(path: &Path, contents: &str) {
    std::fs::write(path, contents).expect("write secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }
}

/// A peer entry for a node of `region` listening on `addr`.
pub fn peer(region: &str, addr: SocketAddr) -> pil_node::config::PeerConfig {
    pil_node::config::PeerConfig {
        region: region.into(),
        address: addr.to_string(),
        server_name: "localhost".into(),
        purposes: Vec::new(),
    }
}

/// Federates `nodes` (region, node) with each other, every one with every other.
pub fn federate(nodes: &[(&str, &TestNode)]) {
    for (region, node) in nodes {
        let mut config = node.node.federation().config().as_ref().clone();
        config.peers = nodes
            .iter()
            .filter(|(r, _)| r != region)
            .map(|(r, n)| peer(r, n.addr()))
            .collect();
        node.node.federation().set(&config).expect("peers");
    }
}

/// Several regions' in-process nodes, federated every one with every other.
pub struct Regions {
    nodes: Vec<(String, TestNode)>,
}

impl Regions {
    /// Starts a node for each of `regions` with `world`'s configuration for it, as
    /// `adjust` changes it, and federates them.
    pub async fn start(
        world: &World,
        regions: &[&str],
        mut adjust: impl FnMut(&str, &mut NodeConfig),
    ) -> Self {
        let mut nodes = Vec::with_capacity(regions.len());
        for region in regions {
            let mut config = world.region_config(region);
            adjust(region, &mut config);
            nodes.push((region.to_string(), TestNode::start(config).await));
        }
        let pairs: Vec<(&str, &TestNode)> = nodes.iter().map(|(r, n)| (r.as_str(), n)).collect();
        federate(&pairs);
        Self { nodes }
    }

    /// The node of `region`.
    pub fn node(&self, region: &str) -> &TestNode {
        self.nodes
            .iter()
            .find(|(r, _)| r == region)
            .map(|(_, n)| n)
            .unwrap_or_else(|| panic!("no node for {region}"))
    }

    /// Stops every node cleanly.
    pub async fn stop(self) {
        for (_, node) in self.nodes {
            node.stop().await;
        }
    }
}

/// An in-process node. Dropping it (a test that fails before stopping it) drops its
/// stop signal: the node stops accepting and shuts down on the test's runtime.
pub struct TestNode {
    pub node: RunningNode,
}

impl TestNode {
    pub async fn start(config: NodeConfig) -> Self {
        Self {
            node: server::start(config).await.expect("node starts"),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.node.addr()
    }

    pub async fn stop(self) {
        self.node.shutdown().await.expect("clean shutdown");
    }
}

/// A node as a child process running the real `pil-node serve`, logging JSON to a file.
pub struct ProcessNode {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl ProcessNode {
    /// Starts `pil-node serve --config <file>` and waits until it listens.
    pub fn start(config: &NodeConfig, dir: &Path) -> Self {
        let config_path = dir.join("node.toml");
        std::fs::write(&config_path, toml_of(config)).expect("write config");
        let mut child = Command::new(sibling_binary("pil-test-node"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pil-node");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("node serving")
                    && let Some(addr) = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["fields"]["addr"].as_str().map(String::from))
                {
                    let _ = tx.send(addr);
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("node did not start; log:\n{}", log.lock().unwrap()));
        Self {
            child,
            addr: addr.parse().expect("address"),
            log,
        }
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name, e.g. `HUP`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary of this package, next to the running test executable's `deps/` directory.
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} not built", path.display());
    path
}

fn toml_of(config: &NodeConfig) -> String {
    toml::to_string_pretty(config).expect("configuration serializes")
}

/// `pil-node <args>` as the operator runs it, off the test's async threads.
pub async fn pil_node<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(sibling_binary("pil-test-node"))
            .args(&args)
            .output()
            .expect("run pil-node")
    })
    .await
    .expect("the pil-node run's task")
}

/// What a command printed, stdout then stderr.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A valid synthetic fødselsnummer, distinct per seed.
pub fn patient_id(seed: u64) -> v1::PatientIdentifier {
    v1::PatientIdentifier {
        system: ident::SYSTEM_FNR.into(),
        value: ident::synthetic_fnr(seed),
    }
}

/// A valid pointer for `patient` at `org`'s endpoint `n`.
pub fn pointer(
    patient: &v1::PatientIdentifier,
    org: &str,
    n: u32,
    categories: &[&str],
) -> v1::Pointer {
    v1::Pointer {
        patient: Some(patient.clone()),
        holder: Some(v1::Organization {
            organization_number: org.into(),
            sub_unit_organization_number: String::new(),
            name: format!("Org {org}"),
        }),
        endpoint: Some(v1::Endpoint {
            base_url: format!("https://fhir{n}.org{org}.example/r4"),
            api_kind: v1::ApiKind::FhirR4 as i32,
        }),
        categories: categories.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

/// A lookup request for all of a patient's pointers.
pub fn lookup(patient: &v1::PatientIdentifier) -> v1::LookupRequest {
    v1::LookupRequest {
        patient: Some(patient.clone()),
        ..Default::default()
    }
}

/// The gRPC code of a failed client call.
pub fn code(e: &pil_client::ClientError) -> tonic::Code {
    match e {
        pil_client::ClientError::Status(s) => s.code(),
        other => panic!("expected a status, got {other}"),
    }
}

/// The token most tests' requesters carry: [`ORG_A`]'s doctor ([`HPR`], profession `LE`)
/// with a documented care relationship, for this node's audience and scope. Tests
/// change one claim from here.
pub fn doctor_token(
    issuer: &pil_auth::dev_issuer::DevIssuer,
) -> pil_auth::dev_issuer::TokenBuilder<'_> {
    issuer
        .token()
        .audience(pil_node::demo::DEV_AUDIENCE)
        .scope("pil:lookup")
        .org_parent(ORG_A)
        .hpr_number(HPR)
        .profession("LE")
        .decision_ref("d", false)
}

/// The directory of the package under test, read when the test runs: the path
/// compiled into a test binary is that of the checkout that built it, and cargo reuses
/// test binaries across checkouts that share a target directory.
pub fn package_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
}

/// Sync options for [`ORG_A`]'s own pointers.
pub fn sync_options(
    mode: v1::SyncMode,
    scope: v1::ReplaceScope,
    all_or_nothing: bool,
) -> pil_client::SyncOptions {
    pil_client::SyncOptions {
        organization_number: ORG_A.into(),
        mode,
        scope,
        all_or_nothing,
    }
}

/// A Python with a test's packages: `$env_var` when set and present, else the venv
/// `~/.cache/<venv>` (which `.ci/setup` makes), made here with `setup` if missing.
pub fn python_venv(env_var: &str, venv: &str, setup: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).map(PathBuf::from)
        && p.exists()
    {
        return p;
    }
    let home = std::env::var_os("HOME").expect("HOME");
    let venv = PathBuf::from(home).join(".cache").join(venv);
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let out = Command::new("bash")
            .arg(setup)
            .arg(&venv)
            .output()
            .expect("run setup-venv.sh");
        assert!(
            out.status.success(),
            "could not make the venv {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}

/// A port free on loopback now, for a listener a configuration must name before the
/// node starts.
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// A base port with the two after it free too (the demo's three regions).
pub fn three_free_ports() -> u16 {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base < 65000
            && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

/// A running `pil-node demo`: three federated regions in `dir`, stopped on drop.
pub struct Demo {
    child: Child,
    /// Everything the demo printed before it started serving.
    pub printed: Vec<String>,
}

impl Demo {
    /// Starts the demo with `--dir dir` from `cwd`, and waits until it serves.
    pub fn start(cwd: &Path, dir: &str, patients: u32) -> Self {
        let base = three_free_ports();
        let mut child = Command::new(sibling_binary("pil-test-node"))
            .args(["demo", "--patients", &patients.to_string(), "--dir", dir])
            .arg("--listen")
            .arg(format!("127.0.0.1:{base}"))
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pil-node demo");
        let stdout = child.stdout.take().expect("stdout");
        let mut printed = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("demo output");
            if line.contains("Press ctrl-c") {
                break;
            }
            printed.push(line);
        }
        Self { child, printed }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET <path>` over plain HTTP/1.1: the status line and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: monitor\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// A subscription of `client` following `patients`, every category.
pub async fn subscribe(
    client: &PilClient,
    patients: &[&v1::PatientIdentifier],
) -> v1::Subscription {
    client
        .subscribe(v1::SubscribeRequest {
            patients: patients.iter().map(|p| (*p).clone()).collect(),
            ..Default::default()
        })
        .await
        .expect("subscribed")
        .subscription
        .expect("subscription")
}

/// The events after `after` until the subscription has `until`, pulling as a consumer
/// does (a delivery that waits for a region is retried).
pub async fn pull_until(gp: &PilClient, id: &str, after: u64, until: u64) -> Vec<v1::Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got: Vec<v1::Event> = Vec::new();
    let mut position = after;
    while position < until {
        assert!(
            Instant::now() < deadline,
            "events after {position} did not arrive; got {:?}",
            summary(&got)
        );
        match gp.pull_events(id, position, 100).await {
            Ok(page) => {
                if let Some(last) = page.events.last() {
                    position = last.number;
                }
                got.extend(page.events);
            }
            Err(e) if code(&e) == tonic::Code::Unavailable => {}
            Err(e) => panic!("pull: {e}"),
        }
        if position < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    got
}

/// Each event's number, region and kind, for messages.
pub fn summary(events: &[v1::Event]) -> Vec<(u64, String, v1::EventKind)> {
    events
        .iter()
        .map(|e| {
            (
                e.number,
                e.region.clone(),
                v1::EventKind::try_from(e.kind).unwrap(),
            )
        })
        .collect()
}
