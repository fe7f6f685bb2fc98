//! Who is asking, and what the legal configuration lets them see.
//!
//! A lookup is never answered on the organization's certificate alone: the requester's
//! access token (HelseID style, with the tillitsrammeverk attest) is verified here,
//! DPoP proof included, and turned into the facts the legal configuration decides on.
//! The legal configuration can be swapped at run time: a reload that does not validate
//! leaves the old one in force.

use std::{path::PathBuf, sync::Arc, time::Duration};

use pil_auth::dpop::normalize_htu;
use pil_auth::verify::{Jwks, RequestContext, TokenVerifier, VerifiedRequester, VerifierConfig};
use pil_legal::{LegalConfig, PolicyError};
use pil_proto::ident::PatientId;

use crate::{config::NodeConfig, in_force::InForce, store::StoredBlock};

/// Block target kinds as stored.
pub const BLOCK_HPR: i32 = 1;
pub const BLOCK_PROFESSION: i32 = 2;
pub const BLOCK_ORGANIZATION: i32 = 3;

/// Why access could not be set up or a requester not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Legal(#[from] PolicyError),
    #[error("legal configuration is for region {found:?}, this node serves {expected:?}")]
    Region { found: String, expected: String },
    /// The token or its proof was refused; the reason is for the caller.
    #[error("{0}")]
    Unauthenticated(String),
}

/// A verified requester and the facts the legal configuration decides on.
#[derive(Debug, Clone)]
pub struct Requester {
    pub token: VerifiedRequester,
    pub facts: pil_legal::Requester,
    /// The token as presented, for forwarding to peers with the request.
    pub presented: String,
}

/// Token verification and the legal configuration in force.
pub struct Access {
    /// Swapped when the issuer's keys are reloaded; the replay cache is carried over.
    verifier: InForce<TokenVerifier>,
    /// The node's own base URLs (normalized `https://host:port`): a call must be
    /// addressed to one of them, so a DPoP proof made for another node never fits.
    names: Vec<String>,
    legal_dir: PathBuf,
    region: String,
    legal: InForce<LegalConfig>,
}

impl Access {
    /// Verifies with the issuer keys `jwks` and loads the legal configuration;
    /// refuses an invalid one. `names` are the base URLs clients may address the node
    /// by (see [`own_names`]).
    pub fn load(config: &NodeConfig, names: Vec<String>, jwks: Jwks) -> Result<Self, AccessError> {
        let auth = &config.auth;
        let mut vc = VerifierConfig::new(&auth.issuer, &auth.audience, &auth.required_scope);
        vc.leeway = Duration::from_secs(auth.leeway_secs);
        vc.require_dpop = auth.require_dpop;
        vc.replay_capacity = auth.dpop_replay_capacity;
        vc.token_cache_capacity = auth.token_cache;
        let verifier = TokenVerifier::new(vc, jwks);
        let legal = load_legal(&config.legal_config, &config.region)?;
        Ok(Self {
            verifier: InForce::new(verifier),
            names,
            legal_dir: config.legal_config.clone(),
            region: config.region.clone(),
            legal: InForce::new(legal),
        })
    }

    fn verifier(&self) -> Arc<TokenVerifier> {
        self.verifier.get()
    }

    /// The DPoP proofs remembered against replay at this node, and the most it holds.
    pub fn replay_cache_use(&self) -> (usize, usize) {
        let cache = self.verifier().replay_cache();
        (cache.len(), cache.capacity())
    }

    /// Verification so far: `(signature checks reused, signatures checked, DPoP
    /// proofs refused as replays, refused because the replay cache was full)`.
    pub fn verification_counts(&self) -> (u64, u64, u64, u64) {
        let verifier = self.verifier();
        let (hits, misses) = verifier.token_cache_counts();
        let (replays, full) = verifier.replay_cache().refused();
        (hits, misses, replays, full)
    }

    /// The key ids of the issuer keys in force.
    pub fn issuer_kids(&self) -> Vec<String> {
        self.verifier()
            .jwks()
            .kids()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Verifies with `jwks` from now on. The replay cache is kept, so a key reload
    /// does not let a used DPoP proof in again.
    pub fn install_jwks(&self, jwks: Jwks) {
        self.verifier.set(self.verifier().with_keys(jwks));
    }

    /// The legal configuration in force.
    pub fn legal(&self) -> Arc<LegalConfig> {
        self.legal.get()
    }

    /// Reads and checks the legal configuration on disk without putting it in force.
    pub fn read_legal(&self) -> Result<LegalConfig, AccessError> {
        load_legal(&self.legal_dir, &self.region)
    }

    /// Puts a checked legal configuration in force.
    pub fn install_legal(&self, fresh: LegalConfig) {
        self.legal.set(fresh);
    }

    /// Verifies the token (and DPoP proof) of a call to `path` that arrived on
    /// `arrived_on` (scheme and authority), for the organization in the certificate.
    pub fn authenticate(
        &self,
        cert_org: &str,
        authorization: Option<&str>,
        dpop: Option<&str>,
        arrived_on: &str,
        path: &str,
    ) -> Result<Requester, AccessError> {
        let authorization = authorization.ok_or_else(|| {
            AccessError::Unauthenticated(
                "no access token: send `authorization: DPoP <token>` (or Bearer) with the \
                 requester's token"
                    .into(),
            )
        })?;
        let (scheme, token) = match authorization.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("dpop") => {
                (Scheme::Dpop, token.trim())
            }
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                (Scheme::Bearer, token.trim())
            }
            _ => {
                return Err(AccessError::Unauthenticated(
                    "authorization must be `DPoP <token>` or `Bearer <token>`".into(),
                ));
            }
        };
        let called = base_url(arrived_on).unwrap_or_default();
        if !self.names.contains(&called) {
            return Err(AccessError::Unauthenticated(format!(
                "the call was addressed to {arrived_on:?}, which is not one of this node's names \
                 ({}); address the node by one of them",
                self.names.join(", ")
            )));
        }
        let uri = format!("{called}{path}");
        let ctx = RequestContext::grpc(cert_org, &uri, dpop);
        let requester = self.requester(token, &ctx)?;
        if scheme == Scheme::Dpop && !requester.token.dpop_bound {
            return Err(AccessError::Unauthenticated(
                "the access token is not DPoP-bound (no cnf.jkt), so it must be sent as \
                 `authorization: Bearer <token>`"
                    .into(),
            ));
        }
        if scheme == Scheme::Bearer && requester.token.dpop_bound {
            return Err(AccessError::Unauthenticated(
                "the access token is DPoP-bound (cnf.jkt), so it must be sent as \
                 `authorization: DPoP <token>` with a DPoP proof, not as Bearer (RFC 9449 \
                 section 7.1)"
                    .into(),
            ));
        }
        Ok(requester)
    }

    /// Verifies a token forwarded by a peer node for a client of `client_org`: all
    /// checks but the DPoP proof, which the node it was made for has checked.
    pub fn authenticate_forwarded(
        &self,
        client_org: &str,
        token: &str,
    ) -> Result<Requester, AccessError> {
        self.requester(token.trim(), &RequestContext::forwarded(client_org))
    }

    /// [`Access::authenticate_forwarded`] as of `at`, when the calling home node
    /// verified the token: a late registration of a subscription (the token may have
    /// expired since; the caller bounds how long ago `at` may be).
    pub fn authenticate_forwarded_at(
        &self,
        client_org: &str,
        token: &str,
        at: std::time::SystemTime,
    ) -> Result<Requester, AccessError> {
        self.requester(token.trim(), &RequestContext::forwarded(client_org).at(at))
    }

    fn requester(
        &self,
        presented: &str,
        ctx: &RequestContext<'_>,
    ) -> Result<Requester, AccessError> {
        let token = self
            .verifier()
            .verify(presented, ctx)
            .map_err(|e| AccessError::Unauthenticated(format!("access token refused: {e}")))?;
        let facts = pil_legal::Requester {
            organization: token.org_number.clone(),
            point_of_care: token.child_org_number.clone(),
            hpr_number: token.hpr_number.clone(),
            profession: token.profession.clone(),
            purpose: token.purpose_of_use.code.clone(),
            purpose_details: token
                .purpose_of_use_details
                .as_ref()
                .map(|c| c.code.clone()),
            // The attest's reference to the record system's documented decision is
            // what asserts a care relationship.
            care_relationship: token.decision_ref.as_ref().is_some_and(|d| d.id.is_some()),
        };
        Ok(Requester {
            token,
            facts,
            presented: presented.to_string(),
        })
    }
}

/// How a token was presented in `authorization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Dpop,
    Bearer,
}

/// The base URLs a node may be addressed by: `public_url` (e.g. behind a load
/// balancer), and each name in its certificate with the port it listens on.
pub fn own_names(public_url: Option<&str>, cert_names: &[String], port: u16) -> Vec<String> {
    let from_cert = cert_names.iter().map(|n| format!("https://{n}:{port}"));
    let mut names: Vec<String> = public_url
        .map(str::to_string)
        .into_iter()
        .chain(from_cert)
        .filter_map(|u| base_url(&u))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `https://host:port` normalized as DPoP compares URLs, without a trailing slash.
fn base_url(url: &str) -> Option<String> {
    normalize_htu(url).map(|u| u.trim_end_matches('/').to_string())
}

fn load_legal(dir: &std::path::Path, region: &str) -> Result<LegalConfig, AccessError> {
    let legal = LegalConfig::load(dir)?;
    if legal.settings().node.region != region {
        return Err(AccessError::Region {
            found: legal.settings().node.region.clone(),
            expected: region.to_string(),
        });
    }
    Ok(legal)
}

impl Requester {
    /// False when the token's attest names the patients it covers and `patient` is
    /// not among them.
    pub fn covers(&self, patient: &PatientId) -> bool {
        let named: Vec<&str> = self
            .token
            .patients
            .iter()
            .filter_map(|p| p.identifier.as_ref().map(|i| i.id.as_str()))
            .collect();
        named.is_empty() || named.contains(&patient.value())
    }

    /// Which holders' pointers the patient's `blocks` shut this requester out of.
    pub fn shut_out(&self, blocks: &[StoredBlock]) -> ShutOut {
        let t = &self.token;
        Blocked {
            organization: &t.org_number,
            child_organization: t.child_org_number.as_deref(),
            hpr_number: t.hpr_number.as_deref(),
            profession: t.profession.as_deref(),
        }
        .shut_out(blocks)
    }
}

/// Who a block may name: the requester's organization, point of care, HPR number and
/// profession, from a token now or as a subscription remembers it.
pub struct Blocked<'a> {
    pub organization: &'a str,
    pub child_organization: Option<&'a str>,
    pub hpr_number: Option<&'a str>,
    pub profession: Option<&'a str>,
}

impl Blocked<'_> {
    /// Which holders' pointers the patient's `blocks` shut this requester out of.
    pub fn shut_out(&self, blocks: &[StoredBlock]) -> ShutOut {
        let mut shut = ShutOut::default();
        for b in blocks {
            let hits = match b.target_kind {
                BLOCK_HPR => self.hpr_number == Some(b.target.as_str()),
                BLOCK_PROFESSION => self.profession == Some(b.target.as_str()),
                BLOCK_ORGANIZATION => {
                    self.organization == b.target
                        || self.child_organization == Some(b.target.as_str())
                }
                _ => false,
            };
            if !hits {
                continue;
            }
            if b.holder.is_empty() {
                shut.all_holders = true;
            } else {
                shut.holders.insert(b.holder.clone());
            }
        }
        shut
    }
}

/// The holders whose pointers a patient's blocks shut one requester out of. Blocks
/// are the patient's right wherever they were registered, so these hold for every
/// region's pointers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutOut {
    pub all_holders: bool,
    pub holders: std::collections::BTreeSet<String>,
}

impl ShutOut {
    /// Adds what another region's blocks shut out.
    pub fn merge(&mut self, all_holders: bool, holders: impl IntoIterator<Item = String>) {
        self.all_holders |= all_holders;
        self.holders.extend(holders);
    }

    /// Whether pointers held by `holder` are hidden.
    pub fn hides(&self, holder: &str) -> bool {
        self.all_holders || self.holders.contains(holder)
    }
}
