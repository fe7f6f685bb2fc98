//! Access-token and DPoP handling for PIL.
//!
//! Every lookup that reaches a PIL node carries, besides the client's mutual-TLS certificate, a
//! signed access token shaped like the ones HelseID issues: it names the organization, the health
//! professional (HPR number), and — in the *tillitsrammeverk* attest — the purpose of use and the
//! care relationship. Tokens may be sender-constrained with DPoP (RFC 9449).
//!
//! * [`claims`] — serde types of the claims (shared by issuer and verifier).
//! * [`jwk`] — RFC 7638 thumbprints and the DPoP `ath` hash (shared).
//! * `verify` / `dpop` (feature `verifier`) — the resource-server side.
//! * `dev_issuer` (feature `dev-issuer`) — a development issuer and DPoP client key; it does not
//!   depend on any verifier type, so a client crate can enable only this feature.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod claims;
mod es256;
pub mod jwk;

#[cfg(feature = "verifier")]
pub mod dpop;
#[cfg(feature = "verifier")]
mod jws;
#[cfg(feature = "verifier")]
pub mod verify;

#[cfg(feature = "dev-issuer")]
pub mod dev_issuer;

#[cfg(all(test, feature = "verifier", feature = "dev-issuer"))]
mod tests;
