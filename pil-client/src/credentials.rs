//! The requester's credentials for lookups: the access token and, for DPoP-bound
//! tokens, a fresh proof per call.
//!
//! A real record system passes on the HelseID token it holds ([`Credentials::Token`]);
//! the demo and tests mint development tokens per call from a profile
//! ([`Credentials::Dev`]).

use std::time::Duration;

use pil_auth::dev_issuer::{DevIssuer, DpopKey};

use crate::{error::ClientError, profile::DevTokenProfile};

/// What a development token says about the requester.
#[derive(Debug, Clone)]
pub struct DevTokenParams {
    pub audience: String,
    pub scope: String,
    pub organization: String,
    /// The organization's name in the attest (recorded by the node for auditors).
    pub organization_name: Option<String>,
    pub point_of_care: Option<String>,
    pub hpr: Option<String>,
    /// The professional's person identifier and name in the attest.
    pub practitioner: Option<(String, String)>,
    pub profession: Option<String>,
    pub purpose: String,
    pub care_relationship: bool,
    /// Patients the attest names (empty: not limited).
    pub patients: Vec<String>,
}

/// How calls are authorized.
pub enum Credentials {
    /// No token: only the registry API can be used.
    None,
    /// A token obtained elsewhere, optionally DPoP-bound to `dpop`.
    Token {
        token: String,
        dpop: Option<DpopKey>,
    },
    /// Development tokens minted per call.
    Dev {
        issuer: Box<DevIssuer>,
        params: Box<DevTokenParams>,
        dpop: Option<DpopKey>,
    },
}

/// The key thumbprint a token is DPoP-bound to (`cnf.jkt`), read without verifying the
/// token (the node verifies it); `None` for a Bearer token or one that is not a JWT.
pub fn bound_thumbprint(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = pil_auth::jwk::b64url_decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["cnf"]["jkt"].as_str().map(str::to_string)
}

/// Credentials for a token obtained elsewhere, with the DPoP key (PKCS#8 PEM) it is
/// bound to, if any. Refuses a bound token without its key, and a key it is not bound
/// to: the node would refuse every call.
pub fn for_token(token: String, dpop_key_pem: Option<&str>) -> Result<Credentials, ClientError> {
    let bound = bound_thumbprint(&token);
    let dpop = match (dpop_key_pem, &bound) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(err(
                "the token is DPoP-bound (it has cnf.jkt): give the private key it is bound to \
                 with --dpop-key",
            ));
        }
        (Some(pem), _) => {
            let key = DpopKey::from_pem(pem).map_err(err)?;
            match &bound {
                Some(jkt) if jkt != key.thumbprint() => {
                    return Err(err(format!(
                        "the DPoP key is not the one the token is bound to (its thumbprint is \
                         {}, the token's cnf.jkt {jkt})",
                        key.thumbprint()
                    )));
                }
                None => {
                    return Err(err(
                        "the token is not DPoP-bound (no cnf.jkt): leave out --dpop-key",
                    ));
                }
                Some(_) => Some(key),
            }
        }
    };
    Ok(Credentials::Token { token, dpop })
}

fn err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Credentials(e.to_string())
}

impl Credentials {
    /// Development credentials from a profile's `[token]` section.
    pub fn dev(p: &DevTokenProfile) -> Result<Self, ClientError> {
        let issuer = DevIssuer::load(&p.issuer, &p.kid, &p.issuer_key).map_err(err)?;
        let dpop = if p.dpop {
            Some(DpopKey::generate().map_err(err)?)
        } else {
            None
        };
        Ok(Self::Dev {
            issuer: Box::new(issuer),
            dpop,
            params: Box::new(DevTokenParams {
                audience: p.audience.clone(),
                scope: p.scope.clone(),
                organization: p.organization.clone(),
                organization_name: p.organization_name.clone(),
                point_of_care: p.point_of_care.clone(),
                hpr: p.hpr.clone(),
                practitioner: None,
                profession: p.profession.clone(),
                purpose: p.purpose.clone(),
                care_relationship: p.care_relationship,
                patients: Vec::new(),
            }),
        })
    }

    /// Changes the development requester (no effect on other credentials).
    pub fn adjust(mut self, f: impl FnOnce(&mut DevTokenParams)) -> Self {
        if let Self::Dev { params, .. } = &mut self {
            f(params);
        }
        self
    }

    /// The metadata for one call to `uri`: `authorization` and, when bound, `dpop`.
    pub fn headers(&self, uri: &str) -> Result<Vec<(&'static str, String)>, ClientError> {
        let (token, dpop) = match self {
            Self::None => return Ok(Vec::new()),
            Self::Token { token, dpop } => (token.clone(), dpop.as_ref()),
            Self::Dev {
                issuer,
                params,
                dpop,
            } => {
                let mut b = issuer
                    .token()
                    .audience(&params.audience)
                    .scope(&params.scope)
                    .org_parent(&params.organization)
                    .purpose(&params.purpose)
                    .expires_in(Duration::from_secs(300));
                if let Some(c) = &params.point_of_care {
                    b = b.org_child(c);
                }
                if let Some(h) = &params.hpr {
                    b = b.hpr_number(h);
                }
                if let Some(name) = &params.organization_name {
                    b = b.org_parent_name(name);
                }
                if let Some((pid, name)) = &params.practitioner {
                    b = b.practitioner(pid, name);
                }
                if let Some(p) = &params.profession {
                    b = b.profession(p);
                }
                if params.care_relationship {
                    b = b.decision_ref("care-relationship-recorded-in-ehr", false);
                }
                for patient in &params.patients {
                    b = b.patient(patient, pil_proto::ident::SYSTEM_FNR);
                }
                if let Some(key) = dpop {
                    b = b.bound_to(key);
                }
                (b.sign().map_err(err)?, dpop.as_ref())
            }
        };
        Ok(match dpop {
            Some(key) => vec![
                ("authorization", format!("DPoP {token}")),
                ("dpop", key.proof("POST", uri, &token).map_err(err)?),
            ],
            None => vec![("authorization", format!("Bearer {token}"))],
        })
    }
}
