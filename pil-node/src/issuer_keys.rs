//! The token issuer's signing keys: a JWKS file, or the JWKS the issuer publishes at
//! a URL (as HelseID publishes its keys), fetched with HTTP caching.
//!
//! A fetched copy is kept in the data directory, so a node starts while the issuer
//! is unreachable; a refresh that fails keeps the keys in force. Issuers publish a
//! new key before signing with it, so refreshing every few minutes is enough.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use bytes::Bytes;
use pil_auth::verify::Jwks;

use crate::{config::AuthConfig, http_client::Answer};

/// Most bytes of a JWKS document fetched from the issuer.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest `max-age` honoured, so an issuer cannot make the node poll it hard.
const MIN_MAX_AGE: Duration = Duration::from_secs(10);
/// The fetched copy's name in the data directory.
const CACHE_FILE: &str = "issuer-jwks.json";

/// Why the issuer's keys could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeysError {
    #[error("issuer keys {path}: {reason}")]
    File { path: String, reason: String },
    #[error("issuer keys from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("issuer keys: {0}")]
    Setup(String),
}

/// Where the keys come from, and what is remembered between fetches.
pub struct IssuerKeys {
    source: Source,
}

enum Source {
    File(PathBuf),
    Url(Box<Fetcher>),
}

struct Fetcher {
    url: url::Url,
    tls: tokio_rustls::TlsConnector,
    cache: PathBuf,
    refresh: Duration,
    /// The last good answer's validator and keys, for `If-None-Match`.
    last: Mutex<Option<(String, Jwks)>>,
}

/// Keys read or fetched, and when to look again.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub jwks: Jwks,
    /// Where they came from, for logs and the reload's audit record.
    pub origin: String,
    /// When to fetch again (URL sources only).
    pub next_fetch: Option<Duration>,
}

impl IssuerKeys {
    /// The source `auth` names; a fetched copy is kept under `data_dir`.
    pub fn new(auth: &AuthConfig, data_dir: &Path) -> Result<Self, KeysError> {
        let source = match (&auth.jwks_file, &auth.jwks_url) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(url)) => {
                let url = url::Url::parse(url).map_err(|e| KeysError::Fetch {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
                Source::Url(Box::new(Fetcher {
                    tls: client_tls(auth.jwks_ca_file.as_deref())?,
                    url,
                    cache: data_dir.join(CACHE_FILE),
                    refresh: Duration::from_secs(auth.jwks_refresh_secs.max(1)),
                    last: Mutex::new(None),
                }))
            }
            (None, None) => return Err(KeysError::Setup("no jwks_file or jwks_url".into())),
        };
        Ok(Self { source })
    }

    /// Reads the file or fetches the URL now: what a reload puts in force.
    pub async fn load(&self) -> Result<Loaded, KeysError> {
        match &self.source {
            Source::File(path) => Ok(Loaded {
                jwks: Jwks::from_file(path).map_err(|e| KeysError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?,
                origin: path.display().to_string(),
                next_fetch: None,
            }),
            Source::Url(fetcher) => fetcher.fetch().await,
        }
    }

    /// At start: as [`IssuerKeys::load`], but an issuer that cannot be reached is
    /// replaced by the copy fetched last time, if there is one.
    pub async fn load_at_start(&self) -> Result<Loaded, KeysError> {
        let fetched = self.load().await;
        let Source::Url(fetcher) = &self.source else {
            return fetched;
        };
        match fetched {
            Ok(loaded) => Ok(loaded),
            Err(error) => {
                let cached = std::fs::read_to_string(&fetcher.cache)
                    .ok()
                    .and_then(|text| Jwks::from_json(&text).ok());
                match cached {
                    Some(jwks) => {
                        tracing::warn!(%error, cache = %fetcher.cache.display(),
                            "the issuer's keys could not be fetched; starting with the copy fetched last time");
                        Ok(Loaded {
                            jwks,
                            origin: format!(
                                "{} (the copy fetched last time)",
                                fetcher.cache.display()
                            ),
                            next_fetch: Some(MIN_MAX_AGE),
                        })
                    }
                    None => Err(KeysError::Fetch {
                        url: fetcher.url.to_string(),
                        reason: format!(
                            "{error}; and there is no copy fetched earlier at {}",
                            fetcher.cache.display()
                        ),
                    }),
                }
            }
        }
    }

    /// Whether the keys are fetched, and so refreshed while the node runs.
    pub fn is_fetched(&self) -> bool {
        matches!(self.source, Source::Url(_))
    }
}

impl Fetcher {
    async fn fetch(&self) -> Result<Loaded, KeysError> {
        let failed = |reason: String| KeysError::Fetch {
            url: self.url.to_string(),
            reason,
        };
        let etag = self
            .last
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|(tag, _)| tag.clone()));
        let answer =
            tokio::time::timeout(FETCH_TIMEOUT, get(&self.url, &self.tls, etag.as_deref()))
                .await
                .map_err(|_| failed(format!("no answer within {FETCH_TIMEOUT:?}")))?
                .map_err(failed)?;
        let next_fetch = Some(
            answer
                .header(http::header::CACHE_CONTROL)
                .and_then(|cc| max_age(&cc))
                .map_or(self.refresh, |age| age.max(MIN_MAX_AGE).min(self.refresh)),
        );
        let origin = self.url.to_string();
        if answer.status == http::StatusCode::NOT_MODIFIED
            && let Some((_, jwks)) = self.last.lock().ok().and_then(|l| l.clone())
        {
            return Ok(Loaded {
                jwks,
                origin,
                next_fetch,
            });
        }
        if answer.status != http::StatusCode::OK {
            return Err(failed(format!("the issuer answered {}", answer.status)));
        }
        let text = String::from_utf8(answer.body.to_vec())
            .map_err(|_| failed("the answer is not UTF-8".into()))?;
        let jwks = Jwks::from_json(&text).map_err(|e| failed(e.to_string()))?;
        if let Err(e) = write_cache(&self.cache, &text) {
            tracing::warn!(error = %e, cache = %self.cache.display(), "cannot keep a copy of the issuer's keys");
        }
        if let Ok(mut last) = self.last.lock() {
            *last = answer
                .header(http::header::ETAG)
                .map(|tag| (tag, jwks.clone()));
        }
        Ok(Loaded {
            jwks,
            origin,
            next_fetch,
        })
    }
}

/// Replaces the kept copy atomically, so a crash leaves the old or the new one.
fn write_cache(path: &Path, text: &str) -> std::io::Result<()> {
    let fresh = path.with_extension("json.new");
    std::fs::write(&fresh, text)?;
    std::fs::File::open(&fresh)?.sync_all()?;
    std::fs::rename(&fresh, path)
}

/// One GET of the issuer's JWKS, conditional on the last validator.
async fn get(
    url: &url::Url,
    tls: &tokio_rustls::TlsConnector,
    etag: Option<&str>,
) -> Result<Answer, String> {
    let mut headers = vec![(
        http::header::ACCEPT,
        "application/json, application/jwk-set+json",
    )];
    if let Some(tag) = etag {
        headers.push((http::header::IF_NONE_MATCH, tag));
    }
    crate::http_client::send(
        http::Method::GET,
        url,
        Some(tls),
        &headers,
        Bytes::new(),
        MAX_JWKS_BYTES,
    )
    .await
}

/// `max-age` of a `Cache-Control` header; `no-cache` and `no-store` count as 0.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').map(str::trim).find_map(|d| {
        let d = d.to_ascii_lowercase();
        if d == "no-cache" || d == "no-store" {
            return Some(Duration::ZERO);
        }
        d.strip_prefix("max-age=")
            .and_then(|n| n.trim_matches('"').parse().ok())
            .map(Duration::from_secs)
    })
}

/// TLS to the issuer, trusting `ca_file` or the system's trust store.
fn client_tls(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, KeysError> {
    crate::http_client::client_tls(ca_file, "auth.jwks_ca_file").map_err(KeysError::Setup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
