//! The node's only listener: TLS 1.3 with a required client certificate.
//!
//! Handshakes run in their own tasks with a timeout, so a slow or hostile client
//! cannot hold up others. The caller's identity is read from its certificate once per
//! connection and attached to every request on it as [`PeerInfo`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{ServerConfig, server::WebPkiClientVerifier};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    config::TlsConfig,
    identity::{Caller, caller_from_cert},
    in_force::InForce,
    pki::{self, PkiError},
};

/// Who is at the other end of a connection, as a request extension.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The identity in the client certificate, or why none could be read.
    pub caller: Result<Caller, String>,
}

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// Builds the server's rustls configuration: TLS 1.3 only, client certificates
/// required and verified against `client_ca`, HTTP/2 only.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&tls.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Rustls(format!("client CA {}: {e}", tls.client_ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki::load_certs(&tls.cert)?, pki::load_key(&tls.key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server's TLS configuration in force, with what it holds. A reload swaps it:
/// new connections handshake with the new certificate and CA bundle, established
/// ones keep theirs.
#[derive(Clone)]
pub struct ServerTls(Arc<InForce<(Arc<ServerConfig>, TlsSummary)>>);

impl ServerTls {
    pub fn new(config: Arc<ServerConfig>, summary: TlsSummary) -> Self {
        Self(Arc::new(InForce::new((config, summary))))
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.0.get().0.clone()
    }

    /// The certificate and CA bundle in force.
    pub fn summary(&self) -> TlsSummary {
        self.0.get().1.clone()
    }

    /// Puts a checked configuration in force for the next handshakes.
    pub fn install(&self, fresh: Arc<ServerConfig>, summary: TlsSummary) {
        self.0.set((fresh, summary));
    }
}

/// What a reload is about to put in force, as the audit record and operator see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSummary {
    /// SHA-256 of the node certificate (DER), hex.
    pub cert_sha256: String,
    /// The certificate's notAfter, RFC 3339.
    pub not_after: String,
    /// Certificates in the client CA bundle.
    pub client_cas: usize,
}

/// Loads the TLS files of a running node of `region` for a reload: the server
/// configuration they make, refused unless the certificate is this node's
/// (`urn:pil:node:<region>`), still carries every name in `names` and is valid now.
pub fn reload_config(
    tls: &TlsConfig,
    region: &str,
    names: &[String],
) -> Result<(Arc<ServerConfig>, TlsSummary), TlsError> {
    let config = server_config(tls)?;
    let certs = pki::load_certs(&tls.cert)?;
    let first = certs.first().map(|c| c.as_ref()).unwrap_or_default();
    let bad =
        |why: String| TlsError::Rustls(format!("node certificate {}: {why}", tls.cert.display()));
    match caller_from_cert(first) {
        Ok(Caller::Node { region: r }) if r == region => {}
        Ok(other) => {
            return Err(bad(format!(
                "it identifies {other:?}, not the node of region {region}"
            )));
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let have = crate::identity::host_names(first).map_err(|e| bad(e.to_string()))?;
    if let Some(missing) = names.iter().find(|n| !have.contains(n)) {
        return Err(bad(format!(
            "it is not valid for {missing}, a name clients address this node by"
        )));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(first).map_err(|e| bad(e.to_string()))?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(bad(format!(
            "it is valid only from {} to {}",
            validity.not_before, validity.not_after
        )));
    }
    Ok((config, summarize(first, &parsed, tls)?))
}

/// The node certificate and client CA bundle in `tls`, as status and audit show them.
pub fn summary(tls: &TlsConfig) -> Result<TlsSummary, TlsError> {
    let certs = pki::load_certs(&tls.cert)?;
    let first = certs.first().map(|c| c.as_ref()).unwrap_or_default();
    let (_, parsed) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| TlsError::Rustls(format!("node certificate {}: {e}", tls.cert.display())))?;
    summarize(first, &parsed, tls)
}

fn summarize(
    der: &[u8],
    cert: &x509_parser::certificate::X509Certificate<'_>,
    tls: &TlsConfig,
) -> Result<TlsSummary, TlsError> {
    use sha2::Digest as _;
    let at = cert.validity().not_after;
    Ok(TlsSummary {
        cert_sha256: hex::encode(sha2::Sha256::digest(der)),
        not_after: at
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| at.to_string()),
        client_cas: pki::load_certs(&tls.client_ca)?.len(),
    })
}

/// The DNS names and IP addresses in the node's own certificate: the names clients
/// may address it by.
pub fn own_host_names(tls: &TlsConfig) -> Result<Vec<String>, TlsError> {
    let certs = pki::load_certs(&tls.cert)?;
    let first = certs.first().map(|c| c.as_ref()).unwrap_or_default();
    crate::identity::host_names(first)
        .map_err(|e| TlsError::Rustls(format!("node certificate {}: {e}", tls.cert.display())))
}

/// The client side of node-to-node calls: TLS 1.3, this node's certificate as client
/// certificate, and the peer's certificate verified against `client_ca` *and* required
/// to be the node certificate of `region` (URI SAN `urn:pil:node:<region>`), so a
/// certificate for the right DNS name but another identity is refused.
pub fn peer_client_config(
    tls: &TlsConfig,
    region: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&tls.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Rustls(format!("CA {}: {e}", tls.client_ca.display())))?;
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier {
            inner,
            region: region.to_string(),
        }))
        .with_client_auth_cert(pki::load_certs(&tls.cert)?, pki::load_key(&tls.key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Web PKI verification plus the peer's node identity.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    region: String,
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match caller_from_cert(end_entity.as_ref()) {
            Ok(Caller::Node { region }) if region == self.region => Ok(verified),
            Ok(other) => Err(rustls::Error::General(format!(
                "peer presented {other:?}, not the node certificate of region {}",
                self.region
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "peer certificate has no node identity: {e}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS connection carrying its peer's identity. Once the node cuts its connections
/// (a client kept one open past the shutdown grace period), every read and write
/// fails, so the connection's task ends and lets go of the node.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    _slot: Slot,
}

/// The connections open at once, against `[limits] max_connections`.
#[derive(Clone)]
pub struct ConnectionLimit {
    open: Arc<tokio::sync::Semaphore>,
    max: usize,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ConnectionLimit {
    pub fn new(max: usize, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            open: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            metrics,
        }
    }

    /// A slot for one more connection, unless all are taken (then counted).
    fn take(&self) -> Option<Slot> {
        match self.open.clone().try_acquire_owned() {
            Ok(permit) => {
                self.report();
                Some(Slot {
                    permit: Some(permit),
                    limit: self.clone(),
                })
            }
            Err(_) => {
                self.metrics.connection_refused();
                None
            }
        }
    }

    fn report(&self) {
        self.metrics
            .connections(self.max - self.open.available_permits());
    }
}

/// One connection's place under the limit, given back when the connection goes.
struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    limit: ConnectionLimit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.limit.report();
    }
}

impl TlsConn {
    fn cut_off(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        self.cut.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the node is stopping",
            )
        })
    }
}

/// Completes once `cut` turns true (or its sender is gone).
async fn cut_signal(mut cut: watch::Receiver<bool>) {
    let _ = cut.wait_for(|c| *c).await;
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.cut_off(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut_off(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.cut_off(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut_off(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener`, completes TLS handshakes in the background,
/// and yields the established connections. Stops when the returned stream is dropped;
/// every connection fails once `cut` turns true.
pub fn incoming(
    listener: TcpListener,
    config: ServerTls,
    handshake_timeout: Duration,
    limit: ConnectionLimit,
    cut: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Over the limit, the connection is closed before any TLS work.
            let Some(slot) = limit.take() else {
                tracing::debug!(%remote, "connection refused: too many open");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let caller = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .ok_or_else(|| "no client certificate".to_string())
                            .and_then(|cert| caller_from_cert(cert).map_err(|e| e.to_string()));
                        let info = PeerInfo { remote, caller };
                        let cut = Box::pin(cut_signal(cut));
                        let conn = TlsConn {
                            stream,
                            info,
                            cut,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
