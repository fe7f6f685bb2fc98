//! Rotation without downtime: the node's certificate and key, the client CA bundle,
//! the issuer's keys (from a file or fetched from a URL) and the audit signing key,
//! each put in force by a reload, a bad file refused with the old one kept, and every
//! reload in the audit log.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use pil_node::pki::DevCa;
use pil_proto::v1;
use pil_tests::*;
use pil_transparency::{HeadSigner, HeadVerifier};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dev_ca(world: &World) -> DevCa {
    let pki = world.path().join("pki");
    DevCa::from_pem_files(&pki.join("ca.pem"), &pki.join("ca-key.pem")).expect("dev CA")
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

fn first_cert_der(pem_path: &Path) -> Vec<u8> {
    pil_node::pki::load_certs(pem_path).unwrap()[0].to_vec()
}

/// A TLS client presenting `org`'s certificate, trusting `roots`.
fn client_tls(world: &World, org: &str) -> tokio_rustls::TlsConnector {
    let pki = world.path().join("pki");
    let mut roots = rustls::RootCertStore::empty();
    for ca in pil_node::pki::load_certs(&world.ca).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        pil_node::pki::load_certs(&pki.join(format!("org-{org}.pem"))).unwrap(),
        pil_node::pki::load_key(&pki.join(format!("org-{org}-key.pem"))).unwrap(),
    )
    .unwrap();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The certificate (its SHA-256) a fresh connection to the node is served.
async fn served_cert(world: &World, addr: SocketAddr) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = client_tls(world, ORG_A)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    sha256_hex(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref())
}

/// A gRPC channel (TLS made by its connector, so the URI says http) whose every
/// connection records the certificate it was served, so a
/// test can tell whether calls went over a connection made before a reload.
async fn recording_channel(
    world: &World,
    addr: SocketAddr,
) -> (tonic::transport::Channel, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let tls = client_tls(world, ORG_A);
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        let record = record.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let stream = tls.connect("localhost".try_into().unwrap(), tcp).await?;
            let cert = sha256_hex(stream.get_ref().1.peer_certificates().unwrap()[0].as_ref());
            record.lock().unwrap().push(cert);
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://localhost:{}", addr.port()))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .expect("connect");
    (channel, seen)
}

/// A call that needs only the TLS connection to be accepted: the node answers it
/// (refusing the missing token) rather than the connection failing.
async fn reaches_the_node(channel: tonic::transport::Channel) -> bool {
    let mut lookup = v1::lookup_service_client::LookupServiceClient::new(channel);
    match lookup.lookup(lookup_request()).await {
        Err(status) => status.code() == tonic::Code::Unauthenticated,
        Ok(_) => true,
    }
}

fn lookup_request() -> v1::LookupRequest {
    lookup(&patient_id(1))
}

/// The newest `policy_reload` records' details, newest first.
async fn reload_records(world: &World, addr: SocketAddr) -> Vec<(String, String)> {
    let auditor = world.client(HOST, addr).await;
    let page = auditor
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                actions: vec!["policy_reload".into()],
                ..Default::default()
            }),
            page_size: 50,
            page_token: String::new(),
        })
        .await
        .unwrap();
    page.records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r).unwrap();
            (
                v["outcome"]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_serves_new_connections_while_old_ones_finish() {
    let world = World::new();
    let config = world.region_config("vest");
    let node = TestNode::start(config.clone()).await;
    let addr = node.addr();
    let old = sha256_hex(&first_cert_der(&config.tls.cert));
    assert_eq!(served_cert(&world, addr).await, old);
    let (before, seen) = recording_channel(&world, addr).await;
    assert!(reaches_the_node(before.clone()).await);

    // The operator installs a renewed certificate and key and reloads.
    let renewed = dev_ca(&world)
        .issue_node("vest", &["localhost", "127.0.0.1"])
        .unwrap();
    std::fs::write(&config.tls.cert, &renewed.cert_pem).unwrap();
    write_private(&config.tls.key, &renewed.key_pem);
    let operator = world.client(OPERATOR, addr).await;
    let reloaded = operator.reload_legal_config().await.expect("reload");
    let new = sha256_hex(&first_cert_der(&config.tls.cert));
    assert_ne!(new, old);
    assert!(reloaded.detail.contains(&new), "{}", reloaded.detail);

    // New connections get the new certificate; the connection made before the reload
    // goes on serving calls, and no new one was made for them.
    assert_eq!(served_cert(&world, addr).await, new);
    assert!(reaches_the_node(before.clone()).await);
    assert_eq!(*seen.lock().unwrap(), vec![old]);

    // A certificate of another node, a certificate that is not valid for the names
    // clients use, and a file that is no certificate at all are each refused, and the
    // renewed certificate stays in force.
    let other_node = dev_ca(&world)
        .issue_node("nord", &["localhost", "127.0.0.1"])
        .unwrap();
    let wrong_name = dev_ca(&world)
        .issue_node("vest", &["elsewhere.example"])
        .unwrap();
    for (what, cert, key, says) in [
        (
            "another node's",
            other_node.cert_pem.as_str(),
            other_node.key_pem.as_str(),
            "not the node of region vest",
        ),
        (
            "wrong names",
            wrong_name.cert_pem.as_str(),
            wrong_name.key_pem.as_str(),
            "is not valid for",
        ),
        (
            "not a certificate",
            "garbage",
            renewed.key_pem.as_str(),
            "node.pem",
        ),
    ] {
        std::fs::write(&config.tls.cert, cert).unwrap();
        write_private(&config.tls.key, key);
        let err = operator.reload_legal_config().await.expect_err(what);
        assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{what}: {err}");
        assert!(err.to_string().contains(says), "{what}: {err}");
        assert_eq!(served_cert(&world, addr).await, new, "{what}");
    }
    // A key that does not belong to the certificate is refused too.
    std::fs::write(&config.tls.cert, &renewed.cert_pem).unwrap();
    write_private(&config.tls.key, &other_node.key_pem);
    let err = operator
        .reload_legal_config()
        .await
        .expect_err("mismatched key");
    assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{err}");
    assert_eq!(served_cert(&world, addr).await, new);

    // Every reload is in the audit log: the refused ones with their reason.
    let records = reload_records(&world, addr).await;
    assert_eq!(records.len(), 5, "{records:?}");
    assert!(
        records[..4]
            .iter()
            .all(|(status, _)| status == "FAILED_PRECONDITION"),
        "{records:?}"
    );
    assert_eq!(records[4].0, "OK");
    assert!(records[4].1.contains(&new), "{records:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_added_on_reload_lets_its_organizations_in() {
    let world = World::new();
    let mut config = world.region_config("vest");
    // The node's own bundle, so the test can add to it.
    let bundle = world.path().join("client-ca-bundle.pem");
    std::fs::copy(&world.ca, &bundle).unwrap();
    config.tls.client_ca = bundle.clone();
    let node = TestNode::start(config).await;
    let addr = node.addr();

    // An organization whose certificate comes from a CA the node does not trust yet.
    let new_ca = DevCa::generate("Second CA").unwrap();
    let org = new_ca.issue_organization(ORG_C, "Org C").unwrap();
    let (cert, key) = (
        world.path().join("org-c-new.pem"),
        world.path().join("org-c-new-key.pem"),
    );
    std::fs::write(&cert, &org.cert_pem).unwrap();
    write_private(&key, &org.key_pem);
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        std::fs::read(&world.ca).unwrap(),
                    ))
                    .identity(tonic::transport::Identity::from_pem(
                        std::fs::read(&cert).unwrap(),
                        std::fs::read(&key).unwrap(),
                    ))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect_lazy();
        reaches_the_node(channel).await
    })
    .await
    .unwrap();
    assert!(!refused, "an organization of an untrusted CA got in");

    // A bundle that is not PEM is refused and the old bundle stays.
    let operator = world.client(OPERATOR, addr).await;
    let good = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(&bundle, "not a certificate").unwrap();
    let err = operator
        .reload_legal_config()
        .await
        .expect_err("bad bundle");
    assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("client-ca-bundle.pem"), "{err}");

    std::fs::write(&bundle, format!("{good}{}", new_ca.cert_pem())).unwrap();
    let reloaded = operator.reload_legal_config().await.expect("reload");
    assert!(
        reloaded.detail.contains("2 client CA certificate(s)"),
        "{}",
        reloaded.detail
    );
    assert!(reaches_the_node(world.channel_with(addr, &cert, &key).await).await);
    // Organizations of the first CA still get in.
    assert!(reaches_the_node(world.raw_channel(ORG_A, addr).await).await);
    node.stop().await;
}

/// A one-file HTTPS server for the issuer's JWKS, answering whatever `body` holds.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(world: &World, body: String) -> Self {
        let cert = dev_ca(world).issue_node("issuer", &["127.0.0.1"]).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der()], cert.key_der())
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://{}/.well-known/jwks",
            listener.local_addr().unwrap()
        );
        let body = Arc::new(Mutex::new(body));
        let serving = body.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let body = serving.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: public, max-age=1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { url, body, task }
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }
}

/// A lookup with a token signed by `issuer`.
async fn lookup_as(
    world: &World,
    addr: SocketAddr,
    issuer: &pil_auth::dev_issuer::DevIssuer,
) -> Result<(), tonic::Code> {
    let token = doctor_token(issuer).sign().unwrap();
    let client = world.client_with_token(ORG_A, addr, token, None).await;
    client
        .lookup(lookup_request())
        .await
        .map(|_| ())
        .map_err(|e| code(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_published_at_a_url_are_fetched_refreshed_and_kept_for_a_restart() {
    let world = World::new();
    let first = world.issuer();
    let second =
        pil_auth::dev_issuer::DevIssuer::generate(pil_node::demo::DEV_ISSUER, "second-key")
            .unwrap();
    let jwks = |issuers: &[&pil_auth::dev_issuer::DevIssuer]| {
        pil_auth::dev_issuer::DevIssuer::jwks_of(issuers).to_string()
    };
    let server = JwksServer::start(&world, jwks(&[&first])).await;
    let mut config = world.region_config("vest");
    config.auth.jwks_file = None;
    config.auth.jwks_url = Some(server.url.clone());
    config.auth.jwks_ca_file = Some(world.ca.clone());
    config.auth.jwks_refresh_secs = 1;
    let node = TestNode::start(config.clone()).await;
    let addr = node.addr();
    assert_eq!(lookup_as(&world, addr, &first).await, Ok(()));
    assert_eq!(
        lookup_as(&world, addr, &second).await,
        Err(tonic::Code::Unauthenticated)
    );

    // The issuer publishes its next key; the node picks it up on its own.
    server.serve(jwks(&[&first, &second]));
    let mut accepted = false;
    for _ in 0..100 {
        if lookup_as(&world, addr, &second).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the issuer's new key was never put in force");
    let records = reload_records(&world, addr).await;
    assert!(
        records
            .iter()
            .any(|(s, d)| s == "OK" && d.contains("second-key") && d.contains(&server.url)),
        "{records:?}"
    );
    node.stop().await;

    // With the issuer unreachable, the node starts with the copy it fetched last.
    server.task.abort();
    let node = TestNode::start(config).await;
    assert_eq!(lookup_as(&world, node.addr(), &second).await, Ok(()));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_from_a_file_are_reloaded_and_a_bad_file_is_refused() {
    let world = World::new();
    let config = world.region_config("vest");
    let node = TestNode::start(config.clone()).await;
    let addr = node.addr();
    let first = world.issuer();
    let second =
        pil_auth::dev_issuer::DevIssuer::generate(pil_node::demo::DEV_ISSUER, "second-key")
            .unwrap();
    let jwks_file = config.auth.jwks_file.clone().unwrap();
    let operator = world.client(OPERATOR, addr).await;

    std::fs::write(&jwks_file, "{\"keys\": []}").unwrap();
    let err = operator
        .reload_legal_config()
        .await
        .expect_err("empty JWKS");
    assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("jwks.json"), "{err}");
    assert_eq!(lookup_as(&world, addr, &first).await, Ok(()));

    std::fs::write(
        &jwks_file,
        pil_auth::dev_issuer::DevIssuer::jwks_of(&[&second]).to_string(),
    )
    .unwrap();
    let reloaded = operator.reload_legal_config().await.expect("reload");
    assert!(
        reloaded.detail.contains("issuer keys [second-key]"),
        "{}",
        reloaded.detail
    );
    assert_eq!(lookup_as(&world, addr, &second).await, Ok(()));
    assert_eq!(
        lookup_as(&world, addr, &first).await,
        Err(tonic::Code::Unauthenticated)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_key_rotation_verifies_end_to_end() {
    let world = World::new();
    let config = world.region_config("vest");
    let audit_dir = config
        .audit
        .signing_key_file
        .parent()
        .unwrap()
        .to_path_buf();
    let old_public = std::fs::read_to_string(audit_dir.join("public-key.pem")).unwrap();
    let node = TestNode::start(config.clone()).await;
    let addr = node.addr();
    let client = world.client(ORG_A, addr).await;
    client.lookup(lookup_request()).await.unwrap();
    let auditor = world.client(HOST, addr).await;
    auditor.audit_tree_head(true).await.unwrap();

    // The operator puts a new key in place and reloads.
    let fresh = audit_dir.join("next-key.pem");
    let next = HeadSigner::write_new(&fresh).unwrap();
    std::fs::rename(&fresh, &config.audit.signing_key_file).unwrap();
    let operator = world.client(OPERATOR, addr).await;
    let reloaded = operator.reload_legal_config().await.expect("reload");
    let new_id = next.key_id("pil-audit/vest");
    assert!(
        reloaded
            .detail
            .contains(&format!("heads signed by key {new_id} (rotated from")),
        "{}",
        reloaded.detail
    );
    client.lookup(lookup_request()).await.unwrap();
    let newest = auditor.audit_tree_head(true).await.unwrap();

    // The newest head is the new key's, the earlier ones the old key's; the record
    // announcing the new key is covered by a head of the old key.
    let old = HeadVerifier::from_public_key_pem(&old_public).unwrap();
    let history = old.clone().and(&next.verifier());
    assert!(next.verifier().verify_note(&newest.note).is_ok());
    assert!(old.verify_note(&newest.note).is_err());
    let heads = auditor.audit_tree_heads().await.unwrap();
    let announced = reloaded
        .detail
        .split("announced in record ")
        .nth(1)
        .and_then(|r| r.trim_end_matches(')').parse::<u64>().ok())
        .expect("the announcing record's index");
    assert!(
        heads.iter().any(|h| old
            .verify_note(&h.note)
            .is_ok_and(|sth| sth.head.size > announced)),
        "no head of the old key covers the announcement"
    );
    let entries: Vec<v1::LogEntry> = {
        use futures::StreamExt as _;
        auditor
            .audit_read_log(0)
            .await
            .unwrap()
            .map(|e| e.unwrap())
            .collect()
            .await
    };
    let announcement: serde_json::Value =
        serde_json::from_slice(&entries[announced as usize].record).unwrap();
    assert!(
        announcement["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&new_id) && d.contains("BEGIN PUBLIC KEY")),
        "{announcement:#}"
    );

    // The log verifies with the key history, and with neither key alone.
    assert!(pil_client::verify_log(&entries, &heads, &history).is_ok());
    assert!(!pil_client::verify_log(&entries, &heads, &old).is_ok());
    assert!(!pil_client::verify_log(&entries, &heads, &next.verifier()).is_ok());
    // And so does `pil audit verify`, given the history as one file.
    let history_file = world.path().join("audit-key-history.pem");
    std::fs::write(&history_file, history.history_pem().unwrap()).unwrap();
    let out = crate::pil(
        &world.profile(HOST, addr),
        &[
            "audit",
            "verify",
            "--public-key",
            history_file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key file that is not a key is refused, and heads go on with the new key.
    std::fs::write(&config.audit.signing_key_file, "not a key").unwrap();
    let err = operator.reload_legal_config().await.expect_err("bad key");
    assert_eq!(code(&err), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("signing-key.pem"), "{err}");
    client.lookup(lookup_request()).await.unwrap();
    let after = auditor.audit_tree_head(true).await.unwrap();
    assert!(next.verifier().verify_note(&after.note).is_ok());
    node.stop().await;
}
