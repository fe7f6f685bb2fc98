//! One HTTP/1.1 request to a service outside the federation's gRPC: the token issuer's
//! published keys, a witness's `add-checkpoint`. `https://` goes over TLS with the
//! given trust roots; `http://` only where the protocol's own signatures carry the
//! trust (a witness).

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use tokio::net::TcpStream;

/// An answer: status, headers and a body read up to the caller's limit.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// A header's value as text.
    pub fn header(&self, name: http::header::HeaderName) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Sends one request to `url` and reads at most `limit` bytes of the answer. `tls` is
/// needed for `https://` URLs. The error says what failed, for a log line.
pub async fn send(
    method: http::Method,
    url: &url::Url,
    tls: Option<&tokio_rustls::TlsConnector>,
    headers: &[(http::header::HeaderName, &str)],
    body: Bytes,
    limit: usize,
) -> Result<Answer, String> {
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("the URL has no host".into()),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut request = http::Request::builder()
        .method(method)
        .uri(&url[url::Position::BeforePath..])
        .header(
            http::header::HOST,
            &url[url::Position::BeforeHost..url::Position::AfterPort],
        );
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| format!("HTTP request: {e}"))?;
    let response = match url.scheme() {
        "https" => {
            let tls = tls.ok_or("no TLS configuration for an https:// URL")?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} is not a server name: {e}"))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(stream, request).await?
        }
        "http" => exchange(tcp, request).await?,
        other => return Err(format!("unsupported URL scheme {other:?}")),
    };
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| format!("reading the answer (at most {limit} bytes): {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn exchange<S>(
    stream: S,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}

/// TLS 1.2 or 1.3 to a server, trusting `ca_file` or the system's trust store; the
/// error says which setting to give when neither has a CA.
pub fn client_tls(
    ca_file: Option<&Path>,
    setting: &str,
) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for ca in crate::pki::load_certs(path).map_err(|e| e.to_string())? {
                roots
                    .add(ca)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(format!(
                    "the system trust store holds no CA certificates; set {setting}"
                ));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
