//! A client profile: where the node is and which certificate to call it with.
//!
//! ```toml
//! address = "https://127.0.0.1:7443"
//! server_name = "localhost"   # name in the node's certificate; default: the host
//! ca = "pki/ca.pem"           # CA that issued the node's certificate
//! cert = "pki/org-983974724.pem"
//! key = "pki/org-983974724-key.pem"
//! ```
//! Relative paths are taken relative to the profile file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Connection settings for one organization at one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `https://host:port` of the node.
    pub address: String,
    /// The DNS name to expect in the node's certificate. Defaults to the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the CA that issued the node's certificate.
    pub ca: PathBuf,
    /// PEM certificate of the calling organization.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Development tokens minted for each call (demo and tests only). Real record
    /// systems pass on the HelseID token they hold instead.
    #[serde(default)]
    pub token: Option<DevTokenProfile>,
}

/// How to mint development access tokens: the dev issuer's key and the requester.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokenProfile {
    pub issuer: String,
    pub issuer_key: PathBuf,
    pub kid: String,
    pub audience: String,
    #[serde(default = "default_scope")]
    pub scope: String,
    /// The requesting organization (`orgnr_parent`); must match the certificate.
    pub organization: String,
    /// The organization's name, put in the attest.
    #[serde(default)]
    pub organization_name: Option<String>,
    /// The point of care (`orgnr_child`).
    #[serde(default)]
    pub point_of_care: Option<String>,
    /// The health professional's HPR number.
    #[serde(default)]
    pub hpr: Option<String>,
    /// HPR authorization code, e.g. LE or SP.
    #[serde(default)]
    pub profession: Option<String>,
    /// HL7 PurposeOfUse code.
    #[serde(default = "default_purpose")]
    pub purpose: String,
    /// Whether the attest asserts a care relationship (a reference to the decision).
    #[serde(default = "yes")]
    pub care_relationship: bool,
    /// Bind tokens to a DPoP key and send a proof with each call.
    #[serde(default = "yes")]
    pub dpop: bool,
}

fn default_scope() -> String {
    "pil:lookup".into()
}

fn default_purpose() -> String {
    "TREAT".into()
}

fn yes() -> bool {
    true
}

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid profile {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Profile {
    /// Reads a TOML profile; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.into(),
            source,
        })?;
        let mut p: Profile = toml::from_str(&text).map_err(|e| ProfileError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        if !p.address.starts_with("https://") {
            return Err(ProfileError::Parse {
                path: path.into(),
                message: "address must start with https:// (PIL nodes only speak TLS)".into(),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let token_key = p.token.as_mut().map(|t| &mut t.issuer_key);
        for f in [&mut p.ca, &mut p.cert, &mut p.key]
            .into_iter()
            .chain(token_key)
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(p)
    }
}
