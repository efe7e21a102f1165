//! How the admin API shows a resource to people: its canonical JSON, except
//! for a Secret, whose key material never leaves the control plane by this
//! door (only discovery streams it, to the proxies that need it).
//!
//! A Secret is shown as its name, its kind and what an operator needs to
//! know about the certificates in it:
//!
//! ```json
//! {"name": "shop/tls", "kind": "tls_certificate",
//!  "subject": "CN=shop.test", "subject_alt_names": ["shop.test", "*.shop.test"],
//!  "not_after": "2126-11-03T14:52:27Z", "certificates": 2}
//! {"name": "shop/ca", "kind": "ca_bundle", "certificates": 3,
//!  "not_after": "2030-01-01T00:00:00Z"}
//! ```
//!
//! For a `tls_certificate` the fields describe the leaf (the first
//! certificate of the chain) and `certificates` counts the chain; for a
//! `ca_bundle`, `not_after` is the earliest expiry in the bundle. A field that
//! cannot be read from the certificate (validation checks PEM structure only)
//! is `null`. The view cannot be applied back: it has none of the fields a
//! Secret is written with.

use prism_proto::Resource;
use prism_proto::pb::config::v1::{Secret, secret};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// What the admin API shows of `resource`.
pub fn resource_view(resource: &Resource) -> Value {
    match resource {
        Resource::Secret(secret) => secret_view(secret),
        other => other.to_json(),
    }
}

/// The redacted view of a Secret: no PEM, no key, not even a fragment.
pub fn secret_view(secret: &Secret) -> Value {
    match &secret.kind {
        Some(secret::Kind::TlsCertificate(tls)) => {
            let chain = certificates(&tls.certificate_chain);
            let leaf = chain.first();
            json!({
                "name": secret.name,
                "kind": "tls_certificate",
                "subject": leaf.and_then(|c| c.subject.clone()),
                "subject_alt_names": leaf.map(|c| c.subject_alt_names.clone()).unwrap_or_default(),
                "not_after": leaf.and_then(|c| c.not_after.clone()),
                "certificates": chain.len(),
            })
        }
        Some(secret::Kind::CaBundle(ca)) => {
            let bundle = certificates(&ca.certificates);
            let earliest = bundle
                .iter()
                .filter_map(|c| c.expiry.map(|t| (t, c.not_after.clone())))
                .min_by_key(|(t, _)| *t)
                .and_then(|(_, text)| text);
            json!({
                "name": secret.name,
                "kind": "ca_bundle",
                "not_after": earliest,
                "certificates": bundle.len(),
            })
        }
        // The value is the secret itself (a connection string with its
        // password): nothing of it is shown.
        Some(secret::Kind::Credential(_)) => json!({ "name": secret.name, "kind": "credential" }),
        None => json!({ "name": secret.name, "kind": null }),
    }
}

/// What the view tells of one certificate.
struct CertificateFacts {
    subject: Option<String>,
    subject_alt_names: Vec<String>,
    /// Unix seconds.
    expiry: Option<i64>,
    /// RFC 3339, UTC.
    not_after: Option<String>,
}

/// The `CERTIFICATE` blocks of a PEM text, in order, each parsed as far as
/// it goes.
fn certificates(pem: &str) -> Vec<CertificateFacts> {
    Pem::iter_from_buffer(pem.as_bytes())
        .map_while(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| match block.parse_x509() {
            Ok(cert) => {
                let expiry = cert.validity().not_after.timestamp();
                let subject_alt_names = cert
                    .subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|san| san.value.general_names.iter().filter_map(name).collect())
                    .unwrap_or_default();
                CertificateFacts {
                    subject: Some(cert.subject().to_string()),
                    subject_alt_names,
                    expiry: Some(expiry),
                    not_after: OffsetDateTime::from_unix_timestamp(expiry)
                        .ok()
                        .and_then(|t| t.format(&Rfc3339).ok()),
                }
            }
            Err(_) => CertificateFacts {
                subject: None,
                subject_alt_names: Vec::new(),
                expiry: None,
                not_after: None,
            },
        })
        .collect()
}

/// A subject alternative name as text: DNS names, IP addresses, URIs and
/// e-mail addresses; other forms are left out.
fn name(general: &GeneralName<'_>) -> Option<String> {
    match general {
        GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
            Some((*s).to_string())
        }
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(*bytes)
                .ok()
                .map(|b| std::net::Ipv4Addr::from(b).to_string()),
            16 => <[u8; 16]>::try_from(*bytes)
                .ok()
                .map(|b| std::net::Ipv6Addr::from(b).to_string()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{CaBundle, TlsCertificate};

    use super::*;

    const CERT: &str = include_str!("../../../tests/support/tls/server.pem");
    const KEY: &str = include_str!("../../../tests/support/tls/server.key");
    const CA: &str = include_str!("../../../tests/support/tls/ca.pem");

    fn tls() -> Secret {
        Secret {
            name: "shop/tls".into(),
            kind: Some(secret::Kind::TlsCertificate(TlsCertificate {
                certificate_chain: format!("{CERT}{CA}"),
                private_key: KEY.into(),
            })),
        }
    }

    #[test]
    fn a_certificate_shows_its_leaf_and_nothing_secret() {
        let view = secret_view(&tls());
        assert_eq!(
            view,
            json!({
                "name": "shop/tls",
                "kind": "tls_certificate",
                "subject": "CN=shop.test",
                "subject_alt_names": ["shop.test", "*.shop.test"],
                "not_after": "2126-11-03T14:52:27Z",
                "certificates": 2,
            })
        );
        let text = view.to_string();
        assert!(!text.contains("BEGIN") && !text.contains(&KEY[40..80]));
    }

    #[test]
    fn a_ca_bundle_shows_its_size_and_first_expiry() {
        let view = resource_view(&Resource::Secret(Secret {
            name: "shop/ca".into(),
            kind: Some(secret::Kind::CaBundle(CaBundle {
                certificates: format!("{CA}{CERT}"),
            })),
        }));
        assert_eq!(view["kind"], "ca_bundle");
        assert_eq!(view["certificates"], 2);
        let not_after = view["not_after"].as_str().expect("an expiry");
        assert!(not_after.starts_with("2126-11-03T14:52:2"), "{not_after}");
        assert!(!view.to_string().contains("BEGIN"));
    }

    #[test]
    fn a_credential_shows_its_name_and_nothing_of_its_value() {
        let view = resource_view(&Resource::Secret(Secret {
            name: "shop/db".into(),
            kind: Some(secret::Kind::Credential(
                prism_proto::pb::config::v1::Credential {
                    value: "postgres://prism:hunter2@db/shop".into(),
                },
            )),
        }));
        assert_eq!(view, json!({"name": "shop/db", "kind": "credential"}));
    }

    #[test]
    fn unreadable_certificates_are_null_not_an_error() {
        let view = secret_view(&Secret {
            name: "shop/odd".into(),
            kind: Some(secret::Kind::TlsCertificate(TlsCertificate {
                certificate_chain: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                    .into(),
                private_key: KEY.into(),
            })),
        });
        assert_eq!(view["not_after"], Value::Null);
        assert_eq!(view["certificates"], 1);
        assert!(!view.to_string().contains(&KEY[40..80]));
    }
}
