//! Who is calling: the caller's identity, read from its (already verified) mTLS client
//! certificate.
//!
//! This module only *reads* a certificate; it does not verify it. Chain, validity and EKU
//! checks happen in the TLS handshake (rustls' `WebPkiClientVerifier`) before a
//! certificate gets here.
//!
//! # Decision: where the identity is in the certificate
//!
//! A caller is either an organization (a data-sharing client or data holder) or another
//! PIL node (federation). A certificate must be exactly one of them.
//!
//! - **Organization.** The 9-digit organization number (Enhetsregisteret) is read from the
//!   subject attribute `organizationIdentifier` (OID 2.5.4.97) in the form
//!   `NTRNO-<orgnr>`, as in Norwegian eIDAS enterprise certificates (ETSI EN 319 412-1:
//!   "NTR" = national trade register, "NO" = Norway). As a fallback, for older Buypass and
//!   Commfides enterprise certificates without that attribute, the subject `serialNumber`
//!   (OID 2.5.4.5) is used when it holds exactly 9 ASCII digits. When both are present,
//!   `organizationIdentifier` wins and `serialNumber` is ignored, because in eIDAS
//!   certificates the latter may hold something else. The display name is the subject
//!   `organizationName` (O), or the `commonName` (CN) if there is no O.
//! - **PIL node.** A node certificate carries a URI subject alternative name
//!   `urn:pil:node:<region-id>` and is not an organization.
//!
//! Everything else fails closed with an [`IdentityError`]: no identity at all, an
//! `NTRNO-` value that is not 9 digits, an `organizationIdentifier` from another register
//! or country (e.g. `VATNO-…`) without a usable `serialNumber`, a certificate that is both a
//! node and an organization, or conflicting values of the same kind. Only the syntax of
//! the organization number (9 ASCII digits) is checked here; the mod-11 check digit is
//! validated where organization numbers are validated in general.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// The URI SAN prefix that marks a PIL node certificate; the region id follows it.
pub const NODE_URI_PREFIX: &str = "urn:pil:node:";
/// The prefix of a Norwegian organization number in `organizationIdentifier`.
pub(crate) const ORGANIZATION_IDENTIFIER_PREFIX: &str = "NTRNO-";
/// `id-at-organizationIdentifier` (X.520).
pub(crate) const OID_ORGANIZATION_IDENTIFIER: &[u64] = &[2, 5, 4, 97];
/// `id-at-serialNumber` (X.520); the subject attribute, not the certificate serial.
pub(crate) const OID_SERIAL_NUMBER: &[u64] = &[2, 5, 4, 5];
const OID_ORGANIZATION_NAME: &[u64] = &[2, 5, 4, 10];
const OID_COMMON_NAME: &[u64] = &[2, 5, 4, 3];

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An organization, identified by its organization number.
    Organization {
        /// Exactly 9 ASCII digits (the check digit is not validated here).
        org_number: String,
        /// The organization's name from the certificate subject, for logs and display
        /// only; never use it for authorization.
        name: Option<String>,
    },
    /// Another PIL node, calling on behalf of its region.
    Node {
        /// The region id from `urn:pil:node:<region>`; see [`is_valid_region_id`].
        region: String,
    },
}

/// Why no caller identity could be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error(
        "no organization identifier in certificate: expected subject organizationIdentifier \
         NTRNO-<orgnr> or a 9-digit subject serialNumber, or a PIL node URI \
         {NODE_URI_PREFIX}<region>"
    )]
    MissingIdentity,
    #[error("certificate {attribute} {value:?} does not hold a 9-digit organization number")]
    InvalidOrgNumber {
        attribute: &'static str,
        value: String,
    },
    #[error(
        "certificate organizationIdentifier {0:?} is not a Norwegian organization number \
         (expected NTRNO-<orgnr>) and there is no 9-digit serialNumber to fall back on"
    )]
    UnsupportedOrganizationIdentifier(String),
    #[error("PIL node URI {0:?} does not end in a valid region id")]
    InvalidNodeRegion(String),
    #[error("certificate identifies more than one caller: {0}")]
    Ambiguous(String),
}

/// Reads the caller's identity from a DER-encoded X.509 certificate (the first
/// certificate of the peer's chain).
pub fn caller_from_cert(der: &[u8]) -> Result<Caller, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| IdentityError::Malformed(err.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        )));
    }

    let region = node_region(&cert)?;
    let org_number = org_number(cert.subject())?;
    match (region, org_number) {
        (Some(region), Some(org_number)) => Err(IdentityError::Ambiguous(format!(
            "both PIL node {region:?} and organization {org_number}"
        ))),
        (Some(region), None) => Ok(Caller::Node { region }),
        (None, Some(org_number)) => Ok(Caller::Organization {
            org_number,
            name: organization_name(cert.subject()),
        }),
        (None, None) => Err(IdentityError::MissingIdentity),
    }
}

/// The DNS names and IP addresses a (node's own) certificate is valid for, as they
/// appear in a URL's host: the names clients may address the node by.
pub fn host_names(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| IdentityError::Malformed(err.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|err| IdentityError::Malformed(format!("subjectAltName: {err}")))?;
    let mut names = Vec::new();
    for name in san.iter().flat_map(|s| &s.value.general_names) {
        match name {
            GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => names.push(
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                        .to_string(),
                ),
                16 => names.push(format!(
                    "[{}]",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                )),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(names)
}

pub use pil_proto::ident::is_valid_region_id;

/// Whether `value` has the syntax of an organization number: exactly 9 ASCII digits.
pub(crate) fn is_org_number_syntax(value: &str) -> bool {
    value.len() == 9 && value.bytes().all(|b| b.is_ascii_digit())
}

/// The region of a PIL node certificate, or `None` if it has no `urn:pil:node:` URI.
fn node_region(cert: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|err| IdentityError::Malformed(format!("subjectAltName: {err}")))?;
    let Some(san) = san else {
        return Ok(None);
    };
    let mut found: Option<&str> = None;
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(region) = uri.strip_prefix(NODE_URI_PREFIX) else {
            continue;
        };
        if !is_valid_region_id(region) {
            return Err(IdentityError::InvalidNodeRegion((*uri).to_owned()));
        }
        match found {
            Some(previous) if previous != region => {
                return Err(IdentityError::Ambiguous(format!(
                    "PIL node regions {previous:?} and {region:?}"
                )));
            }
            _ => found = Some(region),
        }
    }
    Ok(found.map(str::to_owned))
}

/// The organization number from the subject, following the rules in the module doc.
fn org_number(subject: &X509Name<'_>) -> Result<Option<String>, IdentityError> {
    let mut ntr: Option<&str> = None;
    let mut unsupported: Option<&str> = None;
    for value in attribute_values(subject, OID_ORGANIZATION_IDENTIFIER)? {
        let Some(number) = value.strip_prefix(ORGANIZATION_IDENTIFIER_PREFIX) else {
            unsupported.get_or_insert(value);
            continue;
        };
        if !is_org_number_syntax(number) {
            return Err(IdentityError::InvalidOrgNumber {
                attribute: "organizationIdentifier",
                value: value.to_owned(),
            });
        }
        ntr = Some(agree("organizationIdentifier", ntr, number)?);
    }
    if let Some(number) = ntr {
        return Ok(Some(number.to_owned()));
    }

    let mut serial: Option<&str> = None;
    for value in attribute_values(subject, OID_SERIAL_NUMBER)? {
        // A serialNumber that is not 9 digits is some other kind of serial, not an error.
        if is_org_number_syntax(value) {
            serial = Some(agree("serialNumber", serial, value)?);
        }
    }
    if let Some(number) = serial {
        return Ok(Some(number.to_owned()));
    }

    match unsupported {
        Some(value) => Err(IdentityError::UnsupportedOrganizationIdentifier(
            value.to_owned(),
        )),
        None => Ok(None),
    }
}

/// Returns `value` unless an earlier, different value of the same attribute was found.
fn agree<'a>(
    attribute: &str,
    previous: Option<&'a str>,
    value: &'a str,
) -> Result<&'a str, IdentityError> {
    match previous {
        Some(previous) if previous != value => Err(IdentityError::Ambiguous(format!(
            "{attribute} values {previous:?} and {value:?}"
        ))),
        _ => Ok(value),
    }
}

/// The string values of every subject attribute with the given OID. An attribute whose
/// value is not a string type x509-parser can decode makes the certificate malformed,
/// because ignoring it could hide an identity.
fn attribute_values<'a>(name: &X509Name<'a>, oid: &[u64]) -> Result<Vec<&'a str>, IdentityError> {
    name.iter_attributes()
        .filter(|attr| has_oid(attr, oid))
        .map(|attr| {
            attr.as_str().map_err(|err| {
                IdentityError::Malformed(format!(
                    "subject attribute {} is not a string: {err}",
                    attr.attr_type()
                ))
            })
        })
        .collect()
}

/// The subject O, or the CN if there is no O. Display only, so undecodable values are
/// skipped rather than rejected.
fn organization_name(subject: &X509Name<'_>) -> Option<String> {
    [OID_ORGANIZATION_NAME, OID_COMMON_NAME]
        .into_iter()
        .find_map(|oid| {
            subject
                .iter_attributes()
                .filter(|attr| has_oid(attr, oid))
                .find_map(|attr| attr.as_str().ok())
        })
        .map(str::to_owned)
}

fn has_oid(attr: &AttributeTypeAndValue<'_>, oid: &[u64]) -> bool {
    attr.attr_type()
        .iter()
        .is_some_and(|arcs| arcs.eq(oid.iter().copied()))
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, PrintableString, SanType,
    };

    use super::*;
    use crate::pki::DevCa;

    const ORG: &str = "974633574";

    fn check(der: &[u8], expect: Result<Caller, IdentityError>) {
        assert_eq!(caller_from_cert(der), expect);
    }

    fn org(org_number: &str, name: Option<&str>) -> Result<Caller, IdentityError> {
        Ok(Caller::Organization {
            org_number: org_number.to_owned(),
            name: name.map(str::to_owned),
        })
    }

    /// A self-signed certificate with exactly the given subject and SANs; the chain does
    /// not matter here because this module does not verify certificates.
    fn custom_cert(subject: &[(&[u64], &str)], sans: &[SanType]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for (oid, value) in subject {
            let dn_type = DnType::from_oid(oid);
            let value = match PrintableString::try_from(*value) {
                Ok(printable) => DnValue::PrintableString(printable),
                Err(_) => DnValue::Utf8String((*value).to_owned()),
            };
            params.distinguished_name.push(dn_type, value);
        }
        params.subject_alt_names = sans.to_vec();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn node_uri(region: &str) -> SanType {
        SanType::URI(format!("{NODE_URI_PREFIX}{region}").try_into().unwrap())
    }

    #[test]
    fn organization_certificate_from_the_dev_ca() {
        let ca = DevCa::generate("test CA").unwrap();
        let cert = ca.issue_organization(ORG, "Helse Bergen HF").unwrap();
        check(&cert.cert_der(), org(ORG, Some("Helse Bergen HF")));
    }

    #[test]
    fn serial_number_fallback_from_the_dev_ca() {
        let ca = DevCa::generate("test CA").unwrap();
        let cert = ca
            .issue_organization_serial_number(ORG, "Legekontoret AS")
            .unwrap();
        check(&cert.cert_der(), org(ORG, Some("Legekontoret AS")));
    }

    #[test]
    fn node_certificate_from_the_dev_ca() {
        let ca = DevCa::generate("test CA").unwrap();
        let cert = ca
            .issue_node("helse-vest", &["localhost", "127.0.0.1"])
            .unwrap();
        check(
            &cert.cert_der(),
            Ok(Caller::Node {
                region: "helse-vest".to_owned(),
            }),
        );
    }

    #[test]
    fn ca_certificate_is_no_caller() {
        let ca = DevCa::generate("test CA").unwrap();
        check(&ca.cert_der().unwrap(), Err(IdentityError::MissingIdentity));
    }

    #[test]
    fn organization_identifier_wins_over_serial_number() {
        let der = custom_cert(
            &[
                (OID_ORGANIZATION_NAME, "Org AS"),
                (OID_ORGANIZATION_IDENTIFIER, "NTRNO-974633574"),
                (OID_SERIAL_NUMBER, "123456789"),
            ],
            &[],
        );
        check(&der, org(ORG, Some("Org AS")));
    }

    #[test]
    fn name_falls_back_to_common_name_and_may_be_absent() {
        let der = custom_cert(
            &[
                (OID_COMMON_NAME, "Only CN"),
                (OID_ORGANIZATION_IDENTIFIER, "NTRNO-974633574"),
            ],
            &[],
        );
        check(&der, org(ORG, Some("Only CN")));

        let der = custom_cert(&[(OID_ORGANIZATION_IDENTIFIER, "NTRNO-974633574")], &[]);
        check(&der, org(ORG, None));
    }

    #[test]
    fn name_may_be_non_ascii() {
        let der = custom_cert(
            &[
                (OID_ORGANIZATION_NAME, "Sykehuset Østfold HF"),
                (OID_ORGANIZATION_IDENTIFIER, "NTRNO-974633574"),
            ],
            &[],
        );
        check(&der, org(ORG, Some("Sykehuset Østfold HF")));
    }

    #[test]
    fn malformed_ntrno_value_is_rejected_not_skipped() {
        for value in [
            "NTRNO-97463357",
            "NTRNO-9746335740",
            "NTRNO-97463357X",
            "NTRNO-",
        ] {
            let der = custom_cert(
                &[
                    (OID_ORGANIZATION_IDENTIFIER, value),
                    // A valid fallback must not rescue a malformed primary identifier.
                    (OID_SERIAL_NUMBER, ORG),
                ],
                &[],
            );
            check(
                &der,
                Err(IdentityError::InvalidOrgNumber {
                    attribute: "organizationIdentifier",
                    value: value.to_owned(),
                }),
            );
        }
    }

    #[test]
    fn foreign_organization_identifier_uses_serial_number_or_fails() {
        let der = custom_cert(
            &[
                (OID_ORGANIZATION_IDENTIFIER, "VATNO-974633574MVA"),
                (OID_SERIAL_NUMBER, ORG),
            ],
            &[],
        );
        check(&der, org(ORG, None));

        let der = custom_cert(&[(OID_ORGANIZATION_IDENTIFIER, "NTRSE-5560000000")], &[]);
        check(
            &der,
            Err(IdentityError::UnsupportedOrganizationIdentifier(
                "NTRSE-5560000000".to_owned(),
            )),
        );
    }

    #[test]
    fn serial_number_that_is_not_nine_digits_is_no_identity() {
        for value in ["12345678", "1234567890", "UN:NO-12345678", "97463357A"] {
            let der = custom_cert(
                &[(OID_COMMON_NAME, "Someone"), (OID_SERIAL_NUMBER, value)],
                &[],
            );
            check(&der, Err(IdentityError::MissingIdentity));
        }
    }

    #[test]
    fn node_and_organization_at_once_is_ambiguous() {
        let der = custom_cert(
            &[(OID_ORGANIZATION_IDENTIFIER, "NTRNO-974633574")],
            &[node_uri("helse-vest")],
        );
        assert!(matches!(
            caller_from_cert(&der),
            Err(IdentityError::Ambiguous(_))
        ));
    }

    #[test]
    fn two_node_regions_are_ambiguous_but_a_repeated_one_is_not() {
        let der = custom_cert(&[], &[node_uri("helse-vest"), node_uri("helse-nord")]);
        assert!(matches!(
            caller_from_cert(&der),
            Err(IdentityError::Ambiguous(_))
        ));

        let der = custom_cert(&[], &[node_uri("vest"), node_uri("vest")]);
        check(
            &der,
            Ok(Caller::Node {
                region: "vest".to_owned(),
            }),
        );
    }

    #[test]
    fn node_uri_with_invalid_region_is_rejected() {
        for uri in [
            "urn:pil:node:",
            "urn:pil:node:Helse-Vest",
            "urn:pil:node:a/b",
        ] {
            let der = custom_cert(&[], &[SanType::URI(uri.try_into().unwrap())]);
            check(&der, Err(IdentityError::InvalidNodeRegion(uri.to_owned())));
        }
    }

    #[test]
    fn other_uris_and_dns_names_are_ignored() {
        let der = custom_cert(
            &[(OID_SERIAL_NUMBER, ORG)],
            &[
                SanType::URI("https://example.org/".try_into().unwrap()),
                SanType::URI("urn:pil:nodes:vest".try_into().unwrap()),
                SanType::DnsName("localhost".try_into().unwrap()),
            ],
        );
        check(&der, org(ORG, None));
    }

    #[test]
    fn garbage_and_trailing_data_are_malformed() {
        assert!(matches!(
            caller_from_cert(b"not a certificate"),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            caller_from_cert(&[]),
            Err(IdentityError::Malformed(_))
        ));

        let mut der = custom_cert(&[(OID_SERIAL_NUMBER, ORG)], &[]);
        der.push(0);
        assert!(matches!(
            caller_from_cert(&der),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn region_id_syntax() {
        for ok in ["helse-vest", "vest", "r1", "0", "a-b-c", &"x".repeat(63)] {
            assert!(is_valid_region_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            "-vest",
            "vest-",
            "Vest",
            "helse vest",
            "helse_vest",
            "a.b",
            "vést",
            &"x".repeat(64),
        ] {
            assert!(!is_valid_region_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(
            IdentityError::MissingIdentity.to_string(),
            "no organization identifier in certificate: expected subject organizationIdentifier \
             NTRNO-<orgnr> or a 9-digit subject serialNumber, or a PIL node URI \
             urn:pil:node:<region>"
        );
        assert_eq!(
            IdentityError::InvalidOrgNumber {
                attribute: "organizationIdentifier",
                value: "NTRNO-123".to_owned()
            }
            .to_string(),
            "certificate organizationIdentifier \"NTRNO-123\" does not hold a 9-digit \
             organization number"
        );
    }
}
