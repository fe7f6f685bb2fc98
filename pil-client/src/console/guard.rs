//! Who may use the console. Other users of the machine reach 127.0.0.1 too, and a web
//! page in the auditor's own browser may send requests to it, so:
//!
//! - the printed address holds a one-time secret; opening it starts the one session
//!   (an HttpOnly, SameSite=Strict cookie) and the secret stops working;
//! - every other request needs the session cookie;
//! - changes (a review) are POSTs carrying the session's CSRF token, refused when the
//!   browser says they come from another site;
//! - the Host header must name the console's own address (no DNS rebinding);
//! - every answer carries a content security policy that allows no script, no
//!   framing and nothing from elsewhere, and is never cached.

use std::{net::SocketAddr, sync::Mutex};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use rand::RngCore;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use super::Console;

const COOKIE: &str = "pil_console";
pub(super) const LOGIN_PREFIX: &str = "/login/";

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

struct Session {
    id: String,
    csrf: String,
}

pub(crate) struct Guard {
    /// The secret of the printed address, until it is used.
    login: Mutex<Option<String>>,
    /// The first secret, kept to print; never accepted once used.
    printed: String,
    session: Mutex<Option<Session>>,
    hosts: [String; 2],
    origins: [String; 2],
}

impl Guard {
    pub fn new(addr: SocketAddr) -> Self {
        let secret = random_hex();
        let port = addr.port();
        let hosts = [addr.to_string(), format!("localhost:{port}")];
        let origins = hosts.clone().map(|h| format!("http://{h}"));
        Self {
            login: Mutex::new(Some(secret.clone())),
            printed: secret,
            session: Mutex::new(None),
            hosts,
            origins,
        }
    }

    pub fn login_secret(&self) -> &str {
        &self.printed
    }

    /// Uses the one-time secret: the session's cookie value when it matches.
    fn log_in(&self, secret: &str) -> Option<String> {
        let mut login = self.login.lock().unwrap_or_else(|e| e.into_inner());
        let ok = login.as_deref().is_some_and(|s| same(s, secret));
        if !ok {
            return None;
        }
        *login = None;
        let session = Session {
            id: random_hex(),
            csrf: random_hex(),
        };
        let id = session.id.clone();
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
        Some(id)
    }

    fn session_ok(&self, headers: &HeaderMap) -> bool {
        let Some(id) = session_cookie(headers) else {
            return false;
        };
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        session.as_ref().is_some_and(|s| same(&s.id, &id))
    }

    /// The CSRF token forms carry.
    pub fn csrf(&self) -> String {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        session.as_ref().map(|s| s.csrf.clone()).unwrap_or_default()
    }

    pub fn csrf_ok(&self, token: &str) -> bool {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        session.as_ref().is_some_and(|s| same(&s.csrf, token))
    }

    fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| self.hosts.iter().any(|ok| ok == h))
    }

    /// A change must come from the console's own pages.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        let origin_ok = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_none_or(|o| self.origins.iter().any(|ok| ok == o));
        let site_ok = headers
            .get("sec-fetch-site")
            .and_then(|s| s.to_str().ok())
            .is_none_or(|s| s == "same-origin" || s == "none");
        origin_ok && site_ok
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>PIL console: refused</title></head><body><main><h1>Refused</h1>\
         <p>{message}</p></main></body></html>"
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Every request passes here first.
pub(super) async fn check(
    State(console): State<Arc<Console>>,
    request: Request,
    next: Next,
) -> Response {
    let guard = &console.guard;
    let mut response = if !guard.host_ok(request.headers()) {
        refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "This console answers only at the address it printed (127.0.0.1 or localhost with its port).",
        )
    } else if let Some(secret) = request.uri().path().strip_prefix(LOGIN_PREFIX) {
        match guard.log_in(secret) {
            Some(id) => {
                let cookie = cookie::Cookie::build((COOKIE, id))
                    .http_only(true)
                    .same_site(cookie::SameSite::Strict)
                    .path("/")
                    .build();
                Response::builder()
                    .status(StatusCode::SEE_OTHER)
                    .header(header::LOCATION, "/")
                    .header(header::SET_COOKIE, cookie.to_string())
                    .body(Body::empty())
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
            None => refuse(
                StatusCode::FORBIDDEN,
                "This address has already been used or was never valid. Start `pil console` \
                 again and open the address it prints.",
            ),
        }
    } else if !guard.session_ok(request.headers()) {
        refuse(
            StatusCode::FORBIDDEN,
            "This console needs the address `pil console` printed, opened once in this \
             browser.",
        )
    } else if request.method() != Method::GET && !guard.same_origin(request.headers()) {
        refuse(
            StatusCode::FORBIDDEN,
            "A change to the audit log must come from the console's own pages.",
        )
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        // Not `no-referrer`: browsers then send `Origin: null` with the console's own
        // forms, which the origin check must refuse.
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_works_once() {
        let guard = Guard::new("127.0.0.1:8080".parse().unwrap());
        let secret = guard.login_secret().to_string();
        assert!(guard.log_in("wrong").is_none());
        let id = guard.log_in(&secret).expect("first use");
        assert!(guard.log_in(&secret).is_none(), "second use");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap(),
        );
        assert!(guard.session_ok(&headers));
        headers.insert(header::COOKIE, HeaderValue::from_static("pil_console=x"));
        assert!(!guard.session_ok(&headers));
        assert!(guard.csrf_ok(&guard.csrf()));
        assert!(!guard.csrf_ok(""));
    }

    #[test]
    fn only_the_console_s_own_host_and_origin_pass() {
        let guard = Guard::new("127.0.0.1:8080".parse().unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(guard.host_ok(&headers));
        headers.insert(header::HOST, HeaderValue::from_static("evil.example:8080"));
        assert!(!guard.host_ok(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:8080"),
        );
        assert!(guard.same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!guard.same_origin(&headers));
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!guard.same_origin(&headers));
    }
}
